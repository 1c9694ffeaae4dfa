"""The torch backend on the GPU in fp32, fp16 and bf16, at real shapes, against float64 references on the CPU."""

import math

import pytest
import torch

import camtl
import camtl.nn as cnn
from camtl import ops
from camtl.testing import published as pub
from camtl_test_helpers import assert_close, bert_config

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _torch_backend():
    with camtl.use_backend("torch"):
        yield


def leaves(tensors, dtype, device):
    return [t.to(device=device, dtype=dtype).clone().requires_grad_() for t in tensors]


def compare(fn, ref_fn, tensors, dtype, extra=()):
    """fn on CUDA in dtype vs ref_fn on CPU in float64: output and every gradient."""
    ref = leaves(tensors, torch.float64, "cpu")
    act = leaves(tensors, dtype, CUDA)
    out = fn(*act, *[e.to(CUDA) if isinstance(e, torch.Tensor) else e for e in extra])
    exp = ref_fn(*ref, *extra)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close(out.cpu(), exp, dtype, "output")
    grad = torch.randn_like(exp)
    (out.double() * grad.to(CUDA)).sum().backward()
    (exp * grad).sum().backward()
    for i, (a, r) in enumerate(zip(act, ref)):
        assert_close(a.grad.cpu(), r.grad, dtype, f"grad of input {i}")


def naive_attention(q, k, v, table, index, keep):
    B, H, L, d = q.shape
    c = table.shape[-1]
    i = torch.arange(L)
    same = (i[:, None] // c) == (i[None, :] // c)
    col = (i[None, :] - c * (i[:, None] // c)).clamp(0, c - 1)
    bias = torch.where(same, table[index][:, :L].gather(2, col.expand(B, L, L)), torch.zeros(()).double())
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d) + bias[:, None]
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,d,L_max", [(32, 12, 128, 64, 128), (8, 16, 512, 64, 512), (16, 12, 100, 64, 128)])
def test_conditional_attention(B, H, L, d, L_max, dtype):
    G, c = 8, math.ceil(L_max / 6)
    tensors = [torch.randn(B, H, L, d), torch.randn(B, H, L, d), torch.randn(B, H, L, d), torch.randn(G, L_max, c)]
    index = torch.arange(B) % G
    lengths = torch.randint(1, L + 1, (B,))
    keep = torch.arange(L)[None, :] < lengths[:, None]
    compare(lambda q, k, v, t, i, m: ops.conditional_attention(q, k, v, t, i, m), naive_attention, tensors, dtype,
            extra=(index, keep))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [768, 1024])
def test_conditional_layer_norm(D, dtype):
    B, L, G = 32, 128, 8
    tensors = [torch.randn(B, L, D), torch.randn(B, L, D), 1 + 0.1 * torch.randn(D), torch.randn(D),
               0.3 * torch.randn(G, D), 0.3 * torch.randn(G, D)]
    index = torch.arange(B) % G

    def ref(x, r, w, b, g, be, idx):
        h = x + r
        scale = (1 + g[idx]) * w + be[idx]
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-12) \
            * scale[:, None] + b

    compare(lambda x, r, w, b, g, be, idx: ops.conditional_layer_norm(x, w, b, g, be, idx, 1e-12, r), ref,
            tensors, dtype, extra=(index,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_film_and_film_linear(dtype):
    B, L, D, G = 32, 128, 768, 8
    index = torch.arange(B) % G
    tensors = [torch.randn(B, L, D), 0.3 * torch.randn(G, D), 0.3 * torch.randn(G, D)]
    film_ref = lambda x, g, b, idx: (1 + g[idx][:, None]) * x + b[idx][:, None]
    compare(lambda x, g, b, idx: ops.film(x, g, b, idx), film_ref, tensors, dtype, extra=(index,))
    w, bias = torch.randn(D // 3, D) / math.sqrt(D), torch.randn(D // 3)
    compare(lambda x, g, b, w, bi, idx: ops.film_linear(x, g, b, idx, w, bi),
            lambda x, g, b, w, bi, idx: film_ref(x, g, b, idx) @ w.T + bi, tensors + [w, bias], dtype, extra=(index,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_module_matches_published(dtype):
    """camtl.nn.ConditionalSelfAttention on the GPU vs the published algorithm in float64 on the CPU."""
    cfg = bert_config(hidden_size=768, num_attention_heads=12, max_seq_length=128)
    theirs = pub.PublishedSelfAttention(cfg).double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ours = cnn.ConditionalSelfAttention(cfg).to(CUDA, dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    B, L = 32, 128
    h, z = torch.randn(B, L, 768), torch.randn(8, 768)[torch.arange(B) % 8]
    keep = torch.arange(L)[None, :] < torch.randint(1, L + 1, (B,))[:, None]
    mask = (1.0 - keep.double())[:, None, None, :] * -10000.0
    exp = theirs(h.double(), mask, task_embedding=z.double())[0]
    out = ours(h.to(CUDA, dtype), mask.to(CUDA, dtype), task_embedding=z.to(CUDA, dtype))[0]
    assert_close(out.cpu(), exp, dtype, "output")
