// lasp's own Hopper FP8 GEMM (gemm_fp8_with(..., Fp8GemmBackend::Lasp) in gemm_fp8.h,
// LASP_FP8_GEMM=lasp, and gemm_fp8's default for per-tensor bf16-out GEMMs with K <= 4096; design
// and measured speed, at or above cuBLASLt's at the 1B model's K = 2048 shapes, in
// docs/fp8_gpu.md, "Our FP8 kernel"): C[M, N] = alpha s_A s_B A[M, K] B[N, K]^T + beta C,
// per-tensor scales, both operands K-major E4M3/E5M2 codes, fp32 accumulation with the tensor
// cores' partial sums promoted into fp32 registers every `promote_every` K blocks of 128. The
// block-scaled kernels (kScale != kTensorScale) take block scales instead (A 1x128 / 128x128 /
// per tensor; B 128x128 / per tensor, or 1x128 = one factor per column of C per K block, which
// TMA stages in shared memory next to the operands): every K block is promoted with its factors,
// C = alpha sum_kb f_A f_B P_kb + beta C (docs/fp8_gpu.md, "Block scaling in our kernel").
//
// Tiles and stages (names as in the code):
//   CTA tile kBM x BN (128 x 128 or 128 x 192) of C, K in blocks of kBK = 128 bytes (one 128-byte
//   swizzle row, the unit TMA writes and wgmma reads), kStages stages of A [128 x 128] and
//   B [BN x 128] in shared memory.
//   Warpgroup 0 (producer): one thread issues the TMA loads of every stage of every tile this CTA
//   owns, waiting for a stage to be released before refilling it.
//   Warpgroups 1 and 2 (consumers): rows 0-63 and 64-127 of the tile. Per K block, 4 wgmma
//   m64nBNk32 into `acc` (the tensor cores' accumulator), then — every promote_every blocks —
//   wait, release the stages and add acc into `total` (fp32 adds on the CUDA cores). While one
//   consumer waits and adds, the other's wgmmas keep the tensor cores busy; consumer 1 starts
//   one K block after consumer 0 (stagger), so that their waits do not fall together.
//   Epilogue (bf16 C, beta = 0, the default path): each warp writes its 16 rows of scale * total
//   as bf16 into swizzled shared memory (stmatrix) and one lane issues TMA stores, which drain
//   while the consumer runs its next tile's main loop. Otherwise (fp32 C or beta != 0) each
//   consumer stores straight from registers. The producer meanwhile loads the next tile.
//   The grid is persistent: one CTA per SM walks tiles blockIdx.x, + gridDim.x, ... (N fastest,
//   so concurrent CTAs share A's row blocks in L2).
//   Narrow edge (128 x 192 tiles): where N leaves a last column of at most 128, those tiles run
//   m64n128 wgmmas (2/3 of the tensor-core time) and each row of tiles starts one column further
//   (kernels/gemm_fp8_tiles.h), so that the narrow tiles spread over the CTAs: N = 2048 is 10
//   full columns and one of 128, 10.67 full-tile times per SM instead of 11.
// Registers: the consumers hold acc and total (BN / 2 fp32 each); setmaxnreg moves registers from
// the producer (40) to them (232).
#include <cuda_bf16.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "core/log.h"
#include "core/tensor.h"
#include "kernels/cuda_utils.cuh"
#include "kernels/gemm_fp8.h"
#include "kernels/gemm_fp8_tiles.h"
#include "kernels/ops_cuda_util.cuh"
#include "kernels/sm90_wgmma.cuh"

