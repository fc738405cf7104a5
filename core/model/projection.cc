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

#include "core/model/projection_internal.h"
#include "kernels/gemm.h"
#include "kernels/hadamard.h"
#include "kernels/quantize.h"

namespace lasp {

namespace projection_detail {

ProjectionOptions& options() {
  static ProjectionOptions o;
  return o;
}

CacheControl& cache_control() {
  static CacheControl c;
  return c;
}

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

ProjectionState& state_of(Param& w) {
  if (!w.state) w.state = std::make_shared<ProjectionState>();
  return *w.state;
}

}  // namespace projection_detail

using namespace projection_detail;

namespace {

uint64_t name_hash(const std::string& name) {  // FNV-1a
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
  return h;
}

// A new cache epoch: the quantized weights and activations of the CUDA paths are recomputed.
void new_cache_epoch() {
  ++cache_control().epoch;
#ifdef LASP_HAVE_CUDA
  clear_activation_caches_cuda();
#endif
}

}  // namespace

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
  LASP_CHECK(!config.fp8_fast_accum || o.fp8_scaling != Fp8ScaleMode::Block)
      << "precision.fp8_fast_accum: true needs fp8_scaling per_tensor or delayed (cuBLASLt has no fast "
         "accumulation for block scales), got fp8_scaling '" << config.fp8_scaling << "'";
  o.fp8_fast_accum = config.fp8_fast_accum;
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
  cache_control().enabled = true;
  new_cache_epoch();
}

void projection_weights_changed() { new_cache_epoch(); }

void projection_release_saved(Param& w) {
  if (!w.state) return;
  w.state->fp4_x_src = Tensor();
  w.state->fp4_x = QuantizedFp4();
  w.state->fp4_x_epoch = -1;
}

void projection_note_amax(const Tensor& x, const Tensor& amax_bits) {
#ifdef LASP_HAVE_CUDA
  if (x.defined() && x.is_cuda() && cache_control().enabled &&
      options().fp8_scaling == Fp8ScaleMode::PerTensor)
    note_amax_cuda(x, amax_bits);
#else
  (void)x;
  (void)amax_bits;
#endif
}

uint64_t projection_backward_seed(uint64_t seed, const std::string& name, int64_t step, uint64_t call) {
  return mix64(mix64(mix64(seed ^ name_hash(name)) ^ static_cast<uint64_t>(step)) ^ call);
}

namespace projection_detail {

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

uint64_t next_fp4_backward_seed(Param& w) {
  const ProjectionOptions& o = options();
  ProjectionState& st = state_of(w);
  if (st.step != o.step) {
    st.step = o.step;
    st.calls_in_step = 0;
  }
  return projection_backward_seed(o.seed, w.name, o.step, st.calls_in_step++);
}

}  // namespace projection_detail

namespace {

void check_low_precision_operands(const Param& w, const Tensor& x) {
  LASP_CHECK(!x.is_cuda() && !w.value.is_cuda())
      << w.name << ": " << precision_name(w.precision) << " projections: x and the weight must both be on the "
      << "CPU or both on CUDA, got x " << x.str() << ", weight " << w.value.str();
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
  store(w.grad, gw, !take_stale_grad(w));
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
  const uint64_t seed = next_fp4_backward_seed(w);
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
  if (take_stale_grad(w)) w.grad.zero_();  // quartet_linear_backward adds into the gradient
  quartet_linear_backward(g, w.grad, dy, saved, quartet_config(), seed);
  if (dx.defined() && accumulate_dx) add_into(dx, g);
}

}  // namespace

