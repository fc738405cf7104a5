// Where the tokens of a sequence-parallel group live, and the small tensor moves SP code needs.
//
// The global sequence of length W*L is cut into V chunks of length Lc:
//   contiguous  V = W,  Lc = L,    rank t holds chunk t
//   zigzag      V = 2W, Lc = L/2,  rank t holds chunks t and 2W-1-t (in that order locally)
// Chunk c covers global positions [c*Lc, (c+1)*Lc).
#pragma once

#include <vector>

#include "core/tensor.h"
#include "kernels/linear_attention.h"
#include "parallel/sequence_parallel.h"

namespace lasp {

struct SpLayout {
  int world = 1;
  int rank = 0;
  bool zigzag = false;
  int64_t local_len = 0;  // L
  int64_t chunk_len = 0;  // Lc
  int num_chunks = 1;     // V

  std::vector<int> chunks_of(int r) const;  // ascending global chunk ids
  std::vector<int> my_chunks() const { return chunks_of(rank); }
  int owner(int c) const;
  int local_slot(int c) const;  // 0 or 1: where chunk c sits in its owner's local rows
  int64_t local_row(int c) const { return local_slot(c) * chunk_len; }
  int64_t global_row(int c) const { return c * chunk_len; }
};

// Checks the local length (zigzag needs it even) and describes the layout.
SpLayout make_sp_layout(const SpContext& ctx, int64_t local_len);

// Rows [row, row + rows) of dim 1 of a [B, T, ...] tensor, as a contiguous tensor (a view when
// that is already contiguous, else a copy).
Tensor seq_rows(const Tensor& t, int64_t row, int64_t rows);
// dst[:, dst_row : dst_row + rows] = src[:, src_row : src_row + rows] for [B, T, ...] tensors
// with the same B and the same trailing shape, on any device.
void copy_seq_rows(Tensor& dst, int64_t dst_row, const Tensor& src, int64_t src_row, int64_t rows);
// The decay restricted to rows [row, row + rows) (per_token sliced, per_head shared).
Decay decay_rows(const Decay& d, int64_t row, int64_t rows);

// dst += src (same shape, contiguous, same dtype and device). CPU: a loop; CUDA: gemm.
void add_into(Tensor& dst, const Tensor& src);
// y[r, :] += coef[r] * x[r, :] for 2-D [R, N] tensors (the per batch-and-head decay products of
// the prefix and suffix combines). CPU: a loop; CUDA: one gemm with diag(coef).
void axpy_rows(Tensor& y, const std::vector<double>& coef, const Tensor& x);

// Copies raw bytes of the tensors into one uint8 buffer (and back), on their device.
Tensor pack_bytes(const std::vector<Tensor>& parts);
void unpack_bytes(const Tensor& buf, const std::vector<Tensor*>& parts);

}  // namespace lasp

namespace lasp {
// dst[:, row : row + src.dim(1)] += src for [B, T, ...] tensors (per batch add_into).
void add_seq_rows(Tensor& dst, int64_t row, const Tensor& src);
}  // namespace lasp
