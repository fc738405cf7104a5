#include "parallel/comm.h"

#include "core/profile.h"

#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#ifdef LASP_HAVE_MPI
// The C interface only (the deprecated C++ bindings add nothing here and warn).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#endif
#ifdef LASP_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

#ifdef LASP_HAVE_MPI
#define MPI_CHECK(call)                                                                  \
  do {                                                                                   \
    const int mpi_rc_ = (call);                                                          \
    if (mpi_rc_ != MPI_SUCCESS) {                                                        \
      char mpi_msg_[MPI_MAX_ERROR_STRING];                                               \
      int mpi_len_ = 0;                                                                  \
      MPI_Error_string(mpi_rc_, mpi_msg_, &mpi_len_);                                    \
      LASP_FAIL() << "MPI call " #call " failed: " << std::string(mpi_msg_, mpi_len_);   \
    }                                                                                    \
  } while (0)
#endif
#ifdef LASP_HAVE_NCCL
#define CUDA_RT_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t cuda_rc_ = (call);                                                 \
    LASP_CHECK(cuda_rc_ == cudaSuccess)                                                  \
        << "CUDA call " #call " failed: " << cudaGetErrorString(cuda_rc_);               \
  } while (0)
#define NCCL_CHECK(call)                                                                 \
  do {                                                                                   \
    const ncclResult_t nccl_rc_ = (call);                                                \
    LASP_CHECK(nccl_rc_ == ncclSuccess)                                                  \
        << "NCCL call " #call " failed: " << ncclGetErrorString(nccl_rc_);               \
  } while (0)
#endif

namespace lasp {

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::AllGather: return "all_gather";
    case CommOp::AllReduce: return "all_reduce";
    case CommOp::ReduceScatter: return "reduce_scatter";
    case CommOp::Broadcast: return "broadcast";
    case CommOp::Send: return "send";
    case CommOp::Recv: return "recv";
    case CommOp::SendRecv: return "sendrecv";
    case CommOp::Barrier: return "barrier";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Watchdog: one thread per process watches the blocking calls in flight.
namespace {

double timeout_from_env() {
  const char* s = std::getenv("LASP_COMM_TIMEOUT");
  if (!s || !*s) return 600.0;
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  LASP_CHECK(end && *end == '\0' && v >= 0)
      << "LASP_COMM_TIMEOUT must be a number of seconds >= 0 (0 disables), got '" << s << "'";
  return v;
}

void default_timeout_action(const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
#ifdef LASP_HAVE_MPI
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (up && !down) MPI_Abort(MPI_COMM_WORLD, 3);
#endif
  std::abort();
}

class Watchdog {
 public:
  struct Entry {
    std::chrono::steady_clock::time_point start;
    std::string what;
    bool reported = false;
  };
  using Handle = std::list<Entry>::iterator;

  static Watchdog& get() {
    static Watchdog w;
    return w;
  }
  ~Watchdog() { stop(); }

  double timeout() {
    std::lock_guard<std::mutex> lock(mu_);
    init_locked();
    return timeout_;
  }
  void set_timeout(double s) {
    LASP_CHECK(s >= 0) << "comm timeout must be >= 0 seconds (0 disables), got " << s;
    std::lock_guard<std::mutex> lock(mu_);
    init_locked();
    timeout_ = s;
    cv_.notify_all();
  }
  void set_handler(CommTimeoutHandler h) {
    std::lock_guard<std::mutex> lock(mu_);
    handler_ = std::move(h);
  }