namespace lasp {
namespace {

constexpr int kBM = 128, kBK = 128, kThreads = 384;
constexpr int kSmemLimit = 227 * 1024;

// How a kernel scales its products: per tensor (alpha s_A s_B in the epilogue), block factors of
// A's rows and B's 128-row blocks (registers, loaded per K block), or block factors of A's rows
// and B's rows (one per column of C: staged in shared memory by TMA with the operands).
enum ScaleKind { kTensorScale = 0, kBlockScale = 1, kColumnScale = 2 };

template <int BN>
struct Fp8Tiles {
  static constexpr int kAccRegs = BN / 2;  // fp32 accumulator registers per thread (64 x BN / 128)
  static constexpr int kABytes = kBM * kBK, kBBytes = BN * kBK, kStageBytes = kABytes + kBBytes;
  // kColumnScale: per stage, the fp32 factors of the tile's BN columns in its K block (a
  // multiple of 128 bytes, TMA's alignment), kept apart from the operands (which stay 1024-aligned).
  static constexpr int kColBytes = BN * 4;
  // The TMA-store epilogue's bf16 C tile: per consumer, BN / 64 swizzle panels of 64 rows.
  static constexpr int kCBytes = 2 * (BN / 64) * sm90::kSwPanelBytes;
  static constexpr int per_stage(bool cols) { return kStageBytes + (cols ? kColBytes : 0); }
  static constexpr int stages(bool tma_store, bool cols) {
    return std::min(8, (kSmemLimit - 1024 - 256 - (tma_store ? kCBytes : 0)) / per_stage(cols));
  }
  // Layout from the 1024-aligned base: stages, [C tile], [column factors], full and empty
  // barriers, the two stagger barriers.
  static constexpr int smem_bytes(bool tma_store, bool cols) {
    const int s = stages(tma_store, cols);
    return 1024 + s * kStageBytes + (tma_store ? kCBytes : 0) + (cols ? s * kColBytes : 0) +
           16 * s + 16;
  }
};

struct Fp8GemmArgs {
  void* c = nullptr;  // [m, n] row-major, bf16 or fp32
  int m = 0, n = 0, k = 0;
  int c_f32 = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* scale_a = nullptr;  // device, one value each (the dequantization factors)
  const float* scale_b = nullptr;
  int tiles_m = 0, tiles_n = 0;
  int promote_every = 1;  // K blocks between promotions; >= nk: one promotion at the end
  int stages = 0;         // Fp8Tiles<BN>::stages(tma_store, kScale == kColumnScale)
  int stagger = 0;        // consumer 1 starts after consumer 0's first K block (Fp8KernelConfig)
  int tma_store = 0;      // bf16 C, beta = 0, through shared memory and map_c
  // BN = 192 with a last column of tiles at most 128 wide: that column runs m64n128 wgmmas
  // (2/3 of a full tile's tensor-core time), and the columns rotate by the tile row
  // (tile_origin), so that every CTA meets about as many narrow tiles as the others.
  int narrow_edge = 0;
  // Block scaling (kScale != kTensorScale; scale_a / scale_b unused): the dequantization factor
  // of A's row r in K block kb is sa[(min(r, sa_rows - 1) / sa_div) * sa_ld + kb * sa_kstride]
  // (1x128: div 1, ld L, kstride 1; 128x128: div 128; per tensor: ld = kstride = 0), and, in the
  // kBlockScale kernels, of B's 128-row block cb (a 128-column block of C) sb[min(cb, sb_blocks -
  // 1) * sb_ld + kb * sb_kstride] (128x128: ld L, kstride 1; per tensor: 0, 0). Rows and blocks
  // past the operand are clamped: they meet zero codes (TMA's fill) and their outputs are
  // dropped. The kColumnScale kernels read B's factors (1x128) from map_sb instead: a [K blocks,
  // columns] fp32 matrix, B's factors transposed, whose box of BN columns of one K block TMA
  // loads with each stage (zeros past the matrix).
  const float* sa = nullptr;
  const float* sb = nullptr;
  int sa_rows = 1, sa_div = 1, sa_ld = 0, sa_kstride = 0;
  int sb_blocks = 1, sb_ld = 0, sb_kstride = 0;
};

// ---- wgmma m64nNk32 with fp8 operands, both K-major from shared memory ----------------------
#define LASP_F8_ACC8(d, i)                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define LASP_F8_ACC32(d, i) \
  LASP_F8_ACC8(d, i), LASP_F8_ACC8(d, i + 8), LASP_F8_ACC8(d, i + 16), LASP_F8_ACC8(d, i + 24)
#define LASP_F8_ACC64(d) LASP_F8_ACC32(d, 0), LASP_F8_ACC32(d, 32)
#define LASP_F8_ACC96(d) LASP_F8_ACC32(d, 0), LASP_F8_ACC32(d, 32), LASP_F8_ACC32(d, 64)
#define LASP_F8_D64                                                                  \
  "{"                                                                                \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"   \
  "}, "
#define LASP_F8_D96                                                                  \
  "{"                                                                                \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"   \
  "}, "
// One instruction: D (+)= A[64 x 32] B[BN x 32]^T; `acc` = 0 overwrites D. IA, IB, IP: the
// operand numbers of a, b and acc (after the BN / 2 accumulator registers).
#define LASP_F8_MMA(N, D, ACC, TA, TB, IA, IB, IP)                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IP                                            \
               ", 0;\n"                                                                            \
               "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32." TA "." TB " " D "%" #IA ", %" #IB \
               ", p, 1, 1;\n}\n"                                                                   \
               : ACC(d)                                                                            \
               : "l"(a), "l"(b), "r"(acc))

template <int BN, Fp8Format FA, Fp8Format FB>
struct Fp8Mma;

// d may be longer than R (a narrow tile uses the front of the kernel's accumulator).
#define LASP_F8_MMA_STRUCT(N, R, D, ACC, FA, FB, TA, TB, IA, IB, IP)                              \
  template <>                                                                                     \
  struct Fp8Mma<N, Fp8Format::FA, Fp8Format::FB> {                                                \
    template <int R2>                                                                             \
    __device__ __forceinline__ static void run(float (&d)[R2], uint64_t a, uint64_t b, int acc) { \
      static_assert(R2 >= R, "accumulator too short");                                            \
      if constexpr (LASP_SM90_WGMMA) LASP_F8_MMA(N, D, ACC, TA, TB, IA, IB, IP);                  \
    }                                                                                             \
  };
