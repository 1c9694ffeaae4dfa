"""camtl.ops.conditional_attention / block_bias against a naive float64 reference written here."""

import math

import pytest
import torch

from camtl import ops
from conftest import assert_close


def naive_bias(table, index, L):
    """bias[b, i, j] = table[index[b], i, j - c*(i//c)] on the diagonal blocks, by loops."""
    B, c = index.shape[0], table.shape[-1]
    bias = torch.zeros(B, L, L, dtype=table.dtype, device=table.device)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                if i // c == j // c:
                    bias[b, i, j] = table[index[b], i, j - c * (i // c)]
    return bias


def naive_attention(q, k, v, table, index, key_keep=None, additive=None, scale=None):
    """exp-normalize by hand; key_keep [B, L] bool, additive [B, L] float."""
    B, H, L, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale + naive_bias(table, index, L)[:, None]
    if additive is not None:
        s = s + additive[:, None, None, :]
    w = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    if key_keep is not None:
        w = w * key_keep[:, None, None, :].to(w.dtype)
    denom = w.sum(-1, keepdim=True)
    p = torch.where(denom > 0, w / denom.clamp_min(1e-300), torch.zeros_like(w))
    return torch.einsum("bhij,bhjd->bhid", p, v), p


def make_inputs(B, H, L, d, G, L_max, c, dtype, device, requires_grad=True):
    g = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=device)
    q, k, v = g(B, H, L, d), g(B, H, L, d), g(B, H, L, d)
    table = g(G, L_max, c)
    index = torch.randint(0, G, (B,), device=device)
    index[:G] = torch.arange(min(G, B), device=device)  # every task present, mixed in the batch
    ref = [t.clone().requires_grad_(requires_grad) for t in (q, k, v, table)]
    act = [t.to(dtype).clone().requires_grad_(requires_grad) for t in (q, k, v, table)]
    return ref, act, index


def check_against_naive(act, ref, index, dtype, key_keep=None, additive=None, op_mask=None, scale=None):
    out = ops.conditional_attention(*act, index, op_mask, scale=scale)
    exp, _ = naive_attention(*ref, index, key_keep, additive, scale)
    grad = torch.randn_like(exp)
    valid = torch.ones_like(exp) if key_keep is None else (key_keep.any(-1)[:, None, None, None] * torch.ones_like(exp))
    assert_close(out, exp, dtype, "output")
    (out.double() * grad * valid).sum().backward()
    (exp * grad * valid).sum().backward()
    for name, a, r in zip("q k v table".split(), act, ref):
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,L,d,G,L_max,c", [
    (5, 2, 12, 8, 3, 12, 4),   # L a multiple of c
    (4, 3, 10, 4, 2, 10, 4),   # L not a multiple of c: the last block is cropped (2x2)
    (3, 2, 7, 16, 3, 13, 5),   # dynamic L: the batch is shorter than L_max, the table is cropped
])
def test_matches_naive_mixed_tasks(B, H, L, d, G, L_max, c, dtype, device):
    ref, act, index = make_inputs(B, H, L, d, G, L_max, c, dtype, device)
    check_against_naive(act, ref, index, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bool_key_padding_and_fully_padded_example(dtype, device):
    B, H, L, d = 4, 2, 9, 8
    ref, act, index = make_inputs(B, H, L, d, 2, 9, 3, dtype, device)
    lengths = torch.tensor([9, 5, 0, 1], device=device)  # example 2 is fully padded
    keep = torch.arange(L, device=device)[None, :] < lengths[:, None]
    check_against_naive(act, ref, index, dtype, key_keep=keep, op_mask=keep)
    out = ops.conditional_attention(*[t.detach() for t in act], index, keep)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all(), "a fully padded example gives zeros"
    for t in act:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_additive_mask_as_published(dtype, device):
    B, H, L, d = 3, 2, 8, 4
    ref, act, index = make_inputs(B, H, L, d, 3, 8, 3, dtype, device)
    keep = torch.rand(B, L, device=device) > 0.3
    keep[:, 0] = True
    additive = (1.0 - keep.double()) * -10000.0
    check_against_naive(act, ref, index, dtype, additive=additive, op_mask=additive.to(dtype))
    # The published [B, 1, 1, L] layout is a 4-D additive mask; it gives the same.
    out2 = ops.conditional_attention(*act, index, additive.to(dtype)[:, None, None, :])
    out1 = ops.conditional_attention(*act, index, additive.to(dtype))
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


def test_fully_padded_additive_mask_is_finite(device):
    q, k, v = (torch.randn(2, 2, 6, 4, device=device) for _ in range(3))
    table = torch.randn(2, 6, 3, device=device)
    mask = torch.full((2, 6), -10000.0, device=device)
    out = ops.conditional_attention(q, k, v, table, None, mask)
    assert torch.isfinite(out).all()


def test_dynamic_length_equals_padding_to_max(device):
    """Cropping the bias for a short batch equals padding it to L_max, on the real tokens."""
    B, H, L, L_max, d, c = 3, 2, 7, 12, 8, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, device=device) for _ in range(3))
    table = torch.randn(2, L_max, c, dtype=torch.float64, device=device)
    index = torch.tensor([1, 0, 1], device=device)
    short = ops.conditional_attention(q, k, v, table, index)
    pad = lambda t: torch.cat([t, torch.randn(B, H, L_max - L, d, dtype=t.dtype, device=device)], dim=2)
    keep = torch.arange(L_max, device=device)[None, :].expand(B, L_max) < L
    full = ops.conditional_attention(pad(q), pad(k), pad(v), table, index, keep)
    torch.testing.assert_close(short, full[:, :, :L], rtol=1e-12, atol=1e-12)


