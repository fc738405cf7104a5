// Small helpers shared by the CUDA kernels: the CUDA_CHECK / CUBLAS_CHECK macros (errors become
// lasp::Error through LASP_CHECK, naming file, line and rank), the current stream, and a launch
// check that surfaces asynchronous launch errors at the call site.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/check.h"
#include "core/device.h"

#ifndef CUDA_CHECK
#define CUDA_CHECK(expr)                                                          \
  do {                                                                            \
    cudaError_t lasp_err_ = (expr);                                               \
    LASP_CHECK(lasp_err_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(lasp_err_); \
  } while (0)
#endif

#define CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                     \
    cublasStatus_t lasp_st_ = (expr);                                                      \
    LASP_CHECK(lasp_st_ == CUBLAS_STATUS_SUCCESS) << #expr << ": cuBLAS status "           \
                                                  << static_cast<int>(lasp_st_);           \
  } while (0)

// After every kernel launch: catches bad launch configurations (too much shared memory, ...).
#define CUDA_CHECK_LAUNCH(what) \
  do {                          \
    cudaError_t lasp_err_ = cudaGetLastError(); \
    LASP_CHECK(lasp_err_ == cudaSuccess) << (what) << ": kernel launch failed: " \
                                         << cudaGetErrorString(lasp_err_);       \
  } while (0)

namespace lasp {

inline cudaStream_t cuda_stream() { return static_cast<cudaStream_t>(current_stream().handle); }

inline int cuda_current_device() {
  int d = 0;
  CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace lasp