LASP_F8_MMA_STRUCT(128, 64, LASP_F8_D64, LASP_F8_ACC64, E4M3, E4M3, "e4m3", "e4m3", 64, 65, 66)
LASP_F8_MMA_STRUCT(128, 64, LASP_F8_D64, LASP_F8_ACC64, E4M3, E5M2, "e4m3", "e5m2", 64, 65, 66)
LASP_F8_MMA_STRUCT(128, 64, LASP_F8_D64, LASP_F8_ACC64, E5M2, E4M3, "e5m2", "e4m3", 64, 65, 66)
LASP_F8_MMA_STRUCT(128, 64, LASP_F8_D64, LASP_F8_ACC64, E5M2, E5M2, "e5m2", "e5m2", 64, 65, 66)
LASP_F8_MMA_STRUCT(192, 96, LASP_F8_D96, LASP_F8_ACC96, E4M3, E4M3, "e4m3", "e4m3", 96, 97, 98)
LASP_F8_MMA_STRUCT(192, 96, LASP_F8_D96, LASP_F8_ACC96, E4M3, E5M2, "e4m3", "e5m2", 96, 97, 98)
LASP_F8_MMA_STRUCT(192, 96, LASP_F8_D96, LASP_F8_ACC96, E5M2, E4M3, "e5m2", "e4m3", 96, 97, 98)
LASP_F8_MMA_STRUCT(192, 96, LASP_F8_D96, LASP_F8_ACC96, E5M2, E5M2, "e5m2", "e5m2", 96, 97, 98)
#undef LASP_F8_MMA_STRUCT
#undef LASP_F8_MMA
#undef LASP_F8_D64
#undef LASP_F8_D96
#undef LASP_F8_ACC8
#undef LASP_F8_ACC32
#undef LASP_F8_ACC64
#undef LASP_F8_ACC96

// total += f acc for one K block of block scaling: columns 8 j + 2 q (+ 1) of rows g (acc 4 j,
// 4 j + 1) and g + 8 (4 j + 2, 4 j + 3); the first J0 column groups of 8 lie in B's first block
// (factors f00 for row g, f10 for row g + 8), the rest in the next (f01, f11). J0 is a template
// argument so the choice costs no instruction per element. NI: the tile's width (the first NI / 2
// registers of total and acc).
template <int NI, int J0, int R>
__device__ __forceinline__ void promote_scaled(float (&total)[R], const float (&acc)[R], float f00,
                                               float f01, float f10, float f11) {
  static_assert(R >= NI / 2, "accumulator too short");
#pragma unroll
  for (int j = 0; j < NI / 8; ++j) {
    const float lo = j < J0 ? f00 : f01, hi = j < J0 ? f10 : f11;
    total[4 * j] = fmaf(acc[4 * j], lo, total[4 * j]);
    total[4 * j + 1] = fmaf(acc[4 * j + 1], lo, total[4 * j + 1]);
    total[4 * j + 2] = fmaf(acc[4 * j + 2], hi, total[4 * j + 2]);
    total[4 * j + 3] = fmaf(acc[4 * j + 3], hi, total[4 * j + 3]);
  }
}

// total += f acc for one K block with a factor per column of C (kColumnScale): column 8 j + 2 q
// (+ 1) takes the fp32 pair at shared address `cols` + 4 (8 j + 2 q) (one 8-byte load per column
// pair; the threads of a quad read 32 consecutive bytes, the warp's 8 quads the same ones), rows g
// and g + 8 take fa0 and fa1. Two fp32 operations per element (the per-tensor promotion's one
// add, the 128x128 path's one fma).
template <int NI, int R>
__device__ __forceinline__ void promote_columns(float (&total)[R], const float (&acc)[R], float fa0,
                                                float fa1, uint32_t cols) {
  static_assert(R >= NI / 2, "accumulator too short");
#pragma unroll
  for (int j = 0; j < NI / 8; ++j) {
    float fx, fy;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(fx), "=f"(fy) : "r"(cols + 32 * j));
    total[4 * j] = fmaf(acc[4 * j] * fx, fa0, total[4 * j]);
    total[4 * j + 1] = fmaf(acc[4 * j + 1] * fy, fa0, total[4 * j + 1]);
    total[4 * j + 2] = fmaf(acc[4 * j + 2] * fx, fa1, total[4 * j + 2]);
    total[4 * j + 3] = fmaf(acc[4 * j + 3] * fy, fa1, total[4 * j + 3]);
  }
}

// Tile t's C origin (row m0, column n0): fp8tiles::tile_rc's walk, its columns rotated by the row
// where there is a narrow edge.
template <int BN>
__device__ __forceinline__ int2 tile_origin(const Fp8GemmArgs& p, int t) {
  const fp8tiles::TileRC rc = fp8tiles::tile_rc(t, p.tiles_n, p.narrow_edge != 0);
  return make_int2(rc.row * kBM, rc.col * BN);
}

// 1 where this file's kernels were compiled for sm_90a (read once per device by the host).
__device__ int fp8_sm90_compiled = LASP_SM90_WGMMA;

