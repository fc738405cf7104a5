// Low-precision GEMM benchmark (see bench_lowp.h). Inputs are random bf16 (one random 16 Mi
// element block tiled over each tensor: never zeros, which run faster than real data).
#include "launch/bench_lowp.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/log.h"
#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/gemm_fp4.h"
#include "kernels/gemm_fp8.h"
#include "launch/bench_util.h"

#ifdef LASP_HAVE_CUDA
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "kernels/cuda_utils.cuh"  // CUBLAS_CHECK
#include "kernels/quantize_cuda.h"
#endif

namespace lasp {

#ifndef LASP_HAVE_CUDA

int bench_lowp_main(int, char**) {
  std::fprintf(
      stderr,
      "lasp bench lowp: this build has no CUDA backend (configure with -DLASP_CUDA=ON on a "
      "machine with nvcc); FP8 GEMMs need a Hopper GPU\n");
  return 2;
}

#else

namespace {

constexpr double kBf16FloorFlops = 790e12;  // dense bf16 rate (H200, measured)
constexpr double kFp8FloorFlops = 1450e12;  // dense fp8 rate (H200)

#define LOWP_CUDA(expr)                                                       \
  do {                                                                        \
    cudaError_t e_ = (expr);                                                  \
    LASP_CHECK(e_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

struct Options {
  int iters = 20, warmup = 5;
  bool quick = false;
  bool algos = false;            // --algos: time every cuBLASLt candidate instead of the tables
  bool quantizers_only = false;  // --quantizers: only the FP8 block quantizer table
  bool kernel_only = false;      // --kernel: only the lasp FP8 kernel table
  bool latency_only = false;     // --latency: only the fixed-cost table
  bool sustained_only = false;   // --sustained: only the sustained (power-capped) table
  bool wgrad_only = false;       // --wgrad: only the weight-gradient table
  std::string shape;             // --shape MxNxK: only that shape (with --kernel)
};

double time_ms(const std::function<void()>& fn, const Options& opt) {
  return median_event_ms(fn, opt.iters, opt.warmup);
}

Tensor random_bf16(const Shape& shape, double stddev, uint32_t seed) {
  return random_bf16_cuda(shape, stddev, seed);
}

struct Shape3 {
  int64_t m, n, k;
  const char* what;
};

// "MxNxK", the tables' shape column.
std::string shape_str(const Shape3& g) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%ldx%ldx%ld", static_cast<long>(g.m), static_cast<long>(g.n),
                static_cast<long>(g.k));
  return buf;
}

// The FP4 GEMM (gemm_fp4) on the same shapes, MXFP4 and NVFP4 operands quantized beforehand
// (RTN), against the bf16 GEMM: native FP4 tensor cores where the GPU has them, else the exact
// emulation (which the table names).
// The FP8 quantizers the projections run, against the HBM floor (bytes read + written once at
// 4.3 TB/s): 1x128 blocks of x (forward), of dy and dy^T in one pass (backward) and 128x128 blocks
// of a weight and its transpose, each next to the composition it replaced (transpose_pad_cuda,
// then a quantizer per output).
void run_quantizers(const Options& opt) {
  constexpr double kHbm = 4.3e12;
  std::printf(
      "\nFP8 block quantizers vs the HBM floor (bytes in + out once at %.1f TB/s); alone = one "
      "call on an "
      "idle GPU (with its host time and output allocation), b2b = 10 queued back to back\n",
      kHbm / 1e12);
  std::printf("%-46s %-22s %9s %9s %9s %7s\n", "op", "shape", "alone_ms", "b2b_ms", "floor_ms",
              "b2b/fl");
  struct Q {
    int64_t rows, cols;
    DType dtype;
  };
  const Fp8Scaling b1 = Fp8Scaling::Block1x128, b2 = Fp8Scaling::Block128x128;
  const Fp8Format e4 = Fp8Format::E4M3;
  auto row = [&](const char* op, const Q& q, double out_bytes_per_elem,
                 const std::function<void()>& fn) {
    const double n = static_cast<double>(q.rows) * q.cols;
    const double bytes = n * dtype_size(q.dtype) + n * out_bytes_per_elem;
    const double ms = time_ms(fn, opt), floor_ms = bytes / kHbm * 1e3;
    const double b2b = median_event_ms_interleaved({fn}, opt.iters, opt.warmup, 10)[0];
    char shape[64];
    std::snprintf(shape, sizeof shape, "%ldx%ld %s", static_cast<long>(q.rows),
                  static_cast<long>(q.cols), dtype_name(q.dtype));
    std::printf("%-46s %-22s %9.3f %9.3f %9.3f %7.2f\n", op, shape, ms, b2b, floor_ms,
                b2b / floor_ms);
    std::fflush(stdout);
  };
  // What the block-scaled projections ran before the one-pass quantizer: x's codes, x^T
  // materialised, x^T's codes.
  auto composition = [&](const Tensor& x, Fp8Scaling scaling) {
    (void)quantize_fp8_cuda(x, e4, scaling);
    Tensor t = Tensor::empty({x.dim(1), x.dim(0)}, x.dtype(), cuda());
    transpose_pad_cuda(t, x);
    (void)quantize_fp8_cuda(t, e4, scaling);
  };
  for (const Q& q : {Q{16384, 2048, DType::BF16}, Q{16384, 8192, DType::BF16}}) {
    Tensor x = random_bf16({q.rows, q.cols}, 1.0, 901);
    row("1x128 rows (forward x)", q, 1.0, [&] { (void)quantize_fp8_cuda(x, e4, b1); });
    row("1x128 rows + cols, one pass (dy)", q, 2.0,
        [&] { (void)quantize_fp8_block_rows_cols_cuda(x, e4, b1, true, true); });
    row("  composition: rows, transpose, cols", q, 2.0, [&] { composition(x, b1); });
    row("1x128 cols (backward x^T)", q, 1.0,
        [&] { (void)quantize_fp8_block_rows_cols_cuda(x, e4, b1, false, true); });
    row("per tensor rows (quantize_fp8_cuda)", q, 1.0,
        [&] { (void)quantize_fp8_cuda(x, e4, Fp8Scaling::PerTensor); });
    // What the per-tensor projections run: the amax pass, then one pass writing the codes.
    Tensor amax = Tensor::empty({1}, DType::I32, cuda());
    Fp8DeviceScale sc;
    sc.amax = amax;
    row("per tensor rows, projection path", q, 1.0, [&] {
      amax_into_cuda(amax, 0, x, true);
      (void)quantize_fp8_rows_cols_cuda(x, e4, sc, true, false);
    });
    row("per tensor rows + cols, projection path", q, 2.0, [&] {
      amax_into_cuda(amax, 0, x, true);
      (void)quantize_fp8_rows_cols_cuda(x, e4, sc, true, true);
    });
  }
  {
    const Q q{8192, 2048, DType::F32};
    Tensor w = random_bf16({q.rows, q.cols}, 0.02, 902).to(cpu()).to(DType::F32).to(cuda());
    row("128x128 rows + cols, one pass (weight)", q, 2.0,
        [&] { (void)quantize_fp8_block_rows_cols_cuda(w, e4, b2, true, true); });
    row("  composition: rows, fp32 transpose, cols", q, 2.0, [&] { composition(w, b2); });
  }
}

void run_fp4(const Options& opt, const std::vector<Shape3>& shapes) {
  const bool native =
      fp4_native_supported(cuda()) && fp4_gemm_path_from_env() != Fp4GemmPath::Emulated;
  std::printf("\nFP4 GEMM, %s; MXFP4 = E2M1 x E8M0 per 32, NVFP4 = E2M1 x E4M3 per 16 x fp32\n",
              native ? "native FP4 tensor cores (cuBLASLt block-scaled)"
                     : "EMULATED (no FP4 tensor cores: exact dequantize to bf16 + bf16 GEMM)");
  std::printf("%-26s %-18s %8s %9s %9s %8s %8s %9s %9s\n", "op", "MxNxK", "bf16_ms", "mxfp4_ms",
              "nvfp4_ms", "mx_TF", "nv_TF", "mx_speed", "nv_speed");
  const int64_t fallbacks_before = gemm_fp4_fallback_count();
  uint32_t seed = 101;
  for (const Shape3& g : shapes) {
    Tensor x = random_bf16({g.m, g.k}, 1.0, seed++), w = random_bf16({g.n, g.k}, 0.02, seed++);
    Tensor y = Tensor::empty({g.m, g.n}, DType::BF16, cuda());
    const double flops = 2.0 * g.m * g.n * g.k;
    const double bf16_ms = time_ms([&] { gemm(y, x, false, w, true); }, opt);
    double ms[2];
    for (int f = 0; f < 2; ++f) {
      Fp4Options o;
      o.format = f == 0 ? Fp4Format::MXFP4 : Fp4Format::NVFP4;
      const QuantizedFp4 xq = quantize_fp4_cuda(x, o), wq = quantize_fp4_cuda(w, o);
      ms[f] = time_ms([&] { gemm_fp4(y, xq, wq); }, opt);
    }
    const std::string shape = shape_str(g);
    std::printf("%-26s %-18s %8.3f %9.3f %9.3f %8.0f %8.0f %9.2f %9.2f\n", g.what, shape.c_str(),
                bf16_ms, ms[0], ms[1], flops / (ms[0] * 1e9), flops / (ms[1] * 1e9),
                bf16_ms / ms[0], bf16_ms / ms[1]);
    std::fflush(stdout);
  }
  std::printf("columns: *_speed = bf16_ms / fp4_ms (the GEMM alone; quantization not included)\n");
  const int64_t fallbacks = gemm_fp4_fallback_count() - fallbacks_before;
  if (fallbacks > 0) {
    std::printf(
        "WARNING: %ld native FP4 GEMMs fell back to the emulation (cuBLASLt refused them)\n",
        static_cast<long>(fallbacks));
  }
}

// ---- accuracy of the FP8 accumulation modes ---------------------------------------------------
// The full-size GEMM (fp32 out) on the GPU, checked on `rows` sampled rows against float64 dot
// products on the host: of the dequantized FP8 operands (what an exact FP8 GEMM computes: the
// error of the accumulation alone) and of the bf16 operands (the FP8 quantization's own error,
// for scale). Two inputs: zero-mean x ~ N(0, 1), and all-positive x = |N(0, 1)| with
// w = |N(0, 0.02)|, where every partial sum grows with k (the hard case for an accumulator that
// keeps few bits). Errors: ||y - ref|| / ||ref|| over the sampled rows.
struct AccuracyRow {
  double quant = 0, bf16 = 0, fp8 = 0, fast = 0, lasp = 0, lasp4 = 0;
};

// A bf16 CUDA tensor with N(0, stddev) values, or |N(0, stddev)| when `positive`.
Tensor host_random_bf16(const Shape& shape, double stddev, bool positive, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, stddev);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& e : v) e = positive ? std::fabs(nd(gen)) : nd(gen);
  return Tensor::from_values(v, shape, DType::BF16).to(cuda());
}

