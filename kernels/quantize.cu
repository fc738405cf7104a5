// CUDA quantizers (API in quantize_cuda.h): FP8 per tensor / 1x128 / 128x128, FP8
// dequantization, MXFP4 / NVFP4 with RTN, QuEST clipping and stochastic rounding, FP4
// dequantization. The per-element and per-group rules are the host/device functions of
// quantize_math.h, written to reproduce quantize.cc bit for bit.
//
// Kernels and their work split:
//   fp8_tensor_kernel        one scale (from the device amax or a host value), grid-stride encode
//   fp8_block_rows_cols_kernel  1x128 / 128x128 block FP8 of x and/or x^T in one pass, grid-
//                            stride over 128x128 tiles, an 8x8 sub-block per thread in registers,
//                            only x^T's codes through shared memory (also quantize_fp8_cuda's
//                            block modes)
//   fp4_quantize_kernel      one thread per (row, group) of 32 (MX) or 16 (NV) elements
//   *_dequant_kernel         grid-stride elementwise
// and the sync-free pieces of the CUDA projections (core/model/projection.cc):
//   amax_vec_kernel          max |x| -> one uint (float bits: for x >= 0 the bit patterns order
//                            like the values, and NaN sorts above inf, so NaN propagates);
//                            16-byte loads, 4 in flight per thread, one atomicMax per CTA (also
//                            the amax of quantize_fp8_cuda / amax_cuda)
//   fp8_rows_cols_kernel     per-tensor FP8 from a device scale, grid-stride over 128x64 tiles:
//                            codes row-major and/or transposed (through shared memory) in one
//                            pass, 16-byte loads and stores on both sides, optionally recording
//                            the amax (delayed scaling); x / s through the reciprocal
//                            (Markstein, the IEEE quotient), encoded by the hardware converter
//                            (same codes as the CPU, tested)
//   transpose_pad_kernel     32x32 shared-memory transpose with zero padding
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>

#include "core/profile.h"
#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/hadamard_device.cuh"
#include "kernels/quantize_cuda.h"
#include "kernels/quantize_math.h"

namespace lasp {
namespace {

using namespace qmath;

constexpr int kThreads = 256;
constexpr int kBlock = static_cast<int>(kFp8BlockSize);  // 128

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline void store(float* p, float v) { *p = v; }
__device__ inline void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ inline uint8_t fp8_encode_dev(float v, bool e4m3) {
  return e4m3 ? e4m3_encode(v) : e5m2_encode(v);
}
__device__ inline float fp8_decode_dev(uint8_t c, bool e4m3) {
  return e4m3 ? e4m3_decode(c) : e5m2_decode(c);
}
// s = amax / format_max, amax == 0 -> 1; NaN/inf amax propagate into the scale.
__device__ inline float scale_from_amax(float amax, float fmax) {
  return (amax > 0.0f || isnan(amax)) ? amax / fmax : 1.0f;
}
__device__ inline uint32_t warp_max(uint32_t m) {
  for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

template <typename T>
__global__ void fp8_tensor_kernel(const T* x, int64_t n, const uint32_t* amax_bits,
                                  float fixed_scale, float fmax, bool e4m3, uint8_t* codes,
                                  float* scale_out) {
  const float s = amax_bits ? scale_from_amax(bits_float(*amax_bits), fmax) : fixed_scale;
  if (blockIdx.x == 0 && threadIdx.x == 0) scale_out[0] = s;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    codes[i] = fp8_encode_dev(to_float(x[i]) / s, e4m3);
}

template <typename TO>
__global__ void fp8_dequant_kernel(const uint8_t* codes, int64_t n, int64_t cols, int scaling,
                                   const float* scales, bool e4m3, TO* out) {
  const int64_t nb = (cols + kBlock - 1) / kBlock;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t si = scaling == 0 ? 0 : scaling == 1 ? r * nb + c / kBlock : (r / kBlock) * nb + c / kBlock;
    store(out + i, fp8_decode_dev(codes[i], e4m3) * scales[si]);
  }
}

template <typename T>
__global__ void fp4_quantize_kernel(const T* x, int64_t rows, int64_t cols, int64_t group,
                                    int64_t ngroups, Fp4GroupRule rule, const float* ts_dev,
                                    uint8_t* codes, uint8_t* scodes, uint8_t* mask) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= rows * ngroups) return;
  if (ts_dev) rule.tensor_scale = *ts_dev;
  const int64_t r = t / ngroups, g = t % ngroups;
  const T* xr = x + r * cols;
  const auto load = [xr](int64_t c) { return to_float(xr[c]); };
  const int64_t c0 = g * group, c1 = min(cols, c0 + group);
  scodes[t] = fp4_quantize_group(load, c0, c1, static_cast<uint64_t>(r * cols), rule,
                                 codes + r * cols, mask ? mask + r * cols : nullptr);
}

// MS-EDEN's second pass: one thread per (row, correction block of per_block groups), after
// fp4_quantize_kernel wrote the no-clip scales and round-to-nearest codes.
template <typename T>
__global__ void fp4_eden_kernel(const T* x, int64_t rows, int64_t cols, int64_t group, int64_t ngroups,
                                int64_t per_block, bool mx, float ts, const float* ts_dev, uint64_t seed,
                                uint64_t stream, const uint8_t* codes, uint8_t* scodes) {
  const int64_t nblocks = (ngroups + per_block - 1) / per_block;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= rows * nblocks) return;
  if (ts_dev) ts = *ts_dev;
  const int64_t r = t / nblocks, g0 = (t % nblocks) * per_block;
  const T* xr = x + r * cols;
  const auto load = [xr](int64_t c) { return to_float(xr[c]); };
  eden_correct_block(load, codes + r * cols, scodes, r, g0, min(ngroups, g0 + per_block), group, cols,
                     ngroups, mx, ts, seed, stream);
}

// The FP4 tensor scale from the amax (float bits, as amax_into_cuda leaves them), one thread:
// NVFP4 amax / denom (1 for amax 0), MXFP4 1; NaN for a non-finite amax (a NaN or an infinity
// in x), so that everything computed from the quantized tensor turns non-finite.
__global__ void fp4_tensor_scale_kernel(const uint32_t* amax_bits, bool mx, float denom, float* ts) {
  const float a = __uint_as_float(*amax_bits);
  if (!isfinite(a)) {
    *ts = __int_as_float(0x7fc00000);
  } else {
    *ts = mx ? 1.0f : (a > 0.0f ? a / denom : 1.0f);
  }
}

template <typename TO>
__global__ void fp4_dequant_kernel(const uint8_t* codes, int64_t n, int64_t cols, int64_t group,
                                   int64_t ngroups, const uint8_t* scodes, bool mx, float ts,
                                   const float* ts_dev, TO* out) {
  if (ts_dev) ts = *ts_dev;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, c = i % cols;
    const uint8_t sc = scodes[r * ngroups + c / group];
    const float s = mx ? e8m0_decode(sc) : e4m3_decode(sc);
    store(out + i, e2m1_decode(codes[i]) * s * ts);
  }
}


// ---------------------------------------------------------------- projection kernels (no syncs)

// 16 bytes of T as floats (T = float: 4, bf16: 8).
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};
__device__ inline void load16(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ inline void load16(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 t = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&t);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Max of m over the CTA (blockDim.x a multiple of 32, <= 1024); the result in thread 0.
__device__ inline uint32_t block_max(uint32_t m) {
  __shared__ uint32_t warp_m[32];
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_m[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < static_cast<int>(blockDim.x / 32); ++i) m = max(m, warp_m[i]);
  }
  return m;
}

// amax over n elements: 16-byte loads (when vec_ok), 4 in flight per thread, one atomic per CTA.
template <typename T>
__global__ void __launch_bounds__(kThreads) amax_vec_kernel(const T* __restrict__ x, int64_t n,
                                                            bool vec_ok, uint32_t* out) {
  constexpr int V = Vec16<T>::kN;
  uint32_t m = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t tail = 0;
  if (vec_ok) {
    // Packs are visited from the end of x to its start: the quantization pass that usually follows
    // reads x from the start, which this pass read last, so part of it is still in L2 (and the
    // producer of x wrote its end last, so this pass starts on L2 hits too).
    const int64_t nv = n / V;
    const T* xe = x + (nv - 1) * V;  // the last pack; pack i of the walk is xe - i V
    int64_t i = tid;
    for (; i + 3 * stride < nv; i += 4 * stride) {
      float f[4][V];
#pragma unroll
      for (int u = 0; u < 4; ++u) load16(xe - (i + u * stride) * V, f[u]);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) m = max(m, float_bits(fabsf(f[u][j])));
    }
    for (; i < nv; i += stride) {
      float f[V];
      load16(xe - i * V, f);
#pragma unroll
      for (int j = 0; j < V; ++j) m = max(m, float_bits(fabsf(f[j])));
    }
    tail = nv * V;
  }
  for (int64_t i = tail + tid; i < n; i += stride) m = max(m, float_bits(fabsf(to_float(x[i]))));
  m = block_max(m);
  if (threadIdx.x == 0) atomicMax(out, m);
}

// Two FP8 codes of qa = xa / s, qb = xb / s (qa in the low byte) from the hardware converter
// (sm_89+: cvt.rn.satfinite.{e4m3,e5m2}x2.f32): round to nearest even, saturating to the largest
// finite value, which is the rule of the CPU encoders for every input but NaN (inf saturates there
// too). NaN takes the CPU's code, with the sign of x (the GPU's division returns a positive NaN
// where the host's keeps the operand's sign). One instruction for two elements instead of the ~25
// of the portable encoder.
__device__ inline uint8_t fp8_nan_code(float x, float q, bool e4m3) {
  return fp8_encode_dev(isnan(x) ? x : q, e4m3);
}
__device__ inline uint32_t fp8x2_encode(float qa, float qb, float xa, float xb, bool e4m3) {
  uint32_t c = __nv_cvt_float2_to_fp8x2(make_float2(qa, qb), __NV_SATFINITE, e4m3 ? __NV_E4M3 : __NV_E5M2);
  if (isnan(qa)) c = (c & 0xFF00u) | fp8_nan_code(xa, qa, e4m3);
  if (isnan(qb)) c = (c & 0x00FFu) | (static_cast<uint32_t>(fp8_nan_code(xb, qb, e4m3)) << 8);
  return c;
}

