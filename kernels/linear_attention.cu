// CUDA linear attention: tiled forward and backward on tensor cores (bf16 -> fp32). Head dim 128 on
// Hopper (sm_90a builds on compute capability 9.0) runs the warpgroup kernels of section 4
// (wgmma, 128-byte swizzled tiles; kernels/sm90_wgmma.cuh); everything else, and D = 64, runs the
// mma.sync kernels of sections 1-3 (LASP_LA_KERNEL=mma forces them for D = 128 too). Both
// compute the same passes below.
//
// Math: DESIGN.md "Linear attention math". Per (batch b, head h) and chunk c of C = 64 rows with
// within-chunk cumulative log decays L[r] = sum_{i<=r} log a_i (rows past T count as log a = 0):
//   mask  M[r,s] = exp(L[r] - L[s]) for s <= r, else 0      (every factor <= 1, never b_r / b_s)
//   b[r]  = exp(L[r]),  e[r] = exp(L[C-1] - L[r]),  bC = exp(L[C-1])
//   O_c   = ((Q K^T) o M) V + diag(b) Q S_{c-1}
//   S_c   = bC S_{c-1} + (diag(e) K)^T V
// L is computed once per call for every chunk (la_chunk_logcum_kernel, [B*H, nchunks, C] fp32)
// and loaded with the chunk's tiles.
//
// Parallelism (LASP-2 inside one GPU): the chunks of each (b, h) are split into `nseg` segments
// of `seg_chunks` chunks, and the value columns of the state into kSplit tiles of NV = D / kSplit
// columns. One thread block per (value tile z, segment, b, h); two blocks fit per SM, so a walk
// over a segment overlaps with the other block's loads and syncs.
//
// Two kernel templates do all the work:
//   la_segment_state_kernel<D, reverse>: from zero, S = bC S + (diag(f) X)^T Y[:, z] over the
//     segment's chunks (forward: X = K, Y = V, f = e, giving M_j;  reverse: X = Q, Y = dO, f = b,
//     walking backwards, giving dM_j). kStateStages-deep cp.async pipeline.
//   la_walk_kernel<D, reverse>: walks a segment from a given state S (columns z) and writes
//     out[:, z] per chunk. With operands A1, A2 (all D columns) and A3 (columns z):
//       forward: out = ((A1 A2^T) o M) A3 + diag(b) A1 S,        S = bC S + (diag(e) A2)^T A3
//       reverse: out = ((A1 A2^T) o M^T) A3 + diag(e) A1 S,      S = bC S + (diag(b) A2)^T A3
//     (reverse walks the chunks backwards and masks the transposed product.)
// The passes (with P_j the state entering segment j, E_j the state gradient leaving it):
//   o  = walk<fwd>(A1 = Q,  A2 = K,  A3 = V,  S = P_j)
//   dQ = walk<fwd>(A1 = dO, A2 = V,  A3 = K,  S = P_j^T)      = ((dO V^T) o M) K + diag(b) dO S^T
//   dV = walk<rev>(A1 = K,  A2 = Q,  A3 = dO, S = E_j)        = ((K Q^T) o M^T) dO + diag(e) K dS
//   dK = walk<rev>(A1 = V,  A2 = dO, A3 = Q,  S = E_j^T)      = ((V dO^T) o M^T) Q + diag(e) V dS^T
//   (S^T follows the same recurrence with the roles of its operands swapped.)
// Segment states: la_segment_state_kernel gives M_j and log g_j, la_combine_forward_kernel the
// prefixes P_0 = S_init, P_{j+1} = g_j P_j + M_j (P_nseg = final state); in backward the reverse
// state kernel gives dM_j and la_combine_backward_kernel E_{nseg-1} = dS_final,
// E_{j-1} = g_j E_j + dM_j, d_initial_state = g_0 E_0 + dM_0.
// Data-dependent decays: with global cumulative log decays Lambda_t,
//   dLambda_t = q_t . dq_t - k_t . dk_t  (+ <dS_final, S_final> at t = T-1)  (the dQ and dK walks
//   add their column tile's share with atomics), d log a_t = sum_{r >= t} dLambda_r
//   (la_dlog_tile_sums_kernel and la_dlog_scan_apply_kernel, in float64).
// Per-segment states cost B*H*nseg*D*D*4 bytes (16 MiB at B*H = 16, D = 128), independent of T;
// storing per-chunk states instead would cost D/C = 2 times the size of q in fp32: recomputing
// them by walking each segment is cheaper than writing and re-reading them. The forward can hand
// its P_j, log g_j and final state to the backward (LinearAttentionSaved), which then skips the
// forward state pass and its combine (one read of k and v less: 0.13 ms of 2.33 at T = 65536).
//
// Walk stages per chunk (two barriers per chunk):
//   load  A2, A3, L double-buffered: chunk i+1's are issued as chunk i starts; A1 (one buffer)
//         is issued as soon as stage A is done with it
//   A     one A1 fragment per k-step feeds the warp's causal product tiles (-> masked bf16 sP)
//         and its out = A1 S tiles (from the bf16 state copy), row-scaled in registers
//   ---   barrier
//   B     out += sP A3, store bf16 rows (and the dlog dot shares, dot source read into registers)
//   C     state update in registers, the row factors diag(f) applied to the A3 fragments in
//         registers; new bf16 state copy
//   ---   barrier (top of the next chunk, after its loads have landed)
// Tiles are padded by 16 bytes per row against bank conflicts. Shared-memory reads (ldmatrix)
// bound the step, so every fragment load feeds at least two mma where the tiling allows.
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "core/env.h"
#include "core/profile.h"
#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/linear_attention.h"
#include "kernels/sm90_wgmma.cuh"

namespace lasp {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kChunk = 64;  // C: rows per chunk
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSplit = 2;         // value-column tiles of the state, one block each
constexpr int kBlocksPerSm = 2;   // the walk kernels are sized for two resident blocks per SM
constexpr int kStateStages = 4;   // load pipeline depth of the segment-state kernel

struct LaParams {
  const bf16 *a1, *a2, *a3;  // walk / state operands (see the file comment)
  bf16* out;                 // walk output [B, T, H, D] (columns z), or null
  const bf16* dot_src;       // dlog share: dlog[t] += dot_sign * out[t, z] . dot_src[t, z]
  float dot_sign;
  float* dlog;               // [B, T, H]
  const float* lc;           // [B*H, nchunks, C] within-chunk cumulative log decays
  float* states;             // [B*H, nseg, D, D] segment states (state kernel output, walk input)
  float* logg;               // [B*H, nseg] log total decay per segment
  bool transposed;           // walk starts from the transpose of its segment state
  int B, T, H, nseg, seg_chunks, nchunks;
  // Row strides (elements from token t to t + 1) of a1, a2, a3 and of out and dot_src: H * D for
  // a contiguous [B, T, H, D] tensor, more for a head slice of a wider one (the model's fused
  // q/k/v projection output [B, T, 3 H, D]).
  int64_t rs1, rs2, rs3, rs_out;
};

template <int D>
struct Shapes {
  static constexpr int NV = D / kSplit;    // state columns per block
  static constexpr int ldx = D + 8;        // bf16 [C, D] operand tiles
  static constexpr int ldv = NV + 8;       // bf16 [C, NV] column tiles and the [D, NV] state copy
  static constexpr int ldp = kChunk + 8;   // bf16 [C, C] masked product
  static constexpr int x_bytes = kChunk * ldx * 2;
  static constexpr int v_bytes = kChunk * ldv * 2;
  static constexpr int s_bytes = D * ldv * 2;
  static constexpr int p_bytes = kChunk * ldp * 2;
  static constexpr int l_bytes = kChunk * 4;
  static constexpr int state_frags = (D / 16) * (NV / 16) / kWarps;
  static constexpr int out_frags = (kChunk / 16) * (NV / 16) / kWarps;
  static_assert(state_frags * kWarps == (D / 16) * (NV / 16), "state tiles must split over warps");
  static_assert(out_frags * kWarps == (kChunk / 16) * (NV / 16), "out tiles must split over warps");
};

// Carves consecutive 128-byte aligned regions out of dynamic shared memory.
struct SmemCarver {
  unsigned char* p;
  template <typename T>
  __device__ T* take(int bytes) {
    T* r = reinterpret_cast<T*>(p);
    p += (bytes + 127) / 128 * 128;
    return r;
  }
};
__host__ __device__ constexpr int carved(int bytes) { return (bytes + 127) / 128 * 128; }

// ---- cp.async ------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [t0, t0 + rows) of COLS columns of one head of a [B, T, H, D] bf16 tensor (g points at the
// first element) into a [C, ld] tile; rows past `rows` are zero-filled. Each thread copies the
// same 16-byte column of rows r0, r0 + kRowsPerPass, ... (no per-element index arithmetic).
template <int COLS>
__device__ __forceinline__ void load_tile_async(bf16* s, int ld, const bf16* g, int64_t row_stride,
                                                int rows) {
  constexpr int vpr = COLS / 8;  // 16-byte vectors per row
  constexpr int kRowsPerPass = kThreads / vpr;
  static_assert(kThreads % vpr == 0 && kChunk % kRowsPerPass == 0, "tile must split over threads");
  const int r0 = threadIdx.x / vpr, c = (threadIdx.x % vpr) * 8;
  bf16* sp = s + r0 * ld + c;
  const bf16* gp = g + r0 * row_stride + c;
#pragma unroll
  for (int j = 0; j < kChunk / kRowsPerPass; ++j) {
    const bool ok = r0 + j * kRowsPerPass < rows;
    cp_async16(sp + j * kRowsPerPass * ld, ok ? gp + j * kRowsPerPass * row_stride : g + c, ok);
  }
}
__device__ void load_logcum_async(float* s, const float* g) {
  if (threadIdx.x < kChunk / 4) cp_async16(s + 4 * threadIdx.x, g + 4 * threadIdx.x, true);
}

// e^x for the decay factors (x <= 0): one multiply and ex2.approx.ftz (__expf adds a range
// check and two multiplies for results below 2^-126, which flush to zero here: they are
// negligible next to the terms they are added to).
__device__ __forceinline__ float fexp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
// Row factor of chunk row r: exp(L[r]) (by_b) or exp(L[C-1] - L[r]).
__device__ __forceinline__ float row_factor(const float* L, int r, bool by_b) {
  return fexp(by_b ? L[r] : L[kChunk - 1] - L[r]);
}
// A bf16 pair (low half first) scaled by (f0, f1), rounded back to bf16.
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t u, float f0, float f1) {
  __nv_bfloat162 h;
  memcpy(&h, &u, 4);
  const float2 x = __bfloat1622float2(h);
  h = __floats2bfloat162_rn(x.x * f0, x.y * f1);
  memcpy(&u, &h, 4);
  return u;
}

