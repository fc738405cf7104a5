#include "core/model/layers.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "core/model/projection.h"
#include "core/random.h"
#include "kernels/gemm.h"

namespace lasp {

namespace {

std::string layer_name(int layer, const char* what) {
  return "layers." + std::to_string(layer) + "." + what;
}

// y = x W^T, then the TP all-reduce for row-parallel projections.
void row_parallel_forward(Tensor& y, const Tensor& x, Param& w, const ModelParallel& par) {
  projection_forward(y, x, w);
  if (par.tp_size > 1) par.tp_all_reduce(y);
}

// dx (+)= dy W and dW += dy^T x for a column-parallel projection.
void column_parallel_backward(Tensor& dx, bool accumulate, Param& w, const Tensor& dy,
                              const Tensor& x) {
  projection_backward(dx, accumulate, w, dy, x);
}

Tensor like(const Tensor& t, const Shape& shape) { return Tensor::empty(shape, t.dtype(), t.device()); }

// The FP8 projection w reads `out` (CUDA): an amax slot for the op that writes out to fill in the
// same pass (handed over with note_amax, so the projection skips its amax pass); else undefined.
Tensor amax_slot_for(const Tensor& out, const Param& w) {
  return out.is_cuda() && w.precision == Precision::Fp8 ? Tensor::empty({1}, DType::I32, out.device())
                                                        : Tensor();
}
Tensor* slot_ptr(Tensor& slot) { return slot.defined() ? &slot : nullptr; }
void note_amax(const Tensor& out, const Tensor& slot) {
  if (slot.defined()) projection_note_amax(out, slot);
}
// Makes `parts` views of consecutive rows of one weight: `fused` gets the whole [sum of rows, C]
// value, gradient and (where the parts have one) bf16 copy; each part keeps its name, values
// and gradient, now in its rows. The optimizer and checkpoints see the parts only.
void stack_rows(Param& fused, const std::vector<Param*>& parts, const std::string& name) {
  int64_t rows = 0;
  for (const Param* p : parts) rows += p->value.dim(0);
  const Param& first = *parts.front();
  const int64_t cols = first.value.dim(1);
  fused.name = name;
  fused.precision = first.precision;
  fused.tp_sharded = first.tp_sharded;
  fused.value = Tensor::empty({rows, cols}, first.value.dtype(), first.value.device());
  fused.grad = Tensor::zeros({rows, cols}, first.grad.dtype(), first.grad.device());
  if (first.compute.defined())
    fused.compute = Tensor::empty({rows, cols}, first.compute.dtype(), first.compute.device());
  int64_t r = 0;
  for (Param* p : parts) {
    const int64_t n = p->value.dim(0);
    Tensor value = fused.value.slice(0, r, r + n);
    value.copy_from(p->value);
    p->value = value;
    Tensor grad = fused.grad.slice(0, r, r + n);
    grad.copy_from(p->grad);
    p->grad = grad;
    if (fused.compute.defined()) {
      Tensor compute = fused.compute.slice(0, r, r + n);
      compute.copy_from(p->compute);
      p->compute = compute;
    }
    r += n;
  }
}

// Before a gradient write to the stacked weight `fused`: it may overwrite (GEMM beta 0) when
// every part's gradient is stale (Model::zero_grad); otherwise the stale parts are zeroed and it adds.
void prepare_stacked_grad(Param& fused, const std::vector<Param*>& parts) {
  bool all = true;
  for (const Param* p : parts) all = all && p->grad_stale;
  for (Param* p : parts) {
    if (p->grad_stale && !all) p->grad.zero_();
    p->grad_stale = false;
  }
  fused.grad_stale = all;
}

// q, k, v (or their gradients) as head slices [B, L, H, D] of one fused [N, 3 H D] tensor.
void head_thirds(const Tensor& fused, const LayerContext& ctx, int64_t H, int64_t D, Tensor& q, Tensor& k,
                 Tensor& v) {
  const Tensor heads = fused.view({ctx.batch, ctx.length, 3 * H, D});
  q = heads.slice(2, 0, H);
  k = heads.slice(2, H, 2 * H);
  v = heads.slice(2, 2 * H, 3 * H);
}

// Statistics (norm rstd, log decays): fp32 on CUDA, the activations' dtype on CPU.
Tensor stat_like(const Tensor& t, const Shape& shape) {
  return Tensor::empty(shape, t.is_cuda() ? DType::F32 : t.dtype(), t.device());
}

}  // namespace

DType compute_dtype(Device device, DType master) { return device.is_cuda() ? DType::BF16 : master; }

Param make_param(const std::string& name, const Tensor& value, bool weight_decay, bool tp_sharded,
                 Device device) {
  Param p;
  p.name = name;
  p.value = value.to(device);
  p.grad = Tensor::zeros(value.shape(), value.dtype(), device);
  p.weight_decay = weight_decay;
  p.tp_sharded = tp_sharded;
  if (device.is_cuda() && value.ndim() == 2) {
    p.compute = Tensor::empty(value.shape(), DType::BF16, device);
    cast(p.compute, p.value);
  }
  return p;
}

// Counter-based: element i draws from splitmix64 of (key, i), so the values do not depend on how
// the work is split across threads (large models initialise on every core).
Tensor init_normal(const Shape& full_shape, double std, uint64_t seed, const std::string& name,
                   DType dtype) {
  uint64_t key = seed * 0x100000001B3ull;
  for (char c : name) key = (key ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
  Tensor t = Tensor::empty(full_shape, dtype == DType::F64 ? DType::F64 : DType::F32);
  const int64_t n = t.numel();
  auto fill = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t s1 = key ^ (static_cast<uint64_t>(i) * 2), s2 = key ^ (static_cast<uint64_t>(i) * 2 + 1);
      const double u1 = (static_cast<double>(splitmix64(s1) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = static_cast<double>(splitmix64(s2) >> 11) * 0x1.0p-53;
      const double v = std * std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2);  // Box-Muller
      if (t.dtype() == DType::F64) t.data<double>()[i] = v;
      else t.data<float>()[i] = static_cast<float>(v);
    }
  };
  const int64_t threads = n < (1 << 20) ? 1 : std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < threads; ++w) pool.emplace_back(fill, n * w / threads, n * (w + 1) / threads);
  fill(0, n / threads);
  for (auto& th : pool) th.join();
  return t.dtype() == dtype ? t : t.to(dtype);
}