// The fast paths of the FP8 kernels: x / s where s passes scale_division_ok and x is finite with
// |x r| < 2^120 (per tensor: |x| < kFastAbsBound = 2^59, r <= 2^60; block: s is the block's
// amax / fmax, so |x r| <= fmax), so every quotient is finite: Markstein's quotient
// without its overflow guard (qmath::div_by_scale_finite), and the converter without the NaN
// fix-up (fp8x2_finite). The kernels check this once per warp and send everything else down a
// generic element-by-element path, so that no per-element branch bloats the unrolled code.
constexpr uint32_t kFastAbsBound = 0x5D000000u;  // float bits of 2^59
using qmath::div_by_scale_finite;
template <bool kE4m3>
__device__ inline uint32_t fp8x2_finite(float qa, float qb) {
  return __nv_cvt_float2_to_fp8x2(make_float2(qa, qb), __NV_SATFINITE, kE4m3 ? __NV_E4M3 : __NV_E5M2);
}
// The fast paths' encoding of a pair: codes of x_a / s and x_b / s (r = 1 / s) in the low 16 bits.
template <bool kE4m3>
__device__ inline uint32_t encode_pair_fast(float xa, float xb, float s, float r) {
  return fp8x2_finite<kE4m3>(div_by_scale_finite(xa, s, r), div_by_scale_finite(xb, s, r));
}

struct ScaleArgs {
  const uint32_t* amax = nullptr;  // scale from max over amax[0..n) except skip
  int n = 0;
  int skip = -1;
  const float* scale = nullptr;  // else this scale
  uint32_t* record = nullptr;    // atomicMax of the tensor's amax (optional)
};

__device__ inline float device_scale(const ScaleArgs& a, float fmax) {
  if (a.amax == nullptr) return *a.scale;
  uint32_t m = 0;
  for (int i = 0; i < a.n; ++i)
    if (i != a.skip) m = max(m, a.amax[i]);
  return scale_from_amax(bits_float(m), fmax);
}

// The rows/cols quantizer. One CTA (256 threads) per 128 x 64 tile of x at a time, grid-stride over
// the tiles (the grid is what fits on the GPU at once, so the scale is read once per CTA).
//   load:  thread unit u (two per thread) = tile row u / 4, 16 consecutive columns 16 (u % 4):
//          16-byte loads (2 for bf16, 4 for fp32) kept as raw bits, encode, one 16-byte store of
//          the 16 row-major codes; a warp covers 8 rows x 64 columns. Software-pipelined: the next
//          tile's loads are issued right after this tile is encoded, so they are in flight during
//          its stores, the transpose and the barriers (one tile of loads per thread in flight).
//   cols:  the codes also go to the shared tile; after a barrier thread (column c, segment g)
//          gathers tile rows [16 g, 16 g + 16) of column c into one 16-byte store of x^T. A warp
//          takes 16 columns x 2 adjacent segments: 32 contiguous bytes per x^T row, and with the
//          68-byte shared row stride (17 words) its shared reads hit 8 distinct banks per row pair.
//   paths: a warp whose units are all whole, with the scale passing scale_division_ok and
//          every |x| < 2^59 (so finite quotients), encodes on the fast path (encode_pair_fast,
//          the format a template argument); otherwise rows_cols_generic, element by element.
//          80 registers (3 CTAs per SM): at 64 (4 CTAs) it spills and is 10-15% slower.
// Codes outside [rows, cols) (the zero padding up to rows_p / cols_p) are stored as 0.
constexpr int kRcRows = 128;                          // tile rows
constexpr int kRcCols = 64;                           // tile columns
constexpr int kRcUnit = 16;                           // elements per load unit = codes per store
constexpr int kRcUnitsPerRow = kRcCols / kRcUnit;     // 4
constexpr int kRcUnits = kRcRows * kRcUnitsPerRow / kThreads;  // load units per thread: 2
constexpr int kRcStride = kRcCols + 4;                // shared row stride in bytes
constexpr int kRcSeg = 16;                            // x^T rows per 16-byte store
constexpr int kRcSegs = kRcCols * (kRcRows / kRcSeg) / kThreads;  // stores per thread: 2
static_assert(kRcRows * kRcUnitsPerRow % kThreads == 0 && kRcCols * (kRcRows / kRcSeg) % kThreads == 0,
              "rows/cols tile split");
static_assert(kThreads == 256 && kRcCols == 64, "the x^T store mapping assumes 8 warps and 64 columns");

// A unit's 16 elements as their raw bits, kept in registers between the load and the use (the
// rows/cols kernel's prefetch: converting at load time would stall on the load right there).
// bf16: two per word, the lower address in the low half; fp32: one per word.
template <typename T>
constexpr int kRawWords = kRcUnit * static_cast<int>(sizeof(T)) / 4;

template <typename T>
__device__ inline void load_unit_raw(const T* p, uint32_t (&w)[kRawWords<T>]) {
#pragma unroll
  for (int i = 0; i < kRawWords<T> / 4; ++i) {
    const uint4 v = *reinterpret_cast<const uint4*>(p + i * Vec16<T>::kN);
    w[4 * i] = v.x;
    w[4 * i + 1] = v.y;
    w[4 * i + 2] = v.z;
    w[4 * i + 3] = v.w;
  }
}
__device__ inline uint32_t raw_bits(float v) { return __float_as_uint(v); }
__device__ inline uint32_t raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
// Elements gc + [0, N) of row gr of x ([rows, cols]) as raw bits (bf16: two per word, the lower
// address in the low half; fp32: one per word), element by element, zeros outside x.
template <typename T, int N>
__device__ inline void load_raw_guarded(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t gr,
                                        int64_t gc, uint32_t (&w)[N * sizeof(T) / 4]) {
#pragma unroll
  for (int i = 0; i < static_cast<int>(N * sizeof(T) / 4); ++i) w[i] = 0;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (gr < rows && gc + j < cols) {
      const uint32_t b = raw_bits(x[gr * cols + gc + j]);
      if constexpr (sizeof(T) == 2) {
        w[j / 2] |= b << (16 * (j % 2));
      } else {
        w[j] = b;
      }
    }
  }
}
template <typename T>
__device__ inline float raw_element(const uint32_t (&w)[kRawWords<T>], int j) {
  if constexpr (sizeof(T) == 2) {
    return __uint_as_float(j % 2 == 0 ? w[j / 2] << 16 : w[j / 2] & 0xFFFF0000u);
  } else {
    return __uint_as_float(w[j]);
  }
}

// fp8_rows_cols_kernel's generic path for a tile (ragged units, bounds, non-finite or extreme
// values or scales): this thread's two units element by element from x, the IEEE division and the
// CPU's NaN codes; codes outside x are 0 whatever the scale (a NaN scale would encode NaN).
// Written straight to rows_out and the shared tile (rows kRcStride bytes apart). Not inlined: its
// registers stay out of the fast path's budget.
template <typename T, bool kCols>
__device__ __noinline__ void rows_cols_generic(const T* __restrict__ x, int64_t rows, int64_t cols,
                                               int64_t cols_p, int64_t r0, int64_t c0, float s,
                                               bool e4m3, uint8_t* __restrict__ rows_out,
                                               uint8_t* tile) {
  for (int k = 0; k < kRcUnits; ++k) {
    const int u = threadIdx.x + k * kThreads;
    const int tr = u / kRcUnitsPerRow, tc = (u % kRcUnitsPerRow) * kRcUnit;
    const int64_t gr = r0 + tr, gc = c0 + tc;
    for (int j = 0; j < kRcUnit; ++j) {
      const bool in = gr < rows && gc + j < cols;
      const float v = in ? to_float(x[gr * cols + gc + j]) : 0.0f;
      const uint8_t code = in ? static_cast<uint8_t>(fp8x2_encode(v / s, 0.0f, v, 0.0f, e4m3)) : 0;
      if (rows_out != nullptr && gr < rows && gc + j < cols_p) rows_out[gr * cols_p + gc + j] = code;
      if constexpr (kCols) tile[tr * kRcStride + tc + j] = code;
    }
  }
}

template <typename T, bool kCols, bool kRecord>
__global__ void __launch_bounds__(kThreads, 3) fp8_rows_cols_kernel(
    const T* __restrict__ x, int64_t rows, int64_t cols, int64_t cols_p, int64_t rows_p, int64_t row_tiles,
    int64_t col_tiles, ScaleArgs sa, float fmax, bool e4m3, bool vec_ok, uint8_t* __restrict__ rows_out,
    uint8_t* __restrict__ cols_out, float* scale_out) {
  __shared__ __align__(16) uint8_t tile[kRcRows][kRcStride];
  const float s = device_scale(sa, fmax);
  if (blockIdx.x == 0 && threadIdx.x == 0) scale_out[0] = s;
  const bool fast_div = scale_division_ok(s);  // else the IEEE division (huge/tiny/non-finite s)
  const float rs = 1.0f / s;
  uint32_t m = 0;
  const int64_t tiles = row_tiles * col_tiles;
  // Loads tile t's two units as raw bits (16-byte loads where the unit is whole and aligned, else
  // element by element with zeros outside x).
  auto load_tile = [&](int64_t t, uint32_t(&raw)[kRcUnits][kRawWords<T>], bool(&full)[kRcUnits]) {
    const int64_t r0 = (t / col_tiles) * kRcRows, c0 = (t % col_tiles) * kRcCols;
#pragma unroll
    for (int k = 0; k < kRcUnits; ++k) {
      const int u = threadIdx.x + k * kThreads;
      const int64_t gr = r0 + u / kRcUnitsPerRow, gc = c0 + (u % kRcUnitsPerRow) * kRcUnit;
      full[k] = vec_ok && gr < rows && gc + kRcUnit <= cols;
      if (full[k]) {
        load_unit_raw(x + gr * cols + gc, raw[k]);
      } else {
        load_raw_guarded<T, kRcUnit>(x, rows, cols, gr, gc, raw[k]);
      }
    }
  };
  // Software pipeline: the next tile's loads are issued as soon as this tile is encoded, so they
  // are in flight while this tile's codes are stored and transposed (and across the barriers).
  uint32_t raw[kRcUnits][kRawWords<T>];
  bool full[kRcUnits];
  if (blockIdx.x < tiles) load_tile(blockIdx.x, raw, full);
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * kRcRows, c0 = (t % col_tiles) * kRcCols;
    // ---- max |x| of this thread's elements (the recorded amax; the fast path's bound)
    uint32_t mt = 0;
#pragma unroll
    for (int k = 0; k < kRcUnits; ++k)
#pragma unroll
      for (int j = 0; j < kRcUnit; ++j) mt = max(mt, float_bits(fabsf(raw_element<T>(raw[k], j))));
    if constexpr (kRecord) m = max(m, mt);
    // ---- encode both units: fast (whole units, finite bounded quotients, the format a template
    // argument) when the whole warp qualifies, else element by element from x (kept rolled)
    bool whole = true;
#pragma unroll
    for (int k = 0; k < kRcUnits; ++k) whole = whole && full[k];
    const bool fast = __all_sync(0xffffffffu, whole && fast_div && mt < kFastAbsBound);
    uint32_t packed[kRcUnits][kRcUnit / 4];
    auto encode_fast = [&](auto fmt) {
      constexpr bool kE4m3 = decltype(fmt)::value;
#pragma unroll
      for (int k = 0; k < kRcUnits; ++k)
#pragma unroll
        for (int w = 0; w < kRcUnit / 4; ++w) {
          const float a = raw_element<T>(raw[k], 4 * w), b = raw_element<T>(raw[k], 4 * w + 1);
          const float c = raw_element<T>(raw[k], 4 * w + 2), d = raw_element<T>(raw[k], 4 * w + 3);
          packed[k][w] =
              encode_pair_fast<kE4m3>(a, b, s, rs) | encode_pair_fast<kE4m3>(c, d, s, rs) << 16;
        }
    };
    if (fast && e4m3) {
      encode_fast(std::true_type{});
    } else if (fast) {
      encode_fast(std::false_type{});
    } else {
      rows_cols_generic<T, kCols>(x, rows, cols, cols_p, r0, c0, s, e4m3, rows_out, &tile[0][0]);
    }
    // ---- prefetch the next tile into raw (free now)
    if (t + gridDim.x < tiles) load_tile(t + gridDim.x, raw, full);
    // ---- fast path: store the row-major codes, stage them for x^T
    if (fast) {
#pragma unroll
      for (int k = 0; k < kRcUnits; ++k) {
        const int u = threadIdx.x + k * kThreads;
        const int tr = u / kRcUnitsPerRow, tc = (u % kRcUnitsPerRow) * kRcUnit;
        const int64_t gr = r0 + tr, gc = c0 + tc;  // a whole unit: inside x
        if (rows_out != nullptr)
          *reinterpret_cast<uint4*>(rows_out + gr * cols_p + gc) =
              make_uint4(packed[k][0], packed[k][1], packed[k][2], packed[k][3]);
        if constexpr (kCols) {  // 4-byte stores: the shared rows are 68 bytes apart
#pragma unroll
          for (int w = 0; w < kRcUnit / 4; ++w) *reinterpret_cast<uint32_t*>(&tile[tr][tc + 4 * w]) = packed[k][w];
        }
      }
    }
    if constexpr (kCols) {
      __syncthreads();
      // ---- x^T: thread -> (column c, segment g); rows_p % 16 == 0, so a segment is wholly
      // inside or outside [0, rows_p)
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      const int c = (warp / 2) * 16 + lane / 2;
      const int64_t gc = c0 + c;
#pragma unroll
      for (int k = 0; k < kRcSegs; ++k) {
        const int g = 2 * (warp % 2) + lane % 2 + 4 * k;
        const int64_t gr = r0 + g * kRcSeg;
        if (gc < cols && gr < rows_p) {
          uint32_t w[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int rr = g * kRcSeg + 4 * q;
            w[q] = static_cast<uint32_t>(tile[rr][c]) | (static_cast<uint32_t>(tile[rr + 1][c]) << 8) |
                   (static_cast<uint32_t>(tile[rr + 2][c]) << 16) | (static_cast<uint32_t>(tile[rr + 3][c]) << 24);
          }
          *reinterpret_cast<uint4*>(cols_out + gc * rows_p + gr) = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      __syncthreads();  // the next tile overwrites the shared tile
    }
  }
  if constexpr (kRecord) {
    m = block_max(m);
    if (threadIdx.x == 0) atomicMax(sa.record, m);
  }
}

// out [cols, ldo] = x^T, zero in columns >= rows. 32x32 tiles, (32, 8) threads.
template <typename T>
__global__ void transpose_pad_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t ldo,
                                     int64_t col_tiles, T* __restrict__ out) {
  __shared__ T tile[32][33];
  const int64_t r0 = (blockIdx.x / col_tiles) * 32, c0 = (blockIdx.x % col_tiles) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    tile[i][threadIdx.x] = (r < rows && c < cols) ? x[r * cols + c] : T(0.0f);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (c < cols && r < ldo) out[c * ldo + r] = tile[threadIdx.x][i];
  }
}