// ---- Warp-level tensor-core tiles (mma.sync.m16n8k16, bf16 -> fp32) --------------------------
// A 16 x 16 fp32 tile is two m16n8 accumulators. Lane l holds, with g = l / 4 and q = l % 4,
//   c[nt][i] = tile[g + (i / 2) * 8][nt * 8 + 2 * q + i % 2].
// Operand fragments come from shared memory through ldmatrix (.trans where the stored layout is
// the transpose of the one the mma wants).
struct Tile16 {
  float c[2][4];
  __device__ void zero() {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[nt][i] = 0.0f;
  }
  __device__ void scale(float f) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[nt][i] *= f;
  }
  __device__ static int row(int i) { return (threadIdx.x % 32) / 4 + (i / 2) * 8; }
  __device__ static int col(int nt, int i) { return nt * 8 + 2 * (threadIdx.x % 4) + i % 2; }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// A fragment of A[m0 .. m0+16, k0 .. k0+16] with A row-major (A[m][k] at a[m * ld + k]).
__device__ __forceinline__ void load_a(uint32_t (&r)[4], const bf16* a, int ld, int m0, int k0) {
  const int l = threadIdx.x % 32;
  ldsm_x4(r, a + (m0 + l % 8 + ((l / 8) % 2) * 8) * ld + k0 + (l / 16) * 8);
}
// A fragment of A = X^T with X row-major (A[m][k] at x[k * ld + m]).
__device__ __forceinline__ void load_a_t(uint32_t (&r)[4], const bf16* x, int ld, int m0, int k0) {
  const int l = threadIdx.x % 32;
  ldsm_x4_trans(r, x + (k0 + l % 8 + (l / 16) * 8) * ld + m0 + ((l / 8) % 2) * 8);
}
// B fragments (two n8 halves) of B[k0 .. k0+16, n0 .. n0+16] with B given as its transpose,
// row-major (B[k][n] at bt[n * ld + k]).
__device__ __forceinline__ void load_b_t(uint32_t (&r)[4], const bf16* bt, int ld, int k0, int n0) {
  const int l = threadIdx.x % 32;
  ldsm_x4(r, bt + (n0 + l % 8 + (l / 16) * 8) * ld + k0 + ((l / 8) % 2) * 8);
}
// B fragments with B row-major (B[k][n] at b[k * ld + n]).
__device__ __forceinline__ void load_b(uint32_t (&r)[4], const bf16* b, int ld, int k0, int n0) {
  const int l = threadIdx.x % 32;
  ldsm_x4_trans(r, b + (k0 + l % 8 + ((l / 8) % 2) * 8) * ld + n0 + (l / 16) * 8);
}
// Not volatile: it only reads and writes registers, so the compiler may schedule it freely
// between the ldmatrix loads that feed it.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// acc += A_frag B_frags (16 x 16 x 16).
__device__ __forceinline__ void mma_tile(Tile16& acc, const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  mma16816(acc.c[0], a, b[0], b[1]);
  mma16816(acc.c[1], a, b[2], b[3]);
}
__device__ __forceinline__ void store_bf16x2(bf16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// The register-resident state tile [D, NV] (columns z of the D x D state), split over the warps
// in blocks of RM x CN 16 x 16 tiles (D = 128: 32 x 32 per warp, so every ldmatrix of the update
// feeds two mma pairs). Tile i of a warp is (tile_row(i), tile_col(i)).
template <int D>
struct StateTile {
  using SH = Shapes<D>;
  static constexpr int TN = SH::NV / 16, n = SH::state_frags;
  static constexpr int CN = (TN >= 2 && n >= 2) ? 2 : 1;  // column tiles per warp
  static constexpr int RM = n / CN;                        // row tiles per warp
  static constexpr int WC = TN / CN;                       // warps across the columns
  static_assert(RM * CN == n && WC * CN == TN && kWarps % WC == 0 &&
                    (kWarps / WC) * RM * 16 == D,
                "state tiles must split evenly over the warps");
  Tile16 f[n];

  __device__ static int tile_row(int i) { return (threadIdx.x / 32 / WC) * RM + i / CN; }
  __device__ static int tile_col(int i) { return (threadIdx.x / 32 % WC) * CN + i % CN; }

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < n; ++i) f[i].zero();
  }
  // Columns [col0, col0 + NV) of the fp32 [D, D] row-major matrix g, or of its transpose.
  __device__ void load(const float* g, int col0, bool transposed) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int r0 = tile_row(i) * 16, c0 = col0 + tile_col(i) * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = r0 + Tile16::row(e), c = c0 + Tile16::col(nt, e);
          f[i].c[nt][e] = transposed ? g[c * D + r] : g[r * D + c];
        }
    }
  }
  __device__ void store(float* g, int col0) const {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int r0 = tile_row(i) * 16, c0 = col0 + tile_col(i) * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const int r = r0 + Tile16::row(e), c = c0 + Tile16::col(nt, e);
          *reinterpret_cast<float2*>(g + r * D + c) = make_float2(f[i].c[nt][e], f[i].c[nt][e + 1]);
        }
    }
  }
  // S = decay * S + X^T diag(f) Y with X a bf16 [C, D] tile (ld ldx), Y a bf16 [C, NV] tile
  // (ld ldy) and f[r] = row_factor(L, r, by_b). The row factors scale the Y fragments in
  // registers (lane l holds rows 2 (l % 4), +1, +8, +9 of each 16-row step), so the tiles in
  // shared memory stay as loaded.
  __device__ void update(float decay, const bf16* x, int ldx, const bf16* y, int ldy, const float* L,
                         bool by_b) {
#pragma unroll
    for (int i = 0; i < n; ++i) f[i].scale(decay);
    const int q2 = 2 * (threadIdx.x % 4);
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      const int r = kk * 16 + q2;
      const float f0 = row_factor(L, r, by_b), f1 = row_factor(L, r + 1, by_b);
      const float f8 = row_factor(L, r + 8, by_b), f9 = row_factor(L, r + 9, by_b);
      uint32_t b[CN][4];
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        load_b(b[c], y, ldy, kk * 16, tile_col(c) * 16);
        b[c][0] = scale_bf16x2(b[c][0], f0, f1);
        b[c][1] = scale_bf16x2(b[c][1], f8, f9);
        b[c][2] = scale_bf16x2(b[c][2], f0, f1);
        b[c][3] = scale_bf16x2(b[c][3], f8, f9);
      }
#pragma unroll
      for (int m = 0; m < RM; ++m) {
        uint32_t a[4];
        load_a_t(a, x, ldx, tile_row(m * CN) * 16, kk * 16);
#pragma unroll
        for (int c = 0; c < CN; ++c) mma_tile(f[m * CN + c], a, b[c]);
      }
    }
  }
  // The bf16 copy [D, NV] (ld lds) used as a GEMM operand.
  __device__ void to_bf16(bf16* s, int lds) const {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int r0 = tile_row(i) * 16, c0 = tile_col(i) * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; e += 2)
          store_bf16x2(s + (r0 + Tile16::row(e)) * lds + c0 + Tile16::col(nt, e), f[i].c[nt][e],
                       f[i].c[nt][e + 1]);
    }
  }
};

struct ChunkRange {
  int begin, end;
};
__device__ ChunkRange segment_chunks(const LaParams& p, int seg) {
  const int begin = seg * p.seg_chunks;
  return {begin, min(begin + p.seg_chunks, p.nchunks)};
}

// ---------------------------------------------------------------------------------------------
// 0. Within-chunk cumulative log decays, one warp per (chunk, b*h).
// ---------------------------------------------------------------------------------------------
__global__ void la_chunk_logcum_kernel(float* lc, const float* log_tok, const float* log_head, int T,
                                       int H, int nchunks) {
  const int c = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  if (c >= nchunks) return;
  const int t0 = c * kChunk, r0 = 2 * lane, r1 = r0 + 1;
  auto at = [&](int r) -> float {
    const int t = t0 + r;
    if (t >= T) return 0.0f;
    if (log_tok) return log_tok[(static_cast<int64_t>(b) * T + t) * H + h];
    return log_head ? log_head[h] : 0.0f;
  };
  const float x0 = at(r0), x1 = at(r1), pair = x0 + x1;
  float incl = pair;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  float* out = lc + (static_cast<int64_t>(bh) * nchunks + c) * kChunk;
  out[r0] = incl - pair + x0;
  out[r1] = incl;
}

// ---------------------------------------------------------------------------------------------
// 1. Segment-local states from zero: forward M_j (X = K, Y = V, f = e), reverse dM_j (X = Q,
//    Y = dO, f = b, chunks walked backwards). kStateStages-deep cp.async pipeline, one barrier
//    per chunk (the row factors are applied to the Y fragments in registers).
// ---------------------------------------------------------------------------------------------
template <int D, bool kReverse>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) la_segment_state_kernel(LaParams p) {
  using SH = Shapes<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  // kStateStages buffers of [X tile | Y tile | L], `stage` bytes apart (computed offsets keep the
  // buffer index out of local memory).
  constexpr int stage = carved(SH::x_bytes) + carved(SH::v_bytes) + carved(SH::l_bytes);
  auto sX = [&](int buf) { return reinterpret_cast<bf16*>(smem + buf * stage); };
  auto sY = [&](int buf) { return reinterpret_cast<bf16*>(smem + buf * stage + carved(SH::x_bytes)); };
  auto sL = [&](int buf) {
    return reinterpret_cast<float*>(smem + buf * stage + carved(SH::x_bytes) + carved(SH::v_bytes));
  };

  const int z = blockIdx.x, seg = blockIdx.y, bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int col0 = z * SH::NV;
  const ChunkRange cr = segment_chunks(p, seg);
  const int n = cr.end - cr.begin;
  auto issue = [&](int i) {  // chunk i of the walk into buffer i % kStateStages (not committed)
    const int c = kReverse ? cr.end - 1 - i : cr.begin + i, buf = i % kStateStages;
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t row = static_cast<int64_t>(b) * p.T + t0, hd = static_cast<int64_t>(h) * D;
    load_tile_async<D>(sX(buf), SH::ldx, p.a1 + row * p.rs1 + hd, p.rs1, rows);
    load_tile_async<SH::NV>(sY(buf), SH::ldv, p.a3 + row * p.rs3 + hd + col0, p.rs3, rows);
    load_logcum_async(sL(buf), p.lc + (static_cast<int64_t>(bh) * p.nchunks + c) * kChunk);
  };

  StateTile<D> S;
  S.zero();
  float logg = 0.0f;
  // One commit group per chunk (empty past the end), so wait_group counts chunks.
#pragma unroll
  for (int i = 0; i < kStateStages - 1; ++i) {
    if (i < n) issue(i);
    cp_async_commit();
  }
  for (int i = 0; i < n; ++i) {
    const int buf = i % kStateStages;
    cp_async_wait_group<kStateStages - 2>();
    __syncthreads();  // chunk i has landed; every warp is done with chunk i - 1's buffer
    if (i + kStateStages - 1 < n) issue(i + kStateStages - 1);
    cp_async_commit();
    const float last = sL(buf)[kChunk - 1];
    // S = bC S + (diag(e) K)^T V  or  (diag(b) Q)^T dO
    S.update(fexp(last), sX(buf), SH::ldx, sY(buf), SH::ldv, sL(buf), kReverse);
    logg += last;
  }
  S.store(p.states + (static_cast<int64_t>(bh) * p.nseg + seg) * D * D, col0);
  if (!kReverse && z == 0 && threadIdx.x == 0) p.logg[bh * p.nseg + seg] = logg;
}

