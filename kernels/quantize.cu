// CUDA quantizers (API in quantize_cuda.h): FP8 per tensor / 1x128 / 128x128, FP8
// dequantization, MXFP4 / NVFP4 with RTN, QuEST clipping and stochastic rounding, FP4
// dequantization. The per-element and per-group rules are the host/device functions of
// quantize_math.h, written to reproduce quantize.cc bit for bit.
//
// Kernels and their work split:
//   amax_kernel              grid-stride max |x| -> one uint (float bits: for x >= 0 the bit
//                            patterns order like the values, and NaN sorts above inf, so NaN
//                            propagates), atomicMax per warp
//   fp8_tensor_kernel        one scale (from the device amax or a host value), grid-stride encode
//   fp8_block1x128_kernel    one warp per 1x128 block: 4 elements per lane, warp max, encode
//   fp8_block128x128_kernel  one 256-thread CTA per 128x128 tile: CTA max, encode
//   fp4_quantize_kernel      one thread per (row, group) of 32 (MX) or 16 (NV) elements
//   *_dequant_kernel         grid-stride elementwise
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
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
__global__ void amax_kernel(const T* x, int64_t n, uint32_t* out) {
  uint32_t m = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    m = max(m, float_bits(fabsf(to_float(x[i]))));
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) atomicMax(out, m);
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

template <typename T>
__global__ void fp8_block1x128_kernel(const T* x, int64_t rows, int64_t cols, int64_t nb,
                                      float fmax, bool e4m3, uint8_t* codes, float* scales) {
  const int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (w >= rows * nb) return;  // uniform per warp
  const int64_t r = w / nb, c0 = (w % nb) * kBlock;
  float v[kBlock / 32];
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < kBlock / 32; ++j) {
    const int64_t c = c0 + lane + 32 * j;
    v[j] = c < cols ? to_float(x[r * cols + c]) : 0.0f;
    m = max(m, float_bits(fabsf(v[j])));
  }
  const float s = scale_from_amax(bits_float(warp_max(m)), fmax);
  if (lane == 0) scales[w] = s;
#pragma unroll
  for (int j = 0; j < kBlock / 32; ++j) {
    const int64_t c = c0 + lane + 32 * j;
    if (c < cols) codes[r * cols + c] = fp8_encode_dev(v[j] / s, e4m3);
  }
}

template <typename T>
__global__ void fp8_block128x128_kernel(const T* x, int64_t rows, int64_t cols, int64_t nb,
                                        float fmax, bool e4m3, uint8_t* codes, float* scales) {
  __shared__ uint32_t warp_maxes[kThreads / 32];
  __shared__ float tile_scale;
  const int64_t tile = blockIdx.x;
  const int64_t r0 = (tile / nb) * kBlock, c0 = (tile % nb) * kBlock;
  const int64_t r1 = min(rows, r0 + kBlock), c1 = min(cols, c0 + kBlock);
  uint32_t m = 0;
  for (int i = threadIdx.x; i < kBlock * kBlock; i += blockDim.x) {
    const int64_t r = r0 + i / kBlock, c = c0 + i % kBlock;
    if (r < r1 && c < c1) m = max(m, float_bits(fabsf(to_float(x[r * cols + c]))));
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_maxes[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t t = 0;
    for (int i = 0; i < kThreads / 32; ++i) t = max(t, warp_maxes[i]);
    tile_scale = scale_from_amax(bits_float(t), fmax);
    scales[tile] = tile_scale;
  }
  __syncthreads();
  const float s = tile_scale;
  for (int i = threadIdx.x; i < kBlock * kBlock; i += blockDim.x) {
    const int64_t r = r0 + i / kBlock, c = c0 + i % kBlock;
    if (r < r1 && c < c1) codes[r * cols + c] = fp8_encode_dev(to_float(x[r * cols + c]) / s, e4m3);
  }
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
                                    int64_t ngroups, Fp4GroupRule rule, uint8_t* codes,
                                    uint8_t* scodes, uint8_t* mask) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= rows * ngroups) return;
  const int64_t r = t / ngroups, g = t % ngroups;
  const T* xr = x + r * cols;
  const auto load = [xr](int64_t c) { return to_float(xr[c]); };
  const int64_t c0 = g * group, c1 = min(cols, c0 + group);
  scodes[t] = fp4_quantize_group(load, c0, c1, static_cast<uint64_t>(r * cols), rule,
                                 codes + r * cols, mask ? mask + r * cols : nullptr);
}