// Block FP8 (1x128 or 128x128 blocks) of x and/or of x^T in one pass over x: grid-stride over
// 128 x 128 tiles of x (as many CTAs as are resident at once), 256 threads. Thread t owns the
// 8 x 8 sub-block of tile rows 8 (t / 16) + k and columns 8 (t % 16) + j (k, j < 8), held in
// registers as raw bits from load to encode; nothing of x goes through shared memory.
//   load:   row k of a sub-block is one 16-byte load (two for fp32; element-wise at ragged edges,
//           zeros outside x); a warp instruction reads two tile rows of 256 (bf16) contiguous
//           bytes. Software-pipelined: the next tile's loads are issued once this tile's codes
//           are computed, so they are in flight during its stores, the x^T pass and the barriers.
//   amax:   1x128: a tile row's max over the 16 lanes of a half-warp, a column's over the
//           thread's 8 rows, the other half-warp and the 8 warps (shared memory); both use
//           transposed butterflies (a lane ends with some of the values, each fully reduced), so
//           each scale s = amax / fmax and its reciprocal are computed by one lane (two for rows)
//           and shuffled to the lanes that need them. 128x128: the tile's max.
//   rows:   row k's 8 codes leave in one 8-byte store (a half-warp writes 128 contiguous bytes);
//   cols:   column j's 8 codes are 8 consecutive bytes of a row of x^T: one 8-byte store into a
//           128 x 128-byte shared tile, in 8-byte chunk (t / 16) XOR (t % 16) of its row, so the
//           16 lanes of a half-warp hit 16 different bank pairs; after a barrier 8 lanes read a
//           whole row (16 bytes each, conflict-free) and write it to x^T with 16-byte stores.
//   paths: a warp takes the fast path when its tile is whole (inside x, aligned) and every
//           scale it uses passes scale_division_ok: then every quotient is finite (|x / s| <= fmax), so
//           x / s is Markstein's quotient (qmath::div_by_scale_finite) and the code
//           the converter's, the format a template argument: no per-element branch. Anything
//           else (ragged tiles, x^T's padding, tiny, huge or non-finite scales) takes a rolled
//           element-by-element loop reading x again, with the IEEE division and the CPU's NaN
//           codes. Keeping those rare cases out of the unrolled code matters: with them inline
//           (a NaN branch per pair, both formats) the kernel was bound by instruction fetch and
//           ran at 8x the HBM floor instead of 1.6-1.8x (docs/performance.md).
// x^T's rows are zero-padded to ldt >= rows columns: the tile's rows past `rows` are zeros,
// encoded with the block's scale, as quantizing a zero-padded transpose does.
// Scales are amax / format max (amax 0 -> 1) and codes encode(x / s), the CPU's rules.
// 128 registers (2 CTAs per SM); capping them at 80 for 3 CTAs spills and is 10-20% slower.
constexpr int kBrTile = 128;
constexpr int kBrSub = 8;  // a thread's sub-block: 8 x 8 elements
static_assert(kThreads == (kBrTile / kBrSub) * (kBrTile / kBrSub), "one 8 x 8 sub-block per thread");

// Raw words of one sub-block row: 8 bf16 (4 words) or 8 fp32 (8 words).
template <typename T>
constexpr int kBrWords = kBrSub * static_cast<int>(sizeof(T)) / 4;

template <typename T>
__device__ inline float br_element(const uint32_t (&w)[kBrWords<T>], int j) {
  if constexpr (sizeof(T) == 2) {
    return __uint_as_float(j % 2 == 0 ? w[j / 2] << 16 : w[j / 2] & 0xFFFF0000u);
  } else {
    return __uint_as_float(w[j]);
  }
}

// Max of 8 values over the 16 lanes of a half-warp, transposed: afterwards value index
// 4 b3 + 2 b2 + b1 (b = bits of hl, the lane's index in its half-warp) is fully reduced in the
// lane (and in its neighbour hl ^ 1). 8 shuffles where reducing each value would take 32.
__device__ inline uint32_t half_warp_max8(uint32_t (&v)[8], int hl) {
  const bool b3 = hl & 8, b2 = hl & 4, b1 = hl & 2;
  uint32_t a[4], b[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // keep half b3 of the 8, send the other half
    const uint32_t keep = b3 ? v[i + 4] : v[i], send = b3 ? v[i] : v[i + 4];
    a[i] = max(keep, __shfl_xor_sync(0xffffffffu, send, 8));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t keep = b2 ? a[i + 2] : a[i], send = b2 ? a[i] : a[i + 2];
    b[i] = max(keep, __shfl_xor_sync(0xffffffffu, send, 4));
  }
  const uint32_t keep = b1 ? b[1] : b[0], send = b1 ? b[0] : b[1];
  const uint32_t c = max(keep, __shfl_xor_sync(0xffffffffu, send, 2));
  return max(c, __shfl_xor_sync(0xffffffffu, c, 1));
}

__device__ inline float pick4(const float (&a)[4], int i) {
  return i == 0 ? a[0] : i == 1 ? a[1] : i == 2 ? a[2] : a[3];
}