// ---------------------------------------------------------------------------------------------
// 2. Combines across segments (one thread per state element, sequential over segments).
// ---------------------------------------------------------------------------------------------
// Forward prefix: P_0 = S_init, P_{j+1} = g_j P_j + M_j; M_j is replaced by P_j. Also writes the
// final state and, when final_dot is given, adds <dS_final, S_final> to final_dot[bh].
__global__ void la_combine_forward_kernel(float* states, const float* logg, const float* init,
                                          float* final_state, const float* d_final,
                                          float* final_dot, int nseg, int dd) {
  const int bh = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  float dot = 0.0f;
  if (e < dd) {
    float pv = init ? init[static_cast<int64_t>(bh) * dd + e] : 0.0f;
    for (int j = 0; j < nseg; ++j) {
      float* m = states + (static_cast<int64_t>(bh) * nseg + j) * dd + e;
      const float mj = *m;
      *m = pv;
      pv = fexp(logg[bh * nseg + j]) * pv + mj;
    }
    if (final_state) final_state[static_cast<int64_t>(bh) * dd + e] = pv;
    if (d_final) dot = d_final[static_cast<int64_t>(bh) * dd + e] * pv;
  }
  if (final_dot) {
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (threadIdx.x % 32 == 0) atomicAdd(final_dot + bh, dot);
  }
}

// Backward suffix: E_{nseg-1} = dS_final, E_{j-1} = g_j E_j + dM_j; dM_j is replaced by E_j and
// d_init = g_0 E_0 + dM_0.
__global__ void la_combine_backward_kernel(float* dstates, const float* logg, const float* d_final,
                                           float* d_init, int nseg, int dd) {
  const int bh = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= dd) return;
  float ev = d_final ? d_final[static_cast<int64_t>(bh) * dd + e] : 0.0f;
  for (int j = nseg - 1; j >= 0; --j) {
    float* m = dstates + (static_cast<int64_t>(bh) * nseg + j) * dd + e;
    const float mj = *m;
    *m = ev;
    ev = fexp(logg[bh * nseg + j]) * ev + mj;
  }
  if (d_init) d_init[static_cast<int64_t>(bh) * dd + e] = ev;
}

// final_dot[bh] += <dS_final, S_final> (the backward's share of the final state in d log a at T-1,
// when the forward's final state was saved rather than recomputed).
__global__ void la_final_dot_kernel(const float* final_state, const float* d_final, float* final_dot,
                                    int dd) {
  const int bh = blockIdx.y;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t i = static_cast<int64_t>(bh) * dd + e;
  float dot = e < dd ? d_final[i] * final_state[i] : 0.0f;
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (threadIdx.x % 32 == 0) atomicAdd(final_dot + bh, dot);
}

// ---------------------------------------------------------------------------------------------
// 3. Walks: o, dQ (forward) and dV, dK (reverse); see the file comment.
// ---------------------------------------------------------------------------------------------
// Warp roles (8 warps, 4 row blocks of 16 chunk rows): warp w owns row block R = w / 2 of A1 and
// of the output, and output column tiles [half * OF, half * OF + OF) with half = w % 2. In stage
// A one A1 fragment per k-step feeds both the warp's causal product tiles of row block R (forward
// columns 0..R, reverse R..3, split between the two warps of the row) and its A1 S tiles.
template <int D, bool kReverse>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) la_walk_kernel(LaParams p) {
  using SH = Shapes<D>;
  constexpr int NV = SH::NV, TN = NV / 16, OF = SH::out_frags;
  static_assert((kChunk / 16) * 2 == kWarps && OF * 2 == TN, "two warps per 16-row block");
  extern __shared__ __align__(128) unsigned char smem[];
  // Two stages of [A2 | A3 | L] (`stage` bytes apart), then A1 (one buffer: it is free after
  // stage A, and the next one is loaded during stages B and C), the bf16 state, the masked
  // product and the dlog row dots.
  constexpr int stage = carved(SH::x_bytes) + carved(SH::v_bytes) + carved(SH::l_bytes);
  auto sA2 = [&](int buf) { return reinterpret_cast<bf16*>(smem + buf * stage); };
  auto sA3 = [&](int buf) { return reinterpret_cast<bf16*>(smem + buf * stage + carved(SH::x_bytes)); };
  auto sLb = [&](int buf) {
    return reinterpret_cast<float*>(smem + buf * stage + carved(SH::x_bytes) + carved(SH::v_bytes));
  };
  SmemCarver sc{smem + 2 * stage};
  bf16* sA1 = sc.take<bf16>(SH::x_bytes);
  bf16* sS = sc.take<bf16>(SH::s_bytes);
  bf16* sP = sc.take<bf16>(SH::p_bytes);
  float* sRowDot = sc.take<float>(SH::l_bytes);

  const int z = blockIdx.x, seg = blockIdx.y, bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int R = warp / 2, half = warp % 2, oj0 = half * OF;
  // This warp's product tiles: columns pc0 .. pc0 + np of row block R (np = 0, 1 or 2).
  const int row_lo = kReverse ? R : 0, row_n = kReverse ? 4 - R : R + 1, first_n = (row_n + 1) / 2;
  const int pc0 = row_lo + (half ? first_n : 0), np = half ? row_n - first_n : first_n;
  const int col0 = z * NV;
  const ChunkRange cr = segment_chunks(p, seg);
  const int n = cr.end - cr.begin;
  auto chunk_of = [&](int i) { return kReverse ? cr.end - 1 - i : cr.begin + i; };
  // Offset of chunk c's first row of this head in an operand of row stride rs.
  auto base_of = [&](int c, int64_t rs) {
    return (static_cast<int64_t>(b) * p.T + c * kChunk) * rs + static_cast<int64_t>(h) * D;
  };
  auto rows_of = [&](int c) { return min(kChunk, p.T - c * kChunk); };
  auto issue_a1 = [&](int i) {
    const int c = chunk_of(i);
    load_tile_async<D>(sA1, SH::ldx, p.a1 + base_of(c, p.rs1), p.rs1, rows_of(c));
    cp_async_commit();
  };
  auto issue_rest = [&](int i) {  // A2, A3 and L of walk step i into buffer i % 2
    const int c = chunk_of(i), rows = rows_of(c), buf = i & 1;
    load_tile_async<D>(sA2(buf), SH::ldx, p.a2 + base_of(c, p.rs2), p.rs2, rows);
    load_tile_async<NV>(sA3(buf), SH::ldv, p.a3 + base_of(c, p.rs3) + col0, p.rs3, rows);
    load_logcum_async(sLb(buf), p.lc + (static_cast<int64_t>(bh) * p.nchunks + c) * kChunk);
    cp_async_commit();
  };
  // dlog[t] += dot_sign * rowdot[t] for the rows of chunk c (after a barrier that follows every
  // warp's stage B of that chunk); clears the row dots.
  auto flush_dots = [&](int c) {
    if (threadIdx.x < rows_of(c)) {
      atomicAdd(p.dlog + (static_cast<int64_t>(b) * p.T + c * kChunk + threadIdx.x) * p.H + h,
                p.dot_sign * sRowDot[threadIdx.x]);
      sRowDot[threadIdx.x] = 0.0f;
    }
  };

  StateTile<D> S;
  S.load(p.states + (static_cast<int64_t>(bh) * p.nseg + seg) * D * D, col0, p.transposed);
  S.to_bf16(sS, SH::ldv);
  if (threadIdx.x < kChunk) sRowDot[threadIdx.x] = 0.0f;
  if (n > 0) {
    issue_a1(0);
    issue_rest(0);
  }
  for (int i = 0; i < n; ++i) {
    const int c = chunk_of(i), rows = rows_of(c), buf = i & 1;
    const int64_t base = base_of(c, p.rs_out), rs = p.rs_out;  // of out and dot_src
    const bool more = i + 1 < n;
    const bf16* a2 = sA2(buf);
    const bf16* a3 = sA3(buf);
    const float* sL = sLb(buf);
    cp_async_wait_all();
    __syncthreads();  // this chunk's tiles and the state copy are ready; the other buffer is free
    if (more) issue_rest(i + 1);
    if (p.dot_src && i > 0) flush_dots(chunk_of(i - 1));

    // The dlog dot source at this warp's output positions, straight from global memory into
    // registers (used in stage B). dsrc[j][nt][u]: row R * 16 + g + 8 u, column (oj0 + j) * 16 +
    // nt * 8 + 2 (lane % 4) (+1).
    uint32_t dsrc[OF][2][2] = {};
    if (p.dot_src) {
#pragma unroll
      for (int j = 0; j < OF; ++j)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int r = R * 16 + Tile16::row(2 * u), cc = (oj0 + j) * 16 + Tile16::col(nt, 0);
            dsrc[j][nt][u] = r < rows ? __ldg(reinterpret_cast<const unsigned int*>(
                                            p.dot_src + base + r * rs + col0 + cc))
                                      : 0u;
          }
    }

    // A: causal product tiles of row block R (forward P = A1 A2^T, keep s <= r with r the row;
    //    reverse P^T = A1 A2^T, keep row <= column) and out = A1 S, sharing the A1 fragments.
    Tile16 acc_p[2], acc_o[OF];
    acc_p[0].zero();
    acc_p[1].zero();
#pragma unroll
    for (int j = 0; j < OF; ++j) acc_o[j].zero();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t fa[4];
      load_a(fa, sA1, SH::ldx, R * 16, kk * 16);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (u < np) {
          uint32_t fb[4];
          load_b_t(fb, a2, SH::ldx, kk * 16, (pc0 + u) * 16);
          mma_tile(acc_p[u], fa, fb);
        }
      }
