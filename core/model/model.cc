#include "core/model/model.h"

#include <algorithm>
#include <sstream>

#include "kernels/ops.h"

namespace lasp {

struct Model::Block {
  char kind;  // 'L' or 'S'
  Param norm1, norm2;
  std::unique_ptr<LinearAttentionLayer> linear;
  std::unique_ptr<SoftmaxAttentionLayer> softmax;
  std::unique_ptr<Mlp> mlp;
  // saved for backward: x (block input), n1 = norm1(x), x1 = x + mixer(n1), n2 = norm2(x1).
  // The block output x1 + mlp(n2) is never formed here: the next norm adds the two as it
  // normalises (residual_rmsnorm_forward) and stores the sum as the next block's x.
  Tensor x, n1, rstd1, x1, n2, rstd2;
};

Model::Model(const ModelConfig& cfg, const ModelParallel& par, uint64_t seed, DType dtype)
    : cfg_(cfg), par_(par), dtype_(dtype), device_(par.device), act_dtype_(compute_dtype(par.device, dtype)) {
  LASP_CHECK(par.tp_size == 1 || par.tp_all_reduce) << "tensor parallelism needs an all-reduce";
  LASP_CHECK(device_.is_cpu() || dtype == DType::F32) << "CUDA models keep fp32 master weights, got "
                                                      << dtype_name(dtype);
  const Device device = device_;
  auto replicated = [device](const std::string& name, const Tensor& value, bool weight_decay) {
    return make_param(name, value, weight_decay, false, device);
  };
  const int64_t C = cfg.hidden, V = cfg.vocab_size;
  embedding_ = replicated("embedding", init_normal({V, C}, cfg.init_std, seed, "embedding", dtype), false);
  final_norm_ = replicated("final_norm", Tensor::full({C}, 1.0, dtype), false);
  if (!cfg.tie_embeddings) {
    lm_head_ = replicated("lm_head", init_normal({V, C}, cfg.init_std, seed, "lm_head", dtype), true);
  }
  for (int64_t i = 0; i < cfg.layers; ++i) {
    auto b = std::make_unique<Block>();
    const int layer = static_cast<int>(i);
    b->kind = cfg.pattern[i % cfg.pattern.size()];
    b->norm1 = replicated("layers." + std::to_string(i) + ".norm1", Tensor::full({C}, 1.0, dtype), false);
    b->norm2 = replicated("layers." + std::to_string(i) + ".norm2", Tensor::full({C}, 1.0, dtype), false);
    if (b->kind == 'L') {
      b->linear = std::make_unique<LinearAttentionLayer>(cfg, par_, layer, seed, dtype);
    } else {
      b->softmax = std::make_unique<SoftmaxAttentionLayer>(cfg, par_, layer, seed, dtype);
    }
    b->mlp = std::make_unique<Mlp>(cfg, par_, layer, seed, dtype);
    blocks_.push_back(std::move(b));
  }
  for (Param* p : params()) {
    num_params_full_ += p->value.numel() * (p->tp_sharded ? par.tp_size : 1);
  }
}

Model::~Model() = default;

std::vector<Param*> Model::params() {
  std::vector<Param*> out = {&embedding_};
  for (auto& b : blocks_) {
    out.push_back(&b->norm1);
    for (Param* p : b->linear ? b->linear->params() : b->softmax->params()) out.push_back(p);
    out.push_back(&b->norm2);
    for (Param* p : b->mlp->params()) out.push_back(p);
  }
  out.push_back(&final_norm_);
  if (!cfg_.tie_embeddings) out.push_back(&lm_head_);
  return out;
}

std::vector<std::vector<Param*>> Model::grad_ready_groups() {
  std::vector<std::vector<Param*>> groups;
  if (!cfg_.tie_embeddings) groups.push_back({&lm_head_});
  groups.push_back({&final_norm_});
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = **it;
    std::vector<Param*> mlp = b.mlp->params();
    mlp.push_back(&b.norm2);
    groups.push_back(mlp);
    std::vector<Param*> mixer = b.linear ? b.linear->params() : b.softmax->params();
    mixer.push_back(&b.norm1);
    groups.push_back(mixer);
  }
  groups.push_back({&embedding_});  // tied: the LM head's gradient lands here too
  return groups;
}

std::vector<Param*> Model::grad_ready_order() {
  std::vector<Param*> out;
  for (const auto& g : grad_ready_groups()) out.insert(out.end(), g.begin(), g.end());
  return out;
}

void Model::zero_grad() {
  for (Param* p : params()) {
    if (p->grad_write_only_by_projection) p->grad_stale = true;  // cleared by its first write
    else p->grad.zero_();
  }
}

void Model::clear_stale_grads(const std::vector<Param*>& params) {
  for (Param* p : params) {
    if (!p->grad_stale) continue;
    p->grad.zero_();
    p->grad_stale = false;
  }
}