template <typename T, bool kTile2d>
__global__ void __launch_bounds__(kThreads, 2)
    fp8_block_rows_cols_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t ldt,
                               int64_t row_tiles, int64_t col_tiles, float fmax, bool e4m3,
                               bool vec_ok, bool vec_rows_out, bool vec_cols_out,
                               uint8_t* __restrict__ rows_out, float* __restrict__ rows_scales,
                               uint8_t* __restrict__ cols_out, float* __restrict__ cols_scales) {
  constexpr int W = kBrWords<T>, V = Vec16<T>::kN, kWarps = kThreads / 32;
  constexpr unsigned kFull = 0xffffffffu;
  __shared__ __align__(16) uint8_t codes_t[kBrTile][kBrTile];  // x^T's codes, chunks swizzled
  // Per-warp column maxima (1x128) / tile maxima (128x128), double-buffered by tile parity: a
  // warp may write the next tile's while another still reads this tile's (with no x^T pass there
  // is one barrier per tile).
  __shared__ __align__(16) uint32_t col_m[2][kWarps][kBrTile];
  __shared__ uint32_t tile_m[2][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int hl = lane % 16, half = lane / 16;  // lane in its half-warp; which half
  const int cc = threadIdx.x % 16, rg = threadIdx.x / 16;
  const int tr0 = kBrSub * rg, tc0 = kBrSub * cc;  // the sub-block's first tile row / column
  const int64_t tiles = row_tiles * col_tiles;
  const int64_t nbc = col_tiles;                      // 128-blocks per row of x
  const int64_t nbt = (ldt + kBrTile - 1) / kBrTile;  // 128-blocks per row of x^T
  // A whole tile lies inside x, its rows 16-byte aligned (not x^T's zero padding past `rows`).
  auto whole = [&](int64_t t) {
    return vec_ok && (t / col_tiles + 1) * kBrTile <= rows && (t % col_tiles + 1) * kBrTile <= cols;
  };

  uint32_t raw[kBrSub][W];
  auto load_tile = [&](int64_t t) {
    const int64_t r0 = (t / col_tiles) * kBrTile, gc = (t % col_tiles) * kBrTile + tc0;
    if (whole(t)) {
      const T* p = x + (r0 + tr0) * cols + gc;
#pragma unroll
      for (int k = 0; k < kBrSub; ++k) {
#pragma unroll
        for (int i = 0; i < W / 4; ++i) {
          const uint4 v = *reinterpret_cast<const uint4*>(p + k * cols + i * V);
          raw[k][4 * i] = v.x;
          raw[k][4 * i + 1] = v.y;
          raw[k][4 * i + 2] = v.z;
          raw[k][4 * i + 3] = v.w;
        }
      }
    } else {  // element by element, zeros outside x
#pragma unroll
      for (int k = 0; k < kBrSub; ++k) {
        const int64_t gr = r0 + tr0 + k;
        load_raw_guarded<T, kBrSub>(x, rows, cols, gr, gc, raw[k]);
      }
    }
  };

  if (blockIdx.x < tiles) load_tile(blockIdx.x);
  int buf = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x, buf ^= 1) {
    const int64_t rt = t / col_tiles, ct = t % col_tiles;
    const int64_t r0 = rt * kBrTile, c0 = ct * kBrTile;
    // ---- amax and scales. 1x128: this lane's row scale (s_row, r_row: sub-block row ridx) and
    // column scales (s4, r4: sub-block columns 4 half + [0, 4)); 128x128: one scale (s_row).
    float s_row, r_row, s4[4], r4[4];
    bool ok;  // every scale this lane computed allows x / s through the reciprocal
    if constexpr (kTile2d) {
      uint32_t m = 0;
#pragma unroll
      for (int k = 0; k < kBrSub; ++k)
#pragma unroll
        for (int j = 0; j < kBrSub; ++j) m = max(m, float_bits(fabsf(br_element<T>(raw[k], j))));
      m = warp_max(m);
      if (lane == 0) tile_m[buf][warp] = m;
      __syncthreads();  // (A)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m = max(m, tile_m[buf][w]);
      s_row = scale_from_amax(bits_float(m), fmax);
      r_row = 1.0f / s_row;
      ok = scale_division_ok(s_row);
      if (threadIdx.x == 0) {
        if (rows_scales && r0 < rows) rows_scales[rt * nbc + ct] = s_row;
        if (cols_scales && c0 < cols) cols_scales[ct * nbt + rt] = s_row;
      }
    } else {
      uint32_t mr[kBrSub], mc[kBrSub];
#pragma unroll
      for (int j = 0; j < kBrSub; ++j) mc[j] = 0;
#pragma unroll
      for (int k = 0; k < kBrSub; ++k) {
        mr[k] = 0;
#pragma unroll
        for (int j = 0; j < kBrSub; ++j) {
          const uint32_t a = float_bits(fabsf(br_element<T>(raw[k], j)));
          mr[k] = max(mr[k], a);
          mc[j] = max(mc[j], a);
        }
      }
      // Columns: half h keeps columns 4 h + [0, 4) of its sub-block, the other half's rows
      // joined in, then the 8 warps' maxima through shared memory.
      uint32_t m4[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t keep = half ? mc[i + 4] : mc[i], send = half ? mc[i] : mc[i + 4];
        m4[i] = max(keep, __shfl_xor_sync(kFull, send, 16));
      }
      const int cq = tc0 + 4 * half;  // the 4 columns this lane finishes: cq + [0, 4)
      *reinterpret_cast<uint4*>(&col_m[buf][warp][cq]) = make_uint4(m4[0], m4[1], m4[2], m4[3]);
      // Rows: the lane finishes row ridx of the sub-block (as does its neighbour hl ^ 1).
      const uint32_t mrow = half_warp_max8(mr, hl);
      const int ridx = 4 * ((hl >> 3) & 1) + 2 * ((hl >> 2) & 1) + ((hl >> 1) & 1);
      s_row = scale_from_amax(bits_float(mrow), fmax);
      r_row = 1.0f / s_row;
      ok = scale_division_ok(s_row);
      if (rows_scales && hl % 2 == 0 && r0 + tr0 + ridx < rows)
        rows_scales[(r0 + tr0 + ridx) * nbc + ct] = s_row;
      __syncthreads();  // (A)
#pragma unroll
      for (int i = 0; i < 4; ++i) m4[i] = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const uint4 v = *reinterpret_cast<const uint4*>(&col_m[buf][w][cq]);
        m4[0] = max(m4[0], v.x);
        m4[1] = max(m4[1], v.y);
        m4[2] = max(m4[2], v.z);
        m4[3] = max(m4[3], v.w);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s4[i] = scale_from_amax(bits_float(m4[i]), fmax);
        r4[i] = 1.0f / s4[i];
        ok = ok && scale_division_ok(s4[i]);
        if (cols_scales && warp == 0 && c0 + cq + i < cols)
          cols_scales[(c0 + cq + i) * nbt + rt] = s4[i];
      }
    }
    // Scale (and reciprocal) of sub-block row k / column j: a row's comes from the lanes that
    // finished it, a column's from this lane or the other half-warp. Every lane calls these.
    auto row_scale = [&](int k, float& s, float& r) {
      s = s_row;
      r = r_row;
      if constexpr (!kTile2d) {
        const int src = 16 * half + 8 * ((k >> 2) & 1) + 4 * ((k >> 1) & 1) + 2 * (k & 1);
        s = __shfl_sync(kFull, s_row, src);
        r = __shfl_sync(kFull, r_row, src);
      }
    };
    auto col_scale = [&](int j, float& s, float& r) {
      s = s_row;
      r = r_row;
      if constexpr (!kTile2d) {
        const float ms = pick4(s4, j % 4), mr = pick4(r4, j % 4);
        const float so = __shfl_xor_sync(kFull, ms, 16), ro = __shfl_xor_sync(kFull, mr, 16);
        const bool own = half == j / 4;
        s = own ? ms : so;
        r = own ? mr : ro;
      }
    };
    // ---- codes, stored as they are made: x's rows to global memory, x^T's to the shared tile.
    // Fast path (a whole tile, every scale of the warp fit for the reciprocal, so every quotient
    // is finite): Markstein quotients and the converter, unrolled over the registers. Otherwise
    // (ragged or padding tiles, extreme or non-finite scales) element by element from x again,
    // the IEEE division and the CPU's NaN codes, in a rolled loop that stays out of the
    // instruction cache's way.
    const bool all_ok = __all_sync(kFull, ok);
    const bool fast = all_ok && whole(t) && (rows_out == nullptr || vec_rows_out);
    auto encode_fast = [&](auto fmt) {
      constexpr bool kE4m3 = decltype(fmt)::value;
      if (rows_out != nullptr) {
        uint8_t* dst = rows_out + (r0 + tr0) * cols + c0 + tc0;
#pragma unroll
        for (int k = 0; k < kBrSub; ++k) {
          float s, r;
          row_scale(k, s, r);
          uint32_t w[2] = {0, 0};
#pragma unroll
          for (int j = 0; j < kBrSub; j += 2) {
            const float a = br_element<T>(raw[k], j), b = br_element<T>(raw[k], j + 1);
            w[j / 4] |= encode_pair_fast<kE4m3>(a, b, s, r) << (8 * (j % 4));
          }
          *reinterpret_cast<uint2*>(dst + k * cols) = make_uint2(w[0], w[1]);
        }
      }
      if (cols_out != nullptr) {
#pragma unroll
        for (int j = 0; j < kBrSub; ++j) {
          float s, r;
          col_scale(j, s, r);
          uint32_t w[2] = {0, 0};
#pragma unroll
          for (int k = 0; k < kBrSub; k += 2) {
            const float a = br_element<T>(raw[k], j), b = br_element<T>(raw[k + 1], j);
            w[k / 4] |= encode_pair_fast<kE4m3>(a, b, s, r) << (8 * (k % 4));
          }
          *reinterpret_cast<uint2*>(&codes_t[tc0 + j][kBrSub * (rg ^ cc)]) = make_uint2(w[0], w[1]);
        }
      }
    };
    if (fast && e4m3) {
      encode_fast(std::true_type{});
    } else if (fast) {
      encode_fast(std::false_type{});
    } else {
      auto code = [&](float v, float s) {
        return static_cast<uint8_t>(fp8x2_encode(v / s, 0.0f, v, 0.0f, e4m3));
      };
#pragma unroll 1
      for (int k = 0; k < kBrSub; ++k) {
        float sk, rk;
        row_scale(k, sk, rk);
        const int64_t gr = r0 + tr0 + k;
#pragma unroll 1
        for (int j = 0; j < kBrSub; ++j) {
          float sj, rj;
          col_scale(j, sj, rj);
          const int64_t gc = c0 + tc0 + j;
          const bool in = gr < rows && gc < cols;
          const float v = in ? to_float(x[gr * cols + gc]) : 0.0f;
          if (rows_out != nullptr && in) rows_out[gr * cols + gc] = code(v, sk);
          if (cols_out != nullptr) codes_t[tc0 + j][kBrSub * (rg ^ cc) + k] = code(v, sj);
        }
      }
    }
    // ---- prefetch the next tile into raw (free now)
    if (t + gridDim.x < tiles) load_tile(t + gridDim.x);
    if (cols_out != nullptr) {
      __syncthreads();  // (B)
      // Row c of the shared tile = x^T's row c0 + c, bytes r0 + [0, 128): 8 lanes per row, 16
      // bytes each (logical chunks 2 m, 2 m + 1, stored at chunk pair m ^ (c / 16), swapped
      // when c / 8 is odd).
      const int m = threadIdx.x % 8;
#pragma unroll
      for (int i = 0; i < kBrTile * 8 / kThreads; ++i) {
        const int c = (kThreads / 8) * i + threadIdx.x / 8;
        const int sw = c / kBrSub;
        uint4 v = *reinterpret_cast<const uint4*>(&codes_t[c][16 * (m ^ (sw >> 1))]);
        if (sw & 1) v = make_uint4(v.z, v.w, v.x, v.y);
        const int64_t gc = c0 + c, gr = r0 + 16 * m;
        if (gc >= cols || gr >= ldt) continue;
        uint8_t* dst = cols_out + gc * ldt + gr;
        if (vec_cols_out && gr + 16 <= ldt) {
          *reinterpret_cast<uint4*>(dst) = v;
        } else {
          const uint32_t w[4] = {v.x, v.y, v.z, v.w};
          for (int b = 0; b < 16 && gr + b < ldt; ++b) dst[b] = static_cast<uint8_t>(w[b / 4] >> (8 * (b % 4)));
        }
      }
    }
    // codes_t is written again after the next tile's barrier (A), which every warp reaches after
    // its reads here; col_m / tile_m [buf] two tiles on, after the next tile's (A) as well.
  }
}

// ---------------------------------------------------------------- FP4, tiled (cols % G == 0)
// When a row holds a whole number of groups, the groups of the tensor are consecutive runs of G
// elements in flat order (flat group F = row * ngroups + g starts at element F * G). A CTA of
// kQGroups threads then quantizes kQGroups consecutive groups, one per thread, with the same
// per-group rule as fp4_quantize_kernel (fp4_quantize_group, so the same codes bit for bit):
//   - x comes in with coalesced 16-byte loads into shared memory, rows of G floats padded to
//     G + 1 (a thread reading its group down the row hits 32 different banks);
//   - codes and mask are written to shared memory (rows of G + 4 bytes) and leave with coalesced
//     4-byte stores; the scale codes are one byte per thread, consecutive;
//   - with MS-EDEN (eden_pb > 0 groups per correction block, dividing kQGroups and the row's
//     group count, so a block lies inside one CTA and one row) the block's first thread then
//     corrects the block's scales from the staged x, as fp4_eden_kernel does (eden_correct_block,
//     called with flat group indices: row 0 of a tensor of total_groups groups).
constexpr int kQGroups = 128;

