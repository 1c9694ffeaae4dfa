"""Fused conditional flash attention (Triton), forward and backward. Non-causal, the BERT case.

For one example b and head h, with L the batch length, c the block width and
t = index[b] the example's row of the FiLM-modulated block table T [G, L_max, c]:

    S[i, j] = scale · q_i·k_j + M[i, j] + kb[b, j]
    M[i, j] = T[t, i, j - c·(i // c)]  if i // c == j // c, else 0
    P = softmax_j(S),   O = (P ∘ Z / (1 - p)) V

kb is the key bias: 0 / -inf for a key padding mask, or the published
additive (1 - mask)·-10000. Z is the dropout keep mask. The forward adds kb
on the tensor cores, as one more MMA per key tile (_key_bias_operand_kernel
says how); the backward adds it in fp32.

The launches, per forward: ``_dense_bias_kernel`` expands T once into the
dense per-task bias M·log2(e) and its transpose [2, G, L, L'] fp32 (256 KB per
task and plane at L = 128; rows padded to L' = L rounded up to 16, so bias
loads stay 16-byte vectors at any L), so that the attention kernels read bias
tiles as dense rows, and only on the key tiles that meet the diagonal band (dK/dV
on sm_90 reads the transpose: its score tiles are [keys, queries]); with a key mask,
``_key_bias_operand_kernel`` turns it into kb and the forward's operand; with
dropout, ``_dropout_mask_kernel``
draws Z once as a bit mask [B·H, L, 2·⌈L/64⌉ words] (Philox4x32-10 on the
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
[B, groups, L, L'] (no [B, H, L, c] in memory); it also writes Δ for
``_bwd_dkdv_kernel``. ``_bwd_dtable_kernel`` then sums DS_SUM's band over the
head groups and over each task's examples, in a fixed order, into dT
[G, L_max, c]: every sum is deterministic, with no atomics.

Varlen (VARLEN=True, packed sequences): q, k, v are [N, H, d] holding S
sequences end to end, CU_SEQLENS [S+1] their boundaries. Program (tile, s·H + h)
runs sequence s alone: L is its length Ls = cu[s+1] - cu[s], its rows start at
token cu[s], its task row is index[s], there is no key bias, and a tile at or
past Ls returns at once (the grid is sized for the longest sequence, LB). LSE
and Δ are [H, N]; the dense bias, the dropout mask and DS_SUM are laid out
for LB rows. The dropout counter is (i·Ls + j, s·H + h), i and j counted from
the sequence start.

Bounds: the loops over key tiles (query tiles in dK/dV) run full tiles only,
with no bounds mask; a partial last tile, the tail, runs once before them with
its masks (after them, its live values spilled at d128 on sm_80 / sm_86;
EVEN_N / EVEN_M compile it out when L is a multiple of the tile, as EVEN_D
does the head-dim masks). The full tiles off the diagonal band run in one
loop, the band's (with their bias tiles) in another. A program's own rows past L load zeros, and
its bias and dropout pointers read row L - 1 instead: computed, never stored.
Packed sequences thus pay for masks on one tile per sequence, not on every tile.

Offsets: the base of each (b, h) slab (b·stride_b or the sequence's first
token · stride_l, h·stride_h, the LSE / Δ rows) is int64, since B·H·L·d can
pass 2^31; offsets inside one slab stay int32: they need L times the row
stride below 2^31 (512 rows of stride under 2^22, BERT's by far). A view
whose slab passes it (rows far apart in its buffer) is copied compact first
(int32_slab).

Under TRITON_INTERPRET=1, bf16 operands are upcast before ``tl.dot`` (the
interpreter's bf16 dot is wrong). HAS_BLOCK_BIAS=False compiles M out (and
dT's stores): plain flash attention, the yardstick of scripts/kernel_report.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (FP_FUSION, accumulator_zeros, dot_flags, gpu_capability, has_wgmma, interpreting, require_tf32,
                      target_programs)

LOG2E = tl.constexpr(1.4426950408889634)  # scores run in base 2: exp(x) = exp2(x·log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # and back: LSE = ln 2 · log2-sum-exp2
KB_K = tl.constexpr(16)  # the key bias operand's width: the smallest MMA reduction (k = 16)
KB_ONE = tl.constexpr(16.0)  # its "ones" column: kb enters as 16·(hi + lo), so that hi, lo = kb / (16·scale) fit fp16


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr,
               UPCAST: tl.constexpr):
    """x[r, c] = ptr[offs_r[r]·stride_r + offs_c[c]·stride_c], 0 where r_ok[r] (if MASK_R) or c_ok[c] (if MASK_C)
    is false; fp32 if UPCAST. Each mask is compiled in only where a tile can cross the bound."""
    return _load_at(_tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c), r_ok, c_ok, MASK_R, MASK_C, UPCAST)


@triton.jit
def _tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c):
    """The [R, C] tile of pointers ptr + offs_r[r]·stride_r + offs_c[c]·stride_c."""
    return ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def _load_at(ptrs, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr, UPCAST: tl.constexpr):
    """x = ptrs[r, c] (a tile of pointers), masked as _load_tile. The loops load their streamed tiles from
    loop-invariant pointers plus a scalar step: one address op per chunk, where rows' offsets recomputed each
    chunk's address in three."""
    if MASK_R and MASK_C:
        x = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    elif MASK_R:
        x = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    elif MASK_C:
        x = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _sequence(CU_SEQLENS, b, L, VARLEN: tl.constexpr):
    """(first token, length) of sequence b of a packing (varlen), else (0, the batch length L)."""
    if VARLEN:
        first = tl.load(CU_SEQLENS + b).to(tl.int64)
        return first, (tl.load(CU_SEQLENS + b + 1) - first).to(tl.int32)
    else:
        return 0, L


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
def _band(r0, L, C, BLOCK: tl.constexpr):
    """[lo, hi): the keys (or, by symmetry, the queries) that share a diagonal block with rows r0 .. r0 + BLOCK."""
    lo = (r0 // C) * C
    hi = tl.minimum(((tl.minimum(r0 + BLOCK, L) - 1) // C + 1) * C, L)
    return lo, hi


@triton.jit
def _loops(r0, L, C, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BLOCK_BIAS: tl.constexpr):
    """(band_first, band_hi, after): the tiles of BLOCK_T before the diagonal band of rows r0 .. r0 + BLOCK_R start
    at 0 and end at band_first; the band's tiles end at band_hi; the tiles after it start at after. Without the
    bias: (L, L, L): every tile is "before the band", and the band loop is not compiled."""
    if HAS_BLOCK_BIAS:
        band_lo, band_hi = _band(r0, L, C, BLOCK_R)
        return band_lo // BLOCK_T * BLOCK_T, band_hi, tl.cdiv(band_hi, BLOCK_T) * BLOCK_T
    else:
        return L, L, L


@triton.jit
def _off_band(band_first, band_hi, after, L_full, EVEN: tl.constexpr):
    """(before, band_end, skip, off_end): the full tiles off the band run in one loop, i in [0, off_end): tile i
    below `before` (before the band), tile i + skip from there on (after it); the band's full tiles end at
    band_end. One loop, not two: a copy less of the tile code to compile (a third less compile time for the
    forward), for one select per tile."""
    before = band_first if EVEN else tl.minimum(band_first, L_full)
    band_end = band_hi if EVEN else tl.minimum(band_hi, L_full)
    after_count = tl.maximum(L_full - after, 0)
    return before, band_end, after - before, before + after_count


@triton.jit
def _full(L, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """The end of the full tiles of BLOCK: the loops run [0, L_full) unmasked, and a partial tile at L_full, the
    tail, runs once before them with its bounds masks. EVEN (L a multiple of BLOCK) compiles the tail out."""
    if EVEN:
        return L
    else:
        return L // BLOCK * BLOCK


@triton.jit
def _tail_bias_end(L, L_full, band_hi):
    """Where the tail tile's bias ends: L if the tail (L_full .. L) meets the band, i.e. starts before band_hi;
    else 0 (no bias at all)."""
    return L * (L_full < band_hi).to(tl.int32)


@triton.jit
def _dropped(x, MASK_ROWS, n0, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WORD: tl.constexpr,
             TRANS: tl.constexpr, INLINE_PTX: tl.constexpr):
    """x (fp32) with its dropped scores zeroed: x[r, j] where bit j of the tile's keep mask is set, else 0. The
    mask comes from the bit mask rows MASK_ROWS (WORD bits per int32 word; key j of the tile is bit (n0 + j) % WORD
    of word (n0 + j) // WORD), padded to whole 64-key blocks of words (_mask_words), so a tile's words are always in
    them. TRANS: x is the transposed tile [BLOCK_N, BLOCK_R] (dK/dV's [keys, queries] scores).

    INLINE_PTX (the forward, on NVIDIA GPUs): one LOP3 (word & bit, into a predicate) and one select per score, in
    PTX. Written as tl.where, triton 3.6's LLVM packs half of the forward's predicates into 16-bit masks and
    unpacks them again: its loop was 40-45% longer with dropout (d 64: 488 instructions against 344; triton 3.9:
    +21%). dQ and dK/dV compile to one LOP3 and one select per score from tl.where on both, and the PTX would cost
    them registers (sm_90a dK/dV at d 64: a block per SM). The interpreter runs no PTX."""
    words = tl.load(MASK_ROWS + (n0 // WORD) + tl.arange(0, BLOCK_N // WORD)[None, :])
    if INLINE_PTX:
        tl.static_assert(not TRANS, "the PTX select takes [rows, keys] tiles")
        spread = tl.reshape(tl.broadcast_to(words[:, :, None], [BLOCK_R, BLOCK_N // WORD, WORD]), [BLOCK_R, BLOCK_N])
        bit = tl.broadcast_to((1 << (tl.arange(0, BLOCK_N) % WORD))[None, :], [BLOCK_R, BLOCK_N])
        kept = tl.inline_asm_elementwise(
            "{ .reg .pred keep; .reg .b32 bit_on; and.b32 bit_on, $2, $3; setp.ne.b32 keep, bit_on, 0; "
            "selp.b32 $0, $1, 0, keep; }",
            "=r,r,r,r", [x.to(tl.int32, bitcast=True), spread, bit], dtype=tl.int32, is_pure=True, pack=1)
        return kept.to(tl.float32, bitcast=True)
    else:
        keep = tl.reshape((words[:, :, None] >> tl.arange(0, WORD)[None, None, :]) & 1, [BLOCK_R, BLOCK_N]) != 0
        if TRANS:
            keep = tl.trans(keep)
        return tl.where(keep, x, 0.0)


@triton.jit
def _rows_in(offs, L, EVEN: tl.constexpr):
    """Row indices for the loop's pointers (bias and dropout rows): a row past L reads row L - 1 (computed, never
    stored), so those loads need no mask."""
    if EVEN:
        return offs
    else:
        return tl.minimum(offs, L - 1)


@triton.jit
def _key_bias_operand_kernel(KEY_MASK, OUT, KB32, skb, skl, L, inv_scale, IS_BOOL: tl.constexpr, TF32: tl.constexpr,
                             BLOCK: tl.constexpr):
    """OUT[b, j, :] = (hi, lo, 0, ..., 0) [B, L, KB_K] in OUT's dtype, with hi + lo = x = kb[b, j] / (KB_ONE·scale)
    to 16 bits (bf16), 22 (fp16) or 21 (fp32 as TF32); kb = 0 / -inf for a bool mask (True: keep), else the value.
    KB32 [B, L] = the bias the forward adds, in fp32, for the backward kernels: kb itself where hi + lo is exactly
    x (masks: 0, -inf, -10000; any value in fp32), else KB_ONE·scale·(hi + lo), so that both passes add the same.

    The forward adds kb on the tensor cores: [BLOCK_M, KB_K] "ones" (KB_ONE in columns 0 and 1) times this
    operand's [KB_K, BLOCK_N] tile is KB_ONE·(hi + lo) = kb / scale in every row, which the scale multiply then
    turns into kb·scale·log2(e). One more MMA per key tile instead of one FFMA per score, plus the key bias row's
    shared-memory round trip: the loop with key padding is 13-20% shorter at d <= 64. (dQ's 8-warp tiles hold too
    few scores per thread for it to pay, so the backward adds KB32 as before.) fp16 clamps a finite x to its
    finite range: a larger finite kb stays a huge finite bias, not -inf.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    ok = offs < L
    raw = tl.load(KEY_MASK + b * skb + offs * skl, mask=ok, other=0)
    if IS_BOOL:
        kb = tl.where(raw != 0, 0.0, float("-inf"))
    else:
        kb = raw.to(tl.float32)
    x = kb * inv_scale
    exact = x
    if TF32:  # round hi to TF32 (10 mantissa bits, nearest) so that the MMA takes it exactly; inf stays inf
        hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    else:
        if OUT.dtype.element_ty == tl.float16:  # finite values only: -inf (a masked key) stays -inf
            x = tl.where(tl.abs(x) < float("inf"), tl.minimum(tl.maximum(x, -65504.0), 65504.0), x)
        hi = x.to(OUT.dtype.element_ty).to(tl.float32)
    finite = tl.abs(hi) < float("inf")
    lo = tl.where(finite, x - tl.where(finite, hi, 0.0), 0.0)  # -inf: hi carries it, lo = 0 (not inf - inf)
    lo = lo.to(OUT.dtype.element_ty).to(tl.float32)  # as the MMA reads it
    tl.store(KB32 + b * L + offs, tl.where(hi + lo == exact, kb, (hi + lo) / inv_scale), mask=ok)
    col = tl.arange(0, KB_K)
    tile = tl.where(col[None, :] == 0, hi[:, None], tl.where(col[None, :] == 1, lo[:, None], 0.0))
    tl.store(OUT + b * L * KB_K + offs[:, None] * KB_K + col[None, :], tile.to(OUT.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _plus_key_bias(s, kb_t, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """s + KB_ONE·(hi + lo) in each column j, kb_t [KB_K, N] the operand's tile (transposed), on the tensor cores."""
    col = tl.arange(0, KB_K)
    ones = tl.zeros([BLOCK_M, KB_K], tl.float32) + tl.where(col < 2, KB_ONE, 0.0)[None, :]
    return tl.dot(ones.to(kb_t.dtype), kb_t, acc=s, input_precision=PRECISION)


@triton.jit
def _dense_bias_kernel(TABLE, BIAS, stg, stl, stc, G, L, LS, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BIAS[0, g, i, j] = log2(e)·T[g, i, j - c·(i // c)] on the diagonal blocks, 0 elsewhere, and its transpose
    BIAS[1, g, j, i] = BIAS[0, g, i, j] for dK/dV's [keys, queries] tiles ([2, G, L, LS] fp32; 0 in the padding
    columns from L on too, so that the op's output is deterministic). The grid's rows cover LS (L rounded up to 16)
    in both planes: its tiles are 16 or 64 rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(2).to(tl.int64)
    col = offs_n[None, :] - ((offs_m // C) * C)[:, None]
    inside = (col >= 0) & (col < C) & (offs_m[:, None] < L) & (offs_n[None, :] < L)
    t = tl.load(TABLE + g * stg + offs_m[:, None] * stl + col * stc, mask=inside, other=0.0).to(tl.float32) * LOG2E
    tl.store(BIAS + g * L * LS + offs_m[:, None] * LS + offs_n[None, :], t,
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < LS))
    tl.store(BIAS + (G + g) * L * LS + offs_n[None, :] * LS + offs_m[:, None], t,
             mask=(offs_n[None, :] < L) & (offs_m[:, None] < LS))


@triton.jit
def _dropout_mask_kernel(MASK, CU_SEQLENS, H, L, LB, W, dropout_p, seed, BLOCK_M: tl.constexpr,
                         BLOCK_W: tl.constexpr, WORD: tl.constexpr, VARLEN: tl.constexpr = False):
    """MASK[bh, i, w] bit k = keep(i, j = w·WORD + k): uniform(Philox(seed; i·L + j, bh, 0, 0)[0]) >= p, 0 past L.

    MASK is [B·H, LB, W]; varlen, bh = s·H + h and L = Ls, sequence s's length (rows past Ls are not written).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    _, L = _sequence(CU_SEQLENS, pid_bh // H, L, VARLEN)
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
    tl.store(MASK + pid_bh.to(tl.int64) * LB * W + offs_m[:, None] * W + offs_w[None, :], words,
             mask=rows_ok & (offs_w[None, :] < W))


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kT_tile, v_tile, n0, offs_n_base, d_ok, L, qk_scale,
              bias_tile, key_bias_row, mask_rows, bias_hi, skl, svl,
              WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, TAIL: tl.constexpr,
              EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, WORD: tl.constexpr, INLINE_PTX: tl.constexpr):
    """One key tile of the online softmax, in base 2. A full tile (keys n0 .. n0 + BLOCK_N all < L) has no bounds
    mask; the tail (TAIL) masks its keys past L, and its bias past bias_hi (L on the band, else 0)."""
    offs_n = n0 + offs_n_base
    n_ok = offs_n < L
    kT = _load_at(kT_tile + n0 * skl, d_ok, n_ok, not EVEN_D, TAIL, UPCAST)
    v = _load_at(v_tile + n0 * svl, n_ok, d_ok, TAIL, not EVEN_D, UPCAST)
    s = tl.dot(q, kT, input_precision=PRECISION)
    if HAS_KEY_BIAS:  # key_bias_row: the operand's rows, key n at + n·KB_K
        kb_t = _load_tile(key_bias_row, tl.arange(0, KB_K), offs_n, 1, KB_K, n_ok, n_ok, False, TAIL, UPCAST)
        s = _plus_key_bias(s, kb_t, BLOCK_M, PRECISION)
    s = s * qk_scale
    if WITH_BIAS:  # bias_tile: the tile at key 0; rows past L point at row L - 1 (finite, never stored)
        if TAIL:
            s += tl.load(bias_tile + n0, mask=(offs_n < bias_hi)[None, :], other=0.0)
        else:
            s += tl.load(bias_tile + n0)
    if TAIL:
        s = tl.where(n_ok[None, :], s, float("-inf"))  # key n0 < L is in: every row keeps a finite max
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts at -FLT_MAX, so a row of -inf keys gives p = 0
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = _dropped(p, mask_rows, n0, BLOCK_M, BLOCK_N, WORD, False, INLINE_PTX)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, BIAS, INDEX, KEY_BIAS, MASK, CU_SEQLENS,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, skbb,
                H, L, LB, LS, C, D, W, N_TOKENS, qk_scale, dropout_p,
                HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORD: tl.constexpr, INLINE_PTX: tl.constexpr,
                HAS_BLOCK_BIAS: tl.constexpr = True, VARLEN: tl.constexpr = False, WGMMA: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    first, L = _sequence(CU_SEQLENS, b, L, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # the grid is sized for the longest sequence
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    rows = _rows_in(offs_m, L, EVEN_M)
    q = _load_tile(_slab(Q, b, h, first, sqb, sqh, sql, VARLEN), offs_m, offs_d, sql, sqd, row_ok, d_ok, not EVEN_M,
                   not EVEN_D, UPCAST)
    # The K, V and bias tiles at key 0 as loop-invariant pointers, advanced by a scalar per key tile: one add per
    # loaded chunk (from rows' pointers and the tile's offsets, ptxas recomputed each chunk's address: 18
    # instructions more for the bias, 16 for K and V at d 64).
    kT_tile = _tile_ptrs(_slab(K, b, h, first, skb, skh, skl, VARLEN), offs_d, offs_n_base, skd, skl)
    v_tile = _tile_ptrs(_slab(V, b, h, first, svb, svh, svl, VARLEN), offs_n_base, offs_d, svl, svd)
    bias_tile = BIAS + tl.load(INDEX + b).to(tl.int64) * LB * LS + (rows[:, None] * LS + offs_n_base[None, :])
    key_bias_row = KEY_BIAS + b.to(tl.int64) * skbb
    mask_rows = MASK + pid_bh.to(tl.int64) * LB * W + rows[:, None] * W
    # -FLT_MAX, not -inf: the running max stays finite, so exp2(s - m) needs no guard when a row's keys are all
    # masked (-inf) so far; alpha = exp2(-FLT_MAX - m) = 0 on the first key, as exp2(-inf) would be.
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    opaque_zero = dropout_p * 0.0  # see accumulator_zeros
    acc = accumulator_zeros(0, BLOCK_M, BLOCK_D, opaque_zero, WGMMA)
    L_full = _full(L, BLOCK_N, EVEN_N)
    band_first, band_hi, after = _loops(m0, L, C, BLOCK_M, BLOCK_N, HAS_BLOCK_BIAS)
    if not EVEN_N:
        if L_full < L:
            bias_hi = _tail_bias_end(L, L_full, band_hi)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kT_tile, v_tile, L_full, offs_n_base, d_ok, L, qk_scale,
                                      bias_tile, key_bias_row, mask_rows, bias_hi, skl, svl,
                                      HAS_BLOCK_BIAS, HAS_KEY_BIAS, DROPOUT, True, EVEN_D, UPCAST,
                                      PRECISION, BLOCK_M, BLOCK_N, WORD, INLINE_PTX)
    # The full tiles off the band (before it, then after it) in one loop, then the band's tiles with their bias.
    before, band_end, skip, off_end = _off_band(band_first, band_hi, after, L_full, EVEN_N)
    for i in range(0, off_end, BLOCK_N):
        n0 = i + skip * (i >= before).to(tl.int32)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kT_tile, v_tile, n0, offs_n_base, d_ok, L, qk_scale,
                                  bias_tile, key_bias_row, mask_rows, L, skl, svl,
                                  False, HAS_KEY_BIAS, DROPOUT, False, EVEN_D, UPCAST, PRECISION, BLOCK_M,
                                  BLOCK_N, WORD, INLINE_PTX)
    if HAS_BLOCK_BIAS:
        for n0 in range(band_first, band_end, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kT_tile, v_tile, n0, offs_n_base, d_ok, L, qk_scale,
                                      bias_tile, key_bias_row, mask_rows, L, skl, svl,
                                      True, HAS_KEY_BIAS, DROPOUT, False, EVEN_D, UPCAST, PRECISION, BLOCK_M,
                                      BLOCK_N, WORD, INLINE_PTX)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = _tile_ptrs(_slab(O, b, h, first, sob, soh, sol, VARLEN), offs_m, offs_d, sol, sod)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    lse_row = _row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN)
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if EVEN_M:
        tl.store(lse_row + offs_m, lse)
    else:
        tl.store(lse_row + offs_m, lse, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_tile, v_tile, n0, offs_n_base, row_ok, d_ok, L, qk_scale, bias_tile,
             key_bias_tile, mask_rows, ds_tile, skl, svl, first_head, on_band,
             WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, TAIL: tl.constexpr,
             EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORD: tl.constexpr, INLINE_PTX: tl.constexpr):
    """One key tile of dQ; on a band tile, dS is added to the head sum DS_SUM. With dropout, dQ and dS come out
    divided by the dropout scale 1 / (1 - p) (delta is Δ·(1 - p)): the callers multiply it back once. Only the
    tail (TAIL) masks keys past L."""
    offs_n = n0 + offs_n_base
    n_ok = offs_n < L
    k = _load_at(k_tile + n0 * skl, n_ok, d_ok, TAIL, not EVEN_D, UPCAST)
    v = _load_at(v_tile + n0 * svl, n_ok, d_ok, TAIL, not EVEN_D, UPCAST)
    # s - lse2 first: one FFMA with the scale, whatever is added after (the band's bias, the key bias)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]
    if WITH_BIAS:
        if on_band:
            if TAIL:
                s += tl.load(bias_tile + n0, mask=n_ok[None, :], other=0.0)
            else:
                s += tl.load(bias_tile + n0)
    if HAS_KEY_BIAS:
        if TAIL:
            s += tl.load(key_bias_tile + n0, mask=n_ok, other=0.0)[None, :] * LOG2E
        else:
            s += tl.load(key_bias_tile + n0)[None, :] * LOG2E
    # Rows past L: lse2 = +inf, so p = 0 and dS = 0. Keys past L: k = 0 and s is finite, so their dS adds nothing
    # to dQ, and it is not stored.
    p = tl.exp2(s)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:  # dS·(1 - p) = P ∘ (dP ∘ Z - Δ·(1 - p)): 1 / (1 - p) is applied once, to dQ and in dtable
        dp = _dropped(dp, mask_rows, n0, BLOCK_M, BLOCK_N, WORD, False, INLINE_PTX)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if WITH_BIAS:
        if on_band:
            ptrs = ds_tile + n0
            if EVEN_M and not TAIL:
                if first_head:
                    tl.store(ptrs, ds)
                else:
                    tl.store(ptrs, tl.load(ptrs) + ds)
            else:
                if TAIL:
                    store_ok = row_ok[:, None] & n_ok[None, :]
                else:
                    store_ok = row_ok[:, None]  # rows past L are not ours to write
                if first_head:
                    tl.store(ptrs, ds, mask=store_ok)
                else:
                    tl.store(ptrs, tl.load(ptrs, mask=store_ok, other=0.0) + ds, mask=store_ok)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, DQ, DS_SUM, BIAS, INDEX, KEY_BIAS, MASK, CU_SEQLENS,
                   sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                   sob, soh, sol, sod, sgb, sgh, sgl, sgd, skbb,
                   H, L, LB, LS, C, D, W, N_TOKENS, qk_scale, dropout_p,
                   HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                   EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORD: tl.constexpr, INLINE_PTX: tl.constexpr,
                   HEADS_PER_PROGRAM: tl.constexpr, HAS_BLOCK_BIAS: tl.constexpr = True,
                   VARLEN: tl.constexpr = False, WGMMA: tl.constexpr = False):
    """dQ for a query tile of HEADS_PER_PROGRAM heads (group program_id(2)), one head after the other.

    Writes DELTA = rowsum(dO·O) [B·H, L] (read by _bwd_dkdv_kernel, launched after) and, on the band tiles, the
    sum of dS over the group's heads into DS_SUM [B, groups, L, L'] (this program owns those rows: no atomics).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    group = tl.program_id(2)
    first, L = _sequence(CU_SEQLENS, b, L, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    rows = _rows_in(offs_m, L, EVEN_M)
    # Tiles at key 0 as loop-invariant pointers, advanced by n0 (see _fwd_kernel).
    bias_tile = BIAS + tl.load(INDEX + b).to(tl.int64) * LB * LS + (rows[:, None] * LS + offs_n_base[None, :])
    key_bias_tile = KEY_BIAS + b.to(tl.int64) * skbb + offs_n_base  # advanced by n0 too: triton 3.6: 2-24 shorter
    ds_tile = (DS_SUM + (b.to(tl.int64) * tl.num_programs(2) + group) * LB * LS
               + (offs_m[:, None] * LS + offs_n_base[None, :]))
    dropout_scale = 1.0 / (1.0 - dropout_p)
    opaque_zero = dropout_p * 0.0  # see accumulator_zeros
    band_lo, band_hi = _band(m0, L, C, BLOCK_M)
    band_first = band_lo // BLOCK_N * BLOCK_N
    L_full = _full(L, BLOCK_N, EVEN_N)
    for hh in range(HEADS_PER_PROGRAM):
        h = group * HEADS_PER_PROGRAM + hh
        pid_bh = b * H + h
        q = _load_tile(_slab(Q, b, h, first, sqb, sqh, sql, VARLEN), offs_m, offs_d, sql, sqd, row_ok, d_ok,
                       not EVEN_M, not EVEN_D, UPCAST)
        do = _load_tile(_slab(DO, b, h, first, sdob, sdoh, sdol, VARLEN), offs_m, offs_d, sdol, sdod, row_ok, d_ok,
                        not EVEN_M, not EVEN_D, UPCAST)
        o = _load_tile(_slab(O, b, h, first, sob, soh, sol, VARLEN), offs_m, offs_d, sol, sod, row_ok, d_ok,
                       not EVEN_M, not EVEN_D, UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(_row_stats(DELTA, pid_bh, h, first, L, N_TOKENS, VARLEN) + offs_m, delta, mask=row_ok)
        if DROPOUT:
            delta = delta * (1.0 - dropout_p)
        lse2 = tl.load(_row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN) + offs_m, mask=row_ok,
                       other=float("inf")) * LOG2E
        k_tile = _tile_ptrs(_slab(K, b, h, first, skb, skh, skl, VARLEN), offs_n_base, offs_d, skl, skd)
        v_tile = _tile_ptrs(_slab(V, b, h, first, svb, svh, svl, VARLEN), offs_n_base, offs_d, svl, svd)
        mask_rows = MASK + pid_bh.to(tl.int64) * LB * W + rows[:, None] * W
        dq = accumulator_zeros(0, BLOCK_M, BLOCK_D, opaque_zero, WGMMA)
        if not EVEN_N:
            if L_full < L:
                dq = _dq_tile(dq, q, do, lse2, delta, k_tile, v_tile, L_full, offs_n_base, row_ok, d_ok, L,
                              qk_scale, bias_tile, key_bias_tile, mask_rows, ds_tile, skl, svl, hh == 0,
                              (L_full >= band_first) & (L_full < band_hi), HAS_BLOCK_BIAS, HAS_KEY_BIAS, DROPOUT,
                              True, EVEN_M, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD, INLINE_PTX)
        for n0 in range(0, L_full, BLOCK_N):  # one loop, the band decided per tile: three loops spill here
            dq = _dq_tile(dq, q, do, lse2, delta, k_tile, v_tile, n0, offs_n_base, row_ok, d_ok, L,
                          qk_scale, bias_tile, key_bias_tile, mask_rows, ds_tile, skl, svl, hh == 0,
                          (n0 >= band_first) & (n0 < band_hi), HAS_BLOCK_BIAS, HAS_KEY_BIAS, DROPOUT, False, EVEN_M,
                          EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD, INLINE_PTX)
        dq_ptrs = _tile_ptrs(_slab(DQ, b, h, first, sgb, sgh, sgl, VARLEN), offs_m, offs_d, sgl, sgd)
        dq = (dq * (qk_scale * LN2 * dropout_scale)).to(DQ.dtype.element_ty)  # scale = qk_scale · ln 2
        if EVEN_M and EVEN_D:
            tl.store(dq_ptrs, dq)
        else:
            tl.store(dq_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _query_axis(x, KEYS_MAJOR: tl.constexpr):
    """A per-query vector broadcast over a dK/dV score tile: along its columns keys-major ([keys, queries]), else
    along its rows ([queries, keys])."""
    if KEYS_MAJOR:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _key_axis(x, KEYS_MAJOR: tl.constexpr):
    """A per-key vector broadcast over a dK/dV score tile (see _query_axis)."""
    if KEYS_MAJOR:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _over_queries(x, y, KEYS_MAJOR: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_i x[i, j]·y[i, :] for a score tile x and a [queries, d] tile y: the [keys, d] update of dK or dV."""
    if KEYS_MAJOR:
        return tl.dot(x, y, input_precision=PRECISION)
    else:
        return tl.dot(tl.trans(x), y, input_precision=PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_tile, do_tile, m0, offs_m_base, n0, d_ok, L, query_step, qk_scale,
               bias_cols, bias_tile, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_p, bias_hi, sql, sdol, W,
               WITH_BIAS: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, TAIL: tl.constexpr,
               EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, WORD: tl.constexpr, KEYS_MAJOR: tl.constexpr, INLINE_PTX: tl.constexpr):
    """One query tile of dK and dV. A full tile (queries m0 .. m0 + BLOCK_M all < L) has no bounds mask; the tail
    (TAIL) masks its queries past L (lse = +inf there, so p = 0), and its bias past bias_hi (L on the band, else 0).

    KEYS_MAJOR: the scores run transposed, Sᵀ = K·Qᵀ [BLOCK_N keys, BLOCK_M queries], so that every MMA of the
    tile (Sᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q) has the program's BLOCK_N keys as its rows: all four run
    on wgmma (64 rows or more), where [queries, keys] tiles put S and dP on mma.sync at BLOCK_M = 32. The bias
    then comes from the transposed plane Mᵀ (query_step 1), so that its tile loads stay vectors."""
    offs_m = m0 + offs_m_base
    row_ok = offs_m < L
    q = _load_at(q_tile + m0 * sql, row_ok, d_ok, TAIL, not EVEN_D, UPCAST)
    do = _load_at(do_tile + m0 * sdol, row_ok, d_ok, TAIL, not EVEN_D, UPCAST)
    if TAIL:
        lse2 = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
        rows = tl.minimum(offs_m, L - 1)  # bias and dropout rows past L: row L - 1 (p = 0 there)
    else:
        lse2 = tl.load(LSE_ROW + offs_m) * LOG2E
        delta = tl.load(DELTA_ROW + offs_m)
        rows = offs_m
    if KEYS_MAJOR:
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if WITH_BIAS:  # bias_cols: keys past L point at key L - 1 (their dK, dV rows are not stored)
        if TAIL:
            s += tl.load(bias_cols + _query_axis(rows, KEYS_MAJOR) * query_step,
                         mask=_query_axis(offs_m < bias_hi, KEYS_MAJOR), other=0.0)
        else:
            s += tl.load(bias_tile + m0 * query_step)
    if HAS_KEY_BIAS:
        s += _key_axis(key_bias, KEYS_MAJOR)
    p = tl.exp2(s - _query_axis(lse2, KEYS_MAJOR))
    if KEYS_MAJOR:
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:  # dV and dK are scaled by 1 / (1 - p) once, after the loop (delta is Δ·(1 - p))
        p_kept = _dropped(p, mask_base + rows[:, None] * W, n0, BLOCK_M, BLOCK_N, WORD, KEYS_MAJOR,
                          INLINE_PTX)
        dv += _over_queries(p_kept.to(do.dtype), do, KEYS_MAJOR, PRECISION)
        ds = p_kept * dp - p * _query_axis(delta * (1.0 - dropout_p), KEYS_MAJOR)
    else:
        dv += _over_queries(p.to(do.dtype), do, KEYS_MAJOR, PRECISION)
        ds = p * (dp - _query_axis(delta, KEYS_MAJOR))
    dk += _over_queries(ds.to(q.dtype), q, KEYS_MAJOR, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, INDEX, KEY_BIAS, MASK, CU_SEQLENS,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
                     sgb, sgh, sgl, sgd, skbb,
                     H, L, LB, LS, C, D, W, N_TOKENS, qk_scale, dropout_p,
                     HAS_KEY_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                     EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORD: tl.constexpr, INLINE_PTX: tl.constexpr,
                     HAS_BLOCK_BIAS: tl.constexpr = True, VARLEN: tl.constexpr = False, WGMMA: tl.constexpr = False,
                     KEYS_MAJOR: tl.constexpr = False):
    """dK and dV for a key tile (EVEN_N: L a multiple of BLOCK_N), looping over every query tile (EVEN_M: of
    BLOCK_M), non-causal; the scores as [keys, queries] tiles if KEYS_MAJOR (see _dkdv_tile)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    first, L = _sequence(CU_SEQLENS, b, L, VARLEN)
    n0 = pid_n * BLOCK_N
    if VARLEN:
        if n0 >= L:
            return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m_base = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < L
    k = _load_tile(_slab(K, b, h, first, skb, skh, skl, VARLEN), offs_n, offs_d, skl, skd, n_ok, d_ok, not EVEN_N,
                   not EVEN_D, UPCAST)
    v = _load_tile(_slab(V, b, h, first, svb, svh, svl, VARLEN), offs_n, offs_d, svl, svd, n_ok, d_ok, not EVEN_N,
                   not EVEN_D, UPCAST)
    if KEYS_MAJOR:  # BIAS is the transposed plane Mᵀ: a key's row holds its queries, so tile loads stay vectors
        key_step, query_step = LS, 1
    else:
        key_step, query_step = 1, LS
    keys = _key_axis(_rows_in(offs_n, L, EVEN_N), KEYS_MAJOR) * key_step
    bias_cols = BIAS + tl.load(INDEX + b).to(tl.int64) * LB * LS + keys
    bias_tile = bias_cols + _query_axis(offs_m_base, KEYS_MAJOR) * query_step  # full tiles: + m0·query_step
    key_bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_KEY_BIAS:
        key_bias = tl.load(KEY_BIAS + b.to(tl.int64) * skbb + offs_n, mask=n_ok, other=0.0) * LOG2E
    q_tile = _tile_ptrs(_slab(Q, b, h, first, sqb, sqh, sql, VARLEN), offs_m_base, offs_d, sql, sqd)
    do_tile = _tile_ptrs(_slab(DO, b, h, first, sdob, sdoh, sdol, VARLEN), offs_m_base, offs_d, sdol, sdod)
    LSE_ROW = _row_stats(LSE, pid_bh, h, first, L, N_TOKENS, VARLEN)
    DELTA_ROW = _row_stats(DELTA, pid_bh, h, first, L, N_TOKENS, VARLEN)
    mask_base = MASK + pid_bh.to(tl.int64) * LB * W
    dropout_scale = 1.0 / (1.0 - dropout_p)
    opaque_zero = dropout_p * 0.0  # see accumulator_zeros
    dk = accumulator_zeros(0, BLOCK_N, BLOCK_D, opaque_zero, WGMMA)
    dv = accumulator_zeros(BLOCK_N * BLOCK_D, BLOCK_N, BLOCK_D, opaque_zero, WGMMA)  # not dk's values: no copies
    L_full = _full(L, BLOCK_M, EVEN_M)
    band_first, band_hi, after = _loops(n0, L, C, BLOCK_N, BLOCK_M, HAS_BLOCK_BIAS)  # queries meeting these keys
    if not EVEN_M:
        if L_full < L:
            bias_hi = _tail_bias_end(L, L_full, band_hi)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_tile, do_tile, L_full, offs_m_base, n0, d_ok, L,
                                query_step, qk_scale, bias_cols, bias_tile, key_bias, LSE_ROW, DELTA_ROW, mask_base,
                                dropout_p, bias_hi, sql, sdol, W, HAS_BLOCK_BIAS, HAS_KEY_BIAS, DROPOUT,
                                True, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, WORD, KEYS_MAJOR, INLINE_PTX)
    # The full query tiles off the band (before it, then after it) in one loop, then the band's, with their bias.
    before, band_end, skip, off_end = _off_band(band_first, band_hi, after, L_full, EVEN_M)
    for i in range(0, off_end, BLOCK_M):
        m0 = i + skip * (i >= before).to(tl.int32)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_tile, do_tile, m0, offs_m_base, n0, d_ok, L, query_step,
                            qk_scale, bias_cols, bias_tile, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_p, L,
                            sql, sdol, W, False, HAS_KEY_BIAS, DROPOUT, False, EVEN_D, UPCAST, PRECISION,
                            BLOCK_M, BLOCK_N, WORD, KEYS_MAJOR, INLINE_PTX)
    if HAS_BLOCK_BIAS:
        for m0 in range(band_first, band_end, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_tile, do_tile, m0, offs_m_base, n0, d_ok, L, query_step,
                                qk_scale, bias_cols, bias_tile, key_bias, LSE_ROW, DELTA_ROW, mask_base, dropout_p,
                                L, sql, sdol, W, True, HAS_KEY_BIAS, DROPOUT, False, EVEN_D, UPCAST,
                                PRECISION, BLOCK_M, BLOCK_N, WORD, KEYS_MAJOR, INLINE_PTX)
    dv = dv * dropout_scale  # 1 without dropout
    # DK and DV are contiguous and alike: one set of strides (sg*) serves both.
    grad_offs = offs_n[:, None] * sgl + offs_d[None, :] * sgd
    dk = (dk * (qk_scale * LN2 * dropout_scale)).to(DK.dtype.element_ty)
    if EVEN_N and EVEN_D:
        tl.store(_slab(DK, b, h, first, sgb, sgh, sgl, VARLEN) + grad_offs, dk)
        tl.store(_slab(DV, b, h, first, sgb, sgh, sgl, VARLEN) + grad_offs, dv.to(DV.dtype.element_ty))
    else:
        tile_nd = n_ok[:, None] & d_ok[None, :]
        tl.store(_slab(DK, b, h, first, sgb, sgh, sgl, VARLEN) + grad_offs, dk, mask=tile_nd)
        tl.store(_slab(DV, b, h, first, sgb, sgh, sgl, VARLEN) + grad_offs, dv.to(DV.dtype.element_ty), mask=tile_nd)


@triton.jit
def _bwd_dtable_kernel(DS_SUM, INDEX, DTABLE, CU_SEQLENS, B, GROUPS, L, LB, LS, C, L_MAX, stg, stl, stc, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VARLEN: tl.constexpr = False):
    """DTABLE[g, i, col] = Σ_{b: index[b] = g} Σ_groups DS_SUM[b, ·, i, c·(i // c) + col], in float64, in the
    order b = 0, 1, ... (deterministic); rows L .. L_max get 0 (no gradient reached them). DS_SUM is
    [B, GROUPS, LB, LS]; varlen, b is a sequence and only its Ls×Ls corner counts. With dropout, DS_SUM holds
    dS·(1 - p) (see _dq_tile): the sum is scaled back by 1 / (1 - p)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    cols = ((offs_m // C) * C)[:, None] + offs_c[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_C], tl.float64)
    example = DS_SUM + offs_m[:, None] * LS + cols  # example b's band; pointer steps keep the offsets 64-bit
    for b in range(0, B):
        if tl.load(INDEX + b) == g:
            _, Lb = _sequence(CU_SEQLENS, b, L, VARLEN)
            inside = (offs_m[:, None] < Lb) & (offs_c[None, :] < C) & (cols < Lb)  # the rest was never written
            for group in range(0, GROUPS):
                total += tl.load(example + group * LB * LS, mask=inside, other=0.0).to(tl.float64)
        example += GROUPS * LB * LS
    total = total * (1.0 / (1.0 - dropout_p))  # 1 without dropout
    tl.store(DTABLE + g.to(tl.int64) * stg + offs_m[:, None] * stl + offs_c[None, :] * stc,
             total.to(tl.float32).to(DTABLE.dtype.element_ty), mask=(offs_m[:, None] < L_MAX) & (offs_c[None, :] < C))


# (BLOCK_M query tile, BLOCK_N key tile, num_warps, num_stages[, maxnreg]) per pass, by GPU family and head dim
# (BLOCK_D up to the key). Key tiles are multiples of the dropout word (32 bits).
# Each is the largest tile that compiles with 0 spill bytes and the arch's tensor-core op (wgmma on sm_90, mma.sync
# on sm_80), dropout and key padding on or off, within the family's shared memory per block: `make kernel-report`
# shows sm_90a and sm_80. Where a [64, d] tile spills, the pass takes a 32-wide tile on its inner loop (the key
# tile in dQ, the query tile in dK/dV): wgmma needs 64 rows per warpgroup in the program's own tile.
_TILES = {
    "sm_90": {  # H100, H200: 227 KB of shared memory per block
        # dq up to d 128: 128 queries on 8 warps, 64 rows per warpgroup. On 64 rows, both warpgroups computed the
        # whole dP (triton lays a dot that feeds another along M only), a third more instructions per score.
        # dkdv up to d 128: [keys, queries] tiles (KEYS_MAJOR), one warpgroup on 64 keys. At d 128, 16 queries: 32
        # spill 8-32 B with the bounds masks (packed, odd lengths) on 1 or 2 stages. d 256: [queries, keys] tiles,
        # whose accumulators fit 8 warps.
        64: dict(fwd=(64, 64, 4, 3), dq=(128, 32, 8, 3), dkdv=(32, 64, 4, 3)),
        128: dict(fwd=(64, 64, 8, 3), dq=(128, 32, 8, 3), dkdv=(16, 64, 4, 2)),
        256: dict(fwd=(64, 32, 8, 3), dq=(64, 32, 8, 3), dkdv=(16, 64, 8, 3)),
    },
    "sm_80": {  # A100 (163 KB), and GPUs this table does not name
        # fwd: maxnreg 255, or ptxas stops at 168 registers and spills 4-12 B in the packed kernel (2 CTAs per SM
        # either way: shared memory bounds them).
        64: dict(fwd=(64, 64, 4, 3, 255), dq=(64, 32, 8, 3), dkdv=(64, 32, 8, 3)),
        128: dict(fwd=(64, 64, 4, 3), dq=(64, 64, 8, 3), dkdv=(64, 64, 8, 3)),
        256: dict(fwd=(64, 32, 8, 3), dq=(64, 32, 8, 3), dkdv=(16, 32, 8, 3)),  # dkdv 16x64: 32 B of spills
    },
    "99kb": {  # sm_86, sm_89, sm_120 (A10, L4, L40, RTX 30xx-50xx): 99 KB per block, so fewer pipeline stages
        64: dict(fwd=(64, 64, 4, 3), dq=(64, 32, 8, 3), dkdv=(64, 32, 8, 3)),
        128: dict(fwd=(64, 64, 8, 2), dq=(64, 64, 8, 2), dkdv=(64, 64, 8, 2)),
        256: dict(fwd=(64, 32, 8, 2), dq=(64, 32, 8, 1), dkdv=(16, 32, 8, 2)),
    },
}
# float32 operands (TF32) take twice the shared memory of 16-bit ones per pipeline stage, and more registers: where
# the table's tile would not fit the family's shared memory per block or would spill, fp32 takes its own
# (`make kernel-report KERNEL_REPORT_ARGS='--dtype fp32'` lists them).
_TILES_FP32 = {
    "sm_90": {128: dict(fwd=(64, 64, 8, 2), dkdv=(16, 64, 8, 2))},  # dkdv on [queries, keys]: see _configs_for
    "sm_80": {128: dict(fwd=(64, 32, 4, 2), dq=(64, 32, 8, 2), dkdv=(32, 64, 8, 2))},
    "99kb": {64: dict(fwd=(64, 64, 4, 2), dq=(32, 32, 4, 3)),
             128: dict(fwd=(64, 32, 4, 2), dq=(64, 32, 8, 1), dkdv=(16, 32, 4, 2))},
}
PASSES = ("fwd", "dq", "dkdv")


def _tile_family(capability) -> str:
    if capability[0] == 9:
        return "sm_90"
    if capability in ((8, 6), (8, 9)) or capability[0] == 12:
        return "99kb"
    return "sm_80"


def _configs(q: torch.Tensor):
    """{pass: launch configuration} for q's dtype, head dim and device; see _configs_for."""
    return _configs_for(q.shape[-1], q.dtype, gpu_capability(q.device))


def _configs_for(d: int, dtype: torch.dtype, capability=None):
    """{"fwd" | "dq" | "dkdv": dict(BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION, num_warps, num_stages, WGMMA,
    INLINE_PTX)}; dkdv adds KEYS_MAJOR, and a register budget (maxnreg) where the table gives one.

    capability is the GPU's (major, minor), or None under the interpreter, where every tile is 16x16 (the
    interpreter is slow: small tiles keep test shapes cheap).
    """
    block_d = max(16, triton.next_power_of_2(d))
    upcast, precision = dot_flags(dtype)
    interpreted = capability is None or interpreting()
    if interpreted:
        tiles = {name: (16, 16, 4, 1) for name in PASSES}
        wgmma = False
    else:
        family, key = _tile_family(capability), max(64, block_d)
        tiles = dict(_TILES[family][key])
        if dtype == torch.float32:
            tiles.update(_TILES_FP32[family].get(key, {}))
        wgmma = has_wgmma(capability)  # the accumulators' zeros (accumulator_zeros)
    configs = {}
    for name, (m, n, w, stages, *maxnreg) in tiles.items():
        configs[name] = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision, num_warps=w,
                             num_stages=stages, WGMMA=wgmma,
                             INLINE_PTX=name == "fwd" and not interpreted and torch.version.hip is None)
        if name == "dkdv":  # [keys, queries] score tiles on wgmma (_dkdv_tile) up to d 128, fp32 up to d 64 (at d 128
            # its tiles spill, as 16-bit ones do at d 256), and under the interpreter
            configs[name]["KEYS_MAJOR"] = interpreted or (wgmma and block_d <= (64 if dtype == torch.float32 else 128))
        if maxnreg:  # a register budget for ptxas, where its own choice would spill
            configs[name]["maxnreg"] = maxnreg[0]
    return configs


def _word() -> int:
    """Bits per dropout mask word: 32, or 16 under the interpreter, whose key tiles are 16 wide (a tile reads whole
    words). The same on every GPU, so the mask's shape depends only on (B·H, L)."""
    return 16 if interpreting() else 32


def _strides(t: torch.Tensor):
    """(batch, head, row, column) strides of a [B, H, L, d] tensor; of a packed [N, H, d] one, batch stride 0."""
    if t.dim() == 3:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return tuple(t.stride())


def _even(L: int, D: int, cfg, varlen: bool) -> dict:
    """Which bounds masks this pass can leave out: EVEN_M / EVEN_N, L is a multiple of the query / key tile (never
    for packed sequences, whose lengths vary); EVEN_D, d fills BLOCK_D."""
    return dict(EVEN_M=not varlen and L % cfg["BLOCK_M"] == 0, EVEN_N=not varlen and L % cfg["BLOCK_N"] == 0,
                EVEN_D=D == cfg["BLOCK_D"])


def _mask_words(L: int, word: int) -> int:
    """Words per row of the dropout bit mask: whole 64-key blocks, so that every key tile (16, 32 or 64 wide, at a
    multiple of its width below L) reads words inside the row."""
    return triton.cdiv(L, 64) * (64 // word)


def row_stride(L: int) -> int:
    """The row stride of the dense bias and of DS_SUM: L rounded up to 16 elements, so that their rows start on
    64-byte boundaries and triton specializes it as a multiple of 16: the loops' bias loads stay 16-byte vectors at
    any L (an odd one made them scalar: at L = 120, 26 more instructions in the forward's band loop)."""
    return triton.cdiv(L, 16) * 16


def dense_bias_shape(G: int, L: int) -> tuple:
    """The dense bias's shape: [2, G, L, row_stride(L)], the planes M·log2(e) and its transpose (dense_bias)."""
    return (2, G, L, row_stride(L))


def dense_bias(table: torch.Tensor, L: int) -> torch.Tensor:
    """log2(e)·M for every task, and its transpose: [2, G, L, row_stride(L)] fp32 (columns from L on 0), the
    diagonal blocks of the table's top-left L×L corner; plane 1 serves dK/dV's [keys, queries] tiles (_dkdv_tile)."""
    G, _, C = table.shape
    bias = torch.empty(dense_bias_shape(G, L), dtype=torch.float32, device=table.device)
    if bias.numel():
        block = 16 if interpreting() else 64
        _dense_bias_kernel[(triton.cdiv(L, block), triton.cdiv(bias.shape[3], block), G)](
            table, bias, *table.stride(), G, L, bias.shape[3], C, BLOCK_M=block, BLOCK_N=block, **FP_FUSION)
    return bias


def key_bias_operands(key_mask: torch.Tensor, scale: float, dtype: torch.dtype):
    """The key bias from a [B, L] mask, bool (True: keep; else 0 / -inf) or numbers (added to the scores as they
    are): (the forward's tensor-core operand [B, L, KB_K] in dtype, kb [B, L] fp32 for the backward)."""
    B, L = key_mask.shape
    operand = torch.empty((B, L, KB_K.value), dtype=dtype, device=key_mask.device)
    kb32 = torch.empty((B, L), dtype=torch.float32, device=key_mask.device)
    if kb32.numel():
        block = 16 if interpreting() else 128
        _key_bias_operand_kernel[(triton.cdiv(L, block), B)](
            key_mask, operand, kb32, *key_mask.stride(), L, 1.0 / (KB_ONE.value * scale),
            IS_BOOL=key_mask.dtype == torch.bool, TF32=dtype == torch.float32, BLOCK=block, **FP_FUSION)
    return operand, kb32


def key_bias_shape(B: int, L: int, has_key_mask: bool) -> tuple:
    """The shape of the forward's fp32 key bias kb (saved for the backward): [B, L], or (0,) without a key mask."""
    return (B, L) if has_key_mask else (0,)


def dropout_mask_shape(programs: int, L: int, d: int, dtype: torch.dtype, dropout_p: float) -> tuple:
    """The shape of the forward's dropout bit mask: [programs = B·H (S·H packed), L, words], or (0,) without
    dropout or with nothing to drop."""
    if dropout_p == 0.0 or programs * L * d == 0:
        return (0,)
    return (programs, L, _mask_words(L, _word()))


def _dropout_mask(programs, H, L, dropout_p, seed, word, device, cu_seqlens=None) -> torch.Tensor:
    """The keep mask as bits: [programs, L, _mask_words] int32 (bit k of word w: key w·word + k; 0 past L)."""
    W = _mask_words(L, word)
    mask = torch.empty((programs, L, W), dtype=torch.int32, device=device)
    block_m = 16
    varlen = cu_seqlens is not None
    _dropout_mask_kernel[(triton.cdiv(L, block_m), programs)](
        mask, cu_seqlens if varlen else mask, H, L, L, W, dropout_p, seed, BLOCK_M=block_m,
        BLOCK_W=triton.next_power_of_2(W), WORD=word, VARLEN=varlen, **FP_FUSION)
    return mask


def heads_per_program(B: int, H: int, L: int, block_m: int, device: torch.device) -> int:
    """How many heads one dQ program runs (summing their dS in place): all of them when B·⌈L/block_m⌉ programs
    fill the device, fewer (a divisor of H) when the grid would be too small."""
    tiles = B * triton.cdiv(L, block_m)
    for groups in range(1, H + 1):  # one program per SM is enough: target_programs asks for two
        if H % groups == 0 and tiles * groups >= target_programs(device) // 2:
            return H // groups
    return 1


def int32_slab(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """t, or a contiguous copy of it when an offset inside one (example or sequence, head) slab, (rows - 1)·(its
    row stride) + (d - 1)·(its column stride), would pass 2^31 - 1: the kernels keep those offsets int32 (the slabs'
    bases are int64). A view whose rows lie far apart in its buffer (a [L, B, H·d] sequence-first projection seen as
    [B, H, L, d]) gets the copy; a slab that passes 2^31 even when compact is refused."""
    row_dim = 0 if t.dim() == 3 else 2  # packed [N, H, d], padded [B, H, L, d]

    def last_offset(x):
        return (rows - 1) * x.stride(row_dim) + (x.shape[-1] - 1) * x.stride(-1)

    if rows == 0 or t.numel() == 0 or last_offset(t) < 2**31:
        return t
    t = t.contiguous()
    if last_offset(t) >= 2**31:
        raise ValueError(f"conditional_attention: argument '{name}' {tuple(t.shape)}: one sequence and head spans "
                         f"{last_offset(t) + 1} elements even when contiguous, past the 2^31 that the Triton kernels "
                         f"address with int32 offsets; use the torch backend")
    return t


def _forward(q, k, v, table, index, key_mask, scale, dropout_p, seed, cu_seqlens=None, max_seqlen=None):
    """Padded (q [B, H, L, d]) or packed (q [N, H, d], cu_seqlens [S+1], max_seqlen): the forward's launches.
    Returns (out, lse, bias, mask, key_bias): the last four are what the backward reads again."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    varlen = cu_seqlens is not None
    if varlen:
        N, H, D = q.shape
        B, L, N_TOKENS = cu_seqlens.shape[0] - 1, max_seqlen, N
        lse = torch.empty((H, N), dtype=torch.float32, device=q.device)
    else:
        B, H, L, D = q.shape
        N_TOKENS = 0
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    q, k, v = (int32_slab(t, L, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    cfg = _configs(q)["fwd"]
    word = _word()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bias = dense_bias(table, L)
    dropout = dropout_p > 0.0
    if dropout and out.numel():
        mask = _dropout_mask(B * H, H, L, dropout_p, seed, word, q.device, cu_seqlens)
    else:
        mask = torch.empty(dropout_mask_shape(B * H, L, D, q.dtype, dropout_p), dtype=torch.int32, device=q.device)
    has_kb = key_mask is not None
    if has_kb and out.numel():
        kb_operand, key_bias = key_bias_operands(key_mask, scale, q.dtype)
    else:
        key_bias = torch.empty(key_bias_shape(B, L, has_kb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse, bias, mask, key_bias
    _fwd_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        q, k, v, out, lse, bias[0], index, kb_operand if has_kb else lse, mask if dropout else lse,
        cu_seqlens if varlen else lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), kb_operand.stride(0) if has_kb else 0,
        H, L, L, bias.shape[3], table.shape[2], D, _mask_words(L, word), N_TOKENS, scale * LOG2E.value, dropout_p,
        HAS_KEY_BIAS=has_kb, DROPOUT=dropout, **_even(L, D, cfg, varlen), WORD=word, VARLEN=varlen, **cfg,
        **FP_FUSION)
    return out, lse, bias, mask, key_bias


def _backward(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p, cu_seqlens=None,
              max_seqlen=None):
    """The backward's launches (padded, or packed with cu_seqlens): dq, dk, dv and dtable [G, L_max, c]."""
    require_tf32(q.dtype, q.device, "conditional_attention")
    varlen = cu_seqlens is not None
    if varlen:
        N, H, D = q.shape
        B, L, N_TOKENS = cu_seqlens.shape[0] - 1, max_seqlen, N
    else:
        B, H, L, D = q.shape
        N_TOKENS = 0
    q, k, v, out, dout = (int32_slab(t, L, name) for t, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out"),
                                                                 (dout, "grad of the output")))
    G, L_max, C = table.shape
    cfg = _configs(q)
    word = _word()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    if dq.numel() == 0:
        return dq, dk, dv, torch.zeros_like(table)
    hpp = heads_per_program(B, H, L, cfg["dq"]["BLOCK_M"], q.device)
    groups = H // hpp
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # written by the dq kernel
    ds_sum = torch.empty((B, groups, L, bias.shape[3]), dtype=torch.float32, device=q.device)  # band tiles only
    has_kb = key_bias is not None
    dropout = dropout_p > 0.0
    kb = key_bias if has_kb else lse
    bits = mask if dropout else lse
    cu = cu_seqlens if varlen else lse
    common = (H, L, L, bias.shape[3], C, D, _mask_words(L, word), N_TOKENS, scale * LOG2E.value, dropout_p)
    flags = dict(HAS_KEY_BIAS=has_kb, DROPOUT=dropout, WORD=word, VARLEN=varlen)
    kb_stride = key_bias.stride(0) if has_kb else 0
    # The dq kernel runs first: it writes delta, which the dkdv kernel reads (same stream, so ordered).
    _bwd_dq_kernel[(triton.cdiv(L, cfg["dq"]["BLOCK_M"]), B, groups)](
        q, k, v, dout, out, lse, delta, dq, ds_sum, bias[0], index, kb, bits, cu,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(out), *_strides(dq), kb_stride,
        *common, HEADS_PER_PROGRAM=hpp, **_even(L, D, cfg["dq"], varlen), **flags, **cfg["dq"], **FP_FUSION)
    _bwd_dkdv_kernel[(triton.cdiv(L, cfg["dkdv"]["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, bias[int(cfg["dkdv"]["KEYS_MAJOR"])], index, kb, bits, cu,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), kb_stride,
        *common, **_even(L, D, cfg["dkdv"], varlen), **flags, **cfg["dkdv"], **FP_FUSION)
    dtable = torch.empty_like(table)
    block_m = 16 if interpreting() else 32
    _bwd_dtable_kernel[(triton.cdiv(L_max, block_m), G)](
        ds_sum, index, dtable, cu, B, groups, L, L, bias.shape[3], C, L_max, *dtable.stride(), dropout_p,
        BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(C), VARLEN=varlen, **FP_FUSION)
    return dq, dk, dv, dtable


def attention_forward(q, k, v, table, index, key_mask, scale, dropout_p, seed):
    """Launches the forward; key_mask [B, L] bool (True: keep) or numbers (added), or None. Returns (out [B, H, L, d],
    lse [B, H, L] fp32, the dense bias dense_bias_shape(G, L), the dropout bit mask (dropout_mask_shape), the key
    bias [B, L] fp32 (key_bias_shape)): the last four are what the backward reads again."""
    return _forward(q, k, v, table, index, key_mask, scale, dropout_p, seed)


def attention_backward(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p):
    """Launches the backward; key_bias: the forward's key bias [B, L] fp32, or None. Returns dq, dk, dv (in q's
    layout and dtype) and dtable [G, L_max, c] (table's dtype)."""
    return _backward(dout, q, k, v, out, lse, bias, mask, table, index, key_bias, scale, dropout_p)


def attention_forward_varlen(q, k, v, cu_seqlens, max_seqlen, table, index, scale, dropout_p, seed):
    """Packed: q, k, v [N, H, d], sequences cu_seqlens [S+1] of at most max_seqlen tokens, index [S]. Returns
    (out [N, H, d], lse [H, N] fp32, the dense bias dense_bias_shape(G, max_seqlen), the dropout bit
    mask)."""
    return _forward(q, k, v, table, index, None, scale, dropout_p, seed, cu_seqlens, max_seqlen)[:4]


def attention_backward_varlen(dout, q, k, v, out, lse, bias, mask, cu_seqlens, max_seqlen, table, index, scale,
                              dropout_p):
    """Packed backward: dq, dk, dv [N, H, d] and dtable [G, L_max, c] (table's dtype)."""
    return _backward(dout, q, k, v, out, lse, bias, mask, table, index, None, scale, dropout_p, cu_seqlens,
                     max_seqlen)
