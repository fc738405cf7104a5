// CUDA linear attention: tiled forward and backward on tensor cores (WMMA bf16 -> fp32).
//
// Math: DESIGN.md "Linear attention math". Per (batch b, head h) and chunk c of C = 64 rows with
// within-chunk cumulative log decays L[r] = sum_{i<=r} log a_i (rows past T count as log a = 0):
//   mask  M[r,s] = exp(L[r] - L[s]) for s <= r, else 0      (every factor <= 1, never b_r / b_s)
//   b[r]  = exp(L[r]),  e[r] = exp(L[C-1] - L[r]),  bC = exp(L[C-1])
//   O_c   = ((Q K^T) o M) V + diag(b) Q S_{c-1}
//   S_c   = bC S_{c-1} + (diag(e) K)^T V
//
// Parallelism (LASP-2 inside one GPU): the chunks of each (b, h) are split into `nseg` segments
// of `seg_chunks` chunks, one thread block per (segment, b, h), so that B*H*nseg blocks fill the
// chip even at B*H = 16. The forward runs three kernels:
//   1. la_state_kernel: per segment, the state M_j its chunks build from zero, and its log total
//      decay log g_j (reads k, v).
//   2. la_combine_forward_kernel: per (b, h), prefix P_0 = S_init, P_{j+1} = g_j P_j + M_j
//      (elementwise over D x D); P_nseg is the final state.
//   3. la_output_kernel: per segment, walk the chunks from S = P_j, computing O_c (reads q, k, v,
//      writes o).
// The state S (fp32) lives in registers as WMMA accumulator fragments (each of the 8 warps owns
// (D/16)^2 / 8 tiles of 16 x 16); a bf16 copy in shared memory feeds the Q S products.
//
// The backward (gradient of <dO, O> + <dS_final, S_final>) mirrors it:
//   la_state_kernel + combine           -> P_j (forward states at segment starts), g_j
//   la_dstate_kernel                    -> per segment, dM_j = sum over its chunks of
//                                          (decay to the segment start) (diag(b) Q)^T dO
//   la_combine_backward_kernel          -> E_j = dS at the end of segment j (suffix combine from
//                                          dS_final), d_initial_state = g_0 E_0 + dM_0
//   la_dq_kernel (forward walk from P_j)  dQ = ((dO V^T) o M) K + diag(b) dO S_{c-1}^T
//   la_dkdv_kernel (reverse walk from E_j) with dS = gradient of S_c:
//       dV = ((Q K^T) o M)^T dO + diag(e) K dS,   dK = ((dO V^T) o M)^T Q + diag(e) V dS^T,
//       dS_{c-1} = bC dS + (diag(b) Q)^T dO
//   Data-dependent decays: with global cumulative log decays Lambda_t,
//       dLambda_t = q_t . dq_t - k_t . dk_t  (+ <dS_final, S_final> at t = T-1),
//       d log a_t = sum_{r >= t} dLambda_r   (la_dlog_scan_kernel, in float64).
// Per-segment states cost B*H*nseg*D*D*4 bytes (16 MiB at B*H = 16, D = 128), independent of T;
// storing per-chunk states instead would cost D/C = 2 times the size of q in fp32: recomputing
// them by walking each segment is cheaper than writing and re-reading them.
//
// Stages of one chunk step are separated by __syncthreads; every product is a block-level
// WMMA GEMM between shared-memory tiles (row stride padded by 16 bytes against bank conflicts)
// into an fp32 shared-memory tile or the register-resident state.
#include <cuda_bf16.h>
#include <mma.h>

#include <type_traits>

#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/linear_attention.h"

