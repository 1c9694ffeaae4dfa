"""Packed (varlen) input to the ops: conditional_attention with cu_seqlens, the token-wise ops on [N, D].

References are written here: a loop over sequences in plain float64 math, and the padded op.
"""

import math

import pytest
import torch

import camtl
from camtl import ops
from conftest import assert_close, graph_has

H, D_HEAD, C, L_MAX, G = 2, 4, 3, 7, 3  # c = 3 does not divide L_MAX: the last block is cropped
LENGTHS = [4, 1, L_MAX, 2, 5, L_MAX]  # a length-1 sequence and two at max_seq_length
TASKS = [2, 0, 2, 1, 0, 2]  # mixed and repeated


def packed_inputs(lengths=LENGTHS, tasks=TASKS, dtype=torch.float64, cu_dtype=torch.int32, heads=H):
    N = sum(lengths)
    q, k, v = (torch.randn(N, heads, D_HEAD, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(G, L_MAX, C, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(cu_dtype)
    return q, k, v, table, torch.tensor(tasks), cu


def naive_sequence_attention(q, k, v, table, task, scale):
    """One sequence [Ls, H, d] by hand: the bias is the top-left Ls×Ls corner of its task's bias."""
    Ls = q.shape[0]
    bias = torch.zeros(Ls, Ls, dtype=q.dtype)
    for i in range(Ls):
        for j in range(Ls):
            if i // C == j // C:
                bias[i, j] = table[task, i, j - C * (i // C)]
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale + bias
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return torch.einsum("hij,jhd->ihd", weights / weights.sum(-1, keepdim=True), v)


def naive_varlen(q, k, v, table, index, cu):
    bounds = cu.tolist()
    scale = 1 / math.sqrt(q.shape[-1])
    return torch.cat([naive_sequence_attention(q[a:b], k[a:b], v[a:b], table, int(index[s]), scale)
                      for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])


def grads_of(out, grad, leaves):
    return torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("max_seqlen", [None, L_MAX + 5])
def test_varlen_matches_a_loop_over_sequences(cu_dtype, max_seqlen):
    q, k, v, table, index, cu = packed_inputs(cu_dtype=cu_dtype)
    out = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, max_seqlen=max_seqlen)
    expected = naive_varlen(q, k, v, table, index, cu)
    assert out.shape == q.shape
    assert_close(out, expected, torch.float64, "output")
    grad = torch.randn_like(out)
    got = grads_of(out, grad, [q, k, v, table])
    for name, g, w in zip("q k v table".split(), got, grads_of(expected, grad, [q, k, v, table])):
        assert_close(g, w, torch.float64, f"grad of {name}")
    # A task's bias rows get a gradient up to its longest sequence, none past it.
    longest = [max(Ls for Ls, t in zip(LENGTHS, TASKS) if t == task) for task in range(G)]
    assert torch.equal((got[3] != 0).any(-1), torch.arange(L_MAX)[None, :] < torch.tensor(longest)[:, None])


def pad(t, lengths):
    """[N, H, x] -> [S, H, Lmax, x] zero-padded, and the bool key keep-mask [S, Lmax]."""
    Lmax = max(lengths)
    rows = [torch.cat([seq, seq.new_zeros(Lmax - len(seq), *seq.shape[1:])]) for seq in t.split(lengths)]
    keep = torch.tensor([[j < Ls for j in range(Lmax)] for Ls in lengths])
    return torch.stack(rows).transpose(1, 2), keep


def real_tokens(padded, lengths):
    """[S, H, Lmax, x] -> [N, H, x], the real tokens only."""
    return torch.cat([padded[s, :, :Ls].transpose(0, 1) for s, Ls in enumerate(lengths)])


def test_varlen_equals_the_padded_op_on_real_tokens():
    q, k, v, table, index, cu = packed_inputs()
    out = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu)
    padded = [pad(t.detach(), LENGTHS)[0].requires_grad_() for t in (q, k, v)]
    keep = pad(q, LENGTHS)[1]
    table_padded = table.detach().clone().requires_grad_()
    out_padded = ops.conditional_attention(*padded, table_padded, index, keep)
    assert_close(out, real_tokens(out_padded, LENGTHS), torch.float64, "output")
    grad = torch.randn_like(out)
    grad_padded, _ = pad(grad, LENGTHS)  # zero on the padded queries: only real tokens count
    got = grads_of(out, grad, [q, k, v, table])
    want = grads_of(out_padded, grad_padded, padded + [table_padded])
    for name, g, w in zip("q k v".split(), got, want):
        assert_close(g, real_tokens(w, LENGTHS), torch.float64, f"grad of {name}")
    assert_close(got[3], want[3], torch.float64, "grad of table")


def test_varlen_probs_are_each_sequences_corner():
    q, k, v, table, index, cu = packed_inputs()
    _, probs = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, return_probs=True)
    assert probs.shape == (len(LENGTHS), H, L_MAX, L_MAX)
    for s, Ls in enumerate(LENGTHS):
        assert_close(probs[s, :, :Ls, :Ls].sum(-1), torch.ones(H, Ls, dtype=torch.float64), msg=f"rows of {s}")
        assert probs[s, :, Ls:].abs().sum() == 0 and probs[s, :, :, Ls:].abs().sum() == 0


def test_varlen_empty_batch():
    q, k, v, table, _, _ = packed_inputs(lengths=[], tasks=[])
    out = ops.conditional_attention(q, k, v, table, torch.zeros(0, dtype=torch.int64),
                                    cu_seqlens=torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, H, D_HEAD)


def test_varlen_dropout_zero_is_no_dropout():
    q, k, v, table, index, cu = packed_inputs()
    torch.manual_seed(1)
    plain = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu)
    torch.manual_seed(2)
    zero = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, dropout_p=0.0)
    assert torch.equal(plain, zero)


