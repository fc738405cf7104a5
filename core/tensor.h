// Tensor: a typed, strided view of a reference-counted buffer on one device.
//
// Kernels take contiguous tensors (row-major, last dimension fastest) and say so with
// LASP_CHECK(t.is_contiguous()); views (slice, transpose) exist for the code that arranges data
// before a kernel call, and contiguous() makes a packed copy.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/device.h"
#include "core/dtype.h"

namespace lasp {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// 16-bit brain float as stored; arithmetic goes through float.
struct bf16_t {
  uint16_t bits;
};

template <typename T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<bf16_t>() { return DType::BF16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

class Storage {
 public:
  Storage(Device device, size_t bytes);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  Device device_;
  size_t bytes_;
  void* data_;
};

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(const Shape& shape, DType dtype, Device device = cpu());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = cpu());
  static Tensor full(const Shape& shape, double value, DType dtype, Device device = cpu());
  // A CPU tensor holding `values` converted to `dtype` (float dtypes only).
  static Tensor from_values(const std::vector<double>& values, const Shape& shape,
                            DType dtype = DType::F32);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : cpu(); }
  bool is_cuda() const { return device().is_cuda(); }
  bool is_contiguous() const;

  void* raw() const;
  template <typename T>
  T* data() const {
    LASP_CHECK(dtype_ == dtype_of<T>()) << "tensor holds " << dtype_name(dtype_) << ", asked for "
                                        << dtype_name(dtype_of<T>());
    return static_cast<T*>(raw());
  }

  // Views (share storage).
  Tensor view(const Shape& shape) const;  // contiguous only; one -1 is inferred
  Tensor slice(int dim, int64_t start, int64_t end) const;
  Tensor select(int dim, int64_t index) const;  // drops `dim`
  Tensor transpose(int a, int b) const;

  // Copies.
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;  // CPU only: converts element by element
  void copy_from(const Tensor& src);  // same shape; converts dtype on CPU; strided only on CPU

  void zero_();
  void fill_(double value);  // CPU float tensors, or zero on any device

  // Element access for tests and small host code (CPU, any float dtype; reads through double).
  double item(int64_t flat_index) const;
  void set_item(int64_t flat_index, double value);
  std::vector<double> to_vector() const;  // CPU or CUDA; contiguous copy as doubles

  std::string str() const;  // "fp32[2, 3] cpu"

 private:
  std::shared_ptr<Storage> storage_;
  int64_t offset_ = 0;  // in elements
  Shape shape_, strides_;
  DType dtype_ = DType::F32;
};

// Checks a tensor argument: defined, contiguous, the given dtype and shape. `what` names it in
// the message ("rmsnorm_forward: x").
void check_tensor(const Tensor& t, const char* what, DType dtype, const Shape& shape);
void check_same_device(const Tensor& a, const Tensor& b, const char* what);

}  // namespace lasp
