"""The Triton conditional attention on the GPU at real shapes, bf16 and fp16, against the torch backend."""

import math

import pytest
import torch

import camtl
from camtl import ops
from camtl_test_helpers import assert_close, bert_config

CUDA = torch.device("cuda")
SHAPES = [(32, 12, 128, 64, 128), (8, 16, 512, 64, 512)]  # B, H, L, d, L_max


def inputs(B, H, L, d, L_max, dtype):
    torch.manual_seed(B * L)
    G, c = 8, math.ceil(L_max / (6 if L_max == 128 else 2))
    tensors = [torch.randn(B, H, L, d, device=CUDA) for _ in range(3)] + [torch.randn(G, L_max, c, device=CUDA)]
    index = torch.arange(B, device=CUDA) % G
    keep = torch.arange(L, device=CUDA)[None, :] < torch.randint(L // 2, L + 1, (B,), device=CUDA)[:, None]
    return tensors, index, keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,L,d,L_max", SHAPES, ids=["B32 H12 L128", "B8 H16 L512"])
def test_matches_torch_backend(B, H, L, d, L_max, dtype):
    tensors, index, keep = inputs(B, H, L, d, L_max, dtype)
    ref = [t.clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    with camtl.use_backend("triton"):
        out = ops.conditional_attention(*act, index, keep)
    with camtl.use_backend("torch"):
        exp = ops.conditional_attention(*ref, index, keep)
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    out.backward(grad.to(dtype))
    exp.backward(grad)
    for name, a, r in zip(("q", "k", "v", "table"), act, ref):
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


def test_deterministic_backward():
    tensors, index, keep = inputs(32, 12, 128, 64, 128, torch.bfloat16)
    leaves = [t.bfloat16().requires_grad_() for t in tensors]

    def grads():
        with camtl.use_backend("triton"):
            out = ops.conditional_attention(*leaves, index, keep)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_inductor():
    module = camtl.nn.ConditionalSelfAttention(bert_config(hidden_size=768, num_attention_heads=12,
                                                           max_seq_length=128)).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        module.random_weight_matrix.normal_()
    h = torch.randn(8, 128, 768, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(8, 768, device=CUDA, dtype=torch.bfloat16)
    keep = torch.arange(128, device=CUDA)[None, :] < torch.randint(64, 129, (8,), device=CUDA)[:, None]
    with camtl.use_backend("triton"):
        eager = module(h, keep, task_embedding=z)[0]
        compiled = torch.compile(lambda h, keep: module(h, keep, task_embedding=z)[0], fullgraph=True)
        out = compiled(h, keep)
    assert_close(out, eager, torch.bfloat16)
    g_eager, = torch.autograd.grad(eager.float().sum(), h)
    g_out, = torch.autograd.grad(out.float().sum(), h)
    assert_close(g_out, g_eager, torch.bfloat16)
