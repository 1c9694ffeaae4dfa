// camtl._C: the pybind11 module. No torch and no CUDA header: tensors arrive as data_ptr() integers with their
// sizes and row strides, the stream as its cudaStream_t handle (an integer). The Python side
// (camtl/backends/cuda_ext.py) checks every tensor first; a status from the launcher becomes an exception
// naming the op.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "api.h"

namespace py = pybind11;

#ifndef CAMTL_CUDA_ARCHS
#define CAMTL_CUDA_ARCHS ""
#endif

namespace {

template <class T> const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <class T> T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// A refused argument's message: the op's own table (film and reduce codes extend cln's).
using RefusedMessage = const char* (*)(int);

void raise_on(int status, const char* op, RefusedMessage refused = camtl::cln::status_message) {
  if (status == 0) return;
  const std::string where = std::string("camtl._C.") + op + ": ";
  if (status < 0) throw py::value_error(where + refused(status));
  throw std::runtime_error(where + "CUDA error " + std::to_string(status) + " (" + camtl::status_string(status) +
                           ")");
}

void cln_forward(int dtype, uintptr_t x, int64_t x_row_stride, uintptr_t residual, int64_t residual_row_stride,
                 uintptr_t weight, uintptr_t bias, uintptr_t gamma, int64_t gamma_row_stride, uintptr_t beta,
                 int64_t beta_row_stride, uintptr_t index, uintptr_t y, int64_t y_row_stride, uintptr_t mean,
                 uintptr_t rstd, int64_t rows, int64_t batch, int D, float eps, uintptr_t stream) {
  const camtl::cln::FwdArgs args{cptr<void>(x), x_row_stride, cptr<void>(residual), residual_row_stride,
                                 cptr<void>(weight), cptr<void>(bias), cptr<void>(gamma), gamma_row_stride,
                                 cptr<void>(beta), beta_row_stride, cptr<int64_t>(index), mptr<void>(y),
                                 y_row_stride, mptr<float>(mean), mptr<float>(rstd), rows, batch, D, eps};
  int status;
  {
    py::gil_scoped_release release;
    status = camtl::cln_forward(args, dtype, mptr<void>(stream));
  }
  raise_on(status, "cln_forward");
}

void cln_backward(int dtype, uintptr_t dy, int64_t dy_row_stride, uintptr_t x, int64_t x_row_stride,
                  uintptr_t residual, int64_t residual_row_stride, uintptr_t weight, uintptr_t gamma,
                  int64_t gamma_row_stride, uintptr_t beta, int64_t beta_row_stride, uintptr_t index, uintptr_t mean,
                  uintptr_t rstd, uintptr_t dx, int64_t dx_row_stride, uintptr_t dscale, uintptr_t dbias,
                  int64_t rows, int64_t batch, int64_t chunk_rows, int chunks, int D, uintptr_t stream) {
  const camtl::cln::BwdArgs args{cptr<void>(dy), dy_row_stride, cptr<void>(x), x_row_stride, cptr<void>(residual),
                                 residual_row_stride, cptr<void>(weight), cptr<void>(gamma), gamma_row_stride,
                                 cptr<void>(beta), beta_row_stride, cptr<int64_t>(index), cptr<float>(mean),
                                 cptr<float>(rstd), mptr<void>(dx), dx_row_stride, mptr<float>(dscale),
                                 mptr<float>(dbias), rows, batch, chunk_rows, chunks, D};
  int status;
  {
    py::gil_scoped_release release;
    status = camtl::cln_backward(args, dtype, mptr<void>(stream));
  }
  raise_on(status, "cln_backward");
}

void film_forward(int dtype, uintptr_t x, int64_t x_row_stride, uintptr_t gamma, int64_t gamma_row_stride,
                  uintptr_t beta, int64_t beta_row_stride, uintptr_t index, uintptr_t out, int64_t out_row_stride,
                  int64_t batch, int64_t seq, int D, bool shared_x, uintptr_t stream) {
  const camtl::film::FwdArgs args{cptr<void>(x), x_row_stride, cptr<void>(gamma), gamma_row_stride,
                                  cptr<void>(beta), beta_row_stride, cptr<int64_t>(index), mptr<void>(out),
                                  out_row_stride, batch, seq, D, shared_x ? 1 : 0};
  int status;
  {
    py::gil_scoped_release release;
    status = camtl::film_forward(args, dtype, mptr<void>(stream));
  }
  raise_on(status, "film_forward", camtl::film::status_message);
}

void film_backward(int dtype, uintptr_t dy, int64_t dy_row_stride, uintptr_t x, int64_t x_row_stride,
                   uintptr_t gamma, int64_t gamma_row_stride, uintptr_t index, uintptr_t dx, int64_t dx_row_stride,
                   uintptr_t dscale, uintptr_t dshift, int64_t batch, int64_t seq, int64_t chunk_rows, int chunks,
                   int D, bool shared_x, uintptr_t stream) {
  const camtl::film::BwdArgs args{cptr<void>(dy), dy_row_stride, cptr<void>(x), x_row_stride, cptr<void>(gamma),
                                  gamma_row_stride, cptr<int64_t>(index), mptr<void>(dx), dx_row_stride,
                                  mptr<float>(dscale), mptr<float>(dshift), batch, seq, chunk_rows, chunks, D,
                                  shared_x ? 1 : 0};
  int status;
  {
    py::gil_scoped_release release;
    status = camtl::film_backward(args, dtype, mptr<void>(stream));
  }
  raise_on(status, "film_backward", camtl::film::status_message);
}

void task_sum(uintptr_t partials, uintptr_t out, uintptr_t partials2, uintptr_t out2, uintptr_t index, int64_t batch,
              int64_t parts, int64_t features, int64_t tasks, uintptr_t stream) {
  const camtl::reduce::Args args{{cptr<float>(partials), cptr<float>(partials2)}, {mptr<float>(out), mptr<float>(out2)},
                                 cptr<int64_t>(index), batch, parts, features, tasks};
  int status;
  {
    py::gil_scoped_release release;
    status = camtl::task_sum(args, mptr<void>(stream));
  }
  raise_on(status, "task_sum", camtl::reduce::status_message);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "camtl's CUDA kernels (torch-free; see camtl.backends.cuda_ext for the checked wrappers)";
  m.attr("ARCHS") = std::string(CAMTL_CUDA_ARCHS);
  m.attr("MAX_D") = camtl::cln::kMaxD;
  m.attr("FILM_SHARED_ROWS") = camtl::film::kSharedRows;  // chunk_rows of a shared x's FiLM backward
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");  // the dtype codes 0, 1, 2
  m.def("device_count", []() {
    int count = 0;
    const int status = camtl::cuda_device_count(&count);
    return py::make_tuple(status, count, std::string(status ? camtl::status_string(status) : "ok"));
  }, "(status, count, message) from cudaGetDeviceCount; a non-zero status (no driver, no device) never aborts");
  m.def("runtime_version", []() {
    int version = 0;
    camtl::cuda_runtime_version(&version);
    return version;
  }, "The CUDA runtime version camtl._C links (statically), e.g. 13000");
  m.def("cln_forward", &cln_forward, "Conditional layer norm forward (pointers as integers)", py::arg("dtype"),
        py::arg("x"), py::arg("x_row_stride"), py::arg("residual"), py::arg("residual_row_stride"),
        py::arg("weight"), py::arg("bias"), py::arg("gamma"), py::arg("gamma_row_stride"), py::arg("beta"),
        py::arg("beta_row_stride"), py::arg("index"), py::arg("y"), py::arg("y_row_stride"), py::arg("mean"),
        py::arg("rstd"), py::arg("rows"), py::arg("batch"), py::arg("D"), py::arg("eps"), py::arg("stream"));
  m.def("cln_backward", &cln_backward, "Conditional layer norm backward: dx and the fp32 [B, chunks, D] partials",
        py::arg("dtype"), py::arg("dy"), py::arg("dy_row_stride"), py::arg("x"), py::arg("x_row_stride"),
        py::arg("residual"), py::arg("residual_row_stride"), py::arg("weight"), py::arg("gamma"),
        py::arg("gamma_row_stride"), py::arg("beta"), py::arg("beta_row_stride"), py::arg("index"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dx_row_stride"), py::arg("dscale"),
        py::arg("dbias"), py::arg("rows"), py::arg("batch"), py::arg("chunk_rows"), py::arg("chunks"),
        py::arg("D"), py::arg("stream"));
  m.def("film_forward", &film_forward, "FiLM forward: out [B·L, D] (pointers as integers)", py::arg("dtype"),
        py::arg("x"), py::arg("x_row_stride"), py::arg("gamma"), py::arg("gamma_row_stride"), py::arg("beta"),
        py::arg("beta_row_stride"), py::arg("index"), py::arg("out"), py::arg("out_row_stride"), py::arg("batch"),
        py::arg("seq"), py::arg("D"), py::arg("shared_x"), py::arg("stream"));
  m.def("film_backward", &film_backward, "FiLM backward: dx and the fp32 [B, chunks, D] partials of Σ dy∘x, Σ dy",
        py::arg("dtype"), py::arg("dy"), py::arg("dy_row_stride"), py::arg("x"), py::arg("x_row_stride"),
        py::arg("gamma"), py::arg("gamma_row_stride"), py::arg("index"), py::arg("dx"), py::arg("dx_row_stride"),
        py::arg("dscale"), py::arg("dshift"), py::arg("batch"), py::arg("seq"), py::arg("chunk_rows"),
        py::arg("chunks"), py::arg("D"), py::arg("shared_x"), py::arg("stream"));
  m.def("task_sum", &task_sum,
        "Per-task sums of fp32 partials [B, P, F] into [G, F] (fp64, fixed order); partials2/out2 optional (0)",
        py::arg("partials"), py::arg("out"), py::arg("partials2"), py::arg("out2"), py::arg("index"),
        py::arg("batch"), py::arg("parts"), py::arg("features"), py::arg("tasks"), py::arg("stream"));
}
