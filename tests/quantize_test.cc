// Quantizers, Hadamard transform and emulated low-precision GEMMs (kernels/quantize.h,
// kernels/hadamard.h) against references written here: dense Hadamard matrices in double, scale
// rules recomputed with naive loops, brute-force E2M1 rounding, FP4/FP8 dot products decoded
// and accumulated in double, and statistical checks of unbiasedness.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "kernels/counter_rng.h"
#include "kernels/hadamard.h"
#include "kernels/quantize.h"

namespace {

using namespace lasp;

constexpr double kE2M1Magnitudes[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};

Tensor random_tensor(const Shape& shape, uint32_t seed, double stddev = 1.0, double outlier_every = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  Tensor t = Tensor::empty(shape, DType::F32);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    double v = normal(rng);
    if (outlier_every > 0 && i % int64_t(outlier_every) == 7) v *= 20;  // heavy outliers
    p[i] = float(v);
  }
  return t;
}

Tensor poisoned(const Shape& shape) { return Tensor::full(shape, NAN, DType::F32); }

// Independent E2M1 decode: sign in bit 3, magnitude index in bits 0..2.
double e2m1_value(uint8_t code) { return (code & 8 ? -1.0 : 1.0) * kE2M1Magnitudes[code & 7]; }

// Brute-force RTN onto E2M1 with ties to the even code, saturating at 6.
uint8_t e2m1_nearest(double v) {
  const double a = std::min(std::fabs(v), 6.0);
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double d = std::fabs(kE2M1Magnitudes[c] - a), db = std::fabs(kE2M1Magnitudes[best] - a);
    if (d < db || (d == db && c % 2 == 0)) best = c;
  }
  return uint8_t((std::signbit(v) ? 8 : 0) | best);
}

// Dense orthonormal Sylvester-Hadamard matrix of size g: H[i][j] = (-1)^popcount(i & j) / sqrt(g).
std::vector<double> dense_hadamard(int64_t g) {
  std::vector<double> h(size_t(g * g));
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < g; ++j) h[i * g + j] = (__builtin_popcountll(i & j) % 2 ? -1.0 : 1.0) / std::sqrt(double(g));
  return h;
}

// y = per-block H D x along the last dim, in double.
std::vector<double> reference_rotate(const Tensor& x, const HadamardSpec& spec) {
  const int64_t g = spec.block, n = x.numel();
  const std::vector<double> h = dense_hadamard(g);
  std::vector<double> y(size_t(n), 0.0);
  const float* xs = x.data<float>();
  for (int64_t b = 0; b < n; b += g)
    for (int64_t i = 0; i < g; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < g; ++j) acc += h[i * g + j] * hadamard_sign(spec, j) * xs[b + j];
      y[size_t(b + i)] = acc;
    }
  return y;
}

double max_abs_diff(const std::vector<double>& a, const Tensor& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b.item(int64_t(i))));
  return m;
}

double rms(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s / double(v.size()));
}

// ================================================================ counter-based RNG

TEST(CounterRng, PhiloxMatchesTheRandom123KnownAnswers) {
  const Philox4x32 zero = philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(zero.v[0], 0x6627e8d5u);
  EXPECT_EQ(zero.v[1], 0xe169c58du);
  EXPECT_EQ(zero.v[2], 0xbc57ac4cu);
  EXPECT_EQ(zero.v[3], 0x9b00dbd8u);
  const Philox4x32 ones = philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  EXPECT_EQ(ones.v[0], 0x408f276du);
  EXPECT_EQ(ones.v[1], 0x41c83b0eu);
  EXPECT_EQ(ones.v[2], 0xa20bc7c6u);
  EXPECT_EQ(ones.v[3], 0x6d5451fdu);
  const Philox4x32 pi = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u,
                                      0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(pi.v[0], 0xd16cfe09u);
  EXPECT_EQ(pi.v[1], 0x94fdccebu);
  EXPECT_EQ(pi.v[2], 0x5001e420u);
  EXPECT_EQ(pi.v[3], 0x24126ea1u);
}

