// CUDA implementations of kernels/ops.h (the CPU versions in kernels/ops.cc dispatch here).
//
// Dtypes (mixed precision, see ops.h): activations and their gradients bf16 or fp32, each tensor
// independently, math in fp32; norm weights fp32; weight gradients fp32 and accumulated (+=)
// exactly where the CPU version accumulates; rstd fp32; embedding table bf16 or fp32 with d_table
// fp32; LM head weight bf16 or fp32 with d_w fp32. Everything runs on current_stream();
// functions that return host values (the loss, sums, flags) synchronise it.
//
// Column sums (rmsnorm dw, bias db) are deterministic: a [splits, C] fp32 partial buffer written
// by blocks of 32 columns x 8 row lanes, then summed in split order. Embedding gradients use
// atomicAdd (order-dependent in the last bits), as tokens repeat arbitrarily.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "kernels/ops_batched.h"
#include "kernels/ops_cuda_util.cuh"

namespace lasp {

using namespace ops_cuda;

void cast_cuda(Tensor& dst, const Tensor& src);  // below; the LM head converts operands with it
double sum_of_squares_many_cuda(const std::vector<Tensor>& xs);  // below; also kernels/ops_batched.cc

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf_(float x) {
  return x >= 0.0f ? 1.0f / (1.0f + __expf(-x)) : __expf(x) / (1.0f + __expf(x));
}

// A device int32 flag (0 = fine) that kernels raise on invalid input; read() synchronises.
struct DeviceFlag {
  Tensor t;
  explicit DeviceFlag(Device d) : t(Tensor::zeros({1}, DType::I32, d)) {}
  int* ptr() const { return t.data<int32_t>(); }
  int read() const { return static_cast<int>(t.to(cpu()).data<int32_t>()[0]); }
};

// ---------------------------------------------------------------- column sums
// out[c] += sum_n f(n, c) over n < N, deterministic (fixed split and reduction order).
constexpr int kColTile = 32, kRowLanes = 8;

template <typename F>
__global__ void colsum_partial_kernel(F f, float* partial, int64_t N, int64_t C, int64_t rows_per_split) {
  __shared__ float red[kRowLanes][kColTile + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTile) + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_split;
  const int64_t r1 = min(N, r0 + rows_per_split);
  float acc = 0.0f;
  if (c < C)
    for (int64_t n = r0 + threadIdx.y; n < r1; n += kRowLanes) acc += f(n, c);
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) s += red[i][threadIdx.x];
    partial[blockIdx.y * C + c] = s;
  }
}

// out[c] += sum_i partial[i, c] over `splits` rows. A block of kColTile columns x kFinishLanes
// split lanes: lane y adds rows y, y + kFinishLanes, ... (coalesced 128-byte rows, many loads in
// flight), then the lanes are added in lane order. Deterministic. One thread per column would
// leave a [1000+, 2048] partial buffer to 8 blocks (latency-bound, ~100 us per call).
constexpr int kFinishLanes = 16;

__global__ void __launch_bounds__(kColTile* kFinishLanes)
    colsum_finish_kernel(float* out, const float* partial, int splits, int64_t C) {
  __shared__ float red[kFinishLanes][kColTile + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTile) + threadIdx.x;
  float s = 0.0f;
  if (c < C)
    for (int i = threadIdx.y; i < splits; i += kFinishLanes) s += partial[i * C + c];
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < kFinishLanes; ++i) t += red[i][threadIdx.x];
    out[c] += t;
  }
}

void colsum_finish(float* out, const float* partial, int64_t splits, int64_t C, const char* what) {
  colsum_finish_kernel<<<static_cast<unsigned>((C + kColTile - 1) / kColTile), dim3(kColTile, kFinishLanes), 0,
                         cuda_stream()>>>(out, partial, static_cast<int>(splits), C);
  CUDA_CHECK_LAUNCH(what);
}

template <typename F>
void column_sum_accumulate(float* out, const F& f, int64_t N, int64_t C, Device dev, const char* what) {
  if (N == 0 || C == 0) return;
  const int64_t col_blocks = (C + kColTile - 1) / kColTile;
  // Enough row splits to fill the GPU (~1k blocks), each at least 64 rows long.
  const int64_t want = std::max<int64_t>(1, 1024 / col_blocks);
  const int64_t splits = std::min<int64_t>({want, (N + 63) / 64, 1024});
  const int64_t rps = (N + splits - 1) / splits;
  const int64_t used = (N + rps - 1) / rps;
  Tensor partial = Tensor::empty({used, C}, DType::F32, dev);
  colsum_partial_kernel<<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(used)),
                          dim3(kColTile, kRowLanes), 0, cuda_stream()>>>(f, partial.data<float>(), N, C, rps);
  CUDA_CHECK_LAUNCH(what);
  colsum_finish(out, partial.data<float>(), used, C, what);
}

// ---------------------------------------------------------------- RMSNorm
// A value as `o` stores it (rounded to bf16 for a bf16 array).
__device__ __forceinline__ float stored_value(const FloatOut& o, float v) {
  return o.is_bf16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

// One warp per (row n, group g): rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w. With res.p
// set, x here is sum = x + res, stored to `sum` and normalised as stored (each lane reads back
// only what it wrote).
__global__ void rmsnorm_forward_kernel(FloatOut y, float* rstd, FloatIn x, FloatIn res, FloatOut sum,
                                       const float* w, int64_t N, int64_t C, int64_t group, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t G = C / group;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t ng = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; ng < N * G;
       ng += warps) {
    const int64_t n = ng / G, g = ng % G, base = n * C + g * group;
    float ss = 0.0f;
    for (int64_t i = lane; i < group; i += 32) {
      float v = x[base + i];
      if (res.p) {
        v = stored_value(sum, v + res[base + i]);
        sum.set(base + i, v);
      }
      ss += v * v;
    }
    ss = warp_sum(ss);
    const float r = rsqrtf(ss / static_cast<float>(group) + eps);
    if (lane == 0) rstd[ng] = r;
    for (int64_t i = lane; i < group; i += 32)
      y.set(base + i, (res.p ? sum.get(base + i) : x[base + i]) * r * (w ? w[g * group + i] : 1.0f));
  }
}

// dx = r * (gi - xhat * mean(gi * xhat)) (+ dres) with gi = dy * w, xhat = x * r.
__global__ void rmsnorm_backward_kernel(FloatOut dx, FloatIn dy, FloatIn x, FloatIn dres, const float* w,
                                        const float* rstd, int64_t N, int64_t C, int64_t group) {
  const int lane = threadIdx.x % 32;
  const int64_t G = C / group;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t ng = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; ng < N * G;
       ng += warps) {
    const int64_t n = ng / G, g = ng % G, base = n * C + g * group;
    const float r = rstd[ng];
    float dot = 0.0f;
    for (int64_t i = lane; i < group; i += 32)
      dot += dy[base + i] * (w ? w[g * group + i] : 1.0f) * x[base + i] * r;
    const float m = warp_sum(dot) / static_cast<float>(group);
    for (int64_t i = lane; i < group; i += 32) {
      const float gi = dy[base + i] * (w ? w[g * group + i] : 1.0f);
      dx.set(base + i, r * (gi - x[base + i] * r * m) + (dres.p ? dres[base + i] : 0.0f));
    }
  }
}

