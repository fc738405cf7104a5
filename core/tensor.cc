#include "core/tensor.h"

#include <cstring>
#include <sstream>

namespace lasp {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

static Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

Storage::Storage(Device device, size_t bytes)
    : device_(device), bytes_(bytes), data_(device_alloc(device, bytes)) {}
Storage::~Storage() { device_free(device_, data_, bytes_); }

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) LASP_CHECK(d >= 0) << "negative dimension in shape " << shape_str(shape);
  Tensor t;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(device, static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype));
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, cpu());
  t.fill_(value);
  return device.is_cpu() ? t : t.to(device);
}

Tensor Tensor::from_values(const std::vector<double>& values, const Shape& shape, DType dtype) {
  LASP_CHECK_EQ(static_cast<int64_t>(values.size()), shape_numel(shape)) << "from_values " << shape_str(shape);
  Tensor t = empty(shape, dtype);
  for (size_t i = 0; i < values.size(); ++i) t.set_item(static_cast<int64_t>(i), values[i]);
  return t;
}

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  if (i < 0) i += n;
  LASP_CHECK(i >= 0 && i < n) << "dimension " << i << " out of range for " << str();
  return shape_[i];
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_) || numel() <= 1; }

void* Tensor::raw() const {
  LASP_CHECK(defined()) << "use of an undefined tensor";
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(dtype_size(dtype_));
}

Tensor Tensor::view(const Shape& shape) const {
  LASP_CHECK(is_contiguous()) << "view() of a non-contiguous tensor " << str();
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      LASP_CHECK(infer < 0) << "view(): more than one -1 in " << shape_str(shape);
      infer = static_cast<int>(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    LASP_CHECK(known > 0 && numel() % known == 0) << "view(): cannot infer " << shape_str(shape) << " from " << str();
    s[infer] = numel() / known;
  }
  LASP_CHECK_EQ(shape_numel(s), numel()) << "view(): " << shape_str(shape) << " from " << str();
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = contiguous_strides(s);
  return t;
}

Tensor Tensor::slice(int d, int64_t start, int64_t end) const {
  if (d < 0) d += ndim();
  LASP_CHECK(d >= 0 && d < ndim()) << "slice(): bad dimension for " << str();
  LASP_CHECK(0 <= start && start <= end && end <= shape_[d])
      << "slice(): [" << start << ", " << end << ") out of range for dim " << d << " of " << str();
  Tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  return t;
}

Tensor Tensor::select(int d, int64_t index) const {
  if (d < 0) d += ndim();
  Tensor t = slice(d, index, index + 1);
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

Tensor Tensor::transpose(int a, int b) const {
  if (a < 0) a += ndim();
  if (b < 0) b += ndim();
  Tensor t = *this;
  std::swap(t.shape_[a], t.shape_[b]);
  std::swap(t.strides_[a], t.strides_[b]);
  return t;
}

namespace {
// Visits every element of a strided tensor in row-major order: fn(linear index, element offset).
template <typename Fn>
void for_each_offset(const Shape& shape, const Shape& strides, int64_t base, Fn fn) {
  const int n = static_cast<int>(shape.size());
  const int64_t total = shape_numel(shape);
  std::vector<int64_t> idx(n, 0);
  int64_t off = base;
  for (int64_t i = 0; i < total; ++i) {
    fn(i, off);
    for (int d = n - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

double load_as_double(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::F64: return static_cast<const double*>(base)[i];
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::F8E4M3: return e4m3_to_float(static_cast<const uint8_t*>(base)[i]);
    case DType::F8E5M2: return e5m2_to_float(static_cast<const uint8_t*>(base)[i]);
    case DType::I32: return static_cast<const int32_t*>(base)[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(base)[i]);
    case DType::U8: return static_cast<const uint8_t*>(base)[i];
  }
  return 0;
}

void store_from_double(void* base, DType t, int64_t i, double v) {
  switch (t) {
    case DType::F64: static_cast<double*>(base)[i] = v; break;
    case DType::F32: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case DType::BF16: static_cast<uint16_t*>(base)[i] = float_to_bf16(static_cast<float>(v)); break;
    case DType::F16: static_cast<uint16_t*>(base)[i] = float_to_fp16(static_cast<float>(v)); break;
    case DType::F8E4M3: static_cast<uint8_t*>(base)[i] = float_to_e4m3(static_cast<float>(v)); break;
    case DType::F8E5M2: static_cast<uint8_t*>(base)[i] = float_to_e5m2(static_cast<float>(v)); break;
    case DType::I32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(base)[i] = static_cast<int64_t>(v); break;
    case DType::U8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(v); break;
  }
}
}  // namespace

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  LASP_CHECK(device().is_cpu()) << "contiguous() of a strided CUDA tensor is not supported: " << str();
  Tensor out = empty(shape_, dtype_, cpu());
  const size_t es = dtype_size(dtype_);
  const char* src = static_cast<const char*>(storage_->data());
  char* dst = static_cast<char*>(out.raw());
  for_each_offset(shape_, strides_, offset_, [&](int64_t i, int64_t off) {
    std::memcpy(dst + i * es, src + off * es, es);
  });
  return out;
}

Tensor Tensor::clone() const {
  Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, device());
  device_memcpy(out.raw(), device(), src.raw(), device(), nbytes());
  return out;
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, d);
  device_memcpy(out.raw(), d, src.raw(), device(), nbytes());
  return out;
}