namespace lasp {
namespace {

namespace wm = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using RowMajor = wm::row_major;
using ColMajor = wm::col_major;

constexpr int kChunk = 64;  // C: rows per chunk
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

struct LaParams {
  const bf16 *q, *k, *v, *dout;
  bf16 *o, *dq, *dk, *dv;
  const float* log_tok;   // [B, T, H] log a per token, or null
  const float* log_head;  // [H] log a per head, or null
  float* states;          // [B*H, nseg, D, D]: segment-local states M_j, then prefixes P_j
  float* dstates;         // [B*H, nseg, D, D]: dM_j, then E_j
  float* logg;            // [B*H, nseg]: log total decay per segment
  float* dlog;            // [B, T, H] d log a, or null
  int B, T, H, nseg, seg_chunks, nchunks;
};

// Shared-memory tile strides (elements).
template <int D>
struct Tiles {
  static constexpr int ldx = D + 8;        // bf16 [C, D] tiles (q, k, v, dO)
  static constexpr int lds = D + 8;        // bf16 [D, D] state copy
  static constexpr int ldpf = kChunk + 4;  // fp32 [C, C]
  static constexpr int ldpb = kChunk + 8;  // bf16 [C, C]
  static constexpr int ldo = D + 4;        // fp32 [C, D]
  static constexpr int x_bytes = kChunk * ldx * 2;
  static constexpr int s_bytes = D * lds * 2;
  static constexpr int pf_bytes = kChunk * ldpf * 4;
  static constexpr int pb_bytes = kChunk * ldpb * 2;
  static constexpr int o_bytes = kChunk * ldo * 4;
  static constexpr int scratch_bytes = kWarps * 256 * 4;
  static constexpr int decay_bytes = (3 * kChunk + 32) * 4;
  static constexpr int state_frags = (D / 16) * (D / 16) / kWarps;
  static_assert(state_frags * kWarps == (D / 16) * (D / 16), "state tiles must split over warps");
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

using AccFrag = wm::fragment<wm::accumulator, 16, 16, 16, float>;

template <typename Layout>
__device__ const bf16* tile_a(const bf16* a, int ld, int i, int kk) {
  if constexpr (std::is_same<Layout, RowMajor>::value) return a + i * 16 * ld + kk * 16;
  else return a + kk * 16 * ld + i * 16;
}
template <typename Layout>
__device__ const bf16* tile_b(const bf16* b, int ld, int kk, int j) {
  if constexpr (std::is_same<Layout, RowMajor>::value) return b + kk * 16 * ld + j * 16;
  else return b + j * 16 * ld + kk * 16;
}

// c[M, N] (fp32 shared, row-major) = (accumulate ? c : 0) + A[M, K] B[K, N].
// LA / LB say how A and B are stored: RowMajor (X[i][j] at x[i*ld + j]) or ColMajor
// (X[i][j] at x[j*ld + i], i.e. the transpose of a row-major tile).
template <int M, int N, int K, typename LA, typename LB>
__device__ void block_gemm(float* c, int ldc, const bf16* a, int lda, const bf16* b, int ldb,
                           bool accumulate) {
  constexpr int TN = N / 16, tiles = (M / 16) * TN;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < tiles; t += kWarps) {
    const int i = t / TN, j = t % TN;
    AccFrag acc;
    if (accumulate) wm::load_matrix_sync(acc, c + i * 16 * ldc + j * 16, ldc, wm::mem_row_major);
    else wm::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      wm::fragment<wm::matrix_a, 16, 16, 16, bf16, LA> fa;
      wm::fragment<wm::matrix_b, 16, 16, 16, bf16, LB> fb;
      wm::load_matrix_sync(fa, tile_a<LA>(a, lda, i, kk), lda);
      wm::load_matrix_sync(fb, tile_b<LB>(b, ldb, kk, j), ldb);
      wm::mma_sync(acc, fa, fb, acc);
    }
    wm::store_matrix_sync(c + i * 16 * ldc + j * 16, acc, ldc, wm::mem_row_major);
  }
}

// The register-resident D x D state: warp w owns tiles t = w + n * kWarps (row-major tile order).
template <int D>
struct StateRegs {
  static constexpr int TN = D / 16, n = Tiles<D>::state_frags;
  AccFrag f[n];

  __device__ static int tile(int idx) { return threadIdx.x / 32 + idx * kWarps; }

  __device__ void load(const float* g) {  // fp32 [D, D] row-major in global memory
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int t = tile(i);
      wm::load_matrix_sync(f[i], g + (t / TN) * 16 * D + (t % TN) * 16, D, wm::mem_row_major);
    }
  }
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < n; ++i) wm::fill_fragment(f[i], 0.0f);
  }
  __device__ void store(float* g) const {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int t = tile(i);
      wm::store_matrix_sync(g + (t / TN) * 16 * D + (t % TN) * 16, f[i], D, wm::mem_row_major);
    }
  }
  // S = decay * S + X^T Y with X, Y bf16 [C, D] row-major tiles (X^T read column-major).
  __device__ void update(float decay, const bf16* x, const bf16* y, int ld) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int t = tile(i), ti = t / TN, tj = t % TN;
#pragma unroll
      for (int e = 0; e < f[i].num_elements; ++e) f[i].x[e] *= decay;
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        wm::fragment<wm::matrix_a, 16, 16, 16, bf16, ColMajor> fa;
        wm::fragment<wm::matrix_b, 16, 16, 16, bf16, RowMajor> fb;
        wm::load_matrix_sync(fa, x + kk * 16 * ld + ti * 16, ld);
        wm::load_matrix_sync(fb, y + kk * 16 * ld + tj * 16, ld);
        wm::mma_sync(f[i], fa, fb, f[i]);
      }
    }
  }
  // Writes the bf16 copy used as a GEMM operand (through this warp's 16 x 16 fp32 scratch).
  __device__ void to_bf16(bf16* s, int lds, float* scratch_all) const {
    const int lane = threadIdx.x % 32;
    float* scratch = scratch_all + (threadIdx.x / 32) * 256;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int t = tile(i), ti = t / TN, tj = t % TN;
      wm::store_matrix_sync(scratch, f[i], 16, wm::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32)
        s[(ti * 16 + e / 16) * lds + tj * 16 + e % 16] = __float2bfloat16(scratch[e]);
      __syncwarp();
    }
  }
};