Tensor shard(const Tensor& full, int dim, int tp_size, int tp_rank) {
  if (tp_size == 1) return full;
  const int64_t n = full.dim(dim);
  LASP_CHECK(n % tp_size == 0) << "cannot split dimension " << dim << " of " << full.str() << " across "
                               << tp_size << " tensor-parallel ranks";
  const int64_t part = n / tp_size;
  return full.slice(dim, tp_rank * part, (tp_rank + 1) * part).contiguous();
}

// ============================================================== linear attention
LinearAttentionLayer::LinearAttentionLayer(const ModelConfig& cfg, const ModelParallel& par,
                                           int layer, uint64_t seed, DType dtype) {
  const int64_t C = cfg.hidden, D = cfg.head_dim, Hf = cfg.heads;
  heads_ = Hf / par.tp_size;
  head_dim_ = D;
  has_feature_map_ = cfg.feature_map != "none";
  feature_map_ = cfg.feature_map == "silu"   ? Activation::Silu
                 : cfg.feature_map == "relu" ? Activation::Relu
                                             : Activation::Elu1;
  decay_mode_ = decay_mode_from_name(cfg.decay);
  const double sd = cfg.init_std, sd_out = cfg.init_std / std::sqrt(2.0 * cfg.layers);
  auto col = [&](const char* what, double std, int64_t rows) {
    const std::string name = layer_name(layer, what);
    return make_param(name, shard(init_normal({rows, C}, std, seed, name, dtype), 0, par.tp_size, par.tp_rank),
                      true, par.tp_size > 1, par.device);
  };
  wq_ = col("attn.wq", sd, Hf * D);
  wk_ = col("attn.wk", sd, Hf * D);
  wv_ = col("attn.wv", sd, Hf * D);
  wz_ = col("attn.wz", sd, Hf * D);
  {
    const std::string name = layer_name(layer, "attn.wo");
    wo_ = make_param(name, shard(init_normal({C, Hf * D}, sd_out, seed, name, dtype), 1, par.tp_size, par.tp_rank),
                     true, par.tp_size > 1, par.device);
  }
  norm_w_ = make_param(layer_name(layer, "attn.out_norm"),
                       shard(Tensor::full({Hf * D}, 1.0, dtype), 0, par.tp_size, par.tp_rank), false,
                       par.tp_size > 1, par.device);
  for (Param* p : {&wq_, &wk_, &wv_, &wz_, &wo_}) {
    p->precision = precision_from_name(cfg.precision.attention);
    p->grad_write_only_by_projection = true;
  }
  stack_rows(wqkv_, {&wq_, &wk_, &wv_}, layer_name(layer, "attn.wqkv"));
  if (decay_mode_ == DecayMode::DataDependent) {
    wgate_ = col("attn.wgate", sd, Hf);
    wgate_.grad_write_only_by_projection = true;
    // Bias so that a = sigmoid(x w + b)^(1/16) starts close to 1 (long memory), as in GLA.
    bgate_ = make_param(layer_name(layer, "attn.bgate"),
                        shard(Tensor::full({Hf}, 4.0, dtype), 0, par.tp_size, par.tp_rank), false,
                        par.tp_size > 1, par.device);
  }
  if (decay_mode_ == DecayMode::Constant) {
    // Lightning Attention's per-head rates: log a_h = -2^(-8 (h + 1) / H) over the global heads.
    Tensor rates = Tensor::empty({heads_}, dtype);
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t global = par.tp_rank * heads_ + h;
      rates.set_item(h, -std::pow(2.0, -8.0 * (global + 1) / Hf));
    }
    head_log_decay_ = rates.to(par.device);
  }
}

