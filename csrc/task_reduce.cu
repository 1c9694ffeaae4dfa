// The per-task sum kernel: the program of task_reduce.h, run by DeviceBlock.
#include <cuda_runtime.h>

#include "api.h"

namespace camtl {
namespace {

__global__ void __launch_bounds__(reduce::kThreads) task_sum_kernel(const reduce::Args args) {
  const DeviceBlock block{static_cast<int>(blockDim.x), nullptr, nullptr};
  reduce::sum_block(block, args, static_cast<int64_t>(blockIdx.x));
}

}  // namespace

int task_sum(const reduce::Args& args, void* stream) {
  const int status = reduce::check(args);
  if (status != cln::kOk || args.tasks * args.features == 0) return status;
  const auto blocks = static_cast<unsigned>(args.tasks * reduce::tiles_for(args.features));
  task_sum_kernel<<<blocks, reduce::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace camtl