// ---------------------------------------------------------------- RMSNorm, rows in registers
// The layout is [rows = N * G, group] (row n * G + g is group g of token n, `group` consecutive
// features at offset row * group). A team of L lanes owns one row at a time: L a power of two
// <= 32 (several teams per warp, shuffle reductions) or L = kNormThreads (one team per block);
// lane j holds packs j, j + L, ..., at most K of them, so the forward reads x once and the
// backward reads x and dy once. The row loop is block-uniform (teams past the end idle along).
//
// Backward dw without a second pass: team slot s (of S = gridDim * teams per block) owns rows
// s, s + S, ...; with S a multiple of G its group g = s % G and so its columns are fixed, and it
// keeps sum_rows dy x rstd in registers, written to partial row s / G of a [S / G, C] buffer that
// colsum_finish_kernel adds in order (deterministic for a given grid).
constexpr int kNormThreads = 256;

struct NormShape {
  int64_t rows, G;
  int group, L;  // features per row; lanes per team
};

__device__ __forceinline__ float team_sum(float v, int L, float* scratch) {
  if (L > 32) return block_sum(v, scratch);
  for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int K>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_forward_rows_kernel(FloatOut y, float* rstd, FloatIn x, FloatIn res, FloatOut sum, const float* w,
                                NormShape sh, float eps) {
  __shared__ float scratch[32];
  const int teams = kNormThreads / sh.L, lane = threadIdx.x % sh.L, packs = sh.group / kPack;
  for (int64_t r0 = blockIdx.x * static_cast<int64_t>(teams); r0 < sh.rows;
       r0 += static_cast<int64_t>(gridDim.x) * teams) {
    const int64_t r = r0 + threadIdx.x / sh.L;
    const bool active = r < sh.rows;
    float v[K][kPack];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int p = lane + k * sh.L;
      if (active && p < packs) {
        x.load8(r * sh.group + p * kPack, v[k]);
        if (res.p) {  // sum = x + res, rounded as stored, then normalised
          float rv[kPack];
          res.load8(r * sh.group + p * kPack, rv);
#pragma unroll
          for (int e = 0; e < kPack; ++e) v[k][e] = stored_value(sum, v[k][e] + rv[e]);
          sum.store8(r * sh.group + p * kPack, v[k]);
        }
#pragma unroll
        for (int e = 0; e < kPack; ++e) ss += v[k][e] * v[k][e];
      }
    }
    ss = team_sum(ss, sh.L, scratch);
    const float rs = rsqrtf(ss / static_cast<float>(sh.group) + eps);
    if (!active) continue;  // no team-wide step follows
    if (lane == 0) rstd[r] = rs;
    const int64_t wofs = (r % sh.G) * sh.group;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int p = lane + k * sh.L;
      if (p >= packs) continue;
      float wv[kPack], o[kPack];
      if (w) load8_f32(w, wofs + p * kPack, wv);
#pragma unroll
      for (int e = 0; e < kPack; ++e) o[e] = v[k][e] * rs * (w ? wv[e] : 1.0f);
      y.store8(r * sh.group + p * kPack, o);
    }
  }
}

// dx = r (gi - xhat mean(gi xhat)) with gi = dy w, xhat = x r; dw partials as described above
// (dw_partial null: no dw).
template <int K>
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_backward_rows_kernel(FloatOut dx, float* dw_partial, FloatIn dy, FloatIn x, FloatIn dres,
                                 const float* w, const float* rstd, NormShape sh) {
  __shared__ float scratch[32];
  const int teams = kNormThreads / sh.L, lane = threadIdx.x % sh.L, packs = sh.group / kPack;
  const int64_t slot = blockIdx.x * static_cast<int64_t>(teams) + threadIdx.x / sh.L;
  const int64_t wofs = (slot % sh.G) * sh.group;  // fixed: S is a multiple of G
  float acc[K][kPack];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int e = 0; e < kPack; ++e) acc[k][e] = 0.0f;
  for (int64_t r0 = blockIdx.x * static_cast<int64_t>(teams); r0 < sh.rows;
       r0 += static_cast<int64_t>(gridDim.x) * teams) {
    const int64_t r = r0 + threadIdx.x / sh.L;
    const bool active = r < sh.rows;
    const float rs = active ? rstd[r] : 0.0f;
    // d: the residual gradient. For K = 1 loaded with dy and x, before the team reduction, so
    // that its latency overlaps theirs rather than following the reduction; for larger K after
    // it (registers: K = 1 stays at 60, K = 2 would go from 80 to 105, K = 4 from 128 to 174).
    constexpr bool kEarlyResidual = K == 1;
    float g[K][kPack], xv[K][kPack], d[kEarlyResidual ? K : 1][kPack];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int p = lane + k * sh.L;
      if (active && p < packs) {
        float wv[kPack];
        dy.load8(r * sh.group + p * kPack, g[k]);
        x.load8(r * sh.group + p * kPack, xv[k]);
        if (kEarlyResidual && dres.p) dres.load8(r * sh.group + p * kPack, d[kEarlyResidual ? k : 0]);
        if (w) load8_f32(w, wofs + p * kPack, wv);
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          acc[k][e] += g[k][e] * xv[k][e] * rs;
          g[k][e] *= w ? wv[e] : 1.0f;
          dot += g[k][e] * xv[k][e] * rs;
        }
      }
    }
    const float m = team_sum(dot, sh.L, scratch) / static_cast<float>(sh.group);
    if (!active) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int p = lane + k * sh.L;
      if (p >= packs) continue;
      float o[kPack];
      const int dk = kEarlyResidual ? k : 0;
      if (!kEarlyResidual && dres.p) dres.load8(r * sh.group + p * kPack, d[dk]);
#pragma unroll
      for (int e = 0; e < kPack; ++e) o[e] = rs * (g[k][e] - xv[k][e] * rs * m) + (dres.p ? d[dk][e] : 0.0f);
      dx.store8(r * sh.group + p * kPack, o);
    }
  }
  if (!dw_partial) return;
  const int64_t C = sh.G * sh.group;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int p = lane + k * sh.L;
    if (p < packs) store8_f32(dw_partial, (slot / sh.G) * C + wofs + p * kPack, acc[k]);
  }
}

// How a row-in-registers launch covers rows of `group` features: lanes per team and packs per
// lane (K, one of 1, 2, 4, 8). `ok` false: group not a multiple of 8 or above 16384.
struct NormPlan {
  bool ok = false;
  int L = 0, K = 0;
};

NormPlan plan_norm(int64_t group) {
  NormPlan p;
  if (group % kPack != 0 || group > int64_t{kNormThreads} * kPack * 8) return p;
  const int packs = static_cast<int>(group / kPack);
  p.ok = true;
  if (packs <= 32) {
    p.L = 1;
    while (p.L < packs) p.L *= 2;
    p.K = 1;
  } else if (packs <= 128) {
    p.L = 32;
    p.K = packs <= 64 ? 2 : 4;
  } else {
    p.L = kNormThreads;
    p.K = 1;
    while (p.L * p.K < packs) p.K *= 2;
  }
  return p;
}

