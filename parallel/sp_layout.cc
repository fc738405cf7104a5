#include "parallel/sp_layout.h"

#include "kernels/gemm.h"
#include "parallel/comm.h"

namespace lasp {

std::vector<int> SpLayout::chunks_of(int r) const {
  if (!zigzag) return {r};
  return {r, 2 * world - 1 - r};
}

int SpLayout::owner(int c) const {
  if (!zigzag) return c;
  return c < world ? c : 2 * world - 1 - c;
}

int SpLayout::local_slot(int c) const { return (zigzag && c >= world) ? 1 : 0; }

SpLayout make_sp_layout(const SpContext& ctx, int64_t local_len) {
  SpLayout l;
  l.world = ctx.size();
  l.rank = ctx.rank();
  l.zigzag = ctx.zigzag;
  l.local_len = local_len;
  LASP_CHECK(local_len > 0) << "sequence parallelism: the local sequence length must be positive";
  if (l.zigzag) {
    LASP_CHECK(local_len % 2 == 0)
        << "zigzag split needs an even local sequence length (two chunks per rank), got "
        << local_len << "; use an even seq_len / (2 * parallel.sp) or the contiguous split";
    l.chunk_len = local_len / 2;
    l.num_chunks = 2 * l.world;
  } else {
    l.chunk_len = local_len;
    l.num_chunks = l.world;
  }
  return l;
}

namespace {
int64_t row_elems(const Tensor& t) {
  int64_t n = 1;
  for (int i = 2; i < t.ndim(); ++i) n *= t.dim(i);
  return n;
}
}  // namespace

Tensor seq_rows(const Tensor& t, int64_t row, int64_t rows) {
  LASP_CHECK(t.ndim() >= 2 && t.is_contiguous()) << "seq_rows: expected a contiguous [B, T, ...] tensor, got " << t.str();
  if (row == 0 && rows == t.dim(1)) return t;
  Tensor v = t.slice(1, row, row + rows);
  if (v.is_contiguous()) return v;
  Shape s = t.shape();
  s[1] = rows;
  Tensor out = Tensor::empty(s, t.dtype(), t.device());
  copy_seq_rows(out, 0, t, row, rows);
  return out;
}

void copy_seq_rows(Tensor& dst, int64_t dst_row, const Tensor& src, int64_t src_row, int64_t rows) {
  LASP_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.ndim() >= 2 && src.ndim() >= 2)
      << "copy_seq_rows: contiguous [B, T, ...] tensors expected, got " << dst.str() << " <- " << src.str();
  LASP_CHECK(dst.dim(0) == src.dim(0) && row_elems(dst) == row_elems(src) && dst.dtype() == src.dtype())
      << "copy_seq_rows: " << dst.str() << " <- " << src.str();
  LASP_CHECK(dst_row >= 0 && src_row >= 0 && dst_row + rows <= dst.dim(1) && src_row + rows <= src.dim(1))
      << "copy_seq_rows: rows out of range";
  const size_t es = dtype_size(dst.dtype());
  const int64_t re = row_elems(dst);
  char* d = static_cast<char*>(dst.raw());
  const char* s = static_cast<const char*>(src.raw());
  for (int64_t b = 0; b < dst.dim(0); ++b) {
    device_memcpy(d + ((b * dst.dim(1) + dst_row) * re) * es, dst.device(),
                  s + ((b * src.dim(1) + src_row) * re) * es, src.device(),
                  static_cast<size_t>(rows * re) * es);
  }
}

Decay decay_rows(const Decay& d, int64_t row, int64_t rows) {
  Decay out = d;
  if (d.mode == DecayMode::DataDependent) out.per_token = seq_rows(d.per_token, row, rows);
  return out;
}

