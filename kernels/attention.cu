// CUDA softmax attention (flash-attention-2 style), forward and backward, on tensor cores
// (WMMA 16x16x16, bf16 operands, fp32 accumulation). Semantics: kernels/attention.h (causal with
// q_offset, grouped-query heads, lse [B, Hq, Tq] fp32, rows without a visible key -> o = 0 and
// lse = -inf). q, k, v, o, d_o, dq, dk, dv are bf16; head dims 64 and 128.
//
// Forward, one block per (query tile of kBlockQ rows, batch, query head); warp w owns query rows
// [16w, 16w + 16) of the tile, so the softmax needs no block barrier. Stages per key tile:
//   load   K_j, V_j -> shared (bf16)                                      (block barrier)
//   mma    S = Q K_j^T                      fp32 tile in shared, warp rows
//   online softmax (log2 domain, x = scale log2(e) S, masked -> -inf):
//          m' = max(m, rowmax x),  a = 2^(m - m'),  P = 2^(x - m'),  l = a l + rowsum P,
//          O = a O                          P as bf16 in shared, O fp32 in shared
//   mma    O += P V_j
// then o = O / l and lse = ln 2 (m + log2 l). Causal blocks stop at the last key their last row
// sees; rows past Tq and keys past Tk are zero-filled in shared memory and masked.
//
// Backward (gradient of <dO, O> with the given o and lse, so a call on a key subset with the
// global o and lse gives exactly that subset's dk, dv and share of dq):
//   attn_delta_kernel: Dr_i = sum_d dO_i,d O_i,d                       (fp32 [B, Hq, Tq])
//   attn_bwd_kernel, one block per (key tile, batch, kv head); it loops over the query heads of
//   its group and the query tiles that see its keys. Per query tile:
//     mma   S = Q K_j^T,  dP = dO V_j^T                warp rows, fp32 in shared
//     P = 2^(scale log2(e) S - log2(e) lse) (0 where masked or lse = -inf),
//     dS = P o (dP - Dr)                               bf16 in shared    (block barrier)
//     mma   dV_j += P^T dO,  dK_j += dS^T Q            register fragments, warp key rows
//     mma   dQ_i  = dS K_j -> shared -> atomicAdd(scale dQ) into an fp32 [B, Tq, Hq, D] buffer
//   then dK_j = scale dK_j and dV_j are written once (bf16), dq is cast from the fp32 buffer.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "core/tensor.h"
#include "kernels/attention.h"
#include "kernels/attention_cudnn.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/ops_cuda_util.cuh"