template <int BN, Fp8Format FA, Fp8Format FB, int kScale>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_fp8_sm90_kernel(const Fp8GemmArgs p, const __grid_constant__ CUtensorMap map_a,
                         const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_c,
                         const __grid_constant__ CUtensorMap map_sb) {
#if LASP_SM90_WGMMA
  using T = Fp8Tiles<BN>;
  constexpr int R = T::kAccRegs;
  constexpr bool kBlock = kScale != kTensorScale, kCols = kScale == kColumnScale;
  const int S = p.stages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base =
      (sm90::smem_u32(smem_raw) + 1023u) & ~1023u;    // 128-byte swizzle: 1024-aligned
  const uint32_t c_tile = base + S * T::kStageBytes;  // the TMA-store epilogue's C tile
  const uint32_t cols0 = c_tile + (p.tma_store ? T::kCBytes : 0);  // kCols: stage s's factors
  const uint32_t full0 = cols0 + (kCols ? S * T::kColBytes : 0), empty0 = full0 + 8 * S,
                 stagger_bar = empty0 + 8 * S;
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(full0 + 8 * s, 1);   // the producer's arrive + the TMA bytes
      // One arrival per consumer warpgroup; with column factors, one per consumer warp (each
      // warp's lanes read the stage's factors).
      sm90::mbar_init(empty0 + 8 * s, kCols ? 8 : 2);
    }
    sm90::mbar_init(stagger_bar, 1);
    sm90::mbar_init(stagger_bar + 8, 1);
    sm90::mbar_arrive(stagger_bar);
    sm90::mbar_fence_init();
  }
  __syncthreads();
  const int nk = (p.k + kBK - 1) / kBK, tiles = p.tiles_m * p.tiles_n;

  if (wg == 0) {
    // ---- producer: TMA loads of A [128 x 128] and B [BN x 128] per stage ----
    sm90::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int s = 0;
      uint32_t round = 0;  // how many times stage s has been filled before
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int2 o = tile_origin<BN>(p, tile);
        const int m0 = o.x, n0 = o.y;
        for (int kb = 0; kb < nk; ++kb) {
          if (round > 0) sm90::mbar_wait(empty0 + 8 * s, (round - 1) & 1);
          const uint32_t a = base + s * T::kStageBytes, bar = full0 + 8 * s;
          sm90::mbar_arrive_expect_tx(bar, T::per_stage(kCols));
          sm90::tma_load_2d(a, &map_a, bar, kb * kBK, m0);
          sm90::tma_load_2d(a + T::kABytes, &map_b, bar, kb * kBK, n0);
          if constexpr (kCols) sm90::tma_load_2d(cols0 + s * T::kColBytes, &map_sb, bar, n0, kb);
          if (++s == S) {
            s = 0;
            ++round;
          }
        }
      }
    }
    return;
  }

  // ---- consumers: rows 64 c .. 64 c + 63 of each tile ----
  sm90::setmaxnreg_inc<232>();
  // c through a shuffle: ptxas then knows it is the same across the warp (a wait whose address
  // depends on a value it cannot prove uniform makes it serialise the wgmmas, C7518).
  const int c = __shfl_sync(0xffffffffu, wg - 1, 0), t = threadIdx.x % 128;
  const bool releaser = kCols ? t % 32 == 0 : t == 0;  // who hands a stage back
  // Per tensor: the epilogue applies alpha s_A s_B. Block scaling: every K block's partial sums
  // are scaled by their blocks' factors when they are added into total; the epilogue applies alpha.
  const float scale = kBlock ? p.alpha : p.alpha * *p.scale_a * *p.scale_b;
  // Stagger: consumer 1 waits until consumer 0's first K block is done, so that their waits and
  // promotions need not fall together (measured +1-4% before the K loop lost its division, within
  // noise since; it costs one wait per kernel).
  bool hold = p.stagger != 0 && c == 0;  // consumer 0 still owes consumer 1 its arrival
  // Every consumer waits for phase 0, consumer 1 on stagger_bar + 8 (consumer 0's arrival),
  // everyone else on stagger_bar (complete from the start).
  sm90::mbar_wait(stagger_bar + (p.stagger != 0 && c == 1 ? 8 : 0), 0);
  float acc[R], total[R];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  int s = 0;
  uint32_t phase = 0;
  const void* const map_c_ptr = &map_c;
  // One tile of C at (m0, n0) with NI-wide wgmmas: NI = BN, or 128 for a 192 kernel's narrow last
  // column (p.narrow_edge), which then issues, promotes and stores only the first NI / 2 registers
  // of acc and total. The stages hold BN rows of B either way (TMA fills the rows past N with
  // zeros).
  auto run_tile = [&](auto ni, const int m0, const int n0) {
    constexpr int NI = decltype(ni)::value, RI = NI / 2;
#pragma unroll
    for (int i = 0; i < RI; ++i) total[i] = 0.0f;
    // Block scaling: this thread's rows 16 w + g and + 8 (the accumulator layout, see the
    // epilogue) take A factors at p.sa + oa0 / oa1 + kb sa_kstride; the tile's columns meet B
    // blocks n0 / 128 (ob0) and the next (ob1). A tile starting at an odd multiple of 64 (`half`,
    // only 192 kernels have them) has its first 64 columns in the first block, any other tile its
    // first 128. Offsets are int (the host checks that the scale arrays fit) and the bases stay in
    // the kernel parameters: this path must not cost the consumer registers it does not have.
    [[maybe_unused]] int oa0 = 0, oa1 = 0, ob0 = 0, ob1 = 0;
    [[maybe_unused]] bool half = false;
    if constexpr (kBlock) {
      const int r = m0 + 64 * c + 16 * (t / 32) + (t % 32) / 4;
      oa0 = (min(r, p.sa_rows - 1) / p.sa_div) * p.sa_ld;
      oa1 = (min(r + 8, p.sa_rows - 1) / p.sa_div) * p.sa_ld;
      if constexpr (!kCols) {
        const int cb = n0 / 128;
        ob0 = min(cb, p.sb_blocks - 1) * p.sb_ld;
        ob1 = min(cb + 1, p.sb_blocks - 1) * p.sb_ld;
        half = n0 % 128 != 0;
      }
    }
    // A promotion batch is promote_every K blocks: its first wgmma overwrites acc, its last is
    // followed by wait<0> and total += acc. Inside a batch, wait<1> after each block's wgmmas
    // lets the previous block's stage go back while this block's run.
    int pending = -1;  // a stage whose wgmmas were issued but not yet known to be done
    int in_batch = 0;  // K blocks of this promotion batch issued so far (no kb % promote_every:
                       // that division sat in every block's path to its first wgmma)
    for (int kb = 0; kb < nk; ++kb) {
      const bool fresh = in_batch == 0;
      const bool promote = in_batch == p.promote_every - 1 || kb == nk - 1;
      in_batch = promote ? 0 : in_batch + 1;
      sm90::mbar_wait(full0 + 8 * s, phase);
      sm90::fence();  // orders the last promotion's reads of acc before these wgmmas
      const uint32_t a = base + s * T::kStageBytes + c * (64 * kBK),
                     b = base + s * T::kStageBytes + T::kABytes;
#pragma unroll
      for (int kk = 0; kk < kBK / 32; ++kk)
        Fp8Mma<NI, FA, FB>::run(acc, sm90::desc_kmajor(a, kk), sm90::desc_kmajor(b, kk),
                                !fresh || kk > 0);
      sm90::commit();
      // Block kb's factors, loaded while its wgmmas run (L1 hits after a row's first block).
      [[maybe_unused]] float fa0 = 0.0f, fa1 = 0.0f, fb0 = 0.0f, fb1 = 0.0f;
      if constexpr (kBlock) {
        const int ka = kb * p.sa_kstride;
        fa0 = __ldg(p.sa + oa0 + ka);
        fa1 = __ldg(p.sa + oa1 + ka);
        if constexpr (!kCols) {
          const int kbb = kb * p.sb_kstride;
          fb0 = __ldg(p.sb + ob0 + kbb);
          fb1 = __ldg(p.sb + ob1 + kbb);
        }
      }
      // Once a stage's wgmmas are done reading it, one thread hands it back to the producer (with
      // column factors, after the promotion has read the stage's factors).
      if (promote) {
        sm90::wait<0>();
        sm90::fence_operands(acc);
        sm90::mbar_arrive_if(empty0 + 8 * pending, releaser && pending >= 0);
        if constexpr (!kCols) sm90::mbar_arrive_if(empty0 + 8 * s, releaser);
        pending = -1;
        if constexpr (kCols) {  // promote_every is 1 here: acc holds block kb alone
          promote_columns<NI>(total, acc, fa0, fa1, cols0 + s * T::kColBytes + 8 * (t % 4));
          // Each warp releases the stage once all its lanes have read the factors.
          __syncwarp();
          sm90::mbar_arrive_if(empty0 + 8 * s, releaser);
        } else if constexpr (kBlock) {  // promote_every is 1 here: acc holds block kb alone
          if (half) {
            promote_scaled<NI, 8>(total, acc, fa0 * fb0, fa0 * fb1, fa1 * fb0, fa1 * fb1);
          } else {
            promote_scaled<NI, 16>(total, acc, fa0 * fb0, fa0 * fb1, fa1 * fb0, fa1 * fb1);
          }
        } else {
#pragma unroll
          for (int i = 0; i < RI; ++i) total[i] += acc[i];
        }
      } else {
        sm90::wait<1>();
        sm90::mbar_arrive_if(empty0 + 8 * pending, releaser && pending >= 0);
        pending = s;
      }
      // An mbarrier, not a named barrier: bar.arrive in this loop makes ptxas serialise the
      // wgmmas (C7518).
      sm90::mbar_arrive_if(stagger_bar + 8, hold && t == 0);
      hold = false;
      if (++s == S) {
        s = 0;
        phase ^= 1;
      }
    }

    const int w = t / 32;
    if (p.tma_store) {
      // ---- epilogue through shared memory: each warp stages its 16 rows of scale * total as
      // bf16 in NI / 64 swizzled panels and stores them with TMA (rows and columns outside C are
      // dropped); the stores drain while the next tile's main loop runs. ----
      const uint32_t mine = c_tile + c * (BN / 64) * sm90::kSwPanelBytes;
      if (t % 32 == 0) sm90::bulk_wait_read();  // the previous tile's stores have read the panels
      __syncwarp();
#pragma unroll
      for (int i = 0; i < RI; ++i) total[i] *= scale;
      sm90::store_acc_bf16_sw128<NI / 8>(mine, total);
      sm90::fence_proxy();
      __syncwarp();
      if (t % 32 == 0) {
#pragma unroll
        for (int panel = 0; panel < NI / 64; ++panel)
          sm90::tma_store_2d(map_c_ptr, mine + panel * sm90::kSwPanelBytes + 16 * w * 128,
                             n0 + 64 * panel, m0 + 64 * c + 16 * w);
        sm90::bulk_commit();
      }
      return;
    }
    // ---- epilogue: C = scale * total (+ beta C), straight from the accumulator layout ----
    // Thread t = 32 w + 4 g + q holds rows 16 w + g (+ 8) and columns 8 j + 2 q, + 1.
    const int g = (t % 32) / 4, q = t % 4;
    float* const c32 = static_cast<float*>(p.c);
    __nv_bfloat16* const c16 = static_cast<__nv_bfloat16*>(p.c);
    // With beta != 0 each group of 8 column pairs reads all its old values before it stores:
    // loads interleaved with the stores wait for memory one by one (a store may alias the next
    // load). 16 registers: acc is not free here (reading it would serialise the wgmmas, C7514).
    constexpr int kGroup = 8;
    static_assert((NI / 8) % kGroup == 0, "column pairs come in whole groups");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + 64 * c + 16 * w + g + 8 * h;
      if (row >= p.m) continue;
      const int64_t row_off = static_cast<int64_t>(row) * p.n;
#pragma unroll
      for (int j0 = 0; j0 < NI / 8; j0 += kGroup) {
        float old[2 * kGroup];
#pragma unroll
        for (int jj = 0; jj < kGroup; ++jj) {
          const int col = n0 + 8 * (j0 + jj) + 2 * q;
          float2 o = make_float2(0.0f, 0.0f);
          if (p.beta != 0.0f && col < p.n) {
            o = p.c_f32 ? *reinterpret_cast<const float2*>(c32 + row_off + col)
                        : __bfloat1622float2(
                              *reinterpret_cast<const __nv_bfloat162*>(c16 + row_off + col));
          }
          old[2 * jj] = o.x;
          old[2 * jj + 1] = o.y;
        }
#pragma unroll
        for (int jj = 0; jj < kGroup; ++jj) {
          const int col = n0 + 8 * (j0 + jj) + 2 * q, i = 4 * (j0 + jj) + 2 * h;
          if (col >= p.n) continue;
          const float v0 = fmaf(p.beta, old[2 * jj], scale * total[i]),
                      v1 = fmaf(p.beta, old[2 * jj + 1], scale * total[i + 1]);
          if (p.c_f32) {
            *reinterpret_cast<float2*>(c32 + row_off + col) = make_float2(v0, v1);
          } else {
            *reinterpret_cast<__nv_bfloat162*>(c16 + row_off + col) = __floats2bfloat162_rn(v0, v1);
          }
        }
      }
    }
  };
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int2 o = tile_origin<BN>(p, tile);
    if constexpr (BN == 192) {
      if (p.narrow_edge && p.n - o.y <= 128) {
        run_tile(std::integral_constant<int, 128>{}, o.x, o.y);
        continue;
      }
    }
    run_tile(std::integral_constant<int, BN>{}, o.x, o.y);
  }
  if (hold && t == 0) sm90::mbar_arrive(stagger_bar + 8);  // consumer 0 ran no K block
  if (p.tma_store && t % 32 == 0) sm90::bulk_wait();  // the last stores, before shared memory goes