def test_strided_qkv_views_of_one_projection(device):
    B, L, H, d = 3, 10, 2, 8
    qkv = torch.randn(B, L, 3 * H * d, dtype=torch.float64, device=device)
    q, k, v = (t.view(B, L, H, d).permute(0, 2, 1, 3) for t in qkv.split(H * d, dim=-1))
    assert not q.is_contiguous()
    table = torch.randn(B, L, 5, dtype=torch.float64, device=device)
    index = torch.arange(B, device=device)
    out = ops.conditional_attention(q, k, v, table)
    exp, _ = naive_attention(q.contiguous(), k.contiguous(), v.contiguous(), table, index)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


def test_scale_head_mask_and_probs(device):
    B, H, L, d = 2, 3, 6, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, device=device) for _ in range(3))
    table = torch.randn(B, L, 2, dtype=torch.float64, device=device)
    index = torch.arange(B, device=device)
    head_mask = torch.rand(1, H, 1, 1, dtype=torch.float64, device=device)
    out, probs = ops.conditional_attention(q, k, v, table, scale=0.3, head_mask=head_mask, return_probs=True)
    _, p = naive_attention(q, k, v, table, index, scale=0.3)
    torch.testing.assert_close(probs, p * head_mask, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, (p * head_mask) @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, device):
    ref, act, index = make_inputs(4, 2, 11, 16, 2, 12, 4, dtype, device)
    check_against_naive(act, ref, index, dtype)


def test_dropout_keep_rate_and_seed(device):
    B, H, L, d, p = 4, 4, 32, 8, 0.25
    q, k = (torch.randn(B, H, L, d, device=device) for _ in range(2))
    table = torch.randn(B, L, 8, device=device)
    eye = torch.eye(L, device=device).expand(B, H, L, L)  # v = I exposes the dropped probabilities
    _, p0 = ops.conditional_attention(q, k, eye, table, return_probs=True)
    torch.manual_seed(7)
    out, probs = ops.conditional_attention(q, k, eye, table, dropout_p=p, return_probs=True)
    torch.testing.assert_close(out, probs)  # the output uses exactly the returned (dropped) probabilities
    kept = (probs != 0).double().mean().item()
    n = probs.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {kept}, expected {1 - p}"
    nz = probs != 0
    torch.testing.assert_close(probs[nz], p0[nz] / (1 - p))  # survivors are rescaled
    torch.manual_seed(7)
    again = ops.conditional_attention(q, k, eye, table, dropout_p=p)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_gradcheck(device):
    B, H, L, d = 3, 2, 5, 3
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 6, 2, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([0, 1, 1], device=device)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    assert torch.autograd.gradcheck(lambda *a: ops.conditional_attention(*a, index, keep), (q, k, v, table))