std::vector<double> dequantized_rows(const QuantizedFp8& q, const std::vector<int64_t>& rows) {
  LASP_CHECK(q.scaling == Fp8Scaling::PerTensor) << "bench lowp accuracy: per-tensor operands only";
  const std::vector<double> codes = q.codes.to_vector();
  const double s = q.scales.to_vector()[0];
  const int64_t k = q.cols();
  std::vector<double> out;
  out.reserve(rows.size() * static_cast<size_t>(k));
  for (int64_t r : rows)
    for (int64_t j = 0; j < k; ++j)
      out.push_back(
          static_cast<double>(fp8_decode(static_cast<uint8_t>(codes[r * k + j]), q.format)) * s);
  return out;
}

// ||y[rows] - a b^T|| / ||a b^T||, a = the sampled rows [R, K], b [N, K] (row-major doubles).
double rel_error(const std::vector<double>& y_all, int64_t n, const std::vector<int64_t>& rows,
                 const std::vector<double>& a, const std::vector<double>& b, int64_t k) {
  double num = 0, den = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const double* ai = a.data() + i * k;
    for (int64_t j = 0; j < n; ++j) {
      const double* bj = b.data() + j * k;
      double ref = 0;
      for (int64_t t = 0; t < k; ++t) ref += ai[t] * bj[t];
      const double d = y_all[rows[i] * n + j] - ref;
      num += d * d;
      den += ref * ref;
    }
  }
  return std::sqrt(num / den);
}

