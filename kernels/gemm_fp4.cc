// gemm_fp4 dispatch (CPU tensors: the exact emulation; CUDA tensors: gemm_fp4.cu) and the CPU
// side of the native FP4 operand layout (kernels/gemm_fp4.h).
#include "kernels/gemm_fp4.h"

#include <cstdlib>
#include <string>

#include "core/dtype.h"
#include "core/env.h"
#include "core/profile.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
void gemm_fp4_cuda(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b);
Fp4NativeOperand fp4_native_operand_cuda(const QuantizedFp4& q, int64_t rows_padded,
                                         int64_t k_padded);
#endif

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void check_fp4_operand(const QuantizedFp4& q, const char* fn) {
  LASP_CHECK(q.codes.defined() && q.codes.dtype() == DType::U8 && q.codes.is_contiguous() &&
             q.codes.ndim() >= 1)
      << fn << ": codes must be a contiguous uint8 tensor, got "
      << (q.codes.defined() ? q.codes.str() : "undefined");
  const int64_t groups = (q.cols() + q.group() - 1) / q.group();
  LASP_CHECK(q.scales.defined() && q.scales.dtype() == DType::U8 && q.scales.is_contiguous() &&
             q.scales.numel() == q.rows() * groups && q.scales.device() == q.codes.device())
      << fn << ": scales must be contiguous uint8 [" << q.rows() << ", " << groups
      << "] on the codes' device, got " << (q.scales.defined() ? q.scales.str() : "undefined");
}

}  // namespace

Fp4GemmPath fp4_gemm_path_from_env() {
  return static_cast<Fp4GemmPath>(env_choice("LASP_FP4_GEMM", {"auto", "native", "emulated"}));
}

void gemm_fp4(Tensor& c, const QuantizedFp4& a, const QuantizedFp4& b) {
  ProfileScope profile("gemm_fp4");
  LASP_CHECK(c.defined()) << "gemm_fp4: the output must be defined";
  if (profile_shapes_enabled() && a.codes.defined() && b.codes.defined())
    profile.gemm("gemm_fp4", a.rows(), b.rows(), a.cols(), std::string(" ->") + dtype_name(c.dtype()));
  check_fp4_operand(a, "gemm_fp4: A");
  check_fp4_operand(b, "gemm_fp4: B");
  check_same_device(a.codes, b.codes, "gemm_fp4");
  check_same_device(a.codes, c, "gemm_fp4");
  if (c.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return gemm_fp4_cuda(c, a, b);
#endif
  }
  LASP_CHECK(fp4_gemm_path_from_env() != Fp4GemmPath::Native)
      << "gemm_fp4: LASP_FP4_GEMM=native, but the operands are on the CPU, which has no FP4 tensor "
         "cores";
  gemm_fp4_emulated(c, a, b);
}

Fp4NativeOperand fp4_native_operand(const QuantizedFp4& q, int64_t rows_padded, int64_t k_padded) {
  check_fp4_operand(q, "fp4_native_operand");
  const int64_t rows = q.rows(), cols = q.cols();
  if (rows_padded == 0) rows_padded = round_up(rows, kFp4NativeRowAlign);
  if (k_padded == 0) k_padded = round_up(cols, kFp4NativeKAlign);
  LASP_CHECK(rows_padded >= rows && rows_padded % kFp4NativeRowAlign == 0 && k_padded >= cols &&
             k_padded % kFp4NativeKAlign == 0)
      << "fp4_native_operand: padded shape [" << rows_padded << ", " << k_padded << "] must cover ["
      << rows << ", " << cols << "] in multiples of [" << kFp4NativeRowAlign << ", "
      << kFp4NativeKAlign << "]";
#ifdef LASP_HAVE_CUDA
  if (q.codes.is_cuda()) return fp4_native_operand_cuda(q, rows_padded, k_padded);
#endif
  Fp4NativeOperand n;
  n.rows = rows;
  n.cols = cols;
  n.rows_padded = rows_padded;
  n.k_padded = k_padded;
  n.format = q.format;
  n.tensor_scale = q.tensor_scale;
  const int64_t group = q.group(), groups = (cols + group - 1) / group,
                groups_padded = k_padded / group;
  n.packed = Tensor::zeros({rows_padded, k_padded / 2}, DType::U8);
  n.scales = Tensor::zeros({round_up(rows_padded, kFp4ScaleTileRows) * groups_padded}, DType::U8);
  const uint8_t* codes = q.codes.data<uint8_t>();
  const uint8_t* scales = q.scales.data<uint8_t>();
  uint8_t* packed = n.packed.data<uint8_t>();
  uint8_t* tiled = n.scales.data<uint8_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k)
      packed[r * (k_padded / 2) + k / 2] |=
          static_cast<uint8_t>((codes[r * cols + k] & 0xF) << (4 * (k % 2)));
    for (int64_t g = 0; g < groups; ++g)
      tiled[fp4_scale_tile_offset(r, g, groups_padded)] = scales[r * groups + g];
  }
  return n;
}

void gemm_fp4_native_reference(Tensor& c, const Fp4NativeOperand& a, const Fp4NativeOperand& b) {
  LASP_CHECK(!a.packed.is_cuda() && !b.packed.is_cuda())
      << "gemm_fp4_native_reference: CPU operands only";
  LASP_CHECK(a.format == b.format && a.cols == b.cols && a.k_padded == b.k_padded)
      << "gemm_fp4_native_reference: operands differ in format or K (" << a.cols << " / " << b.cols
      << ")";
  check_tensor(c, "gemm_fp4_native_reference: c", DType::F32, {a.rows, b.rows});
  const int64_t group = fp4_group_size(a.format), groups_padded = a.k_padded / group;
  // Element (r, k) of an operand, read through the documented layout only.
  auto element = [&](const Fp4NativeOperand& op, int64_t r, int64_t k) {
    const uint8_t byte = op.packed.data<uint8_t>()[r * (op.k_padded / 2) + k / 2];
    const uint8_t code = k % 2 == 0 ? byte & 0xF : byte >> 4;
    const uint8_t s = op.scales.data<uint8_t>()[fp4_scale_tile_offset(r, k / group, groups_padded)];
    const double scale = op.format == Fp4Format::MXFP4 ? e8m0_to_float(s) : e4m3_to_float(s);
    return static_cast<double>(e2m1_to_float(code)) * scale;
  };
  const double alpha = static_cast<double>(a.tensor_scale) * b.tensor_scale;
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.rows; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < a.k_padded; ++k) s += element(a, i, k) * element(b, j, k);
      c.data<float>()[i * b.rows + j] = static_cast<float>(alpha * s);
    }
}

#ifndef LASP_HAVE_CUDA
void gemm_fp4_emulated_cuda(Tensor&, const QuantizedFp4&, const QuantizedFp4&) {
  LASP_FAIL() << "gemm_fp4_emulated_cuda: this build has no CUDA backend";
}
bool fp4_native_supported(Device) { return false; }
int64_t gemm_fp4_fallback_count() { return 0; }
#endif

}  // namespace lasp
