// Linear attention (kernels/linear_attention.h) against independent references written here:
// a per-token float64 recurrence for the forward and central finite differences for the backward.
#include "kernels/linear_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace lasp {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const DecayMode kModes[] = {DecayMode::None, DecayMode::Constant, DecayMode::DataDependent};

Tensor random_tensor(const Shape& shape, DType dt, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> vals(shape_numel(shape));
  for (double& x : vals) x = u(rng);
  return Tensor::from_values(vals, shape, dt);
}

Tensor poisoned(const Shape& shape, DType dt) { return Tensor::full(shape, kNaN, dt); }

// max |got - want| / max |want| (absolute when want is all zero).
double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double e = std::fabs(got[i] - want[i]);
    err = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(err, e);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return err / (scale > 0 ? scale : 1.0);
}

struct Problem {
  int64_t B, T, H, D;
  Tensor q, k, v, init;
  Decay decay;
  Shape qkv_shape() const { return {B, T, H, D}; }
  Shape state_shape() const { return {B, H, D, D}; }
};

Problem make_problem(DecayMode mode, int64_t B, int64_t T, int64_t H, int64_t D, bool with_init,
                     DType dt, uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p{B, T, H, D, {}, {}, {}, {}, {}};
  p.q = random_tensor(p.qkv_shape(), dt, rng, -1, 1);
  p.k = random_tensor(p.qkv_shape(), dt, rng, -1, 1);
  p.v = random_tensor(p.qkv_shape(), dt, rng, -1, 1);
  if (with_init) p.init = random_tensor(p.state_shape(), dt, rng, -1, 1);
  p.decay.mode = mode;
  // Log decays kept away from 0 so finite-difference steps never make them positive.
  if (mode == DecayMode::Constant) p.decay.per_head = random_tensor({H}, dt, rng, -0.7, -0.02);
  if (mode == DecayMode::DataDependent)
    p.decay.per_token = random_tensor({B, T, H}, dt, rng, -2.0, -0.02);
  return p;
}

// log a for every (b, t, h), whatever the mode.
std::vector<double> token_log_decay(const Problem& p) {
  std::vector<double> out(p.B * p.T * p.H, 0.0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t h = 0; h < p.H; ++h) {
        double& x = out[(b * p.T + t) * p.H + h];
        if (p.decay.mode == DecayMode::Constant) x = p.decay.per_head.item(h);
        if (p.decay.mode == DecayMode::DataDependent)
          x = p.decay.per_token.item((b * p.T + t) * p.H + h);
      }
  return out;
}

// The recurrence of the header, token by token, in float64.
struct Reference {
  std::vector<double> o, state;
};
Reference reference_forward(const Problem& p) {
  const auto q = p.q.to_vector(), k = p.k.to_vector(), v = p.v.to_vector();
  const auto logd = token_log_decay(p);
  const int64_t D = p.D;
  Reference r{std::vector<double>(q.size()), std::vector<double>(p.B * p.H * D * D, 0.0)};
  if (p.init.defined()) r.state = p.init.to_vector();
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      double* S = &r.state[(b * p.H + h) * D * D];
      for (int64_t t = 0; t < p.T; ++t) {
        const int64_t row = ((b * p.T + t) * p.H + h) * D;
        const double a = std::exp(logd[(b * p.T + t) * p.H + h]);
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j) S[i * D + j] = a * S[i * D + j] + k[row + i] * v[row + j];
        for (int64_t j = 0; j < D; ++j) {
          double s = 0;
          for (int64_t i = 0; i < D; ++i) s += q[row + i] * S[i * D + j];
          r.o[row + j] = s;
        }
      }
    }
  }
  return r;
}

struct Outputs {
  Tensor o, state;
};
Outputs run_forward(const Problem& p, int chunk) {
  const DType dt = p.q.dtype();
  Outputs out{poisoned(p.qkv_shape(), dt), poisoned(p.state_shape(), dt)};
  linear_attention_forward(out.o, out.state, p.q, p.k, p.v, p.decay, p.init, chunk);
  return out;
}

