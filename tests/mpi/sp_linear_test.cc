// Sequence-parallel linear attention (LASP-2, LASP-1, Ring, all-gather-KV = LASP-2) against the
// single-process kernel on the full sequence: every rank builds the same random full inputs,
// computes the full reference itself, runs the distributed layer on its slice and compares.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <tuple>

#include "kernels/linear_attention.h"
#include "mpi_test_util.h"
#include "parallel/comm.h"
#include "parallel/sequence_parallel.h"

namespace lasp {
namespace {

using testing::random_tensor;
using testing::scaled_max_error;
using testing::take_rows;

struct LinearCase {
  SpMethod method;
  bool zigzag;
  DecayMode decay;
  DType dtype;
  bool overlap = false;  // LASP-2's overlapped schedule (SpContext::overlap)
};

std::string case_name(const LinearCase& c) {
  return std::string(sp_method_name(c.method)) + (c.overlap ? "_overlap" : "") +
         (c.zigzag ? "_zigzag_" : "_contiguous_") + decay_mode_name(c.decay) + "_" + dtype_name(c.dtype);
}

// Runs one case with B batches, H heads, head dim D, `local_len` tokens per rank, kernel chunk.
void check_linear_case(const LinearCase& c, int64_t B, int64_t H, int64_t D, int64_t local_len,
                       int chunk, double min_log_decay = -0.6) {
  Comm& comm = world();
  const uint64_t seed = testing::shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " (LASP_TEST_SEED), case " + case_name(c) +
               ", world " + std::to_string(comm.size()));
  std::mt19937_64 rng(seed);
  const int64_t T = local_len * comm.size();
  const Tensor q = random_tensor(rng, {B, T, H, D}, c.dtype);
  const Tensor k = random_tensor(rng, {B, T, H, D}, c.dtype);
  const Tensor v = random_tensor(rng, {B, T, H, D}, c.dtype);
  const Tensor d_o = random_tensor(rng, {B, T, H, D}, c.dtype);
  Decay full_decay;
  full_decay.mode = c.decay;
  if (c.decay == DecayMode::Constant) full_decay.per_head = random_tensor(rng, {H}, c.dtype, -0.4, -0.01);
  if (c.decay == DecayMode::DataDependent)
    full_decay.per_token = random_tensor(rng, {B, T, H}, c.dtype, min_log_decay, 0.0);
  const bool data = c.decay == DecayMode::DataDependent;

  // Reference: the kernel on the whole sequence.
  Tensor o_ref = Tensor::empty({B, T, H, D}, c.dtype), none;
  linear_attention_forward(o_ref, none, q, k, v, full_decay, Tensor(), chunk);
  Tensor dq_ref = Tensor::empty(q.shape(), c.dtype), dk_ref = Tensor::empty(q.shape(), c.dtype),
         dv_ref = Tensor::empty(q.shape(), c.dtype);
  Tensor dl_ref = data ? Tensor::empty({B, T, H}, c.dtype) : Tensor();
  linear_attention_backward(dq_ref, dk_ref, dv_ref, dl_ref, none, q, k, v, full_decay, Tensor(),
                            d_o, Tensor(), chunk);

  // Distributed.
  SpContext ctx{&comm, c.method, c.zigzag, c.overlap};
  const std::vector<int64_t> pos = sp_local_positions(ctx, local_len);
  Decay decay = full_decay;
  if (data) decay.per_token = take_rows(full_decay.per_token, pos);
  const Tensor ql = take_rows(q, pos), kl = take_rows(k, pos), vl = take_rows(v, pos);
  const Tensor dol = take_rows(d_o, pos);
  Tensor o = Tensor::empty(ql.shape(), c.dtype);
  SpSaved saved;
  sp_linear_attention_forward(ctx, o, ql, kl, vl, decay, saved, chunk);
  Tensor dq = Tensor::empty(ql.shape(), c.dtype), dk = Tensor::empty(ql.shape(), c.dtype),
         dv = Tensor::empty(ql.shape(), c.dtype);
  Tensor dl = data ? Tensor::empty({B, local_len, H}, c.dtype) : Tensor();
  sp_linear_attention_backward(ctx, dq, dk, dv, dl, ql, kl, vl, decay, saved, dol, chunk);

