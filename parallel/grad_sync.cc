#include "parallel/grad_sync.h"

#include "kernels/gemm.h"

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
      default: LASP_FAIL() << "scaled_copy: unsupported dtype " << dtype_name(dst.dtype());
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

}  // namespace

void all_reduce_gradients(Comm& comm, const std::vector<Tensor>& grads, size_t bucket_bytes,
                          bool average) {
  LASP_CHECK(bucket_bytes > 0) << "all_reduce_gradients: bucket_bytes must be positive";
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    LASP_CHECK(g.defined() && g.is_contiguous())
        << "all_reduce_gradients: gradient " << i << " must be a defined, contiguous tensor";
    LASP_CHECK(!average || g.dtype() == DType::F32 || g.dtype() == DType::F64 ||
               g.dtype() == DType::BF16)
        << "all_reduce_gradients: averaging needs fp32, fp64 or bf16, gradient " << i << " is "
        << g.str();
  }
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
    reduce_bucket(comm, grads, begin, end, average);
    begin = end;
  }
}

}  // namespace lasp
