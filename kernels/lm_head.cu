// CUDA LM head + cross-entropy (kernels/lm_head.h): bf16/fp32 GEMMs (cuBLASLt) or FP8 GEMMs
// (cuBLASLt, per-tensor scales on the device, no host sync) around a row-wise cross-entropy kernel.
//
// Kernels:
//   cross_entropy_rows_kernel    one CTA per row of fp32 logits (fp32 operands): lse, row loss,
//                                fp32 dlogits
//   cross_entropy_bf16_kernel    one CTA per row of bf16 logits (bf16 operands and the FP8 path):
//                                16-byte accesses, dlogits written in place over the logits, and,
//                                for the FP8 path, max |dlogits| of the stored values noted for the
//                                E5M2 quantization (one atomic per CTA)
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/profile.h"
#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/gemm_fp8.h"
#include "kernels/lm_head.h"
#include "kernels/ops_cuda_util.cuh"
#include "kernels/quantize_cuda.h"

namespace lasp {

using namespace ops_cuda;

void cast_cuda(Tensor& dst, const Tensor& src);  // kernels/ops.cu

namespace {

// A device int32 flag (0 = fine) that kernels raise on invalid input; read() synchronises.
struct DeviceFlag {
  Tensor t;
  explicit DeviceFlag(Device d) : t(Tensor::zeros({1}, DType::I32, d)) {}
  int* ptr() const { return t.data<int32_t>(); }
  int read() const { return static_cast<int>(t.to(cpu()).data<int32_t>()[0]); }
};

// ---------------------------------------------------------------- LM head + cross-entropy
// One block per row of the chunk's fp32 logits: lse by an online max/sum, the row loss
// lse - logit[target] (double, per row), and dlogits = loss_scale (softmax - onehot) when wanted.
// Ignored rows (target < 0) get loss 0 and zero dlogits; out-of-range targets raise `bad`.
constexpr int kCeThreads = 1024;

__global__ void __launch_bounds__(kCeThreads)
    cross_entropy_rows_kernel(FloatOut dlogits, const float* logits, const int32_t* targets,
                              double* row_loss, int64_t V, float loss_scale, bool want_grad,
                              int* bad) {
  __shared__ float scratch_f[32];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  const int32_t t = targets[r];
  if (t < 0 || t >= V) {
    if (t >= V && threadIdx.x == 0) atomicExch(bad, 1);
    if (threadIdx.x == 0) row_loss[r] = 0.0;
    if (want_grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) dlogits.set(r * V + j, 0.0f);
    return;
  }
  // Per-thread running (max, sum of exp(x - max)), then merged across the block.
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float x = row[j];
    if (x > m) {
      s = s * __expf(m - x) + 1.0f;
      m = x;
    } else {
      s += __expf(x - m);
    }
  }
  // Block max first, then every thread rescales its sum to it.
  float bm = warp_max(m);
  __shared__ float wmax[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (lane == 0) wmax[warp] = bm;
  __syncthreads();
  bm = warp_max(lane < nwarps ? wmax[lane] : -INFINITY);
  const float scaled = m == -INFINITY ? 0.0f : s * __expf(m - bm);
  const float total = block_sum(scaled, scratch_f);
  const float lse = bm + logf(total);
  if (threadIdx.x == 0) row_loss[r] = static_cast<double>(lse) - static_cast<double>(row[t]);
  if (!want_grad) return;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float p = __expf(row[j] - lse) * loss_scale;
    dlogits.set(r * V + j, j == t ? p - loss_scale : p);
  }
}

// The FP8 path's cross-entropy over bf16 logits [rows, V] (one CTA per row), in place:
//   pass 1  per-thread online (max, sum exp(x - max)) over 8 elements per 16-byte load, merged
//           over the CTA: lse; row loss = lse - logit[target] (logit[target] read before any
//           write);
//   pass 2  dlogits = loss_scale (exp(x - lse) - [j == target]) rounded to bf16 over the logits,
//           and max |dlogits| of the stored values atomicMax'ed (float bits) into dl_amax.
// Ignored rows (target < 0) get loss 0 and zero dlogits; out-of-range targets raise `bad`.
constexpr int kCeBf16Threads = 512;

__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = (m == -INFINITY ? 0.0f : s * __expf(m - x)) + 1.0f;
    m = x;
  } else if (x != -INFINITY) {
    s += __expf(x - m);
  }
}

