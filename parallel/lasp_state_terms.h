// The terms through which a chunk's boundary states enter linear attention, on their own
// (internal to parallel/; used by LASP-2's overlapped schedule in lasp_linear.cc).
//
// A chunk is rows [row, row + n) of this rank's [B, L, H, D] tensors q, k, v (per batch b and head
// h). With the chunk's cumulative log decays Lambda_t = sum_{s <= t} log a_s (t = 0..n-1, only the
// chunk's own tokens) and e_t = exp(Lambda_{n-1} - Lambda_t), the chunk's output and final state
// for an initial state P are
//   o_t     = (the chunk alone, from a zero state)_t + exp(Lambda_t) q_t P
//   S_final = exp(Lambda_{n-1}) P + sum_t e_t k_t^T v_t
// so a rank can compute the part from a zero state before P is known and add P's term later.
// All of these cost O(n D^2) per (b, h), like the inter-chunk term inside the kernel.
//
// CPU: per (b, h) one or two small GEMMs (OpenBLAS) on contiguous copies of the head's rows, in
// fp32 / fp64 (cumulative decays in double; every factor exp(.) <= 1).
// CUDA: there is no kernel for these terms yet, so each runs the linear-attention kernel itself on
// the chunk with the other operands zero (exact, but it costs a whole kernel call; see
// docs/parallel.md).
#pragma once

#include "core/tensor.h"
#include "kernels/linear_attention.h"

namespace lasp {

// o[rows] += diag(exp(Lambda)) q[rows] P, for P [B, H, D, D].
void add_prefix_output(Tensor& o, const Tensor& q, const Decay& decay, int64_t row, int64_t n,
                       const Tensor& p, int chunk);

// dP = sum_t exp(Lambda_t) q_t^T do_t: the gradient of the chunk's initial state through the
// chunk's own output ([B, H, D, D], written). k and v are read by the CUDA fallback only.
void prefix_state_grad(Tensor& dp, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& d_o, const Decay& decay, int64_t row, int64_t n, int chunk);

// Adds the gradients of <dM, S_final> (dM [B, H, D, D], the gradient reaching the chunk's final
// state; P its initial state):
//   dk_t += e_t v_t dM^T,   dv_t += e_t k_t dM,
//   d_log_decay_u += exp(Lambda_{n-1}) <dM, P> + sum_{s < u} e_s k_s dM v_s^T
// (the last only for data-dependent decay and a defined d_log_decay [B, L, H]). q is read by the
// CUDA fallback only.
void add_final_state_grads(Tensor& dk, Tensor& dv, Tensor& d_log_decay, const Tensor& q,
                           const Tensor& k, const Tensor& v, const Decay& decay, int64_t row,
                           int64_t n, const Tensor& p, const Tensor& dm, int chunk);

}  // namespace lasp