void run_accuracy(const std::vector<Shape3>& shapes) {
  std::printf(
      "\nFP8 accumulation accuracy: ||y - ref|| / ||ref|| on 32 sampled rows, fp32 out; quant = "
      "exact FP8 product vs exact bf16 product (the quantization's error), the others vs the exact "
      "product of their own operands (the GEMM's summation error)\n");
  const bool lasp = gemm_fp8_lasp_available();
  std::printf("%-26s %-18s %-9s %10s %10s %10s %10s %9s %10s %10s\n", "op", "MxNxK", "inputs",
              "quant", "bf16_gemm", "fp8", "fp8_fast", "fast/fp8", "lasp", "lasp_p4");
  uint32_t seed = 501;
  for (const Shape3& g : shapes) {
    for (int positive = 0; positive < 2; ++positive) {
      Tensor x = host_random_bf16({g.m, g.k}, 1.0, positive, seed++);
      Tensor w = host_random_bf16({g.n, g.k}, 0.02, positive, seed++);
      std::vector<int64_t> rows;
      for (int64_t i = 0; i < 32; ++i)
        rows.push_back(i * (g.m / 32) + (i * 7) % std::max<int64_t>(1, g.m / 32));
      const std::vector<double> xb_all = x.to_vector(), wb = w.to_vector();
      std::vector<double> xb;
      for (int64_t r : rows)
        xb.insert(xb.end(), xb_all.begin() + r * g.k, xb_all.begin() + (r + 1) * g.k);
      const QuantizedFp8 xq = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
      const QuantizedFp8 wq = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::PerTensor);
      const std::vector<int64_t> all_w = [&] {
        std::vector<int64_t> v(static_cast<size_t>(g.n));
        for (int64_t j = 0; j < g.n; ++j) v[j] = j;
        return v;
      }();
      const std::vector<double> xd = dequantized_rows(xq, rows), wd = dequantized_rows(wq, all_w);
      Tensor y = Tensor::empty({g.m, g.n}, DType::F32, cuda());
      AccuracyRow e;
      gemm(y, x, false, w, true);
      e.bf16 = rel_error(y.to_vector(), g.n, rows, xb, wb, g.k);
      const Fp8GemmBackend lt = Fp8GemmBackend::CublasLt;
      gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, lt);
      const std::vector<double> y_fp8 = y.to_vector();
      e.fp8 = rel_error(y_fp8, g.n, rows, xd, wd, g.k);
      gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, true, lt);
      e.fast = rel_error(y.to_vector(), g.n, rows, xd, wd, g.k);
      if (lasp) {  // lasp's kernel promoting every 128 and every 512 of K
        gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, Fp8GemmBackend::Lasp, {0, 1});
        e.lasp = rel_error(y.to_vector(), g.n, rows, xd, wd, g.k);
        gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, Fp8GemmBackend::Lasp, {0, 4});
        e.lasp4 = rel_error(y.to_vector(), g.n, rows, xd, wd, g.k);
      }
      // The quantization's error: the exact FP8 product (here the fp8 GEMM's output, whose own
      // error is orders smaller) against the exact bf16 product.
      e.quant = rel_error(y_fp8, g.n, rows, xb, wb, g.k);
      const std::string shape = shape_str(g);
      std::printf("%-26s %-18s %-9s %10.2e %10.2e %10.2e %10.2e %9.1f %10.2e %10.2e\n", g.what,
                  shape.c_str(), positive ? "positive" : "zero-mean", e.quant, e.bf16, e.fp8,
                  e.fast, e.fast / e.fp8, e.lasp, e.lasp4);
      std::fflush(stdout);
    }
  }
}

// ---- --algos: every candidate cuBLASLt's heuristic offers, timed ------------------------------
// For one problem (the row-major y = x W^T of the tables, laid out as gemm / gemm_fp8 lay it
// out) the heuristic is asked for up to 64 algorithms; each is timed in `iters` interleaved
// rounds of 10 back-to-back runs (median over rounds of the per-run time), so clock drift hits
// every candidate alike. Rank 0 is the one gemm / gemm_fp8 use.
struct LtProblem {
  const char* name;
  cudaDataType_t ta, tb;  // cuBLASLt's A (our W, [N, K]) and B (our x, [M, K])
  bool fast;
  // The block-scaled weight gradient: both operands 1x128 (VEC128, factors all 1), fp32 C,
  // beta = 1 — what gemm_fp8 asks cuBLASLt for dW += dy^T x under fp8_scaling: block.
  bool block_wgrad = false;
};

std::string algo_config(const cublasLtMatmulAlgo_t& algo) {
  // Ask for the attribute's size first (buffer 0 bytes), then read it at that size.
  auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr) -> long {
    size_t size = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, nullptr, 0, &size);
    uint64_t v = 0;
    if (size == 0 || size > sizeof(v) ||
        cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, size, &size) != CUBLAS_STATUS_SUCCESS)
      return -1;
    return static_cast<long>(v);  // little endian: the low `size` bytes of v hold the value
  };
  char buf[160];
  std::snprintf(
      buf, sizeof buf,
      "id %ld tile %ld stages %ld splitk %ld swizzle %ld cluster %ld inner %ld custom %ld",
      get(CUBLASLT_ALGO_CONFIG_ID), get(CUBLASLT_ALGO_CONFIG_TILE_ID),
      get(CUBLASLT_ALGO_CONFIG_STAGES_ID), get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
      get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING), get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
      get(CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID), get(CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION));
  return buf;
}

void survey_problem(const Options& opt, cublasLtHandle_t handle, void* workspace, size_t ws_bytes,
                    const Shape3& g, const LtProblem& pr, const void* a, const void* b, void* c,
                    const float* scale) {
  cudaStream_t stream = static_cast<cudaStream_t>(current_stream().handle);
  const bool fp8 = pr.ta != CUDA_R_16BF;
  cublasLtMatmulDesc_t op;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  // VEC128 factors (outer-major, one per row and 128 of K), all 1: the timing does not depend on them.
  Tensor a_factors, b_factors;
  const void* a_scale = scale;
  const void* b_scale = scale;
  if (pr.block_wgrad) {
    const int64_t nb = (g.k + 127) / 128;
    a_factors = Tensor::full({nb * g.n}, 1.0, DType::F32, cuda());
    b_factors = Tensor::full({nb * g.m}, 1.0, DType::F32, cuda());
    a_scale = a_factors.raw();
    b_scale = b_factors.raw();
    const cublasLtMatmulMatrixScale_t vec = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &vec, sizeof(vec)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, sizeof(vec)));
  }
  if (fp8) {
    const int8_t fast = pr.fast ? 1 : 0;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale,
                                                sizeof(a_scale)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale,
                                                sizeof(b_scale)));
  }
  cublasLtMatrixLayout_t la, lb, lc;
  const cudaDataType_t tc = pr.block_wgrad ? CUDA_R_32F : CUDA_R_16BF;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, pr.ta, g.k, g.n, g.k));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, pr.tb, g.k, g.m, g.k));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, tc, g.n, g.m, g.n));
  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws_bytes, sizeof(ws_bytes)));
  std::vector<cublasLtMatmulHeuristicResult_t> res(64);
  int count = 0;
  CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, op, la, lb, lc, lc, pref,
                                              static_cast<int>(res.size()), res.data(), &count));
  res.resize(static_cast<size_t>(count));
  const float alpha = 1.0f, beta = pr.block_wgrad ? 1.0f : 0.0f;
  auto run_algo = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(handle, op, &alpha, a, la, b, lb, &beta, c, lc, c, lc, &algo, workspace,
                          ws_bytes, stream);
  };
  std::vector<bool> ok(res.size(), true);
  for (size_t i = 0; i < res.size(); ++i) {  // warm up; drop candidates that fail to launch
    for (int w = 0; w < 3 && ok[i]; ++w) ok[i] = run_algo(res[i].algo) == CUBLAS_STATUS_SUCCESS;
  }
  LOWP_CUDA(cudaStreamSynchronize(stream));
  constexpr int kRuns = 10;
  std::vector<std::vector<double> > t(res.size());
  cudaEvent_t start, stop;
  LOWP_CUDA(cudaEventCreate(&start));
  LOWP_CUDA(cudaEventCreate(&stop));
  for (int round = 0; round < opt.iters; ++round) {
    for (size_t i = 0; i < res.size(); ++i) {
      if (!ok[i]) continue;
      LOWP_CUDA(cudaEventRecord(start, stream));
      for (int r = 0; r < kRuns; ++r) run_algo(res[i].algo);
      LOWP_CUDA(cudaEventRecord(stop, stream));
      LOWP_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      LOWP_CUDA(cudaEventElapsedTime(&ms, start, stop));
      t[i].push_back(ms / kRuns);
    }
  }
  LOWP_CUDA(cudaEventDestroy(start));
  LOWP_CUDA(cudaEventDestroy(stop));
  const double flops = 2.0 * g.m * g.n * g.k;
  double first = 0.0;
  std::printf("\n%s %ldx%ldx%ld: %d candidates\n", pr.name, static_cast<long>(g.m),
              static_cast<long>(g.n), static_cast<long>(g.k), count);
  std::printf("%4s %8s %8s %8s  %s\n", "rank", "ms", "TFLOP/s", "vs_first", "config");
  for (size_t i = 0; i < res.size(); ++i) {
    if (!ok[i]) {
      std::printf("%4zu %8s %8s %8s  %s (launch failed)\n", i, "-", "-", "-",
                  algo_config(res[i].algo).c_str());
      continue;
    }
    std::sort(t[i].begin(), t[i].end());
    const double ms = t[i][t[i].size() / 2];
    if (i == 0) first = ms;
    std::printf("%4zu %8.4f %8.0f %8.3f  %s ws %zu\n", i, ms, flops / (ms * 1e9), first / ms,
                algo_config(res[i].algo).c_str(), res[i].workspaceSize);
  }
  std::fflush(stdout);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatmulDescDestroy(op);
}

