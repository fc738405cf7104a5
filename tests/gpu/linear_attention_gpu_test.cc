// CUDA linear attention against the CPU implementation (itself tested against float64 naive
// references), run in fp32 on the same bf16-rounded inputs. Fresh random inputs per run (the
// seed is printed on failure), odd sequence lengths, every decay mode, with and without initial
// state and final-state gradient, NaN-poisoned outputs.
//
// Thresholds (relative Frobenius error ||gpu - cpu|| / ||cpu||): the GPU rounds its matmul
// operands to bf16 (Q K^T o M, the bf16 copy of the state, diag(e) V, diag(b) dO) and its bf16
// outputs once, each a 2^-9 relative rounding, so errors land at 2e-3 .. 6e-3:
//   o, dq, dk, dv                    2e-2
//   final_state, d_initial_state     2e-2 (fp32 outputs built from bf16 operands)
//   d_log_decay                      1e-1: sums of differences of D-term dot products (the
//                                    intra-chunk P o dO V^T terms, q.dq-like and k.dk-like), so
//                                    each term carries a rounding error of order eps |q| |dq|
//                                    while the result is of order |q| |dq| / sqrt(D): relative
//                                    errors of eps sqrt(D) times the cancellation of the draw.
//                                    A draw at D = 64, T = 9000 gave 5.3e-2 (H200, 2026-12-02, the
//                                    first above the earlier bound 5e-2 in the test's runs since
//                                    2026-11-23); a wrong term or chunk boundary gives errors of
//                                    order 1.
#include <gtest/gtest.h>

#include <cstdio>

#include "kernels/linear_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

using namespace gpu_test;

constexpr double kTolOut = 2e-2, kTolState = 2e-2, kTolDlog = 1e-1;

struct LaCase {
  int64_t B, T, H, D;
  DecayMode mode;
  bool with_init, with_dfinal;
  double qk_std = 0;             // 0: 1 / sqrt(D)
  double log_decay_min = -0.6;   // data-dependent log decays uniform in [this, 0)
};

std::string describe(const LaCase& c) {
  std::ostringstream os;
  os << "B=" << c.B << " T=" << c.T << " H=" << c.H << " D=" << c.D << " decay="
     << decay_mode_name(c.mode) << " init=" << c.with_init << " dfinal=" << c.with_dfinal;
  return os.str();
}

struct LaInputs {
  Tensor q, k, v, d_o, init, d_final;  // CPU fp32 (bf16-representable for q, k, v, d_o)
  Decay decay;                         // CPU fp32
};

LaInputs make_inputs(const LaCase& c, std::mt19937& rng) {
  LaInputs in;
  const Shape x{c.B, c.T, c.H, c.D}, s{c.B, c.H, c.D, c.D};
  const double scale = c.qk_std > 0 ? c.qk_std : 1.0 / std::sqrt(static_cast<double>(c.D));
  in.q = random_bf16_values(x, rng, scale);
  in.k = random_bf16_values(x, rng, scale);
  in.v = random_bf16_values(x, rng);
  in.d_o = random_bf16_values(x, rng);
  if (c.with_init) in.init = random_bf16_values(s, rng);
  if (c.with_dfinal) in.d_final = random_bf16_values(s, rng);
  in.decay.mode = c.mode;
  if (c.mode == DecayMode::Constant) in.decay.per_head = random_uniform({c.H}, rng, -0.3, -0.005);
  if (c.mode == DecayMode::DataDependent)
    in.decay.per_token = random_uniform({c.B, c.T, c.H}, rng, c.log_decay_min, 0.0);
  return in;
}

Decay decay_to_cuda(const Decay& d) {
  Decay g;
  g.mode = d.mode;
  if (d.per_head.defined()) g.per_head = d.per_head.to(cuda());
  if (d.per_token.defined()) g.per_token = d.per_token.to(cuda());
  return g;
}

Tensor cuda_or_undefined(const Tensor& t, DType dt) { return t.defined() ? to_cuda(t, dt) : Tensor(); }

void expect_close(const Tensor& gpu, const Tensor& cpu, double tol, const char* what) {
  const auto out = gpu.to_vector();
  EXPECT_EQ(count_non_finite(out), 0) << what << ": unwritten or non-finite outputs";
  const double err = rel_error(out, cpu.to_vector());
  if (tol == kTolDlog) std::printf("[ info ] %s relative error %.2e (bound %.0e)\n", what, err, tol);
  EXPECT_LT(err, tol) << what;
}

