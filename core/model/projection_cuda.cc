// Low-precision projections on CUDA tensors (called by projection.cc's dispatch). The same
// quantization rules as the CPU emulation in projection.cc, so the two agree up to fp32 summation
// order; docs/fp8_gpu.md describes the design and the measured cost.
//
// FP8, the three GEMMs (cuBLASLt on Hopper wants both operands K-major, "TN"):
//   forward  y  = x W^T     A = x [N, in] E4M3 (x's own layout)     B = W [out, in] E4M3
//   dgrad    dx = dy W      A = dy [N, out] E5M2 (dy's own layout)  B = W^T [in, out] E4M3
//   wgrad    dW += dy^T x   A = dy^T [out, Np] E5M2                 B = x^T [in, Np] E4M3
// Every inner dim is zero-padded to a multiple of 16 by the quantizer (cuBLASLt FP8 needs K % 16
// == 0; Np = N rounded up), gemm_fp8 pads M and N itself, so any shape works (model dims that are
// multiples of 16 copy nothing). Per-tensor scales live on the device and go to cuBLASLt as
// pointers: no host synchronisation anywhere.
//   per_tensor  current amax: one amax kernel (or the amax an op noted as a by-product,
//               projection_note_amax), then one pass that writes the codes (and the
//               transpose: dy gives dy and dy^T in one pass). W and W^T are quantized once per
//               cache epoch (= step); an activation read by several projections (x by q, k, v,
//               z and the gate; by gate and up) is quantized once (a one-entry cache per
//               direction, keyed by the tensor's storage, which the entry holds); the backward's
//               x^T reuses the forward's scale for x (kept in the weight's state, by x's identity),
//               so x is read by one amax pass in all.
//   delayed     the CPU's AmaxHistory rules on the device (DeviceAmaxHistory): one pass per
//               operand that scales by the window's max and records the tensor's own amax. The
//               forward's x and W scales are reused by the backward, as on the CPU. No caching
//               (each forward records into the histories, as the CPU does).
//   block       1x128 (x, x^T, dy, dy^T) / 128x128 (W, W^T) scales; the GEMMs in cuBLASLt's
//               block modes or our kernel (gemm_fp8's Auto). W once per epoch and a shared x
//               once per direction, through the same caches as per_tensor; dy's rows and dy^T's
//               1x128 blocks in one pass.
// FP4 (Quartet): Hadamard rotations, MXFP4/NVFP4 quantization (QuEST clipping forward,
// stochastic rounding backward) on the GPU with the CPU's seeds and streams, then gemm_fp4: native
// FP4 tensor cores on sm_100 and later, on Hopper the exact dequantization to bf16 and the bf16
// GEMM (kernels/gemm_fp4.h); the backward rounds by SR or MS-EDEN (precision.fp4_backward), as
// the CPU.
#ifdef LASP_HAVE_CUDA

#include <mutex>
#include <vector>

#include "core/log.h"
#include "core/model/projection.h"
#include "core/model/projection_internal.h"
#include "core/profile.h"
#include "kernels/gemm_fp4.h"
#include "kernels/gemm_fp8.h"
#include "kernels/quantize_cuda.h"

namespace lasp::projection_detail {

namespace {

constexpr int64_t kFp8Align = 16;  // cuBLASLt FP8: K % 16 == 0 (the quantizers pad the inner dims)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool cache_valid(int64_t epoch) {
  return cache_control().enabled && epoch == cache_control().epoch;
}

// ---------------------------------------------------------------- FP8

// A quantized activation and its source tensor (held: its memory cannot be reused while cached).
struct ActivationEntry {
  Tensor src;
  int64_t epoch = -1;
  QuantizedFp8 q;
  bool matches(const Tensor& x) const {
    return src.defined() && cache_valid(epoch) && src.raw() == x.raw() &&
           src.shape() == x.shape() && src.dtype() == x.dtype();
  }
};

std::mutex g_cache_mu;
ActivationEntry g_forward_x;    // x [N, in] codes (the forward's A)
ActivationEntry g_backward_xt;  // x^T [in, Np] codes (the wgrad's B)

// max |t| handed over by the op that produced t (projection_note_amax), by identity of t's data
// (not held: t is alive while the projection that reads it runs). Each note is used once.
struct AmaxNote {
  const void* data = nullptr;
  Shape shape;
  DType dtype = DType::F32;
  int64_t epoch = -1;
  Tensor amax;  // I32 [1]
};
constexpr size_t kMaxAmaxNotes = 4;  // the SwiGLU backward notes two gradients at once
std::vector<AmaxNote> g_amax_notes;  // guarded by g_cache_mu

Tensor take_noted_amax(const Tensor& t) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  for (size_t i = 0; i < g_amax_notes.size(); ++i) {
    const AmaxNote& n = g_amax_notes[i];
    if (cache_valid(n.epoch) && n.data == t.raw() && n.shape == t.shape() && n.dtype == t.dtype()) {
      const Tensor amax = n.amax;
      g_amax_notes.erase(g_amax_notes.begin() + static_cast<std::ptrdiff_t>(i));
      return amax;
    }
  }
  return Tensor();
}

