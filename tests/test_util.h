// Helpers shared by the unit tests: random tensors and central finite differences in float64.
#pragma once

#include <gtest/gtest.h>

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <limits>
#include <random>
#include <vector>

#include "core/check.h"
#include "core/tensor.h"

namespace lasp::testing {

// A fresh directory under the temporary folder, removed when the test ends.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "lasp_test") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Sets an environment variable for its lifetime (nullptr: unsets it) and restores what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_.c_str(), old_.c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

// Runs fn and expects a lasp::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected lasp::Error containing \"" << parts[0] << "\"";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "\"" << p << "\" not in: " << msg;
    }
  }
}

inline Tensor random_tensor(const Shape& shape, std::mt19937& rng, double scale = 1.0,
                            DType dtype = DType::F64) {
  std::normal_distribution<double> n(0.0, scale);
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, n(rng));
  return t;
}

inline void poison(Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }

// <a, b> over all elements, in double.
inline double dot(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

// Checks grad (the analytic gradient of loss() with respect to x) against central differences at
// up to `samples` positions of x spread over the tensor. loss() must read x's current values.
inline void expect_grad_matches_fd(const std::function<double()>& loss, Tensor& x, const Tensor& grad,
                                   const char* what, double rel_tol = 1e-6, int samples = 24,
                                   double h = 1e-5) {
  ASSERT_EQ(x.numel(), grad.numel()) << what;
  const int64_t n = x.numel();
  const int64_t stride = std::max<int64_t>(1, n / samples);
  double max_err = 0, max_ref = 0;
  for (int64_t i = 0; i < n; i += stride) {
    const double orig = x.item(i);
    x.set_item(i, orig + h);
    const double lp = loss();
    x.set_item(i, orig - h);
    const double lm = loss();
    x.set_item(i, orig);
    const double fd = (lp - lm) / (2 * h);
    max_err = std::max(max_err, std::fabs(fd - grad.item(i)));
    max_ref = std::max(max_ref, std::fabs(fd));
  }
  EXPECT_LE(max_err, rel_tol * std::max(1.0, max_ref)) << what << ": max |fd - analytic| = " << max_err
                                                       << " with max |fd| = " << max_ref;
}

// Max |a - b| / max(|b|, floor) over all elements.
inline double max_rel_diff(const Tensor& a, const Tensor& b, double floor = 1.0) {
  EXPECT_EQ(a.numel(), b.numel());
  double m = 0, ref = floor;
  for (int64_t i = 0; i < a.numel(); ++i) ref = std::max(ref, std::fabs(b.item(i)));
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.item(i) - b.item(i)));
  return m / ref;
}

}  // namespace lasp::testing
