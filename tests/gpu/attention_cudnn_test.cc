// Both CUDA softmax attention paths (LASP_ATTENTION=own: our WMMA kernel, =cudnn: cuDNN's fused
// flash attention, kernels/attention_cudnn.h) against the CPU implementation in float64, on the
// same bf16-rounded inputs: fresh random inputs per run (seed printed on failure), NaN-poisoned
// outputs, causal and not, grouped-query heads (4:1, 3:1, 1:1), q_offset > 0 with Tk = Tq +
// q_offset (LASP-2H) and Tk > Tq + q_offset, more queries than keys, odd lengths (77, 257, 1000).
// LASP_ATTENTION=cudnn makes a call cuDNN cannot take an error, so a pass here means cuDNN ran.
//
// Also: the lse convention (natural log, max + log sum, as the LASP-2H / Ring merges need: two
// key-half forwards merged by lse give the full forward), the backward on a key split with the
// global o and lse (the halves' dq sum to the full dq, their dk / dv are the full ones' rows), one
// cached plan serving other q_offset and scale values, and the clear errors.
//
// Thresholds (relative Frobenius error, as tests/gpu/attention_gpu_test.cc): o 2e-2 (P and o
// rounded to bf16), dq / dk / dv 3e-2 (P, dS and the outputs rounded to bf16; ||cpu|| floored at
// 1e-3 sqrt(n)), lse |gpu - cpu| <= 1e-4 (1 + |cpu|) (fp32 scores of bf16 inputs).
#include "kernels/attention_cudnn.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "kernels/attention.h"
#include "tests/gpu/attention_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;
using namespace attn_test;

constexpr double kTolO = 2e-2, kTolGrad = 3e-2, kTolLse = 1e-4;

// Sets LASP_ATTENTION for its lifetime and restores what was there.
class ScopedPath {
 public:
  explicit ScopedPath(const char* value) {
    const char* old = std::getenv("LASP_ATTENTION");
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv("LASP_ATTENTION", value, 1);
  }
  ~ScopedPath() {
    if (had_)
      setenv("LASP_ATTENTION", old_.c_str(), 1);
    else
      unsetenv("LASP_ATTENTION");
  }

 private:
  bool had_ = false;
  std::string old_;
};

#define SKIP_WITHOUT_GPU_OR_CUDNN()                                          \
  do {                                                                       \
    LASP_SKIP_WITHOUT_GPU();                                                 \
    if (!cudnn_attention_built()) GTEST_SKIP() << cudnn_attention_version(); \
  } while (0)

using Case = AttnCase;

const Case kCases[] = {
    {1, 300, 300, 4, 1, 64, true, 0},     // GQA 4:1 (MQA), a few hundred tokens
    {2, 257, 257, 6, 2, 128, true, 0},    // GQA 3:1, odd length, two sequences
    {1, 1000, 1000, 2, 2, 128, true, 0},  // odd length, no grouping
    {2, 300, 300, 2, 2, 64, false, 0},    // non-causal
    {1, 77, 300, 4, 1, 128, true, 223},   // LASP-2H, last rank: Tk = Tq + q_offset
    {1, 256, 512, 4, 2, 64, true, 256},   // LASP-2H, tile-aligned
    {1, 100, 200, 2, 2, 64, true, 50},    // keys beyond the last query: Tk > Tq + q_offset
    {1, 129, 64, 3, 3, 128, false, 0},    // more queries than keys
    {1, 2, 384, 2, 1, 128, true, 382},    // two query rows against 384 keys (decoding-like)
};

using Inputs = AttnInputs;
Shape q_shape(const Case& c) { return {c.B, c.Tq, c.Hq, c.D}; }
Shape kv_shape(const Case& c, int64_t Tk) { return {c.B, Tk, c.Hkv, c.D}; }
Shape lse_shape(const Case& c) { return {c.B, c.Hq, c.Tq}; }

void expect_close(const Tensor& gpu, const Tensor& ref, double tol, const char* what) {
  const std::vector<double> out = gpu.to_vector();
  EXPECT_EQ(count_non_finite(out), 0) << what << ": unwritten or non-finite outputs";
  EXPECT_LT(rel_error(out, ref.to_vector()), tol) << what;
}

