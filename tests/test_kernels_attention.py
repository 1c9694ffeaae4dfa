"""The Triton conditional flash attention (camtl.kernels.attention) against the torch backend.

On the CPU these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes.
The torch backend itself is checked against a naive reference in test_ops_attention.py.
"""

import math

import numpy as np
import pytest
import torch

import camtl
from camtl import ops
import camtl.kernels.attention as attention_kernels
from camtl.kernels.attention import _configs
from camtl.ops.attention import _attention_fwd, draw_dropout_seed
from conftest import assert_close, bert_config, graph_has, assert_independent_of_program_order, poisoned_empty


def run(backend, leaves, index, mask=None, **kw):
    with camtl.use_backend(backend):
        return ops.conditional_attention(*leaves, index, mask, **kw)


def make(B, H, L, d, G, L_max, c, dtype, device):
    tensors = [torch.randn(B, H, L, d, device=device) for _ in range(3)] + [torch.randn(G, L_max, c, device=device)]
    index = torch.randint(0, G, (B,), device=device)
    index[: min(G, B)] = torch.arange(min(G, B), device=device)  # mixed tasks, each present
    return tensors, index


def compare_backends(tensors, index, dtype, mask=None, **kw):
    """Triton vs torch: output and the gradients of q, k, v and the table (torch in fp32 as the reference)."""
    ref = [t.float().clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    out = run("triton", act, index, mask, **kw)
    exp = run("torch", ref, index, mask, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    out.backward(grad.to(dtype))
    exp.backward(grad)
    for name, a, r in zip(("q", "k", "v", "table"), act, ref):
        assert a.grad.dtype == dtype
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")
    return out


@pytest.mark.parametrize("d", [24, 32, 64, 128])  # 24: BLOCK_D 32, the head-dim masks compiled in (EVEN_D off)
def test_head_dims(d, device):
    tensors, index = make(2, 2, 19, d, 3, 24, 7, torch.float32, device)
    compare_backends(tensors, index, torch.float32)


def band_edge_shape(kind, block):
    """The smallest (L, c) where, with square tiles of ``block`` rows and keys, a key tile meets a diagonal block
    exactly at its edge: the tile's first key is the block's last column ("hi", for the first query tile, a later
    one, or the last query tile cut short by L) or the tile's last key is the block's first column ("lo")."""
    for L in range(block + 1, 4 * block):
        for c in range(2, L + 1):
            for m0 in range(0, L, block):
                last_row = min(m0 + block, L) - 1
                band_lo, band_hi = (m0 // c) * c, (last_row // c) * c + c - 1
                for n0 in range(0, L, block):
                    hit = {"hi first": n0 == band_hi and m0 == 0,
                           "hi later": n0 == band_hi and 0 < m0 and m0 + block <= L,
                           "hi cropped": n0 == band_hi and m0 + block > L,
                           "lo": n0 + block - 1 == band_lo}[kind]
                    if hit:
                        return L, c
    raise AssertionError(f"no shape for {kind}")


@pytest.mark.parametrize("kind", ["hi first", "hi later", "hi cropped", "lo"])
def test_key_tiles_starting_or_ending_on_a_band_edge(kind, device):
    """The tile-skipping test (does this key tile meet a diagonal block?) at its boundary, both ways."""
    block = _configs(torch.empty(1, 1, 1, 16))["fwd"]["BLOCK_N"]
    L, c = band_edge_shape(kind, block)
    tensors, index = make(2, 1, L, 16, 2, L, c, torch.float32, device)
    compare_backends(tensors, index, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,L_max,c", [(32, 32, 11), (23, 23, 8), (17, 40, 14)],
                         ids=["L=32 c=11", "odd L=23, last block cropped", "dynamic L=17 of 40"])
def test_mixed_tasks_odd_and_dynamic_lengths(L, L_max, c, dtype, device):
    tensors, index = make(3, 2, L, 32, 2, L_max, c, dtype, device)
    compare_backends(tensors, index, dtype)


def launch_configs(monkeypatch, change) -> list:
    """Every launch takes change(its configurations, _configs_for's arguments) as its configurations. Returns the
    configurations handed out, to check that the launches took them."""
    configs_for, handed_out = attention_kernels._configs_for, []

    def changed(*args, **kwargs):
        handed_out.append(change(configs_for(*args, **kwargs), *args, **kwargs))
        return handed_out[-1]

    monkeypatch.setattr(attention_kernels, "_configs_for", changed)
    return handed_out


def dkdv_on_the_other_layout(monkeypatch) -> list:
    """Launch dK/dV on the score layout this device does not use by default (KEYS_MAJOR flipped): [queries, keys]
    under the interpreter, which runs sm_90's [keys, queries] (kernels/attention.py, _dkdv_tile), and on sm_90 up
    to d 128; [keys, queries] elsewhere. Returns the configurations handed out."""
    return launch_configs(monkeypatch, lambda configs, *args: dict(
        configs, dkdv=dict(configs["dkdv"], KEYS_MAJOR=not configs["dkdv"]["KEYS_MAJOR"])))


def took_query_rows(handed_out: list) -> bool:
    """Under the interpreter, dkdv_on_the_other_layout hands out [queries, keys] tiles (sm_80's)."""
    return bool(handed_out) and not any(configs["dkdv"]["KEYS_MAJOR"] for configs in handed_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dkdv_on_query_rows_as_on_sm80(dtype, device, monkeypatch):
    """dK/dV's other layout: key padding, an odd length (partial tiles) and blocks that tiles cut."""
    handed_out = dkdv_on_the_other_layout(monkeypatch)
    B, L = 3, 23
    tensors, index = make(B, 2, L, 32, 2, L, 8, torch.float32, device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([23, 9, 1], device=device)[:, None]
    compare_backends(tensors, index, dtype, keep)
    assert took_query_rows(handed_out), "the launches did not take [queries, keys] tiles"


def test_dense_bias_holds_the_bias_and_its_transpose(device):
    """dense_bias: plane 0 is log2(e)·M [G, L, L'], plane 1 its transpose (dK/dV's [keys, queries] tiles read it),
    0 in the padding columns; every element written (the buffer is poisoned)."""
    G, L_max, c, L = 3, 26, 7, 21  # L' = 32: 11 padding columns; the last block cut by L
    table = torch.randn(G, L_max, c, device=device)
    with poisoned_empty():
        bias = attention_kernels.dense_bias(table, L)
    LS = attention_kernels.row_stride(L)
    assert bias.shape == attention_kernels.dense_bias_shape(G, L) == (2, G, L, LS)
    want = torch.zeros(2, G, L, LS, device=device)
    for i in range(L):
        for j in range(L):
            if i // c == j // c:
                want[0, :, i, j] = want[1, :, j, i] = table[:, i, j - c * (i // c)] * math.log2(math.e)
    assert_close(bias, want, torch.float32, "dense bias planes")
    assert torch.equal(bias[1, :, :, :L], bias[0, :, :, :L].transpose(1, 2)), "plane 1 is not plane 0's transpose"


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padding(kind, device):
    B, L = 3, 21
    tensors, index = make(B, 2, L, 32, 2, 24, 6, torch.float32, device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([21, 9, 1], device=device)[:, None]
    mask = keep if kind == "bool" else (1.0 - keep.float()) * -10000.0
    compare_backends(tensors, index, torch.float32, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_key_bias_of_any_value_dtype_and_stride(dtype, device):
    """A float key bias with random values (not only 0 / -10000), in bf16 and as a strided view: the forward adds
    it on the tensor cores as hi + lo (key_bias_operands), the backward as fp32; both match the reference. L = 37:
    two full 16-key tiles and a tail under the interpreter, so each full tile must read its own keys' bias."""
    B, L = 3, 37
    tensors, index = make(B, 2, L, 32, 2, 40, 6, dtype, device)
    # fp32 (exact products under the interpreter) checks hi + lo to 1e-5; in bf16 a peaked softmax alone puts the
    # table's gradient past 2e-2 (the kernels before this operand did the same), so the half types take milder biases.
    wide = torch.randn(B, 2 * L, device=device) * (3.0 if dtype == torch.float32 else 0.5)
    wide[1, 2 * 13:] = -10000.0  # example 1 padded from key 13 on
    compare_backends(tensors, index, dtype, wide[:, ::2].to(torch.bfloat16))
    compare_backends(tensors, index, dtype, wide[:, ::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_bias_operands_split_the_bias_exactly(dtype, device):
    """key_bias_operands against the rule written out here: x = kb / (16·scale) = hi + lo, hi in dtype (TF32,
    rounded to nearest, for fp32), lo the rest in dtype; zeros in the other columns; -inf as (-inf, 0); fp16
    clamps to its finite range; kb32 is what the forward adds: kb where hi + lo is x, else 16·scale·(hi + lo)."""
    scale = 0.125
    kb = torch.randn(2, 37, device=device, dtype=torch.float64) * 50.0
    kb[0, 3], kb[1, 5], kb[1, 6] = float("-inf"), -1e9, 0.0
    with poisoned_empty():
        operand, kb32 = attention_kernels.key_bias_operands(kb, scale, dtype)
    assert operand.shape == (2, 37, 16) and operand.dtype == dtype and kb32.dtype == torch.float32
    assert (operand[..., 2:] == 0).all()
    x = kb.float() / (16 * scale)
    exact = x.clone()
    if dtype == torch.float16:
        x = torch.where(x.isinf(), x, x.clamp(-65504.0, 65504.0))
    hi, lo = operand[..., 0].float(), operand[..., 1].float()
    same = hi + lo == exact
    assert torch.equal(kb32[same], kb.float()[same])
    assert torch.allclose(kb32[~same], ((hi + lo) * (16 * scale))[~same], rtol=1e-6, atol=0)
    assert same[0, 3] and same[1, 6]  # -inf and 0
    if dtype == torch.float32:
        assert same.all()  # TF32 hi + fp32 lo: x exactly
    if dtype == torch.float16:
        assert kb32[1, 5] == -65504.0 * 16 * scale  # -1e9 clamped: both passes add the same finite bias
    if dtype == torch.float32:  # TF32: 10 mantissa bits, round to nearest, so the MMA takes hi exactly
        assert torch.equal(hi, ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32))
    finite = x.isfinite()
    ulp = {torch.float32: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    tol = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -15, torch.float16: 2.0 ** -20}[dtype]
    assert ((x - hi).abs() <= ulp * x.abs())[finite].all(), "hi is x to the dtype's precision"
    tiny = 2.0 ** -24 if dtype == torch.float16 else 0.0  # fp16's subnormal step: a lo near 0 keeps fewer bits
    assert ((hi + lo - x).abs() <= tol * x.abs() + tiny)[finite].all(), "hi + lo is x to twice the precision"
    assert hi[0, 3] == float("-inf") and lo[0, 3] == 0
    if dtype == torch.float16:
        assert hi[1, 5] == -65504.0 and lo[1, 5] == 0
    keep = torch.rand(2, 37, device=device) > 0.3
    operand, kb32 = attention_kernels.key_bias_operands(keep, scale, dtype)
    assert torch.equal(kb32, torch.where(keep, 0.0, float("-inf")))
    assert torch.equal(operand[..., 0].float(), kb32) and (operand[..., 1:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_example_gives_zeros(dtype, device):
    B, L = 2, 18
    tensors, index = make(B, 2, L, 32, 2, 18, 6, dtype, device)
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    keep[1] = False
    out = compare_backends(tensors, index, dtype, keep)
    assert (out[1] == 0).all()


def test_strided_views_of_one_qkv_projection(device):
    B, L, H, d = 2, 20, 2, 32
    qkv = torch.randn(B, L, 3 * H * d, device=device, requires_grad=True)
    table = torch.randn(B, L, 5, device=device, requires_grad=True)

    def attention(backend):
        q, k, v = (t.view(B, L, H, d).permute(0, 2, 1, 3) for t in qkv.split(H * d, dim=-1))
        assert not q.is_contiguous()
        with camtl.use_backend(backend):
            return ops.conditional_attention(q, k, v, table)

    out = attention("triton")
    grads = torch.autograd.grad(out.sum(), (qkv, table))
    exp = attention("torch")
    exp_grads = torch.autograd.grad(exp.sum(), (qkv, table))
    assert_close(out, exp, torch.float32)
    for g, e in zip(grads, exp_grads):
        assert_close(g, e, torch.float32)


def test_q_k_v_and_the_output_gradient_each_with_their_own_strides(device):
    """The loops step their streamed tiles by n0 (or m0) times that tensor's own row stride: q, k, v and dO each get
    different strides here (v's rows are its last axis), so a stride of the wrong tensor reads the wrong rows."""
    B, L, H, d = 2, 37, 2, 32
    base = torch.randn(B, L, H, d, device=device)
    q_src = base.clone().requires_grad_()
    k_src = torch.randn(B, H, L, d, device=device, requires_grad=True)
    v_src = torch.randn(B, H, d, L, device=device, requires_grad=True)
    dout = torch.randn(B, H, L, d + 5, device=device)[..., :d]
    table = torch.randn(B, L, 6, device=device, requires_grad=True)
    q, k, v = q_src.permute(0, 2, 1, 3), k_src, v_src.transpose(-1, -2)
    assert len({q.stride(2), k.stride(2), v.stride(2), dout.stride(2)}) == 4

    def attention(backend):
        with camtl.use_backend(backend):
            out = ops.conditional_attention(q, k, v, table)
        return (out, *torch.autograd.grad(out, (q_src, k_src, v_src, table), dout))

    for got, want in zip(attention("triton"), attention("torch")):
        assert_close(got, want, torch.float32)


def test_backward_does_not_depend_on_program_order(device):
    """Bitwise the same gradients whatever order the programs run in (no atomics, no two programs writing one
    place). The interpreter runs programs one at a time in grid order, so only a shuffled order can show it."""
    tensors, index = make(2, 3, 33, 16, 2, 33, 9, torch.float32, device)  # 3 query and key tiles
    grad = torch.randn(2, 3, 33, 16, device=device)

    def grads():
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = run("triton", leaves, index)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))

    assert_independent_of_program_order(grads, ("output", "q", "k", "v", "table"), seed=1)


# ---- dropout ------------------------------------------------------------------------------------------------

def philox_keep(seed, B, H, L, p):
    """The documented dropout mask, computed here without the kernel: keep (b, h, i, j) when
    uniform(Philox4x32-10(counter = (i·L + j, b·H + h, 0, 0), key = seed)[0]) >= p, the way triton's
    tl.philox and tl.uint_to_uniform_float compute it. Returns bool [B, H, L, L]."""
    mask32 = np.uint64(0xFFFFFFFF)

    def mulhilo(a, b):
        prod = a.astype(np.uint64) * np.uint64(b)
        return (prod >> np.uint64(32)).astype(np.uint32), (prod & mask32).astype(np.uint32)

    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    c0 = np.broadcast_to((i * L + j).astype(np.uint32), (B * H, L, L)).copy()
    c1 = np.broadcast_to(np.arange(B * H, dtype=np.uint32)[:, None, None], (B * H, L, L)).copy()
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(10):
            hi_b, lo_b = mulhilo(c2, 0xCD9E8D57)
            hi_a, lo_a = mulhilo(c0, 0xD2511F53)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
            k0, k1 = k0 + np.uint32(0x9E3779B9), k1 + np.uint32(0xBB67AE85)
    x = c0.view(np.int32)
    x = np.where(x < 0, ~x, x)
    uniform = x.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(uniform >= np.float32(p)).view(B, H, L, L)


def _kernel_attention(leaves, index, p, seed):
    """The fused op with an explicit dropout seed (autograd included)."""
    q, k, v, table = leaves
    return _attention_fwd(q, k, v, table, index, None, 1.0 / math.sqrt(q.shape[-1]), p,
                          torch.tensor(seed, dtype=torch.int64))[0]


def _dropped_probs(q, k, table, index, p, seed):
    """With v = I (padded to d), out[..., :L] is exactly the dropped, rescaled probabilities."""
    B, H, L, d = q.shape
    eye = torch.zeros(B, H, L, d, device=q.device)
    eye[..., :L] = torch.eye(L, device=q.device)
    return _kernel_attention([q, k, eye, table], index, p, seed)[..., :L]


def test_dropout_mask_is_the_documented_philox_one_per_example_and_head(device):
    B, H, L, d, p = 2, 3, 20, 32, 0.3
    (q, k, _, table), index = make(B, H, L, d, 2, 24, 7, torch.float32, device)
    seed = 2**32 + 12345  # both halves of the Philox key in use
    dropped = _dropped_probs(q, k, table, index, p, seed)
    kept = dropped != 0
    assert torch.equal(kept.cpu(), philox_keep(seed, B, H, L, p))
    probs = run("torch", [q, k, q, table], index, return_probs=True)[1]
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    # Each (example, head) draws its own mask at the rate 1 - p.
    per_head = kept.reshape(B * H, L * L)
    rate = per_head.double().mean(1)
    bound = 5 * math.sqrt(p * (1 - p) / (L * L))
    assert ((rate - (1 - p)).abs() < bound).all(), f"keep rates per (b, h): {rate.tolist()}"
    for a in range(B * H):
        for b in range(a):
            assert not torch.equal(per_head[a], per_head[b]), f"(b, h) {divmod(a, H)} and {divmod(b, H)} share a mask"
    assert not torch.equal(kept, _dropped_probs(q, k, table, index, p, seed + 1) != 0), "the mask ignores the seed"


@pytest.mark.parametrize("dkdv", ["keys-major", "queries-major"])
def test_dropout_backward_matches_a_reference_with_the_documented_mask(dkdv, device, monkeypatch):
    """Forward and backward against float64 autograd through the mask computed without the kernel; dK/dV in either
    layout (see dkdv_on_the_other_layout)."""
    handed_out = dkdv_on_the_other_layout(monkeypatch) if dkdv == "queries-major" else None
    B, H, L, d, p, seed = 2, 2, 20, 32, 0.25, 11
    (q, k, v, table), index = make(B, H, L, d, 2, 24, 7, torch.float32, device)
    keep = philox_keep(seed, B, H, L, p).to(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    out = _kernel_attention(leaves, index, p, seed)
    ref = [t.double().clone().requires_grad_() for t in (q, k, v, table)]
    _, probs = ops.conditional_attention(*ref[:3], ref[3], index, return_probs=True)
    exp = (probs * keep / (1 - p)) @ ref[2]
    assert_close(out, exp, torch.float32, "output")
    grad = torch.randn_like(exp)
    out.backward(grad.float())
    exp.backward(grad)
    for name, a, r in zip(("q", "k", "v", "table"), leaves, ref):
        assert_close(a.grad, r.grad, torch.float32, f"grad of {name} with dropout")
    assert handed_out is None or took_query_rows(handed_out)


def test_dropout_same_seed_same_output(device):
    """The public op draws its seed from torch's generator: torch.manual_seed reproduces the output."""
    (q, k, v, table), index = make(2, 2, 20, 32, 2, 24, 7, torch.float32, device)
    torch.manual_seed(11)
    out = run("triton", [q, k, v, table], index, dropout_p=0.25)
    torch.manual_seed(11)
    assert torch.equal(out, run("triton", [q, k, v, table], index, dropout_p=0.25))
    torch.manual_seed(12)
    assert not torch.equal(out, run("triton", [q, k, v, table], index, dropout_p=0.25))


def test_computed_accumulator_zeros_give_the_same_bits(device, monkeypatch):
    """On sm_90 the accumulators start from computed zeros (WGMMA: accumulator_zeros), elsewhere from tl.zeros: the
    same output and gradients, bit for bit (key padding, dropout, a partial tile)."""
    B, L = 2, 23
    tensors, index = make(B, 2, L, 16, 2, L, 8, torch.float32, device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([L, 14], device=device)[:, None]
    grad = torch.randn(B, 2, L, 16, device=device)

    def outputs():
        leaves = [t.clone().requires_grad_() for t in tensors]
        torch.manual_seed(5)
        out = run("triton", leaves, index, keep, dropout_p=0.2)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))

    from_tl_zeros = outputs()

    def with_wgmma(configs, *args):
        assert not any(cfg["WGMMA"] for cfg in configs.values())  # the interpreter's own choice
        return {name: dict(cfg, WGMMA=True) for name, cfg in configs.items()}

    handed_out = launch_configs(monkeypatch, with_wgmma)
    computed = outputs()
    assert handed_out and all(cfg["WGMMA"] for configs in handed_out for cfg in configs.values())
    for name, a, b in zip(("output", "q", "k", "v", "table"), from_tl_zeros, computed):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


# ---- registration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, device):
    B, H, L, d = 2, 2, 20, 16  # two query and key tiles, the last one partial
    q, k, v = (torch.randn(B, H, L, d, device=device, requires_grad=True) for _ in range(3))
    table = torch.randn(2, L + 4, 6, device=device, requires_grad=True)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([L, 7], device=device)[:, None]
    args = (q, k, v, table, torch.tensor([1, 0], device=device), keep if masked else None, 0.2, 0.0,
            draw_dropout_seed(0.0))
    torch.library.opcheck(_attention_fwd, args)


def test_torch_compile_fullgraph(device):
    cfg = dict(hidden_size=64, num_attention_heads=2, max_seq_length=32)
    module = camtl.nn.ConditionalSelfAttention(bert_config(**cfg)).to(device)
    with torch.no_grad():
        module.random_weight_matrix.normal_()
    h = torch.randn(2, 24, 64, device=device, requires_grad=True)
    z = torch.randn(2, 64, device=device)
    keep = torch.ones(2, 24, dtype=torch.bool, device=device)
    keep[1, 10:] = False
    with camtl.use_backend("triton"):
        eager = module(h, keep, task_embedding=z)[0]
        compiled = torch.compile(lambda *a: module(*a, task_embedding=z)[0], fullgraph=True, backend="aot_eager")
        out = compiled(h, keep)
    assert_close(out, eager, torch.float32)
    g_eager, = torch.autograd.grad(eager.sum(), h)
    g_out, = torch.autograd.grad(out.sum(), h)
    assert_close(g_out, g_eager, torch.float32)


def test_module_uses_the_kernel_and_the_reference_for_probabilities(device):
    """ConditionalSelfAttention: the kernel without output_attentions, the reference with it; the same output and
    gradients (inputs, task embedding, every parameter) as the torch backend."""
    module = camtl.nn.ConditionalSelfAttention(bert_config(hidden_size=64, num_attention_heads=2,
                                                           max_seq_length=32)).to(device)
    with torch.no_grad():
        for p in module.parameters():  # random_weight_matrix starts at zeros: every table row would be equal
            p.copy_(torch.randn_like(p) * 0.3)
    B, L = 2, 20
    h, z = torch.randn(B, L, 64, device=device), torch.randn(B, 64, device=device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([L, 13], device=device)[:, None]
    grad = torch.randn(B, L, 64, device=device)
    results, key_out_grads, key_out = {}, {}, []
    module.key.register_forward_hook(lambda mod, inputs, output: key_out.append(output.retain_grad() or output))
    for backend, output_attentions in (("triton", False), ("triton", True), ("torch", False)):
        module.zero_grad()
        leaves = [t.clone().requires_grad_() for t in (h, z)]
        with camtl.use_backend(backend):
            out = module(leaves[0], keep, task_embedding=leaves[1], output_attentions=output_attentions)
        assert len(out) == (2 if output_attentions else 1)
        if output_attentions:
            assert out[1].shape == (B, 2, L, L)
        assert graph_has(out[0], "camtl::conditional_attention_fwd") == (backend == "triton" and not output_attentions)
        out[0].backward(grad)
        key_out_grads[backend, output_attentions] = key_out.pop().grad
        results[backend, output_attentions] = ([out[0].detach()] + [t.grad for t in leaves]
                                               + [p.grad.clone() for p in module.parameters()])
    names = ["output", "hidden_states", "task_embedding"] + [n for n, _ in module.named_parameters()]
    assert "random_weight_matrix" in names
    for key in (("triton", False), ("triton", True)):
        for name, a, e in zip(names, results[key], results["torch", False]):
            if name == "key.bias":
                # Exactly 0 in exact arithmetic (softmax ignores a shift shared by every key): a sum of
                # B·L terms that cancel, so its error scales with Σ|terms|, not with the result.
                terms = key_out_grads[key].abs().sum((0, 1))
                assert (a.abs() <= 1e-5 * terms).all() and (e.abs() <= 1e-5 * terms).all(), f"{key}: {name}"
            else:
                assert_close(a, e, torch.float32, f"{key}: {name}")


@pytest.mark.parametrize("B,L", [(0, 8), (2, 0)], ids=["no example", "no token"])
def test_empty_inputs(B, L, device):
    q = torch.randn(B, 2, L, 32, device=device, requires_grad=True)
    table = torch.randn(2, 8, 3, device=device, requires_grad=True)
    out = run("triton", [q, q, q, table], torch.zeros(B, dtype=torch.long, device=device))
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert (table.grad == 0).all()


def gpu_tiles_under_the_interpreter(monkeypatch, capability, tiles_of=torch.bfloat16) -> list:
    """Launch with the tiles, warps and layouts that a GPU of this capability gets for inputs of dtype tiles_of
    (_TILES, _TILES_FP32), under the interpreter (its own dot flags, UPCAST and PRECISION, and no inline PTX): the
    shipped shapes run here, not only the interpreter's 16x16 tiles. Returns the configurations handed out."""
    configs_for = attention_kernels._configs_for

    def on_gpu_tiles(interpreted, d, dtype, *args):
        with monkeypatch.context() as m:
            m.delenv("TRITON_INTERPRET")
            gpu = configs_for(d, tiles_of, capability)
        return {name: dict(cfg, UPCAST=interpreted[name]["UPCAST"], PRECISION=interpreted[name]["PRECISION"],
                           INLINE_PTX=interpreted[name]["INLINE_PTX"]) for name, cfg in gpu.items()}

    return launch_configs(monkeypatch, on_gpu_tiles)


@pytest.mark.parametrize("capability,d,tiles_of", [
    ((9, 0), 64, torch.bfloat16), ((9, 0), 128, torch.bfloat16), ((9, 0), 256, torch.bfloat16),
    ((8, 0), 64, torch.bfloat16), ((9, 0), 128, torch.float32), ((8, 0), 128, torch.float32),
    ((8, 6), 128, torch.float32)],
    ids=["sm_90 d64", "sm_90 d128", "sm_90 d256", "sm_80 d64", "sm_90 d128 fp32", "sm_80 d128 fp32",
         "sm_86 d128 fp32"])
def test_gpu_tiles_run_under_the_interpreter(capability, d, tiles_of, device, monkeypatch):
    """The GPU's own tiles (sm_90 up to d 128: dQ 128 queries x 32 keys, dK/dV [keys, queries]; d 256, sm_80 and
    fp32's at d 128: [queries, keys]; fp32's own smaller tiles) on a length that leaves every pass a partial tile
    (L = 150), blocks that tiles cut (c = 40), key padding and dropout, against float64 autograd through the
    documented mask."""
    handed_out = gpu_tiles_under_the_interpreter(monkeypatch, capability, tiles_of)
    B, H, L, p, seed = 2, 2, 150, 0.1, 5
    (q, k, v, table), index = make(B, H, L, d, 2, L, 40, torch.float32, device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([L, 97], device=device)[:, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with poisoned_empty():
        out = _attention_fwd(*leaves[:3], leaves[3], index, keep, 1.0 / math.sqrt(d), p,
                             torch.tensor(seed, dtype=torch.int64))[0]
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad)
    tiles = handed_out[0]
    assert tiles["dq"]["BLOCK_M"] == (128 if capability[0] == 9 and d <= 128 else 64)
    assert tiles["dkdv"]["KEYS_MAJOR"] == (capability[0] == 9 and d <= (64 if tiles_of == torch.float32 else 128))
    if tiles_of == torch.float32:  # fp32's own tiles, where it has them
        own = attention_kernels._TILES_FP32[attention_kernels._tile_family(capability)][d]
        assert own and all((tiles[name]["BLOCK_M"], tiles[name]["BLOCK_N"], tiles[name]["num_warps"]) == tile[:3]
                           for name, tile in own.items())
    mask = philox_keep(seed, B, H, L, p).to(device) & keep[:, None, None, :]
    ref = [t.double().requires_grad_() for t in (q, k, v, table)]
    _, probs = ops.conditional_attention(*ref[:3], ref[3], index, keep, return_probs=True)
    exp = (probs * mask / (1 - p)) @ ref[2]
    assert_close(out, exp, torch.float32, "output")
    for name, g, e in zip(("q", "k", "v", "table"), grads, torch.autograd.grad(exp, ref, grad.double())):
        assert_close(g, e, torch.float32, f"grad of {name}")


def test_long_sequence(device):
    """L >= 512 (BERT's longest), not a multiple of the tile, with the large model's wide blocks (c = 256)."""
    tensors, index = make(1, 1, 515, 32, 2, 520, 256, torch.float32, device)
    keep = torch.ones(1, 515, dtype=torch.bool, device=device)
    keep[0, 400:] = False
    compare_backends(tensors, index, torch.float32, keep)


# ---- int64 offsets (issue 9, deliverable 5) --------------------------------------------------------------------

def far_apart(rows, step):
    """Views of the bf16 tensors ``rows`` [B, X] in one buffer, row b at element b·step (the n-th tensor n·X
    after it). Only the rows are written: Linux commits only the pages touched (a buffer of 2^31 elements is
    4.3 GB virtual, kilobytes resident)."""
    B, X = rows[0].shape
    buffer = torch.empty(step * (B - 1) + len(rows) * X, dtype=torch.bfloat16)
    views = [buffer.as_strided((B, X), (step, 1), n * X) for n in range(len(rows))]
    for view, t in zip(views, rows):
        view.copy_(t)
    return views


def assert_far_apart_views_give_the_same_bits(B, H, L, place, where):
    """The kernels' forward and backward (bf16, dropout) on the views of q, k, v, dout and out that place() lays
    out in one far-reaching buffer give bitwise the results of the compact tensors."""
    d = 16
    (q, k, v, table), index = make(B, H, L, d, 2, 24, 7, torch.float32, "cpu")
    q, k, v = (t.bfloat16() for t in (q, k, v))
    dout = torch.randn(B, H, L, d).bfloat16()
    scale = d ** -0.5
    out, lse, bias, mask, _ = attention_kernels.attention_forward(q, k, v, table, index, None, scale, 0.1, 3)
    want = (out, lse) + attention_kernels.attention_backward(dout, q, k, v, out, lse, bias, mask, table, index,
                                                             None, scale, 0.1)
    fq, fk, fv, fdout, fout = place(q, k, v, dout, out)
    got_out, got_lse, bias, mask, _ = attention_kernels.attention_forward(fq, fk, fv, table, index, None, scale,
                                                                         0.1, 3)
    got = (got_out, got_lse) + attention_kernels.attention_backward(fdout, fq, fk, fv, fout, got_lse, bias, mask,
                                                                    table, index, None, scale, 0.1)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dtable"), got, want):
        assert torch.equal(g, w), f"{name} differs when {where}"


def test_int64_offsets_past_2_31_elements(device):
    """q, k, v, dout and out whose example b = 2 starts at element 2^31 of their buffer: with int32 base offsets
    b·stride_b wraps around and the kernels read the wrong memory."""
    if device.type != "cpu":
        pytest.skip("builds its > 2^31-element buffer in host memory")
    B, H, L = 3, 2, 20

    def place(*tensors):  # b = 2 starts at element 2^31
        return [t.view(B, H, L, -1) for t in far_apart([t.reshape(B, -1) for t in tensors], 2**30)]

    assert_far_apart_views_give_the_same_bits(B, H, L, place, "the inputs sit past element 2^31")


def test_rows_2_31_elements_apart_inside_one_slab(device):
    """q, k, v, dout and out whose rows lie 2^27 elements apart in their buffer (so a slab's last row sits past
    element 2^31 of its start, as in a sequence-first projection at a large batch): the kernels take compact copies
    of them (int32_slab), as their in-slab offsets are int32. A slab too long even when compact is refused by
    name."""
    if device.type != "cpu":
        pytest.skip("builds its > 2^31-element buffer in host memory")
    B, H, L, step = 1, 2, 20, 2**27

    def place(*tensors):  # [B, H, L, d] views of [L, B, H, d] rows, 2^27 elements apart
        rows = far_apart([t.permute(2, 0, 1, 3).reshape(L, -1) for t in tensors], step)
        views = [r.view(L, B, H, -1).permute(1, 2, 0, 3) for r in rows]
        assert views[0].stride(2) == step and (L - 1) * step >= 2**31
        assert all(attention_kernels.int32_slab(v, L, "q").is_contiguous() for v in views)  # else wrapped offsets
        return views

    assert_far_apart_views_give_the_same_bits(B, H, L, place, "a slab's rows lie 2^27 elements apart")
    too_long = torch.empty(1, 1, 2**27 + 1, 16, device="meta")  # 2^31 + 16 elements in one slab, contiguous
    with pytest.raises(ValueError, match="argument 'k'.*2\\^31"):
        attention_kernels.int32_slab(too_long, 2**27 + 1, "k")
    fits = torch.empty(1, 1, 2**27, 16, device="meta")
    assert attention_kernels.int32_slab(fits, 2**27, "k") is fits


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("d", [8, 32, 64, 100, 128, 256])
def test_gpu_tiles_fit_the_head_dim_and_the_dropout_words(capability, d, monkeypatch):
    """Every pass's tiles on every GPU family: BLOCK_D covers d, key tiles read whole 32-bit dropout words, and on
    sm_90 each program's own tile is 64 rows (a wgmma warpgroup's M)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    configs = attention_kernels._configs_for(d, torch.bfloat16, capability)
    assert set(configs) == {"fwd", "dq", "dkdv"}
    word = attention_kernels._word()
    assert word == 32
    for name, cfg in configs.items():
        assert d <= cfg["BLOCK_D"] <= max(16, 2 * d), (name, cfg)
        assert cfg["BLOCK_N"] % word == 0 and cfg["BLOCK_M"] >= 16 and cfg["num_warps"] in (4, 8), (name, cfg)
    if capability[0] == 9:  # 64 rows per warpgroup: dQ's 8 warps on 64 rows computed dP twice (kernels/attention.py)
        assert configs["fwd"]["BLOCK_M"] == configs["dkdv"]["BLOCK_N"] == 64
        assert configs["dq"]["BLOCK_M"] == (128 if d <= 128 else 64) and configs["dq"]["num_warps"] == 8
    assert all(cfg["WGMMA"] == (capability[0] == 9) for cfg in configs.values())  # see accumulator_zeros
    # dK/dV's [keys, queries] score tiles, all four MMAs on wgmma: sm_90 up to d 128 (d 256's accumulators spill)
    assert configs["dkdv"]["KEYS_MAJOR"] == (capability[0] == 9 and d <= 128)
    assert all("KEYS_MAJOR" not in configs[name] for name in ("fwd", "dq"))
    # the forward's dropout select in inline PTX (_dropped): triton 3.6's tl.where made its loop 40-45% longer
    assert [name for name, cfg in configs.items() if cfg["INLINE_PTX"]] == ["fwd"]
    # GPUs with 99 KB of shared memory per block (sm_86, sm_89, sm_120) pipeline d > 64 in fewer stages: 3 stages of
    # [64, 128] tiles need 120-140 KB (sm_86 compiles, checked with the kernel report's compiler)
    family = attention_kernels._tile_family(capability)
    assert family == {9: "sm_90", 12: "99kb"}.get(capability[0], "99kb" if capability in ((8, 6), (8, 9)) else "sm_80")
    if family == "99kb" and d > 64:
        assert all(cfg["num_stages"] <= 2 for cfg in configs.values()), configs
    # fp32 (TF32): twice the shared memory per stage; its own tiles where 16-bit ones do not fit or spill (the kernel
    # report's --dtype fp32), never more stages or a larger tile; [queries, keys] dK/dV above d 64
    fp32 = attention_kernels._configs_for(d, torch.float32, capability)
    own = attention_kernels._TILES_FP32[family].get(max(64, configs["fwd"]["BLOCK_D"]), {})
    for name, cfg in fp32.items():
        tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        base = configs[name]
        assert tile == (own[name] if name in own else (base["BLOCK_M"], base["BLOCK_N"], base["num_warps"],
                                                       base["num_stages"])), (name, cfg)
        assert cfg["BLOCK_N"] % word == 0 and cfg["PRECISION"] == "tf32" and not cfg["UPCAST"], (name, cfg)
        assert cfg["num_stages"] <= base["num_stages"] and (
            cfg["BLOCK_M"] * cfg["BLOCK_N"] <= base["BLOCK_M"] * base["BLOCK_N"]), (name, cfg, base)
    assert fp32["dkdv"]["KEYS_MAJOR"] == (capability[0] == 9 and d <= 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = attention_kernels._configs_for(d, torch.float32, capability)
    assert all(cfg["BLOCK_M"] == cfg["BLOCK_N"] == 16 for cfg in interpreted.values())
    assert interpreted["dkdv"]["KEYS_MAJOR"]  # the interpreter runs sm_90's layout; dkdv_on_the_other_layout the other
    assert not any(cfg["INLINE_PTX"] for cfg in interpreted.values())  # the interpreter runs no PTX
