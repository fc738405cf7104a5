#include "core/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "core/check.h"

namespace lasp {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8E4M3: return 1;
    case DType::F8E5M2: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  LASP_FAIL() << "unknown dtype " << int(t);
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "fp64";
    case DType::F32: return "fp32";
    case DType::BF16: return "bf16";
    case DType::F16: return "fp16";
    case DType::F8E4M3: return "fp8_e4m3";
    case DType::F8E5M2: return "fp8_e5m2";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
  }
  return "?";
}

DType dtype_from_name(const std::string& name) {
  for (DType t : {DType::F64, DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2,
                  DType::I32, DType::I64, DType::U8}) {
    if (name == dtype_name(t)) return t;
  }
  LASP_FAIL() << "unknown dtype '" << name
              << "', expected one of fp64 fp32 bf16 fp16 fp8_e4m3 fp8_e5m2 int32 int64 uint8";
  return DType::F32;
}

bool dtype_is_float(DType t) {
  return t == DType::F64 || t == DType::F32 || t == DType::BF16 || t == DType::F16 ||
         t == DType::F8E4M3 || t == DType::F8E5M2;
}

namespace {

// A binary floating-point format with 1 sign bit, `ebits` exponent and `mbits` mantissa bits.
struct MiniFormat {
  int ebits, mbits, bias;
  bool has_inf;     // top exponent code holds inf/NaN (IEEE style)
  bool has_nan;     // some code is NaN
  uint32_t nan_code;  // the NaN code without sign (when has_nan)
  float max_finite;
};

uint32_t mini_inf_code(const MiniFormat& f) { return ((1u << f.ebits) - 1) << f.mbits; }

// Round-to-nearest-even of |x| onto the format's grid; returns the code without the sign.
uint32_t mini_encode_abs(const MiniFormat& f, float a, bool saturate) {
  const int min_exp = 1 - f.bias;  // exponent of the smallest normal
  int e;
  std::frexp(a, &e);  // a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
  int exp = e - 1;
  if (exp < min_exp) exp = min_exp;  // subnormal range shares the smallest normal's quantum
  // Scale so that one unit = one ulp at this exponent; exact because it is a power of two.
  const double q = std::ldexp(static_cast<double>(a), f.mbits - exp);
  const double r = std::nearbyint(q);  // default rounding mode: to nearest, ties to even
  const double value = std::ldexp(r, exp - f.mbits);
  if (value > f.max_finite) {
    if (saturate || (!f.has_inf && !f.has_nan)) {
      return mini_encode_abs(f, f.max_finite, true);
    }
    return f.has_inf ? mini_inf_code(f) : f.nan_code;
  }
  if (r == 0) return 0;
  // Rebuild the code from the rounded value (it may have carried into the next binade).
  int ve;
  std::frexp(value, &ve);
  int vexp = ve - 1;
  if (vexp < min_exp) {  // subnormal: exponent field 0, mantissa = value / 2^(min_exp - mbits)
    return static_cast<uint32_t>(std::ldexp(value, f.mbits - min_exp));
  }
  const uint32_t mant =
      static_cast<uint32_t>(std::ldexp(value, f.mbits - vexp)) - (1u << f.mbits);
  return (static_cast<uint32_t>(vexp + f.bias) << f.mbits) | mant;
}

uint32_t mini_encode(const MiniFormat& f, float x, bool saturate) {
  const uint32_t sign = std::signbit(x) ? 1u << (f.ebits + f.mbits) : 0u;
  if (std::isnan(x)) {
    if (f.has_nan) return sign | f.nan_code;
    return sign | mini_encode_abs(f, f.max_finite, true);
  }
  const float a = std::fabs(x);
  if (std::isinf(a)) {
    if (saturate || (!f.has_inf && !f.has_nan)) return sign | mini_encode_abs(f, f.max_finite, true);
    return sign | (f.has_inf ? mini_inf_code(f) : f.nan_code);
  }
  return sign | mini_encode_abs(f, a, saturate);
}

float mini_decode(const MiniFormat& f, uint32_t code) {
  const uint32_t sign = (code >> (f.ebits + f.mbits)) & 1u;
  const uint32_t exp = (code >> f.mbits) & ((1u << f.ebits) - 1);
  const uint32_t mant = code & ((1u << f.mbits) - 1);
  const uint32_t body = code & ((1u << (f.ebits + f.mbits)) - 1);
  float v;
  if (f.has_nan && !f.has_inf && body == f.nan_code) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (f.has_inf && exp == (1u << f.ebits) - 1) {
    v = mant == 0 ? std::numeric_limits<float>::infinity()
                  : std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), 1 - f.bias - f.mbits);
  } else {
    v = std::ldexp(static_cast<float>(mant + (1u << f.mbits)), static_cast<int>(exp) - f.bias - f.mbits);
  }
  return sign ? -v : v;
}

constexpr MiniFormat kFp16{5, 10, 15, true, true, 0x7E00u, 65504.0f};
constexpr MiniFormat kE4M3{4, 3, 7, false, true, 0x7F, 448.0f};
constexpr MiniFormat kE5M2{5, 2, 15, true, true, 0x7E, 57344.0f};
constexpr MiniFormat kE2M1{2, 1, 1, false, false, 0, 6.0f};

}  // namespace

uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x0040);  // keep sign, quiet
  // Add 0x7FFF plus the lowest kept bit: rounds to nearest, ties to even; carries into the
  // exponent and up to inf exactly as IEEE rounding does.
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7FFFu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

uint16_t float_to_fp16(float x, bool saturate) {
  return static_cast<uint16_t>(mini_encode(kFp16, x, saturate));
}
float fp16_to_float(uint16_t bits) { return mini_decode(kFp16, bits); }

uint8_t float_to_e4m3(float x, bool saturate) {
  return static_cast<uint8_t>(mini_encode(kE4M3, x, saturate));
}
float e4m3_to_float(uint8_t bits) { return mini_decode(kE4M3, bits); }

uint8_t float_to_e5m2(float x, bool saturate) {
  return static_cast<uint8_t>(mini_encode(kE5M2, x, saturate));
}
float e5m2_to_float(uint8_t bits) { return mini_decode(kE5M2, bits); }

// E2M1 has eight magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6), so round-to-nearest-even is a count of
// the midpoints at or below |x|: strictly above a midpoint whose lower neighbour has the even
// code (.25, 1.25, 2.5, 5), at or above one whose upper neighbour has it (.75, 1.75, 3.5).
// Saturating; NaN encodes as +-6 (E2M1 has no NaN), as mini_encode does. The FP4 quantizers call
// this once per element, hence no frexp / ldexp here (tests/dtype_test.cc checks every float
// from 2^-4 to 16 against a nearest-even search).
uint8_t float_to_e2m1(float x) {
  const uint8_t sign = std::signbit(x) ? 0x8 : 0x0;
  if (std::isnan(x)) return sign | 0x7;
  const float a = std::fabs(x);
  const int code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return static_cast<uint8_t>(sign | code);
}
float e2m1_to_float(uint8_t bits) { return mini_decode(kE2M1, bits & 0xF); }

float e8m0_to_float(uint8_t bits) {
  if (bits == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

uint8_t e8m0_floor(float x) {
  LASP_CHECK(x > 0 && std::isfinite(x)) << "e8m0_floor expects a positive finite value, got " << x;
  int e;
  std::frexp(x, &e);
  int exp = e - 1;
  if (exp < -127) exp = -127;
  if (exp > 127) exp = 127;
  return static_cast<uint8_t>(exp + 127);
}

}  // namespace lasp
