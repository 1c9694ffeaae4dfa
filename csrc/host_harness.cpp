// The host harness: runs the kernels' programs (layer_norm.h, film.h, task_reduce.h) over a whole grid on the CPU, with
// HostBlock standing in for the CUDA block. Built by tests/test_csrc_host.py with g++ and called with ctypes;
// the flat signatures match the bindings' (bindings.cpp), with host pointers.
#include <cstdint>
#include <vector>

#include "film.h"
#include "host_block.h"
#include "layer_norm.h"
#include "task_reduce.h"

namespace {

using namespace camtl;

struct HostFwd {
  const cln::FwdArgs& args;
  int* vec_used;
  template <typename T, int VEC, bool RES> int run() {
    const int threads = cln::threads_for(args.D, VEC);
    if (threads == 0) return cln::kBadD;
    *vec_used = VEC;
    const HostBlock block{threads, nullptr};
    for (int64_t row = 0; row < args.rows; ++row) cln::fwd_row<T, VEC, RES>(block, args, row);
    return cln::kOk;
  }
};

struct HostBwd {
  const cln::BwdArgs& args;
  int* vec_used;
  template <typename T, int VEC, bool RES> int run() {
    const int threads = cln::threads_for(args.D, VEC);
    if (threads == 0) return cln::kBadD;
    *vec_used = VEC;
    std::vector<float> row(static_cast<size_t>(cln::bwd_row_floats(args.D)));
    const HostBlock block{threads, row.data()};
    for (int64_t b = 0; b < args.batch; ++b)
      for (int chunk = 0; chunk < args.chunks; ++chunk) cln::bwd_chunk<T, VEC, RES>(block, args, b, chunk);
    return cln::kOk;
  }
};

struct HostFilmFwd {
  const film::FwdArgs& args;
  int* vec_used;
  template <typename T, int VEC, bool SHARED> int run() {
    *vec_used = VEC;
    const HostBlock block{film::threads_for(args.D, VEC), nullptr};
    for (int64_t row = 0; row < args.batch * args.seq; ++row) film::fwd_row<T, VEC, SHARED>(block, args, row);
    return cln::kOk;
  }
};

struct HostFilmBwd {
  const film::BwdArgs& args;
  int* vec_used;
  template <typename T, int VEC, bool SHARED> int run() {
    *vec_used = VEC;
    const HostBlock block{film::threads_for(args.D, VEC), nullptr};
    for (int64_t id = 0; id < film::bwd_blocks(args, VEC); ++id) film::bwd_block<T, VEC, SHARED>(block, args, id);
    return cln::kOk;
  }
};

}  // namespace

extern "C" {

// Returns a status (0 ok); *vec_used gets the elements per vector of the path taken (1: scalar).
int camtl_host_cln_forward(int dtype, const void* x, int64_t x_row_stride, const void* residual,
                           int64_t residual_row_stride, const void* weight, const void* bias, const void* gamma,
                           int64_t gamma_row_stride, const void* beta, int64_t beta_row_stride,
                           const int64_t* index, void* y, int64_t y_row_stride, float* mean, float* rstd,
                           int64_t rows, int64_t batch, int D, float eps, int* vec_used) {
  const cln::FwdArgs args{x, x_row_stride, residual, residual_row_stride, weight, bias, gamma, gamma_row_stride,
                          beta, beta_row_stride, index, y, y_row_stride, mean, rstd, rows, batch, D, eps};
  *vec_used = 0;
  const int status = cln::fwd_check(args, dtype);
  if (status != cln::kOk || rows == 0) return status;
  HostFwd launcher{args, vec_used};
  return cln::dispatch(dtype, cln::fwd_vec16(args, dtype), residual != nullptr, launcher);
}

int camtl_host_cln_backward(int dtype, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                            const void* residual, int64_t residual_row_stride, const void* weight,
                            const void* gamma, int64_t gamma_row_stride, const void* beta, int64_t beta_row_stride,
                            const int64_t* index, const float* mean, const float* rstd, void* dx,
                            int64_t dx_row_stride, float* dscale, float* dbias, int64_t rows, int64_t batch,
                            int64_t chunk_rows, int chunks, int D, int* vec_used) {
  const cln::BwdArgs args{dy, dy_row_stride, x, x_row_stride, residual, residual_row_stride, weight,
                          gamma, gamma_row_stride, beta, beta_row_stride, index, mean, rstd, dx, dx_row_stride,
                          dscale, dbias, rows, batch, chunk_rows, chunks, D};
  *vec_used = 0;
  const int status = cln::bwd_check(args, dtype);
  if (status != cln::kOk || rows == 0) return status;
  HostBwd launcher{args, vec_used};
  return cln::dispatch(dtype, cln::bwd_vec16(args, dtype), residual != nullptr, launcher);
}

int camtl_host_film_forward(int dtype, const void* x, int64_t x_row_stride, const void* gamma,
                            int64_t gamma_row_stride, const void* beta, int64_t beta_row_stride, const int64_t* index,
                            void* out, int64_t out_row_stride, int64_t batch, int64_t seq, int D, int shared_x,
                            int* vec_used) {
  const film::FwdArgs args{x, x_row_stride, gamma, gamma_row_stride, beta, beta_row_stride, index, out,
                           out_row_stride, batch, seq, D, shared_x};
  *vec_used = 0;
  const int status = film::fwd_check(args, dtype);
  if (status != cln::kOk || batch * seq == 0) return status;
  HostFilmFwd launcher{args, vec_used};
  return film::dispatch(dtype, film::fwd_vec16(args, dtype), shared_x != 0, launcher);
}

int camtl_host_film_backward(int dtype, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                             const void* gamma, int64_t gamma_row_stride, const int64_t* index, void* dx,
                             int64_t dx_row_stride, float* dscale, float* dshift, int64_t batch, int64_t seq,
                             int64_t chunk_rows, int chunks, int D, int shared_x, int* vec_used) {
  const film::BwdArgs args{dy, dy_row_stride, x, x_row_stride, gamma, gamma_row_stride, index, dx, dx_row_stride,
                           dscale, dshift, batch, seq, chunk_rows, chunks, D, shared_x};
  *vec_used = 0;
  const int status = film::bwd_check(args, dtype);
  if (status != cln::kOk || seq == 0) return status;
  HostFilmBwd launcher{args, vec_used};
  return film::dispatch(dtype, film::bwd_vec16(args, dtype), shared_x != 0, launcher);
}

int camtl_host_task_sum(const float* partials, float* out, const float* partials2, float* out2, const int64_t* index,
                        int64_t batch, int64_t parts, int64_t features, int64_t tasks) {
  const reduce::Args args{{partials, partials2}, {out, out2}, index, batch, parts, features, tasks};
  const int status = reduce::check(args);
  if (status != cln::kOk) return status;
  const HostBlock block{reduce::kThreads, nullptr};
  for (int64_t id = 0; id < tasks * reduce::tiles_for(features); ++id) reduce::sum_block(block, args, id);
  return cln::kOk;
}

// The conversions the kernels use, for testing them against torch's.
void camtl_host_float_to_half(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half_bits(src[i]);
}
void camtl_host_half_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}
void camtl_host_float_to_bfloat16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bfloat16_bits(src[i]);
}

const char* camtl_host_status_message(int status) { return cln::status_message(status); }
const char* camtl_host_film_status_message(int status) { return film::status_message(status); }
const char* camtl_host_reduce_status_message(int status) { return reduce::status_message(status); }

}  // extern "C"