  // Returns false (and registers nothing) when the watchdog is disabled.
  bool begin(std::string what, Handle* handle) {
    std::lock_guard<std::mutex> lock(mu_);
    init_locked();
    if (timeout_ <= 0) return false;
    if (!thread_.joinable()) {
      stopping_ = false;
      thread_ = std::thread([this] { run(); });
    }
    *handle = active_.insert(active_.end(), Entry{std::chrono::steady_clock::now(), std::move(what)});
    return true;
  }
  void end(Handle h) {
    std::lock_guard<std::mutex> lock(mu_);
    active_.erase(h);
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void init_locked() {
    if (!initialised_) {
      timeout_ = timeout_from_env();
      initialised_ = true;
    }
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      const double period = timeout_ > 0 ? std::min(std::max(timeout_ / 4, 0.01), 1.0) : 1.0;
      cv_.wait_for(lock, std::chrono::duration<double>(period));
      if (stopping_ || timeout_ <= 0) continue;
      const auto now = std::chrono::steady_clock::now();
      for (Entry& e : active_) {
        const double waited = std::chrono::duration<double>(now - e.start).count();
        if (e.reported || waited < timeout_) continue;
        e.reported = true;
        std::ostringstream msg;
        msg << "[rank " << process_rank() << "] lasp: " << e.what << " did not complete in "
            << timeout_ << " s (LASP_COMM_TIMEOUT); aborting all ranks";
        CommTimeoutHandler h = handler_;
        lock.unlock();
        if (h) h(msg.str());
        else default_timeout_action(msg.str());
        lock.lock();
        break;  // the list may have changed while unlocked
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  bool stopping_ = false;
  bool initialised_ = false;
  double timeout_ = 600.0;
  CommTimeoutHandler handler_;
  std::list<Entry> active_;
};

// Registers a blocking call with the watchdog for the lifetime of the scope, and adds its wall
// time to the comm's counter (host time: for NCCL calls, the enqueue time only).
class WatchScope {
 public:
  WatchScope(Comm& c, CommOp op)
      : profile_("comm"), comm_(c), op_(op), start_(std::chrono::steady_clock::now()) {
    std::ostringstream what;
    what << comm_op_name(op) << " on comm '" << c.name() << "' (rank " << c.rank() << " of "
         << c.size() << ")";
    active_ = Watchdog::get().begin(what.str(), &handle_);
  }
  ~WatchScope() {
    if (active_) Watchdog::get().end(handle_);
    comm_.add_seconds(op_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }

 private:
  ProfileScope profile_;
  Comm& comm_;
  CommOp op_;
  std::chrono::steady_clock::time_point start_;
  bool active_ = false;
  Watchdog::Handle handle_;
};

}  // namespace

void set_comm_timeout(double seconds) { Watchdog::get().set_timeout(seconds); }
double comm_timeout() { return Watchdog::get().timeout(); }
void set_comm_timeout_handler(CommTimeoutHandler handler) {
  Watchdog::get().set_handler(std::move(handler));
}

// ---------------------------------------------------------------------------------------------
// MPI types and the bf16 sum.
namespace {

#ifdef LASP_HAVE_MPI
MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::F64: return MPI_DOUBLE;
    case DType::F32: return MPI_FLOAT;
    case DType::BF16:
    case DType::F16: return MPI_UINT16_T;
    case DType::I32: return MPI_INT32_T;
    case DType::I64: return MPI_INT64_T;
    case DType::U8:
    case DType::F8E4M3:
    case DType::F8E5M2: return MPI_UINT8_T;
  }
  return MPI_BYTE;
}

void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const uint16_t* a = static_cast<const uint16_t*>(in);
  uint16_t* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

MPI_Op g_bf16_sum = MPI_OP_NULL;

MPI_Op mpi_sum_op(DType t) {
  if (t == DType::BF16) {
    if (g_bf16_sum == MPI_OP_NULL) MPI_CHECK(MPI_Op_create(&bf16_sum, /*commute=*/1, &g_bf16_sum));
    return g_bf16_sum;
  }
  LASP_CHECK(t == DType::F64 || t == DType::F32 || t == DType::I32 || t == DType::I64)
      << "sum reductions support fp64, fp32, bf16, int32 and int64, got " << dtype_name(t);
  return MPI_SUM;
}

int mpi_count(int64_t n) {
  LASP_CHECK(n <= INT_MAX) << "a single MPI message of " << n
                           << " elements exceeds INT_MAX; split the buffer";
  return static_cast<int>(n);
}
#endif

#ifdef LASP_HAVE_NCCL
ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F64: return ncclFloat64;
    case DType::F32: return ncclFloat32;
    case DType::BF16: return ncclBfloat16;
    case DType::F16: return ncclFloat16;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    case DType::U8:
    case DType::F8E4M3:
    case DType::F8E5M2: return ncclUint8;
  }
  return ncclUint8;
}
cudaStream_t nccl_stream() { return static_cast<cudaStream_t>(current_stream().handle); }
#endif

void check_buffer(const Tensor& t, const char* op, const char* what) {
  LASP_CHECK(t.defined()) << op << ": " << what << " is undefined";
  LASP_CHECK(t.is_contiguous()) << op << ": " << what << " must be contiguous, got " << t.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
struct Comm::Impl {
  std::string name;
  int rank = 0;
  int size = 1;
#ifdef LASP_HAVE_MPI
  MPI_Comm mpi = MPI_COMM_NULL;
  bool owns_mpi = false;
#endif
#ifdef LASP_HAVE_NCCL
  ncclComm_t nccl = nullptr;
  // The NCCL communicator is made the first time a CUDA tensor is used (collective over the
  // group: the id travels through MPI, so every rank must reach its first CUDA call).
  ncclComm_t get_nccl() {
    if (nccl) return nccl;
    ncclUniqueId id;
    if (rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mpi));
    NCCL_CHECK(ncclCommInitRank(&nccl, size, id, rank));
    return nccl;
  }
  // The stream this group's non-blocking collectives run on (created on first use, on the
  // current device; non-blocking so the legacy default stream does not serialise with it; the
  // highest priority so its small kernels get SMs while compute kernels fill the GPU).
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;  // re-recorded on the current stream by every async launch
  // Makes the comm stream wait for everything enqueued so far on the current stream (and for
  // `also_after` when given) and returns it.
  cudaStream_t stream_after_current(cudaEvent_t also_after) {
    if (!stream) {
      int least = 0, greatest = 0;
      CUDA_RT_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      CUDA_RT_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest));
      CUDA_RT_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    }
    CUDA_RT_CHECK(cudaEventRecord(ready, static_cast<cudaStream_t>(current_stream().handle)));
    CUDA_RT_CHECK(cudaStreamWaitEvent(stream, ready, 0));
    if (also_after) CUDA_RT_CHECK(cudaStreamWaitEvent(stream, also_after, 0));
    return stream;
  }
  // An event recorded on the comm stream now (the completion of what was just enqueued).
  cudaEvent_t record_done() {
    cudaEvent_t e = nullptr;
    CUDA_RT_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CUDA_RT_CHECK(cudaEventRecord(e, stream));
    return e;
  }
#endif
};

