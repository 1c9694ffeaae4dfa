"""Conditional layer norm, with an optional fused residual add.

    h     = x + residual
    scale = (1 + gamma[index[b]]) * weight + beta[index[b]]          # [B, D]
    y     = (h - mean(h)) / sqrt(var(h) + eps) * scale[b] + bias

mean and the biased variance run over the last dim D. Only the scale is
task-conditioned; the bias is shared (as published). gamma and beta are a
per-task table [G, D] and index picks each example's row, so one FiLM per task
serves the whole batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from camtl.backends import register, resolve, torch_ref
from camtl.ops import _checks


def conditional_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           gamma: torch.Tensor, beta: torch.Tensor, index: Optional[torch.Tensor] = None,
                           eps: float = 1e-5, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm(x + residual) with the task-conditioned scale above.

    Args:
        x: [B, *, D]; residual: None or the shape of x.
        weight, bias: [D].
        gamma, beta: [G, D].
        index: [B] int64 rows of gamma/beta; None means arange(B), G == B.
        eps: > 0.
    Returns:
        y, the shape and dtype of x.
    """
    op = "camtl.ops.conditional_layer_norm"
    _checks.tensor(op, "x", x, range(2, 9), "[B, *, D]")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        _checks.tensor(op, name, t, (1,), "[D]")
        _checks.like(op, name, t, x, "x")
        _checks.dim(op, name, t, 0, D, "D, the last dim of x")
    for name, t in (("gamma", gamma), ("beta", beta)):
        _checks.tensor(op, name, t, (2,), "[G, D]")
        _checks.like(op, name, t, x, "x")
        _checks.dim(op, name, t, 1, D, "D, the last dim of x")
    if beta.shape != gamma.shape:
        raise ValueError(f"{op}: argument 'beta' must have the shape of 'gamma' {_checks.shape_str(gamma.shape)}, "
                         f"got {_checks.shape_str(beta.shape)}")
    if residual is not None:
        _checks.tensor(op, "residual", residual, (x.dim(),), _checks.shape_str(x.shape))
        _checks.like(op, "residual", residual, x, "x")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: argument 'residual' must have the shape of x {_checks.shape_str(x.shape)}, "
                             f"got {_checks.shape_str(residual.shape)}")
    if not eps > 0:
        raise ValueError(f"{op}: argument 'eps' must be > 0, got {eps}")
    _checks.index(op, "index", index, x.shape[0], gamma.shape[0], x.device)
    _, fn = resolve("conditional_layer_norm", x.device)
    return fn(x, weight, bias, gamma, beta, index, eps, residual)


register("conditional_layer_norm", "torch", torch_ref.conditional_layer_norm)
