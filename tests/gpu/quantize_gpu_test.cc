// CUDA quantizers (kernels/quantize_cuda.h) against the CPU ones (kernels/quantize.h): codes,
// scales, masks and tensor scales must be bit-identical; dequantization too.
//
// The QuantizeDeviceMath tests need no GPU: they run the host/device scalar code of
// kernels/quantize_math.h (what the kernels execute) on the host against core/dtype.cc and the
// CPU quantizer, so a logic error shows up even on machines without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "kernels/quantize.h"
#include "kernels/quantize_math.h"
#include "tests/gpu/gpu_test_util.h"

#ifdef LASP_HAVE_CUDA
#include "kernels/gemm_fp4.h"
#include "kernels/quantize_cuda.h"
#endif

namespace lasp {
namespace {

using namespace gpu_test;

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return qmath::float_bits(a) == qmath::float_bits(b);
}

// Inputs with the cases quantizers get wrong: N(0, 1) rows at very different magnitudes, an
// all-zero row, exact zeros, outliers, and values on format boundaries.
Tensor tricky_input(const Shape& shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::F32);
  const int64_t cols = shape.back(), rows = t.numel() / std::max<int64_t>(cols, 1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  float* p = t.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = r % 5 == 1 ? 1e-3f : r % 5 == 2 ? 300.0f : r % 5 == 3 ? 0.0f : 1.0f;
    for (int64_t c = 0; c < cols; ++c) {
      float v = nd(rng) * row_scale;
      const float u = ud(rng);
      if (u < 0.03f) v = 0.0f;
      if (u > 0.995f) v *= 40.0f;  // outliers
      p[r * cols + c] = v;
    }
  }
  return t;
}

// Rounds every element to bf16 (so fp32 and bf16 GPU inputs hold the same values).
[[maybe_unused]] Tensor bf16_rounded(const Tensor& x) {  // used by the CUDA-only tests
  Tensor y = x.clone();
  float* p = y.data<float>();
  for (int64_t i = 0; i < y.numel(); ++i) p[i] = bf16_to_float(float_to_bf16(p[i]));
  return y;
}

// Byte-exact comparison with a readable report of the first mismatches.
::testing::AssertionResult bytes_equal(const Tensor& gpu, const Tensor& cpu, const char* what,
                                       const Tensor* x = nullptr) {
  const Tensor g = gpu.is_cuda() ? gpu.to(lasp::cpu()) : gpu;
  if (g.shape() != cpu.shape() || g.dtype() != cpu.dtype())
    return ::testing::AssertionFailure() << what << ": GPU " << g.str() << " vs CPU " << cpu.str();
  const auto* a = static_cast<const uint8_t*>(g.raw());
  const auto* b = static_cast<const uint8_t*>(cpu.raw());
  const size_t elem = dtype_size(cpu.dtype());
  int64_t bad = 0;
  std::ostringstream first;
  for (int64_t i = 0; i < cpu.numel(); ++i) {
    if (std::memcmp(a + i * elem, b + i * elem, elem) == 0) continue;
    if (bad < 5) {
      first << "\n  [" << i << "] gpu " << g.item(i) << " cpu " << cpu.item(i);
      if (x && x->numel() == cpu.numel()) first << " (x = " << x->item(i) << ")";
    }
    ++bad;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << cpu.numel()
                                       << " entries differ" << first.str();
}

// ---------------------------------------------------------------- host: device math vs CPU

TEST(QuantizeDeviceMath, DecodersMatchCpuForEveryCode) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    EXPECT_TRUE(same_float(qmath::e4m3_decode(code), e4m3_to_float(code))) << "e4m3 code " << c;
    EXPECT_TRUE(same_float(qmath::e5m2_decode(code), e5m2_to_float(code))) << "e5m2 code " << c;
    if (c < 255) {
      EXPECT_TRUE(same_float(qmath::e8m0_decode(code), e8m0_to_float(code))) << "e8m0 " << c;
    }
    if (c < 16) {
      EXPECT_TRUE(same_float(qmath::e2m1_decode(code), e2m1_to_float(code))) << "e2m1 " << c;
    }
  }
  EXPECT_TRUE(std::isnan(qmath::e8m0_decode(0xFF)));
}

