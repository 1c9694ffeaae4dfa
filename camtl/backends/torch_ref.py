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

import math
from typing import Optional, Tuple

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
    g = _per_example(gamma, index).unsqueeze(1).to(cdt)
    b = _per_example(beta, index).unsqueeze(1).to(cdt)
    return ((1 + g) * x.to(cdt) + b).to(x.dtype)


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


def conditional_attention_varlen(
    q, k, v, cu_seqlens, max_seqlen, table, index=None, dropout_p=0.0, scale=None,
    head_mask=None, return_probs=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """conditional_attention on packed sequences: q, k [N, H, d], v [N, H, dv], cu_seqlens [S+1].

    Vectorized, no loop over sequences: the tokens are scattered into [S, H, max_seqlen, ·] (max_seqlen
    >= the longest sequence), the padded reference runs with a key padding mask, and the real tokens
    are gathered back. Sequence s gets the top-left Ls×Ls corner of its task's bias (positions counted
    from its start) and attends to its own tokens only. probs, when asked, are [S, H, max_seqlen,
    max_seqlen], zero outside each sequence's Ls×Ls corner.
    """
    N, H = q.shape[:2]
    S = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(S, device=q.device), lengths, output_size=N)
    pos_of_token = torch.arange(N, device=q.device) - cu[:-1].index_select(0, seq_of_token)

    def to_padded(t):  # [N, H, x] -> [S, H, max_seqlen, x]
        padded = t.new_zeros((S, max_seqlen) + tuple(t.shape[1:]))
        return padded.index_put((seq_of_token, pos_of_token), t).transpose(1, 2)

    key_keep = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # [S, max_seqlen]
    out, probs = conditional_attention(to_padded(q), to_padded(k), to_padded(v), table, index, key_keep,
                                       dropout_p, scale, head_mask, return_probs)
    out = out.transpose(1, 2)[seq_of_token, pos_of_token]  # [N, H, dv]
    if probs is not None:  # the padded query rows attend too: zero them, so probs hold real rows only
        probs = probs * key_keep[:, None, :, None].to(probs.dtype)
    return out, probs


def conditional_layer_norm(x, weight, bias, gamma, beta, index=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) whose scale is task-conditioned.

    y[b, ..., :] = norm(h[b, ..., :]) * ((1 + gamma[index[b]]) * weight + beta[index[b]]) + bias
    with h = x + residual and norm the plain (biased-variance) normalization.
    """
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)  # the sum in fp32: it cannot overflow
    scale = (1 + _per_example(gamma, index).to(cdt)) * weight.to(cdt) + _per_example(beta, index).to(cdt)
    scale = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
    normed = F.layer_norm(h, (x.shape[-1],), eps=eps)
    return (normed * scale + bias.to(cdt)).to(x.dtype)


def film_linear(x, gamma, beta, index, weight, bias=None):
    """y = ((1 + gamma[index]) * x + beta[index]) @ weightᵀ + bias."""
    return F.linear(film(x, gamma, beta, index), weight, bias)
