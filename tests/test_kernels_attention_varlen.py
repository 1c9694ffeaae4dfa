"""The Triton varlen (packed, cu_seqlens) conditional attention against the torch backend, forward and backward.

On the CPU these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes, 16-wide tiles there.
The torch backend's varlen reference is checked against a loop over sequences in test_ops_varlen.py.
"""

import math

import pytest
import torch

import camtl
from camtl import ops
import camtl.kernels.attention as attention_kernels
from camtl.kernels.attention import _configs
from camtl.ops.attention import _attention_varlen_fwd, draw_dropout_seed
from conftest import assert_close, graph_has, poisoned_empty, assert_independent_of_program_order
from test_kernels_attention import dkdv_on_the_other_layout, far_apart, philox_keep, took_query_rows

H = 2
# A length-1 sequence, one longer than a 16-row tile (20), lengths that are not multiples of c; task 3 unused,
# tasks 0 and 2 repeated.
LENGTHS = [5, 1, 20, 7, 16, 3]
TASKS = [2, 0, 2, 1, 2, 0]
G = 4


def packed(lengths, d, L_max, c, device, tasks=TASKS, heads=H, groups=G):
    N = sum(lengths)
    tensors = [torch.randn(N, heads, d, device=device) for _ in range(3)]
    tensors.append(torch.randn(groups, L_max, c, device=device))
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    return tensors, torch.tensor(tasks, device=device), cu


def run(backend, leaves, index, cu, **kw):
    with camtl.use_backend(backend):
        return ops.conditional_attention(*leaves, index, cu_seqlens=cu, **kw)


def compare_backends(tensors, index, cu, dtype, **kw):
    """Triton (outputs NaN-poisoned before the kernels write them) vs torch in fp32: output and every gradient."""
    ref = [t.float().clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    grad = torch.randn(tensors[0].shape[:2] + tensors[2].shape[2:], device=tensors[0].device)
    with poisoned_empty():
        out = run("triton", act, index, cu, **kw)
        grads = torch.autograd.grad(out, act, grad.to(dtype))
    assert graph_has(out, "camtl::conditional_attention_varlen_fwd")
    exp = run("torch", ref, index, cu, **kw)
    exp_grads = torch.autograd.grad(exp, ref, grad)
    assert_close(out, exp, dtype, "output")
    for name, g, e in zip(("q", "k", "v", "table"), grads, exp_grads):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"grad of {name}")
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [16, 24, 32])  # 24: the head-dim masks compiled in (EVEN_D off)
def test_varlen_kernel_matches_the_reference(d, dtype, device):
    tensors, index, cu = packed(LENGTHS, d, 24, 6, device)
    out, grads = compare_backends(tensors, index, cu, dtype)
    dtable = grads[3]
    assert (dtable[3] == 0).all(), "an unused task got a gradient"
    longest = [max(Ls for Ls, t in zip(LENGTHS, TASKS) if t == g) for g in range(3)]
    for g, Ls in enumerate(longest):  # rows past a task's longest sequence get none, the rows before do
        assert (dtable[g, Ls:] == 0).all() and (dtable[g, :Ls] != 0).any(-1).all()


def test_varlen_blocks_wider_than_a_tile_and_than_the_sequences(device):
    """c = 40 > the 16-wide key tiles and > every sequence: each block's columns past the last key tile stay 0."""
    block = _configs(torch.empty(1, 1, 16))["fwd"]["BLOCK_N"]
    lengths = [block + 9, 3, 2 * block + 1]
    tensors, index, cu = packed(lengths, 16, 40, 40, device, tasks=[1, 1, 0], groups=2)
    compare_backends(tensors, index, cu, torch.float32)


def test_varlen_cu_seqlens_int64_max_seqlen_and_scale(device):
    tensors, index, cu = packed(LENGTHS, 16, 24, 6, device)
    compare_backends(tensors, index, cu.long(), torch.float32, max_seqlen=23, scale=0.3)