#pragma unroll
      for (int j = 0; j < OF; ++j) {
        uint32_t fb[4];
        load_b(fb, sS, SH::ldv, kk * 16, (oj0 + j) * 16);
        mma_tile(acc_o[j], fa, fb);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u < np) {
        const int pc = pc0 + u;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; e += 2) {
            const int row = R * 16 + Tile16::row(e), col = pc * 16 + Tile16::col(nt, e);
            float val[2];
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              const int r = kReverse ? col + v : row, s = kReverse ? row : col + v;
              val[v] = s <= r ? acc_p[u].c[nt][e + v] * fexp(sL[r] - sL[s]) : 0.0f;
            }
            store_bf16x2(sP + row * SH::ldp + col, val[0], val[1]);
          }
      }
    }
    // out = diag(f) A1 S, f = b (forward) or e (reverse).
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const float f = row_factor(sL, R * 16 + Tile16::row(e), !kReverse);
#pragma unroll
      for (int j = 0; j < OF; ++j)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          acc_o[j].c[nt][e] *= f;
          acc_o[j].c[nt][e + 1] *= f;
        }
    }
    __syncthreads();  // sP complete; A1 and the state copy are free
    if (more) issue_a1(i + 1);

    // B: out += sP A3 over the causal column blocks of row block R; store; dlog shares.
    const int kb = kReverse ? R : 0, ke = kReverse ? kChunk / 16 : R + 1;
    for (int kk = kb; kk < ke; ++kk) {
      uint32_t fa[4];
      load_a(fa, sP, SH::ldp, R * 16, kk * 16);
#pragma unroll
      for (int j = 0; j < OF; ++j) {
        uint32_t fb[4];
        load_b(fb, a3, SH::ldv, kk * 16, (oj0 + j) * 16);
        mma_tile(acc_o[j], fa, fb);
      }
    }
    float dot[2] = {0.0f, 0.0f};  // rows R * 16 + g and + 8
#pragma unroll
    for (int j = 0; j < OF; ++j)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const int r = R * 16 + Tile16::row(e), cc = (oj0 + j) * 16 + Tile16::col(nt, e);
          const float x = acc_o[j].c[nt][e], y = acc_o[j].c[nt][e + 1];
          if (p.out && r < rows) store_bf16x2(p.out + base + r * rs + col0 + cc, x, y);
          if (p.dot_src) {
            __nv_bfloat162 hv;
            memcpy(&hv, &dsrc[j][nt][e / 2], 4);
            const float2 src = __bfloat1622float2(hv);
            dot[e / 2] += x * src.x + y * src.y;
          }
        }
    if (p.dot_src) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], 1);
        dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], 2);
      }
      if (lane % 4 == 0) {
        atomicAdd(sRowDot + R * 16 + lane / 4, dot[0]);
        atomicAdd(sRowDot + R * 16 + lane / 4 + 8, dot[1]);
      }
    }

    // C: state update in registers and its new bf16 copy (every warp finished reading the old
    //    copy in stage A, before the barrier above).
    if (more) {
      S.update(fexp(sL[kChunk - 1]), a2, SH::ldx, a3, SH::ldv, sL, kReverse);
      S.to_bf16(sS, SH::ldv);
    }
  }
  if (p.dot_src && n > 0) {
    __syncthreads();
    flush_dots(chunk_of(n - 1));
  }
}

// d log a_t = final_dot + sum_{r >= t} dLambda_r in place over dlog [B, T, H], in float64, in two
// passes over tiles of kScanTile tokens (one block each, kScanPer consecutive tokens per thread):
// the tiles' sums, then each tile's suffix scan from the sum of the tiles after it.
constexpr int kScanThreads = 256, kScanPer = 16, kScanTile = kScanThreads * kScanPer;

__global__ void la_dlog_tile_sums_kernel(const float* dlog, double* tile_sums, int T, int H, int ntiles) {
  __shared__ double warp_sums[kScanThreads / 32];
  const int tile = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t0 = tile * kScanTile + threadIdx.x * kScanPer;
  double sum = 0.0;
#pragma unroll
  for (int i = 0; i < kScanPer; ++i)
    if (t0 + i < T) sum += dlog[(static_cast<int64_t>(b) * T + t0 + i) * H + h];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kScanThreads / 32; ++w) total += warp_sums[w];
    tile_sums[static_cast<int64_t>(bh) * ntiles + tile] = total;
  }
}

__global__ void la_dlog_scan_apply_kernel(float* dlog, const double* tile_sums, const float* final_dot, int T,
                                          int H, int ntiles) {
  __shared__ double warp_totals[kScanThreads / 32];
  __shared__ double later_tiles;
  const int tile = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0) {  // final_dot plus the sums of the tiles after this one
    double s = 0.0;
    for (int k = tile + 1 + lane; k < ntiles; k += 32) s += tile_sums[static_cast<int64_t>(bh) * ntiles + k];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) later_tiles = s + (final_dot ? final_dot[bh] : 0.0);
  }
  const int t0 = tile * kScanTile + threadIdx.x * kScanPer;
  float x[kScanPer];
  double sum = 0.0;
#pragma unroll
  for (int i = 0; i < kScanPer; ++i) {
    x[i] = t0 + i < T ? dlog[(static_cast<int64_t>(b) * T + t0 + i) * H + h] : 0.0f;
    sum += x[i];
  }
  // Inclusive suffix sums over the warp's lanes (later lanes hold later tokens); lane 0 ends with
  // the warp's total.
  double incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const double y = __shfl_down_sync(0xffffffffu, incl, off);
    if (lane + off < 32) incl += y;
  }
  if (lane == 0) warp_totals[warp] = incl;
  __syncthreads();
  double run = later_tiles + (incl - sum);
  for (int w = warp + 1; w < kScanThreads / 32; ++w) run += warp_totals[w];
#pragma unroll
  for (int i = kScanPer - 1; i >= 0; --i) {
    run += x[i];
    if (t0 + i < T) dlog[(static_cast<int64_t>(b) * T + t0 + i) * H + h] = static_cast<float>(run);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Hopper path (D = 128, sm_90a): one warpgroup (128 threads) per block, products on wgmma.
// ---------------------------------------------------------------------------------------------
// Same blocks and passes as above (value tile z of NV = 64 columns, segment, b, h); the walk
// state is kept transposed in registers, W^T [NV x D] (rows: A3 columns, columns: A2 columns), so
// that its update is one m64n128 product per 16 chunk rows:
//   W^T = bC W^T + (A3^T diag(f)) A2       A = A3^T from registers (ldmatrix.trans, scaled by f),
//                                          B = A2 read N-major from shared memory
// Walk step per chunk (every operand tile 128-byte swizzled; A1, A2, A3, L and the bf16 copy of
// W^T double-buffered, so one barrier per chunk):
//   next chunk's loads      TMA: one thread, five copies on the other stage's mbarrier
//   A operand of the update ldmatrix.trans of A3 and the decays L it needs (before the products)
//   P = A1 A2^T             8 x m64n64k16, A1 and A2 K-major from shared memory (one group)
//   O = A1 W                8 x m64n64k16, B = the bf16 copy of W^T (K-major) (one group)
//   W^T update              4 x m64n128k16, queued behind P and O
//   mask factors            from L alone, while the products run
//   O = diag(b) O + (P o M) A3    the factors applied once P is done, P as the register A operand,
//                           4 x m64n64k16 with A3 read N-major
//   new bf16 copy of W^T into the next stage and O into this stage's spent copy (stmatrix, one
//   proxy fence); O out by TMA, one store per warp (and the dlog dots).
// With LASP_LA_LOADS=cp.async every thread issues cp.async copies after the update instead, and O
// is stored from registers.
// ptxas may serialise every wgmma of a kernel (WARPGROUP.ARRIVE/DEPBAR around each HGMMA in the
// SASS): silently for a variant with P and O merged into one m64n128 product, and with messages
// C7514/C7517 ("warpgroup.wait is injected") when the last-chunk and other-chunk paths merge with
// products in flight, or when the state update is issued on the last chunk too. Check ptxas -v
// and the SASS after changing the walk (three ARRIVE per walk step).
constexpr int kWgThreads = 128;
constexpr int kWgNV = 128 / kSplit;
static_assert(kWgNV == 64, "the Hopper path tiles 64 value columns per block");

struct StateSmem {
  enum : int {
    kStages = 4,
    x = 0, y = kStages * 16384, lc = y + kStages * 8192,
    bar = lc + kStages * 256,  // one mbarrier per stage (TMA loads)
    bytes = bar + kStages * 8
  };
};
// Bytes one state stage receives: X [C x 128], Y [C x 64] bf16, L [C] fp32.
constexpr uint32_t kStateStageTxBytes = 16384 + 8192 + kChunk * 4;
// The state kernel's operands as TMA tensor maps (as WalkMaps below).
struct StateMaps {
  CUtensorMap x, y;
};
constexpr int kAlignSlack = 1024;  // dynamic shared memory is aligned up to 1024 bytes in-kernel

__device__ __forceinline__ unsigned char* align1024(unsigned char* p) {
  return p + ((1024 - (sm90::smem_u32(p) & 1023)) & 1023);
}

// The A operand of one chunk's state update, A = Y^T diag(f) (see state_update_issue): the bf16
// fragments of Y^T (ldmatrix.trans) and the cumulative log decays at this thread's rows of them.
// Loaded apart from the products so that the walk can read it before queueing its other products
// (a shared-memory read issued behind wgmma waits for the operand traffic of the wgmma).
struct UpdateOperand {
  uint32_t a[kChunk / 16][4];
  float l[kChunk / 16][4];  // L at rows 16 kk + 2 q + (0, 1, 8, 9)
  float last;               // L[C - 1]
};
__device__ __forceinline__ void load_update_operand(UpdateOperand& u, uint32_t y, const float* L) {
  const int q2 = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) {
    sm90::load_a_trans_sw128(u.a[kk], y, kk);
    const int r = kk * 16 + q2;
    const float2 l01 = *reinterpret_cast<const float2*>(L + r), l89 = *reinterpret_cast<const float2*>(L + r + 8);
    u.l[kk][0] = l01.x;
    u.l[kk][1] = l01.y;
    u.l[kk][2] = l89.x;
    u.l[kk][3] = l89.y;
  }
  u.last = L[kChunk - 1];
}

// Issues (one commit group, not waited on) acc += (Y^T diag(f)) X for one chunk: acc is
// [64 x 128] (rows: Y's 64 columns, columns: X's 128 columns), u the loaded Y operand, x a
// two-panel [C x 128] tile, f[r] = exp(L[r]) (by_b) or exp(L[C-1] - L[r]).
template <int XPANEL = sm90::kSwPanelBytes>
__device__ __forceinline__ void state_update_issue(float (&acc)[64], uint32_t x, UpdateOperand& u, bool by_b) {
#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) {
    float f[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = fexp(by_b ? u.l[kk][e] : u.last - u.l[kk][e]);
    u.a[kk][0] = scale_bf16x2(u.a[kk][0], f[0], f[1]);
    u.a[kk][1] = scale_bf16x2(u.a[kk][1], f[0], f[1]);
    u.a[kk][2] = scale_bf16x2(u.a[kk][2], f[2], f[3]);
    u.a[kk][3] = scale_bf16x2(u.a[kk][3], f[2], f[3]);
  }
  sm90::fence();
#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) sm90::mma_64x128_rs_bt(acc, u.a[kk], sm90::desc_mnmajor(x, kk, XPANEL));
  sm90::commit();
}

