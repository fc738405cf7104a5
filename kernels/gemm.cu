// CUDA GEMM through cuBLASLt (called by gemm() in gemm.cc for CUDA tensors).
//
// Row-major C[m, n] = alpha op(A) op(B) + beta C. cuBLASLt is column-major, and a row-major
// matrix read column-major is its transpose, so we ask cuBLASLt for
//   C^T[n, m] = op(B)^T[n, k] op(A)^T[k, m]
// with B's buffer as the first operand and A's as the second; the trans flags carry over as is.
// Supported: A, B bf16 with C bf16 or fp32; or A, B, C fp32. Accumulation is always fp32
// (CUBLAS_COMPUTE_32F: plain fp32 for fp32 operands, no TF32).
// One cuBLASLt handle and one 32 MiB workspace per device (kernels/cublaslt_util.cuh, defined
// here), created on first use; the chosen algorithm is cached per (shape, transposes, dtypes,
// alignment, beta != 0, where alpha and beta live). gemm_cuda_device_alpha reads alpha and beta
// from device memory (cuBLASLt's device pointer mode), for scales that never leave the GPU.
#include <cuda_bf16.h>

#include <map>
#include <mutex>
#include <tuple>

#include "core/tensor.h"
#include "kernels/cublaslt_util.cuh"
#include "kernels/gemm.h"

namespace lasp {
namespace {

using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, int, int, int, int, int, int>;

constexpr int kMaxDevices = 64;
std::mutex g_mu;
std::map<AlgoKey, cublasLtMatmulAlgo_t> g_algos;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F32: return CUDA_R_32F;
    default: LASP_FAIL() << "gemm_cuda: unsupported dtype " << dtype_name(t);
  }
  return CUDA_R_32F;
}

// Largest power of two (<= 256) dividing the address: cuBLASLt picks kernels by alignment.
int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && (a % al) != 0) al /= 2;
  return al;
}

__global__ void scale_kernel_f32(float* c, int64_t n, float beta) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
}
__global__ void scale_kernel_bf16(__nv_bfloat16* c, int64_t n, float beta) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) c[i] = __float2bfloat16(beta == 0.0f ? 0.0f : beta * __bfloat162float(c[i]));
}

}  // namespace

LtContext& lt_context(LtUser user, int dev) {
  static LtContext contexts[static_cast<int>(LtUser::Count)][kMaxDevices];
  LASP_CHECK(dev >= 0 && dev < kMaxDevices) << "cuBLASLt: device index " << dev << " out of range";
  LtContext& c = contexts[static_cast<int>(user)][dev];
  if (!c.handle) {
    CUBLAS_CHECK(cublasLtCreate(&c.handle));
    CUDA_CHECK(cudaMalloc(&c.workspace, kLtWorkspaceBytes));
  }
  return c;
}

