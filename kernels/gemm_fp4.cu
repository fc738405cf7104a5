// FP4 GEMMs on CUDA (API, layouts and path choice in gemm_fp4.h, design in docs/fp8_gpu.md):
// the native block-scaled FP4 GEMM of sm_100+ through cuBLASLt, and the exact emulation on bf16
// tensor cores for Hopper.
//
// Layout mapping, as for the FP8 GEMM (gemm_fp8.cu): our row-major C[M, N] = A[M, K] B[N, K]^T is
// cuBLASLt's column-major D[N, M] = op(A') op(B') with A' = B's buffer (K x N, ld K, op T) and
// B' = A's buffer (K x M, ld K, op N): both operands K-major ("TN"), the only layout cuBLASLt's
// block-scaled FP4 kernels take. So cuBLASLt's A scales are B's tiled scales and the other way
// round, and alpha = ts_A ts_B carries the NVFP4 tensor scales.
#include <cuda_bf16.h>

#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "core/log.h"
#include "core/tensor.h"
#include "kernels/cublaslt_util.cuh"
#include "kernels/gemm.h"
#include "kernels/gemm_fp4.h"
#include "kernels/quantize_cuda.h"

namespace lasp {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// packed[r, j] = code[r, 2j] | code[r, 2j + 1] << 4 over [rows_p, k_p / 2]; zero outside
// [rows, cols].
__global__ void pack_e2m1_kernel(uint8_t* packed, const uint8_t* codes, int64_t rows, int64_t cols,
                                 int64_t rows_p, int64_t half_k) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows_p * half_k) return;
  const int64_t r = i / half_k, k = 2 * (i % half_k);
  uint32_t lo = 0, hi = 0;
  if (r < rows) {
    if (k < cols) lo = codes[r * cols + k] & 0xFu;
    if (k + 1 < cols) hi = codes[r * cols + k + 1] & 0xFu;
  }
  packed[i] = static_cast<uint8_t>(lo | (hi << 4));
}

// tiled[i] for every byte i of the 128 x 4 tiled scale layout (the inverse of
// fp4_scale_tile_offset): tile t = i / 512 covers rows 128 (t / tiles_per_row) .. +128 and group
// columns 4 (t % tiles_per_row) .. +4; inside it byte 16 r_lo + 4 r_hi + c is row 32 r_hi + r_lo,
// column c. Zero outside the [rows, groups] scale matrix.
__global__ void tile_scales_kernel(uint8_t* tiled, const uint8_t* scales, int64_t rows,
                                   int64_t groups, int64_t total, int64_t tiles_per_row) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t tile = i / (kFp4ScaleTileRows * kFp4ScaleTileCols);
  const int64_t in = i % (kFp4ScaleTileRows * kFp4ScaleTileCols);
  const int64_t row = (tile / tiles_per_row) * kFp4ScaleTileRows + ((in % 16) / 4) * 32 + in / 16;
  const int64_t gc = (tile % tiles_per_row) * kFp4ScaleTileCols + in % 4;
  tiled[i] = row < rows && gc < groups ? scales[row * groups + gc] : 0;
}

const char* format_name(Fp4Format f) { return f == Fp4Format::MXFP4 ? "mxfp4" : "nvfp4"; }

int compute_capability_major(int dev) {
  int major = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major;
}

// {alpha, beta} = {ts_A ts_B, 0} for the emulated GEMM, each tensor scale from device memory
// (ta, tb) or the host value (sa, sb).
__global__ void fp4_alpha_kernel(const float* ta, float sa, const float* tb, float sb, float* alpha_beta) {
  alpha_beta[0] = (ta ? *ta : sa) * (tb ? *tb : sb);
  alpha_beta[1] = 0.0f;
}

// (device, M padded, N padded, K padded, format, C dtype)
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int>;
std::mutex g_mu;
std::map<AlgoKey, cublasLtMatmulAlgo_t> g_algos;
std::atomic<int64_t> g_fallbacks{0};

