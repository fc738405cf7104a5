// kernels/ops_batched.h: the CPU form is the loop over kernels/ops.h; CUDA lists go to
// kernels/ops.cu.
#include "kernels/ops_batched.h"

#include "core/profile.h"
#include "kernels/ops.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
double sum_of_squares_many_cuda(const std::vector<Tensor>& xs);  // kernels/ops.cu
void adamw_update_many_cuda(const std::vector<AdamWTensors>& params, float lr, float beta1, float beta2,
                            float eps, float c1, float c2, float grad_scale);  // kernels/ops.cu
#endif

double sum_of_squares_many(const std::vector<Tensor>& xs) {
  LASP_PROFILE_SCOPE("sum_of_squares_many");
#ifdef LASP_HAVE_CUDA
  bool one_gpu = !xs.empty();
  for (const Tensor& x : xs)
    one_gpu = one_gpu && x.defined() && x.is_cuda() && x.device() == xs.front().device();
  if (one_gpu) return sum_of_squares_many_cuda(xs);
#endif
  double s = 0;
  for (const Tensor& x : xs) s += sum_of_squares(x);
  return s;
}

void adamw_update_many(const std::vector<AdamWTensors>& params, float lr, float beta1, float beta2,
                       float eps, float c1, float c2, float grad_scale) {
#ifdef LASP_HAVE_CUDA
  bool one_gpu = !params.empty();
  for (const AdamWTensors& p : params)
    one_gpu = one_gpu && p.w.defined() && p.w.is_cuda() && p.w.device() == params.front().w.device();
  if (one_gpu) {
    LASP_PROFILE_SCOPE("adamw_update");
    adamw_update_many_cuda(params, lr, beta1, beta2, eps, c1, c2, grad_scale);
    return;
  }
#endif
  for (const AdamWTensors& p : params) {
    Tensor w = p.w, wc = p.w_compute, m = p.m, v = p.v;
    adamw_update(w, wc, p.g, m, v, lr, beta1, beta2, eps, p.weight_decay, c1, c2, grad_scale);
  }
}

}  // namespace lasp
