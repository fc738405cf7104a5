// Sequence parallelism for the two mixers, as the model calls it.
//
// The model (core/model) calls these four functions in place of the kernels; with no
// communicator (single rank) they are exactly the kernels. Rank t of an SP group of size W holds
// its slice of every sequence: tokens [t*L, (t+1)*L) ("contiguous"), or with zigzag the chunks
// t and 2W-1-t of length L/2 each (load balance for causal softmax attention).
//
// Methods (config parallel.sp_method):
//   lasp2        linear layers: local state, ONE all-gather of states, prefix combine (DESIGN.md);
//                softmax layers: LASP-2H (all-gather K, V; reduce-scatter dK, dV)
//   lasp1        linear layers: state passed around the ring, W-1 steps; softmax layers as lasp2
//   ring         Ring Attention: K, V blocks travel the ring for both kinds of layer
//   allgather_kv softmax layers: Llama-3-style all-gather of K, V; linear layers as lasp2
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "kernels/linear_attention.h"

namespace lasp {

class Comm;

enum class SpMethod { Lasp2, Lasp1, Ring, AllGatherKV };
SpMethod sp_method_from_name(const std::string& name);
const char* sp_method_name(SpMethod m);

struct SpContext {
  Comm* comm = nullptr;  // the SP group; nullptr = no sequence parallelism
  SpMethod method = SpMethod::Lasp2;
  bool zigzag = false;
  // LASP-2 linear layers (config parallel.lasp2_overlap): start the state all-gather without
  // waiting, compute the local attention from a zero state meanwhile, then add the prefix term
  // (forward) / the final-state terms (backward). Same results to rounding; see lasp_linear.cc.
  bool overlap = false;
  int size() const;
  int rank() const;
};

// Global token positions of this rank's local tokens (for RoPE): int64 host vector of length
// local_len, e.g. [t*L, ..., t*L + L - 1] for the contiguous split.
std::vector<int64_t> sp_local_positions(const SpContext& ctx, int64_t local_len);

// What a mixer's forward keeps for its backward (method-specific; e.g. the prefix state).
struct SpSaved {
  std::vector<Tensor> tensors;
};

// Linear attention over the whole (distributed) sequence; q, k, v, o local [B, L, H, D].
void sp_linear_attention_forward(const SpContext& ctx, Tensor& o, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const Decay& decay, SpSaved& saved, int chunk);
// d_log_decay: [B, L, H] for DataDependent decay, else may be undefined.
void sp_linear_attention_backward(const SpContext& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                                  Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Decay& decay, const SpSaved& saved,
                                  const Tensor& d_o, int chunk);

// Causal softmax attention over the whole sequence; q local [B, L, Hq, D], k and v local
// [B, L, Hkv, D]; the scale multiplies q.k.
void sp_attention_forward(const SpContext& ctx, Tensor& o, const Tensor& q, const Tensor& k,
                          const Tensor& v, float scale, SpSaved& saved);
void sp_attention_backward(const SpContext& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                           const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                           const Tensor& d_o, float scale, const SpSaved& saved);

}  // namespace lasp