template <typename Launch>
void dispatch_k(int K, const Launch& launch) {
  switch (K) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: launch(std::integral_constant<int, 8>{}); break;
  }
}

// dw[c] += sum_n dy[n, c] x[n, c] rstd[n, c / group].
struct RmsNormDw {
  FloatIn dy, x;
  const float* rstd;
  int64_t C, group;
  __device__ float operator()(int64_t n, int64_t c) const {
    return dy[n * C + c] * x[n * C + c] * rstd[n * (C / group) + c / group];
  }
};

// ---------------------------------------------------------------- gated units, pointwise
// The pointwise kernels below move 16-byte packs (ops_cuda_util.cuh: for_each_pack); `packed`
// says every pointer is 16-byte aligned, else they go element by element. Per element the math
// is the same expression either way, so results do not depend on the path.
// The SwiGLU sigmoid: __expf and a MUFU reciprocal division (a few ulp in fp32, far below the
// bf16 rounding of the outputs) instead of the IEEE division, which made these kernels issue-bound
// rather than bandwidth-bound. The exponent is clamped so that 1 + e stays below 2^126, the range
// where __fdividef is accurate (sigmoid(x < -80) is then 1.8e-35 instead of smaller).
__device__ __forceinline__ float swiglu_sigmoid(float x) {
  return __fdividef(1.0f, 1.0f + __expf(fminf(-x, 80.0f)));
}
__device__ __forceinline__ float swiglu_value(float g, float u) { return g * swiglu_sigmoid(g) * u; }

// Output amaxes for the FP8 projections (swiglu_forward's h_amax, ...): |v| as stored (rounded to
// bf16 for a bf16 output) as float bits, which order like the values for v >= 0 (NaN above inf),
// reduced over the CTA and atomicMax'ed once into *out. Every thread of the CTA must call it.
// Threads keep the max of the unrounded |v| (abs_bits) and round once at the end: rounding to
// nearest is monotonic, so the max of the rounded values is the rounded max.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(fabsf(v)); }
__device__ __forceinline__ uint32_t stored_abs_bits(const FloatOut& o, uint32_t abs_max) {
  const float v = __uint_as_float(abs_max);
  return abs_bits(o.is_bf16 ? __bfloat162float(__float2bfloat16_rn(v)) : v);
}
__device__ void block_amax_into(uint32_t m, uint32_t* out) {
  __shared__ uint32_t warp_m[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  __syncthreads();  // warp_m may still be read by a previous call
  if (threadIdx.x % 32 == 0) warp_m[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) m = max(m, warp_m[w]);
    atomicMax(out, m);
  }
}

__global__ void swiglu_forward_kernel(FloatOut h, FloatIn gate, FloatIn up, int64_t n, bool packed,
                                      uint32_t* h_amax) {
  uint32_t m = 0;
  for_each_pack(
      n, packed,
      [&](int64_t i) {
        float g[kPack], u[kPack], o[kPack];
        gate.load8(i, g);
        up.load8(i, u);
#pragma unroll
        for (int k = 0; k < kPack; ++k) o[k] = swiglu_value(g[k], u[k]);
        h.store8(i, o);
        if (h_amax) {
#pragma unroll
          for (int k = 0; k < kPack; ++k) m = max(m, abs_bits(o[k]));
        }
      },
      [&](int64_t i) {
        const float o = swiglu_value(gate[i], up[i]);
        h.set(i, o);
        if (h_amax) m = max(m, abs_bits(o));
      });
  if (h_amax) block_amax_into(stored_abs_bits(h, m), h_amax);
}

// d_up = dh silu(g);  d_gate = dh u silu'(g) with silu' = s (1 + g (1 - s)), s = sigmoid(g).
__device__ __forceinline__ void swiglu_grads(float d, float g, float u, float& dg, float& du) {
  const float s = swiglu_sigmoid(g);
  du = d * g * s;
  dg = d * u * s * (1.0f + g * (1.0f - s));
}

__global__ void swiglu_backward_kernel(FloatOut d_gate, FloatOut d_up, FloatIn dh, FloatIn gate,
                                       FloatIn up, int64_t n, bool packed, uint32_t* d_gate_amax,
                                       uint32_t* d_up_amax) {
  uint32_t mg = 0, mu = 0;
  for_each_pack(
      n, packed,
      [&](int64_t i) {
        float d[kPack], g[kPack], u[kPack];
        dh.load8(i, d);
        gate.load8(i, g);
        up.load8(i, u);
#pragma unroll
        for (int k = 0; k < kPack; ++k) swiglu_grads(d[k], g[k], u[k], g[k], u[k]);
        d_gate.store8(i, g);
        d_up.store8(i, u);
        if (d_gate_amax) {
#pragma unroll
          for (int k = 0; k < kPack; ++k) mg = max(mg, abs_bits(g[k]));
        }
        if (d_up_amax) {
#pragma unroll
          for (int k = 0; k < kPack; ++k) mu = max(mu, abs_bits(u[k]));
        }
      },
      [&](int64_t i) {
        float dg, du;
        swiglu_grads(dh[i], gate[i], up[i], dg, du);
        d_gate.set(i, dg);
        d_up.set(i, du);
        if (d_gate_amax) mg = max(mg, abs_bits(dg));
        if (d_up_amax) mu = max(mu, abs_bits(du));
      });
  if (d_gate_amax) block_amax_into(stored_abs_bits(d_gate, mg), d_gate_amax);
  if (d_up_amax) block_amax_into(stored_abs_bits(d_up, mu), d_up_amax);
}

__device__ __forceinline__ float activation_value(float v, int f, float scale) {
  switch (static_cast<Activation>(f)) {
    case Activation::Silu: return v * sigmoidf_(v);
    case Activation::Relu: return v > 0.0f ? v : 0.0f;
    case Activation::Elu1: return v > 0.0f ? v + 1.0f : expf(v);
    case Activation::LogSigmoid:  // log sigmoid(v) = -log(1 + e^-v), stable on both sides
      return scale * (v >= 0.0f ? -log1pf(expf(-v)) : v - log1pf(expf(v)));
  }
  return 0.0f;
}

__device__ __forceinline__ float activation_slope(float v, int f, float scale) {
  switch (static_cast<Activation>(f)) {
    case Activation::Silu: {
      const float s = sigmoidf_(v);
      return s * (1.0f + v * (1.0f - s));
    }
    case Activation::Relu: return v > 0.0f ? 1.0f : 0.0f;
    case Activation::Elu1: return v > 0.0f ? 1.0f : expf(v);
    case Activation::LogSigmoid: return scale * sigmoidf_(-v);
  }
  return 0.0f;
}

__global__ void activation_forward_kernel(FloatOut y, FloatIn x, int f, float scale, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y.set(i, activation_value(x[i], f, scale));
}

__global__ void activation_backward_kernel(FloatOut dx, FloatIn dy, FloatIn x, int f, float scale,
                                           int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dx.set(i, dy[i] * activation_slope(x[i], f, scale));
}

