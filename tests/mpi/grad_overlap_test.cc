// Gradient reduction overlapped with the backward (GradReducer): the same sums as the plain
// after-backward path, bit for bit, for the reducer alone, for one model step under every rank
// layout, and for a 20-step training run.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/log.h"
#include "core/model/model.h"
#include "launch/train.h"
#include "mpi_test_util.h"
#include "parallel/grad_sync.h"
#include "parallel/grid.h"

namespace lasp {
namespace {

// Bitwise equality of two tensors of one dtype and shape (host copies).
void expect_bitwise_equal(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  ASSERT_EQ(a.dtype(), b.dtype()) << what;
  const Tensor x = a.to(cpu()), y = b.to(cpu());
  if (std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0) return;
  for (int64_t i = 0; i < x.numel(); ++i) {
    if (x.item(i) != y.item(i)) {
      ADD_FAILURE() << what << ": element " << i << " differs: " << x.item(i) << " vs "
                    << y.item(i);
      return;
    }
  }
}

// The groups a world of this size is cut into: np 4 -> "sp" pairs {0,1},{2,3} and "dp" pairs
// {0,2},{1,3} (so a bucket is reduced over two groups in turn); otherwise the world alone.
struct Groups {
  std::unique_ptr<Comm> sp, dp;
  std::vector<Comm*> list;
};
Groups make_groups() {
  Groups g;
  Comm& w = world();
  if (w.size() == 4) {
    g.sp = w.split(w.rank() / 2, w.rank(), "sp");
    g.dp = w.split(w.rank() % 2, w.rank(), "dp");
    g.list = {g.sp.get(), g.dp.get()};
  } else {
    g.list = {&w};
  }
  return g;
}

// Rank-dependent random gradients (not small integers: the sums round).
std::vector<Tensor> random_grads(uint64_t seed, const std::vector<int64_t>& sizes,
                                 const std::vector<DType>& dts) {
  std::mt19937_64 rng(seed + 7919 * world().rank());
  std::vector<Tensor> out;
  for (size_t i = 0; i < sizes.size(); ++i)
    out.push_back(testing::random_tensor(rng, {sizes[i]}, dts[i], -3, 3));
  return out;
}

std::vector<Tensor> clones(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.clone());
  return out;
}

TEST(GradReducer, OverlappedSumsEqualTheAfterBackwardPathBitForBit) {
  const uint64_t seed = testing::shared_seed();
  SCOPED_TRACE("LASP_TEST_SEED=" + std::to_string(seed));
  Groups groups = make_groups();
  const std::vector<int64_t> sizes = {37, 5, 120, 1, 64, 9, 300, 17, 2, 33};
  const std::vector<DType> dts = {DType::F32, DType::F32, DType::F32, DType::F64, DType::F64,
                                  DType::F32, DType::F32, DType::F32, DType::F64, DType::F32};
  for (size_t bucket : {size_t{64}, size_t{400}, size_t{1} << 20}) {
    SCOPED_TRACE("bucket " + std::to_string(bucket) + " bytes");
    std::vector<Tensor> grads = random_grads(seed, sizes, dts);
    std::vector<Tensor> expect = clones(grads);
    for (Comm* g : groups.list) all_reduce_gradients(*g, expect, bucket, false);

    GradReducer reducer(grads, groups.list, bucket, /*overlap=*/true);
    ASSERT_EQ(reducer.active(), world().size() > 1);
    for (int round = 0; round < 2; ++round) {  // a reducer serves every step
      SCOPED_TRACE("round " + std::to_string(round));
      const std::vector<Tensor> before = clones(grads);
      reducer.begin();
      for (const Tensor& g : grads) reducer.mark_ready(g);
      if (reducer.active()) {
        EXPECT_EQ(reducer.launched_before_finish(), 0u);  // set by finish()
      }
      reducer.finish();
      if (reducer.active()) {
        EXPECT_EQ(reducer.launched_before_finish(), reducer.num_buckets());
      }
      for (size_t i = 0; i < grads.size(); ++i)
        expect_bitwise_equal(grads[i], expect[i], "gradient " + std::to_string(i));
      for (size_t i = 0; i < grads.size(); ++i) grads[i].copy_from(before[i]);
    }
  }
}

TEST(GradReducer, BucketsStartInOrderWhateverOrderGradientsBecomeFinal) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  const uint64_t seed = testing::shared_seed();
  Groups groups = make_groups();
  const std::vector<int64_t> sizes = {10, 20, 30, 40, 50, 60};
  const std::vector<DType> dts(sizes.size(), DType::F32);
  std::vector<Tensor> grads = random_grads(seed, sizes, dts);
  std::vector<Tensor> expect = clones(grads);
  const size_t bucket = 200;  // {10,20}, {30}, {40}, {50}, {60} (fp32: 4 bytes each)
  for (Comm* g : groups.list) all_reduce_gradients(*g, expect, bucket, false);
  GradReducer reducer(grads, groups.list, bucket, true);
  EXPECT_EQ(reducer.num_buckets(), 5u);
  reducer.begin();
  // The later buckets are final first; the first bucket completes last: nothing may start
  // before it (every rank must issue the collectives in the same order).
  for (size_t i : {5u, 4u, 3u, 1u}) reducer.mark_ready(grads[i]);
  std::vector<Comm*> comms = reducer.comms();
  for (Comm* c : comms) EXPECT_EQ(c->counter(CommOp::AllReduce).calls, 0) << c->name();
  reducer.mark_ready(grads[2]);
  reducer.mark_ready(grads[0]);
  reducer.finish();
  EXPECT_EQ(reducer.launched_before_finish(), reducer.num_buckets());
  for (Comm* c : comms) EXPECT_EQ(c->counter(CommOp::AllReduce).calls, 5) << c->name();
  for (size_t i = 0; i < grads.size(); ++i)
    expect_bitwise_equal(grads[i], expect[i], "gradient " + std::to_string(i));
}

