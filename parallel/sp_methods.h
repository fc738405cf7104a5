// The sequence-parallel methods behind sequence_parallel.h (internal to parallel/).
// Each takes the SP layout and the same arguments as the public call; ctx.comm is set.
#pragma once

#include "parallel/sequence_parallel.h"
#include "parallel/sp_layout.h"

namespace lasp {

// Linear attention (lasp_linear.cc).
void lasp2_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                          int chunk);
void lasp2_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                           Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                           const Tensor& v, const Decay& decay, const SpSaved& saved,
                           const Tensor& d_o, int chunk);
void lasp1_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                          int chunk);
void lasp1_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                           Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                           const Tensor& v, const Decay& decay, const SpSaved& saved,
                           const Tensor& d_o, int chunk);
void ring_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                         const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                         int chunk);
void ring_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                          Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Decay& decay, const SpSaved& saved,
                          const Tensor& d_o, int chunk);

// Softmax attention (lasp_softmax.cc).
void lasp2h_attention_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o,
                              const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                              SpSaved& saved);
void lasp2h_attention_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                               Tensor& dv, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& o, const Tensor& d_o, float scale,
                               const SpSaved& saved);
void ring_attention_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                            const Tensor& k, const Tensor& v, float scale, SpSaved& saved);
void ring_attention_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                             Tensor& dv, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& o, const Tensor& d_o, float scale,
                             const SpSaved& saved);

}  // namespace lasp