// Rows [t0, t0 + rows) of one head of a [B, T, H, D] bf16 tensor into a [C, ld] tile; rows past
// `rows` are zero. 16-byte loads.
template <int D>
__device__ void load_rows(bf16* s, int ld, const bf16* g, int64_t row_stride, int rows) {
  constexpr int vpr = D / 8;
  for (int i = threadIdx.x; i < kChunk * vpr; i += kThreads) {
    const int r = i / vpr, c8 = i % vpr;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows) val = __ldg(reinterpret_cast<const uint4*>(g + r * row_stride + c8 * 8));
    *reinterpret_cast<uint4*>(s + r * ld + c8 * 8) = val;
  }
}

// fp32 [C, ld] tile rows -> bf16 global rows (the first `rows`).
template <int D>
__device__ void store_rows(bf16* g, int64_t row_stride, const float* s, int ld, int rows) {
  constexpr int vpr = D / 8;
  for (int i = threadIdx.x; i < rows * vpr; i += kThreads) {
    const int r = i / vpr, c8 = i % vpr;
    const float* src = s + r * ld + c8 * 8;
    __align__(16) bf16 out[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = __float2bfloat16(src[e]);
    *reinterpret_cast<uint4*>(g + r * row_stride + c8 * 8) = *reinterpret_cast<const uint4*>(out);
  }
}

// Scales the rows of a bf16 [C, ld] tile in place: x[r][:] *= f[r].
template <int D>
__device__ void scale_rows_bf16(bf16* x, int ld, const float* f) {
  for (int i = threadIdx.x; i < kChunk * D; i += kThreads) {
    const int r = i / D, c = i % D;
    x[r * ld + c] = __float2bfloat16(__bfloat162float(x[r * ld + c]) * f[r]);
  }
}
template <int D>
__device__ void scale_rows_f32(float* x, int ld, const float* f) {
  for (int i = threadIdx.x; i < kChunk * D; i += kThreads) {
    const int r = i / D, c = i % D;
    x[r * ld + c] *= f[r];
  }
}

// Decay mask applied to an fp32 [C, C] product, written as bf16.
//   transposed = false: out[r][s] = p[r][s] * exp(L[r] - L[s]) for s <= r, else 0
//   transposed = true:  out[s][r] = p[s][r] * exp(L[r] - L[s]) for r >= s, else 0
template <bool transposed>
__device__ void mask_to_bf16(bf16* out, const float* p, const float* L) {
  for (int i = threadIdx.x; i < kChunk * kChunk; i += kThreads) {
    const int row = i / kChunk, col = i % kChunk;
    const int r = transposed ? col : row, s = transposed ? row : col;
    const float val = s <= r ? p[row * Tiles<64>::ldpf + col] * __expf(L[r] - L[s]) : 0.0f;
    out[row * Tiles<64>::ldpb + col] = __float2bfloat16(val);
  }
}

__device__ float log_decay_at(const LaParams& p, int b, int t, int h) {
  if (p.log_tok) return p.log_tok[(static_cast<int64_t>(b) * p.T + t) * p.H + h];
  if (p.log_head) return p.log_head[h];
  return 0.0f;
}

// Warp 0 fills L[r] (inclusive cumsum), B[r] = exp(L[r]), E[r] = exp(L[C-1] - L[r]) and
// L[C] = L[C-1] (the chunk's log total decay) for the chunk's rows (log a = 0 past `rows`).
__device__ void chunk_decays(float* L, float* Bf, float* Ef, const LaParams& p, int b, int h, int t0,
                             int rows) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x, r0 = 2 * lane, r1 = r0 + 1;
  const float x0 = r0 < rows ? log_decay_at(p, b, t0 + r0, h) : 0.0f;
  const float x1 = r1 < rows ? log_decay_at(p, b, t0 + r1, h) : 0.0f;
  const float pair = x0 + x1;
  float incl = pair;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  const float l0 = incl - pair + x0, l1 = incl;
  const float last = __shfl_sync(0xffffffffu, incl, 31);
  L[r0] = l0;
  L[r1] = l1;
  Bf[r0] = __expf(l0);
  Bf[r1] = __expf(l1);
  Ef[r0] = __expf(last - l0);
  Ef[r1] = __expf(last - l1);
  if (lane == 0) L[kChunk] = last;
}

struct ChunkRange {
  int begin, end;
};
__device__ ChunkRange segment_chunks(const LaParams& p) {
  const int begin = blockIdx.x * p.seg_chunks;
  return {begin, min(begin + p.seg_chunks, p.nchunks)};
}

