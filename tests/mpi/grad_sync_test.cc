// Bucketed gradient all-reduce: sums (or averages) every tensor, in as many buckets as asked.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "mpi_test_util.h"
#include "parallel/grad_sync.h"

namespace lasp {
namespace {

struct GradSet {
  std::vector<Tensor> grads;          // this rank's
  std::vector<std::vector<double>> sum;  // over every rank
};

// Rank-dependent gradients of odd sizes and mixed dtypes; every rank also builds every other
// rank's values from the shared seed, so the expected sum is computed independently.
GradSet make_grads(uint64_t seed, const std::vector<int64_t>& sizes, const std::vector<DType>& dts) {
  GradSet s;
  const int W = world().size();
  for (size_t i = 0; i < sizes.size(); ++i) s.sum.emplace_back(sizes[i], 0.0);
  for (int r = 0; r < W; ++r) {
    std::mt19937_64 rng(seed + 1000 * r);
    std::uniform_int_distribution<int> u(-20, 20);  // small integers: exact sums in every dtype
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor t = Tensor::empty({sizes[i]}, dts[i]);
      for (int64_t j = 0; j < sizes[i]; ++j) {
        const double x = u(rng) / 4.0;
        t.set_item(j, x);
        s.sum[i][j] += x;
      }
      if (r == world().rank()) s.grads.push_back(t);
    }
  }
  return s;
}

TEST(AllReduceGradients, SumsEveryTensorAcrossBuckets) {
  Comm& c = world();
  const uint64_t seed = testing::shared_seed();
  const std::vector<int64_t> sizes = {7, 1, 33, 5, 64, 3};
  const std::vector<DType> dts = {DType::F32, DType::F32, DType::F32, DType::F64, DType::F64, DType::BF16};
  GradSet s = make_grads(seed, sizes, dts);
  c.reset_counters();
  all_reduce_gradients(c, s.grads, /*bucket_bytes=*/128, /*average=*/false);
  // Buckets: {7,1} f32 (32 B; +33*4 would pass 128), {33} f32, {5} f64 (64*8 > 128 alone),
  // {64} f64, {3} bf16.
  EXPECT_EQ(c.counter(CommOp::AllReduce).calls, 5);
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t j = 0; j < sizes[i]; ++j) EXPECT_EQ(s.grads[i].item(j), s.sum[i][j]) << i << "," << j;
}

TEST(AllReduceGradients, AveragesWhenAsked) {
  Comm& c = world();
  const uint64_t seed = testing::shared_seed();
  const std::vector<int64_t> sizes = {9, 4, 17};
  const std::vector<DType> dts = {DType::F64, DType::F64, DType::F32};
  GradSet s = make_grads(seed, sizes, dts);
  all_reduce_gradients(c, s.grads, /*bucket_bytes=*/1 << 20, /*average=*/true);
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t j = 0; j < sizes[i]; ++j)
      EXPECT_NEAR(s.grads[i].item(j), s.sum[i][j] / c.size(), 1e-6) << i << "," << j;
}

TEST(AllReduceGradients, RejectsBadInput) {
  Comm& c = world();
  std::vector<Tensor> ints = {Tensor::zeros({3}, DType::I32)};
  EXPECT_THROW(all_reduce_gradients(c, ints, 64, /*average=*/true), Error);
  std::vector<Tensor> undefined = {Tensor()};
  EXPECT_THROW(all_reduce_gradients(c, undefined, 64, false), Error);
  std::vector<Tensor> ok = {Tensor::zeros({3}, DType::F32)};
  EXPECT_THROW(all_reduce_gradients(c, ok, 0, false), Error);
}

}  // namespace
}  // namespace lasp