TEST(QuantizeDeviceMath, EncodersMatchCpuOnGridPointsMidpointsAndRandomFloats) {
  std::vector<float> probes = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-38f, 3e38f, -3e38f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN()};
  // Every representable value of each format, the midpoints between neighbours and the floats
  // just beside them (ties to even and the rounding boundaries).
  auto add_grid = [&](float (*decode)(uint8_t), int ncodes) {
    std::vector<float> vals;
    for (int c = 0; c < ncodes; ++c) {
      const float v = decode(static_cast<uint8_t>(c));
      if (std::isfinite(v) && v >= 0) vals.push_back(v);
    }
    std::sort(vals.begin(), vals.end());
    for (size_t i = 0; i < vals.size(); ++i) {
      for (float s : {1.0f, -1.0f}) {
        probes.push_back(s * vals[i]);
        if (i + 1 < vals.size()) {
          const float mid = 0.5f * (vals[i] + vals[i + 1]);
          probes.push_back(s * mid);
          probes.push_back(s * std::nextafter(mid, 0.0f));
          probes.push_back(s * std::nextafter(mid, 1e30f));
        }
      }
    }
    probes.push_back(vals.back() * 1.0625f);  // just above max: saturates
  };
  add_grid(e4m3_to_float, 256);
  add_grid(e5m2_to_float, 256);
  add_grid(e2m1_to_float, 16);
  std::mt19937 rng(fresh_seed());
  std::uniform_real_distribution<float> lg(-40.0f, 20.0f), sg(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i) probes.push_back(std::copysign(std::exp2(lg(rng)), sg(rng)));
  int bad = 0;
  for (float x : probes) {
    const bool ok = qmath::e4m3_encode(x) == float_to_e4m3(x, true) &&
                    qmath::e5m2_encode(x) == float_to_e5m2(x, true) &&
                    qmath::e2m1_encode(x) == float_to_e2m1(x);
    if (!ok && bad++ < 10) {
      ADD_FAILURE() << "x = " << x << " e4m3 " << int(qmath::e4m3_encode(x)) << "/"
                    << int(float_to_e4m3(x, true)) << " e5m2 " << int(qmath::e5m2_encode(x)) << "/"
                    << int(float_to_e5m2(x, true)) << " e2m1 " << int(qmath::e2m1_encode(x)) << "/"
                    << int(float_to_e2m1(x)) << " (device/cpu)";
    }
    if (std::isfinite(x) && x > 0) {
      EXPECT_EQ(qmath::e8m0_floor(x), e8m0_floor(x)) << "e8m0_floor(" << x << ")";
    }
  }
  EXPECT_EQ(bad, 0) << "of " << probes.size() << " probes";
}

