// CUDA small ops (kernels/ops.cu) against the CPU ops (tests/ops_test.cc checks those against
// float64 formulas and finite differences). Fresh random bf16-representable inputs per run (the
// seed is printed on failure), odd sizes, every bf16/fp32 mix the CUDA path accepts, NaN-poisoned
// outputs, and weight gradients pre-filled with nonzero values to check accumulation (+=).
// The CPU reference runs in float64 on the same inputs.
//
// Thresholds (relative Frobenius error ||gpu - cpu|| / ||cpu||):
//   fp32 outputs of fp32 math                      1e-5  (rounding of fp32 sums, __expf)
//   bf16 outputs                                   1e-2  (one bf16 rounding is <= 2^-9 = 2e-3 per
//                                                         element; 1e-2 leaves room for inputs
//                                                         that pass through two bf16 tensors)
//   LM head d_h, d_w with bf16 operands            2e-2  (dlogits rounded to bf16 before the
//                                                         two GEMMs, then the output rounding)
//   LM head loss (sum over rows)                   1e-5 relative (fp32 row logsumexp)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/ops_batched.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;

constexpr double kTolF32 = 1e-5, kTolBf16 = 1e-2, kTolLmGrad = 2e-2;

double tol_for(DType out) { return out == DType::BF16 ? kTolBf16 : kTolF32; }

const char* name(DType t) { return dtype_name(t); }

// The CPU float64 copy of a tensor on any device.
Tensor f64(const Tensor& t) { return t.to(cpu()).to(DType::F64); }

void expect_close(const Tensor& gpu, const Tensor& ref, double tol, const std::string& what) {
  const std::vector<double> out = gpu.to_vector();
  EXPECT_EQ(count_non_finite(out), 0) << what << ": unwritten or non-finite outputs";
  EXPECT_LT(rel_error(out, ref.to_vector()), tol) << what;
}

struct Seeded {
  uint32_t seed = fresh_seed();
  std::mt19937 rng{seed};
  std::string tag(const std::string& s) const { return s + " seed=" + std::to_string(seed); }
};

const DType kBoth[] = {DType::BF16, DType::F32};

// ---------------------------------------------------------------- RMSNorm
TEST(RmsNormGpu, ForwardAndBackwardMatchCpuForEveryDtypeMixAndAccumulateDw) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  struct Case {
    int64_t N, C, group;
  };
  // Groups that are multiples of 8 take the row-in-registers kernels: 8..256 features (teams of
  // <= 32 lanes, one pack each), 264..1024 (a warp, 2 or 4 packs a lane), larger (a block, 1..8
  // packs a thread); 2100 rows of 2048 give the dw slots two rows each. Others (5, 130, 13) the
  // warp-per-row kernels.
  for (const Case c : {Case{1, 5, 0}, Case{3, 130, 0}, Case{257, 130, 0}, Case{257, 130, 13},
                       Case{33, 256, 64}, Case{2, 2048, 0}, Case{65, 384, 128}, Case{31, 24, 8},
                       Case{17, 1000, 0}, Case{9, 512, 0}, Case{5, 4096, 0}, Case{3, 16384, 0},
                       Case{2100, 2048, 0}, Case{700, 2048, 128}}) {
    for (DType x_dt : kBoth)
      for (DType y_dt : kBoth)
        for (bool with_w : {true, false}) {
          Seeded s;
          SCOPED_TRACE(s.tag("N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) + " group=" +
                             std::to_string(c.group) + " x=" + name(x_dt) + " y=" + name(y_dt) +
                             " w=" + std::to_string(with_w)));
          const int64_t G = c.group ? c.C / c.group : 1;
          const Tensor x = random_bf16_values({c.N, c.C}, s.rng, 2.0);
          const Tensor dy = random_bf16_values({c.N, c.C}, s.rng);
          const Tensor w = with_w ? random_bf16_values({c.C}, s.rng) : Tensor();
          const Tensor dw0 = random_bf16_values({c.C}, s.rng);

          Tensor y_ref = Tensor::empty({c.N, c.C}, DType::F64), r_ref = Tensor::empty({c.N, G}, DType::F64);
          const Tensor w64 = with_w ? f64(w) : Tensor();
          rmsnorm_forward(y_ref, r_ref, f64(x), w64, 1e-5f, c.group);
          Tensor dx_ref = Tensor::empty({c.N, c.C}, DType::F64), dw_ref = f64(dw0);
          rmsnorm_backward(dx_ref, dw_ref, f64(dy), f64(x), w64, r_ref, c.group);

          const Tensor gx = to_cuda(x, x_dt), gw = with_w ? to_cuda(w, DType::F32) : Tensor();
          Tensor y = poisoned_cuda({c.N, c.C}, y_dt), rstd = poisoned_cuda({c.N, G}, DType::F32);
          rmsnorm_forward(y, rstd, gx, gw, 1e-5f, c.group);
          expect_close(y, y_ref, tol_for(y_dt), "y");
          expect_close(rstd, r_ref, kTolF32, "rstd");

          // Backward: dy in x's dtype, dx in y's dtype (another mix).
          Tensor dx = poisoned_cuda({c.N, c.C}, y_dt), dw = to_cuda(dw0, DType::F32);
          rmsnorm_backward(dx, dw, to_cuda(dy, x_dt), gx, gw, rstd, c.group);
          expect_close(dx, dx_ref, tol_for(y_dt) * 2, "dx");
          expect_close(dw, dw_ref, kTolF32 * 10, "dw (accumulated)");
        }
  }
}