// The --algos surveys' cuBLASLt handle and 32 MiB workspace (gemm_fp8's size).
struct LtSurvey {
  cublasLtHandle_t handle = nullptr;
  size_t ws_bytes = 32u << 20;
  void* workspace = nullptr;
  LtSurvey() {
    CUBLAS_CHECK(cublasLtCreate(&handle));
    LOWP_CUDA(cudaMalloc(&workspace, ws_bytes));
  }
  ~LtSurvey() {
    cudaFree(workspace);
    cublasLtDestroy(handle);
  }
  LtSurvey(const LtSurvey&) = delete;
  LtSurvey& operator=(const LtSurvey&) = delete;
};

// --algos --wgrad: every candidate of cuBLASLt's heuristic for the block-scaled weight gradients
// of the 1B model (dW[M, N] += dy^T x, K = 16384 tokens, E5M2 x E4M3, 1x128 x 1x128, fp32 C).
int run_algos_wgrad(const Options& opt) {
  std::printf(
      "lasp bench lowp --algos --wgrad: dW[M,N] += dy^T x, 1x128 x 1x128, fp32 C, beta = 1; every "
      "candidate of cuBLASLt's heuristic (up to 64), median over %d interleaved rounds of 10 runs; "
      "rank 0 is what lasp uses\n",
      opt.iters);
  const LtSurvey lt;
  const LtProblem pr{"fp8 block wgrad e4m3 x e5m2 (x^T, dy^T)", CUDA_R_8F_E4M3, CUDA_R_8F_E5M2, false, true};
  uint32_t seed = 17;
  for (const Shape3& g : {Shape3{2048, 2048, 16384, "attn proj"}, Shape3{6144, 2048, 16384, "q/k/v"},
                          Shape3{8192, 2048, 16384, "mlp gate/up"}, Shape3{2048, 8192, 16384, "mlp down"}}) {
    Tensor dyt = random_bf16({g.m, g.k}, 1.0, seed++), xt = random_bf16({g.n, g.k}, 1.0, seed++);
    const QuantizedFp8 d5 = quantize_fp8_cuda(dyt, Fp8Format::E5M2, Fp8Scaling::PerTensor);
    const QuantizedFp8 x4 = quantize_fp8_cuda(xt, Fp8Format::E4M3, Fp8Scaling::PerTensor);
    Tensor c = Tensor::zeros({g.m, g.n}, DType::F32, cuda());
    survey_problem(opt, lt.handle, lt.workspace, lt.ws_bytes, g, pr, x4.codes.raw(),
                   d5.codes.raw(), c.raw(), nullptr);
  }
  return 0;
}

int run_algos(const Options& opt) {
  const std::vector<Shape3> shapes = {{16384, 2048, 2048, "1B attn proj 2048->2048"},
                                      {16384, 6144, 2048, "1B fused q/k/v 2048->6144"}};
  const LtProblem problems[] = {
      {"bf16", CUDA_R_16BF, CUDA_R_16BF, false},
      {"fp8 e4m3 x e4m3", CUDA_R_8F_E4M3, CUDA_R_8F_E4M3, false},
      {"fp8 e4m3 x e4m3, fast accumulation", CUDA_R_8F_E4M3, CUDA_R_8F_E4M3, true},
      {"fp8 e4m3 x e5m2 (dgrad: W x dy)", CUDA_R_8F_E4M3, CUDA_R_8F_E5M2, false}};
  std::printf(
      "lasp bench lowp --algos: y[M,N] = x[M,K] W[N,K]^T, bf16 out; every candidate of cuBLASLt's "
      "heuristic (up to 64), median over %d interleaved rounds of 10 runs; rank 0 is what lasp "
      "uses\n",
      opt.iters);
  const LtSurvey lt;
  float* scale = nullptr;
  LOWP_CUDA(cudaMalloc(&scale, sizeof(float)));
  const float one = 1.0f;
  LOWP_CUDA(cudaMemcpy(scale, &one, sizeof(float), cudaMemcpyHostToDevice));
  uint32_t seed = 7;
  for (const Shape3& g : shapes) {
    Tensor x = random_bf16({g.m, g.k}, 1.0, seed++), w = random_bf16({g.n, g.k}, 0.02, seed++);
    Tensor y = Tensor::empty({g.m, g.n}, DType::BF16, cuda());
    // FP8 operands: real quantized codes (random bytes would include NaN codes).
    const QuantizedFp8 x4 = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
    const QuantizedFp8 w4 = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::PerTensor);
    const QuantizedFp8 x5 = quantize_fp8_cuda(x, Fp8Format::E5M2, Fp8Scaling::PerTensor);
    for (const LtProblem& pr : problems) {
      const void* a = pr.ta == CUDA_R_16BF ? w.raw() : w4.codes.raw();
      const void* b = pr.tb == CUDA_R_16BF      ? x.raw()
                      : pr.tb == CUDA_R_8F_E4M3 ? x4.codes.raw()
                                                : x5.codes.raw();
      survey_problem(opt, lt.handle, lt.workspace, lt.ws_bytes, g, pr, a, b, y.raw(), scale);
    }
  }
  LOWP_CUDA(cudaFree(scale));
  return 0;
}