// C = ts_A ts_B deq(A) deq(B)^T on FP4 tensor cores. Returns false (C untouched) with the reason
// when cuBLASLt has no kernel for the problem or the launch fails.
bool gemm_fp4_native(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b, std::string* why) {
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  const int64_t mp = round_up(m, kFp4NativeRowAlign), np = round_up(n, kFp4NativeRowAlign);
  const int64_t kp = round_up(k, kFp4NativeKAlign);
  const Fp4NativeOperand na = fp4_native_operand(a, mp, kp), nb = fp4_native_operand(b, np, kp);
  // The tensor scales on the host (a synchronisation when the CUDA quantizer left them on the
  // GPU; this path is compile-ready for sm_100 and has not run yet).
  const float alpha = fp4_tensor_scale(a) * fp4_tensor_scale(b), beta = 0.0f;
  const int32_t mode = a.format == Fp4Format::MXFP4 ? CUBLASLT_MATMUL_MATRIX_SCALE_VEC32_UE8M0
                                                    : CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3;
  const void* scale_lt_a = nb.scales.raw();  // cuBLASLt's A is our B
  const void* scale_lt_b = na.scales.raw();
  const cudaDataType_t t_c = c.dtype() == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
  const int dev = c.device().index;
  PaddedOutput out(c, mp, np, false);
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    LtContext& ctx = lt_context(LtUser::Fp4, dev);
    LtDescriptors d;
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode,
                                                sizeof(mode)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode,
                                                sizeof(mode)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                &scale_lt_a, sizeof(scale_lt_a)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                &scale_lt_b, sizeof(scale_lt_b)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_4F_E2M1, kp, np, kp));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_4F_E2M1, kp, mp, kp));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, t_c, np, mp, np));
    const AlgoKey key{dev, mp, np, kp, static_cast<int>(a.format), static_cast<int>(c.dtype())};
    auto it = g_algos.find(key);
    if (it == g_algos.end()) {
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
      const size_t ws = kLtWorkspaceBytes;
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      cublasLtMatmulHeuristicResult_t result{};
      int count = 0;
      status = cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1,
                                              &result, &count);
      if (status != CUBLAS_STATUS_SUCCESS || count == 0) {
        *why = std::string("cuBLASLt found no block-scaled FP4 algorithm (status ") +
               cublasGetStatusString(status) + ")";
        return false;
      }
      it = g_algos.emplace(key, result.algo).first;
    }
    status = cublasLtMatmul(ctx.handle, d.op, &alpha, nb.packed.raw(), d.a, na.packed.raw(), d.b,
                            &beta, out.run.raw(), d.c, out.run.raw(), d.c, &it->second,
                            ctx.workspace, kLtWorkspaceBytes, cuda_stream());
  }
  if (status != CUBLAS_STATUS_SUCCESS) {
    *why = std::string("cublasLtMatmul failed (status ") + cublasGetStatusString(status) + ")";
    return false;
  }
  out.finish();
  return true;
}

}  // namespace

bool fp4_native_supported(Device dev) {
  if (!dev.is_cuda()) return false;
  static std::mutex mu;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev.index);
  if (it == known.end())
    it = known.emplace(dev.index, compute_capability_major(dev.index) >= 10).first;
  return it->second;
}

int64_t gemm_fp4_fallback_count() { return g_fallbacks.load(); }

Fp4NativeOperand fp4_native_operand_cuda(const QuantizedFp4& q, int64_t rows_padded,
                                         int64_t k_padded) {
  LASP_CHECK(q.scales.is_cuda()) << "fp4_native_operand: codes on CUDA but scales "
                                 << q.scales.str();
  Fp4NativeOperand n;
  n.rows = q.rows();
  n.cols = q.cols();
  n.rows_padded = rows_padded;
  n.k_padded = k_padded;
  n.format = q.format;
  n.tensor_scale = fp4_tensor_scale(q);
  const Device dev = q.codes.device();
  const int64_t group = q.group(), groups = (n.cols + group - 1) / group,
                groups_padded = k_padded / group;
  const int64_t half_k = k_padded / 2,
                tiled = round_up(rows_padded, kFp4ScaleTileRows) * groups_padded;
  n.packed = Tensor::empty({rows_padded, half_k}, DType::U8, dev);
  n.scales = Tensor::empty({tiled}, DType::U8, dev);
  cudaStream_t stream = cuda_stream();
  if (rows_padded * half_k > 0) {
    pack_e2m1_kernel<<<ceil_div(rows_padded * half_k, 256), 256, 0, stream>>>(
        n.packed.data<uint8_t>(), q.codes.data<uint8_t>(), n.rows, n.cols, rows_padded, half_k);
    CUDA_CHECK_LAUNCH("fp4_native_operand (codes)");
  }
  if (tiled > 0) {
    tile_scales_kernel<<<ceil_div(tiled, 256), 256, 0, stream>>>(
        n.scales.data<uint8_t>(), q.scales.data<uint8_t>(), n.rows, groups, tiled,
        groups_padded / kFp4ScaleTileCols);
    CUDA_CHECK_LAUNCH("fp4_native_operand (scales)");
  }
  return n;
}

