// FP8 GEMM through cuBLASLt (API and limits in gemm_fp8.h, design in docs/fp8_gpu.md).
//
// Layout mapping. Our row-major C[M, N] = A[M, K] B[N, K]^T, read column-major, is the
// N x M matrix C^T (ld N) = B A^T, i.e. cuBLASLt's D = op(A') op(B') with
//   A' = B's buffer as a column-major K x N matrix (ld K), op(A') = T  -> N x K
//   B' = A's buffer as a column-major K x M matrix (ld K), op(B') = N  -> K x M
// which is exactly the "TN" form Hopper FP8 needs (both operands K-major). So cuBLASLt's
// m = N, n = M, k = K, its A is our B and its B is our A — the scales swap the same way.
//
// Block scale layouts cuBLASLt wants (cuBLAS docs 3.1.4.5.1), for an operand with `outer`
// rows (cuBLASLt's M for A', N for B') and L = ceil(K / 128) blocks along K:
//   VEC128_32F     outer-major: scale(o, kb) at kb * outer + o (ours is [rows, L] row-major,
//                  so it is transposed on the fly);
//   BLK128x128_32F K-major, column stride L4 = round_up(L, 4): scale(t, kb) at t * L4 + kb
//                  (ours is [ceil(rows/128), L] row-major: padded to L4).
// The scale pointers must be 16-byte aligned (fresh allocations are); cuBLASLt's M and N must
// be multiples of 4 (ours are padded to 16). Padding along K adds zero codes, which leaves the
// number of 128-blocks along K, and so the block scales, unchanged.
#include <cuda_bf16.h>

#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>

#include "core/log.h"
#include "core/tensor.h"
#include "kernels/cublaslt_util.cuh"
#include "kernels/gemm.h"
#include "kernels/gemm_fp8.h"
#include "kernels/quantize_cuda.h"

namespace lasp {
namespace {

constexpr int64_t kFp8Align = 16;  // elements (= bytes) for K-major FP8 rows; also N for C
constexpr int64_t kScaleBlock = kFp8BlockSize;

// (device, M padded, N, K, A fmt, B fmt, A mode, B mode, C dtype, beta != 0, fast accum)
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, int, int, int, int>;

std::mutex g_mu;
std::map<AlgoKey, cublasLtMatmulAlgo_t> g_algos;
std::atomic<int64_t> g_fallbacks{0};
std::atomic<int64_t> g_lasp_launches{0};

const char* format_name(Fp8Format f) { return f == Fp8Format::E4M3 ? "e4m3" : "e5m2"; }
cudaDataType_t fp8_cuda_type(Fp8Format f) {
  return f == Fp8Format::E4M3 ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2;
}

// "A e4m3 1x128 [M, K] x B e4m3 128x128 [N, K]^T -> C bf16 [M, N]" for error messages.
std::string describe(const QuantizedFp8& a, const QuantizedFp8& b, const Tensor& c) {
  std::ostringstream s;
  s << "A " << format_name(a.format) << " " << fp8_scaling_name(a.scaling) << " [" << a.rows()
    << ", " << a.cols() << "] x B " << format_name(b.format) << " " << fp8_scaling_name(b.scaling)
    << " [" << b.rows() << ", " << b.cols() << "]^T -> C " << c.str();
  return s.str();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void check_operand(const QuantizedFp8& q, const char* name) {
  LASP_CHECK(q.codes.defined() && q.codes.is_cuda() && q.codes.dtype() == DType::U8 &&
             q.codes.is_contiguous())
      << "gemm_fp8: " << name << " codes must be contiguous uint8 CUDA, got " << q.codes.str();
  const int64_t rows = q.rows(), nb = (q.cols() + kScaleBlock - 1) / kScaleBlock;
  const int64_t want = q.scaling == Fp8Scaling::PerTensor ? 1
                       : q.scaling == Fp8Scaling::Block1x128 ? rows * nb
                                                             : ((rows + kScaleBlock - 1) / kScaleBlock) * nb;
  LASP_CHECK(q.scales.defined() && q.scales.is_cuda() && q.scales.dtype() == DType::F32 &&
             q.scales.is_contiguous() && q.scales.numel() == want)
      << "gemm_fp8: " << name << " scales must be contiguous fp32 CUDA with " << want
      << " entries for " << fp8_scaling_name(q.scaling) << " scaling of [" << rows << ", "
      << q.cols() << "], got " << q.scales.str();
}

// out[kb * outer_p + o] = scale of (row o, K block kb) for o < outer, 1 for padded rows.
// src_kind: 0 per tensor (broadcast), 1 = 1x128 [rows, nb], 2 = 128x128 [ceil(rows/128), nb].
__global__ void vec128_scales_kernel(float* out, int64_t outer_p, int64_t outer, int64_t nb,
                                     const float* in, int src_kind) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= outer_p * nb) return;
  const int64_t kb = i / outer_p, o = i % outer_p;
  float v = 1.0f;
  if (o < outer) {
    v = src_kind == 0 ? in[0] : src_kind == 1 ? in[o * nb + kb] : in[(o / kScaleBlock) * nb + kb];
  }
  out[i] = v;
}

// out[t * l4 + kb] = in[t * nb + kb], zero in the padding kb >= nb.
__global__ void blk_scales_kernel(float* out, int64_t tiles, int64_t l4, int64_t nb, const float* in) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= tiles * l4) return;
  const int64_t t = i / l4, kb = i % l4;
  out[i] = kb < nb ? in[t * nb + kb] : 0.0f;
}

