// Causal linear attention with an optional decay gate, chunked (DESIGN.md "Linear attention math").
//
// Per batch b and head h, with q_s, k_s, v_s rows of length D and a_s in (0, 1]:
//   S_s = a_s * S_{s-1} + k_s^T v_s        (S is D x D, S_{-1} = initial_state or 0)
//   o_s = q_s S_s
// final_state = S_{T-1}.
//
// Layouts (row-major):
//   q, k, v, o      [B, T, H, D], contiguous, or with each token's H x D values packed and
//                   tokens a fixed row stride apart (head slices of a wider [B, T, H', D] tensor,
//                   e.g. the model's fused q/k/v projection output); likewise d_o, dq, dk, dv.
//                   CUDA: row strides a multiple of 8 elements; with d_log_decay, dq has q's row
//                   stride and dk has k's. The CPU path copies strided tensors.
//   initial_state,
//   final_state     [B, H, D, D]   (row index: key dim, column index: value dim); fp32 on GPU
//   decay           see Decay below; log-space values log a_s <= 0
// CPU: every tensor fp32 or every tensor fp64 (tests run the float64 path).
// CUDA: q, k, v, o, dq, dk, dv bf16; states, decays and their gradients fp32.
//
// The backward computes the exact gradient of  L = <d_o, o> + <d_final_state, final_state>
// with respect to every input. Outputs that are undefined tensors are not computed, and
// inputs that are undefined count as zero (no initial state, no final-state gradient).
// LASP-2 (parallel/) composes these two calls; see parallel/lasp2.h.
#pragma once

#include "core/tensor.h"

namespace lasp {

enum class DecayMode { None, Constant, DataDependent };
DecayMode decay_mode_from_name(const std::string& name);  // "none" | "constant" | "data"
const char* decay_mode_name(DecayMode m);

struct Decay {
  DecayMode mode = DecayMode::None;
  Tensor per_head;   // Constant: [H] log a per head (fixed, not learned)
  Tensor per_token;  // DataDependent: [B, T, H] log a per token and head
};

// What a CUDA forward can keep for the backward of the same inputs: the states entering each
// segment of the kernel's split of the sequence (kernels/linear_attention.cu), the segments' log
// decays and the final state (B*H*nseg*D*D*4 bytes: 16 MiB at B*H = 16, D = 128, whatever T is).
// Given to the backward, they spare it recomputing them (one read of k and v). Filled by the
// forward on the CUDA path only; the CPU path leaves it empty, and the backward recomputes
// whatever is empty. Valid only for the same q, k, v, decay and initial_state.
struct LinearAttentionSaved {
  Tensor segment_states;     // [B*H, nseg, D, D] fp32: the state entering segment j
  Tensor segment_log_decay;  // [B*H, nseg] fp32: log of the total decay over segment j
  Tensor final_state;        // [B, H, D, D] fp32
};

// o may be undefined (state-only pass); final_state may be undefined (not needed); saved may be
// null.
void linear_attention_forward(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Decay& decay, const Tensor& initial_state,
                              int chunk = 64, LinearAttentionSaved* saved = nullptr);

// dq/dk/dv/d_log_decay/d_initial_state: outputs, each may be undefined to skip it.
// d_log_decay has the per_token shape [B, T, H] (DataDependent only). saved: null, or what the
// forward of the same inputs kept.
void linear_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay,
                               Tensor& d_initial_state, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Decay& decay, const Tensor& initial_state,
                               const Tensor& d_o, const Tensor& d_final_state, int chunk = 64,
                               const LinearAttentionSaved* saved = nullptr);

}  // namespace lasp