void check_forward(const LaCase& c) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const LaInputs in = make_inputs(c, rng);
  const Shape x{c.B, c.T, c.H, c.D}, s{c.B, c.H, c.D, c.D};

  Tensor o_ref = Tensor::empty(x, DType::F32), fs_ref = Tensor::empty(s, DType::F32);
  linear_attention_forward(o_ref, fs_ref, in.q, in.k, in.v, in.decay, in.init);

  Tensor o = poisoned_cuda(x, DType::BF16), fs = poisoned_cuda(s, DType::F32);
  linear_attention_forward(o, fs, to_cuda(in.q, DType::BF16), to_cuda(in.k, DType::BF16),
                           to_cuda(in.v, DType::BF16), decay_to_cuda(in.decay),
                           cuda_or_undefined(in.init, DType::F32));
  expect_close(o, o_ref, kTolOut, "o");
  expect_close(fs, fs_ref, kTolState, "final_state");
}

// With `saved_states`, the GPU backward takes the segment states its forward kept
// (LinearAttentionSaved) instead of recomputing them.
void check_backward(const LaCase& c, bool saved_states = false) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const LaInputs in = make_inputs(c, rng);
  const Shape x{c.B, c.T, c.H, c.D}, s{c.B, c.H, c.D, c.D}, g{c.B, c.T, c.H};
  const bool data = c.mode == DecayMode::DataDependent;

  Tensor dq_ref = Tensor::empty(x, DType::F32), dk_ref = Tensor::empty(x, DType::F32),
         dv_ref = Tensor::empty(x, DType::F32), dinit_ref = Tensor::empty(s, DType::F32);
  Tensor dlog_ref = data ? Tensor::empty(g, DType::F32) : Tensor();
  linear_attention_backward(dq_ref, dk_ref, dv_ref, dlog_ref, dinit_ref, in.q, in.k, in.v, in.decay,
                            in.init, in.d_o, in.d_final);

  Tensor dq = poisoned_cuda(x, DType::BF16), dk = poisoned_cuda(x, DType::BF16),
         dv = poisoned_cuda(x, DType::BF16), dinit = poisoned_cuda(s, DType::F32);
  Tensor dlog = data ? poisoned_cuda(g, DType::F32) : Tensor();
  const Tensor q = to_cuda(in.q, DType::BF16), k = to_cuda(in.k, DType::BF16),
               v = to_cuda(in.v, DType::BF16);
  const Tensor init = cuda_or_undefined(in.init, DType::F32);
  const Decay gd = decay_to_cuda(in.decay);
  LinearAttentionSaved saved;
  if (saved_states) {
    Tensor o = poisoned_cuda(x, DType::BF16), no_state;
    linear_attention_forward(o, no_state, q, k, v, gd, init, 64, &saved);
    EXPECT_TRUE(saved.segment_states.defined() && saved.segment_log_decay.defined() &&
                saved.final_state.defined());
  }
  linear_attention_backward(dq, dk, dv, dlog, dinit, q, k, v, gd, init,
                            to_cuda(in.d_o, DType::BF16), cuda_or_undefined(in.d_final, DType::F32),
                            64, saved_states ? &saved : nullptr);
  expect_close(dq, dq_ref, kTolOut, "dq");
  expect_close(dk, dk_ref, kTolOut, "dk");
  expect_close(dv, dv_ref, kTolOut, "dv");
  expect_close(dinit, dinit_ref, kTolState, "d_initial_state");
  if (data) expect_close(dlog, dlog_ref, kTolDlog, "d_log_decay");
}

std::vector<LaCase> cases_for(DecayMode mode) {
  std::vector<LaCase> cs;
  for (int64_t D : {64, 128}) {
    for (int64_t T : {1, 100, 257}) cs.push_back({2, T, 3, D, mode, T != 100, T != 1});
  }
  // Several chunks per segment (segments hold several chunks when B*H is small).
  cs.push_back({1, 9000, 2, 64, mode, true, true});
  cs.push_back({1, 3001, 1, 128, mode, false, true});
  // Long walks: B*H large enough for one segment per (b, h), so each block walks every chunk
  // (exercises the load pipeline over many chunks and a partial last chunk).
  cs.push_back({2, 1000, 36, 128, mode, true, true});
  cs.push_back({1, 2500, 70, 64, mode, false, false});
  // The benchmark's layout at a testable length: B=1 and few heads, so each (b, h) is split into
  // many segments of several full chunks (every double-buffered stage, both value tiles).
  cs.push_back({1, 4096, 4, 128, mode, true, true});
  return cs;
}

