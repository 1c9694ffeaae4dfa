"""The conditional bottleneck's down-projection with FiLM in its prologue.

    y = ((1 + gamma[index[b]]) * x[b] + beta[index[b]]) @ weightᵀ + bias

x is [B, L, D]; gamma and beta are [G, D]; weight is [N, D] (N = D // 3 in
CA-MTL) and bias [N]. FiLM is a row-wise scale and shift, so a kernel folds it
into the GEMM's prologue (each row's task picks gamma and beta).
"""

from __future__ import annotations

from typing import Optional

import torch

from camtl.backends import register, resolve, torch_ref
from camtl.ops import _checks
from camtl.ops.film import check_film


def film_linear(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, index: Optional[torch.Tensor],
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FiLM then Linear: ((1 + gamma[index]) * x + beta[index]) @ weightᵀ + bias.

    Args:
        x: [B, L, D].
        gamma, beta: [G, D].
        index: [B] int64 rows of gamma/beta; None means arange(B), G == B.
        weight: [N, D]; bias: [N] or None.
    Returns:
        [B, L, N].
    """
    op = "camtl.ops.film_linear"
    _checks.tensor(op, "x", x, (3,), "[B, L, D]")
    check_film(op, x, gamma, beta, index)
    _checks.tensor(op, "weight", weight, (2,), "[N, D]")
    _checks.like(op, "weight", weight, x, "x")
    _checks.dim(op, "weight", weight, 1, x.shape[-1], "D, the last dim of x")
    if bias is not None:
        _checks.tensor(op, "bias", bias, (1,), "[N]")
        _checks.like(op, "bias", bias, x, "x")
        _checks.dim(op, "bias", bias, 0, weight.shape[0], "N, the rows of weight")
    _, fn = resolve("film_linear", x.device)
    return fn(x, gamma, beta, index, weight, bias)


register("film_linear", "torch", torch_ref.film_linear)