void LinearAttentionLayer::release() {
  for (Tensor* t : {&x_, &q_pre_, &k_pre_, &q_, &k_, &v_, &gate_pre_, &log_a_, &o_, &o_norm_, &o_rstd_, &z_, &gated_}) {
    *t = Tensor();
  }
  sp_saved_ = SpSaved();
}

std::vector<Param*> LinearAttentionLayer::params() {
  std::vector<Param*> p = {&wq_, &wk_, &wv_, &wz_, &wo_, &norm_w_};
  if (decay_mode_ == DecayMode::DataDependent) {
    p.push_back(&wgate_);
    p.push_back(&bgate_);
  }
  return p;
}

namespace {
constexpr float kGateScale = 1.0f / 16.0f;  // log a = logsigmoid(x w + b) / 16
}

bool LinearAttentionLayer::fused_qkv(const LayerContext& ctx) const {
  // Full precision, or FP8 that carries no state from step to step (current or block scaling;
  // delayed scaling's amax histories are checkpointed per weight). FP4 keeps three projections:
  // NVFP4's tensor scale and the backward's random draws belong to each weight. The
  // sequence-parallel methods (parallel/) take contiguous q, k, v.
  const bool precision_ok = wqkv_.precision == Precision::Full ||
                            (wqkv_.precision == Precision::Fp8 && !projection_keeps_scaling_state(wqkv_));
  return precision_ok && !has_feature_map_ && ctx.par->sp.comm == nullptr;
}