// sum = x + res rounded to sum's dtype, y = rmsnorm(sum); dx = norm backward + d_residual. The
// reference is the unfused composition in float64 on the stored sum.
TEST(RmsNormGpu, ResidualFormsMatchAddThenNormOnTheCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  struct Case {
    int64_t N, C, group;
  };
  // 200 and 2048: row-in-registers kernels (a team of 32 lanes; a block); 130: warp per row.
  for (const Case c : {Case{37, 200, 0}, Case{37, 130, 0}, Case{2100, 2048, 0}, Case{65, 384, 128}}) {
    for (DType in_dt : kBoth)
      for (DType out_dt : kBoth) {
        Seeded s;
        SCOPED_TRACE(s.tag("N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) + " group=" +
                           std::to_string(c.group) + " in=" + name(in_dt) + " out=" + name(out_dt)));
        const int64_t G = c.group ? c.C / c.group : 1;
        const Tensor x = random_bf16_values({c.N, c.C}, s.rng, 2.0), res = random_bf16_values({c.N, c.C}, s.rng);
        const Tensor w = random_bf16_values({c.C}, s.rng), dy = random_bf16_values({c.N, c.C}, s.rng);
        const Tensor dres = random_bf16_values({c.N, c.C}, s.rng), dw0 = random_bf16_values({c.C}, s.rng);
        const Tensor gw = to_cuda(w, DType::F32);
        Tensor sum = poisoned_cuda({c.N, c.C}, out_dt), y = poisoned_cuda({c.N, c.C}, out_dt),
               rstd = poisoned_cuda({c.N, G}, DType::F32);
        residual_rmsnorm_forward(sum, y, rstd, to_cuda(x, in_dt), to_cuda(res, DType::BF16), gw, 1e-5f, c.group);

        Tensor sum_ref = f64(x);
        add_inplace(sum_ref, f64(res));
        expect_close(sum, sum_ref, tol_for(out_dt), "sum");
        // Norm of the stored sum (as the backward sees it).
        const Tensor s64 = f64(sum);
        Tensor y_ref = Tensor::empty({c.N, c.C}, DType::F64), r_ref = Tensor::empty({c.N, G}, DType::F64);
        rmsnorm_forward(y_ref, r_ref, s64, f64(w), 1e-5f, c.group);
        expect_close(y, y_ref, tol_for(out_dt), "y");
        expect_close(rstd, r_ref, kTolF32, "rstd");

        Tensor dx_ref = Tensor::empty({c.N, c.C}, DType::F64), dw_ref = f64(dw0);
        rmsnorm_backward(dx_ref, dw_ref, f64(dy), s64, f64(w), r_ref, c.group);
        add_inplace(dx_ref, f64(dres));
        Tensor dx = poisoned_cuda({c.N, c.C}, out_dt), dw = to_cuda(dw0, DType::F32);
        rmsnorm_backward(dx, dw, to_cuda(dy, in_dt), sum, gw, rstd, c.group, to_cuda(dres, in_dt));
        expect_close(dx, dx_ref, tol_for(out_dt) * 2, "dx");
        expect_close(dw, dw_ref, kTolF32 * 10, "dw (accumulated)");
      }
  }
}

// ---------------------------------------------------------------- SwiGLU, activations
TEST(SwiGluGpu, ForwardAndBackwardMatchCpuForMixedDtypes) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (int64_t n : {1, 3, 257 * 5, (1 << 20) + 3}) {
    for (DType in_dt : kBoth)
      for (DType out_dt : kBoth) {
        Seeded s;
        SCOPED_TRACE(s.tag("n=" + std::to_string(n) + " in=" + name(in_dt) + " out=" + name(out_dt)));
        const Shape sh{n};
        const Tensor g = random_bf16_values(sh, s.rng, 3.0), u = random_bf16_values(sh, s.rng),
                     dh = random_bf16_values(sh, s.rng);
        Tensor h_ref = Tensor::empty(sh, DType::F64), dg_ref = Tensor::empty(sh, DType::F64),
               du_ref = Tensor::empty(sh, DType::F64);
        swiglu_forward(h_ref, f64(g), f64(u));
        swiglu_backward(dg_ref, du_ref, f64(dh), f64(g), f64(u));

        Tensor h = poisoned_cuda(sh, out_dt);
        swiglu_forward(h, to_cuda(g, in_dt), to_cuda(u, out_dt));
        expect_close(h, h_ref, tol_for(out_dt), "h");
        Tensor dg = poisoned_cuda(sh, out_dt), du = poisoned_cuda(sh, in_dt);
        swiglu_backward(dg, du, to_cuda(dh, out_dt), to_cuda(g, in_dt), to_cuda(u, in_dt));
        expect_close(dg, dg_ref, tol_for(out_dt), "d_gate");
        expect_close(du, du_ref, tol_for(in_dt), "d_up");
      }
  }
}

