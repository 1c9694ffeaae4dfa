// FiLM by a per-task table: the programs shared by the CUDA kernels (film.cu) and the host harness
// (host_harness.cpp). The math is kernels/film.py's docstring. Rows r of the output [M = B·L, D] belong to
// example b = r / L and task t = index[b]; x is [B·L, D], or [L, D] shared by the batch (row r reads x[r % L]):
//
//   out[r] = (1 + γ[t]) ∘ x[r] + β[t]
//   dx[r]  = (1 + γ[t]) ∘ dy[r]                       (x per example)
//   dx[l]  = Σ_b (1 + γ[index[b]]) ∘ dy[b·L + l]       (x shared: b in order)
//   partials [B, chunks, D] fp32: Σ dy∘x and Σ dy over chunk c of example b's rows (each thread sums its
//   columns' rows in order), which the per-task reduction (task_reduce.h) sums per task.
//
// FiLM is elementwise in D, so a thread owns one unit of a row: a 16-byte vector of VEC elements, or the
// scalar tail (the D mod VEC last columns, when the rows are aligned but D is not a multiple of VEC).
// Nothing is summed across threads. VEC = 1 when a pointer or a row stride is not 16-byte aligned. fp32 math.
#pragma once

#include <cstdint>

#include "block.h"
#include "layer_norm.h"  // the status codes and kMaxD every op shares

