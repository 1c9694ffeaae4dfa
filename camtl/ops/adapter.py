"""The conditional bottleneck's down-projection with FiLM in its prologue.

    y = ((1 + gamma[index[b]]) * x[b] + beta[index[b]]) @ weightᵀ + bias

x is [B, L, D]; gamma and beta are [G, D]; weight is [N, D] (N = D // 3 in
CA-MTL) and bias [N]. FiLM is a row-wise scale and shift, so a kernel folds it
into the GEMM's prologue (each row's task picks gamma and beta).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from camtl.backends import register, resolve, torch_ref
from camtl.ops import _checks
from camtl.ops.film import check_film, film_backward


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

    Every backend computes FiLM in fp32 and rounds its result A to x's dtype
    before the GEMM (as the unfused FiLM would store it); the GEMM accumulates
    in fp32. B = 0 or L = 0 gives an empty result; D = 0 is refused. Double
    backward runs on the torch backend only.
    """
    op = "camtl.ops.film_linear"
    x, gamma, beta, weight, bias = _checks.autocast_inputs("lower", x, gamma, beta, weight, bias)
    _checks.tensor(op, "x", x, (3,), "[B, L, D]")
    check_film(op, x, gamma, beta, index)
    _checks.tensor(op, "weight", weight, (2,), "[N, D]")
    _checks.like(op, "weight", weight, x, "x")
    _checks.dim(op, "weight", weight, 1, x.shape[-1], "D, the last dim of x")
    if bias is not None:
        _checks.tensor(op, "bias", bias, (1,), "[N]")
        _checks.like(op, "bias", bias, x, "x")
        _checks.dim(op, "bias", bias, 0, weight.shape[0], "N, the rows of weight")
    _, fn = resolve("film_linear", x.device, _checks.kernel_dtype(x), dtype=x.dtype)
    return fn(x, gamma, beta, index, weight, bias)


# ---- the fused (Triton) implementation, as torch.library ops ---------------------------------------------------

@torch.library.custom_op("camtl::film_linear_fwd", mutates_args=())
def _film_linear_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, index: torch.Tensor,
                     weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [B, L, N]: one GEMM with FiLM in its prologue."""
    from camtl.kernels.adapter import film_linear_forward

    return film_linear_forward(x, gamma, beta, index, weight, bias)


@_film_linear_fwd.register_fake
def _(x, gamma, beta, index, weight, bias):
    return x.new_empty((*x.shape[:2], weight.shape[0]))


@torch.library.custom_op("camtl::film_linear_bwd", mutates_args=())
def _film_linear_bwd(dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     index: torch.Tensor, weight: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta, dweight, dbias).

    dA = dy W is a library GEMM; the FiLM backward kernel turns it into dx
    and the per-task dγ, dβ. dW = dyᵀ A with A = FiLM(x) recomputed by the
    FiLM kernel (cheaper than keeping A alive from the forward).
    """
    from camtl.kernels.film import film_forward

    B, L, D = x.shape
    dy2 = dy.reshape(B * L, weight.shape[0])
    dx, dgamma, dbeta = film_backward((dy2 @ weight).view(B, L, D), x, gamma, index)
    dweight = dy2.T @ film_forward(x, gamma, beta, index).view(B * L, D)
    dbias = dy2.sum(0, dtype=torch.float32)
    return dx, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype), dweight, dbias.to(weight.dtype)


@_film_linear_bwd.register_fake
def _(dy, x, gamma, beta, index, weight):
    return (x.new_empty(x.shape), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1]))


_checks.refuse_double_backward(_film_linear_bwd, "camtl.ops.film_linear")


def _film_linear_setup_context(ctx, inputs, output):
    x, gamma, beta, index, weight, bias = inputs
    ctx.save_for_backward(x, gamma, beta, index, weight)
    ctx.has_bias = bias is not None


def _film_linear_backward(ctx, dy):
    x, gamma, beta, index, weight = ctx.saved_tensors
    dx, dgamma, dbeta, dweight, dbias = _film_linear_bwd(dy, x, gamma, beta, index, weight)
    return dx, dgamma, dbeta, None, dweight, (dbias if ctx.has_bias else None)


_film_linear_fwd.register_autograd(_film_linear_backward, setup_context=_film_linear_setup_context)


def _triton_film_linear(x, gamma, beta, index, weight, bias=None):
    if index is None:
        index = torch.arange(x.shape[0], device=x.device)
    return _film_linear_fwd(x, gamma, beta, index, weight, bias)


register("film_linear", "torch", torch_ref.film_linear)
register("film_linear", "triton", _triton_film_linear)
