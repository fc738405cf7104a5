// The native FP4 operand layout (kernels/gemm_fp4.h) that cuBLASLt's block-scaled FP4 GEMM reads
// on sm_100, checked on the CPU: scale offsets against positions worked out by hand from the
// cuBLAS "1D block scaling factors layout" (128 x 4 tiles, K-direction tiles fastest, row r and
// column c of a tile at 16 (r % 32) + 4 (r / 32) + c), the nibble order against cuda_fp4.h's own
// __nv_fp4x2_e2m1, and the packed + tiled operands of odd shapes against the exact emulation
// through a GEMM that reads them by that layout alone. Plus gemm_fp4's CPU dispatch and errors.
#include "kernels/gemm_fp4.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/check.h"
#include "kernels/quantize.h"
#include "tests/test_util.h"

#ifdef LASP_HAVE_CUDA
#include <cuda_fp4.h>
#endif

namespace lasp {
namespace {

using testing::expect_error;
using testing::ScopedEnv;

Tensor random_f32(const Shape& shape, std::mt19937& rng, double stddev) {
  std::normal_distribution<float> n(0.0f, static_cast<float>(stddev));
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = n(rng);
  return t;
}

double rel_error(const Tensor& out, const Tensor& ref) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double d = out.item(i) - ref.item(i);
    num += d * d;
    den += ref.item(i) * ref.item(i);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(Fp4NativeLayout, ScaleOffsetsAreTheCublasTiledPositions) {
  // One tile row of 4 group columns (a [128, 4] scale matrix): the tile's 512 bytes.
  EXPECT_EQ(fp4_scale_tile_offset(0, 0, 4), 0);
  EXPECT_EQ(fp4_scale_tile_offset(0, 1, 4), 1);
  EXPECT_EQ(fp4_scale_tile_offset(0, 3, 4), 3);
  EXPECT_EQ(fp4_scale_tile_offset(1, 0, 4), 16);  // the next row of a 32-row band: +16
  EXPECT_EQ(fp4_scale_tile_offset(31, 0, 4), 496);
  EXPECT_EQ(fp4_scale_tile_offset(32, 0, 4), 4);  // the next 32-row band: +4
  EXPECT_EQ(fp4_scale_tile_offset(33, 2, 4), 22);
  EXPECT_EQ(fp4_scale_tile_offset(64, 0, 4), 8);
  EXPECT_EQ(fp4_scale_tile_offset(96, 1, 4), 13);
  EXPECT_EQ(fp4_scale_tile_offset(127, 3, 4), 511);
  // Two tiles per tile row (8 group columns): the K direction is the faster one.
  EXPECT_EQ(fp4_scale_tile_offset(0, 4, 8), 512);
  EXPECT_EQ(fp4_scale_tile_offset(5, 6, 8), 512 + 5 * 16 + 2);
  EXPECT_EQ(fp4_scale_tile_offset(128, 0, 8), 1024);
  EXPECT_EQ(fp4_scale_tile_offset(130, 5, 8), 3 * 512 + 2 * 16 + 1);
  EXPECT_EQ(fp4_scale_tile_offset(255, 7, 8), 4 * 512 - 1);
  // A bijection from [rows, cols] onto [0, rows * cols) for whole tiles.
  const int64_t rows = 384, cols = 12;
  std::set<int64_t> seen;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t o = fp4_scale_tile_offset(r, c, cols);
      ASSERT_GE(o, 0);
      ASSERT_LT(o, rows * cols);
      seen.insert(o);
    }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), rows * cols);
}

// Every pair of E2M1 values packs into the byte cuda_fp4.h's __nv_fp4x2_e2m1 stores for (x, y):
// element 2j in the low nibble.
TEST(Fp4NativeLayout, PackedBytesHoldTheEvenElementInTheLowNibble) {
  const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  std::vector<float> values;
  for (float g : grid) {
    values.push_back(g);
    values.push_back(-g);
  }
  const int64_t pairs = static_cast<int64_t>(values.size() * values.size());
  Tensor x = Tensor::empty({1, 2 * pairs}, DType::F32);
  for (size_t i = 0; i < values.size(); ++i)
    for (size_t j = 0; j < values.size(); ++j) {
      x.data<float>()[2 * (i * values.size() + j)] = values[i];
      x.data<float>()[2 * (i * values.size() + j) + 1] = values[j];
    }
  // amax 6 gives the MXFP4 scale 1 (E8M0 floor of 6 / 6... = 2^0): every value is its own code.
  const QuantizedFp4 q = quantize_mxfp4(x);
  ASSERT_EQ(q.scale(0, 0), 1.0f);
  const Fp4NativeOperand n = fp4_native_operand(q);
  ASSERT_EQ(n.packed.dim(1), n.k_padded / 2);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t byte = n.packed.data<uint8_t>()[p];
    const float lo = x.data<float>()[2 * p], hi = x.data<float>()[2 * p + 1];
    EXPECT_EQ(e2m1_to_float(byte & 0xF), lo) << "pair " << p;
    EXPECT_EQ(e2m1_to_float(byte >> 4), hi) << "pair " << p;
#ifdef LASP_HAVE_CUDA
    const __nv_fp4x2_e2m1 ref(float2{lo, hi});
    // -0 and +0 are both zero: compare values, then the byte where no zero is involved.
    if (lo != 0.0f && hi != 0.0f) {
      EXPECT_EQ(byte, static_cast<uint8_t>(ref.__x)) << lo << ", " << hi;
    }
#endif
  }
}

