// Shared pieces of the CUDA benchmarks (`lasp bench kernels`, `lasp bench lowp`).
#pragma once

#ifdef LASP_HAVE_CUDA

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace lasp {

// Median time in ms of fn() over `iters` runs after `warmup` runs, each bracketed by CUDA events
// on the current stream.
double median_event_ms(const std::function<void()>& fn, int iters, int warmup);

// The same for several functions measured in turn: `warmup` rounds, then `rounds` rounds that each
// time every function once; one median per function. Clock and power drift during the
// measurement then weigh on every function alike, where timing them one after the other would
// give the later ones the later (often slower) clocks.
// reps > 1: each sample is `reps` calls queued back to back (the time per call), so the GPU never
// waits for the host between them, as in a training step; reps = 1 times one call on an idle GPU,
// which includes the host's time to issue it.
std::vector<double> median_event_ms_interleaved(const std::vector<std::function<void()>>& fns,
                                                int rounds, int warmup, int reps = 1);

// The same (reps = 1) with every timed call queued behind a memset of 256 MiB: the start event is
// recorded while the GPU is still busy with it, so neither the host's time to issue fn nor the
// launch latency is counted, and fn starts on a cold L2 (the memset evicted its operands) —
// the GPU time of the call, as Triton's do_bench and nvbench's cold runs measure it.
std::vector<double> median_event_ms_queued(const std::vector<std::function<void()>>& fns,
                                           int rounds, int warmup);

// The same (reps = 1) with every timed call queued behind a kernel that spins for 50 us on one
// thread (nvbench's blocking kernel): the host has issued fn before the GPU reaches the start
// event, so the host's time and the launch latency are not counted, and fn's operands stay as warm
// in L2 as the previous round left them — the GPU time of a call inside a busy stream.
std::vector<double> median_event_ms_blocked(const std::vector<std::function<void()>>& fns,
                                            int rounds, int warmup);

// The wall clock as HH:MM:SS.mmm (UTC), to line benchmark rows up with a clock/power log
// (scripts/device_check.sh samples nvidia-smi during `lasp bench lowp`).
std::string utc_clock();

// Queues a one-thread kernel that spins for about ns nanoseconds on the current stream.
void stream_spin_ns(int64_t ns);

// The SM clock in MHz right after the work queued so far on the current stream: a one-thread
// kernel counts SM cycles over ns nanoseconds of the global timer (clock changes take
// milliseconds, so it reads the clock the preceding work ran at). Synchronises the stream.
double stream_sm_clock_mhz(int64_t ns = 100000);

// Host time in microseconds to issue one call of fn (mean over `calls`, the GPU kept busy).
double host_issue_us(const std::function<void()>& fn, int calls);

// A bf16 CUDA tensor of N(0, stddev) values (one random block of up to 16 M values, tiled).
Tensor random_bf16_cuda(const Shape& shape, double stddev, uint32_t seed);

}  // namespace lasp

#endif  // LASP_HAVE_CUDA