// ---------------------------------------------------------------- RoPE
// One thread per (t, h, i < D/2), looping over the batch. The angle position * theta^(-2i/D) is
// formed and reduced in double (positions reach 1e6 and more, where fp32 angles lose the
// fraction); positions are either affine (p0 + t * step, passed as scalars) or read from `pos`.
__global__ void rope_kernel(FloatOut x, const int64_t* pos, int64_t p0, int64_t step, int64_t B,
                            int64_t T, int64_t H, int64_t D, double log_theta, float sign) {
  const int64_t half = D / 2, total = T * H * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, th = idx / half, h = th % H, t = th / H;
    const double p = pos ? static_cast<double>(pos[t]) : static_cast<double>(p0 + t * step);
    const double ang = p * exp(-2.0 * static_cast<double>(i) / static_cast<double>(D) * log_theta);
    double sd, cd;
    sincos(ang, &sd, &cd);
    const float c = static_cast<float>(cd), s = sign * static_cast<float>(sd);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = ((b * T + t) * H + h) * D;
      const float a = x.get(r + i), bb = x.get(r + i + half);
      x.set(r + i, a * c - bb * s);
      x.set(r + i + half, a * s + bb * c);
    }
  }
}

// ---------------------------------------------------------------- embedding
__global__ void embedding_forward_kernel(FloatOut out, FloatIn table, const int32_t* tokens, int64_t N,
                                         int64_t V, int64_t C, int* bad) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int32_t t = tokens[n];
    const bool ok = t >= 0 && t < V;
    if (!ok && threadIdx.x == 0) atomicExch(bad, 1);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      out.set(n * C + c, ok ? table[static_cast<int64_t>(t) * C + c] : 0.0f);
  }
}

__global__ void embedding_backward_kernel(float* d_table, FloatIn d_out, const int32_t* tokens, int64_t N,
                                          int64_t V, int64_t C, int* bad) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int32_t t = tokens[n];
    if (t < 0 || t >= V) {
      if (threadIdx.x == 0) atomicExch(bad, 1);
      continue;
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      atomicAdd(d_table + static_cast<int64_t>(t) * C + c, d_out[n * C + c]);
  }
}

// ---------------------------------------------------------------- bias, AdamW, vectors
__global__ void bias_add_kernel(FloatOut y, FloatIn b, int64_t n, int64_t C) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y.set(i, y.get(i) + b[i % C]);
}

struct BiasDb {
  FloatIn dy;
  int64_t C;
  __device__ float operator()(int64_t n, int64_t c) const { return dy[n * C + c]; }
};

struct AdamW {
  float lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale;
  // Updates (w, m, v) of one element from its gradient g (times grad_scale: gradient clipping).
  __device__ __forceinline__ void step(float& w, float& m, float& v, float g) const {
    g *= grad_scale;
    m = beta1 * m + (1.0f - beta1) * g;
    v = beta2 * v + (1.0f - beta2) * g * g;
    const float update = (m / c1) / (sqrtf(v / c2) + eps) + weight_decay * w;
    w = w - lr * update;
  }
};

// One tensor's AdamW operands: fp32 w, m, v updated in place, g read, and the compute copy of w
// written when w_compute.p is set. pack(i) updates the 8 elements at i (16-byte accesses), one(i)
// a single element; both kernels below go through them.
struct AdamWTensor {
  float* w;
  float* m;
  float* v;
  FloatIn g;
  FloatOut w_compute;
  __device__ __forceinline__ void pack(const AdamW& opt, int64_t i) const {
    float wi[kPack], mi[kPack], vi[kPack], gi[kPack];
    g.load8(i, gi);
    load8_f32_rw(w, i, wi);
    load8_f32_rw(m, i, mi);
    load8_f32_rw(v, i, vi);
#pragma unroll
    for (int k = 0; k < kPack; ++k) opt.step(wi[k], mi[k], vi[k], gi[k]);
    store8_f32(m, i, mi);
    store8_f32(v, i, vi);
    store8_f32(w, i, wi);
    if (w_compute.p) w_compute.store8(i, wi);
  }
  __device__ __forceinline__ void one(const AdamW& opt, int64_t i) const {
    float wi = w[i], mi = m[i], vi = v[i];
    opt.step(wi, mi, vi, g[i]);
    m[i] = mi;
    v[i] = vi;
    w[i] = wi;
    if (w_compute.p) w_compute.set(i, wi);
  }
};

// 30 bytes per element with fp32 g and a bf16 compute copy: w, m, v read and written, g read.
__global__ void adamw_kernel(float* w, FloatOut w_compute, FloatIn g, float* m, float* v, int64_t n,
                             AdamW opt, bool packed) {
  const AdamWTensor t{w, m, v, g, w_compute};
  for_each_pack(
      n, packed, [&](int64_t i) { t.pack(opt, i); }, [&](int64_t i) { t.one(opt, i); });
}

// Element types cast_cuda converts between.
enum class CastType : int { F64, F32, BF16, F16 };

__device__ __forceinline__ double cast_load(const void* p, CastType t, int64_t i) {
  switch (t) {
    case CastType::F64: return static_cast<const double*>(p)[i];
    case CastType::F32: return static_cast<const float*>(p)[i];
    case CastType::BF16: return __bfloat162float(static_cast<const bf16*>(p)[i]);
    case CastType::F16: return __half2float(static_cast<const __half*>(p)[i]);
  }
  return 0.0;
}

__device__ __forceinline__ void cast_store(void* p, CastType t, int64_t i, double v) {
  switch (t) {
    case CastType::F64: static_cast<double*>(p)[i] = v; break;
    case CastType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    // Narrowing goes through fp32 (exact from fp32 sources, as on the CPU).
    case CastType::BF16: static_cast<bf16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case CastType::F16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
  }
}

__global__ void cast_kernel(void* dst, CastType dt, const void* src, CastType st, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    cast_store(dst, dt, i, cast_load(src, st, i));
}

__global__ void add_inplace_kernel(FloatOut y, FloatIn x, float alpha, int64_t n, bool packed) {
  for_each_pack(
      n, packed,
      [&](int64_t i) {
        float a[kPack], b[kPack];
        y.load8(i, a);
        x.load8(i, b);
#pragma unroll
        for (int k = 0; k < kPack; ++k) a[k] = a[k] + alpha * b[k];
        y.store8(i, a);
      },
      [&](int64_t i) { y.set(i, y.get(i) + alpha * x[i]); });
}

__global__ void scale_inplace_kernel(FloatOut y, float alpha, int64_t n, bool packed) {
  for_each_pack(
      n, packed,
      [&](int64_t i) {
        float a[kPack];
        y.load8(i, a);
#pragma unroll
        for (int k = 0; k < kPack; ++k) a[k] *= alpha;
        y.store8(i, a);
      },
      [&](int64_t i) { y.set(i, y.get(i) * alpha); });
}

