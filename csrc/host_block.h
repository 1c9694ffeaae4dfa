// HostBlock: runs a row program's phases for every thread of a block on the CPU, with the device's sum order.
#pragma once

#include <vector>

#include "block.h"

namespace camtl {

struct HostBlock {
  int threads;
  float* row;  // one float per column, or null

  template <class State> struct Storage {
    std::vector<State> states;
    explicit Storage(const HostBlock& block) : states(static_cast<size_t>(block.threads)) {}
    State& operator()(int tid) { return states[static_cast<size_t>(tid)]; }
  };

  template <class Fn> void each(Fn fn) const {
    for (int tid = 0; tid < threads; ++tid) fn(tid);
  }

  template <int N, class Fn> void each_then_sum(Fn fn, float (&total)[N]) const {
    std::vector<float> v(static_cast<size_t>(threads) * N);
    for (int tid = 0; tid < threads; ++tid) {
      float partial[N];
      fn(tid, partial);
      for (int i = 0; i < N; ++i) v[static_cast<size_t>(tid) * N + i] = partial[i];
    }
    for (int i = 0; i < N; ++i) {
      float t = 0.f;
      for (int w = 0; w < threads / kWarp; ++w) t += warp_butterfly(&v[static_cast<size_t>(w) * kWarp * N + i], N);
      total[i] = t;
    }
  }

  // Lane 0's value after __shfl_xor_sync steps 16, 8, 4, 2, 1 (every lane ends with the same bits).
  static float warp_butterfly(const float* lane0, int stride) {
    float lanes[kWarp];
    for (int l = 0; l < kWarp; ++l) lanes[l] = lane0[l * stride];
    for (int m = kWarp / 2; m >= 1; m >>= 1) {
      float next[kWarp];
      for (int l = 0; l < kWarp; ++l) next[l] = lanes[l] + lanes[l ^ m];
      for (int l = 0; l < kWarp; ++l) lanes[l] = next[l];
    }
    return lanes[0];
  }
};

}  // namespace camtl