std::string Model::signature() const {
  std::ostringstream os;
  os << "linear-llama v1 vocab=" << cfg_.vocab_size << " hidden=" << cfg_.hidden << " layers=" << cfg_.layers
     << " heads=" << cfg_.heads << " kv_heads=" << cfg_.kv_heads << " head_dim=" << cfg_.head_dim
     << " mlp=" << cfg_.mlp_hidden << " pattern=" << cfg_.pattern << " tied=" << cfg_.tie_embeddings
     << " decay=" << cfg_.decay << " feature_map=" << cfg_.feature_map << " dtype=" << dtype_name(dtype_);
  return os.str();
}

namespace {
// Drops what a block saved for its backward, except its input.
template <typename BlockT>
void release_block(BlockT& b) {
  b.n1 = b.rstd1 = b.x1 = b.n2 = b.rstd2 = Tensor();
  if (b.linear) b.linear->release();
  if (b.softmax) b.softmax->release();
  b.mlp->release();
}
}  // namespace

void Model::set_recompute(const std::string& mode) {
  LASP_CHECK(mode == "none" || mode == "swiglu" || mode == "mlp" || mode == "block")
      << "recompute mode '" << mode << "': expected none | swiglu | mlp | block";
  recompute_ = mode == "block"    ? Recompute::Block
               : mode == "mlp"    ? Recompute::Mlp
               : mode == "swiglu" ? Recompute::Swiglu
                                  : Recompute::None;
}

// The block input is x + skip (skip undefined: x itself, as when recomputing from b.x). Computes
// x1 = x + mixer(norm1(x)) and returns mlp(norm2(x1)); the block output is that plus b.x1.
// Saves what the backward reads.
Tensor Model::block_forward(Block& b, const Tensor& x, const Tensor& skip, const LayerContext& ctx) {
  const int64_t N = x.dim(0), C = cfg_.hidden;
  const float eps = static_cast<float>(cfg_.norm_eps);
  const DType stat = device_.is_cuda() ? DType::F32 : act_dtype_;
  auto act = [&]() { return Tensor::empty({N, C}, act_dtype_, device_); };
  b.n1 = act();
  b.rstd1 = Tensor::empty({N, 1}, stat, device_);
  if (skip.defined()) {
    b.x = act();
    residual_rmsnorm_forward(b.x, b.n1, b.rstd1, x, skip, b.norm1.value, eps);
  } else {
    b.x = x;
    rmsnorm_forward(b.n1, b.rstd1, x, b.norm1.value, eps);
  }
  Tensor mix = act();
  if (b.linear) b.linear->forward(mix, b.n1, ctx);
  else b.softmax->forward(mix, b.n1, ctx);
  b.x1 = act();
  b.n2 = act();
  b.rstd2 = Tensor::empty({N, 1}, stat, device_);
  residual_rmsnorm_forward(b.x1, b.n2, b.rstd2, mix, b.x, b.norm2.value, eps);
  Tensor out = act();
  b.mlp->forward(out, b.n2, ctx);
  return out;
}

double Model::forward_backward(const Tensor& inputs, const Tensor& targets, float loss_scale) {
  return run(inputs, targets, loss_scale, true);
}

double Model::forward_loss(const Tensor& inputs, const Tensor& targets) {
  return run(inputs, targets, 0.0f, false);
}