void expect_grad_close(const std::vector<double>& out, const std::vector<double>& r,
                       const char* what) {
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
void expect_grad_close(const Tensor& gpu, const Tensor& ref, const char* what) {
  expect_grad_close(gpu.to_vector(), ref.to_vector(), what);
}

void expect_lse_close(const Tensor& gpu, const Tensor& ref) {
  const std::vector<double> g = gpu.to_vector(), r = ref.to_vector();
  ASSERT_EQ(g.size(), r.size());
  int bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const bool ok = std::isinf(r[i]) ? (std::isinf(g[i]) && g[i] < 0)  // rows without a visible key
                                     : std::abs(g[i] - r[i]) <= kTolLse * (1 + std::abs(r[i]));
    if (!ok && bad++ < 5) ADD_FAILURE() << "lse[" << i << "]: gpu " << g[i] << " cpu " << r[i];
  }
  EXPECT_EQ(bad, 0) << "lse rows off";
}

// CPU forward in float64 (o, lse) and the GPU forward on the current path.
void forward_both(const Case& c, const Inputs& in, Tensor& o_ref, Tensor& lse_ref, Tensor& o,
                  Tensor& lse) {
  o_ref = Tensor::empty(q_shape(c), DType::F64);
  lse_ref = Tensor::empty(lse_shape(c), DType::F64);
  attention_forward(o_ref, lse_ref, f64(in.q), f64(in.k), f64(in.v), scale_of(c), c.causal,
                    c.q_offset);
  o = poisoned_cuda(q_shape(c), DType::BF16);
  lse = poisoned_cuda(lse_shape(c), DType::F32);
  attention_forward(o, lse, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), scale_of(c),
                    c.causal, c.q_offset);
}

// Forward and backward of one case on the current path; the backward gets the CPU o and lse.
void check_case(const Case& c) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const Inputs in = make_inputs(c, rng);
  Tensor o_ref, lse_ref, o, lse;
  forward_both(c, in, o_ref, lse_ref, o, lse);
  expect_close(o, o_ref, kTolO, "o");
  expect_lse_close(lse, lse_ref);

  const Tensor o_vals = o_ref.to(DType::BF16).to(DType::F32), lse_vals = lse_ref.to(DType::F32);
  Tensor dq_ref = Tensor::empty(q_shape(c), DType::F64),
         dk_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64),
         dv_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64);
  attention_backward(dq_ref, dk_ref, dv_ref, f64(in.q), f64(in.k), f64(in.v), f64(o_vals),
                     f64(lse_vals), f64(in.d_o), scale_of(c), c.causal, c.q_offset);
  Tensor dq = poisoned_cuda(q_shape(c), DType::BF16),
         dk = poisoned_cuda(kv_shape(c, c.Tk), DType::BF16),
         dv = poisoned_cuda(kv_shape(c, c.Tk), DType::BF16);
  attention_backward(dq, dk, dv, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v),
                     bf16_cuda(o_vals), lse_vals.to(cuda()), bf16_cuda(in.d_o), scale_of(c),
                     c.causal, c.q_offset);
  expect_grad_close(dq, dq_ref, "dq");
  expect_grad_close(dk, dk_ref, "dk");
  expect_grad_close(dv, dv_ref, "dv");
}

TEST(AttentionCudnn, CudnnPathMatchesCpuForwardAndBackward) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  for (const Case& c : kCases) check_case(c);
}

TEST(AttentionCudnn, OwnKernelPathMatchesCpuOnTheSameCases) {
  LASP_SKIP_WITHOUT_GPU();
  ScopedPath path("own");
  for (const Case& c : kCases) check_case(c);
}

// LASP-2H calls one shape with a different q_offset per chunk: the plan is cached per shape and
// q_offset / scale are runtime scalars, so reusing it must still give each call its own mask.
TEST(AttentionCudnn, OnePlanServesOtherOffsetsAndScales) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  for (int64_t q_offset : {64, 130, 1}) {
    for (double scale_mul : {1.0, 0.5}) {
      Case c{1, 128, 384, 4, 2, 64, true, q_offset};
      const uint32_t seed = fresh_seed();
      SCOPED_TRACE(describe(c) + " scale x" + std::to_string(scale_mul) +
                   " seed=" + std::to_string(seed));
      std::mt19937 rng(seed);
      const Inputs in = make_inputs(c, rng);
      const float scale = static_cast<float>(scale_mul) * scale_of(c);
      Tensor o_ref = Tensor::empty(q_shape(c), DType::F64),
             lse_ref = Tensor::empty(lse_shape(c), DType::F64);
      attention_forward(o_ref, lse_ref, f64(in.q), f64(in.k), f64(in.v), scale, true, q_offset);
      Tensor o = poisoned_cuda(q_shape(c), DType::BF16),
             lse = poisoned_cuda(lse_shape(c), DType::F32);
      attention_forward(o, lse, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), scale, true,
                        q_offset);
      expect_close(o, o_ref, kTolO, "o");
      expect_lse_close(lse, lse_ref);
    }
  }
}

