// CPU quantizers: FP8 (per tensor / 1x128 / 128x128), MXFP4, NVFP4 with RTN, stochastic rounding,
// QuEST clipping and MS-EDEN; exactly emulated FP8/FP4 GEMMs; the Quartet linear layer.
// The math and the API are in quantize.h; the scale rules are spelled out where they are chosen.
#include "kernels/quantize.h"
#include "kernels/quantize_math.h"

#ifdef LASP_HAVE_CUDA
#include "kernels/quantize_cuda.h"
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/profile.h"
#include "kernels/counter_rng.h"
#include "kernels/gemm.h"
#include "kernels/gemm_fp4.h"
#include "kernels/gemm_fp8.h"

namespace lasp {

namespace {

// The [rows, cols] view every quantizer works on.
struct Rows2D {
  int64_t rows, cols;
};

Rows2D check_input(const Tensor& x, const char* fn) {
  LASP_CHECK(x.defined() && x.ndim() >= 1) << fn << ": x must be a defined tensor with >= 1 dims";
  LASP_CHECK(!x.is_cuda()) << fn << ": this is the CPU implementation, got " << x.str();
  check_tensor(x, fn, DType::F32, x.shape());
  const int64_t cols = x.dim(-1);
  return {cols == 0 ? 0 : x.numel() / cols, cols};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// max |x| over [begin, end); checks that every element is finite.
float abs_max(const float* x, int64_t n, const char* fn) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    LASP_CHECK(std::isfinite(x[i])) << fn << ": non-finite input " << x[i] << " at flat index " << i;
    m = std::max(m, std::fabs(x[i]));
  }
  return m;
}

constexpr float kE2M1Grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Smallest E4M3 code whose value is >= s (s > 0 finite), capped at 448.
uint8_t e4m3_ceil(float s) {
  if (s >= kE4M3Max) return 0x7E;
  uint8_t code = float_to_e4m3(s, true);
  if (e4m3_to_float(code) < s) ++code;
  return code;
}

// Smallest power of two X (as an E8M0 code) with a / X <= 6, i.e. no element of a group with
// absmax a clips. a > 0.
uint8_t e8m0_no_clip(float a) {
  int code = e8m0_floor(a / kE2M1Max);
  while (code < 254 && a / e8m0_to_float(static_cast<uint8_t>(code)) > kE2M1Max) ++code;
  return static_cast<uint8_t>(code);
}

}  // namespace

// ================================================================ FP8

AmaxHistory::AmaxHistory(int length) : length_(length) {
  LASP_CHECK(length >= 1) << "AmaxHistory length must be >= 1, got " << length;
}

void AmaxHistory::record(float amax) {
  LASP_CHECK(std::isfinite(amax) && amax >= 0) << "AmaxHistory::record: bad amax " << amax;
  history_.push_back(amax);
  while (static_cast<int>(history_.size()) > length_) history_.pop_front();
}

void AmaxHistory::restore(const std::vector<float>& values) {
  for (float a : values)
    LASP_CHECK(std::isfinite(a) && a >= 0) << "AmaxHistory::restore: bad amax " << a;
  const size_t keep = std::min(values.size(), static_cast<size_t>(length_));
  history_.assign(values.end() - static_cast<std::ptrdiff_t>(keep), values.end());
}

float AmaxHistory::amax() const {
  float m = 0.0f;
  for (float a : history_) m = std::max(m, a);
  return m;
}

int64_t QuantizedFp8::rows() const { return codes.dim(-1) == 0 ? 0 : codes.numel() / codes.dim(-1); }
int64_t QuantizedFp8::cols() const { return codes.dim(-1); }

float fp8_format_max(Fp8Format f) { return f == Fp8Format::E4M3 ? kE4M3Max : kE5M2Max; }

uint8_t fp8_encode(float x, Fp8Format f) {
  return f == Fp8Format::E4M3 ? float_to_e4m3(x, true) : float_to_e5m2(x, true);
}

float fp8_decode(uint8_t code, Fp8Format f) {
  return f == Fp8Format::E4M3 ? e4m3_to_float(code) : e5m2_to_float(code);
}

