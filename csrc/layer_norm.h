// Conditional layer norm with a fused residual add: the row programs, shared by the CUDA kernels
// (layer_norm.cu) and the host harness (host_harness.cpp). The math is kernels/layer_norm.py's docstring:
//
//   h = x + residual,  x̂ = (h - mean) · rstd,  s_b = (1 + γ[t]) ∘ w + β[t],  y = x̂ ∘ s_b + bias
//   backward, dx̂ = dy ∘ s_b:  dx = rstd · (dx̂ - mean_d(dx̂) - x̂ · mean_d(dx̂ ∘ x̂))
//   plus fp32 partials Σ dy∘x̂ and Σ dy per (example, chunk of its rows): [B, chunks, D],
//   which the caller sums per task in a fixed order (camtl.ops._reduce.per_task_sum).
//
// One block per row (forward) or per chunk of one example's rows (backward). Thread t of T owns the
// 16-byte vectors t, t + T, ... of the row (VEC elements each) and tail column nvec·VEC + t, so its
// values stay in registers across the phases. VEC = 1 when a pointer or a row stride is not 16-byte
// aligned (then there is no tail). All arithmetic is fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "block.h"

namespace camtl {
namespace cln {

constexpr int kRowElems = 16;                        // fp32 values per thread per register array
constexpr int kMaxD = kRowElems * kMaxThreads;       // 8192

// Status codes: 0 ok, > 0 a cudaError_t, < 0 an argument the launcher refuses.
enum Status : int { kOk = 0, kBadDType = -1, kBadD = -2, kBadRows = -3, kBadPointer = -4, kBadChunks = -5 };

inline const char* status_message(int status) {
  switch (status) {
    case kOk: return "ok";
    case kBadDType: return "dtype must be float32, float16 or bfloat16";
    case kBadD: return "D must be in [1, 8192]";
    case kBadRows: return "rows must be a multiple of the batch size, with fewer than 2^31 blocks";
    case kBadPointer: return "a required pointer is null";
    case kBadChunks: return "chunk_rows and chunks must cover each example's rows";
    default: return "a CUDA error";
  }
}

struct FwdArgs {
  const void* x; int64_t x_row_stride;                // [M, D] rows, last dim contiguous
  const void* residual; int64_t residual_row_stride;  // null: no residual
  const void* weight; const void* bias;               // [D]
  const void* gamma; int64_t gamma_row_stride;        // [G, D]
  const void* beta; int64_t beta_row_stride;          // [G, D]
  const int64_t* index;                               // [B] task of each example
  void* y; int64_t y_row_stride;                      // [M, D], x's dtype
  float* mean; float* rstd;                           // [M]
  int64_t rows;                                       // M = B · R
  int64_t batch;                                      // B
  int D;
  float eps;
};

struct BwdArgs {
  const void* dy; int64_t dy_row_stride;
  const void* x; int64_t x_row_stride;
  const void* residual; int64_t residual_row_stride;
  const void* weight;
  const void* gamma; int64_t gamma_row_stride;
  const void* beta; int64_t beta_row_stride;
  const int64_t* index;
  const float* mean; const float* rstd;               // [M], from the forward
  void* dx; int64_t dx_row_stride;                    // [M, D]
  float* dscale; float* dbias;                        // [B, chunks, D] fp32 partials
  int64_t rows;
  int64_t batch;
  int64_t chunk_rows;                                 // rows of one example per block
  int chunks;                                         // ceil(R / chunk_rows)
  int D;
};

// Threads per block for a row of D columns in VEC-wide vectors; 0 when D is out of range.
CAMTL_HD int threads_for(int D, int vec) {
  if (D < 1 || D > kMaxD) return 0;
  const int nvec = D / vec;
  const int per_thread = kRowElems / vec;
  const int needed = (nvec + per_thread - 1) / per_thread;
  int threads = ((needed + kWarp - 1) / kWarp) * kWarp;
  if (threads < kWarp) threads = kWarp;
  return threads <= kMaxThreads ? threads : 0;
}

// True when every pointer and every row stride (in elements of `elem_size` bytes) is 16-byte aligned.
inline bool vectorizable(const void* const* ptrs, int n_ptrs, const int64_t* strides, int n_strides, int elem_size) {
  for (int i = 0; i < n_ptrs; ++i)
    if (ptrs[i] != nullptr && !aligned16(ptrs[i])) return false;
  for (int i = 0; i < n_strides; ++i)
    if ((strides[i] * elem_size) % 16 != 0) return false;
  return true;
}

inline int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

inline int fwd_check(const FwdArgs& a, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (a.D < 1 || a.D > kMaxD) return kBadD;
  if (a.rows < 0 || a.batch < 0 || (a.batch == 0 && a.rows != 0) || (a.batch && a.rows % a.batch) ||
      a.rows >= (int64_t(1) << 31))
    return kBadRows;
  if (a.rows && (!a.x || !a.weight || !a.bias || !a.gamma || !a.beta || !a.index || !a.y || !a.mean || !a.rstd))
    return kBadPointer;
  return kOk;
}

inline bool fwd_vec16(const FwdArgs& a, int dtype) {
  const void* ptrs[] = {a.x, a.residual, a.weight, a.bias, a.gamma, a.beta, a.y};
  const int64_t strides[] = {a.x_row_stride, a.residual ? a.residual_row_stride : 0, a.gamma_row_stride,
                             a.beta_row_stride, a.y_row_stride};
  return vectorizable(ptrs, 7, strides, 5, elem_size(dtype));
}

inline int bwd_check(const BwdArgs& a, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (a.D < 1 || a.D > kMaxD) return kBadD;
  if (a.rows < 0 || a.batch < 0 || (a.batch == 0 && a.rows != 0) || (a.batch && a.rows % a.batch)) return kBadRows;
  if (a.rows == 0) return kOk;
  const int64_t R = a.rows / a.batch;
  if (a.chunk_rows < 1 || a.chunks < 1 || (a.chunks - 1) * a.chunk_rows >= R || a.chunks * a.chunk_rows < R)
    return kBadChunks;
  if (a.batch * a.chunks >= (int64_t(1) << 31)) return kBadRows;
  if (!a.dy || !a.x || !a.weight || !a.gamma || !a.beta || !a.index || !a.mean || !a.rstd || !a.dx || !a.dscale ||
      !a.dbias)
    return kBadPointer;
  return kOk;
}

inline bool bwd_vec16(const BwdArgs& a, int dtype) {
  const void* ptrs[] = {a.dy, a.x, a.residual, a.weight, a.gamma, a.beta, a.dx};
  const int64_t strides[] = {a.dy_row_stride, a.x_row_stride, a.residual ? a.residual_row_stride : 0,
                             a.gamma_row_stride, a.beta_row_stride, a.dx_row_stride};
  return vectorizable(ptrs, 7, strides, 6, elem_size(dtype));
}

// ---- the row programs ---------------------------------------------------------------------------------------

template <int VEC> struct FwdState {
  float h[kRowElems / VEC][VEC];  // x + residual, then centered
  float h_tail;
};

// Loads VEC columns of x (+ residual) at column c into v.
template <typename T, int VEC, bool RES>
CAMTL_HD void load_sum(const T* x, const T* res, int c, float (&v)[VEC]) {
  load_floats<T, VEC>(x + c, v);
  if (RES) {
    float r[VEC];
    load_floats<T, VEC>(res + c, r);
CAMTL_UNROLL
    for (int e = 0; e < VEC; ++e) v[e] += r[e];
  }
}

template <typename T, int VEC, bool RES, class Block>
CAMTL_HD void fwd_row(const Block& block, const FwdArgs& a, int64_t row) {
  constexpr int VPT = kRowElems / VEC;
  const int D = a.D, nvec = D / VEC, tail_cols = D - nvec * VEC, threads = block.threads;
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  const T* res = RES ? static_cast<const T*>(a.residual) + row * a.residual_row_stride : nullptr;
  typename Block::template Storage<FwdState<VEC>> st(block);

  float total[1];
  block.each_then_sum([&](int tid, float (&partial)[1]) {
    FwdState<VEC>& s = st(tid);
    float acc = 0.f;
CAMTL_UNROLL
    for (int k = 0; k < VPT; ++k) {
      const int j = tid + k * threads;
      if (j < nvec) {
        load_sum<T, VEC, RES>(x, res, j * VEC, s.h[k]);
CAMTL_UNROLL
        for (int e = 0; e < VEC; ++e) acc += s.h[k][e];
      }
    }
    s.h_tail = 0.f;
    if (tid < tail_cols) {
      const int c = nvec * VEC + tid;
      s.h_tail = to_float(x[c]) + (RES ? to_float(res[c]) : 0.f);
      acc += s.h_tail;
    }
    partial[0] = acc;
  }, total);
  const float mean = total[0] / static_cast<float>(D);

  block.each_then_sum([&](int tid, float (&partial)[1]) {
    FwdState<VEC>& s = st(tid);
    float acc = 0.f;
CAMTL_UNROLL
    for (int k = 0; k < VPT; ++k) {
      if (tid + k * threads < nvec) {
CAMTL_UNROLL
        for (int e = 0; e < VEC; ++e) {
          s.h[k][e] -= mean;
          acc += s.h[k][e] * s.h[k][e];
        }
      }
    }
    if (tid < tail_cols) {
      s.h_tail -= mean;
      acc += s.h_tail * s.h_tail;
    }
    partial[0] = acc;
  }, total);
  const float rstd = 1.f / sqrtf(total[0] / static_cast<float>(D) + a.eps);

  const int64_t task = a.index[row / (a.rows / a.batch)];
  const T* w = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const T* g = static_cast<const T*>(a.gamma) + task * a.gamma_row_stride;
  const T* be = static_cast<const T*>(a.beta) + task * a.beta_row_stride;
  T* y = static_cast<T*>(a.y) + row * a.y_row_stride;
  block.each([&](int tid) {
    FwdState<VEC>& s = st(tid);
CAMTL_UNROLL
    for (int k = 0; k < VPT; ++k) {
      const int j = tid + k * threads;
      if (j < nvec) {
        float wv[VEC], bv[VEC], gv[VEC], bev[VEC], out[VEC];
        load_floats<T, VEC>(w + j * VEC, wv);
        load_floats<T, VEC>(bias + j * VEC, bv);
        load_floats<T, VEC>(g + j * VEC, gv);
        load_floats<T, VEC>(be + j * VEC, bev);
CAMTL_UNROLL
        for (int e = 0; e < VEC; ++e) out[e] = s.h[k][e] * rstd * ((1.f + gv[e]) * wv[e] + bev[e]) + bv[e];
        store_floats<T, VEC>(y + j * VEC, out);
      }
    }
    if (tid < tail_cols) {
      const int c = nvec * VEC + tid;
      const float scale = (1.f + to_float(g[c])) * to_float(w[c]) + to_float(be[c]);
      y[c] = from_float<T>(s.h_tail * rstd * scale + to_float(bias[c]));
    }
    if (tid == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
  });
}

// The scalar path (VEC = 1) does not hold dx̂ = dy ∘ s_b: it reloads dy (cached) rather than spill.
template <int VEC> constexpr bool kHoldDxhat = VEC > 1;

template <int VEC> struct BwdState {
  float xhat[kRowElems / VEC][VEC];
  float dxhat[kHoldDxhat<VEC> ? kRowElems / VEC : 1][VEC];
  float xhat_t, dxhat_t;
};

// Floats of block.row the backward needs: s_b, Σ dy∘x̂ and Σ dy, per column.
CAMTL_HD int64_t bwd_row_floats(int D) { return 3 * static_cast<int64_t>(D); }

// dx for rows [first, end) of example b (the block's chunk), and the chunk's partials of Σ dy∘x̂ and Σ dy.
// block.row holds, per column, s_b (fixed for the block's example) and the two running sums: keeping
// them out of registers leaves room for x̂ and dx̂ without spills.
template <typename T, int VEC, bool RES, class Block>
CAMTL_HD void bwd_chunk(const Block& block, const BwdArgs& a, int64_t b, int chunk) {
  constexpr int VPT = kRowElems / VEC;
  const int D = a.D, nvec = D / VEC, tail_cols = D - nvec * VEC, threads = block.threads;
  const int64_t R = a.rows / a.batch;
  const int64_t first = b * R + chunk * a.chunk_rows;
  const int64_t end = (first + a.chunk_rows < (b + 1) * R) ? first + a.chunk_rows : (b + 1) * R;
  const int64_t task = a.index[b];
  const T* w = static_cast<const T*>(a.weight);
  const T* g = static_cast<const T*>(a.gamma) + task * a.gamma_row_stride;
  const T* be = static_cast<const T*>(a.beta) + task * a.beta_row_stride;
  float* scale = block.row;
  float* dscale = block.row + D;
  float* dbias = block.row + 2 * D;
  typename Block::template Storage<BwdState<VEC>> st(block);

  block.each([&](int tid) {
CAMTL_UNROLL
    for (int k = 0; k < VPT; ++k) {
      const int j = tid + k * threads;
      if (j < nvec) {
        float wv[VEC], gv[VEC], bev[VEC];
        load_floats<T, VEC>(w + j * VEC, wv);
        load_floats<T, VEC>(g + j * VEC, gv);
        load_floats<T, VEC>(be + j * VEC, bev);
CAMTL_UNROLL
        for (int e = 0; e < VEC; ++e) {
          scale[j * VEC + e] = (1.f + gv[e]) * wv[e] + bev[e];
          dscale[j * VEC + e] = 0.f;
          dbias[j * VEC + e] = 0.f;
        }
      }
    }
    if (tid < tail_cols) {
      const int c = nvec * VEC + tid;
      scale[c] = (1.f + to_float(g[c])) * to_float(w[c]) + to_float(be[c]);
      dscale[c] = 0.f;
      dbias[c] = 0.f;
    }
  });

  for (int64_t row = first; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
    const T* res = RES ? static_cast<const T*>(a.residual) + row * a.residual_row_stride : nullptr;
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_row_stride;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float total[2];  // Σ dx̂∘x̂, Σ dx̂
    block.each_then_sum([&](int tid, float (&partial)[2]) {
      BwdState<VEC>& s = st(tid);
      float acc_xhat = 0.f, acc_one = 0.f;
CAMTL_UNROLL
      for (int k = 0; k < VPT; ++k) {
        const int j = tid + k * threads;
        if (j < nvec) {
          float h[VEC], d[VEC];
          load_sum<T, VEC, RES>(x, res, j * VEC, h);
          load_floats<T, VEC>(dy + j * VEC, d);
CAMTL_UNROLL
          for (int e = 0; e < VEC; ++e) {
            const int c = j * VEC + e;
            const float dxhat = d[e] * scale[c];
            s.xhat[k][e] = (h[e] - mean) * rstd;
            if (kHoldDxhat<VEC>) s.dxhat[k][e] = dxhat;
            dscale[c] += d[e] * s.xhat[k][e];
            dbias[c] += d[e];
            acc_xhat += dxhat * s.xhat[k][e];
            acc_one += dxhat;
          }
        }
      }
      if (tid < tail_cols) {
        const int c = nvec * VEC + tid;
        const float h = to_float(x[c]) + (RES ? to_float(res[c]) : 0.f);
        const float d = to_float(dy[c]);
        s.xhat_t = (h - mean) * rstd;
        s.dxhat_t = d * scale[c];
        dscale[c] += d * s.xhat_t;
        dbias[c] += d;
        acc_xhat += s.dxhat_t * s.xhat_t;
        acc_one += s.dxhat_t;
      }
      partial[0] = acc_xhat;
      partial[1] = acc_one;
    }, total);
    const float c_xhat = total[0] / static_cast<float>(D), c_one = total[1] / static_cast<float>(D);
    T* dx = static_cast<T*>(a.dx) + row * a.dx_row_stride;
    block.each([&](int tid) {
      BwdState<VEC>& s = st(tid);
CAMTL_UNROLL
      for (int k = 0; k < VPT; ++k) {
        const int j = tid + k * threads;
        if (j < nvec) {
          float out[VEC];
CAMTL_UNROLL
          for (int e = 0; e < VEC; ++e) {
            const float dxhat = kHoldDxhat<VEC> ? s.dxhat[k][e] : to_float(dy[j * VEC + e]) * scale[j * VEC + e];
            out[e] = (dxhat - s.xhat[k][e] * c_xhat - c_one) * rstd;
          }
          store_floats<T, VEC>(dx + j * VEC, out);
        }
      }
      if (tid < tail_cols) {
        const int c = nvec * VEC + tid;
        dx[c] = from_float<T>((s.dxhat_t - s.xhat_t * c_xhat - c_one) * rstd);
      }
    });
  }

  const int64_t partial_row = (b * a.chunks + chunk) * static_cast<int64_t>(D);
  block.each([&](int tid) {
CAMTL_UNROLL
    for (int k = 0; k < VPT; ++k) {
      const int j = tid + k * threads;
      if (j < nvec) {
CAMTL_UNROLL
        for (int e = 0; e < VEC; ++e) {
          a.dscale[partial_row + j * VEC + e] = dscale[j * VEC + e];
          a.dbias[partial_row + j * VEC + e] = dbias[j * VEC + e];
        }
      }
    }
    if (tid < tail_cols) {
      const int c = nvec * VEC + tid;
      a.dscale[partial_row + c] = dscale[c];
      a.dbias[partial_row + c] = dbias[c];
    }
  });
}

// Launcher::run<T, VEC, RES>() for (dtype, 16-byte vectors, residual).
template <class Launcher> int dispatch(int dtype, bool vec16, bool residual, Launcher& launcher) {
  return camtl::dispatch(dtype, vec16, residual, launcher, kBadDType);
}

}  // namespace cln
}  // namespace camtl
