// The model's layers, each an explicit forward/backward pair with its saved activations named
// after the math. Activations are [N, C] with N = B * L tokens of this rank (L = the local
// sequence slice under sequence parallelism), row-major.
//
// Tensor parallelism (Megatron): heads and the MLP's inner width are split across the TP group.
// Column-parallel projections (q, k, v, gates, up) hold rows [rank * n/tp, (rank+1) * n/tp) of the
// full weight; row-parallel ones (out, down) hold the matching columns and their partial outputs
// are summed with one all-reduce; the input gradient of the column-parallel projections is summed
// likewise. Weights are initialised full-size from the seed and then sharded, so every TP layout
// starts from the same model.
#pragma once

#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "kernels/linear_attention.h"
#include "kernels/ops.h"
#include "parallel/sequence_parallel.h"

namespace lasp {

// Precision of a weight's matrix products (core/model/projection.h).
enum class Precision { Full, Fp8, Fp4 };
struct ProjectionState;  // low-precision state of one projection (scales, saved operands); projection.cc

// A trainable tensor and its gradient (same shape, dtype and device).
struct Param {
  std::string name;
  Tensor value;    // the master weights (fp32; fp64 in gradient tests)
  Tensor grad;     // same dtype as value
  Tensor compute;  // optional lower-precision copy the forward reads (bf16 on CUDA); undefined on CPU
  bool weight_decay = true;  // matrices decay; norms, biases and embeddings do not
  bool tp_sharded = false;   // differs across TP ranks (else replicated on them)
  Precision precision = Precision::Full;   // of the products this weight takes part in
  std::shared_ptr<ProjectionState> state;  // created on first use by projection.cc
  // Deferred zeroing of a projection weight's gradient (its only writer is projection_backward):
  // Model::zero_grad sets grad_stale instead of clearing `grad` (a memset of every weight
  // gradient, 6.6 GB a step at 1B), and the next gradient write then overwrites (GEMM beta 0)
  // instead of adding. Model::forward_backward zeroes any gradient still stale before anyone reads it.
  bool grad_write_only_by_projection = false;
  bool grad_stale = false;
};

// How this rank takes part in the model's parallelism.
struct ModelParallel {
  Device device = cpu();  // where parameters and activations live
  SpContext sp;
  int tp_size = 1;
  int tp_rank = 0;
  std::function<void(Tensor&)> tp_all_reduce;  // sum over the TP group (required when tp_size > 1)
};

// Deterministic weight initialisation: each parameter draws from its own stream keyed by the
// run seed and the parameter name, so the model is the same whatever the layout.
Tensor init_normal(const Shape& full_shape, double std, uint64_t seed, const std::string& name,
                   DType dtype);
// Rows [r * n / tp, (r + 1) * n / tp) of dimension `dim` (0 or 1) of a full tensor.
Tensor shard(const Tensor& full, int dim, int tp_size, int tp_rank);
// A parameter on `device` from its CPU initial value. On CUDA, matrices also get the bf16 copy the
// forward reads (Param::compute).
Param make_param(const std::string& name, const Tensor& value, bool weight_decay, bool tp_sharded,
                 Device device);
// The dtype of activations on `device` for master dtype `master`: bf16 on CUDA, else `master`.
DType compute_dtype(Device device, DType master);

struct LayerContext {
  const ModelConfig* cfg;
  const ModelParallel* par;
  int64_t batch;   // B
  int64_t length;  // L, local tokens per sequence
};

// Linear attention mixer: q, k, v projections, optional feature map on q and k, decay
// (none / constant per head / data-dependent per token and head), chunked causal linear attention
// (sequence-parallel through parallel/), per-head RMSNorm, SiLU output gate, output projection.
class LinearAttentionLayer {
 public:
  LinearAttentionLayer(const ModelConfig& cfg, const ModelParallel& par, int layer, uint64_t seed,
                       DType dtype);
  void forward(Tensor& y, const Tensor& x, const LayerContext& ctx);
  void backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx);  // dx written
  void release();  // drops the saved activations (activation recomputation)
  std::vector<Param*> params();

 private:
  int64_t heads_, head_dim_;  // local heads (TP-sharded)
  Activation feature_map_;
  bool has_feature_map_;
  DecayMode decay_mode_;
  Param wq_, wk_, wv_, wz_, wo_, norm_w_, wgate_, bgate_;
  // wq_, wk_ and wv_ are views of the rows of one [3 HD, C] weight (value, gradient and bf16
  // copy): wqkv_, never optimised itself. In full precision or FP8 with current / block scaling,
  // without a feature map and without sequence parallelism, the three projections run as one GEMM
  // on it (fused_qkv()), as Megatron fuses QKV; q, k and v are then head slices of one [N, 3 HD]
  // output. (FP8 per-tensor scaling then takes one scale for the three weights, as Transformer
  // Engine does for a fused QKV; block scaling quantizes exactly as for three weights.)
  Param wqkv_;
  Tensor head_log_decay_;  // Constant mode: [heads] log a per head
  // saved for backward (q_, k_, v_: [B, L, H, D], possibly head slices of the fused output)
  Tensor x_, q_pre_, k_pre_, q_, k_, v_, gate_pre_, log_a_, o_, o_norm_, o_rstd_, z_, gated_;
  SpSaved sp_saved_;
  bool fused_qkv(const LayerContext& ctx) const;
};

// Softmax attention mixer: q, k, v projections with grouped-query heads, RoPE, causal attention
// (sequence-parallel through parallel/), output projection.
class SoftmaxAttentionLayer {
 public:
  SoftmaxAttentionLayer(const ModelConfig& cfg, const ModelParallel& par, int layer,
                        uint64_t seed, DType dtype);
  void forward(Tensor& y, const Tensor& x, const LayerContext& ctx);
  void backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx);
  void release();
  std::vector<Param*> params();

 private:
  int64_t heads_, kv_heads_, head_dim_;
  float theta_;
  Param wq_, wk_, wv_, wo_;
  Tensor x_, q_, k_, v_, o_;
  std::vector<int64_t> positions_;
  SpSaved sp_saved_;
};

// SwiGLU MLP: y = (silu(x Wg^T) * (x Wu^T)) Wd^T.
class Mlp {
 public:
  Mlp(const ModelConfig& cfg, const ModelParallel& par, int layer, uint64_t seed, DType dtype);
  void forward(Tensor& y, const Tensor& x, const LayerContext& ctx);
  void backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx);
  void release();
  // Drops the SwiGLU output h after the forward; the backward recomputes it from gate and up.
  void release_h();
  std::vector<Param*> params();

 private:
  void compute_h();  // h = silu(gate) * up (and its amax for an FP8 down projection)

  const ModelParallel* par_;
  Param w_gate_, w_up_, w_down_;
  Tensor x_, gate_, up_, h_;
};

}  // namespace lasp
