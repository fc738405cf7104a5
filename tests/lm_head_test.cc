// The fused LM head + cross-entropy in FP8 (precision.lm_head = fp8) on the CPU, against an
// independent float64 reference built from the quantized values, and the config rules of the key.
#include "kernels/lm_head.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/dtype.h"
#include "core/model/model.h"
#include "kernels/quantize.h"
#include "test_util.h"

namespace lasp {
namespace {

using testing::random_tensor;

// Per-tensor FP8 values decode(code) * scale, restated from the rule (s = amax / format_max,
// code = RTN-even saturating encode of x / s), in double.
std::vector<double> fp8_values(const std::vector<double>& x, Fp8Format format) {
  float amax = 0.0f;
  for (double v : x) amax = std::max(amax, std::fabs(static_cast<float>(v)));
  const float s = amax > 0.0f ? amax / fp8_format_max(format) : 1.0f;
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i)
    out[i] =
        static_cast<double>(fp8_decode(fp8_encode(static_cast<float>(x[i]) / s, format), format)) *
        s;
  return out;
}

double bf16_value(double x) { return bf16_to_float(float_to_bf16(static_cast<float>(x))); }

std::vector<double> values_of(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.item(i);
  return v;
}

struct Reference {
  double loss = 0;
  std::vector<double> dh, dw;
};

// The FP8 LM head in float64: E4M3 h and W (one scale each), per chunk bf16 logits, lse, bf16
// dlogits = loss_scale (softmax - onehot), E5M2 dlogits with the chunk's scale, d_h = dl W,
// d_w += dl^T h.
Reference fp8_reference(const Tensor& h, const Tensor& w, const std::vector<int>& targets,
                        float loss_scale, int64_t chunk) {
  const int64_t N = h.dim(0), C = h.dim(1), V = w.dim(0);
  const std::vector<double> hq = fp8_values(values_of(h), Fp8Format::E4M3);
  const std::vector<double> wq = fp8_values(values_of(w), Fp8Format::E4M3);
  Reference ref;
  ref.dh.assign(static_cast<size_t>(N * C), 0.0);
  ref.dw.assign(static_cast<size_t>(V * C), 0.0);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    std::vector<double> dl(static_cast<size_t>(rows * V), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const int t = targets[static_cast<size_t>(r0 + r)];
      if (t < 0) continue;
      std::vector<double> logit(static_cast<size_t>(V), 0.0);
      double mx = -1e300;
      for (int64_t v = 0; v < V; ++v) {
        for (int64_t c = 0; c < C; ++c) logit[v] += hq[(r0 + r) * C + c] * wq[v * C + c];
        logit[v] = bf16_value(logit[v]);  // the FP8 head stores its logits in bf16
        mx = std::max(mx, logit[v]);
      }
      double z = 0;
      for (double l : logit) z += std::exp(l - mx);
      const double lse = mx + std::log(z);
      ref.loss += lse - logit[static_cast<size_t>(t)];
      for (int64_t v = 0; v < V; ++v)
        dl[r * V + v] = bf16_value(loss_scale * (std::exp(logit[v] - lse) - (v == t ? 1.0 : 0.0)));
    }
    const std::vector<double> dlq = fp8_values(dl, Fp8Format::E5M2);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0;
        for (int64_t v = 0; v < V; ++v) acc += dlq[r * V + v] * wq[v * C + c];
        ref.dh[(r0 + r) * C + c] = acc;
      }
    for (int64_t v = 0; v < V; ++v)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < rows; ++r) acc += dlq[r * V + v] * hq[(r0 + r) * C + c];
        ref.dw[v * C + c] += acc;
      }
  }
  return ref;
}