template <typename TO>
__global__ void fp4_dequant_kernel(const uint8_t* codes, int64_t n, int64_t cols, int64_t group,
                                   int64_t ngroups, const uint8_t* scodes, bool mx, float ts,
                                   TO* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, c = i % cols;
    const uint8_t sc = scodes[r * ngroups + c / group];
    const float s = mx ? e8m0_decode(sc) : e4m3_decode(sc);
    store(out + i, e2m1_decode(codes[i]) * s * ts);
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

// max |x| as float bits into a fresh one-element device buffer (async).
Tensor device_amax_bits(const Tensor& x) {
  Tensor amax = Tensor::empty({1}, DType::I32, x.device());
  cudaStream_t stream = cuda_stream();
  CUDA_CHECK(cudaMemsetAsync(amax.raw(), 0, sizeof(uint32_t), stream));
  const int64_t n = x.numel();
  if (n > 0) {
    with_input_type(x, [&](auto* xp) {
      amax_kernel<<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(
          xp, n, static_cast<uint32_t*>(amax.raw()));
    });
    CUDA_CHECK_LAUNCH("amax_kernel");
  }
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
  } else if (scaling == Fp8Scaling::Block1x128) {
    const int64_t warps = d.rows * nb;
    if (warps > 0) {
      with_input_type(x, [&](auto* xp) {
        fp8_block1x128_kernel<<<ceil_div(warps, kThreads / 32), kThreads, 0, stream>>>(
            xp, d.rows, d.cols, nb, fmax, e4m3, codes, scales);
      });
      CUDA_CHECK_LAUNCH("quantize_fp8_cuda (1x128)");
    }
  } else {
    const int64_t tiles = q.scales.numel();
    if (tiles > 0) {
      with_input_type(x, [&](auto* xp) {
        fp8_block128x128_kernel<<<static_cast<int>(tiles), kThreads, 0, stream>>>(
            xp, d.rows, d.cols, nb, fmax, e4m3, codes, scales);
      });
      CUDA_CHECK_LAUNCH("quantize_fp8_cuda (128x128)");
    }
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

QuantizedFp4 quantize_fp4_cuda(const Tensor& x, const Fp4Options& opt) {
  const Rows2D d = check_cuda_input(x, "quantize_fp4_cuda");
  const bool mx = opt.format == Fp4Format::MXFP4;
  const bool quest = opt.clip == Fp4Clip::Quest;
  LASP_CHECK(!quest || (mx && opt.rounding == Fp4Rounding::Nearest))
      << "quantize_fp4_cuda: QuEST clipping is defined for MXFP4 with round-to-nearest";
  LASP_CHECK(opt.rounding != Fp4Rounding::MsEden)
      << "quantize_fp4_cuda: MS-EDEN is not implemented on the GPU yet (use the CPU quantize_fp4 "
         "or Stochastic rounding); see docs/fp8_gpu.md";
  const int64_t group = fp4_group_size(opt.format);
  const int64_t ngroups = (d.cols + group - 1) / group;
  const Device dev = x.device();

  // The amax: finiteness check (as the CPU does) and the NVFP4 tensor scale, a host value.
  const float amax = amax_cuda(x);
  LASP_CHECK(std::isfinite(amax)) << "quantize_fp4_cuda: non-finite input " << x.str()
                                  << " (max |x| = " << amax << ")";

  QuantizedFp4 q;
  q.format = opt.format;
  q.codes = Tensor::empty(x.shape(), DType::U8, dev);
  q.scales = Tensor::empty({d.rows, ngroups}, DType::U8, dev);
  if (quest) q.mask = Tensor::empty(x.shape(), DType::U8, dev);
  if (!mx) q.tensor_scale = amax > 0 ? amax / (kE4M3Max * kE2M1Max) : 1.0f;

  Fp4GroupRule rule;
  rule.mx = mx;
  rule.quest = quest;
  rule.stochastic = opt.rounding == Fp4Rounding::Stochastic;
  rule.tensor_scale = q.tensor_scale;
  rule.seed = opt.seed;
  rule.stream = opt.stream;
  const int64_t threads_total = d.rows * ngroups;
  if (threads_total == 0) return q;
  cudaStream_t stream = cuda_stream();
  uint8_t* mask = quest ? q.mask.data<uint8_t>() : nullptr;
  with_input_type(x, [&](auto* xp) {
    fp4_quantize_kernel<<<ceil_div(threads_total, 128), 128, 0, stream>>>(
        xp, d.rows, d.cols, group, ngroups, rule, q.codes.data<uint8_t>(), q.scales.data<uint8_t>(),
        mask);
  });
  CUDA_CHECK_LAUNCH("quantize_fp4_cuda");
  return q;
}

void dequantize_fp4_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale) {
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
  const bool mx = q.format == Fp4Format::MXFP4;
  cudaStream_t stream = cuda_stream();
  if (out.dtype() == DType::F32) {
    fp4_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(q.codes.data<uint8_t>(), n, cols, group,
                                                             ngroups, q.scales.data<uint8_t>(), mx,
                                                             ts, out.data<float>());
  } else {
    fp4_dequant_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        q.codes.data<uint8_t>(), n, cols, group, ngroups, q.scales.data<uint8_t>(), mx, ts,
        static_cast<__nv_bfloat16*>(out.raw()));
  }
  CUDA_CHECK_LAUNCH("dequantize_fp4_cuda");
}

}  // namespace lasp
