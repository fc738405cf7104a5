// FP8 GEMM (cuBLASLt, and lasp's own sm_90 kernel) against gemm_fp8_emulated (CPU, fp32) on the
// same quantized operands (the FP4 GEMMs: gemm_fp4_gpu_test.cc).
// Tolerances (relative Frobenius error vs the fp32 reference):
//   fp8, fp32 C: 5e-4 — every fp8 product is exact in fp32, but Hopper's FP8 MMA keeps partial
//     sums with fewer bits than fp32 between promotions to the fp32 accumulator (fast
//     accumulation off); a plain fp32 summation-order difference alone would be ~1e-6;
//   fast accumulation: 5e-3 (no promotion: the partial-sum precision loss compounds over K);
//     lasp's kernel promoting every 3 blocks of 128: 2e-3;
//   bf16 C: 8e-3 — one bf16 rounding of the result dominates.
// Every case prints its shapes, formats and scalings; gemm_fp8_fallback_count() tells whether
// cuBLASLt ran the block-scaled problem itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/gemm_fp8.h"
#include "kernels/gemm_fp8_tiles.h"
#include "kernels/quantize.h"
#include "tests/gpu/gpu_test_util.h"

#ifdef LASP_HAVE_CUDA
#include "kernels/quantize_cuda.h"
#endif

namespace lasp {
namespace {

using namespace gpu_test;

TEST(GemmFp8Cpu, CpuTensorsRunTheExactEmulationWithAlphaAndBeta) {
  std::mt19937 rng(fresh_seed());
  const Tensor x = random_bf16_values({9, 48}, rng), w = random_bf16_values({16, 48}, rng);
  const QuantizedFp8 a = quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::Block1x128);
  const QuantizedFp8 b = quantize_fp8(w, Fp8Format::E4M3, Fp8Scaling::Block128x128);
  Tensor ref = Tensor::empty({9, 16}, DType::F32);
  gemm_fp8_emulated(ref, a, b);
  const Tensor c0 = random_bf16_values({9, 16}, rng);
  Tensor c = c0.clone();
  gemm_fp8(c, a, b, 0.5f, 2.0f);
  for (int64_t i = 0; i < c.numel(); ++i)
    EXPECT_FLOAT_EQ(static_cast<float>(c.item(i)),
                    0.5f * static_cast<float>(ref.item(i)) + 2.0f * static_cast<float>(c0.item(i)));
}

// LASP_FP8_GEMM picks the kernel of gemm_fp8: unset / auto -> Auto, cublaslt -> cuBLASLt, lasp
// -> ours; anything else is an error that names the variable and the choices.
TEST(GemmFp8Cpu, KernelChoiceFromTheEnvironment) {
  const char* old = std::getenv("LASP_FP8_GEMM");
  const std::string saved = old ? old : "";
  unsetenv("LASP_FP8_GEMM");
  EXPECT_EQ(fp8_gemm_backend_from_env(), Fp8GemmBackend::Auto);
  setenv("LASP_FP8_GEMM", "auto", 1);
  EXPECT_EQ(fp8_gemm_backend_from_env(), Fp8GemmBackend::Auto);
  setenv("LASP_FP8_GEMM", "cublaslt", 1);
  EXPECT_EQ(fp8_gemm_backend_from_env(), Fp8GemmBackend::CublasLt);
  setenv("LASP_FP8_GEMM", "lasp", 1);
  EXPECT_EQ(fp8_gemm_backend_from_env(), Fp8GemmBackend::Lasp);
  setenv("LASP_FP8_GEMM", "cutlass", 1);
  try {
    (void)fp8_gemm_backend_from_env();
    ADD_FAILURE() << "LASP_FP8_GEMM=cutlass was accepted";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("LASP_FP8_GEMM=cutlass"), std::string::npos) << what;
    EXPECT_NE(what.find("lasp"), std::string::npos) << what;
  }
  if (old) {
    setenv("LASP_FP8_GEMM", saved.c_str(), 1);
  } else {
    unsetenv("LASP_FP8_GEMM");
  }
}