__global__ void __launch_bounds__(kCeBf16Threads)
    cross_entropy_bf16_kernel(bf16* logits, const int32_t* targets, double* row_loss, int64_t V,
                              float loss_scale, bool want_grad, bool vec_ok, uint32_t* dl_amax,
                              int* bad) {
  __shared__ float scratch_f[32];
  __shared__ float wmax[32];
  __shared__ uint32_t wamax[32];
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * V;
  const int32_t t = targets[r];
  if (t < 0 || t >= V) {
    if (t >= V && threadIdx.x == 0) atomicExch(bad, 1);
    if (threadIdx.x == 0) row_loss[r] = 0.0;
    if (want_grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) row[j] = __float2bfloat16_rn(0.0f);
    return;
  }
  const float x_target = __bfloat162float(row[t]);  // before the barriers below; writes come after
  const int64_t nv = vec_ok ? V / kPack : 0;        // 8-element packs
  float m = -INFINITY, s = 0.0f;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    float v[kPack];
    unpack_bf16x8(*reinterpret_cast<const uint4*>(row + i * kPack), v);
    float m8 = v[0];
#pragma unroll
    for (int k = 1; k < kPack; ++k) m8 = fmaxf(m8, v[k]);
    if (m8 == -INFINITY) continue;
    const float nm = fmaxf(m, m8);
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < kPack; ++k) add += __expf(v[k] - nm);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - nm)) + add;
    m = nm;
  }
  for (int64_t j = nv * kPack + threadIdx.x; j < V; j += blockDim.x)
    online_add(m, s, __bfloat162float(row[j]));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  float bm = warp_max(m);
  if (lane == 0) wmax[warp] = bm;
  __syncthreads();
  bm = warp_max(lane < nwarps ? wmax[lane] : -INFINITY);
  const float scaled = m == -INFINITY ? 0.0f : s * __expf(m - bm);
  const float total = block_sum(scaled, scratch_f);
  const float lse = bm + logf(total);
  if (threadIdx.x == 0) row_loss[r] = static_cast<double>(lse) - static_cast<double>(x_target);
  if (!want_grad) return;
  uint32_t am = 0;
  auto grad = [&](float x, int64_t j) {
    const float p = __expf(x - lse) * loss_scale;
    const bf16 g = __float2bfloat16_rn(j == t ? p - loss_scale : p);
    am = max(am, __float_as_uint(fabsf(__bfloat162float(g))));
    return g;
  };
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    float v[kPack];
    unpack_bf16x8(*reinterpret_cast<const uint4*>(row + i * kPack), v);
    uint32_t w[kPack / 2];
#pragma unroll
    for (int k = 0; k < kPack; k += 2)
      w[k / 2] =
          static_cast<uint32_t>(__bfloat16_as_ushort(grad(v[k], i * kPack + k))) |
          (static_cast<uint32_t>(__bfloat16_as_ushort(grad(v[k + 1], i * kPack + k + 1))) << 16);
    *reinterpret_cast<uint4*>(row + i * kPack) = make_uint4(w[0], w[1], w[2], w[3]);
  }
  for (int64_t j = nv * kPack + threadIdx.x; j < V; j += blockDim.x)
    row[j] = grad(__bfloat162float(row[j]), j);
  if (!dl_amax) return;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) am = max(am, __shfl_xor_sync(0xffffffffu, am, o));
  if (lane == 0) wamax[warp] = am;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < nwarps; ++k) am = max(am, wamax[k]);
    atomicMax(dl_amax, am);
  }
}

// Checks shared by both paths; returns (N, C, V).
struct LmHeadDims {
  int64_t N, C, V;
};
LmHeadDims check_lm_head_args(const Tensor& d_h, const Tensor& d_w, const Tensor& h,
                              const Tensor& w, const Tensor& targets, int64_t chunk) {
  const char* fn = "lm_head_cross_entropy";
  check_activation(h, "lm_head_cross_entropy: h");
  check_activation(w, "lm_head_cross_entropy: w");
  LASP_CHECK(h.ndim() == 2 && w.ndim() == 2 && h.dim(1) == w.dim(1))
      << fn << ": h must be [N, C] and w [V, C], got " << h.str() << " and " << w.str();
  const int64_t N = h.dim(0), C = h.dim(1), V = w.dim(0);
  LASP_CHECK(targets.is_cuda()) << fn << ": targets must be on the GPU, got " << targets.str();
  check_tensor(targets, "lm_head_cross_entropy: targets", DType::I32, {N});
  if (d_h.defined()) {
    check_activation(d_h, "lm_head_cross_entropy: d_h", N * C);
    LASP_CHECK(d_h.ndim() == 2) << fn << ": d_h must be [N, C], got " << d_h.str();
  }
  if (d_w.defined()) check_f32(d_w, "lm_head_cross_entropy: d_w (fp32 on CUDA)", {V, C});
  LASP_CHECK(chunk > 0) << fn << ": chunk must be positive";
  return {N, C, V};
}

