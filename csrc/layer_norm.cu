// The conditional layer norm kernels: the row programs of layer_norm.h, run by DeviceBlock.
#include <cuda_runtime.h>

#include "api.h"

namespace camtl {
namespace {

template <typename T, int VEC, bool RES>
__global__ void __launch_bounds__(kMaxThreads) cln_fwd_kernel(const cln::FwdArgs args) {
  __shared__ float scratch[kMaxThreads / kWarp * kMaxSums];
  const DeviceBlock block{static_cast<int>(blockDim.x), scratch, nullptr};
  cln::fwd_row<T, VEC, RES>(block, args, static_cast<int64_t>(blockIdx.x));
}

template <typename T, int VEC, bool RES>
__global__ void __launch_bounds__(kMaxThreads) cln_bwd_kernel(const cln::BwdArgs args) {
  __shared__ float scratch[kMaxThreads / kWarp * kMaxSums];
  extern __shared__ float row[];  // cln::bwd_row_floats(D)
  const DeviceBlock block{static_cast<int>(blockDim.x), scratch, row};
  cln::bwd_chunk<T, VEC, RES>(block, args, static_cast<int64_t>(blockIdx.x / args.chunks),
                              static_cast<int>(blockIdx.x % args.chunks));
}

struct FwdLauncher {
  const cln::FwdArgs& args;
  cudaStream_t stream;
  template <typename T, int VEC, bool RES> int run() {
    const int threads = cln::threads_for(args.D, VEC);
    if (threads == 0) return cln::kBadD;
    cln_fwd_kernel<T, VEC, RES><<<static_cast<unsigned>(args.rows), threads, 0, stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  }
};

struct BwdLauncher {
  const cln::BwdArgs& args;
  cudaStream_t stream;
  template <typename T, int VEC, bool RES> int run() {
    const int threads = cln::threads_for(args.D, VEC);
    if (threads == 0) return cln::kBadD;
    const auto blocks = static_cast<unsigned>(args.batch * args.chunks);
    const int row_bytes = static_cast<int>(sizeof(float) * cln::bwd_row_floats(args.D));
    if (row_bytes > 48 * 1024) {  // past the default limit of dynamic shared memory: opt in (sm_80+ has >= 99 KB)
      const cudaError_t err = cudaFuncSetAttribute(cln_bwd_kernel<T, VEC, RES>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, row_bytes);
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    cln_bwd_kernel<T, VEC, RES><<<blocks, threads, row_bytes, stream>>>(args);
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace

int cln_forward(const cln::FwdArgs& args, int dtype, void* stream) {
  const int status = cln::fwd_check(args, dtype);
  if (status != cln::kOk || args.rows == 0) return status;
  FwdLauncher launcher{args, static_cast<cudaStream_t>(stream)};
  return cln::dispatch(dtype, cln::fwd_vec16(args, dtype), args.residual != nullptr, launcher);
}

int cln_backward(const cln::BwdArgs& args, int dtype, void* stream) {
  const int status = cln::bwd_check(args, dtype);
  if (status != cln::kOk || args.rows == 0) return status;
  BwdLauncher launcher{args, static_cast<cudaStream_t>(stream)};
  return cln::dispatch(dtype, cln::bwd_vec16(args, dtype), args.residual != nullptr, launcher);
}

int cuda_device_count(int* count) {
  *count = 0;
  return static_cast<int>(cudaGetDeviceCount(count));
}

int cuda_runtime_version(int* version) { return static_cast<int>(cudaRuntimeGetVersion(version)); }

const char* status_string(int status) {
  if (status > 0) return cudaGetErrorString(static_cast<cudaError_t>(status));
  return cln::status_message(status);
}

}  // namespace camtl