__device__ inline void load16_scalar(const float* p, float (&v)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = p[j];
}
__device__ inline void load16_scalar(const __nv_bfloat16* p, float (&v)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(p[j]);
}

// The ne elements of x from e0 on into the padded tile xs (rows of G floats, G + 1 apart).
template <typename T, int G>
__device__ inline void stage_tile(const T* __restrict__ x, int64_t e0, int ne, bool vec_ok, float* xs) {
  constexpr int kV = Vec16<T>::kN;  // elements per 16-byte load
  for (int i = threadIdx.x * kV; i < ne; i += kQGroups * kV) {
    float v[kV];
    if (vec_ok) {
      load16(x + e0 + i, v);
    } else {
      load16_scalar(x + e0 + i, v);
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) xs[((i + j) / G) * (G + 1) + (i + j) % G] = v[j];
  }
}

// The forward Hadamard rotation (blocks of B along the flat tile, B dividing ne) of the staged
// tile, in place: hadamard_kernel's schedule and float operations (kernels/hadamard.cu), so the
// values are the CPU's hadamard_forward bit for bit. `sign`: the B signs (+-1). Callers
// synchronise before and after.
template <int G, int B>
__device__ inline void rotate_tile(float* xs, int ne, const float* sign, float norm) {
  constexpr int kLanes = HadamardLanes<B>::kLanes, kPerLane = HadamardLanes<B>::kPerLane;
  constexpr int kBlocksPerWarp = HadamardLanes<B>::kBlocksPerWarp;
  constexpr int kWarps = kQGroups / 32;
  const int lane = threadIdx.x & 31, l = lane % kLanes, sub = lane / kLanes, warp = threadIdx.x / 32;
  const int nblk = ne / B;
  for (int b0 = warp * kBlocksPerWarp; b0 < nblk; b0 += kWarps * kBlocksPerWarp) {  // warp-uniform
    const int b = b0 + sub;
    const bool active = b < nblk;
    float v[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = e * kLanes + l, i = b * B + j;
      v[e] = active ? __fmul_rn(xs[(i / G) * (G + 1) + i % G], sign[j]) : 0.0f;
    }
    hadamard_butterfly<B>(v, l);
    if (!active) continue;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int i = b * B + e * kLanes + l;
      xs[(i / G) * (G + 1) + i % G] = __fmul_rn(v[e], norm);
    }
  }
}

// Rotation of the tiled quantizer's input (B = 0: none).
struct TileRotation {
  bool randomized = false;
  uint64_t seed = 0;
  float norm = 1.0f;  // 1 / sqrt(B), the host's float expression
};

// max |H x| (float bits) of x rotated as rotate_tile rotates it, one atomicMax per CTA into *out:
// the amax the tensor scale of a rotated FP4 operand comes from, without writing H x.
template <typename T, int G, int B>
__global__ void __launch_bounds__(kQGroups)
    fp4_rotated_amax_kernel(const T* __restrict__ x, int64_t total_groups, bool vec_ok, TileRotation rot,
                            uint32_t* out) {
  __shared__ float xs[kQGroups * (G + 1)];
  __shared__ float sign[B];
  hadamard_signs<B>(sign, rot.randomized, rot.seed);
  const int64_t g0 = blockIdx.x * static_cast<int64_t>(kQGroups), e0 = g0 * G;
  const int ne = static_cast<int>(min(static_cast<int64_t>(kQGroups), total_groups - g0)) * G;
  stage_tile<T, G>(x, e0, ne, vec_ok, xs);
  __syncthreads();
  rotate_tile<G, B>(xs, ne, sign, rot.norm);
  __syncthreads();
  uint32_t m = 0;
  for (int i = threadIdx.x; i < ne; i += kQGroups) m = max(m, float_bits(fabsf(xs[(i / G) * (G + 1) + i % G])));
  m = block_max(m);
  if (threadIdx.x == 0) atomicMax(out, m);
}

template <typename T, int G, int B>
__global__ void __launch_bounds__(kQGroups)
    fp4_quantize_tile_kernel(const T* __restrict__ x, int64_t total_groups, bool vec_ok,
                             Fp4GroupRule rule, const float* ts_dev, int eden_pb, TileRotation rot,
                             uint8_t* codes, uint8_t* scodes, uint8_t* mask) {
  static_assert(G % 8 == 0, "a group holds whole 16-byte loads of bf16 and whole 4-byte code words");
  constexpr int kW = G / 4 + 1;     // 32-bit words per padded code row
  __shared__ float xs[kQGroups * (G + 1)];
  __shared__ uint32_t cs[kQGroups * kW];
  __shared__ uint32_t ms[kQGroups * kW];
  __shared__ float sign[B > 0 ? B : 1];
  if constexpr (B > 0) hadamard_signs<B>(sign, rot.randomized, rot.seed);
  if (ts_dev) rule.tensor_scale = *ts_dev;
  const int t = threadIdx.x;
  const int64_t g0 = blockIdx.x * static_cast<int64_t>(kQGroups), e0 = g0 * G;
  const int ng = static_cast<int>(min(static_cast<int64_t>(kQGroups), total_groups - g0));
  const int ne = ng * G;  // a multiple of the 16-byte load, of 4 and (rotating) of B
  stage_tile<T, G>(x, e0, ne, vec_ok, xs);
  __syncthreads();
  if constexpr (B > 0) {
    rotate_tile<G, B>(xs, ne, sign, rot.norm);
    __syncthreads();
  }
  if (t < ng) {
    const float* xr = xs + t * (G + 1);
    uint8_t* cr = reinterpret_cast<uint8_t*>(cs + t * kW);
    uint8_t* mr = reinterpret_cast<uint8_t*>(ms + t * kW);
    scodes[g0 + t] = fp4_quantize_group([xr](int64_t c) { return xr[c]; }, 0, G,
                                        static_cast<uint64_t>((g0 + t) * G), rule, cr,
                                        mask ? mr : nullptr);
  }
  __syncthreads();
  for (int w = t; w < ne / 4; w += kQGroups) {
    const int s = (4 * w / G) * kW + (4 * w % G) / 4;
    reinterpret_cast<uint32_t*>(codes + e0)[w] = cs[s];
    if (mask) reinterpret_cast<uint32_t*>(mask + e0)[w] = ms[s];
  }
  if (eden_pb > 0) {
    __syncthreads();  // this CTA's codes and scale codes are in global memory and visible
    if (t < ng && t % eden_pb == 0) {
      const auto load = [&](int64_t c) {
        const int64_t e = c - e0;
        return xs[(e / G) * (G + 1) + e % G];
      };
      eden_correct_block(load, codes, scodes, 0, g0 + t, g0 + t + eden_pb, G, total_groups * G,
                         total_groups, rule.mx, rule.tensor_scale, rule.seed,
                         rule.stream);
    }
  }
}

// out = e2m1(code) * scale(group) * ts, four elements per thread (cols % group == 0, so the scale
// of flat element i is scodes[i / group]; group = 2^group_shift; out 16-byte (fp32) or 8-byte
// (bf16) aligned).
__device__ inline void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ inline void store4(__nv_bfloat16* p, const float (&v)[4]) {
  __nv_bfloat162 h[2] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3])};
  *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(h);
}

template <typename TO>
__global__ void __launch_bounds__(kThreads)
    fp4_dequant_vec_kernel(const uint8_t* __restrict__ codes, int64_t n4, int group_shift,
                           const uint8_t* __restrict__ scodes, bool mx, float ts, const float* ts_dev,
                           TO* __restrict__ out) {
  if (ts_dev) ts = *ts_dev;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n4; q += stride) {
    const uchar4 c = reinterpret_cast<const uchar4*>(codes)[q];
    const uint8_t sc = scodes[(4 * q) >> group_shift];
    const float s = mx ? e8m0_decode(sc) : e4m3_decode(sc);
    const float v[4] = {e2m1_decode(c.x) * s * ts, e2m1_decode(c.y) * s * ts, e2m1_decode(c.z) * s * ts,
                        e2m1_decode(c.w) * s * ts};
    store4(out + 4 * q, v);
  }
}

// out [cols, rows] (fp32) = (e2m1(code) * scale(group) * ts)^T: the dequantization and the
// transpose in one pass. 32 x 32 tiles through shared memory (one padded row per tile row): a
// warp reads 32 consecutive codes of one row and writes 32 consecutive floats of one out row.
// Same products as fp4_dequant_kernel, so the same bits.
__global__ void __launch_bounds__(256)
    fp4_dequant_t_kernel(const uint8_t* __restrict__ codes, int64_t rows, int64_t cols, int group,
                         int64_t ngroups, const uint8_t* __restrict__ scodes, bool mx, float ts,
                         const float* ts_dev, float* __restrict__ out) {
  __shared__ float tile[32][33];
  if (ts_dev) ts = *ts_dev;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 32, c0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;  // 8 warps
  for (int i = ty; i < 32; i += 8) {
    const int64_t r = r0 + i, c = c0 + tx;
    if (r < rows && c < cols) {
      const uint8_t sc = scodes[r * ngroups + c / group];
      const float sv = mx ? e8m0_decode(sc) : e4m3_decode(sc);
      tile[i][tx] = e2m1_decode(codes[r * cols + c]) * sv * ts;
    }
  }
  __syncthreads();
  for (int i = ty; i < 32; i += 8) {
    const int64_t c = c0 + i, r = r0 + tx;
    if (r < rows && c < cols) out[c * rows + r] = tile[tx][i];
  }
}

// ---------------------------------------------------------------- host side

struct Rows2D {
  int64_t rows, cols;
};

Rows2D check_cuda_input(const Tensor& x, const char* fn) {
  LASP_CHECK(x.defined() && x.ndim() >= 1) << fn << ": x must be a defined tensor with >= 1 dims";
  LASP_CHECK(x.is_cuda()) << fn << ": expects a CUDA tensor, got " << x.str();
  LASP_CHECK(x.is_contiguous()) << fn << ": x must be contiguous, got " << x.str();
  LASP_CHECK(x.dtype() == DType::F32 || x.dtype() == DType::BF16)
      << fn << ": x must be fp32 or bf16, got " << x.str();
  const int64_t cols = x.dim(-1);
  return {cols == 0 ? 0 : x.numel() / cols, cols};
}

int grid_for(int64_t n, int threads = kThreads, int max_blocks = 8192) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks)));
}