namespace lasp {
namespace {

namespace wm = nvcuda::wmma;
using ops_cuda::bf16;
using ops_cuda::warp_max;
using ops_cuda::warp_sum;

constexpr int kBlockQ = 64;  // query rows per tile
constexpr int kBlockK = 64;  // key rows per tile
constexpr int kWarps = kBlockQ / 16;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using AccFrag = wm::fragment<wm::accumulator, 16, 16, 16, float>;
template <typename Layout>
using FragA = wm::fragment<wm::matrix_a, 16, 16, 16, bf16, Layout>;
template <typename Layout>
using FragB = wm::fragment<wm::matrix_b, 16, 16, 16, bf16, Layout>;

// Shared-memory tile strides (elements), padded against bank conflicts; WMMA needs strides in
// multiples of 16 bytes and tile pointers 32-byte aligned, which these give.
template <int D>
struct Layout {
  static constexpr int ldx = D + 8;        // bf16 [64, D]: q, k, v, dO tiles
  static constexpr int lds = kBlockK + 4;  // fp32 [64, 64]: S, dP
  static constexpr int ldp = kBlockK + 8;  // bf16 [64, 64]: P, dS
  static constexpr int ldo = D + 4;        // fp32 [64, D]: O accumulator, dQ tile, dK/dV staging
  static constexpr int x_bytes = kBlockQ * ldx * 2;
  static constexpr int s_bytes = kBlockQ * lds * 4;
  static constexpr int p_bytes = kBlockQ * ldp * 2;
  static constexpr int o_bytes = kBlockQ * ldo * 4;
  static_assert(kBlockQ == kBlockK, "square tiles: one zero-fill loader, one staging layout");
  static_assert(o_bytes <= 2 * s_bytes, "the dQ / dK staging tile must fit in the S + dP space");
};

constexpr int carved(int bytes) { return (bytes + 127) / 128 * 128; }

struct SmemCarver {
  unsigned char* p;
  template <typename T>
  __device__ T* take(int bytes) {
    T* r = reinterpret_cast<T*>(p);
    p += carved(bytes);
    return r;
  }
};

template <int D>
constexpr int forward_smem_bytes() {
  using L = Layout<D>;
  return 3 * carved(L::x_bytes) + carved(L::s_bytes) + carved(L::p_bytes) + carved(L::o_bytes);
}
template <int D>
constexpr int backward_smem_bytes() {
  using L = Layout<D>;
  return 4 * carved(L::x_bytes) + carved(2 * L::s_bytes) + 2 * carved(L::p_bytes) +
         2 * carved(kBlockQ * 4);
}

// Rows [r0, r0 + 64) of one head of a [B, T, H, D] bf16 tensor into a [64, ld] shared tile;
// `src` points at (b, 0, h, 0), rows are `stride` elements apart, rows >= T become zeros.
template <int D>
__device__ void load_tile(bf16* dst, int ld, const bf16* src, int64_t stride, int64_t r0, int64_t T,
                          bool vec) {
  if (vec) {  // 16-byte copies: 8 elements
    constexpr int per_row = D / 8;
    for (int idx = threadIdx.x; idx < kBlockQ * per_row; idx += blockDim.x) {
      const int r = idx / per_row, c = (idx % per_row) * 8;
      const int64_t t = r0 + r;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (t < T) val = *reinterpret_cast<const uint4*>(src + t * stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kBlockQ * D; idx += blockDim.x) {
      const int r = idx / D, c = idx % D;
      const int64_t t = r0 + r;
      dst[r * ld + c] = t < T ? src[t * stride + c] : __float2bfloat16_rn(0.0f);
    }
  }
}

struct AttnParams {
  const bf16 *q, *k, *v, *o, *dout;
  bf16 *out, *dk, *dv;
  float* lse_out;       // forward: lse to write (or null)
  const float* lse;     // backward: saved lse
  const float* delta;   // backward: Dr [B, Hq, Tq]
  float* dq_acc;        // backward: fp32 [B, Tq, Hq, D] (or null: no dq)
  int64_t B, Tq, Tk, Hq, Hkv, q_offset;
  float scale;
  bool causal, vec;
};

// Keys [0, n) are visible to query row i (global index within the call).
__device__ __forceinline__ int64_t visible_keys(const AttnParams& p, int64_t i) {
  if (!p.causal) return p.Tk;
  const int64_t n = p.q_offset + i + 1;
  return n < 0 ? 0 : (n > p.Tk ? p.Tk : n);
}

// ------------------------------------------------------------------------------------- forward
template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(AttnParams p) {
  using L = Layout<D>;
  constexpr int DT = D / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  SmemCarver sc{smem_raw};
  bf16* Qs = sc.take<bf16>(L::x_bytes);
  bf16* Ks = sc.take<bf16>(L::x_bytes);
  bf16* Vs = sc.take<bf16>(L::x_bytes);
  float* Ss = sc.take<float>(L::s_bytes);
  bf16* Ps = sc.take<bf16>(L::p_bytes);
  float* Os = sc.take<float>(L::o_bytes);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockQ;
  const int64_t b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, kv_stride = p.Hkv * D;
  const bf16* qsrc = p.q + (b * p.Tq * p.Hq + h) * D;
  const bf16* ksrc = p.k + (b * p.Tk * p.Hkv + hk) * D;
  const bf16* vsrc = p.v + (b * p.Tk * p.Hkv + hk) * D;

  load_tile<D>(Qs, L::ldx, qsrc, q_stride, q0, p.Tq, p.vec);
  for (int i = threadIdx.x; i < kBlockQ * L::ldo; i += blockDim.x) Os[i] = 0.0f;

  // Keys seen by the tile's last row (rows past Tq see more: harmless, they are not written).
  const int64_t nk = visible_keys(p, q0 + kBlockQ - 1);
  const float sl2 = p.scale * kLog2e;
  float m[16], l[16];  // per owned row, identical in every lane of the warp
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < nk; k0 += kBlockK) {
    // ---- load: every warp is done with the previous K, V (and the first Q/O fill is visible).
    __syncthreads();
    load_tile<D>(Ks, L::ldx, ksrc, kv_stride, k0, p.Tk, p.vec);
    load_tile<D>(Vs, L::ldx, vsrc, kv_stride, k0, p.Tk, p.vec);
    __syncthreads();

    // ---- mma: S[warp rows, 64] = Q K^T.
#pragma unroll
    for (int j = 0; j < kBlockK / 16; ++j) {
      AccFrag acc;
      wm::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DT; ++kk) {
        FragA<wm::row_major> a;
        FragB<wm::col_major> bk;
        wm::load_matrix_sync(a, Qs + warp * 16 * L::ldx + kk * 16, L::ldx);
        wm::load_matrix_sync(bk, Ks + j * 16 * L::ldx + kk * 16, L::ldx);
        wm::mma_sync(acc, a, bk, acc);
      }
      wm::store_matrix_sync(Ss + warp * 16 * L::lds + j * 16, acc, L::lds, wm::mem_row_major);
    }
    __syncwarp();

    // ---- online softmax on the warp's 16 rows; lanes hold columns lane and lane + 32.
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const int64_t lim = visible_keys(p, q0 + row) - k0;  // columns c < lim are visible
      const float x0 = lane < lim ? Ss[row * L::lds + lane] * sl2 : -INFINITY;
      const float x1 = lane + 32 < lim ? Ss[row * L::lds + lane + 32] * sl2 : -INFINITY;
      const float mnew = fmaxf(m[r], warp_max(fmaxf(x0, x1)));
      float alpha = 1.0f, p0 = 0.0f, p1 = 0.0f;
      if (mnew != -INFINITY) {  // uniform across the warp
        alpha = exp2f(m[r] - mnew);
        p0 = exp2f(x0 - mnew);
        p1 = exp2f(x1 - mnew);
      }
      l[r] = l[r] * alpha + warp_sum(p0 + p1);
      m[r] = mnew;
      Ps[row * L::ldp + lane] = __float2bfloat16_rn(p0);
      Ps[row * L::ldp + lane + 32] = __float2bfloat16_rn(p1);
#pragma unroll
      for (int c = lane; c < D; c += 32) Os[row * L::ldo + c] *= alpha;
    }
    __syncwarp();