TEST(LinearAttentionGpu, ForwardMatchesCpuWithoutDecay) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::None)) check_forward(c);
}
TEST(LinearAttentionGpu, ForwardMatchesCpuWithConstantDecay) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::Constant)) check_forward(c);
}
TEST(LinearAttentionGpu, ForwardMatchesCpuWithDataDependentDecay) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::DataDependent)) check_forward(c);
}
TEST(LinearAttentionGpu, BackwardMatchesCpuWithoutDecay) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::None)) check_backward(c);
}
TEST(LinearAttentionGpu, BackwardMatchesCpuWithConstantDecay) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::Constant)) check_backward(c);
}
TEST(LinearAttentionGpu, BackwardMatchesCpuWithDataDependentDecayIncludingDecayGradient) {
  LASP_SKIP_WITHOUT_GPU();
  for (const auto& c : cases_for(DecayMode::DataDependent)) check_backward(c);
}

// The shape and input scales of ModelGpu.LossAndEveryGradientMatchTheFp32CpuModel's linear layer
// (B=2, T=131, 2 heads of 64, projections of std ~0.6, log decays ~ logsigmoid(4)/16 ~ -1e-3),
// whose dq and dk failed against the CPU in some repeats while dv and d_log_decay matched.
TEST(LinearAttentionGpu, BackwardMatchesCpuAtTheModelTestsShapeAndScales) {
  LASP_SKIP_WITHOUT_GPU();
  for (DecayMode mode : {DecayMode::Constant, DecayMode::DataDependent})
    for (double qk : {0.0, 0.6, 2.0})
      for (double ld : {-0.6, -2e-3}) {
        LaCase c{2, 131, 2, 64, mode, false, false};
        c.qk_std = qk;
        c.log_decay_min = ld;
        SCOPED_TRACE(::testing::Message() << "qk_std " << qk << " log_decay_min " << ld);
        check_backward(c);
      }
}

// D = 128 runs the Hopper (wgmma) kernels on sm_90 devices. These cases add one piece at a time,
// so the first failing one names the product at fault:
//   one chunk, no initial state        o: the masked in-chunk product alone (Q K^T, then P V)
//   one chunk, initial state           + the inter-chunk product Q S (the bf16 copy of the state)
//   two chunks per block (B*H = 132)   + the state update inside the walk
// final_state and d_initial_state isolate the segment-state kernels.
TEST(LinearAttentionGpu, TiledProductsMatchCpuOneByOne) {
  LASP_SKIP_WITHOUT_GPU();
  for (DecayMode mode : {DecayMode::Constant, DecayMode::DataDependent}) {
    const LaCase one_chunk{1, 64, 2, 128, mode, false, false};
    const LaCase one_chunk_init{1, 64, 2, 128, mode, true, true};
    const LaCase two_chunks{2, 128, 66, 128, mode, false, true};
    for (const LaCase& c : {one_chunk, one_chunk_init, two_chunks}) {
      check_forward(c);
      check_backward(c);
    }
  }
}

// The backward from the forward's saved segment states (LinearAttentionSaved) matches the CPU:
// both head dims, odd T, one and many segments per head (T = 6001, B*H = 8: 16 segments of 6
// chunks), every decay mode (the data-dependent one also needs the saved final state for
// <dS_final, S_final>), with and without initial state and final-state gradient. A saved object
// of other shapes is rejected.
TEST(LinearAttentionGpu, BackwardFromSavedForwardStatesMatchesCpu) {
  LASP_SKIP_WITHOUT_GPU();
  for (DecayMode mode : {DecayMode::None, DecayMode::Constant, DecayMode::DataDependent}) {
    for (const LaCase& c :
         {LaCase{2, 257, 3, 128, mode, true, true}, LaCase{1, 6001, 8, 128, mode, true, true},
          LaCase{1, 3001, 1, 64, mode, false, true}, LaCase{2, 100, 3, 64, mode, true, false}})
      check_backward(c, true);
  }
  const Decay none;
  const Tensor x = Tensor::zeros({1, 640, 2, 128}, DType::BF16, cuda());
  const Tensor y = Tensor::zeros({1, 64, 2, 128}, DType::BF16, cuda());
  Tensor o = Tensor::empty(x.shape(), DType::BF16, cuda()), fs,
         dq = Tensor::empty(y.shape(), DType::BF16, cuda());
  Tensor n1, n2, n3, n4;
  LinearAttentionSaved saved;
  linear_attention_forward(o, fs, x, x, x, none, Tensor(), 64, &saved);
  EXPECT_THROW(linear_attention_backward(dq, n1, n2, n3, n4, y, y, y, none, Tensor(), y, Tensor(),
                                         64, &saved),
               Error);
}

