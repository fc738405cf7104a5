// Helpers for the GPU-vs-CPU kernel tests: random bf16-representable inputs, NaN-poisoned
// device outputs, and the relative error ||out - ref|| / ||ref||.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"

namespace lasp::gpu_test {

#define LASP_SKIP_WITHOUT_GPU()                                   \
  do {                                                            \
    if (!::lasp::cuda_available()) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

// A fresh seed per call (printed on failure through SCOPED_TRACE by the caller), or
// LASP_TEST_SEED when set, to replay a failure.
inline uint32_t fresh_seed() {
  if (const char* env = std::getenv("LASP_TEST_SEED")) return static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
  return std::random_device{}();
}

// fp32 CPU tensor of N(0, stddev) values rounded to bf16 (so CPU and GPU see the same inputs).
inline Tensor random_bf16_values(const Shape& shape, std::mt19937& rng, double stddev = 1.0) {
  std::normal_distribution<double> dist(0.0, stddev);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, bf16_to_float(float_to_bf16(static_cast<float>(dist(rng)))));
  return t;
}

inline Tensor random_uniform(const Shape& shape, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, dist(rng));
  return t;
}

// The CUDA copy of a CPU tensor in `dtype` (conversion on the CPU).
inline Tensor to_cuda(const Tensor& cpu_tensor, DType dtype) {
  return cpu_tensor.to(dtype).to(cuda());
}

// A CUDA tensor whose every element is NaN: kernels must overwrite all of it.
inline Tensor poisoned_cuda(const Shape& shape, DType dtype) {
  return Tensor::full(shape, std::nan(""), dtype, cuda());
}

inline int count_non_finite(const std::vector<double>& v) {
  int n = 0;
  for (double x : v) n += std::isfinite(x) ? 0 : 1;
  return n;
}

// ||out - ref|| / ||ref|| (with ||ref|| floored at 1e-30); +inf when out has NaN/inf.
inline double rel_error(const std::vector<double>& out, const std::vector<double>& ref) {
  EXPECT_EQ(out.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

inline double rel_error(const Tensor& out, const Tensor& ref) {
  return rel_error(out.to_vector(), ref.to_vector());
}

}  // namespace lasp::gpu_test