// Segment-local states (as la_segment_state_kernel<128, reverse>), StateSmem::kStages-deep
// load pipeline (TMA with kTma, else cp.async), one barrier per chunk. The accumulator is M_j^T
// (dM_j^T): its rows are Y's columns.
template <bool kReverse, bool kTma>
__global__ void __launch_bounds__(kWgThreads, kBlocksPerSm) la_segment_state_sm90_kernel(
    LaParams p, const __grid_constant__ StateMaps maps) {
#if !LASP_SM90_WGMMA
  __trap();  // compiled for a device without wgmma; the host never launches it there
#endif
  constexpr int D = 128, NV = kWgNV, S = StateSmem::kStages;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align1024(smem_raw);
  const uint32_t sbase = sm90::smem_u32(smem);
  auto lcs = [&](int buf) { return reinterpret_cast<float*>(smem + StateSmem::lc + buf * 256); };
  const uint32_t bar0 = sbase + StateSmem::bar;

  const int z = blockIdx.x, seg = blockIdx.y, bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, q = threadIdx.x % 4;
  const int col0 = z * NV;
  const ChunkRange cr = segment_chunks(p, seg);
  const int n = cr.end - cr.begin;
  auto issue = [&](int i) {  // chunk i of the walk into buffer i % S (cp.async: not committed)
    const int c = kReverse ? cr.end - 1 - i : cr.begin + i, buf = i % S;
    const float* lsrc = p.lc + (static_cast<int64_t>(bh) * p.nchunks + c) * kChunk;
    if constexpr (kTma) {
      if (threadIdx.x == 0) {
        const uint32_t bar = bar0 + 8 * buf, x = sbase + StateSmem::x + buf * 16384;
        sm90::fence_proxy();  // this stage's generic reads (S steps ago) before the async writes
        sm90::mbar_arrive_expect_tx(bar, kStateStageTxBytes);
        sm90::tma_load_3d(x, &maps.x, bar, h * D, c * kChunk, b);
        sm90::tma_load_3d(x + sm90::kSwPanelBytes, &maps.x, bar, h * D + 64, c * kChunk, b);
        sm90::tma_load_3d(sbase + StateSmem::y + buf * 8192, &maps.y, bar, h * D + col0, c * kChunk, b);
        sm90::bulk_load(sm90::smem_u32(lcs(buf)), lsrc, kChunk * 4, bar);
      }
    } else {
      const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
      const int64_t row = static_cast<int64_t>(b) * p.T + t0, hd = static_cast<int64_t>(h) * D;
      sm90::load_tile_sw128<kChunk, D>(sbase + StateSmem::x + buf * 16384, p.a1 + row * p.rs1 + hd, p.rs1, rows);
      sm90::load_tile_sw128<kChunk, NV>(sbase + StateSmem::y + buf * 8192, p.a3 + row * p.rs3 + hd + col0, p.rs3,
                                        rows);
      load_logcum_async(lcs(buf), lsrc);
    }
  };
  if constexpr (kTma) {
    if (threadIdx.x == 0) {
      for (int k = 0; k < S; ++k) sm90::mbar_init(bar0 + 8 * k, 1);
      sm90::mbar_fence_init();
    }
    __syncthreads();
  }

  float acc[64];
#pragma unroll
  for (int v = 0; v < 64; ++v) acc[v] = 0.0f;
  float logg = 0.0f;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < n) issue(i);
    if constexpr (!kTma) cp_async_commit();
  }
  for (int i = 0; i < n; ++i) {
    const int buf = i % S;
    if constexpr (kTma) {
      sm90::mbar_wait(bar0 + 8 * buf, (i / S) & 1);
    } else {
      cp_async_wait_group<S - 2>();
      sm90::fence_proxy();
    }
    __syncthreads();  // chunk i has landed; every warp's products of chunk i - 1 are complete
    const float* L = lcs(buf);
    const float last = L[kChunk - 1], bC = fexp(last);
#pragma unroll
    for (int v = 0; v < 64; ++v) acc[v] *= bC;
    // S^T = bC S^T + (Y^T diag(f)) X, f = e (forward) or b (reverse)
    UpdateOperand u;
    load_update_operand(u, sbase + StateSmem::y + buf * 8192, L);
    state_update_issue(acc, sbase + StateSmem::x + buf * 16384, u, kReverse);
    if (i + S - 1 < n) issue(i + S - 1);  // while the product runs
    if constexpr (!kTma) cp_async_commit();
    sm90::wait<0>();
    sm90::fence_operands(acc);
    logg += last;
  }
  float* gs = p.states + (static_cast<int64_t>(bh) * p.nseg + seg) * D * D;
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      gs[(8 * j + 2 * q + i % 2) * D + col0 + 16 * warp + g + 8 * (i / 2)] = acc[4 * j + i];
  if (!kReverse && z == 0 && threadIdx.x == 0) p.logg[bh * p.nseg + seg] = logg;
}

// The walk (as la_walk_kernel<128, reverse>), see the section comment. Each stage holds, besides
// the chunk's tiles, the bf16 copy of W^T (the state entering the stage's chunk), so the copy is
// double-buffered with the tiles: one barrier per chunk.
struct WalkSmem {  // byte offsets from the 1024-byte aligned dynamic shared memory base
  enum : int {
    a1 = 0,             // [C x 128]: two 8 KB panels
    a2 = 16384,         // [C x 128]
    a3 = 32768,         // [C x 64]: one panel
    wt = 40960,         // bf16 W^T [64 x 128], K-major: two panels
    stage = 57344,      // two stages
    lc = 2 * stage,     // two [C] fp32
    bar = lc + 512,     // two mbarriers (TMA loads)
    bytes = bar + 16    // 112.5 KB: two blocks per SM (no room for alignment slack)
  };
};
// Bytes one walk stage receives: A1 and A2 [C x 128], A3 [C x 64] bf16, L [C] fp32.
constexpr uint32_t kWalkStageTxBytes = 2 * 16384 + 8192 + kChunk * 4;

// The walk operands as TMA tensor maps (kernel parameter, used when the kernel loads with TMA):
// each a 3-D bf16 tensor {H * D columns, T rows (row stride rs), B}, boxes of 64 columns x C rows,
// 128-byte swizzle; rows past T read as zeros.
struct WalkMaps {
  CUtensorMap a1, a2, a3;
  CUtensorMap out;  // the same for out, boxes of 64 columns x 16 rows (one warp's rows)
};

// The walk of one warpgroup: its operands and outputs.
struct WalkRole {
  const float* states;  // segment states [B*H, nseg, D, D]
  bool transposed;      // the walk state W is the transpose of the segment state
  bf16* out;            // [B, T, H, D] (columns z), or null
  const bf16* dot_src;  // dlog share source, or null
  float dot_sign;
};

// W^T in registers: acc_w[4 j + i] = W[r][col0 + m] with m = 16 (warp % 4) + g (+8 for i >= 2)
// the A3 column and r = 8 j + 2 q + i % 2 the A2 column.
__device__ __forceinline__ void load_walk_state(float (&acc_w)[64], const WalkRole& role, const LaParams& p,
                                                int bh, int seg, int col0) {
  constexpr int D = 128;
  const int q = threadIdx.x % 4, r0 = 16 * ((threadIdx.x / 32) % 4) + (threadIdx.x % 32) / 4;
  const float* gs = role.states + (static_cast<int64_t>(bh) * p.nseg + seg) * D * D;
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 8 * j + 2 * q + i % 2, c = col0 + r0 + 8 * (i / 2);
      acc_w[4 * j + i] = role.transposed ? gs[c * D + r] : gs[r * D + c];
    }
}
// The bf16 copy of W^T [64 x 128] into the K-major tile at shared address `wt` (row m, 16-byte
// chunk j % 8 of panel j / 8), then the proxy fence (a barrier must follow before it is read).
__device__ __forceinline__ void store_walk_state_copy(uint32_t wt, const float (&acc_w)[64]) {
  sm90::store_acc_bf16_sw128<16>(wt, acc_w);
  sm90::fence_proxy();
}

