// CPU GEMM through CBLAS (OpenBLAS). CUDA tensors go to gemm_cuda (gemm.cu).
#include "kernels/gemm.h"

#include <cblas.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/profile.h"

namespace lasp {

namespace {
std::atomic<int> g_tuning{-1};  // -1: not read from the environment yet
std::mutex g_tune_mu;
GemmTuneStats g_tune_stats;
}  // namespace

bool gemm_tuning() {
  int t = g_tuning.load();
  if (t < 0) {
    const char* env = std::getenv("LASP_GEMM_TUNE");
    const bool off = env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0);
    LASP_CHECK(!env || off || std::strcmp(env, "1") == 0 || std::strcmp(env, "on") == 0)
        << "LASP_GEMM_TUNE=" << env << ": expected 0/off or 1/on";
    t = off ? 0 : 1;
    int expected = -1;
    g_tuning.compare_exchange_strong(expected, t);
    t = g_tuning.load();
  }
  return t == 1;
}

void set_gemm_tuning(bool on) { g_tuning.store(on ? 1 : 0); }

GemmTuneStats gemm_tune_stats() {
  std::lock_guard<std::mutex> lock(g_tune_mu);
  return g_tune_stats;
}

void gemm_tuning_note(float first_ms, float chosen_ms) {
  if (!std::isfinite(first_ms) || !std::isfinite(chosen_ms)) return;
  std::lock_guard<std::mutex> lock(g_tune_mu);
  g_tune_stats.shapes += 1;
  g_tune_stats.changed += chosen_ms < first_ms ? 1 : 0;
  g_tune_stats.first_ms += first_ms;
  g_tune_stats.chosen_ms += chosen_ms;
}

#ifdef LASP_HAVE_CUDA
void gemm_cuda(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
               float beta);
#endif

void gemm(Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
          float beta) {
  LASP_PROFILE_SCOPE("gemm");
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
