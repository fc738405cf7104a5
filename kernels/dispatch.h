// Runs a templated CPU body for the tensor's float type:
//   LASP_DISPATCH_CPU_FLOAT(x.dtype(), "rmsnorm_forward", T, { impl<T>(...); });
#pragma once

#include "core/check.h"
#include "core/dtype.h"

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
