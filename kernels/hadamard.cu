// Blockwise Hadamard transform on CUDA (hadamard_cuda, declared in quantize_cuda.h), bit-identical
// to the CPU's hadamard_forward / hadamard_inverse (kernels/hadamard.cc).
//
// Why it is bit-identical: the CPU runs the butterfly stages h = 1, 2, 4, ... over each block, a
// stage replacing (v[j], v[j+h]) by (a + b, a - b); every stage reads only the previous stage's
// values, so any schedule that applies the same stages in the same order with the same two float
// operations per pair gives the same bits (a + b is commutative in IEEE arithmetic; the upper
// element computes a - b from its partner a). The sign and the 1/sqrt(g) factor are applied as the
// CPU does: forward x * s_j before the stages and * norm after; inverse * (norm * s_j) after.
//
// Work split (G = block, a compile-time constant): one warp per block for G >= 32, lane l holding
// elements e * 32 + l (e < G / 32) — stages h < 32 are lane shuffles, stages h >= 32 are register
// pairs; for G < 32 a warp holds 32 / G blocks, G lanes each (kernels/hadamard_device.cuh). The
// G signs are computed once per CTA into shared memory (philox, as hadamard_sign does).
#include <cuda_bf16.h>

#include <cmath>

#include "core/profile.h"
#include "core/tensor.h"
#include "kernels/counter_rng.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/hadamard_device.cuh"
#include "kernels/quantize_cuda.h"

namespace lasp {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlock = 1024;

__device__ inline float load_f(const float* p) { return *p; }
__device__ inline float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ inline void store_f(float* p, float v, bool acc) { *p = acc ? *p + v : v; }
__device__ inline void store_f(__nv_bfloat16* p, float v, bool acc) {
  *p = __float2bfloat16_rn(acc ? __bfloat162float(*p) + v : v);
}

template <int G, typename TI, typename TO>
__global__ void __launch_bounds__(kThreads)
    hadamard_kernel(const TI* __restrict__ x, TO* __restrict__ y, const uint8_t* __restrict__ mask,
                    int64_t nblocks, uint64_t seed, bool randomized, bool inverse, bool accumulate,
                    float norm) {
  constexpr int kLanes = HadamardLanes<G>::kLanes, kPerLane = HadamardLanes<G>::kPerLane;
  constexpr int kBlocksPerWarp = HadamardLanes<G>::kBlocksPerWarp;
  __shared__ float sign[G];
  hadamard_signs<G>(sign, randomized, seed);
  __syncthreads();
  const int lane = threadIdx.x & 31, l = lane % kLanes, sub = lane / kLanes;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t b0 = warp * kBlocksPerWarp; b0 < nblocks;
       b0 += warps * kBlocksPerWarp) {  // warp-uniform
    const int64_t b = b0 + sub;
    const bool active = b < nblocks;
    float v[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = e * kLanes + l;
      const int64_t i = b * G + j;
      float t = active ? load_f(x + i) : 0.0f;
      if (mask != nullptr && active && mask[i] == 0) t = 0.0f;
      v[e] = inverse ? t : __fmul_rn(t, sign[j]);
    }
    hadamard_butterfly<G>(v, l);
    if (!active) continue;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int j = e * kLanes + l;
      // __fmul_rn: never contracted into an FMA with the accumulation (the CPU rounds the product).
      store_f(y + b * G + j, __fmul_rn(v[e], inverse ? norm * sign[j] : norm), accumulate);
    }
  }
}

template <int G, typename TI, typename TO>
void launch(const TI* x, TO* y, const uint8_t* mask, int64_t nblocks, const HadamardSpec& spec,
            bool inverse, bool accumulate, float norm) {
  constexpr int kBlocksPerWarp = G >= 32 ? 1 : 32 / G;
  const int64_t warps = (nblocks + kBlocksPerWarp - 1) / kBlocksPerWarp;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(warps, kThreads / 32), 8192)));
  hadamard_kernel<G, TI, TO><<<blocks, kThreads, 0, cuda_stream()>>>(
      x, y, mask, nblocks, spec.seed, spec.randomized, inverse, accumulate, norm);
}

