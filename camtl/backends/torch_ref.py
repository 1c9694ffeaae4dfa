"""The pure-PyTorch backend: the numerical reference and the fallback everywhere.

Every function here is vectorized over examples and tasks (no Python loop over
either) and relies on PyTorch autograd for its backward. Inputs are assumed
valid: ``camtl.ops`` checks them before they get here.

Precision and overflow, the rule every backend follows: for float16 and
bfloat16 inputs, the intermediate steps (the FiLM scale and shift, attention
scores, bias and mask adds, softmax and P·V, the residual sum and the
layer-norm statistics) run in float32, and only each op's outputs are
rounded to the input dtype. So an intermediate never overflows (fp16 scores
above 65504, an fp16 ``x + residual`` past the range are fine); an output
that does not fit its dtype rounds to ±inf, on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _per_example(table: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return table if index is None else table.index_select(0, index)


def film(x, gamma, beta, index=None):
    """out[b, l, :] = (1 + gamma[index[b]]) * x[b, l, :] + beta[index[b]].

    x is [B, L, D], or [L, D] shared by the batch; gamma and beta are [G, D].
    """
    cdt = _compute_dtype(x.dtype)
    # 1 + gamma on the [G, D] table, then gathered: the same values as per example, for G rows, not B (or N).
    g = _per_example(1 + gamma.to(cdt), index).unsqueeze(1)
    b = _per_example(beta, index).unsqueeze(1).to(cdt)
    return (g * x.to(cdt) + b).to(x.dtype)


def block_bias(table, index=None, seq_len=None, block_rows=None, num_cols=None):
    """Expands a block table [G, L_max, c] into the dense bias [B, L, L_cols].

    bias[b, i, j] = table[index[b], i, j - c * (i // r)] when
    0 <= j - c * (i // r) < c, and 0 otherwise, with r = block_rows (c by
    default: square blocks on the diagonal). Cropped to seq_len rows and
    num_cols columns (seq_len by default).
    """
    rows = _per_example(table, index)
    c = table.shape[-1]
    L = table.shape[1] if seq_len is None else seq_len
    r = c if block_rows is None else block_rows
    cols = L if num_cols is None else num_cols
    i = torch.arange(L, device=table.device)
    j = torch.arange(cols, device=table.device)
    offset = j[None, :] - c * (i // r)[:, None]
    inside = (offset >= 0) & (offset < c)
    gathered = rows[:, :L, :].gather(2, offset.clamp(0, c - 1).expand(rows.shape[0], L, cols))
    return torch.where(inside, gathered, gathered.new_zeros(()))


def conditional_attention(
    q, k, v, table, index=None, attn_mask=None, dropout_p=0.0, scale=None,
    head_mask=None, return_probs=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q kᵀ * scale + M + mask) v with M = block_bias(table, index).

    attn_mask: None; a bool key padding mask [B, Lk] (True = attend; camtl.ops
    turns integer keep-masks into bool); a float key mask [B, Lk] added to the
    scores; or a float mask broadcastable to [B, H, Lq, Lk], added. A query
    row whose keys are all masked (every score -inf) gets zero probabilities,
    zero output and zero gradients, as in the fused kernels, not NaN.
    """
    B, H, L, d = q.shape
    cdt = _compute_dtype(q.dtype)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2))
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    scores = scores + block_bias(table, index, L).unsqueeze(1).to(cdt)
    empty = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            additive = torch.zeros(attn_mask.shape, dtype=cdt, device=q.device).masked_fill(~attn_mask, float("-inf"))
        else:
            additive = attn_mask.to(cdt)
        if additive.dim() == 2:
            additive = additive[:, None, None, :]
        # Rows with no key left (found on the mask, not the [B, H, L, L] scores): softmax on an unmasked row,
        # then zeroed, keeps them and their gradients finite.
        empty = (additive == float("-inf")).all(dim=-1, keepdim=True)
        scores = scores + additive.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if head_mask is not None:
        probs = probs * head_mask.to(cdt)
    out = torch.matmul(probs, v.to(cdt)).to(q.dtype)
    return out, (probs.to(q.dtype) if return_probs else None)


# The varlen reference pads each group of similar lengths to its longest: more groups waste fewer padded
# scores but cost a few more (small) ops each. A group is worth this many score elements (on the CPU, about
# the small ops' time of one group, forward and backward).
BUCKET_COST = 2048
MAX_LENGTH_BUCKETS = 8