TEST(CounterRng, UniformDrawsAreReproducibleAndUniform) {
  const int n = 1 << 16;
  double sum = 0, sumsq = 0;
  int bins[16] = {};
  for (int i = 0; i < n; ++i) {
    const float u = philox_uniform(42, 3, uint64_t(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    ASSERT_EQ(u, philox_uniform(42, 3, uint64_t(i)));
    sum += u;
    sumsq += double(u) * u;
    ++bins[int(u * 16)];
  }
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(sumsq / n, 1.0 / 3, 0.005);
  for (int b : bins) EXPECT_NEAR(b, n / 16, 6 * std::sqrt(n / 16.0));
  EXPECT_NE(philox_u32(42, 3, 0), philox_u32(43, 3, 0));
  EXPECT_NE(philox_u32(42, 3, 0), philox_u32(42, 4, 0));
}

// The element draws of stochastic rounding: element i is word i % 4 of Philox block i / 4, the
// cached walker gives the same numbers visited backwards and at random, and the draws are uniform.
TEST(CounterRng, ElementDrawsTakeTheFourWordsOfABlockInAnyVisitingOrder) {
  const uint64_t seed = 0x1234ABCDull, stream = 9;
  const int n = 1 << 14;
  std::vector<float> ref(n);
  for (int i = 0; i < n; ++i) {
    const Philox4x32 b = philox4x32_10(uint32_t(i / 4), 0, uint32_t(stream), 0, uint32_t(seed), uint32_t(seed >> 32));
    ref[i] = float(b.v[i % 4] >> 8) * (1.0f / 16777216.0f);
    ASSERT_EQ(philox_element_uniform(seed, stream, uint64_t(i)), ref[i]) << i;
  }
  PhiloxElementDraws backwards(seed, stream), shuffled(seed, stream);
  for (int i = n - 1; i >= 0; --i) ASSERT_EQ(backwards(uint64_t(i)), ref[i]) << i;
  std::mt19937 rng(5);
  for (int j = 0; j < n; ++j) {
    const int i = int(rng() % n);
    ASSERT_EQ(shuffled(uint64_t(i)), ref[i]) << i;
  }
  double sum = 0;
  int bins[16] = {};
  for (float u : ref) {
    sum += u;
    ++bins[int(u * 16)];
  }
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  for (int b : bins) EXPECT_NEAR(b, n / 16, 6 * std::sqrt(n / 16.0));
  // Neighbours (within and across blocks) are not equal.
  int same = 0;
  for (int i = 0; i + 1 < n; ++i) same += ref[i] == ref[i + 1];
  EXPECT_LT(same, 4);
}

// ================================================================ Hadamard

TEST(Hadamard, ForwardMatchesDenseMatrixForEveryBlockSizeWithAndWithoutSigns) {
  for (int64_t g : {1, 2, 4, 8, 16, 32, 64, 128, 256}) {
    for (bool randomized : {false, true}) {
      const HadamardSpec spec{g, randomized, 99};
      const Tensor x = random_tensor({3, g * 3}, uint32_t(g));
      Tensor y = poisoned(x.shape());
      hadamard_forward(y, x, spec);
      const std::vector<double> want = reference_rotate(x, spec);
      EXPECT_LT(max_abs_diff(want, y), 1e-5 * std::max(1.0, std::sqrt(double(g))))
          << "block " << g << " randomized " << randomized;
    }
  }
}

TEST(Hadamard, IsOrthonormalAndItsInverseIsExactToRounding) {
  for (int64_t g : {16, 32, 128}) {
    const HadamardSpec spec{g, true, 7};
    const Tensor x = random_tensor({5, g * 2}, 11, 1.0, 37);
    Tensor y = poisoned(x.shape()), back = poisoned(x.shape());
    hadamard_forward(y, x, spec);
    hadamard_inverse(back, y, spec);
    double xx = 0, yy = 0, err = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      xx += x.item(i) * x.item(i);
      yy += y.item(i) * y.item(i);
      err = std::max(err, std::fabs(back.item(i) - x.item(i)) / (std::fabs(x.item(i)) + 1.0));
    }
    EXPECT_NEAR(yy / xx, 1.0, 1e-5) << "norm preserved, block " << g;
    EXPECT_LT(err, 8 * 6e-8 * std::log2(double(g))) << "inverse exact to fp32 rounding, block " << g;
    // In place gives the same result.
    Tensor z = x.clone();
    hadamard_forward(z, z, spec);
    for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(z.item(i), y.item(i));
  }
}

TEST(Hadamard, RandomSignsDependOnTheSeedAndAreBalanced) {
  int negative = 0, differ = 0;
  for (int64_t j = 0; j < 4096; ++j) {
    const float a = hadamard_sign({4096, true, 1}, j), b = hadamard_sign({4096, true, 2}, j);
    ASSERT_TRUE(a == 1.0f || a == -1.0f);
    negative += a < 0;
    differ += a != b;
  }
  EXPECT_NEAR(negative, 2048, 200);
  EXPECT_NEAR(differ, 2048, 200);
  EXPECT_EQ(hadamard_sign({32, false, 1}, 5), 1.0f);
}

TEST(Hadamard, RejectsBlocksThatAreNotPowersOfTwoOrDoNotDivideTheLastDim) {
  const Tensor x = random_tensor({2, 48}, 1);
  Tensor y = poisoned(x.shape());
  EXPECT_THROW(hadamard_forward(y, x, {24, false, 0}), lasp::Error);
  EXPECT_THROW(hadamard_forward(y, x, {32, false, 0}), lasp::Error);
  Tensor wrong = poisoned({2, 32});
  EXPECT_THROW(hadamard_forward(wrong, x, {16, false, 0}), lasp::Error);
}

// ================================================================ FP8

// Per-element scale (block amax / format max, 1 for zero blocks), recomputed with naive loops
// over the block each element belongs to.
std::vector<double> fp8_reference_scales(const Tensor& x, Fp8Scaling scaling, double fmax) {
  const int64_t cols = x.dim(-1), rows = x.numel() / cols;
  auto block_rows = [&](int64_t r) -> std::pair<int64_t, int64_t> {
    if (scaling == Fp8Scaling::PerTensor) return {0, rows};
    if (scaling == Fp8Scaling::Block1x128) return {r, r + 1};
    return {r / 128 * 128, std::min(rows, r / 128 * 128 + 128)};
  };
  auto block_cols = [&](int64_t c) -> std::pair<int64_t, int64_t> {
    if (scaling == Fp8Scaling::PerTensor) return {0, cols};
    return {c / 128 * 128, std::min(cols, c / 128 * 128 + 128)};
  };
  std::vector<double> out(size_t(x.numel()));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const auto [r0, r1] = block_rows(r);
      const auto [c0, c1] = block_cols(c);
      if (r != r0 && c != c0 && scaling != Fp8Scaling::Block1x128) {  // reuse the block's first
        out[size_t(r * cols + c)] = out[size_t(r0 * cols + c0)];
        continue;
      }
      if (c != c0) {
        out[size_t(r * cols + c)] = out[size_t(r * cols + c0)];
        continue;
      }
      double amax = 0;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = c0; j < c1; ++j) amax = std::max(amax, std::fabs(x.item(i * cols + j)));
      out[size_t(r * cols + c)] = amax > 0 ? amax / fmax : 1.0;
    }
  return out;
}

