// Matrix products: C = alpha * op(A) op(B) + beta * C on 2-D row-major tensors.
// op(X) = X^T when the trans flag is set. CPU: OpenBLAS (fp32 / fp64). CUDA: cuBLASLt with bf16
// or fp32 operands and fp32 accumulation (C bf16 or fp32).
#pragma once

#include "core/tensor.h"

namespace lasp {

void gemm(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
          float alpha = 1.0f, float beta = 0.0f);

// cuBLASLt algorithm tuning (CUDA): on the first call of each GEMM shape, time the heuristic's
// first 8 candidates on the call's operands and keep the fastest (kernels/cublaslt_util.cuh).
// On by default; LASP_GEMM_TUNE=0 (or set_gemm_tuning(false)) keeps cuBLASLt's first choice,
// which makes the choice the same in every process (bitwise-reproducible runs). Shapes cached
// under one setting keep their algorithm when the setting changes.
bool gemm_tuning();
void set_gemm_tuning(bool on);
// What tuning found so far in this process: shapes tuned, shapes where another candidate won,
// and the summed times of the heuristic's first vs the chosen candidates (ms per call).
struct GemmTuneStats {
  int64_t shapes = 0, changed = 0;
  double first_ms = 0.0, chosen_ms = 0.0;
};
GemmTuneStats gemm_tune_stats();
void gemm_tuning_note(float first_ms, float chosen_ms);  // called by the tuner

// Linear layer helpers on [N, in] activations and [out, in] weights (PyTorch layout):
//   y = x W^T;  dx = dy W;  dW += dy^T x  (accumulates, so SP/TP/DP code can sum into it).
void linear_forward(Tensor& y, const Tensor& x, const Tensor& w);
void linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w);

}  // namespace lasp
