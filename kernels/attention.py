"""Fused conditional flash attention (Triton), forward and backward. Non-causal, the BERT case.

For one example b and head h, with L the batch length, c the block width and
t = index[b] the example's row of the FiLM-modulated block table T [G, L_max, c]:

    S[i, j] = scale · q_i·k_j + M[i, j] + kb[b, j]
    M[i, j] = T[t, i, j - c·(i // c)]  if i // c == j // c, else 0
    P = softmax_j(S),   O = (P ∘ Z / (1 - p)) V

kb is the key bias: 0 / -inf for a key padding mask, or the published
additive (1 - mask)·-10000. Z is the dropout keep mask (Philox, regenerated
in the backward from the same seed). The forward is the online softmax over
key blocks and saves LSE_i = log Σ_j exp S[i, j]. A row with no key left
(every kb = -inf) gives O = 0.

Backward, with Δ_i = Σ_d dO[i, d]·O[i, d]:

    dP = dO Vᵀ ∘ Z / (1 - p),   dS = P ∘ (dP - Δ)
    dQ = scale · dS K,   dK = scale · dSᵀ Q,   dV = (P ∘ Z / (1 - p))ᵀ dO
    dM[b, h, i, j - c·(i // c)] = dS[i, j] on the diagonal blocks

Each (b, h, i, col) of dM is written by exactly one program with a plain
store (deterministic, no atomics); the caller sums over heads and tasks.

Varlen (VARLEN=True, packed sequences): q, k, v are [N, H, d] holding S
sequences end to end, CU_SEQLENS [S+1] their boundaries. Program (tile, s·H + h)
runs sequence s alone: L is its length Ls = cu[s+1] - cu[s], its rows start at
token cu[s], its task row is index[s], there is no key bias, and a tile at or
past Ls returns at once (the grid is sized for the longest sequence). LSE and
Δ are [H, N]; dM is per token, [N, H, c] (token cu[s] + i holds row i of its
sequence's diagonal block). The dropout counter is (i·Ls + j, s·H + h), i and
j counted from the sequence start.

Offsets: the base of each (b, h) slab (b·stride_b or the sequence's first
token · stride_l, h·stride_h, the LSE / Δ / dM rows) is int64, since
B·H·L·d can pass 2^31; offsets inside one slab stay int32: they need L times
the row stride below 2^31 (512 rows of stride under 2^22, BERT's by far).

Under TRITON_INTERPRET=1, bf16 operands are upcast before ``tl.dot`` (the
interpreter's bf16 dot is wrong). HAS_BLOCK_BIAS=False compiles M out (and
dM's stores): plain flash attention, the yardstick of scripts/kernel_report.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_flags, interpreting, require_tf32


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask, UPCAST: tl.constexpr):
    """x[r, c] = ptr[offs_r[r]·stride_r + offs_c[c]·stride_c], 0 where masked; fp32 when UPCAST."""
    x = tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _slab(ptr, b, h, first, stride_b, stride_h, stride_l, VARLEN: tl.constexpr):
    """ptr + the int64 offset of row 0 of example b (padded) or of the sequence's first token (varlen), head h."""
    if VARLEN:
        return ptr + first * stride_l + h.to(tl.int64) * stride_h
    else:
        return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _row_stats(ptr, pid_bh, h, first, L, N_TOKENS, VARLEN: tl.constexpr):
    """Row 0 of a program's fp32 row statistics (LSE, Δ): [B·H, L] padded, [H, N] varlen."""
    if VARLEN:
        return ptr + h.to(tl.int64) * N_TOKENS + first
    else:
        return ptr + pid_bh.to(tl.int64) * L


