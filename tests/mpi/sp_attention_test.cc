// Sequence-parallel softmax attention (LASP-2H for lasp2 / lasp1 / allgather_kv, Ring Attention
// for ring) against the single-process kernel on the full sequence.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "kernels/attention.h"
#include "mpi_test_util.h"
#include "parallel/comm.h"
#include "parallel/sequence_parallel.h"

namespace lasp {
namespace {

using testing::random_tensor;
using testing::scaled_max_error;
using testing::take_rows;

struct AttnCase {
  SpMethod method;
  bool zigzag;
  DType dtype;
};

std::string case_name(const AttnCase& c) {
  return std::string(sp_method_name(c.method)) + (c.zigzag ? "_zigzag_" : "_contiguous_") +
         dtype_name(c.dtype);
}

void check_attention_case(const AttnCase& c, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t local_len) {
  Comm& comm = world();
  const uint64_t seed = testing::shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " (LASP_TEST_SEED), case " + case_name(c) +
               ", world " + std::to_string(comm.size()));
  std::mt19937_64 rng(seed);
  const int64_t T = local_len * comm.size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const Tensor q = random_tensor(rng, {B, T, Hq, D}, c.dtype, -2, 2);
  const Tensor k = random_tensor(rng, {B, T, Hkv, D}, c.dtype, -2, 2);
  const Tensor v = random_tensor(rng, {B, T, Hkv, D}, c.dtype);
  const Tensor d_o = random_tensor(rng, {B, T, Hq, D}, c.dtype);

  Tensor o_ref = Tensor::empty(q.shape(), c.dtype), lse_ref = Tensor::empty({B, Hq, T}, c.dtype);
  attention_forward(o_ref, lse_ref, q, k, v, scale, true, 0);
  Tensor dq_ref = Tensor::empty(q.shape(), c.dtype), dk_ref = Tensor::empty(k.shape(), c.dtype),
         dv_ref = Tensor::empty(v.shape(), c.dtype);
  attention_backward(dq_ref, dk_ref, dv_ref, q, k, v, o_ref, lse_ref, d_o, scale, true, 0);

  SpContext ctx{&comm, c.method, c.zigzag};
  const std::vector<int64_t> pos = sp_local_positions(ctx, local_len);
  const Tensor ql = take_rows(q, pos), kl = take_rows(k, pos), vl = take_rows(v, pos);
  const Tensor dol = take_rows(d_o, pos);
  Tensor o = Tensor::empty(ql.shape(), c.dtype);
  SpSaved saved;
  sp_attention_forward(ctx, o, ql, kl, vl, scale, saved);
  Tensor dq = Tensor::empty(ql.shape(), c.dtype), dk = Tensor::empty(kl.shape(), c.dtype),
         dv = Tensor::empty(vl.shape(), c.dtype);
  sp_attention_backward(ctx, dq, dk, dv, ql, kl, vl, o, dol, scale, saved);

  const double tol = testing::tolerance(c.dtype);
  EXPECT_LE(scaled_max_error(o, take_rows(o_ref, pos)), tol) << "output";
  EXPECT_LE(scaled_max_error(dq, take_rows(dq_ref, pos)), tol) << "dq";
  EXPECT_LE(scaled_max_error(dk, take_rows(dk_ref, pos)), tol) << "dk";
  EXPECT_LE(scaled_max_error(dv, take_rows(dv_ref, pos)), tol) << "dv";
}

class SpAttention : public ::testing::TestWithParam<AttnCase> {};

TEST_P(SpAttention, ForwardAndEveryGradientMatchSingleRankForAnyWorldSize) {
  const AttnCase c = GetParam();
  // Grouped-query heads (4 query heads on 2 kv heads), odd head dim and odd chunk lengths.
  check_attention_case(c, /*B=*/2, /*Hq=*/4, /*Hkv=*/2, /*D=*/5, c.zigzag ? 6 : 5);
}

std::vector<AttnCase> all_attention_cases() {
  std::vector<AttnCase> cases;
  for (SpMethod m : {SpMethod::Lasp2, SpMethod::Lasp1, SpMethod::Ring, SpMethod::AllGatherKV})
    for (bool z : {false, true})
      for (DType t : {DType::F64, DType::F32}) cases.push_back({m, z, t});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllMethods, SpAttention, ::testing::ValuesIn(all_attention_cases()),
                         [](const ::testing::TestParamInfo<AttnCase>& i) { return case_name(i.param); });

TEST(SpAttentionComm, Lasp2HGathersKVOnceAndReduceScattersGradientsOnce) {
  Comm& comm = world();
  const int64_t B = 1, Hq = 2, Hkv = 1, D = 3, L = 4;
  std::mt19937_64 rng(testing::shared_seed());
  const Tensor q = random_tensor(rng, {B, L, Hq, D}, DType::F64);
  const Tensor k = random_tensor(rng, {B, L, Hkv, D}, DType::F64);
  SpContext ctx{&comm, SpMethod::AllGatherKV, false};
  Tensor o = Tensor::empty(q.shape(), DType::F64);
  SpSaved saved;
  comm.reset_counters();
  sp_attention_forward(ctx, o, q, k, k, 0.5f, saved);
  EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 1);
  EXPECT_EQ(comm.counter(CommOp::AllGather).bytes, 2 * B * L * Hkv * D * 8);
  comm.reset_counters();
  Tensor dq = Tensor::empty(q.shape(), DType::F64), dk = Tensor::empty(k.shape(), DType::F64),
         dv = Tensor::empty(k.shape(), DType::F64);
  sp_attention_backward(ctx, dq, dk, dv, q, k, k, o, o, 0.5f, saved);
  EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 1);
  EXPECT_EQ(comm.counter(CommOp::ReduceScatter).calls, 1);
  EXPECT_EQ(comm.counter(CommOp::ReduceScatter).bytes, comm.size() * 2 * B * L * Hkv * D * 8);
}

TEST(SpAttentionComm, RingPassesBlocksWorldMinusOneTimesForwardAndWorldTimesBackward) {
  Comm& comm = world();
  std::mt19937_64 rng(testing::shared_seed());
  SpContext ctx{&comm, SpMethod::Ring, true};
  const Tensor q2 = random_tensor(rng, {1, 4, 2, 2}, DType::F64);
  Tensor o = Tensor::empty(q2.shape(), DType::F64);
  SpSaved saved;
  comm.reset_counters();
  sp_attention_forward(ctx, o, q2, q2, q2, 1.0f, saved);
  EXPECT_EQ(comm.counter(CommOp::SendRecv).calls, comm.size() - 1);
  comm.reset_counters();
  Tensor dq = o.clone(), dk = o.clone(), dv = o.clone();
  sp_attention_backward(ctx, dq, dk, dv, q2, q2, q2, o, o, 1.0f, saved);
  EXPECT_EQ(comm.counter(CommOp::SendRecv).calls, comm.size() > 1 ? comm.size() : 0);
}

}  // namespace
}  // namespace lasp
