// The whole model: gradients of the loss with respect to every parameter tensor against central
// finite differences in float64, for every decay mode, feature maps and both mixers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/model/layers.h"
#include "core/model/model.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

using testing::expect_grad_matches_fd;

ModelConfig tiny_model(const std::string& decay, const std::string& feature_map, bool tied) {
  ModelConfig m;
  m.vocab_size = 17;
  m.hidden = 8;
  m.layers = 2;
  m.heads = 2;
  m.kv_heads = 1;
  m.head_dim = 4;
  m.mlp_hidden = 12;
  m.pattern = "LS";
  m.tie_embeddings = tied;
  m.decay = decay;
  m.feature_map = feature_map;
  m.chunk = 4;  // L = 9 is not a multiple
  m.ce_chunk = 5;
  m.init_std = 0.3;  // large enough that every path carries signal
  return m;
}

void make_batch(std::mt19937& rng, int64_t B, int64_t L, int64_t V, Tensor& inputs, Tensor& targets) {
  inputs = Tensor::empty({B, L}, DType::I32);
  targets = Tensor::empty({B, L}, DType::I32);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(V) - 1);
  for (int64_t i = 0; i < B * L; ++i) {
    inputs.data<int32_t>()[i] = tok(rng);
    targets.data<int32_t>()[i] = i % 7 == 3 ? -1 : tok(rng);
  }
}

struct Case {
  const char* decay;
  const char* feature_map;
  bool tied;
};

class ModelGradient : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGradient, EveryParameterGradientMatchesFiniteDifferences) {
  const Case c = GetParam();
  const ModelConfig cfg = tiny_model(c.decay, c.feature_map, c.tied);
  ModelParallel par;
  Model model(cfg, par, 42, DType::F64);
  std::mt19937 rng(7);
  Tensor inputs, targets;
  make_batch(rng, 2, 9, cfg.vocab_size, inputs, targets);
  const float scale = 1.0f / 18.0f;
  model.zero_grad();
  const double loss = model.forward_backward(inputs, targets, scale);
  EXPECT_GT(loss, 0.0);
  EXPECT_NEAR(loss, model.forward_loss(inputs, targets), 1e-12 * loss) << "forward_loss equals the training loss";
  auto f = [&]() { return scale * model.forward_loss(inputs, targets); };
  for (Param* p : model.params()) {
    expect_grad_matches_fd(f, p->value, p->grad, p->name.c_str(), 2e-6, 6);
  }
}

INSTANTIATE_TEST_SUITE_P(DecayModesAndFeatureMaps, ModelGradient,
                         ::testing::Values(Case{"none", "none", true}, Case{"constant", "silu", false},
                                           Case{"data", "elu1", true}, Case{"data", "relu", false}));

TEST(Model, InitialLossIsNearUniformAndParameterCountMatchesShapes) {
  ModelConfig cfg = tiny_model("constant", "none", false);
  cfg.init_std = 0.02;
  cfg.vocab_size = 256;
  ModelParallel par;
  Model model(cfg, par, 1, DType::F32);
  std::mt19937 rng(3);
  Tensor inputs, targets;
  make_batch(rng, 2, 9, cfg.vocab_size, inputs, targets);
  int64_t counted = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) counted += targets.data<int32_t>()[i] >= 0;
  EXPECT_NEAR(model.forward_loss(inputs, targets) / counted, std::log(256.0), 0.05);
  // embedding + lm_head + final norm + 2 x (2 norms + mlp) + linear layer + softmax layer
  const int64_t C = 8, V = 256, HD = 8, KV = 4, F = 12;
  const int64_t expected = 2 * V * C + C + 2 * (2 * C + 3 * C * F) + (4 * HD * C + C * HD + HD) +
                           (HD * C + 2 * KV * C + C * HD);
  EXPECT_EQ(model.num_params_full(), expected);
}