// The model's fused q/k/v projection hands the kernels head slices of one [B, T, 3 H, D] tensor
// (row stride 3 H D) and takes dq, dk, dv back the same way. Inputs are placed in wide tensors
// whose other heads hold NaN (a read outside the slice poisons the result); outputs land in
// NaN-poisoned wide tensors, and the heads outside each output slice must stay NaN (no write
// outside it). o is the second half of a [B, T, 2 H, D] tensor: a row stride of its own.
// Compared with the CPU on the contiguous values, both head dims (mma.sync and wgmma kernels),
// every decay mode (data-dependent: the d_log_decay walks read q, k at dq's, dk's stride).
TEST(LinearAttentionGpu, HeadSlicesOfWiderTensorsMatchCpu) {
  LASP_SKIP_WITHOUT_GPU();
  for (DecayMode mode : {DecayMode::None, DecayMode::Constant, DecayMode::DataDependent})
    for (const LaCase& c : {LaCase{2, 257, 3, 128, mode, true, true}, LaCase{1, 3001, 2, 64, mode, false, true},
                            LaCase{1, 4096, 4, 128, mode, true, false}}) {
      const uint32_t seed = fresh_seed();
      SCOPED_TRACE(describe(c) + " seed=" + std::to_string(seed));
      std::mt19937 rng(seed);
      const LaInputs in = make_inputs(c, rng);
      const int64_t H = c.H;
      const Shape x{c.B, c.T, H, c.D}, s{c.B, H, c.D, c.D}, g{c.B, c.T, H};
      const bool data = c.mode == DecayMode::DataDependent;
      // CPU references on contiguous tensors.
      Tensor o_ref = Tensor::empty(x, DType::F32), fs_ref = Tensor::empty(s, DType::F32);
      linear_attention_forward(o_ref, fs_ref, in.q, in.k, in.v, in.decay, in.init);
      Tensor dq_ref = Tensor::empty(x, DType::F32), dk_ref = Tensor::empty(x, DType::F32),
             dv_ref = Tensor::empty(x, DType::F32), dinit_ref = Tensor::empty(s, DType::F32);
      Tensor dlog_ref = data ? Tensor::empty(g, DType::F32) : Tensor();
      linear_attention_backward(dq_ref, dk_ref, dv_ref, dlog_ref, dinit_ref, in.q, in.k, in.v, in.decay,
                                in.init, in.d_o, in.d_final);
      // q, k, v as heads [0, H), [H, 2H), [2H, 3H) of one wide tensor (built on the CPU).
      Tensor qkv_cpu = Tensor::full({c.B, c.T, 3 * H, c.D}, std::nan(""), DType::F32);
      const Tensor parts[] = {in.q, in.k, in.v};
      for (int i = 0; i < 3; ++i) {
        Tensor slice = qkv_cpu.slice(2, i * H, (i + 1) * H);
        slice.copy_from(parts[i]);
      }
      const Tensor qkv = to_cuda(qkv_cpu, DType::BF16);
      const Tensor q = qkv.slice(2, 0, H), k = qkv.slice(2, H, 2 * H), v = qkv.slice(2, 2 * H, 3 * H);
      ASSERT_FALSE(q.is_contiguous());
      const Tensor init = cuda_or_undefined(in.init, DType::F32);
      const Decay gd = decay_to_cuda(in.decay);
      Tensor o_wide = poisoned_cuda({c.B, c.T, 2 * H, c.D}, DType::BF16);
      Tensor o = o_wide.slice(2, H, 2 * H), fs = poisoned_cuda(s, DType::F32);
      LinearAttentionSaved saved;
      linear_attention_forward(o, fs, q, k, v, gd, init, 64, &saved);
      Tensor d_wide = poisoned_cuda({c.B, c.T, 3 * H, c.D}, DType::BF16);
      Tensor dq = d_wide.slice(2, 0, H), dk = d_wide.slice(2, H, 2 * H), dv = d_wide.slice(2, 2 * H, 3 * H);
      Tensor dinit = poisoned_cuda(s, DType::F32);
      Tensor dlog = data ? poisoned_cuda(g, DType::F32) : Tensor();
      linear_attention_backward(dq, dk, dv, dlog, dinit, q, k, v, gd, init, to_cuda(in.d_o, DType::BF16),
                                cuda_or_undefined(in.d_final, DType::F32), 64, &saved);
      const Tensor ow = o_wide.to(cpu()), dw = d_wide.to(cpu());
      expect_close(ow.slice(2, H, 2 * H).contiguous(), o_ref, kTolOut, "o");
      const std::vector<double> outside = ow.slice(2, 0, H).contiguous().to_vector();
      EXPECT_EQ(count_non_finite(outside), static_cast<int>(outside.size())) << "o written outside its heads";
      expect_close(fs, fs_ref, kTolState, "final_state");
      expect_close(dw.slice(2, 0, H).contiguous(), dq_ref, kTolOut, "dq");
      expect_close(dw.slice(2, H, 2 * H).contiguous(), dk_ref, kTolOut, "dk");
      expect_close(dw.slice(2, 2 * H, 3 * H).contiguous(), dv_ref, kTolOut, "dv");
      expect_close(dinit, dinit_ref, kTolState, "d_initial_state");
      if (data) expect_close(dlog, dlog_ref, kTolDlog, "d_log_decay");
    }
}