// ---------------------------------------------------------------- multi-tensor launches
// A list of up to kListMax tensors, each cut into tiles of `tile` elements (a multiple of
// kThreads * kPack, so a tile of a 16-byte aligned tensor starts 16-byte aligned); tile_start is the
// prefix count of tiles. A block takes tiles tile = blockIdx.x, + gridDim.x, ... and finds its
// tensor by a (block-uniform) scan of tile_start. The list travels as a __grid_constant__ kernel
// parameter (under the 4 KB parameter limit of older toolkits), so a launch needs no copy.
constexpr int kListMax = 36;

struct TileList {
  int count = 0;
  int64_t tile_start[kListMax + 1] = {};
  int64_t n[kListMax] = {};
  bool packed[kListMax] = {};
  __device__ __forceinline__ int tensor_of(int64_t tile) const {
    int t = 0;
    while (tile >= tile_start[t + 1]) ++t;
    return t;
  }
};

// Elements [begin, end) of a tile (for_each_pack over one tile): f8 for the whole packs when
// `packed`, f1 for the rest.
template <typename F8, typename F1>
__device__ __forceinline__ void for_each_pack_in(int64_t begin, int64_t end, bool packed, const F8& f8, const F1& f1) {
  const int64_t pack_end = packed ? begin + (end - begin) / kPack * kPack : begin;
  for (int64_t i = begin + threadIdx.x * static_cast<int64_t>(kPack); i < pack_end; i += kThreads * kPack) f8(i);
  for (int64_t i = pack_end + threadIdx.x; i < end; i += kThreads) f1(i);
}

// Sum of squares: one double partial per tile of kSsqTile elements (block order within a tile
// fixed), written to partial[tile]; the host adds a tensor's partials in tile order. A tensor's
// tiles do not depend on the other tensors of the list, so a list gives each tensor's sum exactly
// as a list of one does.
constexpr int64_t kSsqTile = int64_t{kThreads} * kPack * 32;

struct SsqList {
  TileList tiles;
  FloatIn x[kListMax];
};

__global__ void __launch_bounds__(kThreads) sum_of_squares_many_kernel(double* partial, const __grid_constant__ SsqList list) {
  __shared__ double scratch[32];
  for (int64_t tile = blockIdx.x; tile < list.tiles.tile_start[list.tiles.count]; tile += gridDim.x) {
    const int t = list.tiles.tensor_of(tile);
    const FloatIn x = list.x[t];
    const int64_t begin = (tile - list.tiles.tile_start[t]) * kSsqTile;
    const int64_t end = min(list.tiles.n[t], begin + kSsqTile);
    double acc = 0.0;
    for_each_pack_in(
        begin, end, list.tiles.packed[t],
        [&](int64_t i) {
          float v[kPack];
          x.load8(i, v);
#pragma unroll
          for (int k = 0; k < kPack; ++k) acc += static_cast<double>(v[k]) * static_cast<double>(v[k]);
        },
        [&](int64_t i) {
          const double v = x[i];
          acc += v * v;
        });
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[tile] = acc;
  }
}

// AdamW on a list: tiles of kAdamTile elements, each tensor with its own weight decay, dtypes and
// alignment; the same per-element step as adamw_kernel.
constexpr int64_t kAdamTile = int64_t{kThreads} * kPack * 8;

struct AdamWList {
  TileList tiles;
  float* w[kListMax];
  float* m[kListMax];
  float* v[kListMax];
  FloatIn g[kListMax];
  FloatOut w_compute[kListMax];
  float weight_decay[kListMax];
};

__global__ void __launch_bounds__(kThreads) adamw_many_kernel(const __grid_constant__ AdamWList list, AdamW opt) {
  for (int64_t tile = blockIdx.x; tile < list.tiles.tile_start[list.tiles.count]; tile += gridDim.x) {
    const int t = list.tiles.tensor_of(tile);
    const AdamWTensor at{list.w[t], list.m[t], list.v[t], list.g[t], list.w_compute[t]};
    AdamW o = opt;
    o.weight_decay = list.weight_decay[t];
    const int64_t begin = (tile - list.tiles.tile_start[t]) * kAdamTile;
    const int64_t end = min(list.tiles.n[t], begin + kAdamTile);
    for_each_pack_in(
        begin, end, list.tiles.packed[t], [&](int64_t i) { at.pack(o, i); }, [&](int64_t i) { at.one(o, i); });
  }
}

// Appends a tensor of n elements to `tiles` (tiles of `tile` elements); false when the list is full.
bool add_to_list(TileList& tiles, int64_t n, int64_t tile, bool packed) {
  if (tiles.count == kListMax) return false;
  const int t = tiles.count++;
  tiles.n[t] = n;
  tiles.packed[t] = packed;
  tiles.tile_start[t + 1] = tiles.tile_start[t] + (n + tile - 1) / tile;
  return true;
}

int list_grid(const TileList& tiles) {
  return static_cast<int>(std::min<int64_t>(tiles.tile_start[tiles.count], int64_t{sm_count()} * 8));
}

__global__ void all_finite_kernel(int* bad, FloatIn x, int64_t n) {
  bool ok = true;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ok = ok && isfinite(x[i]);
  if (__syncthreads_or(!ok) && threadIdx.x == 0) atomicExch(bad, 1);
}

int64_t resolve_group(const char* fn, int64_t C, int64_t group) {
  if (group == 0) group = C;
  LASP_CHECK(group > 0 && C % group == 0) << fn << ": " << C << " features not divisible by group " << group;
  return group;
}

const float* optional_f32(const Tensor& t, const char* what, int64_t C) {
  if (!t.defined()) return nullptr;
  check_f32(t, what, {C});
  return t.data<float>();
}

}  // namespace

// ============================================================================ entry points

// residual defined: sum = x + residual (residual_rmsnorm_forward), normalised.
void rmsnorm_forward_cuda(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, float eps,
                          int64_t group, const Tensor& residual, Tensor* sum) {
  check_activation(x, "rmsnorm_forward: x");
  const int64_t C = x.dim(-1), N = C ? x.numel() / C : 0;
  group = resolve_group("rmsnorm_forward", C, group);
  check_activation(y, "rmsnorm_forward: y", x.numel());
  const bool with_res = residual.defined();
  if (with_res) {
    LASP_CHECK(sum != nullptr) << "rmsnorm_forward: a residual needs a sum output";
    check_activation(residual, "residual_rmsnorm_forward: residual", x.numel());
    check_activation(*sum, "residual_rmsnorm_forward: sum", x.numel());
  }
  const FloatIn res = with_res ? in_of(residual) : FloatIn{};
  const FloatOut so = with_res ? out_of(*sum) : FloatOut{};
  check_f32(rstd, "rmsnorm_forward: rstd (fp32 on CUDA)", {N, C / group});
  const float* wp = optional_f32(w, "rmsnorm_forward: w (fp32 on CUDA)", C);
  const int64_t rows = N * (C / group);
  if (rows == 0) return;
  const NormPlan plan = plan_norm(group);
  if (plan.ok && all_aligned16({y.raw(), x.raw(), wp, res.p, so.p})) {
    const NormShape sh{rows, C / group, static_cast<int>(group), plan.L};
    const int teams = kNormThreads / plan.L;
    const int grid = resident_grid((rows + teams - 1) / teams, 1, 2048 / kNormThreads);
    dispatch_k(plan.K, [&](auto k) {
      rmsnorm_forward_rows_kernel<decltype(k)::value><<<grid, kNormThreads, 0, cuda_stream()>>>(
          out_of(y), rstd.data<float>(), in_of(x), res, so, wp, sh, eps);
    });
    CUDA_CHECK_LAUNCH("rmsnorm_forward");
    return;
  }
  // Any other group size or alignment: one warp per row, x read twice.
  rmsnorm_forward_kernel<<<grid_for(rows * 32, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(y), rstd.data<float>(), in_of(x), res, so, wp, N, C, group, eps);
  CUDA_CHECK_LAUNCH("rmsnorm_forward");
}