// lse is the natural-log log-sum-exp (max + log sum): forwards on two key halves merged as
//   lse = logaddexp(lse_a, lse_b),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b
// give the full forward (what LASP-2H and ring attention do with partial results).
TEST(AttentionCudnn, ForwardLseMergesKeyHalvesIntoTheFullResult) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  const Case c{2, 200, 333, 4, 2, 128, true, 133};
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const Inputs in = make_inputs(c, rng);
  Tensor o_ref, lse_ref, o_full, lse_full;
  forward_both(c, in, o_ref, lse_ref, o_full, lse_full);
  // Keys [0, s) are all visible to every row (s <= q_offset + 1): a non-causal call; keys [s, Tk)
  // start at position s: causal with q_offset - s (>= 0 for s <= q_offset).
  const int64_t s = 101;
  const float scale = scale_of(c);
  Tensor o_a = poisoned_cuda(q_shape(c), DType::BF16),
         lse_a = poisoned_cuda(lse_shape(c), DType::F32);
  Tensor o_b = poisoned_cuda(q_shape(c), DType::BF16),
         lse_b = poisoned_cuda(lse_shape(c), DType::F32);
  attention_forward(o_a, lse_a, bf16_cuda(in.q), bf16_cuda(in.k.slice(1, 0, s).contiguous()),
                    bf16_cuda(in.v.slice(1, 0, s).contiguous()), scale, false, 0);
  attention_forward(o_b, lse_b, bf16_cuda(in.q), bf16_cuda(in.k.slice(1, s, c.Tk).contiguous()),
                    bf16_cuda(in.v.slice(1, s, c.Tk).contiguous()), scale, true, c.q_offset - s);
  const std::vector<double> oa = o_a.to_vector(), ob = o_b.to_vector(), la = lse_a.to_vector(),
                            lb = lse_b.to_vector();
  std::vector<double> o(oa.size()), lse(la.size());
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.Tq; ++i)
      for (int64_t h = 0; h < c.Hq; ++h) {
        const size_t r = static_cast<size_t>((b * c.Hq + h) * c.Tq + i);
        const double m = std::max(la[r], lb[r]),
                     l = m + std::log(std::exp(la[r] - m) + std::exp(lb[r] - m));
        lse[r] = l;
        for (int64_t d = 0; d < c.D; ++d) {
          const size_t e = static_cast<size_t>(((b * c.Tq + i) * c.Hq + h) * c.D + d);
          o[e] = std::exp(la[r] - l) * oa[e] + std::exp(lb[r] - l) * ob[e];
        }
      }
  EXPECT_LT(rel_error(o, o_ref.to_vector()), kTolO) << "merged o";
  const std::vector<double> lr = lse_ref.to_vector();
  double worst = 0;
  for (size_t r = 0; r < lr.size(); ++r)
    worst = std::max(worst, std::abs(lse[r] - lr[r]) / (1 + std::abs(lr[r])));
  EXPECT_LT(worst, kTolLse) << "merged lse";
}

// Ring attention / LASP-2H backward: each key subset's backward with the GLOBAL o and lse gives
// that subset's dk, dv and a summand of dq; the two summands add up to the full dq.
TEST(AttentionCudnn, BackwardOnKeyHalvesWithGlobalLseSumsToTheFullGradient) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  for (const Case& c :
       {Case{1, 150, 300, 4, 2, 64, true, 150}, Case{2, 96, 160, 2, 2, 128, false, 0}}) {
    const uint32_t seed = fresh_seed();
    SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
    std::mt19937 rng(seed);
    const Inputs in = make_inputs(c, rng);
    Tensor o_ref, lse_ref, o, lse;
    forward_both(c, in, o_ref, lse_ref, o, lse);
    const Tensor o_vals = o_ref.to(DType::BF16).to(DType::F32), lse_vals = lse_ref.to(DType::F32);
    const float scale = scale_of(c);
    // The CPU gradient over all keys.
    Tensor dq_ref = Tensor::empty(q_shape(c), DType::F64),
           dk_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64),
           dv_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64);
    attention_backward(dq_ref, dk_ref, dv_ref, f64(in.q), f64(in.k), f64(in.v), f64(o_vals),
                       f64(lse_vals), f64(in.d_o), scale, c.causal, c.q_offset);
    // The split keeps every part's q_offset >= 0 (a part whose first rows see none of its keys is
    // our kernel's: tests/gpu/attention_gpu_test.cc); 77 is not tile-aligned.
    const int64_t split = 77;
    std::vector<double> dq_sum(static_cast<size_t>(c.B * c.Tq * c.Hq * c.D), 0.0);
    for (int part = 0; part < 2; ++part) {
      const int64_t k0 = part == 0 ? 0 : split, k1 = part == 0 ? split : c.Tk, n = k1 - k0;
      SCOPED_TRACE("keys [" + std::to_string(k0) + ", " + std::to_string(k1) + ")");
      Tensor dq = poisoned_cuda(q_shape(c), DType::BF16),
             dk = poisoned_cuda(kv_shape(c, n), DType::BF16),
             dv = poisoned_cuda(kv_shape(c, n), DType::BF16);
      attention_backward(dq, dk, dv, bf16_cuda(in.q), bf16_cuda(in.k.slice(1, k0, k1).contiguous()),
                         bf16_cuda(in.v.slice(1, k0, k1).contiguous()), bf16_cuda(o_vals),
                         lse_vals.to(cuda()), bf16_cuda(in.d_o), scale, c.causal, c.q_offset - k0);
      expect_grad_close(dk, dk_ref.slice(1, k0, k1).contiguous(),
                        "dk of the part vs the full dk's rows");
      expect_grad_close(dv, dv_ref.slice(1, k0, k1).contiguous(),
                        "dv of the part vs the full dv's rows");
      const std::vector<double> part_dq = dq.to_vector();
      EXPECT_EQ(count_non_finite(part_dq), 0) << "dq (partial): unwritten outputs";
      for (size_t i = 0; i < dq_sum.size(); ++i) dq_sum[i] += part_dq[i];
    }
    expect_grad_close(dq_sum, dq_ref.to_vector(), "dq summed over the two parts");
  }
}