// Auto's rule: our kernel only where it was measured at least as fast (scalings it takes, bf16
// C, beta = 0, K <= 4096, N <= 8192); everything else stays on cuBLASLt.
TEST(GemmFp8Cpu, AutoPrefersOurKernelOnlyWhereItWasMeasuredFaster) {
  const Fp8Scaling t = Fp8Scaling::PerTensor, v = Fp8Scaling::Block1x128,
                   b = Fp8Scaling::Block128x128;
  EXPECT_TRUE(fp8_auto_prefers_lasp(2048, 2048, t, t, true, 0.0f));
  EXPECT_TRUE(fp8_auto_prefers_lasp(2048, 4096, t, t, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 4112, t, t, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 8192, t, t, true, 0.0f));
  EXPECT_TRUE(fp8_auto_prefers_lasp(8192, 2048, t, t, true, 0.0f));     // the MLP up projection
  EXPECT_FALSE(fp8_auto_prefers_lasp(8208, 2048, t, t, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(128256, 2048, t, t, true, 0.0f));  // the LM head
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 2048, t, t, false, 0.0f));  // fp32 C
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 2048, t, t, true, 1.0f));   // beta != 0
  // Block scaling: activations / gradients 1x128 times weights 128x128 (the projections'
  // forward and dgrad) by the same rule, not K > 4096; a 1x128 B (the weight gradient's x^T,
  // which our kernel takes but ran slower) never.
  EXPECT_TRUE(fp8_auto_prefers_lasp(2048, 2048, v, b, true, 0.0f));
  EXPECT_TRUE(fp8_auto_prefers_lasp(2048, 2048, b, b, true, 0.0f));
  EXPECT_TRUE(fp8_auto_prefers_lasp(2048, 2048, v, t, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 8192, v, b, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 2048, v, b, false, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 2048, v, v, true, 0.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 16384, v, v, false, 1.0f));
  EXPECT_FALSE(fp8_auto_prefers_lasp(2048, 2048, t, v, true, 0.0f));
}

// Our FP8 kernel's tile walk (kernels/gemm_fp8_tiles.h, the code the kernel runs), on the host:
// every tile exactly once, rotated or not, and the narrow-edge rule and its load balance.
TEST(GemmFp8Cpu, TileWalkCoversEveryTileOnceAndSpreadsTheNarrowColumn) {
  using fp8tiles::tile_rc;
  for (const int tiles_m : {1, 2, 7, 17, 128})
    for (const int tiles_n : {1, 2, 3, 11, 16, 43})
      for (const bool rotate : {false, true}) {
        std::vector<int> seen(static_cast<size_t>(tiles_m * tiles_n), 0);
        for (int t = 0; t < tiles_m * tiles_n; ++t) {
          const fp8tiles::TileRC rc = tile_rc(t, tiles_n, rotate);
          ASSERT_TRUE(rc.row >= 0 && rc.row < tiles_m && rc.col >= 0 && rc.col < tiles_n)
              << "tile " << t << " of " << tiles_m << " x " << tiles_n << " -> (" << rc.row << ", "
              << rc.col << ")";
          ++seen[static_cast<size_t>(rc.row * tiles_n + rc.col)];
        }
        for (int i = 0; i < tiles_m * tiles_n; ++i)
          ASSERT_EQ(seen[static_cast<size_t>(i)], 1)
              << "tile (" << i / tiles_n << ", " << i % tiles_n << ") of " << tiles_m << " x "
              << tiles_n << (rotate ? " rotated" : "");
      }
  // 192-wide tiles leave a narrow last column where N mod 192 is 1 .. 128; tiles of 128 never do.
  EXPECT_TRUE(fp8tiles::narrow_edge(2048, 192));  // 10 x 192 + 128
  EXPECT_TRUE(fp8tiles::narrow_edge(200, 192));
  EXPECT_TRUE(fp8tiles::narrow_edge(48, 192));
  EXPECT_TRUE(fp8tiles::narrow_edge(320, 192));    // 192 + 128
  EXPECT_FALSE(fp8tiles::narrow_edge(336, 192));   // 192 + 144
  EXPECT_FALSE(fp8tiles::narrow_edge(2112, 192));  // 11 x 192
  EXPECT_FALSE(fp8tiles::narrow_edge(2048 + 64, 128));
  // The o-proj (M = 16384, N = 2048: 128 x 11 tiles) on 132 SMs, in thirds of a full tile's
  // tensor-core time (full 3, narrow 2): without the rotation the busiest CTAs run 11 full tiles,
  // with it 10 full and one narrow.
  auto busiest = [](int tiles_m, int tiles_n, int grid, bool rotate) {
    int worst = 0;
    for (int cta = 0; cta < grid; ++cta) {
      int load = 0;
      for (int t = cta; t < tiles_m * tiles_n; t += grid)
        load += tile_rc(t, tiles_n, rotate).col == tiles_n - 1 ? 2 : 3;
      worst = std::max(worst, load);
    }
    return worst;
  };
  EXPECT_EQ(busiest(128, 11, 132, false), 33);
  EXPECT_EQ(busiest(128, 11, 132, true), 32);
}

