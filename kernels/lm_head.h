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
//   Full  the operands' dtype (fp32 on CPU; on CUDA bf16 operands with fp32 accumulation and
//         bf16 logits / dlogits, the softmax in fp32 from them; fp32 operands keep fp32 logits)
//   Fp8   per-tensor FP8, fp32 accumulation: h and W in E4M3 (one scale each over the whole
//         tensor, current amax; W quantized once per call = once per step), dlogits in E5M2 with
//         one scale per chunk (its current amax). Each operand quantized along its GEMM's inner
//         dim: logits = Q(h_c) Q(W)^T, d_h_c = Q(dl) Q(W)^T^T, d_w += Q(dl)^T Q(h_c). The logits
//         and the dlogits are stored in bf16 (the cross-entropy reads bf16 logits; the E5M2 codes
//         and their amax come from the bf16 dlogits). On CUDA: cuBLASLt FP8 GEMMs writing bf16
//         logits, a row kernel that turns them into dlogits in place and notes their amax, one
//         pass for dlogits' codes and their transpose, no host sync. On CPU (fp32 tensors) the
//         same steps are emulated exactly (quantize, dequantize, fp32 GEMM, bf16 rounding); the
//         two agree up to fp32 summation order and exp/log rounding.
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
