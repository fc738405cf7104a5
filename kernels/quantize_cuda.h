// CUDA quantizers: the CPU API of kernels/quantize.h for CUDA tensors (defined in quantize.cu,
// CUDA builds only). Same arguments, same results code for code (tests/gpu/quantize_gpu_test.cc
// checks bit equality with the CPU functions); the scalar rules live in kernels/quantize_math.h.
//
// Differences from the CPU functions, all forced by where the data lives:
//   - x may be fp32 or bf16 (a bf16 x gives the codes the CPU gives for x.to(F32));
//   - the outputs (codes, scales, mask) are CUDA tensors; FP4 codes stay one per byte, as on
//     the CPU (packing two per byte is for a native FP4 GEMM, which Hopper does not have);
//   - per-tensor FP8 with current scaling never synchronizes: amax, scale and codes stay on the
//     device (scales[0] is written by the kernel). A non-finite input makes the scale NaN/inf
//     instead of throwing, so the training loop's non-finite check sees it;
//   - delayed FP8 scaling copies the amax to the host (one stream sync): the AmaxHistory is a
//     host value. It checks finiteness and throws as the CPU function does;
//   - FP4 never synchronizes either: the tensor scale stays on the GPU
//     (QuantizedFp4::tensor_scale_device; tensor_scale stays 1; fp4_tensor_scale() reads it on the
//     host). A NaN or an infinity in x makes it NaN instead of throwing, so every dequantized
//     value and GEMM output of the tensor is NaN and the training loop's check stops the run.
//   - Fp4Rounding::MsEden runs as two kernels (no-clip scales and round-to-nearest codes, then
//     one thread per row and correction block for the scale correction); the correction's fp64
//     sums use explicit fma on both sides (qmath::eden_correct_block), so they agree bit for bit.
#pragma once

#include "kernels/hadamard.h"
#include "kernels/quantize.h"

namespace lasp {

QuantizedFp8 quantize_fp8_cuda(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                               AmaxHistory* delayed = nullptr);
// out (fp32 or bf16, codes' shape, CUDA) = decode(code) * scale (rounded once to bf16 for bf16).
void dequantize_fp8_cuda(Tensor& out, const QuantizedFp8& q);

QuantizedFp4 quantize_fp4_cuda(const Tensor& x, const Fp4Options& options);
// quantize_fp4_cuda(hadamard_rotated(x, spec), options) with the rotation done inside the
// quantizer (H x is never written; one extra read of x for its amax), when rows hold whole groups
// and whole rotation blocks, the block is 16, 32, 64 or 128 and an MS-EDEN correction block
// divides the quantizer's 128-group tile and the row; else exactly that composition. Same codes,
// scales, mask and tensor scale bit for bit.
QuantizedFp4 quantize_fp4_rotated_cuda(const Tensor& x, const HadamardSpec& spec, const Fp4Options& options);
// out (fp32 or bf16, CUDA) = e2m1(code) * scale * tensor_scale. Without the tensor scale every
// MXFP4 and NVFP4 value is exact in bf16 (E2M1 x E8M0 or E2M1 x E4M3 has at most 6 significant
// bits), which the emulated FP4 GEMM relies on.
void dequantize_fp4_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale = true);
// The same into out [cols, rows] fp32 (the transpose, written in the same pass; 2-D q only).
void dequantize_fp4_transposed_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale = true);

// max |x| over a CUDA fp32/bf16 tensor, copied to the host (synchronizes). NaN if x holds one.
float amax_cuda(const Tensor& x);

// ---------------------------------------------------------------- projections (no host syncs)
// The pieces core/model/projection.cc runs on CUDA tensors. Nothing here synchronizes: amaxes and
// scales stay in device memory, where cuBLASLt reads them (CUBLASLT_MATMUL_DESC_*_SCALE_POINTER).
// Amaxes are stored as the float bits of max |x| in uint32 slots (DType::I32 tensors): for x >= 0
// the bit patterns order like the values, so atomicMax on the bits is a max on the floats, and NaN
// sorts above inf (a non-finite input gives a non-finite scale, which the training loop catches).

