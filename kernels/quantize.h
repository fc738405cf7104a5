// Low-precision quantizers (CPU reference implementation) and exactly emulated low-precision GEMMs.
//
// Everything here takes contiguous fp32 CPU tensors of any rank and works on the 2-D view
// [rows, cols], cols = the last dim (the GEMM's inner dimension K when the tensor is a GEMM
// operand in "TN" layout: A [M, K], B [N, K], C = A B^T). A CUDA implementation mirrors these
// signatures and must produce the same codes bit for bit (the random draws come from the
// counter-based generator in kernels/counter_rng.h, addressed by element / group index).
//
// FP8 (docs/low_precision.md):
//   code = encode(x / s) with saturation, x ~= decode(code) * s, s = amax / format_max (fp32);
//   s is one per tensor (current amax, or delayed: the max over an AmaxHistory), one per 1x128
//   row block (activations, gradients) or one per 128x128 tile (weights). amax == 0 -> s = 1.
//
// FP4 (E2M1 elements, values {0, .5, 1, 1.5, 2, 3, 4, 6} and negatives, code in the low nibble):
//   MXFP4: group 32 along cols, scale = E8M0 power of two; tensor_scale = 1.
//   NVFP4: group 16 along cols, scale = E4M3, tensor_scale = fp32 (amax / (448 * 6) style).
//   x ~= e2m1(code) * scale(group) * tensor_scale. Scale rules per mode are in quantize.cc and in
//   docs/low_precision.md (RTN follows the OCP MX spec / NVIDIA recipe; SR and MS-EDEN choose
//   scales with headroom so no element clips, which would bias the estimate).
//
// Rounding of the elements:
//   Nearest     round to nearest, ties to even (deterministic);
//   Stochastic  round up with probability (v - lo) / (hi - lo): E[q] = v (unbiased);
//   MsEden      Quartet II's micro-scaled EDEN: RTN on the elements, then per correction block
//               (eden_block elements along cols, several groups) c = <x, x> / <x, x_rtn>, and
//               each group scale times c is stochastically rounded onto the scale grid (E4M3 or
//               E8M0), so E[x_hat] = c x_rtn. Unbiased in expectation over a uniformly random
//               rotation (EDEN): the caller rotates x with a randomized Hadamard transform of
//               block eden_block first (one RHT stage leaves a small residual bias, see docs).
// Clipping (forward pass, Quartet / QuEST): Quest sets each group's scale from its RMS instead
// of its absmax (MXFP4 only), clips, and records a mask (1 = not clipped) for the backward.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "core/tensor.h"
#include "kernels/hadamard.h"

namespace lasp {

// ---------------------------------------------------------------- FP8

enum class Fp8Format : uint8_t { E4M3, E5M2 };
enum class Fp8Scaling : uint8_t { PerTensor, Block1x128, Block128x128 };
// "per-tensor", "1x128", "128x128" (messages, profile regions, test traces).
inline const char* fp8_scaling_name(Fp8Scaling s) {
  return s == Fp8Scaling::PerTensor    ? "per-tensor"
         : s == Fp8Scaling::Block1x128 ? "1x128"
                                       : "128x128";
}

constexpr int64_t kFp8BlockSize = 128;

// Delayed scaling: the amax used for this step's scale is the max over the last `length`
// recorded amaxes (Transformer Engine's "max" rule); the current tensor's amax is recorded after
// quantizing. An empty history falls back to the current amax.
class AmaxHistory {
 public:
  explicit AmaxHistory(int length = 16);
  void record(float amax);
  bool empty() const { return history_.empty(); }
  float amax() const;  // max over the window; 0 when empty
  int length() const { return length_; }
  // The window's records, oldest first (for checkpoints), and the inverse: restore keeps the
  // newest length() of `values` (each finite and >= 0, else it throws and changes nothing).
  std::vector<float> values() const { return {history_.begin(), history_.end()}; }
  void restore(const std::vector<float>& values);

