// Batched forms of the vector helpers of kernels/ops.h: one call for a list of tensors, so that
// the gradient-norm reduction over every parameter synchronises the device once, not once per
// parameter.
#pragma once

#include <vector>

#include "core/tensor.h"

namespace lasp {

// sum_i sum_of_squares(xs[i]), bit for bit the value of the loop
//   double s = 0; for (const Tensor& x : xs) s += sum_of_squares(x);
// When every tensor is on one GPU: one partial buffer, one copy back (one synchronisation).
// Otherwise (CPU tensors, a mix of devices) it is that loop.
double sum_of_squares_many(const std::vector<Tensor>& xs);

}  // namespace lasp
