// Fused LM head + cross-entropy, chunked over rows so the full [N, V] logits never exist.
//
// For each row n with targets[n] >= 0: loss_n = logsumexp(h_n W^T) - (h_n W^T)[targets[n]].
// Returns sum_n loss_n (unscaled). When d_h is defined, also writes d_h = loss_scale * dloss/dh
// and accumulates d_w += loss_scale * dloss/dW (d_w may be undefined). h [N, C], w [V, C],
// targets int32 [N] (-1 = ignore). `chunk` rows at a time. Per chunk:
//   logits   = h_c W^T                  [rows, V]
//   dlogits  = loss_scale (softmax(logits) - onehot(targets))
//   d_h_c    = dlogits W,   d_w += dlogits^T h_c
//
// Precision of the three GEMMs (config key precision.lm_head):
//   Full  the operands' dtype (fp32 on CPU; bf16 operands, fp32 accumulation on CUDA)
//   Fp8   per-tensor FP8, fp32 accumulation: h and W in E4M3 (one scale each over the whole
//         tensor, current amax; W quantized once per call = once per step), dlogits in E5M2 with
//         one scale per chunk (its current amax). Each operand quantized along its GEMM's inner
//         dim: logits = Q(h_c) Q(W)^T, d_h_c = Q(dl) Q(W)^T^T, d_w += Q(dl)^T Q(h_c). On CPU
//         (fp32 only) it is emulated exactly (quantize, dequantize, fp32 GEMM); on CUDA the
//         logits are written in bf16 by cuBLASLt's FP8 GEMM, the cross-entropy kernel turns them
//         into bf16 dlogits in place and notes their amax, one pass writes dlogits' E5M2 codes
//         and their transpose, and the FP8 GEMMs write d_h (bf16/fp32) and accumulate d_w (fp32).
//         The two agree up to fp32 summation order and the bf16 rounding of the logits/dlogits.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace lasp {

enum class LmHeadPrecision : uint8_t { Full, Fp8 };

// "bf16" -> Full, "fp8" -> Fp8; anything else throws naming precision.lm_head.
LmHeadPrecision lm_head_precision_from_name(const std::string& name);

double lm_head_cross_entropy(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                             const Tensor& targets, float loss_scale, int64_t chunk,
                             LmHeadPrecision precision = LmHeadPrecision::Full);

}  // namespace lasp
