// Optimizer: AdamW with decoupled weight decay and bias correction, learning-rate schedules and
// global gradient-norm clipping.
//
// AdamW step t (1-based) for parameter w with gradient g:
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   w -= lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w )   (wd only on matrices)
// The parameters are the fp32 master weights (the model computes in them on CPU).
#pragma once

#include <cstdint>
#include <vector>

#include "core/config.h"
#include "core/model/layers.h"

namespace lasp {

class AdamW {
 public:
  AdamW(const OptimConfig& cfg, std::vector<Param*> params);
  // One update with learning rate lr, the gradients taken as grad_scale * grad (clipping).
  void step(double lr, double grad_scale = 1.0);
  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }
  // Moment tensors, in params() order, for checkpoints.
  std::vector<Tensor>& first_moments() { return m_; }
  std::vector<Tensor>& second_moments() { return v_; }

 private:
  OptimConfig cfg_;
  std::vector<Param*> params_;
  std::vector<Tensor> m_, v_;
  int64_t t_ = 0;
};

// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup to optim.lr, then
// cosine to min_lr_ratio * lr, or warmup-stable-decay (flat, then linear decay over the last
// decay_fraction of the steps), or constant.
double learning_rate(const OptimConfig& cfg, int64_t step, int64_t total);

// Sum of squared gradient entries of the given parameters (in double; one device sync).
double grad_sum_of_squares(const std::vector<Param*>& params);
// Scales every gradient by `factor`.
void scale_grads(const std::vector<Param*>& params, double factor);

}  // namespace lasp
