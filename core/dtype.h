// Element types and exact scalar conversions.
//
// Storage types: fp64, fp32, bf16, fp16, fp8 (OCP E4M3 "fn" and E5M2), int32, int64, uint8.
// FP4 E2M1 (the MX / NVFP4 element) and E8M0 (the MX power-of-two scale) are packed formats
// handled by the quantizers; here they are scalar encode/decode helpers.
//
// Every float -> small-format conversion rounds to nearest, ties to even, as IEEE 754 does.
// Overflow (the rounded value exceeds the largest finite value):
//   saturate = true  -> the largest finite value with the input's sign ("satfinite");
//   saturate = false -> +-inf where the format has it (fp16, bf16, E5M2), NaN for E4M3.
// E2M1 has neither inf nor NaN and always saturates (to +-6); NaN input encodes as +-6 too:
// MX formats mark NaN blocks in the E8M0 scale, not in the elements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lasp {

enum class DType : uint8_t { F64, F32, BF16, F16, F8E4M3, F8E5M2, I32, I64, U8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType dtype_from_name(const std::string& name);  // "fp32", "bf16", ... ; throws on unknown
bool dtype_is_float(DType t);

// --- bf16: 1 sign, 8 exponent, 7 mantissa bits ---
uint16_t float_to_bf16(float x);
float bf16_to_float(uint16_t bits);

// --- fp16 (IEEE binary16): 1, 5, 10 ---
uint16_t float_to_fp16(float x, bool saturate = false);
float fp16_to_float(uint16_t bits);

// --- fp8 E4M3 (OCP "fn": no inf, NaN = S.1111.111, max 448) ---
uint8_t float_to_e4m3(float x, bool saturate = true);
float e4m3_to_float(uint8_t bits);
constexpr float kE4M3Max = 448.0f;

// --- fp8 E5M2 (IEEE-like: inf and NaN, max 57344) ---
uint8_t float_to_e5m2(float x, bool saturate = true);
float e5m2_to_float(uint8_t bits);
constexpr float kE5M2Max = 57344.0f;

// --- fp4 E2M1: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; code in the low 4 bits ---
uint8_t float_to_e2m1(float x);
float e2m1_to_float(uint8_t bits);
constexpr float kE2M1Max = 6.0f;

// --- E8M0: an unsigned power-of-two scale 2^(bits - 127); 0xFF is NaN ---
float e8m0_to_float(uint8_t bits);
// The largest power of two <= x (x > 0, finite), clamped to the E8M0 range [2^-127, 2^127].
uint8_t e8m0_floor(float x);

}  // namespace lasp