// The per-tensor FP8 kernels divide by the scale through its reciprocal (qmath::div_by_scale,
// Markstein's corrections): the quotient must be the IEEE x / s bit for bit where the theorem
// applies, and give x / s's E4M3 and E5M2 codes everywhere else (tiny x, overflow, inf, NaN, ±0).
// Scales over the whole allowed range; x at every FP8 code, midpoint and their float neighbours
// times s (the quotients where a one-ulp error would change a code), random and special values.
TEST(QuantizeDeviceMath, DivisionByScaleThroughTheReciprocalIsTheIeeeQuotient) {
  std::mt19937 rng(fresh_seed());
  std::uniform_real_distribution<float> lg(-55.0f, 55.0f), mant(1.0f, 2.0f), u(0.0f, 1.0f);
  std::vector<float> scales = {1.0f, 0x1p-60f, 0x1p60f, 1.0f / 448.0f, 1.0f / 57344.0f, 3.0f,
                               1.0f / 3.0f, std::nextafter(1.0f, 2.0f), std::nextafter(1.0f, 0.0f),
                               std::nextafter(0x1p60f, 0.0f), std::nextafter(0x1p-60f, 1.0f)};
  std::uniform_int_distribution<int> amax_exp(-44, 59);  // amax / 57344 >= 2^-60
  for (int i = 0; i < 3000; ++i) {
    const float amax = std::ldexp(mant(rng), amax_exp(rng));
    scales.push_back(amax / (i % 2 ? 448.0f : 57344.0f));
  }
  // Quotients to aim at: every finite FP8 value of both formats, the midpoints and neighbours.
  std::vector<float> targets;
  for (float (*decode)(uint8_t) : {+[](uint8_t c) { return e4m3_to_float(c); },
                                   +[](uint8_t c) { return e5m2_to_float(c); }}) {
    std::vector<float> vals;
    for (int c = 0; c < 128; ++c) {
      const float v = decode(static_cast<uint8_t>(c));
      if (std::isfinite(v)) vals.push_back(v);
    }
    std::sort(vals.begin(), vals.end());
    for (size_t i = 0; i < vals.size(); ++i) {
      targets.push_back(vals[i]);
      if (i + 1 < vals.size()) targets.push_back(0.5f * (vals[i] + vals[i + 1]));
    }
    targets.push_back(vals.back() * 1.0625f);
  }
  const float specials[] = {0.0f, 1e-45f, 1e-40f, 0x1p-100f, std::nextafter(0x1p-100f, 0.0f), 1e-30f,
                            3e38f, std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  int64_t checked = 0, bad = 0;
  auto check = [&](float x, float s, float r) {
    for (float sx : {x, -x}) {
      const float want = sx / s, got = qmath::div_by_scale(sx, s, r);
      const bool exact_case = std::fabs(sx) >= 0x1p-100f && std::fabs(want) < 0x1p119f;
      const bool ok = (exact_case ? same_float(got, want) : true) &&
                      qmath::e4m3_encode(got) == qmath::e4m3_encode(want) &&
                      qmath::e5m2_encode(got) == qmath::e5m2_encode(want) &&
                      (std::isnan(want) || std::signbit(got) == std::signbit(want));
      ++checked;
      if (!ok && bad++ < 10)
        ADD_FAILURE() << std::hexfloat << "x = " << sx << " s = " << s << ": x / s = " << want
                      << ", div_by_scale = " << got;
    }
  };
  for (float s : scales) {
    ASSERT_TRUE(qmath::scale_division_ok(s)) << s;
    const float r = 1.0f / s;
    for (float t : targets) {
      const float x = t * s;  // rounded: x / s lands next to t
      check(x, s, r);
      check(std::nextafter(x, 0.0f), s, r);
      check(std::nextafter(x, INFINITY), s, r);
    }
    for (int i = 0; i < 200; ++i) check(s * std::ldexp(mant(rng), static_cast<int>(lg(rng) * 0.5f)), s, r);
    for (float x : specials) check(x, s, r);
  }
  EXPECT_FALSE(qmath::scale_division_ok(0x1p-61f));
  EXPECT_FALSE(qmath::scale_division_ok(0x1p61f));
  EXPECT_FALSE(qmath::scale_division_ok(std::numeric_limits<float>::infinity()));
  EXPECT_FALSE(qmath::scale_division_ok(std::numeric_limits<float>::quiet_NaN()));
  EXPECT_EQ(bad, 0) << "of " << checked << " quotients";
}

TEST(QuantizeDeviceMath, StochasticRoundingMatchesCpu) {
  std::mt19937 rng(fresh_seed());
  std::uniform_real_distribution<float> v(-7.0f, 7.0f), u(0.0f, 1.0f);
  int bad = 0;
  for (int i = 0; i < 100000; ++i) {
    float x = v(rng);
    if (i % 7 == 0) x = e2m1_to_float(static_cast<uint8_t>(i % 16));  // grid points
    const float uu = u(rng);
    if (qmath::e2m1_round_stochastic(x, uu) != e2m1_round_stochastic(x, uu)) ++bad;
  }
  // Next to every grid point (a few ulps either side, both signs) and at the probability's edges.
  const float us[] = {0.0f, 1e-7f, 0.25f, 0.5f, 0.75f, std::nextafter(1.0f, 0.0f)};
  for (int c = 0; c < 16; ++c)
    for (float dir : {-1.0f, 1.0f}) {
      float y = e2m1_to_float(static_cast<uint8_t>(c));
      for (int k = 0; k < 4; ++k, y = std::nextafter(y, dir * 10.0f))
        for (float uu : us)
          if (qmath::e2m1_round_stochastic(y, uu) != e2m1_round_stochastic(y, uu)) ++bad;
    }
  EXPECT_EQ(bad, 0);
}

// Every FP4 quantizer mode: format, element rounding, clipping.
struct Fp4Mode {
  Fp4Format f;
  Fp4Rounding r;
  Fp4Clip c;
};
const Fp4Mode kFp4Modes[] = {{Fp4Format::MXFP4, Fp4Rounding::Nearest, Fp4Clip::AbsMax},
                             {Fp4Format::MXFP4, Fp4Rounding::Nearest, Fp4Clip::Quest},
                             {Fp4Format::MXFP4, Fp4Rounding::Stochastic, Fp4Clip::AbsMax},
                             {Fp4Format::NVFP4, Fp4Rounding::Nearest, Fp4Clip::AbsMax},
                             {Fp4Format::NVFP4, Fp4Rounding::Stochastic, Fp4Clip::AbsMax},
                             {Fp4Format::MXFP4, Fp4Rounding::MsEden, Fp4Clip::AbsMax},
                             {Fp4Format::NVFP4, Fp4Rounding::MsEden, Fp4Clip::AbsMax}};

Fp4Options fp4_options(const Fp4Mode& m, uint64_t seed, uint64_t stream) {
  Fp4Options o;
  o.format = m.f;
  o.rounding = m.r;
  o.clip = m.c;
  o.seed = seed;
  o.stream = stream;
  return o;
}

// The per-group routine the FP4 kernel runs, executed on the host over every group, against
// quantize_fp4 (CPU) for each supported mode.
TEST(QuantizeDeviceMath, Fp4GroupRoutineReproducesCpuQuantizerBitForBit) {
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  for (const Shape& shape : {Shape{13, 77}, Shape{5, 3, 64}, Shape{1, 31}}) {
    const Tensor x = tricky_input(shape, rng);
    for (const Fp4Mode& m : kFp4Modes) {
      const Fp4Options o = fp4_options(m, seed, 3);
      SCOPED_TRACE(testing::Message() << "shape " << shape_str(shape) << " format " << int(m.f)
                                      << " rounding " << int(m.r) << " clip " << int(m.c)
                                      << " seed " << seed);
      const QuantizedFp4 ref = quantize_fp4(x, o);
      qmath::Fp4GroupRule rule;
      rule.mx = m.f == Fp4Format::MXFP4;
      rule.quest = m.c == Fp4Clip::Quest;
      rule.stochastic = m.r == Fp4Rounding::Stochastic;
      rule.no_clip_scale = m.r == Fp4Rounding::MsEden;
      rule.tensor_scale = ref.tensor_scale;
      rule.seed = o.seed;
      rule.stream = o.stream;
      const int64_t rows = ref.rows(), cols = ref.cols(), group = ref.group();
      const int64_t ngroups = (cols + group - 1) / group;
      Tensor codes = Tensor::empty(x.shape(), DType::U8), scales = Tensor::empty({rows, ngroups}, DType::U8);
      Tensor mask = Tensor::empty(x.shape(), DType::U8);
      const float* xs = x.data<float>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < ngroups; ++g) {
          const float* xr = xs + r * cols;
          auto load = [xr](int64_t c) { return xr[c]; };
          scales.data<uint8_t>()[r * ngroups + g] = qmath::fp4_quantize_group(
              load, g * group, std::min(cols, (g + 1) * group), static_cast<uint64_t>(r * cols), rule,
              codes.data<uint8_t>() + r * cols, rule.quest ? mask.data<uint8_t>() + r * cols : nullptr);
        }
      if (m.r == Fp4Rounding::MsEden) {  // the second pass, per correction block
        const int64_t per_block = o.eden_block / group;
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = xs + r * cols;
          auto load = [xr](int64_t c) { return xr[c]; };
          for (int64_t g0 = 0; g0 < ngroups; g0 += per_block)
            qmath::eden_correct_block(load, codes.data<uint8_t>() + r * cols, scales.data<uint8_t>(), r, g0,
                                      std::min(ngroups, g0 + per_block), group, cols, ngroups, rule.mx,
                                      rule.tensor_scale, o.seed, o.stream);
        }
      }
      EXPECT_TRUE(bytes_equal(codes, ref.codes, "codes", &x));
      EXPECT_TRUE(bytes_equal(scales, ref.scales, "scales"));
      if (rule.quest) {
        EXPECT_TRUE(bytes_equal(mask, ref.mask, "mask", &x));
      }
    }
  }
}

