// Runs a benchmark through the GPU test binary when its environment variable is set (the value:
// the benchmark's arguments), e.g. LASP_BENCH_ARGS="--csv bench.csv" for `lasp bench kernels` and
// LASP_BENCH_OPS="--iters 10" for `lasp bench ops`; scripts/device_check.sh falls back to this when
// the `lasp` binary did not build. Skipped otherwise, so `ctest -L gpu` stays fast.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "launch/bench_kernels.h"
#include "launch/bench_ops.h"

namespace lasp {
namespace {

// Splits the variable's value into arguments and returns the benchmark's exit code; skips the
// test when the variable is unset or there is no GPU.
void run_bench_from_env(const char* var, const std::function<int(int, char**)>& bench_main) {
  const char* env = std::getenv(var);
  if (!env) GTEST_SKIP() << "set " << var << " to the benchmark's arguments to run it";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU";
  std::vector<std::string> args;
  std::istringstream is(env);
  for (std::string a; is >> a;) args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  EXPECT_EQ(bench_main(static_cast<int>(argv.size()), argv.data()), 0) << var << "=" << env;
}

TEST(BenchKernels, RunsToCompletionWhenAskedThroughLaspBenchArgs) {
  run_bench_from_env("LASP_BENCH_ARGS", bench_kernels_main);
}

TEST(BenchOps, RunsToCompletionWhenAskedThroughLaspBenchOps) {
  run_bench_from_env("LASP_BENCH_OPS", bench_ops_main);
}

}  // namespace
}  // namespace lasp