std::string describe(DecayMode m, int64_t T, int chunk, bool init) {
  return std::string("mode=") + decay_mode_name(m) + " T=" + std::to_string(T) +
         " chunk=" + std::to_string(chunk) + " init=" + (init ? "yes" : "no");
}

TEST(LinearAttention, ChunkedMatchesRecurrenceForEveryDecayMode) {
  uint32_t seed = 1;
  for (DecayMode mode : kModes)
    for (int64_t T : {1, 5, 64, 100, 257})
      for (int chunk : {1, 3, 16, 64})
        for (bool init : {false, true}) {
          SCOPED_TRACE(describe(mode, T, chunk, init));
          const Problem p = make_problem(mode, 2, T, 2, 5, init, DType::F64, seed++);
          const Reference ref = reference_forward(p);
          const Outputs out = run_forward(p, chunk);
          EXPECT_LT(rel_err(out.o.to_vector(), ref.o), 1e-10);
          EXPECT_LT(rel_err(out.state.to_vector(), ref.state), 1e-10);
        }
}

TEST(LinearAttention, Float32PathMatchesFloat64Reference) {
  uint32_t seed = 100;
  for (DecayMode mode : kModes)
    for (int64_t T : {37, 257})
      for (int chunk : {16, 64}) {
        SCOPED_TRACE(describe(mode, T, chunk, true));
        const Problem p = make_problem(mode, 2, T, 3, 8, true, DType::F32, seed++);
        const Reference ref = reference_forward(p);  // from the same fp32 values, in float64
        const Outputs out = run_forward(p, chunk);
        EXPECT_EQ(out.o.dtype(), DType::F32);
        EXPECT_LT(rel_err(out.o.to_vector(), ref.o), 1e-4);
        EXPECT_LT(rel_err(out.state.to_vector(), ref.state), 1e-4);
      }
}

TEST(LinearAttention, StrongDecaysUnderflowToZeroInsteadOfNaN) {
  // 30% of the gates are a = e^-40; products over a chunk reach e^-2000, far below the smallest
  // float. Ratios of such products would be 0/0; the log-space masks must stay exact.
  for (DType dt : {DType::F32, DType::F64}) {
    Problem p = make_problem(DecayMode::DataDependent, 1, 130, 2, 4, true, dt, 7);
    std::mt19937 rng(8);
    std::bernoulli_distribution strong(0.3);
    for (int64_t i = 0; i < p.decay.per_token.numel(); ++i)
      if (strong(rng)) p.decay.per_token.set_item(i, -40.0);
    const Reference ref = reference_forward(p);
    const Outputs out = run_forward(p, 64);
    for (double x : out.o.to_vector()) ASSERT_TRUE(std::isfinite(x));
    EXPECT_LT(rel_err(out.o.to_vector(), ref.o), dt == DType::F32 ? 1e-5 : 1e-12);
    EXPECT_LT(rel_err(out.state.to_vector(), ref.state), dt == DType::F32 ? 1e-5 : 1e-12);
  }
}

TEST(LinearAttention, StateOnlyAndOutputOnlyPassesMatchTheFullPass) {
  for (DecayMode mode : kModes) {
    SCOPED_TRACE(decay_mode_name(mode));
    const Problem p = make_problem(mode, 2, 45, 2, 4, true, DType::F64, 11);
    const Outputs full = run_forward(p, 16);
    Tensor no_o, no_state;
    Tensor state = poisoned(p.state_shape(), DType::F64);
    linear_attention_forward(no_o, state, p.q, p.k, p.v, p.decay, p.init, 16);
    EXPECT_LT(rel_err(state.to_vector(), full.state.to_vector()), 1e-14);
    Tensor o = poisoned(p.qkv_shape(), DType::F64);
    linear_attention_forward(o, no_state, p.q, p.k, p.v, p.decay, p.init, 16);
    EXPECT_LT(rel_err(o.to_vector(), full.o.to_vector()), 1e-14);
    EXPECT_FALSE(no_o.defined());
    EXPECT_FALSE(no_state.defined());
  }
}

