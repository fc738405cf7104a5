// CUDA softmax attention (kernels/attention.cu) against the CPU implementation (itself tested
// against naive float64 references in tests/attention_test.cc), run in float64 on the same
// bf16-rounded inputs. Fresh random inputs per run (seed printed on failure); causal and not,
// grouped-query heads, q_offset (positive: a rank's queries after gathered keys; negative: rows
// that see no key), T = 1, T = 300 and sizes that are not multiples of the 64-row tiles;
// NaN-poisoned outputs; the backward on a key subset with the global o and lse (ring attention).
//
// Thresholds (relative Frobenius error ||gpu - cpu|| / ||cpu||):
//   o                 2e-2  (P rounded to bf16 before P V, o rounded to bf16: each <= 2^-9)
//   dq, dk, dv        3e-2  (P and dS rounded to bf16 before the products, outputs rounded),
//                     with ||cpu|| floored at 1e-3 sqrt(n): a gradient that vanishes in exact
//                     arithmetic (one visible key: dS = P (dP - Dr) = 0) is rounding noise in
//                     both implementations (~1e-6 on the GPU, ~1e-17 on the CPU)
//   lse               |gpu - cpu| <= 1e-4 (1 + |cpu|) per row: fp32 scores of bf16 inputs; rows
//                     without a visible key must be -inf in both
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "kernels/attention.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;
using namespace attn_test;

constexpr double kTolO = 2e-2, kTolGrad = 3e-2, kTolLse = 1e-4;

const AttnCase kCases[] = {
    {2, 1, 1, 2, 2, 64, true, 0},        // T = 1 (dq = dk = 0 in exact arithmetic)
    {1, 1, 300, 2, 1, 64, true, 299},    // one query (decoding) against 300 keys
    {1, 300, 300, 4, 2, 64, true, 0},    // T = 300, GQA 2:1
    {2, 300, 300, 2, 2, 128, false, 0},  // non-causal
    {1, 77, 300, 4, 1, 128, true, 223},  // last rank of a gathered sequence, MQA
    {1, 100, 200, 2, 2, 64, true, 50},   // queries in the middle of the keys
    {1, 130, 130, 3, 1, 64, true, -70},  // the first 70 rows see no key
    {1, 129, 64, 3, 3, 128, false, 0},   // more queries than keys
    {2, 257, 257, 6, 2, 128, true, 0},   // GQA 3:1, odd length
};


void expect_close(const Tensor& gpu, const Tensor& ref, double tol, const char* what) {
  const std::vector<double> out = gpu.to_vector();
  EXPECT_EQ(count_non_finite(out), 0) << what << ": unwritten or non-finite outputs";
  EXPECT_LT(rel_error(out, ref.to_vector()), tol) << what;
}

void expect_grad_close(const Tensor& gpu, const Tensor& ref, const char* what) {
  const std::vector<double> out = gpu.to_vector(), r = ref.to_vector();
  ASSERT_EQ(out.size(), r.size());
  EXPECT_EQ(count_non_finite(out), 0) << what << ": unwritten or non-finite outputs";
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (out[i] - r[i]) * (out[i] - r[i]);
    den += r[i] * r[i];
  }
  const double floor = 1e-3 * std::sqrt(static_cast<double>(r.size()));
  EXPECT_LT(std::sqrt(num) / std::max(std::sqrt(den), floor), kTolGrad) << what;
}

void expect_lse_close(const Tensor& gpu, const Tensor& ref) {
  const std::vector<double> g = gpu.to_vector(), r = ref.to_vector();
  ASSERT_EQ(g.size(), r.size());
  int bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const bool ok = std::isinf(r[i]) ? (std::isinf(g[i]) && g[i] < 0)
                                     : std::abs(g[i] - r[i]) <= kTolLse * (1 + std::abs(r[i]));
    if (!ok && bad++ < 5) ADD_FAILURE() << "lse[" << i << "]: gpu " << g[i] << " cpu " << r[i];
  }
  EXPECT_EQ(bad, 0) << "lse rows off";
}

// Forward on CPU (float64) and GPU; returns the CPU o (rounded to bf16 values) and lse (rounded to
// fp32) that the backward tests hand to both implementations.
void forward_both(const AttnCase& c, const AttnInputs& in, Tensor& o_ref, Tensor& lse_ref) {
  const Shape qs{c.B, c.Tq, c.Hq, c.D}, ls{c.B, c.Hq, c.Tq};
  o_ref = Tensor::empty(qs, DType::F64);
  lse_ref = Tensor::empty(ls, DType::F64);
  attention_forward(o_ref, lse_ref, f64(in.q), f64(in.k), f64(in.v), scale_of(c), c.causal, c.q_offset);

  Tensor o = poisoned_cuda(qs, DType::BF16), lse = poisoned_cuda(ls, DType::F32);
  attention_forward(o, lse, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), scale_of(c), c.causal,
                    c.q_offset);
  expect_close(o, o_ref, kTolO, "o");
  expect_lse_close(lse, lse_ref);
}

TEST(AttentionGpu, ForwardMatchesCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const AttnCase& c : kCases) {
    const uint32_t seed = fresh_seed();
    SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
    std::mt19937 rng(seed);
    const AttnInputs in = make_inputs(c, rng);
    Tensor o_ref, lse_ref;
    forward_both(c, in, o_ref, lse_ref);
  }
}

TEST(AttentionGpu, ForwardWithoutLseWritesOnlyO) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const AttnCase c{1, 100, 100, 2, 1, 64, true, 0};
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const AttnInputs in = make_inputs(c, rng);
  Tensor o_ref = Tensor::empty({c.B, c.Tq, c.Hq, c.D}, DType::F64), none;
  attention_forward(o_ref, none, f64(in.q), f64(in.k), f64(in.v), scale_of(c), c.causal, 0);
  Tensor o = poisoned_cuda({c.B, c.Tq, c.Hq, c.D}, DType::BF16);
  attention_forward(o, none, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), scale_of(c), c.causal, 0);
  expect_close(o, o_ref, kTolO, "o");
}

