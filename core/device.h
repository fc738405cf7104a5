// Where a tensor lives and where its work runs.
#pragma once

#include <cstddef>
#include <string>

namespace lasp {

enum class DeviceType { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;
};

inline Device cpu() { return Device{}; }
inline Device cuda(int index = 0) { return Device{DeviceType::CUDA, index}; }

// True when lasp was built with CUDA and a device is present.
bool cuda_available();
int cuda_device_count();
// Makes `index` the current CUDA device of this thread (no-op without CUDA).
void cuda_set_device(int index);

// A CUDA stream (nullptr = the legacy default stream). On CPU work is synchronous.
struct Stream {
  void* handle = nullptr;
};
// The stream kernels of this thread launch on; set it to run work on another stream.
Stream current_stream();
void set_current_stream(Stream s);
Stream create_stream();  // a non-blocking CUDA stream
void destroy_stream(Stream s);
void synchronize_stream(Stream s);
void cuda_synchronize();

// Raw memory. CUDA memory comes from a caching allocator (freed blocks are kept for reuse).
void* device_alloc(Device d, size_t bytes);
void device_free(Device d, void* p, size_t bytes);
// Copies between any two devices (synchronous with respect to the current stream).
void device_memcpy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t bytes);
void device_memset_zero(void* dst, Device d, size_t bytes);

struct MemoryStats {
  size_t allocated = 0;       // bytes handed out now
  size_t peak_allocated = 0;  // high-water mark since the last reset
  size_t reserved = 0;        // bytes held from cudaMalloc (allocated + cached)
};
MemoryStats cuda_memory_stats();
void cuda_reset_peak_memory();
void cuda_empty_cache();

}  // namespace lasp
