// Helpers for the CUDA small ops (kernels/ops.cu) and softmax attention (kernels/attention.cu):
// typed views of bf16-or-fp32 tensors, warp/block reductions, and launch sizes.
//
// Mixed precision without a template per dtype combination: swiglu_backward alone has five
// activation tensors, each bf16 or fp32 (32 instantiations). A FloatIn / FloatOut carries its
// dtype as a flag; the branch on it is uniform across the grid, so it costs a predicate, not
// divergence, and the memory-bound kernels stay bandwidth-bound.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cstdint>

#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"

namespace lasp {
namespace ops_cuda {

using bf16 = __nv_bfloat16;

// A read-only bf16 or fp32 array, read as float.
struct FloatIn {
  const void* p = nullptr;
  bool is_bf16 = false;
  __device__ __forceinline__ float operator[](int64_t i) const {
    return is_bf16 ? __bfloat162float(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  // v[0..8) = elements i .. i + 8 (i a multiple of 8, p 16-byte aligned): one 16-byte load of
  // bf16, two of fp32, through the read-only cache.
  __device__ __forceinline__ void load8(int64_t i, float (&v)[8]) const;
};

// A writable bf16 or fp32 array; stores round to nearest even.
struct FloatOut {
  void* p = nullptr;
  bool is_bf16 = false;
  __device__ __forceinline__ float get(int64_t i) const {
    return is_bf16 ? __bfloat162float(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  __device__ __forceinline__ void set(int64_t i, float v) const {
    if (is_bf16) static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);
    else static_cast<float*>(p)[i] = v;
  }
  __device__ __forceinline__ void load8(int64_t i, float (&v)[8]) const;  // as FloatIn::load8
  __device__ __forceinline__ void store8(int64_t i, const float (&v)[8]) const;
};

// ---------------------------------------------------------------- 16-byte packs of 8 values
// The memory-bound ops move 8 consecutive elements per access: 16 bytes of bf16 or 2 x 16 bytes
// of fp32. A pack starts at a multiple of 8 elements, so it is 16-byte aligned when the tensor's
// base pointer is (host side: all_aligned16); the last n % 8 elements go one at a time.
constexpr int kPack = 8;

__device__ __forceinline__ void unpack_bf16x8(const uint4 r, float (&v)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __uint_as_float(w[k] << 16);           // low half: the element at the lower address
    v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k + 1]));
    w[k] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void load8_f32(const float* p, int64_t i, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p + i));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p + i + 4));
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// For arrays the kernel also writes (no read-only cache).
__device__ __forceinline__ void load8_f32_rw(const float* p, int64_t i, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p + i);
  const float4 b = *reinterpret_cast<const float4*>(p + i + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store8_f32(float* p, int64_t i, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void FloatIn::load8(int64_t i, float (&v)[8]) const {
  if (is_bf16) unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(p) + i)), v);
  else load8_f32(static_cast<const float*>(p), i, v);
}

__device__ __forceinline__ void FloatOut::load8(int64_t i, float (&v)[8]) const {
  if (is_bf16) unpack_bf16x8(*reinterpret_cast<const uint4*>(static_cast<const bf16*>(p) + i), v);
  else load8_f32_rw(static_cast<const float*>(p), i, v);
}

__device__ __forceinline__ void FloatOut::store8(int64_t i, const float (&v)[8]) const {
  if (is_bf16) *reinterpret_cast<uint4*>(static_cast<bf16*>(p) + i) = pack_bf16x8(v);
  else store8_f32(static_cast<float*>(p), i, v);
}

// Grid-stride loop over n elements: f8(i) for each whole pack (i a multiple of 8) when `packed`,
// then f1(i) for each remaining element (all of them when not `packed`).
template <typename F8, typename F1>
__device__ __forceinline__ void for_each_pack(int64_t n, bool packed, const F8& f8, const F1& f1) {
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = packed ? n / kPack : 0;
  for (int64_t p = tid; p < packs; p += stride) f8(p * kPack);
  for (int64_t i = packs * kPack + tid; i < n; i += stride) f1(i);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether every given (possibly null) pointer is 16-byte aligned.
inline bool all_aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (p && !aligned16(p)) return false;
  return true;
}

// Streaming multiprocessors of the current device (asked once per device).
inline int sm_count() {
  static std::atomic<int> cached[64] = {};
  const int d = cuda_current_device();
  if (d < 0 || d >= 64) return 132;
  int v = cached[d].load(std::memory_order_relaxed);
  if (v == 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, d));
    cached[d].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Blocks for a grid-stride loop over `items` work items of one thread each: enough to cover
// them, at most `per_sm` resident blocks on every SM (no tail wave of partly idle blocks).
inline int resident_grid(int64_t items, int threads, int per_sm = 8) {
  const int64_t want = (items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

// Checks that `t` is a contiguous CUDA tensor of bf16 or fp32 (with `numel` elements when >= 0).
inline void check_activation(const Tensor& t, const char* what, int64_t numel = -1) {
  LASP_CHECK(t.defined()) << what << ": undefined tensor";
  LASP_CHECK(t.is_cuda()) << what << ": expected a CUDA tensor, got " << t.str();
  LASP_CHECK(t.is_contiguous()) << what << ": expected a contiguous tensor, got " << t.str();
  LASP_CHECK(t.dtype() == DType::BF16 || t.dtype() == DType::F32)
      << what << ": CUDA ops take bf16 or fp32 activations, got " << t.str();
  if (numel >= 0)
    LASP_CHECK(t.numel() == numel) << what << ": expected " << numel << " elements, got " << t.str();
}

// Checks a contiguous CUDA fp32 tensor of the given shape.
inline void check_f32(const Tensor& t, const char* what, const Shape& shape) {
  LASP_CHECK(t.defined()) << what << ": undefined tensor";
  LASP_CHECK(t.is_cuda()) << what << ": expected a CUDA tensor, got " << t.str();
  check_tensor(t, what, DType::F32, shape);
}

inline FloatIn in_of(const Tensor& t) { return FloatIn{t.raw(), t.dtype() == DType::BF16}; }
inline FloatOut out_of(const Tensor& t) { return FloatOut{t.raw(), t.dtype() == DType::BF16}; }

// Grid size for a grid-stride loop over n elements.
inline int grid_for(int64_t n, int threads, int max_blocks = 65536) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values; the call synchronises the block twice.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(r);
}

}  // namespace ops_cuda
}  // namespace lasp