// ---------------------------------------------------------------------------------------------
// 1. Segment-local states M_j (from zero) and log total decays.
// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads) la_state_kernel(LaParams p) {
  using TL = Tiles<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCarver sc{smem};
  bf16* sK = sc.take<bf16>(TL::x_bytes);
  bf16* sV = sc.take<bf16>(TL::x_bytes);
  float* sL = sc.take<float>(TL::decay_bytes);
  float *sB = sL + kChunk + 32, *sE = sB + kChunk;

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t rs = static_cast<int64_t>(p.H) * D;
  const ChunkRange cr = segment_chunks(p);
  StateRegs<D> S;
  S.zero();
  float logg = 0.0f;
  for (int c = cr.begin; c < cr.end; ++c) {
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t base = (static_cast<int64_t>(b) * p.T + t0) * rs + static_cast<int64_t>(h) * D;
    load_rows<D>(sK, TL::ldx, p.k + base, rs, rows);
    load_rows<D>(sV, TL::ldx, p.v + base, rs, rows);
    chunk_decays(sL, sB, sE, p, b, h, t0, rows);
    __syncthreads();
    scale_rows_bf16<D>(sK, TL::ldx, sE);  // diag(e) K
    __syncthreads();
    S.update(__expf(sL[kChunk]), sK, sV, TL::ldx);
    logg += sL[kChunk];
    __syncthreads();
  }
  const int64_t sidx = static_cast<int64_t>(bh) * p.nseg + blockIdx.x;
  S.store(p.states + sidx * D * D);
  if (threadIdx.x == 0) p.logg[sidx] = logg;
}

// ---------------------------------------------------------------------------------------------
// Backward 1. Segment-local dM_j: reverse walk from zero, dM = bC dM + (diag(b) Q)^T dO.
// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads) la_dstate_kernel(LaParams p) {
  using TL = Tiles<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCarver sc{smem};
  bf16* sQ = sc.take<bf16>(TL::x_bytes);
  bf16* sDO = sc.take<bf16>(TL::x_bytes);
  float* sL = sc.take<float>(TL::decay_bytes);
  float *sB = sL + kChunk + 32, *sE = sB + kChunk;

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t rs = static_cast<int64_t>(p.H) * D;
  const ChunkRange cr = segment_chunks(p);
  StateRegs<D> dS;
  dS.zero();
  for (int c = cr.end - 1; c >= cr.begin; --c) {
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t base = (static_cast<int64_t>(b) * p.T + t0) * rs + static_cast<int64_t>(h) * D;
    load_rows<D>(sQ, TL::ldx, p.q + base, rs, rows);
    load_rows<D>(sDO, TL::ldx, p.dout + base, rs, rows);
    chunk_decays(sL, sB, sE, p, b, h, t0, rows);
    __syncthreads();
    scale_rows_bf16<D>(sQ, TL::ldx, sB);  // diag(b) Q
    __syncthreads();
    dS.update(__expf(sL[kChunk]), sQ, sDO, TL::ldx);
    __syncthreads();
  }
  dS.store(p.dstates + (static_cast<int64_t>(bh) * p.nseg + blockIdx.x) * D * D);
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
      pv = __expf(logg[bh * nseg + j]) * pv + mj;
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
    ev = __expf(logg[bh * nseg + j]) * ev + mj;
  }
  if (d_init) d_init[static_cast<int64_t>(bh) * dd + e] = ev;
}

