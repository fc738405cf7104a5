#include "launch/bench_util.h"

#ifdef LASP_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <random>
#include <vector>

#include "core/check.h"
#include "core/device.h"

#define BENCH_UTIL_CUDA(expr)                                                     \
  do {                                                                            \
    cudaError_t err_ = (expr);                                                    \
    LASP_CHECK(err_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

namespace lasp {

double median_event_ms(const std::function<void()>& fn, int iters, int warmup) {
  return median_event_ms_interleaved({fn}, iters, warmup).front();
}

namespace {

// The rounds of median_event_ms_interleaved; flush != nullptr: a memset of flush_bytes there is
// queued before each timed sample (median_event_ms_queued); spin_ns > 0: a spin kernel instead
// (median_event_ms_blocked).
std::vector<double> interleaved_rounds(const std::vector<std::function<void()>>& fns, int rounds,
                                       int warmup, int reps, void* flush, size_t flush_bytes,
                                       int64_t spin_ns = 0) {
  auto stream = static_cast<cudaStream_t>(current_stream().handle);
  for (int i = 0; i < warmup; ++i)
    for (const auto& fn : fns) fn();
  BENCH_UTIL_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  BENCH_UTIL_CUDA(cudaEventCreate(&start));
  BENCH_UTIL_CUDA(cudaEventCreate(&stop));
  std::vector<std::vector<double>> t(fns.size());
  for (int i = 0; i < rounds; ++i) {
    for (size_t f = 0; f < fns.size(); ++f) {
      if (flush != nullptr) BENCH_UTIL_CUDA(cudaMemsetAsync(flush, i & 0xff, flush_bytes, stream));
      if (spin_ns > 0) stream_spin_ns(spin_ns);
      BENCH_UTIL_CUDA(cudaEventRecord(start, stream));
      for (int r = 0; r < reps; ++r) fns[f]();
      BENCH_UTIL_CUDA(cudaEventRecord(stop, stream));
      BENCH_UTIL_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      BENCH_UTIL_CUDA(cudaEventElapsedTime(&ms, start, stop));
      t[f].push_back(ms / reps);
    }
  }
  BENCH_UTIL_CUDA(cudaEventDestroy(start));
  BENCH_UTIL_CUDA(cudaEventDestroy(stop));
  std::vector<double> medians;
  for (auto& v : t) {
    std::sort(v.begin(), v.end());
    medians.push_back(v[v.size() / 2]);
  }
  return medians;
}

}  // namespace

std::vector<double> median_event_ms_interleaved(const std::vector<std::function<void()>>& fns,
                                                int rounds, int warmup, int reps) {
  return interleaved_rounds(fns, rounds, warmup, reps, nullptr, 0);
}

std::vector<double> median_event_ms_queued(const std::vector<std::function<void()>>& fns,
                                           int rounds, int warmup) {
  constexpr size_t kFlushBytes = size_t{256} << 20;  // 5x the H200's 50 MB L2
  static void* flush = [] {
    void* p = nullptr;
    BENCH_UTIL_CUDA(cudaMalloc(&p, kFlushBytes));
    return p;
  }();
  return interleaved_rounds(fns, rounds, warmup, 1, flush, kFlushBytes);
}

std::vector<double> median_event_ms_blocked(const std::vector<std::function<void()>>& fns,
                                            int rounds, int warmup) {
  return interleaved_rounds(fns, rounds, warmup, 1, nullptr, 0, 50000);
}

std::string utc_clock() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm utc{};
  gmtime_r(&secs, &utc);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%02d:%02d:%02d.%03d", utc.tm_hour, utc.tm_min, utc.tm_sec, ms);
  return buf;
}

double host_issue_us(const std::function<void()>& fn, int calls) {
  auto stream = static_cast<cudaStream_t>(current_stream().handle);
  fn();
  BENCH_UTIL_CUDA(cudaStreamSynchronize(stream));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) fn();
  const auto t1 = std::chrono::steady_clock::now();
  BENCH_UTIL_CUDA(cudaStreamSynchronize(stream));
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / calls;
}

Tensor random_bf16_cuda(const Shape& shape, double stddev, uint32_t seed) {
  Tensor t = Tensor::empty(shape, DType::BF16, cuda());
  const int64_t n = t.numel();
  const int64_t block = std::min<int64_t>(n, int64_t{1} << 24);
  std::vector<uint16_t> host(static_cast<size_t>(block));
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(stddev));
  for (auto& h : host) h = float_to_bf16(dist(rng));
  auto* dst = static_cast<uint16_t*>(t.raw());
  for (int64_t off = 0; off < n; off += block) {
    const int64_t len = std::min(block, n - off);
    device_memcpy(dst + off, cuda(), host.data(), cpu(), static_cast<size_t>(len) * 2);
  }
  return t;
}

}  // namespace lasp

#endif  // LASP_HAVE_CUDA