TEST(Fp8, EveryScalingModeUsesBlockAmaxOverFormatMaxAndRoundsToNearest) {
  const Tensor x = random_tensor({130, 300}, 5, 2.0, 101);  // ragged 128-blocks both ways
  for (Fp8Format fmt : {Fp8Format::E4M3, Fp8Format::E5M2}) {
    const double fmax = fp8_format_max(fmt);
    const int mbits = fmt == Fp8Format::E4M3 ? 3 : 2;
    for (Fp8Scaling sc : {Fp8Scaling::PerTensor, Fp8Scaling::Block1x128, Fp8Scaling::Block128x128}) {
      const QuantizedFp8 q = quantize_fp8(x, fmt, sc);
      const Shape want_shape = sc == Fp8Scaling::PerTensor    ? Shape{1}
                               : sc == Fp8Scaling::Block1x128 ? Shape{130, 3}
                                                              : Shape{2, 3};
      ASSERT_EQ(q.scales.shape(), want_shape);
      Tensor dq = poisoned(x.shape());
      dequantize_fp8(dq, q);
      const std::vector<double> ref_scale = fp8_reference_scales(x, sc, fmax);
      int bad = 0;
      for (int64_t r = 0; r < 130; ++r)
        for (int64_t c = 0; c < 300; ++c) {
          const int64_t i = r * 300 + c;
          const double s = ref_scale[size_t(i)];
          ASSERT_NEAR(q.scales.item(sc == Fp8Scaling::PerTensor    ? 0
                                    : sc == Fp8Scaling::Block1x128 ? r * 3 + c / 128
                                                                   : (r / 128) * 3 + c / 128),
                      s, 1e-7 * s);
          const double v = x.item(i) / s;
          // RTN: |decode(code) - v| <= half an ulp (relative 2^-(m+1)), absolute near subnormals.
          const double dec = fp8_decode(q.codes.data<uint8_t>()[i], fmt);
          const double tol = std::max(std::fabs(v) * std::ldexp(1.0, -mbits - 1),
                                      std::ldexp(1.0, fmt == Fp8Format::E4M3 ? -10 : -17)) * 1.0001;
          if (std::fabs(dec - v) > tol || std::fabs(dq.item(i) - dec * s) > 1e-6 * std::fabs(dec * s)) {
            if (bad++ < 3) ADD_FAILURE() << "r " << r << " c " << c << " v " << v << " dec " << dec;
          }
        }
      EXPECT_EQ(bad, 0);
    }
  }
}

TEST(Fp8, DelayedScalingUsesTheHistoryMaxAndSaturatesNewOutliers) {
  AmaxHistory history(2);
  Tensor a = Tensor::from_values({1.0, -2.0, 0.5}, {3});
  Tensor big = Tensor::from_values({8.0, -1.0, 0.25}, {3});
  const QuantizedFp8 q1 = quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::PerTensor, &history);
  EXPECT_FLOAT_EQ(q1.scales.item(0), 2.0f / 448.0f);  // empty history: current amax
  EXPECT_FLOAT_EQ(history.amax(), 2.0f);
  const QuantizedFp8 q2 = quantize_fp8(big, Fp8Format::E4M3, Fp8Scaling::PerTensor, &history);
  EXPECT_FLOAT_EQ(q2.scales.item(0), 2.0f / 448.0f);  // last step's amax, not 8
  EXPECT_EQ(q2.codes.data<uint8_t>()[0], 0x7E);        // 8 / (2/448) = 1792 saturates to 448
  EXPECT_FLOAT_EQ(history.amax(), 8.0f);
  const QuantizedFp8 q3 = quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::PerTensor, &history);
  EXPECT_FLOAT_EQ(q3.scales.item(0), 8.0f / 448.0f);
  quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::PerTensor, &history);
  quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::PerTensor, &history);
  EXPECT_FLOAT_EQ(history.amax(), 2.0f);  // the 8 left the window of 2
  EXPECT_THROW(quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::Block1x128, &history), lasp::Error);
  EXPECT_THROW(AmaxHistory(0), lasp::Error);
}

TEST(Fp8, ZeroTensorsAndNonFiniteInputs) {
  const QuantizedFp8 q = quantize_fp8(Tensor::zeros({4, 5}, DType::F32), Fp8Format::E5M2, Fp8Scaling::Block1x128);
  for (int64_t i = 0; i < q.scales.numel(); ++i) EXPECT_EQ(q.scales.item(i), 1.0);
  const Tensor d = dequantize_fp8(q);
  for (int64_t i = 0; i < d.numel(); ++i) EXPECT_EQ(d.item(i), 0.0);
  EXPECT_THROW(quantize_fp8(Tensor::from_values({1.0, NAN}, {2}), Fp8Format::E4M3, Fp8Scaling::PerTensor),
               lasp::Error);
  EXPECT_THROW(quantize_fp8(Tensor::zeros({2}, DType::F64), Fp8Format::E4M3, Fp8Scaling::PerTensor),
               lasp::Error);
}

TEST(Fp8, EmulatedGemmEqualsTheDecodedDotProductInDouble) {
  const Tensor a = random_tensor({37, 300}, 21, 1.0, 53), b = random_tensor({23, 300}, 22, 0.1);
  const QuantizedFp8 qa = quantize_fp8(a, Fp8Format::E4M3, Fp8Scaling::Block1x128);
  const QuantizedFp8 qb = quantize_fp8(b, Fp8Format::E5M2, Fp8Scaling::Block128x128);
  Tensor c = poisoned({37, 23});
  gemm_fp8_emulated(c, qa, qb);
  for (int64_t m = 0; m < 37; ++m)
    for (int64_t n = 0; n < 23; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < 300; ++k) {
        const double va = e4m3_to_float(qa.codes.data<uint8_t>()[m * 300 + k]) * qa.scales.item(m * 3 + k / 128);
        const double vb = e5m2_to_float(qb.codes.data<uint8_t>()[n * 300 + k]) * qb.scales.item(k / 128);
        ref += va * vb;
        mag += std::fabs(va * vb);
      }
      ASSERT_NEAR(c.item(m * 23 + n), ref, 1e-6 * mag + 1e-30) << m << "," << n;
    }
  Tensor wrong = poisoned({37, 22});
  EXPECT_THROW(gemm_fp8_emulated(wrong, qa, qb), lasp::Error);
}

// ================================================================ FP4: rounding tables

