// Softmax attention (kernels/attention.h) against a naive float64 reference written here, central
// finite differences for the backward, and the key-split / log-sum-exp merge used by ring
// attention.
#include "kernels/attention.h"

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
const double kInf = std::numeric_limits<double>::infinity();

Tensor random_tensor(const Shape& shape, DType dt, std::mt19937& rng, double lo = -1,
                     double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> vals(shape_numel(shape));
  for (double& x : vals) x = u(rng);
  return Tensor::from_values(vals, shape, dt);
}

double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double e = std::fabs(got[i] - want[i]);
    err = std::isnan(e) ? kInf : std::max(err, e);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return err / (scale > 0 ? scale : 1.0);
}

struct Config {
  int64_t B, Tq, Tk, Hq, Hkv, D;
  bool causal;
  int64_t q_offset;
  std::string str() const {
    return "B=" + std::to_string(B) + " Tq=" + std::to_string(Tq) + " Tk=" + std::to_string(Tk) +
           " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) +
           (causal ? " causal" : " full") + " q_offset=" + std::to_string(q_offset);
  }
  Shape q_shape() const { return {B, Tq, Hq, D}; }
  Shape k_shape() const { return {B, Tk, Hkv, D}; }
  Shape lse_shape() const { return {B, Hq, Tq}; }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(D)); }
};

struct Inputs {
  Tensor q, k, v;
};
Inputs make_inputs(const Config& c, DType dt, uint32_t seed, double amplitude = 1.0) {
  std::mt19937 rng(seed);
  return {random_tensor(c.q_shape(), dt, rng, -amplitude, amplitude),
          random_tensor(c.k_shape(), dt, rng, -amplitude, amplitude),
          random_tensor(c.k_shape(), dt, rng, -amplitude, amplitude)};
}

// Straight from the header's definition, one query row at a time, in float64.
struct Reference {
  std::vector<double> o, lse;
};
Reference reference_attention(const Config& c, const Inputs& in, double scale) {
  const auto q = in.q.to_vector(), k = in.k.to_vector(), v = in.v.to_vector();
  Reference r{std::vector<double>(q.size(), 0.0), std::vector<double>(c.B * c.Hq * c.Tq)};
  const int64_t D = c.D, group = c.Hq / c.Hkv;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Tq; ++i) {
        const double* qi = &q[((b * c.Tq + i) * c.Hq + h) * D];
        std::vector<double> s;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (c.causal && j > c.q_offset + i) continue;
          const double* kj = &k[((b * c.Tk + j) * c.Hkv + h / group) * D];
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += qi[x] * kj[x];
          s.push_back(scale * dot);
          keys.push_back(j);
        }
        double& lse = r.lse[(b * c.Hq + h) * c.Tq + i];
        if (s.empty()) {
          lse = -kInf;
          continue;
        }
        const double m = *std::max_element(s.begin(), s.end());
        double l = 0;
        for (double x : s) l += std::exp(x - m);
        lse = m + std::log(l);
        double* oi = &r.o[((b * c.Tq + i) * c.Hq + h) * D];
        for (size_t n = 0; n < keys.size(); ++n) {
          const double p = std::exp(s[n] - lse);
          const double* vj = &v[((b * c.Tk + keys[n]) * c.Hkv + h / group) * D];
          for (int64_t x = 0; x < D; ++x) oi[x] += p * vj[x];
        }
      }
  return r;
}

struct Forward {
  Tensor o, lse;
};
Forward run_forward(const Config& c, const Inputs& in) {
  const DType dt = in.q.dtype();
  Forward f{Tensor::full(c.q_shape(), kNaN, dt), Tensor::full(c.lse_shape(), kNaN, dt)};
  attention_forward(f.o, f.lse, in.q, in.k, in.v, c.scale(), c.causal, c.q_offset);
  return f;
}