// One benchmark GEMM's operands, y[M, N] = x[M, K] W[N, K]^T: bf16 x ~ N(0, 1) and W ~ N(0, 0.02),
// a bf16 y, and x and W as per-tensor E4M3 codes (real codes: random bytes would include NaNs).
struct GemmOperands {
  Tensor x, w, y;
  QuantizedFp8 xq, wq;
};
GemmOperands gemm_operands(const Shape3& g, uint32_t& seed) {
  GemmOperands o;
  o.x = random_bf16({g.m, g.k}, 1.0, seed++);
  o.w = random_bf16({g.n, g.k}, 0.02, seed++);
  o.y = Tensor::empty({g.m, g.n}, DType::BF16, cuda());
  o.xq = quantize_fp8_cuda(o.x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
  o.wq = quantize_fp8_cuda(o.w, Fp8Format::E4M3, Fp8Scaling::PerTensor);
  return o;
}

// The three GEMMs the timing, fixed-cost and sustained tables compare on o: bf16, cuBLASLt FP8 and
// gemm_fp8's default choice (Auto), all per tensor with promotion.
std::vector<std::function<void()> > bf16_lt_auto(GemmOperands& o) {
  return {[&o] { gemm(o.y, o.x, false, o.w, true); },
          [&o] { gemm_fp8_with(o.y, o.xq, o.wq, 1.0f, 0.0f, false, Fp8GemmBackend::CublasLt); },
          [&o] { gemm_fp8_with(o.y, o.xq, o.wq, 1.0f, 0.0f, false, Fp8GemmBackend::Auto); }};
}

// lasp's own FP8 kernel (kernels/gemm_fp8_sm90.cu) next to cuBLASLt, timed in the same
// interleaved rounds: tile N 128 and 192 promoting every 128 of K (what cuBLASLt computes), tile
// 128 promoting every 512, and fast accumulation (one promotion at the end) of both; then block
// scaling (x 1x128, W 128x128, the fp8block projections' forward) in cuBLASLt and in ours.
void run_lasp_kernel(const Options& opt, const std::vector<Shape3>& shapes) {
  if (!gemm_fp8_lasp_available()) {
    std::printf(
        "\nlasp FP8 kernel: not available on this GPU/build (needs sm_90 and sm_90a code)\n");
    return;
  }
  std::printf(
      "\nlasp FP8 kernel vs cuBLASLt, bf16 out, E4M3, per tensor unless b* / lt_blk (interleaved "
      "rounds; speedups over bf16)\n");
  struct Variant {
    const char* name;
    bool fast;
    Fp8KernelConfig cfg;  // {tile_n, promote_every, stagger, tma_store, narrow_edge}
    bool block;           // x 1x128, W 128x128
  };
  const std::vector<Variant> variants = {
      {"n128", false, {128, 1, 0, 0}, false},    {"n192", false, {192, 1, 0, 0}, false},
      {"n192s", false, {192, 1, 1, 0}, false},   {"n192t", false, {192, 1, 0, 1}, false},
      {"n192st", false, {192, 1, 1, 1}, false},  {"n192st_w", false, {192, 1, 1, 1, 0}, false},
      {"n128st", false, {128, 1, 1, 1}, false},  {"n192p4st", false, {192, 4, 1, 1}, false},
      {"n192fast", true, {192, 1, 0, 0}, false}, {"n192fastt", true, {192, 1, 0, 1}, false},
      {"b192st", false, {192, 1, 1, 1}, true},   {"b192t", false, {192, 1, 0, 1}, true},
      {"b128st", false, {128, 1, 1, 1}, true}};
  std::printf("%-26s %-18s %8s %8s %8s %8s", "op", "MxNxK", "bf16_ms", "lt_ms", "ltfast", "lt_blk");
  for (const Variant& v : variants) std::printf(" %10s", v.name);
  std::printf("   (ms; then bf16_ms / ms for lt, ltfast, lt_blk and each)\n");
  uint32_t seed = 301;
  const Fp8GemmBackend lt = Fp8GemmBackend::CublasLt, ours = Fp8GemmBackend::Lasp;
  for (const Shape3& g : shapes) {
    GemmOperands o = gemm_operands(g, seed);
    Tensor &x = o.x, &w = o.w, &y = o.y;
    const QuantizedFp8 &xq = o.xq, &wq = o.wq;
    const QuantizedFp8 xb = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128);
    const QuantizedFp8 wb = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::Block128x128);
    std::vector<std::function<void()> > fns = {
        [&] { gemm(y, x, false, w, true); },
        [&] { gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, lt); },
        [&] { gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, true, lt); },
        [&] { gemm_fp8_with(y, xb, wb, 1.0f, 0.0f, false, lt); }};
    for (size_t i = 0; i < variants.size(); ++i) {
      const Variant v = variants[i];
      const QuantizedFp8 *a = v.block ? &xb : &xq, *b = v.block ? &wb : &wq;
      fns.push_back([&, v, a, b] { gemm_fp8_with(y, *a, *b, 1.0f, 0.0f, v.fast, ours, v.cfg); });
    }
    const std::vector<double> ms = median_event_ms_interleaved(fns, opt.iters, opt.warmup);
    const std::string shape = shape_str(g);
    std::printf("%-26s %-18s %8.3f %8.3f %8.3f %8.3f", g.what, shape.c_str(), ms[0], ms[1], ms[2],
                ms[3]);
    for (size_t i = 4; i < ms.size(); ++i) std::printf(" %10.3f", ms[i]);
    std::printf("\n%-26s %-18s %8s %8.2f %8.2f %8.2f", "", "  speedup over bf16", "", ms[0] / ms[1],
                ms[0] / ms[2], ms[0] / ms[3]);
    for (size_t i = 4; i < ms.size(); ++i) std::printf(" %10.2f", ms[0] / ms[i]);
    std::printf("   (end %s UTC)\n", utc_clock().c_str());
    std::fflush(stdout);
  }
  std::printf(
      "columns: lt = cuBLASLt (promotion), ltfast = cuBLASLt fast accumulation, lt_blk = cuBLASLt "
      "block-scaled (x 1x128, W 128x128); n128 / n192 = lasp tile 128 x N promoting every 128 of "
      "K, p4 = promoting every 512, fast = one promotion at the end; s = staggered consumers, t = "
      "TMA-store epilogue; 192-wide variants run a last column of <= 128 columns 128-wide with "
      "rotated columns (narrow_edge, the default) except n192st_w (every tile 192-wide); b192st / "
      "b192t / b128st = lasp block-scaled (x 1x128, W 128x128)\n");
}