TEST(Fp4, StochasticRoundingOfEveryE2M1IntervalHasTheExactUpProbability) {
  for (int lo = 0; lo < 7; ++lo) {
    const double a = kE2M1Magnitudes[lo], b = kE2M1Magnitudes[lo + 1];
    for (double t : {0.0, 0.125, 0.25, 0.5, 0.75, 0.9}) {
      const float v = float(a + t * (b - a));
      for (float sign : {1.0f, -1.0f}) {
        int up = 0;
        const int n = 4096;
        for (int k = 0; k < n; ++k) {
          const uint8_t code = e2m1_round_stochastic(sign * v, (k + 0.5f) / n);
          const double mag = std::fabs(e2m1_value(code));
          ASSERT_TRUE(mag == a || mag == b) << v << " -> " << mag;
          ASSERT_EQ(std::signbit(e2m1_value(code)) || code == 8, sign < 0);
          up += mag == b && t > 0;
        }
        EXPECT_NEAR(double(up) / n, t, 1.0 / n) << "v " << v;
      }
    }
  }
  EXPECT_EQ(e2m1_round_stochastic(6.0f, 0.0f), 7);
  EXPECT_EQ(e2m1_round_stochastic(6.5f, 0.0f), 7);  // beyond the grid (fp32 rounding) clamps
  EXPECT_EQ(e2m1_round_stochastic(-6.0f, 0.99f), 15);
}

TEST(Fp4, StochasticRoundingOfScalesIsUnbiasedOnTheE4M3AndE8M0Grids) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> expo(-8, 8);
  for (int trial = 0; trial < 200; ++trial) {
    const float s = float(std::exp2(expo(rng)));
    double e4 = 0, e8 = 0;
    const int n = 1024;
    for (int k = 0; k < n; ++k) {
      const float u = (k + 0.5f) / n;
      e4 += e4m3_to_float(e4m3_round_stochastic(s, u));
      e8 += e8m0_to_float(e8m0_round_stochastic(s, u));
    }
    // With stratified u the mean is within one draw step of s (relative 2^-3/n, 1/n).
    EXPECT_NEAR(e4 / n, s, s * 0.125 / n * 2);
    EXPECT_NEAR(e8 / n, s, s * 2.0 / n);
  }
  EXPECT_EQ(e4m3_round_stochastic(1000.0f, 0.5f), 0x7E);
  EXPECT_EQ(e4m3_round_stochastic(448.0f, 0.99f), 0x7E);
}

// ================================================================ FP4: scale rules

TEST(Fp4, MxRoundToNearestFollowsTheOcpScaleRuleOnRaggedGroups) {
  const Tensor x = random_tensor({7, 100}, 31, 3.0, 41);  // 100 = 3 groups of 32 + 4
  Tensor zero_row = x.clone();
  for (int64_t c = 0; c < 100; ++c) zero_row.set_item(2 * 100 + c, 0.0);
  const QuantizedFp4 q = quantize_mxfp4(zero_row);
  ASSERT_EQ(q.scales.shape(), (Shape{7, 4}));
  EXPECT_EQ(q.tensor_scale, 1.0f);
  for (int64_t r = 0; r < 7; ++r)
    for (int64_t g = 0; g < 4; ++g) {
      double amax = 0;
      for (int64_t c = g * 32; c < std::min<int64_t>(100, g * 32 + 32); ++c)
        amax = std::max(amax, std::fabs(zero_row.item(r * 100 + c)));
      if (amax == 0) continue;
      const int e = int(std::floor(std::log2(amax))) - 2;  // emax(E2M1) = 2
      ASSERT_EQ(int(q.scales.data<uint8_t>()[r * 4 + g]), e + 127) << r << "," << g;
      for (int64_t c = g * 32; c < std::min<int64_t>(100, g * 32 + 32); ++c) {
        const int64_t i = r * 100 + c;
        ASSERT_EQ(q.codes.data<uint8_t>()[i], e2m1_nearest(zero_row.item(i) / std::ldexp(1.0, e))) << i;
      }
    }
  Tensor d = poisoned(x.shape());
  dequantize_fp4(d, q);
  for (int64_t c = 0; c < 100; ++c) EXPECT_EQ(d.item(2 * 100 + c), 0.0);
  // Round to nearest is deterministic.
  const QuantizedFp4 again = quantize_mxfp4(zero_row);
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(q.codes.data<uint8_t>()[i], again.codes.data<uint8_t>()[i]);
}

TEST(Fp4, NvRoundToNearestUsesE4M3GroupScalesUnderAnFp32TensorScale) {
  const Tensor x = random_tensor({5, 72}, 32, 0.01, 29);  // 72 = 4 groups of 16 + 8
  const QuantizedFp4 q = quantize_nvfp4(x);
  double amax = 0;
  for (int64_t i = 0; i < x.numel(); ++i) amax = std::max(amax, std::fabs(x.item(i)));
  const double ts = float(amax) / (448.0f * 6.0f);
  EXPECT_NEAR(q.tensor_scale, ts, 1e-7 * ts);
  ASSERT_EQ(q.scales.shape(), (Shape{5, 5}));
  for (int64_t r = 0; r < 5; ++r)
    for (int64_t g = 0; g < 5; ++g) {
      double gmax = 0;
      for (int64_t c = g * 16; c < std::min<int64_t>(72, g * 16 + 16); ++c)
        gmax = std::max(gmax, std::fabs(x.item(r * 72 + c)));
      const uint8_t want_scale = float_to_e4m3(float(gmax / 6.0 / q.tensor_scale));
      ASSERT_EQ(q.scales.data<uint8_t>()[r * 5 + g], want_scale);
      const double s = e4m3_to_float(want_scale) * double(q.tensor_scale);
      for (int64_t c = g * 16; c < std::min<int64_t>(72, g * 16 + 16); ++c) {
        const int64_t i = r * 72 + c;
        const double v = x.item(i) / s;
        // The kernel divides in fp32; accept either neighbour only at an exact fp32 tie.
        const uint8_t got = q.codes.data<uint8_t>()[i];
        if (got != e2m1_nearest(v)) {
          EXPECT_NEAR(std::fabs(std::fabs(v) - std::fabs(e2m1_value(got))),
                      std::fabs(std::fabs(v) - std::fabs(e2m1_value(e2m1_nearest(v)))), 1e-6);
        }
      }
    }
}