// lse agrees where finite (absolute, lse is O(1)) and is -inf exactly where the reference is.
void expect_lse_near(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i])) {
      EXPECT_EQ(got[i], want[i]) << "lse[" << i << "]";
    } else {
      EXPECT_NEAR(got[i], want[i], tol) << "lse[" << i << "]";
    }
  }
}

const std::vector<Config>& forward_configs() {
  static const std::vector<Config> configs = {
      {2, 37, 37, 2, 2, 7, true, 0},     // causal, odd sizes
      {2, 37, 37, 2, 2, 7, false, 0},    // non-causal
      {1, 23, 23, 4, 2, 5, true, 0},     // GQA 4:2
      {1, 23, 31, 4, 1, 5, false, 0},    // GQA 4:1, Tk != Tq
      {2, 21, 90, 4, 2, 6, true, 69},    // q_offset: last queries of a longer key range
      {1, 21, 90, 2, 2, 6, true, 30},    // q_offset: some keys never visible
      {1, 130, 130, 2, 1, 8, true, 0},   // several query blocks
      {1, 130, 200, 2, 2, 8, false, 0},  // several query blocks, non-causal
  };
  return configs;
}

TEST(Attention, ForwardMatchesNaiveReference) {
  uint32_t seed = 1;
  for (const Config& c : forward_configs())
    for (DType dt : {DType::F64, DType::F32}) {
      SCOPED_TRACE(c.str() + " " + dtype_name(dt));
      const Inputs in = make_inputs(c, dt, seed++);
      const Reference ref = reference_attention(c, in, c.scale());
      const Forward f = run_forward(c, in);
      const bool f64 = dt == DType::F64;
      EXPECT_LT(rel_err(f.o.to_vector(), ref.o), f64 ? 1e-12 : 1e-5);
      expect_lse_near(f.lse.to_vector(), ref.lse, f64 ? 1e-12 : 1e-5);
    }
}

TEST(Attention, RowsWithoutVisibleKeysGiveZeroOutputAndMinusInfLse) {
  // Negative offset: the first 5 queries precede every key.
  const Config c{1, 12, 10, 2, 1, 4, true, -5};
  const Inputs in = make_inputs(c, DType::F64, 5);
  const Reference ref = reference_attention(c, in, c.scale());
  const Forward f = run_forward(c, in);
  const auto o = f.o.to_vector(), lse = f.lse.to_vector();
  for (int64_t h = 0; h < c.Hq; ++h)
    for (int64_t i = 0; i < 5; ++i) {
      EXPECT_EQ(lse[h * c.Tq + i], -kInf);
      for (int64_t x = 0; x < c.D; ++x) EXPECT_EQ(o[(i * c.Hq + h) * c.D + x], 0.0);
    }
  EXPECT_LT(rel_err(o, ref.o), 1e-12);
  expect_lse_near(lse, ref.lse, 1e-12);
  // A key range that nobody sees at all.
  const Config none{1, 4, 6, 1, 1, 3, true, -10};
  const Forward g = run_forward(none, make_inputs(none, DType::F64, 6));
  for (double x : g.o.to_vector()) EXPECT_EQ(x, 0.0);
  for (double x : g.lse.to_vector()) EXPECT_EQ(x, -kInf);
}

TEST(Attention, LargeScoresStayFinite) {
  // Scores up to ~ 8 * 16 * 20 = 2560: exp overflows without the row max.
  const Config c{1, 40, 40, 2, 2, 8, true, 0};
  for (DType dt : {DType::F64, DType::F32}) {
    const Inputs in = make_inputs(c, dt, 7, 4.0);
    const Reference ref = reference_attention(c, in, 20.0);
    Forward f{Tensor::full(c.q_shape(), kNaN, dt), Tensor::full(c.lse_shape(), kNaN, dt)};
    attention_forward(f.o, f.lse, in.q, in.k, in.v, 20.0f, true, 0);
    for (double x : f.o.to_vector()) ASSERT_TRUE(std::isfinite(x));
    EXPECT_LT(rel_err(f.o.to_vector(), ref.o), dt == DType::F64 ? 1e-12 : 1e-3);
    expect_lse_near(f.lse.to_vector(), ref.lse, dt == DType::F64 ? 1e-9 : 1e-2);
  }
}