// The packed codes and tiled scales of odd shapes, read back through the layout alone, give the
// exact emulation's product; padding is zero.
TEST(Fp4NativeLayout, NativeOperandsOfOddShapesReproduceTheEmulatedGemm) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 rng(seed);
  struct Shape3 {
    int64_t m, n, k;
  };
  for (const Shape3 s :
       {Shape3{1, 1, 1}, Shape3{17, 33, 96}, Shape3{130, 5, 50}, Shape3{3, 141, 300}})
    for (Fp4Format f : {Fp4Format::MXFP4, Fp4Format::NVFP4})
      for (Fp4Rounding r : {Fp4Rounding::Nearest, Fp4Rounding::Stochastic}) {
        SCOPED_TRACE(::testing::Message()
                     << "M " << s.m << " N " << s.n << " K " << s.k << " format " << int(f)
                     << " rounding " << int(r) << " seed " << seed);
        Fp4Options o;
        o.format = f;
        o.rounding = r;
        o.seed = seed;
        const QuantizedFp4 a = quantize_fp4(random_f32({s.m, s.k}, rng, 1.0), o);
        o.stream = 1;
        const QuantizedFp4 b = quantize_fp4(random_f32({s.n, s.k}, rng, 0.05), o);
        Tensor ref = Tensor::empty({s.m, s.n}, DType::F32);
        gemm_fp4_emulated(ref, a, b);
        const Fp4NativeOperand na = fp4_native_operand(a), nb = fp4_native_operand(b);
        EXPECT_EQ(na.rows_padded % kFp4NativeRowAlign, 0);
        EXPECT_EQ(na.k_padded % kFp4NativeKAlign, 0);
        EXPECT_GE(na.k_padded, s.k);
        Tensor out = Tensor::full({s.m, s.n}, std::nan(""), DType::F32);
        gemm_fp4_native_reference(out, na, nb);
        EXPECT_LT(rel_error(out, ref), 1e-6);
        // Nothing but the matrix itself is non-zero: padded rows, K and scale slots hold zeros.
        const int64_t groups = (s.k + a.group() - 1) / a.group();
        for (int64_t row = 0; row < na.rows_padded; ++row)
          for (int64_t j = 0; j < na.k_padded / 2; ++j)
            if (row >= s.m || 2 * j >= s.k) {
              ASSERT_EQ(na.packed.data<uint8_t>()[row * na.k_padded / 2 + j], 0);
            }
        int64_t nonzero_in = 0, nonzero_out = 0;
        for (int64_t i = 0; i < a.scales.numel(); ++i)
          nonzero_in += a.scales.data<uint8_t>()[i] != 0;
        for (int64_t i = 0; i < na.scales.numel(); ++i)
          nonzero_out += na.scales.data<uint8_t>()[i] != 0;
        EXPECT_EQ(nonzero_out, nonzero_in);
        EXPECT_EQ(na.scales.numel(),
                  (na.rows_padded + 127) / 128 * 128 * (na.k_padded / a.group()));
        EXPECT_GE(na.k_padded / a.group(), groups);
      }
}

TEST(Fp4NativeLayout, ExplicitPaddingIsHonouredAndBadPaddingRefused) {
  std::mt19937 rng(3);
  const QuantizedFp4 q = quantize_nvfp4(random_f32({20, 40}, rng, 1.0));
  const Fp4NativeOperand n = fp4_native_operand(q, 64, 256);
  EXPECT_EQ(n.packed.dim(0), 64);
  EXPECT_EQ(n.packed.dim(1), 128);
  EXPECT_EQ(n.scales.numel(), 128 * (256 / 16));
  expect_error([&] { fp4_native_operand(q, 24, 128); },
               {"fp4_native_operand", "multiples of [16, 128]"});
  expect_error([&] { fp4_native_operand(q, 16, 128); },
               {"fp4_native_operand", "must cover [20, 40]"});
  QuantizedFp4 bad = q;
  bad.scales = Tensor::zeros({20, 2}, DType::U8);
  expect_error([&] { fp4_native_operand(bad); }, {"scales must be contiguous uint8 [20, 3]"});
}

TEST(GemmFp4, CpuOperandsRunTheEmulationAndNativeIsRefused) {
  std::mt19937 rng(5);
  const QuantizedFp4 a = quantize_mxfp4(random_f32({9, 64}, rng, 1.0));
  const QuantizedFp4 b = quantize_mxfp4(random_f32({7, 64}, rng, 1.0));
  Tensor ref = Tensor::empty({9, 7}, DType::F32),
         out = Tensor::full({9, 7}, std::nan(""), DType::F32);
  gemm_fp4_emulated(ref, a, b);
  {
    ScopedEnv env("LASP_FP4_GEMM", nullptr);
    gemm_fp4(out, a, b);
    for (int64_t i = 0; i < ref.numel(); ++i) ASSERT_EQ(out.item(i), ref.item(i));
    EXPECT_FALSE(fp4_native_supported(cpu()));
  }
  {
    ScopedEnv env("LASP_FP4_GEMM", "native");
    expect_error([&] { gemm_fp4(out, a, b); }, {"LASP_FP4_GEMM=native", "no FP4 tensor cores"});
  }
  {
    ScopedEnv env("LASP_FP4_GEMM", "fast");
    expect_error([&] { gemm_fp4(out, a, b); },
                 {"LASP_FP4_GEMM=fast", "expected auto, native or emulated"});
  }
  const QuantizedFp4 nv = quantize_nvfp4(random_f32({7, 64}, rng, 1.0));
  expect_error([&] { gemm_fp4(out, a, nv); }, {"different FP4 formats"});
}

}  // namespace
}  // namespace lasp