namespace camtl {
namespace film {

using cln::kMaxD;
constexpr int kThreads = 256;    // most threads per block (the kernels' __launch_bounds__)
constexpr int kSharedRows = 4;   // rows of a shared x per backward block: their dx accumulates in registers

// Refused arguments of FiLM only (the rest are cln's).
enum Status : int { kBadSharedChunks = -20, kBadSeq = -21 };

inline const char* status_message(int status) {
  switch (status) {
    case kBadSharedChunks: return "a shared x needs chunk_rows == 4 and chunks == ceil(L / 4)";
    case kBadSeq: return "L (rows per example) must be >= 0, with B·L and the grid below 2^31";
    default: return cln::status_message(status);
  }
}

struct FwdArgs {
  const void* x; int64_t x_row_stride;          // [B·L, D], or [L, D] when shared_x; last dim contiguous
  const void* gamma; int64_t gamma_row_stride;  // [G, D]
  const void* beta; int64_t beta_row_stride;    // [G, D]
  const int64_t* index;                         // [B] task of each example
  void* out; int64_t out_row_stride;            // [B·L, D], x's dtype
  int64_t batch;                                // B
  int64_t seq;                                  // L
  int D;
  int shared_x;                                 // 1: x is [L, D]
};

struct BwdArgs {
  const void* dy; int64_t dy_row_stride;        // [B·L, D]
  const void* x; int64_t x_row_stride;          // [B·L, D], or [L, D] when shared_x
  const void* gamma; int64_t gamma_row_stride;  // [G, D]
  const int64_t* index;                         // [B]
  void* dx; int64_t dx_row_stride;              // x's rows
  float* dscale; float* dshift;                 // [B, chunks, D] fp32 partials of Σ dy∘x and Σ dy
  int64_t batch, seq;                           // B, L
  int64_t chunk_rows;                           // rows per block (kSharedRows for a shared x)
  int chunks;                                   // ceil(L / chunk_rows)
  int D;
  int shared_x;
};

// Units of a row: its 16-byte vectors, plus one for a scalar tail.
CAMTL_HD int units_for(int D, int vec) { return D / vec + (D % vec ? 1 : 0); }

// Threads per block: one per unit, in whole warps, at most kThreads.
CAMTL_HD int threads_for(int D, int vec) {
  const int units = units_for(D, vec);
  const int threads = ((units + kWarp - 1) / kWarp) * kWarp;
  return threads < kThreads ? threads : kThreads;
}

// Blocks covering a row's units (backward: each thread holds one unit's sums in registers).
CAMTL_HD int tiles_for(int D, int vec) {
  const int threads = threads_for(D, vec);
  return (units_for(D, vec) + threads - 1) / threads;
}

// B, L >= 0 and B·L < 2^31 (without overflowing the product).
inline bool valid_rows(int64_t batch, int64_t seq) {
  return batch >= 0 && seq >= 0 && (seq == 0 || batch < ((int64_t(1) << 31) + seq - 1) / seq);
}

inline bool valid_dtype(int dtype) { return dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16; }

inline int fwd_check(const FwdArgs& a, int dtype) {
  if (!valid_dtype(dtype)) return cln::kBadDType;
  if (a.D < 1 || a.D > kMaxD) return cln::kBadD;
  if (!valid_rows(a.batch, a.seq)) return kBadSeq;
  if (a.batch > 0 && a.seq > 0 && (!a.x || !a.gamma || !a.beta || !a.index || !a.out)) return cln::kBadPointer;
  return cln::kOk;
}

inline bool fwd_vec16(const FwdArgs& a, int dtype) {
  const void* ptrs[] = {a.x, a.gamma, a.beta, a.out};
  const int64_t strides[] = {a.x_row_stride, a.gamma_row_stride, a.beta_row_stride, a.out_row_stride};
  return cln::vectorizable(ptrs, 4, strides, 4, cln::elem_size(dtype));
}

// Blocks of the backward: (example, chunk, tile) per example; (chunk, tile) for a shared x.
inline int64_t bwd_blocks(const BwdArgs& a, int vec) {
  const int64_t per_chunk = static_cast<int64_t>(a.chunks) * tiles_for(a.D, vec);
  return a.shared_x ? per_chunk : a.batch * per_chunk;
}

inline int bwd_check(const BwdArgs& a, int dtype) {
  if (!valid_dtype(dtype)) return cln::kBadDType;
  if (a.D < 1 || a.D > kMaxD) return cln::kBadD;
  if (!valid_rows(a.batch, a.seq)) return kBadSeq;
  if (a.seq == 0) return a.chunks == 0 ? cln::kOk : cln::kBadChunks;
  if (a.shared_x) {
    if (a.chunk_rows != kSharedRows || a.chunks != (a.seq + kSharedRows - 1) / kSharedRows) return kBadSharedChunks;
  } else if (a.chunk_rows < 1 || a.chunks < 1 || (a.chunks - 1) * a.chunk_rows >= a.seq ||
             a.chunks * a.chunk_rows < a.seq) {
    return cln::kBadChunks;
  }
  if (bwd_blocks(a, 1) >= (int64_t(1) << 31)) return kBadSeq;  // VEC = 1 has the most tiles
  if (!a.x || !a.gamma || !a.dx) return cln::kBadPointer;
  if (a.batch && (!a.dy || !a.index || !a.dscale || !a.dshift)) return cln::kBadPointer;
  return cln::kOk;
}

inline bool bwd_vec16(const BwdArgs& a, int dtype) {
  const void* ptrs[] = {a.dy, a.x, a.gamma, a.dx};
  const int64_t strides[] = {a.dy_row_stride, a.x_row_stride, a.gamma_row_stride, a.dx_row_stride};
  return cln::vectorizable(ptrs, 4, strides, 4, cln::elem_size(dtype));
}

// ---- one unit: VEC columns at c (a 16-byte vector when n == VEC), or the n < VEC columns of the tail ----------

template <typename T, int VEC> CAMTL_HD void load_unit(const T* p, int n, float (&v)[VEC]) {
  if (n == VEC) {
    load_floats<T, VEC>(p, v);
    return;
  }
CAMTL_UNROLL
  for (int e = 0; e < VEC; ++e) v[e] = e < n ? to_float(p[e]) : 0.f;
}

template <typename T, int VEC> CAMTL_HD void store_unit(T* p, int n, const float (&v)[VEC]) {
  if (n == VEC) {
    store_floats<T, VEC>(p, v);
    return;
  }
CAMTL_UNROLL
  for (int e = 0; e < VEC; ++e)
    if (e < n) p[e] = from_float<T>(v[e]);
}

// Columns of unit j: VEC, or the tail's D mod VEC (0 past the row).
template <int VEC> CAMTL_HD int cols_of_unit(int D, int j) {
  const int rest = D - j * VEC;
  return rest <= 0 ? 0 : (rest < VEC ? rest : VEC);
}

// ---- the programs -------------------------------------------------------------------------------------------

// out[row] for one row; the block's threads loop over the row's units.
template <typename T, int VEC, bool SHARED, class Block>
CAMTL_HD void fwd_row(const Block& block, const FwdArgs& a, int64_t row) {
  const int units = units_for(a.D, VEC);
  const int64_t task = a.index[row / a.seq];
  const int64_t x_row = SHARED ? row % a.seq : row;
  const T* x = static_cast<const T*>(a.x) + x_row * a.x_row_stride;
  const T* g = static_cast<const T*>(a.gamma) + task * a.gamma_row_stride;
  const T* be = static_cast<const T*>(a.beta) + task * a.beta_row_stride;
  T* out = static_cast<T*>(a.out) + row * a.out_row_stride;
  block.each([&](int tid) {
    for (int j = tid; j < units; j += block.threads) {
      const int c = j * VEC, n = cols_of_unit<VEC>(a.D, j);
      float xv[VEC], gv[VEC], bv[VEC], ov[VEC];
      load_unit<T, VEC>(x + c, n, xv);
      load_unit<T, VEC>(g + c, n, gv);
      load_unit<T, VEC>(be + c, n, bv);
CAMTL_UNROLL
      for (int e = 0; e < VEC; ++e) ov[e] = (1.f + gv[e]) * xv[e] + bv[e];
      store_unit<T, VEC>(out + c, n, ov);
    }
  });
}

// x per example: dx for rows [first, end) of example b (chunk `chunk`), one unit per thread of tile `tile`,
// and the chunk's partials.
template <typename T, int VEC, class Block>
CAMTL_HD void bwd_chunk(const Block& block, const BwdArgs& a, int64_t b, int chunk, int tile) {
  const int64_t first = b * a.seq + chunk * a.chunk_rows;
  const int64_t end = (first + a.chunk_rows < (b + 1) * a.seq) ? first + a.chunk_rows : (b + 1) * a.seq;
  const int64_t task = a.index[b];
  const T* g = static_cast<const T*>(a.gamma) + task * a.gamma_row_stride;
  const int64_t partial_row = (b * a.chunks + chunk) * static_cast<int64_t>(a.D);
  block.each([&](int tid) {
    const int j = tile * block.threads + tid, c = j * VEC, n = cols_of_unit<VEC>(a.D, j);
    if (n == 0) return;
    float one_plus_g[VEC], dscale[VEC], dshift[VEC];
    load_unit<T, VEC>(g + c, n, one_plus_g);
CAMTL_UNROLL
    for (int e = 0; e < VEC; ++e) {
      one_plus_g[e] += 1.f;
      dscale[e] = 0.f;
      dshift[e] = 0.f;
    }
    for (int64_t row = first; row < end; ++row) {
      float d[VEC], xv[VEC], out[VEC];
      load_unit<T, VEC>(static_cast<const T*>(a.dy) + row * a.dy_row_stride + c, n, d);
      load_unit<T, VEC>(static_cast<const T*>(a.x) + row * a.x_row_stride + c, n, xv);
CAMTL_UNROLL
      for (int e = 0; e < VEC; ++e) {
        out[e] = one_plus_g[e] * d[e];
        dscale[e] += d[e] * xv[e];
        dshift[e] += d[e];
      }
      store_unit<T, VEC>(static_cast<T*>(a.dx) + row * a.dx_row_stride + c, n, out);
    }
CAMTL_UNROLL
    for (int e = 0; e < VEC; ++e) {
      if (e < n) {
        a.dscale[partial_row + c + e] = dscale[e];
        a.dshift[partial_row + c + e] = dshift[e];
      }
    }
  });
}

// x shared: dx for x's rows [chunk·kSharedRows, +kSharedRows) summed over the batch in order, one unit per
// thread of tile `tile`, and the partials of (b, chunk) for every example b.
template <typename T, int VEC, class Block>
CAMTL_HD void bwd_shared_chunk(const Block& block, const BwdArgs& a, int chunk, int tile) {
  const int64_t first = static_cast<int64_t>(chunk) * kSharedRows;
  const int rows = static_cast<int>(a.seq - first < kSharedRows ? a.seq - first : kSharedRows);
  block.each([&](int tid) {
    const int j = tile * block.threads + tid, c = j * VEC, n = cols_of_unit<VEC>(a.D, j);
    if (n == 0) return;
    float xv[kSharedRows][VEC], dx[kSharedRows][VEC];
CAMTL_UNROLL
    for (int r = 0; r < kSharedRows; ++r) {
CAMTL_UNROLL
      for (int e = 0; e < VEC; ++e) xv[r][e] = dx[r][e] = 0.f;
      if (r < rows) load_unit<T, VEC>(static_cast<const T*>(a.x) + (first + r) * a.x_row_stride + c, n, xv[r]);
    }
    for (int64_t b = 0; b < a.batch; ++b) {
      float one_plus_g[VEC], dscale[VEC], dshift[VEC];
      load_unit<T, VEC>(static_cast<const T*>(a.gamma) + a.index[b] * a.gamma_row_stride + c, n, one_plus_g);
CAMTL_UNROLL
      for (int e = 0; e < VEC; ++e) {
        one_plus_g[e] += 1.f;
        dscale[e] = 0.f;
        dshift[e] = 0.f;
      }
CAMTL_UNROLL
      for (int r = 0; r < kSharedRows; ++r) {
        if (r < rows) {
          float d[VEC];
          load_unit<T, VEC>(static_cast<const T*>(a.dy) + (b * a.seq + first + r) * a.dy_row_stride + c, n, d);
CAMTL_UNROLL
          for (int e = 0; e < VEC; ++e) {
            dx[r][e] += one_plus_g[e] * d[e];
            dscale[e] += d[e] * xv[r][e];
            dshift[e] += d[e];
          }
        }
      }
      const int64_t partial_row = (b * a.chunks + chunk) * static_cast<int64_t>(a.D);
CAMTL_UNROLL
      for (int e = 0; e < VEC; ++e) {
        if (e < n) {
          a.dscale[partial_row + c + e] = dscale[e];
          a.dshift[partial_row + c + e] = dshift[e];
        }
      }
    }
CAMTL_UNROLL
    for (int r = 0; r < kSharedRows; ++r)
      if (r < rows) store_unit<T, VEC>(static_cast<T*>(a.dx) + (first + r) * a.dx_row_stride + c, n, dx[r]);
  });
}

// The block of a backward grid: (example, chunk, tile), or (chunk, tile) for a shared x (SHARED: a kernel of
// its own, so that the per-example kernel does not pay the shared one's registers).
template <typename T, int VEC, bool SHARED, class Block>
CAMTL_HD void bwd_block(const Block& block, const BwdArgs& a, int64_t id) {
  const int tiles = tiles_for(a.D, VEC);
  const int tile = static_cast<int>(id % tiles);
  const int64_t rest = id / tiles;
  const int chunk = static_cast<int>(rest % a.chunks);
  if (SHARED)
    bwd_shared_chunk<T, VEC>(block, a, chunk, tile);
  else
    bwd_chunk<T, VEC>(block, a, rest / a.chunks, chunk, tile);
}

// Launcher::run<T, VEC, SHARED>() for (dtype, 16-byte vectors, shared x).
template <class Launcher> int dispatch(int dtype, bool vec16, bool shared_x, Launcher& launcher) {
  return camtl::dispatch(dtype, vec16, shared_x, launcher, cln::kBadDType);
}

}  // namespace film
}  // namespace camtl
