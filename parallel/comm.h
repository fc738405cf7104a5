// Comm: the communicator every parallel code path talks through.
//
// One Comm wraps one group of ranks. Host (CPU) tensors move through MPI; CUDA tensors move
// through NCCL in LASP_HAVE_NCCL builds (the ncclUniqueId is broadcast over the group's MPI
// communicator the first time a CUDA tensor is seen; work is enqueued on current_stream()), and
// through a host staging copy plus MPI otherwise. Without MPI in the build, world() is a single
// rank and every collective is a local copy.
//
// Every call is collective over the group unless it is point to point (send, recv, sendrecv).
// Tensors must be contiguous; supported dtypes: fp64, fp32, bf16 (reductions sum in float and
// round once per step), fp16 (no reductions on host), int32, int64, uint8.
//
// Counters: each Comm counts, per kind of call, the calls and the bytes this rank handed in
// (the `in` buffer of all_gather and reduce_scatter, the tensor of all_reduce / broadcast / send).
// Tests use them to assert "one all-gather per layer per pass".
//
// Non-blocking collectives (all_gather_async, all_reduce_sum_async) return a CommRequest and let
// the caller compute while the data moves. Host tensors: MPI_Iallgather / MPI_Iallreduce, waited
// on with MPI_Wait. CUDA tensors with NCCL: the collective goes on this Comm's own communication
// stream (non-blocking, created on first use, highest priority), after an event recorded on the
// current stream, so it sees everything the current stream produced before the call; wait() makes
// the current stream wait for the collective's completion event (the host does not block).
// Without NCCL (host staging) and without MPI they complete before returning.
//
// Watchdog: a blocking call that does not complete within comm_timeout() seconds (env
// LASP_COMM_TIMEOUT, default 600; 0 disables) makes a watchdog thread print
//   [rank R] lasp: all_gather on comm 'sp' (rank r of W) did not complete in T s; aborting
// and call MPI_Abort on the world, so every rank ends instead of hanging. NCCL calls are
// asynchronous: the watchdog covers their host-side part only (see docs/parallel.md); for host
// requests it watches CommRequest::wait().
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace lasp {

enum class CommOp { AllGather, AllReduce, ReduceScatter, Broadcast, Send, Recv, SendRecv, Barrier };
constexpr int kNumCommOps = 8;
const char* comm_op_name(CommOp op);

struct CommCounter {
  int64_t calls = 0;
  int64_t bytes = 0;
  double seconds = 0;  // wall time inside the calls (host side)
};

class Comm;

// A collective in flight. The request keeps the tensors it reads and writes alive; the caller
// must not touch them (nor, on CUDA, free or reuse their memory) until wait() returns. Requests
// of one Comm must be waited before that Comm is destroyed. Destroying a pending request waits.
class CommRequest {
 public:
  CommRequest();
  ~CommRequest();
  CommRequest(CommRequest&& other) noexcept;
  CommRequest& operator=(CommRequest&& other) noexcept;
  CommRequest(const CommRequest&) = delete;
  CommRequest& operator=(const CommRequest&) = delete;

  // True between the start of the collective and wait().
  bool pending() const;
  // Host: blocks until the collective is complete (MPI_Wait, watched by the watchdog).
  // CUDA (NCCL): makes the current stream wait for the collective; work enqueued on the current
  // stream afterwards sees its result. Releases the tensors. No-op when not pending.
  void wait();
  // True once the collective has completed (host: MPI_Test, which also drives MPI's progress and
  // finishes the request; CUDA: the completion event has fired, wait() is still needed to order
  // the current stream after it). True when not pending.
  bool test();

  struct State;  // comm.cc

 private:
  friend class Comm;
  explicit CommRequest(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

class Comm {
 public:
  // A group of one rank (this process alone).
  static std::unique_ptr<Comm> self(const std::string& name = "self");
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int rank() const;
  int size() const;
  const std::string& name() const;

  // out = concat over ranks of in; out has a leading dimension of size() and in's numel after it
  // (any shape with out.numel() == size() * in.numel() is accepted).
  void all_gather(Tensor& out, const Tensor& in);
  // t = sum over ranks of t.
  void all_reduce_sum(Tensor& t);
  // out = block rank() of (sum over ranks of in); in.numel() == size() * out.numel().
  void reduce_scatter_sum(Tensor& out, const Tensor& in);
  void broadcast(Tensor& t, int root);
  void send(const Tensor& t, int dst);
  void recv(Tensor& t, int src);
  // Sends `out` to dst and receives `in` from src in one step (rings: dst = rank+1, src = rank-1).
  void sendrecv(const Tensor& out, int dst, Tensor& in, int src);
  void barrier();

  // Non-blocking all_gather / all_reduce_sum (see the file comment and CommRequest). Counted like
  // the blocking calls. `after` (optional, may belong to another Comm): the collective starts only
  // once that request's collective is complete (CUDA: a stream dependency, the host does not
  // block; host: after->wait() first), which chains reductions over several groups.
  CommRequest all_gather_async(Tensor& out, const Tensor& in);
  CommRequest all_reduce_sum_async(Tensor& t, CommRequest* after = nullptr);

  // Sub-communicator of the ranks that pass the same color, ordered by key (collective).
  std::unique_ptr<Comm> split(int color, int key, const std::string& name) const;

  const CommCounter& counter(CommOp op) const { return counters_[static_cast<int>(op)]; }
  void reset_counters();
  // Seconds spent in every kind of call since the last reset.
  double total_seconds() const;
  void add_seconds(CommOp op, double s) { counters_[static_cast<int>(op)].seconds += s; }

  struct Impl;  // MPI / NCCL handles (comm.cc)

 private:
  friend struct WorldFactory;
  friend class CommRequest;
  explicit Comm(std::unique_ptr<Impl> impl);
  void count(CommOp op, size_t bytes);
  std::unique_ptr<Impl> impl_;
  std::array<CommCounter, kNumCommOps> counters_{};
};

// MPI_Init_thread (asking for MPI_THREAD_MULTIPLE so the watchdog may abort) and the world comm;
// sets process_rank(). Safe to call without MPI in the build (single rank).
void init_distributed(int* argc, char*** argv);
void finalize_distributed();
bool distributed_initialized();
// The world group: every process of the job (a single rank before init_distributed / without MPI).
Comm& world();

// Collective timeout in seconds (0 disables). Initialised from LASP_COMM_TIMEOUT.
void set_comm_timeout(double seconds);
double comm_timeout();
// What the watchdog does on a timeout. The default prints the message to stderr and calls
// MPI_Abort(MPI_COMM_WORLD) (std::abort without MPI). Tests install a recording handler; pass an
// empty function to restore the default. Called from the watchdog thread, once per stuck call.
using CommTimeoutHandler = std::function<void(const std::string& message)>;
void set_comm_timeout_handler(CommTimeoutHandler handler);

}  // namespace lasp