TEST(LinearAttention, UndefinedInitialStateMeansZero) {
  for (DecayMode mode : kModes) {
    SCOPED_TRACE(decay_mode_name(mode));
    Problem p = make_problem(mode, 1, 20, 2, 3, false, DType::F64, 12);
    const Outputs none = run_forward(p, 8);
    p.init = Tensor::zeros(p.state_shape(), DType::F64);
    const Outputs zero = run_forward(p, 8);
    EXPECT_LT(rel_err(none.o.to_vector(), zero.o.to_vector()), 1e-14);
    EXPECT_LT(rel_err(none.state.to_vector(), zero.state.to_vector()), 1e-14);
  }
}

// LASP-2 splits the sequence across ranks: rank 2 starts from rank 1's final state.
TEST(LinearAttention, SplitSequenceComposesThroughTheFinalState) {
  for (DecayMode mode : kModes)
    for (int64_t split : {1, 37, 64}) {
      SCOPED_TRACE(std::string(decay_mode_name(mode)) + " split=" + std::to_string(split));
      const Problem p = make_problem(mode, 2, 100, 2, 4, true, DType::F64, 13);
      const Outputs full = run_forward(p, 16);
      auto part = [&](int64_t t0, int64_t t1, const Tensor& init) {
        Problem s = p;
        s.T = t1 - t0;
        s.q = p.q.slice(1, t0, t1).contiguous();
        s.k = p.k.slice(1, t0, t1).contiguous();
        s.v = p.v.slice(1, t0, t1).contiguous();
        if (mode == DecayMode::DataDependent)
          s.decay.per_token = p.decay.per_token.slice(1, t0, t1).contiguous();
        s.init = init;
        return std::make_pair(s, run_forward(s, 16));
      };
      const auto [p1, o1] = part(0, split, p.init);
      const auto [p2, o2] = part(split, p.T, o1.state);
      EXPECT_LT(rel_err(o2.state.to_vector(), full.state.to_vector()), 1e-12);
      EXPECT_LT(rel_err(o1.o.to_vector(), full.o.slice(1, 0, split).contiguous().to_vector()),
                1e-12);
      EXPECT_LT(rel_err(o2.o.to_vector(), full.o.slice(1, split, p.T).contiguous().to_vector()),
                1e-12);
    }
}

// ----------------------------------------------------------------------------------------------
// Backward