// The weight gradients dW[M, N] += dy^T x (fp32 accumulating, K = the tokens) of the 1B model's
// projections: bf16 (the real TN call), cuBLASLt FP8 per tensor (dy E5M2, x E4M3) and with both
// operands 1x128 along the tokens (the fp8block recipe), and ours block-scaled (a factor per row
// of dy^T and per column of C), interleaved rounds.
void run_wgrad(const Options& opt) {
  if (!gemm_fp8_lasp_available()) {
    std::printf("\nweight gradients: lasp FP8 kernel not available on this GPU/build (needs sm_90 "
                "and sm_90a code)\n");
    return;
  }
  const int64_t tokens = opt.quick ? 4096 : 16384;
  const std::vector<Shape3> shapes = {{2048, 2048, tokens, "1B wgrad attn proj"},
                                      {6144, 2048, tokens, "1B wgrad fused q/k/v"},
                                      {8192, 2048, tokens, "1B wgrad mlp gate/up"},
                                      {2048, 8192, tokens, "1B wgrad mlp down"}};
  std::printf(
      "\nWeight gradients dW[M, N] += dy^T x (fp32 C, beta = 1, K = tokens), speedups over bf16 "
      "(interleaved rounds): lt = cuBLASLt per tensor, lt_blk = cuBLASLt 1x128 x 1x128, b192 / "
      "b128 = lasp 1x128 x 1x128 with 128 x 192 / 128 x 128 tiles, t192 = lasp per tensor, auto = "
      "gemm_fp8's default\n");
  std::printf("%-26s %-18s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %12s\n",
              "op", "MxNxK", "bf16_ms", "lt_ms", "blk_ms", "b192_ms", "b128_ms", "t192_ms",
              "auto_ms", "spd_lt", "spd_blk", "spd_b192", "spd_b128", "spd_t192", "spd_auto",
              "b192_TF", "end_utc");
  const Fp8Format e4 = Fp8Format::E4M3, e5 = Fp8Format::E5M2;
  const Fp8Scaling pt = Fp8Scaling::PerTensor, v = Fp8Scaling::Block1x128;
  const Fp8GemmBackend lt = Fp8GemmBackend::CublasLt, ours = Fp8GemmBackend::Lasp;
  uint32_t seed = 901;
  for (const Shape3& g : shapes) {
    const Tensor dy = random_bf16({g.k, g.m}, 1.0, seed++), x = random_bf16({g.k, g.n}, 1.0, seed++);
    const Tensor dyt = random_bf16({g.m, g.k}, 1.0, seed++), xt = random_bf16({g.n, g.k}, 1.0, seed++);
    const QuantizedFp8 a_t = quantize_fp8_cuda(dyt, e5, pt), b_t = quantize_fp8_cuda(xt, e4, pt);
    const QuantizedFp8 a_v = quantize_fp8_cuda(dyt, e5, v), b_v = quantize_fp8_cuda(xt, e4, v);
    Tensor dw = Tensor::zeros({g.m, g.n}, DType::F32, cuda());
    const std::vector<double> ms = median_event_ms_interleaved(
        {[&] { gemm(dw, dy, true, x, false, 1.0f, 1.0f); },
         [&] { gemm_fp8_with(dw, a_t, b_t, 1.0f, 1.0f, false, lt); },
         [&] { gemm_fp8_with(dw, a_v, b_v, 1.0f, 1.0f, false, lt); },
         [&] { gemm_fp8_with(dw, a_v, b_v, 1.0f, 1.0f, false, ours, {192}); },
         [&] { gemm_fp8_with(dw, a_v, b_v, 1.0f, 1.0f, false, ours, {128}); },
         [&] { gemm_fp8_with(dw, a_t, b_t, 1.0f, 1.0f, false, ours, {192}); },
         [&] { gemm_fp8_with(dw, a_v, b_v, 1.0f, 1.0f, false, Fp8GemmBackend::Auto); }},
        opt.iters, opt.warmup);
    const std::string shape = shape_str(g);
    std::printf(
        "%-26s %-18s %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f "
        "%8.0f %12s\n",
        g.what, shape.c_str(), ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], ms[0] / ms[1],
        ms[0] / ms[2], ms[0] / ms[3], ms[0] / ms[4], ms[0] / ms[5], ms[0] / ms[6],
        2.0 * g.m * g.n * g.k / (ms[3] * 1e9), utc_clock().c_str());
    std::fflush(stdout);
  }
}