TEST(AttentionCudnn, BackwardComputesOnlyTheRequestedGradients) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  const Case c{1, 256, 256, 4, 2, 64, true, 0};
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const Inputs in = make_inputs(c, rng);
  Tensor o_ref, lse_ref, o, lse;
  forward_both(c, in, o_ref, lse_ref, o, lse);
  const Tensor o_vals = o_ref.to(DType::BF16).to(DType::F32), lse_vals = lse_ref.to(DType::F32);
  Tensor dq_ref = Tensor::empty(q_shape(c), DType::F64),
         dk_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64),
         dv_ref = Tensor::empty(kv_shape(c, c.Tk), DType::F64);
  attention_backward(dq_ref, dk_ref, dv_ref, f64(in.q), f64(in.k), f64(in.v), f64(o_vals),
                     f64(lse_vals), f64(in.d_o), scale_of(c), true, 0);
  Tensor dq = poisoned_cuda(q_shape(c), DType::BF16), none;
  attention_backward(dq, none, none, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v),
                     bf16_cuda(o_vals), lse_vals.to(cuda()), bf16_cuda(in.d_o), scale_of(c), true,
                     0);
  expect_grad_close(dq, dq_ref, "dq alone");
  Tensor dk = poisoned_cuda(kv_shape(c, c.Tk), DType::BF16),
         dv = poisoned_cuda(kv_shape(c, c.Tk), DType::BF16);
  attention_backward(none, dk, dv, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v),
                     bf16_cuda(o_vals), lse_vals.to(cuda()), bf16_cuda(in.d_o), scale_of(c), true,
                     0);
  expect_grad_close(dk, dk_ref, "dk without dq");
  expect_grad_close(dv, dv_ref, "dv without dq");
  Tensor o_only = poisoned_cuda(q_shape(c), DType::BF16);
  attention_forward(o_only, none, bf16_cuda(in.q), bf16_cuda(in.k), bf16_cuda(in.v), scale_of(c),
                    true, 0);
  expect_close(o_only, o_ref, kTolO, "o without lse");
}

// Under auto, a call cuDNN cannot take (rows that see no key) runs on our kernel and is still
// right.
TEST(AttentionCudnn, AutoFallsBackToOurKernelForRowsWithoutKeys) {
  LASP_SKIP_WITHOUT_GPU();
  ScopedPath path("auto");
  check_case({1, 130, 130, 3, 1, 64, true, -70});
}

TEST(AttentionCudnn, ForcedCudnnOnACallItCannotTakeIsAClearError) {
  SKIP_WITHOUT_GPU_OR_CUDNN();
  ScopedPath path("cudnn");
  const Tensor q = Tensor::zeros({1, 8, 1, 64}, DType::BF16, cuda());
  Tensor o = Tensor::empty({1, 8, 1, 64}, DType::BF16, cuda()),
         lse = Tensor::empty({1, 1, 8}, DType::F32, cuda());
  try {
    attention_forward(o, lse, q, q, q, 1.0f, true, -3);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q_offset < 0"), std::string::npos) << e.what();
  }
}

TEST(AttentionCudnn, UnknownPathIsAClearError) {
  ScopedPath path("fastest");
  try {
    attention_path_from_env();
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("auto, cudnn or own"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lasp