void LinearAttentionLayer::forward(Tensor& y, const Tensor& x, const LayerContext& ctx) {
  const int64_t N = x.dim(0), H = heads_, D = head_dim_, HD = H * D;
  const Shape heads4 = {ctx.batch, ctx.length, H, D};
  x_ = x;
  if (fused_qkv(ctx)) {
    Tensor qkv = like(x, {N, 3 * HD});
    projection_forward(qkv, x, wqkv_);
    head_thirds(qkv, ctx, H, D, q_, k_, v_);
  } else {
    q_pre_ = like(x, {N, HD});
    k_pre_ = like(x, {N, HD});
    Tensor v = like(x, {N, HD});
    projection_forward(q_pre_, x, wq_);
    projection_forward(k_pre_, x, wk_);
    projection_forward(v, x, wv_);
    Tensor q = q_pre_, k = k_pre_;
    if (has_feature_map_) {
      q = like(x, {N, HD});
      k = like(x, {N, HD});
      activation_forward(q, q_pre_, feature_map_);
      activation_forward(k, k_pre_, feature_map_);
    }
    q_ = q.view(heads4);
    k_ = k.view(heads4);
    v_ = v.view(heads4);
  }
  Decay decay;
  decay.mode = decay_mode_;
  if (decay_mode_ == DecayMode::Constant) decay.per_head = head_log_decay_;
  if (decay_mode_ == DecayMode::DataDependent) {
    // fp32 on CUDA: near the bias's 4.0 bf16 steps are 2^-5, which would put ~1.6% of noise
    // into every token's log a (and into sigma(-v) in the backward).
    gate_pre_ = stat_like(x, {N, H});
    projection_forward(gate_pre_, x, wgate_);
    bias_add(gate_pre_, bgate_.value);
    log_a_ = stat_like(x, {N, H});
    activation_forward(log_a_, gate_pre_, Activation::LogSigmoid, kGateScale);
    decay.per_token = log_a_.view({ctx.batch, ctx.length, H});
  }
  o_ = like(x, {N, HD});
  Tensor o4 = o_.view(heads4);
  sp_linear_attention_forward(ctx.par->sp, o4, q_, k_, v_, decay, sp_saved_, static_cast<int>(ctx.cfg->chunk));
  o_norm_ = like(x, {N, HD});
  o_rstd_ = stat_like(x, {N, H});
  rmsnorm_forward(o_norm_, o_rstd_, o_, norm_w_.value, static_cast<float>(ctx.cfg->norm_eps), D);
  z_ = like(x, {N, HD});
  projection_forward(z_, x, wz_);
  gated_ = like(x, {N, HD});
  Tensor gated_amax = amax_slot_for(gated_, wo_);
  swiglu_forward(gated_, z_, o_norm_, slot_ptr(gated_amax));  // silu(z) * norm(o)
  note_amax(gated_, gated_amax);
  row_parallel_forward(y, gated_, wo_, *ctx.par);
}

void LinearAttentionLayer::backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx) {
  const int64_t N = dy.dim(0), H = heads_, D = head_dim_, HD = H * D;
  const Shape heads4 = {ctx.batch, ctx.length, H, D};
  Tensor d_gated = like(dy, {N, HD});
  projection_backward(d_gated, false, wo_, dy, gated_);
  Tensor dz = like(dy, {N, HD}), d_onorm = like(dy, {N, HD});
  Tensor dz_amax = amax_slot_for(dz, wz_);
  swiglu_backward(dz, d_onorm, d_gated, z_, o_norm_, slot_ptr(dz_amax));
  note_amax(dz, dz_amax);
  column_parallel_backward(dx, false, wz_, dz, x_);
  Tensor d_o = like(dy, {N, HD});
  rmsnorm_backward(d_o, norm_w_.grad, d_onorm, o_, norm_w_.value, o_rstd_, D);

  Decay decay;
  decay.mode = decay_mode_;
  if (decay_mode_ == DecayMode::Constant) decay.per_head = head_log_decay_;
  Tensor d_log_a;
  if (decay_mode_ == DecayMode::DataDependent) {
    decay.per_token = log_a_.view({ctx.batch, ctx.length, H});
    d_log_a = stat_like(dy, {ctx.batch, ctx.length, H});
  }
  const bool fused = fused_qkv(ctx);
  Tensor dqkv, dq, dk, dv, dq4, dk4, dv4;
  if (fused) {  // head slices of one [N, 3 HD] gradient, the input of one dgrad and one wgrad GEMM
    dqkv = like(dy, {N, 3 * HD});
    head_thirds(dqkv, ctx, H, D, dq4, dk4, dv4);
  } else {
    dq = like(dy, {N, HD});
    dk = like(dy, {N, HD});
    dv = like(dy, {N, HD});
    dq4 = dq.view(heads4);
    dk4 = dk.view(heads4);
    dv4 = dv.view(heads4);
  }
  sp_linear_attention_backward(ctx.par->sp, dq4, dk4, dv4, d_log_a, q_, k_, v_, decay, sp_saved_,
                               d_o.view(heads4), static_cast<int>(ctx.cfg->chunk));
  if (decay_mode_ == DecayMode::DataDependent) {
    Tensor d_gate = like(dy, {N, H});
    activation_backward(d_gate, d_log_a.view({N, H}), gate_pre_, Activation::LogSigmoid, kGateScale);
    bias_backward(bgate_.grad, d_gate);
    column_parallel_backward(dx, true, wgate_, d_gate, x_);
  }
  if (fused) {
    prepare_stacked_grad(wqkv_, {&wq_, &wk_, &wv_});
    column_parallel_backward(dx, true, wqkv_, dqkv, x_);
  } else {
    if (has_feature_map_) {
      Tensor dq_pre = like(dy, {N, HD}), dk_pre = like(dy, {N, HD});
      activation_backward(dq_pre, dq, q_pre_, feature_map_);
      activation_backward(dk_pre, dk, k_pre_, feature_map_);
      dq = dq_pre;
      dk = dk_pre;
    }
    column_parallel_backward(dx, true, wq_, dq, x_);
    column_parallel_backward(dx, true, wk_, dk, x_);
    column_parallel_backward(dx, true, wv_, dv, x_);
  }
  if (ctx.par->tp_size > 1) ctx.par->tp_all_reduce(dx);
}

