// Scalar low-precision math shared by the CUDA quantizers (kernels/quantize.cu) and compiled for
// the host too, so tests can check it against the CPU reference (core/dtype.cc,
// kernels/quantize.cc) code for code without a GPU.
//
// Every rule here mirrors the CPU code exactly: round to nearest, ties to even, saturating
// encoders (the only mode the quantizers use), the same float expressions in the same order
// (so no fused multiply-add can change a result: there is no a * b + c below in float), and the
// counter-based draws of kernels/counter_rng.h for stochastic rounding.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "kernels/counter_rng.h"

namespace lasp::qmath {

LASP_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}

LASP_HOST_DEVICE inline float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

LASP_HOST_DEVICE inline float quiet_nan() { return bits_float(0x7FC00000u); }

// 2^e for e in [-149, 127], exact (subnormal below -126).
LASP_HOST_DEVICE inline float pow2(int e) {
  if (e >= -126) return bits_float(static_cast<uint32_t>(e + 127) << 23);
  return bits_float(1u << (e + 149));
}

// Saturating RTN-even encode of a finite a >= 0 onto a 1.EBITS.MBITS format with bias BIAS;
// returns the code without the sign, capped at max_code (the largest finite value's code).
// With exp = max(floor(log2 a), min_exp) and r = rint(a / 2^(exp - MBITS)), the code is
// ((exp + BIAS - 1) << MBITS) + r: r in [2^MBITS, 2^(MBITS+1)] for normal results (a carry
// r = 2^(MBITS+1) lands on the next binade's code), and exp = min_exp gives subnormals code r.
template <int EBITS, int MBITS, int BIAS>
LASP_HOST_DEVICE inline uint32_t encode_abs_saturating(float a, uint32_t max_code) {
  constexpr int kMinExp = 1 - BIAS;
  int exp = static_cast<int>((float_bits(a) >> 23) & 0xFFu) - 127;  // zero/subnormal: clamped
  if (exp < kMinExp) exp = kMinExp;
  const float r = rintf(a * pow2(MBITS - exp));  // the scaling is exact (power of two)
  const uint32_t code =
      (static_cast<uint32_t>(exp + BIAS - 1) << MBITS) + static_cast<uint32_t>(r);
  return code > max_code ? max_code : code;
}

// ---- E4M3 ("fn": no inf, S.1111.111 = NaN, max 448)
LASP_HOST_DEVICE inline uint8_t e4m3_encode(float x) {
  const uint32_t sign = (float_bits(x) >> 31) << 7;
  if (isnan(x)) return static_cast<uint8_t>(sign | 0x7Fu);
  const float a = fabsf(x);
  if (isinf(a)) return static_cast<uint8_t>(sign | 0x7Eu);
  return static_cast<uint8_t>(sign | encode_abs_saturating<4, 3, 7>(a, 0x7Eu));
}
LASP_HOST_DEVICE inline float e4m3_decode(uint8_t c) {
  const uint32_t exp = (c >> 3) & 0xFu, mant = c & 0x7u;
  float v;
  if ((c & 0x7Fu) == 0x7Fu) {
    v = quiet_nan();
  } else if (exp == 0) {
    v = static_cast<float>(mant) * pow2(-9);
  } else {
    v = static_cast<float>(8u + mant) * pow2(static_cast<int>(exp) - 10);
  }
  return (c & 0x80u) ? -v : v;
}

// ---- E5M2 (IEEE-like, max 57344)
LASP_HOST_DEVICE inline uint8_t e5m2_encode(float x) {
  const uint32_t sign = (float_bits(x) >> 31) << 7;
  if (isnan(x)) return static_cast<uint8_t>(sign | 0x7Eu);
  const float a = fabsf(x);
  if (isinf(a)) return static_cast<uint8_t>(sign | 0x7Bu);
  return static_cast<uint8_t>(sign | encode_abs_saturating<5, 2, 15>(a, 0x7Bu));
}
LASP_HOST_DEVICE inline float e5m2_decode(uint8_t c) {
  const uint32_t exp = (c >> 2) & 0x1Fu, mant = c & 0x3u;
  float v;
  if (exp == 31) {
    v = mant == 0 ? bits_float(0x7F800000u) : quiet_nan();
  } else if (exp == 0) {
    v = static_cast<float>(mant) * pow2(-16);
  } else {
    v = static_cast<float>(4u + mant) * pow2(static_cast<int>(exp) - 17);
  }
  return (c & 0x80u) ? -v : v;
}

