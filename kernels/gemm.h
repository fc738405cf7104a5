// Matrix products: C = alpha * op(A) op(B) + beta * C on 2-D row-major tensors.
// op(X) = X^T when the trans flag is set. CPU: OpenBLAS (fp32 / fp64). CUDA: cuBLASLt with bf16
// or fp32 operands and fp32 accumulation (C bf16 or fp32).
#pragma once

#include "core/tensor.h"

namespace lasp {

void gemm(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
          float alpha = 1.0f, float beta = 0.0f);

// Linear layer helpers on [N, in] activations and [out, in] weights (PyTorch layout):
//   y = x W^T;  dx = dy W;  dW += dy^T x  (accumulates, so SP/TP/DP code can sum into it).
void linear_forward(Tensor& y, const Tensor& x, const Tensor& w);
void linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w);

}  // namespace lasp
