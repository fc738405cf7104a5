// `lasp bench kernels`: times the CUDA kernels against their physical floors.
//
// First measures HBM bandwidth with a large device-to-device copy (bytes read + written), then
// prints one table per op: shape, median time over --iters runs after --warmup runs (CUDA
// events), the floor (bytes / measured bandwidth for linear attention, flops / 790 TFLOP/s for
// bf16 GEMM) and time / floor.
//   --csv PATH     also write every row as CSV (op,shape,time_ms,floor_ms,ratio)
//   --iters N      timed runs per row (default 10), --warmup N (default 3)
//   --quick        smaller sizes (T up to 65536, GEMM 4096^3) for smoke runs
//   --only SECTION gemm, linear or attention: just that table (after the bandwidth copy)
// Softmax attention is timed on each path (LASP_ATTENTION=cudnn when cuDNN is built in, then
// own); scripts/bench_sdpa.py times PyTorch's SDPA on the same shapes and FLOP convention.
// Returns 0 on success, non-zero (with a message) in a CPU-only build or without a GPU.
#pragma once

namespace lasp {

int bench_kernels_main(int argc, char** argv);

}  // namespace lasp
