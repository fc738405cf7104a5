// LM head + cross-entropy (kernels/lm_head.h): the dispatcher and the CPU implementation, with
// FP8 emulated exactly (quantize_fp8 / dequantize_fp8 of kernels/quantize.h, then fp32 GEMMs).
#include "kernels/lm_head.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/dtype.h"
#include "core/profile.h"
#include "kernels/dispatch.h"
#include "kernels/gemm.h"
#include "kernels/quantize.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
double lm_head_cross_entropy_cuda(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                                  const Tensor& targets, float loss_scale, int64_t chunk);
double lm_head_cross_entropy_fp8_cuda(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                                      const Tensor& targets, float loss_scale, int64_t chunk);
#endif

namespace {

void check_cpu_operand(const Tensor& t, const char* what) {
  LASP_CHECK(t.defined()) << what << ": undefined tensor";
  LASP_CHECK(t.device().is_cpu()) << what << ": expected a CPU tensor here, got " << t.str();
  LASP_CHECK(t.is_contiguous()) << what << ": expected a contiguous tensor, got " << t.str();
}

// The FP8 emulation's operand: t quantized per tensor in `format` and dequantized (fp32).
Tensor fp8_roundtrip(const Tensor& t, Fp8Format format) {
  return dequantize_fp8(quantize_fp8(t, format, Fp8Scaling::PerTensor));
}

// fp32 t rounded to bf16 values in place (RNE): the FP8 head keeps logits and dlogits in bf16.
void round_to_bf16(Tensor& t) {
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = bf16_to_float(float_to_bf16(p[i]));
}

}  // namespace

LmHeadPrecision lm_head_precision_from_name(const std::string& name) {
  if (name == "bf16") return LmHeadPrecision::Full;
  if (name == "fp8") return LmHeadPrecision::Fp8;
  LASP_FAIL() << "precision.lm_head: expected bf16 | fp8, got '" << name
              << "' (fp4 is for the attention and MLP projections only)";
  return LmHeadPrecision::Full;
}

double lm_head_cross_entropy(Tensor& d_h, Tensor& d_w, const Tensor& h, const Tensor& w,
                             const Tensor& targets, float loss_scale, int64_t chunk,
                             LmHeadPrecision precision) {
  LASP_PROFILE_SCOPE("lm_head_cross_entropy");
  const bool fp8 = precision == LmHeadPrecision::Fp8;
  if (h.defined() && h.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return fp8 ? lm_head_cross_entropy_fp8_cuda(d_h, d_w, h, w, targets, loss_scale, chunk)
               : lm_head_cross_entropy_cuda(d_h, d_w, h, w, targets, loss_scale, chunk);
#else
    LASP_FAIL() << "lm_head_cross_entropy: this build of lasp has no CUDA support";
#endif
  }
  check_cpu_operand(h, "lm_head_cross_entropy: h");
  check_cpu_operand(w, "lm_head_cross_entropy: w");
  check_cpu_operand(targets, "lm_head_cross_entropy: targets");
  const int64_t N = h.dim(0), C = h.dim(1), V = w.dim(0);
  check_tensor(w, "lm_head_cross_entropy: w", h.dtype(), {V, C});
  check_tensor(targets, "lm_head_cross_entropy: targets", DType::I32, {N});
  if (d_h.defined()) check_tensor(d_h, "lm_head_cross_entropy: d_h", h.dtype(), {N, C});
  if (d_w.defined()) check_tensor(d_w, "lm_head_cross_entropy: d_w", h.dtype(), {V, C});
  LASP_CHECK(chunk > 0) << "lm_head_cross_entropy: chunk must be positive";
  LASP_CHECK(!fp8 || h.dtype() == DType::F32)
      << "lm_head_cross_entropy: precision.lm_head = fp8 is emulated on fp32 CPU tensors, got "
      << h.str();
  // FP8: the GEMMs see the quantized h and W (E4M3, one scale per tensor) and, below, the
  // quantized dlogits of each chunk (E5M2, one scale per chunk); fp32 products and sums. The
  // logits and the dlogits are rounded to bf16 (what the CUDA path stores) before they are used.
  const Tensor h_op = fp8 ? fp8_roundtrip(h, Fp8Format::E4M3) : h;
  const Tensor w_op = fp8 ? fp8_roundtrip(w, Fp8Format::E4M3) : w;
  const int32_t* tg = targets.data<int32_t>();
  double total = 0;
  Tensor logits = Tensor::empty({std::min(chunk, std::max<int64_t>(N, 1)), V}, h.dtype());
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    Tensor hc = h_op.slice(0, r0, r0 + rows);
    Tensor lc = logits.slice(0, 0, rows);
    gemm(lc, hc, false, w_op, true);  // logits = h W^T
    if (fp8) round_to_bf16(lc);
    LASP_DISPATCH_CPU_FLOAT(h.dtype(), "lm_head_cross_entropy", T, {
      T* lp = lc.data<T>();
      for (int64_t r = 0; r < rows; ++r) {
        T* row = lp + r * V;
        const int32_t t = tg[r0 + r];
        if (t < 0) {  // ignored position: no loss, no gradient
          std::fill(row, row + V, T(0));
          continue;
        }
        LASP_CHECK(t < V) << "lm_head_cross_entropy: target " << t << " at row " << r0 + r
                          << " is outside the vocabulary [0, " << V << ")";
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < V; ++j) mx = std::max(mx, row[j]);
        double z = 0;
        for (int64_t j = 0; j < V; ++j) z += std::exp(double(row[j] - mx));
        const double lse = double(mx) + std::log(z);
        total += lse - row[t];
        // dlogits = softmax - onehot, scaled; reuse the logits buffer.
        for (int64_t j = 0; j < V; ++j) row[j] = T(std::exp(double(row[j]) - lse) * loss_scale);
        row[t] -= T(loss_scale);
      }
    });
    if (fp8) round_to_bf16(lc);
    const Tensor dlc = fp8 ? fp8_roundtrip(lc, Fp8Format::E5M2) : lc;
    if (d_h.defined()) {
      Tensor dhc = d_h.slice(0, r0, r0 + rows);
      gemm(dhc, dlc, false, w_op, false);  // d_h = dlogits W
    }
    if (d_w.defined()) gemm(d_w, dlc, true, hc, false, 1.0f, 1.0f);  // d_w += dlogits^T h
  }
  return total;
}

}  // namespace lasp