// How the timing condition moves the FP8 speedup (cuBLASLt, promotion): one call on an idle GPU
// (the main table; includes the host's time to issue it), 10 calls queued back to back (a
// training step keeps the GPU's queue full; the operands stay warm in L2 as far as they fit), the
// host's time per call, and quantize-then-GEMM back to back (what a forward projection runs).
void run_timing(const Options& opt, const std::vector<Shape3>& shapes) {
  std::printf(
      "\nTiming conditions, cuBLASLt with promotion (fp8) and gemm_fp8's default choice (auto): "
      "alone = one call on an idle GPU (as above), b2b = 10 calls queued back to back (time per "
      "call), gpu = one call queued behind a 256 MiB memset (GPU time only: the host's issue "
      "time and the launch latency are not counted, L2 starts cold), hot = one call queued behind "
      "a 50 us spin kernel (GPU time, L2 as the previous round left it), host = host us to issue "
      "one call, q+fp8 = per-tensor quantize of x then the cuBLASLt GEMM, back to back\n");
  std::printf(
      "%-26s %-18s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s "
      "%8s %8s %8s %8s %8s %8s %12s\n",
      "op", "MxNxK", "bf16_ms", "fp8_ms", "speedup", "auto_ms", "spd_auto", "bf16_b2b", "fp8_b2b",
      "spd_b2b", "auto_b2b", "spd_ab2b", "bf16_gpu", "fp8_gpu", "spd_gpu", "auto_gpu", "spd_agpu",
      "bf16_hot", "fp8_hot", "spd_hot", "auto_hot", "spd_ahot", "host_bf", "host_f8", "host_au",
      "q+fp8", "spd_q", "end_utc");
  uint32_t seed = 701;
  for (const Shape3& g : shapes) {
    GemmOperands o = gemm_operands(g, seed);
    const std::vector<std::function<void()> > fns = bf16_lt_auto(o);
    const std::function<void()>&bf16 = fns[0], &fp8 = fns[1], &fp8_auto = fns[2];
    const std::function<void()> q_fp8 = [&] {
      const QuantizedFp8 q = quantize_fp8_cuda(o.x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
      gemm_fp8_with(o.y, q, o.wq, 1.0f, 0.0f, false, Fp8GemmBackend::CublasLt);
    };
    const std::vector<double> alone =
        median_event_ms_interleaved({bf16, fp8, fp8_auto}, opt.iters, opt.warmup);
    const std::vector<double> b2b =
        median_event_ms_interleaved({bf16, fp8, q_fp8, fp8_auto}, opt.iters, opt.warmup, 10);
    const std::vector<double> gpu =
        median_event_ms_queued({bf16, fp8, fp8_auto}, opt.iters, opt.warmup);
    const std::vector<double> hot =
        median_event_ms_blocked({bf16, fp8, fp8_auto}, opt.iters, opt.warmup);
    const double host_bf = host_issue_us(bf16, 20), host_f8 = host_issue_us(fp8, 20),
                 host_au = host_issue_us(fp8_auto, 20);
    const std::string shape = shape_str(g);
    std::printf(
        "%-26s %-18s %8.3f %8.3f %8.2f %8.3f %8.2f %8.3f %8.3f %8.2f %8.3f %8.2f %8.3f %8.3f %8.2f "
        "%8.3f %8.2f %8.3f %8.3f %8.2f %8.3f %8.2f %8.1f %8.1f %8.1f %8.3f %8.2f %12s\n",
        g.what, shape.c_str(), alone[0], alone[1], alone[0] / alone[1], alone[2],
        alone[0] / alone[2], b2b[0], b2b[1], b2b[0] / b2b[1], b2b[3], b2b[0] / b2b[3], gpu[0],
        gpu[1], gpu[0] / gpu[1], gpu[2], gpu[0] / gpu[2], hot[0], hot[1], hot[0] / hot[1], hot[2],
        hot[0] / hot[2], host_bf, host_f8, host_au, b2b[2], b2b[0] / b2b[2], utc_clock().c_str());
    std::fflush(stdout);
  }
}

// A GEMM call's fixed cost: the same N = 2048 problem over M and K (one wave of 132 tiles at M =
// 1536, one K block at K = 128), timed alone (host issue + launch + kernel) and hot (behind a spin
// kernel: the GPU time alone), in microseconds; the first row is an empty kernel launch.
void run_latency(const Options& opt) {
  std::printf(
      "\nFixed cost of one call (us; alone = on an idle GPU, with the host's issue time and the "
      "launch; hot = queued behind a 50 us spin kernel, GPU time only); ours = gemm_fp8's "
      "default (LASP_FP8_GEMM=auto); host_* = host us per call\n");
  std::printf("%-26s %-18s %9s %9s %9s %9s %9s %9s %8s %8s %12s\n", "op", "MxNxK", "bf16", "lt",
              "ours", "bf16_hot", "lt_hot", "ours_hot", "host_bf", "host_us", "end_utc");
  {
    const std::function<void()> empty = [] { stream_spin_ns(0); };
    const double alone = median_event_ms_interleaved({empty}, opt.iters, opt.warmup)[0];
    const double hot = median_event_ms_blocked({empty}, opt.iters, opt.warmup)[0];
    std::printf("%-26s %-18s %9.1f %9s %9s %9.1f %9s %9s %8s %8.1f %12s\n", "empty kernel", "-",
                alone * 1e3, "-", "-", hot * 1e3, "-", "-", "-", host_issue_us(empty, 20),
                utc_clock().c_str());
  }
  const std::vector<Shape3> shapes = {{1536, 2048, 128, "one wave, one K block"},
                                      {1536, 2048, 2048, "one wave"},
                                      {16384, 2048, 128, "o-proj rows, K 128"},
                                      {16384, 2048, 512, "o-proj rows, K 512"},
                                      {16384, 2048, 2048, "o-proj"},
                                      {16384, 8192, 2048, "mlp up"}};
  uint32_t seed = 901;
  for (const Shape3& g : shapes) {
    GemmOperands o = gemm_operands(g, seed);
    const std::vector<std::function<void()> > fns = bf16_lt_auto(o);
    const std::vector<double> alone = median_event_ms_interleaved(fns, opt.iters, opt.warmup);
    const std::vector<double> hot = median_event_ms_blocked(fns, opt.iters, opt.warmup);
    const std::string shape = shape_str(g);
    std::printf("%-26s %-18s %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %8.1f %8.1f %12s\n", g.what,
                shape.c_str(), alone[0] * 1e3, alone[1] * 1e3, alone[2] * 1e3, hot[0] * 1e3,
                hot[1] * 1e3, hot[2] * 1e3, host_issue_us(fns[0], 20), host_issue_us(fns[2], 20),
                utc_clock().c_str());
    std::fflush(stdout);
  }
}

// Sustained: each GEMM alone, queued back to back for about a second before it is timed, so the
// GPU reaches the clock its power cap allows for that GEMM (a training step runs at that clock;
// the tables above time calls in bursts of a few ms, mostly before the cap bites). Then 10
// samples of 20 calls back to back; the median time per call. Each cell prints its UTC window, to
// read the SM clock off device_check's clocks_lowp.csv.
void run_sustained(const Options& opt, const std::vector<Shape3>& shapes) {
  std::printf(
      "\nSustained (each GEMM back to back for ~1 s, then 10 samples of 20 calls; ms per call; "
      "windows in UTC): bf16, cuBLASLt FP8 (lt) and gemm_fp8's default (ours); *_MHz = the SM "
      "clock right behind 20 more calls (cycles of a one-thread kernel over 100 us of the global "
      "timer)\n");
  std::printf("%-26s %-18s %8s %8s %8s %8s %8s %8s %8s %8s   %s\n", "op", "MxNxK", "bf16_ms",
              "lt_ms", "ours_ms", "spd_lt", "spd_ours", "bf16_MHz", "lt_MHz", "ours_MHz",
              "windows (bf16 | lt | ours)");
  auto stream = static_cast<cudaStream_t>(current_stream().handle);
  uint32_t seed = 1101;
  for (const Shape3& g : shapes) {
    GemmOperands o = gemm_operands(g, seed);
    const std::vector<std::function<void()> > fns = bf16_lt_auto(o);
    double ms[3], mhz[3];
    std::string windows;
    for (int f = 0; f < 3; ++f) {
      const std::string from = utc_clock();
      const auto t0 = std::chrono::steady_clock::now();
      while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(1000)) {
        for (int i = 0; i < 50; ++i) fns[f]();
        CUDA_CHECK(cudaStreamSynchronize(stream));  // keeps the queue short
      }
      ms[f] = median_event_ms_interleaved({fns[f]}, std::max(opt.iters / 2, 5), 0, 20)[0];
      for (int i = 0; i < 20; ++i) fns[f]();
      mhz[f] = stream_sm_clock_mhz();  // right behind 20 calls: the clock they ran at
      windows += (f ? " | " : "") + from + "-" + utc_clock();
    }
    const std::string shape = shape_str(g);
    std::printf("%-26s %-18s %8.3f %8.3f %8.3f %8.2f %8.2f %8.0f %8.0f %8.0f   %s\n", g.what,
                shape.c_str(), ms[0], ms[1], ms[2], ms[0] / ms[1], ms[0] / ms[2], mhz[0], mhz[1],
                mhz[2], windows.c_str());
    std::fflush(stdout);
  }
}

// 8192^3 and the 1B model's projections at M = 16384 tokens (--quick: M = 4096, 4096^3).
std::vector<Shape3> bench_shapes(bool quick) {
  if (quick) {
    return {{4096, 4096, 4096, "square"},
            {4096, 2048, 2048, "attn proj"},
            {4096, 8192, 2048, "mlp up"},
            {4096, 2048, 8192, "mlp down"}};
  }
  return {{8192, 8192, 8192, "square"},
          {16384, 2048, 2048, "1B attn proj 2048->2048"},
          {16384, 6144, 2048, "1B fused q/k/v 2048->6144"},
          {16384, 8192, 2048, "1B mlp up 2048->8192"},
          {16384, 2048, 8192, "1B mlp down 8192->2048"}};
}

