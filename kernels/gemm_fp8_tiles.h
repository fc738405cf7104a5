// The order in which lasp's FP8 kernel (kernels/gemm_fp8_sm90.cu) walks its output tiles, and
// where it runs a narrow last column: compiled for the host too, so that CI checks the schedule
// without a GPU (tests/gpu/gemm_fp8_gpu_test.cc, GemmFp8Cpu.*).
#pragma once

#include "kernels/counter_rng.h"  // LASP_HOST_DEVICE

namespace lasp::fp8tiles {

// Whether tiles `bn` wide leave a last column of 1 .. 128 columns of an n-column C, which the
// kernel then runs with 128-wide wgmmas: only 192-wide tiles have such an edge (N = 2048 = 10 x
// 192 + 128).
LASP_HOST_DEVICE inline bool narrow_edge(int n, int bn) {
  return bn == 192 && n % 192 != 0 && n % 192 <= 128;
}

struct TileRC {
  int row, col;  // in tiles
};

// Tile t (0 .. tiles_m tiles_n - 1) of the kernel's walk. Rows of tiles come in order, so the
// CTAs running at once share A's row blocks in L2. With `rotate` (a narrow edge), row r starts at
// column r (mod tiles_n): a CTA walking t, t + G, t + 2G, ... then meets every column about
// equally often, where without it G = 132 CTAs over 11 columns (132 = 12 x 11) would give 12
// CTAs every narrow tile and the other 120 none.
LASP_HOST_DEVICE inline TileRC tile_rc(int t, int tiles_n, bool rotate) {
  const int row = t / tiles_n;
  int col = t - row * tiles_n;
  if (rotate) col = (col + row) % tiles_n;
  return {row, col};
}

}  // namespace lasp::fp8tiles
