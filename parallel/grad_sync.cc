#include "parallel/grad_sync.h"

#include <cstring>

#include "kernels/gemm.h"

#ifdef LASP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace lasp {

namespace {

// dst = alpha * src. CPU: a loop; CUDA: a [n,1] x [1,1] product, so it runs where gemm runs.
void scaled_copy(Tensor& dst, const Tensor& src, double alpha) {
  if (!dst.is_cuda()) {
    const int64_t n = dst.numel();
    switch (dst.dtype()) {
      case DType::F64: {
        const double* s = src.data<double>();
        double* d = dst.data<double>();
        for (int64_t i = 0; i < n; ++i) d[i] = alpha * s[i];
        return;
      }
      case DType::F32: {
        const float* s = src.data<float>();
        float* d = dst.data<float>();
        for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(alpha * s[i]);
        return;
      }
      case DType::BF16: {
        const bf16_t* s = src.data<bf16_t>();
        bf16_t* d = dst.data<bf16_t>();
        for (int64_t i = 0; i < n; ++i)
          d[i].bits = float_to_bf16(static_cast<float>(alpha * bf16_to_float(s[i].bits)));
        return;
      }
      default:
        LASP_FAIL() << "scaled_copy: unsupported dtype " << dtype_name(dst.dtype());
    }
  }
  Tensor d = dst.view({dst.numel(), 1});
  Tensor one = Tensor::full({1, 1}, 1.0, src.dtype(), src.device());
  gemm(d, src.view({src.numel(), 1}), false, one, false, static_cast<float>(alpha), 0.0f);
}

void reduce_bucket(Comm& comm, const std::vector<Tensor>& grads, size_t begin, size_t end,
                   bool average) {
  const DType dt = grads[begin].dtype();
  const Device dev = grads[begin].device();
  const double scale = 1.0 / comm.size();
  if (end - begin == 1) {  // one tensor: reduce it in place
    Tensor g = grads[begin];
    comm.all_reduce_sum(g);
    if (average && comm.size() > 1) {
      Tensor tmp = g.clone();
      scaled_copy(g, tmp, scale);
    }
    return;
  }
  int64_t total = 0;
  for (size_t i = begin; i < end; ++i) total += grads[i].numel();
  Tensor buf = Tensor::empty({total}, dt, dev);
  const size_t es = dtype_size(dt);
  char* base = static_cast<char*>(buf.raw());
  int64_t off = 0;
  for (size_t i = begin; i < end; ++i) {
    device_memcpy(base + off * es, dev, grads[i].raw(), dev, grads[i].nbytes());
    off += grads[i].numel();
  }
  comm.all_reduce_sum(buf);
  off = 0;
  for (size_t i = begin; i < end; ++i) {
    Tensor g = grads[i];
    Tensor part = buf.slice(0, off, off + g.numel());
    if (average && comm.size() > 1) {
      scaled_copy(g, part, scale);
    } else {
      device_memcpy(g.raw(), dev, part.raw(), dev, g.nbytes());
    }
    off += g.numel();
  }
}

// src -> dst on one device without blocking the host: CUDA copies are enqueued on the current
// stream (device_memcpy would synchronise it, stalling the backward this runs inside of).
void copy_on_stream(void* dst, const void* src, size_t bytes, Device dev) {
  if (bytes == 0) return;
  if (dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef LASP_HAVE_CUDA
  const cudaError_t rc = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                         static_cast<cudaStream_t>(current_stream().handle));
  LASP_CHECK(rc == cudaSuccess) << "gradient bucket copy of " << bytes
                                << " bytes failed: " << cudaGetErrorString(rc);
#else
  LASP_FAIL() << "this build of lasp has no CUDA support";
#endif
}

void check_grads(const std::vector<Tensor>& grads, const char* fn) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    LASP_CHECK(g.defined() && g.is_contiguous())
        << fn << ": gradient " << i << " must be a defined, contiguous tensor";
  }
}

}  // namespace

