// Every op of kernels/ops.h: forward against a naive float64 formula written here, backward
// against central finite differences of the forward.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

using testing::dot;
using testing::expect_grad_matches_fd;
using testing::poison;
using testing::random_tensor;

TEST(RmsNorm, ForwardMatchesFormulaAndBackwardMatchesFiniteDifferences) {
  std::mt19937 rng(1);
  for (int64_t group : {0, 4}) {
    const int64_t N = 5, C = 12, G = group ? C / group : 1, gs = group ? group : C;
    Tensor x = random_tensor({N, C}, rng), w = random_tensor({C}, rng), dy = random_tensor({N, C}, rng);
    Tensor y = Tensor::empty({N, C}, DType::F64), rstd = Tensor::empty({N, G}, DType::F64);
    poison(y);
    rmsnorm_forward(y, rstd, x, w, 1e-6f, group);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        double ss = 0;
        for (int64_t i = 0; i < gs; ++i) ss += std::pow(x.item(n * C + g * gs + i), 2);
        const double r = 1 / std::sqrt(ss / gs + 1e-6);
        for (int64_t i = 0; i < gs; ++i) {
          const int64_t j = n * C + g * gs + i;
          EXPECT_NEAR(y.item(j), x.item(j) * r * w.item(g * gs + i), 1e-9);
        }
      }
    Tensor dx = Tensor::empty({N, C}, DType::F64), dw = Tensor::zeros({C}, DType::F64);
    rmsnorm_backward(dx, dw, dy, x, w, rstd, group);
    auto loss = [&]() {
      Tensor yy = Tensor::empty({N, C}, DType::F64), rr = Tensor::empty({N, G}, DType::F64);
      rmsnorm_forward(yy, rr, x, w, 1e-6f, group);
      return dot(yy, dy);
    };
    expect_grad_matches_fd(loss, x, dx, "rmsnorm dx");
    expect_grad_matches_fd(loss, w, dw, "rmsnorm dw");
  }
}

// The residual forms are the unfused composition: add then norm; norm backward then add.
TEST(RmsNorm, ResidualFormsEqualAddThenNormAndNormBackwardThenAdd) {
  std::mt19937 rng(11);
  for (int64_t group : {0, 4}) {
    const int64_t N = 5, C = 12, G = group ? C / group : 1;
    Tensor x = random_tensor({N, C}, rng), res = random_tensor({N, C}, rng), w = random_tensor({C}, rng);
    Tensor dy = random_tensor({N, C}, rng), dres = random_tensor({N, C}, rng);
    Tensor sum_ref = x.clone();
    add_inplace(sum_ref, res);
    Tensor y_ref = Tensor::empty({N, C}, DType::F64), r_ref = Tensor::empty({N, G}, DType::F64);
    rmsnorm_forward(y_ref, r_ref, sum_ref, w, 1e-6f, group);
    Tensor sum = Tensor::empty({N, C}, DType::F64), y = Tensor::empty({N, C}, DType::F64),
           rstd = Tensor::empty({N, G}, DType::F64);
    poison(sum);
    poison(y);
    residual_rmsnorm_forward(sum, y, rstd, x, res, w, 1e-6f, group);
    for (int64_t i = 0; i < N * C; ++i) {
      EXPECT_NEAR(sum.item(i), x.item(i) + res.item(i), 1e-15);
      EXPECT_NEAR(y.item(i), y_ref.item(i), 1e-12);
    }
    for (int64_t i = 0; i < N * G; ++i) EXPECT_NEAR(rstd.item(i), r_ref.item(i), 1e-12);

    Tensor dx_ref = Tensor::empty({N, C}, DType::F64), dw_ref = Tensor::zeros({C}, DType::F64);
    rmsnorm_backward(dx_ref, dw_ref, dy, sum, w, rstd, group);
    add_inplace(dx_ref, dres);
    Tensor dx = Tensor::empty({N, C}, DType::F64), dw = Tensor::zeros({C}, DType::F64);
    poison(dx);
    rmsnorm_backward(dx, dw, dy, sum, w, rstd, group, dres);
    for (int64_t i = 0; i < N * C; ++i) EXPECT_NEAR(dx.item(i), dx_ref.item(i), 1e-12);
    for (int64_t i = 0; i < C; ++i) EXPECT_NEAR(dw.item(i), dw_ref.item(i), 1e-12);
  }
}