// ---------------------------------------------------------------------------------------------
// 3. Forward output: walk the segment's chunks from S = P_j.
// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads, 1) la_output_kernel(LaParams p) {
  using TL = Tiles<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCarver sc{smem};
  bf16* sQ = sc.take<bf16>(TL::x_bytes);
  bf16* sK = sc.take<bf16>(TL::x_bytes);
  bf16* sV = sc.take<bf16>(TL::x_bytes);
  bf16* sS = sc.take<bf16>(TL::s_bytes);
  float* sPf = sc.take<float>(TL::pf_bytes);
  bf16* sPb = sc.take<bf16>(TL::pb_bytes);
  float* sO = sc.take<float>(TL::o_bytes);
  float* sScratch = sc.take<float>(TL::scratch_bytes);
  float* sL = sc.take<float>(TL::decay_bytes);
  float *sB = sL + kChunk + 32, *sE = sB + kChunk;

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t rs = static_cast<int64_t>(p.H) * D;
  const ChunkRange cr = segment_chunks(p);
  StateRegs<D> S;
  S.load(p.states + (static_cast<int64_t>(bh) * p.nseg + blockIdx.x) * D * D);
  S.to_bf16(sS, TL::lds, sScratch);
  for (int c = cr.begin; c < cr.end; ++c) {
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t base = (static_cast<int64_t>(b) * p.T + t0) * rs + static_cast<int64_t>(h) * D;
    // load
    load_rows<D>(sQ, TL::ldx, p.q + base, rs, rows);
    load_rows<D>(sK, TL::ldx, p.k + base, rs, rows);
    load_rows<D>(sV, TL::ldx, p.v + base, rs, rows);
    chunk_decays(sL, sB, sE, p, b, h, t0, rows);
    __syncthreads();
    // mma: P = Q K^T, O = Q S
    block_gemm<kChunk, kChunk, D, RowMajor, ColMajor>(sPf, TL::ldpf, sQ, TL::ldx, sK, TL::ldx, false);
    block_gemm<kChunk, D, D, RowMajor, RowMajor>(sO, TL::ldo, sQ, TL::ldx, sS, TL::lds, false);
    __syncthreads();
    // decay: P o M, diag(b) Q S, diag(e) K
    mask_to_bf16<false>(sPb, sPf, sL);
    scale_rows_f32<D>(sO, TL::ldo, sB);
    scale_rows_bf16<D>(sK, TL::ldx, sE);
    __syncthreads();
    // mma: O += (P o M) V; state update S = bC S + (diag(e) K)^T V
    block_gemm<kChunk, D, kChunk, RowMajor, RowMajor>(sO, TL::ldo, sPb, TL::ldpb, sV, TL::ldx, true);
    if (c + 1 < cr.end) {
      S.update(__expf(sL[kChunk]), sK, sV, TL::ldx);
      S.to_bf16(sS, TL::lds, sScratch);
    }
    __syncthreads();
    // store
    store_rows<D>(p.o + base, rs, sO, TL::ldo, rows);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 2. dQ: forward walk from S = P_j. Also dLambda_t = q_t . dq_t into dlog.
// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads, 1) la_dq_kernel(LaParams p) {
  using TL = Tiles<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCarver sc{smem};
  bf16* sQ = sc.take<bf16>(TL::x_bytes);
  bf16* sK = sc.take<bf16>(TL::x_bytes);
  bf16* sV = sc.take<bf16>(TL::x_bytes);
  bf16* sDO = sc.take<bf16>(TL::x_bytes);
  bf16* sS = sc.take<bf16>(TL::s_bytes);
  float* sPf = sc.take<float>(TL::pf_bytes);
  bf16* sPb = sc.take<bf16>(TL::pb_bytes);
  float* sO = sc.take<float>(TL::o_bytes);
  float* sScratch = sc.take<float>(TL::scratch_bytes);
  float* sL = sc.take<float>(TL::decay_bytes);
  float *sB = sL + kChunk + 32, *sE = sB + kChunk;

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rs = static_cast<int64_t>(p.H) * D;
  const ChunkRange cr = segment_chunks(p);
  StateRegs<D> S;
  S.load(p.states + (static_cast<int64_t>(bh) * p.nseg + blockIdx.x) * D * D);
  S.to_bf16(sS, TL::lds, sScratch);
  for (int c = cr.begin; c < cr.end; ++c) {
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t base = (static_cast<int64_t>(b) * p.T + t0) * rs + static_cast<int64_t>(h) * D;
    load_rows<D>(sDO, TL::ldx, p.dout + base, rs, rows);
    load_rows<D>(sV, TL::ldx, p.v + base, rs, rows);
    load_rows<D>(sK, TL::ldx, p.k + base, rs, rows);
    if (p.dlog) load_rows<D>(sQ, TL::ldx, p.q + base, rs, rows);
    chunk_decays(sL, sB, sE, p, b, h, t0, rows);
    __syncthreads();
    // dP = dO V^T; dQ = dO S^T
    block_gemm<kChunk, kChunk, D, RowMajor, ColMajor>(sPf, TL::ldpf, sDO, TL::ldx, sV, TL::ldx, false);
    block_gemm<kChunk, D, D, RowMajor, ColMajor>(sO, TL::ldo, sDO, TL::ldx, sS, TL::lds, false);
    __syncthreads();
    mask_to_bf16<false>(sPb, sPf, sL);
    scale_rows_f32<D>(sO, TL::ldo, sB);
    __syncthreads();
    // dQ += (dP o M) K
    block_gemm<kChunk, D, kChunk, RowMajor, RowMajor>(sO, TL::ldo, sPb, TL::ldpb, sK, TL::ldx, true);
    __syncthreads();
    if (p.dq) store_rows<D>(p.dq + base, rs, sO, TL::ldo, rows);
    if (p.dlog) {
      for (int r = warp; r < rows; r += kWarps) {
        float dot = 0.0f;
        for (int d = lane; d < D; d += 32) dot += __bfloat162float(sQ[r * TL::ldx + d]) * sO[r * TL::ldo + d];
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (lane == 0) p.dlog[(static_cast<int64_t>(b) * p.T + t0 + r) * p.H + h] = dot;
      }
    }
    if (c + 1 < cr.end) {
      scale_rows_bf16<D>(sK, TL::ldx, sE);
      __syncthreads();
      S.update(__expf(sL[kChunk]), sK, sV, TL::ldx);
      S.to_bf16(sS, TL::lds, sScratch);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 3. dK, dV: reverse walk from dS = E_j. Also dLambda_t -= k_t . dk_t in dlog.
// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kThreads, 1) la_dkdv_kernel(LaParams p) {
  using TL = Tiles<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  SmemCarver sc{smem};
  bf16* sQ = sc.take<bf16>(TL::x_bytes);
  bf16* sK = sc.take<bf16>(TL::x_bytes);
  bf16* sV = sc.take<bf16>(TL::x_bytes);
  bf16* sDO = sc.take<bf16>(TL::x_bytes);
  bf16* sS = sc.take<bf16>(TL::s_bytes);
  float* sPf = sc.take<float>(TL::pf_bytes);
  bf16* sPb = sc.take<bf16>(TL::pb_bytes);
  float* sO = sc.take<float>(TL::o_bytes);
  float* sScratch = sc.take<float>(TL::scratch_bytes);
  float* sL = sc.take<float>(TL::decay_bytes);
  float *sB = sL + kChunk + 32, *sE = sB + kChunk;

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rs = static_cast<int64_t>(p.H) * D;
  const ChunkRange cr = segment_chunks(p);
  StateRegs<D> dS;
  dS.load(p.dstates + (static_cast<int64_t>(bh) * p.nseg + blockIdx.x) * D * D);
  dS.to_bf16(sS, TL::lds, sScratch);
  for (int c = cr.end - 1; c >= cr.begin; --c) {
    const int t0 = c * kChunk, rows = min(kChunk, p.T - t0);
    const int64_t base = (static_cast<int64_t>(b) * p.T + t0) * rs + static_cast<int64_t>(h) * D;
    load_rows<D>(sQ, TL::ldx, p.q + base, rs, rows);
    load_rows<D>(sK, TL::ldx, p.k + base, rs, rows);
    load_rows<D>(sV, TL::ldx, p.v + base, rs, rows);
    load_rows<D>(sDO, TL::ldx, p.dout + base, rs, rows);
    chunk_decays(sL, sB, sE, p, b, h, t0, rows);
    __syncthreads();
    // P^T = K Q^T;  dV = K dS
    block_gemm<kChunk, kChunk, D, RowMajor, ColMajor>(sPf, TL::ldpf, sK, TL::ldx, sQ, TL::ldx, false);
    block_gemm<kChunk, D, D, RowMajor, RowMajor>(sO, TL::ldo, sK, TL::ldx, sS, TL::lds, false);
    __syncthreads();
    mask_to_bf16<true>(sPb, sPf, sL);
    scale_rows_f32<D>(sO, TL::ldo, sE);
    __syncthreads();
    // dV += (P o M)^T dO;  dP^T = V dO^T
    block_gemm<kChunk, D, kChunk, RowMajor, RowMajor>(sO, TL::ldo, sPb, TL::ldpb, sDO, TL::ldx, true);
    block_gemm<kChunk, kChunk, D, RowMajor, ColMajor>(sPf, TL::ldpf, sV, TL::ldx, sDO, TL::ldx, false);
    __syncthreads();
    if (p.dv) store_rows<D>(p.dv + base, rs, sO, TL::ldo, rows);
    mask_to_bf16<true>(sPb, sPf, sL);
    scale_rows_bf16<D>(sV, TL::ldx, sE);  // diag(e) V
    __syncthreads();
    // dK = diag(e) V dS^T + (dP o M)^T Q
    block_gemm<kChunk, D, D, RowMajor, ColMajor>(sO, TL::ldo, sV, TL::ldx, sS, TL::lds, false);
    __syncthreads();
    block_gemm<kChunk, D, kChunk, RowMajor, RowMajor>(sO, TL::ldo, sPb, TL::ldpb, sQ, TL::ldx, true);
    __syncthreads();
    if (p.dk) store_rows<D>(p.dk + base, rs, sO, TL::ldo, rows);
    if (p.dlog) {
      for (int r = warp; r < rows; r += kWarps) {
        float dot = 0.0f;
        for (int d = lane; d < D; d += 32) dot += __bfloat162float(sK[r * TL::ldx + d]) * sO[r * TL::ldo + d];
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (lane == 0) p.dlog[(static_cast<int64_t>(b) * p.T + t0 + r) * p.H + h] -= dot;
      }
    }
    if (c > cr.begin) {
      scale_rows_bf16<D>(sQ, TL::ldx, sB);  // diag(b) Q
      __syncthreads();
      dS.update(__expf(sL[kChunk]), sQ, sDO, TL::ldx);
      dS.to_bf16(sS, TL::lds, sScratch);
    }
    __syncthreads();
  }
}

// d log a_t = sum_{r >= t} dLambda_r + final_dot (the <dS_final, S_final> term sits at T-1),
// per (b, h): one block, each thread a contiguous run of t, float64 sums.
__global__ void la_dlog_scan_kernel(float* dlog, const float* final_dot, int T, int H) {
  __shared__ double partial[256];
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int per = (T + blockDim.x - 1) / blockDim.x;
  const int t_begin = threadIdx.x * per, t_end = min(T, t_begin + per);
  auto at = [&](int t) -> float& { return dlog[(static_cast<int64_t>(b) * T + t) * H + h]; };
  double sum = 0.0;
  for (int t = t_begin; t < t_end; ++t) sum += at(t);
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive suffix sums over threads
    double run = final_dot ? final_dot[bh] : 0.0;
    for (int i = blockDim.x - 1; i >= 0; --i) {
      const double x = partial[i];
      partial[i] = run;
      run += x;
    }
  }
  __syncthreads();
  double run = partial[threadIdx.x];
  for (int t = t_end - 1; t >= t_begin; --t) {
    run += at(t);
    at(t) = static_cast<float>(run);
  }
}

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
int smem_walk_bytes(int x_tiles) {
  using TL = Tiles<D>;
  return x_tiles * carved(TL::x_bytes) + carved(TL::s_bytes) + carved(TL::pf_bytes) +
         carved(TL::pb_bytes) + carved(TL::o_bytes) + carved(TL::scratch_bytes) +
         carved(TL::decay_bytes);
}
template <int D>
int smem_state_bytes() {
  return 2 * carved(Tiles<D>::x_bytes) + carved(Tiles<D>::decay_bytes);
}

template <typename Kernel>
void launch(Kernel kernel, const char* what, dim3 grid, int smem, const LaParams& p) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, cuda_stream()>>>(p);
  CUDA_CHECK_LAUNCH(what);
}