#ifdef LASP_HAVE_CUDA

QuantizedFp8 to_device(const QuantizedFp8& q) {
  QuantizedFp8 d = q;
  d.codes = q.codes.to(cuda());
  d.scales = q.scales.to(cuda());
  return d;
}

struct Fp8Case {
  int64_t m, n, k;
};

// One GEMM: CPU-quantized operands copied to the GPU (identical codes), compared with the CPU.
// varied_blocks: x's K blocks of 128 and w's 128 x 128 blocks also differ in magnitude (powers
// of two from 2^-6 to 2^6), so a block factor applied to the wrong K block, row or column block
// shows as an O(1) error.
void check_fp8(const Fp8Case& g, Fp8Format fa, Fp8Format fb, Fp8Scaling sa, Fp8Scaling sb,
               DType cdt, float alpha, float beta, bool fast, double tol,
               Fp8GemmBackend backend = Fp8GemmBackend::CublasLt, Fp8KernelConfig cfg = {},
               bool varied_blocks = false) {
  const uint32_t seed = fresh_seed();
  const int64_t fallbacks_before = gemm_fp8_fallback_count();
  SCOPED_TRACE(
      testing::Message() << "M=" << g.m << " N=" << g.n << " K=" << g.k << " A "
                         << (fa == Fp8Format::E4M3 ? "e4m3 " : "e5m2 ") << fp8_scaling_name(sa)
                         << " B " << (fb == Fp8Format::E4M3 ? "e4m3 " : "e5m2 ")
                         << fp8_scaling_name(sb) << " C " << dtype_name(cdt) << " alpha=" << alpha
                         << " beta=" << beta << " fast_accum=" << fast
                         << " kernel=" << (backend == Fp8GemmBackend::Lasp ? "lasp" : "cublaslt")
                         << " tile_n=" << cfg.tile_n << " promote_every=" << cfg.promote_every
                         << " stagger=" << cfg.stagger << " tma_store=" << cfg.tma_store
                         << " narrow_edge=" << cfg.narrow_edge << " varied_blocks=" << varied_blocks
                         << " seed=" << seed);
  std::mt19937 rng(seed);
  // Rows of very different magnitude, so block scales matter.
  Tensor x = random_bf16_values({g.m, g.k}, rng), w = random_bf16_values({g.n, g.k}, rng, 0.05);
  for (int64_t i = 0; i < x.numel(); ++i)
    if ((i / g.k) % 3 == 1) x.set_item(i, x.item(i) * 100.0);
  if (varied_blocks) {
    for (int64_t i = 0; i < x.numel(); ++i)
      x.set_item(i, std::ldexp(x.item(i), static_cast<int>((i % g.k) / 128 * 5 % 7) - 3));
    // w: by 128 x 128 block, and by row within it (a 1x128 B's factor per column of C).
    for (int64_t i = 0; i < w.numel(); ++i) {
      const int64_t row = i / g.k, rb = row / 128, kb = (i % g.k) / 128;
      const int e = static_cast<int>((3 * rb + kb) % 7 + (row * 5 + kb) % 3) - 4;
      w.set_item(i, std::ldexp(w.item(i), e));
    }
  }
  const QuantizedFp8 a = quantize_fp8(x, fa, sa), b = quantize_fp8(w, fb, sb);
  const Tensor c0 = random_bf16_values({g.m, g.n}, rng);
  Tensor ref = Tensor::empty({g.m, g.n}, DType::F32);
  gemm_fp8_emulated(ref, a, b);
  {
    float* r = ref.data<float>();
    for (int64_t i = 0; i < ref.numel(); ++i)
      r[i] = alpha * r[i] + beta * static_cast<float>(c0.item(i));
  }
  Tensor out = beta == 0.0f ? poisoned_cuda({g.m, g.n}, cdt) : to_cuda(c0, cdt);
  gemm_fp8_with(out, to_device(a), to_device(b), alpha, beta, fast, backend, cfg);
  const std::vector<double> got = out.to_vector();
  EXPECT_EQ(count_non_finite(got), 0) << "unwritten or non-finite outputs";
  const double err = rel_error(got, ref.to_vector());
  EXPECT_LT(err, tol) << "relative error " << err << "; fallbacks in this call: "
                      << gemm_fp8_fallback_count() - fallbacks_before;
}

