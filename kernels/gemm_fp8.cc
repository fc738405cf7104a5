// gemm_fp8 dispatch: CUDA tensors go to gemm_fp8_cuda (gemm_fp8.cu), CPU tensors to the exact
// emulation in quantize.cc.
#include "kernels/gemm_fp8.h"

#include <string>

#include "core/env.h"
#include "core/profile.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
void gemm_fp8_cuda(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha, float beta,
                   bool fast_accum, Fp8GemmBackend backend, const Fp8KernelConfig& cfg);
#endif

Fp8GemmBackend fp8_gemm_backend_from_env() {
  const int choice = env_choice("LASP_FP8_GEMM", {"auto", "cublaslt", "lasp"});
  return choice == 2   ? Fp8GemmBackend::Lasp
         : choice == 1 ? Fp8GemmBackend::CublasLt
                       : Fp8GemmBackend::Auto;
}

bool fp8_auto_prefers_lasp(int64_t n, int64_t k, Fp8Scaling a, Fp8Scaling b, bool c_bf16, float beta) {
  (void)a;
  // A 1x128 B (the block-scaled weight gradients) ran 1.1-1.5x slower in ours than in cuBLASLt;
  // N = 128256 (the LM head) 14% slower.
  return b != Fp8Scaling::Block1x128 && c_bf16 && beta == 0.0f && k <= 4096 && n <= 8192;
}

void gemm_fp8(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha, float beta,
              bool fast_accum) {
  // Read once: gemm_fp8 runs hundreds of times per training step.
  static const Fp8GemmBackend backend = fp8_gemm_backend_from_env();
  gemm_fp8_with(c, a, b, alpha, beta, fast_accum, backend);
}

void gemm_fp8_with(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha, float beta,
                   bool fast_accum, Fp8GemmBackend backend, Fp8KernelConfig cfg) {
  ProfileScope profile("gemm_fp8");
  LASP_CHECK(a.codes.defined() && b.codes.defined() && c.defined())
      << "gemm_fp8: operands and output must be defined";
  if (profile_shapes_enabled()) {
    // "gemm_fp8 MxNxK ->bf16+ 1x128.128x128": C [M, N] = A [M, K] B [N, K]^T, "+" when C
    // accumulates, then the scalings of A and B when either is block-scaled.
    const bool block = a.scaling != Fp8Scaling::PerTensor || b.scaling != Fp8Scaling::PerTensor;
    profile.gemm("gemm_fp8", a.rows(), b.rows(), a.cols(),
                 std::string(fast_accum ? " fast" : "") + " ->" + dtype_name(c.dtype()) +
                     (beta != 0.0f ? "+" : "") +
                     (block ? std::string(" ") + fp8_scaling_name(a.scaling) + "." +
                                  fp8_scaling_name(b.scaling)
                            : ""));
  }
  check_same_device(a.codes, b.codes, "gemm_fp8");
  check_same_device(a.codes, c, "gemm_fp8");
  if (c.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return gemm_fp8_cuda(c, a, b, alpha, beta, fast_accum, backend, cfg);
#endif
  }
  (void)backend;
  (void)cfg;
  LASP_CHECK(c.dtype() == DType::F32) << "gemm_fp8 on CPU writes fp32, got " << c.str();
  Tensor prod = Tensor::empty(c.shape(), DType::F32);
  gemm_fp8_emulated(prod, a, b);
  float* out = c.data<float>();
  const float* p = prod.data<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    out[i] = alpha * p[i] + (beta == 0.0f ? 0.0f : beta * out[i]);
}

#ifndef LASP_HAVE_CUDA
int64_t gemm_fp8_fallback_count() { return 0; }
int64_t gemm_fp8_lasp_launches() { return 0; }
bool gemm_fp8_lasp_available() { return false; }
#endif

}  // namespace lasp