TEST(Fp4, QuestScalesByGroupRmsClipsAndMasksTheClippedElements) {
  const Tensor x = random_tensor({6, 64}, 33, 1.0, 13);
  const QuantizedFp4 q = quantize_mxfp4(x, Fp4Rounding::Nearest, Fp4Clip::Quest);
  ASSERT_TRUE(q.mask.defined());
  int clipped = 0;
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t g = 0; g < 2; ++g) {
      double ss = 0;
      for (int64_t c = g * 32; c < g * 32 + 32; ++c) ss += x.item(r * 64 + c) * x.item(r * 64 + c);
      const double want = std::floor(std::log2(kQuestAlphaE2M1 * std::sqrt(ss / 32) / 6.0));
      ASSERT_EQ(int(q.scales.data<uint8_t>()[r * 2 + g]), int(want) + 127);
      const double s = std::ldexp(1.0, int(want));
      for (int64_t c = g * 32; c < g * 32 + 32; ++c) {
        const int64_t i = r * 64 + c;
        const double v = x.item(i) / s;
        ASSERT_EQ(q.mask.data<uint8_t>()[i], std::fabs(v) <= 6.0 ? 1 : 0);
        ASSERT_EQ(q.codes.data<uint8_t>()[i], e2m1_nearest(v));
        clipped += std::fabs(v) > 6.0;
      }
    }
  EXPECT_GT(clipped, 0) << "the outliers must clip";
  EXPECT_FALSE(quantize_nvfp4(x).mask.defined()) << "no mask without QuEST";
  Fp4Options bad;
  bad.format = Fp4Format::NVFP4;
  bad.clip = Fp4Clip::Quest;
  EXPECT_THROW(quantize_fp4(x, bad), lasp::Error);
}

TEST(Fp4, StochasticDrawsAreAddressedByElementIndexSoAGpuCanReproduceThem) {
  const Tensor x = random_tensor({3, 64}, 34);
  const QuantizedFp4 q = quantize_mxfp4(x, Fp4Rounding::Stochastic, Fp4Clip::AbsMax, 77, 5);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double s = q.scale(i / 64, (i % 64) / 32);
    const uint8_t want = e2m1_round_stochastic(float(x.item(i) / s), philox_element_uniform(77, 5, uint64_t(i)));
    ASSERT_EQ(q.codes.data<uint8_t>()[i], want) << i;
  }
  const QuantizedFp4 same = quantize_mxfp4(x, Fp4Rounding::Stochastic, Fp4Clip::AbsMax, 77, 5);
  const QuantizedFp4 other = quantize_mxfp4(x, Fp4Rounding::Stochastic, Fp4Clip::AbsMax, 78, 5);
  int differ = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    ASSERT_EQ(q.codes.data<uint8_t>()[i], same.codes.data<uint8_t>()[i]);
    differ += q.codes.data<uint8_t>()[i] != other.codes.data<uint8_t>()[i];
  }
  EXPECT_GT(differ, 10);
}

// ================================================================ FP4: unbiasedness

// Mean of n stochastic dequantizations of x minus x, per element, against the exact per-element
// standard deviation of one draw: every element must be within 5 sigma / sqrt(n).
void expect_unbiased_sr(Fp4Format fmt, int n) {
  const Tensor x = random_tensor({2, 64}, 40 + int(fmt), 1.0, 17);
  std::vector<double> mean(size_t(x.numel()), 0.0);
  Fp4Options o;
  o.format = fmt;
  o.rounding = Fp4Rounding::Stochastic;
  QuantizedFp4 q;
  for (int k = 0; k < n; ++k) {
    o.seed = uint64_t(k) + 1000;
    q = quantize_fp4(x, o);
    const Tensor d = dequantize_fp4(q);
    for (int64_t i = 0; i < x.numel(); ++i) mean[size_t(i)] += d.item(i) / n;
  }
  const int64_t group = fp4_group_size(fmt);
  for (int64_t i = 0; i < x.numel(); ++i) {
    // Scales do not depend on the draws: one draw is lo or hi around v with P(hi) = t.
    const double s = q.scale(i / 64, (i % 64) / group) * double(q.tensor_scale);
    const double v = std::fabs(x.item(i)) / s;
    int lo = 0;
    while (lo < 7 && kE2M1Magnitudes[lo + 1] <= v) ++lo;
    const double width = lo < 7 ? kE2M1Magnitudes[lo + 1] - kE2M1Magnitudes[lo] : 0;
    const double t = width > 0 ? (v - kE2M1Magnitudes[lo]) / width : 0;
    const double sigma = std::sqrt(t * (1 - t)) * width * s;
    EXPECT_LE(v, 6.0 + 1e-6) << "unbiased modes must not clip";
    EXPECT_NEAR(mean[size_t(i)], x.item(i), 5 * sigma / std::sqrt(double(n)) + 1e-6 * s) << i;
  }
}

TEST(Fp4, StochasticRoundingIsUnbiasedForMxfp4AndNvfp4) {
  expect_unbiased_sr(Fp4Format::MXFP4, 2000);
  expect_unbiased_sr(Fp4Format::NVFP4, 2000);
}

TEST(Fp4, StochasticRoundingMeanErrorShrinksLikeOneOverSqrtN) {
  const Tensor x = random_tensor({4, 128}, 41);
  auto mean_error = [&](int n) {
    std::vector<double> mean(size_t(x.numel()), 0.0);
    for (int k = 0; k < n; ++k) {
      const Tensor d = dequantize_fp4(quantize_mxfp4(x, Fp4Rounding::Stochastic, Fp4Clip::AbsMax, 5000 + k));
      for (int64_t i = 0; i < x.numel(); ++i) mean[size_t(i)] += d.item(i) / n;
    }
    for (int64_t i = 0; i < x.numel(); ++i) mean[size_t(i)] -= x.item(i);
    return rms(mean);
  };
  const double e16 = mean_error(16), e1024 = mean_error(1024);
  // sqrt(1024 / 16) = 8; allow sampling noise.
  EXPECT_GT(e16 / e1024, 5.0) << "e16 " << e16 << " e1024 " << e1024;
  EXPECT_LT(e16 / e1024, 12.0) << "e16 " << e16 << " e1024 " << e1024;
}