TEST(Model, BlockAndSelectiveRecomputationGiveIdenticalLossAndGradients) {
  for (const char* mode : {"block", "mlp", "swiglu"})
  for (const char* decay : {"constant", "data"}) {
    SCOPED_TRACE(std::string(mode) + " " + decay);
    const ModelConfig cfg = tiny_model(decay, "silu", false);
    ModelParallel par;
    Model keep(cfg, par, 5, DType::F64), recompute(cfg, par, 5, DType::F64);
    recompute.set_recompute(mode);
    std::mt19937 rng(11);
    Tensor inputs, targets;
    make_batch(rng, 2, 9, cfg.vocab_size, inputs, targets);
    keep.zero_grad();
    recompute.zero_grad();
    EXPECT_EQ(keep.forward_backward(inputs, targets, 0.1f), recompute.forward_backward(inputs, targets, 0.1f));
    auto a = keep.params(), b = recompute.params();
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i]->grad.to_vector(), b[i]->grad.to_vector()) << a[i]->name;
    }
  }
  ModelParallel par;
  Model m(tiny_model("none", "none", true), par, 1, DType::F32);
  EXPECT_THROW(m.set_recompute("selective"), Error);
}

// "swiglu" recomputation at the layer: an MLP whose SwiGLU output was dropped after the forward
// recomputes it in the backward and gives the same input and weight gradients, bit for bit.
TEST(Model, MlpBackwardRecomputesTheDroppedSwigluOutput) {
  const ModelConfig cfg = tiny_model("constant", "none", false);
  ModelParallel par;
  const LayerContext ctx{&cfg, &par, 2, 9};
  std::mt19937 rng(3);
  const Tensor x = testing::random_tensor({18, cfg.hidden}, rng, 1.0, DType::F64);
  const Tensor dy = testing::random_tensor({18, cfg.hidden}, rng, 1.0, DType::F64);
  Mlp kept(cfg, par, 0, 7, DType::F64), dropped(cfg, par, 0, 7, DType::F64);
  Tensor y1 = Tensor::empty({18, cfg.hidden}, DType::F64), y2 = Tensor::empty({18, cfg.hidden}, DType::F64);
  kept.forward(y1, x, ctx);
  dropped.forward(y2, x, ctx);
  dropped.release_h();
  Tensor dx1 = Tensor::full({18, cfg.hidden}, std::nan(""), DType::F64);
  Tensor dx2 = Tensor::full({18, cfg.hidden}, std::nan(""), DType::F64);
  kept.backward(dx1, dy, ctx);
  dropped.backward(dx2, dy, ctx);
  EXPECT_EQ(y1.to_vector(), y2.to_vector());
  EXPECT_EQ(dx1.to_vector(), dx2.to_vector());
  auto a = kept.params(), b = dropped.params();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]->grad.to_vector(), b[i]->grad.to_vector()) << a[i]->name;
  for (double v : dx2.to_vector()) ASSERT_TRUE(std::isfinite(v));
}

// zero_grad leaves the projection weights' gradients in place, marked stale: the next backward
// must overwrite them. Poisoned gradients from an earlier step must not reach the result, and
// gradients the backward does not write must read zero.
TEST(Model, ZeroGradThenBackwardGivesTheGradientOfAFreshModel) {
  for (const char* decay : {"constant", "data"}) {
    SCOPED_TRACE(decay);
    const ModelConfig cfg = tiny_model(decay, "silu", false);
    ModelParallel par;
    Model fresh(cfg, par, 3, DType::F64), reused(cfg, par, 3, DType::F64);
    std::mt19937 rng(5);
    Tensor inputs, targets;
    make_batch(rng, 2, 9, cfg.vocab_size, inputs, targets);
    fresh.forward_backward(inputs, targets, 0.1f);  // gradients start at zero
    reused.forward_backward(inputs, targets, 0.1f);
    for (Param* p : reused.params()) p->grad.fill_(std::nan(""));
    reused.zero_grad();
    reused.forward_backward(inputs, targets, 0.1f);
    auto a = fresh.params(), b = reused.params();
    int stale_marked = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i]->grad.to_vector(), b[i]->grad.to_vector()) << a[i]->name;
      EXPECT_FALSE(b[i]->grad_stale) << b[i]->name;
      stale_marked += b[i]->grad_write_only_by_projection;
    }
    // q, k, v, z, o (+ the gate) of the linear layer, q, k, v, o of the softmax one, 2 x 3 MLP
    EXPECT_EQ(stale_marked, std::string(decay) == "data" ? 16 : 15);
  }
}

