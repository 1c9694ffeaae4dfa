// The C++ entry points of camtl._C's CUDA code, called by bindings.cpp (which includes no CUDA or torch header).
// Each returns a status: 0 ok, > 0 a cudaError_t, < 0 a refused argument (the op's status_message:
// cln::, film:: or reduce::; the last two fall back to cln's for the codes they share).
#pragma once

#include <cstdint>

#include "film.h"
#include "layer_norm.h"
#include "task_reduce.h"

namespace camtl {

// Launches on `stream` (a cudaStream_t; 0 is the legacy default stream).
int cln_forward(const cln::FwdArgs& args, int dtype, void* stream);
int cln_backward(const cln::BwdArgs& args, int dtype, void* stream);
int film_forward(const film::FwdArgs& args, int dtype, void* stream);
int film_backward(const film::BwdArgs& args, int dtype, void* stream);
int task_sum(const reduce::Args& args, void* stream);

// cudaGetDeviceCount: a status (never an abort) when there is no driver or no device.
int cuda_device_count(int* count);
int cuda_runtime_version(int* version);
// The message for a status: cudaGetErrorString for a CUDA error, cln::status_message for a refused argument.
const char* status_string(int status);

}  // namespace camtl