// x's current per-tensor scale: from a noted amax, else one amax pass over x.
Fp8DeviceScale current_scale(const Tensor& x) {
  Fp8DeviceScale s;
  s.amax = take_noted_amax(x);
  if (!s.amax.defined()) {
    s.amax = Tensor::empty({1}, DType::I32, x.device());
    amax_into_cuda(s.amax, 0, x, true);
  }
  return s;
}

// The scale of the next delayed-scaling quantization from history h: the max over the window
// (an empty window: the current amax), recording this tensor's amax in the same pass.
Fp8DeviceScale delayed_scale(DeviceAmaxHistory& h, const Tensor& x) {
  if (!h.slots.defined()) h.slots = Tensor::zeros({kDeviceHistorySlots}, DType::I32, x.device());
  const int64_t slot = h.count % kDeviceHistorySlots;
  Fp8DeviceScale s;
  s.amax = h.slots;
  if (h.count == 0) {
    amax_into_cuda(h.slots, slot, x, true);  // every other slot is still zero: max = current amax
  } else {
    amax_reset_cuda(h.slots, slot);
    s.skip = slot;
    s.record = h.slots;
    s.record_index = slot;
  }
  ++h.count;
  return s;
}

// x (the forward's A) or x^T zero-padded to np columns (the wgrad's B) in E4M3, through the
// one-entry cache of that direction: with x's current per-tensor scale (known_scale, optional: a
// device scale already computed from this x, the forward's, which saves the amax pass), or in
// 1x128 blocks along the GEMM's inner dim (block mode: x's rows for the forward, x^T's rows, i.e.
// 128 tokens of one feature, for the wgrad).
QuantizedFp8 activation_codes(const Tensor& x, bool transposed, Fp8ScaleMode mode, int64_t np,
                              const Tensor& known_scale = Tensor()) {
  const Fp8Scaling scaling = mode == Fp8ScaleMode::Block ? Fp8Scaling::Block1x128 : Fp8Scaling::PerTensor;
  ActivationEntry& e = transposed ? g_backward_xt : g_forward_x;
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    if (e.matches(x) && e.q.scaling == scaling) return e.q;
  }
  QuantizedFp8 out;
  if (mode == Fp8ScaleMode::Block) {
    out = transposed
              ? quantize_fp8_block_rows_cols_cuda(x, Fp8Format::E4M3, scaling, false, true, np).cols
              : quantize_fp8_cuda(x, Fp8Format::E4M3, scaling);
  } else {
    Fp8DeviceScale scale;
    if (known_scale.defined()) {
      scale.scale = known_scale;
    } else {
      scale = current_scale(x);
    }
    const Fp8RowsCols q =
        quantize_fp8_rows_cols_cuda(x, Fp8Format::E4M3, scale, !transposed, transposed);
    out = transposed ? q.cols : q.rows;
  }
  if (cache_control().enabled) {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    e.src = x;
    e.epoch = cache_control().epoch;
    e.q = out;
  }
  return out;
}

// The forward's scale for x (per-tensor current scaling), kept in w's state by identity of x's
// data: the backward of the same projection in the same cache epoch is given the very tensor the
// forward read (the model saves it, or recomputes it identically), so its amax is the forward's.
void remember_forward_x(ProjectionState& st, const Tensor& x, const Tensor& scale) {
  st.x_data = x.raw();
  st.x_shape = x.shape();
  st.x_dtype = x.dtype();
  st.x_epoch = cache_control().epoch;
  st.x_current_scale = scale;
}