TEST(SwiGlu, BackwardMatchesFiniteDifferences) {
  std::mt19937 rng(2);
  Tensor g = random_tensor({7, 9}, rng, 2.0), u = random_tensor({7, 9}, rng), dh = random_tensor({7, 9}, rng);
  Tensor h = Tensor::empty({7, 9}, DType::F64);
  swiglu_forward(h, g, u);
  for (int64_t i = 0; i < h.numel(); ++i) {
    const double a = g.item(i);
    EXPECT_NEAR(h.item(i), a / (1 + std::exp(-a)) * u.item(i), 1e-12);
  }
  Tensor dg = Tensor::empty({7, 9}, DType::F64), du = Tensor::empty({7, 9}, DType::F64);
  swiglu_backward(dg, du, dh, g, u);
  auto loss = [&]() {
    Tensor hh = Tensor::empty({7, 9}, DType::F64);
    swiglu_forward(hh, g, u);
    return dot(hh, dh);
  };
  expect_grad_matches_fd(loss, g, dg, "swiglu d_gate");
  expect_grad_matches_fd(loss, u, du, "swiglu d_up");
}

TEST(Activation, EveryMapMatchesFormulaAndFiniteDifferences) {
  std::mt19937 rng(3);
  for (Activation f : {Activation::Silu, Activation::Relu, Activation::Elu1, Activation::LogSigmoid}) {
    Tensor x = random_tensor({6, 11}, rng, 3.0), dy = random_tensor({6, 11}, rng);
    Tensor y = Tensor::empty({6, 11}, DType::F64);
    const float scale = f == Activation::LogSigmoid ? 0.0625f : 1.0f;
    activation_forward(y, x, f, scale);
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double v = x.item(i);
      double ref = 0;
      switch (f) {
        case Activation::Silu: ref = v / (1 + std::exp(-v)); break;
        case Activation::Relu: ref = std::max(v, 0.0); break;
        case Activation::Elu1: ref = v > 0 ? v + 1 : std::exp(v); break;
        case Activation::LogSigmoid: ref = 0.0625 * std::log(1 / (1 + std::exp(-v))); break;
      }
      EXPECT_NEAR(y.item(i), ref, 1e-12);
    }
    Tensor dx = Tensor::empty({6, 11}, DType::F64);
    activation_backward(dx, dy, x, f, scale);
    auto loss = [&]() {
      Tensor yy = Tensor::empty({6, 11}, DType::F64);
      activation_forward(yy, x, f, scale);
      return dot(yy, dy);
    };
    expect_grad_matches_fd(loss, x, dx, "activation dx");
  }
}

TEST(Rope, RotatesPairsByPositionAngleAndBackwardIsTheInverse) {
  std::mt19937 rng(4);
  const int64_t B = 2, T = 5, H = 3, D = 8;
  Tensor x = random_tensor({B, T, H, D}, rng), orig = x.clone(), dy = random_tensor({B, T, H, D}, rng);
  std::vector<int64_t> pos = {7, 8, 9, 10, 11};
  rope_forward(x, pos, 10000.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double ang = pos[t] * std::pow(10000.0, -2.0 * i / D);
          const int64_t o = ((b * T + t) * H + h) * D;
          const double a = orig.item(o + i), c = orig.item(o + i + D / 2);
          EXPECT_NEAR(x.item(o + i), a * std::cos(ang) - c * std::sin(ang), 1e-9);
          EXPECT_NEAR(x.item(o + i + D / 2), a * std::sin(ang) + c * std::cos(ang), 1e-9);
        }
  Tensor dx = dy.clone();
  rope_backward(dx, pos, 10000.0f);
  auto loss = [&]() {
    Tensor xx = orig.clone();
    rope_forward(xx, pos, 10000.0f);
    return dot(xx, dy);
  };
  expect_grad_matches_fd(loss, orig, dx, "rope dx");
}