const bf16* bf16_ptr(const Tensor& t) { return t.defined() ? static_cast<const bf16*>(t.raw()) : nullptr; }
bf16* bf16_out(const Tensor& t) { return t.defined() ? static_cast<bf16*>(t.raw()) : nullptr; }
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
    LASP_CHECK(reinterpret_cast<uintptr_t>(t->raw()) % 16 == 0)
        << fn << ": " << what << " must be 16-byte aligned";
  }
  for (const auto& [t, what] : f32) {
    if (!t->defined()) continue;
    LASP_CHECK(t->is_cuda() && t->device() == q.device())
        << fn << ": " << what << " must be on " << q.device().str() << ", got " << t->str();
    LASP_CHECK(t->dtype() == DType::F32) << fn << ": CUDA path takes fp32 " << what << ", got " << t->str();
  }
}

// Common setup: sizes, segments, decay pointers.
LaParams make_params(const char* fn, const Tensor& q, const Decay& decay) {
  LaParams p{};
  p.B = static_cast<int>(q.dim(0));
  p.T = static_cast<int>(q.dim(1));
  p.H = static_cast<int>(q.dim(2));
  const int64_t D = q.dim(3);
  LASP_CHECK(D == 64 || D == 128) << fn << ": the CUDA kernel supports head dim 64 or 128, got " << q.str();
  LASP_CHECK(q.dim(1) < (int64_t{1} << 31) && static_cast<int64_t>(p.B) * p.H < 65536)
      << fn << ": sizes out of range for the CUDA kernel: " << q.str();
  p.nchunks = ceil_div(p.T, kChunk);
  // Segments: fill the SMs in one wave (the walk kernels run one block per SM).
  const int bh = p.B * p.H;
  int nseg = std::max(1, sm_count() / bh);
  nseg = std::min(nseg, std::max(1, p.nchunks));
  p.seg_chunks = std::max(1, ceil_div(p.nchunks, nseg));
  p.nseg = std::max(1, ceil_div(p.nchunks, p.seg_chunks));
  if (decay.mode == DecayMode::Constant) p.log_head = f32_ptr(decay.per_head);
  if (decay.mode == DecayMode::DataDependent) p.log_tok = f32_ptr(decay.per_token);
  return p;
}

