// `lasp bench ops`: times the model's small CUDA ops (kernels/ops.h) at the Linear-Llama3-1B
// shapes (T = 16384 tokens, hidden 2048, SwiGLU 8192, 179 parameters of 1.6 G fp32 values)
// against the memory floor: bytes each op must move / HBM bandwidth measured with a 2 GiB
// device-to-device copy. Prints one table: op, shape, time, bytes, floor, time / floor.
//   --iters N   timed runs per row (default 10), --warmup N (default 2)
//   --quick     skips the whole-parameter rows (28 GB of optimizer state)
// Returns 0 on success, non-zero (with a message) in a CPU-only build or without a GPU.
#pragma once

namespace lasp {

int bench_ops_main(int argc, char** argv);

}  // namespace lasp