def test_varlen_strided_views_of_one_qkv_projection(device):
    N, d = sum(LENGTHS), 16
    qkv = torch.randn(N, 3 * H * d, device=device, requires_grad=True)
    table = torch.randn(G, 24, 6, device=device, requires_grad=True)
    _, index, cu = packed(LENGTHS, d, 24, 6, device)

    def attention(backend):
        q, k, v = (t.view(N, H, d) for t in qkv.split(H * d, dim=-1))
        assert not q.is_contiguous()
        return run(backend, [q, k, v, table], index, cu)

    out = attention("triton")
    grads = torch.autograd.grad(out.sum(), (qkv, table))
    exp = attention("torch")
    exp_grads = torch.autograd.grad(exp.sum(), (qkv, table))
    assert_close(out, exp, torch.float32, "output")
    for name, g, e in zip(("qkv", "table"), grads, exp_grads):
        assert_close(g, e, torch.float32, f"grad of {name}")


def test_varlen_backward_does_not_depend_on_program_order(device):
    """Bitwise the same in a shuffled program order: no two programs write one place (dS per token, then a
    scatter to distinct rows and a GEMM per task)."""
    tensors, index, cu = packed(LENGTHS, 16, 24, 6, device)
    grad = torch.randn(sum(LENGTHS), H, 16, device=device)

    def grads():
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = run("triton", leaves, index, cu)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))

    assert_independent_of_program_order(grads, ("output", "q", "k", "v", "table"), seed=3)


def test_varlen_triton_takes_what_only_the_reference_can_to_the_reference(device):
    """return_probs runs the reference on any backend; float64 is refused by a named triton backend."""
    tensors, index, cu = packed(LENGTHS, 16, 24, 6, device)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, probs = run("triton", leaves, index, cu, return_probs=True)
    assert not graph_has(out, "camtl::conditional_attention_varlen_fwd")
    assert probs.shape == (len(LENGTHS), H, max(LENGTHS), max(LENGTHS))
    with pytest.raises(camtl.BackendUnavailableError, match="triton"):
        run("triton", [t.double() for t in tensors], index, cu)


def test_varlen_empty_batch(device):
    q = torch.randn(0, H, 16, device=device, requires_grad=True)
    table = torch.randn(2, 8, 3, device=device, requires_grad=True)
    out = run("triton", [q, q, q, table], torch.zeros(0, dtype=torch.long, device=device),
              torch.zeros(1, dtype=torch.int32, device=device))
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert (table.grad == 0).all()


# ---- dropout ------------------------------------------------------------------------------------------------

def _kernel_attention(leaves, index, cu, p, seed):
    q, k, v, table = leaves
    return _attention_varlen_fwd(q, k, v, cu, max(LENGTHS), table, index, 1.0 / math.sqrt(q.shape[-1]), p,
                                 torch.tensor(seed, dtype=torch.int64))[0]


def documented_keep(seed, lengths, p):
    """The documented varlen mask: sequence s, head h keeps (i, j) when Philox on counter (i·Ls + j, s·H + h),
    i and j counted from the sequence start, draws >= p. Per sequence, [H, Ls, Ls] bool."""
    S = len(lengths)
    return [philox_keep(seed, S, H, Ls, p)[s] for s, Ls in enumerate(lengths)]


def reference_with_mask(q, k, v, table, index, cu, keeps, p):
    """float64, one sequence at a time: (softmax(scores + bias) ∘ keep / (1 - p)) v."""
    outs = []
    bounds = cu.tolist()
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        bias = ops.block_bias(table, index[s:s + 1], b - a)[0]
        scores = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) / math.sqrt(q.shape[-1]) + bias
        probs = torch.softmax(scores, -1) * keeps[s].to(q.device) / (1 - p)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v[a:b]))
    return torch.cat(outs)


@pytest.mark.parametrize("dkdv", ["keys-major", "queries-major"])
def test_varlen_dropout_forward_and_backward_match_a_reference_with_the_documented_mask(dkdv, device, monkeypatch):
    """dK/dV in either layout (see test_kernels_attention.dkdv_on_the_other_layout)."""
    handed_out = dkdv_on_the_other_layout(monkeypatch) if dkdv == "queries-major" else None
    p, seed = 0.25, 2**32 + 7  # both halves of the Philox key in use
    tensors, index, cu = packed(LENGTHS, 16, 24, 6, device)
    keeps = documented_keep(seed, LENGTHS, p)
    leaves = [t.clone().requires_grad_() for t in tensors]
    with poisoned_empty():
        out = _kernel_attention(leaves, index, cu, p, seed)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad)
    ref = [t.double().clone().requires_grad_() for t in tensors]
    exp = reference_with_mask(*ref, index, cu, keeps, p)
    assert_close(out, exp, torch.float32, "output")
    for name, g, e in zip(("q", "k", "v", "table"), grads, torch.autograd.grad(exp, ref, grad.double())):
        assert_close(g, e, torch.float32, f"grad of {name} with dropout")
    assert handed_out is None or took_query_rows(handed_out)