// amax_bits[index] = max(amax_bits[index], max |x|) (reset = false), or = max |x| (reset = true).
// x: contiguous fp32/bf16 CUDA; amax_bits: I32 CUDA. 16-byte loads, one atomic per CTA.
void amax_into_cuda(Tensor& amax_bits, int64_t index, const Tensor& x, bool reset = true);
// amax_bits[index] = 0.
void amax_reset_cuda(Tensor& amax_bits, int64_t index);

// Where a per-tensor FP8 scale s comes from, on the device:
//   amax defined: s = a / format_max (a = 0 -> 1) with a = max over amax[i], i != skip (skip = -1:
//                 all); delayed scaling keeps its window here (the slot being recorded is skipped);
//   else scale:   s = scale[0] (a scale an earlier quantization wrote, e.g. the forward's).
// record (optional): this tensor's max |x| is atomicMax'ed into record[record_index] in the same pass.
struct Fp8DeviceScale {
  Tensor amax;  // I32 [n]
  int64_t skip = -1;
  Tensor scale;  // F32 [1]
  Tensor record;  // I32
  int64_t record_index = 0;
};

// Per-tensor FP8 codes of a 2-D [rows, cols] fp32/bf16 CUDA tensor x in ONE pass over x:
//   rows (want_rows): codes [rows, cols_p] (x's layout: K-major when cols is a GEMM's inner dim);
//   cols (want_cols): codes of x^T, [cols, rows_p] (K-major when rows is the inner dim: the
//                     backward GEMMs);
// with cols_p = round_up(cols, pad_to), rows_p = round_up(rows, pad_to) (pad_to a multiple of 16)
// and zero codes in the padding: the inner dims are ready for cuBLASLt FP8 (K % 16 == 0).
// code = encode(x / s), exactly the CPU quantize_fp8 rule, so the codes equal the CPU's for the
// same scale. Both outputs share one scales tensor ([1], written by the kernel). Grid-stride over
// 128x64 tiles, 16-byte loads and stores on both sides (the transpose through shared memory).
struct Fp8RowsCols {
  QuantizedFp8 rows, cols;
};
Fp8RowsCols quantize_fp8_rows_cols_cuda(const Tensor& x, Fp8Format format, const Fp8DeviceScale& scale,
                                        bool want_rows, bool want_cols, int64_t pad_to = 16);

// Block FP8 codes of a 2-D [rows, cols] fp32/bf16 CUDA tensor x and/or of its transpose, in ONE
// pass over x (scaling Block1x128 or Block128x128):
//   rows (want_rows): quantize_fp8_cuda(x, format, scaling);
//   cols (want_cols): quantize_fp8_cuda(t, format, scaling) with t = x^T zero-padded to
//                     cols_ld >= rows columns (0: rows), as transpose_pad_cuda writes it;
// code for code and scale for scale. The backward GEMMs take the cols (K-major along x's rows);
// a 128x128 block of x^T is a block of x transposed, so both share the block's scale.
Fp8RowsCols quantize_fp8_block_rows_cols_cuda(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                                              bool want_rows, bool want_cols, int64_t cols_ld = 0);

// out [cols, out.dim(1)] = x^T with zeros in columns >= rows (out.dim(1) >= rows); x a 2-D
// fp32/bf16 CUDA tensor, out of the same dtype.
void transpose_pad_cuda(Tensor& out, const Tensor& x);

// The blockwise Hadamard transform of kernels/hadamard.h on CUDA, bit-identical to the CPU
// (the same butterflies in the same order, the same signs): per block of spec.block (2..1024)
// along the last dim, y = H D x (inverse = false) or y = D H x (inverse = true). x: fp32/bf16;
// y: fp32/bf16 of x's shape (not x's storage); mask (optional, uint8, x's shape): x is zeroed
// where mask == 0 first; accumulate: y += instead of y =.
void hadamard_cuda(Tensor& y, const Tensor& x, const HadamardSpec& spec, bool inverse,
                   const Tensor* mask = nullptr, bool accumulate = false);

}  // namespace lasp
