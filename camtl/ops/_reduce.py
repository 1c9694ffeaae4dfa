"""The second stage of the kernels' deterministic reductions: partial sums per example, summed per task.

This is the torch and triton backends' version (a one-hot GEMM). The cuda backend sums with camtl._C's
``task_sum`` instead (camtl.backends.cuda_ext.per_task_sum: same contract, one fixed-order fp64 sum per
output, no GEMM and no one-hot matrix)."""

from __future__ import annotations

import math

import torch


def per_task_sum(partials: torch.Tensor, index: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """out[g] = Σ_{b: index[b] = g} Σ_p partials[b, p], fp32.

    partials: [B, P, *F] (P partials per example, e.g. one per program), float32 or float64;
    index: [B] task of each example. Returns [num_tasks, *F]; a task absent
    from the batch gets exact zeros. A one-hot GEMM, not index_add_: on the
    GPU index_add_ uses atomics, whose order (and so the rounding) varies run
    to run; a GEMM sums in a fixed order. The GEMM runs in float64 (it is
    small): the sum is the correctly rounded fp32 one, and TF32 or
    bf16-precision fp32 matmuls, when a user allows them, do not touch it.
    """
    B, P = partials.shape[:2]
    features = partials.shape[2:]
    if num_tasks == 0:  # an empty batch with an empty table (one_hot cannot make 0 classes)
        return torch.zeros((0, *features), dtype=torch.float32, device=partials.device)
    # [B, G] one-hot, made in float64 by 2 ops and no host sync (one_hot checks the range on the host off CUDA).
    onehot = torch.zeros((B, num_tasks), dtype=torch.float64, device=partials.device)
    onehot.scatter_(1, index.long()[:, None], 1.0)
    if P != 1:  # P = 0 too: no rows
        onehot = onehot.repeat_interleave(P, dim=0)  # [B·P, G]: row b·P + p is partial p of example b
    total = onehot.T @ partials.reshape(B * P, math.prod(features)).to(torch.float64)
    return total.to(torch.float32).view(num_tasks, *features)