template <int D>
void run_states(LaParams& p, const Tensor& init, const Tensor& final_state, const Tensor& d_final,
                float* final_dot) {
  const int bh = p.B * p.H;
  if (p.nchunks > 0) {
    launch(la_state_kernel<D>, "la_state_kernel", dim3(p.nseg, bh), smem_state_bytes<D>(), p);
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
                  const Decay& decay, const Tensor& init) {
  LaParams p = make_params("linear_attention_forward", q, decay);
  p.q = bf16_ptr(q);
  p.k = bf16_ptr(k);
  p.v = bf16_ptr(v);
  p.o = bf16_out(o);
  const int bh = p.B * p.H;
  Tensor states = Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor logg = Tensor::empty({bh, p.nseg}, DType::F32, q.device());
  p.states = states.data<float>();
  p.logg = logg.data<float>();
  run_states<D>(p, init, final_state, Tensor(), nullptr);
  if (o.defined() && p.nchunks > 0)
    launch(la_output_kernel<D>, "la_output_kernel", dim3(p.nseg, bh), smem_walk_bytes<D>(3), p);
}

template <int D>
void backward_impl(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dlog, Tensor& d_init, const Tensor& q,
                   const Tensor& k, const Tensor& v, const Decay& decay, const Tensor& init,
                   const Tensor& d_o_in, const Tensor& d_final) {
  if (!dq.defined() && !dk.defined() && !dv.defined() && !dlog.defined() && !d_init.defined()) return;
  LaParams p = make_params("linear_attention_backward", q, decay);
  const int bh = p.B * p.H;
  Tensor d_o = d_o_in;
  if (!d_o.defined()) d_o = Tensor::zeros(q.shape(), DType::BF16, q.device());
  p.q = bf16_ptr(q);
  p.k = bf16_ptr(k);
  p.v = bf16_ptr(v);
  p.dout = bf16_ptr(d_o);
  p.dq = bf16_out(dq);
  p.dk = bf16_out(dk);
  p.dv = bf16_out(dv);
  p.dlog = f32_out(dlog);
  Tensor states = Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor dstates = Tensor::empty({bh, p.nseg, D, D}, DType::F32, q.device());
  Tensor logg = Tensor::empty({bh, p.nseg}, DType::F32, q.device());
  Tensor final_dot;
  p.states = states.data<float>();
  p.dstates = dstates.data<float>();
  p.logg = logg.data<float>();
  if (p.dlog && d_final.defined()) final_dot = Tensor::zeros({bh}, DType::F32, q.device());

  run_states<D>(p, init, Tensor(), d_final, f32_out(final_dot));
  if (p.nchunks > 0) {
    launch(la_dstate_kernel<D>, "la_dstate_kernel", dim3(p.nseg, bh), smem_state_bytes<D>(), p);
  } else {
    CUDA_CHECK(cudaMemsetAsync(p.dstates, 0, sizeof(float) * bh * D * D, cuda_stream()));
  }
  la_combine_backward_kernel<<<dim3(D * D / 256, bh), 256, 0, cuda_stream()>>>(
      p.dstates, p.logg, f32_ptr(d_final), f32_out(d_init), p.nseg, D * D);
  CUDA_CHECK_LAUNCH("la_combine_backward_kernel");
  if (p.nchunks == 0) return;
  if (p.dq || p.dlog)
    launch(la_dq_kernel<D>, "la_dq_kernel", dim3(p.nseg, bh), smem_walk_bytes<D>(4), p);
  if (p.dk || p.dv || p.dlog)
    launch(la_dkdv_kernel<D>, "la_dkdv_kernel", dim3(p.nseg, bh), smem_walk_bytes<D>(4), p);
  if (p.dlog) {
    la_dlog_scan_kernel<<<bh, 256, 0, cuda_stream()>>>(p.dlog, f32_ptr(final_dot), p.T, p.H);
    CUDA_CHECK_LAUNCH("la_dlog_scan_kernel");
  }
}

}  // namespace

