// `lasp bench sp`: sequence-parallel methods x sequence lengths -> tokens/s, step time, peak
// memory and the share of time in communication. Run it under mpirun -np W (parallel.sp = W).
#pragma once

namespace lasp {

int bench_sp_main(int argc, char** argv);

}  // namespace lasp