double rel_error(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(LmHeadFp8, MatchesFloat64ReferenceOfTheQuantizedOperandsForEveryChunking) {
  std::mt19937 rng(11);
  const int64_t N = 29, C = 24, V = 53;
  const Tensor h = random_tensor({N, C}, rng, 1.0, DType::F32);
  const Tensor w = random_tensor({V, C}, rng, 0.3, DType::F32);
  std::vector<int> tg(N);
  std::vector<double> tgd(N);
  for (int64_t i = 0; i < N; ++i) tgd[i] = tg[i] = static_cast<int>((i * 13) % V);
  tgd[5] = tg[5] = -1;  // ignored
  const Tensor targets = Tensor::from_values(tgd, {N}, DType::I32);
  const float loss_scale = 0.25f;
  for (int64_t chunk : {1, 8, 29, 100}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    const Reference ref = fp8_reference(h, w, tg, loss_scale, chunk);
    Tensor dh = Tensor::empty({N, C}, DType::F32), dw = Tensor::zeros({V, C}, DType::F32);
    const double loss =
        lm_head_cross_entropy(dh, dw, h, w, targets, loss_scale, chunk, LmHeadPrecision::Fp8);
    // The implementation computes in fp32 before its bf16 roundings: a value next to a rounding
    // boundary may take the neighbouring bf16 / E5M2 value (rare at this size).
    EXPECT_NEAR(loss, ref.loss, 1e-5 * std::fabs(ref.loss));
    EXPECT_LT(rel_error(values_of(dh), ref.dh), 2e-3);
    EXPECT_LT(rel_error(values_of(dw), ref.dw), 2e-3);
    for (int64_t c = 0; c < C; ++c)
      EXPECT_EQ(dh.item(5 * C + c), 0.0) << "ignored row has no gradient";

    // It is FP8: near the full-precision result, but not equal to it.
    Tensor dh_full = Tensor::empty({N, C}, DType::F32), dw_full = Tensor::zeros({V, C}, DType::F32);
    const double loss_full =
        lm_head_cross_entropy(dh_full, dw_full, h, w, targets, loss_scale, chunk);
    EXPECT_NEAR(loss, loss_full, 0.02 * std::fabs(loss_full));
    const double e = rel_error(values_of(dh), values_of(dh_full));
    EXPECT_GT(e, 1e-3);
    EXPECT_LT(e, 0.15);
  }
}

TEST(LmHeadFp8, AccumulatesIntoTheWeightGradientAndComputesTheLossWithoutGradients) {
  std::mt19937 rng(12);
  const int64_t N = 9, C = 16, V = 20;
  const Tensor h = random_tensor({N, C}, rng, 1.0, DType::F32);
  const Tensor w = random_tensor({V, C}, rng, 0.3, DType::F32);
  std::vector<double> tgd(N);
  for (int64_t i = 0; i < N; ++i) tgd[i] = static_cast<double>((i * 3) % V);
  const Tensor targets = Tensor::from_values(tgd, {N}, DType::I32);
  Tensor dh = Tensor::empty({N, C}, DType::F32), dw = Tensor::zeros({V, C}, DType::F32);
  const double loss = lm_head_cross_entropy(dh, dw, h, w, targets, 1.0f, 4, LmHeadPrecision::Fp8);
  Tensor dw2 = Tensor::zeros({V, C}, DType::F32);
  for (int64_t i = 0; i < dw2.numel(); ++i) dw2.set_item(i, 1.0);
  lm_head_cross_entropy(dh, dw2, h, w, targets, 1.0f, 4, LmHeadPrecision::Fp8);
  // Accumulated chunk by chunk: 1 + a + b + c and a + b + c + 1 round differently in fp32.
  for (int64_t i = 0; i < dw.numel(); ++i) EXPECT_NEAR(dw2.item(i), dw.item(i) + 1.0, 1e-6);
  Tensor none_h, none_w;
  EXPECT_EQ(lm_head_cross_entropy(none_h, none_w, h, w, targets, 1.0f, 4, LmHeadPrecision::Fp8),
            loss);
}

TEST(LmHeadFp8, Fp64IsRefusedAndTheConfigKeyAcceptsBf16AndFp8AndRefusesFp4ByName) {
  std::mt19937 rng(13);
  const Tensor h = random_tensor({4, 8}, rng), w = random_tensor({5, 8}, rng);
  const Tensor targets = Tensor::from_values({0, 1, 2, 3}, {4}, DType::I32);
  Tensor dh = Tensor::empty({4, 8}, DType::F64), dw = Tensor::zeros({5, 8}, DType::F64);
  EXPECT_THROW(lm_head_cross_entropy(dh, dw, h, w, targets, 1.0f, 2, LmHeadPrecision::Fp8), Error);

  EXPECT_EQ(lm_head_precision_from_name("bf16"), LmHeadPrecision::Full);
  EXPECT_EQ(lm_head_precision_from_name("fp8"), LmHeadPrecision::Fp8);
  EXPECT_EQ(parse_config("precision:\n  lm_head: fp8\n", "a.yaml").model.precision.lm_head, "fp8");
  std::string msg;
  try {
    parse_config("precision:\n  lm_head: fp4\n", "a.yaml");
  } catch (const Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("precision.lm_head"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fp4"), std::string::npos) << msg;
}

// The model hands precision.lm_head to its head: fp8 changes the loss by the FP8 rounding (not
// silently bf16), for an untied head and for a head tied to the embedding.
TEST(LmHeadFp8, TheModelRunsItsHeadInFp8WhenTheConfigSaysSo) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    ModelConfig cfg;
    cfg.vocab_size = 40;
    cfg.hidden = 16;
    cfg.layers = 1;
    cfg.heads = 2;
    cfg.kv_heads = 2;
    cfg.head_dim = 8;
    cfg.mlp_hidden = 24;
    cfg.pattern = "L";
    cfg.tie_embeddings = tied;
    cfg.ce_chunk = 7;
    cfg.init_std = 0.3;
    std::mt19937 rng(14);
    Tensor inputs = Tensor::empty({2, 9}, DType::I32), targets = Tensor::empty({2, 9}, DType::I32);
    std::uniform_int_distribution<int> tok(0, static_cast<int>(cfg.vocab_size) - 1);
    for (int64_t i = 0; i < inputs.numel(); ++i) {
      inputs.data<int32_t>()[i] = tok(rng);
      targets.data<int32_t>()[i] = tok(rng);
    }
    ModelParallel par;
    Model full(cfg, par, 5, DType::F32);
    cfg.precision.lm_head = "fp8";
    Model fp8(cfg, par, 5, DType::F32);
    const double loss_full = full.forward_backward(inputs, targets, 1.0f);
    const double loss_fp8 = fp8.forward_backward(inputs, targets, 1.0f);
    EXPECT_NE(loss_fp8, loss_full);
    EXPECT_NEAR(loss_fp8, loss_full, 0.02 * std::fabs(loss_full));
    for (Param* p : fp8.params())
      for (int64_t i = 0; i < p->grad.numel(); ++i)
        ASSERT_TRUE(std::isfinite(p->grad.item(i))) << p->name;
  }
}

}  // namespace
}  // namespace lasp