#else
  __trap();  // the host never launches it on a device without sm_90a code
#endif
}

// A K-major uint8 operand [rows, k] as a TMA map: boxes of 128 bytes of K x box_rows rows,
// 128-byte swizzle (the layout wgmma reads), zeros outside the tensor.
bool encode_operand(CUtensorMap* map, const void* codes, int64_t rows, int64_t k, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)},
                   elem[2] = {1, 1};
  return sm90::tensor_map_encoder()(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(codes),
                                    dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// C [m, n] bf16 for the TMA-store epilogue: boxes of 64 columns (128 bytes) x 16 rows (one warp's
// rows), 128-byte swizzle (store_acc_bf16_sw128's layout); rows and columns outside are dropped.
bool encode_output(CUtensorMap* map, void* c, int64_t m, int64_t n) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(n), static_cast<cuuint64_t>(m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(n) * 2};
  const cuuint32_t box[2] = {64, 16}, elem[2] = {1, 1};
  return sm90::tensor_map_encoder()(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, c, dims, strides, box,
                                    elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// B's 1x128 factors transposed, [nb, ld] fp32 (ld a multiple of 4: TMA's 16-byte row pitch), for
// the kColumnScale kernels: boxes of box_cols columns (a tile's) x 1 K block, zeros outside.
bool encode_column_factors(CUtensorMap* map, const float* f, int64_t nb, int64_t ld, int box_cols) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(ld), static_cast<cuuint64_t>(nb)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 4};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), 1}, elem[2] = {1, 1};
  return sm90::tensor_map_encoder()(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(f),
                                    dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// out[kb * ld + r] = in[r * nb + kb] (B's 1x128 factors, K block major), zero for rows >= rows.
__global__ void column_factors_kernel(float* out, int64_t ld, int64_t rows, int64_t nb,
                                      const float* in) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= ld * nb) return;
  const int64_t kb = i / ld, r = i % ld;
  out[i] = r < rows ? in[r * nb + kb] : 0.0f;
}

