// Helpers shared by the multi-rank tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/tensor.h"
#include "parallel/comm.h"

namespace lasp::testing {

// A seed every rank agrees on: LASP_TEST_SEED if set, else drawn on rank 0 and broadcast, so
// every run draws fresh inputs. Tests print it on failure through SCOPED_TRACE.
inline uint64_t shared_seed() {
  Tensor s = Tensor::zeros({1}, DType::I64);
  if (const char* env = std::getenv("LASP_TEST_SEED")) {
    s.data<int64_t>()[0] = std::strtoll(env, nullptr, 10);
  } else if (world().rank() == 0) {
    s.data<int64_t>()[0] = static_cast<int64_t>(
        std::random_device{}() ^ std::chrono::steady_clock::now().time_since_epoch().count());
  }
  world().broadcast(s, 0);
  return static_cast<uint64_t>(s.data<int64_t>()[0]);
}

// Uniform values in [lo, hi), the same on every rank for the same generator state.
inline Tensor random_tensor(std::mt19937_64& rng, const Shape& shape, DType dtype, double lo = -1,
                            double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = u(rng);
  return Tensor::from_values(v, shape, dtype);
}

// Rows `positions` of dim 1 of a [B, T, ...] tensor, gathered into [B, positions.size(), ...].
inline Tensor take_rows(const Tensor& full, const std::vector<int64_t>& positions) {
  Shape s = full.shape();
  const int64_t T = s[1];
  int64_t row = 1;
  for (size_t i = 2; i < s.size(); ++i) row *= s[i];
  s[1] = static_cast<int64_t>(positions.size());
  Tensor out = Tensor::empty(s, full.dtype());
  for (int64_t b = 0; b < s[0]; ++b)
    for (int64_t i = 0; i < s[1]; ++i)
      for (int64_t x = 0; x < row; ++x)
        out.set_item((b * s[1] + i) * row + x, full.item((b * T + positions[i]) * row + x));
  return out;
}

// max |a - b| / max(1, max |b|): absolute near zero, relative for large values.
inline double scaled_max_error(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  EXPECT_EQ(x.size(), y.size());
  double err = 0, mag = 1;
  for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) {
    const double e = std::abs(x[i] - y[i]);
    if (!(e <= err)) err = std::isnan(e) ? INFINITY : e;
    mag = std::max(mag, std::abs(y[i]));
  }
  return err / mag;
}

inline double tolerance(DType t) { return t == DType::F64 ? 1e-9 : 1e-5; }

}  // namespace lasp::testing