    // ---- mma: O[warp rows, D] += P V.
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      AccFrag acc;
      float* op = Os + warp * 16 * L::ldo + j * 16;
      wm::load_matrix_sync(acc, op, L::ldo, wm::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        FragA<wm::row_major> a;
        FragB<wm::row_major> bv;
        wm::load_matrix_sync(a, Ps + warp * 16 * L::ldp + kk * 16, L::ldp);
        wm::load_matrix_sync(bv, Vs + kk * 16 * L::ldx + j * 16, L::ldx);
        wm::mma_sync(acc, a, bv, acc);
      }
      wm::store_matrix_sync(op, acc, L::ldo, wm::mem_row_major);
    }
  }
  __syncthreads();  // the O fill by other threads is visible even when no key tile ran

  // ---- store: o = O / l, lse = ln 2 (m + log2 l); rows without keys get 0 and -inf.
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int row = warp * 16 + r;
    const int64_t qi = q0 + row;
    if (qi >= p.Tq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    bf16* dst = p.out + ((b * p.Tq + qi) * p.Hq + h) * D;
    for (int c = lane; c < D; c += 32) dst[c] = __float2bfloat16_rn(Os[row * L::ldo + c] * inv);
    if (p.lse_out && lane == 0)
      p.lse_out[(b * p.Hq + h) * p.Tq + qi] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

// ------------------------------------------------------------------------------------- backward
// Dr[b, h, i] = sum_d dO[b, i, h, d] O[b, i, h, d]; one warp per (b, i, h).
__global__ void attn_delta_kernel(float* delta, const bf16* o, const bf16* dout, int64_t B, int64_t Tq,
                                  int64_t Hq, int64_t D) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = B * Tq * Hq, warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    float s = 0.0f;
    for (int64_t c = lane; c < D; c += 32)
      s += __bfloat162float(o[r * D + c]) * __bfloat162float(dout[r * D + c]);
    s = warp_sum(s);
    const int64_t h = r % Hq, i = (r / Hq) % Tq, b = r / (Hq * Tq);
    if (lane == 0) delta[(b * Hq + h) * Tq + i] = s;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(AttnParams p) {
  using L = Layout<D>;
  constexpr int DT = D / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  SmemCarver sc{smem_raw};
  bf16* Ks = sc.take<bf16>(L::x_bytes);
  bf16* Vs = sc.take<bf16>(L::x_bytes);
  bf16* Qs = sc.take<bf16>(L::x_bytes);
  bf16* dOs = sc.take<bf16>(L::x_bytes);
  float* Ss = sc.take<float>(2 * L::s_bytes);  // S, then dP; later the dQ tile / dK, dV staging
  float* dPs = Ss + kBlockQ * L::lds;
  float* stage = Ss;
  bf16* Ps = sc.take<bf16>(L::p_bytes);
  bf16* dSs = sc.take<bf16>(L::p_bytes);
  float* lse_s = sc.take<float>(kBlockQ * 4);    // log2(e) lse per query row of the tile
  float* delta_s = sc.take<float>(kBlockQ * 4);  // Dr per query row

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBlockK;
  const int64_t b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t q_stride = p.Hq * D, kv_stride = p.Hkv * D;
  load_tile<D>(Ks, L::ldx, p.k + (b * p.Tk * p.Hkv + hk) * D, kv_stride, k0, p.Tk, p.vec);
  load_tile<D>(Vs, L::ldx, p.v + (b * p.Tk * p.Hkv + hk) * D, kv_stride, k0, p.Tk, p.vec);

  AccFrag dk[DT], dv[DT];  // key rows [16 warp, 16 warp + 16) of the tile, all D columns
#pragma unroll
  for (int j = 0; j < DT; ++j) {
    wm::fill_fragment(dk[j], 0.0f);
    wm::fill_fragment(dv[j], 0.0f);
  }

  // The first query row that sees key k0: q_offset + i >= k0.
  int64_t first_q = 0;
  if (p.causal) first_q = k0 - p.q_offset > 0 ? k0 - p.q_offset : 0;
  const int64_t q_begin = first_q / kBlockQ * kBlockQ;
  const float sl2 = p.scale * kLog2e;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const bf16* qsrc = p.q + (b * p.Tq * p.Hq + h) * D;
    const bf16* dosrc = p.dout + (b * p.Tq * p.Hq + h) * D;
    const float* lse_row = p.lse + (b * p.Hq + h) * p.Tq;
    const float* delta_row = p.delta + (b * p.Hq + h) * p.Tq;
    for (int64_t q0 = q_begin; q0 < p.Tq; q0 += kBlockQ) {
      // ---- load: the previous tile's readers of Q, dO, P, dS and the dQ tile are done.
      __syncthreads();
      load_tile<D>(Qs, L::ldx, qsrc, q_stride, q0, p.Tq, p.vec);
      load_tile<D>(dOs, L::ldx, dosrc, q_stride, q0, p.Tq, p.vec);
      for (int r = threadIdx.x; r < kBlockQ; r += blockDim.x) {
        const bool in = q0 + r < p.Tq;
        lse_s[r] = in ? lse_row[q0 + r] * kLog2e : -INFINITY;
        delta_s[r] = in ? delta_row[q0 + r] : 0.0f;
      }
      __syncthreads();

      // ---- mma: S = Q K^T and dP = dO V^T on the warp's query rows.
#pragma unroll
      for (int j = 0; j < kBlockK / 16; ++j) {
        AccFrag s_acc, dp_acc;
        wm::fill_fragment(s_acc, 0.0f);
        wm::fill_fragment(dp_acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < DT; ++kk) {
          FragA<wm::row_major> a;
          FragB<wm::col_major> bb;
          wm::load_matrix_sync(a, Qs + warp * 16 * L::ldx + kk * 16, L::ldx);
          wm::load_matrix_sync(bb, Ks + j * 16 * L::ldx + kk * 16, L::ldx);
          wm::mma_sync(s_acc, a, bb, s_acc);
          wm::load_matrix_sync(a, dOs + warp * 16 * L::ldx + kk * 16, L::ldx);
          wm::load_matrix_sync(bb, Vs + j * 16 * L::ldx + kk * 16, L::ldx);
          wm::mma_sync(dp_acc, a, bb, dp_acc);
        }
        wm::store_matrix_sync(Ss + warp * 16 * L::lds + j * 16, s_acc, L::lds, wm::mem_row_major);
        wm::store_matrix_sync(dPs + warp * 16 * L::lds + j * 16, dp_acc, L::lds, wm::mem_row_major);
      }
      __syncwarp();

      // ---- P = 2^(x - log2(e) lse) and dS = P o (dP - Dr) on the warp's rows.
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int row = warp * 16 + r;
        const float lr = lse_s[row], dr = delta_s[row];
        const int64_t lim = lr == -INFINITY ? 0 : visible_keys(p, q0 + row) - k0;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = lane + 32 * half;
          const float pv = c < lim ? exp2f(Ss[row * L::lds + c] * sl2 - lr) : 0.0f;
          const float ds = pv * (dPs[row * L::lds + c] - dr);
          Ps[row * L::ldp + c] = __float2bfloat16_rn(pv);
          dSs[row * L::ldp + c] = __float2bfloat16_rn(ds);
        }
      }
      __syncthreads();  // P and dS of every row feed the key-side products

      // ---- mma: dV += P^T dO, dK += dS^T Q on the warp's key rows (P^T, dS^T: col-major views).
      // One operand array live at a time keeps the D = 128 accumulators in registers.
#pragma unroll
      for (int pass = 0; pass < 2; ++pass) {
        const bf16* lhs = pass == 0 ? Ps : dSs;   // P^T for dV, dS^T for dK
        const bf16* rhs = pass == 0 ? dOs : Qs;
        FragA<wm::col_major> at[kBlockQ / 16];
#pragma unroll
        for (int kk = 0; kk < kBlockQ / 16; ++kk)
          wm::load_matrix_sync(at[kk], lhs + kk * 16 * L::ldp + warp * 16, L::ldp);
#pragma unroll
        for (int j = 0; j < DT; ++j) {
#pragma unroll
          for (int kk = 0; kk < kBlockQ / 16; ++kk) {
            FragB<wm::row_major> bb;
            wm::load_matrix_sync(bb, rhs + kk * 16 * L::ldx + j * 16, L::ldx);
            if (pass == 0) wm::mma_sync(dv[j], at[kk], bb, dv[j]);
            else wm::mma_sync(dk[j], at[kk], bb, dk[j]);
          }
        }
      }

      // ---- mma: dQ tile = dS K on the warp's query rows, then atomics (S, dP are dead now).
      if (p.dq_acc) {
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          AccFrag acc;
          wm::fill_fragment(acc, 0.0f);
#pragma unroll
          for (int kk = 0; kk < kBlockK / 16; ++kk) {
            FragA<wm::row_major> a;
            FragB<wm::row_major> bk;
            wm::load_matrix_sync(a, dSs + warp * 16 * L::ldp + kk * 16, L::ldp);
            wm::load_matrix_sync(bk, Ks + kk * 16 * L::ldx + j * 16, L::ldx);
            wm::mma_sync(acc, a, bk, acc);
          }
          wm::store_matrix_sync(stage + warp * 16 * L::ldo + j * 16, acc, L::ldo, wm::mem_row_major);
        }
        __syncwarp();
        for (int r = 0; r < 16; ++r) {
          const int row = warp * 16 + r;
          const int64_t qi = q0 + row;
          if (qi >= p.Tq) break;
          float* dst = p.dq_acc + ((b * p.Tq + qi) * p.Hq + h) * D;
          for (int c = lane; c < D; c += 32) atomicAdd(dst + c, stage[row * L::ldo + c] * p.scale);
        }
      }
    }
  }

  // ---- store dV and dK = scale dK for the tile's key rows, through the staging tile.
  __syncthreads();
  for (int which = 0; which < 2; ++which) {
    bf16* out = which == 0 ? p.dv : p.dk;
    if (!out) continue;  // uniform
    const float mul = which == 0 ? 1.0f : p.scale;
#pragma unroll
    for (int j = 0; j < DT; ++j)
      wm::store_matrix_sync(stage + warp * 16 * L::ldo + j * 16, which == 0 ? dv[j] : dk[j], L::ldo,
                            wm::mem_row_major);
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const int row = warp * 16 + r;
      const int64_t kj = k0 + row;
      if (kj >= p.Tk) break;
      bf16* dst = out + ((b * p.Tk + kj) * p.Hkv + hk) * D;
      for (int c = lane; c < D; c += 32) dst[c] = __float2bfloat16_rn(stage[row * L::ldo + c] * mul);
    }
    __syncwarp();
  }
}

