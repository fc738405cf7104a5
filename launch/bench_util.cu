// The CUDA side of launch/bench_util: a one-thread kernel that keeps the stream busy (and can
// count the SM cycles it spun).
#include <cuda_runtime.h>

#include "kernels/cuda_utils.cuh"
#include "launch/bench_util.h"

namespace lasp {
namespace {

// Spins for ns nanoseconds of the global timer; out != nullptr: writes the SM cycles and the
// nanoseconds it spun.
__global__ void spin_kernel(int64_t ns, unsigned long long* out) {
  uint64_t t0 = 0, t = 0;
  const long long c0 = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (static_cast<int64_t>(t - t0) < ns);
  if (out != nullptr) {
    out[0] = static_cast<unsigned long long>(clock64() - c0);
    out[1] = t - t0;
  }
}

}  // namespace

double stream_sm_clock_mhz(int64_t ns) {
  unsigned long long* out = nullptr;
  CUDA_CHECK(cudaMallocHost(&out, 2 * sizeof(unsigned long long)));
  spin_kernel<<<1, 1, 0, cuda_stream()>>>(ns, out);
  CUDA_CHECK_LAUNCH("stream_sm_clock_mhz");
  CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
  const double mhz =
      out[1] > 0 ? 1e3 * static_cast<double>(out[0]) / static_cast<double>(out[1]) : 0.0;
  CUDA_CHECK(cudaFreeHost(out));
  return mhz;
}

void stream_spin_ns(int64_t ns) {
  spin_kernel<<<1, 1, 0, cuda_stream()>>>(ns, nullptr);
  CUDA_CHECK_LAUNCH("stream_spin_ns");
}

}  // namespace lasp