int run(const Options& opt) {
  const std::vector<Shape3> shapes = bench_shapes(opt.quick);
  std::printf(
      "lasp bench lowp: y[M,N] = x[M,K] W[N,K]^T, bf16 out, fp32 accumulation, median of %d "
      "interleaved rounds (each times every GEMM of the row once)\n",
      opt.iters);
  std::printf(
      "floors: bf16 %.0f TFLOP/s, fp8 %.0f TFLOP/s; fp8 = E4M3 x E4M3 per-tensor scales "
      "(fast accumulation off); blk = cuBLASLt with x 1x128, W 128x128 block scales\n",
      kBf16FloorFlops / 1e12, kFp8FloorFlops / 1e12);
  std::printf("%-26s %-18s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s %9s %12s\n",
              "op", "MxNxK", "bf16_ms", "fp8_ms", "fast_ms", "blk_ms", "auto_ms", "bf16_TF",
              "fp8_TF", "blk_TF", "bf16/fl", "fp8/fl", "speedup", "spd_fast", "spd_auto",
              "q_tensor", "q_1x128", "end_utc");
  uint32_t seed = 1;
  const int64_t fallbacks_before = gemm_fp8_fallback_count();
  for (const Shape3& g : shapes) {
    GemmOperands o = gemm_operands(g, seed);
    Tensor &x = o.x, &w = o.w, &y = o.y;
    const QuantizedFp8 &xq = o.xq, &wq = o.wq;
    const double flops = 2.0 * g.m * g.n * g.k;
    const QuantizedFp8 xb = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128);
    const QuantizedFp8 wb = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::Block128x128);
    // Interleaved rounds: the GPU runs at its power cap, and its clock drifts; each round times
    // every GEMM once, so the ratios compare like with like. fast = fp8 with fast accumulation
    // (precision.fp8_fast_accum, the forward GEMMs).
    const std::vector<double> ms = median_event_ms_interleaved(
        {[&] { gemm(y, x, false, w, true); },
         [&] { gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, Fp8GemmBackend::CublasLt); },
         [&] { gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, true, Fp8GemmBackend::CublasLt); },
         [&] { gemm_fp8_with(y, xb, wb, 1.0f, 0.0f, false, Fp8GemmBackend::CublasLt); },
         [&] { gemm_fp8_with(y, xq, wq, 1.0f, 0.0f, false, Fp8GemmBackend::Auto); }},
        opt.iters, opt.warmup);
    const double bf16_ms = ms[0], fp8_ms = ms[1], fast_ms = ms[2], blk_ms = ms[3], auto_ms = ms[4];

    const double q_tensor_ms =
        time_ms([&] { (void)quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor); }, opt);
    const double q_block_ms =
        time_ms([&] { (void)quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128); }, opt);

    const double bf16_floor_ms = flops / kBf16FloorFlops * 1e3,
                 fp8_floor_ms = flops / kFp8FloorFlops * 1e3;
    const std::string shape = shape_str(g);
    std::printf(
        "%-26s %-18s %8.3f %8.3f %8.3f %8.3f %8.3f %8.0f %8.0f %8.0f %8.2f %8.2f %8.2f %8.2f %8.2f "
        "%9.3f %9.3f %12s\n",
        g.what, shape.c_str(), bf16_ms, fp8_ms, fast_ms, blk_ms, auto_ms, flops / (bf16_ms * 1e9),
        flops / (fp8_ms * 1e9), flops / (blk_ms * 1e9), bf16_ms / bf16_floor_ms,
        fp8_ms / fp8_floor_ms, bf16_ms / fp8_ms, bf16_ms / fast_ms, bf16_ms / auto_ms, q_tensor_ms,
        q_block_ms, utc_clock().c_str());
    std::fflush(stdout);
  }
  std::printf(
      "columns: *_TF = TFLOP/s; */fl = time / floor time (1.0 = at the floor); fp8 = cuBLASLt; "
      "speedup = bf16_ms / fp8_ms; fast_ms / spd_fast = fp8 with fast accumulation and its "
      "speedup; auto_ms / spd_auto = gemm_fp8's default kernel choice (LASP_FP8_GEMM=auto: ours at "
      "K <= 4096); q_* = ms to quantize x (bf16 -> E4M3) per tensor / per 1x128 block\n");
  const int64_t fallbacks = gemm_fp8_fallback_count() - fallbacks_before;
  if (fallbacks > 0) {
    std::printf(
        "WARNING: %ld block-scaled GEMMs fell back to fp32 dequantize + GEMM (cuBLASLt "
        "refused them): blk_ms is not a cuBLASLt time\n",
        static_cast<long>(fallbacks));
  }
  run_timing(opt, shapes);
  run_latency(opt);
  run_sustained(opt, shapes);
  run_lasp_kernel(opt, shapes);
  run_wgrad(opt);
  if (!opt.quick) run_accuracy({shapes[1], shapes[4]});
  run_quantizers(opt);
  run_fp4(opt, shapes);
  return 0;
}

}  // namespace

int bench_lowp_main(int argc, char** argv) {
  Options opt;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto next_int = [&](const char* name) {
      LASP_CHECK(i + 1 < argc) << "lasp bench lowp: " << name << " needs a value";
      const int v = std::atoi(argv[++i]);
      LASP_CHECK(v >= 1) << "lasp bench lowp: " << name << " must be >= 1, got " << argv[i];
      return v;
    };
    if (a == "--iters") {
      opt.iters = next_int("--iters");
    } else if (a == "--warmup") {
      opt.warmup = next_int("--warmup");
    } else if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--algos") {
      opt.algos = true;
    } else if (a == "--quantizers") {
      opt.quantizers_only = true;
    } else if (a == "--kernel") {
      opt.kernel_only = true;
    } else if (a == "--latency") {
      opt.latency_only = true;
    } else if (a == "--sustained") {
      opt.sustained_only = true;
    } else if (a == "--wgrad") {
      opt.wgrad_only = true;
    } else if (a == "--shape") {
      LASP_CHECK(i + 1 < argc) << "lasp bench lowp: --shape needs a value MxNxK";
      opt.shape = argv[++i];
    } else if (a == "lowp" || a == "bench") {
      continue;  // tolerate the subcommand words if the caller passes them through
    } else {
      std::fprintf(
          stderr,
          "lasp bench lowp: unknown argument '%s' (expected --iters N, --warmup N, "
          "--quick, --algos [--wgrad], --quantizers, --kernel, --latency, --sustained, --wgrad, --shape "
          "MxNxK)\n",
          a.c_str());
      return 2;
    }
  }
  if (!cuda_available()) {
    std::fprintf(stderr, "lasp bench lowp: no CUDA GPU visible; nothing to measure\n");
    return 2;
  }
  set_log_quiet(true);
  if (opt.latency_only) {
    run_latency(opt);
    return 0;
  }
  if (opt.sustained_only) {
    run_sustained(opt, bench_shapes(opt.quick));
    return 0;
  }
  if (opt.algos && opt.wgrad_only) return run_algos_wgrad(opt);
  if (opt.wgrad_only) {
    run_wgrad(opt);
    return 0;
  }
  if (opt.quantizers_only) {
    run_quantizers(opt);
    return 0;
  }
  if (opt.kernel_only) {
    std::vector<Shape3> shapes = bench_shapes(false);
    if (!opt.shape.empty()) {
      long m = 0, n = 0, k = 0;
      char tail = 0;
      LASP_CHECK(std::sscanf(opt.shape.c_str(), "%ldx%ldx%ld%c", &m, &n, &k, &tail) == 3 && m > 0 &&
                 n > 0 && k > 0)
          << "lasp bench lowp: --shape wants MxNxK with positive integers, got '" << opt.shape
          << "'";
      shapes = {{m, n, k, "--shape"}};
    }
    run_lasp_kernel(opt, shapes);
    return 0;
  }
  return opt.algos ? run_algos(opt) : run(opt);
}

#endif

}  // namespace lasp
