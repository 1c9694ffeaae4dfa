"""The pure-PyTorch backend: the numerical reference and the fallback everywhere.

Every function here is vectorized over examples and tasks (no Python loop over
either) and relies on PyTorch autograd for its backward. Inputs are assumed
valid: ``camtl.ops`` checks them before they get here.

Half-precision inputs are computed in float32 where it matters for accuracy
(softmax, layer-norm statistics) and cast back, like the fused kernels will.
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
    g = _per_example(gamma, index).unsqueeze(1)
    b = _per_example(beta, index).unsqueeze(1)
    return (1 + g) * x + b


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

    attn_mask: None; a key padding mask [B, Lk], bool (True = attend) or
    float (added to the scores); or a float mask broadcastable to
    [B, H, Lq, Lk]. An example whose keys are all masked by a bool mask gets
    zero probabilities (and zero output), not NaN.
    """
    B, H, L, d = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    scores = scores + block_bias(table, index, L).unsqueeze(1).to(scores.dtype)
    any_key = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            any_key = attn_mask.any(dim=-1)
            # Fully masked examples attend everywhere here and are zeroed below,
            # which keeps their softmax (and its gradient) finite.
            keep = attn_mask | ~any_key[:, None]
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        elif attn_mask.dim() == 2:
            scores = scores + attn_mask[:, None, None, :].to(scores.dtype)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if scores.dtype in _HALF:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:  # no dtype argument: on the CPU, softmax with one is several times slower
        probs = torch.softmax(scores, dim=-1)
    if any_key is not None:
        probs = probs * any_key[:, None, None, None].to(probs.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if head_mask is not None:
        probs = probs * head_mask
    out = torch.matmul(probs, v)
    return out, (probs if return_probs else None)


def conditional_layer_norm(x, weight, bias, gamma, beta, index=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) whose scale is task-conditioned.

    y[b, ..., :] = norm(h[b, ..., :]) * ((1 + gamma[index[b]]) * weight + beta[index[b]]) + bias
    with h = x + residual and norm the plain (biased-variance) normalization.
    """
    h = x if residual is None else x + residual
    cdt = _compute_dtype(x.dtype)
    scale = (1 + _per_example(gamma, index)) * weight + _per_example(beta, index)
    scale = scale.to(cdt).view(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
    normed = F.layer_norm(h.to(cdt), (x.shape[-1],), eps=eps)
    return (normed * scale + bias.to(cdt)).to(x.dtype)


def film_linear(x, gamma, beta, index, weight, bias=None):
    """y = ((1 + gamma[index]) * x + beta[index]) @ weightᵀ + bias."""
    return F.linear(film(x, gamma, beta, index), weight, bias)
