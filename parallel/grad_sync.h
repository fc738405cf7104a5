// Gradient reduction across data-parallel (and sequence-parallel) replicas.
#pragma once

#include <cstddef>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "parallel/comm.h"

namespace lasp {

// Sums every tensor of `grads` over the ranks of `comm` in place (divides by comm.size() when
// `average`). Consecutive tensors of one dtype and device are packed into buckets of at most
// bucket_bytes (a larger tensor is its own bucket; see plan_buckets), each bucket is one
// all_reduce_sum, then unpacked. Every rank must pass the same list (same order, shapes and
// dtypes). Float dtypes for `average`; int32/int64 may be summed. Called on the DP group and on
// the SP group for the weights SP ranks share.
void all_reduce_gradients(Comm& comm, const std::vector<Tensor>& grads, size_t bucket_bytes,
                          bool average);

// The buckets all_reduce_gradients and GradReducer form: [begin, end) ranges of `grads`, greedy in
// list order (a bucket takes the next tensor while dtype and device match and the total stays
// within bucket_bytes).
std::vector<std::pair<size_t, size_t>> plan_buckets(const std::vector<Tensor>& grads,
                                                    size_t bucket_bytes);

// Sums gradients over one or more groups (the trainer passes SP, then DP) while the backward runs.
//
// The model reports, as its backward finishes each part, which gradients are final
// (Model::set_grad_ready_hook -> mark_ready). `grads` lists every gradient in that order
// (Model::grad_ready_order(): LM head, final norm, the blocks from the last to the first,
// embedding), so the buckets of plan_buckets(grads) fill in order; each bucket is launched as soon
// as its last gradient is final: packed into one buffer (a single-tensor bucket is reduced in
// place) and all-reduced without blocking, over the first group, then the next:
//   host tensors  MPI_Iallreduce; the next group's reduction of bucket k starts when bucket k+1 is
//                 launched (after waiting for bucket k's first group) or in finish(), so every
//                 rank issues the same collectives in the same order on every communicator;
//   CUDA tensors  ncclAllReduce on the group's communication stream, after an event recorded on the
//                 compute (current) stream once the bucket is packed; the next group's reduction is
//                 enqueued at once, on its own stream, behind the first one's completion event.
// finish() launches what is left, waits for everything (CUDA: the current stream waits for the
// completion events; the host does not block) and unpacks the buckets into the gradients.
//
// The reducer talks over private duplicates of the groups (Comm::split), so its reductions never
// queue behind, nor interleave with, the model's own collectives (e.g. LASP-2's state gathers on
// the SP group). Same buckets and order of groups as all_reduce_gradients on each group in turn,
// so the sums are the same numbers; bit for bit wherever the library's reduction order for a
// message does not depend on whether it was started blocking or not (always for groups of two
// ranks: a + b == b + a).
//
// overlap = false: nothing happens during the backward and finish() calls all_reduce_gradients
// on each group in turn (the plain after-backward path, kept for comparison).
//
// Gradient accumulation: call begin() only before the backward of the last micro-batch. A
// mark_ready() outside begin() ... finish() does nothing, so earlier micro-batches accumulate
// locally and only the last one's reduction runs.
class GradReducer {
 public:
  GradReducer(std::vector<Tensor> grads, const std::vector<Comm*>& groups, size_t bucket_bytes,
              bool overlap);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  bool overlap() const { return overlap_; }
  // True when there is something to reduce (some group has more than one rank).
  bool active() const { return !comms_.empty(); }
  // Arms the reducer for one backward (every gradient becomes not-yet-final).
  void begin();
  // `grad` (one of the constructor's tensors, the same storage) is final for this backward.
  void mark_ready(const Tensor& grad);
  // Completes every reduction and writes the sums into the gradients.
  void finish();

  // Buckets in the plan, and how many were launched before finish() in the last backward.
  size_t num_buckets() const { return buckets_.size(); }
  size_t launched_before_finish() const { return launched_before_finish_; }
  // The reducer's communicators (for their counters and times).
  std::vector<Comm*> comms() const;

 private:
  struct Bucket {
    size_t begin = 0, end = 0;
    size_t ready = 0;       // gradients of the bucket marked final in this backward
    Tensor buf;             // the packed gradients (undefined for a single-tensor bucket)
    size_t next_group = 0;  // groups whose reduction has been started
    CommRequest req;        // the latest started reduction
    std::vector<CommRequest> earlier;  // CUDA: the earlier groups' reductions, still pending
  };
  Tensor& reduced(Bucket& b);  // the tensor the collectives work on
  void launch(size_t k);       // packs bucket k and starts its reduction
  void start_next_group(Bucket& b);
  void launch_ready_buckets();

  std::vector<Tensor> grads_;
  std::unordered_map<const void*, size_t> index_;  // gradient storage -> position in grads_
  std::vector<std::unique_ptr<Comm>> comms_;       // duplicates of the groups with > 1 rank
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<char> marked_;
  size_t bucket_bytes_;
  bool overlap_;
  bool armed_ = false;
  size_t next_launch_ = 0;
  size_t launched_before_finish_ = 0;
};

}  // namespace lasp