void linear_attention_forward_cuda(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Decay& decay, const Tensor& initial_state,
                                   int chunk) {
  const char* fn = "linear_attention_forward";
  // `chunk` is the CPU path's tile; the CUDA kernel's chunk is fixed (kChunk = 64). The result is
  // the same function either way.
  check_cuda_args(fn, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&o, "o"}},
                  {{&final_state, "final_state"}, {&initial_state, "initial_state"},
                   {&decay.per_head, "decay.per_head"}, {&decay.per_token, "decay.per_token"}},
                  q);
  if (q.dim(3) == 64) forward_impl<64>(o, final_state, q, k, v, decay, initial_state);
  else forward_impl<128>(o, final_state, q, k, v, decay, initial_state);
}

void linear_attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay,
                                    Tensor& d_initial_state, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Decay& decay, const Tensor& initial_state,
                                    const Tensor& d_o, const Tensor& d_final_state, int chunk) {
  const char* fn = "linear_attention_backward";
  check_cuda_args(fn, {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}},
                  {{&initial_state, "initial_state"}, {&d_final_state, "d_final_state"},
                   {&d_log_decay, "d_log_decay"}, {&d_initial_state, "d_initial_state"},
                   {&decay.per_head, "decay.per_head"}, {&decay.per_token, "decay.per_token"}},
                  q);
  if (q.dim(3) == 64)
    backward_impl<64>(dq, dk, dv, d_log_decay, d_initial_state, q, k, v, decay, initial_state, d_o,
                      d_final_state);
  else
    backward_impl<128>(dq, dk, dv, d_log_decay, d_initial_state, q, k, v, decay, initial_state, d_o,
                       d_final_state);
}

}  // namespace lasp
