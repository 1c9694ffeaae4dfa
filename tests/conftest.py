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

# Every kernel module is imported now, under the interpreter setting above: a test that compiles for a GPU
# (tests/test_kernel_report.py unsets TRITON_INTERPRET) must not be the first to import one, or every later test
# would get its kernels jitted for a GPU that is not here.
if os.environ.get("TRITON_INTERPRET") == "1":
    import camtl.kernels.adapter  # noqa: E402,F401
    import camtl.kernels.attention  # noqa: E402,F401
    import camtl.kernels.film  # noqa: E402,F401
    import camtl.kernels.layer_norm  # noqa: E402,F401

# Tolerances (rtol, atol) by dtype, against a float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, msg="", magnitude=None):
    """|actual - expected| <= atol·max(1, magnitude) + rtol·|expected| per element, with the dtype's (rtol, atol).

    ``magnitude`` (broadcastable to expected) is each element's Σ|terms| when the caller knows it: a sum computed
    in low precision is off by ~eps·Σ|terms|, however small the result. By default it is |expected| plus the
    tensor's RMS (a typical entry's size, for results that cancel), not its largest entry: in bf16, 2e-2 times
    the largest entry would leave the small entries of a gradient unchecked.
    """
    rtol, atol = TOL[dtype or actual.dtype]
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if magnitude is None:
        finite = expected[expected.isfinite()]
        rms = finite.square().mean().sqrt() if finite.numel() else 0.0
        scale = expected.abs() + rms
    else:
        scale = torch.as_tensor(magnitude, dtype=torch.float64, device=expected.device).expand_as(expected)
    allowed = atol * scale.clamp(min=1.0) + rtol * expected.abs()
    error = (actual - expected).abs()
    bad = ~((error <= allowed) | (actual == expected))  # equal infinities pass; any NaN fails
    if bad.any():
        worst = (error / allowed).nan_to_num(float("inf")).argmax()
        i = tuple(int(n) for n in torch.unravel_index(worst, expected.shape)) if expected.dim() else ()
        raise AssertionError(f"{msg}\n{int(bad.sum())} / {expected.numel()} elements not close; worst at {i}: "
                             f"actual {actual[i].item():.8g}, expected {expected[i].item():.8g}, "
                             f"error {error[i].item():.3g} > allowed {allowed[i].item():.3g}")


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


@contextlib.contextmanager
def tf32_matmuls():
    """torch allows TF32 tensor cores for float32 matmuls (so camtl's float32 Triton GEMMs run), then restores."""
    matmul = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def triton_vs_torch(fn, tensors, dtype, names, multilinear=False, tf32=False):
    """The triton backend on ``tensors`` cast to dtype, against the torch backend in fp32 on the same rounded values.

    Compares the output and the gradient of every tensor (named by ``names``);
    returns the triton output and gradients. ``multilinear``: fn is a sum of
    products of its inputs (FiLM, a FiLM'd GEMM), so fn and its gradients on
    |inputs| and |grad| give each element's Σ|terms|, the scale of its
    low-precision rounding error (see assert_close). ``tf32``: fn multiplies
    matrices, which the kernels run on TF32 tensor cores in float32 (allowed
    for the triton run only; the reference stays exact): float32 is then
    checked at fp16's tolerance (TF32 keeps fp16's 10-bit mantissa).
    """
    act = [t.to(dtype) for t in tensors]
    ref = [t.float() for t in act]
    with camtl.use_backend("torch"), torch.no_grad():
        shape = fn(*ref).shape
    grad = torch.randn(shape, device=act[0].device).to(dtype)
    with tf32_matmuls() if tf32 and dtype == torch.float32 else contextlib.nullcontext():
        out, grads = run_with_grads("triton", fn, act, grad)
    exp, exp_grads = run_with_grads("torch", fn, ref, grad.float())
    if tf32 and dtype == torch.float32:
        dtype = torch.float16  # the tolerance only
    magnitudes = [None] * (1 + len(tensors))
    if multilinear:
        abs_out, abs_grads = run_with_grads("torch", fn, [t.abs() for t in ref], grad.float().abs())
        magnitudes = [abs_out.detach()] + abs_grads
    assert out.dtype == act[0].dtype and out.shape == exp.shape
    assert torch.isfinite(out).all()
    assert_close(out.detach(), exp.detach(), dtype, "output", magnitudes[0])
    for name, g, e, m in zip(names, grads, exp_grads, magnitudes[1:]):
        assert g.dtype == act[0].dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, e, dtype, f"grad of {name}", m)
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


@contextlib.contextmanager
def shuffled_program_order(seed):
    """Inside the block the Triton interpreter runs each launch's programs in a random order (each exactly once).

    The interpreter otherwise runs them one at a time in grid order, so a result
    that depends on the order programs run in (atomics, two programs writing
    one place) would still come out the same every run; a shuffled order shows it.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import interpreter_builder as builder

    rng = torch.Generator().manual_seed(seed)
    real_set_dim, real_set_idx = builder.set_grid_dim, builder.set_grid_idx
    order = {}

    def set_grid_dim(nx, ny, nz):
        real_set_dim(nx, ny, nz)
        grid = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
        order.clear()
        order.update(zip(grid, (grid[i] for i in torch.randperm(len(grid), generator=rng).tolist())))

    def set_grid_idx(x, y, z):
        real_set_idx(*order[(x, y, z)])

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = real_set_dim, real_set_idx


def assert_independent_of_program_order(compute, names, seed):
    """compute() (a list of tensors, named by names) is bitwise the same with the programs in grid order and
    shuffled: no atomics, no two programs writing one place."""
    in_grid_order = compute()
    with shuffled_program_order(seed=seed):
        shuffled = compute()
    assert len(names) == len(shuffled) == len(in_grid_order)
    for name, got, want in zip(names, shuffled, in_grid_order):
        assert torch.equal(got, want), f"{name} depends on the program order"