// What a CommRequest holds (see comm.h).
struct CommRequest::State {
  Comm* comm = nullptr;
  CommOp op = CommOp::AllReduce;
  std::vector<Tensor> keep;  // the buffers, alive until wait()
  bool pending = true;
#ifdef LASP_HAVE_MPI
  MPI_Request mpi = MPI_REQUEST_NULL;
#endif
#ifdef LASP_HAVE_NCCL
  cudaEvent_t done = nullptr;  // recorded on the comm stream after the collective
#endif
};

Comm::Comm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Comm::~Comm() {
#ifdef LASP_HAVE_NCCL
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  if (impl_->nccl) ncclCommDestroy(impl_->nccl);
  if (impl_->ready) cudaEventDestroy(impl_->ready);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
#endif
#ifdef LASP_HAVE_MPI
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (impl_->owns_mpi && !finalized) MPI_Comm_free(&impl_->mpi);
#endif
}

std::unique_ptr<Comm> Comm::self(const std::string& name) {
  auto impl = std::make_unique<Impl>();
  impl->name = name;
#ifdef LASP_HAVE_MPI
  int up = 0;
  MPI_Initialized(&up);
  if (up) {
    MPI_CHECK(MPI_Comm_dup(MPI_COMM_SELF, &impl->mpi));
    impl->owns_mpi = true;
  }
#endif
  return std::unique_ptr<Comm>(new Comm(std::move(impl)));
}

