// Shared by the softmax-attention GPU tests (our kernel and the cuDNN path): one case type, its
// description, bf16-valued random inputs and the conversions the comparisons use.
#pragma once

#include <cmath>
#include <random>
#include <sstream>
#include <string>

#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace attn_test {

struct AttnCase {
  int64_t B, Tq, Tk, Hq, Hkv, D;
  bool causal;
  int64_t q_offset;
};

inline std::string describe(const AttnCase& c) {
  std::ostringstream os;
  os << "B=" << c.B << " Tq=" << c.Tq << " Tk=" << c.Tk << " Hq=" << c.Hq << " Hkv=" << c.Hkv
     << " D=" << c.D << " causal=" << c.causal << " q_offset=" << c.q_offset;
  return os.str();
}

struct AttnInputs {
  Tensor q, k, v, d_o;  // CPU fp32 holding bf16 values
};

inline AttnInputs make_inputs(const AttnCase& c, std::mt19937& rng) {
  using gpu_test::random_bf16_values;
  AttnInputs in;
  in.q = random_bf16_values({c.B, c.Tq, c.Hq, c.D}, rng, 1.5);
  in.k = random_bf16_values({c.B, c.Tk, c.Hkv, c.D}, rng, 1.5);
  in.v = random_bf16_values({c.B, c.Tk, c.Hkv, c.D}, rng);
  in.d_o = random_bf16_values({c.B, c.Tq, c.Hq, c.D}, rng);
  return in;
}

inline float scale_of(const AttnCase& c) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D))); }

inline Tensor f64(const Tensor& t) { return t.to(cpu()).to(DType::F64); }
inline Tensor bf16_cuda(const Tensor& cpu_values) { return gpu_test::to_cuda(cpu_values, DType::BF16); }

}  // namespace attn_test
}  // namespace lasp
