// Softmax attention on CUDA: not implemented in this round. The symbols exist so that CUDA builds
// link (kernels/attention.cc dispatches CUDA tensors here); calling them raises a clear error.
#include "core/tensor.h"

namespace lasp {

void attention_forward_cuda(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k,
                            const Tensor& v, float scale, bool causal, int64_t q_offset) {
  LASP_FAIL() << "attention_forward: softmax attention on CUDA is not implemented yet (got "
              << q.str() << "); run softmax layers on CPU tensors for now";
}

void attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                             const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                             float scale, bool causal, int64_t q_offset) {
  LASP_FAIL() << "attention_backward: softmax attention on CUDA is not implemented yet (got "
              << q.str() << "); run softmax layers on CPU tensors for now";
}

}  // namespace lasp
