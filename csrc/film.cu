// The FiLM kernels: the programs of film.h, run by DeviceBlock (one thread per unit, no block sums).
#include <cuda_runtime.h>

#include "api.h"

namespace camtl {
namespace {

template <typename T, int VEC, bool SHARED>
__global__ void __launch_bounds__(film::kThreads) film_fwd_kernel(const film::FwdArgs args) {
  const DeviceBlock block{static_cast<int>(blockDim.x), nullptr, nullptr};
  film::fwd_row<T, VEC, SHARED>(block, args, static_cast<int64_t>(blockIdx.x));
}

template <typename T, int VEC, bool SHARED>
__global__ void __launch_bounds__(film::kThreads) film_bwd_kernel(const film::BwdArgs args) {
  const DeviceBlock block{static_cast<int>(blockDim.x), nullptr, nullptr};
  film::bwd_block<T, VEC, SHARED>(block, args, static_cast<int64_t>(blockIdx.x));
}

struct FwdLauncher {
  const film::FwdArgs& args;
  cudaStream_t stream;
  template <typename T, int VEC, bool SHARED> int run() {
    const auto rows = static_cast<unsigned>(args.batch * args.seq);
    film_fwd_kernel<T, VEC, SHARED><<<rows, film::threads_for(args.D, VEC), 0, stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  }
};

struct BwdLauncher {
  const film::BwdArgs& args;
  cudaStream_t stream;
  template <typename T, int VEC, bool SHARED> int run() {
    const auto blocks = static_cast<unsigned>(film::bwd_blocks(args, VEC));
    if (blocks == 0) return cln::kOk;
    film_bwd_kernel<T, VEC, SHARED><<<blocks, film::threads_for(args.D, VEC), 0, stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace

int film_forward(const film::FwdArgs& args, int dtype, void* stream) {
  const int status = film::fwd_check(args, dtype);
  if (status != cln::kOk || args.batch * args.seq == 0) return status;
  FwdLauncher launcher{args, static_cast<cudaStream_t>(stream)};
  return film::dispatch(dtype, film::fwd_vec16(args, dtype), args.shared_x != 0, launcher);
}

int film_backward(const film::BwdArgs& args, int dtype, void* stream) {
  const int status = film::bwd_check(args, dtype);
  if (status != cln::kOk || args.seq == 0) return status;
  BwdLauncher launcher{args, static_cast<cudaStream_t>(stream)};
  return film::dispatch(dtype, film::bwd_vec16(args, dtype), args.shared_x != 0, launcher);
}

}  // namespace camtl