 private:
  int length_;
  std::deque<float> history_;
};

struct QuantizedFp8 {
  Tensor codes;   // uint8, the input's shape: E4M3 or E5M2 codes
  Tensor scales;  // fp32 dequantization scales: [1] | [rows, ceil(cols/128)] | [ceil(rows/128), ceil(cols/128)]
  Fp8Format format = Fp8Format::E4M3;
  Fp8Scaling scaling = Fp8Scaling::PerTensor;
  int64_t rows() const;
  int64_t cols() const;
};

float fp8_format_max(Fp8Format f);
uint8_t fp8_encode(float x, Fp8Format f);  // RTN-even, saturating
float fp8_decode(uint8_t code, Fp8Format f);

// Quantizes x. `delayed` (per-tensor scaling only) supplies the amax history; x's amax is
// recorded into it after quantizing.
QuantizedFp8 quantize_fp8(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                          AmaxHistory* delayed = nullptr);
// out (fp32, codes' shape) = decode(code) * scale.
void dequantize_fp8(Tensor& out, const QuantizedFp8& q);
Tensor dequantize_fp8(const QuantizedFp8& q);

// C [M, N] = dequant(A) dequant(B)^T with A [M, K], B [N, K] quantized along K; fp32 accumulation
// (what Hopper's FP8 tensor cores with fp32 accumulation compute, up to summation order).
void gemm_fp8_emulated(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b);

// ---------------------------------------------------------------- FP4

enum class Fp4Format : uint8_t { MXFP4, NVFP4 };
enum class Fp4Rounding : uint8_t { Nearest, Stochastic, MsEden };
enum class Fp4Clip : uint8_t { AbsMax, Quest };

int64_t fp4_group_size(Fp4Format f);  // 32 (MXFP4) or 16 (NVFP4)

// QuEST's clipping factor for E2M1 on Gaussian data: the clip range is alpha * RMS(group), with
// alpha the MSE-optimal clipping point for a standard normal quantized to the E2M1 grid.
constexpr float kQuestAlphaE2M1 = 2.92247856f;

struct Fp4Options {
  Fp4Format format = Fp4Format::MXFP4;
  Fp4Rounding rounding = Fp4Rounding::Nearest;
  Fp4Clip clip = Fp4Clip::AbsMax;  // Quest needs MXFP4 and Nearest
  uint64_t seed = 0;               // stochastic draws: philox(seed, stream, index)
  uint64_t stream = 0;
  int64_t eden_block = 128;  // MsEden correction block along cols (a multiple of the group)
};

struct QuantizedFp4 {
  Tensor codes;   // uint8, the input's shape, one E2M1 code per byte (low nibble; unpacked on CPU)
  Tensor scales;  // uint8 [rows, ceil(cols/group)]: E8M0 (MXFP4) or E4M3 (NVFP4) codes
  float tensor_scale = 1.0f;  // fp32 factor applied to every element (the GEMM epilogue's alpha)
  // The CUDA quantizers keep that factor on the GPU instead (fp32 [1]; tensor_scale stays 1):
  // the NVFP4 tensor scale, and for MXFP4 1, both NaN when the input held a NaN or an infinity.
  // The CUDA GEMMs and dequantization read it there; fp4_tensor_scale() reads it on the host.
  Tensor tensor_scale_device;
  Tensor mask;    // uint8, codes' shape, 1 = inside the clip range (Quest only; else undefined)
  Fp4Format format = Fp4Format::MXFP4;
  int64_t rows() const;
  int64_t cols() const;
  int64_t group() const { return fp4_group_size(format); }
  float scale(int64_t row, int64_t group_index) const;  // decoded group scale (no tensor_scale)
};

QuantizedFp4 quantize_fp4(const Tensor& x, const Fp4Options& options);
// quantize_fp4(hadamard_rotated(x, spec), options); on CUDA the rotation runs inside the
// quantizer where it can (quantize_fp4_rotated_cuda), with the same results.
QuantizedFp4 quantize_fp4_rotated(const Tensor& x, const HadamardSpec& spec, const Fp4Options& options);
// q's tensor scale as a host value: tensor_scale, or tensor_scale_device copied to the host
// (one synchronisation) when the quantizer left it on the GPU.
float fp4_tensor_scale(const QuantizedFp4& q);
// Shorthands.
QuantizedFp4 quantize_mxfp4(const Tensor& x, Fp4Rounding rounding = Fp4Rounding::Nearest,
                            Fp4Clip clip = Fp4Clip::AbsMax, uint64_t seed = 0, uint64_t stream = 0);
QuantizedFp4 quantize_nvfp4(const Tensor& x, Fp4Rounding rounding = Fp4Rounding::Nearest,
                            uint64_t seed = 0, uint64_t stream = 0);

// out (fp32, codes' shape) = e2m1(code) * scale * tensor_scale (with_tensor_scale = false leaves
// tensor_scale out: then every element is exact in fp32, bf16 and fp8 e4m3 for MXFP4).
void dequantize_fp4(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale = true);
Tensor dequantize_fp4(const QuantizedFp4& q, bool with_tensor_scale = true);

// C [M, N] = tensor_scale_a * tensor_scale_b * (e2m1 * scale)_A (e2m1 * scale)_B^T, A [M, K] and
// B [N, K] quantized along K with the same format. The elementwise dequantization is exact; the
// products and sums run in fp32 (emulating FP4 tensor cores, which Hopper lacks).
void gemm_fp4_emulated(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b);

// Stochastic rounding of v (|v| <= 6) onto the E2M1 grid with uniform u in [0, 1):
// up when u < (|v| - lo) / (hi - lo). Returns the code. Exposed for tests and the CUDA port.
uint8_t e2m1_round_stochastic(float v, float u);
// Stochastic rounding of s > 0 onto the positive E4M3 grid (up to 448) or onto powers of two
// (E8M0). Returns the code.
uint8_t e4m3_round_stochastic(float s, float u);
uint8_t e8m0_round_stochastic(float s, float u);

// ---------------------------------------------------------------- Quartet linear layer

// y = x W^T with x [N, in], W [out, in] (PyTorch layout), every GEMM in FP4:
//   forward   y  = Q(x H^T) Q(W H^T)^T, H = Hadamard blocks along `in` (the inner dim), Q = RTN
//             with QuEST clipping (MXFP4), masks M_x, M_w of the unclipped elements saved;
//   dgrad     G_x = (Q_b(dy R_o^T) Q_b(Wq^T R_o^T)^T) .* M_x,  dx  = G_x H
//             (inner dim `out`: dy and Wq^T rotated along out with a fresh randomized R_o);
//   wgrad     G_w = (Q_b(dy^T R_n^T) Q_b(xq^T R_n^T)^T) .* M_w, dW += G_w H
//             (inner dim N tokens: dy^T and xq^T rotated along N with R_n);
// where xq, Wq are the dequantized forward operands (in the rotated space) and Q_b is
// backward_rounding (Stochastic or MsEden) in backward_format. Requires in, out and N to be
// multiples of the rotation blocks.
// C [M, N] (fp32, on a's device) = Q(A R^T) Q(B R^T)^T for A [M, K], B [N, K]: both rotated along
// K by the same randomized Hadamard R (block `block`, signs from seed and stream), then quantized
// with the backward rounding (streams 2 stream and 2 stream + 1). The backward GEMMs of the
// Quartet layer below and of the CUDA FP4 projections (core/model/projection_cuda.cc).
Tensor quartet_backward_gemm(const Tensor& a, const Tensor& b, Fp4Format format, Fp4Rounding rounding,
                             int64_t block, uint64_t seed, uint64_t stream);

struct QuartetConfig {
  int64_t forward_block = 32;           // Hadamard block for the forward (Quartet: 32 = MX group)
  int64_t backward_block = 32;          // randomized Hadamard block for the backward GEMMs
  Fp4Rounding backward_rounding = Fp4Rounding::Stochastic;
  Fp4Format backward_format = Fp4Format::MXFP4;
};

struct QuartetSaved {
  Tensor xq, wq;          // fp32 [N, in], [out, in]: dequantized rotated forward operands
  Tensor mask_x, mask_w;  // uint8, same shapes: 1 where QuEST did not clip
};

void quartet_linear_forward(Tensor& y, QuartetSaved& saved, const Tensor& x, const Tensor& w,
                            const QuartetConfig& config);
// dx (if defined) is overwritten; dw (if defined) is accumulated into, like linear_backward.
// `seed` drives the backward rotations' signs and the stochastic draws (use a fresh one per step).
void quartet_linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const QuartetSaved& saved,
                             const QuartetConfig& config, uint64_t seed);

}  // namespace lasp
