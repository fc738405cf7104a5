// Runs the kernel benchmark when LASP_BENCH_ARGS is set (scripts/device_check.sh does, until the
// `lasp bench kernels` CLI exists); skipped otherwise, so `ctest -L gpu` stays fast.
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "launch/bench_kernels.h"

namespace lasp {
namespace {

TEST(BenchKernels, RunsToCompletionWhenAskedThroughLaspBenchArgs) {
  const char* env = std::getenv("LASP_BENCH_ARGS");
  if (!env) GTEST_SKIP() << "set LASP_BENCH_ARGS (e.g. \"--csv bench.csv\") to run the benchmark";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU";
  std::vector<std::string> args;
  std::istringstream is(env);
  for (std::string a; is >> a;) args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  EXPECT_EQ(bench_kernels_main(static_cast<int>(argv.size()), argv.data()), 0);
}

}  // namespace
}  // namespace lasp