// Launches body.template operator()<T>() with T = float or __nv_bfloat16 for x's dtype.
template <typename F>
void with_input_type(const Tensor& x, F&& body) {
  if (x.dtype() == DType::F32) {
    body(static_cast<const float*>(x.raw()));
  } else {
    body(static_cast<const __nv_bfloat16*>(x.raw()));
  }
}

// max |x| as float bits into a fresh one-element device buffer (async): amax_vec_kernel.
Tensor device_amax_bits(const Tensor& x) {
  Tensor amax = Tensor::empty({1}, DType::I32, x.device());
  amax_into_cuda(amax, 0, x, true);
  return amax;
}

float read_amax(const Tensor& amax_bits) {
  uint32_t bits = 0;
  cudaStream_t stream = cuda_stream();
  CUDA_CHECK(cudaMemcpyAsync(&bits, amax_bits.raw(), sizeof(bits), cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return bits_float(bits);
}

int scaling_index(Fp8Scaling s) {
  return s == Fp8Scaling::PerTensor ? 0 : s == Fp8Scaling::Block1x128 ? 1 : 2;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int max_grid_blocks() {
  static const int blocks = [] {
    int dev = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return std::max(1, sms) * 8;
  }();
  return blocks;
}

// Grid of a grid-stride kernel over `work` CTA-sized items: as many CTAs as are resident on the
// GPU at once (SMs x the kernel's occupancy at kThreads), at most one per item. Cached per kernel.
template <typename Kernel>
int persistent_grid(Kernel kernel, int64_t work) {
  static std::mutex mu;
  static std::map<const void*, int> resident_of;
  int resident = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    int& r = resident_of[reinterpret_cast<const void*>(kernel)];
    if (r == 0) {
      int dev = 0, sms = 0, per_sm = 0;
      CUDA_CHECK(cudaGetDevice(&dev));
      CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
      CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      r = std::max(1, sms) * std::max(1, per_sm);
    }
    resident = r;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, resident)));
}

// fp8_block_rows_cols_kernel over x as [rows, cols] (x's leading dims flattened): the codes of x
// (rows_out, [rows, cols]) and/or of x^T zero-padded to ldt columns (cols_out, [cols, ldt]), with
// their block scales (1x128: [rows, nb(cols)] and [cols, nb(ldt)]; 128x128: [nb(rows), nb(cols)]
// and [nb(cols), nb(ldt)]; nb(n) = ceil(n / 128)).
void launch_block_rows_cols(const Tensor& x, int64_t rows, int64_t cols, int64_t ldt,
                            Fp8Format format, bool tile2d, uint8_t* rows_out, float* rows_scales,
                            uint8_t* cols_out, float* cols_scales) {
  const int64_t col_tiles = (cols + kBrTile - 1) / kBrTile;
  const int64_t row_tiles = ((cols_out ? std::max(rows, ldt) : rows) + kBrTile - 1) / kBrTile;
  if (row_tiles == 0 || col_tiles == 0) return;
  const float fmax = fp8_format_max(format);
  const bool e4m3 = format == Fp8Format::E4M3;
  cudaStream_t stream = cuda_stream();
  with_input_type(x, [&](auto* xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const bool vec_ok = aligned16(xp) && cols % Vec16<T>::kN == 0;
    // 8-byte code stores of x's rows, 16-byte ones of x^T's, where every output row starts aligned
    const bool vec_rows = aligned16(rows_out) && cols % kBrSub == 0,
               vec_cols = aligned16(cols_out) && ldt % 16 == 0;
    auto launch = [&](auto kernel) {
      const int grid = persistent_grid(kernel, row_tiles * col_tiles);
      kernel<<<grid, kThreads, 0, stream>>>(xp, rows, cols, ldt, row_tiles, col_tiles, fmax, e4m3,
                                            vec_ok, vec_rows, vec_cols, rows_out, rows_scales,
                                            cols_out, cols_scales);
    };
    if (tile2d) {
      launch(fp8_block_rows_cols_kernel<T, true>);
    } else {
      launch(fp8_block_rows_cols_kernel<T, false>);
    }
  });
  CUDA_CHECK_LAUNCH("fp8 block quantizer");
}

}  // namespace

float amax_cuda(const Tensor& x) {
  check_cuda_input(x, "amax_cuda");
  return read_amax(device_amax_bits(x));
}

QuantizedFp8 quantize_fp8_cuda(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                               AmaxHistory* delayed) {
  const Rows2D d = check_cuda_input(x, "quantize_fp8_cuda");
  LASP_CHECK(delayed == nullptr || scaling == Fp8Scaling::PerTensor)
      << "quantize_fp8_cuda: delayed (amax history) scaling is per tensor only";
  const float fmax = fp8_format_max(format);
  const bool e4m3 = format == Fp8Format::E4M3;
  const Device dev = x.device();

  QuantizedFp8 q;
  q.format = format;
  q.scaling = scaling;
  q.codes = Tensor::empty(x.shape(), DType::U8, dev);
  const int64_t nb = (d.cols + kBlock - 1) / kBlock;
  Shape scale_shape = {1};
  if (scaling == Fp8Scaling::Block1x128) scale_shape = {d.rows, nb};
  if (scaling == Fp8Scaling::Block128x128) scale_shape = {(d.rows + kBlock - 1) / kBlock, nb};
  q.scales = Tensor::empty(scale_shape, DType::F32, dev);
  auto* codes = q.codes.data<uint8_t>();
  float* scales = q.scales.data<float>();
  cudaStream_t stream = cuda_stream();
  const int64_t n = x.numel();

  if (scaling == Fp8Scaling::PerTensor) {
    const Tensor amax = device_amax_bits(x);
    const uint32_t* amax_ptr = static_cast<const uint32_t*>(amax.raw());
    float fixed_scale = 1.0f;
    float amax_now = 0.0f;
    if (delayed) {  // the history lives on the host: one sync to record this step's amax
      amax_now = read_amax(amax);
      LASP_CHECK(std::isfinite(amax_now))
          << "quantize_fp8_cuda: non-finite input " << x.str() << " (max |x| = " << amax_now << ")";
      if (!delayed->empty()) {
        const float h = delayed->amax();
        fixed_scale = h > 0 ? h / fmax : 1.0f;
        amax_ptr = nullptr;
      }
    }
    with_input_type(x, [&](auto* xp) {
      fp8_tensor_kernel<<<grid_for(n), kThreads, 0, stream>>>(xp, n, amax_ptr, fixed_scale, fmax,
                                                              e4m3, codes, scales);
    });
    CUDA_CHECK_LAUNCH("quantize_fp8_cuda (per tensor)");
    if (delayed) delayed->record(amax_now);
  } else {
    launch_block_rows_cols(x, d.rows, d.cols, d.rows, format, scaling == Fp8Scaling::Block128x128,
                           codes, scales, nullptr, nullptr);
  }
  return q;
}

void dequantize_fp8_cuda(Tensor& out, const QuantizedFp8& q) {
  LASP_CHECK(q.codes.defined() && q.codes.is_cuda() && q.codes.dtype() == DType::U8 &&
             q.codes.is_contiguous())
      << "dequantize_fp8_cuda: codes must be contiguous uint8 CUDA, got " << q.codes.str();
  LASP_CHECK(out.defined() && out.is_cuda() && out.is_contiguous() &&
             (out.dtype() == DType::F32 || out.dtype() == DType::BF16) && out.shape() == q.codes.shape())
      << "dequantize_fp8_cuda: out must be a contiguous fp32/bf16 CUDA tensor of shape "
      << shape_str(q.codes.shape()) << ", got " << out.str();
  const int64_t rows = q.rows(), cols = q.cols(), nb = (cols + kBlock - 1) / kBlock;
  const int64_t want = q.scaling == Fp8Scaling::PerTensor ? 1
                       : q.scaling == Fp8Scaling::Block1x128 ? rows * nb
                                                             : ((rows + kBlock - 1) / kBlock) * nb;
  LASP_CHECK(q.scales.defined() && q.scales.is_cuda() && q.scales.dtype() == DType::F32 &&
             q.scales.numel() == want)
      << "dequantize_fp8_cuda: scales must be fp32 CUDA with " << want << " entries, got "
      << q.scales.str();
  const int64_t n = q.codes.numel();
  if (n == 0) return;
  cudaStream_t stream = cuda_stream();
  const bool e4m3 = q.format == Fp8Format::E4M3;
  const int s = scaling_index(q.scaling);
  if (out.dtype() == DType::F32) {
    fp8_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        q.codes.data<uint8_t>(), n, cols, s, q.scales.data<float>(), e4m3, out.data<float>());
  } else {
    fp8_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        q.codes.data<uint8_t>(), n, cols, s, q.scales.data<float>(), e4m3,
        static_cast<__nv_bfloat16*>(out.raw()));
  }
  CUDA_CHECK_LAUNCH("dequantize_fp8_cuda");
}

namespace {

// kernel<T, G, B> for the rotation block B (0: no rotation) of the tiled quantizer.
template <int G, typename F>
void with_rotation_block(int64_t b, F&& body) {
  switch (b) {
    case 0: return body(std::integral_constant<int, 0>{});
    case 16: return body(std::integral_constant<int, 16>{});
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    case 128: return body(std::integral_constant<int, 128>{});
    default: LASP_FAIL() << "quantize_fp4: no fused rotation of block " << b;
  }
}

bool fused_rotation_block(int64_t b) { return b == 16 || b == 32 || b == 64 || b == 128; }

// quantize_fp4_cuda(x) (rot == nullptr), or of x rotated by *rot with the rotation done in the
// tiled quantizer (the caller checked that it applies: whole groups and whole rotation blocks per
// row, a fused block size, MS-EDEN's correction fusable).
QuantizedFp4 quantize_fp4_impl(const Tensor& x, const Fp4Options& opt, const HadamardSpec* rot);

}  // namespace

QuantizedFp4 quantize_fp4_cuda(const Tensor& x, const Fp4Options& opt) {
  return quantize_fp4_impl(x, opt, nullptr);
}

QuantizedFp4 quantize_fp4_rotated_cuda(const Tensor& x, const HadamardSpec& spec, const Fp4Options& opt) {
  const Rows2D d = check_cuda_input(x, "quantize_fp4_rotated_cuda");
  const int64_t group = fp4_group_size(opt.format);
  const bool eden = opt.rounding == Fp4Rounding::MsEden;
  const int64_t per_block = eden ? opt.eden_block / group : 0;
  const int64_t ngroups = d.cols / group;
  const bool fused = fused_rotation_block(spec.block) && d.cols % spec.block == 0 && d.cols % group == 0 &&
                     (!eden || (opt.eden_block % group == 0 && per_block > 0 && kQGroups % per_block == 0 &&
                                ngroups % per_block == 0));
  if (!fused) return quantize_fp4_cuda(hadamard_rotated(x, spec), opt);
  return quantize_fp4_impl(x, opt, &spec);
}

