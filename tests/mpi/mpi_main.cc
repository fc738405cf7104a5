// GoogleTest main for the multi-rank tests (run under mpirun with any number of ranks).
// Every rank runs every test; rank 0 prints the usual output, other ranks print only their
// failures (prefixed with the rank). The exit code is non-zero when any rank failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "core/log.h"
#include "parallel/comm.h"

namespace {

// Prints failed assertions of a non-zero rank, so a failure there is never silent.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  lasp::init_distributed(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  lasp::set_log_quiet(true);
  // A test that hangs in a collective ends the job instead of the CTest timeout.
  if (!std::getenv("LASP_COMM_TIMEOUT")) lasp::set_comm_timeout(120);
  lasp::Comm& world = lasp::world();
  if (world.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(world.rank()));
  }
  const int local = RUN_ALL_TESTS();
  lasp::Tensor failed = lasp::Tensor::zeros({1}, lasp::DType::I32);
  failed.data<int32_t>()[0] = local != 0 ? 1 : 0;
  world.all_reduce_sum(failed);
  const int failed_ranks = failed.data<int32_t>()[0];
  if (world.rank() == 0) {
    std::printf("[mpi] %d rank(s), %d with failures\n", world.size(), failed_ranks);
  }
  lasp::finalize_distributed();
  return failed_ranks > 0 ? 1 : 0;
}