TEST(Embedding, GathersRowsAndScatterAddsGradients) {
  std::mt19937 rng(5);
  Tensor table = random_tensor({10, 4}, rng);
  Tensor tokens = Tensor::from_values({3, 0, 9, 3}, {4}, DType::I32);
  Tensor out = Tensor::empty({4, 4}, DType::F64);
  embedding_forward(out, table, tokens);
  for (int64_t n = 0; n < 4; ++n)
    for (int64_t c = 0; c < 4; ++c) EXPECT_EQ(out.item(n * 4 + c), table.item(int64_t(tokens.item(n)) * 4 + c));
  Tensor dout = random_tensor({4, 4}, rng), dtable = Tensor::zeros({10, 4}, DType::F64);
  embedding_backward(dtable, dout, tokens);
  for (int64_t c = 0; c < 4; ++c) {
    EXPECT_NEAR(dtable.item(3 * 4 + c), dout.item(0 * 4 + c) + dout.item(3 * 4 + c), 1e-15);
    EXPECT_EQ(dtable.item(5 * 4 + c), 0.0);
  }
  Tensor bad = Tensor::from_values({10}, {1}, DType::I32);
  Tensor out1 = Tensor::empty({1, 4}, DType::F64);
  EXPECT_THROW(embedding_forward(out1, table, bad), Error);
}

TEST(LmHeadCrossEntropy, ChunkedLossMatchesNaiveSoftmaxAndGradientsMatchFiniteDifferences) {
  std::mt19937 rng(6);
  const int64_t N = 13, C = 6, V = 11;
  Tensor h = random_tensor({N, C}, rng), w = random_tensor({V, C}, rng);
  std::vector<double> tg(N);
  for (int64_t i = 0; i < N; ++i) tg[i] = (i * 7) % V;
  tg[4] = -1;  // ignored
  Tensor targets = Tensor::from_values(tg, {N}, DType::I32);
  double ref = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (tg[n] < 0) continue;
    std::vector<double> logit(V);
    double mx = -1e300;
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t c = 0; c < C; ++c) logit[v] += h.item(n * C + c) * w.item(v * C + c);
      mx = std::max(mx, logit[v]);
    }
    double z = 0;
    for (double l : logit) z += std::exp(l - mx);
    ref += mx + std::log(z) - logit[int64_t(tg[n])];
  }
  for (int64_t chunk : {1, 4, 100}) {
    Tensor dh = Tensor::empty({N, C}, DType::F64), dw = Tensor::zeros({V, C}, DType::F64);
    poison(dh);
    const double loss = lm_head_cross_entropy(dh, dw, h, w, targets, 0.5f, chunk);
    EXPECT_NEAR(loss, ref, 1e-9 * std::fabs(ref));
    auto f = [&]() {
      Tensor none;
      return 0.5 * lm_head_cross_entropy(none, none, h, w, targets, 0.0f, chunk);
    };
    expect_grad_matches_fd(f, h, dh, "cross-entropy d_h");
    expect_grad_matches_fd(f, w, dw, "cross-entropy d_w");
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dh.item(4 * C + c), 0.0) << "ignored row has no gradient";
  }
}

TEST(Gemm, AllTransposeCombinationsMatchNaiveProductAndShapesAreChecked) {
  std::mt19937 rng(7);
  const int64_t M = 5, K = 7, N = 3;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      Tensor a = random_tensor(ta ? Shape{K, M} : Shape{M, K}, rng);
      Tensor b = random_tensor(tb ? Shape{N, K} : Shape{K, N}, rng);
      Tensor c = random_tensor({M, N}, rng), c0 = c.clone();
      gemm(c, a, ta, b, tb, 2.0f, 0.5f);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k)
            s += a.item(ta ? k * M + i : i * K + k) * b.item(tb ? j * K + k : k * N + j);
          EXPECT_NEAR(c.item(i * N + j), 2 * s + 0.5 * c0.item(i * N + j), 1e-12);
        }
    }
  Tensor a = Tensor::zeros({2, 3}, DType::F64), b = Tensor::zeros({4, 2}, DType::F64), c = Tensor::zeros({2, 2}, DType::F64);
  EXPECT_THROW(gemm(c, a, false, b, false), Error);
}

}  // namespace
}  // namespace lasp