def test_block_bias_op(device):
    table = torch.randn(3, 11, 4, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([2, 0, 2, 1], device=device)
    for L in (11, 6):
        torch.testing.assert_close(ops.block_bias(table, index, L), naive_bias(table, index, L), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: ops.block_bias(t, index, 9), (table,))


# ---- bad input -------------------------------------------------------------------------------------------

def _good(device):
    q, k, v = (torch.randn(2, 2, 6, 4, device=device) for _ in range(3))
    return q, k, v, torch.randn(3, 8, 3, device=device), torch.tensor([0, 2], device=device)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.update(q=a["q"][0]), ValueError, ["'q'", "[B, H, L, d]", "rank 3"]),
    (lambda a: a.update(k=a["k"][:, :, :5]), ValueError, ["'k'", "[2, 2, 6, 4]"]),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, ["'v'", "[2, 2, 6] + [dv]"]),
    (lambda a: a.update(v=a["v"].double()), TypeError, ["'v'", "float64", "float32"]),
    (lambda a: a.update(table=a["table"][0]), ValueError, ["'table'", "[G, L_max, c]"]),
    (lambda a: a.update(table=a["table"][:, :5]), ValueError, ["sequence length 6", "max_seq_length=5"]),
    (lambda a: a.update(table=a["table"].double()), TypeError, ["'table'", "float64"]),
    (lambda a: a.update(table=a["table"].to("meta")), ValueError, ["'table'", "meta"]),
    (lambda a: a.update(index=torch.tensor([0, 3])), IndexError, ["'index'", "3", "[0, 3)"]),
    (lambda a: a.update(index=torch.tensor([-1, 0])), IndexError, ["'index'", "-1"]),
    (lambda a: a.update(index=torch.tensor([0.0, 1.0])), TypeError, ["'index'", "int64"]),
    (lambda a: a.update(index=torch.tensor([0, 1, 2])), ValueError, ["'index'", "[B]=[2]"]),
    (lambda a: a.update(index=None), ValueError, ["one row per example", "G=3"]),
    (lambda a: a.update(attn_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, ["'attn_mask'", "[B, L]=[2, 6]"]),
    (lambda a: a.update(attn_mask=torch.ones(2, 1, 1, 6, dtype=torch.int64)), ValueError,
     ["'attn_mask'", "keep-mask", "torch.int64 [2, 1, 1, 6]"]),
    (lambda a: a.update(dropout_p=1.0), ValueError, ["'dropout_p'", "[0, 1)"]),
])
def test_bad_input(mutate, exc, words, device):
    q, k, v, table, index = _good(device)
    args = dict(q=q, k=k, v=v, table=table, index=index)
    mutate(args)
    kwargs = {n: args.pop(n) for n in ("attn_mask", "dropout_p") if n in args}
    with pytest.raises(exc) as info:
        ops.conditional_attention(*args.values(), **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def test_opcheck_multi_tile(device):
    """The registered kernel op over several query and key tiles (16 under the interpreter), a partial last
    tile, diagonal blocks that straddle tiles, and a key padding mask that ends mid-tile."""
    from camtl.kernels.attention import _configs
    from camtl.ops.attention import _attention_fwd, draw_dropout_seed

    B, H, L, d = 2, 1, 40, 8
    q, k, v = (torch.randn(B, H, L, d, device=device, requires_grad=True) for _ in range(3))
    assert L > 2 * _configs(q)["fwd"]["BLOCK_M"], "the shape must span more than two tiles"
    table = torch.randn(2, 44, 6, device=device, requires_grad=True)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([40, 23], device=device)[:, None]
    args = (q, k, v, table, torch.tensor([1, 0], device=device), keep, 0.3, 0.0,
            draw_dropout_seed(0.0))
    torch.library.opcheck(_attention_fwd, args)


def test_kernels_take_float32_head_dims_up_to_128_on_a_gpu_and_256_otherwise():
    """fp32's tiles at d 256 do not fit a GPU's shared memory or spill (the kernel report's --dtype fp32), so the
    dispatcher leaves float32 CUDA inputs above d 128 to the torch backend; 16-bit ones, and the interpreter on the
    CPU, go up to 256."""
    from camtl.ops.attention import _unsupported_by_kernels, kernel_head_dim_limit

    assert kernel_head_dim_limit(torch.float32, "cuda") == 128
    assert kernel_head_dim_limit(torch.bfloat16, "cuda") == kernel_head_dim_limit(torch.float16, "cuda") == 256
    assert kernel_head_dim_limit(torch.float32, "cpu") == 256
    q = torch.randn(1, 1, 4, 256)
    assert _unsupported_by_kernels(q, q, None) is None
    assert "up to 256, got 257" in _unsupported_by_kernels(torch.randn(1, 1, 4, 257), torch.randn(1, 1, 4, 257), None)