@triton.jit
def _meets_band(m0, n0, L, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the tile at query row m0, key n0 meets a diagonal block (only those read or write M)."""
    band_lo = (m0 // C) * C
    band_hi = ((tl.minimum(m0 + BLOCK_M, L) - 1) // C) * C + C - 1
    return (n0 <= band_hi) & (n0 + BLOCK_N > band_lo)


@triton.jit
def _band_cols(offs_m, offs_n, L, C):
    """(col, inside): the column of M's block table for each (i, j) of a tile, and whether it is on the band."""
    col = offs_n[None, :] - ((offs_m // C) * C)[:, None]
    inside = (col >= 0) & (col < C) & (offs_m[:, None] < L) & (offs_n[None, :] < L)
    return col, inside


@triton.jit
def _scores(q, kT, offs_m, offs_n, m0, n0, L, C, scale, table_row, stride_tl, stride_tc, key_bias_row,
            HAS_KEY_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
            HAS_BLOCK_BIAS: tl.constexpr):
    """S for the [BLOCK_M, BLOCK_N] tile at query row m0 and key n0, fp32, -inf on keys past L."""
    s = tl.dot(q, kT, input_precision=PRECISION) * scale
    if HAS_BLOCK_BIAS:
        if _meets_band(m0, n0, L, C, BLOCK_M, BLOCK_N):
            col, inside = _band_cols(offs_m, offs_n, L, C)
            s += tl.load(table_row + offs_m[:, None] * stride_tl + col * stride_tc, mask=inside,
                         other=0.0).to(tl.float32)
    if HAS_KEY_BIAS:
        s += tl.load(key_bias_row + offs_n, mask=offs_n < L, other=0.0)[None, :]
    return tl.where(offs_n[None, :] < L, s, float("-inf"))


@triton.jit
def _keep(seed, pid_bh, offs_m, offs_n, L, dropout_p):
    """The dropout keep mask of a tile: Philox on (i·L + j, b·H + h)."""
    c0 = (offs_m[:, None] * L + offs_n[None, :]).to(tl.uint32)
    c1 = tl.zeros_like(c0) + pid_bh.to(tl.uint32)
    zero = tl.zeros_like(c0)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, TABLE, INDEX, KEY_BIAS, CU_SEQLENS,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                stg, stl, stc, skbb,
                H, L, C, D, scale, dropout_p, seed, N_TOKENS,
                HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_BLOCK_BIAS: tl.constexpr = True, VARLEN: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if VARLEN:  # sequence b of the packing: its first token and its length replace the batch length L
        first = tl.load(CU_SEQLENS + b).to(tl.int64)
        L = (tl.load(CU_SEQLENS + b + 1) - first).to(tl.int32)
        if pid_m * BLOCK_M >= L:
            return
    else:
        first = 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    q = _load_tile(_slab(Q, b, h, first, sqb, sqh, sql, VARLEN), offs_m, offs_d, sql, sqd,
                   row_ok[:, None] & d_ok[None, :], UPCAST)
    k_slab = _slab(K, b, h, first, skb, skh, skl, VARLEN)
    v_slab = _slab(V, b, h, first, svb, svh, svl, VARLEN)
    table_row = TABLE + tl.load(INDEX + b).to(tl.int64) * stg
    key_bias_row = KEY_BIAS + b.to(tl.int64) * skbb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kT = _load_tile(k_slab, offs_d, offs_n, skd, skl, d_ok[:, None] & n_ok[None, :], UPCAST)
        v = _load_tile(v_slab, offs_n, offs_d, svl, svd, n_ok[:, None] & d_ok[None, :], UPCAST)
        s = _scores(q, kT, offs_m, offs_n, pid_m * BLOCK_M, n0, L, C, scale, table_row, stl, stc, key_bias_row,
                    HAS_KEY_BIAS, BLOCK_M, BLOCK_N, PRECISION, HAS_BLOCK_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, pid_bh, offs_m, offs_n, L, dropout_p), p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(_slab(O, b, h, first, sob, soh, sol, VARLEN) + offs_m[:, None] * sol + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(_row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN) + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, DQ, DBIAS, TABLE, INDEX, KEY_BIAS, CU_SEQLENS,
                   sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                   stg, stl, stc, skbb, sgb, sgh, sgl, sgd, sob, soh, sol, sod,
                   H, L, C, D, scale, dropout_p, seed, N_TOKENS,
                   HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_BLOCK_BIAS: tl.constexpr = True, VARLEN: tl.constexpr = False):
    """dQ for a block of query rows, and dS on the diagonal blocks into DBIAS ([B, H, L, C]; varlen [N, H, C]).

    Also writes DELTA = rowsum(dO·O) ([B·H, L]; varlen [H, N]) for its rows, which _bwd_dkdv_kernel
    (launched after) reads.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if VARLEN:  # sequence b of the packing: its first token and its length replace the batch length L
        first = tl.load(CU_SEQLENS + b).to(tl.int64)
        L = (tl.load(CU_SEQLENS + b + 1) - first).to(tl.int32)
        if pid_m * BLOCK_M >= L:
            return
    else:
        first = 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    tile_md = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(_slab(Q, b, h, first, sqb, sqh, sql, VARLEN), offs_m, offs_d, sql, sqd, tile_md, UPCAST)
    do = _load_tile(_slab(DO, b, h, first, sdob, sdoh, sdol, VARLEN), offs_m, offs_d, sdol, sdod, tile_md, UPCAST)
    lse = tl.load(_row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN) + offs_m, mask=row_ok, other=float("inf"))
    o = _load_tile(_slab(O, b, h, first, sob, soh, sol, VARLEN), offs_m, offs_d, sol, sod, tile_md, UPCAST)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(_row_stats(DELTA, pid_bh, h, first, L, N_TOKENS, VARLEN) + offs_m, delta, mask=row_ok)
    k_slab = _slab(K, b, h, first, skb, skh, skl, VARLEN)
    v_slab = _slab(V, b, h, first, svb, svh, svl, VARLEN)
    table_row = TABLE + tl.load(INDEX + b).to(tl.int64) * stg
    key_bias_row = KEY_BIAS + b.to(tl.int64) * skbb
    if VARLEN:  # per token: row i of the sequence is token first + i, rows H·C apart
        dbias_rows = DBIAS + (first * H + h) * C + offs_m[:, None] * (H * C)
    else:
        dbias_rows = DBIAS + pid_bh.to(tl.int64) * L * C + offs_m[:, None] * C
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tile_nd = (offs_n < L)[:, None] & d_ok[None, :]
        k = _load_tile(k_slab, offs_n, offs_d, skl, skd, tile_nd, UPCAST)
        v = _load_tile(v_slab, offs_n, offs_d, svl, svd, tile_nd, UPCAST)
        s = _scores(q, tl.trans(k), offs_m, offs_n, pid_m * BLOCK_M, n0, L, C, scale, table_row, stl, stc,
                    key_bias_row, HAS_KEY_BIAS, BLOCK_M, BLOCK_N, PRECISION, HAS_BLOCK_BIAS)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(seed, pid_bh, offs_m, offs_n, L, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_BLOCK_BIAS:
            if _meets_band(pid_m * BLOCK_M, n0, L, C, BLOCK_M, BLOCK_N):
                col, inside = _band_cols(offs_m, offs_n, L, C)
                tl.store(dbias_rows + col, ds, mask=inside)
    tl.store(_slab(DQ, b, h, first, sgb, sgh, sgl, VARLEN) + offs_m[:, None] * sgl + offs_d[None, :] * sgd,
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_md)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TABLE, INDEX, KEY_BIAS, CU_SEQLENS,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                     stg, stl, stc, skbb, sgb, sgh, sgl, sgd,
                     H, L, C, D, scale, dropout_p, seed, N_TOKENS,
                     HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_BLOCK_BIAS: tl.constexpr = True, VARLEN: tl.constexpr = False):
    """dK and dV for a block of keys, looping over every query block (non-causal)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if VARLEN:  # sequence b of the packing: its first token and its length replace the batch length L
        first = tl.load(CU_SEQLENS + b).to(tl.int64)
        L = (tl.load(CU_SEQLENS + b + 1) - first).to(tl.int32)
        if pid_n * BLOCK_N >= L:
            return
    else:
        first = 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_nd = (offs_n < L)[:, None] & d_ok[None, :]
    k = _load_tile(_slab(K, b, h, first, skb, skh, skl, VARLEN), offs_n, offs_d, skl, skd, tile_nd, UPCAST)
    v = _load_tile(_slab(V, b, h, first, svb, svh, svl, VARLEN), offs_n, offs_d, svl, svd, tile_nd, UPCAST)
    q_slab = _slab(Q, b, h, first, sqb, sqh, sql, VARLEN)
    do_slab = _slab(DO, b, h, first, sdob, sdoh, sdol, VARLEN)
    lse_row = _row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN)
    delta_row = _row_stats(DELTA, pid_bh, h, first, L, N_TOKENS, VARLEN)
    table_row = TABLE + tl.load(INDEX + b).to(tl.int64) * stg
    key_bias_row = KEY_BIAS + b.to(tl.int64) * skbb
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, L, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        tile_md = row_ok[:, None] & d_ok[None, :]
        q = _load_tile(q_slab, offs_m, offs_d, sql, sqd, tile_md, UPCAST)
        do = _load_tile(do_slab, offs_m, offs_d, sdol, sdod, tile_md, UPCAST)
        lse = tl.load(lse_row + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
        s = _scores(q, tl.trans(k), offs_m, offs_n, m0, pid_n * BLOCK_N, L, C, scale, table_row, stl, stc,
                    key_bias_row, HAS_KEY_BIAS, BLOCK_M, BLOCK_N, PRECISION, HAS_BLOCK_BIAS)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, pid_bh, offs_m, offs_n, L, dropout_p)
            dv += tl.dot(tl.trans(tl.where(keep, p / (1.0 - dropout_p), 0.0).to(do.dtype)), do,
                         input_precision=PRECISION)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # DK and DV are contiguous and alike: one set of strides (sg*) serves both.
    tile_offs = offs_n[:, None] * sgl + offs_d[None, :] * sgd
    tl.store(_slab(DK, b, h, first, sgb, sgh, sgl, VARLEN) + tile_offs, (dk * scale).to(DK.dtype.element_ty),
             mask=tile_nd)
    tl.store(_slab(DV, b, h, first, sgb, sgh, sgl, VARLEN) + tile_offs, dv.to(DV.dtype.element_ty), mask=tile_nd)


def _config(q: torch.Tensor):
    """Block sizes and dot flags for q's dtype and head dim."""
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        block = 16  # the interpreter is slow: small tiles keep test shapes cheap
    else:
        block = 64 if block_d <= 64 else 32
    upcast, precision = dot_flags(q.dtype)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _varlen_strides(t: torch.Tensor):
    """A packed [N, H, x] tensor's strides in the kernels' (b, h, l, x) order: no batch stride (unused)."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def attention_forward(q, k, v, table, index, key_bias, scale, dropout_p, seed):
    """Launches the forward. Returns (out [B, H, L, d] contiguous, lse [B, H, L] fp32)."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    B, H, L, D = q.shape
    cfg = _config(q)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    has_kb = key_bias is not None
    kb = key_bias if has_kb else lse  # any pointer; never read
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, table, index, kb, index,  # CU_SEQLENS: any pointer, never read
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *_strides(table), key_bias.stride(0) if has_kb else 0,
        H, L, table.shape[2], D, scale, dropout_p, seed, 0,
        HAS_KEY_BIAS=has_kb, DROPOUT=dropout_p > 0.0, **cfg,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, table, index, key_bias, scale, dropout_p, seed):
    """Launches the backward. Returns dq, dk, dv (in q's layout and dtype) and dM [B, L, c] float64 (summed over heads)."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    B, H, L, D = q.shape
    C = table.shape[2]
    cfg = _config(q)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)  # written by the dq kernel
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    dbias = torch.zeros((B, H, L, C), dtype=torch.float32, device=q.device)  # positions off the band stay 0
    if dq.numel() == 0:
        return dq, dk, dv, dbias.new_zeros((B, L, C), dtype=torch.float64)
    has_kb = key_bias is not None
    kb = key_bias if has_kb else lse
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(table),
               key_bias.stride(0) if has_kb else 0, *_strides(dq))
    flags = dict(HAS_KEY_BIAS=has_kb, DROPOUT=dropout_p > 0.0, **cfg)
    # The dq kernel runs first: it writes delta, which the dkdv kernel reads (same stream, so ordered).
    _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, out, lse, delta, dq, dbias, table, index, kb, index, *strides, *_strides(out),
        H, L, C, D, scale, dropout_p, seed, 0, **flags)
    _bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, table, index, kb, index, *strides, H, L, C, D, scale, dropout_p, seed, 0,
        **flags)
    # Summed over heads straight into float64, the precision of the per-task sum that follows: one op, not two.
    return dq, dk, dv, dbias.sum(dim=1, dtype=torch.float64)


def attention_forward_varlen(q, k, v, cu_seqlens, max_seqlen, table, index, scale, dropout_p, seed):
    """Launches the packed forward: q, k, v [N, H, d], cu_seqlens [S+1] (int32 / int64), index [S], max_seqlen
    >= the longest sequence. Returns (out [N, H, d] contiguous, lse [H, N] fp32)."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    N, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    cfg = _config(q)
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _fwd_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), S * H)](
        q, k, v, out, lse, table, index, lse, cu_seqlens,  # KEY_BIAS: any pointer, never read
        *_varlen_strides(q), *_varlen_strides(k), *_varlen_strides(v), *_varlen_strides(out),
        *_strides(table), 0, H, max_seqlen, table.shape[2], D, scale, dropout_p, seed, N,
        HAS_KEY_BIAS=False, DROPOUT=dropout_p > 0.0, VARLEN=True, **cfg,
    )
    return out, lse


