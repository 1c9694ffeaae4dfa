"""FiLM: feature-wise linear modulation by a per-task table.

    out[b, l, :] = (1 + gamma[index[b]]) * x[b, l, :] + beta[index[b]]

x is [B, L, D], or [L, D] shared by every example; gamma and beta are [G, D]
(one row per task, or per example when index is None). Used by the
conditional alignment on the embeddings, and to modulate the block table of
the conditional attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from camtl.backends import register, resolve, torch_ref
from camtl.ops import _checks


def check_film(op: str, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               index: Optional[torch.Tensor]) -> int:
    """Checks the FiLM arguments; returns the batch size B."""
    _checks.tensor(op, "x", x, (2, 3), "[B, L, D] or [L, D]")
    _checks.tensor(op, "gamma", gamma, (2,), "[G, D]")
    _checks.tensor(op, "beta", beta, (2,), "[G, D]")
    _checks.like(op, "gamma", gamma, x, "x")
    _checks.like(op, "beta", beta, x, "x")
    _checks.dim(op, "gamma", gamma, 1, x.shape[-1], "D, the last dim of x")
    if beta.shape != gamma.shape:
        raise ValueError(f"{op}: argument 'beta' must have the shape of 'gamma' {_checks.shape_str(gamma.shape)}, "
                         f"got {_checks.shape_str(beta.shape)}")
    if x.dim() == 3:
        batch = x.shape[0]
    else:
        batch = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else gamma.shape[0]
    _checks.index(op, "index", index, batch, gamma.shape[0], x.device)
    return batch


def film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
         index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1 + gamma[index]) * x + beta[index], broadcast over the rows of each example.

    Args:
        x: [B, L, D], or [L, D] shared by the batch.
        gamma, beta: [G, D] per-task (or per-example) modulation.
        index: [B] int64 rows of gamma/beta for each example; None means arange(B), G == B.
    Returns:
        [B, L, D] in x's dtype.
    """
    check_film("camtl.ops.film", x, gamma, beta, index)
    _, fn = resolve("film", x.device)
    return fn(x, gamma, beta, index)


register("film", "torch", torch_ref.film)