namespace {

// Which scale covers element (r, c).
int64_t fp8_scale_index(const QuantizedFp8& q, int64_t r, int64_t c) {
  const int64_t nb = ceil_div(q.cols(), kFp8BlockSize);
  switch (q.scaling) {
    case Fp8Scaling::PerTensor: return 0;
    case Fp8Scaling::Block1x128: return r * nb + c / kFp8BlockSize;
    case Fp8Scaling::Block128x128: return (r / kFp8BlockSize) * nb + c / kFp8BlockSize;
  }
  return 0;
}

}  // namespace

QuantizedFp8 quantize_fp8(const Tensor& x, Fp8Format format, Fp8Scaling scaling,
                          AmaxHistory* delayed) {
#ifdef LASP_HAVE_CUDA
  if (x.is_cuda()) return quantize_fp8_cuda(x, format, scaling, delayed);
#endif
  const Rows2D d = check_input(x, "quantize_fp8");
  LASP_CHECK(delayed == nullptr || scaling == Fp8Scaling::PerTensor)
      << "quantize_fp8: delayed (amax history) scaling is per tensor only";
  const float fmax = fp8_format_max(format);
  const float* xs = x.data<float>();
  const float amax_now = abs_max(xs, x.numel(), "quantize_fp8");

  QuantizedFp8 q;
  q.format = format;
  q.scaling = scaling;
  q.codes = Tensor::empty(x.shape(), DType::U8);
  const int64_t nb = ceil_div(d.cols, kFp8BlockSize);
  Shape scale_shape = {1};
  if (scaling == Fp8Scaling::Block1x128) scale_shape = {d.rows, nb};
  if (scaling == Fp8Scaling::Block128x128) scale_shape = {ceil_div(d.rows, kFp8BlockSize), nb};
  q.scales = Tensor::empty(scale_shape, DType::F32);
  float* scales = q.scales.data<float>();
  const int64_t nscales = q.scales.numel();

  // Block amaxes (per tensor: the current or the delayed one).
  std::vector<float> amax(static_cast<size_t>(nscales), 0.0f);
  if (scaling == Fp8Scaling::PerTensor) {
    amax[0] = (delayed && !delayed->empty()) ? delayed->amax() : amax_now;
  } else {
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t c = 0; c < d.cols; ++c) {
        float& a = amax[fp8_scale_index(q, r, c)];
        a = std::max(a, std::fabs(xs[r * d.cols + c]));
      }
  }
  for (int64_t i = 0; i < nscales; ++i) scales[i] = amax[i] > 0 ? amax[i] / fmax : 1.0f;

  uint8_t* codes = q.codes.data<uint8_t>();
  for (int64_t r = 0; r < d.rows; ++r)
    for (int64_t c = 0; c < d.cols; ++c) {
      const int64_t i = r * d.cols + c;
      codes[i] = fp8_encode(xs[i] / scales[fp8_scale_index(q, r, c)], format);
    }
  if (delayed) delayed->record(amax_now);
  return q;
}

void dequantize_fp8(Tensor& out, const QuantizedFp8& q) {
#ifdef LASP_HAVE_CUDA
  if (q.codes.is_cuda()) return dequantize_fp8_cuda(out, q);
#endif
  check_tensor(out, "dequantize_fp8: out", DType::F32, q.codes.shape());
  const uint8_t* codes = q.codes.data<uint8_t>();
  const float* scales = q.scales.data<float>();
  float* o = out.data<float>();
  const int64_t rows = q.rows(), cols = q.cols();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      o[i] = fp8_decode(codes[i], q.format) * scales[fp8_scale_index(q, r, c)];
    }
}

Tensor dequantize_fp8(const QuantizedFp8& q) {
  Tensor out = Tensor::empty(q.codes.shape(), DType::F32, q.codes.device());
  dequantize_fp8(out, q);
  return out;
}