namespace {

#ifdef LASP_HAVE_CUDA
// CUDA operands: x [N, in] and y / dy / dx fp32 or bf16, contiguous, on the weight's device; the
// weight's master value fp32, its gradient fp32.
void check_cuda_operands(const Param& w, const Tensor& x, const Tensor& out, const char* out_name) {
  const char* p = precision_name(w.precision);
  LASP_CHECK(w.value.is_cuda() && w.value.dtype() == DType::F32 && w.value.ndim() == 2 && w.grad.defined() &&
             w.grad.is_cuda() && w.grad.dtype() == DType::F32)
      << w.name << ": " << p << " projections on CUDA need an fp32 CUDA master weight and gradient, got "
      << w.value.str() << " and " << (w.grad.defined() ? w.grad.str() : "no gradient");
  auto ok = [&](const Tensor& t, int64_t cols) {
    return t.is_cuda() && t.device() == w.value.device() && t.is_contiguous() && t.ndim() == 2 &&
           t.dim(0) == x.dim(0) && t.dim(1) == cols && (t.dtype() == DType::BF16 || t.dtype() == DType::F32);
  };
  LASP_CHECK(ok(x, w.value.dim(1)))
      << w.name << ": " << p << " projection on CUDA: x must be a contiguous bf16/fp32 tensor [N, " << w.value.dim(1)
      << "] on " << w.value.device().str() << ", got " << x.str();
  const int64_t cols = std::string(out_name) == "dx" ? w.value.dim(1) : w.value.dim(0);
  LASP_CHECK(!out.defined() || ok(out, cols))
      << w.name << ": " << p << " projection on CUDA: " << out_name << " must be a contiguous bf16/fp32 tensor ["
      << x.dim(0) << ", " << cols << "] on " << w.value.device().str() << ", got " << out.str();
}
#endif

bool on_cuda(const Param& w, const Tensor& x) {
#ifdef LASP_HAVE_CUDA
  return x.is_cuda() && w.value.is_cuda();
#else
  (void)w;
  (void)x;
  return false;
#endif
}

}  // namespace

void projection_forward(Tensor& y, const Tensor& x, Param& w) {
  switch (w.precision) {
    case Precision::Full:
      gemm(y, x, false, w.compute.defined() ? w.compute : w.value, true);
      return;
    case Precision::Fp8:
    case Precision::Fp4:
      if (on_cuda(w, x)) {
#ifdef LASP_HAVE_CUDA
        check_cuda_operands(w, x, y, "y");
        LASP_CHECK(y.defined()) << w.name << ": y must be defined";
        if (w.precision == Precision::Fp8) fp8_forward_cuda(y, x, w);
        else fp4_forward_cuda(y, x, w);
#endif
        return;
      }
      check_low_precision_operands(w, x);
      if (w.precision == Precision::Fp8) fp8_forward(y, x, w);
      else fp4_forward(y, x, w);
      return;
  }
}

void projection_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x) {
  switch (w.precision) {
    case Precision::Full:
      if (dx.defined()) {
        gemm(dx, dy, false, w.compute.defined() ? w.compute : w.value, false, 1.0f, accumulate_dx ? 1.0f : 0.0f);
      }
      gemm(w.grad, dy, true, x, false, 1.0f, take_stale_grad(w) ? 0.0f : 1.0f);
      return;
    case Precision::Fp8:
    case Precision::Fp4:
      if (on_cuda(w, x)) {
#ifdef LASP_HAVE_CUDA
        check_cuda_operands(w, x, dy, "dy");
        LASP_CHECK(dy.defined()) << w.name << ": dy must be defined";
        check_cuda_operands(w, x, dx, "dx");
        if (w.precision == Precision::Fp8) fp8_backward_cuda(dx, accumulate_dx, w, dy, x);
        else fp4_backward_cuda(dx, accumulate_dx, w, dy, x);
#endif
        return;
      }
      check_low_precision_operands(w, x);
      check_tensor(dy, (w.name + ": dy").c_str(), DType::F32, {x.dim(0), w.value.dim(0)});
      if (w.precision == Precision::Fp8) fp8_backward(dx, accumulate_dx, w, dy, x);
      else fp4_backward(dx, accumulate_dx, w, dy, x);
      return;
  }
}

}  // namespace lasp