// ---- E2M1 (code in the low nibble; saturates to +-6, NaN encodes as +-6)
LASP_HOST_DEVICE inline uint8_t e2m1_encode(float x) {
  const uint32_t sign = (float_bits(x) >> 31) << 3;
  const float a = fabsf(x);
  if (isnan(x) || isinf(a)) return static_cast<uint8_t>(sign | 0x7u);
  return static_cast<uint8_t>(sign | encode_abs_saturating<2, 1, 1>(a, 0x7u));
}
LASP_HOST_DEVICE inline float e2m1_decode(uint8_t c) {
  const uint32_t exp = (c >> 1) & 0x3u, mant = c & 0x1u;
  const float v = exp == 0 ? 0.5f * static_cast<float>(mant)
                           : static_cast<float>(2u + mant) * pow2(static_cast<int>(exp) - 2);
  return (c & 0x8u) ? -v : v;
}

// ---- E8M0 (2^(c - 127), 0xFF = NaN)
LASP_HOST_DEVICE inline float e8m0_decode(uint8_t c) {
  return c == 0xFF ? quiet_nan() : pow2(static_cast<int>(c) - 127);
}
// The largest power of two <= x (x > 0 finite), clamped to [2^-127, 2^127]: for normal x that
// is the biased exponent field itself; subnormals clamp to code 0.
LASP_HOST_DEVICE inline uint8_t e8m0_floor(float x) {
  return static_cast<uint8_t>((float_bits(x) >> 23) & 0xFFu);
}

// ---- helpers of kernels/quantize.cc, same expressions

constexpr float kE4M3MaxF = 448.0f;
constexpr float kE5M2MaxF = 57344.0f;
constexpr float kE2M1MaxF = 6.0f;
constexpr float kQuestAlpha = 2.92247856f;  // = kQuestAlphaE2M1 in quantize.h

// Stochastic rounding of v onto the E2M1 grid: up when u < (|v| - lo) / (hi - lo). Without
// loops or a division (the grid 0, .5, 1, 1.5, 2, 3, 4, 6 is monotone, so lo is a count of
// comparisons; hi - lo is 0.5, 1 or 2, and dividing by a power of two is multiplying by its
// exact reciprocal): the same results as the CPU's search and division.
LASP_HOST_DEVICE inline uint8_t e2m1_round_stochastic(float v, float u) {
  const uint32_t sign = (float_bits(v) >> 31) << 3;
  const float a = fminf(fabsf(v), kE2M1MaxF);
  const uint32_t lo = static_cast<uint32_t>(a >= 0.5f) + (a >= 1.0f) + (a >= 1.5f) + (a >= 2.0f) +
                      (a >= 3.0f) + (a >= 4.0f) + (a >= 6.0f);
  if (lo == 7) return static_cast<uint8_t>(sign | 7u);
  const float glo = e2m1_decode(static_cast<uint8_t>(lo));
  if (glo == a) return static_cast<uint8_t>(sign | lo);
  const float inv_step = lo < 4 ? 2.0f : lo < 6 ? 1.0f : 0.5f;
  const float p = (a - glo) * inv_step;
  return static_cast<uint8_t>(sign | (u < p ? lo + 1u : lo));
}

// Smallest E4M3 code whose value is >= s (s > 0 finite), capped at 448.
LASP_HOST_DEVICE inline uint8_t e4m3_ceil(float s) {
  if (s >= kE4M3MaxF) return 0x7E;
  uint8_t code = e4m3_encode(s);
  if (e4m3_decode(code) < s) ++code;
  return code;
}

// Smallest power of two X with a / X <= 6 (a > 0).
LASP_HOST_DEVICE inline uint8_t e8m0_no_clip(float a) {
  int code = e8m0_floor(a / kE2M1MaxF);
  while (code < 254 && a / e8m0_decode(static_cast<uint8_t>(code)) > kE2M1MaxF) ++code;
  return static_cast<uint8_t>(code);
}

// One FP4 group's rules (quantize_fp4 in quantize.cc, modes Nearest, Quest, Stochastic).
struct Fp4GroupRule {
  bool mx = true;          // MXFP4 (E8M0 scales) or NVFP4 (E4M3 scales)
  bool quest = false;      // QuEST clipping (MXFP4 + Nearest)
  bool stochastic = false;  // stochastic element rounding
  bool no_clip_scale = false;  // the unbiased modes' scale with round-to-nearest elements (MS-EDEN)
  float tensor_scale = 1.0f;
  uint64_t seed = 0, stream = 0;
};