void gemm_fp8_emulated(Tensor& c, const QuantizedFp8& a, const QuantizedFp8& b) {
#ifdef LASP_HAVE_CUDA
  if (c.is_cuda()) return gemm_fp8(c, a, b);  // cuBLASLt FP8 on Hopper
#endif
  LASP_CHECK(a.cols() == b.cols()) << "gemm_fp8_emulated: inner dims differ, A " << a.codes.str()
                                   << ", B " << b.codes.str();
  check_tensor(c, "gemm_fp8_emulated: c", DType::F32, {a.rows(), b.rows()});
  Tensor ad = dequantize_fp8(a).view({a.rows(), a.cols()});
  Tensor bd = dequantize_fp8(b).view({b.rows(), b.cols()});
  gemm(c, ad, false, bd, true);
}

// ================================================================ FP4

int64_t fp4_group_size(Fp4Format f) { return f == Fp4Format::MXFP4 ? 32 : 16; }

float fp4_tensor_scale(const QuantizedFp4& q) {
  if (!q.tensor_scale_device.defined()) return q.tensor_scale;
  return static_cast<float>(q.tensor_scale_device.to(cpu()).item(0));
}

int64_t QuantizedFp4::rows() const { return codes.dim(-1) == 0 ? 0 : codes.numel() / codes.dim(-1); }
int64_t QuantizedFp4::cols() const { return codes.dim(-1); }

float QuantizedFp4::scale(int64_t row, int64_t group_index) const {
  const uint8_t s = scales.data<uint8_t>()[row * scales.dim(1) + group_index];
  return format == Fp4Format::MXFP4 ? e8m0_to_float(s) : e4m3_to_float(s);
}

uint8_t e2m1_round_stochastic(float v, float u) {
  const uint8_t sign = std::signbit(v) ? 0x8 : 0x0;
  const float a = std::min(std::fabs(v), kE2M1Max);
  int lo = 0;
  while (lo < 7 && kE2M1Grid[lo + 1] <= a) ++lo;
  if (lo == 7 || kE2M1Grid[lo] == a) return static_cast<uint8_t>(sign | lo);
  const float p = (a - kE2M1Grid[lo]) / (kE2M1Grid[lo + 1] - kE2M1Grid[lo]);
  return static_cast<uint8_t>(sign | (u < p ? lo + 1 : lo));
}

uint8_t e4m3_round_stochastic(float s, float u) {
  LASP_CHECK(s >= 0 && std::isfinite(s)) << "e4m3_round_stochastic: bad scale " << s;
  return qmath::e4m3_round_stochastic_code(s, u);
}

uint8_t e8m0_round_stochastic(float s, float u) {
  LASP_CHECK(s > 0 && std::isfinite(s)) << "e8m0_round_stochastic: bad scale " << s;
  return qmath::e8m0_round_stochastic_code(s, u);
}

QuantizedFp4 quantize_mxfp4(const Tensor& x, Fp4Rounding rounding, Fp4Clip clip, uint64_t seed,
                            uint64_t stream) {
  Fp4Options o;
  o.format = Fp4Format::MXFP4;
  o.rounding = rounding;
  o.clip = clip;
  o.seed = seed;
  o.stream = stream;
  return quantize_fp4(x, o);
}

QuantizedFp4 quantize_nvfp4(const Tensor& x, Fp4Rounding rounding, uint64_t seed, uint64_t stream) {
  Fp4Options o;
  o.format = Fp4Format::NVFP4;
  o.rounding = rounding;
  o.seed = seed;
  o.stream = stream;
  return quantize_fp4(x, o);
}

QuantizedFp4 quantize_fp4_rotated(const Tensor& x, const HadamardSpec& spec, const Fp4Options& opt) {
#ifdef LASP_HAVE_CUDA
  if (x.is_cuda()) {
    LASP_PROFILE_SCOPE("fp4_quantize");
    return quantize_fp4_rotated_cuda(x, spec, opt);
  }
#endif
  return quantize_fp4(hadamard_rotated(x, spec), opt);
}

