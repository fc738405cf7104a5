// Low-precision GEMM benchmark (see bench_lowp.h). Inputs are random bf16 (one random 16 Mi
// element block tiled over each tensor: never zeros, which run faster than real data).
#include "launch/bench_lowp.h"
#include "launch/bench_util.h"

#include <algorithm>
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

#ifdef LASP_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/quantize_cuda.h"
#endif

namespace lasp {

#ifndef LASP_HAVE_CUDA

int bench_lowp_main(int, char**) {
  std::fprintf(stderr,
               "lasp bench lowp: this build has no CUDA backend (configure with -DLASP_CUDA=ON on a "
               "machine with nvcc); FP8 GEMMs need a Hopper GPU\n");
  return 2;
}

#else

namespace {

constexpr double kBf16FloorFlops = 790e12;   // dense bf16 rate (H200, measured)
constexpr double kFp8FloorFlops = 1450e12;   // dense fp8 rate (H200)

#define LOWP_CUDA(expr)                                                        \
  do {                                                                         \
    cudaError_t e_ = (expr);                                                   \
    LASP_CHECK(e_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

struct Options {
  int iters = 20, warmup = 5;
  bool quick = false;
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

// The FP4 GEMM (gemm_fp4) on the same shapes, MXFP4 and NVFP4 operands quantized beforehand
// (RTN), against the bf16 GEMM: native FP4 tensor cores where the GPU has them, else the exact
// emulation (which the table names).
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
    char shape[64];
    std::snprintf(shape, sizeof shape, "%ldx%ldx%ld", static_cast<long>(g.m),
                  static_cast<long>(g.n), static_cast<long>(g.k));
    std::printf("%-26s %-18s %8.3f %9.3f %9.3f %8.0f %8.0f %9.2f %9.2f\n", g.what, shape, bf16_ms,
                ms[0], ms[1], flops / (ms[0] * 1e9), flops / (ms[1] * 1e9), bf16_ms / ms[0],
                bf16_ms / ms[1]);
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

int run(const Options& opt) {
  std::vector<Shape3> shapes = {{8192, 8192, 8192, "square"},
                                {16384, 2048, 2048, "1B attn proj 2048->2048"},
                                {16384, 6144, 2048, "1B fused q/k/v 2048->6144"},
                                {16384, 8192, 2048, "1B mlp up 2048->8192"},
                                {16384, 2048, 8192, "1B mlp down 8192->2048"}};
  if (opt.quick) {
    shapes = {{4096, 4096, 4096, "square"},
              {4096, 2048, 2048, "attn proj"},
              {4096, 8192, 2048, "mlp up"},
              {4096, 2048, 8192, "mlp down"}};
  }
  std::printf("lasp bench lowp: y[M,N] = x[M,K] W[N,K]^T, bf16 out, fp32 accumulation, median of %d "
              "runs\n",
              opt.iters);
  std::printf("floors: bf16 %.0f TFLOP/s, fp8 %.0f TFLOP/s; fp8 = E4M3 x E4M3 per-tensor scales "
              "(fast accumulation off); blk = x 1x128, W 128x128\n",
              kBf16FloorFlops / 1e12, kFp8FloorFlops / 1e12);
  std::printf("%-26s %-18s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s %9s\n", "op", "MxNxK",
              "bf16_ms", "fp8_ms", "fast_ms", "blk_ms", "bf16_TF", "fp8_TF", "blk_TF", "bf16/fl", "fp8/fl",
              "speedup", "spd_fast", "q_tensor", "q_1x128");
  uint32_t seed = 1;
  const int64_t fallbacks_before = gemm_fp8_fallback_count();
  for (const Shape3& g : shapes) {
    Tensor x = random_bf16({g.m, g.k}, 1.0, seed++), w = random_bf16({g.n, g.k}, 0.02, seed++);
    Tensor y = Tensor::empty({g.m, g.n}, DType::BF16, cuda());
    const double flops = 2.0 * g.m * g.n * g.k;
    const double bf16_ms = time_ms([&] { gemm(y, x, false, w, true); }, opt);

    const QuantizedFp8 xq = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor);
    const QuantizedFp8 wq = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::PerTensor);
    const double fp8_ms = time_ms([&] { gemm_fp8(y, xq, wq); }, opt);
    // The same with fast accumulation (precision.fp8_fast_accum: the forward GEMMs).
    const double fast_ms = time_ms([&] { gemm_fp8(y, xq, wq, 1.0f, 0.0f, true); }, opt);

    const QuantizedFp8 xb = quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128);
    const QuantizedFp8 wb = quantize_fp8_cuda(w, Fp8Format::E4M3, Fp8Scaling::Block128x128);
    const double blk_ms = time_ms([&] { gemm_fp8(y, xb, wb); }, opt);

    const double q_tensor_ms =
        time_ms([&] { (void)quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::PerTensor); }, opt);
    const double q_block_ms =
        time_ms([&] { (void)quantize_fp8_cuda(x, Fp8Format::E4M3, Fp8Scaling::Block1x128); }, opt);

    const double bf16_floor_ms = flops / kBf16FloorFlops * 1e3, fp8_floor_ms = flops / kFp8FloorFlops * 1e3;
    char shape[64];
    std::snprintf(shape, sizeof shape, "%ldx%ldx%ld", static_cast<long>(g.m), static_cast<long>(g.n),
                  static_cast<long>(g.k));
    std::printf("%-26s %-18s %8.3f %8.3f %8.3f %8.3f %8.0f %8.0f %8.0f %8.2f %8.2f %8.2f %8.2f %9.3f %9.3f\n",
                g.what, shape, bf16_ms, fp8_ms, fast_ms, blk_ms, flops / (bf16_ms * 1e9), flops / (fp8_ms * 1e9),
                flops / (blk_ms * 1e9), bf16_ms / bf16_floor_ms, fp8_ms / fp8_floor_ms, bf16_ms / fp8_ms,
                bf16_ms / fast_ms, q_tensor_ms, q_block_ms);
    std::fflush(stdout);
  }
  std::printf("columns: *_TF = TFLOP/s; */fl = time / floor time (1.0 = at the floor); speedup = "
              "bf16_ms / fp8_ms; fast_ms / spd_fast = fp8 with fast accumulation and its speedup; q_* = ms to quantize x (bf16 -> E4M3) per tensor / per 1x128 block\n");
  const int64_t fallbacks = gemm_fp8_fallback_count() - fallbacks_before;
  if (fallbacks > 0) {
    std::printf("WARNING: %ld block-scaled GEMMs fell back to fp32 dequantize + GEMM (cuBLASLt "
                "refused them): blk_ms is not a cuBLASLt time\n",
                static_cast<long>(fallbacks));
  }
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
    } else if (a == "lowp" || a == "bench") {
      continue;  // tolerate the subcommand words if the caller passes them through
    } else {
      std::fprintf(stderr, "lasp bench lowp: unknown argument '%s' (expected --iters N, --warmup N, --quick)\n",
                   a.c_str());
      return 2;
    }
  }
  if (!cuda_available()) {
    std::fprintf(stderr, "lasp bench lowp: no CUDA GPU visible; nothing to measure\n");
    return 2;
  }
  set_log_quiet(true);
  return run(opt);
}

#endif

}  // namespace lasp
