// FP4 GEMM: native block-scaled FP4 tensor cores where the GPU has them (Blackwell, sm_100 and
// later, through cuBLASLt), the exact emulation everywhere else (Hopper: bf16 tensor cores; CPU).
//
//   gemm_fp4(c, a, b):  C[M, N] = ts_A ts_B (e2m1 x scale)_A (e2m1 x scale)_B^T
//
// A [M, K] and B [N, K] are QuantizedFp4 (kernels/quantize.h) quantized along K in one format
// (MXFP4: E8M0 scale per 32; NVFP4: E4M3 scale per 16 and an fp32 tensor scale). C is fp32 or
// bf16 [M, N], overwritten. Every path computes the same exact products; they differ only in
// the order of the fp32 sums (and the final rounding for bf16 C).
//
// The native path (docs/fp8_gpu.md, "FP4 GEMM"). cuBLASLt's block-scaled FP4 GEMM reads
//   data    CUDA_R_4F_E2M1, two codes per byte: element 2j in the low nibble of byte j, element
//           2j + 1 in the high nibble (the order of cuda_fp4.h's __nv_fp4x2_e2m1), K-major rows;
//   scales  one byte per group (UE8M0 for CUBLASLT_MATMUL_MATRIX_SCALE_VEC32_UE8M0, UE4M3 for
//           VEC16_UE4M3) in the tiled layout of cuBLAS's "1D block scaling factors layout": the
//           [rows, K / group] scale matrix, padded to a multiple of 128 rows and of 4 columns, is
//           cut into 128 x 4 tiles of 512 bytes stored tile row by tile row (the K direction
//           fastest); inside a tile, row r and column c sit at (r % 32) * 16 + (r / 32) * 4 + c.
// fp4_native_operand builds both from a QuantizedFp4 (CPU or CUDA, same bytes), zero-padding rows
// and K: zero codes add nothing whatever their scale, and zero scale bytes are finite in both
// scale formats (UE8M0 0 = 2^-127, UE4M3 0 = 0), so padding never makes a NaN.
//
// Which path runs (CUDA tensors): LASP_FP4_GEMM=auto (default) takes the native path on a device
// of compute capability 10.0 or later and the emulation otherwise; `emulated` always emulates;
// `native` fails with an error on a device without FP4 tensor cores. Should cuBLASLt find no
// kernel for a native problem, auto falls back to the emulation with a warning (counted by
// gemm_fp4_fallback_count). The first call logs which path runs. Hopper has no FP4 tensor
// cores: there every FP4 GEMM is the exact emulation, and says so in the log.
#pragma once

#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"
#include "kernels/quantize.h"

namespace lasp {

void gemm_fp4(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b);

enum class Fp4GemmPath { Auto, Native, Emulated };
// LASP_FP4_GEMM (unset or empty: Auto); any other value than auto|native|emulated fails, naming it.
Fp4GemmPath fp4_gemm_path_from_env();

// C[M, N] (fp32 or bf16, CUDA): the exact emulation on CUDA: codes x group scales dequantized to
// bf16 (exact: at most 6 significant bits) and the bf16 cuBLASLt GEMM with alpha = ts_A ts_B.
void gemm_fp4_emulated_cuda(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b);

// True when `dev` is a CUDA device with FP4 tensor cores (compute capability >= 10.0) in a build
// with the CUDA backend; false for CPU devices and Hopper.
bool fp4_native_supported(Device dev);
// How many native-path gemm_fp4 calls fell back to the emulation since the process started.
int64_t gemm_fp4_fallback_count();

// ---------------------------------------------------------------- the native operand layout

constexpr int64_t kFp4ScaleTileRows = 128;  // a scale tile: 128 rows x 4 group columns, 512 bytes
constexpr int64_t kFp4ScaleTileCols = 4;
constexpr int64_t kFp4NativeRowAlign = 16;  // rows padded to this (cuBLASLt's M, N)
constexpr int64_t kFp4NativeKAlign = 128;   // K padded to this: 64-byte rows, whole scale tiles

// Byte offset of the scale of (row, group column gc) in the tiled layout of a scale matrix with
// `group_cols_padded` columns (a multiple of 4).
inline int64_t fp4_scale_tile_offset(int64_t row, int64_t gc, int64_t group_cols_padded) {
  const int64_t tile =
      (row / kFp4ScaleTileRows) * (group_cols_padded / kFp4ScaleTileCols) + gc / kFp4ScaleTileCols;
  const int64_t r = row % kFp4ScaleTileRows;
  return tile * (kFp4ScaleTileRows * kFp4ScaleTileCols) + (r % 32) * 16 + (r / 32) * 4 +
         gc % kFp4ScaleTileCols;
}

struct Fp4NativeOperand {
  Tensor packed;  // uint8 [rows_padded, k_padded / 2]: two E2M1 codes per byte, low nibble first
  Tensor scales;  // uint8 [round_up(rows_padded, 128) * k_padded / group]: the tiled layout
  int64_t rows = 0, cols = 0;             // the logical [rows, cols] = [rows, K]
  int64_t rows_padded = 0, k_padded = 0;  // multiples of kFp4NativeRowAlign / kFp4NativeKAlign
  Fp4Format format = Fp4Format::MXFP4;
  float tensor_scale = 1.0f;
};

// The native operand of q (on q's device). rows_padded >= q.rows() must be a multiple of
// kFp4NativeRowAlign (0: the smallest one), k_padded likewise of kFp4NativeKAlign.
Fp4NativeOperand fp4_native_operand(const QuantizedFp4& q, int64_t rows_padded = 0,
                                    int64_t k_padded = 0);

// C[M, N] (fp32, CPU) from two CPU native operands, reading the packed codes and the tiled scales
// through the layout above: the reference the layout tests hold fp4_native_operand to (it must
// equal gemm_fp4_emulated on the operands it came from).
void gemm_fp4_native_reference(Tensor& c, const Fp4NativeOperand& a, const Fp4NativeOperand& b);

}  // namespace lasp