__global__ void scale_f32_kernel(float* c, int64_t n, float beta) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
}
__global__ void scale_bf16_kernel(__nv_bfloat16* c, int64_t n, float beta) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) c[i] = __float2bfloat16_rn(beta == 0.0f ? 0.0f : beta * __bfloat162float(c[i]));
}
// c = bf16(t + beta * c) (the fallback's epilogue for bf16 C).
__global__ void add_scaled_bf16_kernel(__nv_bfloat16* c, const float* t, int64_t n, float beta) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) c[i] = __float2bfloat16_rn(t[i] + (beta == 0.0f ? 0.0f : beta * __bfloat162float(c[i])));
}

void scale_c(Tensor& c, float beta) {
  const int64_t n = c.numel();
  cudaStream_t stream = cuda_stream();
  if (c.dtype() == DType::F32) {
    scale_f32_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(c.data<float>(), n, beta);
  } else {
    scale_bf16_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(static_cast<__nv_bfloat16*>(c.raw()), n, beta);
  }
  CUDA_CHECK_LAUNCH("gemm_fp8 (k = 0)");
}

struct OperandScales {
  Tensor buffer;  // keeps a rearranged copy alive
  const void* ptr = nullptr;
  int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
};

// The cuBLASLt scale argument of one operand with `outer_p` (possibly padded) rows.
OperandScales prepare_scales(const QuantizedFp8& q, int64_t outer_p, bool block_mode,
                             bool force_vec128) {
  OperandScales s;
  if (!block_mode) {
    s.ptr = q.scales.raw();
    return s;
  }
  const Device dev = q.codes.device();
  const int64_t nb = (q.cols() + kScaleBlock - 1) / kScaleBlock;
  cudaStream_t stream = cuda_stream();
  if (q.scaling == Fp8Scaling::Block128x128 && !force_vec128) {
    const int64_t tiles = q.scales.dim(0), l4 = round_up(nb, 4);
    LASP_CHECK(tiles == (outer_p + kScaleBlock - 1) / kScaleBlock)
        << "gemm_fp8: internal error, 128x128 tiles " << tiles << " for " << outer_p << " rows";
    s.buffer = Tensor::empty({tiles * l4}, DType::F32, dev);
    blk_scales_kernel<<<ceil_div(tiles * l4, 256), 256, 0, stream>>>(
        s.buffer.data<float>(), tiles, l4, nb, q.scales.data<float>());
    s.mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  } else {
    const int src = q.scaling == Fp8Scaling::PerTensor ? 0 : q.scaling == Fp8Scaling::Block1x128 ? 1 : 2;
    s.buffer = Tensor::empty({nb * outer_p}, DType::F32, dev);
    vec128_scales_kernel<<<ceil_div(nb * outer_p, 256), 256, 0, stream>>>(
        s.buffer.data<float>(), outer_p, q.rows(), nb, q.scales.data<float>(), src);
    s.mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  }
  CUDA_CHECK_LAUNCH("gemm_fp8 (scale layout)");
  s.ptr = s.buffer.raw();
  return s;
}