// One walk step of one warpgroup over a chunk whose tiles have landed (a1, a2: [C x 128], a3:
// single panel [C x 64] holding A3's columns z, wt: the bf16 copy of W^T, L: the chunk's
// cumulative log decays). With `more`, updates acc_w and writes its bf16 copy to next_wt (in the
// next stage, free since the last barrier). issue_next() loads the next chunk (kTma: first, else
// once the products are queued).
// Writes out[:, z] for the chunk's rows (at `out_base`, row stride rs) and adds the dlog row dots
// to dlog_h[(dlog_row + r) * H] (dlog_h: the head's column of dlog [B, T, H]; dlog_row = b T + t0).
//
// kTma: the next chunk's loads are TMA copies (one thread), issued first; O goes out by TMA too:
// each warp stages its 16 rows (bf16) in its own rows of panel 0 of this stage's W^T copy (free
// once the products are done, rewritten by the same warp only at the end of the next step, after
// its store has read them) and one lane stores them through `out_map` (rows past T are not
// written). kDot: the walk adds the dlog row dots (dot_src given).
template <bool kReverse, bool kTma, bool kDot, typename IssueNext>
__device__ __forceinline__ void walk_chunk_sm90(float (&acc_w)[64], uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t wt, const float* L, bool more, uint32_t next_wt,
                                                IssueNext issue_next, const WalkRole& role, int64_t out_base,
                                                int64_t rs, int rows, float* dlog_h, int64_t dlog_row, int H,
                                                const CUtensorMap* out_map, int out_c0, int out_row, int out_b) {
  constexpr int D = 128;
  const int warp = (threadIdx.x / 32) % 4, g = (threadIdx.x % 32) / 4, q = threadIdx.x % 4;
  const int r0 = 16 * warp + g, r1 = r0 + 8;  // this thread's two rows of every 64 x N product

  // P = A1 A2^T and O = A1 W (both operands from shared memory), in two commit groups so that the
  // mask can start as soon as P is done.
  if constexpr (kTma) {
    if (more) issue_next();  // one thread, a few instructions: as early as possible
  }
  UpdateOperand u;
  if (more) load_update_operand(u, a3, L);
  const float lr0 = L[r0], lr1 = L[r1];
  float acc[32], acc_o[32];
  sm90::fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    sm90::mma_64x64_ss(acc, sm90::desc_kmajor(a1, kk), sm90::desc_kmajor(a2, kk), kk > 0);
  sm90::commit();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    sm90::mma_64x64_ss(acc_o, sm90::desc_kmajor(a1, kk), sm90::desc_kmajor(wt, kk), kk > 0);
  sm90::commit();
  // The mask M as factors of P's accumulator, from L alone (computed while P is in flight):
  // (P o M)[r][s] = P[r][s] fac (forward: s <= r, exp(L[r] - L[s]); reverse: s >= r,
  // exp(L[s] - L[r])). Column block j (8 columns) lies left of this warp's 16 rows (j / 2 <
  // warp), on them, or right of them; off the diagonal it is kept whole (forward left, reverse
  // right; the factor is split at the warp's first (last) row m: exp(L[r] - L[m]) exp(L[m] -
  // L[s]), each <= 1) or dropped whole (factor 0). Then P o M as the bf16 A fragments of
  // (P o M) A3: fragment kk holds columns 16 kk .. 16 kk + 15.
  float fac[8][4];
  auto mask_factors = [&] {
    const float lm = L[kReverse ? 16 * warp + 15 : 16 * warp];
    const float rf0 = fexp(kReverse ? lm - lr0 : lr0 - lm), rf1 = fexp(kReverse ? lm - lr1 : lr1 - lm);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int s = 8 * j + 2 * q;
#pragma unroll
      for (int e = 0; e < 4; ++e) fac[j][e] = 0.0f;
      if (kReverse ? j / 2 > warp : j / 2 < warp) {
        const float c0 = fexp(kReverse ? L[s] - lm : lm - L[s]);
        const float c1 = fexp(kReverse ? L[s + 1] - lm : lm - L[s + 1]);
        fac[j][0] = rf0 * c0;
        fac[j][1] = rf0 * c1;
        fac[j][2] = rf1 * c0;
        fac[j][3] = rf1 * c1;
      } else if (j / 2 == warp) {
        const float ls0 = L[s], ls1 = L[s + 1];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? r0 : r1, sc = s + e % 2;
          const float lr = e < 2 ? lr0 : lr1, ls = e % 2 ? ls1 : ls0;
          const bool keep = kReverse ? sc >= r : sc <= r;
          fac[j][e] = keep ? fexp(kReverse ? ls - lr : lr - ls) : 0.0f;
        }
      }
    }
  };
  uint32_t pa[kChunk / 16][4];
  auto mask = [&] {
    sm90::fence_operands(acc);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      pa[j / 2][(j % 2) * 2] = sm90::pack_bf16x2(acc[4 * j] * fac[j][0], acc[4 * j + 1] * fac[j][1]);
      pa[j / 2][(j % 2) * 2 + 1] = sm90::pack_bf16x2(acc[4 * j + 2] * fac[j][2], acc[4 * j + 3] * fac[j][3]);
    }
  };
  // Every wait sits in the branch that issued the groups: ptxas serialises all wgmma of the kernel
  // when the two paths merge with products in flight.
  if (more) {
    // W^T = bC W^T + (A3^T diag(f)) A2 (not needed after the segment's last chunk).
    const float bC = fexp(u.last);
#pragma unroll
    for (int v = 0; v < 64; ++v) acc_w[v] *= bC;
    state_update_issue(acc_w, a2, u, kReverse);
    if constexpr (!kTma) issue_next();  // the next chunk's loads, while the products run
    mask_factors();
    sm90::wait<2>();  // groups [P], [O], [W^T]: P is done
    mask();
    sm90::wait<1>();  // O is done
  } else {
    mask_factors();
    sm90::wait<1>();  // groups [P], [O]
    mask();
    sm90::wait<0>();
  }
  // O's row factors diag(f), f = b (forward) or e (reverse).
  const float lC = L[kChunk - 1];
  const float f0 = fexp(kReverse ? lC - lr0 : lr0), f1 = fexp(kReverse ? lC - lr1 : lr1);
  sm90::fence_operands(acc_o);
  // O = diag(f) A1 W.
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    acc_o[4 * j] *= f0;
    acc_o[4 * j + 1] *= f0;
    acc_o[4 * j + 2] *= f1;
    acc_o[4 * j + 3] *= f1;
  }
  sm90::fence();
#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) sm90::mma_64x64_rs_bt(acc_o, pa[kk], sm90::desc_mnmajor(a3, kk));
  sm90::commit();

  // The dlog dot source at this thread's output positions (read while the product runs).
  uint32_t dsrc[8][2];
  if constexpr (kDot) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int r = u ? r1 : r0;
        dsrc[j][u] = r < rows ? __ldg(reinterpret_cast<const unsigned int*>(role.dot_src + out_base + r * rs +
                                                                           8 * j + 2 * q))
                              : 0u;
      }
  }
  sm90::wait<0>();
  sm90::fence_operands(acc_o);
  sm90::fence_operands(acc_w);
  if constexpr (kTma) {
    // The bf16 copy of the new W^T, and O staged for its TMA store, then one proxy fence for
    // both. next_wt holds this warp's O rows of the previous step until their store has read them.
    if (more) {
      if (threadIdx.x % 32 == 0) sm90::bulk_wait_read();
      __syncwarp();
      sm90::store_acc_bf16_sw128<16>(next_wt, acc_w);
    }
    if (role.out) sm90::store_acc_bf16_sw128<8>(wt, acc_o);  // rows 16 w .. 16 w + 15 of panel 0
    sm90::fence_proxy();
  } else {
    if (more) store_walk_state_copy(next_wt, acc_w);
  }

  // Store O (bf16).
  if (role.out) {
    if constexpr (kTma) {
      __syncwarp();
      if (threadIdx.x % 32 == 0) {
        sm90::tma_store_3d(out_map, wt + 16 * warp * 128, out_c0, out_row + 16 * warp, out_b);
        sm90::bulk_commit();
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int r = u ? r1 : r0;
          if (r < rows)
            store_bf16x2(role.out + out_base + r * rs + 8 * j + 2 * q, acc_o[4 * j + 2 * u], acc_o[4 * j + 2 * u + 1]);
        }
    }
  }
  // Add the dlog row dots.
  if constexpr (kDot) {
    float dot[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        __nv_bfloat162 hv;
        memcpy(&hv, &dsrc[j][u], 4);
        const float2 src = __bfloat1622float2(hv);
        dot[u] += acc_o[4 * j + 2 * u] * src.x + acc_o[4 * j + 2 * u + 1] * src.y;
      }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], 1);
      dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], 2);
      const int r = u ? r1 : r0;
      if (q == 0 && r < rows) atomicAdd(dlog_h + (dlog_row + r) * H, role.dot_sign * dot[u]);
    }
  }
}

// kTma: the stage loads are TMA copies issued by one thread (mbarrier completion); otherwise
// every thread issues cp.async copies (LASP_LA_LOADS=cp.async; the fallback where tensor maps
// cannot be made).
template <bool kReverse, bool kTma, bool kDot>
__global__ void __launch_bounds__(kWgThreads, kBlocksPerSm) la_walk_sm90_kernel(LaParams p,
                                                                              const __grid_constant__ WalkMaps maps) {
#if !LASP_SM90_WGMMA
  __trap();  // compiled for a device without wgmma; the host never launches it there
#endif
  constexpr int D = 128, NV = kWgNV;
  extern __shared__ __align__(1024) unsigned char smem1024[];
  unsigned char* smem = smem1024;
  const uint32_t sbase = sm90::smem_u32(smem);
  if (sbase & 1023) __trap();  // the swizzled tiles need a 1024-byte aligned base
  auto at = [&](int buf, int off) { return sbase + buf * WalkSmem::stage + off; };
  auto lcs = [&](int buf) { return reinterpret_cast<float*>(smem + WalkSmem::lc + buf * 256); };
  const uint32_t bar0 = sbase + WalkSmem::bar;

  const int z = blockIdx.x, seg = blockIdx.y, bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int col0 = z * NV;
  const ChunkRange cr = segment_chunks(p, seg);
  const int n = cr.end - cr.begin;
  auto chunk_of = [&](int i) { return kReverse ? cr.end - 1 - i : cr.begin + i; };
  // Offset of chunk c's first row of this head in an operand of row stride rs.
  auto base_of = [&](int c, int64_t rs) {
    return (static_cast<int64_t>(b) * p.T + c * kChunk) * rs + static_cast<int64_t>(h) * D;
  };
  auto rows_of = [&](int c) { return min(kChunk, p.T - c * kChunk); };
  auto issue = [&](int i) {  // A1, A2, A3 and L of walk step i into stage i % 2
    const int c = chunk_of(i), buf = i & 1;
    const float* lsrc = p.lc + (static_cast<int64_t>(bh) * p.nchunks + c) * kChunk;
    if constexpr (kTma) {
      if (threadIdx.x == 0) {
        const uint32_t bar = bar0 + 8 * buf;
        const int row = c * kChunk, hc = h * D;
        sm90::fence_proxy();  // this stage's generic reads (two steps ago) before the async writes
        sm90::mbar_arrive_expect_tx(bar, kWalkStageTxBytes);
        sm90::tma_load_3d(at(buf, WalkSmem::a1), &maps.a1, bar, hc, row, b);
        sm90::tma_load_3d(at(buf, WalkSmem::a1) + sm90::kSwPanelBytes, &maps.a1, bar, hc + 64, row, b);
        sm90::tma_load_3d(at(buf, WalkSmem::a2), &maps.a2, bar, hc, row, b);
        sm90::tma_load_3d(at(buf, WalkSmem::a2) + sm90::kSwPanelBytes, &maps.a2, bar, hc + 64, row, b);
        sm90::tma_load_3d(at(buf, WalkSmem::a3), &maps.a3, bar, hc + col0, row, b);
        sm90::bulk_load(sm90::smem_u32(lcs(buf)), lsrc, kChunk * 4, bar);
      }
    } else {
      const int rows = rows_of(c);
      sm90::load_tile_sw128<kChunk, D>(at(buf, WalkSmem::a1), p.a1 + base_of(c, p.rs1), p.rs1, rows);
      sm90::load_tile_sw128<kChunk, D>(at(buf, WalkSmem::a2), p.a2 + base_of(c, p.rs2), p.rs2, rows);
      sm90::load_tile_sw128<kChunk, NV>(at(buf, WalkSmem::a3), p.a3 + base_of(c, p.rs3) + col0, p.rs3, rows);
      load_logcum_async(lcs(buf), lsrc);
      cp_async_commit();
    }
  };
  const WalkRole role{p.states, p.transposed, p.out, p.dot_src, p.dot_sign};
  float* dlog_h = p.dlog ? p.dlog + h : nullptr;

  if constexpr (kTma) {
    if (threadIdx.x == 0) {
      sm90::mbar_init(bar0, 1);
      sm90::mbar_init(bar0 + 8, 1);
      sm90::mbar_fence_init();
    }
    __syncthreads();
  }
  float acc_w[64];
  load_walk_state(acc_w, role, p, bh, seg, col0);
  store_walk_state_copy(sbase + WalkSmem::wt, acc_w);
  if (n > 0) issue(0);
  for (int i = 0; i < n; ++i) {
    const int c = chunk_of(i), buf = i & 1;
    if constexpr (kTma) {
      sm90::mbar_wait(bar0 + 8 * buf, (i >> 1) & 1);
    } else {
      cp_async_wait_all();
      sm90::fence_proxy();
    }
    __syncthreads();  // chunk i's tiles and W^T copy are ready; every warp is done with the other stage
    walk_chunk_sm90<kReverse, kTma, kDot>(
        acc_w, at(buf, WalkSmem::a1), at(buf, WalkSmem::a2), at(buf, WalkSmem::a3), at(buf, WalkSmem::wt),
        lcs(buf), i + 1 < n, at(buf ^ 1, WalkSmem::wt), [&] { issue(i + 1); }, role, base_of(c, p.rs_out) + col0,
        p.rs_out, rows_of(c), dlog_h, static_cast<int64_t>(b) * p.T + c * kChunk, p.H, &maps.out, h * D + col0,
        c * kChunk, b);
  }
  if constexpr (kTma) {
    if (threadIdx.x % 32 == 0) sm90::bulk_wait();  // this warp's O stores are complete
  }
}

