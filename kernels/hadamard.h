// Blockwise fast Walsh-Hadamard transform (FWHT) along the last dimension.
//
// The last dimension is cut into contiguous blocks of `block` elements (a power of two that
// divides it); each block v is replaced by
//   forward:  v <- H_g D v        inverse:  v <- D H_g v   (= (H_g D)^T v)
// where H_g is the g x g Sylvester-Hadamard matrix scaled by 1/sqrt(g) (symmetric, orthonormal:
// H_g H_g = I) and D = diag(s_0 .. s_{g-1}) holds random signs s_j = +-1 when `randomized`, the
// identity otherwise. The signs depend only on (seed, j) (kernels/counter_rng.h:
// philox_u32(seed, kHadamardSignStream, j) & 1 -> -1), so every block and every row shares them,
// and a CUDA kernel reproduces them exactly.
//
// Why blockwise along the last dim: a GEMM C = A B^T with A [M, K], B [N, K] satisfies
// (A R^T)(B R^T)^T = A B^T for any orthogonal R acting on K; rotating both operands along the
// inner dimension with the same blocks and signs leaves the product unchanged while spreading
// outliers across each block before quantization (Quartet, QuaRot, HALO).
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace lasp {

struct HadamardSpec {
  int64_t block = 32;       // g: rotation block along the last dim (power of two, divides it)
  bool randomized = false;  // random sign flips D before H
  uint64_t seed = 0;        // sign seed when randomized
};

// A new fp32 tensor on x's device holding per-block H D x. x: fp32 (CPU), fp32 or bf16 (CUDA,
// through hadamard_cuda, bit-identical to the CPU).
Tensor hadamard_rotated(const Tensor& x, const HadamardSpec& spec);

// y = per-block H D x (y may be x: in place). x, y: contiguous fp32 CPU tensors of one shape.
void hadamard_forward(Tensor& y, const Tensor& x, const HadamardSpec& spec);
// y = per-block D H x, the exact inverse (transpose) of hadamard_forward.
void hadamard_inverse(Tensor& y, const Tensor& x, const HadamardSpec& spec);

// Raw helpers the quantizers share: in-place unnormalized FWHT of n (power of two) floats, and
// the sign of column j (within a block) for a randomized spec.
void fwht_unnormalized(float* v, int64_t n);
float hadamard_sign(const HadamardSpec& spec, int64_t j);

}  // namespace lasp
