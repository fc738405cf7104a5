// Projections in full precision, FP8 and FP4 (Quartet). The low-precision paths emulate the
// quantized GEMMs exactly on CPU through kernels/quantize.h; the math per GEMM:
//
//   forward  y  = x W^T          inner dim `in`:  A = x [N, in],    B = W [out, in]
//   dgrad    dx = dy W           inner dim `out`: A = dy [N, out],  B = W^T [in, out]
//   wgrad    dW += dy^T x        inner dim `N`:   A = dy^T [out, N], B = x^T [in, N]
//
// Every operand is quantized along its GEMM's inner dimension (transpose, then quantize), which
// is what block scaling needs; with per-tensor scales transposing first changes nothing.
#include "core/model/projection.h"

#include <algorithm>
#include <cmath>

#include "kernels/gemm.h"
#include "kernels/hadamard.h"
#include "kernels/quantize.h"

namespace lasp {

namespace {

enum class Fp8ScaleMode { PerTensor, Delayed, Block };

// PrecisionConfig parsed once into enums.
struct ProjectionOptions {
  Fp8ScaleMode fp8_scaling = Fp8ScaleMode::PerTensor;
  Fp4Format fp4_format = Fp4Format::MXFP4;
  Fp4Rounding fp4_backward = Fp4Rounding::Stochastic;
  int64_t hadamard_block = 32;
  uint64_t seed = 0;
  int64_t step = 0;
};

ProjectionOptions& options() {
  static ProjectionOptions o;
  return o;
}

constexpr int kAmaxHistoryLength = 16;  // delayed scaling window (Transformer Engine's default is 1024; ours is short)

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t name_hash(const std::string& name) {  // FNV-1a
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
  return h;
}

}  // namespace

// Low-precision state of one projection. The full-precision path keeps none.
struct ProjectionState {
  // FP8 delayed scaling: one amax history per operand (x and W forward, dy backward), and the
  // amaxes behind the forward's per-tensor scales, which the backward reuses for x^T and W^T so
  // that dgrad/wgrad see the very operands the forward multiplied.
  AmaxHistory x_history{kAmaxHistoryLength}, w_history{kAmaxHistoryLength}, dy_history{kAmaxHistoryLength};
  float x_amax = 0.0f, w_amax = 0.0f;
  bool fp8_forward_done = false;
  // FP4 backward draws: the step they belong to and how many backward calls it has seen.
  int64_t step = -1;
  uint64_t calls_in_step = 0;
};

Precision precision_from_name(const std::string& name) {
  if (name == "bf16" || name == "full") return Precision::Full;
  if (name == "fp8") return Precision::Fp8;
  if (name == "fp4") return Precision::Fp4;
  LASP_FAIL() << "unknown precision '" << name << "', expected bf16 | fp8 | fp4";
  return Precision::Full;
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::Full: return "bf16";
    case Precision::Fp8: return "fp8";
    case Precision::Fp4: return "fp4";
  }
  return "?";
}

void set_projection_options(const PrecisionConfig& config, uint64_t seed) {
  ProjectionOptions o;
  if (config.fp8_scaling == "per_tensor") o.fp8_scaling = Fp8ScaleMode::PerTensor;
  else if (config.fp8_scaling == "delayed") o.fp8_scaling = Fp8ScaleMode::Delayed;
  else if (config.fp8_scaling == "block") o.fp8_scaling = Fp8ScaleMode::Block;
  else LASP_FAIL() << "precision.fp8_scaling: expected per_tensor | delayed | block, got '" << config.fp8_scaling << "'";
  if (config.fp4_format == "mxfp4") o.fp4_format = Fp4Format::MXFP4;
  else if (config.fp4_format == "nvfp4") o.fp4_format = Fp4Format::NVFP4;
  else LASP_FAIL() << "precision.fp4_format: expected mxfp4 | nvfp4, got '" << config.fp4_format << "'";
  if (config.fp4_backward == "sr") o.fp4_backward = Fp4Rounding::Stochastic;
  else if (config.fp4_backward == "ms_eden") o.fp4_backward = Fp4Rounding::MsEden;
  else LASP_FAIL() << "precision.fp4_backward: expected sr | ms_eden, got '" << config.fp4_backward << "'";
  const int64_t hb = config.hadamard_block;
  LASP_CHECK(hb >= 2 && (hb & (hb - 1)) == 0) << "precision.hadamard_block must be a power of two >= 2, got " << hb;
  LASP_CHECK(o.fp4_backward != Fp4Rounding::MsEden || hb % fp4_group_size(o.fp4_format) == 0)
      << "precision.hadamard_block (" << hb << ") is MS-EDEN's correction block and must be a multiple of the "
      << config.fp4_format << " group (" << fp4_group_size(o.fp4_format) << ")";
  o.hadamard_block = hb;
  o.seed = seed;
  o.step = options().step;
  options() = o;
}

