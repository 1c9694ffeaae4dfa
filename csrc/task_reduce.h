// The deterministic per-task sum, the second stage of the backward reductions (shared by task_reduce.cu and the
// host harness):
//
//   out[g, f] = Σ_{b: index[b] = g} Σ_p partials[b, p, f]      partials [B, P, F] fp32, out [G, F] fp32
//
// One thread per (g, f) adds in a fixed order (b, then p, ascending) in fp64 and rounds once to fp32: no
// atomics, so the bits repeat run to run, and the host harness computes the device's exact bits. A task absent
// from the batch gets exact zeros. Up to kMaxArrays partial arrays of one shape share a launch (FiLM's Σ dy∘x
// and Σ dy).
#pragma once

#include <cstdint>

#include "block.h"
#include "layer_norm.h"  // the status codes every op shares

namespace camtl {
namespace reduce {

constexpr int kThreads = 128;    // features per block
constexpr int kMaxArrays = 2;

enum Status : int { kBadShape = -30 };

inline const char* status_message(int status) {
  if (status == kBadShape) return "B, P, F and G must be >= 0, with fewer than 2^31 blocks";
  return cln::status_message(status);
}

struct Args {
  const float* partials[kMaxArrays];  // [B, P, F] contiguous (null when B·P = 0)
  float* out[kMaxArrays];             // [G, F] contiguous; the second null when there is one array
  const int64_t* index;               // [B] task of each example, in [0, G)
  int64_t batch, parts, features, tasks;  // B, P, F, G
};

CAMTL_HD int64_t tiles_for(int64_t features) { return (features + kThreads - 1) / kThreads; }

inline int check(const Args& a) {
  if (a.batch < 0 || a.parts < 0 || a.features < 0 || a.tasks < 0) return kBadShape;
  if (a.tasks * tiles_for(a.features) >= (int64_t(1) << 31)) return kBadShape;
  if (a.tasks == 0 || a.features == 0) return cln::kOk;
  if (!a.out[0]) return cln::kBadPointer;
  for (int k = 0; k < kMaxArrays; ++k)
    if (a.out[k] && a.batch > 0 && a.parts > 0 && !a.partials[k]) return cln::kBadPointer;
  if (a.batch && !a.index) return cln::kBadPointer;
  return cln::kOk;
}

// Block `id` of the grid: task id / tiles, features of tile id % tiles, one per thread.
template <class Block> CAMTL_HD void sum_block(const Block& block, const Args& a, int64_t id) {
  const int64_t tiles = tiles_for(a.features);
  const int64_t task = id / tiles;
  const int64_t first = (id % tiles) * kThreads;
  block.each([&](int tid) {
    const int64_t f = first + tid;
    if (f >= a.features) return;
CAMTL_UNROLL
    for (int k = 0; k < kMaxArrays; ++k) {
      if (a.out[k] == nullptr) continue;
      double total = 0.0;
      for (int64_t b = 0; b < a.batch; ++b) {
        if (a.index[b] != task) continue;
        const float* p = a.partials[k] + b * a.parts * a.features + f;
        for (int64_t part = 0; part < a.parts; ++part) total += static_cast<double>(p[part * a.features]);
      }
      a.out[k][task * a.features + f] = static_cast<float>(total);
    }
  });
}

}  // namespace reduce
}  // namespace camtl