struct Grads {
  Tensor dq, dk, dv, dlog, dinit;
};
Grads run_backward(const Problem& p, const Tensor& d_o, const Tensor& d_state, int chunk) {
  const DType dt = p.q.dtype();
  Grads g{poisoned(p.qkv_shape(), dt),
          poisoned(p.qkv_shape(), dt),
          poisoned(p.qkv_shape(), dt),
          {},
          poisoned(p.state_shape(), dt)};
  if (p.decay.mode == DecayMode::DataDependent) g.dlog = poisoned({p.B, p.T, p.H}, dt);
  linear_attention_backward(g.dq, g.dk, g.dv, g.dlog, g.dinit, p.q, p.k, p.v, p.decay, p.init, d_o,
                            d_state, chunk);
  return g;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of L = <w_o, o> + <w_s, final_state> w.r.t. every element of x.
std::vector<double> finite_difference(Problem& p, Tensor& x, const std::vector<double>& w_o,
                                      const std::vector<double>& w_s, int chunk) {
  const double h = 1e-5;
  std::vector<double> g(x.numel());
  auto loss = [&] {
    const Outputs out = run_forward(p, chunk);
    return dot(out.o.to_vector(), w_o) + dot(out.state.to_vector(), w_s);
  };
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double x0 = x.item(i);
    x.set_item(i, x0 + h);
    const double lp = loss();
    x.set_item(i, x0 - h);
    const double lm = loss();
    x.set_item(i, x0);
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

TEST(LinearAttention, BackwardMatchesFiniteDifferencesForEveryInput) {
  uint32_t seed = 200;
  for (DecayMode mode : kModes)
    for (int chunk : {1, 4, 64}) {
      SCOPED_TRACE(describe(mode, 11, chunk, true));
      Problem p = make_problem(mode, 2, 11, 2, 3, true, DType::F64, seed++);
      std::mt19937 rng(seed++);
      const Tensor w_o = random_tensor(p.qkv_shape(), DType::F64, rng, -1, 1);
      const Tensor w_s = random_tensor(p.state_shape(), DType::F64, rng, -1, 1);
      const auto wo = w_o.to_vector(), ws = w_s.to_vector();
      const Grads g = run_backward(p, w_o, w_s, chunk);
      EXPECT_LT(rel_err(g.dq.to_vector(), finite_difference(p, p.q, wo, ws, chunk)), 1e-7) << "dq";
      EXPECT_LT(rel_err(g.dk.to_vector(), finite_difference(p, p.k, wo, ws, chunk)), 1e-7) << "dk";
      EXPECT_LT(rel_err(g.dv.to_vector(), finite_difference(p, p.v, wo, ws, chunk)), 1e-7) << "dv";
      EXPECT_LT(rel_err(g.dinit.to_vector(), finite_difference(p, p.init, wo, ws, chunk)), 1e-7)
          << "d_initial_state";
      if (mode == DecayMode::DataDependent) {
        EXPECT_LT(
            rel_err(g.dlog.to_vector(), finite_difference(p, p.decay.per_token, wo, ws, chunk)),
            1e-7)
            << "d_log_decay";
      }
    }
}

TEST(LinearAttention, GradientsDoNotDependOnChunkSize) {
  for (DecayMode mode : kModes) {
    SCOPED_TRACE(decay_mode_name(mode));
    const Problem p = make_problem(mode, 2, 100, 2, 4, true, DType::F64, 300);
    std::mt19937 rng(301);
    const Tensor d_o = random_tensor(p.qkv_shape(), DType::F64, rng, -1, 1);
    const Tensor d_s = random_tensor(p.state_shape(), DType::F64, rng, -1, 1);
    const Grads base = run_backward(p, d_o, d_s, 7);
    for (int chunk : {1, 3, 16, 64, 128}) {
      SCOPED_TRACE("chunk=" + std::to_string(chunk));
      const Grads g = run_backward(p, d_o, d_s, chunk);
      EXPECT_LT(rel_err(g.dq.to_vector(), base.dq.to_vector()), 1e-10);
      EXPECT_LT(rel_err(g.dk.to_vector(), base.dk.to_vector()), 1e-10);
      EXPECT_LT(rel_err(g.dv.to_vector(), base.dv.to_vector()), 1e-10);
      EXPECT_LT(rel_err(g.dinit.to_vector(), base.dinit.to_vector()), 1e-10);
      if (mode == DecayMode::DataDependent) {
        EXPECT_LT(rel_err(g.dlog.to_vector(), base.dlog.to_vector()), 1e-10);
      }
    }
  }
}

TEST(LinearAttention, Float32BackwardMatchesFloat64Backward) {
  for (DecayMode mode : kModes) {
    SCOPED_TRACE(decay_mode_name(mode));
    const Problem p64 = make_problem(mode, 2, 150, 2, 8, true, DType::F64, 400);
    Problem p32 = p64;
    p32.q = p64.q.to(DType::F32);
    p32.k = p64.k.to(DType::F32);
    p32.v = p64.v.to(DType::F32);
    p32.init = p64.init.to(DType::F32);
    if (p64.decay.per_head.defined()) p32.decay.per_head = p64.decay.per_head.to(DType::F32);
    if (p64.decay.per_token.defined()) p32.decay.per_token = p64.decay.per_token.to(DType::F32);
    // Round the fp64 problem to fp32 values so both see the same inputs.
    Problem p64r = p32;
    p64r.q = p32.q.to(DType::F64);
    p64r.k = p32.k.to(DType::F64);
    p64r.v = p32.v.to(DType::F64);
    p64r.init = p32.init.to(DType::F64);
    if (p32.decay.per_head.defined()) p64r.decay.per_head = p32.decay.per_head.to(DType::F64);
    if (p32.decay.per_token.defined()) p64r.decay.per_token = p32.decay.per_token.to(DType::F64);
    std::mt19937 rng(401);
    const Tensor d_o = random_tensor(p32.qkv_shape(), DType::F32, rng, -1, 1);
    const Tensor d_s = random_tensor(p32.state_shape(), DType::F32, rng, -1, 1);
    const Grads g32 = run_backward(p32, d_o, d_s, 64);
    const Grads g64 = run_backward(p64r, d_o.to(DType::F64), d_s.to(DType::F64), 64);
    EXPECT_LT(rel_err(g32.dq.to_vector(), g64.dq.to_vector()), 1e-4);
    EXPECT_LT(rel_err(g32.dk.to_vector(), g64.dk.to_vector()), 1e-4);
    EXPECT_LT(rel_err(g32.dv.to_vector(), g64.dv.to_vector()), 1e-4);
    EXPECT_LT(rel_err(g32.dinit.to_vector(), g64.dinit.to_vector()), 1e-4);
    if (mode == DecayMode::DataDependent) {
      EXPECT_LT(rel_err(g32.dlog.to_vector(), g64.dlog.to_vector()), 1e-4);
    }
  }
}

TEST(LinearAttention, BackwardSkipsUndefinedOutputsAndTreatsUndefinedInputsAsZero) {
  const Problem p = make_problem(DecayMode::DataDependent, 2, 30, 2, 4, true, DType::F64, 500);
  std::mt19937 rng(501);
  const Tensor d_o = random_tensor(p.qkv_shape(), DType::F64, rng, -1, 1);
  const Tensor d_s = random_tensor(p.state_shape(), DType::F64, rng, -1, 1);
  const Grads full = run_backward(p, d_o, d_s, 8);

  // Each output alone equals the same output of the full call.
  Tensor none;
  const Tensor* full_out[] = {&full.dq, &full.dk, &full.dv, &full.dlog, &full.dinit};
  for (int which = 0; which < 5; ++which) {
    SCOPED_TRACE("only output #" + std::to_string(which));
    Tensor outs[5];
    outs[which] = poisoned(full_out[which]->shape(), DType::F64);
    linear_attention_backward(outs[0], outs[1], outs[2], outs[3], outs[4], p.q, p.k, p.v, p.decay,
                              p.init, d_o, d_s, 8);
    EXPECT_LT(rel_err(outs[which].to_vector(), full_out[which]->to_vector()), 1e-14);
    for (int i = 0; i < 5; ++i) {
      if (i != which) {
        EXPECT_FALSE(outs[i].defined());
      }
    }
  }
  // Nothing requested: a no-op, not an error.
  Tensor a, b, c, d, e;
  EXPECT_NO_THROW(
      linear_attention_backward(a, b, c, d, e, p.q, p.k, p.v, p.decay, p.init, d_o, d_s));

  // Undefined d_o / d_final_state / initial_state behave as zeros.
  const Tensor zo = Tensor::zeros(p.qkv_shape(), DType::F64);
  const Tensor zs = Tensor::zeros(p.state_shape(), DType::F64);
  auto same = [](const Grads& x, const Grads& y) {
    EXPECT_LT(rel_err(x.dq.to_vector(), y.dq.to_vector()), 1e-14);
    EXPECT_LT(rel_err(x.dk.to_vector(), y.dk.to_vector()), 1e-14);
    EXPECT_LT(rel_err(x.dv.to_vector(), y.dv.to_vector()), 1e-14);
    EXPECT_LT(rel_err(x.dlog.to_vector(), y.dlog.to_vector()), 1e-14);
    EXPECT_LT(rel_err(x.dinit.to_vector(), y.dinit.to_vector()), 1e-14);
  };
  same(run_backward(p, none, d_s, 8), run_backward(p, zo, d_s, 8));
  same(run_backward(p, d_o, none, 8), run_backward(p, d_o, zs, 8));
  Problem no_init = p, zero_init = p;
  no_init.init = Tensor();
  zero_init.init = zs;
  same(run_backward(no_init, d_o, d_s, 8), run_backward(zero_init, d_o, d_s, 8));
}

// q, k, v (inputs) and o, dq, dk, dv (outputs) may be head slices of wider [B, T, H', D]
// tensors (the model's fused q/k/v projection): the same values as with contiguous tensors (the
// NaN around the input slices must not leak in).
TEST(LinearAttention, HeadSlicesOfWiderTensorsGiveTheContiguousResults) {
  for (DecayMode mode : kModes) {
    SCOPED_TRACE(decay_mode_name(mode));
    const Problem p = make_problem(mode, 2, 13, 2, 4, true, DType::F64, 610);
    std::mt19937 rng(611);
    const Tensor d_o = random_tensor(p.qkv_shape(), DType::F64, rng, -1, 1);
    const Tensor d_s = random_tensor(p.state_shape(), DType::F64, rng, -1, 1);
    const Outputs want = run_forward(p, 4);
    const Grads want_g = run_backward(p, d_o, d_s, 4);
    const int64_t H = p.H;
    // Inputs: heads [0, H), [H, 2H), [2H, 3H) of one [B, T, 3H, D] tensor.
    Tensor qkv = poisoned({p.B, p.T, 3 * H, p.D}, DType::F64);
    Problem s = p;
    Tensor* parts[] = {&s.q, &s.k, &s.v};
    for (int i = 0; i < 3; ++i) {
      Tensor slice = qkv.slice(2, i * H, (i + 1) * H);
      slice.copy_from(*parts[i]);
      *parts[i] = slice;
    }
    ASSERT_FALSE(s.q.is_contiguous());
    Tensor wide = poisoned({p.B, p.T, 4 * H, p.D}, DType::F64);  // o, dq, dk, dv
    Tensor o = wide.slice(2, 0, H), dq = wide.slice(2, H, 2 * H), dk = wide.slice(2, 2 * H, 3 * H),
           dv = wide.slice(2, 3 * H, 4 * H);
    Tensor state = poisoned(p.state_shape(), DType::F64), dinit = poisoned(p.state_shape(), DType::F64);
    Tensor dlog = mode == DecayMode::DataDependent ? poisoned({p.B, p.T, p.H}, DType::F64) : Tensor();
    linear_attention_forward(o, state, s.q, s.k, s.v, s.decay, s.init, 4);
    linear_attention_backward(dq, dk, dv, dlog, dinit, s.q, s.k, s.v, s.decay, s.init, d_o, d_s, 4);
    EXPECT_EQ(o.contiguous().to_vector(), want.o.to_vector());
    EXPECT_EQ(state.to_vector(), want.state.to_vector());
    EXPECT_EQ(dq.contiguous().to_vector(), want_g.dq.to_vector());
    EXPECT_EQ(dk.contiguous().to_vector(), want_g.dk.to_vector());
    EXPECT_EQ(dv.contiguous().to_vector(), want_g.dv.to_vector());
    EXPECT_EQ(dinit.to_vector(), want_g.dinit.to_vector());
    if (dlog.defined()) {
      EXPECT_EQ(dlog.to_vector(), want_g.dlog.to_vector());
    }
  }
  // A slice whose heads are not packed (a D slice) is refused, naming the tensor.
  const Problem p = make_problem(DecayMode::None, 1, 5, 2, 4, false, DType::F64, 612);
  Tensor wide_d = Tensor::zeros({1, 5, 2, 8}, DType::F64);
  Tensor o = Tensor::empty(p.qkv_shape(), DType::F64), state;
  try {
    linear_attention_forward(o, state, wide_d.slice(3, 0, 4), p.k, p.v, p.decay, p.init, 4);
    ADD_FAILURE() << "a q with unpacked heads was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q must be contiguous or [B, T, H, D] with packed heads"), std::string::npos)
        << e.what();
  }
}