__global__ void f32_to_bf16_kernel(bf16* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

// ------------------------------------------------------------------------------------- host side
void check_bf16(const Tensor& t, const char* fn, const char* what) {
  LASP_CHECK(t.dtype() == DType::BF16) << fn << ": on CUDA " << what << " must be bf16, got " << t.str();
}

bool aligned16(const Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0; }

AttnParams make_params(const Tensor& q, const Tensor& k, float scale, bool causal, int64_t q_offset) {
  AttnParams p{};
  p.B = q.dim(0);
  p.Tq = q.dim(1);
  p.Hq = q.dim(2);
  p.Tk = k.dim(1);
  p.Hkv = k.dim(2);
  p.q_offset = q_offset;
  p.scale = scale;
  p.causal = causal;
  return p;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int smem, const AttnParams& p, const char* what) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, cuda_stream()>>>(p);
  CUDA_CHECK_LAUNCH(what);
}

const bf16* cptr(const Tensor& t) { return static_cast<const bf16*>(t.raw()); }
bf16* mptr(const Tensor& t) { return t.defined() ? static_cast<bf16*>(t.raw()) : nullptr; }

}  // namespace

void attention_forward_cuda(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k,
                            const Tensor& v, float scale, bool causal, int64_t q_offset) {
  const char* fn = "attention_forward";
  check_bf16(q, fn, "q");
  check_bf16(k, fn, "k");
  check_bf16(v, fn, "v");
  check_bf16(o, fn, "o");
  if (lse.defined())
    LASP_CHECK(lse.dtype() == DType::F32) << fn << ": on CUDA lse must be fp32, got " << lse.str();
  const int64_t D = q.dim(3);
  LASP_CHECK(D == 64 || D == 128) << fn << ": the CUDA kernel supports head dims 64 and 128, got " << D;
  AttnParams p = make_params(q, k, scale, causal, q_offset);
  if (p.B == 0 || p.Tq == 0 || p.Hq == 0) return;
  // cuDNN's fused flash attention when it takes the call (LASP_ATTENTION, kernels/attention_cudnn.h).
  if (cudnn_attention_forward(o, lse, q, k, v, scale, causal, q_offset)) return;
  p.q = cptr(q);
  p.k = cptr(k);
  p.v = cptr(v);
  p.out = mptr(o);
  p.lse_out = lse.defined() ? lse.data<float>() : nullptr;
  p.vec = aligned16(q) && aligned16(k) && aligned16(v);
  const int64_t grid_y = p.B * p.Hq;
  LASP_CHECK(grid_y <= 65535) << fn << ": B * Hq = " << grid_y << " exceeds the grid limit 65535";
  const dim3 grid(static_cast<unsigned>((p.Tq + kBlockQ - 1) / kBlockQ), static_cast<unsigned>(grid_y));
  if (D == 64) launch(attn_fwd_kernel<64>, grid, forward_smem_bytes<64>(), p, fn);
  else launch(attn_fwd_kernel<128>, grid, forward_smem_bytes<128>(), p, fn);
}

void attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                             const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                             float scale, bool causal, int64_t q_offset) {
  const char* fn = "attention_backward";
  if (!dq.defined() && !dk.defined() && !dv.defined()) return;
  check_bf16(q, fn, "q");
  check_bf16(k, fn, "k");
  check_bf16(v, fn, "v");
  check_bf16(o, fn, "o");
  check_bf16(d_o, fn, "d_o");
  if (dq.defined()) check_bf16(dq, fn, "dq");
  if (dk.defined()) check_bf16(dk, fn, "dk");
  if (dv.defined()) check_bf16(dv, fn, "dv");
  LASP_CHECK(lse.dtype() == DType::F32) << fn << ": on CUDA lse must be fp32, got " << lse.str();
  const int64_t D = q.dim(3);
  LASP_CHECK(D == 64 || D == 128) << fn << ": the CUDA kernel supports head dims 64 and 128, got " << D;
  AttnParams p = make_params(q, k, scale, causal, q_offset);
  if (p.B == 0 || p.Hq == 0) return;
  if (p.Tk == 0) {  // no keys: every gradient is zero
    if (dq.defined()) dq.zero_();
    return;
  }
  if (cudnn_attention_backward(dq, dk, dv, q, k, v, o, lse, d_o, scale, causal, q_offset)) return;
  const Device dev = q.device();
  Tensor delta = Tensor::empty({p.B, p.Hq, p.Tq}, DType::F32, dev);
  Tensor dq_acc = dq.defined() ? Tensor::zeros(q.shape(), DType::F32, dev) : Tensor();
  if (p.Tq > 0) {
    const int64_t rows = p.B * p.Tq * p.Hq;
    attn_delta_kernel<<<ops_cuda::grid_for(rows * 32, 256), 256, 0, cuda_stream()>>>(
        delta.data<float>(), cptr(o), cptr(d_o), p.B, p.Tq, p.Hq, D);
    CUDA_CHECK_LAUNCH("attention_backward (delta)");
  }
  p.q = cptr(q);
  p.k = cptr(k);
  p.v = cptr(v);
  p.o = cptr(o);
  p.dout = cptr(d_o);
  p.lse = lse.data<float>();
  p.delta = delta.data<float>();
  p.dq_acc = dq.defined() ? dq_acc.data<float>() : nullptr;
  p.dk = mptr(dk);
  p.dv = mptr(dv);
  p.vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(d_o);
  const int64_t grid_y = p.B * p.Hkv;
  LASP_CHECK(grid_y <= 65535) << fn << ": B * Hkv = " << grid_y << " exceeds the grid limit 65535";
  const dim3 grid(static_cast<unsigned>((p.Tk + kBlockK - 1) / kBlockK), static_cast<unsigned>(grid_y));
  if (D == 64) launch(attn_bwd_kernel<64>, grid, backward_smem_bytes<64>(), p, fn);
  else launch(attn_bwd_kernel<128>, grid, backward_smem_bytes<128>(), p, fn);
  if (dq.defined()) {
    const int64_t n = dq.numel();
    f32_to_bf16_kernel<<<ops_cuda::grid_for(n, 256), 256, 0, cuda_stream()>>>(mptr(dq), dq_acc.data<float>(),
                                                                               n);
    CUDA_CHECK_LAUNCH("attention_backward (dq)");
  }
}

}  // namespace lasp
