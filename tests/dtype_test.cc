// Exhaustive checks of the scalar conversions in core/dtype.h against references written here:
// every code of E2M1, E4M3, E5M2, fp16 and bf16 is decoded from its sign/exponent/mantissa bits
// independently, every midpoint between neighbours must round to the even code, random floats
// must round like a brute-force nearest search, and overflow / NaN / inf follow the header.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"

namespace {

using namespace lasp;

enum class Special { None, FiniteOnlyNaN, Ieee };  // E2M1 | E4M3 "fn" | fp16, bf16, E5M2

struct Format {
  std::string name;
  int ebits, mbits, bias;
  Special special;
  std::function<double(uint32_t)> decode;
  std::function<uint32_t(float, bool)> encode;  // (x, saturate)
  bool encode_can_saturate;  // bf16 has no saturating mode: overflow is always inf

  int nbits() const { return 1 + ebits + mbits; }
  uint32_t ncodes() const { return 1u << nbits(); }
  uint32_t sign_bit() const { return 1u << (ebits + mbits); }
};

std::vector<Format> all_formats() {
  return {
      {"e2m1", 2, 1, 1, Special::None, [](uint32_t c) { return double(e2m1_to_float(uint8_t(c))); },
       [](float x, bool) { return uint32_t(float_to_e2m1(x)); }, true},
      {"e4m3", 4, 3, 7, Special::FiniteOnlyNaN,
       [](uint32_t c) { return double(e4m3_to_float(uint8_t(c))); },
       [](float x, bool s) { return uint32_t(float_to_e4m3(x, s)); }, true},
      {"e5m2", 5, 2, 15, Special::Ieee, [](uint32_t c) { return double(e5m2_to_float(uint8_t(c))); },
       [](float x, bool s) { return uint32_t(float_to_e5m2(x, s)); }, true},
      {"fp16", 5, 10, 15, Special::Ieee, [](uint32_t c) { return double(fp16_to_float(uint16_t(c))); },
       [](float x, bool s) { return uint32_t(float_to_fp16(x, s)); }, true},
      {"bf16", 8, 7, 127, Special::Ieee, [](uint32_t c) { return double(bf16_to_float(uint16_t(c))); },
       [](float x, bool) { return uint32_t(float_to_bf16(x)); }, false},
  };
}

// The value of a code from its fields: (-1)^s * 2^(e - bias) * (1 + m / 2^M) for normals,
// 2^(1 - bias) * (m / 2^M) for subnormals, specials per format.
double reference_value(const Format& f, uint32_t code) {
  const bool neg = (code & f.sign_bit()) != 0;
  const uint32_t e = (code >> f.mbits) & ((1u << f.ebits) - 1);
  const uint32_t m = code & ((1u << f.mbits) - 1);
  const uint32_t emax = (1u << f.ebits) - 1, mmax = (1u << f.mbits) - 1;
  double v;
  if (f.special == Special::Ieee && e == emax) {
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (f.special == Special::FiniteOnlyNaN && e == emax && m == mmax) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else {
    const double frac = double(m) / double(1u << f.mbits);
    v = e == 0 ? std::pow(2.0, 1 - f.bias) * frac : std::pow(2.0, int(e) - f.bias) * (1.0 + frac);
  }
  return neg ? -v : v;
}

// Positive finite values in code order (codes 0 .. max_code are increasing), plus the code of
// the largest finite value.
struct PositiveGrid {
  std::vector<double> values;  // values[c] = value of code c, c = 0 .. max_code
  uint32_t max_code;
};

PositiveGrid positive_grid(const Format& f) {
  PositiveGrid g;
  for (uint32_t c = 0; c < f.sign_bit(); ++c) {
    const double v = reference_value(f, c);
    if (!std::isfinite(v)) break;
    g.values.push_back(v);
  }
  g.max_code = uint32_t(g.values.size() - 1);
  return g;
}

// The value one step above the largest finite one, as if the exponent range went on: where a
// rounding "to nearest" above max_finite would land. Its code max_code + 1 decides ties.
double virtual_next(const Format& f, const PositiveGrid& g) {
  const double vmax = g.values.back();
  const double ulp = vmax - g.values[g.values.size() - 2];
  // Crossing into the next binade keeps the ulp when the max's mantissa is not all ones (E4M3,
  // whose all-ones mantissa is NaN); otherwise max + ulp is the next power of two.
  return vmax + ulp;
}

// What an overflowing |x| encodes to (without sign).
uint32_t overflow_code(const Format& f, const PositiveGrid& g, bool saturate) {
  if (f.special == Special::None || (saturate && f.encode_can_saturate)) return g.max_code;
  if (f.special == Special::Ieee) return ((1u << f.ebits) - 1) << f.mbits;  // inf
  return (((1u << f.ebits) - 1) << f.mbits) | ((1u << f.mbits) - 1);      // E4M3 NaN
}

// Brute-force round-to-nearest-even of x onto the format: scan every finite code (plus the
// virtual next value) for the nearest, ties to the even code.
uint32_t reference_encode(const Format& f, const PositiveGrid& g, float x, bool saturate) {
  const uint32_t sign = std::signbit(x) ? f.sign_bit() : 0u;
  const double a = std::fabs(double(x));
  const double vnext = virtual_next(f, g);
  if (a >= vnext) return sign | overflow_code(f, g, saturate);  // (distances lose precision there)
  uint32_t best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  auto consider = [&](uint32_t code, double v) {
    const double dist = std::fabs(v - a);
    if (dist < best_d || (dist == best_d && (code & 1u) == 0)) {
      best = code;
      best_d = dist;
    }
  };
  if (f.nbits() <= 8) {
    for (uint32_t c = 0; c <= g.max_code; ++c) consider(c, g.values[c]);
  } else {  // 16-bit formats: the two neighbours from a sorted search (same result, faster)
    const auto it = std::lower_bound(g.values.begin(), g.values.end(), a);
    const uint32_t hi = uint32_t(it - g.values.begin());
    if (hi > 0) consider(hi - 1, g.values[hi - 1]);
    if (hi <= g.max_code) consider(hi, g.values[hi]);
  }
  consider(g.max_code + 1, vnext);
  if (best == g.max_code + 1) return sign | overflow_code(f, g, saturate);
  return sign | best;
}

bool same_value(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

TEST(DType, EveryCodeDecodesToItsSignExponentMantissaValue) {
  for (const Format& f : all_formats()) {
    int mismatches = 0;
    for (uint32_t c = 0; c < f.ncodes(); ++c) {
      const double want = reference_value(f, c), got = f.decode(c);
      if (!same_value(want, got) && mismatches++ < 5) {
        ADD_FAILURE() << f.name << " code 0x" << std::hex << c << std::dec << ": decoded " << got
                      << ", expected " << want;
      }
    }
    EXPECT_EQ(mismatches, 0) << f.name;
  }
}

TEST(DType, LargestFiniteValuesMatchTheHeaderConstants) {
  const auto fmts = all_formats();
  EXPECT_EQ(positive_grid(fmts[0]).values.back(), double(kE2M1Max));
  EXPECT_EQ(positive_grid(fmts[1]).values.back(), double(kE4M3Max));
  EXPECT_EQ(positive_grid(fmts[2]).values.back(), double(kE5M2Max));
  EXPECT_EQ(positive_grid(fmts[3]).values.back(), 65504.0);
  EXPECT_EQ(positive_grid(fmts[4]).values.back(), std::ldexp(255.0, 120));  // (2 - 2^-7) 2^127
}

TEST(DType, EveryFiniteCodeRoundTripsThroughFloat) {
  for (const Format& f : all_formats()) {
    int mismatches = 0;
    for (uint32_t c = 0; c < f.ncodes(); ++c) {
      const double v = reference_value(f, c);
      if (std::isnan(v)) continue;
      for (bool sat : {false, true}) {
        const uint32_t back = f.encode(float(v), sat);
        // +-inf saturates to the largest finite code when asked to.
        uint32_t want = c;
        if (std::isinf(v) && sat && f.encode_can_saturate) {
          want = (c & f.sign_bit()) | positive_grid(f).max_code;
        }
        if (back != want && mismatches++ < 5) {
          ADD_FAILURE() << f.name << " code 0x" << std::hex << c << " -> " << v << " -> 0x" << back
                        << std::dec << " (saturate " << sat << ")";
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << f.name;
  }
}

TEST(DType, EveryMidpointRoundsToTheEvenNeighbourAndItsNeighboursRoundAway) {
  for (const Format& f : all_formats()) {
    const PositiveGrid g = positive_grid(f);
    std::vector<double> vals = g.values;
    vals.push_back(virtual_next(f, g));
    int mismatches = 0, checked = 0;
    for (uint32_t lo = 0; lo + 1 < vals.size(); ++lo) {
      const uint32_t hi = lo + 1;
      const double mid_d = 0.5 * (vals[lo] + vals[hi]);
      const float mid = float(mid_d);
      ASSERT_EQ(double(mid), mid_d) << f.name << ": midpoint not exact in fp32";
      const float below = std::nextafter(mid, 0.0f), above = std::nextafter(mid, INFINITY);
      for (bool sat : {false, true}) {
        auto code_of = [&](uint32_t c) { return c > g.max_code ? overflow_code(f, g, sat) : c; };
        const uint32_t tie = code_of((lo & 1u) == 0 ? lo : hi);
        struct Case {
          float x;
          uint32_t want;
        } cases[] = {{mid, tie}, {below, code_of(lo)}, {above, code_of(hi)}};
        for (const Case& k : cases) {
          for (float s : {1.0f, -1.0f}) {
            const uint32_t got = f.encode(s * k.x, sat);
            const uint32_t want = (s < 0 ? f.sign_bit() : 0u) | k.want;
            ++checked;
            if (got != want && mismatches++ < 5) {
              ADD_FAILURE() << f.name << ": encode(" << s * k.x << ", saturate " << sat << ") = 0x"
                            << std::hex << got << ", expected 0x" << want << std::dec;
            }
          }
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << f.name << " over " << checked << " midpoint cases";
  }
}

TEST(DType, RandomFloatsRoundLikeABruteForceNearestEvenSearch) {
  std::mt19937 rng(1234);
  for (const Format& f : all_formats()) {
    const PositiveGrid g = positive_grid(f);
    const double lo_exp = std::log2(g.values[1]) - 2, hi_exp = std::log2(g.values.back()) + 2;
    std::uniform_real_distribution<double> log_mag(lo_exp, hi_exp);
    std::uniform_int_distribution<uint32_t> bits;
    int mismatches = 0;
    const int n = 200000;
    for (int i = 0; i < n; ++i) {
      float x;
      if (i % 4 == 0) {  // arbitrary bit patterns (every float binade), NaN excluded
        uint32_t b = bits(rng);
        std::memcpy(&x, &b, 4);
        if (std::isnan(x)) continue;
      } else {  // magnitudes across the format's range, either sign
        x = float(std::exp2(log_mag(rng)) * ((bits(rng) & 1) ? -1.0 : 1.0));
      }
      for (bool sat : {false, true}) {
        const uint32_t got = f.encode(x, sat), want = reference_encode(f, g, x, sat);
        if (got != want && mismatches++ < 5) {
          ADD_FAILURE() << f.name << ": encode(" << x << ", saturate " << sat << ") = 0x" << std::hex
                        << got << ", expected 0x" << want << std::dec;
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << f.name;
  }
}

// E2M1 is encoded once per element by the FP4 quantizers, with its own comparison chain: every
// float from 2^-4 to 16 (67 M values, both signs by symmetry of the code) against the search.
TEST(DType, E2M1EncodesEveryFloatFromOneSixteenthToSixteenLikeTheSearch) {
  Format e2m1;
  for (const Format& f : all_formats())
    if (f.name == "e2m1") e2m1 = f;
  const PositiveGrid g = positive_grid(e2m1);
  float lo = 0.0625f, hi = 16.0f;
  uint32_t b, end;
  std::memcpy(&b, &lo, 4);
  std::memcpy(&end, &hi, 4);
  int mismatches = 0;
  for (; b <= end; ++b) {
    float x;
    std::memcpy(&x, &b, 4);
    const uint32_t want = reference_encode(e2m1, g, x, true);
    if (float_to_e2m1(x) != want || float_to_e2m1(-x) != (want | 0x8)) {
      if (mismatches++ < 5) ADD_FAILURE() << "encode(" << x << ") = " << int(float_to_e2m1(x)) << ", expected " << want;
    }
  }
  EXPECT_EQ(mismatches, 0);
  for (float x : {0.0f, 1e-30f, 1e-45f, 0.03f}) {  // below the sweep: all round to zero
    EXPECT_EQ(float_to_e2m1(x), 0);
    EXPECT_EQ(float_to_e2m1(-x), 0x8);
  }
}

TEST(DType, NaNAndInfinityFollowEachFormatsRules) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // E4M3 "fn": NaN is S.1111.111; inf saturates to 448 or becomes NaN.
  EXPECT_EQ(float_to_e4m3(nan), 0x7F);
  EXPECT_EQ(float_to_e4m3(-nan), 0xFF);
  EXPECT_EQ(float_to_e4m3(inf, true), 0x7E);
  EXPECT_EQ(float_to_e4m3(-inf, true), 0xFE);
  EXPECT_EQ(float_to_e4m3(inf, false), 0x7F);
  EXPECT_EQ(float_to_e4m3(1e6f, false), 0x7F);
  EXPECT_EQ(float_to_e4m3(464.0f, false), 0x7E);  // tie between 448 (even) and the NaN slot
  EXPECT_EQ(float_to_e4m3(464.5f, false), 0x7F);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)) && std::isnan(e4m3_to_float(0xFF)));
  // E5M2: IEEE-like.
  EXPECT_TRUE(std::isnan(e5m2_to_float(float_to_e5m2(nan))));
  EXPECT_EQ(float_to_e5m2(inf, false), 0x7C);
  EXPECT_EQ(float_to_e5m2(-inf, false), 0xFC);
  EXPECT_EQ(float_to_e5m2(inf, true), 0x7B);
  EXPECT_EQ(float_to_e5m2(61440.0f, false), 0x7C);  // tie 57344 (odd) / 65536 (even) -> inf
  EXPECT_EQ(float_to_e5m2(61440.0f, true), 0x7B);
  // fp16.
  EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(nan))));
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7C00);        // tie -> even -> inf
  EXPECT_EQ(float_to_fp16(65519.996f), 0x7BFF);
  EXPECT_EQ(float_to_fp16(65520.0f, true), 0x7BFF);
  EXPECT_EQ(float_to_fp16(-inf, true), 0xFBFF);
  // bf16: NaN stays NaN with its sign, inf stays inf.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(nan))));
  EXPECT_TRUE(std::signbit(bf16_to_float(float_to_bf16(-nan))));
  EXPECT_EQ(float_to_bf16(inf), 0x7F80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up past max
  // E2M1: no inf or NaN: everything saturates to +-6, NaN included.
  EXPECT_EQ(float_to_e2m1(nan), 0x7);
  EXPECT_EQ(float_to_e2m1(-nan), 0xF);
  EXPECT_EQ(float_to_e2m1(inf), 0x7);
  EXPECT_EQ(float_to_e2m1(-1e30f), 0xF);
  EXPECT_EQ(e2m1_to_float(0xF7), 6.0f);  // only the low nibble counts
  // Signed zeros keep their sign.
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_e5m2(-0.0f), 0x80);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_e2m1(-0.0f), 0x8);
}

TEST(DType, E8M0DecodesEveryCodeAndFloorsToThePowerOfTwoBelow) {
  for (int c = 0; c < 255; ++c) {
    EXPECT_EQ(double(e8m0_to_float(uint8_t(c))), std::ldexp(1.0, c - 127)) << "code " << c;
  }
  EXPECT_TRUE(std::isnan(e8m0_to_float(0xFF)));
  for (int c = 0; c < 255; ++c) {
    const float p = std::ldexp(1.0f, c - 127);
    EXPECT_EQ(e8m0_floor(p), c);
    const float just_below_next = std::nextafter(2.0f * p, 0.0f);
    if (std::isfinite(just_below_next)) {
      EXPECT_EQ(e8m0_floor(just_below_next), c) << "code " << c;
    }
  }
  EXPECT_EQ(e8m0_floor(std::numeric_limits<float>::denorm_min()), 0);  // clamps at 2^-127
  EXPECT_EQ(e8m0_floor(std::numeric_limits<float>::max()), 254);
  EXPECT_THROW(e8m0_floor(0.0f), lasp::Error);
  EXPECT_THROW(e8m0_floor(-1.0f), lasp::Error);
  EXPECT_THROW(e8m0_floor(std::numeric_limits<float>::infinity()), lasp::Error);
  EXPECT_THROW(e8m0_floor(std::numeric_limits<float>::quiet_NaN()), lasp::Error);
}

TEST(DType, NamesRoundTripAndUnknownNamesAreRejected) {
  for (DType t : {DType::F64, DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2,
                  DType::I32, DType::I64, DType::U8}) {
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  }
  EXPECT_EQ(dtype_size(DType::F8E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_THROW(dtype_from_name("fp8"), lasp::Error);
}

}  // namespace