// Quantizes elements [c0, c1) of one row: `load(c)` returns x[row, c] as float, `flat` is the
// row's first flat element index (row * cols, the SR draw address). Writes codes[c] (and
// mask[c] when mask != nullptr) for the group and returns the group's scale code.
template <typename Load>
LASP_HOST_DEVICE inline uint8_t fp4_quantize_group(const Load& load, int64_t c0, int64_t c1,
                                                   uint64_t flat, const Fp4GroupRule& rule,
                                                   uint8_t* codes, uint8_t* mask) {
  float gmax = 0.0f;
  double sumsq = 0.0;  // x * x is exact in double, so fused or not the sum is the same
  for (int64_t c = c0; c < c1; ++c) {
    const float x = load(c);
    gmax = fmaxf(gmax, fabsf(x));
    sumsq += static_cast<double>(x) * x;
  }
  const float ts = rule.tensor_scale;
  uint8_t sc;
  if (gmax == 0.0f) {
    sc = rule.mx ? 127 : 0;
  } else if (rule.mx && rule.quest) {
    const float rms = static_cast<float>(sqrt(sumsq / static_cast<double>(c1 - c0)));
    sc = e8m0_floor(fmaxf(kQuestAlpha * rms / kE2M1MaxF, 1e-38f));
  } else if (rule.mx && !rule.stochastic && !rule.no_clip_scale) {
    const int e = static_cast<int>(e8m0_floor(gmax)) - 2;
    sc = static_cast<uint8_t>(e > 0 ? e : 0);
  } else if (rule.mx) {
    sc = e8m0_no_clip(gmax);
  } else if (!rule.stochastic && !rule.no_clip_scale) {
    sc = e4m3_encode(gmax / kE2M1MaxF / ts);
  } else {
    sc = e4m3_ceil(gmax / kE2M1MaxF / ts);
  }
  const float s = rule.mx ? e8m0_decode(sc) : e4m3_decode(sc);
  // MXFP4 divides by a power of two (E8M0, tensor scale 1): multiplying by its exact reciprocal
  // gives the correctly rounded quotient too, i.e. the CPU's x / (s ts) bit for bit.
  const float d = s * ts;
  const bool by_reciprocal = rule.mx && ts == 1.0f;
  const float r = 1.0f / d;
  PhiloxElementDraws draw(rule.seed, rule.stream);
  for (int64_t c = c0; c < c1; ++c) {
    if (s == 0.0f) {
      codes[c] = 0;
      if (mask) mask[c] = 1;
      continue;
    }
    const float v = by_reciprocal ? load(c) * r : load(c) / d;
    if (mask) mask[c] = fabsf(v) <= kE2M1MaxF ? 1 : 0;
    codes[c] = rule.stochastic ? e2m1_round_stochastic(v, draw(flat + static_cast<uint64_t>(c))) : e2m1_encode(v);
  }
  return sc;
}

// ---------------------------------------------------------------- MS-EDEN scale correction
// Stochastic rounding of a positive scale onto the E4M3 / E8M0 grid (u uniform in [0, 1)): up
// with probability (s - lo) / (hi - lo). The CPU's e4m3_round_stochastic / e8m0_round_stochastic
// check their argument and call these.
LASP_HOST_DEVICE inline uint8_t e4m3_round_stochastic_code(float s, float u) {
  if (s >= kE4M3MaxF) return 0x7E;
  uint8_t code = e4m3_encode(s);
  if (e4m3_decode(code) > s) --code;  // positive codes are ordered like their values
  const float lo = e4m3_decode(code);
  if (lo == s) return code;
  const float hi = e4m3_decode(static_cast<uint8_t>(code + 1));
  return u < (s - lo) / (hi - lo) ? static_cast<uint8_t>(code + 1) : code;
}
LASP_HOST_DEVICE inline uint8_t e8m0_round_stochastic_code(float s, float u) {
  const uint8_t code = e8m0_floor(s);
  const float lo = e8m0_decode(code);
  if (lo >= s || code >= 254) return code;
  return u < (s - lo) / lo ? static_cast<uint8_t>(code + 1) : code;
}