  const double tol = testing::tolerance(c.dtype);
  EXPECT_LE(scaled_max_error(o, take_rows(o_ref, pos)), tol) << "output";
  EXPECT_LE(scaled_max_error(dq, take_rows(dq_ref, pos)), tol) << "dq";
  EXPECT_LE(scaled_max_error(dk, take_rows(dk_ref, pos)), tol) << "dk";
  EXPECT_LE(scaled_max_error(dv, take_rows(dv_ref, pos)), tol) << "dv";
  if (data) {
    EXPECT_LE(scaled_max_error(dl, take_rows(dl_ref, pos)), tol) << "d_log_decay";
  }
}

class SpLinear : public ::testing::TestWithParam<LinearCase> {};

TEST_P(SpLinear, ForwardAndEveryGradientMatchSingleRankForAnyWorldSize) {
  const LinearCase c = GetParam();
  // Odd sizes: head dim 3, local length 7 (contiguous) or 2 x 3 (zigzag), kernel chunk 2 so
  // chunks straddle nothing in particular.
  check_linear_case(c, /*B=*/2, /*H=*/2, /*D=*/3, c.zigzag ? 6 : 7, /*chunk=*/2);
}

std::vector<LinearCase> all_linear_cases() {
  std::vector<LinearCase> cases;
  for (SpMethod m : {SpMethod::Lasp2, SpMethod::Lasp1, SpMethod::Ring, SpMethod::AllGatherKV})
    for (bool z : {false, true})
      for (DecayMode d : {DecayMode::None, DecayMode::Constant, DecayMode::DataDependent})
        for (DType t : {DType::F64, DType::F32}) cases.push_back({m, z, d, t});
  // LASP-2 with the state gather overlapped with the local attention.
  for (bool z : {false, true})
    for (DecayMode d : {DecayMode::None, DecayMode::Constant, DecayMode::DataDependent})
      for (DType t : {DType::F64, DType::F32}) cases.push_back({SpMethod::Lasp2, z, d, t, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllMethods, SpLinear, ::testing::ValuesIn(all_linear_cases()),
                         [](const ::testing::TestParamInfo<LinearCase>& i) { return case_name(i.param); });

TEST(SpLinearShapes, LongerSequencesWithKernelChunksSpanningRanksMatchSingleRank) {
  // Local length 10 with kernel chunk 4: kernel chunks end mid-rank; bigger head dim.
  check_linear_case({SpMethod::Lasp2, true, DecayMode::DataDependent, DType::F64}, 1, 3, 4, 10, 4);
  check_linear_case({SpMethod::Lasp1, false, DecayMode::DataDependent, DType::F64}, 1, 3, 4, 10, 4);
  check_linear_case({SpMethod::Ring, true, DecayMode::Constant, DType::F64}, 1, 3, 4, 10, 4);
  check_linear_case({SpMethod::Lasp2, false, DecayMode::DataDependent, DType::F64, true}, 1, 3, 4, 10, 4);
  check_linear_case({SpMethod::Lasp2, true, DecayMode::DataDependent, DType::F64, true}, 1, 3, 4, 10, 4);
  // Strong data-dependent decays (log a down to -8): the decay factors of the prefix and
  // final-state terms span tens of orders of magnitude within a chunk.
  check_linear_case({SpMethod::Lasp2, true, DecayMode::DataDependent, DType::F32, true}, 2, 2, 8, 24, 8, -8.0);
}

TEST(SpLinearComm, Lasp2DoesOneAllGatherOfStatesAndDecaysPerPass) {
  for (bool overlap : {false, true}) {
    SCOPED_TRACE(overlap ? "overlapped schedule" : "plain schedule");
    Comm& comm = world();
    const int64_t B = 2, H = 3, D = 4, L = 5;
    std::mt19937_64 rng(testing::shared_seed());
    const Tensor q = random_tensor(rng, {B, L, H, D}, DType::F64);
    Decay decay;
    decay.mode = DecayMode::DataDependent;
    decay.per_token = random_tensor(rng, {B, L, H}, DType::F64, -0.5, 0.0);
    SpContext ctx{&comm, SpMethod::Lasp2, false, overlap};
    Tensor o = Tensor::empty(q.shape(), DType::F64);
    SpSaved saved;
    comm.reset_counters();
    sp_linear_attention_forward(ctx, o, q, q, q, decay, saved, 4);
    EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 1);
    EXPECT_EQ(comm.counter(CommOp::AllGather).bytes, B * H * (D * D + 1) * 8);
    for (CommOp op : {CommOp::AllReduce, CommOp::ReduceScatter, CommOp::Send, CommOp::Recv,
                      CommOp::SendRecv, CommOp::Broadcast})
      EXPECT_EQ(comm.counter(op).calls, 0) << comm_op_name(op);

    comm.reset_counters();
    Tensor dq = Tensor::empty(q.shape(), DType::F64), dk = dq.clone(), dv = dq.clone();
    Tensor dl = Tensor::empty({B, L, H}, DType::F64);
    sp_linear_attention_backward(ctx, dq, dk, dv, dl, q, q, q, decay, saved, o, 4);
    EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 1);
    EXPECT_EQ(comm.counter(CommOp::AllGather).bytes, B * H * D * D * 8);
    EXPECT_EQ(comm.counter(CommOp::SendRecv).calls + comm.counter(CommOp::Send).calls, 0);

    // Zigzag: still one all-gather, of two chunks' states.
    SpContext zz{&comm, SpMethod::Lasp2, true, overlap};
    const Tensor q2 = random_tensor(rng, {B, 2 * L, H, D}, DType::F64);
    Decay none;
    Tensor o2 = Tensor::empty(q2.shape(), DType::F64);
    comm.reset_counters();
    sp_linear_attention_forward(zz, o2, q2, q2, q2, none, saved, 4);
    EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 1);
    EXPECT_EQ(comm.counter(CommOp::AllGather).bytes, 2 * B * H * (D * D + 1) * 8);
  }
}