TEST(ActivationGpu, EveryMapForwardAndBackwardMatchCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (Activation f : {Activation::Silu, Activation::Relu, Activation::Elu1, Activation::LogSigmoid}) {
    for (int64_t n : {1, 3, 130 * 7}) {
      for (DType in_dt : kBoth)
        for (DType out_dt : kBoth) {
          Seeded s;
          SCOPED_TRACE(s.tag("f=" + std::to_string(static_cast<int>(f)) + " n=" + std::to_string(n) +
                             " in=" + name(in_dt) + " out=" + name(out_dt)));
          const float scale = f == Activation::LogSigmoid ? 0.0625f : 1.0f;
          const Tensor x = random_bf16_values({n}, s.rng, 4.0), dy = random_bf16_values({n}, s.rng);
          Tensor y_ref = Tensor::empty({n}, DType::F64), dx_ref = Tensor::empty({n}, DType::F64);
          activation_forward(y_ref, f64(x), f, scale);
          activation_backward(dx_ref, f64(dy), f64(x), f, scale);
          Tensor y = poisoned_cuda({n}, out_dt), dx = poisoned_cuda({n}, out_dt);
          const Tensor gx = to_cuda(x, in_dt);
          activation_forward(y, gx, f, scale);
          activation_backward(dx, to_cuda(dy, in_dt), gx, f, scale);
          // Relu of an all-negative single element is an exact zero: compare absolutely then.
          if (y_ref.to_vector() == std::vector<double>(static_cast<size_t>(n), 0.0)) {
            EXPECT_EQ(y.to_vector(), y_ref.to_vector());
            EXPECT_EQ(dx.to_vector(), dx_ref.to_vector());
            continue;
          }
          expect_close(y, y_ref, tol_for(out_dt), "y");
          expect_close(dx, dx_ref, tol_for(out_dt), "dx");
        }
    }
  }
}

// ---------------------------------------------------------------- RoPE
TEST(RopeGpu, ForwardAndBackwardMatchCpuForContiguousAndScatteredPositions) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  struct Case {
    int64_t B, T, H, D, p0;
    bool scattered;
  };
  for (const Case c : {Case{1, 1, 1, 2, 0, false}, Case{2, 3, 3, 6, 5, false}, Case{2, 257, 3, 64, 0, false},
                       Case{1, 130, 2, 128, 1000003, false}, Case{2, 33, 5, 64, 17, true}}) {
    for (DType dt : kBoth) {
      Seeded s;
      SCOPED_TRACE(s.tag("B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " D=" +
                         std::to_string(c.D) + " p0=" + std::to_string(c.p0) + " scattered=" +
                         std::to_string(c.scattered) + " " + name(dt)));
      std::vector<int64_t> pos(static_cast<size_t>(c.T));
      std::iota(pos.begin(), pos.end(), c.p0);
      if (c.scattered) std::shuffle(pos.begin(), pos.end(), s.rng);
      const Shape sh{c.B, c.T, c.H, c.D};
      const Tensor x = random_bf16_values(sh, s.rng);
      for (bool forward : {true, false}) {
        Tensor ref = f64(x), gx = to_cuda(x, dt);
        if (forward) {
          rope_forward(ref, pos, 10000.0f);
          rope_forward(gx, pos, 10000.0f);
        } else {
          rope_backward(ref, pos, 500000.0f);
          rope_backward(gx, pos, 500000.0f);
        }
        expect_close(gx, ref, tol_for(dt), forward ? "rope_forward" : "rope_backward");
      }
    }
  }
}

// ---------------------------------------------------------------- embedding
TEST(EmbeddingGpu, ForwardCopiesRowsAndBackwardAccumulatesRepeatedTokens) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (int64_t N : {1, 3, 257}) {
    for (DType table_dt : kBoth)
      for (DType out_dt : kBoth) {
        Seeded s;
        SCOPED_TRACE(s.tag("N=" + std::to_string(N) + " table=" + name(table_dt) + " out=" + name(out_dt)));
        const int64_t V = 11, C = 130;  // few tokens: many repeats
        std::uniform_int_distribution<int> tok(0, static_cast<int>(V) - 1);
        Tensor tokens = Tensor::empty({N}, DType::I32);
        for (int64_t n = 0; n < N; ++n) tokens.data<int32_t>()[n] = tok(s.rng);
        const Tensor table = random_bf16_values({V, C}, s.rng), d_out = random_bf16_values({N, C}, s.rng);
        const Tensor dt0 = random_bf16_values({V, C}, s.rng);
        Tensor out_ref = Tensor::empty({N, C}, DType::F64), dt_ref = f64(dt0);
        embedding_forward(out_ref, f64(table), tokens);
        embedding_backward(dt_ref, f64(d_out), tokens);

        const Tensor gtok = tokens.to(cuda());
        Tensor out = poisoned_cuda({N, C}, out_dt);
        embedding_forward(out, to_cuda(table, table_dt), gtok);
        EXPECT_EQ(out.to_vector(), out_ref.to_vector()) << "rows of bf16 values copy exactly";
        Tensor d_table = to_cuda(dt0, DType::F32);
        embedding_backward(d_table, to_cuda(d_out, out_dt), gtok);
        expect_close(d_table, dt_ref, kTolF32, "d_table (accumulated)");
      }
  }
}