def attention_backward_varlen(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, table, index, scale, dropout_p,
                              seed):
    """Launches the packed backward. Returns dq, dk, dv [N, H, d] (contiguous, q's dtype) and dM per token
    [N, c] float64 (summed over heads; token cu[s] + i holds row i of sequence s's diagonal block)."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    N, H, D = q.shape
    S = cu_seqlens.shape[0] - 1
    C = table.shape[2]
    cfg = _config(q)
    delta = torch.empty((H, N), dtype=torch.float32, device=q.device)  # written by the dq kernel
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    # Zeros: a block's columns past the sequence end, and past the last key tile when c > BLOCK_N, are not written.
    dbias = torch.zeros((N, H, C), dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv, dbias.new_zeros((N, C), dtype=torch.float64)
    strides = (*_varlen_strides(q), *_varlen_strides(k), *_varlen_strides(v), *_varlen_strides(dout),
               *_strides(table), 0, *_varlen_strides(dq))
    flags = dict(HAS_KEY_BIAS=False, DROPOUT=dropout_p > 0.0, VARLEN=True, **cfg)
    sizes = (H, max_seqlen, C, D, scale, dropout_p, seed, N)
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), S * H)](
        q, k, v, dout, out, lse, delta, dq, dbias, table, index, lse, cu_seqlens, *strides, *_varlen_strides(out),
        *sizes, **flags)
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_N"]), S * H)](
        q, k, v, dout, lse, delta, dk, dv, table, index, lse, cu_seqlens, *strides, *sizes, **flags)
    return dq, dk, dv, dbias.sum(dim=1, dtype=torch.float64)
