// The whole model: gradients of the loss with respect to every parameter tensor against central
// finite differences in float64, for every decay mode, feature maps and both mixers.
#include <gtest/gtest.h>

#include <random>

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
  for (const char* mode : {"block", "mlp"})
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

TEST(Model, RejectsTokensOutsideTheVocabulary) {
  ModelConfig cfg = tiny_model("none", "none", true);
  ModelParallel par;
  Model model(cfg, par, 1, DType::F32);
  Tensor inputs = Tensor::full({1, 3}, 17, DType::I32), targets = Tensor::full({1, 3}, 1, DType::I32);
  EXPECT_THROW(model.forward_loss(inputs, targets), Error);
}

}  // namespace
}  // namespace lasp