int Comm::rank() const { return impl_->rank; }
int Comm::size() const { return impl_->size; }
const std::string& Comm::name() const { return impl_->name; }

void Comm::count(CommOp op, size_t bytes) {
  counters_[static_cast<int>(op)].calls += 1;
  counters_[static_cast<int>(op)].bytes += static_cast<int64_t>(bytes);
}

void Comm::reset_counters() { counters_ = {}; }

double Comm::total_seconds() const {
  double s = 0;
  for (const auto& c : counters_) s += c.seconds;
  return s;
}

namespace {
// Which transport a tensor takes.
enum class Route { Host, Nccl, Staged };
Route route_of(const Tensor& t) {
  if (!t.is_cuda()) return Route::Host;
#ifdef LASP_HAVE_NCCL
  return Route::Nccl;
#else
  return Route::Staged;
#endif
}
bool has_mpi(const Comm::Impl& impl) {
#ifdef LASP_HAVE_MPI
  return impl.mpi != MPI_COMM_NULL;
#else
  (void)impl;
  return false;
#endif
}
}  // namespace

void Comm::all_gather(Tensor& out, const Tensor& in) {
  check_buffer(in, "all_gather", "in");
  check_buffer(out, "all_gather", "out");
  LASP_CHECK(out.dtype() == in.dtype() && out.device() == in.device())
      << "all_gather: out " << out.str() << " and in " << in.str() << " differ in dtype or device";
  LASP_CHECK_EQ(out.numel(), in.numel() * size())
      << "all_gather on '" << name() << "': out " << out.str() << " must hold size() x in " << in.str();
  count(CommOp::AllGather, in.nbytes());
  WatchScope watch(*this, CommOp::AllGather);
  const Route route = route_of(in);
  if (route == Route::Staged) {
    Tensor h_out = Tensor::empty(out.shape(), out.dtype());
    Tensor h_in = in.to(cpu());
#ifdef LASP_HAVE_MPI
    if (has_mpi(*impl_)) {
      MPI_CHECK(MPI_Allgather(h_in.raw(), mpi_count(in.numel()), mpi_type(in.dtype()), h_out.raw(),
                              mpi_count(in.numel()), mpi_type(in.dtype()), impl_->mpi));
    } else
#endif
      std::memcpy(h_out.raw(), h_in.raw(), in.nbytes());
    out.copy_from(h_out.to(out.device()));
    return;
  }
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    NCCL_CHECK(ncclAllGather(in.raw(), out.raw(), static_cast<size_t>(in.numel()),
                             nccl_type(in.dtype()), impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) {
    MPI_CHECK(MPI_Allgather(in.raw(), mpi_count(in.numel()), mpi_type(in.dtype()), out.raw(),
                            mpi_count(in.numel()), mpi_type(in.dtype()), impl_->mpi));
    return;
  }
#endif
  device_memcpy(out.raw(), out.device(), in.raw(), in.device(), in.nbytes());
}

void Comm::all_reduce_sum(Tensor& t) {
  check_buffer(t, "all_reduce_sum", "t");
  count(CommOp::AllReduce, t.nbytes());
  WatchScope watch(*this, CommOp::AllReduce);
  const Route route = route_of(t);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    LASP_CHECK(t.dtype() != DType::U8 && t.dtype() != DType::F8E4M3 && t.dtype() != DType::F8E5M2)
        << "all_reduce_sum: no sum for " << dtype_name(t.dtype());
    NCCL_CHECK(ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                             ncclSum, impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) {
    Tensor h = route == Route::Staged ? t.to(cpu()) : t;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, h.raw(), mpi_count(t.numel()), mpi_type(t.dtype()),
                            mpi_sum_op(t.dtype()), impl_->mpi));
    if (route == Route::Staged) t.copy_from(h.to(t.device()));
    return;
  }
