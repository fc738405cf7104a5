// Hopper (sm_90a) warpgroup matrix multiply primitives: wgmma.mma_async bf16 -> fp32 with
// shared-memory operands in the 128-byte swizzled layout, cp.async and TMA loads into that layout,
// TMA stores and stmatrix out of it.
//
// A warpgroup is 4 consecutive warps (128 threads, starting at a warp index divisible by 4). One
// wgmma computes D[64 x N] (+)= A[64 x 16] B[16 x N]. Accumulator d[v], v = 4 j + i, of thread
// t = 32 w + 4 g + q (warp w, g = lane / 4, q = lane % 4) holds
//   D[16 w + g + 8 (i / 2)][8 j + 2 q + i % 2]
// and a register A fragment (4 x bf16x2) holds, like mma.sync m16n8k16,
//   a0 = A[16 w + g][2 q, 2 q + 1], a1 = A[16 w + g + 8][same], a2 = A[16 w + g][8 + 2 q, +1], a3 =
//   rows + 8.
//
// Shared-memory operands (always 128-byte swizzle here). A tile with rows of 64 bf16 (128 bytes)
// is stored in panels of [64 rows x 128 B] (kSwPanelBytes apart, 1024-byte aligned); the 16-byte
// chunk c of row r sits at chunk position c ^ (r % 8). Two ways to read it:
//   K-major (the row index is M or N, the 64 columns of a panel are K): descriptor start at
//     panel (k / 64) + 32 bytes per 16 columns of K, SBO = 1024 (8 rows), LBO unused.
//   MN-major (the row index is K, the columns are N): start at row 16 kk for K step kk, SBO = 1024
//     (8 rows of K), LBO = kSwPanelBytes (the next 64 columns of N); `trans` set.
// Ordering: shared memory written by ordinary stores or cp.async must be followed by fence_proxy()
// in the writing threads and a barrier before a wgmma reads it; registers written by ordinary code
// need fence() before the wgmma that reads them; results are valid after wait<N>() (and
// fence_operands, which keeps the compiler from moving their reads above the wait).
#pragma once

#include <cuda.h>  // CUtensorMap (types only: the encoder comes through the runtime)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

// Device code for sm_90a has wgmma; device code for other targets compiles these functions to
// nothing, and kernels that use them should trap there (their host side must check first). The
// host pass sees the sm_90a code (it only parses it).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LASP_SM90_WGMMA 1
#else
#define LASP_SM90_WGMMA 0
#endif

namespace lasp {
namespace sm90 {

// The driver's cuTensorMapEncodeTiled, fetched through the runtime (no -lcuda), or nullptr where
// the driver has none (the kernels that load with TMA then use cp.async or another path).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline EncodeTiledFn tensor_map_encoder() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

constexpr int kSwPanelBytes = 64 * 128;  // one [64 rows x 128 B] swizzle panel

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of the 16-byte chunk c (0..7) of row r inside a swizzle panel.
__device__ __forceinline__ uint32_t sw128_offset(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle, built from its two 32-bit words: the low
// word holds the start address / 16 (bits 0-13) and the leading byte offset / 16 (bits 16-29),
// the high word the stride byte offset / 16 and the swizzle mode. Shared addresses are below
// 2^18, so adding (offset / 16) to a tile's low word moves the start within the tile without
// touching the other fields: one integer add per K step instead of rebuilding the descriptor.
__device__ __forceinline__ uint64_t desc_make(uint32_t lo, uint32_t hi) {
  uint64_t d;
  asm("mov.b64 %0, {%1, %2};" : "=l"(d) : "r"(lo), "r"(hi));
  return d;
}
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr, uint32_t lbo_bytes) {
  return ((addr & 0x3FFFF) >> 4) | ((lbo_bytes >> 4) << 16);
}
constexpr uint32_t desc_hi(uint32_t sbo_bytes) { return (sbo_bytes >> 4) | (1u << 30); }
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo_bytes,
                                               uint32_t sbo_bytes) {
  return desc_make(desc_lo(addr, lbo_bytes), desc_hi(sbo_bytes));
}
// K-major operand: K step kk (16 columns) of a tile of panels `panel` bytes apart at `tile`.
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t tile, int kk, int panel = kSwPanelBytes) {
  return desc_make(
      desc_lo(tile, 16) + static_cast<uint32_t>(((kk / 4) * panel + (kk % 4) * 32) >> 4),
      desc_hi(1024));
}
// MN-major operand: K step kk (16 rows) of a tile of panels `panel` bytes apart at `tile` (N
// spans the panels).
__device__ __forceinline__ uint64_t desc_mnmajor(uint32_t tile, int kk, int panel = kSwPanelBytes) {
  return desc_make(desc_lo(tile, panel) + static_cast<uint32_t>((kk * 16 * 128) >> 4),
                   desc_hi(1024));
}

