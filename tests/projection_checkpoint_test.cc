// The FP8 delayed-scaling state as a checkpoint tensor: what it holds after known steps, that a
// restored projection continues exactly like the original, and that bad states are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/check.h"
#include "core/model/projection.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

// A fresh seed per test, printed so a failure can be replayed.
uint32_t test_seed() {
  const uint32_t s = std::random_device{}();
  std::printf("[ seed ] %u\n", s);
  return s;
}

Tensor normal(const Shape& shape, std::mt19937& rng, double stddev) {
  std::normal_distribution<double> d(0.0, stddev);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(d(rng));
  return t;
}

float abs_max(const Tensor& t) {
  float m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(t.data<float>()[i]));
  return m;
}

Param fp8_weight(const std::string& name, const Tensor& w) {
  Param p;
  p.name = name;
  p.value = w.clone();
  p.grad = Tensor::zeros(w.shape(), DType::F32);
  p.precision = Precision::Fp8;
  return p;
}

struct Step {
  Tensor x, dy;
};

// One forward and backward of w; returns y, dx and the weight gradient, flattened.
std::vector<double> run(Param& w, const Step& s) {
  Tensor y = Tensor::empty({s.x.dim(0), w.value.dim(0)}, DType::F32);
  Tensor dx = Tensor::empty(s.x.shape(), DType::F32);
  w.grad.fill_(0.0);
  projection_forward(y, s.x, w);
  projection_backward(dx, false, w, s.dy, s.x);
  std::vector<double> out = y.to_vector();
  for (double v : dx.to_vector()) out.push_back(v);
  for (double v : w.grad.to_vector()) out.push_back(v);
  return out;
}

PrecisionConfig delayed() {
  PrecisionConfig c;
  c.fp8_scaling = "delayed";
  return c;
}

TEST(ProjectionScalingState, HoldsTheAmaxRecordsOfEveryOperandInOrder) {
  set_projection_options(delayed(), 5);
  std::mt19937 rng(test_seed());
  Param w = fp8_weight("layers.0.mlp.up", normal({24, 32}, rng, 0.1));
  ASSERT_TRUE(projection_keeps_scaling_state(w));
  std::vector<float> xs, dys;
  for (int i = 0; i < 20; ++i) {  // more steps than the window (16)
    const Step s{normal({16, 32}, rng, 1.0 + i), normal({16, 24}, rng, 0.01 * (i + 1))};
    xs.push_back(abs_max(s.x));
    dys.push_back(abs_max(s.dy));
    run(w, s);
  }
  const Tensor st = projection_scaling_state(w);
  ASSERT_EQ(st.shape(), projection_scaling_state_shape());
  const int L = static_cast<int>(st.dim(1)) - 1;
  ASSERT_EQ(L, 16);
  const float* p = st.data<float>();
  EXPECT_EQ(p[0], 16.0f);
  EXPECT_EQ(p[(L + 1) * 2], 16.0f);
  for (int k = 0; k < L; ++k) {
    EXPECT_EQ(p[1 + k], xs[20 - L + k]) << "x record " << k;
    EXPECT_EQ(p[(L + 1) * 1 + 1 + k], abs_max(w.value)) << "W record " << k;
    EXPECT_EQ(p[(L + 1) * 2 + 1 + k], dys[20 - L + k]) << "dy record " << k;
  }
}

TEST(ProjectionScalingState, ARestoredProjectionContinuesExactlyLikeTheOriginal) {
  set_projection_options(delayed(), 5);
  std::mt19937 rng(test_seed());
  const Tensor w0 = normal({24, 32}, rng, 0.1);
  Param a = fp8_weight("layers.1.attn.q", w0);
  std::vector<Step> steps;
  for (int i = 0; i < 8; ++i) steps.push_back({normal({16, 32}, rng, 4.0 - 0.4 * i), normal({16, 24}, rng, 1e-2)});
  for (int i = 0; i < 5; ++i) run(a, steps[i]);
  const Tensor saved = projection_scaling_state(a);

  Param b = fp8_weight("layers.1.attn.q", w0);  // a fresh state, as after a restart
  Param fresh = fp8_weight("layers.1.attn.q", w0);
  set_projection_scaling_state(b, saved);
  for (int i = 5; i < 8; ++i) {
    const std::vector<double> ra = run(a, steps[i]), rb = run(b, steps[i]), rf = run(fresh, steps[i]);
    EXPECT_EQ(ra, rb) << "step " << i;
    // Without the history the scales differ (the inputs shrink step by step, so the window's
    // max is above the current amax): the state really matters.
    if (i == 5) {
      EXPECT_NE(ra, rf);
    }
  }
}

TEST(ProjectionScalingState, BadStatesAreRefusedNamingTheWeightAndChangeNothing) {
  set_projection_options(delayed(), 5);
  std::mt19937 rng(test_seed());
  Param w = fp8_weight("layers.7.mlp.down", normal({8, 16}, rng, 0.1));
  run(w, {normal({4, 16}, rng, 1.0), normal({4, 8}, rng, 1.0)});
  const Tensor before = projection_scaling_state(w);
  Tensor wrong_shape = Tensor::zeros({2, 17}, DType::F32);
  Tensor too_many = before.clone();
  too_many.data<float>()[0] = 17;
  Tensor negative = before.clone();
  negative.data<float>()[1] = -1;
  for (const Tensor* bad : {&wrong_shape, &too_many, &negative}) {
    try {
      set_projection_scaling_state(w, *bad);
      ADD_FAILURE() << "accepted " << bad->str();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("layers.7.mlp.down"), std::string::npos) << e.what();
    }
    EXPECT_EQ(projection_scaling_state(w).to_vector(), before.to_vector());
  }
  PrecisionConfig per_tensor;
  set_projection_options(per_tensor, 5);
  EXPECT_FALSE(projection_keeps_scaling_state(w)) << "only delayed scaling has a state to keep";
}

}  // namespace
}  // namespace lasp