void gemm_fp4_cuda(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b) {
  LASP_CHECK(a.format == b.format)
      << "gemm_fp4: operands in different FP4 formats (A " << format_name(a.format) << ", B "
      << format_name(b.format) << ")";
  LASP_CHECK(a.cols() == b.cols())
      << "gemm_fp4: inner dims differ, A " << a.codes.str() << ", B " << b.codes.str();
  const int64_t m = a.rows(), n = b.rows();
  LASP_CHECK(c.is_cuda() && c.is_contiguous() && c.ndim() == 2 && c.dim(0) == m && c.dim(1) == n &&
             (c.dtype() == DType::F32 || c.dtype() == DType::BF16))
      << "gemm_fp4: C must be a contiguous bf16/fp32 CUDA tensor [" << m << ", " << n << "], got "
      << c.str();
  const Fp4GemmPath path = fp4_gemm_path_from_env();
  const bool native = fp4_native_supported(c.device());
  LASP_CHECK(path != Fp4GemmPath::Native || native)
      << "gemm_fp4: LASP_FP4_GEMM=native, but CUDA device " << c.device().index
      << " (compute capability " << compute_capability_major(c.device().index)
      << ".x) has no FP4 tensor cores (sm_100 or later)";
  if (path == Fp4GemmPath::Emulated || !native) return gemm_fp4_emulated_cuda(c, a, b);
  if (m == 0 || n == 0) return;
  if (a.cols() == 0) {
    CUDA_CHECK(cudaMemsetAsync(c.raw(), 0, c.nbytes(), cuda_stream()));
    return;
  }
  static std::once_flag logged;
  std::call_once(logged, [&] {
    LASP_INFO() << "FP4 GEMM: native block-scaled FP4 tensor cores through cuBLASLt ("
                << format_name(a.format) << ", compute capability "
                << compute_capability_major(c.device().index) << ".x)";
  });
  std::string why;
  if (gemm_fp4_native(c, a, b, &why)) return;
  std::ostringstream what;
  what << "gemm_fp4: " << why << " for " << format_name(a.format) << " [" << m << ", " << a.cols()
       << "] x [" << n << ", " << b.cols() << "]^T -> " << c.str();
  LASP_CHECK(path != Fp4GemmPath::Native)
      << what.str() << " (LASP_FP4_GEMM=native forbids the emulation)";
  // Warn for the first few only: a training step runs many FP4 GEMMs of the same shapes.
  if (g_fallbacks.fetch_add(1) < 8) {
    LASP_WARN() << what.str() << "; falling back to the exact emulation (bf16 tensor cores)"
                << " (gemm_fp4_fallback_count counts every fallback; warnings stop after 8)";
  }
  gemm_fp4_emulated_cuda(c, a, b);
}

void gemm_fp4_emulated_cuda(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b) {
  LASP_CHECK(a.format == b.format) << "gemm_fp4_emulated_cuda: operands in different FP4 formats";
  LASP_CHECK(a.cols() == b.cols()) << "gemm_fp4_emulated_cuda: inner dims differ, A "
                                   << a.codes.str() << ", B " << b.codes.str();
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  LASP_CHECK(c.is_cuda() && c.ndim() == 2 && c.dim(0) == m && c.dim(1) == n &&
             (c.dtype() == DType::F32 || c.dtype() == DType::BF16))
      << "gemm_fp4_emulated_cuda: C must be a bf16/fp32 CUDA tensor [" << m << ", " << n
      << "], got " << c.str();
  static std::once_flag logged;
  std::call_once(logged, [] {
    int dev = 0, major = 0, minor = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    LASP_INFO() << "FP4 emulated on sm_" << major << minor
                << ": FP4 GEMMs dequantize E2M1 x group scale exactly to bf16 and run bf16 tensor "
                   "cores with fp32 accumulation ("
                << (major >= 10 ? "LASP_FP4_GEMM=emulated or no native kernel"
                                : "no FP4 tensor cores on this GPU")
                << ")";
  });
  // E2M1 x E8M0 and E2M1 x E4M3 have at most 6 significant bits: exact in bf16. The tensor
  // scales go to the epilogue (alpha), as in gemm_fp4_emulated; read from device memory when the
  // quantizer left them there, so nothing here waits for the GPU.
  Tensor ad = Tensor::empty(a.codes.shape(), DType::BF16, c.device());
  Tensor bd = Tensor::empty(b.codes.shape(), DType::BF16, c.device());
  dequantize_fp4_cuda(ad, a, false);
  dequantize_fp4_cuda(bd, b, false);
  if (!a.tensor_scale_device.defined() && !b.tensor_scale_device.defined()) {
    gemm(c, ad.view({m, k}), false, bd.view({n, k}), true, a.tensor_scale * b.tensor_scale);
    return;
  }
  Tensor alpha_beta = Tensor::empty({2}, DType::F32, c.device());
  auto dev_ptr = [](const QuantizedFp4& q) {
    return q.tensor_scale_device.defined() ? q.tensor_scale_device.data<float>() : nullptr;
  };
  fp4_alpha_kernel<<<1, 1, 0, cuda_stream()>>>(dev_ptr(a), a.tensor_scale, dev_ptr(b), b.tensor_scale,
                                               alpha_beta.data<float>());
  CUDA_CHECK_LAUNCH("gemm_fp4_emulated_cuda (alpha)");
  gemm_cuda_device_alpha(c, ad.view({m, k}), false, bd.view({n, k}), true, alpha_beta);
}

}  // namespace lasp
