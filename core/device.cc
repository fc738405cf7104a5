#include "core/device.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <vector>

#include "core/check.h"

#ifdef LASP_HAVE_CUDA
#include <cuda_runtime.h>
#define CUDA_CHECK(expr)                                                              \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    LASP_CHECK(err_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(err_);     \
  } while (0)
#endif

namespace lasp {

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

#ifdef LASP_HAVE_CUDA

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}
bool cuda_available() { return cuda_device_count() > 0; }
void cuda_set_device(int index) { CUDA_CHECK(cudaSetDevice(index)); }

namespace {
thread_local Stream t_stream;

// Caching allocator: freed blocks go to a free list keyed by rounded size and device, and are
// handed out again before cudaMalloc is asked. On out-of-memory the cache is released and the
// allocation retried once. Sizes round up to 512 B (small) or 2 MiB (large) to bound waste.
struct CachingAllocator {
  std::mutex mu;
  std::multimap<std::pair<int, size_t>, void*> free_blocks;
  MemoryStats stats;

  static size_t round(size_t n) {
    const size_t q = n < (1u << 20) ? 512 : (2u << 20);
    return (n + q - 1) / q * q;
  }
  void* alloc(int dev, size_t n) {
    n = round(n);
    std::lock_guard<std::mutex> lock(mu);
    auto it = free_blocks.find({dev, n});
    void* p = nullptr;
    if (it != free_blocks.end()) {
      p = it->second;
      free_blocks.erase(it);
    } else {
      CUDA_CHECK(cudaSetDevice(dev));
      if (cudaMalloc(&p, n) != cudaSuccess) {
        cudaGetLastError();
        release_locked();
        cudaError_t err = cudaMalloc(&p, n);
        LASP_CHECK(err == cudaSuccess) << "CUDA out of memory allocating " << n << " bytes on cuda:"
                                       << dev << " (" << stats.allocated << " bytes in use): "
                                       << cudaGetErrorString(err);
      }
      stats.reserved += n;
    }
    stats.allocated += n;
    if (stats.allocated > stats.peak_allocated) stats.peak_allocated = stats.allocated;
    return p;
  }
  void free(int dev, void* p, size_t n) {
    n = round(n);
    std::lock_guard<std::mutex> lock(mu);
    stats.allocated -= n;
    free_blocks.insert({{dev, n}, p});
  }
  void release_locked() {
    cudaDeviceSynchronize();
    for (auto& kv : free_blocks) {
      cudaFree(kv.second);
      stats.reserved -= kv.first.second;
    }
    free_blocks.clear();
  }
};
CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();  // never destroyed: outlives all tensors
  return *a;
}
}  // namespace

Stream current_stream() { return t_stream; }
void set_current_stream(Stream s) { t_stream = s; }
Stream create_stream() {
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return Stream{s};
}
void destroy_stream(Stream s) {
  if (s.handle) cudaStreamDestroy(static_cast<cudaStream_t>(s.handle));
}
void synchronize_stream(Stream s) {
  CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s.handle)));
}
void cuda_synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

MemoryStats cuda_memory_stats() {
  std::lock_guard<std::mutex> lock(allocator().mu);
  return allocator().stats;
}
void cuda_reset_peak_memory() {
  std::lock_guard<std::mutex> lock(allocator().mu);
  allocator().stats.peak_allocated = allocator().stats.allocated;
}
void cuda_empty_cache() {
  std::lock_guard<std::mutex> lock(allocator().mu);
  allocator().release_locked();
}

#else  // CPU-only build

int cuda_device_count() { return 0; }
bool cuda_available() { return false; }
void cuda_set_device(int) {}
Stream current_stream() { return Stream{}; }
void set_current_stream(Stream) {}
Stream create_stream() { return Stream{}; }
void destroy_stream(Stream) {}
void synchronize_stream(Stream) {}
void cuda_synchronize() {}
MemoryStats cuda_memory_stats() { return {}; }
void cuda_reset_peak_memory() {}
void cuda_empty_cache() {}

#endif

void* device_alloc(Device d, size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (d.is_cpu()) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    LASP_CHECK(p != nullptr) << "out of host memory allocating " << bytes << " bytes";
    return p;
  }
#ifdef LASP_HAVE_CUDA
  return allocator().alloc(d.index, bytes);
#else
  LASP_FAIL() << "this build of lasp has no CUDA support (configure with -DLASP_CUDA=ON)";
  return nullptr;
#endif
}

void device_free(Device d, void* p, size_t bytes) {
  if (!p) return;
  if (d.is_cpu()) {
    std::free(p);
    return;
  }
#ifdef LASP_HAVE_CUDA
  allocator().free(d.index, p, bytes == 0 ? 1 : bytes);
#else
  (void)bytes;
#endif
}

void device_memcpy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes) {
  if (bytes == 0) return;
  if (dst_dev.is_cpu() && src_dev.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef LASP_HAVE_CUDA
  auto s = static_cast<cudaStream_t>(current_stream().handle);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
#else
  LASP_FAIL() << "this build of lasp has no CUDA support";
#endif
}

void device_memset_zero(void* dst, Device d, size_t bytes) {
  if (bytes == 0) return;
  if (d.is_cpu()) {
    std::memset(dst, 0, bytes);
    return;
  }
#ifdef LASP_HAVE_CUDA
  CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(current_stream().handle)));
#else
  LASP_FAIL() << "this build of lasp has no CUDA support";
#endif
}

}  // namespace lasp