def test_varlen_dropout_rate_scaling_and_seed():
    p = 0.3
    lengths = [L_MAX, 5, L_MAX, 6, L_MAX, 3] * 2
    q, k, v, table, index, cu = packed_inputs(lengths=lengths, tasks=[0, 1, 2, 2, 1, 0] * 2, heads=8)
    _, kept_all = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, return_probs=True)
    torch.manual_seed(7)
    out, dropped = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, dropout_p=p, return_probs=True)
    real = kept_all > 0
    zeroed = (dropped[real] == 0).double().mean().item()
    assert abs(zeroed - p) < 0.05, f"dropped fraction {zeroed}, expected {p}"
    survivors = real & (dropped != 0)
    assert_close(dropped[survivors], kept_all[survivors] / (1 - p), torch.float64, "kept probabilities")
    assert (dropped[~real] == 0).all()
    torch.manual_seed(7)
    again = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, dropout_p=p)
    assert torch.equal(out, again)
    torch.manual_seed(8)
    assert not torch.equal(out, ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, dropout_p=p))


def test_varlen_runs_the_triton_kernel_when_named_and_torch_on_auto_on_the_cpu():
    q, k, v, table, index, cu = (t.detach().float().requires_grad_() if t.is_floating_point() else t
                                 for t in packed_inputs())
    with camtl.use_backend("triton"):
        out = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu)
    assert graph_has(out, "camtl::conditional_attention_varlen_fwd")
    with camtl.use_backend("auto"):  # the interpreter is never auto's choice for CPU tensors
        auto = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu)
    assert not graph_has(auto, "camtl::conditional_attention_varlen_fwd")
    with camtl.use_backend("torch"):
        exp = ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu)
    assert torch.equal(auto, exp)
    assert_close(out, exp, torch.float32, "output")
    grad = torch.randn_like(out)
    for name, g, w in zip("q k v table".split(), grads_of(out, grad, [q, k, v, table]),
                          grads_of(exp, grad, [q, k, v, table])):
        assert_close(g, w, torch.float32, f"grad of {name}")


def _bad(**changes):
    def make():
        q, k, v, table, index, cu = (t.detach() for t in packed_inputs())
        args = dict(q=q, k=k, v=v, table=table, index=index, cu_seqlens=cu)
        for name, change in changes.items():
            args[name] = change(args[name])
        return args
    return make


BAD_PACKING = {
    "cu float": (_bad(cu_seqlens=lambda cu: cu.float()), TypeError, r"'cu_seqlens' must be an int32 or int64"),
    "cu list": (_bad(cu_seqlens=lambda cu: cu.tolist()), TypeError, r"'cu_seqlens' must be an int32 or int64"),
    "cu 2-D": (_bad(cu_seqlens=lambda cu: cu[None]), ValueError, r"'cu_seqlens'.*\[S\+1\].*got shape \[1, 7\]"),
    "cu start": (_bad(cu_seqlens=lambda cu: torch.cat([cu[:1] + 1, cu[1:]])), ValueError,
                 r"'cu_seqlens' must start at 0"),
    "cu empty sequence": (_bad(cu_seqlens=lambda cu: torch.cat([cu[:2], cu[1:]])), ValueError,
                          r"'cu_seqlens' must be strictly increasing.*sequence 1 spans \[4, 4\)"),
    "cu decreasing": (_bad(cu_seqlens=lambda cu: cu[[0, 2, 1, 3, 4, 5, 6]]), ValueError,
                      r"'cu_seqlens' must be strictly increasing"),
    "cu end": (_bad(cu_seqlens=lambda cu: cu[:-1]), ValueError, r"'cu_seqlens' must end at N=26"),
    "index length": (_bad(index=lambda i: i[:-1]), ValueError, r"'index' must have shape \[S\]=\[6\]"),
    "index none": (_bad(index=lambda i: None), ValueError, r"one row per example"),
    "too long": (_bad(table=lambda t: t[:, :L_MAX - 1]), ValueError,
                 r"sequence 2 in 'cu_seqlens' has 7 tokens, more than max_seq_length=6"),
    "k tokens": (_bad(k=lambda k: k[1:]), ValueError, r"'k' must have shape \[26, 2, 4\]"),
    "v heads": (_bad(v=lambda v: v[:, :1]), ValueError, r"'v' must have shape \[26, 2\] \+ \[dv\]"),
    "q padded": (_bad(q=lambda q: q[None]), ValueError, r"'q' must have shape \[N, H, d\]"),
}