Tensor forward_x_scale(const ProjectionState& st, const Tensor& x) {
  const bool same = st.x_current_scale.defined() && cache_valid(st.x_epoch) &&
                    st.x_data == x.raw() && st.x_shape == x.shape() && st.x_dtype == x.dtype();
  return same ? st.x_current_scale : Tensor();
}

// W and W^T in E4M3 for per-tensor (current) or block scaling, once per cache epoch.
void fp8_weight(Param& w, ProjectionState& st, Fp8ScaleMode mode) {
  if (st.w_rows.codes.defined() && st.w_cols.codes.defined() && cache_valid(st.w_epoch)) return;
  if (mode == Fp8ScaleMode::Block) {
    const Fp8RowsCols q = quantize_fp8_block_rows_cols_cuda(w.value, Fp8Format::E4M3,
                                                            Fp8Scaling::Block128x128, true, true);
    st.w_rows = q.rows;
    st.w_cols = q.cols;
  } else {
    const Fp8RowsCols q =
        quantize_fp8_rows_cols_cuda(w.value, Fp8Format::E4M3, current_scale(w.value), true, true);
    st.w_rows = q.rows;
    st.w_cols = q.cols;
  }
  st.w_epoch = cache_control().epoch;
}

// ---------------------------------------------------------------- FP4

void check_fp4_cuda_options(const Param& w) {
  static std::once_flag logged;
  std::call_once(logged, [] {
    const ProjectionOptions& o = options();
    LASP_INFO() << "fp4 projections on CUDA: Quartet EMULATED exactly (Hadamard block "
                << o.hadamard_block << ", "
                << (o.fp4_format == Fp4Format::MXFP4 ? "MXFP4 with QuEST clipping" : "NVFP4 RTN")
                << " forward, "
                << (o.fp4_backward == Fp4Rounding::MsEden ? "MS-EDEN" : "stochastic rounding")
                << " backward, quantized on the GPU, dequantized "
                   "exactly to bf16, "
                   "bf16 tensor cores): the arithmetic of FP4 GEMMs, not their speed";
  });
}

// The forward's operand: t rotated along its rows by H (block hadamard_block), then MXFP4 RTN
// with QuEST clipping (mask kept) or NVFP4 RTN (no mask) — what the CPU path quantizes.
QuantizedFp4 fp4_forward_operand(const Tensor& t) {
  const ProjectionOptions& o = options();
  Fp4Options q;
  q.format = o.fp4_format;
  q.rounding = Fp4Rounding::Nearest;
  q.clip = o.fp4_format == Fp4Format::MXFP4 ? Fp4Clip::Quest : Fp4Clip::AbsMax;
  return quantize_fp4_rotated(t, HadamardSpec{o.hadamard_block, false, 0}, q);
}

// The forward's operand for x, through a one-entry cache (the projections that read the same x,
// q, k, v and z, or gate and up, quantize it once), saved in w's state for w's backward.
Tensor g_fp4_x_src;  // guarded by g_cache_mu
int64_t g_fp4_x_epoch = -1;
QuantizedFp4 g_fp4_x;

bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.defined() && a.raw() == b.raw() && a.shape() == b.shape() && a.dtype() == b.dtype();
}

QuantizedFp4 fp4_forward_x(ProjectionState& st, const Tensor& x) {
  QuantizedFp4 q;
  bool hit = false;
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    if (cache_valid(g_fp4_x_epoch) && same_tensor(g_fp4_x_src, x)) {
      q = g_fp4_x;
      hit = true;
    }
  }
  if (!hit) q = fp4_forward_operand(x);
  if (cache_control().enabled) {
    if (!hit) {
      std::lock_guard<std::mutex> lock(g_cache_mu);
      g_fp4_x_src = x;
      g_fp4_x_epoch = cache_control().epoch;
      g_fp4_x = q;
    }
    st.fp4_x_src = x;
    st.fp4_x_epoch = cache_control().epoch;
    st.fp4_x = q;
  }
  return q;
}

// The backward's view of the forward's operand for x: the saved one (then dropped), else rebuilt
// (RTN is deterministic: the same codes).
QuantizedFp4 fp4_backward_x(ProjectionState& st, const Tensor& x) {
  if (cache_valid(st.fp4_x_epoch) && same_tensor(st.fp4_x_src, x)) {
    QuantizedFp4 q = st.fp4_x;
    st.fp4_x_src = Tensor();
    st.fp4_x = QuantizedFp4();
    st.fp4_x_epoch = -1;
    return q;
  }
  return fp4_forward_operand(x);
}