// MS-EDEN's second pass over one correction block of one row: groups [g0, g1) of `group`
// elements (the row has `cols`), whose codes and scale codes the first pass (no-clip scale,
// round-to-nearest elements) wrote. With x_hat the dequantized block (tensor scale ts included),
// c = <x, x> / <x, x_hat> (1 when that is not a positive finite number), and every non-zero
// group scale s becomes SR(c s) on the scale grid, drawn at philox_uniform(seed, stream |
// kScaleStreamBit, row * ngroups + g). The sums are fp64 with explicit fma, so host and device
// (and any compiler's contraction choices) give the same c.
template <typename Load>
LASP_HOST_DEVICE inline void eden_correct_block(const Load& load, const uint8_t* codes, uint8_t* scodes,
                                                int64_t row, int64_t g0, int64_t g1, int64_t group,
                                                int64_t cols, int64_t ngroups, bool mx, float ts,
                                                uint64_t seed, uint64_t stream) {
  double xx = 0.0, xq = 0.0;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t sc = scodes[row * ngroups + g];
    const double s = static_cast<double>(mx ? e8m0_decode(sc) : e4m3_decode(sc)) * static_cast<double>(ts);
    const int64_t c1 = g * group + group < cols ? g * group + group : cols;
    for (int64_t c = g * group; c < c1; ++c) {
      const double x = load(c);
      xx = fma(x, x, xx);
      xq = fma(x * static_cast<double>(e2m1_decode(codes[c])), s, xq);
    }
  }
  const double ratio = xx / xq;
  const double corr = (xq > 0 && isfinite(ratio)) ? ratio : 1.0;
  for (int64_t g = g0; g < g1; ++g) {
    uint8_t& sc = scodes[row * ngroups + g];
    const float target = static_cast<float>(static_cast<double>(mx ? e8m0_decode(sc) : e4m3_decode(sc)) * corr);
    if (target == 0.0f) continue;
    const float u = philox_uniform(seed, stream | kScaleStreamBit, static_cast<uint64_t>(row * ngroups + g));
    sc = mx ? e8m0_round_stochastic_code(target, u) : e4m3_round_stochastic_code(target, u);
  }
}

// ---------------------------------------------------------------- x / s by a per-tensor scale
// The per-tensor FP8 quantizer divides every element by one scale s (the CPU divides, so the
// device must produce the IEEE quotient x / s, or at least its FP8 code). An IEEE division costs
// ~10 instructions per element; with the reciprocal r = 1 / s rounded once (by the caller, once
// per CTA) Markstein's corrections give the same quotient in 5:
//   q0 = x r                  within 1.5 ulp of x / s
//   q1 = q0 + (x - q0 s) r    the remainder is exact in one FMA; q1 within 1 ulp
//   q2 = q1 + (x - q1 s) r    = RN(x / s) (Markstein: r = RN(1 / s), q1 within 1 ulp of x / s)
// as long as nothing leaves the normal range. The caller uses it only when
// scale_division_ok(s) (2^-60 <= s <= 2^60: r is normal); then
//   - |x| >= 2^-100 and |q0| < 2^120: the theorem applies, the result is x / s bit for bit;
//   - |x| < 2^-100: x / s and the result are both below 2^-39 in magnitude with x's sign, so
//     both encode to the signed zero of E4M3 / E5M2 (the remainders may round there);
//   - |q0| >= 2^120, inf or NaN: q0 is returned; like x / s it saturates (or is NaN);
//   - x = ±0: ±0.
// The products are written as fmaf / __fmul_rn so that no compiler contraction changes them.
// tests/gpu/quantize_gpu_test.cc (QuantizeDeviceMath, no GPU needed) checks it against x / s.
LASP_HOST_DEVICE inline bool scale_division_ok(float s) { return s >= 0x1p-60f && s <= 0x1p60f; }

LASP_HOST_DEVICE inline float scaled_by_reciprocal(float x, float r) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, r);
#else
  return x * r;
#endif
}
// The quotient without the guard, for callers that know |x r| < 2^120 (the FP8 kernels' fast
// paths check it once per warp: per tensor |x| < 2^59 with r <= 2^60; block scales |x| <= the
// block's amax, so |x / s| <= fmax).
LASP_HOST_DEVICE inline float div_by_scale_finite(float x, float s, float r) {
  const float q0 = scaled_by_reciprocal(x, r);
  const float q1 = fmaf(fmaf(-q0, s, x), r, q0);
  const float q2 = fmaf(fmaf(-q1, s, x), r, q1);
  // s > 0, so x / s has x's sign; copysign restores it for x = -0 (the FMAs give +0 there).
  return copysignf(q2, x);
}
LASP_HOST_DEVICE inline float div_by_scale(float x, float s, float r) {
  const float q0 = scaled_by_reciprocal(x, r);
  return fabsf(q0) < 0x1p120f ? div_by_scale_finite(x, s, r) : q0;
}

}  // namespace lasp::qmath