void rmsnorm_backward_cuda(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                           const Tensor& rstd, int64_t group, const Tensor& d_residual) {
  check_activation(x, "rmsnorm_backward: x");
  const int64_t C = x.dim(-1), N = C ? x.numel() / C : 0;
  group = resolve_group("rmsnorm_backward", C, group);
  check_activation(dx, "rmsnorm_backward: dx", x.numel());
  check_activation(dy, "rmsnorm_backward: dy", x.numel());
  check_f32(rstd, "rmsnorm_backward: rstd (fp32 on CUDA)", {N, C / group});
  const float* wp = optional_f32(w, "rmsnorm_backward: w (fp32 on CUDA)", C);
  float* dwp = const_cast<float*>(optional_f32(dw, "rmsnorm_backward: dw (fp32 on CUDA)", C));
  if (d_residual.defined()) check_activation(d_residual, "rmsnorm_backward: d_residual", x.numel());
  const FloatIn dres = d_residual.defined() ? in_of(d_residual) : FloatIn{};
  const int64_t rows = N * (C / group);
  if (rows == 0) return;
  const NormPlan plan = plan_norm(group);
  if (plan.ok && all_aligned16({dx.raw(), dy.raw(), x.raw(), wp, dwp, dres.p})) {
    const int64_t G = C / group;
    const NormShape sh{rows, G, static_cast<int>(group), plan.L};
    const int teams = kNormThreads / plan.L;
    // As many blocks as are resident (K = 1 takes 60 registers: 4 blocks of 256 per SM, not 8):
    // no second wave, and fewer dw partial rows.
    int per_sm = 0;
    dispatch_k(plan.K, [&](auto k) {
      CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, rmsnorm_backward_rows_kernel<decltype(k)::value>, kNormThreads, 0));
    });
    int64_t grid = resident_grid((rows + teams - 1) / teams, 1, std::max(1, per_sm));
    // Team slots (grid * teams) a multiple of G, so that each slot's columns stay fixed.
    const int64_t step = G / std::gcd(G, static_cast<int64_t>(teams));
    grid = std::max<int64_t>(step, grid / step * step);
    if (grid <= 65535) {
      const int64_t splits = grid * teams / G;
      Tensor partial = dwp ? Tensor::empty({splits, C}, DType::F32, x.device()) : Tensor();
      dispatch_k(plan.K, [&](auto k) {
        rmsnorm_backward_rows_kernel<decltype(k)::value>
            <<<static_cast<unsigned>(grid), kNormThreads, 0, cuda_stream()>>>(
                out_of(dx), dwp ? partial.data<float>() : nullptr, in_of(dy), in_of(x), dres, wp,
                rstd.data<float>(), sh);
      });
      CUDA_CHECK_LAUNCH("rmsnorm_backward");
      if (dwp) colsum_finish(dwp, partial.data<float>(), splits, C, "rmsnorm_backward (dw)");
      return;
    }
  }
  // Any other group size or alignment: one warp per row, then a column-sum pass for dw.
  rmsnorm_backward_kernel<<<grid_for(rows * 32, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(dx), in_of(dy), in_of(x), dres, wp, rstd.data<float>(), N, C, group);
  CUDA_CHECK_LAUNCH("rmsnorm_backward");
  if (dwp)
    column_sum_accumulate(dwp, RmsNormDw{in_of(dy), in_of(x), rstd.data<float>(), C, group}, N, C,
                          x.device(), "rmsnorm_backward (dw)");
}

// An op's optional amax output (I32 [1] on `out`'s device), zeroed; nullptr when not asked for.
static uint32_t* amax_output(Tensor* amax, const Tensor& out, const char* what) {
  if (amax == nullptr) return nullptr;
  LASP_CHECK(amax->defined() && amax->is_cuda() && amax->device() == out.device() &&
             amax->dtype() == DType::I32 && amax->numel() == 1 && amax->is_contiguous())
      << what << ": the amax output must be an I32 [1] tensor on " << out.str() << "'s device, got "
      << (amax->defined() ? amax->str() : "undefined");
  CUDA_CHECK(cudaMemsetAsync(amax->raw(), 0, sizeof(uint32_t), cuda_stream()));
  return static_cast<uint32_t*>(amax->raw());
}

void swiglu_forward_cuda(Tensor& h, const Tensor& gate, const Tensor& up, Tensor* h_amax) {
  check_activation(gate, "swiglu_forward: gate");
  const int64_t n = gate.numel();
  check_activation(up, "swiglu_forward: up", n);
  check_activation(h, "swiglu_forward: h", n);
  uint32_t* amax = amax_output(h_amax, h, "swiglu_forward: h_amax");
  if (n == 0) return;
  const bool packed = all_aligned16({h.raw(), gate.raw(), up.raw()});
  swiglu_forward_kernel<<<resident_grid(packed ? n / kPack : n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(h), in_of(gate), in_of(up), n, packed, amax);
  CUDA_CHECK_LAUNCH("swiglu_forward");
}

void swiglu_backward_cuda(Tensor& d_gate, Tensor& d_up, const Tensor& dh, const Tensor& gate,
                          const Tensor& up, Tensor* d_gate_amax, Tensor* d_up_amax) {
  check_activation(gate, "swiglu_backward: gate");
  const int64_t n = gate.numel();
  check_activation(up, "swiglu_backward: up", n);
  check_activation(dh, "swiglu_backward: dh", n);
  check_activation(d_gate, "swiglu_backward: d_gate", n);
  check_activation(d_up, "swiglu_backward: d_up", n);
  uint32_t* gate_amax = amax_output(d_gate_amax, d_gate, "swiglu_backward: d_gate_amax");
  uint32_t* up_amax = amax_output(d_up_amax, d_up, "swiglu_backward: d_up_amax");
  if (n == 0) return;
  const bool packed = all_aligned16({d_gate.raw(), d_up.raw(), dh.raw(), gate.raw(), up.raw()});
  swiglu_backward_kernel<<<resident_grid(packed ? n / kPack : n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(d_gate), out_of(d_up), in_of(dh), in_of(gate), in_of(up), n, packed, gate_amax, up_amax);
  CUDA_CHECK_LAUNCH("swiglu_backward");
}

void activation_forward_cuda(Tensor& y, const Tensor& x, Activation f, float scale) {
  check_activation(x, "activation_forward: x");
  const int64_t n = x.numel();
  check_activation(y, "activation_forward: y", n);
  if (n == 0) return;
  activation_forward_kernel<<<grid_for(n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(y), in_of(x), static_cast<int>(f), scale, n);
  CUDA_CHECK_LAUNCH("activation_forward");
}