namespace {

// C = alpha op(A) op(B) + beta C with alpha, beta host values or (device_scalars) one device
// buffer {alpha, beta}. beta_nonzero: whether C is read (host: beta != 0).
void gemm_lt(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
             float beta, const float* device_scalars, bool beta_nonzero) {
  const DType ab = a.dtype();
  LASP_CHECK(b.dtype() == ab) << "gemm_cuda: A and B must share a dtype, got " << a.str() << " and "
                              << b.str();
  const bool ok = (ab == DType::BF16 && (c.dtype() == DType::BF16 || c.dtype() == DType::F32)) ||
                  (ab == DType::F32 && c.dtype() == DType::F32);
  LASP_CHECK(ok) << "gemm_cuda supports bf16 x bf16 -> bf16/fp32 and fp32 x fp32 -> fp32, got "
                 << a.str() << " x " << b.str() << " -> " << c.str();
  const int64_t m = trans_a ? a.dim(1) : a.dim(0);
  const int64_t k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  if (m == 0 || n == 0) return;
  cudaStream_t stream = cuda_stream();
  if (k == 0) {  // C = beta C: cuBLASLt does not take k = 0
    LASP_CHECK(device_scalars == nullptr) << "gemm_cuda_device_alpha: k = 0 is not supported";
    const int64_t cn = c.numel();
    const int threads = 256;
    const int blocks = ceil_div(cn, threads);
    if (c.dtype() == DType::F32) {
      scale_kernel_f32<<<blocks, threads, 0, stream>>>(c.data<float>(), cn, beta);
    } else {
      scale_kernel_bf16<<<blocks, threads, 0, stream>>>(
          static_cast<__nv_bfloat16*>(c.raw()), cn, beta);
    }
    CUDA_CHECK_LAUNCH("gemm_cuda (k = 0)");
    return;
  }

  const int dev = a.device().index;
  std::lock_guard<std::mutex> lock(g_mu);
  LtContext& ctx = lt_context(LtUser::Gemm, dev);

  // cuBLASLt's first operand (d.a, "X") is B's buffer (column-major: b.dim(1) x b.dim(0)), its
  // second (d.b, "Y") is A's buffer.
  const cublasOperation_t op_x = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_y = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cudaDataType_t t_ab = cuda_type(ab), t_c = cuda_type(c.dtype());
  LtDescriptors d;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_x, sizeof(op_x)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_y, sizeof(op_y)));
  if (device_scalars) {
    const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
  }
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, t_ab, b.dim(1), b.dim(0), b.dim(1)));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, t_ab, a.dim(1), a.dim(0), a.dim(1)));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, t_c, n, m, n));

  const int al_x = alignment_of(b.raw()), al_y = alignment_of(a.raw()), al_c = alignment_of(c.raw());
  const AlgoKey key{dev, m, n, k, trans_a, trans_b, static_cast<int>(ab),
                    static_cast<int>(c.dtype()), al_x, al_y, al_c, beta_nonzero, device_scalars != nullptr};
  auto it = g_algos.find(key);
  if (it == g_algos.end()) {
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    const size_t ws = kLtWorkspaceBytes;
    const uint32_t ax = al_x, ay = al_y, ac = al_c;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &ax, sizeof(ax)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ay, sizeof(ay)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1,
                                                &result, &found));
    LASP_CHECK(found > 0) << "gemm_cuda: cuBLASLt found no algorithm for " << a.str()
                          << (trans_a ? "^T" : "") << " x " << b.str() << (trans_b ? "^T" : "")
                          << " -> " << c.str();
    it = g_algos.emplace(key, result.algo).first;
  }
  const void* pa = device_scalars ? static_cast<const void*>(device_scalars) : &alpha;
  const void* pb = device_scalars ? static_cast<const void*>(device_scalars + 1) : &beta;
  CUBLAS_CHECK(cublasLtMatmul(ctx.handle, d.op, pa, b.raw(), d.a, a.raw(), d.b, pb, c.raw(), d.c, c.raw(),
                              d.c, &it->second, ctx.workspace, kLtWorkspaceBytes, stream));
}

}  // namespace

void gemm_cuda(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
               float beta) {
  gemm_lt(c, a, trans_a, b, trans_b, alpha, beta, nullptr, beta != 0.0f);
}

void gemm_cuda_device_alpha(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                            const Tensor& alpha_beta, bool beta_nonzero) {
  LASP_CHECK(alpha_beta.is_cuda() && alpha_beta.dtype() == DType::F32 && alpha_beta.numel() == 2 &&
             alpha_beta.is_contiguous() && alpha_beta.device() == c.device())
      << "gemm_cuda_device_alpha: alpha_beta must be an fp32 [2] tensor on " << c.str() << "'s device, got "
      << alpha_beta.str();
  gemm_lt(c, a, trans_a, b, trans_b, 0.0f, 0.0f, alpha_beta.data<float>(), beta_nonzero);
}

}  // namespace lasp
