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

from typing import Optional, Tuple

import torch

from camtl.backends import cuda_ext, register, resolve, torch_ref
from camtl.ops import _checks
from camtl.ops._reduce import per_task_sum


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

    Every backend: float16 / bfloat16 inputs get the sum x + residual, the
    statistics and the affine in fp32, and only y is rounded to x's dtype, so
    an fp16 x + residual past 65504 is normalized correctly (the sum is never
    returned, so it never overflows); a y that does not fit the dtype rounds
    to ±inf. Zero rows (B = 0 or an empty middle dim) give an empty y; D = 0
    is refused. Double backward runs on the torch backend only.
    """
    op = "camtl.ops.conditional_layer_norm"
    x, weight, bias, gamma, beta, residual = _checks.autocast_inputs("fp32", x, weight, bias, gamma, beta, residual)
    _checks.tensor(op, "x", x, range(2, 9), "[B, *, D]")
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"{op}: argument 'x' must have D >= 1 features to normalize (its last dim), "
                         f"got shape {_checks.shape_str(x.shape)}")
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
    _, fn = resolve("conditional_layer_norm", x.device, _unsupported_by_kernels(x))
    return fn(x, weight, bias, gamma, beta, index, eps, residual)


_KERNEL_MAX_D = 16384  # a kernel program holds whole rows in registers


def _unsupported_by_kernels(x) -> Optional[str]:
    """Why the fused kernel cannot take these inputs, or None."""
    if x.shape[-1] > _KERNEL_MAX_D:
        return f"the fused kernel takes hidden sizes up to {_KERNEL_MAX_D}, got {x.shape[-1]}"
    return _checks.kernel_dtype(x)


# ---- the kernel backends (Triton, CUDA), as torch.library ops ---------------------------------------------------

def parameter_grads(dscale, dbias, weight, gamma, index, sum_per_task=per_task_sum):
    """(dweight, dbias, dgamma, dbeta) from a kernel backward's fp32 partials dscale, dbias [B, chunks, D], in the
    parameters' dtypes: dbeta sums Σ dy∘x̂ per task (deterministically, by sum_per_task: per_task_sum's
    contract), the others follow from it."""
    dbeta = sum_per_task(dscale, index, gamma.shape[0])  # [G, D]: Σ dy∘x̂ over the rows of each task
    dgamma = dbeta * weight.float()
    dweight = ((1 + gamma.float()) * dbeta).sum(0)
    return (dweight.to(weight.dtype), dbias.sum((0, 1)).to(weight.dtype), dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype))


def _kernel_backend(backend: str, op_prefix: str, launches, sum_per_task=per_task_sum, int64_index: bool = False):
    """Wires one kernel backend: the ops camtl::{op_prefix}conditional_layer_norm_fwd / _bwd (fake implementations,
    autograd, double backward refused) around launches() = (forward, backward), the backend's launch functions
    (looked up at the first call: importing them may need the backend), and sum_per_task, its per-task sum of
    the backward's partials. int64_index: the launches take int64 task ids only (int32 ones are widened first).
    Returns its conditional_layer_norm."""

    @torch.library.custom_op(f"camtl::{op_prefix}conditional_layer_norm_fwd", mutates_args=())
    def fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
            index: torch.Tensor, residual: Optional[torch.Tensor], eps: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, mean, rstd): y like x, mean and rstd [B, *] fp32 (the statistics of x + residual)."""
        return launches()[0](x, weight, bias, gamma, beta, index, residual, eps)

    @fwd.register_fake
    def _(x, weight, bias, gamma, beta, index, residual, eps):
        stats = x.shape[:-1]
        return x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)

    @torch.library.custom_op(f"camtl::{op_prefix}conditional_layer_norm_bwd", mutates_args=())
    def bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
            index: torch.Tensor, residual: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx, dweight, dbias, dgamma, dbeta); dx is also the gradient of the residual."""
        dx, dscale, dbias = launches()[1](dy, x, weight, gamma, beta, index, residual, mean, rstd)
        return (dx, *parameter_grads(dscale, dbias, weight, gamma, index, sum_per_task))

    @bwd.register_fake
    def _(dy, x, weight, gamma, beta, index, residual, mean, rstd):
        return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape),
                gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape))

    _checks.refuse_double_backward(bwd, "camtl.ops.conditional_layer_norm", backend)

    def setup_context(ctx, inputs, output):
        x, weight, bias, gamma, beta, index, residual, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, gamma, beta, index, residual, mean, rstd)

    def backward(ctx, dy, dmean, drstd):
        x, weight, gamma, beta, index, residual, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias, dgamma, dbeta = bwd(dy, x, weight, gamma, beta, index, residual, mean, rstd)
        # y depends on x + residual only: both get dx (as an add's backward does).
        return dx, dweight, dbias, dgamma, dbeta, None, (dx if residual is not None else None), None

    fwd.register_autograd(backward, setup_context=setup_context)

    def conditional_layer_norm(x, weight, bias, gamma, beta, index=None, eps=1e-5, residual=None):
        if index is None:
            index = torch.arange(x.shape[0], device=x.device)
        elif int64_index:
            index = index.long()
        y, _, _ = fwd(x, weight, bias, gamma, beta, index, residual, float(eps))
        return y

    conditional_layer_norm.__doc__ = f"The {backend} backend's conditional_layer_norm (the ops' signature)."
    conditional_layer_norm.forward_op, conditional_layer_norm.backward_op = fwd, bwd
    return conditional_layer_norm


def _triton_launches():
    from camtl.kernels.layer_norm import layer_norm_backward, layer_norm_forward

    return layer_norm_forward, layer_norm_backward


_triton_conditional_layer_norm = _kernel_backend("triton", "", _triton_launches)
_cuda_conditional_layer_norm = _kernel_backend(
    "cuda", "cuda_", lambda: (cuda_ext.layer_norm_forward, cuda_ext.layer_norm_backward), cuda_ext.per_task_sum,
    int64_index=True)
_cln_fwd = _triton_conditional_layer_norm.forward_op  # the Triton ops, by the names the tests use
_cln_bwd = _triton_conditional_layer_norm.backward_op

register("conditional_layer_norm", "torch", torch_ref.conditional_layer_norm)
register("conditional_layer_norm", "triton", _triton_conditional_layer_norm)
register("conditional_layer_norm", "cuda", _cuda_conditional_layer_norm)