#endif
  (void)route;  // one rank: the sum is t itself
}

void Comm::reduce_scatter_sum(Tensor& out, const Tensor& in) {
  check_buffer(in, "reduce_scatter_sum", "in");
  check_buffer(out, "reduce_scatter_sum", "out");
  LASP_CHECK(out.dtype() == in.dtype() && out.device() == in.device())
      << "reduce_scatter_sum: out " << out.str() << " and in " << in.str()
      << " differ in dtype or device";
  LASP_CHECK_EQ(in.numel(), out.numel() * size())
      << "reduce_scatter_sum on '" << name() << "': in " << in.str() << " must hold size() x out "
      << out.str();
  count(CommOp::ReduceScatter, in.nbytes());
  WatchScope watch(*this, CommOp::ReduceScatter);
  const Route route = route_of(in);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    NCCL_CHECK(ncclReduceScatter(in.raw(), out.raw(), static_cast<size_t>(out.numel()),
                                 nccl_type(in.dtype()), ncclSum, impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) {
    Tensor h_in = route == Route::Staged ? in.to(cpu()) : in;
    Tensor h_out = route == Route::Staged ? Tensor::empty(out.shape(), out.dtype()) : out;
    MPI_CHECK(MPI_Reduce_scatter_block(h_in.raw(), h_out.raw(), mpi_count(out.numel()),
                                       mpi_type(in.dtype()), mpi_sum_op(in.dtype()), impl_->mpi));
    if (route == Route::Staged) out.copy_from(h_out.to(out.device()));
    return;
  }
#endif
  (void)route;
  device_memcpy(out.raw(), out.device(), in.raw(), in.device(), out.nbytes());
}

void Comm::broadcast(Tensor& t, int root) {
  check_buffer(t, "broadcast", "t");
  LASP_CHECK(root >= 0 && root < size()) << "broadcast root " << root << " out of range for comm '"
                                         << name() << "' of size " << size();
  count(CommOp::Broadcast, t.nbytes());
  WatchScope watch(*this, CommOp::Broadcast);
  const Route route = route_of(t);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    NCCL_CHECK(ncclBroadcast(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                             root, impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) {
    Tensor h = route == Route::Staged ? t.to(cpu()) : t;
    MPI_CHECK(MPI_Bcast(h.raw(), mpi_count(t.numel()), mpi_type(t.dtype()), root, impl_->mpi));
    if (route == Route::Staged) t.copy_from(h.to(t.device()));
    return;
  }
#endif
  (void)route;
}

void Comm::send(const Tensor& t, int dst) {
  check_buffer(t, "send", "t");
  LASP_CHECK(dst >= 0 && dst < size() && dst != rank())
      << "send: destination " << dst << " invalid on comm '" << name() << "' (rank " << rank()
      << " of " << size() << ")";
  count(CommOp::Send, t.nbytes());
  WatchScope watch(*this, CommOp::Send);
  const Route route = route_of(t);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    NCCL_CHECK(ncclSend(t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), dst,
                        impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  Tensor h = route == Route::Staged ? t.to(cpu()) : t;
  MPI_CHECK(MPI_Send(h.raw(), mpi_count(t.numel()), mpi_type(t.dtype()), dst, 0, impl_->mpi));
#endif
  (void)route;
}

void Comm::recv(Tensor& t, int src) {
  check_buffer(t, "recv", "t");
  LASP_CHECK(src >= 0 && src < size() && src != rank())
      << "recv: source " << src << " invalid on comm '" << name() << "' (rank " << rank() << " of "
      << size() << ")";
  count(CommOp::Recv, t.nbytes());
  WatchScope watch(*this, CommOp::Recv);
  const Route route = route_of(t);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    NCCL_CHECK(ncclRecv(t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), src,
                        impl_->get_nccl(), nccl_stream()));
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  Tensor h = route == Route::Staged ? Tensor::empty(t.shape(), t.dtype()) : t;
  MPI_CHECK(MPI_Recv(h.raw(), mpi_count(t.numel()), mpi_type(t.dtype()), src, 0, impl_->mpi,
                     MPI_STATUS_IGNORE));
  if (route == Route::Staged) t.copy_from(h.to(t.device()));
#endif
  (void)route;
}

void Comm::sendrecv(const Tensor& out, int dst, Tensor& in, int src) {
  check_buffer(out, "sendrecv", "out");
  check_buffer(in, "sendrecv", "in");
  LASP_CHECK(dst >= 0 && dst < size() && src >= 0 && src < size())
      << "sendrecv: dst " << dst << " / src " << src << " out of range on comm '" << name()
      << "' of size " << size();
  LASP_CHECK(out.dtype() == in.dtype() && out.device() == in.device())
      << "sendrecv: out " << out.str() << " and in " << in.str() << " differ in dtype or device";
  count(CommOp::SendRecv, out.nbytes());
  WatchScope watch(*this, CommOp::SendRecv);
  if (dst == rank() && src == rank()) {
    LASP_CHECK_EQ(out.nbytes(), in.nbytes()) << "sendrecv to self";
    device_memcpy(in.raw(), in.device(), out.raw(), out.device(), out.nbytes());
    return;
  }
  const Route route = route_of(out);
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    ncclComm_t c = impl_->get_nccl();
    NCCL_CHECK(ncclGroupStart());
    NCCL_CHECK(ncclSend(out.raw(), static_cast<size_t>(out.numel()), nccl_type(out.dtype()), dst, c,
                        nccl_stream()));
    NCCL_CHECK(ncclRecv(in.raw(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()), src, c,
                        nccl_stream()));
    NCCL_CHECK(ncclGroupEnd());
    return;
  }
#endif
#ifdef LASP_HAVE_MPI
  Tensor h_out = route == Route::Staged ? out.to(cpu()) : out;
  Tensor h_in = route == Route::Staged ? Tensor::empty(in.shape(), in.dtype()) : in;
  MPI_CHECK(MPI_Sendrecv(h_out.raw(), mpi_count(out.numel()), mpi_type(out.dtype()), dst, 1,
                         h_in.raw(), mpi_count(in.numel()), mpi_type(in.dtype()), src, 1,
                         impl_->mpi, MPI_STATUS_IGNORE));
  if (route == Route::Staged) in.copy_from(h_in.to(in.device()));
#endif
  (void)route;
}

void Comm::barrier() {
  count(CommOp::Barrier, 0);
  WatchScope watch(*this, CommOp::Barrier);
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) MPI_CHECK(MPI_Barrier(impl_->mpi));
#endif
}