const Fp8Case kCases[] = {{16, 16, 16},    {1, 32, 64},     {17, 48, 144}, {100, 272, 128},
                          {257, 128, 384}, {128, 256, 512}, {64, 16, 1024}};

TEST(GemmFp8Gpu, PerTensorE4M3MatchesEmulationForFp32AndBf16OutputAndRaggedM) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const auto& g : kCases) {
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::F32, 1.0f, 0.0f, false, 5e-4);
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::BF16, 1.0f, 0.0f, false, 8e-3);
  }
}

TEST(GemmFp8Gpu, GradientFormatsE5M2TimesE4M3InBothOperandOrders) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const auto& g : kCases) {
    check_fp8(g, Fp8Format::E5M2, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::F32, 1.0f, 0.0f, false, 5e-4);
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E5M2, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::BF16, 1.0f, 0.0f, false, 8e-3);
  }
}

TEST(GemmFp8Gpu, AlphaBetaAndFastAccumulation) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const auto& g : kCases) {
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::F32, 0.5f, 1.0f, false, 5e-4);
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::BF16, -2.0f, 0.25f, false, 8e-3);
    check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor, Fp8Scaling::PerTensor,
              DType::F32, 1.0f, 0.0f, true, 5e-3);
  }
}

TEST(GemmFp8Gpu, BlockScalingEveryCombinationMatchesEmulation) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const Fp8Scaling kAll[] = {Fp8Scaling::PerTensor, Fp8Scaling::Block1x128,
                             Fp8Scaling::Block128x128};
  for (const auto& g : kCases)
    for (Fp8Scaling sa : kAll)
      for (Fp8Scaling sb : kAll) {
        if (sa == Fp8Scaling::PerTensor && sb == Fp8Scaling::PerTensor) continue;
        check_fp8(g, Fp8Format::E4M3, Fp8Format::E4M3, sa, sb, DType::F32, 1.0f, 0.0f, false, 5e-4);
        check_fp8(g, Fp8Format::E5M2, Fp8Format::E4M3, sa, sb, DType::BF16, 0.5f, 1.0f, false,
                  8e-3);
      }
}

// With K a multiple of 128 the block-scaled problems must run inside cuBLASLt on sm_90 (the
// fallback is exact but ~10x slower); ragged K is reported, not required.
TEST(GemmFp8Gpu, BlockScaledProblemsRunInCublasLtNotTheFallback) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const int64_t before = gemm_fp8_fallback_count();
  check_fp8({256, 256, 512}, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::Block1x128,
            Fp8Scaling::Block128x128, DType::BF16, 1.0f, 0.0f, false, 8e-3);
  check_fp8({256, 256, 512}, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::Block1x128,
            Fp8Scaling::Block1x128, DType::F32, 1.0f, 0.0f, false, 5e-4);
  EXPECT_EQ(gemm_fp8_fallback_count() - before, 0)
      << "cuBLASLt refused 1x128 / 128x128 block scaling here (see the warning above)";
  const int64_t mid = gemm_fp8_fallback_count();
  check_fp8({64, 48, 144}, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::Block1x128,
            Fp8Scaling::Block128x128, DType::F32, 1.0f, 0.0f, false, 5e-4);
  std::printf("[ info ] block scaling with K = 144 (ragged last block): %s\n",
              gemm_fp8_fallback_count() == mid ? "cuBLASLt" : "fallback");
}

