// The per-step caches behind set_projection_step / projection_weights_changed belong to the CUDA
// paths only: the CPU emulation quantizes its operands on every call, so on the CPU a weight
// changed in place is picked up at once, cached or not (the GPU side is in
// tests/gpu/projection_gpu_test.cc).
#include <gtest/gtest.h>

#include <random>

#include "core/model/projection.h"

namespace {

using namespace lasp;

Tensor random_matrix(int64_t r, int64_t c, std::mt19937& rng, double s) {
  std::normal_distribution<double> d(0.0, s);
  Tensor t = Tensor::empty({r, c}, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, d(rng));
  return t;
}

TEST(ProjectionCache, CpuProjectionsFollowWeightsChangedInPlaceWithinAStep) {
  std::mt19937 rng(3);
  for (const char* precision : {"fp8", "fp4"}) {
    SCOPED_TRACE(precision);
    set_projection_options(PrecisionConfig{}, 1);
    set_projection_step(4);
    const Tensor x = random_matrix(32, 64, rng, 1.0);
    const Tensor w1 = random_matrix(32, 64, rng, 0.1), w2 = random_matrix(32, 64, rng, 0.1);
    Param w;
    w.name = "layers.0.mlp.up";
    w.value = w1.clone();
    w.grad = Tensor::zeros(w1.shape(), DType::F32);
    w.precision = precision_from_name(precision);
    Tensor y1 = Tensor::empty({32, 32}, DType::F32), y2 = Tensor::empty({32, 32}, DType::F32);
    projection_forward(y1, x, w);
    w.value.copy_from(w2);  // no projection_weights_changed(): the CPU has nothing cached
    projection_forward(y2, x, w);
    Param fresh = w;
    fresh.state.reset();
    Tensor y_ref = Tensor::empty({32, 32}, DType::F32);
    projection_forward(y_ref, x, fresh);
    for (int64_t i = 0; i < y2.numel(); ++i) ASSERT_EQ(y2.item(i), y_ref.item(i)) << i;
    double diff = 0;
    for (int64_t i = 0; i < y1.numel(); ++i) diff += std::abs(y1.item(i) - y2.item(i));
    EXPECT_GT(diff, 0.0);
    projection_weights_changed();  // harmless on the CPU
    Tensor y3 = Tensor::empty({32, 32}, DType::F32);
    projection_forward(y3, x, w);
    for (int64_t i = 0; i < y3.numel(); ++i) ASSERT_EQ(y3.item(i), y_ref.item(i)) << i;
  }
}

}  // namespace