void set_projection_step(int64_t step) {
  LASP_CHECK(step >= 0) << "set_projection_step: step must be >= 0, got " << step;
  options().step = step;
}

uint64_t projection_backward_seed(uint64_t seed, const std::string& name, int64_t step, uint64_t call) {
  return mix64(mix64(mix64(seed ^ name_hash(name)) ^ static_cast<uint64_t>(step)) ^ call);
}

namespace {

ProjectionState& state_of(Param& w) {
  if (!w.state) w.state = std::make_shared<ProjectionState>();
  return *w.state;
}

void check_low_precision_operands(const Param& w, const Tensor& x) {
  LASP_CHECK(!x.is_cuda() && !w.value.is_cuda())
      << w.name << ": " << precision_name(w.precision) << " projections are implemented for CPU tensors only";
  LASP_CHECK(x.dtype() == DType::F32 && w.value.dtype() == DType::F32)
      << w.name << ": " << precision_name(w.precision) << " projections take fp32 tensors, got x "
      << dtype_name(x.dtype()) << ", weight " << dtype_name(w.value.dtype());
  LASP_CHECK(x.ndim() == 2 && w.value.ndim() == 2 && x.dim(1) == w.value.dim(1))
      << w.name << ": expected x [N, in] and weight [out, in], got " << x.str() << ", " << w.value.str();
}

Tensor transposed(const Tensor& t) { return t.transpose(0, 1).contiguous(); }

void add_into(Tensor& dst, const Tensor& src) {
  float* d = dst.data<float>();
  const float* s = src.data<float>();
  for (int64_t i = 0; i < dst.numel(); ++i) d[i] += s[i];
}

// dst = src, or dst += src.
void store(Tensor& dst, const Tensor& src, bool accumulate) {
  if (accumulate) add_into(dst, src);
  else dst.copy_from(src);
}

float abs_max(const Tensor& t) {
  const float* p = t.data<float>();
  float m = 0.0f;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(p[i]));
  return m;
}

// ---------------------------------------------------------------- FP8

// Per-tensor quantization with the scale amax / format_max for a given amax.
QuantizedFp8 quantize_fp8_with_amax(const Tensor& t, Fp8Format format, float amax) {
  AmaxHistory fixed(1);
  fixed.record(amax);
  return quantize_fp8(t, format, Fp8Scaling::PerTensor, &fixed);
}

// The amax behind a per-tensor scale: the current one, or (delayed) the history's max, after
// which the current amax is recorded (an empty history falls back to the current amax).
float per_tensor_amax(const Tensor& t, AmaxHistory* history) {
  const float now = abs_max(t);
  if (!history) return now;
  const float used = history->empty() ? now : history->amax();
  history->record(now);
  return used;
}

void fp8_forward(Tensor& y, const Tensor& x, Param& w) {
  const ProjectionOptions& o = options();
  ProjectionState& st = state_of(w);
  if (o.fp8_scaling == Fp8ScaleMode::Block) {
    gemm_fp8_emulated(y, quantize_fp8(x, Fp8Format::E4M3, Fp8Scaling::Block1x128),
                      quantize_fp8(w.value, Fp8Format::E4M3, Fp8Scaling::Block128x128));
    return;
  }
  const bool delayed = o.fp8_scaling == Fp8ScaleMode::Delayed;
  st.fp8_forward_done = true;
  st.x_amax = per_tensor_amax(x, delayed ? &st.x_history : nullptr);
  st.w_amax = per_tensor_amax(w.value, delayed ? &st.w_history : nullptr);
  gemm_fp8_emulated(y, quantize_fp8_with_amax(x, Fp8Format::E4M3, st.x_amax),
                    quantize_fp8_with_amax(w.value, Fp8Format::E4M3, st.w_amax));
}

