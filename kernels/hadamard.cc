// CPU blockwise Walsh-Hadamard transform (see hadamard.h for the math).
#include "kernels/hadamard.h"

#include <cmath>
#include <vector>

#include "kernels/counter_rng.h"
#ifdef LASP_HAVE_CUDA
#include "kernels/quantize_cuda.h"
#endif

namespace lasp {

namespace {

bool is_power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

void check_hadamard_args(const Tensor& y, const Tensor& x, const HadamardSpec& spec, const char* fn) {
  LASP_CHECK(x.defined() && x.ndim() >= 1) << fn << ": x must be a defined tensor with >= 1 dims";
  check_tensor(x, fn, DType::F32, x.shape());
  check_tensor(y, fn, DType::F32, x.shape());
  LASP_CHECK(!x.is_cuda() && !y.is_cuda()) << fn << ": CPU implementation, got " << x.str();
  LASP_CHECK(is_power_of_two(spec.block))
      << fn << ": block must be a power of two, got " << spec.block;
  LASP_CHECK(x.dim(-1) % spec.block == 0)
      << fn << ": last dim " << x.dim(-1) << " is not a multiple of the block " << spec.block;
}

// Signs for one block (all +1 when not randomized).
std::vector<float> block_signs(const HadamardSpec& spec) {
  std::vector<float> s(static_cast<size_t>(spec.block), 1.0f);
  if (spec.randomized) {
    for (int64_t j = 0; j < spec.block; ++j) s[j] = hadamard_sign(spec, j);
  }
  return s;
}

}  // namespace

void fwht_unnormalized(float* v, int64_t n) {
  // Butterfly stages h = 1, 2, 4, ...: (a, b) -> (a + b, a - b). Sylvester ordering.
  for (int64_t h = 1; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
    }
  }
}

float hadamard_sign(const HadamardSpec& spec, int64_t j) {
  if (!spec.randomized) return 1.0f;
  return (philox_u32(spec.seed, kHadamardSignStream, static_cast<uint64_t>(j)) & 1u) ? -1.0f : 1.0f;
}

void hadamard_forward(Tensor& y, const Tensor& x, const HadamardSpec& spec) {
  check_hadamard_args(y, x, spec, "hadamard_forward");
  const int64_t g = spec.block, n = x.numel();
  const float norm = 1.0f / std::sqrt(static_cast<float>(g));
  const std::vector<float> sign = block_signs(spec);
  const float* src = x.data<float>();
  float* dst = y.data<float>();
  for (int64_t b = 0; b < n; b += g) {
    for (int64_t j = 0; j < g; ++j) dst[b + j] = src[b + j] * sign[j];
    fwht_unnormalized(dst + b, g);
    for (int64_t j = 0; j < g; ++j) dst[b + j] *= norm;
  }
}

Tensor hadamard_rotated(const Tensor& x, const HadamardSpec& spec) {
  Tensor out = Tensor::empty(x.shape(), DType::F32, x.device());
#ifdef LASP_HAVE_CUDA
  if (x.is_cuda()) {
    hadamard_cuda(out, x, spec, false);
    return out;
  }
#endif
  hadamard_forward(out, x, spec);
  return out;
}

void hadamard_inverse(Tensor& y, const Tensor& x, const HadamardSpec& spec) {
  check_hadamard_args(y, x, spec, "hadamard_inverse");
  const int64_t g = spec.block, n = x.numel();
  const float norm = 1.0f / std::sqrt(static_cast<float>(g));
  const std::vector<float> sign = block_signs(spec);
  const float* src = x.data<float>();
  float* dst = y.data<float>();
  for (int64_t b = 0; b < n; b += g) {
    for (int64_t j = 0; j < g; ++j) dst[b + j] = src[b + j];
    fwht_unnormalized(dst + b, g);
    for (int64_t j = 0; j < g; ++j) dst[b + j] *= norm * sign[j];
  }
}

}  // namespace lasp