// ---------------------------------------------------------------------------------------------
// Non-blocking collectives.

CommRequest::CommRequest() = default;
CommRequest::CommRequest(std::unique_ptr<State> state) : s_(std::move(state)) {}
CommRequest::CommRequest(CommRequest&& other) noexcept = default;

namespace {
// For destructors and move assignment, which must not throw: a failed wait is reported on stderr
// (the collective's own error, e.g. an MPI failure, has normally been raised already).
void wait_quietly(CommRequest& r) noexcept {
  try {
    r.wait();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] lasp: waiting for a pending collective failed: %s\n", process_rank(),
                 e.what());
  }
}
}  // namespace

CommRequest& CommRequest::operator=(CommRequest&& other) noexcept {
  if (this != &other) {
    if (pending()) wait_quietly(*this);
    s_ = std::move(other.s_);
  }
  return *this;
}

CommRequest::~CommRequest() {
  if (pending()) wait_quietly(*this);
}

bool CommRequest::pending() const { return s_ && s_->pending; }

void CommRequest::wait() {
  if (!pending()) return;
  State& s = *s_;
  s.pending = false;  // set first: a failure below is not waited for again by the destructor
#ifdef LASP_HAVE_NCCL
  if (s.done) {
    CUDA_RT_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(current_stream().handle), s.done, 0));
    // Safe once the wait is enqueued: the wait uses the event as recorded.
    CUDA_RT_CHECK(cudaEventDestroy(s.done));
    s.done = nullptr;
  }
