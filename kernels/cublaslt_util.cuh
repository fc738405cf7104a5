// What the cuBLASLt GEMMs (gemm.cu, gemm_fp8.cu, gemm_fp4.cu) share: one handle and one workspace
// per (user, device), the descriptor set of one matmul, and the zero-padded output copy for
// problems whose C cuBLASLt cannot take as is.
//
// Each user (the bf16/fp32 GEMM, the FP8 GEMM, the FP4 GEMM) has its own workspace, so GEMMs of
// different kinds issued on different streams never share one. Callers serialise their own use
// of a context (each file holds a mutex around descriptor set-up, algorithm cache and launch).
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"

namespace lasp {

constexpr size_t kLtWorkspaceBytes = 32u << 20;

enum class LtUser { Gemm, Fp8, Fp4, Count };

struct LtContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;  // kLtWorkspaceBytes of device memory
};

// The context of `user` on CUDA device `dev`, created on first use (defined in gemm.cu; not
// thread-safe by itself: call it under the caller's mutex).
LtContext& lt_context(LtUser user, int dev);

struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescriptors() = default;
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// C as cuBLASLt gets it: `c` itself when it is [mp, np] and 16-byte aligned, else a zeroed
// [mp, np] copy that holds c's values when keep_values (beta != 0). finish() copies the [m, n]
// part of the copy back into c.
struct PaddedOutput {
  Tensor& c;
  Tensor run;
  bool padded = false;

  PaddedOutput(Tensor& out, int64_t mp, int64_t np, bool keep_values) : c(out), run(out) {
    const int64_t m = c.dim(0), n = c.dim(1);
    padded = mp != m || np != n || reinterpret_cast<uintptr_t>(c.raw()) % 16 != 0;
    if (!padded) return;
    const size_t es = dtype_size(c.dtype());
    run = Tensor::empty({mp, np}, c.dtype(), c.device());
    CUDA_CHECK(cudaMemsetAsync(run.raw(), 0, run.nbytes(), cuda_stream()));
    if (keep_values)
      CUDA_CHECK(cudaMemcpy2DAsync(run.raw(), np * es, c.raw(), n * es, n * es,
                                   static_cast<size_t>(m), cudaMemcpyDeviceToDevice,
                                   cuda_stream()));
  }
  void finish() {
    if (!padded) return;
    const int64_t m = c.dim(0), n = c.dim(1), np = run.dim(1);
    const size_t es = dtype_size(c.dtype());
    CUDA_CHECK(cudaMemcpy2DAsync(c.raw(), n * es, run.raw(), np * es, n * es,
                                 static_cast<size_t>(m), cudaMemcpyDeviceToDevice, cuda_stream()));
  }
};

}  // namespace lasp