TEST(LinearAttentionGpu, StateOnlyForwardAndPartialBackwardSkipUndefinedOutputs) {
  LASP_SKIP_WITHOUT_GPU();
  const LaCase c{1, 300, 2, 64, DecayMode::DataDependent, true, true};
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const LaInputs in = make_inputs(c, rng);
  const Shape x{c.B, c.T, c.H, c.D}, s{c.B, c.H, c.D, c.D};
  const Tensor q = to_cuda(in.q, DType::BF16), k = to_cuda(in.k, DType::BF16),
               v = to_cuda(in.v, DType::BF16), init = to_cuda(in.init, DType::F32);
  const Decay gd = decay_to_cuda(in.decay);

  // Forward with o undefined: only the final state.
  Tensor none, fs_ref = Tensor::empty(s, DType::F32), o_ref = Tensor::empty(x, DType::F32);
  linear_attention_forward(o_ref, fs_ref, in.q, in.k, in.v, in.decay, in.init);
  Tensor fs = poisoned_cuda(s, DType::F32);
  linear_attention_forward(none, fs, q, k, v, gd, init);
  expect_close(fs, fs_ref, kTolState, "final_state (state-only pass)");

  // Backward asking for dv only, with d_o undefined (counts as zero): dv = K dS_final terms only.
  Tensor dv_ref = Tensor::empty(x, DType::F32), n1, n2, n3, n4;
  linear_attention_backward(n1, n2, dv_ref, n3, n4, in.q, in.k, in.v, in.decay, in.init, Tensor(),
                            in.d_final);
  Tensor dv = poisoned_cuda(x, DType::BF16), m1, m2, m3, m4;
  linear_attention_backward(m1, m2, dv, m3, m4, q, k, v, gd, init, Tensor(),
                            to_cuda(in.d_final, DType::F32));
  expect_close(dv, dv_ref, kTolOut, "dv (only output, no d_o)");
}

TEST(LinearAttentionGpu, RejectsUnsupportedHeadDimAndDtypesWithAClearError) {
  LASP_SKIP_WITHOUT_GPU();
  Decay none;
  Tensor o = Tensor::zeros({1, 8, 1, 96}, DType::BF16, cuda()), fs;
  Tensor x96 = Tensor::zeros({1, 8, 1, 96}, DType::BF16, cuda());
  EXPECT_THROW(linear_attention_forward(o, fs, x96, x96, x96, none, Tensor()), Error);
  Tensor o32 = Tensor::zeros({1, 8, 1, 64}, DType::F32, cuda());
  Tensor x32 = Tensor::zeros({1, 8, 1, 64}, DType::F32, cuda());
  EXPECT_THROW(linear_attention_forward(o32, fs, x32, x32, x32, none, Tensor()), Error);
}

}  // namespace
}  // namespace lasp