TEST(GradReducer, OnlyTheArmedBackwardIsReducedSoAccumulationStepsStayLocal) {
  if (world().size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Groups groups = make_groups();
  std::vector<Tensor> grads =
      random_grads(testing::shared_seed(), {8, 8}, {DType::F64, DType::F64});
  const std::vector<Tensor> local = clones(grads);
  GradReducer reducer(grads, groups.list, 1 << 20, true);
  // A micro-batch before the last one: the model reports, the reducer does nothing.
  for (const Tensor& g : grads) reducer.mark_ready(g);
  for (Comm* c : reducer.comms()) EXPECT_EQ(c->counter(CommOp::AllReduce).calls, 0);
  for (size_t i = 0; i < grads.size(); ++i) expect_bitwise_equal(grads[i], local[i], "untouched");
  reducer.begin();
  for (const Tensor& g : grads) reducer.mark_ready(g);
  reducer.finish();
  for (Comm* c : reducer.comms()) EXPECT_EQ(c->counter(CommOp::AllReduce).calls, 1);
}

TEST(GradReducer, RejectsMisuseWithClearErrors) {
  Comm& w = world();
  std::vector<Tensor> grads = {Tensor::zeros({3}, DType::F32), Tensor::zeros({4}, DType::F32)};
  EXPECT_THROW(GradReducer(grads, {&w}, 0, true), Error);
  EXPECT_THROW(GradReducer({grads[0], grads[0]}, {&w}, 64, true), Error);  // listed twice
  EXPECT_THROW(GradReducer({Tensor()}, {&w}, 64, true), Error);
  if (w.size() < 2) return;  // a reducer over one rank is inactive and accepts anything
  GradReducer r(grads, {&w}, 1 << 20, true);
  EXPECT_THROW(r.finish(), Error);  // finish() without begin()
  r.begin();
  EXPECT_THROW(r.begin(), Error);
  EXPECT_THROW(r.mark_ready(Tensor::zeros({3}, DType::F32)), Error);  // not one of its gradients
  r.mark_ready(grads[0]);
  EXPECT_THROW(r.mark_ready(grads[0]), Error);  // twice
  r.mark_ready(grads[1]);
  r.finish();
}

// ------------------------------------------------------------------------------ model level

struct Layout {
  int tp, sp, dp;
  std::string str() const {
    return "tp" + std::to_string(tp) + "_sp" + std::to_string(sp) + "_dp" + std::to_string(dp);
  }
};

std::vector<Layout> layouts_for(int world_size) {
  if (world_size == 2) return {{1, 2, 1}, {1, 1, 2}, {2, 1, 1}};
  if (world_size == 4) return {{1, 2, 2}, {2, 2, 1}, {1, 1, 4}, {1, 4, 1}, {2, 1, 2}};
  return {};
}

ModelConfig small_model() {
  ModelConfig m;
  m.vocab_size = 32;
  m.hidden = 16;
  m.layers = 3;
  m.heads = 4;
  m.kv_heads = 2;
  m.head_dim = 8;
  m.mlp_hidden = 32;
  m.pattern = "LLS";
  m.decay = "data";
  m.chunk = 4;
  m.ce_chunk = 7;
  m.init_std = 0.2;
  m.tie_embeddings = false;
  return m;
}

// One forward + backward of the layout's model on this rank's tokens, the gradients reduced over
// SP then DP by a GradReducer (overlap or not); returns the gradients.
std::vector<Tensor> one_step_gradients(const Layout& lay, uint64_t seed, bool overlap,
                                       size_t bucket, bool lasp2_overlap, size_t* launched,
                                       size_t* buckets) {
  const ModelConfig mc = small_model();
  const int64_t B = 2, T = 16;
  Grid grid(world(), lay.tp, lay.sp, lay.dp);
  ModelParallel par;
  par.sp.comm = lay.sp > 1 ? &grid.sp_group() : nullptr;
  par.sp.method = SpMethod::Lasp2;
  par.sp.overlap = lasp2_overlap;
  par.tp_size = lay.tp;
  par.tp_rank = grid.tp_rank();
  par.tp_all_reduce = [&grid](Tensor& t) { grid.tp_group().all_reduce_sum(t); };
  Model model(mc, par, seed, DType::F32);
  std::mt19937_64 rng(seed + 31 * grid.dp_rank());
  std::uniform_int_distribution<int> tok(0, static_cast<int>(mc.vocab_size) - 1);
  const int64_t L = T / lay.sp;
  Tensor in = Tensor::empty({B, T}, DType::I32), tg = Tensor::empty({B, T}, DType::I32);
  for (int64_t i = 0; i < B * T; ++i) {
    in.data<int32_t>()[i] = tok(rng);
    tg.data<int32_t>()[i] = tok(rng);
  }
  const std::vector<int64_t> pos = sp_local_positions(par.sp, L);
  Tensor lin = Tensor::empty({B, L}, DType::I32), ltg = Tensor::empty({B, L}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) {
      lin.data<int32_t>()[b * L + i] = in.data<int32_t>()[b * T + pos[i]];
      ltg.data<int32_t>()[b * L + i] = tg.data<int32_t>()[b * T + pos[i]];
    }
  std::vector<Tensor> ready;
  for (Param* p : model.grad_ready_order()) ready.push_back(p->grad);
  std::vector<Comm*> groups;
  if (lay.sp > 1) groups.push_back(&grid.sp_group());
  if (lay.dp > 1) groups.push_back(&grid.dp_group());
  GradReducer reducer(ready, groups, bucket, overlap);
  if (overlap) {
    model.set_grad_ready_hook([&reducer](const std::vector<Param*>& ps) {
      for (Param* p : ps) reducer.mark_ready(p->grad);
    });
  }
  model.zero_grad();
  reducer.begin();
  model.forward_backward(lin, ltg, 1.0f / static_cast<float>(B * T * lay.dp));
  reducer.finish();
  model.set_grad_ready_hook(nullptr);
  if (launched) *launched = reducer.launched_before_finish();
  if (buckets) *buckets = reducer.num_buckets();
  std::vector<Tensor> out;
  for (Param* p : model.params()) out.push_back(p->grad.clone());
  return out;
}

TEST(OverlappedGradReduce, OneStepGradientsEqualTheAfterBackwardPathForEveryLayout) {
  const uint64_t seed = testing::shared_seed();
  SCOPED_TRACE("LASP_TEST_SEED=" + std::to_string(seed));
  for (const Layout lay : layouts_for(world().size())) {
    for (size_t bucket : {size_t{2048}, size_t{1} << 20}) {
      for (bool lasp2_overlap : {false, true}) {
        SCOPED_TRACE(lay.str() + " bucket " + std::to_string(bucket) +
                     (lasp2_overlap ? " lasp2 overlap" : ""));
        size_t launched = 0, buckets = 0;
        const std::vector<Tensor> plain =
            one_step_gradients(lay, seed, false, bucket, lasp2_overlap, nullptr, nullptr);
        const std::vector<Tensor> over =
            one_step_gradients(lay, seed, true, bucket, lasp2_overlap, &launched, &buckets);
        ASSERT_EQ(plain.size(), over.size());
        for (size_t i = 0; i < plain.size(); ++i)
          expect_bitwise_equal(over[i], plain[i], "gradient " + std::to_string(i));
        // Every bucket started during the backward (the hooks cover every parameter).
        if (lay.sp > 1 || lay.dp > 1) {
          EXPECT_EQ(launched, buckets);
          if (bucket == 2048) {
            EXPECT_GT(buckets, 3u);
          }
        }
      }
    }
  }
}

TEST(OverlappedGradReduce, TwentyTrainingStepsGiveTheSameLossCurve) {
  set_log_quiet(true);
  const auto tmp = std::filesystem::temp_directory_path();
  const std::string tag =
      std::to_string(world().size()) + "_" + std::to_string(testing::shared_seed());
  for (const Layout lay : layouts_for(world().size())) {
    SCOPED_TRACE(lay.str());
    std::vector<std::vector<double>> curves;
    for (bool overlap : {false, true}) {
      Config c = parse_config(
          "model:\n  vocab_size: 256\n  hidden: 32\n  layers: 2\n  heads: 4\n  kv_heads: 2\n  "
          "head_dim: 8\n"
          "  mlp_hidden: 64\n  pattern: LS\n  chunk: 8\n  decay: data\n  tie_embeddings: false\n"
          "train:\n  device: cpu\n  batch_size: 2\n  seq_len: 32\n  steps: 20\neval:\n  every: -1\n"
          "checkpoint:\n  every: -1\nrun:\n  log_every: 1000\nparallel:\n  bucket_mb: 0.01\n",
          "test");
      c.parallel.tp = lay.tp;
      c.parallel.sp = lay.sp;
      c.parallel.dp = lay.dp;
      c.parallel.overlap_grad_reduce = overlap;
      c.run.dir = (tmp / ("lasp_mpi_overlap_" + tag + (overlap ? "_on" : "_off"))).string();
      if (world().rank() == 0) std::filesystem::remove_all(c.run.dir);
      world().barrier();
      curves.push_back(train(c, "test").losses);
      world().barrier();
      if (world().rank() == 0) std::filesystem::remove_all(c.run.dir);
    }
    ASSERT_EQ(curves[0].size(), 20u);
    ASSERT_EQ(curves[1].size(), 20u);
    for (size_t s = 0; s < curves[0].size(); ++s)
      EXPECT_EQ(curves[1][s], curves[0][s]) << "step " << s + 1;
    EXPECT_LT(curves[0].back(), curves[0].front() - 1.0);
  }
}

}  // namespace
}  // namespace lasp