TEST(GemmFp8Gpu, GpuQuantizedOperandsGiveTheSameProductAsCpuQuantized) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  std::mt19937 rng(fresh_seed());
  const Tensor x = random_bf16_values({200, 256}, rng),
               w = random_bf16_values({96, 256}, rng, 0.02);
  const QuantizedFp8 a =
      quantize_fp8_cuda(x.to(DType::BF16).to(cuda()), Fp8Format::E4M3, Fp8Scaling::Block1x128);
  const QuantizedFp8 b = quantize_fp8_cuda(w.to(cuda()), Fp8Format::E4M3, Fp8Scaling::Block128x128);
  Tensor ref = Tensor::empty({200, 96}, DType::F32);
  gemm_fp8_emulated(ref, quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::Block1x128),
                    quantize_fp8(w, Fp8Format::E4M3, Fp8Scaling::Block128x128));
  Tensor out = poisoned_cuda({200, 96}, DType::F32);
  gemm_fp8(out, a, b);
  EXPECT_LT(rel_error(out, ref), 5e-4);
}

TEST(GemmFp8Gpu, ViolationsOfCublasLtLimitsFailWithAClearError) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  auto q = [](int64_t r, int64_t k, Fp8Format f, Fp8Scaling s = Fp8Scaling::PerTensor) {
    return quantize_fp8_cuda(Tensor::full({r, k}, 0.5, DType::F32, cuda()), f, s);
  };
  const Fp8Format e4 = Fp8Format::E4M3, e5 = Fp8Format::E5M2;
  auto expect_error = [](const std::function<void()>& fn, const char* must_mention) {
    try {
      fn();
      ADD_FAILURE() << "expected an error mentioning '" << must_mention << "'";
    } catch (const Error& e) {
      std::printf("[ info ] %s\n", e.what());
      EXPECT_NE(std::string(e.what()).find(must_mention), std::string::npos) << e.what();
    }
  };
  Tensor c = Tensor::zeros({32, 32}, DType::F32, cuda());
  expect_error(
      [&] {
        gemm_fp8_with(c, q(32, 32, e5), q(32, 32, e5), 1.0f, 0.0f, false, Fp8GemmBackend::CublasLt);
      },
      "E5M2 x E5M2");
  expect_error(
      [&] { gemm_fp8(c, q(32, 32, e4, Fp8Scaling::Block1x128), q(32, 32, e4), 1.0f, 0.0f, true); },
      "fast accumulation");
  Tensor wrong = Tensor::zeros({31, 32}, DType::F32, cuda());
  expect_error([&] { gemm_fp8(wrong, q(32, 32, e4), q(32, 32, e4)); }, "[32, 32]");
  Tensor c64 = Tensor::zeros({32, 32}, DType::F64, cuda());
  expect_error([&] { gemm_fp8(c64, q(32, 32, e4), q(32, 32, e4)); }, "bf16/fp32");
}

// cuBLASLt FP8 wants M, N, K multiples of 16: other shapes run on zero-padded copies.
TEST(GemmFp8Gpu, RaggedMNAndKRunOnPaddedCopiesAndMatchTheEmulation) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  check_fp8({37, 24, 40}, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::PerTensor,
            Fp8Scaling::PerTensor, DType::F32, 1.0f, 0.0f, false, 5e-4);
  check_fp8({5, 17, 200}, Fp8Format::E5M2, Fp8Format::E4M3, Fp8Scaling::PerTensor,
            Fp8Scaling::PerTensor, DType::BF16, 0.5f, 1.0f, false, 8e-3);
  check_fp8({33, 40, 136}, Fp8Format::E4M3, Fp8Format::E4M3, Fp8Scaling::Block1x128,
            Fp8Scaling::Block128x128, DType::F32, 1.0f, 1.0f, false, 5e-4);
}

// ---- lasp's own kernel (kernels/gemm_fp8_sm90.cu) ------------------------------------------
// The small cases above plus problems with more tiles than SMs (the persistent loop's later
// tiles), K not a multiple of 128 (TMA's zero fill), M and N off the 128 x BN tile (the TMA
// stores must drop what lies outside C), both tile widths, promotion every block and every
// third, staggered consumers and the TMA-store epilogue, every format pair (E5M2 x E5M2 too,
// which cuBLASLt lacks), both C types, alpha and beta. With 192-wide tiles, N = 16 .. 128 is one
// narrow tile, N = 200 and 272 end in one (8 and 80 columns, the latter starting at an odd
// multiple of 64), N = 384 has none, and kLaspLarge (10 full columns and one of 128, 187 tiles)
// has CTAs walking rotated columns; it runs a subset of the configurations (its CPU reference is
// most of the test's time).
const Fp8Case kLaspCases[] = {{16, 16, 16},    {1, 32, 64},      {17, 48, 144},   {100, 272, 128},
                              {257, 128, 384}, {300, 200, 1040}, {129, 384, 4096}};