#ifdef LASP_HAVE_CUDA

// ---------------------------------------------------------------- GPU vs CPU

const Shape kShapes[] = {{1, 1}, {3, 17}, {37, 200}, {130, 129}, {2, 129, 300}, {256, 256}};
// Rows of whole FP4 groups (the tiled quantizer): one partial CTA of 128 groups; 12 CTAs, the
// last partial, rows straddling CTAs, MS-EDEN blocks (128 elements) not dividing a row; MS-EDEN
// blocks dividing the rows, the second of two CTAs partial (NVFP4) with a row across the CTA boundary.
const Shape kFp4TiledShapes[] = {{5, 96}, {300, 160}, {7, 384}};

// x on the GPU in `dtype`, starting one element past an aligned address (no 16-byte loads).
Tensor misaligned_cuda(const Tensor& x, DType dtype) {
  const int64_t n = x.numel();
  Tensor flat = Tensor::zeros({n + 1}, DType::F32);
  std::copy(x.data<float>(), x.data<float>() + n, flat.data<float>() + 1);
  return to_cuda(flat, dtype).slice(0, 1, n + 1).view(x.shape());
}

TEST(QuantizeGpu, Fp8CodesAndScalesMatchCpuForEveryScalingFormatAndInputDtype) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  for (const Shape& shape : kShapes) {
    const Tensor x = bf16_rounded(tricky_input(shape, rng));
    for (Fp8Format f : {Fp8Format::E4M3, Fp8Format::E5M2})
      for (Fp8Scaling s : {Fp8Scaling::PerTensor, Fp8Scaling::Block1x128, Fp8Scaling::Block128x128})
        for (DType in : {DType::F32, DType::BF16}) {
          SCOPED_TRACE(testing::Message() << "shape " << shape_str(shape) << " format " << int(f)
                                          << " scaling " << int(s) << " input " << dtype_name(in)
                                          << " seed " << seed);
          const QuantizedFp8 ref = quantize_fp8(x, f, s);
          const QuantizedFp8 q = quantize_fp8_cuda(to_cuda(x, in), f, s);
          EXPECT_EQ(q.format, f);
          EXPECT_EQ(q.scaling, s);
          EXPECT_TRUE(bytes_equal(q.codes, ref.codes, "codes", &x));
          EXPECT_TRUE(bytes_equal(q.scales, ref.scales, "scales"));
          // Dequantization: fp32 bit-exact; bf16 = the CPU value rounded once.
          const Tensor deq_ref = dequantize_fp8(ref);
          Tensor out = poisoned_cuda(shape, DType::F32);
          dequantize_fp8_cuda(out, q);
          EXPECT_TRUE(bytes_equal(out, deq_ref, "dequantized fp32"));
          Tensor out16 = poisoned_cuda(shape, DType::BF16);
          dequantize_fp8_cuda(out16, q);
          EXPECT_TRUE(bytes_equal(out16.to(lasp::cpu()).to(DType::F32), bf16_rounded(deq_ref),
                                  "dequantized bf16"));
        }
  }
}

// x^T zero-padded to ld columns (what transpose_pad_cuda writes), on the CPU.
Tensor transposed_padded(const Tensor& x, int64_t ld) {
  const int64_t rows = x.dim(0), cols = x.dim(1);
  Tensor t = Tensor::zeros({cols, ld}, DType::F32);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t.data<float>()[c * ld + r] = x.data<float>()[r * cols + c];
  return t;
}

