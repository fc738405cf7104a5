// Linear-Llama: token embedding -> blocks (RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU MLP
// -> residual) -> final RMSNorm -> LM head with the fused, chunked cross-entropy.
// The mixer of layer i is pattern[i % pattern.size()]: 'L' linear attention, 'S' softmax attention.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/model/layers.h"

namespace lasp {

// Model FLOPs of one training token (forward + backward = 3 x forward; recomputation not
// counted, the usual "model FLOPs" of MFU) for the full model (every TP shard) at sequence length
// seq_len. Forward, per token:
//   every projection: 2 x its weights (q, k, v, z, o and the data-dependent gate of linear layers;
//     q, k, v, o of softmax layers; the MLP's gate, up, down; the LM head, hidden x vocab);
//   linear attention, per layer and head: 4 D^2 (the inter-chunk q S and the state update k^T v)
//     + 2 C D (the causal half of the chunk's Q K^T and P V; C = model.chunk, at most seq_len);
//   softmax attention, per layer and head: 2 T D (Q K^T and P V over T / 2 keys on average).
// Norms, activations, rotary, the embedding lookup and the loss are left out (a few per mille).
double model_flops_per_token(const ModelConfig& cfg, int64_t seq_len);

class Model {
 public:
  // Parameters and activations live on par.device; `dtype` is the master dtype (fp32, or fp64 for
  // gradient tests on CPU). On CUDA activations are bf16 and matrices have bf16 compute copies.
  Model(const ModelConfig& cfg, const ModelParallel& par, uint64_t seed, DType dtype);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  std::vector<Param*> params();
  // Clears the gradients before a step. The projection weights' gradients (most of the bytes)
  // are not written here: they are marked stale (Param::grad_stale) and their first write in the
  // next forward_backward overwrites them; forward_backward zeroes any it did not write. So read
  // gradients after forward_backward, not between zero_grad and it.
  void zero_grad();
  // Parameters of the whole model (all TP shards counted once).
  int64_t num_params_full() const { return num_params_full_; }
  // A string that changes whenever the model's shapes change (checkpoint compatibility).
  std::string signature() const;
  Device device() const { return device_; }

  // Forward and backward on this rank's tokens: inputs and targets int32 [B, L] (targets -1 are
  // ignored). Gradients accumulate loss_scale * d(sum of token losses); returns the summed loss
  // of this rank's targets.
  double forward_backward(const Tensor& inputs, const Tensor& targets, float loss_scale);
  // Summed loss without gradients (validation).
  double forward_loss(const Tensor& inputs, const Tensor& targets);

  // Gradient-ready hook: during forward_backward, as the backward finishes a part of the model,
  // the hook receives the parameters whose gradients are now final for this call (no later op of
  // this backward adds to them), so their reduction can start while the backward goes on. The
  // parts, in order: the LM head (untied only), the final norm, then for each block from the last
  // to the first its MLP with norm2 and its mixer with norm1, and the embedding last.
  // grad_ready_order() lists every parameter in that order. An empty function removes the hook.
  using GradReadyHook = std::function<void(const std::vector<Param*>&)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }
  std::vector<Param*> grad_ready_order();

  // Activation recomputation: "none" keeps every block's activations for the backward; "swiglu"
  // drops each MLP's SwiGLU output h ([tokens, mlp_hidden]) and recomputes it from gate and up
  // (one elementwise kernel per block); "mlp" (selective) drops the MLP's intermediates
  // (3 x [tokens, mlp_hidden], most of a block's memory) and recomputes the MLP forward; "block"
  // keeps only each block's input and recomputes the whole block (memory per rank: one
  // [tokens, hidden] tensor per block plus one block's activations).
  void set_recompute(const std::string& mode);

 private:
  struct Block;
  double run(const Tensor& inputs, const Tensor& targets, float loss_scale, bool backward);
  Tensor block_forward(Block& b, const Tensor& x, const Tensor& skip, const LayerContext& ctx);
  // The parameter groups the hook receives, in the order the backward finishes them.
  std::vector<std::vector<Param*>> grad_ready_groups();
  // Zeroes the gradients in `params` still marked stale (see zero_grad).
  static void clear_stale_grads(const std::vector<Param*>& params);

  ModelConfig cfg_;
  ModelParallel par_;
  DType dtype_;
  Device device_;
  DType act_dtype_;
  int64_t num_params_full_ = 0;
  Param embedding_, final_norm_, lm_head_;
  std::vector<std::unique_ptr<Block>> blocks_;
  enum class Recompute { None, Swiglu, Mlp, Block } recompute_ = Recompute::None;
  GradReadyHook grad_ready_;
};

}  // namespace lasp
