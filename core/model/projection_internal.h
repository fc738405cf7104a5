// Internals shared by projection.cc (options, the CPU emulation, dispatch) and projection_cuda.cc
// (the CUDA paths). Not for use outside core/model.
#pragma once

#include <cstdint>
#include <string>

#include "core/model/layers.h"
#include "kernels/quantize.h"

namespace lasp {

namespace projection_detail {

enum class Fp8ScaleMode { PerTensor, Delayed, Block };

// PrecisionConfig parsed once into enums.
struct ProjectionOptions {
  Fp8ScaleMode fp8_scaling = Fp8ScaleMode::PerTensor;
  bool fp8_fast_accum = false;  // forward GEMMs only (precision.fp8_fast_accum)
  Fp4Format fp4_format = Fp4Format::MXFP4;
  Fp4Rounding fp4_backward = Fp4Rounding::Stochastic;
  int64_t hadamard_block = 32;
  uint64_t seed = 0;
  int64_t step = 0;
};
ProjectionOptions& options();

// Whether w's gradient is stale (Param::grad_stale): the gradient write that follows must
// overwrite it instead of adding to it. Clears the flag.
inline bool take_stale_grad(Param& w) {
  const bool stale = w.grad_stale;
  w.grad_stale = false;
  return stale;
}

// Validity of the per-step caches of the CUDA paths (quantized weights, quantized activations).
// Caching is on once the trainer calls set_projection_step (it then promises that the weights
// change only between steps, or tells projection_weights_changed()); each of those calls starts a
// new epoch, and a cache entry is valid only in the epoch that filled it.
struct CacheControl {
  bool enabled = false;
  int64_t epoch = 0;
};
CacheControl& cache_control();

constexpr int kAmaxHistoryLength =
    16;  // delayed scaling window (Transformer Engine's default is 1024; ours is short)
// Delayed scaling on the device: kDeviceHistorySlots amax slots (float bits). The window is the
// kAmaxHistoryLength most recent records; a new record goes to slot count % kDeviceHistorySlots,
// the one slot outside the window, so one kernel reads the window and writes the record.
constexpr int kDeviceHistorySlots = kAmaxHistoryLength + 1;
struct DeviceAmaxHistory {
  Tensor slots;       // I32 [kDeviceHistorySlots], zero-initialised
  int64_t count = 0;  // records so far (known on the host: one per quantization)
};

uint64_t mix64(uint64_t z);

// The GEMMs' inner dims must be multiples of the rotation block and of the FP4 group: `in` for
// the forward, `out` (dgrad) and the token count N (wgrad) for the backward.
void check_fp4_dims(const Param& w, int64_t n, bool backward);
// The seed of this FP4 backward call of w (counts the calls per step in w's state).
uint64_t next_fp4_backward_seed(Param& w);

#ifdef LASP_HAVE_CUDA
// CUDA paths (projection_cuda.cc); operands already checked by the dispatcher.
void fp8_forward_cuda(Tensor& y, const Tensor& x, Param& w);
void fp8_backward_cuda(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x);
void fp4_forward_cuda(Tensor& y, const Tensor& x, Param& w);
void fp4_backward_cuda(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x);
void clear_activation_caches_cuda();  // drops the cached quantized activations (and their sources)
                                      // and the amax notes
void note_amax_cuda(const Tensor& x, const Tensor& amax_bits);  // projection_note_amax on CUDA
#endif

}  // namespace projection_detail

// Low-precision state of one projection. The full-precision path keeps none.
struct ProjectionState {
  // FP8 delayed scaling (CPU): one amax history per operand (x and W forward, dy backward), and
  // the amaxes behind the forward's per-tensor scales, which the backward reuses for x^T and W^T
  // so that dgrad/wgrad see the very operands the forward multiplied.
  AmaxHistory x_history{projection_detail::kAmaxHistoryLength};
  AmaxHistory w_history{projection_detail::kAmaxHistoryLength};
  AmaxHistory dy_history{projection_detail::kAmaxHistoryLength};
  float x_amax = 0.0f, w_amax = 0.0f;
  bool fp8_forward_done = false;
  // FP4 backward draws: the step they belong to and how many backward calls it has seen.
  int64_t step = -1;
  uint64_t calls_in_step = 0;
  // CUDA: the quantized weight, kept for the epoch w_epoch (projection_detail::CacheControl), and
  // the device-side delayed-scaling state (the same rules as the CPU's AmaxHistory).
  int64_t w_epoch = -1;
  QuantizedFp8 w_rows, w_cols;  // FP8 W [out, in] and W^T [in, out], E4M3
  QuantizedFp4 w_fp4;           // FP4 forward operand: W rotated and quantized
  projection_detail::DeviceAmaxHistory x_dev, w_dev, dy_dev;
  Tensor x_scale_dev;  // delayed: the scale the last forward used for x (the backward's x^T)
  // Per-tensor (current) scaling: the last forward's x, by identity only (not held), and the
  // device scale it was quantized with, valid in cache epoch x_epoch. The backward's x^T takes
  // that scale (= amax(x) / 448 while x is unchanged) instead of another amax pass over x.
  const void* x_data = nullptr;
  Shape x_shape;
  DType x_dtype = DType::F32;
  int64_t x_epoch = -1;
  Tensor x_current_scale;
  // FP4: the forward's quantized x (rotated, RTN, QuEST mask) for the backward of the same
  // projection, with x itself (held: its memory cannot be reused while saved), valid in cache
  // epoch fp4_x_epoch. The backward takes it (and drops it); projection_release_saved drops it
  // where the layer drops its own saved activations.
  Tensor fp4_x_src;
  int64_t fp4_x_epoch = -1;
  QuantizedFp4 fp4_x;
};

namespace projection_detail {
ProjectionState& state_of(Param& w);
}

}  // namespace lasp
