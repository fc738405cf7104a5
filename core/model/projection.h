// Projections: every weight matrix product of the model (q, k, v, gates, out, MLP) goes through
// these two functions, which apply the projection's precision:
//   full  the model's compute dtype: fp32 on CPU; bf16 operands with fp32 accumulation on CUDA
//         (the forward reads the bf16 copy Param::compute, gradients land in the fp32 master grad)
//   fp8   E4M3 forward operands, E5M2 gradients in dgrad and wgrad, fp32 accumulation; scales per
//         tensor (current or delayed amax) or per block (1x128 activations/gradients, 128x128
//         weights), each GEMM operand quantized along that GEMM's inner dimension
//   fp4   Quartet: Hadamard-rotated MXFP4/NVFP4 operands, QuEST clipping forward (MXFP4; NVFP4
//         forward is RTN), stochastic rounding or MS-EDEN backward (kernels/quantize.h)
// On CPU the low-precision products are emulated exactly (quantize, dequantize, fp32 GEMM) on fp32
// tensors. On CUDA (x, y, dy, dx bf16 or fp32; fp32 master weight and gradient) fp8 runs cuBLASLt's
// FP8 GEMMs (Hopper) on operands quantized by fused kernels without host synchronisation, and fp4
// is Quartet emulated exactly on bf16 tensor cores (Hopper has no FP4 units); same quantization
// rules as the CPU, so the two agree up to fp32 summation order (docs/fp8_gpu.md).
//
// Options: the precision of each weight is Param::precision (set by the model from the config
// section 'precision:'); the remaining knobs (fp8_scaling, fp4_format, fp4_backward,
// hadamard_block) and the random seed are process-wide, set once with set_projection_options.
// The FP4 backward's randomness is a pure function of (seed, parameter name, step, call index
// within the step), so a run resumed at a step boundary draws exactly what the uninterrupted run
// drew, provided the trainer calls set_projection_step(step) before each step.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/config.h"
#include "core/model/layers.h"

namespace lasp {

Precision precision_from_name(const std::string& name);  // "bf16" (= full), "fp8", "fp4"
const char* precision_name(Precision p);

// Process-wide low-precision options (validated here; defaults = PrecisionConfig{}, seed 0).
void set_projection_options(const PrecisionConfig& config, uint64_t seed);
// The optimizer step about to run (0-based); keys the FP4 backward's random draws. It also turns
// on the CUDA paths' per-step caches (the quantized weight, and a quantized activation shared by
// the projections that read it) and starts a new cache epoch: from the first call on, the weights
// must change only between steps, or the change must be announced with projection_weights_changed
// (the trainer calls it after the optimizer step, so an evaluation sees the new weights); and an
// activation handed to a projection must not be modified in place while the step runs.
void set_projection_step(int64_t step);
// Drops the cached quantized weights and activations (a new cache epoch).
void projection_weights_changed();
// The seed of the call-th FP4 backward of parameter `name` in `step` (exposed for tests).
uint64_t projection_backward_seed(uint64_t seed, const std::string& name, int64_t step, uint64_t call);

// Hands the FP8 projections max |x| of an activation or gradient x, computed as a by-product by
// the op that produced it (amax_bits: I32 [1] on x's device, float bits, e.g. swiglu_forward's
// h_amax). The next per-tensor (current scaling) FP8 quantization of exactly x on CUDA (the
// forward's x, or the backward's dy) takes it instead of an amax pass over x. Only in the
// trainer's mode (set_projection_step) and for the current cache epoch; a few notes are kept,
// each used once. The caller promises x is not modified until it is quantized.
void projection_note_amax(const Tensor& x, const Tensor& amax_bits);

// FP8 delayed scaling carries amax histories from step to step (x, W and dy windows of each FP8
// projection); checkpoints save and restore them so that a resumed run scales exactly as an
// uninterrupted one. The state is an F32 CPU tensor [3, 1 + window] (rows x, W, dy; column 0
// the number n of records in the window, then the n records oldest first, zero padded), the same
// on CPU and CUDA (the device slots are read back in record order).
bool projection_keeps_scaling_state(const Param& w);  // an FP8 weight under delayed scaling
Shape projection_scaling_state_shape();
Tensor projection_scaling_state(Param& w);
// Throws (naming w) on a wrong shape or a bad record, and then leaves w's state unchanged.
void set_projection_scaling_state(Param& w, const Tensor& state);

// y = x W^T  (x [N, in], W [out, in], y [N, out]).
void projection_forward(Tensor& y, const Tensor& x, Param& w);
// Drops what w's forward saved for its backward beyond the caller's own tensors (FP4 on CUDA:
// the quantized x, which the backward would otherwise rebuild). The backward drops it too; a
// layer calls this where it drops its saved activations (release, recomputation), so that a
// released layer holds no memory for w.
void projection_release_saved(Param& w);
// dx = dy W (or dx += dy W when accumulate_dx), and W.grad += dy^T x.
void projection_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x);

}  // namespace lasp