def length_buckets(lengths: Sequence[int], max_buckets: int = MAX_LENGTH_BUCKETS,
                   bucket_cost: int = BUCKET_COST) -> List[List[int]]:
    """Groups the sequences (indices into ``lengths``) into at most ``max_buckets`` buckets of similar length.

    Each bucket is padded to its longest sequence, so its attention costs about n_b * L_b^2: a dynamic
    program over the distinct lengths, sorted, picks the split points that minimize
    sum(n_b * L_b^2 + bucket_cost) (a split never needs to part equal lengths), with the fewest buckets
    among the cheapest. Every sequence is in exactly one bucket; the buckets are in increasing length,
    each in increasing (length, index) order.
    """
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    if not order:
        return []
    distinct, counts = torch.tensor([lengths[s] for s in order], dtype=torch.float64).unique_consecutive(
        return_counts=True)
    U = len(distinct)
    below = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # below[i]: sequences shorter than distinct[i]
    # span[i - 1, j]: a bucket of the distinct lengths j .. i - 1 (exact integers in float64), inf unless j < i
    span = (below[1:, None] - below[None, :-1]) * distinct[:, None] ** 2 + bucket_cost
    span = span.masked_fill(torch.ones(U, U, dtype=torch.bool).triu(1), float("inf"))
    best = torch.full((U + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0  # best[i]: the least cost of the first i distinct lengths in k buckets, k = 1, 2, ...
    totals, cuts = [], []
    for _ in range(min(max_buckets, U)):
        cost, cut = (best[None, :-1] + span).min(dim=1)
        best = torch.cat([best.new_full((1,), float("inf")), cost])
        totals.append(float(best[U]))
        cuts.append(cut.tolist())
    k = min(range(len(totals)), key=lambda k: (totals[k], k))
    ends, i = [], U
    while k >= 0:  # back from the last bucket: cuts[k][i - 1] is where the bucket ending at i starts
        ends.append(i)
        i, k = cuts[k][i - 1], k - 1
    bounds = [0] + [int(below[e]) for e in ends[::-1]]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class _VarlenPlan(NamedTuple):
    """Index tensors (CPU) that lay packed [N, H, x] tokens out as padded length buckets and back."""

    buckets: Tuple[Tuple[torch.Tensor, int], ...]  # (sequence indices [n_b], L_b) per bucket
    key_keep: Tuple[torch.Tensor, ...]  # [n_b, L_b] bool per bucket: the real positions
    gather: torch.Tensor  # [sum H * n_b * L_b]: the row of [N * H, x] for each (bucket, h, seq, position)
    scatter: torch.Tensor  # [N * H]: for each (token, h), its row in the buckets' concatenated output
    sequence_inverse: torch.Tensor  # [S]: each sequence's place among the buckets' sequences, end to end


@functools.lru_cache(maxsize=16)
def _varlen_plan(lengths: Tuple[int, ...], heads: int, max_buckets: int, bucket_cost: int) -> _VarlenPlan:
    """Cached: a model's layers, and its backward, reuse one packing's plan."""
    with torch.inference_mode(False):  # a plan first made for inference may serve a training step later
        return _make_varlen_plan(lengths, heads, max_buckets, bucket_cost)


def _make_varlen_plan(lengths: Tuple[int, ...], heads: int, max_buckets: int, bucket_cost: int) -> _VarlenPlan:
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    N = int(lengths_t.sum())
    head = torch.arange(heads)
    buckets, keeps, gathers = [], [], []
    scatter = torch.empty(N, heads, dtype=torch.int64)
    offset = 0
    for seqs in length_buckets(lengths, max_buckets, bucket_cost):
        seq_index = torch.tensor(seqs, dtype=torch.int64)
        seq_len, seq_start = lengths_t[seq_index], starts[seq_index]
        Lb = int(seq_len.max())
        position = torch.arange(Lb)
        keep = position[None, :] < seq_len[:, None]  # [n, Lb]
        # Past its end a sequence repeats its last token: masked as a key, dropped as a query (zero gradients).
        token = seq_start[:, None] + torch.minimum(position[None, :], seq_len[:, None] - 1)  # [n, Lb]
        gathers.append((token[None] * heads + head[:, None, None]).reshape(-1))  # [H, n, Lb] flattened
        row = offset + torch.arange(heads * len(seqs) * Lb).view(heads, len(seqs), Lb)
        scatter[token[keep]] = row[:, keep].T
        offset += row.numel()
        buckets.append((seq_index, Lb))
        keeps.append(keep)
    sequence_order = torch.cat([b[0] for b in buckets])
    sequence_inverse = torch.empty_like(sequence_order)
    sequence_inverse[sequence_order] = torch.arange(len(lengths))
    return _VarlenPlan(tuple(buckets), tuple(keeps), torch.cat(gathers), scatter.view(-1), sequence_inverse)


def conditional_attention_varlen(
    q, k, v, cu_seqlens, max_seqlen, table, index=None, dropout_p=0.0, scale=None,
    head_mask=None, return_probs=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """conditional_attention on packed sequences: q, k [N, H, d], v [N, H, dv], cu_seqlens [S+1].

    Vectorized, no loop over sequences: the sequences are grouped by length into a few buckets
    (``length_buckets``); one gather lays each bucket's tokens out as [H * n_b, L_b, ·] (L_b its longest
    sequence), each bucket attends with a key padding mask, and one gather puts the real tokens back.
    Sequence s gets the top-left Ls×Ls corner of its task's bias (positions counted from its start) and
    attends to its own tokens only. probs, when asked, are [S, H, max_seqlen, max_seqlen] (max_seqlen >=
    the longest sequence), zero outside each sequence's Ls×Ls corner; head_mask broadcasts to that shape.
    """
    N, H, d = q.shape
    dv = v.shape[-1]
    S = cu_seqlens.shape[0] - 1
    device = q.device
    cdt = _compute_dtype(q.dtype)
    if S == 0:
        probs = q.new_zeros((0, H, max_seqlen, max_seqlen)) if return_probs else None
        return v[:0].clone(), probs
    if index is None:
        index = torch.arange(S, device=device)
    plan = _varlen_plan(tuple(torch.diff(cu_seqlens).tolist()), H, MAX_LENGTH_BUCKETS, BUCKET_COST)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if head_mask is not None:
        head_mask = head_mask.reshape((1,) * (4 - head_mask.dim()) + tuple(head_mask.shape))
    gather = plan.gather.to(device)
    sizes = [H * len(seqs) * Lb for seqs, Lb in plan.buckets]
    # One gather each (one index_add in the backward), split into the buckets' contiguous [H * n_b, L_b, x].
    q_rows, k_rows, v_rows = (t.reshape(N * H, t.shape[-1]).index_select(0, gather).to(cdt).split(sizes)
                              for t in (q, k, v))
    outs, all_probs = [], []
    for (seqs, Lb), keep, qb, kb, vb in zip(plan.buckets, plan.key_keep, q_rows, k_rows, v_rows):
        seqs, keep, n = seqs.to(device), keep.to(device), len(seqs)
        bias = block_bias(table, index.index_select(0, seqs), Lb).to(cdt)  # [n, Lb, Lb]
        bias = bias.masked_fill(~keep[:, None, :], float("-inf"))  # padded keys; every row keeps key 0
        scores = torch.baddbmm(bias.expand(H, n, Lb, Lb).reshape(H * n, Lb, Lb), qb.view(H * n, Lb, d),
                               kb.view(H * n, Lb, d).transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        if head_mask is not None:
            hm = head_mask if head_mask.shape[0] == 1 else head_mask.index_select(0, seqs)
            hm = hm[:, :, :Lb] if hm.shape[2] != 1 else hm
            hm = hm[:, :, :, :Lb] if hm.shape[3] != 1 else hm
            probs = (probs.view(H, n, Lb, Lb) * hm.transpose(0, 1).to(cdt)).view(H * n, Lb, Lb)
        outs.append(torch.bmm(probs, vb.view(H * n, Lb, dv)).view(-1, dv))
        if return_probs:  # [n, H, max_seqlen, max_seqlen], the padded query rows zeroed
            corner = (probs.view(H, n, Lb, Lb) * keep[None, :, :, None].to(cdt)).transpose(0, 1)
            all_probs.append(F.pad(corner, (0, max_seqlen - Lb, 0, max_seqlen - Lb)))
    out = torch.cat(outs).index_select(0, plan.scatter.to(device)).view(N, H, dv).to(q.dtype)
    probs = None
    if return_probs:
        probs = torch.cat(all_probs).index_select(0, plan.sequence_inverse.to(device)).to(q.dtype)
    return out, probs


def conditional_layer_norm(x, weight, bias, gamma, beta, index=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) whose scale is task-conditioned.

    y[b, ..., :] = norm(h[b, ..., :]) * ((1 + gamma[index[b]]) * weight + beta[index[b]]) + bias
    with h = x + residual and norm the plain (biased-variance) normalization.
    """
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)  # the sum in fp32: it cannot overflow
    # Formed per task [G, D], then gathered: the same values as per example, one gather (packed: N rows).
    scale = _per_example((1 + gamma.to(cdt)) * weight.to(cdt) + beta.to(cdt), index)
    scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
    normed = F.layer_norm(h, (x.shape[-1],), eps=eps)
    return (normed * scale + bias.to(cdt)).to(x.dtype)


def film_linear(x, gamma, beta, index, weight, bias=None):
    """y = ((1 + gamma[index]) * x + beta[index]) @ weightᵀ + bias."""
    return F.linear(film(x, gamma, beta, index), weight, bias)