void add_into(Tensor& dst, const Tensor& src) {
  LASP_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype() && dst.is_contiguous() &&
             src.is_contiguous())
      << "add_into: " << dst.str() << " += " << src.str();
  check_same_device(dst, src, "add_into");
  const int64_t n = dst.numel();
  if (dst.is_cuda()) {
    Tensor one = Tensor::full({1, 1}, 1.0, src.dtype(), src.device());
    Tensor d = dst.view({n, 1});
    gemm(d, src.view({n, 1}), false, one, false, 1.0f, 1.0f);
    return;
  }
  if (dst.dtype() == DType::F64) {
    double* d = dst.data<double>();
    const double* s = src.data<double>();
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  } else if (dst.dtype() == DType::F32) {
    float* d = dst.data<float>();
    const float* s = src.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  } else {
    LASP_FAIL() << "add_into on CPU supports fp32 and fp64, got " << dst.str();
  }
}

void axpy_rows(Tensor& y, const std::vector<double>& coef, const Tensor& x) {
  LASP_CHECK(y.ndim() == 2 && y.shape() == x.shape() && y.dtype() == x.dtype() &&
             y.is_contiguous() && x.is_contiguous())
      << "axpy_rows: " << y.str() << " += diag(coef) " << x.str();
  const int64_t rows = y.dim(0), cols = y.dim(1);
  LASP_CHECK_EQ(static_cast<int64_t>(coef.size()), rows) << "axpy_rows: one coefficient per row";
  check_same_device(y, x, "axpy_rows");
  if (y.is_cuda()) {
    Tensor diag = Tensor::zeros({rows, rows}, y.dtype());
    for (int64_t r = 0; r < rows; ++r) diag.set_item(r * rows + r, coef[r]);
    gemm(y, diag.to(y.device()), false, x, false, 1.0f, 1.0f);
    return;
  }
  if (y.dtype() == DType::F64) {
    double* d = y.data<double>();
    const double* s = x.data<double>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) d[r * cols + c] += coef[r] * s[r * cols + c];
  } else if (y.dtype() == DType::F32) {
    float* d = y.data<float>();
    const float* s = x.data<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float a = static_cast<float>(coef[r]);
      for (int64_t c = 0; c < cols; ++c) d[r * cols + c] += a * s[r * cols + c];
    }
  } else {
    LASP_FAIL() << "axpy_rows on CPU supports fp32 and fp64, got " << y.str();
  }
}

Tensor pack_bytes(const std::vector<Tensor>& parts) {
  int64_t total = 0;
  Device dev = parts.empty() ? cpu() : parts[0].device();
  for (const Tensor& p : parts) {
    LASP_CHECK(p.is_contiguous() && p.device() == dev) << "pack_bytes: " << p.str();
    total += static_cast<int64_t>(p.nbytes());
  }
  Tensor buf = Tensor::empty({total}, DType::U8, dev);
  char* base = static_cast<char*>(buf.raw());
  int64_t off = 0;
  for (const Tensor& p : parts) {
    device_memcpy(base + off, dev, p.raw(), dev, p.nbytes());
    off += static_cast<int64_t>(p.nbytes());
  }
  return buf;
}

void unpack_bytes(const Tensor& buf, const std::vector<Tensor*>& parts) {
  const char* base = static_cast<const char*>(buf.raw());
  int64_t off = 0;
  for (Tensor* p : parts) {
    LASP_CHECK(p->is_contiguous() && p->device() == buf.device()) << "unpack_bytes: " << p->str();
    LASP_CHECK_LE(off + static_cast<int64_t>(p->nbytes()), buf.numel()) << "unpack_bytes: buffer too small";
    device_memcpy(p->raw(), p->device(), base + off, buf.device(), p->nbytes());
    off += static_cast<int64_t>(p->nbytes());
  }
}

}  // namespace lasp

namespace lasp {
void add_seq_rows(Tensor& dst, int64_t row, const Tensor& src) {
  LASP_CHECK(dst.ndim() >= 2 && src.ndim() == dst.ndim() && dst.dim(0) == src.dim(0) &&
             row >= 0 && row + src.dim(1) <= dst.dim(1))
      << "add_seq_rows: " << dst.str() << " rows from " << row << " += " << src.str();
  for (int64_t b = 0; b < dst.dim(0); ++b) {
    Tensor d = dst.select(0, b).slice(0, row, row + src.dim(1));
    add_into(d, src.select(0, b));
  }
}
}  // namespace lasp
