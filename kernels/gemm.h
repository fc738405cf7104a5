// Matrix products: C = alpha * op(A) op(B) + beta * C on 2-D row-major tensors.
// op(X) = X^T when the trans flag is set. CPU: OpenBLAS (fp32 / fp64). CUDA: cuBLASLt with bf16
// or fp32 operands and fp32 accumulation (C bf16 or fp32).
#pragma once

#include "core/tensor.h"

namespace lasp {

void gemm(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
          float alpha = 1.0f, float beta = 0.0f);

// gemm() on CUDA tensors with alpha and beta read from device memory, alpha_beta = {alpha, beta}
// (fp32 [2] on C's device), so scales computed on the GPU need no host synchronisation
// (cuBLASLt's device pointer mode). beta_nonzero tells whether C is read (it picks the algorithm,
// as beta != 0 does for gemm()). CUDA builds only (defined in gemm.cu).
void gemm_cuda_device_alpha(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                            const Tensor& alpha_beta, bool beta_nonzero = false);

// Linear layer helpers on [N, in] activations and [out, in] weights (PyTorch layout):
//   y = x W^T;  dx = dy W;  dW += dy^T x  (accumulates, so SP/TP/DP code can sum into it).
void linear_forward(Tensor& y, const Tensor& x, const Tensor& w);
void linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w);

}  // namespace lasp