void activation_backward_cuda(Tensor& dx, const Tensor& dy, const Tensor& x, Activation f, float scale) {
  check_activation(x, "activation_backward: x");
  const int64_t n = x.numel();
  check_activation(dy, "activation_backward: dy", n);
  check_activation(dx, "activation_backward: dx", n);
  if (n == 0) return;
  activation_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(dx), in_of(dy), in_of(x), static_cast<int>(f), scale, n);
  CUDA_CHECK_LAUNCH("activation_backward");
}

void rope_rotate_cuda(Tensor& x, const std::vector<int64_t>& positions, float theta, float sign) {
  check_activation(x, "rope");
  LASP_CHECK(x.ndim() == 4) << "rope: expected [B, T, H, D], got " << x.str();
  const int64_t B = x.dim(0), T = x.dim(1), H = x.dim(2), D = x.dim(3);
  LASP_CHECK(D % 2 == 0) << "rope: head dim must be even, got " << D;
  LASP_CHECK_EQ(static_cast<int64_t>(positions.size()), T) << "rope: one position per token";
  LASP_CHECK(theta > 0) << "rope: theta must be positive, got " << theta;
  if (x.numel() == 0) return;
  // Positions are nearly always p0, p0 + 1, ...: then no copy. Otherwise they travel to the
  // device in a temporary (freed on the host at return; the caching allocator hands it out
  // again only to later work, which on the same stream runs after this kernel).
  const int64_t p0 = positions[0], step = T > 1 ? positions[1] - positions[0] : 1;
  bool affine = true;
  for (int64_t t = 0; t < T && affine; ++t) affine = positions[t] == p0 + t * step;
  Tensor pos;
  if (!affine) {
    pos = Tensor::empty({T}, DType::I64, x.device());
    device_memcpy(pos.raw(), x.device(), positions.data(), cpu(), static_cast<size_t>(T) * sizeof(int64_t));
  }
  rope_kernel<<<grid_for(T * H * (D / 2), kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(x), affine ? nullptr : pos.data<int64_t>(), p0, step, B, T, H, D,
      std::log(static_cast<double>(theta)), sign);
  CUDA_CHECK_LAUNCH("rope");
}

void embedding_forward_cuda(Tensor& out, const Tensor& table, const Tensor& tokens) {
  check_activation(table, "embedding_forward: table");
  LASP_CHECK(table.ndim() == 2) << "embedding_forward: table must be [V, C], got " << table.str();
  const int64_t V = table.dim(0), C = table.dim(1), N = tokens.numel();
  LASP_CHECK(tokens.is_cuda()) << "embedding_forward: tokens must be on the GPU, got " << tokens.str();
  check_tensor(tokens, "embedding_forward: tokens", DType::I32, {N});
  check_activation(out, "embedding_forward: out", N * C);
  if (N == 0 || C == 0) return;
  DeviceFlag bad(table.device());
  embedding_forward_kernel<<<grid_for(N, 1, 65536), kThreads, 0, cuda_stream()>>>(
      out_of(out), in_of(table), tokens.data<int32_t>(), N, V, C, bad.ptr());
  CUDA_CHECK_LAUNCH("embedding_forward");
  LASP_CHECK(bad.read() == 0) << "embedding_forward: a token is outside the vocabulary [0, " << V << ")";
}

void embedding_backward_cuda(Tensor& d_table, const Tensor& d_out, const Tensor& tokens) {
  LASP_CHECK(d_table.ndim() == 2) << "embedding_backward: d_table must be [V, C], got " << d_table.str();
  const int64_t V = d_table.dim(0), C = d_table.dim(1), N = tokens.numel();
  check_f32(d_table, "embedding_backward: d_table (fp32 on CUDA)", {V, C});
  LASP_CHECK(tokens.is_cuda()) << "embedding_backward: tokens must be on the GPU, got " << tokens.str();
  check_tensor(tokens, "embedding_backward: tokens", DType::I32, {N});
  check_activation(d_out, "embedding_backward: d_out", N * C);
  if (N == 0 || C == 0) return;
  DeviceFlag bad(d_table.device());
  embedding_backward_kernel<<<grid_for(N, 1, 65536), kThreads, 0, cuda_stream()>>>(
      d_table.data<float>(), in_of(d_out), tokens.data<int32_t>(), N, V, C, bad.ptr());
  CUDA_CHECK_LAUNCH("embedding_backward");
  LASP_CHECK(bad.read() == 0) << "embedding_backward: a token is outside the vocabulary [0, " << V << ")";
}

void bias_add_cuda(Tensor& y, const Tensor& b) {
  check_activation(y, "bias_add: y");
  const int64_t C = y.dim(-1);
  check_activation(b, "bias_add: b", C);
  if (y.numel() == 0) return;
  bias_add_kernel<<<grid_for(y.numel(), kThreads), kThreads, 0, cuda_stream()>>>(out_of(y), in_of(b),
                                                                                  y.numel(), C);
  CUDA_CHECK_LAUNCH("bias_add");
}

void bias_backward_cuda(Tensor& db, const Tensor& dy) {
  check_activation(dy, "bias_backward: dy");
  const int64_t C = dy.dim(-1), N = C ? dy.numel() / C : 0;
  check_f32(db, "bias_backward: db (fp32 on CUDA)", {C});
  column_sum_accumulate(db.data<float>(), BiasDb{in_of(dy), C}, N, C, dy.device(), "bias_backward");
}

void adamw_update_cuda(Tensor& w, Tensor& w_compute, const Tensor& g, Tensor& m, Tensor& v, float lr,
                       float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                       float grad_scale) {
  const Shape& s = w.shape();
  check_f32(w, "adamw_update: w (fp32 master weights)", s);
  check_f32(m, "adamw_update: m", s);
  check_f32(v, "adamw_update: v", s);
  check_activation(g, "adamw_update: g", w.numel());
  if (w_compute.defined()) check_activation(w_compute, "adamw_update: w_compute", w.numel());
  const int64_t n = w.numel();
  if (n == 0) return;
  const bool packed =
      all_aligned16({w.raw(), g.raw(), m.raw(), v.raw(), w_compute.defined() ? w_compute.raw() : nullptr});
  adamw_kernel<<<resident_grid(packed ? n / kPack : n, kThreads), kThreads, 0, cuda_stream()>>>(
      w.data<float>(), w_compute.defined() ? out_of(w_compute) : FloatOut{}, in_of(g), m.data<float>(),
      v.data<float>(), n, AdamW{lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale}, packed);
  CUDA_CHECK_LAUNCH("adamw_update");
}