// 1 where the kernels above were compiled for sm_90a (read once per device by the host).
__device__ int la_sm90_compiled = LASP_SM90_WGMMA;

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

int sm_count() {
  static int count[64] = {0};
  const int dev = cuda_current_device();
  if (dev < 64 && count[dev] == 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&count[dev], cudaDevAttrMultiProcessorCount, dev));
  }
  return dev < 64 ? count[dev] : 132;
}

template <int D>
int smem_walk_bytes() {
  using SH = Shapes<D>;
  return 2 * (carved(SH::x_bytes) + carved(SH::v_bytes) + carved(SH::l_bytes)) + carved(SH::x_bytes) +
         carved(SH::s_bytes) + carved(SH::p_bytes) + carved(SH::l_bytes);
}
template <int D>
int smem_state_bytes() {
  using SH = Shapes<D>;
  return kStateStages * (carved(SH::x_bytes) + carved(SH::v_bytes) + carved(SH::l_bytes));
}

// One block per (value tile, segment, b * h); `extra` follows p in the kernel's parameters.
template <typename Kernel, typename... Extra>
void launch(Kernel kernel, const char* what, const LaParams& p, int smem, int threads, const Extra&... extra) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<dim3(kSplit, p.nseg, p.B * p.H), threads, smem, cuda_stream()>>>(p, extra...);
  CUDA_CHECK_LAUNCH(what);
}

// The Hopper kernels (section 4) take D = 128 where the device is compute capability 9.0 and the
// kernels were compiled for it (sm_90a). LASP_LA_KERNEL=mma forces the mma.sync kernels (for
// comparisons).
bool use_sm90_kernels() {
  static int cached[64] = {0};  // per device: 0 unknown, 1 yes, 2 no
  const int dev = cuda_current_device();
  if (dev < 64 && cached[dev] != 0) return cached[dev] == 1;
  int major = 0, minor = 0, compiled = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  CUDA_CHECK(cudaMemcpyFromSymbol(&compiled, la_sm90_compiled, sizeof(int)));
  // LASP_LA_KERNEL=mma forces the mma.sync kernels (for comparisons); other values are errors.
  const bool forced_mma = env_choice("LASP_LA_KERNEL", {"auto", "mma"}) == 1;
  const bool yes = major == 9 && minor == 0 && compiled == 1 && !forced_mma;
  if (dev < 64) cached[dev] = yes ? 1 : 2;
  return yes;
}

// A bf16 [B, T, H, D] operand: its data and its row stride (elements from token t to t + 1; H * D
// when contiguous).
struct Operand {
  const bf16* p = nullptr;
  int64_t rs = 0;
};
Operand operand_of(const Tensor& t) {
  return t.defined() ? Operand{static_cast<const bf16*>(t.raw()), t.strides()[1]} : Operand{};
}

