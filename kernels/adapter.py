"""The bottleneck's down-projection with FiLM in the GEMM prologue (Triton), forward.

Rows r of x [B, L, D] are flattened to [M = B·L, D]; row r belongs to example
b = r // L and task t = index[b]. With W [N, D] and bias [N]:

    A[r]    = (1 + γ[t]) ∘ x[r] + β[t]           (FiLM: a row-wise scale and shift)
    y[r, n] = Σ_k A[r, k] · W[n, k] + bias[n]

One GEMM program computes a [BLOCK_M, BLOCK_N] tile of y; FiLM is applied to
each A tile as it is loaded (each row gathers its task's γ, β), so A is never
stored and no sort by task is needed. A is rounded to the input dtype before
the dot, as the unfused FiLM would store it (fp32 math, fp32 accumulation).
float32 inputs multiply on TF32 tensor cores on a GPU, and only where torch
allows TF32 (``_common.dot_flags``, ``require_tf32``); exactly under the interpreter.

The backward (in camtl.ops.adapter) is, with dA = dy W:

    dx = (1 + γ[t]) ∘ dA,   dγ[g] = Σ_{rows of g} dA ∘ x,   dβ[g] = Σ_{rows of g} dA
    dW = dyᵀ A,             dbias = Σ_r dy[r]

i.e. the FiLM backward of dA, plus library GEMMs on A recomputed by the FiLM kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, accumulator_zeros, dot_flags, gpu_capability, has_wgmma, interpreting, require_tf32


@triton.jit
def _fwd_kernel(X, GAMMA, BETA, INDEX, W, BIAS, Y, M, N, D, L,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WGMMA: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows.to(tl.int64)[:, None] * D
    task = tl.load(INDEX + rows // L, mask=row_ok, other=0).to(tl.int64)
    table_rows = task[:, None] * D
    w_cols = W + cols.to(tl.int64)[None, :] * D
    acc = accumulator_zeros(0, BLOCK_M, BLOCK_N, D * 0.0, WGMMA)  # from tl.zeros, the wgmma was serialized at D 768
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a_ok = row_ok[:, None] & k_ok[None, :]
        # The prologue: FiLM on the A tile. Masked columns stay 0 (x, γ and β load 0 there).
        x = tl.load(x_rows + ks[None, :], mask=a_ok, other=0.0).to(tl.float32)
        g = tl.load(GAMMA + table_rows + ks[None, :], mask=a_ok, other=0.0).to(tl.float32)
        be = tl.load(BETA + table_rows + ks[None, :], mask=a_ok, other=0.0).to(tl.float32)
        a = ((1.0 + g) * x + be).to(W.dtype.element_ty)
        w_t = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            a = a.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc += tl.dot(a, w_t, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _config(dtype: torch.dtype, capability=None):
    """Tiles and dot flags for a GPU of this (major, minor) capability, or None under the interpreter. One choice
    of tiles for sm_80 and sm_90a: 0 spills on both (scripts/kernel_report.py); WGMMA on sm_90 (accumulator_zeros).

    The FiLM prologue holds three fp32 [BLOCK_M, BLOCK_K] tiles (x, γ, β) besides the accumulator, so
    128×64 tiles on 4 warps need 255 registers and spill 88-140 B on sm_80; 64×64 ones need 130-146.
    BLOCK_K keeps a K step at 128 bytes per row (64 16-bit or 32 fp32 elements).
    """
    upcast, precision = dot_flags(dtype)
    if interpreting():
        blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)
    else:
        block_k = 32 if dtype == torch.float32 else 64
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=3,
                      WGMMA=has_wgmma(capability))
    return dict(UPCAST=upcast, PRECISION=precision, **blocks)


def film_linear_forward(x, gamma, beta, index, weight, bias):
    """Launches the forward: x [B, L, D], weight [N, D], bias [N] or None. Returns y [B, L, N]."""
    B, L, D = x.shape
    N = weight.shape[0]
    M = B * L
    require_tf32(x.dtype, x.device, "film_linear")
    y = torch.empty((B, L, N), dtype=x.dtype, device=x.device)
    if M and N:
        cfg = _config(x.dtype, gpu_capability(x.device))
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _fwd_kernel[grid](
            x.contiguous(), gamma.contiguous(), beta.contiguous(), index.contiguous(), weight.contiguous(),
            bias.contiguous() if bias is not None else y, y, M, N, D, L,
            HAS_BIAS=bias is not None, **cfg, **FP_FUSION,
        )
    return y