TEST(Model, RejectsTokensOutsideTheVocabulary) {
  ModelConfig cfg = tiny_model("none", "none", true);
  ModelParallel par;
  Model model(cfg, par, 1, DType::F32);
  Tensor inputs = Tensor::full({1, 3}, 17, DType::I32), targets = Tensor::full({1, 3}, 1, DType::I32);
  EXPECT_THROW(model.forward_loss(inputs, targets), Error);
}

// The tiny default (configs/tiny.yaml: hidden 128, 4 layers LLLS, 2 heads of 64, 1 KV head, MLP
// 384, vocab 256, chunk 64) at T = 256, counted by hand. Forward FLOPs per token:
//   linear layer: 2 x (q, k, v, z: 4 x 128 x 128 + o: 128 x 128) = 163,840
//                 + attention 2 heads x (4 x 64^2 + 2 x 64 x 64) = 49,152          (x 3 layers)
//   softmax layer: 2 x (q, o: 2 x 128 x 128 + k, v: 2 x 128 x 64) = 98,304
//                 + attention 2 heads x 2 x 256 x 64 = 65,536
//   MLP: 2 x 3 x 128 x 384 = 294,912 (x 4); LM head: 2 x 128 x 256 = 65,536
// = 3 x 212,992 + 163,840 + 4 x 294,912 + 65,536 = 2,048,000; training = 3 x forward.
TEST(ModelFlops, TinyDefaultCountedByHand) {
  ModelConfig cfg;
  cfg.vocab_size = 256;
  cfg.hidden = 128;
  cfg.layers = 4;
  cfg.pattern = "LLLS";
  cfg.heads = 2;
  cfg.kv_heads = 1;
  cfg.head_dim = 64;
  cfg.mlp_hidden = 384;
  cfg.chunk = 64;
  cfg.decay = "constant";
  EXPECT_DOUBLE_EQ(model_flops_per_token(cfg, 256), 3.0 * 2048000.0);
  // The data-dependent gate adds 2 x 128 x 2 per linear layer.
  cfg.decay = "data";
  EXPECT_DOUBLE_EQ(model_flops_per_token(cfg, 256), 3.0 * (2048000.0 + 3 * 512.0));
  // Only the softmax layer's attention grows with T: 2 heads x 2 x T x 64 per token.
  cfg.decay = "constant";
  EXPECT_DOUBLE_EQ(model_flops_per_token(cfg, 1024) - model_flops_per_token(cfg, 256),
                   3.0 * 2 * 2 * (1024 - 256) * 64.0);
}

// The projection part of the count agrees with the matrices the model actually builds: 2 x the
// elements of every 2-D weight except the embedding, plus the LM head (tied or not).
TEST(ModelFlops, ProjectionFlopsEqualTwiceTheModelsMatrixWeights) {
  for (const char* decay : {"constant", "data"})
    for (bool tied : {true, false}) {
      ModelConfig cfg = tiny_model(decay, "none", tied);
      ModelParallel par;
      Model model(cfg, par, 1, DType::F32);
      double weights = static_cast<double>(cfg.vocab_size * cfg.hidden);  // LM head
      for (Param* p : model.params())
        if (p->value.ndim() == 2 && p->name != "embedding") weights += p->value.numel();
      if (!tied) weights -= static_cast<double>(cfg.vocab_size * cfg.hidden);  // counted above
      // Attention terms of tiny_model by the header's formula, per token: softmax layers
      // 2 T D per head, linear layers 4 D^2 + 2 min(C, T) D per head.
      const int64_t T = 40;
      double attention = 0;
      for (int64_t l = 0; l < cfg.layers; ++l) {
        const bool softmax = cfg.pattern[l % cfg.pattern.size()] == 'S';
        const double D = cfg.head_dim, chunk = std::min<int64_t>(cfg.chunk, T);
        attention += cfg.heads * (softmax ? 2.0 * T * D : 4.0 * D * D + 2.0 * chunk * D);
      }
      EXPECT_DOUBLE_EQ(model_flops_per_token(cfg, T), 3.0 * (2.0 * weights + attention))
          << "decay " << decay << ", tied " << tied;
    }
}

}  // namespace
}  // namespace lasp