const Fp8Case kLaspLarge = {2053, 2048, 512};

TEST(GemmFp8LaspGpu, EveryFormatTileAndPromotionIntervalMatchesEmulation) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  if (!gemm_fp8_lasp_available())
    GTEST_SKIP() << "lasp's FP8 kernel needs an sm_90 GPU and sm_90a code";
  using F = Fp8Format;
  const Fp8Scaling t = Fp8Scaling::PerTensor;
  const Fp8GemmBackend lasp = Fp8GemmBackend::Lasp;
  // {tile_n, promote_every, stagger, tma_store, narrow_edge}; the TMA-store epilogue
  // runs on the bf16, beta = 0 checks (the others store from registers); narrow_edge is on unless
  // 0.
  const Fp8KernelConfig kConfigs[] = {{128, 1, 0, 0},      {192, 1, 0, 0},   {128, 3, 0, 0},
                                      {192, 3, 0, 0},      {192, 1, 1, 0},   {192, 1, 0, 1},
                                      {128, 1, 1, 1},      {192, 3, 1, 1},   {192, 1, -1, -1},
                                      {192, 1, -1, -1, 0}, {192, 3, 1, 1, 0}};
  auto five = [&](const Fp8Case& g, const Fp8KernelConfig& cfg) {
    const double tol32 = cfg.promote_every == 1 ? 5e-4 : 2e-3;
    check_fp8(g, F::E4M3, F::E4M3, t, t, DType::F32, 1.0f, 0.0f, false, tol32, lasp, cfg);
    check_fp8(g, F::E4M3, F::E4M3, t, t, DType::BF16, 1.0f, 0.0f, false, 8e-3, lasp, cfg);
    check_fp8(g, F::E5M2, F::E4M3, t, t, DType::F32, 0.5f, 1.0f, false, tol32, lasp, cfg);
    check_fp8(g, F::E4M3, F::E5M2, t, t, DType::BF16, -2.0f, 0.25f, false, 8e-3, lasp, cfg);
    check_fp8(g, F::E5M2, F::E5M2, t, t, DType::F32, 1.0f, 0.0f, false, tol32, lasp, cfg);
  };
  for (const auto& g : kLaspCases)
    for (const Fp8KernelConfig& cfg : kConfigs) five(g, cfg);
  // The large shape: the defaults, the narrow edge off, tiles of 128, promotion every third.
  for (const Fp8KernelConfig& cfg : {Fp8KernelConfig{}, Fp8KernelConfig{192, 1, -1, -1, 0},
                                     Fp8KernelConfig{128, 1, 1, 1}, Fp8KernelConfig{192, 3, 1, 1}})
    five(kLaspLarge, cfg);
  for (const auto& g : kLaspCases)
    check_fp8(g, F::E4M3, F::E4M3, t, t, DType::F32, 1.0f, 0.0f, true, 5e-3, lasp);
  check_fp8(kLaspLarge, F::E4M3, F::E4M3, t, t, DType::F32, 1.0f, 0.0f, true, 5e-3, lasp);
}