TEST(LinearAttention, RejectsBadInput) {
  const Problem p = make_problem(DecayMode::None, 2, 10, 2, 4, true, DType::F64, 600);
  Tensor o = Tensor::empty(p.qkv_shape(), DType::F64),
         s = Tensor::empty(p.state_shape(), DType::F64);
  Decay none;
  // Mismatched shapes.
  const Tensor short_k = p.k.slice(1, 0, 9).contiguous();
  EXPECT_THROW(linear_attention_forward(o, s, p.q, short_k, p.v, none, p.init), Error);
  Tensor bad_o = Tensor::empty({2, 10, 2, 3}, DType::F64);
  EXPECT_THROW(linear_attention_forward(bad_o, s, p.q, p.k, p.v, none, p.init), Error);
  const Tensor bad_state = Tensor::zeros({2, 2, 4, 3}, DType::F64);
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, none, bad_state), Error);
  EXPECT_THROW(linear_attention_forward(o, s, p.q.view({2, 10, 8}), p.k, p.v, none, p.init), Error);
  // Wrong dtypes: mixed fp32 / fp64, and bf16 on CPU.
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k.to(DType::F32), p.v, none, p.init), Error);
  Tensor o32 = Tensor::empty(p.qkv_shape(), DType::F32);
  EXPECT_THROW(linear_attention_forward(o32, s, p.q, p.k, p.v, none, p.init), Error);
  const Tensor qb = Tensor::zeros(p.qkv_shape(), DType::BF16);
  Tensor ob = Tensor::empty(p.qkv_shape(), DType::BF16), sb;
  EXPECT_THROW(linear_attention_forward(ob, sb, qb, qb, qb, none, Tensor()), Error);
  // Decay tensors missing, misshapen or positive.
  Decay constant{DecayMode::Constant, {}, {}};
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, constant, p.init), Error);
  constant.per_head = Tensor::full({3}, -0.1, DType::F64);
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, constant, p.init), Error);
  constant.per_head = Tensor::full({2}, 0.1, DType::F64);
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, constant, p.init), Error);
  Decay data{DecayMode::DataDependent, {}, {}};
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, data, p.init), Error);
  data.per_token = Tensor::full({2, 10, 3}, -0.1, DType::F64);
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, data, p.init), Error);
  // Chunk length.
  EXPECT_THROW(linear_attention_forward(o, s, p.q, p.k, p.v, none, p.init, 0), Error);
  // Backward: d_log_decay outside DataDependent, misshapen gradients.
  Tensor dq, dk, dv, dinit;
  Tensor dlog = Tensor::empty({2, 10, 2}, DType::F64);
  EXPECT_THROW(
      linear_attention_backward(dq, dk, dv, dlog, dinit, p.q, p.k, p.v, none, p.init, o, s), Error);
  Tensor no_dlog, bad_dq = Tensor::empty({2, 10, 2, 5}, DType::F64);
  EXPECT_THROW(
      linear_attention_backward(bad_dq, dk, dv, no_dlog, dinit, p.q, p.k, p.v, none, p.init, o, s),
      Error);
  const Tensor bad_do = Tensor::zeros({2, 9, 2, 4}, DType::F64);
  EXPECT_THROW(
      linear_attention_backward(dq, dk, dv, no_dlog, dinit, p.q, p.k, p.v, none, p.init, bad_do, s),
      Error);
  // The error names the function and the argument.
  try {
    linear_attention_forward(o, s, p.q, short_k, p.v, none, p.init);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("linear_attention_forward: k"), std::string::npos)
        << e.what();
  }
}

TEST(LinearAttention, DecayModeNamesRoundTrip) {
  for (DecayMode m : kModes) EXPECT_EQ(decay_mode_from_name(decay_mode_name(m)), m);
  EXPECT_STREQ(decay_mode_name(DecayMode::DataDependent), "data");
  EXPECT_THROW(decay_mode_from_name("gated"), Error);
}

}  // namespace
}  // namespace lasp