TEST(SpLinearComm, Lasp1SendsTheStateWorldMinusOneTimesAndRingStepsWorldMinusOne) {
  Comm& comm = world();
  const int64_t B = 1, H = 2, D = 3, L = 4;
  std::mt19937_64 rng(testing::shared_seed());
  const Tensor q = random_tensor(rng, {B, L, H, D}, DType::F64);
  Decay none;
  Tensor o = Tensor::empty(q.shape(), DType::F64);
  SpSaved saved;
  comm.reset_counters();
  sp_linear_attention_forward(SpContext{&comm, SpMethod::Lasp1, false}, o, q, q, q, none, saved, 2);
  Tensor sends = Tensor::zeros({1}, DType::I64);
  sends.data<int64_t>()[0] = comm.counter(CommOp::Send).calls;
  comm.all_reduce_sum(sends);
  EXPECT_EQ(sends.data<int64_t>()[0], comm.size() - 1);
  EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 0);

  comm.reset_counters();
  sp_linear_attention_forward(SpContext{&comm, SpMethod::Ring, false}, o, q, q, q, none, saved, 2);
  EXPECT_EQ(comm.counter(CommOp::SendRecv).calls, comm.size() - 1);
  EXPECT_EQ(comm.counter(CommOp::AllGather).calls, 0);
}

TEST(SpLayoutPositions, ContiguousAndZigzagPositionsCoverTheSequenceOnce) {
  Comm& comm = world();
  const int W = comm.size(), t = comm.rank();
  const std::vector<int64_t> c = sp_local_positions(SpContext{&comm, SpMethod::Lasp2, false}, 6);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(c[i], t * 6 + i);
  const std::vector<int64_t> z = sp_local_positions(SpContext{&comm, SpMethod::Lasp2, true}, 6);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(z[i], t * 3 + i);                      // chunk t
    EXPECT_EQ(z[3 + i], (2 * W - 1 - t) * 3 + i);    // chunk 2W-1-t
  }
  EXPECT_THROW(sp_local_positions(SpContext{&comm, SpMethod::Lasp2, true}, 5), Error);
  const std::vector<int64_t> single = sp_local_positions(SpContext{}, 4);
  EXPECT_EQ(single, (std::vector<int64_t>{0, 1, 2, 3}));
}

}  // namespace
}  // namespace lasp