std::vector<std::pair<size_t, size_t>> plan_buckets(const std::vector<Tensor>& grads,
                                                    size_t bucket_bytes) {
  LASP_CHECK(bucket_bytes > 0) << "gradient buckets: bucket_bytes must be positive";
  std::vector<std::pair<size_t, size_t>> out;
  size_t begin = 0;
  while (begin < grads.size()) {
    size_t end = begin + 1;
    size_t bytes = grads[begin].nbytes();
    while (end < grads.size() && grads[end].dtype() == grads[begin].dtype() &&
           grads[end].device() == grads[begin].device() &&
           bytes + grads[end].nbytes() <= bucket_bytes) {
      bytes += grads[end].nbytes();
      ++end;
    }
    out.emplace_back(begin, end);
    begin = end;
  }
  return out;
}

void all_reduce_gradients(Comm& comm, const std::vector<Tensor>& grads, size_t bucket_bytes,
                          bool average) {
  LASP_CHECK(bucket_bytes > 0) << "all_reduce_gradients: bucket_bytes must be positive";
  check_grads(grads, "all_reduce_gradients");
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    LASP_CHECK(!average || g.dtype() == DType::F32 || g.dtype() == DType::F64 ||
               g.dtype() == DType::BF16)
        << "all_reduce_gradients: averaging needs fp32, fp64 or bf16, gradient " << i << " is "
        << g.str();
  }
  for (const auto& [begin, end] : plan_buckets(grads, bucket_bytes))
    reduce_bucket(comm, grads, begin, end, average);
}

// ------------------------------------------------------------------------------- GradReducer

GradReducer::GradReducer(std::vector<Tensor> grads, const std::vector<Comm*>& groups,
                         size_t bucket_bytes, bool overlap)
    : grads_(std::move(grads)), bucket_bytes_(bucket_bytes), overlap_(overlap) {
  LASP_CHECK(bucket_bytes > 0) << "GradReducer: bucket_bytes must be positive (parallel.bucket_mb)";
  check_grads(grads_, "GradReducer");
  for (size_t i = 0; i < grads_.size(); ++i) {
    const bool fresh = index_.emplace(grads_[i].raw(), i).second;
    LASP_CHECK(fresh)
        << "GradReducer: gradient " << i << " " << grads_[i].str()
        << " shares its storage with an earlier one; each gradient must be listed once";
  }
  for (Comm* g : groups) {
    LASP_CHECK(g != nullptr) << "GradReducer: null group";
    if (g->size() > 1) comms_.push_back(g->split(0, g->rank(), g->name() + "_grad"));
  }
  // CUDA: create the duplicates' NCCL communicators now (a collective, with device allocations)
  // rather than inside the first backward.
  for (const Tensor& g : grads_) {
    if (!g.is_cuda()) continue;
    for (const auto& c : comms_) {
      Tensor warm = Tensor::zeros({1}, DType::F32, g.device());
      c->all_reduce_sum(warm);
      c->reset_counters();
    }
    break;
  }
  for (const auto& [begin, end] : plan_buckets(grads_, bucket_bytes)) {
    Bucket b;
    b.begin = begin;
    b.end = end;
    buckets_.push_back(std::move(b));
    for (size_t i = begin; i < end; ++i) bucket_of_.push_back(buckets_.size() - 1);
  }
  marked_.assign(grads_.size(), 0);
}

GradReducer::~GradReducer() = default;  // pending requests are waited for by their destructors

std::vector<Comm*> GradReducer::comms() const {
  std::vector<Comm*> out;
  for (const auto& c : comms_) out.push_back(c.get());
  return out;
}

void GradReducer::begin() {
  if (!overlap_ || !active()) return;
  LASP_CHECK(!armed_) << "GradReducer::begin() called twice without finish()";
  for (Bucket& b : buckets_) {
    b.ready = 0;
    b.next_group = 0;
    b.buf = Tensor();
  }
  std::fill(marked_.begin(), marked_.end(), 0);
  next_launch_ = 0;
  launched_before_finish_ = 0;
  armed_ = true;
}

