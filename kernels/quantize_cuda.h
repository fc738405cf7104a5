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
//   - delayed FP8 scaling and every FP4 mode copy the amax to the host (one stream sync): the
//     AmaxHistory and QuantizedFp4::tensor_scale are host values. These check finiteness and
//     throw as the CPU functions do.
//   - Fp4Rounding::MsEden is not implemented on the GPU (throws): its fp64 correction sums are
//     contracted into FMAs by the host compiler, so a bit-identical port needs care; see
//     docs/fp8_gpu.md.
#pragma once

#include "kernels/quantize.h"

namespace lasp {

QuantizedFp8 quantize_fp8_cuda(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                               AmaxHistory* delayed = nullptr);
// out (fp32 or bf16, codes' shape, CUDA) = decode(code) * scale (rounded once to bf16 for bf16).
void dequantize_fp8_cuda(Tensor& out, const QuantizedFp8& q);

QuantizedFp4 quantize_fp4_cuda(const Tensor& x, const Fp4Options& options);
// out (fp32 or bf16, CUDA) = e2m1(code) * scale * tensor_scale. Without the tensor scale every
// MXFP4 and NVFP4 value is exact in bf16 (E2M1 x E8M0 or E2M1 x E4M3 has at most 6 significant
// bits), which the emulated FP4 GEMM relies on.
void dequantize_fp4_cuda(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale = true);

// max |x| over a CUDA fp32/bf16 tensor, copied to the host (synchronizes). NaN if x holds one.
float amax_cuda(const Tensor& x);

}  // namespace lasp
