"""FiLM: feature-wise linear modulation by a per-task table.

    out[b, l, :] = (1 + gamma[index[b]]) * x[b, l, :] + beta[index[b]]

x is [B, L, D], or [L, D] shared by every example; gamma and beta are [G, D]
(one row per task, or per example when index is None). Used by the
conditional alignment on the embeddings, and to modulate the block table of
the conditional attention.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from camtl.backends import cuda_ext, register, resolve, torch_ref
from camtl.ops import _checks
from camtl.ops._reduce import per_task_sum


def check_film(op: str, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               index: Optional[torch.Tensor]) -> int:
    """Checks the FiLM arguments; returns the batch size B."""
    _checks.tensor(op, "x", x, (2, 3), "[B, L, D] or [L, D]")
    _checks.tensor(op, "gamma", gamma, (2,), "[G, D]")
    _checks.tensor(op, "beta", beta, (2,), "[G, D]")
    _checks.like(op, "gamma", gamma, x, "x")
    _checks.like(op, "beta", beta, x, "x")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'x' must have D >= 1 features (its last dim), "
                         f"got shape {_checks.shape_str(x.shape)}")
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

    Every backend computes in fp32 for float16 / bfloat16 inputs and rounds
    only the output (an output past the dtype's range rounds to ±inf).
    B = 0 or L = 0 gives an empty result; D = 0 is refused. Double backward
    runs on the torch backend only.
    """
    x, gamma, beta = _checks.autocast_inputs("promote", x, gamma, beta)
    check_film("camtl.ops.film", x, gamma, beta, index)
    _, fn = resolve("film", x.device, _checks.kernel_dtype(x))
    return fn(x, gamma, beta, index)


# ---- the kernel backends (Triton, CUDA), as torch.library ops ---------------------------------------------------

def film_backward(dout: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor,
                  index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FiLM kernel's backward with the per-task sums: dx (x's dtype), dgamma and dbeta [G, D] fp32.

    Also the second half of camtl::film_linear_bwd.
    """
    from camtl.kernels.film import film_backward as launch

    dx, dscale, dshift = launch(dout, x, gamma, index)
    G = gamma.shape[0]
    return dx, per_task_sum(dscale, index, G), per_task_sum(dshift, index, G)


def _cuda_film_backward(dout, x, gamma, index):
    """film_backward on camtl._C: its kernel, then its deterministic per-task sum of both partials in one launch."""
    dx, dscale, dshift = cuda_ext.film_backward(dout, x, gamma, index)
    dgamma, dbeta = cuda_ext.per_task_sums([dscale, dshift], index, gamma.shape[0])
    return dx, dgamma, dbeta


def _kernel_backend(backend: str, op_prefix: str, launch_forward, backward, int64_index: bool):
    """Wires one kernel backend: the ops camtl::{op_prefix}film_fwd / _bwd (fake implementations, autograd,
    double backward refused naming the backend) around launch_forward() (the forward's launch function, looked
    up at the first call: importing it may need the backend) and backward (dx, dgamma, dbeta fp32).
    int64_index: the launches take int64 task ids only (int32 ones are widened first). Returns its film."""

    @torch.library.custom_op(f"camtl::{op_prefix}film_fwd", mutates_args=())
    def fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[B, L, D] with B = len(index); x is [B, L, D] or [L, D]."""
        return launch_forward()(x, gamma, beta, index)

    @fwd.register_fake
    def _(x, gamma, beta, index):
        return x.new_empty((index.shape[0], *x.shape[-2:]))

    @torch.library.custom_op(f"camtl::{op_prefix}film_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor,
            index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx, dgamma, dbeta). A shared x [L, D] gets the sum over the batch."""
        dx, dgamma, dbeta = backward(dout, x, gamma, index)
        return dx, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)

    @bwd.register_fake
    def _(dout, x, gamma, index):
        return x.new_empty(x.shape), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)

    _checks.refuse_double_backward(bwd, "camtl.ops.film", backend)

    def setup_context(ctx, inputs, output):
        x, gamma, beta, index = inputs
        ctx.save_for_backward(x, gamma, index)

    def backward_formula(ctx, dout):
        x, gamma, index = ctx.saved_tensors
        dx, dgamma, dbeta = bwd(dout, x, gamma, index)
        return dx, dgamma, dbeta, None

    fwd.register_autograd(backward_formula, setup_context=setup_context)

    def film(x, gamma, beta, index=None):
        if index is None:
            index = torch.arange(gamma.shape[0], device=x.device)  # check_film: one row per example
        elif int64_index:
            index = index.long()
        return fwd(x, gamma, beta, index)

    film.__doc__ = f"The {backend} backend's film (the ops' signature)."
    film.forward_op, film.backward_op = fwd, bwd
    return film


def _triton_forward():
    from camtl.kernels.film import film_forward

    return film_forward


_triton_film = _kernel_backend("triton", "", _triton_forward, film_backward, int64_index=False)
_cuda_film = _kernel_backend("cuda", "cuda_", lambda: cuda_ext.film_forward, _cuda_film_backward, int64_index=True)
_film_fwd = _triton_film.forward_op  # the Triton ops, by the names the tests use
_film_bwd = _triton_film.backward_op

register("film", "torch", torch_ref.film)
register("film", "triton", _triton_film)
register("film", "cuda", _cuda_film)
