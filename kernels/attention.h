// Causal softmax attention with grouped-query heads, returning the log-sum-exp (flash style).
//
//   q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D], Hq a multiple of Hkv (query head h reads kv head
//   h / (Hq / Hkv)), o [B, Tq, Hq, D], lse [B, Hq, Tq] (always fp32 or fp64 on CPU).
//   o_i = sum_j softmax_j(scale * q_i . k_j) v_j over keys j with key_pos(j) <= query_pos(i)
//   when causal, where query_pos(i) = q_offset + i and key_pos(j) = j.
//   lse_i = log sum_j exp(scale * q_i . k_j) over the same keys (-inf when a row has none; its
//   output is then 0). q_offset lets a rank's queries attend to a longer, gathered key range
//   (LASP-2H, ring attention), and lse lets partial results be merged:
//     lse = logaddexp(lse_a, lse_b),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.
// CPU: fp32 or fp64 throughout. CUDA: q, k, v, o and gradients bf16, lse fp32.
#pragma once

#include "core/tensor.h"

namespace lasp {

void attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       float scale, bool causal, int64_t q_offset = 0);

// Gradients of <d_o, o> for the forward above; uses the saved o and lse.
// dk, dv are written (not accumulated).
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                        float scale, bool causal, int64_t q_offset = 0);

}  // namespace lasp