struct Fp8Maps {
  CUtensorMap a{}, b{}, c{};  // c: only read with args.tma_store
  CUtensorMap sb{};           // only read by the kColumnScale kernels
};

// A persistent grid: one CTA per SM (at most one per tile).
template <int BN, Fp8Format FA, Fp8Format FB, int kScale>
void launch_fp8(const Fp8GemmArgs& args, const Fp8Maps& maps) {
  using T = Fp8Tiles<BN>;
  constexpr bool cols = kScale == kColumnScale;
  auto kernel = gemm_fp8_sm90_kernel<BN, FA, FB, kScale>;
  static std::once_flag once[64];
  std::call_once(once[cuda_current_device() % 64], [&] {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    std::max(T::smem_bytes(false, cols), T::smem_bytes(true, cols))));
  });
  const int grid = std::min(args.tiles_m * args.tiles_n, ops_cuda::sm_count());
  kernel<<<grid, kThreads, T::smem_bytes(args.tma_store != 0, cols), cuda_stream()>>>(
      args, maps.a, maps.b, maps.c, maps.sb);
  CUDA_CHECK_LAUNCH("gemm_fp8_lasp");
}

template <int BN, int kScale>
void launch_formats(const Fp8GemmArgs& args, Fp8Format fa, Fp8Format fb, const Fp8Maps& maps) {
  using F = Fp8Format;
  if (fa == F::E4M3 && fb == F::E4M3) return launch_fp8<BN, F::E4M3, F::E4M3, kScale>(args, maps);
  if (fa == F::E4M3 && fb == F::E5M2) return launch_fp8<BN, F::E4M3, F::E5M2, kScale>(args, maps);
  if (fa == F::E5M2 && fb == F::E4M3) return launch_fp8<BN, F::E5M2, F::E4M3, kScale>(args, maps);
  return launch_fp8<BN, F::E5M2, F::E5M2, kScale>(args, maps);
}

}  // namespace

