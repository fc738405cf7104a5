#include "optim/optim.h"

#include <cmath>

#include "core/profile.h"
#include "kernels/ops.h"
#include "kernels/ops_batched.h"

namespace lasp {

AdamW::AdamW(const OptimConfig& cfg, std::vector<Param*> params) : cfg_(cfg), params_(std::move(params)) {
  for (Param* p : params_) {
    m_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
    v_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
  }
}

void AdamW::step(double lr, double grad_scale) {
  LASP_PROFILE_SCOPE("optimizer");
  ++t_;
  const double c1 = 1.0 - std::pow(cfg_.beta1, double(t_)), c2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  std::vector<AdamWTensors> list;
  list.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const Param& p = *params_[i];
    const double wd = p.weight_decay ? cfg_.weight_decay : 0.0;
    list.push_back({p.value, p.compute, p.grad, m_[i], v_[i], static_cast<float>(wd)});
  }
  adamw_update_many(list, static_cast<float>(lr), static_cast<float>(cfg_.beta1), static_cast<float>(cfg_.beta2),
                    static_cast<float>(cfg_.eps), static_cast<float>(c1), static_cast<float>(c2),
                    static_cast<float>(grad_scale));
}

double learning_rate(const OptimConfig& cfg, int64_t step, int64_t total) {
  const double peak = cfg.lr, floor = cfg.lr * cfg.min_lr_ratio;
  if (step < cfg.warmup_steps) return peak * double(step + 1) / double(cfg.warmup_steps);
  if (cfg.schedule == "constant") return peak;
  const double span = std::max<int64_t>(1, total - cfg.warmup_steps);
  const double t = std::min(1.0, double(step - cfg.warmup_steps) / span);
  if (cfg.schedule == "cosine") return floor + (peak - floor) * 0.5 * (1.0 + std::cos(M_PI * t));
  // wsd: stable at the peak, then linear decay to the floor over the last decay_fraction.
  const double decay_start = 1.0 - cfg.decay_fraction;
  if (t <= decay_start || cfg.decay_fraction <= 0) return peak;
  return peak + (floor - peak) * (t - decay_start) / cfg.decay_fraction;
}

double grad_sum_of_squares(const std::vector<Param*>& params) {
  std::vector<Tensor> grads;
  for (const Param* p : params) grads.push_back(p->grad);
  return sum_of_squares_many(grads);
}

void scale_grads(const std::vector<Param*>& params, double factor) {
  for (Param* p : params) scale_inplace(p->grad, static_cast<float>(factor));
}

}  // namespace lasp