// Block scaling in our kernel: A per tensor, 1x128 or 128x128 times B per tensor, 128x128 or
// 1x128 (a factor per column of C, staged by TMA), over the shapes above (ragged K: the last
// block's factor; tiles of 192 that straddle two of B's 128-row blocks, at either offset; rows and
// blocks past M and N), both tile widths, both epilogues, the gradient formats, alpha and beta,
// with block magnitudes spread over 2^-7 .. 2^7 (B's also by row) and rows 100x apart. The
// per-tensor x per-tensor case stays on the per-tensor kernel (the test above).
TEST(GemmFp8LaspGpu, BlockScalingMatchesEmulationForEveryScalingItTakes) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  if (!gemm_fp8_lasp_available())
    GTEST_SKIP() << "lasp's FP8 kernel needs an sm_90 GPU and sm_90a code";
  using F = Fp8Format;
  const Fp8Scaling t = Fp8Scaling::PerTensor, v = Fp8Scaling::Block1x128,
                   b = Fp8Scaling::Block128x128;
  const std::pair<Fp8Scaling, Fp8Scaling> kScalings[] = {{v, b}, {b, b}, {v, t}, {t, b},
                                                          {b, t}, {v, v}, {t, v}, {b, v}};
  const Fp8KernelConfig kConfigs[] = {{128, 1, 0, 0}, {192, 1, 1, 0}, {192, 1, -1, -1}};
  const Fp8GemmBackend lasp = Fp8GemmBackend::Lasp;
  const int64_t before = gemm_fp8_lasp_launches();
  int gemms = 0;
  auto three = [&](const Fp8Case& g, Fp8Scaling sa, Fp8Scaling sb, const Fp8KernelConfig& cfg) {
    check_fp8(g, F::E4M3, F::E4M3, sa, sb, DType::F32, 1.0f, 0.0f, false, 5e-4, lasp, cfg, true);
    check_fp8(g, F::E5M2, F::E4M3, sa, sb, DType::BF16, 1.0f, 0.0f, false, 8e-3, lasp, cfg, true);
    check_fp8(g, F::E4M3, F::E5M2, sa, sb, DType::F32, 0.5f, 1.0f, false, 5e-4, lasp, cfg, true);
    gemms += 3;
  };
  // N = 272: tiles of 192 at n0 = 0 and 192 (B blocks split at column 128 and 64); K = 144, 1040:
  // a ragged last block; 129 x 384 x 4096: 32 K blocks.
  const Fp8Case kBlockCases[] = {
      {16, 16, 16}, {17, 48, 144}, {100, 272, 128}, {300, 200, 1040}, {129, 384, 4096}};
  for (const auto& g : kBlockCases)
    for (const auto& [sa, sb] : kScalings)
      for (const Fp8KernelConfig& cfg : kConfigs) three(g, sa, sb, cfg);
  // More tiles than SMs (each CTA's later tiles reload their factors), the projections' scalings
  // and the weight gradient's.
  three(kLaspLarge, v, b, {});
  three(kLaspLarge, v, b, {192, 1, -1, -1, 0});
  three(kLaspLarge, v, v, {});
  three(kLaspLarge, v, v, {128, 1, -1, -1});
  EXPECT_EQ(gemm_fp8_lasp_launches() - before, gemms) << "every block-scaled GEMM ran our kernel";
}

// Block factors change every 128 of K, so our kernel must promote after every K block: a longer
// promotion interval or fast accumulation with block scales is an error, not a silent wrong sum.
TEST(GemmFp8LaspGpu, BlockScalingRejectsFastAccumulationAndLongerPromotion) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  if (!gemm_fp8_lasp_available())
    GTEST_SKIP() << "lasp's FP8 kernel needs an sm_90 GPU and sm_90a code";
  auto q = [](int64_t r, int64_t k, Fp8Scaling s) {
    return quantize_fp8_cuda(Tensor::full({r, k}, 0.5, DType::F32, cuda()), Fp8Format::E4M3, s);
  };
  Tensor c = Tensor::zeros({32, 32}, DType::BF16, cuda());
  const QuantizedFp8 a = q(32, 256, Fp8Scaling::Block1x128),
                     b = q(32, 256, Fp8Scaling::Block128x128);
  for (const int promote : {2, 4}) {
    try {
      gemm_fp8_with(c, a, b, 1.0f, 0.0f, false, Fp8GemmBackend::Lasp, {192, promote, -1, -1});
      ADD_FAILURE() << "promote_every " << promote << " was accepted with block scaling";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("promote_every"), std::string::npos) << e.what();
    }
  }
  try {
    gemm_fp8_with(c, a, b, 1.0f, 0.0f, true, Fp8GemmBackend::Lasp);
    ADD_FAILURE() << "fast accumulation was accepted with block scaling";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fast accumulation"), std::string::npos) << e.what();
  }
}

