// kernels/ops_batched.h: the CPU form is the loop over kernels/ops.h; CUDA lists go to
// kernels/ops.cu.
#include "kernels/ops_batched.h"

#include "core/profile.h"
#include "kernels/ops.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
double sum_of_squares_many_cuda(const std::vector<Tensor>& xs);  // kernels/ops.cu
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

}  // namespace lasp
