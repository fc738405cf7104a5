// The FP8 LM head + cross-entropy on CUDA (precision.lm_head = fp8) against its CPU emulation on
// the same (bf16-representable) inputs, as tests/gpu/projection_gpu_test.cc does for the
// projections. Both round the logits and the dlogits to bf16 and quantize the same values; they
// differ by fp32 summation order and exp/log rounding (GPU __expf vs CPU double), so now and then
// a value next to a bf16 or E5M2 rounding boundary takes the neighbouring code.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/lm_head.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;

struct HeadCase {
  int64_t N, C, V, chunk;
};

Tensor random_targets(int64_t N, int64_t V, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> pick(0, V - 1);
  std::vector<double> t(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    t[static_cast<size_t>(i)] = (i % 7 == 3) ? -1.0 : static_cast<double>(pick(rng));
  return Tensor::from_values(t, {N}, DType::I32);
}

std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

TEST(LmHeadFp8Gpu, LossAndGradientsMatchTheCpuEmulation) {
  LASP_SKIP_WITHOUT_GPU();
  for (const HeadCase c :
       {HeadCase{300, 64, 1000, 128}, HeadCase{37, 40, 1003, 16}, HeadCase{1, 48, 512, 64}}) {
    for (DType h_dt : {DType::BF16, DType::F32})
      for (DType w_dt : {DType::BF16, DType::F32}) {
        const uint32_t seed = fresh_seed();
        std::mt19937 rng(seed);
        SCOPED_TRACE("seed " + std::to_string(seed) + " N=" + std::to_string(c.N) +
                     " C=" + std::to_string(c.C) + " V=" + std::to_string(c.V) + " chunk=" +
                     std::to_string(c.chunk) + " h=" + dtype_name(h_dt) + " w=" + dtype_name(w_dt));
        const Tensor h = random_bf16_values({c.N, c.C}, rng, 1.0);
        const Tensor w = random_bf16_values({c.V, c.C}, rng, 0.05);
        const Tensor dw0 = random_bf16_values({c.V, c.C}, rng, 1e-3);
        const Tensor targets = random_targets(c.N, c.V, rng);
        const float loss_scale = 0.5f;

        Tensor dh_ref = Tensor::empty({c.N, c.C}, DType::F32), dw_ref = dw0.clone();
        const double loss_ref = lm_head_cross_entropy(dh_ref, dw_ref, h, w, targets, loss_scale,
                                                      c.chunk, LmHeadPrecision::Fp8);

        Tensor dh = poisoned_cuda({c.N, c.C}, h_dt), dw = to_cuda(dw0, DType::F32);
        const Tensor gh = to_cuda(h, h_dt), gw = to_cuda(w, w_dt), gt = targets.to(cuda());
        const double loss =
            lm_head_cross_entropy(dh, dw, gh, gw, gt, loss_scale, c.chunk, LmHeadPrecision::Fp8);
        const double e_dh = rel_error(dh.to(cpu()).to_vector(), dh_ref.to_vector());
        const double e_dw = rel_error(minus(dw.to(cpu()).to_vector(), dw0.to_vector()),
                                      minus(dw_ref.to_vector(), dw0.to_vector()));
        std::printf(
            "[lm_head fp8 gpu vs cpu] N=%lld V=%lld h=%s w=%s: loss %.3e, d_h %.3e, d_w %.3e\n",
            static_cast<long long>(c.N), static_cast<long long>(c.V), dtype_name(h_dt),
            dtype_name(w_dt), std::fabs(loss - loss_ref) / std::fabs(loss_ref), e_dh, e_dw);
        EXPECT_NEAR(loss, loss_ref, 1e-4 * std::fabs(loss_ref));
        EXPECT_LT(e_dh, 1e-2);
        EXPECT_LT(e_dw, 1e-2);

        Tensor none_h, none_w;
        const double loss_only = lm_head_cross_entropy(none_h, none_w, gh, gw, gt, loss_scale,
                                                       c.chunk, LmHeadPrecision::Fp8);
        EXPECT_NEAR(loss_only, loss, 1e-9 * std::fabs(loss));
      }
  }
}

TEST(LmHeadFp8Gpu, StaysCloseToTheBf16HeadAtAVocabularyOf32000WithSeveralChunks) {
  LASP_SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const int64_t N = 2500, C = 512, V = 32000, chunk = 1024;
  const Tensor h = to_cuda(random_bf16_values({N, C}, rng, 1.0), DType::BF16);
  const Tensor w = to_cuda(random_bf16_values({V, C}, rng, 0.04), DType::BF16);
  const Tensor t = random_targets(N, V, rng).to(cuda());
  Tensor dh8 = poisoned_cuda({N, C}, DType::BF16), dw8 = Tensor::zeros({V, C}, DType::F32, cuda());
  Tensor dh = poisoned_cuda({N, C}, DType::BF16), dw = Tensor::zeros({V, C}, DType::F32, cuda());
  const double loss8 =
      lm_head_cross_entropy(dh8, dw8, h, w, t, 1.0f / N, chunk, LmHeadPrecision::Fp8);
  const double loss =
      lm_head_cross_entropy(dh, dw, h, w, t, 1.0f / N, chunk, LmHeadPrecision::Full);
  const double e_dh = rel_error(dh8, dh), e_dw = rel_error(dw8, dw);
  std::printf("[lm_head fp8 vs bf16, V=32000] loss %.6f vs %.6f, d_h %.3e, d_w %.3e\n", loss8 / N,
              loss / N, e_dh, e_dw);
  EXPECT_NEAR(loss8, loss, 0.01 * std::fabs(loss));
  EXPECT_LT(e_dh, 0.15);
  EXPECT_LT(e_dw, 0.15);
}

}  // namespace
}  // namespace lasp