__device__ __forceinline__ void fence() {
#if LASP_SM90_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if LASP_SM90_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if LASP_SM90_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy shared-memory writes (st.shared, cp.async) -> visible to wgmma after a barrier.
__device__ __forceinline__ void fence_proxy() {
#if LASP_SM90_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Warp-specialised kernels: a warpgroup gives registers back (a producer) or takes them (a
// consumer); R is a multiple of 8 in [24, 256], every warp of the warpgroup executes it.
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
#if LASP_SM90_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
#if LASP_SM90_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define LASP_WG_ACC8(d, i)                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define LASP_WG_ACC32(d) \
  LASP_WG_ACC8(d, 0), LASP_WG_ACC8(d, 8), LASP_WG_ACC8(d, 16), LASP_WG_ACC8(d, 24)
#define LASP_WG_ACC64(d)                                                           \
  LASP_WG_ACC32(d), LASP_WG_ACC8(d, 32), LASP_WG_ACC8(d, 40), LASP_WG_ACC8(d, 48), \
      LASP_WG_ACC8(d, 56)
#define LASP_WG_D32                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, "                                                                                       \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define LASP_WG_D64                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, "                                                                                       \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, "  \
  "%39, "                                                                                       \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "  \
  "%58, "                                                                                       \
  "%59, %60, %61, %62, %63}, "

// D[64 x 64] (+)= A B, A and B K-major from shared memory. accumulate = false overwrites D.
__device__ __forceinline__ void mma_64x64_ss(float (&d)[32], uint64_t a, uint64_t b,
                                             bool accumulate) {
#if LASP_SM90_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LASP_WG_D32
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : LASP_WG_ACC32(d)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
#endif
}
// D[64 x 64] += A B, A from registers, B MN-major from shared memory.
__device__ __forceinline__ void mma_64x64_rs_bt(float (&d)[32], const uint32_t (&a)[4],
                                                uint64_t b) {
#if LASP_SM90_WGMMA
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LASP_WG_D32
               "{%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
               : LASP_WG_ACC32(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
#endif
}
// D[64 x 128] += A B, A from registers, B MN-major from shared memory.
__device__ __forceinline__ void mma_64x128_rs_bt(float (&d)[64], const uint32_t (&a)[4],
                                                 uint64_t b) {
#if LASP_SM90_WGMMA
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " LASP_WG_D64
               "{%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
               : LASP_WG_ACC64(d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
#endif
}

#undef LASP_WG_ACC8
#undef LASP_WG_ACC32
#undef LASP_WG_ACC64
#undef LASP_WG_D32
#undef LASP_WG_D64

// 16-byte cp.async into shared address `dst`; src-size 0 (valid = false) zero-fills.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// Rows [0, ROWS) of COLS (a multiple of 64) bf16 columns, from g (row stride rs elements), into
// the swizzled panels (PANEL bytes apart) at shared address `tile`, by a warpgroup; rows >= `rows`
// are zero-filled.
// Each thread copies one 16-byte column of rows r0, r0 + 128 / (COLS / 8), ...: its swizzled
// chunk position is the same for all of them, so the loop carries no index arithmetic.
template <int ROWS, int COLS, int PANEL = kSwPanelBytes>
__device__ __forceinline__ void load_tile_sw128(uint32_t tile, const __nv_bfloat16* g, int64_t rs,
                                                int rows) {
  constexpr int vpr = COLS / 8;
  constexpr int kRowsPerPass = 128 / vpr;
  static_assert(
      COLS % 64 == 0 && 128 % vpr == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0,
      "tile must split over the warpgroup");
  const int t = threadIdx.x % 128, r0 = t / vpr, c = t % vpr;
  const uint32_t dst = tile + (c / 8) * PANEL + sw128_offset(r0, c % 8);
  const __nv_bfloat16* src = g + r0 * rs + c * 8;
#pragma unroll
  for (int j = 0; j < ROWS / kRowsPerPass; ++j) {
    const bool ok = r0 + j * kRowsPerPass < rows;
    cp_async16(dst + j * kRowsPerPass * 128, ok ? src + j * kRowsPerPass * rs : g, ok);
  }
}

// ---- TMA loads with mbarrier completion ------------------------------------------------------
// One thread arms a stage's mbarrier with the bytes to expect and issues the bulk copies; every
// thread waits on the barrier's phase parity (the k-th use of a barrier completes phase k, parity
// k % 2). Tensor copies use a CUtensorMap (a __grid_constant__ kernel parameter) with 128-byte
// swizzle: a box of 64 bf16 columns x R rows lands as one swizzle panel, the layout wgmma reads.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if LASP_SM90_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes initialised barriers visible to the async proxy (before a barrier and the first copy).
__device__ __forceinline__ void mbar_fence_init() {
#if LASP_SM90_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if LASP_SM90_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
// One arrival (no transaction bytes) on a barrier, e.g. a consumer releasing a pipeline stage.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if LASP_SM90_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// The same where `pred` holds, as one predicated instruction (no branch around it).
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
#if LASP_SM90_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::
          "r"(bar),
      "r"(static_cast<uint32_t>(pred))
      : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
#if LASP_SM90_WGMMA
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, "
        "0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#else
    done = 1;  // never launched there
#endif
  } while (!done);
}
// Box (c0, c1, c2) of the 3-D tensor map `map` into shared address `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1, int c2) {
#if LASP_SM90_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#endif
}
// Box (c0, c1) of the 2-D tensor map `map` into shared address `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, uint32_t bar, int c0,
                                            int c1) {
#if LASP_SM90_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global `src` into `dst`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
#if LASP_SM90_WGMMA
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
#endif
}