TEST(EmbeddingGpu, TokenOutsideTheVocabularyIsAnError) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Tensor t = Tensor::empty({2}, DType::I32);
  t.data<int32_t>()[0] = 1;
  t.data<int32_t>()[1] = 4;  // V = 4
  const Tensor table = Tensor::zeros({4, 8}, DType::F32, cuda());
  Tensor out = Tensor::empty({2, 8}, DType::BF16, cuda());
  EXPECT_THROW(embedding_forward(out, table, t.to(cuda())), Error);
  Tensor d_table = Tensor::zeros({4, 8}, DType::F32, cuda());
  EXPECT_THROW(embedding_backward(d_table, out, t.to(cuda())), Error);
}

// ---------------------------------------------------------------- LM head + cross-entropy
struct LmInputs {
  Tensor h, w, targets, dw0;  // CPU: fp32 bf16-representable values, int32 targets
};

LmInputs lm_inputs(int64_t N, int64_t C, int64_t V, std::mt19937& rng, double ignore_fraction) {
  LmInputs in;
  in.h = random_bf16_values({N, C}, rng);
  in.w = random_bf16_values({V, C}, rng, 1.0 / std::sqrt(static_cast<double>(C)) * 3);
  in.dw0 = random_bf16_values({V, C}, rng, 0.01);
  in.targets = Tensor::empty({N}, DType::I32);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(V) - 1);
  std::bernoulli_distribution ignore(ignore_fraction);
  for (int64_t n = 0; n < N; ++n) in.targets.data<int32_t>()[n] = ignore(rng) ? -1 : tok(rng);
  return in;
}

// The loss of the CUDA path with bf16 operands, computed independently: exact logits of the
// bf16-valued inputs (float64), each rounded to bf16 as the GEMM's bf16 output is, then the row
// losses lse - logit[target] in float64. The GPU's fp32 accumulation may land a logit within
// gamma = C 2^-24 sum_c |h_c w_c| of the exact one and so round it the other way where the exact
// value is that close to a rounding boundary: `slack` bounds what such flips can change (a flip
// of logit v moves the row loss by at most (p_v + [v = target]) |flip|). Also the largest |logit|
// and the number of rows counted.
struct Bf16LogitLoss {
  double loss = 0.0, slack = 0.0, max_abs_logit = 0.0;
  int64_t rows = 0;
};
double to_bf16_value(double x) { return bf16_to_float(float_to_bf16(static_cast<float>(x))); }
Bf16LogitLoss loss_from_bf16_logits(const LmInputs& in) {
  const Tensor h = f64(in.h), w = f64(in.w);
  const int64_t N = h.dim(0), C = h.dim(1), V = w.dim(0);
  const double *hp = h.data<double>(), *wp = w.data<double>();
  Bf16LogitLoss out;
  std::vector<double> row(V), flip(V);
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = in.targets.data<int32_t>()[n];
    if (t < 0) continue;
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      double x = 0.0, mag = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        x += hp[n * C + c] * wp[v * C + c];
        mag += std::fabs(hp[n * C + c] * wp[v * C + c]);
      }
      const double gamma = C * std::ldexp(1.0, -24) * mag;
      out.max_abs_logit = std::max(out.max_abs_logit, std::fabs(x));
      row[v] = to_bf16_value(x);
      flip[v] = std::max(std::fabs(to_bf16_value(x - gamma) - row[v]), std::fabs(to_bf16_value(x + gamma) - row[v]));
      m = std::max(m, row[v]);
    }
    double z = 0.0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(row[v] - m);
    const double lse = m + std::log(z);
    for (int64_t v = 0; v < V; ++v)
      if (flip[v] > 0.0) out.slack += (std::exp(row[v] + flip[v] - lse) + (v == t ? 1.0 : 0.0)) * flip[v];
    out.loss += lse - row[t];
    out.rows += 1;
  }
  return out;
}