@pytest.mark.parametrize("case", list(BAD_PACKING))
def test_varlen_bad_packing_is_refused(case):
    make, error, message = BAD_PACKING[case]
    args = make()
    with pytest.raises(error, match=message):
        ops.conditional_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("table"),
                                  args.pop("index"), **args)


def test_varlen_bad_max_seqlen_and_mask_are_refused():
    q, k, v, table, index, cu = (t.detach() for t in packed_inputs())
    with pytest.raises(ValueError, match=r"'max_seqlen'=6 is less than the longest sequence"):
        ops.conditional_attention(q, k, v, table, index, cu_seqlens=cu, max_seqlen=L_MAX - 1)
    with pytest.raises(ValueError, match=r"'attn_mask' must be None with packed input"):
        ops.conditional_attention(q, k, v, table, index, torch.ones(6, L_MAX, dtype=torch.bool), cu_seqlens=cu)


# ---- the token-wise ops on packed tokens: a per-token task index ----------------------------------------------

TOKEN_LENGTHS, TOKEN_TASKS, WIDTH = [3, 1, 5, 2], [1, 0, 1, 2], 6


def _token_case(op_name, x, gamma, beta, index, extra):
    if op_name == "conditional_layer_norm":
        weight, bias = extra
        return ops.conditional_layer_norm(x, weight, bias, gamma, beta, index)
    if op_name == "film":
        return ops.film(x, gamma, beta, index)
    weight, bias = extra
    return ops.film_linear(x, gamma, beta, index, weight, bias)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("op_name", ["conditional_layer_norm", "film", "film_linear"])
def test_token_wise_ops_on_packed_tokens_equal_padded(op_name, backend, dtype):
    """Packed [N, D] (film / film_linear: the view [N, 1, D]) with index.repeat_interleave(lengths)."""
    lengths, tasks = TOKEN_LENGTHS, torch.tensor(TOKEN_TASKS)
    N = sum(lengths)
    x = torch.randn(N, WIDTH, dtype=dtype, requires_grad=True)
    gamma, beta = (torch.randn(G, WIDTH, dtype=dtype, requires_grad=True) for _ in range(2))
    out_width = WIDTH if op_name != "film_linear" else 4
    extra_shapes = {"conditional_layer_norm": [(WIDTH,), (WIDTH,)], "film": [], "film_linear": [(4, WIDTH), (4,)]}
    extra = [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in extra_shapes[op_name]]
    token_index = tasks.repeat_interleave(torch.tensor(lengths))
    with camtl.use_backend(backend):
        packed_x = x if op_name == "conditional_layer_norm" else x.unsqueeze(1)
        out = _token_case(op_name, packed_x, gamma, beta, token_index, extra).reshape(N, out_width)
    # The padded reference on the torch backend: [S, Lmax, D] with one task per sequence.
    x_padded = pad(x.detach()[:, None], lengths)[0][:, 0].requires_grad_()  # [S, Lmax, D]
    leaves = [t.detach().clone().requires_grad_() for t in [gamma, beta] + extra]
    with camtl.use_backend("torch"):
        out_padded = _token_case(op_name, x_padded, leaves[0], leaves[1], tasks, leaves[2:])
    expected = real_tokens(out_padded[:, None], lengths)[:, 0]
    assert_close(out, expected, dtype, "output")
    grad = torch.randn_like(out)
    grad_padded = pad(grad[:, None], lengths)[0][:, 0]
    got = grads_of(out, grad, [x, gamma, beta] + extra)
    want = grads_of(out_padded, grad_padded, [x_padded] + leaves)
    assert_close(got[0], real_tokens(want[0][:, None], lengths)[:, 0], dtype, "grad of x")
    for name, g, w in zip(["gamma", "beta", "weight", "bias"], got[1:], want[1:]):
        assert_close(g, w, dtype, f"grad of {name}")
