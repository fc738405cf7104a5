// Batched forms of ops of kernels/ops.h: one call for a list of tensors, so that the optimizer
// and the gradient-norm reduction over every parameter take a few launches (and, for the norm,
// one synchronisation), not one or more per parameter.
#pragma once

#include <vector>

#include "core/tensor.h"

namespace lasp {

// sum_i sum_of_squares(xs[i]), bit for bit the value of the loop
//   double s = 0; for (const Tensor& x : xs) s += sum_of_squares(x);
// When every tensor is on one GPU: one partial buffer, one copy back (one synchronisation).
// Otherwise (CPU tensors, a mix of devices) it is that loop.
double sum_of_squares_many(const std::vector<Tensor>& xs);

// One parameter's tensors for adamw_update_many: adamw_update's w, w_compute (may be undefined),
// g, m, v, and its weight decay. Tensors are handles: the update writes their storage.
struct AdamWTensors {
  Tensor w, w_compute, g, m, v;
  float weight_decay = 0.0f;
};

// adamw_update on every entry with the shared hyperparameters. When every tensor is on one GPU: a
// few multi-tensor launches (up to kernels/ops.cu's list size per launch) instead of one per
// parameter, the same per-element step as adamw_update_cuda (results may differ from it in the
// last bit: nvcc may contract the step's multiply-adds differently in the two kernels).
// Otherwise (CPU, mixed devices) the loop of adamw_update.
void adamw_update_many(const std::vector<AdamWTensors>& params, float lr, float beta1, float beta2,
                       float eps, float c1, float c2, float grad_scale = 1.0f);

}  // namespace lasp