TEST(LmHeadCrossEntropyGpu, LossAndGradientsMatchCpuForEveryDtypeMixWithIgnoredTargets) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  struct Case {
    int64_t N, C, V, chunk;
  };
  for (const Case c : {Case{1, 40, 1003, 64}, Case{37, 40, 1003, 16}, Case{300, 72, 1003, 128}}) {
    for (DType h_dt : kBoth)
      for (DType w_dt : kBoth)
        for (DType dh_dt : kBoth) {
          Seeded s;
          SCOPED_TRACE(s.tag("N=" + std::to_string(c.N) + " V=" + std::to_string(c.V) + " chunk=" +
                             std::to_string(c.chunk) + " h=" + name(h_dt) + " w=" + name(w_dt) +
                             " d_h=" + name(dh_dt)));
          const LmInputs in = lm_inputs(c.N, c.C, c.V, s.rng, c.N == 1 ? 0.0 : 0.25);
          const float loss_scale = 0.5f;
          Tensor dh_ref = Tensor::empty({c.N, c.C}, DType::F64), dw_ref = f64(in.dw0);
          const double loss_ref = lm_head_cross_entropy(dh_ref, dw_ref, f64(in.h), f64(in.w), in.targets,
                                                        loss_scale, c.chunk);

          Tensor dh = poisoned_cuda({c.N, c.C}, dh_dt), dw = to_cuda(in.dw0, DType::F32);
          const Tensor gh = to_cuda(in.h, h_dt), gw = to_cuda(in.w, w_dt), gt = in.targets.to(cuda());
          const double loss = lm_head_cross_entropy(dh, dw, gh, gw, gt, loss_scale, c.chunk);
          const bool bf16_ops = h_dt == DType::BF16 || w_dt == DType::BF16;
          // bf16 operands: bf16 logits, so the loss is that of the rounded logits (tight), and
          // within a few 1e-4 of the exact one.
          // Rounding moves each logit by at most 2^-9 |x|, so each row loss (lse - x_t) by at
          // most 2^-8 max |x|.
          const Bf16LogitLoss rounded = bf16_ops ? loss_from_bf16_logits(in) : Bf16LogitLoss{loss_ref};
          EXPECT_NEAR(loss, rounded.loss, 1e-5 * std::abs(rounded.loss) + rounded.slack + 1e-6);
          if (bf16_ops) {
            EXPECT_NEAR(loss, loss_ref, rounded.rows * rounded.max_abs_logit / 256.0 + 1e-6);
          }
          const double tol = bf16_ops ? kTolLmGrad : (dh_dt == DType::BF16 ? kTolBf16 : 1e-4);
          expect_close(dh, dh_ref, tol, "d_h");
          expect_close(dw, dw_ref, bf16_ops ? kTolLmGrad : 1e-4, "d_w (accumulated)");

          // Loss only: no gradient buffers.
          Tensor none_h, none_w;
          const double loss_only = lm_head_cross_entropy(none_h, none_w, gh, gw, gt, loss_scale, c.chunk);
          EXPECT_NEAR(loss_only, loss, 1e-9 * std::abs(loss) + 1e-9);
        }
  }
}

TEST(LmHeadCrossEntropyGpu, TargetOutsideTheVocabularyIsAnError) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Tensor t = Tensor::empty({3}, DType::I32);
  t.data<int32_t>()[0] = 0;
  t.data<int32_t>()[1] = -1;
  t.data<int32_t>()[2] = 7;  // V = 7
  const Tensor h = Tensor::zeros({3, 16}, DType::BF16, cuda()), w = Tensor::zeros({7, 16}, DType::BF16, cuda());
  Tensor dh = Tensor::empty({3, 16}, DType::BF16, cuda()), dw = Tensor::zeros({7, 16}, DType::F32, cuda());
  EXPECT_THROW(lm_head_cross_entropy(dh, dw, h, w, t.to(cuda()), 1.0f, 2), Error);
}

// Fast bf16-representable fill for the large case (the mt19937 normal path takes minutes at 2.6e8).
Tensor fast_bf16_fill(const Shape& shape, uint64_t seed, float amplitude) {
  Tensor t = Tensor::empty(shape, DType::F32);
  float* p = t.data<float>();
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const float u = static_cast<float>((x >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;  // [-1, 1)
    p[i] = bf16_to_float(float_to_bf16(u * amplitude));
  }
  return t;
}

TEST(LmHeadCrossEntropyGpu, Llama3VocabularyAndHiddenSizeWithTwoChunks) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const int64_t N = 1100, C = 2048, V = 128256, chunk = 1024;  // second chunk: 76 rows
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const Tensor h = fast_bf16_fill({N, C}, seed, 1.7f), w = fast_bf16_fill({V, C}, seed + 1, 0.07f);
  Tensor targets = Tensor::empty({N}, DType::I32);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(V) - 1);
  for (int64_t n = 0; n < N; ++n) targets.data<int32_t>()[n] = n % 9 == 4 ? -1 : tok(rng);

  // Reference in fp32 on the CPU (float64 would need 2 GB per logits chunk).
  Tensor dh_ref = Tensor::empty({N, C}, DType::F32), dw_ref = Tensor::zeros({V, C}, DType::F32);
  const double loss_ref = lm_head_cross_entropy(dh_ref, dw_ref, h, w, targets, 1.0f, chunk);

  Tensor dh = poisoned_cuda({N, C}, DType::BF16), dw = Tensor::zeros({V, C}, DType::F32, cuda());
  const double loss = lm_head_cross_entropy(dh, dw, to_cuda(h, DType::BF16), to_cuda(w, DType::BF16),
                                            targets.to(cuda()), 1.0f, chunk);
  // bf16 logits (loss_from_bf16_logits would take minutes here): the rounding errors of 1.4e8
  // logits average out to well under 1e-4 of the loss.
  EXPECT_NEAR(loss, loss_ref, 1e-4 * std::abs(loss_ref));
  expect_close(dh, dh_ref, kTolLmGrad, "d_h");
  // d_w: 2.6e8 elements, compared as floats without the double copies of expect_close.
  const Tensor dw_host = dw.to(cpu());
  const float *a = dw_host.data<float>(), *r = dw_ref.data<float>();
  double num = 0, den = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < V * C; ++i) {
    bad += std::isfinite(a[i]) ? 0 : 1;
    num += (double(a[i]) - r[i]) * (double(a[i]) - r[i]);
    den += double(r[i]) * r[i];
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LT(std::sqrt(num / den), kTolLmGrad) << "d_w";
}

