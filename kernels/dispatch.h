// Runs a templated CPU body for the tensor's float type:
//   LASP_DISPATCH_CPU_FLOAT(x.dtype(), "rmsnorm_forward", T, { impl<T>(...); });
#pragma once

#include "core/check.h"
#include "core/dtype.h"
#include "core/tensor.h"

#define LASP_DISPATCH_CPU_FLOAT(dtype, what, T, ...)                                      \
  do {                                                                                    \
    switch (dtype) {                                                                      \
      case ::lasp::DType::F32: {                                                          \
        using T = float;                                                                  \
        __VA_ARGS__;                                                                      \
        break;                                                                            \
      }                                                                                   \
      case ::lasp::DType::F64: {                                                          \
        using T = double;                                                                 \
        __VA_ARGS__;                                                                      \
        break;                                                                            \
      }                                                                                   \
      default:                                                                            \
        LASP_FAIL() << what << ": CPU kernels take fp32 or fp64, got " << dtype_name(dtype); \
    }                                                                                     \
  } while (0)

namespace lasp {

// CPU kernels take one float dtype for all their tensors: checks `t` (if defined) has `dt`, the
// dtype of the call's q, naming the function and the argument.
inline void check_cpu_dtype(const Tensor& t, const char* fn, const char* what, DType dt) {
  if (!t.defined()) return;
  LASP_CHECK(t.dtype() == dt) << fn << ": " << what << " must be " << dtype_name(dt) << " like q, got "
                              << t.str();
}

}  // namespace lasp