template <typename TI, typename TO>
void dispatch_block(const TI* x, TO* y, const uint8_t* mask, int64_t nblocks,
                    const HadamardSpec& spec, bool inverse, bool accumulate, float norm) {
  switch (spec.block) {
    case 2:
      return launch<2>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 4:
      return launch<4>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 8:
      return launch<8>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 16:
      return launch<16>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 32:
      return launch<32>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 64:
      return launch<64>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 128:
      return launch<128>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 256:
      return launch<256>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 512:
      return launch<512>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    case 1024:
      return launch<1024>(x, y, mask, nblocks, spec, inverse, accumulate, norm);
    default:
      LASP_FAIL() << "hadamard_cuda: block must be a power of two in [2, " << kMaxBlock << "], got "
                  << spec.block;
  }
}

template <typename TI>
void dispatch_out(const TI* x, Tensor& y, const uint8_t* mask, int64_t nblocks,
                  const HadamardSpec& spec, bool inverse, bool accumulate, float norm) {
  if (y.dtype() == DType::F32) {
    dispatch_block(x, y.data<float>(), mask, nblocks, spec, inverse, accumulate, norm);
  } else {
    dispatch_block(x, static_cast<__nv_bfloat16*>(y.raw()), mask, nblocks, spec, inverse,
                   accumulate, norm);
  }
}

}  // namespace

void hadamard_cuda(Tensor& y, const Tensor& x, const HadamardSpec& spec, bool inverse,
                   const Tensor* mask, bool accumulate) {
  LASP_PROFILE_SCOPE("hadamard");
  const char* fn = "hadamard_cuda";
  auto fp32_or_bf16 = [](const Tensor& t) {
    return t.dtype() == DType::F32 || t.dtype() == DType::BF16;
  };
  LASP_CHECK(x.defined() && x.ndim() >= 1 && x.is_cuda() && x.is_contiguous() && fp32_or_bf16(x))
      << fn << ": x must be a contiguous fp32/bf16 CUDA tensor, got "
      << (x.defined() ? x.str() : "undefined");
  LASP_CHECK(y.defined() && y.is_cuda() && y.is_contiguous() && fp32_or_bf16(y) &&
             y.shape() == x.shape())
      << fn << ": y must be a contiguous fp32/bf16 CUDA tensor of shape " << shape_str(x.shape())
      << ", got " << (y.defined() ? y.str() : "undefined");
  LASP_CHECK(y.raw() != x.raw()) << fn << ": y must not alias x";
  LASP_CHECK(spec.block >= 2 && spec.block <= kMaxBlock && (spec.block & (spec.block - 1)) == 0)
      << fn << ": block must be a power of two in [2, " << kMaxBlock << "], got " << spec.block;
  LASP_CHECK(x.dim(-1) % spec.block == 0)
      << fn << ": last dim " << x.dim(-1) << " is not a multiple of the block " << spec.block;
  const uint8_t* mp = nullptr;
  if (mask != nullptr && mask->defined()) {
    LASP_CHECK(mask->is_cuda() && mask->is_contiguous() && mask->dtype() == DType::U8 &&
               mask->shape() == x.shape())
        << fn << ": mask must be a contiguous uint8 CUDA tensor of shape " << shape_str(x.shape())
        << ", got " << mask->str();
    mp = mask->data<uint8_t>();
  }
  const int64_t nblocks = x.numel() / spec.block;
  if (nblocks == 0) return;
  const float norm = 1.0f / std::sqrt(static_cast<float>(spec.block));  // the CPU's expression
  if (x.dtype() == DType::F32) {
    dispatch_out(x.data<float>(), y, mp, nblocks, spec, inverse, accumulate, norm);
  } else {
    dispatch_out(static_cast<const __nv_bfloat16*>(x.raw()), y, mp, nblocks, spec, inverse,
                 accumulate, norm);
  }
  CUDA_CHECK_LAUNCH("hadamard_cuda");
}

}  // namespace lasp