// ---------------------------------------------------------------- bias
TEST(BiasGpu, AddAndBackwardMatchCpuAndDbAccumulates) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (int64_t N : {1, 3, 257, 4099})
    for (int64_t C : {5, 130}) {
      for (DType y_dt : kBoth)
        for (DType b_dt : kBoth) {
          Seeded s;
          SCOPED_TRACE(s.tag("N=" + std::to_string(N) + " C=" + std::to_string(C) + " y=" + name(y_dt) +
                             " b=" + name(b_dt)));
          const Tensor y0 = random_bf16_values({N, C}, s.rng), b = random_bf16_values({C}, s.rng);
          const Tensor db0 = random_bf16_values({C}, s.rng);
          Tensor y_ref = f64(y0), db_ref = f64(db0);
          bias_add(y_ref, f64(b));
          bias_backward(db_ref, f64(y0));

          Tensor y = to_cuda(y0, y_dt);
          bias_add(y, to_cuda(b, b_dt));
          expect_close(y, y_ref, tol_for(y_dt), "y + b");
          Tensor db = to_cuda(db0, DType::F32);
          bias_backward(db, to_cuda(y0, y_dt));
          expect_close(db, db_ref, kTolF32, "db (accumulated)");
        }
    }
}

// ---------------------------------------------------------------- AdamW, cast
TEST(AdamWGpu, ThreeStepsMatchCpuAndRoundTheComputeCopy) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (int64_t n : {1, 3, 257, 100003}) {
    for (DType wc_dt : kBoth) {
      Seeded s;
      SCOPED_TRACE(s.tag("n=" + std::to_string(n) + " w_compute=" + name(wc_dt)));
      Tensor w_ref = random_bf16_values({n}, s.rng), m_ref = Tensor::zeros({n}, DType::F32),
             v_ref = Tensor::zeros({n}, DType::F32), none;
      Tensor w = w_ref.to(cuda()), m = m_ref.to(cuda()), v = v_ref.to(cuda());
      Tensor wc = poisoned_cuda({n}, wc_dt);
      const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
      for (int step = 1; step <= 3; ++step) {
        const Tensor g = random_bf16_values({n}, s.rng, 0.01);
        const float c1 = 1.0f - std::pow(b1, static_cast<float>(step));
        const float c2 = 1.0f - std::pow(b2, static_cast<float>(step));
        adamw_update(w_ref, none, g, m_ref, v_ref, lr, b1, b2, eps, wd, c1, c2);
        adamw_update(w, wc, g.to(cuda()), m, v, lr, b1, b2, eps, wd, c1, c2);
      }
      expect_close(w, w_ref, kTolF32, "w");
      expect_close(m, m_ref, kTolF32, "m");
      expect_close(v, v_ref, kTolF32, "v");
      // The compute copy is w rounded once to its dtype.
      EXPECT_EQ(wc.to_vector(), w.to(cpu()).to(wc_dt).to_vector());
    }
  }
}