// Backward of both implementations from the same (CPU) o and lse.
void check_backward(const AttnCase& c, bool want_dq, bool want_dkdv) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(describe(c) + " dq=" + std::to_string(want_dq) + " dkdv=" + std::to_string(want_dkdv) +
               " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const AttnInputs in = make_inputs(c, rng);
  Tensor o_ref, lse_ref;
  forward_both(c, in, o_ref, lse_ref);
  const Tensor o_vals = o_ref.to(DType::BF16).to(DType::F32), lse_vals = lse_ref.to(DType::F32);

  const Shape qs{c.B, c.Tq, c.Hq, c.D}, ks{c.B, c.Tk, c.Hkv, c.D};
  Tensor dq_ref = Tensor::empty(qs, DType::F64), dk_ref = Tensor::empty(ks, DType::F64),
         dv_ref = Tensor::empty(ks, DType::F64);
  attention_backward(dq_ref, dk_ref, dv_ref, f64(in.q), f64(in.k), f64(in.v), f64(o_vals), f64(lse_vals),
                     f64(in.d_o), scale_of(c), c.causal, c.q_offset);

  Tensor dq = want_dq ? poisoned_cuda(qs, DType::BF16) : Tensor();
  Tensor dk = want_dkdv ? poisoned_cuda(ks, DType::BF16) : Tensor();
  Tensor dv = want_dkdv ? poisoned_cuda(ks, DType::BF16) : Tensor();
  attention_backward(dq, dk, dv, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), bf16_cuda(o_vals),
                     lse_vals.to(cuda()), bf16_cuda(in.d_o), scale_of(c), c.causal, c.q_offset);
  if (want_dq) expect_grad_close(dq, dq_ref, "dq");
  if (want_dkdv) {
    expect_grad_close(dk, dk_ref, "dk");
    expect_grad_close(dv, dv_ref, "dv");
  }
}

TEST(AttentionGpu, BackwardMatchesCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const AttnCase& c : kCases) check_backward(c, true, true);
}

TEST(AttentionGpu, BackwardComputesOnlyTheRequestedGradients) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  check_backward({1, 130, 130, 4, 2, 64, true, 0}, true, false);
  check_backward({1, 130, 130, 4, 2, 128, true, 0}, false, true);
}

// Ring attention: the backward on each half of the keys, with the global o and lse, gives that
// half's dk, dv and a summand of dq; checked against the CPU on the same split.
TEST(AttentionGpu, BackwardOnAKeySubsetWithGlobalLseMatchesCpu) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  for (const AttnCase& c : {AttnCase{1, 150, 300, 4, 2, 64, true, 150}, AttnCase{2, 96, 160, 2, 2, 128, false, 0}}) {
    const uint32_t seed = fresh_seed();
    SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
    std::mt19937 rng(seed);
    const AttnInputs in = make_inputs(c, rng);
    Tensor o_ref, lse_ref;
    forward_both(c, in, o_ref, lse_ref);
    const Tensor o_vals = o_ref.to(DType::BF16).to(DType::F32), lse_vals = lse_ref.to(DType::F32);
    const int64_t split = c.Tk / 2 + 3;  // not tile-aligned
    for (int part = 0; part < 2; ++part) {
      const int64_t k0 = part == 0 ? 0 : split, k1 = part == 0 ? split : c.Tk, n = k1 - k0;
      SCOPED_TRACE("keys [" + std::to_string(k0) + ", " + std::to_string(k1) + ")");
      const Tensor ksub = in.k.slice(1, k0, k1).contiguous(), vsub = in.v.slice(1, k0, k1).contiguous();
      const int64_t off = c.q_offset - k0;  // key positions restart at 0 inside the subset
      const Shape qs{c.B, c.Tq, c.Hq, c.D}, ks{c.B, n, c.Hkv, c.D};
      Tensor dq_ref = Tensor::empty(qs, DType::F64), dk_ref = Tensor::empty(ks, DType::F64),
             dv_ref = Tensor::empty(ks, DType::F64);
      attention_backward(dq_ref, dk_ref, dv_ref, f64(in.q), f64(ksub), f64(vsub), f64(o_vals), f64(lse_vals),
                         f64(in.d_o), scale_of(c), c.causal, off);
      Tensor dq = poisoned_cuda(qs, DType::BF16), dk = poisoned_cuda(ks, DType::BF16),
             dv = poisoned_cuda(ks, DType::BF16);
      attention_backward(dq, dk, dv, bf16_cuda(in.q), bf16_cuda(ksub), bf16_cuda(vsub), bf16_cuda(o_vals),
                         lse_vals.to(cuda()), bf16_cuda(in.d_o), scale_of(c), c.causal, off);
      expect_grad_close(dq, dq_ref, "dq (partial)");
      expect_grad_close(dk, dk_ref, "dk");
      expect_grad_close(dv, dv_ref, "dv");
    }
  }
}

TEST(AttentionGpu, UnsupportedHeadDimIsAClearError) {
  if (!lasp::cuda_available()) GTEST_SKIP() << "no GPU";
  const Tensor q = Tensor::zeros({1, 4, 1, 32}, DType::BF16, cuda());
  Tensor o = Tensor::empty({1, 4, 1, 32}, DType::BF16, cuda()), lse = Tensor::empty({1, 1, 4}, DType::F32, cuda());
  EXPECT_THROW(attention_forward(o, lse, q, q, q, 1.0f, true), Error);
}

}  // namespace
}  // namespace lasp