// The one-pass block quantizer of x and x^T against the CPU quantizer of x and of the zero-padded
// transpose: partial tiles on both edges, x^T padded inside the last tile and by a whole extra
// tile, fp32 / bf16 / unaligned input, both formats, both block shapes, each output alone too.
TEST(QuantizeGpu, Fp8BlockRowsAndColsInOnePassEqualTheCpuOnXAndItsPaddedTranspose) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  const Shape shapes[] = {{1, 1}, {3, 17}, {37, 200}, {130, 129}, {256, 256}, {300, 384}};
  for (const Shape& shape : shapes) {
    const Tensor x = bf16_rounded(tricky_input(shape, rng));
    const int64_t rows = shape[0];
    for (const int64_t ld : {int64_t{0}, (rows + 15) / 16 * 16, rows + 130})
      for (Fp8Format f : {Fp8Format::E4M3, Fp8Format::E5M2})
        for (Fp8Scaling s : {Fp8Scaling::Block1x128, Fp8Scaling::Block128x128})
          for (int input = 0; input < 3; ++input) {
            SCOPED_TRACE(testing::Message()
                         << "shape " << shape_str(shape) << " ld " << ld << " format " << int(f)
                         << " scaling " << int(s) << " input " << input << " seed " << seed);
            const Tensor xg = input == 2 ? misaligned_cuda(x, DType::BF16)
                                         : to_cuda(x, input == 0 ? DType::F32 : DType::BF16);
            const QuantizedFp8 ref_rows = quantize_fp8(x, f, s);
            const QuantizedFp8 ref_cols =
                quantize_fp8(transposed_padded(x, ld == 0 ? rows : ld), f, s);
            const Fp8RowsCols both = quantize_fp8_block_rows_cols_cuda(xg, f, s, true, true, ld);
            EXPECT_EQ(both.rows.scaling, s);
            EXPECT_EQ(both.cols.format, f);
            EXPECT_TRUE(bytes_equal(both.rows.codes, ref_rows.codes, "rows codes", &x));
            EXPECT_TRUE(bytes_equal(both.rows.scales, ref_rows.scales, "rows scales"));
            EXPECT_TRUE(bytes_equal(both.cols.codes, ref_cols.codes, "cols codes"));
            EXPECT_TRUE(bytes_equal(both.cols.scales, ref_cols.scales, "cols scales"));
            if (input == 1) {
              const Fp8RowsCols r = quantize_fp8_block_rows_cols_cuda(xg, f, s, true, false, ld);
              const Fp8RowsCols c = quantize_fp8_block_rows_cols_cuda(xg, f, s, false, true, ld);
              EXPECT_FALSE(r.cols.codes.defined());
              EXPECT_FALSE(c.rows.codes.defined());
              EXPECT_TRUE(bytes_equal(r.rows.codes, ref_rows.codes, "rows codes alone", &x));
              EXPECT_TRUE(bytes_equal(r.rows.scales, ref_rows.scales, "rows scales alone"));
              EXPECT_TRUE(bytes_equal(c.cols.codes, ref_cols.codes, "cols codes alone"));
              EXPECT_TRUE(bytes_equal(c.cols.scales, ref_cols.scales, "cols scales alone"));
            }
          }
  }
  const Tensor x = Tensor::full({4, 32}, 1.0, DType::F32, cuda());
  EXPECT_THROW(
      quantize_fp8_block_rows_cols_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor, true, true),
      Error);
  EXPECT_THROW(
      quantize_fp8_block_rows_cols_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128, false, false),
      Error);
  EXPECT_THROW(
      quantize_fp8_block_rows_cols_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128, true, true, 3),
      Error)
      << "cols_ld below the rows of x";
}

// The same quantizer over more 128x128 tiles than CTAs resident on any GPU (785 tiles: its
// grid-stride loop, the next tile's prefetch and the double-buffered maxima), with scales outside
// the reciprocal's range (rows of 1e-30 and a whole 128-row tile of 1e30: x / s divides there).
TEST(QuantizeGpu, Fp8BlockRowsAndColsOverManyTilesAndExtremeScalesEqualTheCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  const int64_t rows = 20000, cols = 520;
  Tensor x = tricky_input({rows, cols}, rng);
  float* p = x.data<float>();
  for (int64_t r = 5000; r < 5011; ++r)
    for (int64_t c = 0; c < cols; ++c) p[r * cols + c] *= 1e-30f;
  for (int64_t r = 6016; r < 6144; ++r)
    for (int64_t c = 0; c < cols; ++c) p[r * cols + c] *= 1e30f;
  x = bf16_rounded(x);
  const Tensor xg = to_cuda(x, DType::BF16);
  for (Fp8Scaling s : {Fp8Scaling::Block1x128, Fp8Scaling::Block128x128}) {
    SCOPED_TRACE(testing::Message() << "scaling " << int(s) << " seed " << seed);
    const Fp8Format f = s == Fp8Scaling::Block1x128 ? Fp8Format::E5M2 : Fp8Format::E4M3;
    const QuantizedFp8 ref_rows = quantize_fp8(x, f, s);
    const QuantizedFp8 ref_cols = quantize_fp8(transposed_padded(x, rows), f, s);
    const Fp8RowsCols both = quantize_fp8_block_rows_cols_cuda(xg, f, s, true, true);
    EXPECT_TRUE(bytes_equal(both.rows.codes, ref_rows.codes, "rows codes", &x));
    EXPECT_TRUE(bytes_equal(both.rows.scales, ref_rows.scales, "rows scales"));
    EXPECT_TRUE(bytes_equal(both.cols.codes, ref_cols.codes, "cols codes"));
    EXPECT_TRUE(bytes_equal(both.cols.scales, ref_cols.scales, "cols scales"));
    const QuantizedFp8 rows_only = quantize_fp8_cuda(xg, f, s);  // the forward's x
    EXPECT_TRUE(bytes_equal(rows_only.codes, ref_rows.codes, "quantize_fp8_cuda codes", &x));
    EXPECT_TRUE(bytes_equal(rows_only.scales, ref_rows.scales, "quantize_fp8_cuda scales"));
  }
}