QuantizedFp4 quantize_fp4(const Tensor& x, const Fp4Options& opt) {
  LASP_PROFILE_SCOPE("fp4_quantize");
#ifdef LASP_HAVE_CUDA
  if (x.is_cuda()) return quantize_fp4_cuda(x, opt);
#endif
  const Rows2D d = check_input(x, "quantize_fp4");
  const bool mx = opt.format == Fp4Format::MXFP4;
  const bool quest = opt.clip == Fp4Clip::Quest;
  LASP_CHECK(!quest || (mx && opt.rounding == Fp4Rounding::Nearest))
      << "quantize_fp4: QuEST clipping is defined for MXFP4 with round-to-nearest";
  const int64_t group = fp4_group_size(opt.format);
  LASP_CHECK(opt.rounding != Fp4Rounding::MsEden ||
             (opt.eden_block >= group && opt.eden_block % group == 0))
      << "quantize_fp4: eden_block " << opt.eden_block << " must be a positive multiple of the group "
      << group;
  const int64_t ngroups = ceil_div(d.cols, group);
  const float* xs = x.data<float>();
  const float amax = abs_max(xs, x.numel(), "quantize_fp4");

  QuantizedFp4 q;
  q.format = opt.format;
  q.codes = Tensor::empty(x.shape(), DType::U8);
  q.scales = Tensor::empty({d.rows, ngroups}, DType::U8);
  if (quest) q.mask = Tensor::empty(x.shape(), DType::U8);
  uint8_t* codes = q.codes.data<uint8_t>();
  uint8_t* scodes = q.scales.data<uint8_t>();
  uint8_t* mask = quest ? q.mask.data<uint8_t>() : nullptr;

  // NVFP4 tensor scale: maps the tensor's amax to scale_max * 6, so every E4M3 group scale is
  // <= scale_max. MS-EDEN keeps scale_max = 256 to leave room for its correction (c <= 1.75).
  if (!mx) {
    const float scale_max = opt.rounding == Fp4Rounding::MsEden ? 256.0f : kE4M3Max;
    q.tensor_scale = amax > 0 ? amax / (scale_max * kE2M1Max) : 1.0f;
  }
  const float ts = q.tensor_scale;

  for (int64_t r = 0; r < d.rows; ++r) {
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t c0 = g * group, c1 = std::min(d.cols, c0 + group);
      const float* xg = xs + r * d.cols;
      float gmax = 0.0f;
      double sumsq = 0.0;
      for (int64_t c = c0; c < c1; ++c) {
        gmax = std::max(gmax, std::fabs(xg[c]));
        sumsq += static_cast<double>(xg[c]) * xg[c];
      }
      // Group scale code. Zero groups get scale 1 (MX) / 0 (NV) and zero codes.
      uint8_t sc;
      if (gmax == 0.0f) {
        sc = mx ? 127 : 0;
      } else if (mx && quest) {
        // QuEST: clip range ~ alpha * RMS, the scale is the power of two at or below alpha*RMS/6
        // (as Quartet's kernel does); elements beyond +-6 * scale clip and leave the mask.
        const float rms = static_cast<float>(std::sqrt(sumsq / static_cast<double>(c1 - c0)));
        sc = e8m0_floor(std::max(kQuestAlphaE2M1 * rms / kE2M1Max, 1e-38f));
      } else if (mx && opt.rounding == Fp4Rounding::Nearest) {
        // OCP MX v1.0: X = 2^(floor(log2 amax) - emax(E2M1) = 2); values beyond 6 saturate.
        sc = static_cast<uint8_t>(std::max(0, static_cast<int>(e8m0_floor(gmax)) - 2));
      } else if (mx) {
        sc = e8m0_no_clip(gmax);  // unbiased modes: no element may clip
      } else if (opt.rounding == Fp4Rounding::Nearest) {
        sc = float_to_e4m3(gmax / kE2M1Max / ts, true);  // NVIDIA recipe: RTN scale, may clip
      } else {
        sc = e4m3_ceil(gmax / kE2M1Max / ts);  // scale rounded up: no element clips
      }
      scodes[r * ngroups + g] = sc;
      const float s = mx ? e8m0_to_float(sc) : e4m3_to_float(sc);
      PhiloxElementDraws draw(opt.seed, opt.stream);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = r * d.cols + c;
        if (s == 0.0f) {  // zero group, or an NVFP4 scale that underflowed E4M3
          codes[i] = 0;
          if (mask) mask[i] = 1;
          continue;
        }
        const float v = xs[i] / (s * ts);
        if (mask) mask[i] = std::fabs(v) <= kE2M1Max ? 1 : 0;
        if (opt.rounding == Fp4Rounding::Stochastic) {
          codes[i] = e2m1_round_stochastic(v, draw(static_cast<uint64_t>(i)));
        } else {
          codes[i] = float_to_e2m1(v);
        }
      }
    }
  }

  if (opt.rounding == Fp4Rounding::MsEden) {
    // MS-EDEN: per correction block b (eden_block elements of a row, several groups), with
    // x_hat = RTN dequantization, c_b = <x, x> / <x, x_hat> (real units; c = 1 when the
    // denominator is not positive). Each group scale s becomes SR(c_b * s) on the scale grid, so
    // E[x_hat'] = c_b x_hat given the codes; after a uniformly random rotation this makes the
    // dequantized vector unbiased (EDEN), with the randomness in the scales only. The block
    // routine is shared with the CUDA quantizer (kernels/quantize_math.h).
    const int64_t groups_per_block = opt.eden_block / group;
    for (int64_t r = 0; r < d.rows; ++r) {
      const float* xr = xs + r * d.cols;
      auto load = [xr](int64_t c) { return xr[c]; };
      for (int64_t g0 = 0; g0 < ngroups; g0 += groups_per_block)
        qmath::eden_correct_block(load, codes + r * d.cols, scodes, r, g0, std::min(ngroups, g0 + groups_per_block),
                                  group, d.cols, ngroups, mx, ts, opt.seed, opt.stream);
    }
  }
  return q;
}