// The multi-tensor AdamW: more tensors than one launch's list takes, odd and unaligned sizes,
// every g / compute-copy dtype, per-tensor weight decay. The same step as adamw_update on each
// tensor: equal to it up to the last bit (the H200 run showed 1-ulp differences in v on some
// tensors, where nvcc contracts the multiply-adds of the step differently in the two kernels),
// close to the CPU update, and the compute copy is the updated w rounded.
TEST(AdamWGpu, ManyTensorsMatchThePerTensorUpdate) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Seeded s;
  SCOPED_TRACE(s.tag("adamw_update_many"));
  struct One {
    Tensor w, m, v, wc, w1, m1, v1, wc1, w_ref, m_ref, v_ref;
    float wd;
    DType g_dt;
  };
  std::vector<One> ps;
  const int64_t sizes[] = {1, 37, 200, 2048, 100003, 0, 16384 + 3, 4099};
  for (int i = 0; i < 83; ++i) {
    const int64_t n = sizes[i % 8];
    One p;
    const Tensor w0 = random_bf16_values({n}, s.rng);
    p.w_ref = w0.clone();
    p.m_ref = Tensor::zeros({n}, DType::F32);
    p.v_ref = Tensor::zeros({n}, DType::F32);
    // Every fifth tensor a slice that starts 4 bytes past a 16-byte boundary (element path).
    auto place = [&](const Tensor& t) {
      if (i % 5 != 4) return t.to(cuda());
      Tensor buf = Tensor::zeros({n + 1}, DType::F32, cuda());
      Tensor view = buf.slice(0, 1, n + 1);
      view.copy_from(t.to(cuda()));
      return view;
    };
    p.w = place(w0), p.m = place(p.m_ref), p.v = place(p.v_ref);
    p.w1 = w0.to(cuda()), p.m1 = p.m_ref.to(cuda()), p.v1 = p.v_ref.to(cuda());
    if (i % 3 != 2) {
      const DType dt = i % 3 ? DType::F32 : DType::BF16;
      p.wc = poisoned_cuda({n}, dt);
      p.wc1 = poisoned_cuda({n}, dt);
    }
    p.wd = i % 2 ? 0.1f : 0.0f;
    p.g_dt = i % 4 < 2 ? DType::F32 : DType::BF16;
    ps.push_back(p);
  }
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  for (int step = 1; step <= 3; ++step) {
    const float c1 = 1.0f - std::pow(b1, static_cast<float>(step));
    const float c2 = 1.0f - std::pow(b2, static_cast<float>(step));
    const float scale = step == 2 ? 0.5f : 1.0f;
    std::vector<AdamWTensors> list;
    for (One& p : ps) {
      const Tensor g = random_bf16_values({p.w.numel()}, s.rng, 0.01);
      const Tensor gg = to_cuda(g, p.g_dt);
      Tensor none;
      adamw_update(p.w_ref, none, g, p.m_ref, p.v_ref, lr, b1, b2, eps, p.wd, c1, c2, scale);
      adamw_update(p.w1, p.wc1, gg, p.m1, p.v1, lr, b1, b2, eps, p.wd, c1, c2, scale);
      list.push_back({p.w, p.wc, gg, p.m, p.v, p.wd});
    }
    adamw_update_many(list, lr, b1, b2, eps, c1, c2, scale);
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    const One& p = ps[i];
    SCOPED_TRACE("tensor " + std::to_string(i) + " n=" + std::to_string(p.w.numel()));
    if (p.wc.defined()) {
      EXPECT_EQ(p.wc.to_vector(), p.w.to(cpu()).to(p.wc.dtype()).to_vector());
    }
    if (p.w.numel() == 0) continue;
    constexpr double kOneUlpish = 1e-6;
    expect_close(p.w, p.w1.to(cpu()), kOneUlpish, "w vs per-tensor");
    expect_close(p.m, p.m1.to(cpu()), kOneUlpish, "m vs per-tensor");
    expect_close(p.v, p.v1.to(cpu()), kOneUlpish, "v vs per-tensor");
    expect_close(p.w, p.w_ref, kTolF32, "w");
    expect_close(p.m, p.m_ref, kTolF32, "m");
    expect_close(p.v, p.v_ref, kTolF32, "v");
  }
}

TEST(CastGpu, RoundsToNearestEvenLikeTheCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Seeded s;
  SCOPED_TRACE(s.tag("cast"));
  const int64_t n = 4099;
  Tensor x = Tensor::empty({n}, DType::F32);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int64_t i = 0; i < n; ++i) x.data<float>()[i] = dist(s.rng);
  // Exact ties between neighbouring bf16 values (1 + 2^-8 lies halfway between 1 and 1 + 2^-7).
  x.data<float>()[0] = 1.0f + std::ldexp(1.0f, -8);
  x.data<float>()[1] = 1.0f + 3 * std::ldexp(1.0f, -8);
  x.data<float>()[2] = std::numeric_limits<float>::infinity();
  const Tensor gx = x.to(cuda());
  for (DType to : {DType::BF16, DType::F16, DType::F64}) {
    Tensor y = poisoned_cuda({n}, to);
    cast(y, gx);
    EXPECT_EQ(y.to_vector(), x.to(to).to_vector()) << "fp32 -> " << name(to);
    Tensor back = poisoned_cuda({n}, DType::F32);
    cast(back, y);
    EXPECT_EQ(back.to_vector(), x.to(to).to(DType::F32).to_vector()) << name(to) << " -> fp32";
  }
}

