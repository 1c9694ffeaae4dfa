"""FiLM by a per-task table (Triton), forward and backward.

Rows r of the output [B, L, D] are flattened to [M = B·L, D]; row r belongs to
example b = r // L and task t = index[b]. x is [B, L, D], or [L, D] shared by
the batch (then row r reads x[r % L]):

    out[b, l] = (1 + γ[t]) ∘ x[b, l] + β[t]

Backward:

    dx[b, l]  = (1 + γ[t]) ∘ dy[b, l]              (x per example)
    dx[l]     = Σ_b (1 + γ[index[b]]) ∘ dy[b, l]   (x shared: a fixed-order loop over b)
    dγ[g]     = Σ_{b: index[b]=g} Σ_l dy[b, l] ∘ x[b, l],   dβ[g] = Σ_{b: index[b]=g} Σ_l dy[b, l]

The sums over rows are a deterministic two-stage reduction, with no atomics:
each backward program stores fp32 partials of Σ dy∘x and Σ dy over a chunk
of one example's rows ([B, chunks, D]); the caller sums them per task (a
one-hot GEMM). FiLM is elementwise in D, so D is tiled by the grid too. Math
is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, interpreting, rows_per_chunk


@triton.jit
def _fwd_kernel(X, GAMMA, BETA, INDEX, OUT, M, L, D,
                SHARED_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    tile_ok = row_ok[:, None] & (cols < D)[None, :]
    x_rows = rows % L if SHARED_X else rows
    x = tl.load(X + x_rows.to(tl.int64)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    task = tl.load(INDEX + rows // L, mask=row_ok, other=0).to(tl.int64)
    table = task[:, None] * D + cols[None, :]
    g = tl.load(GAMMA + table, mask=tile_ok, other=0.0).to(tl.float32)
    be = tl.load(BETA + table, mask=tile_ok, other=0.0).to(tl.float32)
    out = (1.0 + g) * x + be
    tl.store(OUT + rows.to(tl.int64)[:, None] * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_kernel(DY, X, GAMMA, INDEX, DX, DSCALE, DSHIFT, L, D, chunk_rows,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x per example: dx for one chunk of example b's rows, and the chunk's partial Σ dy∘x and Σ dy."""
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    task = tl.load(INDEX + b).to(tl.int64)
    one_plus_g = 1.0 + tl.load(GAMMA + task * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    dscale = tl.zeros([BLOCK_D], tl.float32)
    dshift = tl.zeros([BLOCK_D], tl.float32)
    first = b * L + chunk * chunk_rows
    end = tl.minimum(first + chunk_rows, b * L + L)
    for r0 in range(first, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        tile_ok = (rows < end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=tile_ok, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, (dy * one_plus_g[None, :]).to(DX.dtype.element_ty), mask=tile_ok)
        dscale += tl.sum(dy * x, 0)
        dshift += tl.sum(dy, 0)
    partial = (b * tl.num_programs(0) + chunk).to(tl.int64) * D + cols
    tl.store(DSCALE + partial, dscale, mask=col_ok)
    tl.store(DSHIFT + partial, dshift, mask=col_ok)


@triton.jit
def _bwd_shared_kernel(DY, X, GAMMA, INDEX, DX, DSCALE, DSHIFT, B, L, D,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x shared by the batch: dx for a tile of x's rows, summed over b; the partials of (b, tile) for every b."""
    tile = tl.program_id(0)
    ls = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    tile_ok = (ls < L)[:, None] & col_ok[None, :]
    x = tl.load(X + ls.to(tl.int64)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    dx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for b in range(B):
        task = tl.load(INDEX + b).to(tl.int64)
        one_plus_g = 1.0 + tl.load(GAMMA + task * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + (b * L + ls).to(tl.int64)[:, None] * D + cols[None, :], mask=tile_ok,
                     other=0.0).to(tl.float32)
        dx += dy * one_plus_g[None, :]
        partial = (b * tl.num_programs(0) + tile).to(tl.int64) * D + cols
        tl.store(DSCALE + partial, tl.sum(dy * x, 0), mask=col_ok)
        tl.store(DSHIFT + partial, tl.sum(dy, 0), mask=col_ok)
    tl.store(DX + ls.to(tl.int64)[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile_ok)


def _config(D: int):
    if interpreting():
        block_d = min(64, triton.next_power_of_2(D))  # small tiles: several column blocks at test shapes
        block_m = 4
    else:
        block_d = min(256, triton.next_power_of_2(D))
        block_m = max(1, 2048 // block_d)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)


# The per-example backward's warps: at 4, ptxas spills a register that the row loop reloads each
# iteration (sm_90a fp16, D 768/1024; scripts/kernel_report.py). At 8 it uses 64 registers, no spill.
_BWD_NUM_WARPS = 8


def film_forward(x, gamma, beta, index):
    """Launches the forward. x is [B, L, D], or [L, D] shared by the B = len(index) examples. Returns [B, L, D]."""
    B = index.shape[0]
    L, D = x.shape[-2], x.shape[-1]
    shared = x.dim() == 2
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    M = B * L
    if M and D:
        cfg = _config(D)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]))
        _fwd_kernel[grid](x.contiguous(), gamma.contiguous(), beta.contiguous(), index.contiguous(), out, M, L, D,
                          SHARED_X=shared, **cfg, **FP_FUSION)
    return out


def film_backward(dy, x, gamma, index):
    """Launches the backward.

    Returns dx (x's shape and dtype) and the fp32 partials dscale, dshift
    [B, chunks, D]: Σ dy∘x and Σ dy over chunks of each example's rows.
    """
    B, L, D = dy.shape
    cfg = _config(D)
    dy = dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    col_blocks = triton.cdiv(D, cfg["BLOCK_D"])
    if x.dim() == 2:
        chunk = cfg["BLOCK_M"]  # one tile of x's rows per program, looping over the batch
    else:
        chunk = rows_per_chunk(L, B * col_blocks, cfg["BLOCK_M"], x.device) if L else cfg["BLOCK_M"]
    chunks = triton.cdiv(L, chunk)
    dscale = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    dshift = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    args = (dy, x.contiguous(), gamma.contiguous(), index.contiguous(), dx, dscale, dshift)
    if x.dim() == 2:
        if B == 0:
            dx.zero_()  # an empty sum
        elif L and D:
            _bwd_shared_kernel[(chunks, col_blocks)](*args, B, L, D, **cfg, **FP_FUSION)
    elif B and L and D:
        _bwd_kernel[(chunks, B, col_blocks)](*args, L, D, chunk, **dict(cfg, num_warps=_BWD_NUM_WARPS), **FP_FUSION)
    return dx, dscale, dshift
