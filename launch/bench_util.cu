// The CUDA side of launch/bench_util: a one-thread kernel that keeps the stream busy.
#include <cuda_runtime.h>

#include "kernels/cuda_utils.cuh"
#include "launch/bench_util.h"

namespace lasp {
namespace {

__global__ void spin_kernel(int64_t ns) {
  uint64_t t0 = 0, t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (static_cast<int64_t>(t - t0) < ns);
}

}  // namespace

void stream_spin_ns(int64_t ns) {
  spin_kernel<<<1, 1, 0, cuda_stream()>>>(ns);
  CUDA_CHECK_LAUNCH("stream_spin_ns");
}

}  // namespace lasp