def test_varlen_dropout_mask_is_the_documented_one_per_sequence_and_head_and_seed(device):
    """With v = I, the kernel's output is its dropped, rescaled probabilities: its mask is the documented one, at
    the rate 1 - p, its own for each (sequence, head); the public op's seed follows torch.manual_seed."""
    p, seed, lengths = 0.3, 5, [20, 20, 13]
    tensors, index, cu = packed(lengths, 32, 24, 6, device, tasks=[1, 0, 1], groups=2)
    q, k, _, table = tensors
    eye = torch.zeros_like(q)
    for a, Ls in zip(cu.tolist(), lengths):
        eye[a:a + Ls, :, :Ls] = torch.eye(Ls, device=device)[:, None, :]
    dropped = _kernel_attention([q, k, eye, table], index, cu, p, seed)
    probs = run("torch", [q, k, eye, table], index, cu, return_probs=True)[1]
    masks = []
    for s, (a, Ls) in enumerate(zip(cu.tolist(), lengths)):
        got = dropped[a:a + Ls, :, :Ls].transpose(0, 1)  # [H, Ls, Ls]
        kept = got != 0
        assert torch.equal(kept.cpu(), documented_keep(seed, lengths, p)[s]), f"sequence {s}"
        torch.testing.assert_close(got[kept], probs[s, :, :Ls, :Ls][kept] / (1 - p), rtol=1e-5, atol=1e-6)
        masks += list(kept.reshape(H, -1))
    for m in masks:
        assert abs(m.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / m.numel())
    assert len({tuple(m.tolist()) for m in masks[:4]}) == 4, "two (sequence, head) share a mask"
    torch.manual_seed(11)
    out = run("triton", tensors, index, cu, dropout_p=p)
    torch.manual_seed(11)
    assert torch.equal(out, run("triton", tensors, index, cu, dropout_p=p))
    torch.manual_seed(12)
    assert not torch.equal(out, run("triton", tensors, index, cu, dropout_p=p))


# ---- registration ----------------------------------------------------------------------------------------------

def test_varlen_opcheck(device):
    lengths = [5, 17, 1]
    tensors, index, cu = packed(lengths, 16, 20, 6, device, tasks=[1, 0, 1], groups=2)
    q, k, v, table = (t.requires_grad_() for t in tensors)
    args = (q, k, v, cu, max(lengths), table, index, 0.25, 0.0, draw_dropout_seed(0.0))
    torch.library.opcheck(_attention_varlen_fwd, args)


# ---- int64 offsets (issue 9, deliverable 5) --------------------------------------------------------------------

def test_varlen_int64_offsets_past_2_31_elements(device):
    """Tokens 2^25 elements apart: the last sequence starts at token 64, element 2^31, so int32 base offsets
    (first token · token stride) wrap around. Bitwise the results of compact copies."""
    if device.type != "cpu":
        pytest.skip("builds its > 2^31-element buffer in host memory")
    lengths, d = [20, 30, 14, 1], 16  # in-sequence offsets stay below 2^31: 29 · 2^25 < 2^31
    (q, k, v, table), index, cu = packed(lengths, d, 32, 6, device, tasks=[1, 0, 1, 1], groups=2)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    N = sum(lengths)
    dout = torch.randn(N, H, d).bfloat16()
    args = (cu, max(lengths), table, index, d ** -0.5, 0.1)
    out, lse, bias, mask = attention_kernels.attention_forward_varlen(q, k, v, *args, 3)
    want = (out, lse) + attention_kernels.attention_backward_varlen(dout, q, k, v, out, lse, bias, mask, *args)
    views = far_apart([t.reshape(N, H * d) for t in (q, k, v, dout, out)], 2**25)
    hq, hk, hv, hdout, hout = (t.view(N, H, d) for t in views)
    got_out, got_lse, bias, mask = attention_kernels.attention_forward_varlen(hq, hk, hv, *args, 3)
    got = (got_out, got_lse) + attention_kernels.attention_backward_varlen(hdout, hq, hk, hv, hout, got_lse, bias,
                                                                           mask, *args)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dtable"), got, want):
        assert torch.equal(g, w), f"{name} differs when the inputs sit past element 2^31"