void fp8_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x) {
  const ProjectionOptions& o = options();
  ProjectionState& st = state_of(w);
  const int64_t n = x.dim(0), in = x.dim(1), out = w.value.dim(0);
  const Tensor dy_t = transposed(dy), x_t = transposed(x);
  QuantizedFp8 dy_q, wt_q, dyt_q, xt_q;  // the dgrad pair (along out) and the wgrad pair (along N)
  if (o.fp8_scaling == Fp8ScaleMode::Block) {
    dy_q = quantize_fp8(dy, Fp8Format::E5M2, Fp8Scaling::Block1x128);
    wt_q = quantize_fp8(transposed(w.value), Fp8Format::E4M3, Fp8Scaling::Block128x128);
    dyt_q = quantize_fp8(dy_t, Fp8Format::E5M2, Fp8Scaling::Block1x128);
    xt_q = quantize_fp8(x_t, Fp8Format::E4M3, Fp8Scaling::Block1x128);
  } else {
    // x and W keep the forward's scales (current scaling: recomputed, the same numbers; delayed:
    // the ones the forward used); dy gets one scale for both of its GEMMs.
    const bool delayed = o.fp8_scaling == Fp8ScaleMode::Delayed;
    LASP_CHECK(!delayed || st.fp8_forward_done) << w.name << ": fp8 delayed scaling: backward before any forward";
    const float x_amax = delayed ? st.x_amax : abs_max(x), w_amax = delayed ? st.w_amax : abs_max(w.value);
    const float dy_amax = per_tensor_amax(dy, delayed ? &st.dy_history : nullptr);
    dy_q = quantize_fp8_with_amax(dy, Fp8Format::E5M2, dy_amax);
    dyt_q = quantize_fp8_with_amax(dy_t, Fp8Format::E5M2, dy_amax);
    wt_q = quantize_fp8_with_amax(transposed(w.value), Fp8Format::E4M3, w_amax);
    xt_q = quantize_fp8_with_amax(x_t, Fp8Format::E4M3, x_amax);
  }
  if (dx.defined()) {
    Tensor g = Tensor::empty({n, in}, DType::F32);
    gemm_fp8_emulated(g, dy_q, wt_q);
    store(dx, g, accumulate_dx);
  }
  Tensor gw = Tensor::empty({out, in}, DType::F32);
  gemm_fp8_emulated(gw, dyt_q, xt_q);
  add_into(w.grad, gw);
}

// ---------------------------------------------------------------- FP4 (Quartet)

QuartetConfig quartet_config() {
  const ProjectionOptions& o = options();
  QuartetConfig c;
  c.forward_block = o.hadamard_block;
  c.backward_block = o.hadamard_block;
  c.backward_rounding = o.fp4_backward;
  c.backward_format = o.fp4_format;
  return c;
}

// The GEMMs' inner dims must be multiples of the rotation block and of the FP4 group: `in` for
// the forward, `out` (dgrad) and the token count N (wgrad) for the backward.
void check_fp4_dims(const Param& w, int64_t n, bool backward) {
  const ProjectionOptions& o = options();
  const int64_t in = w.value.dim(1), out = w.value.dim(0);
  const int64_t need = std::max(o.hadamard_block, fp4_group_size(o.fp4_format));
  const bool ok = in % need == 0 && (!backward || (out % need == 0 && n % need == 0));
  LASP_CHECK(ok) << w.name << ": fp4 (Quartet) needs in (" << in << ")"
                 << (backward ? ", out (" + std::to_string(out) + ") and the token count N (" + std::to_string(n) + ")" : "")
                 << " to be multiples of " << need << " (precision.hadamard_block " << o.hadamard_block << ", "
                 << (o.fp4_format == Fp4Format::MXFP4 ? "mxfp4" : "nvfp4") << " group " << fp4_group_size(o.fp4_format)
                 << ")";
}

Tensor rotated(const Tensor& t, int64_t block) {
  Tensor out = Tensor::empty(t.shape(), DType::F32);
  hadamard_forward(out, t, HadamardSpec{block, false, 0});
  return out;
}