bool gemm_fp8_lasp_available() {
  static int cached[64] = {0};  // per device: 0 unknown, 1 yes, 2 no
  const int dev = cuda_current_device();
  if (dev >= 0 && dev < 64 && cached[dev] != 0) return cached[dev] == 1;
  int major = 0, minor = 0, compiled = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  CUDA_CHECK(cudaMemcpyFromSymbol(&compiled, fp8_sm90_compiled, sizeof(int)));
  const bool yes =
      major == 9 && minor == 0 && compiled == 1 && sm90::tensor_map_encoder() != nullptr;
  if (dev >= 0 && dev < 64) cached[dev] = yes ? 1 : 2;
  return yes;
}

// Operands: contiguous [m, k] / [n, k] codes (m, n, k possibly padded beyond a.rows(), b.rows(),
// a.cols()) with k % 16 == 0 and 16-byte aligned data (TMA's rules; gemm_fp8_cuda pads anything
// else), C contiguous [m, n] with n even; scales and scaling modes from a and b.
void gemm_fp8_lasp_run(void* c, bool c_f32, int64_t m, int64_t n, int64_t k, const void* a_codes,
                       const QuantizedFp8& a, const void* b_codes, const QuantizedFp8& b,
                       float alpha, float beta, const Fp8KernelConfig& cfg) {
  LASP_CHECK(gemm_fp8_lasp_available()) << "gemm_fp8_lasp: needs a compute capability 9.0 GPU, "
                                           "code built for sm_90a and a driver with "
                                           "cuTensorMapEncodeTiled";
  LASP_CHECK(k % 16 == 0 && n % 2 == 0 && reinterpret_cast<uintptr_t>(a_codes) % 16 == 0 &&
             reinterpret_cast<uintptr_t>(b_codes) % 16 == 0)
      << "gemm_fp8_lasp: internal error, unaligned problem m=" << m << " n=" << n << " k=" << k;
  LASP_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31))
      << "gemm_fp8_lasp: dims must fit int32, got " << m << " x " << n << " x " << k;
  const bool block = a.scaling != Fp8Scaling::PerTensor || b.scaling != Fp8Scaling::PerTensor;
  const bool cols = b.scaling == Fp8Scaling::Block1x128;  // one factor per column of C
  const int bn = cfg.tile_n != 0 ? cfg.tile_n : 192;  // 192 ran faster on every shape measured
  LASP_CHECK(bn == 128 || bn == 192)
      << "gemm_fp8_lasp: tile_n must be 128 or 192, got " << cfg.tile_n;
  LASP_CHECK(cfg.promote_every >= 1)
      << "gemm_fp8_lasp: promote_every must be >= 1, got " << cfg.promote_every;
  LASP_CHECK(!block || cfg.promote_every == 1)
      << "gemm_fp8_lasp: block scaling promotes every K block of 128 (promote_every 1, no fast "
         "accumulation), got promote_every "
      << cfg.promote_every;
  auto tri = [](int v) { return v >= -1 && v <= 1; };
  LASP_CHECK(tri(cfg.stagger) && tri(cfg.tma_store) && tri(cfg.narrow_edge))
      << "gemm_fp8_lasp: stagger, tma_store and narrow_edge must be -1, 0 or 1, got " << cfg.stagger
      << ", " << cfg.tma_store << ", " << cfg.narrow_edge;
  // The TMA-store epilogue writes bf16 C with beta = 0 and needs TMA's 16-byte row pitch and
  // alignment; anything else stores from registers.
  const bool tma_store = cfg.tma_store != 0 && !c_f32 && beta == 0.0f && n % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(c) % 16 == 0;
  Fp8Maps maps;
  LASP_CHECK(encode_operand(&maps.a, a_codes, m, k, kBM) &&
             encode_operand(&maps.b, b_codes, n, k, bn) &&
             (!tma_store || encode_output(&maps.c, c, m, n)))
      << "gemm_fp8_lasp: the driver refused a tensor map for m=" << m << " n=" << n << " k=" << k;
  Fp8GemmArgs args;
  args.c = c;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.c_f32 = c_f32 ? 1 : 0;
  args.alpha = alpha;
  args.beta = beta;
  args.scale_a = a.scales.data<float>();
  args.scale_b = b.scales.data<float>();
  if (block) {
    // Blocks along K: ceil(cols / 128) of the unpadded operand (padding K to 16 adds none).
    const int nb = static_cast<int>((a.cols() + kBK - 1) / kBK);
    LASP_CHECK(nb == (k + kBK - 1) / kBK && a.rows() >= 1 && b.rows() >= 1)
        << "gemm_fp8_lasp: internal error, " << nb << " scale blocks for k=" << k;
    LASP_CHECK(a.scales.numel() < (int64_t{1} << 31) && b.scales.numel() < (int64_t{1} << 31))
        << "gemm_fp8_lasp: block scale arrays must have fewer than 2^31 entries, got "
        << a.scales.numel() << " and " << b.scales.numel();
    args.sa = a.scales.data<float>();
    args.sa_rows = static_cast<int>(a.rows());
    if (a.scaling != Fp8Scaling::PerTensor) {
      args.sa_div = a.scaling == Fp8Scaling::Block128x128 ? 128 : 1;
      args.sa_ld = nb;
      args.sa_kstride = 1;
    }
    args.sb = b.scales.data<float>();
    args.sb_blocks = static_cast<int>((b.rows() + 127) / 128);
    if (b.scaling == Fp8Scaling::Block128x128) {
      args.sb_ld = nb;
      args.sb_kstride = 1;
    }
  }
  // A 1x128 B: its factors K block major ([nb, n], n a multiple of 16 here: gemm_fp8_cuda pads
  // N to 16), so that one K block's factors of a tile's columns are one TMA box. The copy lives
  // until the kernel has run (the allocator orders reuse on the stream).
  Tensor col_factors;
  if (cols) {
    const int64_t nb = (k + kBK - 1) / kBK;
    col_factors = Tensor::empty({nb, n}, DType::F32, b.scales.device());
    column_factors_kernel<<<static_cast<unsigned>((nb * n + 255) / 256), 256, 0, cuda_stream()>>>(
        col_factors.data<float>(), n, b.rows(), nb, b.scales.data<float>());
    CUDA_CHECK_LAUNCH("gemm_fp8_lasp (column factors)");
    LASP_CHECK(n % 4 == 0 && encode_column_factors(&maps.sb, col_factors.data<float>(), nb, n, bn))
        << "gemm_fp8_lasp: the driver refused the column factors' tensor map for n=" << n
        << " k=" << k;
  }
  args.tiles_m = static_cast<int>((m + kBM - 1) / kBM);
  args.tiles_n = static_cast<int>((n + bn - 1) / bn);
  args.promote_every = cfg.promote_every;
  args.stagger = cfg.stagger != 0 ? 1 : 0;
  args.tma_store = tma_store ? 1 : 0;
  // A last column of 192-wide tiles with at most 128 columns runs 128-wide (and the columns
  // rotate); the default.
  args.narrow_edge = cfg.narrow_edge != 0 && fp8tiles::narrow_edge(static_cast<int>(n), bn) ? 1 : 0;
  args.stages = bn == 128 ? Fp8Tiles<128>::stages(tma_store, cols)
                          : Fp8Tiles<192>::stages(tma_store, cols);
  const Fp8Format fa = a.format, fb = b.format;
  const int kind = cols ? kColumnScale : block ? kBlockScale : kTensorScale;
  if (bn == 128) {
    kind == kColumnScale  ? launch_formats<128, kColumnScale>(args, fa, fb, maps)
    : kind == kBlockScale ? launch_formats<128, kBlockScale>(args, fa, fb, maps)
                          : launch_formats<128, kTensorScale>(args, fa, fb, maps);
  } else {
    kind == kColumnScale  ? launch_formats<192, kColumnScale>(args, fa, fb, maps)
    : kind == kBlockScale ? launch_formats<192, kBlockScale>(args, fa, fb, maps)
                          : launch_formats<192, kTensorScale>(args, fa, fb, maps);
  }
}

}  // namespace lasp