// ---------------------------------------------------------------- vector helpers
TEST(VectorOpsGpu, AddScaleSumOfSquaresAndAllFiniteMatchCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (int64_t n : {1, 3, 257, 1000003, 1 << 22}) {
    for (DType y_dt : kBoth)
      for (DType x_dt : kBoth) {
        Seeded s;
        SCOPED_TRACE(s.tag("n=" + std::to_string(n) + " y=" + name(y_dt) + " x=" + name(x_dt)));
        const Tensor y0 = random_bf16_values({n}, s.rng), x = random_bf16_values({n}, s.rng);
        Tensor ref = f64(y0);
        add_inplace(ref, f64(x), -0.75f);
        scale_inplace(ref, 1.5f);
        Tensor y = to_cuda(y0, y_dt);
        add_inplace(y, to_cuda(x, x_dt), -0.75f);
        scale_inplace(y, 1.5f);
        expect_close(y, ref, y_dt == DType::BF16 ? kTolBf16 : kTolF32, "add_inplace + scale_inplace");

        const Tensor gx = to_cuda(x, x_dt);
        const double ss_ref = sum_of_squares(f64(x));
        EXPECT_NEAR(sum_of_squares(gx), ss_ref, 1e-10 * ss_ref);
        EXPECT_TRUE(all_finite(gx));
      }
    for (double bad : {std::nan(""), std::numeric_limits<double>::infinity()}) {
      for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
        Tensor x = Tensor::zeros({n}, DType::F32);
        x.set_item(at, bad);
        EXPECT_FALSE(all_finite(to_cuda(x, DType::BF16))) << "non-finite at " << at << " of " << n;
        EXPECT_FALSE(all_finite(to_cuda(x, DType::F32))) << "non-finite at " << at << " of " << n;
      }
    }
  }
}

// Tensors that start off a 16-byte boundary (slices) go element by element: same results.
TEST(VectorOpsGpu, UnalignedSlicesMatchTheAlignedPath) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Seeded s;
  SCOPED_TRACE(s.tag("unaligned"));
  const int64_t n = 4099;
  const Tensor g = random_bf16_values({n + 1}, s.rng, 3.0), u = random_bf16_values({n + 1}, s.rng);
  for (DType dt : kBoth) {
    const Tensor gg = to_cuda(g, dt), gu = to_cuda(u, dt);
    Tensor h_al = poisoned_cuda({n}, dt), h_un_buf = poisoned_cuda({n + 1}, dt);
    Tensor h_un = h_un_buf.slice(0, 1, n + 1);
    swiglu_forward(h_al, gg.slice(0, 1, n + 1).contiguous(), gu.slice(0, 1, n + 1).contiguous());
    swiglu_forward(h_un, gg.slice(0, 1, n + 1), gu.slice(0, 1, n + 1));
    EXPECT_EQ(h_un.to_vector(), h_al.to_vector()) << name(dt);
    EXPECT_NEAR(sum_of_squares(gg.slice(0, 1, n + 1)), sum_of_squares(f64(g).slice(0, 1, n + 1).contiguous()),
                1e-10 * sum_of_squares(f64(g)));
  }
}

// sum_of_squares_many is the loop of sum_of_squares, bit for bit, with one synchronisation.
TEST(VectorOpsGpu, SumOfSquaresManyEqualsTheLoopExactly) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Seeded s;
  SCOPED_TRACE(s.tag("sum_of_squares_many"));
  std::vector<Tensor> xs, cpu_xs;
  const int64_t sizes[] = {2048, 1, 0, 4194304 + 5, 257, 128 * 2048};
  int i = 0;
  for (int64_t n : sizes) {
    const Tensor x = random_bf16_values({n}, s.rng);
    cpu_xs.push_back(f64(x));
    xs.push_back(to_cuda(x, i++ % 2 ? DType::BF16 : DType::F32));
  }
  double loop = 0, ref = 0;
  for (const Tensor& x : xs) loop += sum_of_squares(x);
  for (const Tensor& x : cpu_xs) ref += sum_of_squares(x);
  EXPECT_EQ(sum_of_squares_many(xs), loop);
  EXPECT_NEAR(sum_of_squares_many(xs), ref, 1e-10 * ref);
  EXPECT_NEAR(sum_of_squares_many(cpu_xs), ref, 1e-12 * ref);
  EXPECT_EQ(sum_of_squares_many({}), 0.0);

  // More tensors than one launch's list, some unaligned (element path), some empty.
  std::vector<Tensor> many;
  std::vector<double> cpu_sums;
  for (int j = 0; j < 100; ++j) {
    const int64_t n = (j * 7919) % 70001 + (j % 9 == 0 ? 0 : 1) * (j % 3);
    const Tensor x = random_bf16_values({n + 1}, s.rng);
    const Tensor g = to_cuda(x, j % 2 ? DType::BF16 : DType::F32);
    many.push_back(j % 4 == 3 ? g.slice(0, 1, n + 1) : g.slice(0, 0, n));
    cpu_sums.push_back(sum_of_squares(f64(many.back()).contiguous()));
  }
  double many_loop = 0, many_ref = 0;
  for (const Tensor& x : many) many_loop += sum_of_squares(x);
  for (double v : cpu_sums) many_ref += v;
  EXPECT_EQ(sum_of_squares_many(many), many_loop);
  EXPECT_NEAR(sum_of_squares_many(many), many_ref, 1e-10 * many_ref);
}

}  // namespace
}  // namespace lasp