const QuantizedFp4& fp4_weight(Param& w, ProjectionState& st) {
  if (!st.w_fp4.codes.defined() || !cache_valid(st.w_epoch)) {
    st.w_fp4 = fp4_forward_operand(w.value);
    st.w_epoch = cache_control().epoch;
  }
  return st.w_fp4;
}

Tensor transposed(const Tensor& t) {
  Tensor out = Tensor::empty({t.dim(1), t.dim(0)}, t.dtype(), t.device());
  transpose_pad_cuda(out, t);
  return out;
}

}  // namespace

void clear_activation_caches_cuda() {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  g_forward_x = ActivationEntry{};
  g_backward_xt = ActivationEntry{};
  g_fp4_x_src = Tensor();
  g_fp4_x = QuantizedFp4();
  g_fp4_x_epoch = -1;
  g_amax_notes.clear();
}

void note_amax_cuda(const Tensor& x, const Tensor& amax_bits) {
  LASP_CHECK(amax_bits.defined() && amax_bits.is_cuda() && amax_bits.device() == x.device() &&
             amax_bits.dtype() == DType::I32 && amax_bits.numel() == 1)
      << "projection_note_amax: amax_bits must be an I32 [1] tensor on " << x.str()
      << "'s device, got " << (amax_bits.defined() ? amax_bits.str() : "undefined");
  std::lock_guard<std::mutex> lock(g_cache_mu);
  // Notes of earlier epochs, and the oldest beyond kMaxAmaxNotes, are dropped.
  std::vector<AmaxNote> kept;
  for (AmaxNote& n : g_amax_notes)
    if (cache_valid(n.epoch) && n.data != x.raw()) kept.push_back(std::move(n));
  if (kept.size() >= kMaxAmaxNotes) kept.erase(kept.begin());
  kept.push_back(AmaxNote{x.raw(), x.shape(), x.dtype(), cache_control().epoch, amax_bits});
  g_amax_notes = std::move(kept);
}

void fp8_forward_cuda(Tensor& y, const Tensor& x, Param& w) {
  ProjectionState& st = state_of(w);
  const Fp8ScaleMode mode = options().fp8_scaling;
  QuantizedFp8 xq;
  {
    LASP_PROFILE_SCOPE("fp8_quantize");
    if (mode == Fp8ScaleMode::Block) {
      fp8_weight(w, st, mode);
      xq = activation_codes(x, false, mode, 0);
    } else if (mode == Fp8ScaleMode::PerTensor) {
      fp8_weight(w, st, mode);
      xq = activation_codes(x, false, mode, 0);
      if (cache_control().enabled) remember_forward_x(st, x, xq.scales);
    } else {
      xq = quantize_fp8_rows_cols_cuda(x, Fp8Format::E4M3, delayed_scale(st.x_dev, x), true, false)
               .rows;
      st.x_scale_dev = xq.scales;
      const Fp8RowsCols wq = quantize_fp8_rows_cols_cuda(
          w.value, Fp8Format::E4M3, delayed_scale(st.w_dev, w.value), true, true);
      st.w_rows = wq.rows;
      st.w_cols = wq.cols;
      // Not a per-epoch cache entry: the next forward quantizes (and records) again.
      st.w_epoch = -1;
      st.fp8_forward_done = true;
    }
  }
  gemm_fp8(y, xq, st.w_rows, 1.0f, 0.0f, options().fp8_fast_accum && mode != Fp8ScaleMode::Block);
}