#endif
#ifdef LASP_HAVE_MPI
  if (s.mpi != MPI_REQUEST_NULL) {
    WatchScope watch(*s.comm, s.op);
    MPI_CHECK(MPI_Wait(&s.mpi, MPI_STATUS_IGNORE));
  }
#endif
  // CUDA: the buffers' memory may now be reused by work on the current stream, which is ordered
  // after the collective.
  s.keep.clear();
}

bool CommRequest::test() {
  if (!pending()) return true;
#ifdef LASP_HAVE_MPI
  if (s_->mpi != MPI_REQUEST_NULL) {
    int flag = 0;
    MPI_CHECK(MPI_Test(&s_->mpi, &flag, MPI_STATUS_IGNORE));
    if (!flag) return false;
    s_->pending = false;
    s_->keep.clear();
    return true;
  }
#endif
#ifdef LASP_HAVE_NCCL
  if (s_->done) {
    const cudaError_t rc = cudaEventQuery(s_->done);
    if (rc == cudaErrorNotReady) return false;
    CUDA_RT_CHECK(rc);
  }
#endif
  return true;
}

CommRequest Comm::all_gather_async(Tensor& out, const Tensor& in) {
  check_buffer(in, "all_gather_async", "in");
  check_buffer(out, "all_gather_async", "out");
  LASP_CHECK(out.dtype() == in.dtype() && out.device() == in.device())
      << "all_gather_async: out " << out.str() << " and in " << in.str() << " differ in dtype or device";
  LASP_CHECK_EQ(out.numel(), in.numel() * size())
      << "all_gather_async on '" << name() << "': out " << out.str() << " must hold size() x in " << in.str();
  const Route route = route_of(in);
  // One rank, host staging, or no MPI: there is nothing to overlap; complete now.
  if (size() == 1 || route == Route::Staged || (route == Route::Host && !has_mpi(*impl_))) {
    all_gather(out, in);
    return CommRequest();
  }
  count(CommOp::AllGather, in.nbytes());
  WatchScope watch(*this, CommOp::AllGather);
  auto st = std::make_unique<CommRequest::State>();
  st->comm = this;
  st->op = CommOp::AllGather;
  st->keep = {out, in};
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    ncclComm_t nc = impl_->get_nccl();
    cudaStream_t cs = impl_->stream_after_current(nullptr);
    NCCL_CHECK(ncclAllGather(in.raw(), out.raw(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()),
                             nc, cs));
    st->done = impl_->record_done();
    return CommRequest(std::move(st));
  }
#endif
#ifdef LASP_HAVE_MPI
  MPI_CHECK(MPI_Iallgather(in.raw(), mpi_count(in.numel()), mpi_type(in.dtype()), out.raw(),
                           mpi_count(in.numel()), mpi_type(in.dtype()), impl_->mpi, &st->mpi));
#endif
  return CommRequest(std::move(st));
}