// ----------------------------------------------------------------------------------------------
// Backward

struct Grads {
  Tensor dq, dk, dv;
};
Grads run_backward(const Config& c, const Inputs& in, const Forward& f, const Tensor& d_o) {
  const DType dt = in.q.dtype();
  Grads g{Tensor::full(c.q_shape(), kNaN, dt), Tensor::full(c.k_shape(), kNaN, dt),
          Tensor::full(c.k_shape(), kNaN, dt)};
  attention_backward(g.dq, g.dk, g.dv, in.q, in.k, in.v, f.o, f.lse, d_o, c.scale(), c.causal,
                     c.q_offset);
  return g;
}

// Central differences of <w, o> with respect to every element of x (one of in.q, in.k, in.v).
std::vector<double> finite_difference(const Config& c, Inputs& in, Tensor& x,
                                      const std::vector<double>& w) {
  const double h = 1e-6;
  auto loss = [&] {
    const auto o = run_forward(c, in).o.to_vector();
    double s = 0;
    for (size_t i = 0; i < o.size(); ++i) s += w[i] * o[i];
    return s;
  };
  std::vector<double> g(x.numel());
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

TEST(Attention, BackwardMatchesFiniteDifferences) {
  const Config configs[] = {
      {2, 9, 9, 2, 2, 3, true, 0},   {1, 9, 13, 4, 2, 3, false, 0}, {1, 9, 13, 4, 2, 3, true, 0},
      {1, 7, 20, 2, 1, 4, true, 10}, {1, 9, 9, 2, 1, 3, true, -3},  // rows without keys
  };
  uint32_t seed = 100;
  for (const Config& c : configs) {
    SCOPED_TRACE(c.str());
    Inputs in = make_inputs(c, DType::F64, seed++);
    std::mt19937 rng(seed++);
    const Tensor w = random_tensor(c.q_shape(), DType::F64, rng);
    const auto wv = w.to_vector();
    const Grads g = run_backward(c, in, run_forward(c, in), w);
    EXPECT_LT(rel_err(g.dq.to_vector(), finite_difference(c, in, in.q, wv)), 1e-7) << "dq";
    EXPECT_LT(rel_err(g.dk.to_vector(), finite_difference(c, in, in.k, wv)), 1e-7) << "dk";
    EXPECT_LT(rel_err(g.dv.to_vector(), finite_difference(c, in, in.v, wv)), 1e-7) << "dv";
  }
}

TEST(Attention, Float32BackwardMatchesFloat64Backward) {
  const Config c{2, 70, 90, 4, 2, 16, true, 20};
  const Inputs in32 = make_inputs(c, DType::F32, 150);
  const Inputs in64{in32.q.to(DType::F64), in32.k.to(DType::F64), in32.v.to(DType::F64)};
  std::mt19937 rng(151);
  const Tensor d_o = random_tensor(c.q_shape(), DType::F32, rng);
  const Grads g32 = run_backward(c, in32, run_forward(c, in32), d_o);
  const Grads g64 = run_backward(c, in64, run_forward(c, in64), d_o.to(DType::F64));
  EXPECT_LT(rel_err(g32.dq.to_vector(), g64.dq.to_vector()), 1e-4);
  EXPECT_LT(rel_err(g32.dk.to_vector(), g64.dk.to_vector()), 1e-4);
  EXPECT_LT(rel_err(g32.dv.to_vector(), g64.dv.to_vector()), 1e-4);
}

// Ring attention: each key block is processed separately, partial results are merged with the
// log-sum-exp rule, and the backward of each block with the MERGED o and lse gives that block's
// dk, dv and a summand of dq.
TEST(Attention, BackwardOnKeyBlocksWithMergedLseSumsToFullBackward) {
  struct Case {
    Config c;
    int64_t split;
  };
  const Case cases[] = {
      {{2, 50, 50, 4, 2, 5, true, 0}, 23},   // causal: queries before the split see no block-2 key
      {{1, 50, 50, 4, 2, 5, false, 0}, 23},  // non-causal
      {{1, 20, 60, 2, 1, 6, true, 40}, 25},  // q_offset > 0, Tk > Tq
      {{1, 70, 70, 2, 2, 4, true, 0}, 66},   // more than one query block
  };
  uint32_t seed = 200;
  for (const Case& cs : cases) {
    const Config& c = cs.c;
    SCOPED_TRACE(c.str() + " split=" + std::to_string(cs.split));
    const Inputs in = make_inputs(c, DType::F64, seed++);
    std::mt19937 rng(seed++);
    const Tensor d_o = random_tensor(c.q_shape(), DType::F64, rng);
    const Forward full = run_forward(c, in);
    const Grads full_g = run_backward(c, in, full, d_o);

    // Key block [t0, t1): local key j has global position t0 + j, so the offset shifts by -t0.
    auto block = [&](int64_t t0, int64_t t1) {
      Config bc = c;
      bc.Tk = t1 - t0;
      bc.q_offset = c.q_offset - t0;
      Inputs bi{in.q, in.k.slice(1, t0, t1).contiguous(), in.v.slice(1, t0, t1).contiguous()};
      return std::make_pair(bc, bi);
    };
    const auto [c1, in1] = block(0, cs.split);
    const auto [c2, in2] = block(cs.split, c.Tk);
    const Forward f1 = run_forward(c1, in1), f2 = run_forward(c2, in2);

    // Merge: lse = logaddexp(lse1, lse2), o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2.
    const auto o1 = f1.o.to_vector(), o2 = f2.o.to_vector();
    const auto l1 = f1.lse.to_vector(), l2 = f2.lse.to_vector();
    std::vector<double> o(o1.size()), lse(l1.size());
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.Hq; ++h)
        for (int64_t i = 0; i < c.Tq; ++i) {
          const int64_t li = (b * c.Hq + h) * c.Tq + i;
          const double m = std::max(l1[li], l2[li]);
          const double l =
              std::isinf(m) ? m : m + std::log(std::exp(l1[li] - m) + std::exp(l2[li] - m));
          lse[li] = l;
          const double w1 = std::isinf(l) ? 0 : std::exp(l1[li] - l);
          const double w2 = std::isinf(l) ? 0 : std::exp(l2[li] - l);
          for (int64_t x = 0; x < c.D; ++x) {
            const int64_t oi = ((b * c.Tq + i) * c.Hq + h) * c.D + x;
            o[oi] = w1 * o1[oi] + w2 * o2[oi];
          }
        }
    EXPECT_LT(rel_err(o, full.o.to_vector()), 1e-12);
    expect_lse_near(lse, full.lse.to_vector(), 1e-12);

    const Forward merged{Tensor::from_values(o, c.q_shape(), DType::F64),
                         Tensor::from_values(lse, c.lse_shape(), DType::F64)};
    const Grads g1 = run_backward(c1, in1, merged, d_o), g2 = run_backward(c2, in2, merged, d_o);
    std::vector<double> dq = g1.dq.to_vector();
    const auto dq2 = g2.dq.to_vector();
    for (size_t i = 0; i < dq.size(); ++i) dq[i] += dq2[i];
    EXPECT_LT(rel_err(dq, full_g.dq.to_vector()), 1e-11);
    EXPECT_LT(rel_err(g1.dk.to_vector(), full_g.dk.slice(1, 0, cs.split).contiguous().to_vector()),
              1e-11);
    EXPECT_LT(
        rel_err(g2.dk.to_vector(), full_g.dk.slice(1, cs.split, c.Tk).contiguous().to_vector()),
        1e-11);
    EXPECT_LT(rel_err(g1.dv.to_vector(), full_g.dv.slice(1, 0, cs.split).contiguous().to_vector()),
              1e-11);
    EXPECT_LT(
        rel_err(g2.dv.to_vector(), full_g.dv.slice(1, cs.split, c.Tk).contiguous().to_vector()),
        1e-11);
  }
}

