"""Fused conditional flash attention (Triton), forward and backward. Non-causal, the BERT case.

For one example b and head h, with L the batch length, c the block width and
t = index[b] the example's row of the FiLM-modulated block table T [G, L_max, c]:

    S[i, j] = scale · q_i·k_j + M[i, j] + kb[b, j]
    M[i, j] = T[t, i, j - c·(i // c)]  if i // c == j // c, else 0
    P = softmax_j(S),   O = (P ∘ Z / (1 - p)) V

kb is the key bias: 0 / -inf for a key padding mask, or the published
additive (1 - mask)·-10000. Z is the dropout keep mask.

The launches, per forward: ``_dense_bias_kernel`` expands T once into the
dense per-task bias M·log2(e) [G, L, L] fp32 (256 KB per task at L = 128), so
that the attention kernels read bias tiles as dense rows, and only on the key
tiles that meet the diagonal band; with dropout, ``_dropout_mask_kernel``
draws Z once as a bit mask [B·H, L, ⌈L/32⌉ words] (Philox4x32-10 on the
counter (i·L + j, b·H + h), the first output as a uniform, kept when >= p),
which the forward and both backward kernels read; then ``_fwd_kernel``, the
online softmax over key tiles in base 2 (scale·log2(e) is folded into one
multiply, exp2 in the loop), saving LSE_i = log Σ_j exp S[i, j] (natural log).
A row with no key left (every kb = -inf) gives O = 0 and LSE = +inf.

Backward, with Δ_i = Σ_d dO[i, d]·O[i, d]:

    dP = dO Vᵀ ∘ Z / (1 - p),   dS = P ∘ (dP - Δ)
    dQ = scale · dS K,   dK = scale · dSᵀ Q,   dV = (P ∘ Z / (1 - p))ᵀ dO
    dT[g, i, j - c·(i // c)] = Σ_{b: index[b] = g} Σ_h dS[b, h, i, j]   on the diagonal blocks

``_bwd_dq_kernel`` runs a query tile for a group of heads one after the other,
so it sums dS over those heads in its own dense band tiles of DS_SUM
[B, groups, L, L] (no [B, H, L, c] in memory); it also writes Δ for
``_bwd_dkdv_kernel``. ``_bwd_dtable_kernel`` then sums DS_SUM's band over the
head groups and over each task's examples, in a fixed order, into dT
[G, L_max, c]: every sum is deterministic, with no atomics.

Under TRITON_INTERPRET=1, bf16 operands are upcast before ``tl.dot`` (the
interpreter's bf16 dot is wrong). HAS_BLOCK_BIAS=False compiles M out (and
dT's stores): plain flash attention, the yardstick of scripts/kernel_report.py.
Offsets: the per-(b, h) bases are int64; offsets inside one (b, h) slab are
int32 (a slab of 2³¹ elements would be L·d >= 2³¹).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_flags, interpreting, target_programs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask, EVEN: tl.constexpr, UPCAST: tl.constexpr):
    """x[r, c] = ptr[offs_r[r]·stride_r + offs_c[c]·stride_c], 0 where masked (no mask when EVEN); fp32 if UPCAST."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _band(r0, L, C, BLOCK: tl.constexpr):
    """[lo, hi): the keys (or, by symmetry, the queries) that share a diagonal block with rows r0 .. r0 + BLOCK."""
    lo = (r0 // C) * C
    hi = tl.minimum(((tl.minimum(r0 + BLOCK, L) - 1) // C + 1) * C, L)
    return lo, hi


@triton.jit
def _keep_bits(MASK_ROWS, offs_r, n0, L, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WORD: tl.constexpr):
    """The keep mask of a [BLOCK_R, BLOCK_N] tile from the bit mask rows (WORD bits per int32 word), as int32 0/1."""
    words = tl.load(MASK_ROWS + (n0 // WORD) + tl.arange(0, BLOCK_N // WORD)[None, :])
    bits = (words[:, :, None] >> tl.arange(0, WORD)[None, None, :]) & 1
    return tl.reshape(bits, [BLOCK_R, BLOCK_N])


@triton.jit
def _dense_bias_kernel(TABLE, BIAS, stg, stl, stc, L, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BIAS[g, i, j] = log2(e)·T[g, i, j - c·(i // c)] on the diagonal blocks, 0 elsewhere ([G, L, L] fp32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(2).to(tl.int64)
    col = offs_n[None, :] - ((offs_m // C) * C)[:, None]
    in_range = (offs_m[:, None] < L) & (offs_n[None, :] < L)
    inside = (col >= 0) & (col < C) & in_range
    t = tl.load(TABLE + g * stg + offs_m[:, None] * stl + col * stc, mask=inside, other=0.0).to(tl.float32)
    tl.store(BIAS + g * L * L + offs_m[:, None] * L + offs_n[None, :], t * 1.4426950408889634, mask=in_range)


@triton.jit
def _dropout_mask_kernel(MASK, L, W, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
                         WORD: tl.constexpr):
    """MASK[bh, i, w] bit k = keep(i, j = w·WORD + k): uniform(Philox(seed; i·L + j, bh, 0, 0)[0]) >= p, 0 past L."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    offs_w = tl.arange(0, BLOCK_W)
    bit = tl.arange(0, WORD)
    j = offs_w[None, :, None] * WORD + bit[None, None, :]  # [1, BLOCK_W, WORD]
    c0 = (offs_m[:, None, None] * L + j).to(tl.uint32)
    c1 = tl.zeros_like(c0) + pid_bh.to(tl.uint32)
    zero = tl.zeros_like(c0)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    keep = (tl.uint_to_uniform_float(r) >= dropout_p) & (j < L)
    words = tl.sum(keep.to(tl.int32) << bit[None, None, :], axis=2)  # distinct bits: the sum is the bitwise or
    rows_ok = offs_m[:, None] < L
    tl.store(MASK + pid_bh.to(tl.int64) * L * W + offs_m[:, None] * W + offs_w[None, :], words,
             mask=rows_ok & (offs_w[None, :] < W))


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L, qk_scale, bias_rows,
              key_bias_row, mask_rows, skl, skd, svl, svd,
              WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              WORD: tl.constexpr):
    """One key tile of the online softmax, in base 2."""
    offs_n = n0 + offs_n_base
    n_ok = offs_n < L
    kT = _load_tile(k_base, offs_d, offs_n, skd, skl, d_ok[:, None] & n_ok[None, :], EVEN, UPCAST)
    v = _load_tile(v_base, offs_n, offs_d, svl, svd, n_ok[:, None] & d_ok[None, :], EVEN, UPCAST)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if WITH_BIAS:
        if EVEN:
            s += tl.load(bias_rows + offs_n[None, :])
        else:
            s += tl.load(bias_rows + offs_n[None, :], mask=(offs_m[:, None] < L) & n_ok[None, :], other=0.0)
    if HAS_KEY_BIAS:
        s += tl.load(key_bias_row + offs_n, mask=n_ok, other=0.0)[None, :] * 1.4426950408889634
    if not EVEN:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if HAS_KEY_BIAS or not EVEN:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep_bits(mask_rows, offs_m, n0, L, BLOCK_M, BLOCK_N, WORD) != 0, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, BIAS, INDEX, KEY_BIAS, MASK,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, skbb,
                H, L, C, D, W, qk_scale, dropout_p,
                HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                WORD: tl.constexpr, HAS_BLOCK_BIAS: tl.constexpr = True):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd, row_ok[:, None] & d_ok[None, :], EVEN, UPCAST)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_rows = BIAS + tl.load(INDEX + b).to(tl.int64) * L * L + offs_m[:, None] * L
    key_bias_row = KEY_BIAS + b * skbb
    mask_rows = MASK + pid_bh * L * W + offs_m[:, None] * W
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_BLOCK_BIAS:
        # Three loops, so that no tile tests whether it meets the band: before it, on it (bias tiles), after it.
        band_lo, band_hi = _band(m0, L, C, BLOCK_M)
        first = band_lo // BLOCK_N * BLOCK_N
        after = tl.cdiv(band_hi, BLOCK_N) * BLOCK_N
        for n0 in range(0, first, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L,
                                      qk_scale, bias_rows, key_bias_row, mask_rows, skl, skd, svl, svd, False,
                                      HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
        for n0 in range(first, band_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L,
                                      qk_scale, bias_rows, key_bias_row, mask_rows, skl, skd, svl, svd, True,
                                      HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
        for n0 in range(after, L, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L,
                                      qk_scale, bias_rows, key_bias_row, mask_rows, skl, skd, svl, svd, False,
                                      HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
    else:
        for n0 in range(0, L, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L,
                                      qk_scale, bias_rows, key_bias_row, mask_rows, skl, skd, svl, svd, False,
                                      HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if EVEN:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
        tl.store(LSE + pid_bh * L + offs_m, lse)
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + pid_bh * L + offs_m, lse, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L, qk_scale, bias_rows,
             key_bias_row, mask_rows, ds_rows, dropout_scale, skl, skd, svl, svd, first_head, on_band,
             WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             WORD: tl.constexpr):
    """One key tile of dQ; on a band tile, dS is added to the head sum DS_SUM."""
    offs_n = n0 + offs_n_base
    n_ok = offs_n < L
    tile_nd = n_ok[:, None] & d_ok[None, :]
    k = _load_tile(k_base, offs_n, offs_d, skl, skd, tile_nd, EVEN, UPCAST)
    v = _load_tile(v_base, offs_n, offs_d, svl, svd, tile_nd, EVEN, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    tile_ok = (offs_m[:, None] < L) & n_ok[None, :]
    if WITH_BIAS:
        if on_band:
            if EVEN:
                s += tl.load(bias_rows + offs_n[None, :])
            else:
                s += tl.load(bias_rows + offs_n[None, :], mask=tile_ok, other=0.0)
    if HAS_KEY_BIAS:
        s += tl.load(key_bias_row + offs_n, mask=n_ok, other=0.0)[None, :] * 1.4426950408889634
    p = tl.exp2(s - lse2[:, None])  # keys past L: k = 0 and s = 0, but their dS is never used (k = 0, not stored)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        dp = tl.where(_keep_bits(mask_rows, offs_m, n0, L, BLOCK_M, BLOCK_N, WORD) != 0, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if not EVEN:
        ds = tl.where(tile_ok, ds, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if WITH_BIAS:
        if on_band:
            ptrs = ds_rows + offs_n[None, :]
            if first_head:
                tl.store(ptrs, ds, mask=tile_ok)
            else:
                tl.store(ptrs, tl.load(ptrs, mask=tile_ok, other=0.0) + ds, mask=tile_ok)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, DQ, DS_SUM, BIAS, INDEX, KEY_BIAS, MASK,
                   sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                   sob, soh, sol, sod, sgb, sgh, sgl, sgd, skbb,
                   H, L, C, D, W, qk_scale, dropout_p,
                   HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   WORD: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, HAS_BLOCK_BIAS: tl.constexpr = True):
    """dQ for a query tile of HEADS_PER_PROGRAM heads (group program_id(2)), one head after the other.

    Writes DELTA = rowsum(dO·O) [B·H, L] (read by _bwd_dkdv_kernel, launched after) and, on the band tiles, the
    sum of dS over the group's heads into DS_SUM [B, groups, L, L] (this program owns those rows: no atomics).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    tile_md = row_ok[:, None] & d_ok[None, :]
    bias_rows = BIAS + tl.load(INDEX + b).to(tl.int64) * L * L + offs_m[:, None] * L
    key_bias_row = KEY_BIAS + b * skbb
    ds_rows = DS_SUM + (b * tl.num_programs(2) + group) * L * L + offs_m[:, None] * L
    dropout_scale = 1.0 / (1.0 - dropout_p)
    band_lo, band_hi = _band(m0, L, C, BLOCK_M)
    first = band_lo // BLOCK_N * BLOCK_N
    for hh in range(HEADS_PER_PROGRAM):
        h = group * HEADS_PER_PROGRAM + hh
        pid_bh = b * H + h
        q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sql, sqd, tile_md, EVEN, UPCAST)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdol, sdod, tile_md, EVEN, UPCAST)
        o = _load_tile(O + b * sob + h * soh, offs_m, offs_d, sol, sod, tile_md, EVEN, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + pid_bh * L + offs_m, delta, mask=row_ok)
        lse2 = tl.load(LSE + pid_bh * L + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        mask_rows = MASK + pid_bh * L * W + offs_m[:, None] * W
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, L, BLOCK_N):  # one loop, the band decided per tile: three loops spill here
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, n0, offs_m, offs_n_base, offs_d, d_ok, L,
                          qk_scale, bias_rows, key_bias_row, mask_rows, ds_rows, dropout_scale, skl, skd, svl,
                          svd, hh == 0, (n0 >= first) & (n0 < band_hi), HAS_BLOCK_BIAS, HAS_KEY_BIAS, DROPOUT, EVEN,
                          UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
        dq_ptrs = DQ + b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :] * sgd
        dq = (dq * (qk_scale * 0.6931471805599453)).to(DQ.dtype.element_ty)  # scale = qk_scale · ln 2
        if EVEN:
            tl.store(dq_ptrs, dq)
        else:
            tl.store(dq_ptrs, dq, mask=tile_md)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, m0, offs_m_base, offs_n, offs_d, d_ok, L, qk_scale, bias_cols,
               key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_scale, sql, sqd, sdol, sdod, W,
               WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WORD: tl.constexpr):
    """One query tile of dK and dV."""
    offs_m = m0 + offs_m_base
    row_ok = offs_m < L
    tile_md = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(q_base, offs_m, offs_d, sql, sqd, tile_md, EVEN, UPCAST)
    do = _load_tile(do_base, offs_m, offs_d, sdol, sdod, tile_md, EVEN, UPCAST)
    if EVEN:
        lse2 = tl.load(LSE_ROW + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA_ROW + offs_m)
    else:
        lse2 = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if WITH_BIAS:
        if EVEN:
            s += tl.load(bias_cols + offs_m[:, None] * L)
        else:
            s += tl.load(bias_cols + offs_m[:, None] * L, mask=row_ok[:, None] & (offs_n < L)[None, :], other=0.0)
    if HAS_KEY_BIAS:
        s += key_bias[None, :]
    p = tl.exp2(s - lse2[:, None])  # rows past L: lse = +inf, p = 0
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep = _keep_bits(mask_base + offs_m[:, None] * W, offs_m, tl.program_id(0) * BLOCK_N, L, BLOCK_M, BLOCK_N,
                          WORD) != 0
        dv += tl.dot(tl.trans(tl.where(keep, p * dropout_scale, 0.0).to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, INDEX, KEY_BIAS, MASK,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                     sgb, sgh, sgl, sgd, skbb,
                     H, L, C, D, W, qk_scale, dropout_p,
                     HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     WORD: tl.constexpr, HAS_BLOCK_BIAS: tl.constexpr = True):
    """dK and dV for a key tile, looping over every query tile (non-causal)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m_base = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < L
    tile_nd = n_ok[:, None] & d_ok[None, :]
    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skl, skd, tile_nd, EVEN, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svl, svd, tile_nd, EVEN, UPCAST)
    bias_cols = BIAS + tl.load(INDEX + b).to(tl.int64) * L * L + offs_n[None, :]
    key_bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_KEY_BIAS:
        key_bias = tl.load(KEY_BIAS + b * skbb + offs_n, mask=n_ok, other=0.0) * 1.4426950408889634
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    LSE_ROW = LSE + pid_bh * L
    DELTA_ROW = DELTA + pid_bh * L
    mask_base = MASK + pid_bh * L * W
    dropout_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_BLOCK_BIAS:
        band_lo, band_hi = _band(n0, L, C, BLOCK_N)  # the queries whose diagonal block meets these keys
        first = band_lo // BLOCK_M * BLOCK_M
        after = tl.cdiv(band_hi, BLOCK_M) * BLOCK_M
        for m0 in range(0, first, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, m0, offs_m_base, offs_n, offs_d, d_ok, L, qk_scale,
                                bias_cols, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_scale, sql, sqd, sdol,
                                sdod, W, False, HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
        for m0 in range(first, band_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, m0, offs_m_base, offs_n, offs_d, d_ok, L, qk_scale,
                                bias_cols, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_scale, sql, sqd, sdol,
                                sdod, W, True, HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
        for m0 in range(after, L, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, m0, offs_m_base, offs_n, offs_d, d_ok, L, qk_scale,
                                bias_cols, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_scale, sql, sqd, sdol,
                                sdod, W, False, HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
    else:
        for m0 in range(0, L, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, m0, offs_m_base, offs_n, offs_d, d_ok, L, qk_scale,
                                bias_cols, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_scale, sql, sqd, sdol,
                                sdod, W, False, HAS_KEY_BIAS, DROPOUT, EVEN, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD)
    # DK and DV are contiguous and alike: one set of strides (sg*) serves both.
    grad_offs = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :] * sgd
    dk = (dk * (qk_scale * 0.6931471805599453)).to(DK.dtype.element_ty)
    if EVEN:
        tl.store(DK + grad_offs, dk)
        tl.store(DV + grad_offs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(DK + grad_offs, dk, mask=tile_nd)
        tl.store(DV + grad_offs, dv.to(DV.dtype.element_ty), mask=tile_nd)


@triton.jit
def _bwd_dtable_kernel(DS_SUM, INDEX, DTABLE, B, GROUPS, L, C, L_MAX, stg, stl, stc,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """DTABLE[g, i, col] = Σ_{b: index[b] = g} Σ_groups DS_SUM[b, ·, i, c·(i // c) + col], in float64, in the
    order b = 0, 1, ... (deterministic); rows L .. L_max get 0 (no gradient reached them)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    cols = ((offs_m // C) * C)[:, None] + offs_c[None, :]
    inside = (offs_m[:, None] < L) & (offs_c[None, :] < C) & (cols < L)
    total = tl.zeros([BLOCK_M, BLOCK_C], tl.float64)
    example = DS_SUM + offs_m[:, None] * L + cols  # example b's band; pointer steps keep the offsets 64-bit
    for b in range(0, B):
        if tl.load(INDEX + b) == g:
            for group in range(0, GROUPS):
                total += tl.load(example + group * L * L, mask=inside, other=0.0).to(tl.float64)
        example += GROUPS * L * L
    tl.store(DTABLE + g.to(tl.int64) * stg + offs_m[:, None] * stl + offs_c[None, :] * stc,
             total.to(tl.float32).to(DTABLE.dtype.element_ty), mask=(offs_m[:, None] < L_MAX) & (offs_c[None, :] < C))


def _config(q: torch.Tensor):
    """Block sizes, warps and dot flags for q's dtype and head dim."""
    return _config_for(q.shape[-1], q.dtype)


def _config_for(d: int, dtype: torch.dtype):
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        block = 16  # the interpreter is slow: small tiles keep test shapes cheap
    else:
        block = 64  # 64x64 tiles at every head dim: wgmma on sm_90a, no spills (make kernel-report)
    upcast, precision = dot_flags(dtype)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision)


# Warps per pass: the backward kernels hold two [64, d] accumulators and q, dO (or k, v) tiles: with 4 warps
# they spill (make kernel-report), with 8 they do not.
FORWARD_WARPS = 4
BACKWARD_WARPS = 8


def _word(cfg) -> int:
    """Bits per dropout mask word: 32, or the key tile when it is smaller (a tile reads whole words)."""
    return min(32, cfg["BLOCK_N"])


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _even(L: int, D: int, cfg) -> bool:
    return L % cfg["BLOCK_M"] == 0 and L % cfg["BLOCK_N"] == 0 and D == cfg["BLOCK_D"]


def dense_bias(table: torch.Tensor, L: int) -> torch.Tensor:
    """log2(e)·M for every task: [G, L, L] fp32, the diagonal blocks of the table's top-left L×L corner."""
    G, _, C = table.shape
    bias = torch.empty((G, L, L), dtype=torch.float32, device=table.device)
    if bias.numel():
        block = 16 if interpreting() else 64
        _dense_bias_kernel[(triton.cdiv(L, block), triton.cdiv(L, block), G)](
            table, bias, *_strides(table), L, C, BLOCK_M=block, BLOCK_N=block)
    return bias


def dropout_mask_shape(q_shape, dtype: torch.dtype, dropout_p: float) -> tuple:
    """The shape of the forward's dropout bit mask for q of this shape: (0,) without dropout or with no element."""
    B, H, L, D = q_shape
    if dropout_p == 0.0 or B * H * L * D == 0:
        return (0,)
    return (B * H, L, triton.cdiv(L, _word(_config_for(D, dtype))))


def dropout_mask(B: int, H: int, L: int, dropout_p: float, seed: int, word: int, device) -> torch.Tensor:
    """The keep mask as bits: [B·H, L, ⌈L / word⌉] int32 (bit k of word w: key w·word + k)."""
    W = triton.cdiv(L, word)
    mask = torch.empty((B * H, L, W), dtype=torch.int32, device=device)
    if mask.numel():
        block_m = 16
        _dropout_mask_kernel[(triton.cdiv(L, block_m), B * H)](
            mask, L, W, dropout_p, seed, BLOCK_M=block_m, BLOCK_W=triton.next_power_of_2(W), WORD=word)
    return mask


def attention_forward(q, k, v, table, index, key_bias, scale, dropout_p, seed):
    """Launches the forward. Returns (out [B, H, L, d], lse [B, H, L] fp32, bias [G, L, L], the dropout bit mask
    (dropout_mask_shape)): the last two are what the backward reads again."""
    B, H, L, D = q.shape
    cfg = _config(q)
    word = _word(cfg)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    bias = dense_bias(table, L)
    dropout = dropout_p > 0.0
    if dropout and out.numel():
        mask = dropout_mask(B, H, L, dropout_p, seed, word, q.device)
    else:
        mask = torch.empty(dropout_mask_shape(q.shape, q.dtype, dropout_p), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out, lse, bias, mask
    has_kb = key_bias is not None
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, bias, index, key_bias if has_kb else lse, mask if dropout else lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), key_bias.stride(0) if has_kb else 0,
        H, L, table.shape[2], D, triton.cdiv(L, word), scale * LOG2E, dropout_p,
        HAS_KEY_BIAS=has_kb, DROPOUT=dropout, EVEN=_even(L, D, cfg), WORD=word, num_warps=FORWARD_WARPS, **cfg,
    )
    return out, lse, bias, mask


def heads_per_program(B: int, H: int, L: int, block_m: int, device: torch.device) -> int:
    """How many heads one dQ program runs (summing their dS in place): all of them when B·⌈L/block_m⌉ programs
    fill the device, fewer (a divisor of H) when the grid would be too small."""
    tiles = B * triton.cdiv(L, block_m)
    for groups in range(1, H + 1):  # one program per SM is enough: target_programs asks for two
        if H % groups == 0 and tiles * groups >= target_programs(device) // 2:
            return H // groups
    return 1


def attention_backward(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p):
    """Launches the backward. Returns dq, dk, dv (in q's layout and dtype) and dtable [G, L_max, c] (table's dtype)."""
    B, H, L, D = q.shape
    G, L_max, C = table.shape
    cfg = _config(q)
    word = _word(cfg)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    if dq.numel() == 0:
        return dq, dk, dv, torch.zeros_like(table)
    hpp = heads_per_program(B, H, L, cfg["BLOCK_M"], q.device)
    groups = H // hpp
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)  # written by the dq kernel
    ds_sum = torch.empty((B, groups, L, L), dtype=torch.float32, device=q.device)  # only band tiles are written
    has_kb = key_bias is not None
    dropout = dropout_p > 0.0
    kb = key_bias if has_kb else lse
    bits = mask if dropout else lse
    common = (H, L, C, D, triton.cdiv(L, word), scale * LOG2E, dropout_p)
    flags = dict(HAS_KEY_BIAS=has_kb, DROPOUT=dropout, EVEN=_even(L, D, cfg), WORD=word, num_warps=BACKWARD_WARPS,
                 **cfg)
    kb_stride = key_bias.stride(0) if has_kb else 0
    # The dq kernel runs first: it writes delta, which the dkdv kernel reads (same stream, so ordered).
    _bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B, groups)](
        q, k, v, dout, out, lse, delta, dq, ds_sum, bias, index, kb, bits,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(out), *_strides(dq), kb_stride,
        *common, HEADS_PER_PROGRAM=hpp, **flags)
    _bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, bias, index, kb, bits,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), kb_stride,
        *common, **flags)
    dtable = torch.empty_like(table)
    block_m = 16 if interpreting() else 32
    _bwd_dtable_kernel[(triton.cdiv(L_max, block_m), G)](
        ds_sum, index, dtable, B, groups, L, C, L_max, *_strides(dtable),
        BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(C))
    return dq, dk, dv, dtable
