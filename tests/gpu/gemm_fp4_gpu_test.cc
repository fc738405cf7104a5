// gemm_fp4 on CUDA against the exact CPU emulation, whichever path the device takes (native FP4
// tensor cores on sm_100+, the bf16 emulation on Hopper), and the native operand layout built on
// the device against the CPU's bytes (runs on any GPU, so Hopper checks the layout kernels too).
//
// Tolerances (relative Frobenius error): fp32 C 1e-5 (every product is exact; only the fp32 sum
// order differs), bf16 C 8e-3 (one rounding of the result).
#include <gtest/gtest.h>

#include <random>

#include "core/device.h"
#include "kernels/gemm_fp4.h"
#include "kernels/quantize.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

using gpu_test::fresh_seed;
using gpu_test::poisoned_cuda;
using gpu_test::random_bf16_values;
using gpu_test::rel_error;

QuantizedFp4 on_cuda(const QuantizedFp4& q) {
  QuantizedFp4 d = q;
  d.codes = q.codes.to(cuda());
  d.scales = q.scales.to(cuda());
  return d;
}

struct Problem {
  int64_t m, n, k;
};

// gemm_fp4 on CUDA equals the CPU emulation for MXFP4 and NVFP4, RTN and SR, odd shapes.
void check_against_cpu(const char* path_env) {
  testing::ScopedEnv env("LASP_FP4_GEMM", path_env);
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  for (const Problem& p : {Problem{1, 1, 32}, Problem{17, 33, 96}, Problem{100, 64, 256},
                           Problem{3, 200, 50}, Problem{256, 384, 1024}})
    for (Fp4Format f : {Fp4Format::MXFP4, Fp4Format::NVFP4})
      for (Fp4Rounding r : {Fp4Rounding::Nearest, Fp4Rounding::Stochastic}) {
        SCOPED_TRACE(::testing::Message() << "path " << (path_env ? path_env : "auto") << " M="
                                          << p.m << " N=" << p.n << " K=" << p.k << " format "
                                          << int(f) << " rounding " << int(r) << " seed " << seed);
        Fp4Options o;
        o.format = f;
        o.rounding = r;
        o.seed = seed;
        const QuantizedFp4 a = quantize_fp4(random_bf16_values({p.m, p.k}, rng), o);
        o.stream = 1;
        const QuantizedFp4 b = quantize_fp4(random_bf16_values({p.n, p.k}, rng, 0.1), o);
        Tensor ref = Tensor::empty({p.m, p.n}, DType::F32);
        gemm_fp4_emulated(ref, a, b);
        const QuantizedFp4 da = on_cuda(a), db = on_cuda(b);
        Tensor out = poisoned_cuda({p.m, p.n}, DType::F32);
        gemm_fp4(out, da, db);
        EXPECT_LT(rel_error(out, ref), 1e-5);
        Tensor out16 = poisoned_cuda({p.m, p.n}, DType::BF16);
        gemm_fp4(out16, da, db);
        EXPECT_LT(rel_error(out16, ref), 8e-3);
      }
}

TEST(GemmFp4Gpu, DefaultPathMatchesTheCpuEmulation) {
  LASP_SKIP_WITHOUT_GPU();
  const int64_t fallbacks = gemm_fp4_fallback_count();
  check_against_cpu(nullptr);
  // On sm_100+ the default is the native path, and it must not have fallen back.
  EXPECT_EQ(gemm_fp4_fallback_count(), fallbacks);
}

TEST(GemmFp4Gpu, ForcedEmulationMatchesTheCpuEmulation) {
  LASP_SKIP_WITHOUT_GPU();
  check_against_cpu("emulated");
}

TEST(GemmFp4Gpu, NativePathMatchesTheCpuEmulationOnFp4TensorCores) {
  LASP_SKIP_WITHOUT_GPU();
  if (!fp4_native_supported(cuda())) GTEST_SKIP() << "no FP4 tensor cores (needs sm_100 or later)";
  check_against_cpu("native");
}

TEST(GemmFp4Gpu, NativeRequestWithoutFp4TensorCoresFailsClearly) {
  LASP_SKIP_WITHOUT_GPU();
  if (fp4_native_supported(cuda())) GTEST_SKIP() << "this GPU has FP4 tensor cores";
  testing::ScopedEnv env("LASP_FP4_GEMM", "native");
  std::mt19937 rng(1);
  const QuantizedFp4 a = on_cuda(quantize_mxfp4(random_bf16_values({4, 64}, rng)));
  Tensor out = poisoned_cuda({4, 4}, DType::F32);
  try {
    gemm_fp4(out, a, a);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no FP4 tensor cores"), std::string::npos) << e.what();
  }
}

// The packing and tiling kernels give the CPU's bytes, padding included.
TEST(Fp4NativeOperandGpu, PackedCodesAndTiledScalesEqualTheCpuBytes) {
  LASP_SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  std::mt19937 rng(seed);
  for (const Problem& p :
       {Problem{1, 0, 1}, Problem{17, 0, 96}, Problem{130, 0, 50}, Problem{300, 0, 333}})
    for (Fp4Format f : {Fp4Format::MXFP4, Fp4Format::NVFP4}) {
      SCOPED_TRACE(::testing::Message()
                   << "rows " << p.m << " K " << p.k << " format " << int(f) << " seed " << seed);
      Fp4Options o;
      o.format = f;
      o.rounding = Fp4Rounding::Stochastic;
      o.seed = seed;
      const QuantizedFp4 q = quantize_fp4(random_bf16_values({p.m, p.k}, rng), o);
      const Fp4NativeOperand ref = fp4_native_operand(q);
      const Fp4NativeOperand got = fp4_native_operand(on_cuda(q));
      ASSERT_TRUE(got.packed.is_cuda() && got.scales.is_cuda());
      EXPECT_EQ(got.rows_padded, ref.rows_padded);
      EXPECT_EQ(got.k_padded, ref.k_padded);
      EXPECT_EQ(got.packed.to(cpu()).to_vector(), ref.packed.to_vector());
      EXPECT_EQ(got.scales.to(cpu()).to_vector(), ref.scales.to_vector());
    }
}

}  // namespace
}  // namespace lasp