void fp8_backward_cuda(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy,
                       const Tensor& x) {
  ProjectionState& st = state_of(w);
  const Fp8ScaleMode mode = options().fp8_scaling;
  const int64_t np = round_up(x.dim(0), kFp8Align);
  QuantizedFp8 dy_rows, dy_cols, x_cols;
  {
    LASP_PROFILE_SCOPE("fp8_quantize");
    if (mode == Fp8ScaleMode::Block) {
      fp8_weight(w, st, mode);
      // dy's rows (dgrad) and 1x128 blocks of dy^T in one pass, x^T's (wgrad, inner dim the
      // tokens, zero-padded to np) through the cache.
      const Fp8Scaling b = Fp8Scaling::Block1x128;
      const Fp8RowsCols d =
          quantize_fp8_block_rows_cols_cuda(dy, Fp8Format::E5M2, b, dx.defined(), true, np);
      dy_rows = d.rows;
      dy_cols = d.cols;
      x_cols = activation_codes(x, true, mode, np);
    } else {
      Fp8DeviceScale dy_scale;
      if (mode == Fp8ScaleMode::PerTensor) {
        fp8_weight(w, st, mode);
        x_cols = activation_codes(x, true, mode, np, forward_x_scale(st, x));
        dy_scale = current_scale(dy);
      } else {
        LASP_CHECK(st.fp8_forward_done && st.x_scale_dev.defined())
            << w.name << ": fp8 delayed scaling: backward before any forward";
        Fp8DeviceScale xs;
        xs.scale = st.x_scale_dev;  // the forward's scale for x, as the CPU path does
        x_cols = quantize_fp8_rows_cols_cuda(x, Fp8Format::E4M3, xs, false, true).cols;
        dy_scale = delayed_scale(st.dy_dev, dy);
      }
      const Fp8RowsCols d =
          quantize_fp8_rows_cols_cuda(dy, Fp8Format::E5M2, dy_scale, dx.defined(), true);
      dy_rows = d.rows;
      dy_cols = d.cols;
    }
  }
  if (dx.defined()) gemm_fp8(dx, dy_rows, st.w_cols, 1.0f, accumulate_dx ? 1.0f : 0.0f);
  gemm_fp8(w.grad, dy_cols, x_cols, 1.0f, take_stale_grad(w) ? 0.0f : 1.0f);
}

void fp4_forward_cuda(Tensor& y, const Tensor& x, Param& w) {
  check_fp4_cuda_options(w);
  check_fp4_dims(w, x.dim(0), false);
  ProjectionState& st = state_of(w);
  LASP_PROFILE_SCOPE("fp4_forward");
  gemm_fp4(y, fp4_forward_x(st, x), fp4_weight(w, st));
}

void fp4_backward_cuda(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy,
                       const Tensor& x) {
  check_fp4_cuda_options(w);
  check_fp4_dims(w, x.dim(0), true);
  ProjectionState& st = state_of(w);
  const uint64_t seed = next_fp4_backward_seed(w);
  LASP_PROFILE_SCOPE("fp4_backward");
  const ProjectionOptions& o = options();
  const HadamardSpec h{o.hadamard_block, false, 0};
  // The forward's operands (x's saved by the forward or rebuilt; W's cached for the epoch), and
  // their dequantized values (exact), as quartet_linear_backward reads them: transposed, which is
  // how both backward GEMMs take them, in the dequantizing pass.
  const QuantizedFp4 fx = fp4_backward_x(st, x);
  const QuantizedFp4& fw = fp4_weight(w, st);
  if (dx.defined()) {
    // dgrad (inner dim out): G_x = Q(dy R^T) Q(wq^T R^T)^T, masked by the forward's clip mask,
    // then rotated back: dx (+)= G_x H.
    Tensor wqt = Tensor::empty({w.value.dim(1), w.value.dim(0)}, DType::F32, x.device());
    dequantize_fp4_transposed_cuda(wqt, fw, true);
    const Tensor g = quartet_backward_gemm(dy, wqt, o.fp4_format, o.fp4_backward, o.hadamard_block, seed, 1);
    hadamard_cuda(dx, g, h, true, fx.mask.defined() ? &fx.mask : nullptr, accumulate_dx);
  }
  // wgrad (inner dim N): G_w = Q(dy^T R^T) Q(xq^T R^T)^T, masked, rotated back: dW += G_w H.
  Tensor xqt = Tensor::empty({x.dim(1), x.dim(0)}, DType::F32, x.device());
  dequantize_fp4_transposed_cuda(xqt, fx, true);
  const Tensor g =
      quartet_backward_gemm(transposed(dy), xqt, o.fp4_format, o.fp4_backward, o.hadamard_block, seed, 2);
  hadamard_cuda(w.grad, g, h, true, fw.mask.defined() ? &fw.mask : nullptr, !take_stale_grad(w));
}

}  // namespace lasp::projection_detail

#endif  // LASP_HAVE_CUDA