// x -> rotate (`stages` randomized Hadamard transforms seeded by k) -> quantize (seed k) ->
// dequantize -> rotate back.
Tensor rotate_quantize_restore(const Tensor& x, const Fp4Options& base, int stages, uint64_t k) {
  Tensor xr = x.clone();
  for (int s = 0; s < stages; ++s) hadamard_forward(xr, xr, {128, true, k * 7919 + 31 * s + 1});
  Fp4Options o = base;
  o.seed = k;
  Tensor d = dequantize_fp4(quantize_fp4(xr, o));
  for (int s = stages - 1; s >= 0; --s) hadamard_inverse(d, d, {128, true, k * 7919 + 31 * s + 1});
  return d;
}

struct BiasStats {
  double rel_mse;     // E ||x_hat - x||^2 / ||x||^2 (one draw)
  double rel_bias;    // ||mean(x_hat) - x|| / ||x|| after n draws
  double noise_floor; // what rel_bias would be for an unbiased estimator: sqrt(rel_mse / n)
  double projection;  // <mean(x_hat), x> / ||x||^2
};

BiasStats bias_over_rotations(const Tensor& x, Fp4Format fmt, Fp4Rounding rnd, int stages, int n) {
  Fp4Options o;
  o.format = fmt;
  o.rounding = rnd;
  std::vector<double> mean(size_t(x.numel()), 0.0);
  double mse = 0, xx = 0, proj = 0, bias = 0;
  for (int64_t i = 0; i < x.numel(); ++i) xx += x.item(i) * x.item(i);
  for (int k = 0; k < n; ++k) {
    const Tensor d = rotate_quantize_restore(x, o, stages, uint64_t(k) + 1);
    for (int64_t i = 0; i < x.numel(); ++i) {
      mean[size_t(i)] += d.item(i) / n;
      mse += std::pow(d.item(i) - x.item(i), 2) / n;
    }
  }
  for (int64_t i = 0; i < x.numel(); ++i) {
    bias += std::pow(mean[size_t(i)] - x.item(i), 2);
    proj += mean[size_t(i)] * x.item(i);
  }
  return {mse / xx, std::sqrt(bias / xx), std::sqrt(mse / xx / n), proj / xx};
}

TEST(Fp4, MsEdenIsUnbiasedOverWellMixingRandomRotationsWhereRoundToNearestIsNot) {
  // EDEN is exactly unbiased for a uniformly random rotation; two randomized Hadamard stages
  // (H D2 H D1) mix well enough to show it at n = 2048 draws, on data with outliers.
  const Tensor x = random_tensor({4, 256}, 42, 1.0, 23);
  const int n = 2048;
  const BiasStats eden = bias_over_rotations(x, Fp4Format::NVFP4, Fp4Rounding::MsEden, 2, n);
  const BiasStats rtn = bias_over_rotations(x, Fp4Format::NVFP4, Fp4Rounding::Nearest, 2, n);
  std::printf("[ MS-EDEN  ] NVFP4, 2 RHT stages, %d draws: relative bias MS-EDEN %.5f (floor %.5f), "
              "RTN %.5f (floor %.5f)\n", n, eden.rel_bias, eden.noise_floor, rtn.rel_bias, rtn.noise_floor);
  EXPECT_LT(eden.rel_bias, 1.5 * eden.noise_floor);
  EXPECT_NEAR(eden.projection, 1.0, 4 * eden.noise_floor);
  EXPECT_GT(rtn.rel_bias, 2.0 * rtn.noise_floor) << "RTN is biased: the test has power";
}

TEST(Fp4, MsEdenHasAboutHalfTheErrorOfStochasticRoundingInNvfp4) {
  // One randomized Hadamard stage of 128 (Quartet II's setting). Along x the estimate is
  // unbiased (projection 1); a small residual bias orthogonal to x remains because a single RHT
  // is not a uniformly random rotation (documented in docs/low_precision.md).
  const Tensor x = random_tensor({4, 256}, 42, 1.0, 23);
  const int n = 1024;
  for (Fp4Format fmt : {Fp4Format::NVFP4, Fp4Format::MXFP4}) {
    const BiasStats eden = bias_over_rotations(x, fmt, Fp4Rounding::MsEden, 1, n);
    const BiasStats sr = bias_over_rotations(x, fmt, Fp4Rounding::Stochastic, 1, n);
    std::printf("[ MS-EDEN  ] %s, 1 RHT stage: relative MSE SR %.5f MS-EDEN %.5f (SR / MS-EDEN = "
                "%.2fx); bias after %d draws SR %.5f (floor %.5f) MS-EDEN %.5f (floor %.5f)\n",
                fmt == Fp4Format::NVFP4 ? "NVFP4" : "MXFP4", sr.rel_mse, eden.rel_mse,
                sr.rel_mse / eden.rel_mse, n, sr.rel_bias, sr.noise_floor, eden.rel_bias, eden.noise_floor);
    EXPECT_LT(sr.rel_bias, 1.5 * sr.noise_floor) << "SR is unbiased for any rotation";
    EXPECT_NEAR(eden.projection, 1.0, 4 * eden.noise_floor);
    EXPECT_LT(eden.rel_bias, 0.15 * std::sqrt(eden.rel_mse)) << "residual bias << one draw's error";
    if (fmt == Fp4Format::NVFP4) {
      EXPECT_GT(sr.rel_mse / eden.rel_mse, 1.8);
    } else {  // E8M0 scales move in factors of 2: randomizing them costs as much as SR saves
      EXPECT_GT(sr.rel_mse / eden.rel_mse, 0.8);
    }
  }
}