void dequantize_fp4(Tensor& out, const QuantizedFp4& q, bool with_tensor_scale) {
#ifdef LASP_HAVE_CUDA
  if (q.codes.is_cuda()) return dequantize_fp4_cuda(out, q, with_tensor_scale);
#endif
  check_tensor(out, "dequantize_fp4: out", DType::F32, q.codes.shape());
  const int64_t rows = q.rows(), cols = q.cols(), group = q.group();
  const uint8_t* codes = q.codes.data<uint8_t>();
  float* o = out.data<float>();
  const float ts = with_tensor_scale ? q.tensor_scale : 1.0f;
  float value[16];  // the 16 E2M1 codes' values
  for (int v = 0; v < 16; ++v) value[v] = e2m1_to_float(static_cast<uint8_t>(v));
  const int64_t ngroups = ceil_div(cols, group);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < ngroups; ++g) {
      const float s = q.scale(r, g);
      for (int64_t c = g * group, c1 = std::min(cols, c + group); c < c1; ++c) {
        const int64_t i = r * cols + c;
        o[i] = value[codes[i] & 0xF] * s * ts;
      }
    }
}

Tensor dequantize_fp4(const QuantizedFp4& q, bool with_tensor_scale) {
  Tensor out = Tensor::empty(q.codes.shape(), DType::F32, q.codes.device());
  dequantize_fp4(out, q, with_tensor_scale);
  return out;
}

void gemm_fp4_emulated(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b) {
#ifdef LASP_HAVE_CUDA
  if (c.is_cuda()) return gemm_fp4_emulated_cuda(c, a, b);  // exact dequantize + bf16 GEMM on sm_90
#endif
  LASP_CHECK(a.format == b.format) << "gemm_fp4_emulated: operands in different FP4 formats";
  LASP_CHECK(a.cols() == b.cols()) << "gemm_fp4_emulated: inner dims differ, A " << a.codes.str()
                                   << ", B " << b.codes.str();
  check_tensor(c, "gemm_fp4_emulated: c", DType::F32, {a.rows(), b.rows()});
  // e2m1 * (power of two or E4M3) is exact in fp32; the tensor scales go to the epilogue (alpha).
  Tensor ad = dequantize_fp4(a, false).view({a.rows(), a.cols()});
  Tensor bd = dequantize_fp4(b, false).view({b.rows(), b.cols()});
  gemm(c, ad, false, bd, true, a.tensor_scale * b.tensor_scale);
}

// ================================================================ Quartet linear layer

