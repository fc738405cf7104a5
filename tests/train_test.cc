// The training loop end to end on CPU: the loss falls, resume is exact, bad states stop training.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "core/check.h"
#include "core/config.h"
#include "core/log.h"
#include "launch/train.h"

namespace lasp {
namespace {

// A small, fast model on the built-in corpus.
Config small_config(const std::string& dir) {
  Config c = parse_config(
      "model:\n  hidden: 32\n  layers: 2\n  heads: 2\n  kv_heads: 1\n  head_dim: 16\n  mlp_hidden: 64\n"
      "  pattern: LS\n  chunk: 16\ntrain:\n  device: cpu\n  batch_size: 4\n  seq_len: 64\n  steps: 40\n"
      "optim:\n  lr: 5.0e-3\n  warmup_steps: 5\neval:\n  every: 0\n  tokens: 2048\n"
      "checkpoint:\n  every: 20\n  keep_last: 5\nrun:\n  log_every: 1000\n",
      "small.yaml");
  c.run.dir = dir;
  return c;
}

std::string fresh_dir(const std::string& name) {
  const std::string d = (std::filesystem::temp_directory_path() / ("lasp_test_" + name)).string();
  std::filesystem::remove_all(d);
  return d;
}

TEST(Train, LossFallsAndMetricsAreWritten) {
  set_log_quiet(true);
  Config c = small_config(fresh_dir("loss"));
  const TrainResult r = train(c, "small.yaml");
  EXPECT_EQ(r.steps_done, 40);
  EXPECT_NEAR(r.first_loss, std::log(256.0), 0.3);
  EXPECT_LT(r.last_loss, r.first_loss - 1.5) << "40 steps should learn the byte distribution at least";
  EXPECT_LT(r.val_loss, r.first_loss - 1.5);
  std::ifstream m(c.run.dir + "/metrics.jsonl");
  std::string line;
  int lines = 0;
  bool has_keys = false;
  while (std::getline(m, line)) {
    ++lines;
    has_keys = has_keys || (line.find("\"loss\"") != std::string::npos && line.find("\"lr\"") != std::string::npos &&
                            line.find("\"grad_norm\"") != std::string::npos &&
                            line.find("\"tokens_per_s\"") != std::string::npos &&
                            line.find("\"model_tflops_per_rank\"") != std::string::npos);
  }
  EXPECT_GE(lines, 2);
  EXPECT_TRUE(has_keys);
  EXPECT_TRUE(std::filesystem::exists(c.run.dir + "/config.yaml"));
}

TEST(Train, ResumeGivesBitIdenticalLosses) {
  set_log_quiet(true);
  Config full = small_config(fresh_dir("resume_full"));
  const TrainResult a = train(full, "small.yaml");

  Config first = small_config(fresh_dir("resume_split"));
  first.checkpoint.every = 0;
  train(first, "small.yaml", /*stop_after=*/20);  // as if the job were stopped after step 20
  Config second = first;
  second.checkpoint.resume = "auto";
  const TrainResult b = train(second, "small.yaml");
  ASSERT_EQ(a.losses.size(), 40u);
  ASSERT_EQ(b.losses.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(a.losses[20 + i], b.losses[i]) << "step " << 21 + i;
}

// train.recompute: swiglu recomputes each MLP's SwiGLU output in the backward: with FP8 projections
// (delayed scaling: amax histories carried across steps) the losses equal those of a run that
// keeps it, step for step.
TEST(Train, SwigluRecomputationWithFp8GivesBitIdenticalLosses) {
  set_log_quiet(true);
  auto fp8 = [](Config c, const char* recompute) {
    c.model.precision.attention = "fp8";
    c.model.precision.mlp = "fp8";
    c.model.precision.fp8_scaling = "delayed";
    c.train.recompute = recompute;
    c.train.steps = 6;
    c.checkpoint.every = 0;
    return c;
  };
  const TrainResult a = train(fp8(small_config(fresh_dir("recompute_none_fp8")), "none"), "small.yaml");
  const TrainResult b = train(fp8(small_config(fresh_dir("recompute_swiglu_fp8")), "swiglu"), "small.yaml");
  ASSERT_EQ(a.losses.size(), 6u);
  ASSERT_EQ(b.losses.size(), 6u);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << "step " << i + 1;
}

// FP8 with delayed scaling keeps amax histories across steps; a resumed run must restore them
// (checkpoint tensors fp8_amax_history.*) to continue bit for bit.
TEST(Train, ResumeWithFp8DelayedScalingGivesBitIdenticalLosses) {
  set_log_quiet(true);
  auto fp8 = [](Config c) {
    c.model.precision.attention = "fp8";
    c.model.precision.mlp = "fp8";
    c.model.precision.fp8_scaling = "delayed";
    c.train.steps = 16;
    c.checkpoint.every = 0;
    return c;
  };
  const TrainResult a = train(fp8(small_config(fresh_dir("resume_fp8_full"))), "small.yaml");
  Config first = fp8(small_config(fresh_dir("resume_fp8_split")));
  train(first, "small.yaml", /*stop_after=*/8);
  Config second = first;
  second.checkpoint.resume = "auto";
  const TrainResult b = train(second, "small.yaml");
  ASSERT_EQ(a.losses.size(), 16u);
  ASSERT_EQ(b.losses.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(a.losses[8 + i], b.losses[i]) << "step " << 9 + i;
}

TEST(Train, SigtermSavesACheckpointAndStopsAfterTheCurrentStep) {
  set_log_quiet(true);
  Config c = small_config(fresh_dir("sigterm"));
  c.train.steps = 100000;  // would take far too long: the signal must end it
  c.checkpoint.every = 0;
  const std::string dir = c.run.dir;
  std::thread killer([dir] {
    // config.yaml is written after train() took over SIGTERM; give it a few steps more.
    while (!std::filesystem::exists(dir + "/config.yaml")) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::raise(SIGTERM);
  });
  const TrainResult r = train(c, "small.yaml");
  killer.join();
  EXPECT_GT(r.steps_done, 0);
  EXPECT_LT(r.steps_done, 100000);
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(r.steps_done));
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(c.run.dir) / "checkpoints" / name / "manifest.pb"))
      << "expected a checkpoint of step " << r.steps_done;
  // The run continues from it.
  Config more = c;
  more.train.steps = r.steps_done + 2;
  more.checkpoint.resume = "auto";
  EXPECT_EQ(train(more, "small.yaml").losses.size(), 2u);
}

TEST(Train, NonFiniteLossStopsWithAReport) {
  set_log_quiet(true);
  Config c = small_config(fresh_dir("nan"));
  c.optim.lr = 1e30;  // the first update destroys the weights
  c.optim.grad_clip = 0;
  c.optim.warmup_steps = 0;
  try {
    train(c, "small.yaml");
    FAIL() << "training with lr 1e30 should stop on a non-finite loss";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("step"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lasp
