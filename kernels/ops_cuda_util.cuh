// Helpers for the CUDA small ops (kernels/ops.cu) and softmax attention (kernels/attention.cu):
// typed views of bf16-or-fp32 tensors, warp/block reductions, and launch sizes.
//
// Mixed precision without a template per dtype combination: swiglu_backward alone has five
// activation tensors, each bf16 or fp32 (32 instantiations). A FloatIn / FloatOut carries its
// dtype as a flag; the branch on it is uniform across the grid, so it costs a predicate, not
// divergence, and the memory-bound kernels stay bandwidth-bound.
#pragma once

#include <cuda_bf16.h>

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
};

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