void GradReducer::mark_ready(const Tensor& grad) {
  if (!armed_) return;
  const auto it = index_.find(grad.raw());
  LASP_CHECK(it != index_.end()) << "GradReducer::mark_ready: " << grad.str()
                                 << " is not one of the gradients the reducer was built with";
  const size_t i = it->second;
  LASP_CHECK(!marked_[i]) << "GradReducer::mark_ready: gradient " << i << " " << grad.str()
                          << " reported final twice in one backward";
  marked_[i] = 1;
  ++buckets_[bucket_of_[i]].ready;
  launch_ready_buckets();
}

Tensor& GradReducer::reduced(Bucket& b) { return b.buf.defined() ? b.buf : grads_[b.begin]; }

void GradReducer::launch_ready_buckets() {
  // Buckets start in plan order only, so every rank issues the same sequence of collectives.
  while (next_launch_ < buckets_.size() &&
         buckets_[next_launch_].ready ==
             buckets_[next_launch_].end - buckets_[next_launch_].begin) {
    launch(next_launch_);
    ++next_launch_;
  }
}

void GradReducer::launch(size_t k) {
  Bucket& b = buckets_[k];
  const Tensor& first = grads_[b.begin];
  // Host: the previous bucket moves on to its next group now, a point every rank reaches in the
  // same order (a test-driven start would depend on timing and could order collectives
  // differently on different ranks).
  if (k > 0 && !first.is_cuda()) {
    Bucket& prev = buckets_[k - 1];
    if (prev.next_group > 0 && prev.next_group < comms_.size()) start_next_group(prev);
  }
  if (b.end - b.begin > 1) {
    int64_t total = 0;
    for (size_t i = b.begin; i < b.end; ++i) total += grads_[i].numel();
    b.buf = Tensor::empty({total}, first.dtype(), first.device());
    char* base = static_cast<char*>(b.buf.raw());
    size_t off = 0;
    for (size_t i = b.begin; i < b.end; ++i) {
      copy_on_stream(base + off, grads_[i].raw(), grads_[i].nbytes(), first.device());
      off += grads_[i].nbytes();
    }
  }
  start_next_group(b);
  // CUDA: every group at once; each waits on the previous one's completion event on the device.
  while (first.is_cuda() && b.next_group < comms_.size()) start_next_group(b);
}

void GradReducer::start_next_group(Bucket& b) {
  LASP_CHECK(b.next_group < comms_.size())
      << "GradReducer: bucket reduced over every group already";
  CommRequest* after = b.next_group > 0 ? &b.req : nullptr;
  CommRequest r = comms_[b.next_group]->all_reduce_sum_async(reduced(b), after);
  // Host: `after` was waited for inside the call. CUDA: the new reduction waits for it on the
  // device; it stays pending here and is waited for in finish() (waiting now would stall the
  // current stream).
  if (b.req.pending()) b.earlier.push_back(std::move(b.req));
  b.req = std::move(r);
  ++b.next_group;
}

void GradReducer::finish() {
  if (!active()) return;
  if (!overlap_) {
    for (const auto& c : comms_) all_reduce_gradients(*c, grads_, bucket_bytes_, /*average=*/false);
    return;
  }
  LASP_CHECK(armed_) << "GradReducer::finish() without begin()";
  armed_ = false;
  launched_before_finish_ = next_launch_;
  // Gradients the model did not report are final now too.
  while (next_launch_ < buckets_.size()) {
    launch(next_launch_);
    ++next_launch_;
  }
  for (Bucket& b : buckets_)
    while (b.next_group < comms_.size()) start_next_group(b);
  for (Bucket& b : buckets_) {
    for (CommRequest& r : b.earlier) r.wait();
    b.earlier.clear();
    b.req.wait();
    if (!b.buf.defined()) continue;  // reduced in place
    const char* base = static_cast<const char*>(b.buf.raw());
    size_t off = 0;
    for (size_t i = b.begin; i < b.end; ++i) {
      copy_on_stream(grads_[i].raw(), base + off, grads_[i].nbytes(), grads_[i].device());
      off += grads_[i].nbytes();
    }
    // CUDA: the copies are on the current stream; the buffer's memory is reused only by later
    // work on that stream.
    b.buf = Tensor();
  }
}

}  // namespace lasp