// ============================================================== softmax attention
SoftmaxAttentionLayer::SoftmaxAttentionLayer(const ModelConfig& cfg, const ModelParallel& par,
                                             int layer, uint64_t seed, DType dtype) {
  const int64_t C = cfg.hidden, D = cfg.head_dim;
  heads_ = cfg.heads / par.tp_size;
  kv_heads_ = cfg.kv_heads / par.tp_size;
  head_dim_ = D;
  theta_ = static_cast<float>(cfg.rope_theta);
  const double sd = cfg.init_std, sd_out = cfg.init_std / std::sqrt(2.0 * cfg.layers);
  auto col = [&](const char* what, int64_t rows) {
    const std::string name = layer_name(layer, what);
    return make_param(name, shard(init_normal({rows, C}, sd, seed, name, dtype), 0, par.tp_size, par.tp_rank),
                      true, par.tp_size > 1, par.device);
  };
  wq_ = col("attn.wq", cfg.heads * D);
  wk_ = col("attn.wk", cfg.kv_heads * D);
  wv_ = col("attn.wv", cfg.kv_heads * D);
  const std::string name = layer_name(layer, "attn.wo");
  wo_ = make_param(name, shard(init_normal({C, cfg.heads * D}, sd_out, seed, name, dtype), 1, par.tp_size, par.tp_rank),
                   true, par.tp_size > 1, par.device);
  for (Param* p : {&wq_, &wk_, &wv_, &wo_}) {
    p->precision = precision_from_name(cfg.precision.attention);
    p->grad_write_only_by_projection = true;
  }
}

void SoftmaxAttentionLayer::release() {
  for (Tensor* t : {&x_, &q_, &k_, &v_, &o_}) *t = Tensor();
  sp_saved_ = SpSaved();
}

std::vector<Param*> SoftmaxAttentionLayer::params() { return {&wq_, &wk_, &wv_, &wo_}; }

void SoftmaxAttentionLayer::forward(Tensor& y, const Tensor& x, const LayerContext& ctx) {
  const int64_t N = x.dim(0), D = head_dim_;
  x_ = x;
  q_ = like(x, {N, heads_ * D});
  k_ = like(x, {N, kv_heads_ * D});
  v_ = like(x, {N, kv_heads_ * D});
  projection_forward(q_, x, wq_);
  projection_forward(k_, x, wk_);
  projection_forward(v_, x, wv_);
  Tensor q4 = q_.view({ctx.batch, ctx.length, heads_, D});
  Tensor k4 = k_.view({ctx.batch, ctx.length, kv_heads_, D});
  positions_ = sp_local_positions(ctx.par->sp, ctx.length);
  rope_forward(q4, positions_, theta_);
  rope_forward(k4, positions_, theta_);
  o_ = like(x, {N, heads_ * D});
  Tensor o4 = o_.view({ctx.batch, ctx.length, heads_, D});
  sp_attention_forward(ctx.par->sp, o4, q4, k4, v_.view({ctx.batch, ctx.length, kv_heads_, D}),
                       static_cast<float>(1.0 / std::sqrt(double(D))), sp_saved_);
  row_parallel_forward(y, o_, wo_, *ctx.par);
}