CommRequest Comm::all_reduce_sum_async(Tensor& t, CommRequest* after) {
  check_buffer(t, "all_reduce_sum_async", "t");
  const Route route = route_of(t);
  if (size() == 1 || route == Route::Staged || (route == Route::Host && !has_mpi(*impl_))) {
    if (after) after->wait();
    all_reduce_sum(t);
    return CommRequest();
  }
  count(CommOp::AllReduce, t.nbytes());
  WatchScope watch(*this, CommOp::AllReduce);
  auto st = std::make_unique<CommRequest::State>();
  st->comm = this;
  st->op = CommOp::AllReduce;
  st->keep = {t};
#ifdef LASP_HAVE_NCCL
  if (route == Route::Nccl) {
    LASP_CHECK(t.dtype() != DType::U8 && t.dtype() != DType::F8E4M3 && t.dtype() != DType::F8E5M2)
        << "all_reduce_sum_async: no sum for " << dtype_name(t.dtype());
    cudaEvent_t dep = nullptr;
    if (after && after->pending()) {
      if (after->s_->done) dep = after->s_->done;  // a device-side dependency
      else after->wait();                           // a host request: complete it first
    }
    ncclComm_t nc = impl_->get_nccl();
    cudaStream_t cs = impl_->stream_after_current(dep);
    NCCL_CHECK(ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                             ncclSum, nc, cs));
    st->done = impl_->record_done();
    return CommRequest(std::move(st));
  }
#endif
#ifdef LASP_HAVE_MPI
  if (after) after->wait();
  MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, t.raw(), mpi_count(t.numel()), mpi_type(t.dtype()),
                           mpi_sum_op(t.dtype()), impl_->mpi, &st->mpi));
#endif
  return CommRequest(std::move(st));
}

std::unique_ptr<Comm> Comm::split(int color, int key, const std::string& name) const {
  LASP_CHECK(color >= 0) << "Comm::split: color must be >= 0, got " << color;
  auto impl = std::make_unique<Impl>();
  impl->name = name;
#ifdef LASP_HAVE_MPI
  if (has_mpi(*impl_)) {
    MPI_CHECK(MPI_Comm_split(impl_->mpi, color, key, &impl->mpi));
    impl->owns_mpi = true;
    MPI_CHECK(MPI_Comm_rank(impl->mpi, &impl->rank));
    MPI_CHECK(MPI_Comm_size(impl->mpi, &impl->size));
  }
#endif
  return std::unique_ptr<Comm>(new Comm(std::move(impl)));
}

// ---------------------------------------------------------------------------------------------
namespace {
std::unique_ptr<Comm> g_world;
bool g_initialised = false;
}  // namespace

struct WorldFactory {
  static std::unique_ptr<Comm> make_world() {
    auto impl = std::make_unique<Comm::Impl>();
    impl->name = "world";
#ifdef LASP_HAVE_MPI
    int up = 0;
    MPI_Initialized(&up);
    if (up) {
      MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &impl->mpi));
      impl->owns_mpi = true;
      MPI_CHECK(MPI_Comm_rank(impl->mpi, &impl->rank));
      MPI_CHECK(MPI_Comm_size(impl->mpi, &impl->size));
    }
#endif
    return std::unique_ptr<Comm>(new Comm(std::move(impl)));
  }
};

void init_distributed(int* argc, char*** argv) {
  if (g_initialised) return;
#ifdef LASP_HAVE_MPI
  int up = 0;
  MPI_Initialized(&up);
  if (!up) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    // Below MPI_THREAD_MULTIPLE the watchdog's MPI_Abort from its own thread is outside the
    // standard; Open MPI and MPICH still honour it, which is all the watchdog needs.
  }
#else
  (void)argc;
  (void)argv;
#endif
  LASP_CHECK(!g_world) << "world() was used before init_distributed(); call init_distributed first "
                          "(references to the old single-rank world would dangle)";
  g_world = WorldFactory::make_world();
  set_process_rank(g_world->rank());
  g_initialised = true;
}

void finalize_distributed() {
  Watchdog::get().stop();
  g_world.reset();
#ifdef LASP_HAVE_MPI
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (up && !down) {
    if (g_bf16_sum != MPI_OP_NULL) MPI_Op_free(&g_bf16_sum);
    MPI_Finalize();
  }
#endif
  g_initialised = false;
}

bool distributed_initialized() { return g_initialised; }

Comm& world() {
  if (!g_world) g_world = WorldFactory::make_world();
  return *g_world;
}

}  // namespace lasp