TEST(Fp4, QuantizationErrorOfRtnSrAndMsEdenOnGaussianData) {
  // The figures in docs/low_precision.md: relative MSE ||Q(x) - x||^2 / ||x||^2 on N(0,1) data
  // rotated by a randomized Hadamard transform of block 128.
  const Tensor x = random_tensor({256, 1024}, 43);
  const HadamardSpec h{128, true, 9};
  Tensor xr = poisoned(x.shape());
  hadamard_forward(xr, x, h);
  double xx = 0;
  for (int64_t i = 0; i < x.numel(); ++i) xx += xr.item(i) * xr.item(i);
  double mse[2][3];
  for (Fp4Format fmt : {Fp4Format::MXFP4, Fp4Format::NVFP4}) {
    for (Fp4Rounding rnd : {Fp4Rounding::Nearest, Fp4Rounding::Stochastic, Fp4Rounding::MsEden}) {
      Fp4Options o;
      o.format = fmt;
      o.rounding = rnd;
      o.seed = 17;
      const Tensor d = dequantize_fp4(quantize_fp4(xr, o));
      double e = 0;
      for (int64_t i = 0; i < x.numel(); ++i) e += std::pow(d.item(i) - xr.item(i), 2);
      mse[int(fmt)][int(rnd)] = e / xx;
    }
    std::printf("[ FP4 MSE  ] %s  RTN %.5f  SR %.5f  MS-EDEN %.5f  (SR / MS-EDEN = %.2fx)\n",
                fmt == Fp4Format::NVFP4 ? "NVFP4" : "MXFP4", mse[int(fmt)][0], mse[int(fmt)][1],
                mse[int(fmt)][2], mse[int(fmt)][1] / mse[int(fmt)][2]);
    EXPECT_LT(mse[int(fmt)][0], mse[int(fmt)][1]) << "RTN beats SR on error";
    EXPECT_LT(mse[int(fmt)][2], mse[int(fmt)][1]) << "MS-EDEN beats SR on error";
  }
  EXPECT_LT(mse[1][0], mse[0][0]) << "NVFP4 (16, E4M3 scales) is finer than MXFP4 (32, E8M0)";
}

// ================================================================ FP4 GEMM

TEST(Fp4, EmulatedGemmEqualsTheExactFp4DotProductInDouble) {
  for (Fp4Format fmt : {Fp4Format::MXFP4, Fp4Format::NVFP4}) {
    const int64_t k = 160 + 8;  // ragged last group for both formats
    const Tensor a = random_tensor({19, k}, 50, 1.0, 31), b = random_tensor({13, k}, 51, 0.02);
    Fp4Options o;
    o.format = fmt;
    o.rounding = Fp4Rounding::Stochastic;
    const QuantizedFp4 qa = quantize_fp4(a, o), qb = quantize_fp4(b, o);
    Tensor c = poisoned({19, 13});
    gemm_fp4_emulated(c, qa, qb);
    const int64_t group = fp4_group_size(fmt), ng = (k + group - 1) / group;
    auto scale_of = [&](const QuantizedFp4& q, int64_t r, int64_t g) {
      const uint8_t s = q.scales.data<uint8_t>()[r * ng + g];
      return fmt == Fp4Format::MXFP4 ? std::ldexp(1.0, int(s) - 127) : double(e4m3_to_float(s));
    };
    for (int64_t m = 0; m < 19; ++m)
      for (int64_t n = 0; n < 13; ++n) {
        double ref = 0, mag = 0;
        for (int64_t j = 0; j < k; ++j) {
          const double va = e2m1_value(qa.codes.data<uint8_t>()[m * k + j]) * scale_of(qa, m, j / group);
          const double vb = e2m1_value(qb.codes.data<uint8_t>()[n * k + j]) * scale_of(qb, n, j / group);
          ref += va * vb;
          mag += std::fabs(va * vb);
        }
        ref *= double(qa.tensor_scale) * double(qb.tensor_scale);
        mag *= double(qa.tensor_scale) * double(qb.tensor_scale);
        ASSERT_NEAR(c.item(m * 13 + n), ref, 2e-6 * mag + 1e-30) << m << "," << n;
      }
  }
  const Tensor a = random_tensor({4, 64}, 1);
  const QuantizedFp4 mx = quantize_mxfp4(a), nv = quantize_nvfp4(a);
  Tensor c = poisoned({4, 4});
  EXPECT_THROW(gemm_fp4_emulated(c, mx, nv), lasp::Error);
}

TEST(Fp4, DequantizedMxfp4ValuesAreExactInBf16AndE4M3) {
  const Tensor x = random_tensor({8, 64}, 52, 1e-3, 11);
  const Tensor d = dequantize_fp4(quantize_mxfp4(x), false);
  for (int64_t i = 0; i < d.numel(); ++i) {
    const float v = float(d.item(i));
    ASSERT_EQ(bf16_to_float(float_to_bf16(v)), v);
  }
  // Relative to its power-of-two scale, every element is an E2M1 value, which E4M3 holds exactly.
  for (int c = 0; c < 16; ++c) ASSERT_EQ(e4m3_to_float(float_to_e4m3(float(e2m1_value(uint8_t(c))))), float(e2m1_value(uint8_t(c))));
}

TEST(Fp4, RejectsBadInput) {
  EXPECT_THROW(quantize_mxfp4(Tensor::from_values({1.0, INFINITY}, {2})), lasp::Error);
  EXPECT_THROW(quantize_nvfp4(Tensor::zeros({4}, DType::F64)), lasp::Error);
  Fp4Options o;
  o.rounding = Fp4Rounding::MsEden;
  o.eden_block = 48;  // not a multiple of 32
  EXPECT_THROW(quantize_fp4(random_tensor({2, 64}, 1), o), lasp::Error);
}

// ================================================================ Quartet linear layer

// dx_ref = ((dy Wq) .* M_x) H and dW_ref = ((dy^T Xq) .* M_w) H, in double, with H the dense
// forward Hadamard: what the FP4 backward estimates without bias.
struct ExactGrads {
  std::vector<double> dx, dw;
};

ExactGrads exact_quartet_grads(const Tensor& dy, const QuartetSaved& s, int64_t block) {
  const int64_t n = s.xq.dim(0), in = s.xq.dim(1), out = s.wq.dim(0);
  const std::vector<double> h = dense_hadamard(block);
  auto rotate_back = [&](std::vector<double>& g, int64_t rows) {  // g[r, :] <- H g[r, :] per block
    std::vector<double> tmp(g.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < in; b += block)
        for (int64_t i = 0; i < block; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < block; ++j) acc += h[j * block + i] * g[size_t(r * in + b + j)];
          tmp[size_t(r * in + b + i)] = acc;
        }
    g = tmp;
  };
  ExactGrads e{std::vector<double>(size_t(n * in)), std::vector<double>(size_t(out * in))};
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < in; ++c) {
      double acc = 0;
      for (int64_t o = 0; o < out; ++o) acc += dy.item(r * out + o) * s.wq.item(o * in + c);
      e.dx[size_t(r * in + c)] = s.mask_x.data<uint8_t>()[r * in + c] ? acc : 0.0;
    }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t c = 0; c < in; ++c) {
      double acc = 0;
      for (int64_t r = 0; r < n; ++r) acc += dy.item(r * out + o) * s.xq.item(r * in + c);
      e.dw[size_t(o * in + c)] = s.mask_w.data<uint8_t>()[o * in + c] ? acc : 0.0;
    }
  rotate_back(e.dx, n);
  rotate_back(e.dw, out);
  return e;
}