// The Hopper walk loads its tiles with TMA unless LASP_LA_LOADS=cp.async (for comparisons; `tma`
// or unset is the default, any other value is an error) or the driver has no tensor-map encoder.
bool use_tma_loads() {
  static const bool yes = env_choice("LASP_LA_LOADS", {"tma", "cp.async"}) == 0 && sm90::tensor_map_encoder() != nullptr;
  return yes;
}
// x as the walk kernel's tensor map: {H * D columns, T rows (row stride x.rs), B}, boxes of 64
// columns x box_rows rows, 128-byte swizzle. False if the driver refuses it (the caller then uses
// cp.async).
bool encode_walk_operand(CUtensorMap* map, Operand x, const LaParams& p, int box_rows) {
  constexpr int D = 128;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(p.H) * D, static_cast<cuuint64_t>(p.T),
                              static_cast<cuuint64_t>(p.B)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(x.rs) * 2, static_cast<cuuint64_t>(x.rs) * 2 * p.T};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(box_rows), 1}, elem[3] = {1, 1, 1};
  return sm90::tensor_map_encoder()(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(x.p), dims, strides, box,
                              elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The segment-state kernel: M_j (forward: x = k, y = v) or dM_j (reverse: x = q, y = dO).
// With LASP_PROFILE=shapes each pass is its own profile region ("<kernel> (<pass>) T=..."), so
// the report splits the linear-attention regions of a training step or benchmark by pass.
void open_pass_scope(std::optional<ProfileScope>& scope, const char* what, const LaParams& p) {
  if (!profile_shapes_enabled()) return;
  scope.emplace("linear_attention pass");
  scope->detail(std::string(what) + " B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) +
                    " H=" + std::to_string(p.H),
                0.0);
}

template <int D, bool kReverse>
void run_segment_state(LaParams p, const char* what, Operand x, Operand y, float* states) {
  std::optional<ProfileScope> scope;
  open_pass_scope(scope, what, p);
  p.a1 = x.p;
  p.rs1 = x.rs;
  p.a3 = y.p;
  p.rs3 = y.rs;
  p.states = states;
  if (D == 128 && use_sm90_kernels()) {
    StateMaps maps{};
    const bool tma = use_tma_loads() && encode_walk_operand(&maps.x, x, p, kChunk) &&
                     encode_walk_operand(&maps.y, y, p, kChunk);
    auto kernel = tma ? la_segment_state_sm90_kernel<kReverse, true> : la_segment_state_sm90_kernel<kReverse, false>;
    launch(kernel, what, p, StateSmem::bytes + kAlignSlack, kWgThreads, maps);
  } else
    launch(la_segment_state_kernel<D, kReverse>, what, p, smem_state_bytes<D>(), kThreads);
}

// One walk: out (may be null) from operands a1, a2, a3 and the segment states (transposed or not).
// out and dot_src share one row stride (checked by the callers' entry points).
template <int D, bool kReverse>
void run_walk(LaParams p, const char* what, Operand a1, Operand a2, Operand a3, Operand out,
              float* states, bool transposed, Operand dot_src, float dot_sign) {
  std::optional<ProfileScope> scope;
  open_pass_scope(scope, what, p);
  p.a1 = a1.p;
  p.a2 = a2.p;
  p.a3 = a3.p;
  p.rs1 = a1.rs;
  p.rs2 = a2.rs;
  p.rs3 = a3.rs;
  p.out = const_cast<bf16*>(out.p);
  p.states = states;
  p.transposed = transposed;
  p.dot_src = p.dlog ? dot_src.p : nullptr;
  p.rs_out = out.p ? out.rs : dot_src.rs;
  p.dot_sign = dot_sign;
  if (D == 128 && use_sm90_kernels()) {
    WalkMaps maps{};
    const bool tma = use_tma_loads() && encode_walk_operand(&maps.a1, a1, p, kChunk) &&
                     encode_walk_operand(&maps.a2, a2, p, kChunk) && encode_walk_operand(&maps.a3, a3, p, kChunk) &&
                     (!out.p || encode_walk_operand(&maps.out, out, p, 16));
    const bool dot = p.dot_src != nullptr;
    auto kernel = tma ? (dot ? la_walk_sm90_kernel<kReverse, true, true> : la_walk_sm90_kernel<kReverse, true, false>)
                      : (dot ? la_walk_sm90_kernel<kReverse, false, true> : la_walk_sm90_kernel<kReverse, false, false>);
    launch(kernel, what, p, WalkSmem::bytes, kWgThreads, maps);
  } else {
    launch(la_walk_kernel<D, kReverse>, what, p, smem_walk_bytes<D>(), kThreads);
  }
}

const float* f32_ptr(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }
float* f32_out(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

void check_cuda_args(const char* fn, std::initializer_list<std::pair<const Tensor*, const char*>> bf,
                     std::initializer_list<std::pair<const Tensor*, const char*>> f32,
                     const Tensor& q) {
  for (const auto& [t, what] : bf) {
    if (!t->defined()) continue;
    LASP_CHECK(t->is_cuda() && t->device() == q.device())
        << fn << ": " << what << " must be on " << q.device().str() << ", got " << t->str();
    LASP_CHECK(t->dtype() == DType::BF16) << fn << ": CUDA path takes bf16 " << what << ", got " << t->str();
    LASP_CHECK(reinterpret_cast<uintptr_t>(t->raw()) % 16 == 0 && t->strides()[1] % 8 == 0)
        << fn << ": " << what << " must be 16-byte aligned, its rows too (row stride " << t->strides()[1]
        << " elements)";
  }
  for (const auto& [t, what] : f32) {
    if (!t->defined()) continue;
    LASP_CHECK(t->is_cuda() && t->device() == q.device())
        << fn << ": " << what << " must be on " << q.device().str() << ", got " << t->str();
    LASP_CHECK(t->dtype() == DType::F32) << fn << ": CUDA path takes fp32 " << what << ", got " << t->str();
  }
}

// Common setup: sizes, segments, and the within-chunk cumulative log decays (written to `lc`).
LaParams make_params(const char* fn, const Tensor& q, const Decay& decay, Tensor& lc) {
  LaParams p{};
  p.B = static_cast<int>(q.dim(0));
  p.T = static_cast<int>(q.dim(1));
  p.H = static_cast<int>(q.dim(2));
  const int64_t D = q.dim(3);
  LASP_CHECK(D == 64 || D == 128) << fn << ": the CUDA kernel supports head dim 64 or 128, got " << q.str();
  LASP_CHECK(q.dim(1) < (int64_t{1} << 31) && static_cast<int64_t>(p.B) * p.H < 65536)
      << fn << ": sizes out of range for the CUDA kernel: " << q.str();
  p.nchunks = ceil_div(p.T, kChunk);
  // Segments: one wave of kBlocksPerSm blocks per SM, kSplit blocks per (segment, b, h).
  const int bh = p.B * p.H;
  int nseg = std::max(1, kBlocksPerSm * sm_count() / (bh * kSplit));
  nseg = std::min(nseg, std::max(1, p.nchunks));
  p.seg_chunks = std::max(1, ceil_div(p.nchunks, nseg));
  p.nseg = std::max(1, ceil_div(p.nchunks, p.seg_chunks));
  if (p.nchunks > 0) {
    lc = Tensor::empty({bh, p.nchunks, kChunk}, DType::F32, q.device());
    p.lc = lc.data<float>();
    const float* log_tok = decay.mode == DecayMode::DataDependent ? f32_ptr(decay.per_token) : nullptr;
    const float* log_head = decay.mode == DecayMode::Constant ? f32_ptr(decay.per_head) : nullptr;
    la_chunk_logcum_kernel<<<dim3(ceil_div(p.nchunks, kWarps), bh), kThreads, 0, cuda_stream()>>>(
        lc.data<float>(), log_tok, log_head, p.T, p.H, p.nchunks);
    CUDA_CHECK_LAUNCH("la_chunk_logcum_kernel");
  }
  return p;
}

// Segment states M_j and log g_j (from k, v), then the prefixes P_j in place and the final state.
template <int D>
void run_states(LaParams p, Operand k, Operand v, const Tensor& init,
                const Tensor& final_state, const Tensor& d_final, float* final_dot) {
  const int bh = p.B * p.H;
  if (p.nchunks > 0) {
    run_segment_state<D, false>(p, "la_segment_state_kernel", k, v, p.states);
  } else {
    CUDA_CHECK(cudaMemsetAsync(p.states, 0, sizeof(float) * bh * D * D, cuda_stream()));
    CUDA_CHECK(cudaMemsetAsync(p.logg, 0, sizeof(float) * bh, cuda_stream()));
  }
  la_combine_forward_kernel<<<dim3(D * D / 256, bh), 256, 0, cuda_stream()>>>(
      p.states, p.logg, f32_ptr(init), f32_out(final_state), f32_ptr(d_final), final_dot, p.nseg,
      D * D);
  CUDA_CHECK_LAUNCH("la_combine_forward_kernel");
}

template <int D>
void forward_impl(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Decay& decay, const Tensor& init, LinearAttentionSaved* saved) {
  Tensor lc;
  LaParams p = make_params("linear_attention_forward", q, decay, lc);
  const int bh = p.B * p.H;
  Tensor states = Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor logg = Tensor::empty({bh, p.nseg}, DType::F32, q.device());
  p.states = states.data<float>();
  p.logg = logg.data<float>();
  // The saved final state is the backward's own copy (the caller's final_state may change).
  Tensor saved_final = saved ? Tensor::empty({p.B, p.H, D, D}, DType::F32, q.device()) : Tensor();
  run_states<D>(p, operand_of(k), operand_of(v), init, saved ? saved_final : final_state, Tensor(), nullptr);
  if (saved && final_state.defined())
    CUDA_CHECK(cudaMemcpyAsync(final_state.raw(), saved_final.raw(), sizeof(float) * bh * D * D,
                               cudaMemcpyDeviceToDevice, cuda_stream()));
  if (o.defined() && p.nchunks > 0)
    run_walk<D, false>(p, "la_walk_kernel (o)", operand_of(q), operand_of(k), operand_of(v), operand_of(o),
                       p.states, false, Operand{}, 0.0f);
  if (saved) *saved = LinearAttentionSaved{states, logg, saved_final};
}

// Whether `saved` holds this call's segment states (made by a forward of the same shapes on the
// same device, hence the same segments); an object made for other shapes is a caller error.
bool saved_states_usable(const LinearAttentionSaved* saved, const LaParams& p, int D, const Tensor& q) {
  if (!saved || !saved->segment_states.defined()) return false;
  const Tensor &s = saved->segment_states, &g = saved->segment_log_decay, &f = saved->final_state;
  const int64_t bh = static_cast<int64_t>(p.B) * p.H;
  const bool ok = s.is_cuda() && s.device() == q.device() && s.dtype() == DType::F32 &&
                  s.shape() == Shape{bh, p.nseg, D, D} && g.defined() && g.dtype() == DType::F32 &&
                  g.shape() == Shape{bh, p.nseg} && f.defined() && f.dtype() == DType::F32 &&
                  f.shape() == Shape{p.B, p.H, D, D};
  LASP_CHECK(ok) << "linear_attention_backward: saved states " << s.str() << " do not belong to a forward of "
                 << q.str() << " on this device (expected [" << bh << ", " << p.nseg << ", " << D << ", " << D
                 << "])";
  return true;
}

template <int D>
void backward_impl(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dlog, Tensor& d_init, const Tensor& q,
                   const Tensor& k, const Tensor& v, const Decay& decay, const Tensor& init,
                   const Tensor& d_o_in, const Tensor& d_final, const LinearAttentionSaved* saved) {
  if (!dq.defined() && !dk.defined() && !dv.defined() && !dlog.defined() && !d_init.defined()) return;
  Tensor lc;
  LaParams p = make_params("linear_attention_backward", q, decay, lc);
  const int bh = p.B * p.H;
  Tensor d_o = d_o_in;
  if (!d_o.defined()) d_o = Tensor::zeros(q.shape(), DType::BF16, q.device());
  const Operand pq = operand_of(q), pk = operand_of(k), pv = operand_of(v), pdo = operand_of(d_o);
  p.dlog = f32_out(dlog);
  const bool reuse = saved_states_usable(saved, p, D, q);
  // The forward's segment states P_j and log decays: saved ones are only read.
  Tensor states = reuse ? saved->segment_states : Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor logg = reuse ? saved->segment_log_decay : Tensor::empty({bh, p.nseg}, DType::F32, q.device());
  Tensor dstates = Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor final_dot;
  p.states = states.data<float>();
  p.logg = logg.data<float>();
  if (p.dlog && d_final.defined()) final_dot = Tensor::zeros({bh}, DType::F32, q.device());

  if (!reuse) {
    run_states<D>(p, pk, pv, init, Tensor(), d_final, f32_out(final_dot));
  } else if (final_dot.defined()) {
    la_final_dot_kernel<<<dim3(D * D / 256, bh), 256, 0, cuda_stream()>>>(
        saved->final_state.data<float>(), d_final.data<float>(), final_dot.data<float>(), D * D);
    CUDA_CHECK_LAUNCH("la_final_dot_kernel");
  }
  if (p.nchunks > 0) {
    run_segment_state<D, true>(p, "la_segment_state_kernel (reverse)", pq, pdo, dstates.data<float>());
  } else {
    CUDA_CHECK(cudaMemsetAsync(dstates.data<float>(), 0, sizeof(float) * bh * D * D, cuda_stream()));
  }
  la_combine_backward_kernel<<<dim3(D * D / 256, bh), 256, 0, cuda_stream()>>>(
      dstates.data<float>(), p.logg, f32_ptr(d_final), f32_out(d_init), p.nseg, D * D);
  CUDA_CHECK_LAUNCH("la_combine_backward_kernel");
  if (p.nchunks == 0) return;
  if (p.dlog)
    CUDA_CHECK(cudaMemsetAsync(p.dlog, 0, sizeof(float) * static_cast<size_t>(p.B) * p.T * p.H,
                               cuda_stream()));
  if (dq.defined() || p.dlog)
    run_walk<D, false>(p, "la_walk_kernel (dq)", pdo, pv, pk, operand_of(dq), states.data<float>(),
                       true, pq, 1.0f);
  if (dv.defined())
    run_walk<D, true>(p, "la_walk_kernel (dv)", pk, pq, pdo, operand_of(dv), dstates.data<float>(),
                      false, Operand{}, 0.0f);
  if (dk.defined() || p.dlog)
    run_walk<D, true>(p, "la_walk_kernel (dk)", pv, pdo, pq, operand_of(dk), dstates.data<float>(),
                      true, pk, -1.0f);
  if (p.dlog) {
    const int ntiles = ceil_div(p.T, kScanTile);
    Tensor tile_sums = Tensor::empty({static_cast<int64_t>(bh) * ntiles}, DType::F64, q.device());
    la_dlog_tile_sums_kernel<<<dim3(ntiles, bh), kScanThreads, 0, cuda_stream()>>>(
        p.dlog, tile_sums.data<double>(), p.T, p.H, ntiles);
    CUDA_CHECK_LAUNCH("la_dlog_tile_sums_kernel");
    la_dlog_scan_apply_kernel<<<dim3(ntiles, bh), kScanThreads, 0, cuda_stream()>>>(
        p.dlog, tile_sums.data<double>(), f32_ptr(final_dot), p.T, p.H, ntiles);
    CUDA_CHECK_LAUNCH("la_dlog_scan_apply_kernel");
  }
}

}  // namespace

void linear_attention_forward_cuda(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Decay& decay, const Tensor& initial_state,
                                   int chunk, LinearAttentionSaved* saved) {
  const char* fn = "linear_attention_forward";
  // `chunk` is the CPU path's tile; the CUDA kernel's chunk is fixed (kChunk = 64). The result is
  // the same function either way.
  check_cuda_args(fn, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&o, "o"}},
                  {{&final_state, "final_state"}, {&initial_state, "initial_state"},
                   {&decay.per_head, "decay.per_head"}, {&decay.per_token, "decay.per_token"}},
                  q);
  if (q.dim(3) == 64) forward_impl<64>(o, final_state, q, k, v, decay, initial_state, saved);
  else forward_impl<128>(o, final_state, q, k, v, decay, initial_state, saved);
}

void linear_attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay,
                                    Tensor& d_initial_state, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Decay& decay, const Tensor& initial_state,
                                    const Tensor& d_o, const Tensor& d_final_state, int chunk,
                                    const LinearAttentionSaved* saved) {
  const char* fn = "linear_attention_backward";
  check_cuda_args(fn, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}},
                  {{&initial_state, "initial_state"}, {&d_final_state, "d_final_state"},
                   {&d_log_decay, "d_log_decay"}, {&d_initial_state, "d_initial_state"},
                   {&decay.per_head, "decay.per_head"}, {&decay.per_token, "decay.per_token"}},
                  q);
  // The dlog walks write dq (dk) and read q (k) at the same positions with one row stride.
  if (d_log_decay.defined()) {
    LASP_CHECK(!dq.defined() || dq.strides()[1] == q.strides()[1])
        << fn << ": with d_log_decay, dq must have q's row stride, got " << dq.str() << " and " << q.str();
    LASP_CHECK(!dk.defined() || dk.strides()[1] == k.strides()[1])
        << fn << ": with d_log_decay, dk must have k's row stride, got " << dk.str() << " and " << k.str();
  }
  if (q.dim(3) == 64)
    backward_impl<64>(dq, dk, dv, d_log_decay, d_initial_state, q, k, v, decay, initial_state, d_o,
                      d_final_state, saved);
  else
    backward_impl<128>(dq, dk, dv, d_log_decay, d_initial_state, q, k, v, decay, initial_state, d_o,
                       d_final_state, saved);
}

}  // namespace lasp