namespace {

void check_quartet_config(const QuartetConfig& cfg) {
  LASP_CHECK(cfg.backward_rounding != Fp4Rounding::Nearest)
      << "Quartet backward needs an unbiased rounding (Stochastic or MsEden)";
}

Tensor transposed(const Tensor& t) { return t.transpose(0, 1).contiguous(); }


void apply_mask(Tensor& g, const Tensor& mask) {
  float* gp = g.data<float>();
  const uint8_t* m = mask.data<uint8_t>();
  for (int64_t i = 0; i < g.numel(); ++i)
    if (!m[i]) gp[i] = 0.0f;
}

}  // namespace

Tensor quartet_backward_gemm(const Tensor& a, const Tensor& b, Fp4Format format, Fp4Rounding rounding,
                             int64_t block, uint64_t seed, uint64_t stream) {
  const HadamardSpec rot{block, true, splitmix64(seed ^ (stream * 0x51ED27ull))};
  Fp4Options o;
  o.format = format;
  o.rounding = rounding;
  o.seed = seed;
  o.eden_block = block;
  o.stream = 2 * stream;
  const QuantizedFp4 qa = quantize_fp4_rotated(a, rot, o);
  o.stream = 2 * stream + 1;
  const QuantizedFp4 qb = quantize_fp4_rotated(b, rot, o);
  Tensor c = Tensor::empty({a.dim(0), b.dim(0)}, DType::F32, a.device());
  gemm_fp4(c, qa, qb);
  return c;
}

void quartet_linear_forward(Tensor& y, QuartetSaved& saved, const Tensor& x, const Tensor& w,
                            const QuartetConfig& cfg) {
  check_quartet_config(cfg);
  LASP_CHECK(x.ndim() == 2 && w.ndim() == 2 && x.dim(1) == w.dim(1))
      << "quartet_linear_forward: x [N, in], w [out, in], got " << x.str() << ", " << w.str();
  check_tensor(y, "quartet_linear_forward: y", DType::F32, {x.dim(0), w.dim(0)});
  const HadamardSpec h{cfg.forward_block, false, 0};
  const QuantizedFp4 qx = quantize_mxfp4(hadamard_rotated(x, h), Fp4Rounding::Nearest, Fp4Clip::Quest);
  const QuantizedFp4 qw = quantize_mxfp4(hadamard_rotated(w, h), Fp4Rounding::Nearest, Fp4Clip::Quest);
  gemm_fp4(y, qx, qw);
  saved.xq = dequantize_fp4(qx);
  saved.wq = dequantize_fp4(qw);
  saved.mask_x = qx.mask;
  saved.mask_w = qw.mask;
}

void quartet_linear_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const QuartetSaved& saved,
                             const QuartetConfig& cfg, uint64_t seed) {
  check_quartet_config(cfg);
  const int64_t n = saved.xq.dim(0), in = saved.xq.dim(1), out = saved.wq.dim(0);
  check_tensor(dy, "quartet_linear_backward: dy", DType::F32, {n, out});
  const HadamardSpec h{cfg.forward_block, false, 0};
  if (dx.defined()) {
    check_tensor(dx, "quartet_linear_backward: dx", DType::F32, {n, in});
    Tensor g = quartet_backward_gemm(dy, transposed(saved.wq), cfg.backward_format, cfg.backward_rounding,
                                     cfg.backward_block, seed, 1);  // [N, in], inner dim out
    apply_mask(g, saved.mask_x);
    hadamard_inverse(dx, g, h);
  }
  if (dw.defined()) {
    check_tensor(dw, "quartet_linear_backward: dw", DType::F32, {out, in});
    Tensor g = quartet_backward_gemm(transposed(dy), transposed(saved.xq), cfg.backward_format,
                                     cfg.backward_rounding, cfg.backward_block, seed, 2);  // [out, in], inner N
    apply_mask(g, saved.mask_w);
    hadamard_inverse(g, g, h);
    float* d = dw.data<float>();
    const float* gp = g.data<float>();
    for (int64_t i = 0; i < dw.numel(); ++i) d[i] += gp[i];
  }
}

}  // namespace lasp