double sum_row_losses(const Tensor& row_loss) {
  const std::vector<double> losses = row_loss.to_vector();
  double total = 0.0;
  for (double l : losses) total += l;
  return total;
}

}  // namespace

// Per chunk of rows: logits = h W^T (cuBLASLt), the row kernel, then d_h = dlogits W and
// d_w += dlogits^T h. Operands are bf16 when h or W is bf16 (the other is converted: W once, h per
// chunk), fp32 when both are. With bf16 operands the logits are stored in bf16 (as Megatron and
// PyTorch autocast do; lse and the softmax are then computed in fp32 from them) and the
// gradient overwrites them: half the bytes of fp32 logits, which made the row kernel 4x its
// memory floor at the Llama-3 vocabulary. fp32 operands keep fp32 logits.
double lm_head_cross_entropy_cuda(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                                  const Tensor& targets, float loss_scale, int64_t chunk) {
  const char* fn = "lm_head_cross_entropy";
  const LmHeadDims dims = check_lm_head_args(d_h, d_w, h, w, targets, chunk);
  const int64_t N = dims.N, C = dims.C, V = dims.V;
  if (N == 0) return 0.0;
  LASP_CHECK(V > 0) << fn << ": empty vocabulary";

  const Device dev = h.device();
  const DType op =
      (h.dtype() == DType::BF16 || w.dtype() == DType::BF16) ? DType::BF16 : DType::F32;
  Tensor w_op = w;
  if (w.dtype() != op) {
    w_op = Tensor::empty(w.shape(), op, dev);
    cast_cuda(w_op, w);
  }
  const bool want_grad = d_h.defined() || d_w.defined();
  const int64_t rows_max = std::min(chunk, N);
  // bf16: one buffer, logits then dlogits in place. fp32: fp32 logits and separate dlogits.
  Tensor logits = Tensor::empty({rows_max, V}, op, dev);
  Tensor dlogits = want_grad && op == DType::F32 ? Tensor::empty({rows_max, V}, op, dev) : Tensor();
  Tensor h_op_buf = h.dtype() != op ? Tensor::empty({rows_max, C}, op, dev) : Tensor();
  // gemm() writes bf16 or fp32 C from bf16 operands, only fp32 from fp32 ones.
  const bool dh_via_f32 = d_h.defined() && op == DType::F32 && d_h.dtype() != DType::F32;
  Tensor dh_buf = dh_via_f32 ? Tensor::empty({rows_max, C}, DType::F32, dev) : Tensor();
  Tensor row_loss = Tensor::empty({N}, DType::F64, dev);
  DeviceFlag bad(dev);
  const bool vec_ok = V % kPack == 0;  // rows start 16-byte aligned (fresh buffer, V % 8 == 0)

  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    Tensor hc = h.slice(0, r0, r0 + rows);
    if (h_op_buf.defined()) {
      Tensor conv = h_op_buf.slice(0, 0, rows);
      cast_cuda(conv, hc);
      hc = conv;
    }
    Tensor lc = logits.slice(0, 0, rows);
    gemm(lc, hc, false, w_op, true);  // logits = h W^T
    Tensor dlc;
    if (op == DType::BF16) {
      cross_entropy_bf16_kernel<<<static_cast<unsigned>(rows), kCeBf16Threads, 0, cuda_stream()>>>(
          static_cast<bf16*>(lc.raw()), targets.data<int32_t>() + r0, row_loss.data<double>() + r0, V,
          loss_scale, want_grad, vec_ok, nullptr, bad.ptr());
      CUDA_CHECK_LAUNCH("lm_head_cross_entropy (bf16 rows)");
      dlc = want_grad ? lc : Tensor();
    } else {
      dlc = want_grad ? dlogits.slice(0, 0, rows) : Tensor();
      cross_entropy_rows_kernel<<<static_cast<unsigned>(rows), kCeThreads, 0, cuda_stream()>>>(
          want_grad ? out_of(dlc) : FloatOut{}, lc.data<float>(), targets.data<int32_t>() + r0,
          row_loss.data<double>() + r0, V, loss_scale, want_grad, bad.ptr());
      CUDA_CHECK_LAUNCH("lm_head_cross_entropy (rows)");
    }
    if (d_h.defined()) {
      Tensor dhc = d_h.slice(0, r0, r0 + rows);
      if (dh_via_f32) {
        Tensor tmp = dh_buf.slice(0, 0, rows);
        gemm(tmp, dlc, false, w_op, false);
        cast_cuda(dhc, tmp);
      } else {
        gemm(dhc, dlc, false, w_op, false);  // d_h = dlogits W
      }
    }
    if (d_w.defined()) gemm(d_w, dlc, true, hc, false, 1.0f, 1.0f);  // d_w += dlogits^T h
  }
  LASP_CHECK(bad.read() == 0) << fn << ": a target is outside the vocabulary [0, " << V << ")";
  return sum_row_losses(row_loss);
}