// The block quantizer's fast path (whole tiles, in-range scales) on every code, every midpoint
// between neighbours and the floats next to it, signed zeros and subnormals: fmax on each tile's
// diagonal makes every 1x128 row and column block, and every 128x128 tile, scale exactly 1, so
// those values reach the converter as they are.
TEST(QuantizeGpu, Fp8BlockFastPathEncodesEveryCodeAndMidpointLikeTheCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (Fp8Format f : {Fp8Format::E4M3, Fp8Format::E5M2}) {
    const float fmax = fp8_format_max(f);
    std::vector<float> v;
    for (int c = 0; c < 128; ++c) {
      const float a = fp8_decode(static_cast<uint8_t>(c), f), b = fp8_decode(static_cast<uint8_t>(c + 1), f);
      if (!std::isfinite(a) || a > fmax) continue;
      v.push_back(a);
      if (std::isfinite(b) && b > a && b <= fmax) {
        const float mid = 0.5f * (a + b);
        v.insert(v.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)});
      }
    }
    v.insert(v.end(), {1e-30f, 0.0f, 1e-40f});
    const size_t n = v.size();
    for (size_t i = 0; i < n; ++i) v.push_back(-v[i]);
    const int64_t rows = 256, cols = 384;  // 2 x 3 whole tiles
    Tensor x = Tensor::empty({rows, cols}, DType::F32);
    float* p = x.data<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        p[r * cols + c] = r % 128 == c % 128 ? fmax : v[static_cast<size_t>(r * 7 + c) % v.size()];
    for (Fp8Scaling s : {Fp8Scaling::Block1x128, Fp8Scaling::Block128x128}) {
      SCOPED_TRACE(testing::Message() << "format " << int(f) << " scaling " << int(s));
      const QuantizedFp8 ref_rows = quantize_fp8(x, f, s);
      const QuantizedFp8 ref_cols = quantize_fp8(transposed_padded(x, rows), f, s);
      for (float sc : ref_rows.scales.to_vector()) ASSERT_EQ(sc, 1.0f);  // the construction
      const Fp8RowsCols both = quantize_fp8_block_rows_cols_cuda(x.to(cuda()), f, s, true, true);
      EXPECT_TRUE(bytes_equal(both.rows.codes, ref_rows.codes, "rows codes", &x));
      EXPECT_TRUE(bytes_equal(both.cols.codes, ref_cols.codes, "cols codes"));
      EXPECT_TRUE(bytes_equal(both.cols.scales, ref_cols.scales, "cols scales"));
    }
  }
}

TEST(QuantizeGpu, Fp8DelayedScalingFollowsTheSameHistoryAsCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  AmaxHistory cpu_hist(3), gpu_hist(3);
  for (int step = 0; step < 6; ++step) {
    Tensor x = tricky_input({40, 96}, rng);
    if (step == 2) x.set_item(5, 1e4);  // an outlier: saturates now, widens the next scales
    const QuantizedFp8 ref = quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::PerTensor, &cpu_hist);
    const QuantizedFp8 q = quantize_fp8_cuda(x.to(cuda()), Fp8Format::E4M3, Fp8Scaling::PerTensor, &gpu_hist);
    EXPECT_TRUE(bytes_equal(q.codes, ref.codes, "codes", &x)) << "step " << step;
    EXPECT_TRUE(bytes_equal(q.scales, ref.scales, "scales")) << "step " << step;
    EXPECT_EQ(gpu_hist.amax(), cpu_hist.amax()) << "step " << step;
  }
}

TEST(QuantizeGpu, Fp8NonFiniteInputPoisonsTheScaleInsteadOfPassingSilently) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  Tensor x = Tensor::full({4, 32}, 1.0, DType::F32);
  x.set_item(7, std::nan(""));
  const QuantizedFp8 q = quantize_fp8_cuda(x.to(cuda()), Fp8Format::E4M3, Fp8Scaling::PerTensor);
  EXPECT_TRUE(std::isnan(q.scales.to_vector()[0])) << "per-tensor scale must be NaN for a NaN input";
  AmaxHistory hist(2);
  EXPECT_THROW(quantize_fp8_cuda(x.to(cuda()), Fp8Format::E4M3, Fp8Scaling::PerTensor, &hist), Error);
}

