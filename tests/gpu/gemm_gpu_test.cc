// GPU GEMM (cuBLASLt) against the CPU GEMM (OpenBLAS, fp32) on the same bf16-rounded inputs.
// Thresholds (relative Frobenius error):
//   bf16 operands, fp32 out: 1e-5 — products of bf16 values are exact in fp32, only the fp32
//     summation order differs;
//   bf16 out: 8e-3 — one bf16 rounding of the result (2^-9 relative, ~0.4% rms at worst);
//   fp32 operands: 1e-5 — full fp32 (TF32 would give ~1e-3, so this also checks TF32 is off).
#include <gtest/gtest.h>

#include "kernels/gemm.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;

struct GemmCase {
  int64_t m, n, k;
  bool ta, tb;
};

// device_scalars: the GPU side through gemm_cuda_device_alpha, alpha and beta from device memory.
void check_gemm(const GemmCase& gc, DType ab, DType cdt, float alpha, float beta, double tol,
                bool device_scalars = false) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(testing::Message() << "m=" << gc.m << " n=" << gc.n << " k=" << gc.k << " ta=" << gc.ta
                                  << " tb=" << gc.tb << " " << dtype_name(ab) << "->" << dtype_name(cdt)
                                  << " alpha=" << alpha << " beta=" << beta << " seed=" << seed
                                  << (device_scalars ? " (device scalars)" : ""));
  std::mt19937 rng(seed);
  Tensor a = random_bf16_values(gc.ta ? Shape{gc.k, gc.m} : Shape{gc.m, gc.k}, rng);
  Tensor b = random_bf16_values(gc.tb ? Shape{gc.n, gc.k} : Shape{gc.k, gc.n}, rng);
  Tensor c0 = random_bf16_values({gc.m, gc.n}, rng);

  Tensor ref = c0.clone();
  gemm(ref, a, gc.ta, b, gc.tb, alpha, beta);

  Tensor ga = to_cuda(a, ab), gb = to_cuda(b, ab);
  Tensor gc_out = beta == 0.0f ? poisoned_cuda({gc.m, gc.n}, cdt) : to_cuda(c0, cdt);
  if (device_scalars) {
    Tensor scalars = Tensor::empty({2}, DType::F32);
    scalars.set_item(0, alpha);
    scalars.set_item(1, beta);
    gemm_cuda_device_alpha(gc_out, ga, gc.ta, gb, gc.tb, scalars.to(cuda()), beta != 0.0f);
  } else {
    gemm(gc_out, ga, gc.ta, gb, gc.tb, alpha, beta);
  }
  const std::vector<double> out = gc_out.to_vector();
  EXPECT_EQ(count_non_finite(out), 0) << "unwritten or non-finite outputs";
  EXPECT_LT(rel_error(out, ref.to_vector()), tol);
}

const GemmCase kCases[] = {
    {1, 1, 1, false, false},     {17, 33, 65, false, false}, {100, 257, 64, false, true},
    {257, 100, 96, true, false}, {64, 48, 130, true, true},  {128, 256, 512, false, true},
    {3, 1000, 40, false, false},
};

TEST(GemmGpu, Bf16OperandsWithFp32OutputMatchCpuForAllTransposesAndOddSizes) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : kCases) check_gemm(c, DType::BF16, DType::F32, 1.0f, 0.0f, 1e-5);
}

TEST(GemmGpu, Bf16OutputMatchesCpuWithinOneBf16Rounding) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : kCases) check_gemm(c, DType::BF16, DType::BF16, 1.0f, 0.0f, 8e-3);
}

// gemm_cuda_device_alpha: alpha and beta read from device memory (cuBLASLt's device pointer
// mode) give what gemm() gives with the same host values, the CPU's product within the dtype's
// tolerance, with and without accumulation into C.
TEST(GemmGpu, DeviceAlphaAndBetaMatchCpu) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : kCases) {
    for (const auto& [alpha, beta] : {std::pair<float, float>{0.37f, 0.0f}, {-1.5f, 0.75f}}) {
      check_gemm(c, DType::BF16, DType::F32, alpha, beta, 1e-5, true);
      check_gemm(c, DType::BF16, DType::BF16, alpha, beta, 8e-3, true);
    }
  }
}

TEST(GemmGpu, AlphaAndBetaScaleAndAccumulateIntoC) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : kCases) {
    check_gemm(c, DType::BF16, DType::F32, 0.5f, 1.0f, 1e-5);
    check_gemm(c, DType::BF16, DType::BF16, -2.0f, 0.25f, 8e-3);
  }
}

TEST(GemmGpu, Fp32GemmIsFullPrecisionNotTf32) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : kCases) check_gemm(c, DType::F32, DType::F32, 1.0f, 0.0f, 1e-5);
  // Operands that are not bf16-representable: TF32 (10 mantissa bits) would miss by ~1e-3.
  std::mt19937 rng(fresh_seed());
  Tensor a = random_uniform({96, 200}, rng, -1, 1), b = random_uniform({200, 80}, rng, -1, 1);
  Tensor ref = Tensor::empty({96, 80}, DType::F32);
  gemm(ref, a, false, b, false);
  Tensor out = poisoned_cuda({96, 80}, DType::F32);
  gemm(out, a.to(cuda()), false, b.to(cuda()), false);
  EXPECT_LT(rel_error(out, ref), 1e-5);
}

TEST(GemmGpu, KZeroScalesCByBeta) {
  LASP_SKIP_WITHOUT_GPU();
  std::mt19937 rng(fresh_seed());
  Tensor c0 = random_bf16_values({5, 7}, rng);
  Tensor c = c0.to(cuda());
  gemm(c, Tensor::empty({5, 0}, DType::F32, cuda()), false, Tensor::empty({0, 7}, DType::F32, cuda()),
       false, 1.0f, 0.5f);
  const auto out = c.to_vector(), in = c0.to_vector();
  for (size_t i = 0; i < out.size(); ++i) EXPECT_DOUBLE_EQ(out[i], 0.5 * in[i]);
}

TEST(GemmGpu, RejectsMixedOrUnsupportedDtypesWithAClearError) {
  LASP_SKIP_WITHOUT_GPU();
  Tensor a = Tensor::zeros({4, 4}, DType::BF16, cuda()), b = Tensor::zeros({4, 4}, DType::F32, cuda());
  Tensor c = Tensor::zeros({4, 4}, DType::F32, cuda());
  EXPECT_THROW(gemm(c, a, false, b, false), Error);
  Tensor c64 = Tensor::zeros({4, 4}, DType::F64, cuda());
  Tensor a32 = Tensor::zeros({4, 4}, DType::F32, cuda());
  EXPECT_THROW(gemm(c64, a32, false, a32, false), Error);
}

}  // namespace
}  // namespace lasp
