"""The Triton conditional layer norm, FiLM and FiLM-bottleneck on the GPU at real shapes (B·L = 4096).

Each is compared with the torch backend (in fp32, on the same rounded inputs), forward and every gradient,
in bf16, fp16 and fp32. The input makers are the CPU tests'.
"""

import pytest
import torch

import camtl
from camtl_test_helpers import assert_close, bert_config, poisoned_empty, run_with_grads, triton_vs_torch
from test_kernels_adapter import NAMES as ADAPTER_NAMES, film_linear, make as make_adapter
from test_kernels_film import NAMES as FILM_NAMES, film, make as make_film
from test_kernels_layer_norm import NAMES as CLN_NAMES, cln, make as make_cln

CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
B, L, G = 32, 128, 8


def task_index():
    """Mixed tasks, with task G - 1 absent from the batch."""
    index = torch.randint(0, G - 1, (B,), device=CUDA)
    index[: G - 1] = torch.arange(G - 1, device=CUDA)
    return index


def assert_absent_task_is_zero(dgamma, dbeta):
    assert (dgamma[G - 1] == 0).all() and (dbeta[G - 1] == 0).all()
    assert (dgamma[: G - 1] != 0).any(dim=1).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [768, 1024])
def test_conditional_layer_norm(D, dtype):
    _, grads = triton_vs_torch(cln(task_index()), make_cln((B, L, D), G, CUDA), dtype, CLN_NAMES)
    assert_absent_task_is_zero(grads[3], grads[4])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [768, 1024])
def test_film(D, dtype):
    _, grads = triton_vs_torch(film(task_index()), make_film((B, L, D), G, CUDA), dtype, FILM_NAMES)
    assert_absent_task_is_zero(grads[1], grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_film_shared_x(dtype):
    """The CBDA use: a [L, c] matrix shared by the batch, c = ceil(L / 6)."""
    _, grads = triton_vs_torch(film(task_index()), make_film((L, 22), G, CUDA), dtype, FILM_NAMES)
    assert_absent_task_is_zero(grads[1], grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [768, 1024])
def test_film_linear(D, dtype):
    _, grads = triton_vs_torch(film_linear(task_index()), make_adapter(B, L, D, G, CUDA), dtype, ADAPTER_NAMES,
                               tf32=True)
    assert_absent_task_is_zero(grads[1], grads[2])


@pytest.mark.parametrize("op", ["conditional_layer_norm", "film", "film_linear"])
def test_deterministic_and_independent_of_uninitialized_memory(op):
    D, index = 768, task_index()
    fn, tensors = {
        "conditional_layer_norm": (cln(index), make_cln((B, L, D), G, CUDA)),
        "film": (film(index), make_film((B, L, D), G, CUDA)),
        "film_linear": (film_linear(index), make_adapter(B, L, D, G, CUDA)),
    }[op]
    tensors = [t.bfloat16() for t in tensors]
    with torch.no_grad(), camtl.use_backend("torch"):
        grad = torch.randn_like(fn(*tensors))
    out, grads = run_with_grads("triton", fn, tensors, grad)
    with poisoned_empty():
        again, grads_again = run_with_grads("triton", fn, tensors, grad)
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_torch_compile_fullgraph_inductor():
    """The published adapter sublayer, CLN(bottleneck(h) + attention_out), in bf16 under inductor."""
    D = 768
    bottleneck = camtl.nn.ConditionalBottleNeck(bert_config(hidden_size=D)).to(CUDA, torch.bfloat16)
    norm = camtl.nn.ConditionalLayerNorm(D, D).to(CUDA, torch.bfloat16)
    z, index = torch.randn(B, D, device=CUDA, dtype=torch.bfloat16), task_index()
    h = torch.randn(B, L, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    attention_out = torch.randn(B, L, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)

    def adapter(h, attention_out):
        return norm(bottleneck(z, h), z, index, attention_out)

    with camtl.use_backend("triton"):
        eager = adapter(h, attention_out)
        out = torch.compile(adapter, fullgraph=True)(h, attention_out)
    assert_close(out, eager, torch.bfloat16)
    grad = torch.randn_like(out)
    for g_out, g_eager in zip(torch.autograd.grad(out, (h, attention_out), grad),
                              torch.autograd.grad(eager, (h, attention_out), grad)):
        assert_close(g_out, g_eager, torch.bfloat16)