// Forward operands in the rotated space: MXFP4 RTN with QuEST clipping (Quartet, exactly what
// quartet_linear_forward quantizes), or NVFP4 RTN (no clipping mask: every element "unclipped").
struct Fp4Forward {
  QuantizedFp4 x, w;
};

Fp4Forward fp4_forward_operands(const Tensor& x, const Tensor& w) {
  const ProjectionOptions& o = options();
  const Tensor xr = rotated(x, o.hadamard_block), wr = rotated(w, o.hadamard_block);
  if (o.fp4_format == Fp4Format::MXFP4) {
    return {quantize_mxfp4(xr, Fp4Rounding::Nearest, Fp4Clip::Quest),
            quantize_mxfp4(wr, Fp4Rounding::Nearest, Fp4Clip::Quest)};
  }
  Fp4Forward f{quantize_nvfp4(xr, Fp4Rounding::Nearest), quantize_nvfp4(wr, Fp4Rounding::Nearest)};
  f.x.mask = Tensor::full(x.shape(), 1.0, DType::U8);
  f.w.mask = Tensor::full(w.shape(), 1.0, DType::U8);
  return f;
}

void fp4_forward(Tensor& y, const Tensor& x, Param& w) {
  check_fp4_dims(w, x.dim(0), false);
  if (options().fp4_format == Fp4Format::MXFP4) {
    QuartetSaved unused;  // the backward rebuilds the (deterministic) operands from x and W
    quartet_linear_forward(y, unused, x, w.value, quartet_config());
    return;
  }
  const Fp4Forward f = fp4_forward_operands(x, w.value);
  gemm_fp4_emulated(y, f.x, f.w);
}

void fp4_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x) {
  check_fp4_dims(w, x.dim(0), true);
  const ProjectionOptions& o = options();
  ProjectionState& st = state_of(w);
  if (st.step != o.step) {
    st.step = o.step;
    st.calls_in_step = 0;
  }
  const uint64_t seed = projection_backward_seed(o.seed, w.name, o.step, st.calls_in_step++);
  // Recomputing the forward's operands (RTN: deterministic) instead of keeping them from the
  // forward costs two quantizations and saves holding a dequantized copy of every input.
  const Fp4Forward f = fp4_forward_operands(x, w.value);
  QuartetSaved saved;
  saved.xq = dequantize_fp4(f.x);
  saved.wq = dequantize_fp4(f.w);
  saved.mask_x = f.x.mask;
  saved.mask_w = f.w.mask;
  Tensor g;
  if (dx.defined()) g = accumulate_dx ? Tensor::empty(dx.shape(), DType::F32) : dx;
  quartet_linear_backward(g, w.grad, dy, saved, quartet_config(), seed);
  if (dx.defined() && accumulate_dx) add_into(dx, g);
}

}  // namespace

void projection_forward(Tensor& y, const Tensor& x, Param& w) {
  switch (w.precision) {
    case Precision::Full:
      gemm(y, x, false, w.compute.defined() ? w.compute : w.value, true);
      return;
    case Precision::Fp8:
      check_low_precision_operands(w, x);
      fp8_forward(y, x, w);
      return;
    case Precision::Fp4:
      check_low_precision_operands(w, x);
      fp4_forward(y, x, w);
      return;
  }
}

void projection_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x) {
  switch (w.precision) {
    case Precision::Full:
      if (dx.defined()) {
        gemm(dx, dy, false, w.compute.defined() ? w.compute : w.value, false, 1.0f, accumulate_dx ? 1.0f : 0.0f);
      }
      gemm(w.grad, dy, true, x, false, 1.0f, 1.0f);
      return;
    case Precision::Fp8:
      check_low_precision_operands(w, x);
      check_tensor(dy, (w.name + ": dy").c_str(), DType::F32, {x.dim(0), w.value.dim(0)});
      fp8_backward(dx, accumulate_dx, w, dy, x);
      return;
    case Precision::Fp4:
      check_low_precision_operands(w, x);
      check_tensor(dy, (w.name + ": dy").c_str(), DType::F32, {x.dim(0), w.value.dim(0)});
      fp4_backward(dx, accumulate_dx, w, dy, x);
      return;
  }
}

}  // namespace lasp
