// Projections: every weight matrix product of the model (q, k, v, gates, out, MLP) goes through
// these two functions, which apply the projection's precision:
//   full  the model's compute dtype: fp32 on CPU; bf16 operands with fp32 accumulation on CUDA
//         (the forward reads the bf16 copy Param::compute, gradients land in the fp32 master grad)
//   fp8   E4M3 forward operands, E5M2 gradients in dgrad and wgrad, fp32 accumulation
//   fp4   Quartet: Hadamard-rotated MXFP4/NVFP4 operands, QuEST clipping forward, stochastic
//         rounding or MS-EDEN backward (kernels/quantize.h)
// On CPU the low-precision products are emulated exactly (quantize, dequantize, fp32 GEMM).
#pragma once

#include <memory>
#include <string>

#include "core/model/layers.h"

namespace lasp {

Precision precision_from_name(const std::string& name);  // "bf16" (= full), "fp8", "fp4"
const char* precision_name(Precision p);

// y = x W^T  (x [N, in], W [out, in], y [N, out]).
void projection_forward(Tensor& y, const Tensor& x, Param& w);
// dx = dy W (or dx += dy W when accumulate_dx), and W.grad += dy^T x.
void projection_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x);

}  // namespace lasp