namespace {

QuantizedFp4 quantize_fp4_impl(const Tensor& x, const Fp4Options& opt, const HadamardSpec* rot) {
  const Rows2D d = check_cuda_input(x, "quantize_fp4_cuda");
  const bool mx = opt.format == Fp4Format::MXFP4;
  const bool quest = opt.clip == Fp4Clip::Quest;
  LASP_CHECK(!quest || (mx && opt.rounding == Fp4Rounding::Nearest))
      << "quantize_fp4_cuda: QuEST clipping is defined for MXFP4 with round-to-nearest";
  const bool eden = opt.rounding == Fp4Rounding::MsEden;
  const int64_t group = fp4_group_size(opt.format);
  LASP_CHECK(!eden || (opt.eden_block >= group && opt.eden_block % group == 0))
      << "quantize_fp4_cuda: eden_block " << opt.eden_block << " must be a positive multiple of the group "
      << group;
  const int64_t ngroups = (d.cols + group - 1) / group;
  const Device dev = x.device();

  QuantizedFp4 q;
  q.format = opt.format;
  q.codes = Tensor::empty(x.shape(), DType::U8, dev);
  q.scales = Tensor::empty({d.rows, ngroups}, DType::U8, dev);
  if (quest) q.mask = Tensor::empty(x.shape(), DType::U8, dev);
  cudaStream_t stream = cuda_stream();
  // The tensor scale stays on the GPU (no synchronisation): from the amax, as the CPU computes it
  // (MS-EDEN keeps the E4M3 group scales <= 256 to leave room for its correction); NaN for a
  // non-finite input, where the CPU function throws.
  TileRotation tile_rot;
  if (rot) {
    tile_rot.randomized = rot->randomized;
    tile_rot.seed = rot->seed;
    tile_rot.norm = 1.0f / std::sqrt(static_cast<float>(rot->block));  // hadamard_cuda's expression
  }
  {
    Tensor amax;
    if (rot) {  // max |H x|: the rotated values are never written
      amax = Tensor::empty({1}, DType::I32, dev);
      amax_reset_cuda(amax, 0);
      const int64_t total_groups = d.rows * ngroups;
      if (total_groups > 0) {
        const bool vec_ok = reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0;
        const int blocks = static_cast<int>(ceil_div(total_groups, static_cast<int64_t>(kQGroups)));
        with_input_type(x, [&](auto* xp) {
          using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
          const auto launch = [&](auto g) {
            constexpr int G = decltype(g)::value;
            with_rotation_block<G>(rot->block, [&](auto b) {
              constexpr int B = decltype(b)::value;
              if constexpr (B > 0) {
                fp4_rotated_amax_kernel<T, G, B><<<blocks, kQGroups, 0, stream>>>(
                    xp, total_groups, vec_ok, tile_rot, static_cast<uint32_t*>(amax.raw()));
              }
            });
          };
          if (mx) {
            launch(std::integral_constant<int, 32>{});
          } else {
            launch(std::integral_constant<int, 16>{});
          }
        });
        CUDA_CHECK_LAUNCH("quantize_fp4_rotated_cuda (amax)");
      }
    } else {
      amax = device_amax_bits(x);
    }
    q.tensor_scale_device = Tensor::empty({1}, DType::F32, dev);
    fp4_tensor_scale_kernel<<<1, 1, 0, stream>>>(static_cast<const uint32_t*>(amax.raw()), mx,
                                                 (eden ? 256.0f : kE4M3Max) * kE2M1Max,
                                                 q.tensor_scale_device.data<float>());
    CUDA_CHECK_LAUNCH("quantize_fp4_cuda (tensor scale)");
  }
  const float* ts_dev = mx ? nullptr : q.tensor_scale_device.data<float>();

  Fp4GroupRule rule;
  rule.mx = mx;
  rule.quest = quest;
  rule.stochastic = opt.rounding == Fp4Rounding::Stochastic;
  rule.no_clip_scale = eden;
  rule.seed = opt.seed;
  rule.stream = opt.stream;
  const int64_t threads_total = d.rows * ngroups;
  if (threads_total == 0) return q;
  uint8_t* mask = quest ? q.mask.data<uint8_t>() : nullptr;
  // Whole groups per row: the tiled kernel (coalesced, MS-EDEN's correction in the same pass when
  // its blocks fit a CTA); else one thread per group reading x directly.
  const int64_t per_block = eden ? opt.eden_block / group : 0;
  if (d.cols % group == 0) {
    const bool eden_fused = eden && kQGroups % per_block == 0 && ngroups % per_block == 0;
    const bool vec_ok = reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0;
    const int blocks = static_cast<int>(ceil_div(threads_total, static_cast<int64_t>(kQGroups)));
    LASP_CHECK(!rot || !eden || eden_fused) << "quantize_fp4_rotated_cuda: MS-EDEN correction not fusable";
    with_input_type(x, [&](auto* xp) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      const auto launch = [&](auto g) {
        constexpr int G = decltype(g)::value;
        with_rotation_block<G>(rot ? rot->block : 0, [&](auto b) {
          constexpr int B = decltype(b)::value;
          fp4_quantize_tile_kernel<T, G, B><<<blocks, kQGroups, 0, stream>>>(
              xp, threads_total, vec_ok, rule, ts_dev, eden_fused ? static_cast<int>(per_block) : 0, tile_rot,
              q.codes.data<uint8_t>(), q.scales.data<uint8_t>(), mask);
        });
      };
      if (mx) {
        launch(std::integral_constant<int, 32>{});
      } else {
        launch(std::integral_constant<int, 16>{});
      }
    });
    CUDA_CHECK_LAUNCH("quantize_fp4_cuda (tiled)");
    if (!eden || eden_fused) return q;
  } else {
    LASP_CHECK(!rot) << "quantize_fp4_rotated_cuda: rows of whole groups only";
    with_input_type(x, [&](auto* xp) {
      fp4_quantize_kernel<<<ceil_div(threads_total, 128), 128, 0, stream>>>(
          xp, d.rows, d.cols, group, ngroups, rule, ts_dev, q.codes.data<uint8_t>(),
          q.scales.data<uint8_t>(), mask);
    });
    CUDA_CHECK_LAUNCH("quantize_fp4_cuda");
  }
  if (eden) {
    const int64_t nblocks = (ngroups + per_block - 1) / per_block;
    with_input_type(x, [&](auto* xp) {
      fp4_eden_kernel<<<ceil_div(d.rows * nblocks, 128), 128, 0, stream>>>(
          xp, d.rows, d.cols, group, ngroups, per_block, mx, q.tensor_scale, ts_dev, opt.seed, opt.stream,
          q.codes.data<uint8_t>(), q.scales.data<uint8_t>());
    });
    CUDA_CHECK_LAUNCH("quantize_fp4_cuda (MS-EDEN scale correction)");
  }
  return q;
}

}  // namespace

void dequantize_fp4_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale) {
  LASP_PROFILE_SCOPE("fp4_dequantize");
  LASP_CHECK(q.codes.defined() && q.codes.is_cuda() && q.codes.dtype() == DType::U8 &&
             q.codes.is_contiguous())
      << "dequantize_fp4_cuda: codes must be contiguous uint8 CUDA, got " << q.codes.str();
  LASP_CHECK(out.defined() && out.is_cuda() && out.is_contiguous() &&
             (out.dtype() == DType::F32 || out.dtype() == DType::BF16) && out.shape() == q.codes.shape())
      << "dequantize_fp4_cuda: out must be a contiguous fp32/bf16 CUDA tensor of shape "
      << shape_str(q.codes.shape()) << ", got " << out.str();
  const int64_t rows = q.rows(), cols = q.cols(), group = q.group();
  const int64_t ngroups = (cols + group - 1) / group;
  LASP_CHECK(q.scales.defined() && q.scales.is_cuda() && q.scales.dtype() == DType::U8 &&
             q.scales.numel() == rows * ngroups)
      << "dequantize_fp4_cuda: scales must be uint8 CUDA [" << rows << ", " << ngroups << "], got "
      << q.scales.str();
  const int64_t n = q.codes.numel();
  if (n == 0) return;
  const float ts = with_tensor_scale ? q.tensor_scale : 1.0f;
  const float* ts_dev =
      with_tensor_scale && q.tensor_scale_device.defined() ? q.tensor_scale_device.data<float>() : nullptr;
  const bool mx = q.format == Fp4Format::MXFP4;
  cudaStream_t stream = cuda_stream();
  // Whole groups per row and aligned pointers: four elements per thread, the group by a shift.
  const bool f32 = out.dtype() == DType::F32;
  if (cols % group == 0 && reinterpret_cast<uintptr_t>(q.codes.raw()) % 4 == 0 &&
      reinterpret_cast<uintptr_t>(out.raw()) % (f32 ? 16 : 8) == 0) {
    const int shift = group == 32 ? 5 : 4;
    LASP_CHECK(group == (int64_t{1} << shift)) << "dequantize_fp4_cuda: group " << group;
    const int64_t n4 = n / 4;  // n = rows * cols, cols a multiple of the group (16 or 32)
    if (f32) {
      fp4_dequant_vec_kernel<<<grid_for(n4), kThreads, 0, stream>>>(
          q.codes.data<uint8_t>(), n4, shift, q.scales.data<uint8_t>(), mx, ts, ts_dev, out.data<float>());
    } else {
      fp4_dequant_vec_kernel<<<grid_for(n4), kThreads, 0, stream>>>(
          q.codes.data<uint8_t>(), n4, shift, q.scales.data<uint8_t>(), mx, ts, ts_dev,
          static_cast<__nv_bfloat16*>(out.raw()));
    }
    CUDA_CHECK_LAUNCH("dequantize_fp4_cuda");
    return;
  }
  if (out.dtype() == DType::F32) {
    fp4_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(q.codes.data<uint8_t>(), n, cols, group,
                                                             ngroups, q.scales.data<uint8_t>(), mx,
                                                             ts, ts_dev, out.data<float>());
  } else {
    fp4_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        q.codes.data<uint8_t>(), n, cols, group, ngroups, q.scales.data<uint8_t>(), mx, ts, ts_dev,
        static_cast<__nv_bfloat16*>(out.raw()));
  }
  CUDA_CHECK_LAUNCH("dequantize_fp4_cuda");
}

