import contextlib
import os
import zlib
from types import SimpleNamespace

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton compiles them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import camtl  # noqa: E402  (after TRITON_INTERPRET is set)

# Tolerances (rtol, atol) by dtype, against a float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    """Close within the dtype's tolerance; atol scales with the reference's magnitude (sums of many terms)."""
    rtol, atol = TOL[dtype or actual.dtype]
    expected = expected.double()
    atol = atol * max(1.0, expected.abs().max().item()) if expected.numel() else atol
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


@pytest.fixture
def device():
    """CPU by default; tests/gpu sets CAMTL_TEST_DEVICE=cuda to rerun them on a GPU."""
    return torch.device(os.environ.get("CAMTL_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Random inputs per test, reproducible from the test's name; CAMTL_TEST_SEED draws another set.
    base = int(os.environ.get("CAMTL_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))
    yield


def bert_config(hidden_size=24, num_attention_heads=4, max_seq_length=12, attention_probs_dropout_prob=0.0,
                output_attentions=False, **kw):
    """A published-style config object (transformers 2.11 BertConfig plus max_seq_length)."""
    return SimpleNamespace(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                           max_seq_length=max_seq_length, attention_probs_dropout_prob=attention_probs_dropout_prob,
                           output_attentions=output_attentions, **kw)


def run_with_grads(backend, fn, tensors, grad):
    """fn(*leaves) on ``backend`` (leaves: fresh copies of ``tensors`` that require grad), then backward(grad).

    Returns the output (its grad_fn names the op that made it) and the leaves' gradients.
    """
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with camtl.use_backend(backend):
        out = fn(*leaves)
    out.backward(grad)
    return out, [leaf.grad for leaf in leaves]


def triton_vs_torch(fn, tensors, dtype, names):
    """The triton backend on ``tensors`` cast to dtype, against the torch backend in fp32 on the same rounded values.

    Compares the output and the gradient of every tensor (named by ``names``);
    returns the triton output and gradients.
    """
    act = [t.to(dtype) for t in tensors]
    ref = [t.float() for t in act]
    with camtl.use_backend("torch"), torch.no_grad():
        shape = fn(*ref).shape
    grad = torch.randn(shape, device=act[0].device).to(dtype)
    out, grads = run_with_grads("triton", fn, act, grad)
    exp, exp_grads = run_with_grads("torch", fn, ref, grad.float())
    assert out.dtype == dtype and out.shape == exp.shape
    assert torch.isfinite(out).all()
    assert_close(out.detach(), exp.detach(), dtype, "output")
    for name, g, e in zip(names, grads, exp_grads):
        assert g.dtype == dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, e, dtype, f"grad of {name}")
    return out, grads


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block torch.empty returns NaN-filled memory (ints: -1): an output a kernel leaves unwritten shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def graph_has(out, op):
    """Whether the autograd graph of ``out`` holds a node of the torch.library op ``op`` (e.g. "camtl::film_fwd")."""
    wanted = op.replace("::", "_") + "_"
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if wanted in node.name():
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False
