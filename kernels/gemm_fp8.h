// FP8 GEMM (cuBLASLt, or lasp's own kernel, on Hopper). The FP4 GEMMs are in kernels/gemm_fp4.h.
//
//   gemm_fp8(c, a, b, alpha, beta):  C[M, N] = alpha * deq(A) deq(B)^T + beta * C
//
// A [M, K] and B [N, K] are QuantizedFp8 (kernels/quantize.h) quantized along K: both operands
// K-major, which is cuBLASLt's required FP8 "TN" layout (docs/fp8_gpu.md has the mapping).
// Formats: E4M3 x E4M3, E4M3 x E5M2, E5M2 x E4M3 (gradients are E5M2; E5M2 x E5M2 is refused,
// cuBLASLt has no such kernel; lasp's kernel below takes it). C: bf16 or fp32. Accumulation in
// fp32, fast accumulation OFF unless asked for (per-tensor scaling only: cuBLASLt's block-scaled
// kernels do not offer it).
//
// Scaling (the scales are the dequantization factors, applied by cuBLASLt per operand):
//   PerTensor x PerTensor  -> CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F (device scale pointers,
//                             no host sync);
//   any Block*             -> VEC128_32F (1x128) / BLK128x128_32F (128x128) block scaling,
//                             Hopper only (cuBLAS >= 12.9). cuBLASLt has no 128x128 x 128x128
//                             kernel, so then A's tile scales are expanded to 1x128 (exact), and
//                             a per-tensor operand next to a block one is expanded likewise.
//                             Should cuBLASLt refuse a block-scaled problem, the GEMM falls back
//                             to fp32 dequantize + fp32 GEMM (exact, slow) with a warning, and
//                             gemm_fp8_fallback_count() counts it.
// Shapes: cuBLASLt FP8 needs M, N, K multiples of 16 and 16-byte aligned pointers (K-major rows
// of whole 16-byte units). Any other problem runs on zero-padded copies of A, B and C (zeros along
// K add nothing; C's padding is dropped), so every shape works; aligned ones copy nothing.
//
// Kernel (on an sm_90 GPU): cuBLASLt, or lasp's own warp-specialised TMA + wgmma kernel
// (kernels/gemm_fp8_sm90.cu: the same products and fp32 promotion every 128 of K, also E5M2 x
// E5M2; block scaling with A per tensor / 1x128 / 128x128 and B per tensor / 1x128 / 128x128,
// the factors applied at every promotion), chosen by LASP_FP8_GEMM = auto | cublaslt | lasp
// (auto: fp8_auto_prefers_lasp).
//
// CPU tensors run gemm_fp8_emulated (fp32 C only).
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "kernels/quantize.h"

namespace lasp {

void gemm_fp8(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha = 1.0f,
              float beta = 0.0f, bool fast_accum = false);

// Auto: lasp's kernel where it was measured at least as fast as cuBLASLt (fp8_auto_prefers_lasp),
// cuBLASLt everywhere else.
enum class Fp8GemmBackend { CublasLt, Lasp, Auto };
// lasp's kernel: the CTA tile's N (128 or 192; 0 = 192) and how many K blocks of 128 the tensor
// cores accumulate before their partial sums are added into the fp32 total (1 = every 128, what
// cuBLASLt does; fast accumulation = one promotion at the end).
// stagger and tma_store (-1 = the default, on; 0 off, 1 on; measured in docs/fp8_gpu.md):
// stagger holds the second consumer warpgroup back by one K block at the start, so the two
// consumers' promotions fall under each other's wgmmas instead of together; tma_store writes a
// bf16 C (beta = 0) through shared memory with TMA stores, so a consumer starts its next tile
// while the stores drain.
// narrow_edge (-1 = the default, on): with 192-wide tiles, a last column of tiles at most 128 wide
// runs 128-wide wgmmas, and each row of tiles starts one column further, so that the narrow tiles
// spread over the CTAs (N = 2048: 10 full columns and one of 128).
struct Fp8KernelConfig {
  int tile_n = 0;
  int promote_every = 1;
  int stagger = -1;
  int tma_store = -1;
  int narrow_edge = -1;
};
// LASP_FP8_GEMM (gemm_fp8 reads it once per process): "cublaslt", "lasp", or "auto"/unset
// (= Auto). Other values are an error naming the variable.
Fp8GemmBackend fp8_gemm_backend_from_env();
// Auto's rule on an sm_90 GPU: our kernel where `lasp bench lowp` measured it at or above
// cuBLASLt: bf16 C, beta = 0, K <= 4096 and N <= 8192 (per tensor, the 1B model's K = 2048
// projections: 1.66-1.79x bf16 against cuBLASLt's 1.61-1.79x; x 1x128 times W 128x128); cuBLASLt
// for the rest (per tensor K = 8192: 1.72 vs 1.75x, 8192^3: 1.83 vs 1.96x; the LM head's
// 4096 x 128256 x 2048: 1.55 vs 1.76x; fp32 C or beta != 0, which our kernel stores from
// registers; a 1x128 B — the block-scaled weight gradients dy^T x, both 1x128 along the tokens —
// 1.1-1.5x slower in ours). docs/fp8_gpu.md, "Our FP8 kernel".
bool fp8_auto_prefers_lasp(int64_t n, int64_t k, Fp8Scaling a, Fp8Scaling b, bool c_bf16, float beta);
// gemm_fp8 on a chosen kernel (benchmarks and tests compare them). Lasp needs
// gemm_fp8_lasp_available(); fast_accum there means promote_every = the whole K (per tensor
// only). CPU tensors ignore the choice (the exact emulation).
void gemm_fp8_with(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b, float alpha, float beta,
                   bool fast_accum, Fp8GemmBackend backend, Fp8KernelConfig cfg = {});
// True on a compute capability 9.0 GPU with this build's sm_90a code (false without CUDA).
bool gemm_fp8_lasp_available();

// How many gemm_fp8 calls took the exact-but-slow fallback since the process started.
int64_t gemm_fp8_fallback_count();
// How many gemm_fp8 calls ran on lasp's own kernel in this process (tests check Auto's choice).
int64_t gemm_fp8_lasp_launches();

}  // namespace lasp