// Auto (gemm_fp8's default) sends a per-tensor, bf16-out, beta = 0, K <= 4096 problem to our
// kernel on a GPU that has it, and a fp32-out one to cuBLASLt; both match the emulation.
TEST(GemmFp8LaspGpu, AutoRunsOurKernelExactlyWhereItsRuleSays) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  using F = Fp8Format;
  const Fp8Scaling t = Fp8Scaling::PerTensor;
  const Fp8GemmBackend automatic = Fp8GemmBackend::Auto;
  const int64_t before = gemm_fp8_lasp_launches();
  check_fp8({300, 200, 1040}, F::E4M3, F::E4M3, t, t, DType::BF16, 1.0f, 0.0f, false, 8e-3,
            automatic);
  EXPECT_EQ(gemm_fp8_lasp_launches() - before, gemm_fp8_lasp_available() ? 1 : 0);
  const int64_t mid = gemm_fp8_lasp_launches();
  check_fp8({300, 200, 1040}, F::E4M3, F::E4M3, t, t, DType::F32, 1.0f, 0.0f, false, 5e-4,
            automatic);
  check_fp8({64, 128, 8192}, F::E4M3, F::E4M3, t, t, DType::BF16, 1.0f, 0.0f, false, 8e-3,
            automatic);
  check_fp8({64, 8320, 256}, F::E4M3, F::E4M3, t, t, DType::BF16, 1.0f, 0.0f, false, 8e-3,
            automatic);
  EXPECT_EQ(gemm_fp8_lasp_launches(), mid) << "fp32 C, K = 8192 and N = 8320 stay on cuBLASLt";
  // Block scaling: x 1x128 times W 128x128 (the projections' forward) follows the same rule;
  // a 1x128 B (the weight gradient's x^T, fp32 C accumulating) stays on cuBLASLt.
  const Fp8Scaling v = Fp8Scaling::Block1x128, b = Fp8Scaling::Block128x128;
  const int64_t blk = gemm_fp8_lasp_launches();
  check_fp8({300, 200, 1040}, F::E4M3, F::E4M3, v, b, DType::BF16, 1.0f, 0.0f, false, 8e-3,
            automatic);
  const bool takes = gemm_fp8_lasp_available() && fp8_auto_prefers_lasp(200, 1040, v, b, true, 0.0f);
  EXPECT_EQ(gemm_fp8_lasp_launches() - blk, takes ? 1 : 0);
  const int64_t wgrad = gemm_fp8_lasp_launches();
  check_fp8({300, 200, 1040}, F::E5M2, F::E4M3, v, v, DType::F32, 1.0f, 1.0f, false, 5e-4,
            automatic);
  EXPECT_EQ(gemm_fp8_lasp_launches() - wgrad, 0) << "a 1x128 B stays on cuBLASLt";
}

// Promotion is what keeps long sums accurate: on all-positive data (every partial sum grows) at
// K = 8192, promoting every block of 128 must stay near fp32 (cuBLASLt: 6e-4 in
// docs/fp8_gpu.md), and accumulating all of K in the tensor cores must be clearly worse (3-13%
// measured); a kernel that silently skipped promotion fails the first bound.
TEST(GemmFp8LaspGpu, PromotionKeepsLongPositiveSumsAccurate) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  if (!gemm_fp8_lasp_available())
    GTEST_SKIP() << "lasp's FP8 kernel needs an sm_90 GPU and sm_90a code";
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  const int64_t m = 64, n = 256, k = 8192;
  Tensor x = random_bf16_values({m, k}, rng), w = random_bf16_values({n, k}, rng, 0.02);
  for (int64_t i = 0; i < x.numel(); ++i) x.set_item(i, std::fabs(x.item(i)));
  for (int64_t i = 0; i < w.numel(); ++i) w.set_item(i, std::fabs(w.item(i)));
  const QuantizedFp8 a = quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
  const QuantizedFp8 b = quantize_fp8(w, Fp8Format::E4M3, Fp8Scaling::PerTensor);
  Tensor ref = Tensor::empty({m, n}, DType::F32);
  gemm_fp8_emulated(ref, a, b);
  auto error_of = [&](bool fast) {
    Tensor out = poisoned_cuda({m, n}, DType::F32);
    gemm_fp8_with(out, to_device(a), to_device(b), 1.0f, 0.0f, fast, Fp8GemmBackend::Lasp);
    return rel_error(out.to_vector(), ref.to_vector());
  };
  const double promoted = error_of(false), fast = error_of(true);
  std::printf(
      "[ info ] K = 8192 all-positive, seed %u: promote every 128 %.2e, fast accumulation %.2e\n",
      seed, promoted, fast);
  EXPECT_LT(promoted, 1.5e-3);
  EXPECT_GT(fast, 3.0 * promoted);
}

#endif  // LASP_HAVE_CUDA

}  // namespace
}  // namespace lasp