TEST(QuantizeGpu, Fp4CodesScalesMasksAndTensorScaleMatchCpuInEveryMode) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.insert(shapes.end(), std::begin(kFp4TiledShapes), std::end(kFp4TiledShapes));
  for (const Shape& shape : shapes) {
    const Tensor x = bf16_rounded(tricky_input(shape, rng));
    for (const Fp4Mode& m : kFp4Modes)
      for (DType in : {DType::F32, DType::BF16}) {
        const Fp4Options o = fp4_options(m, seed, 11);
        SCOPED_TRACE(testing::Message() << "shape " << shape_str(shape) << " format " << int(m.f)
                                        << " rounding " << int(m.r) << " clip " << int(m.c)
                                        << " input " << dtype_name(in) << " seed " << seed);
        const QuantizedFp4 ref = quantize_fp4(x, o);
        const QuantizedFp4 q = quantize_fp4_cuda(to_cuda(x, in), o);
        // The CUDA quantizer keeps the tensor scale on the GPU (no host synchronisation).
        EXPECT_EQ(q.tensor_scale, 1.0f);
        ASSERT_TRUE(q.tensor_scale_device.defined());
        EXPECT_EQ(qmath::float_bits(fp4_tensor_scale(q)), qmath::float_bits(ref.tensor_scale))
            << "tensor_scale gpu " << fp4_tensor_scale(q) << " cpu " << ref.tensor_scale;
        EXPECT_TRUE(bytes_equal(q.codes, ref.codes, "codes", &x));
        EXPECT_TRUE(bytes_equal(q.scales, ref.scales, "scales"));
        if (m.c == Fp4Clip::Quest) {
          EXPECT_TRUE(bytes_equal(q.mask, ref.mask, "mask", &x));
        }
        {  // the same input at an address that is not 16-byte aligned
          const QuantizedFp4 qm = quantize_fp4_cuda(misaligned_cuda(x, in), o);
          EXPECT_TRUE(bytes_equal(qm.codes, ref.codes, "codes (misaligned input)", &x));
          EXPECT_TRUE(bytes_equal(qm.scales, ref.scales, "scales (misaligned input)"));
          if (m.c == Fp4Clip::Quest) {
            EXPECT_TRUE(bytes_equal(qm.mask, ref.mask, "mask (misaligned input)", &x));
          }
        }
        for (bool with_ts : {true, false}) {
          Tensor out = poisoned_cuda(shape, DType::F32);
          dequantize_fp4_cuda(out, q, with_ts);
          EXPECT_TRUE(bytes_equal(out, dequantize_fp4(ref, with_ts), "dequantized")) << "with_ts " << with_ts;
          if (shape.size() == 2) {  // dequantized and transposed in one pass (the FP4 backward's operands)
            Tensor out_t = poisoned_cuda({shape[1], shape[0]}, DType::F32);
            dequantize_fp4_transposed_cuda(out_t, q, with_ts);
            EXPECT_TRUE(bytes_equal(out_t, dequantize_fp4(ref, with_ts).transpose(0, 1).contiguous(),
                                    "dequantized, transposed"))
                << "with_ts " << with_ts;
          }
        }
        // Without the tensor scale, bf16 holds every dequantized value exactly.
        Tensor out16 = poisoned_cuda(shape, DType::BF16);
        dequantize_fp4_cuda(out16, q, false);
        EXPECT_TRUE(bytes_equal(out16.to(lasp::cpu()).to(DType::F32), dequantize_fp4(ref, false),
                                "dequantized bf16 (exact)"));
      }
  }
}