TEST(Quartet, ForwardIsTheProductOfTheSavedRotatedQuestOperandsAndApproximatesXWt) {
  const int64_t n = 64, in = 96, out = 32;
  const Tensor x = random_tensor({n, in}, 60, 1.0, 19), w = random_tensor({out, in}, 61, 0.05);
  Tensor y = poisoned({n, out});
  QuartetSaved saved;
  quartet_linear_forward(y, saved, x, w, QuartetConfig{});
  double err = 0, ref_norm = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double q = 0, exact = 0, mag = 0;
      for (int64_t c = 0; c < in; ++c) {
        q += saved.xq.item(r * in + c) * saved.wq.item(o * in + c);
        mag += std::fabs(saved.xq.item(r * in + c) * saved.wq.item(o * in + c));
        exact += x.item(r * in + c) * w.item(o * in + c);
      }
      ASSERT_NEAR(y.item(r * out + o), q, 2e-6 * mag);
      err += std::pow(y.item(r * out + o) - exact, 2);
      ref_norm += exact * exact;
    }
  // The rotation along `in` cancels: y is x W^T up to 4-bit quantization error.
  EXPECT_LT(std::sqrt(err / ref_norm), 0.25);
  int clipped = 0;
  for (int64_t i = 0; i < saved.mask_x.numel(); ++i) clipped += !saved.mask_x.data<uint8_t>()[i];
  EXPECT_GT(clipped, 0);
  EXPECT_LT(clipped, saved.mask_x.numel() / 5);
}

TEST(Quartet, BackwardIsAnUnbiasedEstimateOfTheMaskedStraightThroughGradient) {
  const int64_t n = 64, in = 64, out = 32;
  const Tensor x = random_tensor({n, in}, 70, 1.0, 19), w = random_tensor({out, in}, 71, 0.05);
  const Tensor dy = random_tensor({n, out}, 72, 1e-3);
  for (Fp4Rounding rnd : {Fp4Rounding::Stochastic, Fp4Rounding::MsEden}) {
    QuartetConfig cfg;
    cfg.backward_rounding = rnd;
    if (rnd == Fp4Rounding::MsEden) {
      cfg.backward_format = Fp4Format::NVFP4;
      cfg.backward_block = 32;
    }
    Tensor y = poisoned({n, out});
    QuartetSaved saved;
    quartet_linear_forward(y, saved, x, w, cfg);
    const ExactGrads exact = exact_quartet_grads(dy, saved, cfg.forward_block);
    const int draws = 256;
    std::vector<double> mean_dx(exact.dx.size(), 0.0), mean_dw(exact.dw.size(), 0.0);
    double one_dx = 0, one_dw = 0;
    for (int k = 0; k < draws; ++k) {
      Tensor dx = poisoned({n, in});
      Tensor dw = Tensor::full({out, in}, 1.0, DType::F32);  // accumulates into dw
      quartet_linear_backward(dx, dw, dy, saved, cfg, uint64_t(k) + 100);
      for (size_t i = 0; i < mean_dx.size(); ++i) {
        mean_dx[i] += dx.item(int64_t(i)) / draws;
        if (k == 0) one_dx += std::pow(dx.item(int64_t(i)) - exact.dx[i], 2);
      }
      for (size_t i = 0; i < mean_dw.size(); ++i) {
        mean_dw[i] += (dw.item(int64_t(i)) - 1.0) / draws;
        if (k == 0) one_dw += std::pow(dw.item(int64_t(i)) - 1.0 - exact.dw[i], 2);
      }
    }
    double bias_dx = 0, bias_dw = 0;
    for (size_t i = 0; i < mean_dx.size(); ++i) bias_dx += std::pow(mean_dx[i] - exact.dx[i], 2);
    for (size_t i = 0; i < mean_dw.size(); ++i) bias_dw += std::pow(mean_dw[i] - exact.dw[i], 2);
    // Unbiased: the mean of 256 draws is ~16x closer than one draw (allow 2x for noise and for
    // the randomized-Hadamard approximation of MS-EDEN's uniform rotation).
    const double rx = std::sqrt(bias_dx / one_dx), rw = std::sqrt(bias_dw / one_dw);
    std::printf("[ Quartet  ] %s backward: error of the 256-draw mean / one draw: dx %.3f  dW %.3f "
                "(unbiased: ~%.3f)\n",
                rnd == Fp4Rounding::MsEden ? "MS-EDEN" : "SR", rx, rw, 1.0 / std::sqrt(double(draws)));
    EXPECT_LT(rx, 2.0 / std::sqrt(double(draws)));
    EXPECT_LT(rw, 2.0 / std::sqrt(double(draws)));
  }
}

TEST(Quartet, RejectsRoundToNearestBackwardAndMisalignedShapes) {
  const Tensor x = random_tensor({32, 64}, 80), w = random_tensor({32, 64}, 81);
  Tensor y = poisoned({32, 32});
  QuartetSaved saved;
  QuartetConfig cfg;
  cfg.backward_rounding = Fp4Rounding::Nearest;
  EXPECT_THROW(quartet_linear_forward(y, saved, x, w, cfg), lasp::Error);
  const Tensor x_odd = random_tensor({32, 48}, 82), w_odd = random_tensor({32, 48}, 83);
  EXPECT_THROW(quartet_linear_forward(y, saved, x_odd, w_odd, QuartetConfig{}), lasp::Error);
}

}  // namespace