void dequantize_fp4_transposed_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale) {
  LASP_PROFILE_SCOPE("fp4_dequantize");
  LASP_CHECK(q.codes.defined() && q.codes.is_cuda() && q.codes.dtype() == DType::U8 &&
             q.codes.is_contiguous() && q.codes.ndim() == 2)
      << "dequantize_fp4_transposed_cuda: codes must be 2-D contiguous uint8 CUDA, got "
      << (q.codes.defined() ? q.codes.str() : "undefined");
  const int64_t rows = q.rows(), cols = q.cols(), group = q.group();
  const int64_t ngroups = (cols + group - 1) / group;
  LASP_CHECK(out.defined() && out.is_cuda() && out.is_contiguous() && out.dtype() == DType::F32 &&
             out.shape() == Shape({cols, rows}))
      << "dequantize_fp4_transposed_cuda: out must be a contiguous fp32 CUDA tensor of shape ["
      << cols << ", " << rows << "], got " << (out.defined() ? out.str() : "undefined");
  LASP_CHECK(q.scales.defined() && q.scales.is_cuda() && q.scales.dtype() == DType::U8 &&
             q.scales.numel() == rows * ngroups)
      << "dequantize_fp4_transposed_cuda: scales must be uint8 CUDA [" << rows << ", " << ngroups
      << "], got " << q.scales.str();
  if (rows == 0 || cols == 0) return;
  LASP_CHECK(ceil_div(rows, int64_t{32}) <= 65535)
      << "dequantize_fp4_transposed_cuda: " << rows << " rows exceed the grid (65535 x 32)";
  const float ts = with_tensor_scale ? q.tensor_scale : 1.0f;
  const float* ts_dev =
      with_tensor_scale && q.tensor_scale_device.defined() ? q.tensor_scale_device.data<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, int64_t{32})), static_cast<unsigned>(ceil_div(rows, int64_t{32})));
  fp4_dequant_t_kernel<<<grid, 256, 0, cuda_stream()>>>(q.codes.data<uint8_t>(), rows, cols,
                                                        static_cast<int>(group), ngroups, q.scales.data<uint8_t>(),
                                                        q.format == Fp4Format::MXFP4, ts, ts_dev, out.data<float>());
  CUDA_CHECK_LAUNCH("dequantize_fp4_transposed_cuda");
}

// ---------------------------------------------------------------- projection pieces (host side)

namespace {

uint32_t* amax_slot(Tensor& bits, int64_t index, const char* fn) {
  LASP_CHECK(bits.defined() && bits.is_cuda() && bits.dtype() == DType::I32 && bits.is_contiguous())
      << fn << ": amax slots must be a contiguous I32 CUDA tensor, got " << (bits.defined() ? bits.str() : "undefined");
  LASP_CHECK(index >= 0 && index < bits.numel())
      << fn << ": amax slot " << index << " out of range for " << bits.str();
  return static_cast<uint32_t*>(bits.raw()) + index;
}

}  // namespace

void amax_reset_cuda(Tensor& amax_bits, int64_t index) {
  uint32_t* slot = amax_slot(amax_bits, index, "amax_reset_cuda");
  CUDA_CHECK(cudaMemsetAsync(slot, 0, sizeof(uint32_t), cuda_stream()));
}

void amax_into_cuda(Tensor& amax_bits, int64_t index, const Tensor& x, bool reset) {
  check_cuda_input(x, "amax_into_cuda");
  uint32_t* slot = amax_slot(amax_bits, index, "amax_into_cuda");
  cudaStream_t stream = cuda_stream();
  if (reset) CUDA_CHECK(cudaMemsetAsync(slot, 0, sizeof(uint32_t), stream));
  const int64_t n = x.numel();
  if (n == 0) return;
  with_input_type(x, [&](auto* xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    constexpr int V = Vec16<T>::kN;
    const bool vec_ok = aligned16(xp);
    const int64_t work = vec_ok ? n / V : n;
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads * 4), max_grid_blocks())));
    amax_vec_kernel<<<blocks, kThreads, 0, stream>>>(xp, n, vec_ok, slot);
  });
  CUDA_CHECK_LAUNCH("amax_into_cuda");
}

Fp8RowsCols quantize_fp8_rows_cols_cuda(const Tensor& x, Fp8Format format, const Fp8DeviceScale& scale,
                                        bool want_rows, bool want_cols, int64_t pad_to) {
  const char* fn = "quantize_fp8_rows_cols_cuda";
  check_cuda_input(x, fn);
  LASP_CHECK(x.ndim() == 2 && x.dim(0) > 0 && x.dim(1) > 0) << fn << ": expects a non-empty 2-D tensor, got " << x.str();
  LASP_CHECK(want_rows || want_cols) << fn << ": asked for neither the rows nor the cols codes";
  LASP_CHECK(pad_to >= kRcSeg && pad_to % kRcSeg == 0) << fn << ": pad_to must be a positive multiple of 16, got " << pad_to;
  ScaleArgs sa;
  if (scale.amax.defined()) {
    Tensor amax = scale.amax;
    sa.amax = amax_slot(amax, 0, fn);
    sa.n = static_cast<int>(amax.numel());
    LASP_CHECK(scale.skip >= -1 && scale.skip < amax.numel()) << fn << ": skip slot " << scale.skip << " out of range";
    sa.skip = static_cast<int>(scale.skip);
  } else {
    LASP_CHECK(scale.scale.defined() && scale.scale.is_cuda() && scale.scale.dtype() == DType::F32 && scale.scale.numel() >= 1)
        << fn << ": give either device amax slots or a device fp32 scale";
    sa.scale = scale.scale.data<float>();
  }
  if (scale.record.defined()) {
    Tensor record = scale.record;
    sa.record = amax_slot(record, scale.record_index, fn);
  }
  const Device dev = x.device();
  const int64_t rows = x.dim(0), cols = x.dim(1);
  const int64_t rows_p = (rows + pad_to - 1) / pad_to * pad_to, cols_p = (cols + pad_to - 1) / pad_to * pad_to;
  Tensor scales = Tensor::empty({1}, DType::F32, dev);
  Fp8RowsCols out;
  for (QuantizedFp8* q : {&out.rows, &out.cols}) {
    q->format = format;
    q->scaling = Fp8Scaling::PerTensor;
    q->scales = scales;
  }
  if (want_rows) out.rows.codes = Tensor::empty({rows, cols_p}, DType::U8, dev);
  if (want_cols) out.cols.codes = Tensor::empty({cols, rows_p}, DType::U8, dev);
  const int64_t col_tiles = (cols_p + kRcCols - 1) / kRcCols;
  const int64_t row_tiles = ((want_cols ? rows_p : rows) + kRcRows - 1) / kRcRows;
  uint8_t* rows_ptr = want_rows ? out.rows.codes.data<uint8_t>() : nullptr;
  uint8_t* cols_ptr = want_cols ? out.cols.codes.data<uint8_t>() : nullptr;
  const float fmax = fp8_format_max(format);
  const bool e4m3 = format == Fp8Format::E4M3;
  cudaStream_t stream = cuda_stream();
  with_input_type(x, [&](auto* xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const bool vec_ok = aligned16(xp) && cols % Vec16<T>::kN == 0;
    auto launch = [&](auto kernel) {
      const int grid = persistent_grid(kernel, row_tiles * col_tiles);
      kernel<<<grid, kThreads, 0, stream>>>(xp, rows, cols, cols_p, rows_p, row_tiles, col_tiles, sa, fmax, e4m3,
                                            vec_ok, rows_ptr, cols_ptr, scales.data<float>());
    };
    if (want_cols) {
      if (sa.record)
        launch(fp8_rows_cols_kernel<T, true, true>);
      else
        launch(fp8_rows_cols_kernel<T, true, false>);
    } else {
      if (sa.record)
        launch(fp8_rows_cols_kernel<T, false, true>);
      else
        launch(fp8_rows_cols_kernel<T, false, false>);
    }
  });
  CUDA_CHECK_LAUNCH("quantize_fp8_rows_cols_cuda");
  return out;
}

Fp8RowsCols quantize_fp8_block_rows_cols_cuda(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                                              bool want_rows, bool want_cols, int64_t cols_ld) {
  const char* fn = "quantize_fp8_block_rows_cols_cuda";
  check_cuda_input(x, fn);
  LASP_CHECK(x.ndim() == 2) << fn << ": expects a 2-D tensor, got " << x.str();
  LASP_CHECK(scaling == Fp8Scaling::Block1x128 || scaling == Fp8Scaling::Block128x128)
      << fn
      << ": scaling must be 1x128 or 128x128 blocks (per tensor: quantize_fp8_rows_cols_cuda)";
  LASP_CHECK(want_rows || want_cols) << fn << ": asked for neither the rows nor the cols codes";
  const int64_t rows = x.dim(0), cols = x.dim(1);
  const int64_t ldt = cols_ld == 0 ? rows : cols_ld;
  LASP_CHECK(ldt >= rows) << fn << ": cols_ld (" << cols_ld << ") must be 0 or >= the rows of x ("
                          << rows << ")";
  const Device dev = x.device();
  const bool tile2d = scaling == Fp8Scaling::Block128x128;
  auto nb = [](int64_t n) { return (n + kBrTile - 1) / kBrTile; };
  Fp8RowsCols out;
  for (QuantizedFp8* q : {&out.rows, &out.cols}) {
    q->format = format;
    q->scaling = scaling;
  }
  if (want_rows) {
    out.rows.codes = Tensor::empty({rows, cols}, DType::U8, dev);
    out.rows.scales = Tensor::empty({tile2d ? nb(rows) : rows, nb(cols)}, DType::F32, dev);
  }
  if (want_cols) {
    out.cols.codes = Tensor::empty({cols, ldt}, DType::U8, dev);
    out.cols.scales = Tensor::empty({tile2d ? nb(cols) : cols, nb(ldt)}, DType::F32, dev);
  }
  launch_block_rows_cols(x, rows, cols, ldt, format, tile2d,
                         want_rows ? out.rows.codes.data<uint8_t>() : nullptr,
                         want_rows ? out.rows.scales.data<float>() : nullptr,
                         want_cols ? out.cols.codes.data<uint8_t>() : nullptr,
                         want_cols ? out.cols.scales.data<float>() : nullptr);
  return out;
}

void transpose_pad_cuda(Tensor& out, const Tensor& x) {
  LASP_PROFILE_SCOPE("transpose");
  check_cuda_input(x, "transpose_pad_cuda");
  LASP_CHECK(x.ndim() == 2) << "transpose_pad_cuda: expects a 2-D tensor, got " << x.str();
  const int64_t rows = x.dim(0), cols = x.dim(1);
  LASP_CHECK(out.defined() && out.is_cuda() && out.is_contiguous() && out.dtype() == x.dtype() && out.ndim() == 2 &&
             out.dim(0) == cols && out.dim(1) >= rows)
      << "transpose_pad_cuda: out must be a contiguous " << dtype_name(x.dtype()) << " CUDA tensor [" << cols
      << ", >= " << rows << "], got " << out.str();
  const int64_t ldo = out.dim(1);
  if (cols == 0 || ldo == 0) return;
  const int64_t col_tiles = (cols + 31) / 32, row_tiles = (ldo + 31) / 32;
  const dim3 threads(32, 8);
  cudaStream_t stream = cuda_stream();
  if (x.dtype() == DType::F32) {
    transpose_pad_kernel<<<static_cast<int>(row_tiles * col_tiles), threads, 0, stream>>>(
        x.data<float>(), rows, cols, ldo, col_tiles, out.data<float>());
  } else {
    transpose_pad_kernel<<<static_cast<int>(row_tiles * col_tiles), threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x.raw()), rows, cols, ldo, col_tiles,
        static_cast<__nv_bfloat16*>(out.raw()));
  }
  CUDA_CHECK_LAUNCH("transpose_pad_cuda");
}

}  // namespace lasp
