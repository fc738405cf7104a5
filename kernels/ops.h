// The model's small ops: norms, activations, rotary embedding, embedding lookup, the fused
// LM head + cross-entropy, the AdamW update, and vector helpers. Each is a forward/backward pair
// of plain functions (llm.c style). Activations are [N, C] row-major with N = tokens.
// CPU: fp32 or fp64 throughout (every tensor of a call has one dtype).
// CUDA (mixed precision): activations and their gradients bf16 or fp32, each tensor independently
// (math in fp32); weights of norms fp32, weight gradients fp32 (accumulated), rstd fp32;
// the LM head weight bf16 with d_w fp32; tokens/targets int32. Each function dispatches on the
// device of its first tensor argument to <name>_cuda in kernels/ops.cu.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "kernels/lm_head.h"  // the fused LM head + cross-entropy, declared there

namespace lasp {

// --- RMSNorm over groups of `group` consecutive features (group = C: the usual RMSNorm;
// group = head_dim: a per-head norm). y = x * rstd * w with rstd = 1 / sqrt(mean_group(x^2) + eps).
// x, y [N, C]; w [C] (undefined = no weight); rstd [N, C / group] saved for the backward.
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, float eps,
                     int64_t group = 0);
// dx written; dw accumulated (+=) when defined. With d_residual defined (same shape as dx):
// dx = d_residual + the above, in one pass (the residual stream's gradient; CUDA: summed in fp32,
// rounded once to dx's dtype).
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, int64_t group = 0, const Tensor& d_residual = Tensor());
// The pre-norm residual stream in one pass: sum = x + residual (written, rounded to sum's dtype:
// the next layer's input), y = rmsnorm(sum) of the stored sum, as rmsnorm_forward. Same result as
// add_inplace then rmsnorm_forward, without the extra round trip through memory.
void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& x,
                              const Tensor& residual, const Tensor& w, float eps, int64_t group = 0);

// --- Gated units: h = silu(gate) * up (SwiGLU; also the SiLU output gate of linear attention).
// *_amax (optional, CUDA only): an I32 [1] CUDA tensor set to max |output| over the values as
// stored (float bits; what amax_into_cuda of the output gives), computed in the same pass for the
// FP8 projection that reads the output (projection_note_amax), which then skips its amax pass.
void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up, Tensor* h_amax = nullptr);
void swiglu_backward(Tensor& d_gate, Tensor& d_up, const Tensor& dh, const Tensor& gate,
                     const Tensor& up, Tensor* d_gate_amax = nullptr, Tensor* d_up_amax = nullptr);

// --- Pointwise maps y = f(x). Identity maps are not called.
enum class Activation { Silu, Relu, Elu1, LogSigmoid };
// LogSigmoid computes scale * log(sigmoid(x)) (a decay gate in log space, <= 0).
void activation_forward(Tensor& y, const Tensor& x, Activation f, float scale = 1.0f);
void activation_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Activation f,
                         float scale = 1.0f);

// --- Rotary position embedding on x [B, T, H, D] in place, rotating pairs (i, i + D/2) of each
// head by angle position * theta^(-2i/D); positions has T entries. The backward rotates back.
void rope_forward(Tensor& x, const std::vector<int64_t>& positions, float theta);
void rope_backward(Tensor& dx, const std::vector<int64_t>& positions, float theta);

// --- Token embedding: out[n] = table[tokens[n]]; tokens int32 [N] (checked against V).
void embedding_forward(Tensor& out, const Tensor& table, const Tensor& tokens);
void embedding_backward(Tensor& d_table, const Tensor& d_out, const Tensor& tokens);  // +=

// --- Bias: y[n, :] += b;  db += sum_n dy[n, :].
void bias_add(Tensor& y, const Tensor& b);
void bias_backward(Tensor& db, const Tensor& dy);

// --- AdamW on one parameter (see optim/optim.h for the formula): w, m, v fp32; g fp32, used as
// grad_scale * g (gradient clipping folded into the update); w_compute (optional, bf16 on CUDA)
// receives the updated w rounded for the next forward. c1 = 1 - beta1^t, c2 = 1 - beta2^t.
void adamw_update(Tensor& w, Tensor& w_compute, const Tensor& g, Tensor& m, Tensor& v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                  float grad_scale = 1.0f);

// --- dst = src converted to dst's dtype (same shape, same device; RNE for narrowing).
void cast(Tensor& dst, const Tensor& src);

// --- Vector helpers (any shape, same shape for both operands).
void add_inplace(Tensor& y, const Tensor& x, float alpha = 1.0f);  // y += alpha * x
void scale_inplace(Tensor& y, float alpha);
double sum_of_squares(const Tensor& x);  // in double
bool all_finite(const Tensor& x);

}  // namespace lasp