// Exact fallback: fp32 dequantization and the fp32 GEMM (what gemm_fp8_emulated computes).
void gemm_fp8_dequantized(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha,
                          float beta) {
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  const Device dev = c.device();
  Tensor ad = Tensor::empty(a.codes.shape(), DType::F32, dev);
  Tensor bd = Tensor::empty(b.codes.shape(), DType::F32, dev);
  dequantize_fp8_cuda(ad, a);
  dequantize_fp8_cuda(bd, b);
  const Tensor a2 = ad.view({m, k}), b2 = bd.view({n, k});
  if (c.dtype() == DType::F32) {
    gemm(c, a2, false, b2, true, alpha, beta);
    return;
  }
  Tensor t = Tensor::empty({m, n}, DType::F32, dev);
  gemm(t, a2, false, b2, true, alpha, 0.0f);
  add_scaled_bf16_kernel<<<ceil_div(m * n, 256), 256, 0, cuda_stream()>>>(
      static_cast<__nv_bfloat16*>(c.raw()), t.data<float>(), m * n, beta);
  CUDA_CHECK_LAUNCH("gemm_fp8 (fallback epilogue)");
}

}  // namespace

int64_t gemm_fp8_fallback_count() { return g_fallbacks.load(); }
int64_t gemm_fp8_lasp_launches() { return g_lasp_launches.load(); }

// lasp's own kernel (gemm_fp8_sm90.cu) on an aligned problem.
void gemm_fp8_lasp_run(void* c, bool c_f32, int64_t m, int64_t n, int64_t k, const void* a_codes,
                       const QuantizedFp8& a, const void* b_codes, const QuantizedFp8& b,
                       float alpha, float beta, const Fp8KernelConfig& cfg);