// FP8 (kernels/lm_head.h): W and h quantized once per call (E4M3, per-tensor scales from one amax
// pass each; h's codes chunk by chunk with h's scale), per chunk
//   logits (bf16)  = gemm_fp8(Q(h_c) [rows, C], Q(W) [V, C])
//   cross_entropy_bf16_kernel: dlogits in place, their amax
//   Q(dl) [rows, V] and Q(dl)^T [V, rows_p] E5M2 in one pass (scale = amax / 57344)
//   d_h_c          = gemm_fp8(Q(dl), Q(W)^T [C, V])          (bf16 or fp32, overwritten)
//   d_w           += gemm_fp8(Q(dl)^T, Q(h_c)^T [C, rows_p])  (fp32 master gradient)
double lm_head_cross_entropy_fp8_cuda(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                                      const Tensor& targets, float loss_scale, int64_t chunk) {
  const char* fn = "lm_head_cross_entropy (fp8)";
  const LmHeadDims dims = check_lm_head_args(d_h, d_w, h, w, targets, chunk);
  const int64_t N = dims.N, V = dims.V;
  if (N == 0) return 0.0;
  LASP_CHECK(V > 0) << fn << ": empty vocabulary";
  const Device dev = h.device();
  const bool want_grad = d_h.defined() || d_w.defined();
  Fp8DeviceScale h_scale, w_scale, dl_scale;
  Fp8RowsCols wq;
  {
    LASP_PROFILE_SCOPE("lm_head_fp8_quantize");
    h_scale.amax = Tensor::empty({1}, DType::I32, dev);
    amax_into_cuda(h_scale.amax, 0, h, true);
    w_scale.amax = Tensor::empty({1}, DType::I32, dev);
    amax_into_cuda(w_scale.amax, 0, w, true);
    wq = quantize_fp8_rows_cols_cuda(w, Fp8Format::E4M3, w_scale, true, d_h.defined());
  }
  dl_scale.amax = Tensor::empty({1}, DType::I32, dev);
  const int64_t rows_max = std::min(chunk, N);
  Tensor logits = Tensor::empty({rows_max, V}, DType::BF16, dev);
  Tensor row_loss = Tensor::empty({N}, DType::F64, dev);
  DeviceFlag bad(dev);
  const bool vec_ok = V % kPack == 0;  // rows start 16-byte aligned (fresh buffer, V % 8 == 0)
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    Fp8RowsCols hq;
    {
      LASP_PROFILE_SCOPE("lm_head_fp8_quantize");
      hq = quantize_fp8_rows_cols_cuda(h.slice(0, r0, r0 + rows), Fp8Format::E4M3, h_scale, true,
                                       d_w.defined());
    }
    Tensor lc = logits.slice(0, 0, rows);
    gemm_fp8(lc, hq.rows, wq.rows);  // logits = Q(h_c) Q(W)^T
    if (want_grad) amax_reset_cuda(dl_scale.amax, 0);
    cross_entropy_bf16_kernel<<<static_cast<unsigned>(rows), kCeBf16Threads, 0, cuda_stream()>>>(
        static_cast<bf16*>(lc.raw()), targets.data<int32_t>() + r0, row_loss.data<double>() + r0, V,
        loss_scale, want_grad, vec_ok, static_cast<uint32_t*>(dl_scale.amax.raw()), bad.ptr());
    CUDA_CHECK_LAUNCH("lm_head_cross_entropy (fp8 rows)");
    if (!want_grad) continue;
    Fp8RowsCols dq;
    {
      LASP_PROFILE_SCOPE("lm_head_fp8_quantize");
      dq = quantize_fp8_rows_cols_cuda(lc, Fp8Format::E5M2, dl_scale, d_h.defined(), d_w.defined());
    }
    if (d_h.defined()) {
      Tensor dhc = d_h.slice(0, r0, r0 + rows);
      gemm_fp8(dhc, dq.rows, wq.cols);  // d_h = Q(dl) Q(W)
    }
    if (d_w.defined()) gemm_fp8(d_w, dq.cols, hq.cols, 1.0f, 1.0f);  // d_w += Q(dl)^T Q(h_c)
  }
  LASP_CHECK(bad.read() == 0) << fn << ": a target is outside the vocabulary [0, " << V << ")";
  return sum_row_losses(row_loss);
}

}  // namespace lasp
