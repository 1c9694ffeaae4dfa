"""The Triton conditional attention on the GPU at real shapes, bf16 and fp16, against the torch backend."""

import math

import pytest
import torch

import camtl
from camtl import ops
from camtl_test_helpers import assert_close, bert_config, tf32_matmuls
from test_kernels_attention import _kernel_attention, dkdv_on_the_other_layout, philox_keep

CUDA = torch.device("cuda")
SHAPES = [(32, 12, 128, 64, 128), (8, 16, 512, 64, 512)]  # B, H, L, d, L_max


def inputs(B, H, L, d, L_max, dtype):
    torch.manual_seed(B * L)
    G, c = 8, math.ceil(L_max / (6 if L_max == 128 else 2))
    tensors = [torch.randn(B, H, L, d, device=CUDA) for _ in range(3)] + [torch.randn(G, L_max, c, device=CUDA)]
    index = torch.arange(B, device=CUDA) % G
    keep = torch.arange(L, device=CUDA)[None, :] < torch.randint(L // 2, L + 1, (B,), device=CUDA)[:, None]
    return tensors, index, keep


def compare_with_torch_backend(B, H, L, d, L_max, dtype):
    """Triton in dtype against the torch backend in fp32 on the same (rounded) inputs, with key padding: the output
    and every gradient. (From the unrounded inputs, the rounding alone moves dP by about 2^-8·sqrt(d): at d 256, one
    table gradient in 40000 then missed bf16's tolerance, under the interpreter.)"""
    tensors, index, keep = inputs(B, H, L, d, L_max, dtype)
    tensors = [t.to(dtype).float() for t in tensors]
    ref = [t.clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    with camtl.use_backend("triton"):
        out = ops.conditional_attention(*act, index, keep)
    with camtl.use_backend("torch"):
        exp = ops.conditional_attention(*ref, index, keep)
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp).to(dtype)
    out.backward(grad)
    exp.backward(grad.float())
    for name, a, r in zip(("q", "k", "v", "table"), act, ref):
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,L,d,L_max", SHAPES, ids=["B32 H12 L128", "B8 H16 L512"])
def test_matches_torch_backend(B, H, L, d, L_max, dtype):
    compare_with_torch_backend(B, H, L, d, L_max, dtype)


@pytest.mark.parametrize("d", [32, 128, 256])
def test_head_dims_with_partial_tiles_match_torch_backend(d):
    """Each of sm_90's dK/dV tile families (32x64 on [keys, queries] at d 32, 16x64 at d 128, [queries, keys] at
    d 256) and the forward's and dQ's, at an odd length (L = 100: every pass runs a partial last tile), bf16."""
    compare_with_torch_backend(4, 4, 100, d, 100, torch.bfloat16)


@pytest.mark.parametrize("d", [64, 128])  # BERT's head dim, and the one whose 16-bit tiles did not fit
def test_float32_on_tf32_tensor_cores_matches_torch_backend(d):
    """float32 with TF32 allowed runs the kernels on fp32's own tiles (_TILES_FP32: at d 128 the 16-bit tiles need
    more shared memory per block than an H100 or A100 has, and the launch would fail), at an odd length with key
    padding, against the torch backend in exact fp32, at fp16's tolerance (TF32 keeps a 10-bit mantissa)."""
    tensors, index, keep = inputs(4, 4, 100, d, 100, torch.float32)
    ref = [t.clone().requires_grad_() for t in tensors]
    act = [t.clone().requires_grad_() for t in tensors]
    grad = torch.randn(4, 4, 100, d, device=CUDA)
    with tf32_matmuls(), camtl.use_backend("triton"):
        out = ops.conditional_attention(*act, index, keep)
        out.backward(grad)
    with camtl.use_backend("torch"):
        exp = ops.conditional_attention(*ref, index, keep)
    exp.backward(grad)
    assert_close(out, exp, torch.float16, "output")
    for name, a, r in zip(("q", "k", "v", "table"), act, ref):
        assert_close(a.grad, r.grad, torch.float16, f"grad of {name}")


def test_float32_above_head_dim_128_is_left_to_the_torch_backend():
    """At d 256, fp32's tiles do not fit or spill: the Triton backend refuses it by name, auto runs torch."""
    tensors, index, keep = inputs(2, 2, 64, 256, 64, torch.float32)
    with tf32_matmuls():
        with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match="up to 128"):
            ops.conditional_attention(*tensors, index, keep)
        with camtl.use_backend("auto"):
            out = ops.conditional_attention(*tensors, index, keep)
    with camtl.use_backend("torch"):
        exp = ops.conditional_attention(*tensors, index, keep)
    assert_close(out, exp, torch.float32)


@pytest.mark.parametrize("dkdv", ["this GPU's layout", "the other layout"])
def test_dropout_with_partial_tiles_matches_the_documented_mask(dkdv, monkeypatch):
    """Dropout (bf16, d 64, L = 100) against float64 autograd through the mask computed without the kernel, with
    dK/dV on both score layouts: [keys, queries] is sm_90's, [queries, keys] the other GPUs'."""
    handed_out = dkdv_on_the_other_layout(monkeypatch) if dkdv == "the other layout" else None
    B, H, L, d, p, seed = 2, 4, 100, 64, 0.1, 1234
    torch.manual_seed(3)
    tensors = [torch.randn(B, H, L, d, device=CUDA) for _ in range(3)] + [torch.randn(3, L, 50, device=CUDA)]
    index = torch.tensor([0, 2], device=CUDA)
    keep = philox_keep(seed, B, H, L, p).to(CUDA)
    leaves = [t.bfloat16().requires_grad_() for t in tensors]
    out = _kernel_attention(leaves, index, p, seed)
    ref = [t.bfloat16().double().requires_grad_() for t in tensors]  # the kernel's inputs, rounded as it reads them
    _, probs = ops.conditional_attention(*ref[:3], ref[3], index, return_probs=True)
    exp = (probs * keep / (1 - p)) @ ref[2]
    assert_close(out, exp, torch.bfloat16, "output")
    grad = torch.randn_like(exp).bfloat16()
    out.backward(grad)
    exp.backward(grad.double())
    for name, a, r in zip(("q", "k", "v", "table"), leaves, ref):
        assert_close(a.grad, r.grad, torch.bfloat16, f"grad of {name} with dropout ({dkdv})")
    assert handed_out is None or handed_out, "the launches did not ask for their configurations"


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