void gemm_fp8_cuda(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha,
                   float beta, bool fast_accum, Fp8GemmBackend backend, const Fp8KernelConfig& cfg) {
  check_operand(a, "A");
  check_operand(b, "B");
  const int64_t m = a.rows(), k = a.cols(), n = b.rows();
  // Only an error message builds the description (an ostringstream per call cost host time).
  auto what = [&] { return describe(a, b, c); };
  LASP_CHECK(b.cols() == k) << "gemm_fp8: inner dims differ: " << what();
  LASP_CHECK(c.is_cuda() && c.is_contiguous() && c.ndim() == 2 && c.dim(0) == m && c.dim(1) == n &&
             (c.dtype() == DType::F32 || c.dtype() == DType::BF16))
      << "gemm_fp8: C must be a contiguous bf16/fp32 CUDA tensor [" << m << ", " << n << "]: " << what();
  const bool block = a.scaling != Fp8Scaling::PerTensor || b.scaling != Fp8Scaling::PerTensor;
  if (backend == Fp8GemmBackend::Auto) {
    backend = gemm_fp8_lasp_available() &&
                      fp8_auto_prefers_lasp(n, k, a.scaling, b.scaling, c.dtype() == DType::BF16, beta)
                  ? Fp8GemmBackend::Lasp
                  : Fp8GemmBackend::CublasLt;
  }
  const bool lasp_kernel = backend == Fp8GemmBackend::Lasp;
  LASP_CHECK(lasp_kernel || !(a.format == Fp8Format::E5M2 && b.format == Fp8Format::E5M2))
      << "gemm_fp8: E5M2 x E5M2 is not supported by cuBLASLt (use E4M3 for the non-gradient "
         "operand): "
      << what();
  LASP_CHECK(!(block && fast_accum))
      << "gemm_fp8: fast accumulation is only available with per-tensor scaling: " << what();
  if (m == 0 || n == 0) return;
  if (k == 0) {
    scale_c(c, beta);
    return;
  }
  const Device dev = c.device();
  cudaStream_t stream = cuda_stream();
  // cuBLASLt FP8 needs K-major rows of a multiple of 16 bytes, M and N multiples of 16 and 16-byte
  // aligned pointers. Anything else runs on zero-padded copies: A [mp, kp], B [np, kp] (zeros
  // along K add nothing), C [mp, np] (the padding is dropped). Aligned problems copy nothing.
  const int64_t mp = round_up(m, kFp8Align), np = round_up(n, kFp8Align), kp = round_up(k, kFp8Align);
  auto padded_codes = [&](const QuantizedFp8& q, int64_t rows, int64_t rows_p) {
    if (rows_p == rows && kp == k && aligned16(q.codes.raw())) return q.codes;
    Tensor t = Tensor::empty({rows_p, kp}, DType::U8, dev);
    CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream));
    CUDA_CHECK(cudaMemcpy2DAsync(t.raw(), static_cast<size_t>(kp), q.codes.raw(), static_cast<size_t>(k),
                                 static_cast<size_t>(k), static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream));
    return t;
  };
  const Tensor a_codes = padded_codes(a, m, mp), b_codes = padded_codes(b, n, np);
  PaddedOutput out(c, mp, np, beta != 0.0f);
  if (lasp_kernel) {
    Fp8KernelConfig run_cfg = cfg;
    if (fast_accum) run_cfg.promote_every = static_cast<int>((kp + 127) / 128);
    gemm_fp8_lasp_run(out.run.raw(), c.dtype() == DType::F32, mp, np, kp, a_codes.raw(), a,
                      b_codes.raw(), b, alpha, beta, run_cfg);
    g_lasp_launches.fetch_add(1);
    out.finish();
    return;
  }
  // cuBLASLt's A is our B (outer N), its B is our A (outer mp).
  const bool both_tiles = a.scaling == Fp8Scaling::Block128x128 && b.scaling == Fp8Scaling::Block128x128;
  const OperandScales s_lt_a = prepare_scales(b, np, block, false);
  const OperandScales s_lt_b = prepare_scales(a, mp, block, both_tiles);

  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  bool found = true;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    LtContext& ctx = lt_context(LtUser::Fp8, dev.index);
    LtDescriptors d;
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    const int8_t fast = fast_accum ? 1 : 0;
    const cudaDataType_t t_c = c.dtype() == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
    if (block) {
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                                                  &s_lt_a.mode, sizeof(s_lt_a.mode)));
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                                                  &s_lt_b.mode, sizeof(s_lt_b.mode)));
    }
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                &s_lt_a.ptr, sizeof(s_lt_a.ptr)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                &s_lt_b.ptr, sizeof(s_lt_b.ptr)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, fp8_cuda_type(b.format), kp, np, kp));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, fp8_cuda_type(a.format), kp, mp, kp));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, t_c, np, mp, np));

    const AlgoKey key{dev.index, mp, np, kp, static_cast<int>(b.format), static_cast<int>(a.format),
                      s_lt_a.mode, s_lt_b.mode, static_cast<int>(c.dtype()), beta != 0.0f, fast};
    auto it = g_algos.find(key);
    if (it == g_algos.end()) {
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
      const size_t ws = kLtWorkspaceBytes;
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                        &ws, sizeof(ws)));
      cublasLtMatmulHeuristicResult_t result{};
      int count = 0;
      status = cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1,
                                              &result, &count);
      found = status == CUBLAS_STATUS_SUCCESS && count > 0;
      if (found) it = g_algos.emplace(key, result.algo).first;
    }
    if (found) {
      status = cublasLtMatmul(ctx.handle, d.op, &alpha, b_codes.raw(), d.a,
                              a_codes.raw(), d.b, &beta, out.run.raw(), d.c, out.run.raw(), d.c,
                              &it->second, ctx.workspace, kLtWorkspaceBytes, stream);
    }
  }
  if (!found || status != CUBLAS_STATUS_SUCCESS) {
    const char* why = found ? "cublasLtMatmul failed" : "cuBLASLt found no FP8 algorithm";
    LASP_CHECK(block) << "gemm_fp8: " << why << " (status " << cublasGetStatusString(status)
                      << ") for " << what() << " (cuBLASLt m = " << np << ", n = " << mp << ", k = " << kp
                      << ")";
    g_fallbacks.fetch_add(1);
    LASP_WARN() << "gemm_fp8: " << why << " (status " << cublasGetStatusString(status) << ") for "
                << what() << "; falling back to fp32 dequantize + fp32 GEMM (exact, slow)";
    gemm_fp8_dequantized(c, a, b, alpha, beta);
    return;
  }
  out.finish();
}

}  // namespace lasp