Tensor Tensor::to(DType t) const {
  if (t == dtype_) return *this;
  LASP_CHECK(device().is_cpu()) << "dtype conversion of a CUDA tensor goes through kernels/, got " << str();
  Tensor src = contiguous();
  Tensor out = empty(shape_, t, cpu());
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) store_from_double(out.raw(), t, i, load_as_double(src.raw(), dtype_, i));
  return out;
}

void Tensor::copy_from(const Tensor& src) {
  LASP_CHECK(shape_ == src.shape_) << "copy_from: " << str() << " <- " << src.str();
  LASP_CHECK(is_contiguous() || device().is_cpu()) << "copy_from into a non-contiguous CUDA tensor " << str();
  Tensor s = src;
  if (s.dtype_ != dtype_) s = s.to(cpu()).to(dtype_);
  s = s.contiguous();
  if (!is_contiguous()) {  // a strided CPU view: element by element
    s = s.to(cpu());
    const size_t es = dtype_size(dtype_);
    const char* from = static_cast<const char*>(s.raw());
    char* base = static_cast<char*>(storage_->data());
    for_each_offset(shape_, strides_, offset_, [&](int64_t i, int64_t off) {
      std::memcpy(base + off * es, from + i * es, es);
    });
    return;
  }
  device_memcpy(raw(), device(), s.raw(), s.device(), nbytes());
}

void Tensor::zero_() {
  LASP_CHECK(is_contiguous()) << "zero_ on a non-contiguous tensor " << str();
  device_memset_zero(raw(), device(), nbytes());
}

void Tensor::fill_(double value) {
  if (value == 0) return zero_();
  LASP_CHECK(device().is_cpu() && is_contiguous()) << "fill_ needs a contiguous CPU tensor, got " << str();
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) store_from_double(raw(), dtype_, i, value);
}

double Tensor::item(int64_t flat) const {
  LASP_CHECK(device().is_cpu() && is_contiguous()) << "item() needs a contiguous CPU tensor, got " << str();
  LASP_CHECK(flat >= 0 && flat < numel()) << "item(" << flat << ") out of range for " << str();
  return load_as_double(raw(), dtype_, flat);
}

void Tensor::set_item(int64_t flat, double value) {
  LASP_CHECK(device().is_cpu() && is_contiguous()) << "set_item() needs a contiguous CPU tensor, got " << str();
  LASP_CHECK(flat >= 0 && flat < numel()) << "set_item(" << flat << ") out of range for " << str();
  store_from_double(raw(), dtype_, flat, value);
}

std::vector<double> Tensor::to_vector() const {
  Tensor h = to(cpu()).contiguous();
  std::vector<double> v(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) v[i] = load_as_double(h.raw(), dtype_, i);
  return v;
}

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + " " + device().str();
}

void check_tensor(const Tensor& t, const char* what, DType dtype, const Shape& shape) {
  LASP_CHECK(t.defined()) << what << ": tensor is undefined";
  LASP_CHECK(t.is_contiguous()) << what << ": expected a contiguous tensor, got " << t.str();
  LASP_CHECK(t.dtype() == dtype) << what << ": expected dtype " << dtype_name(dtype) << ", got " << t.str();
  LASP_CHECK(t.shape() == shape) << what << ": expected shape " << shape_str(shape) << ", got " << t.str();
}

void check_same_device(const Tensor& a, const Tensor& b, const char* what) {
  LASP_CHECK(a.device() == b.device()) << what << ": tensors on different devices: " << a.str() << " and " << b.str();
}

}  // namespace lasp
