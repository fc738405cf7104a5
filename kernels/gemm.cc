// CPU GEMM through CBLAS (OpenBLAS). CUDA tensors go to gemm_cuda (gemm.cu).
#include "kernels/gemm.h"

#include <cblas.h>

#include <string>

#include "core/profile.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
void gemm_cuda(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
               float beta);
#endif

void gemm(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
          float beta) {
  ProfileScope profile("gemm");
  LASP_CHECK(a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2)
      << "gemm expects 2-D tensors, got " << a.str() << ", " << b.str() << " -> " << c.str();
  LASP_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous()) << "gemm: operands must be contiguous";
  const int64_t m = trans_a ? a.dim(1) : a.dim(0);
  const int64_t k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t kb = trans_b ? b.dim(1) : b.dim(0);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  LASP_CHECK(k == kb && c.dim(0) == m && c.dim(1) == n)
      << "gemm shape mismatch: op(A) " << m << "x" << k << ", op(B) " << kb << "x" << n << ", C "
      << c.str();
  if (profile_shapes_enabled()) {  // "gemm MxNxK NT bf16->fp32+": T = transposed, + = accumulates into C
    profile.gemm("gemm", m, n, k,
                 std::string(" ") + (trans_a ? "T" : "N") + (trans_b ? "T" : "N") + " " + dtype_name(a.dtype()) +
                     "->" + dtype_name(c.dtype()) + (beta != 0.0f ? "+" : ""));
  }
  check_same_device(a, b, "gemm");
  check_same_device(a, c, "gemm");
  if (a.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return gemm_cuda(c, a, trans_a, b, trans_b, alpha, beta);
#endif
  }
  LASP_CHECK(a.dtype() == b.dtype() && a.dtype() == c.dtype())
      << "CPU gemm needs one dtype, got " << a.str() << ", " << b.str() << ", " << c.str();
  if (m == 0 || n == 0) return;
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  const int lda = static_cast<int>(a.dim(1)), ldb = static_cast<int>(b.dim(1)), ldc = static_cast<int>(n);
  if (a.dtype() == DType::F32) {
    cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a.data<float>(), lda, b.data<float>(), ldb,
                beta, c.data<float>(), ldc);
  } else if (a.dtype() == DType::F64) {
    cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a.data<double>(), lda, b.data<double>(), ldb,
                beta, c.data<double>(), ldc);
  } else {
    LASP_FAIL() << "CPU gemm supports fp32 and fp64, got " << dtype_name(a.dtype());
  }
}

void linear_forward(Tensor& y, const Tensor& x, const Tensor& w) { gemm(y, x, false, w, true); }

void linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w) {
  if (dx.defined()) gemm(dx, dy, false, w, false);
  if (dw.defined()) gemm(dw, dy, true, x, false, 1.0f, 1.0f);
}

}  // namespace lasp