// The rotation inside the quantizer (quantize_fp4_rotated_cuda) against the CPU's rotate-then-
// quantize, bit for bit: every fused block size (16..128), plain and randomized signs, every
// rounding, both formats, bf16 and fp32 inputs, aligned and misaligned; and problems it cannot
// fuse (rows not of whole MXFP4 groups, block 256), which take the unfused path, same results.
TEST(QuantizeGpu, Fp4RotatedQuantizationEqualsRotatingThenQuantizingOnTheCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  // {5, 96}: one partial tile; {300, 160}: 12 tiles, rows across tiles; {7, 384} and {33, 1024}:
  // blocks of 128 (MS-EDEN blocks of 128, as the backward uses them); {3, 48}: rows of 1.5 MXFP4
  // groups (unfused); {9, 256}: block 256 (unfused).
  const Shape shapes[] = {{5, 96}, {300, 160}, {7, 384}, {33, 1024}, {3, 48}, {9, 256}};
  for (const Shape& shape : shapes) {
    const Tensor x = bf16_rounded(tricky_input(shape, rng));
    for (int64_t block : {16, 32, 64, 128, 256}) {
      if (shape[1] % block != 0) continue;
      for (bool randomized : {false, true}) {
        const HadamardSpec spec{block, randomized, 0x5EEDull + seed};
        const Tensor rotated = hadamard_rotated(x, spec);
        for (const Fp4Mode& m : kFp4Modes) {
          for (DType in : {DType::BF16, DType::F32}) {
            Fp4Options o = fp4_options(m, seed, 5);
            o.eden_block = std::max<int64_t>(block, fp4_group_size(m.f));
            SCOPED_TRACE(testing::Message() << "shape " << shape_str(shape) << " block " << block << " randomized "
                                            << randomized << " format " << int(m.f) << " rounding " << int(m.r)
                                            << " input " << dtype_name(in) << " seed " << seed);
            const QuantizedFp4 ref = quantize_fp4(rotated, o);
            for (bool misaligned : {false, true}) {
              const Tensor xg = misaligned ? misaligned_cuda(x, in) : to_cuda(x, in);
              const QuantizedFp4 q = quantize_fp4_rotated_cuda(xg, spec, o);
              EXPECT_EQ(qmath::float_bits(fp4_tensor_scale(q)), qmath::float_bits(ref.tensor_scale))
                  << "misaligned " << misaligned;
              EXPECT_TRUE(bytes_equal(q.codes, ref.codes, "codes", &rotated)) << "misaligned " << misaligned;
              EXPECT_TRUE(bytes_equal(q.scales, ref.scales, "scales")) << "misaligned " << misaligned;
              if (m.c == Fp4Clip::Quest) {
                EXPECT_TRUE(bytes_equal(q.mask, ref.mask, "mask", &rotated));
              }
            }
          }
        }
      }
    }
  }
}

TEST(QuantizeGpu, Fp4StochasticRoundingDependsOnlyOnSeedStreamAndIndex) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  std::mt19937 rng(fresh_seed());
  const Tensor x = tricky_input({64, 96}, rng);
  Fp4Options o;
  o.rounding = Fp4Rounding::Stochastic;
  o.seed = 1234;
  const Tensor a = quantize_fp4_cuda(x.to(cuda()), o).codes.to(lasp::cpu());
  const Tensor b = quantize_fp4_cuda(x.to(cuda()), o).codes.to(lasp::cpu());
  EXPECT_TRUE(bytes_equal(a, b, "same seed twice"));
  o.seed = 1235;
  const Tensor c = quantize_fp4_cuda(x.to(cuda()), o).codes.to(lasp::cpu());
  EXPECT_FALSE(bytes_equal(c, a, "another seed")) << "a different seed must change some draws";
}

TEST(QuantizeGpu, UnsupportedModesFailAndNonFiniteInputsTurnNan) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const Tensor x = Tensor::full({4, 32}, 1.0, DType::F32, cuda());
  Fp4Options o;
  o.rounding = Fp4Rounding::MsEden;
  o.eden_block = 48;  // not a multiple of the MXFP4 group (32)
  EXPECT_THROW(quantize_fp4_cuda(x, o), Error);
  o.eden_block = 128;
  o.rounding = Fp4Rounding::Stochastic;
  o.clip = Fp4Clip::Quest;
  EXPECT_THROW(quantize_fp4_cuda(x, o), Error);
  // A non-finite input does not stop the quantizer (that would need a synchronisation): its
  // tensor scale is NaN, so every dequantized value and every GEMM output from it is NaN and the
  // training loop's non-finite check stops the run (the CPU function throws here).
  for (const float v : {INFINITY, -INFINITY, NAN}) {
    for (const Fp4Format f : {Fp4Format::MXFP4, Fp4Format::NVFP4}) {
      SCOPED_TRACE(testing::Message() << "value " << v << " format " << int(f));
      Tensor bad = Tensor::full({4, 32}, 1.0, DType::F32);
      bad.set_item(3, v);
      Fp4Options fo;
      fo.format = f;
      const QuantizedFp4 q = quantize_fp4_cuda(bad.to(cuda()), fo);
      EXPECT_TRUE(std::isnan(fp4_tensor_scale(q)));
      Tensor out = Tensor::zeros({4, 32}, DType::F32, cuda());
      dequantize_fp4_cuda(out, q, true);
      const std::vector<double> vals = out.to(lasp::cpu()).to_vector();
      EXPECT_TRUE(std::all_of(vals.begin(), vals.end(), [](double x) { return std::isnan(x); }));
      const QuantizedFp4 good = quantize_fp4_cuda(Tensor::full({2, 32}, 1.0, DType::F32, cuda()), fo);
      Tensor c = Tensor::zeros({4, 2}, DType::F32, cuda());
      gemm_fp4(c, q, good);
      const std::vector<double> cv = c.to(lasp::cpu()).to_vector();
      EXPECT_TRUE(std::all_of(cv.begin(), cv.end(), [](double x) { return std::isnan(x); }));
    }
  }
  EXPECT_THROW(quantize_fp8_cuda(Tensor::full({4, 32}, 1.0, DType::F32), Fp8Format::E4M3,
                                 Fp8Scaling::PerTensor),
               Error)
      << "CPU tensors must be refused";
  AmaxHistory hist;
  EXPECT_THROW(quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128, &hist), Error);
}

#endif  // LASP_HAVE_CUDA

}  // namespace
}  // namespace lasp