// Shared `src` (a box of the 3-D tensor map `map`, in its swizzled layout) to global at (c0, c1,
// c2); rows outside the tensor are not written. Completion through bulk groups (commit, wait).
__device__ __forceinline__ void tma_store_3d(const void* map, uint32_t src, int c0, int c1,
                                             int c2) {
#if LASP_SM90_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(src)
      : "memory");
#endif
}
// The 2-D version: shared `src` to global box (c0, c1) of `map`.
__device__ __forceinline__ void tma_store_2d(const void* map, uint32_t src, int c0, int c1) {
#if LASP_SM90_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(src)
      : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if LASP_SM90_WGMMA
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Waits until this thread's committed bulk stores have finished reading shared memory.
__device__ __forceinline__ void bulk_wait_read() {
#if LASP_SM90_WGMMA
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
// Waits until this thread's committed bulk stores are complete.
__device__ __forceinline__ void bulk_wait() {
#if LASP_SM90_WGMMA
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// (x, y) rounded to a bf16 pair, x in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// Stores NJ 8-column blocks of a warpgroup's 64 x (8 NJ) fp32 accumulator (the wgmma layout) as
// bf16 into a K-major 128-byte swizzled tile at shared address `tile` (panels kSwPanelBytes
// apart), with stmatrix: the accumulator layout is exactly stmatrix's fragment layout. Matrix
// (j, u) is rows 16 w + 8 u .. + 7, columns 8 j .. + 7, of which this thread holds row g, columns
// 2 q, 2 q + 1 (acc[4 j + 2 u], acc[4 j + 2 u + 1]). One instruction stores (j, 0), (j, 1),
// (j + 1, 0), (j + 1, 1); lane l addresses row l % 8 of matrix l / 8. A matrix row is one 16-byte
// swizzle chunk, (j % 8) ^ (row % 8) with row % 8 = l % 8 (j % 8 is even, so j % 8 + l / 16 =
// (j % 8) ^ (l / 16)).
// acc may be longer than 4 NJ (a kernel whose narrower tiles use the front of its accumulator).
template <int NJ, int R>
__device__ __forceinline__ void store_acc_bf16_sw128(uint32_t tile, const float (&acc)[R]) {
  static_assert(NJ % 2 == 0, "pairs of 8-column blocks");
  static_assert(R >= 4 * NJ, "the accumulator holds 4 NJ values per thread");
#if LASP_SM90_WGMMA
  const int l = threadIdx.x % 32, w = (threadIdx.x / 32) % 4;
  const int row = 16 * w + 8 * ((l / 8) % 2) + l % 8;
  const uint32_t base = tile + row * 128, y = static_cast<uint32_t>(((l / 16) ^ (l % 8)) << 4);
#pragma unroll
  for (int j = 0; j < NJ; j += 2) {
    const uint32_t addr =
        base + (j / 8) * kSwPanelBytes + (static_cast<uint32_t>((j % 8) << 4) ^ y);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                 "r"(pack_bf16x2(acc[4 * j], acc[4 * j + 1])),
                 "r"(pack_bf16x2(acc[4 * j + 2], acc[4 * j + 3])),
                 "r"(pack_bf16x2(acc[4 * j + 4], acc[4 * j + 5])),
                 "r"(pack_bf16x2(acc[4 * j + 6], acc[4 * j + 7]))
                 : "memory");
  }
#endif
}

// The register A fragment of A = X^T for K step kk, with X a [K rows x 64 columns] single-panel
// swizzled tile (A[m][k] = X[k][m], m = this warp's 16 rows 16 w .. 16 w + 15).
__device__ __forceinline__ void load_a_trans_sw128(uint32_t (&r)[4], uint32_t tile, int kk) {
  const int l = threadIdx.x % 32, w = (threadIdx.x / 32) % 4;
  const int row = kk * 16 + (l % 8) + (l / 16) * 8, chunk = 2 * w + (l / 8) % 2;
  const uint32_t addr = tile + sw128_offset(row, chunk);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

}  // namespace sm90
}  // namespace lasp