void SoftmaxAttentionLayer::backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx) {
  const int64_t N = dy.dim(0), D = head_dim_;
  Tensor d_o = like(dy, {N, heads_ * D});
  projection_backward(d_o, false, wo_, dy, o_);
  Tensor dq = like(dy, {N, heads_ * D}), dk = like(dy, {N, kv_heads_ * D}), dv = like(dy, {N, kv_heads_ * D});
  const Shape qs = {ctx.batch, ctx.length, heads_, D}, ks = {ctx.batch, ctx.length, kv_heads_, D};
  Tensor dq4 = dq.view(qs), dk4 = dk.view(ks), dv4 = dv.view(ks);
  sp_attention_backward(ctx.par->sp, dq4, dk4, dv4, q_.view(qs), k_.view(ks), v_.view(ks), o_.view(qs),
                        d_o.view(qs), static_cast<float>(1.0 / std::sqrt(double(D))), sp_saved_);
  rope_backward(dq4, positions_, theta_);
  rope_backward(dk4, positions_, theta_);
  column_parallel_backward(dx, false, wq_, dq, x_);
  column_parallel_backward(dx, true, wk_, dk, x_);
  column_parallel_backward(dx, true, wv_, dv, x_);
  if (ctx.par->tp_size > 1) ctx.par->tp_all_reduce(dx);
}

// ============================================================== MLP
Mlp::Mlp(const ModelConfig& cfg, const ModelParallel& par, int layer, uint64_t seed, DType dtype)
    : par_(&par) {
  const int64_t C = cfg.hidden, F = cfg.mlp_hidden;
  const double sd = cfg.init_std, sd_out = cfg.init_std / std::sqrt(2.0 * cfg.layers);
  auto make = [&](const char* what, const Shape& full, double std, int dim) {
    const std::string name = layer_name(layer, what);
    return make_param(name, shard(init_normal(full, std, seed, name, dtype), dim, par.tp_size, par.tp_rank), true,
                      par.tp_size > 1, par.device);
  };
  w_gate_ = make("mlp.w_gate", {F, C}, sd, 0);
  w_up_ = make("mlp.w_up", {F, C}, sd, 0);
  w_down_ = make("mlp.w_down", {C, F}, sd_out, 1);
  for (Param* p : {&w_gate_, &w_up_, &w_down_}) {
    p->precision = precision_from_name(cfg.precision.mlp);
    p->grad_write_only_by_projection = true;
  }
}

void Mlp::release() {
  for (Tensor* t : {&x_, &gate_, &up_, &h_}) *t = Tensor();
}

void Mlp::release_h() {
  h_ = Tensor();
  projection_release_saved(w_down_);  // what it saved of its input, h
}

std::vector<Param*> Mlp::params() { return {&w_gate_, &w_up_, &w_down_}; }

void Mlp::forward(Tensor& y, const Tensor& x, const LayerContext& ctx) {
  const int64_t N = x.dim(0), F = w_gate_.value.dim(0);
  x_ = x;
  gate_ = like(x, {N, F});
  up_ = like(x, {N, F});
  projection_forward(gate_, x, w_gate_);
  projection_forward(up_, x, w_up_);
  compute_h();
  row_parallel_forward(y, h_, w_down_, *par_);
}

void Mlp::compute_h() {
  h_ = like(gate_, {gate_.dim(0), gate_.dim(1)});
  Tensor h_amax = amax_slot_for(h_, w_down_);
  swiglu_forward(h_, gate_, up_, slot_ptr(h_amax));
  note_amax(h_, h_amax);
}

void Mlp::backward(Tensor& dx, const Tensor& dy, const LayerContext& ctx) {
  const int64_t N = dy.dim(0), F = w_gate_.value.dim(0);
  Tensor dh = like(dy, {N, F});
  if (!h_.defined()) compute_h();  // recompute: "swiglu" mode dropped it after the forward
  projection_backward(dh, false, w_down_, dy, h_);
  Tensor dgate = like(dy, {N, F}), dup = like(dy, {N, F});
  Tensor dgate_amax = amax_slot_for(dgate, w_gate_), dup_amax = amax_slot_for(dup, w_up_);
  swiglu_backward(dgate, dup, dh, gate_, up_, slot_ptr(dgate_amax), slot_ptr(dup_amax));
  note_amax(dgate, dgate_amax);
  note_amax(dup, dup_amax);
  column_parallel_backward(dx, false, w_gate_, dgate, x_);
  column_parallel_backward(dx, true, w_up_, dup, x_);
  if (par_->tp_size > 1) par_->tp_all_reduce(dx);
}

}  // namespace lasp
