// The block-level execution interface the row programs are written against.
//
// A row program is a sequence of phases. Each phase runs once per thread of the block and may end in a
// block-wide sum. Two implementations run the same program:
//   DeviceBlock (here): this CUDA thread runs its phase, then a warp butterfly + shared memory sum;
//   HostBlock (host_block.h): the CPU runs every thread's phase in turn, then the same sum in the same order.
// A program may also use `row`, one float per column of the row, where each thread touches only the
// columns it owns (so it needs no barrier): the device keeps it in shared memory, to spare registers.
// The sum order is fixed (a xor butterfly within each warp of 32, then the warp totals in warp order), so
// the result is bitwise repeatable, and the host harness checks the arithmetic the device runs.
#pragma once

#include "camtl_types.h"

namespace camtl {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;   // per block; the kernels' __launch_bounds__
constexpr int kMaxSums = 2;        // values one block sum reduces at once

#if defined(__CUDACC__)
struct DeviceBlock {
  int threads;
  float* scratch;  // shared memory, kMaxThreads / kWarp * kMaxSums floats
  float* row;      // shared memory, one float per column (null when the program needs none)

  // Per-thread state: on the device each thread holds its own, in registers.
  template <class State> struct Storage {
    State state;
    __device__ explicit Storage(const DeviceBlock&) {}
    __device__ State& operator()(int) { return state; }
  };

  // fn(tid) for this thread.
  template <class Fn> __device__ void each(Fn fn) const { fn(static_cast<int>(threadIdx.x)); }

  // fn(tid, partial) for this thread, then total[i] = Σ_threads partial[i] on every thread.
  template <int N, class Fn> __device__ void each_then_sum(Fn fn, float (&total)[N]) const {
    static_assert(N <= kMaxSums, "raise kMaxSums");
    float v[N];
    fn(static_cast<int>(threadIdx.x), v);
CAMTL_UNROLL
    for (int i = 0; i < N; ++i) {
CAMTL_UNROLL
      for (int m = kWarp / 2; m >= 1; m >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], m);
    }
    const int warp = threadIdx.x / kWarp;
    __syncthreads();  // the previous sum's readers are done with scratch
    if (threadIdx.x % kWarp == 0) {
CAMTL_UNROLL
      for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
    }
    __syncthreads();
CAMTL_UNROLL
    for (int i = 0; i < N; ++i) {
      float t = 0.f;
      for (int w = 0; w < threads / kWarp; ++w) t += scratch[w * N + i];
      total[i] = t;
    }
  }
};
#endif

}  // namespace camtl
