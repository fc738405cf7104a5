// `lasp bench lowp`: bf16 vs FP8 GEMMs on the GPU, plus the FP8 quantization kernels.
//
// Shapes (y[M, N] = x[M, K] W[N, K]^T, the linear layer's layout): 8192^3 and the 1B model's
// projections at M = 16384 tokens (K x N = 2048x2048, 2048x8192, 8192x2048). One table:
//   shape, bf16 ms, fp8 ms (per-tensor E4M3 x E4M3 -> bf16, cuBLASLt, fast accumulation off),
//   fp8 1x128/128x128 block-scaled ms, TFLOP/s of each, time / floor (floors: 790 TFLOP/s
//   bf16, 1450 TFLOP/s fp8, dense H200 rates), fp8 speedup over bf16, and the time of
//   quantizing x (bf16 -> E4M3 per tensor and 1x128).
//   --iters N (default 20), --warmup N (default 5), --quick (4096^3 and M = 4096)
//   --algos: instead, every algorithm cuBLASLt's heuristic offers for bf16 / FP8 / FP8 fast
//   accumulation / E4M3 x E5M2 at 16384x2048x2048 and 16384x6144x2048, timed in --iters
//   interleaved rounds of 10 back-to-back runs, with each one's configuration.
//   --latency: only the fixed-cost table (an N = 2048 GEMM over M and K, alone and behind a spin
//   kernel, in us; also part of the full run)
//   --sustained: only the sustained table (each GEMM back to back for ~1 s first, so that it runs
//   at the clock the power cap allows; also part of the full run)
//   --wgrad: only the weight-gradient table (dW += dy^T x, fp32 C, K = 16384 tokens: bf16,
//   cuBLASLt FP8 per tensor and 1x128 x 1x128, lasp's kernel 1x128 x 1x128; also part of the full
//   run)
// Returns non-zero with a message in a CPU-only build or without a GPU.
#pragma once

namespace lasp {

int bench_lowp_main(int argc, char** argv);

}  // namespace lasp
