#include "core/model/projection.h"

#include "kernels/gemm.h"

namespace lasp {

// Low-precision state of one projection. The full-precision path keeps none.
struct ProjectionState {};

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

void projection_forward(Tensor& y, const Tensor& x, Param& w) {
  LASP_CHECK(w.precision == Precision::Full)
      << w.name << ": precision " << precision_name(w.precision) << " is not implemented yet";
  gemm(y, x, false, w.compute.defined() ? w.compute : w.value, true);
}

void projection_backward(Tensor& dx, bool accumulate_dx, Param& w, const Tensor& dy, const Tensor& x) {
  LASP_CHECK(w.precision == Precision::Full)
      << w.name << ": precision " << precision_name(w.precision) << " is not implemented yet";
  if (dx.defined()) {
    gemm(dx, dy, false, w.compute.defined() ? w.compute : w.value, false, 1.0f, accumulate_dx ? 1.0f : 0.0f);
  }
  gemm(w.grad, dy, true, x, false, 1.0f, 1.0f);
}

}  // namespace lasp
