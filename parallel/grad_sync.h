// Gradient reduction across data-parallel (and sequence-parallel) replicas.
#pragma once

#include <cstddef>
#include <vector>

#include "core/tensor.h"
#include "parallel/comm.h"

namespace lasp {

// Sums every tensor of `grads` over the ranks of `comm` in place (divides by comm.size() when
// `average`). Consecutive tensors of one dtype and device are packed into buckets of at most
// bucket_bytes (a larger tensor is its own bucket), each bucket is one all_reduce_sum, then
// unpacked. Every rank must pass the same list (same order, shapes and dtypes). Float dtypes for
// `average`; int32/int64 may be summed. Called on the DP group and on the SP group for the
// weights SP ranks share.
void all_reduce_gradients(Comm& comm, const std::vector<Tensor>& grads, size_t bucket_bytes,
                          bool average);

}  // namespace lasp
