// AdamW and the learning-rate schedules against formulas written out here.
#include <gtest/gtest.h>

#include <cmath>

#include "core/model/layers.h"
#include "optim/optim.h"

namespace lasp {
namespace {

Param make(const std::vector<double>& w, const std::vector<double>& g, bool decay) {
  Param p;
  p.name = "w";
  p.value = Tensor::from_values(w, {static_cast<int64_t>(w.size())}, DType::F64);
  p.grad = Tensor::from_values(g, {static_cast<int64_t>(g.size())}, DType::F64);
  p.weight_decay = decay;
  return p;
}

TEST(AdamW, ThreeStepsMatchTheDecoupledBiasCorrectedFormula) {
  OptimConfig cfg;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.9;
  cfg.eps = 1e-6;
  cfg.weight_decay = 0.1;
  Param a = make({1.0, -2.0, 0.5}, {0.3, -0.1, 0.0}, true);
  Param b = make({1.0, -2.0, 0.5}, {0.3, -0.1, 0.0}, false);  // no decay (a norm weight)
  AdamW opt(cfg, {&a, &b});
  std::vector<double> w = {1.0, -2.0, 0.5}, wb = w, m(3, 0), v(3, 0);
  const double grads[3][3] = {{0.3, -0.1, 0.0}, {-0.2, 0.4, 1.0}, {0.05, 0.05, -0.5}};
  const double lrs[3] = {0.01, 0.02, 0.005};
  for (int t = 1; t <= 3; ++t) {
    for (int i = 0; i < 3; ++i) {
      a.grad.set_item(i, grads[t - 1][i]);
      b.grad.set_item(i, grads[t - 1][i]);
    }
    opt.step(lrs[t - 1]);
    for (int i = 0; i < 3; ++i) {
      const double g = grads[t - 1][i];
      m[i] = 0.8 * m[i] + 0.2 * g;
      v[i] = 0.9 * v[i] + 0.1 * g * g;
      const double mh = m[i] / (1 - std::pow(0.8, t)), vh = v[i] / (1 - std::pow(0.9, t));
      const double adam = mh / (std::sqrt(vh) + 1e-6);
      w[i] -= lrs[t - 1] * (adam + 0.1 * w[i]);
      wb[i] -= lrs[t - 1] * adam;
      // The update kernel takes its hyperparameters as fp32 (as the CUDA one does): 1e-7 slack.
      EXPECT_NEAR(a.value.item(i), w[i], 1e-7) << "step " << t << " element " << i;
      EXPECT_NEAR(b.value.item(i), wb[i], 1e-7) << "step " << t << " element " << i;
    }
  }
  EXPECT_EQ(opt.steps_taken(), 3);
}

TEST(LearningRate, WarmupThenCosineWsdAndConstant) {
  OptimConfig c;
  c.lr = 1.0;
  c.min_lr_ratio = 0.1;
  c.warmup_steps = 10;
  c.schedule = "cosine";
  EXPECT_DOUBLE_EQ(learning_rate(c, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(c, 9, 110), 1.0);
  EXPECT_NEAR(learning_rate(c, 60, 110), 0.55, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(learning_rate(c, 110, 110), 0.1, 1e-12);
  c.schedule = "wsd";
  c.decay_fraction = 0.2;
  EXPECT_DOUBLE_EQ(learning_rate(c, 50, 110), 1.0);   // stable
  EXPECT_NEAR(learning_rate(c, 100, 110), 0.55, 1e-12);  // halfway through the last 20%
  EXPECT_NEAR(learning_rate(c, 110, 110), 0.1, 1e-12);
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(c, 100, 110), 1.0);
}

TEST(GradientClipping, SumOfSquaresAndScalingActOnEveryParameter) {
  Param a = make({0, 0}, {3, 0}, true), b = make({0}, {4}, true);
  std::vector<Param*> ps = {&a, &b};
  EXPECT_DOUBLE_EQ(grad_sum_of_squares(ps), 25.0);
  scale_grads(ps, 0.2);
  EXPECT_NEAR(std::sqrt(grad_sum_of_squares(ps)), 1.0, 1e-7);  // the factor travels as fp32
  EXPECT_NEAR(b.grad.item(0), 0.8, 1e-7);
}

}  // namespace
}  // namespace lasp