double Model::run(const Tensor& inputs, const Tensor& targets, float loss_scale, bool backward) {
  LASP_CHECK(inputs.ndim() == 2 && inputs.dtype() == DType::I32) << "model: inputs must be int32 [B, L], got "
                                                                 << inputs.str();
  LASP_CHECK(targets.shape() == inputs.shape() && targets.dtype() == DType::I32)
      << "model: targets must match inputs, got " << targets.str();
  const int64_t B = inputs.dim(0), L = inputs.dim(1), N = B * L, C = cfg_.hidden;
  const float eps = static_cast<float>(cfg_.norm_eps);
  LayerContext ctx{&cfg_, &par_, B, L};
  auto act = [&]() { return Tensor::empty({N, C}, act_dtype_, device_); };
  const DType stat = device_.is_cuda() ? DType::F32 : act_dtype_;
  auto weights = [](const Param& p) { return p.compute.defined() ? p.compute : p.value; };

  Tensor tokens = inputs.to(device_).view({N});
  Tensor x = act();
  embedding_forward(x, weights(embedding_), tokens);
  Tensor skip;  // the residual stream is x + skip (undefined before the first block)
  for (auto& b : blocks_) {
    Tensor out = block_forward(*b, x, skip, ctx);
    skip = b->x1;
    if (!backward || recompute_ == Recompute::Block) release_block(*b);  // keep the block input only
    if (recompute_ == Recompute::Mlp) b->mlp->release();                 // keep all but the MLP's
    if (backward && recompute_ == Recompute::Swiglu) b->mlp->release_h();  // keep gate and up
    x = out;
  }
  Tensor h = act(), h_rstd = Tensor::empty({N, 1}, stat, device_);
  if (skip.defined()) {
    Tensor sum = act();
    residual_rmsnorm_forward(sum, h, h_rstd, x, skip, final_norm_.value, eps);
    x = sum;
    skip = Tensor();
  } else {
    rmsnorm_forward(h, h_rstd, x, final_norm_.value, eps);
  }
  Param& head = cfg_.tie_embeddings ? embedding_ : lm_head_;
  Tensor dh = backward ? act() : Tensor();
  Tensor dw = backward ? head.grad : Tensor();
  const double loss =
      lm_head_cross_entropy(dh, dw, h, weights(head), targets.to(device_).view({N}), loss_scale, cfg_.ce_chunk,
                            lm_head_precision_from_name(cfg_.precision.lm_head));
  if (!backward) return loss;

  // Tells the hook, part by part, which gradients are final (grad_ready_groups() order).
  const std::vector<std::vector<Param*>> ready_groups =
      grad_ready_ ? grad_ready_groups() : std::vector<std::vector<Param*>>();
  size_t next_ready = 0;
  auto grads_ready = [&]() {
    if (grad_ready_) {
      clear_stale_grads(ready_groups.at(next_ready));  // a weight that got no gradient reads 0
      grad_ready_(ready_groups.at(next_ready++));
    }
  };
  if (!cfg_.tie_embeddings) grads_ready();  // LM head
  Tensor dx = act();
  rmsnorm_backward(dx, final_norm_.grad, dh, x, final_norm_.value, h_rstd);
  grads_ready();  // final norm
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = **it;
    // Recompute what this block's backward reads and was not kept.
    if (recompute_ == Recompute::Block) block_forward(b, b.x, Tensor(), ctx);
    if (recompute_ == Recompute::Mlp) {
      Tensor discard = act();
      b.mlp->forward(discard, b.n2, ctx);
    }
    // dx holds d(x2). Through the MLP branch into d(x1).
    Tensor dn2 = act();
    b.mlp->backward(dn2, dx, ctx);
    Tensor dx1 = act();  // d(x1) = dx + norm2's backward
    rmsnorm_backward(dx1, b.norm2.grad, dn2, b.x1, b.norm2.value, b.rstd2, 0, dx);
    grads_ready();  // MLP and norm2
    // Through the mixer branch into d(x).
    Tensor dn1 = act();
    if (b.linear) b.linear->backward(dn1, dx1, ctx);
    else b.softmax->backward(dn1, dx1, ctx);
    Tensor dxin = act();  // d(x) = d(x1) + norm1's backward
    rmsnorm_backward(dxin, b.norm1.grad, dn1, b.x, b.norm1.value, b.rstd1, 0, dx1);
    grads_ready();  // mixer and norm1
    dx = dxin;
    if (recompute_ == Recompute::Block) release_block(b);
    if (recompute_ == Recompute::Mlp) b.mlp->release();
    if (recompute_ == Recompute::Swiglu) b.mlp->release_h();  // the recomputed h
  }
  embedding_backward(embedding_.grad, dx, tokens);
  grads_ready();  // embedding
  LASP_CHECK(!grad_ready_ || next_ready == ready_groups.size())
      << "model backward reported " << next_ready << " of " << ready_groups.size() << " gradient groups";
  clear_stale_grads(params());  // from here on every gradient holds its value
  return loss;
}

double model_flops_per_token(const ModelConfig& cfg, int64_t seq_len) {
  const double C = static_cast<double>(cfg.hidden), D = static_cast<double>(cfg.head_dim);
  const double H = static_cast<double>(cfg.heads), KV = static_cast<double>(cfg.kv_heads);
  const double T = static_cast<double>(seq_len);
  const double chunk = static_cast<double>(std::min(cfg.chunk, seq_len));
  const double mlp = 3.0 * C * static_cast<double>(cfg.mlp_hidden);
  double weights = C * static_cast<double>(cfg.vocab_size);  // LM head
  double attention = 0.0;
  for (int64_t layer = 0; layer < cfg.layers; ++layer) {
    const char kind = cfg.pattern[static_cast<size_t>(layer) % cfg.pattern.size()];
    weights += mlp;
    if (kind == 'S') {
      weights += 2.0 * C * H * D + 2.0 * C * KV * D;  // q, o; k, v
      attention += H * 2.0 * T * D;
    } else {
      weights += 5.0 * C * H * D + (cfg.decay == "data" ? C * H : 0.0);  // q, k, v, z, o; gate
      attention += H * (4.0 * D * D + 2.0 * chunk * D);
    }
  }
  return 3.0 * (2.0 * weights + attention);
}

}  // namespace lasp
