// Runs the small-op benchmark when LASP_BENCH_OPS is set (its value: the arguments, e.g. "--quick"
// or "--iters 10"), until `lasp bench ops` is wired; skipped otherwise, so `ctest -L gpu` stays
// fast.
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "launch/bench_ops.h"

namespace lasp {
namespace {

TEST(BenchOps, RunsToCompletionWhenAskedThroughLaspBenchOps) {
  const char* env = std::getenv("LASP_BENCH_OPS");
  if (!env) GTEST_SKIP() << "set LASP_BENCH_OPS (e.g. \"--iters 10\") to run the benchmark";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU";
  std::vector<std::string> args;
  std::istringstream is(env);
  for (std::string a; is >> a;) args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  EXPECT_EQ(bench_ops_main(static_cast<int>(argv.size()), argv.data()), 0);
}

}  // namespace
}  // namespace lasp