// Lists of up to kListMax parameters per launch; checks as adamw_update_cuda.
void adamw_update_many_cuda(const std::vector<AdamWTensors>& params, float lr, float beta1, float beta2,
                            float eps, float c1, float c2, float grad_scale) {
  const AdamW opt{lr, beta1, beta2, eps, 0.0f, c1, c2, grad_scale};
  AdamWList list;
  auto launch = [&]() {
    if (list.tiles.tile_start[list.tiles.count] > 0) {
      adamw_many_kernel<<<list_grid(list.tiles), kThreads, 0, cuda_stream()>>>(list, opt);
      CUDA_CHECK_LAUNCH("adamw_update");
    }
    list = AdamWList{};
  };
  for (const AdamWTensors& p : params) {
    const Shape& s = p.w.shape();
    check_f32(p.w, "adamw_update: w (fp32 master weights)", s);
    check_f32(p.m, "adamw_update: m", s);
    check_f32(p.v, "adamw_update: v", s);
    check_activation(p.g, "adamw_update: g", p.w.numel());
    if (p.w_compute.defined()) check_activation(p.w_compute, "adamw_update: w_compute", p.w.numel());
    LASP_CHECK(p.w.device() == params.front().w.device() && p.g.device() == p.w.device())
        << "adamw_update_many: tensors on different devices: " << p.w.str() << ", " << p.g.str();
    if (list.tiles.count == kListMax) launch();
    const int t = list.tiles.count;
    list.w[t] = p.w.data<float>();
    list.m[t] = p.m.data<float>();
    list.v[t] = p.v.data<float>();
    list.g[t] = in_of(p.g);
    list.w_compute[t] = p.w_compute.defined() ? out_of(p.w_compute) : FloatOut{};
    list.weight_decay[t] = p.weight_decay;
    add_to_list(list.tiles, p.w.numel(), kAdamTile,
                all_aligned16({p.w.raw(), p.g.raw(), p.m.raw(), p.v.raw(),
                               p.w_compute.defined() ? p.w_compute.raw() : nullptr}));
  }
  if (list.tiles.count > 0) launch();
}

namespace {
CastType cast_type(const Tensor& t, const char* what) {
  switch (t.dtype()) {
    case DType::F64: return CastType::F64;
    case DType::F32: return CastType::F32;
    case DType::BF16: return CastType::BF16;
    case DType::F16: return CastType::F16;
    default: LASP_FAIL() << "cast: " << what << " must be fp64, fp32, bf16 or fp16, got " << t.str();
  }
  return CastType::F32;
}
}  // namespace

void cast_cuda(Tensor& dst, const Tensor& src) {
  LASP_CHECK(dst.shape() == src.shape()) << "cast: " << src.str() << " -> " << dst.str();
  LASP_CHECK(dst.is_cuda() && src.is_cuda() && dst.device() == src.device())
      << "cast: both tensors must be on one GPU, got " << src.str() << " -> " << dst.str();
  LASP_CHECK(dst.is_contiguous() && src.is_contiguous())
      << "cast: contiguous tensors only, got " << src.str() << " -> " << dst.str();
  const int64_t n = dst.numel();
  if (n == 0) return;
  if (dst.dtype() == src.dtype()) {
    CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), dst.nbytes(), cudaMemcpyDeviceToDevice, cuda_stream()));
    return;
  }
  cast_kernel<<<grid_for(n, kThreads), kThreads, 0, cuda_stream()>>>(dst.raw(), cast_type(dst, "dst"),
                                                                      src.raw(), cast_type(src, "src"), n);
  CUDA_CHECK_LAUNCH("cast");
}

void add_inplace_cuda(Tensor& y, const Tensor& x, float alpha) {
  check_activation(y, "add_inplace: y");
  check_activation(x, "add_inplace: x", y.numel());
  LASP_CHECK(x.shape() == y.shape()) << "add_inplace: shapes differ: " << y.str() << " vs " << x.str();
  const int64_t n = y.numel();
  if (n == 0) return;
  const bool packed = all_aligned16({y.raw(), x.raw()});
  add_inplace_kernel<<<resident_grid(packed ? n / kPack : n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(y), in_of(x), alpha, n, packed);
  CUDA_CHECK_LAUNCH("add_inplace");
}

void scale_inplace_cuda(Tensor& y, float alpha) {
  check_activation(y, "scale_inplace: y");
  const int64_t n = y.numel();
  if (n == 0) return;
  const bool packed = aligned16(y.raw());
  scale_inplace_kernel<<<resident_grid(packed ? n / kPack : n, kThreads), kThreads, 0, cuda_stream()>>>(
      out_of(y), alpha, n, packed);
  CUDA_CHECK_LAUNCH("scale_inplace");
}

double sum_of_squares_cuda(const Tensor& x) { return sum_of_squares_many_cuda({x}); }

// One partial buffer for all tensors (one double per tile of kSsqTile elements), filled by
// multi-tensor launches of up to kListMax tensors, one copy back (the only synchronisation); each
// tensor's partials are added in tile order, then the tensors in list order: exactly what a loop
// of `s += sum_of_squares(x)` computes.
double sum_of_squares_many_cuda(const std::vector<Tensor>& xs) {
  std::vector<int64_t> offset(xs.size() + 1, 0);
  for (size_t t = 0; t < xs.size(); ++t) {
    check_activation(xs[t], "sum_of_squares: x");
    LASP_CHECK(xs[t].device() == xs[0].device())
        << "sum_of_squares_many: tensors on different devices: " << xs[0].str() << " and " << xs[t].str();
    offset[t + 1] = offset[t] + (xs[t].numel() + kSsqTile - 1) / kSsqTile;
  }
  if (offset.back() == 0) return 0.0;
  Tensor partial = Tensor::empty({offset.back()}, DType::F64, xs[0].device());
  SsqList list;
  int64_t first_tile = 0;  // partial index of the list's first tile
  auto launch = [&]() {
    if (list.tiles.count == 0) return;
    if (list.tiles.tile_start[list.tiles.count] > 0) {
      sum_of_squares_many_kernel<<<list_grid(list.tiles), kThreads, 0, cuda_stream()>>>(
          partial.data<double>() + first_tile, list);
      CUDA_CHECK_LAUNCH("sum_of_squares");
    }
    first_tile += list.tiles.tile_start[list.tiles.count];
    list = SsqList{};
  };
  for (size_t t = 0; t < xs.size(); ++t) {
    if (list.tiles.count == kListMax) launch();
    list.x[list.tiles.count] = in_of(xs[t]);
    add_to_list(list.tiles, xs[t].numel(), kSsqTile, aligned16(xs[t].raw()));
  }
  launch();
  const std::vector<double> p = partial.to_vector();
  double total = 0.0;
  for (size_t t = 0; t < xs.size(); ++t) {
    double s = 0.0;
    for (int64_t b = offset[t]; b < offset[t + 1]; ++b) s += p[static_cast<size_t>(b)];
    total += s;
  }
  return total;
}

bool all_finite_cuda(const Tensor& x) {
  check_activation(x, "all_finite: x");
  const int64_t n = x.numel();
  if (n == 0) return true;
  DeviceFlag bad(x.device());
  all_finite_kernel<<<grid_for(n, kThreads * 4, 1024), kThreads, 0, cuda_stream()>>>(bad.ptr(), in_of(x), n);
  CUDA_CHECK_LAUNCH("all_finite");
  return bad.read() == 0;
}

}  // namespace lasp