TEST(Attention, BackwardSkipsUndefinedGradients) {
  const Config c{1, 20, 20, 2, 1, 4, true, 0};
  const Inputs in = make_inputs(c, DType::F64, 300);
  std::mt19937 rng(301);
  const Tensor d_o = random_tensor(c.q_shape(), DType::F64, rng);
  const Forward f = run_forward(c, in);
  const Grads full = run_backward(c, in, f, d_o);
  Tensor dq, dk, dv = Tensor::full(c.k_shape(), kNaN, DType::F64);
  attention_backward(dq, dk, dv, in.q, in.k, in.v, f.o, f.lse, d_o, c.scale(), true, 0);
  EXPECT_FALSE(dq.defined());
  EXPECT_LT(rel_err(dv.to_vector(), full.dv.to_vector()), 1e-14);
}

TEST(Attention, RejectsBadInput) {
  const Config c{1, 8, 8, 4, 2, 4, true, 0};
  const Inputs in = make_inputs(c, DType::F64, 400);
  Tensor o = Tensor::empty(c.q_shape(), DType::F64), lse = Tensor::empty(c.lse_shape(), DType::F64);
  const float s = c.scale();
  // Query heads not a multiple of kv heads.
  const Tensor k3 = Tensor::zeros({1, 8, 3, 4}, DType::F64);
  EXPECT_THROW(attention_forward(o, lse, in.q, k3, k3, s, true), Error);
  // Head dim mismatch, v unlike k, wrong output shapes.
  const Tensor k5 = Tensor::zeros({1, 8, 2, 5}, DType::F64);
  EXPECT_THROW(attention_forward(o, lse, in.q, k5, k5, s, true), Error);
  EXPECT_THROW(attention_forward(o, lse, in.q, in.k, in.v.slice(1, 0, 7).contiguous(), s, true),
               Error);
  Tensor bad_o = Tensor::empty({1, 8, 2, 4}, DType::F64);
  EXPECT_THROW(attention_forward(bad_o, lse, in.q, in.k, in.v, s, true), Error);
  Tensor bad_lse = Tensor::empty({1, 8, 4}, DType::F64);
  EXPECT_THROW(attention_forward(o, bad_lse, in.q, in.k, in.v, s, true), Error);
  Tensor undefined;
  EXPECT_THROW(attention_forward(undefined, lse, in.q, in.k, in.v, s, true), Error);
  // Mixed and unsupported dtypes on CPU.
  EXPECT_THROW(attention_forward(o, lse, in.q, in.k.to(DType::F32), in.v, s, true), Error);
  Tensor lse32 = Tensor::empty(c.lse_shape(), DType::F32);
  EXPECT_THROW(attention_forward(o, lse32, in.q, in.k, in.v, s, true), Error);
  const Tensor qb = Tensor::zeros(c.q_shape(), DType::BF16),
               kb = Tensor::zeros(c.k_shape(), DType::BF16);
  Tensor ob = Tensor::empty(c.q_shape(), DType::BF16), lb;
  EXPECT_THROW(attention_forward(ob, lb, qb, kb, kb, s, true), Error);
  // Backward: lse required, gradient shapes checked.
  attention_forward(o, lse, in.q, in.k, in.v, s, true);
  Tensor dq, dk, dv;
  EXPECT_THROW(attention_backward(dq, dk, dv, in.q, in.k, in.v, o, undefined, o, s, true), Error);
  Tensor bad_dk = Tensor::empty(c.q_shape(), DType::F64);
  EXPECT_THROW(attention_backward(dq, bad_dk, dv, in.q, in.k, in.v, o, lse, o, s, true), Error);
}

}  // namespace
}  // namespace lasp
