// Plain C++ interface of the message-passing launchers (no nanobind, no CUDA headers), shared by
// module.cpp, message_passing_cuda_emulation.cpp and message_passing_cuda.cu.
#pragma once

#include <cstdint>
#include <string>

#include "message_passing.h"

namespace e3mp {

// The CUDA kernel's logic on CPU threads, for the tests (message_passing_cuda_emulation.cpp).
// Fills p.ds / p.dv (every element). Threads over receivers (num_threads <= 0: hardware
// concurrency). Returns the number of receivers whose input was invalid (their outputs are NaN).
int64_t message_passing_cuda_emulated(const Params<float>& p, int num_threads);
int64_t message_passing_cuda_emulated(const Params<double>& p, int num_threads);

#ifdef E3RELAX_WITH_CUDA
// CUDA launcher (message_passing_cuda.cu): device pointers, `stream` a cudaStream_t as an
// integer, `device` the arrays' CUDA device. Forward only, asynchronous (no host sync). Returns ""
// on success, else the error. Invalid receivers get NaN outputs.
std::string message_passing_cuda(const Params<float>& p, int device, uintptr_t stream);
std::string message_passing_cuda(const Params<double>& p, int device, uintptr_t stream);
#endif

}  // namespace e3mp
