// The model on CUDA (bf16 activations and compute copies, fp32 master weights and gradients)
// against the fp32 CPU model with the same initial weights, and a short CUDA training run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/log.h"
#include "core/model/model.h"
#include "launch/train.h"
#include "tests/gpu/gpu_test_util.h"

namespace lasp {
namespace {

ModelConfig gpu_model(const std::string& decay) {
  ModelConfig m;
  m.vocab_size = 256;
  m.hidden = 128;
  m.layers = 2;
  m.heads = 2;
  m.kv_heads = 1;
  m.head_dim = 64;  // the CUDA linear-attention kernel takes 64 or 128
  m.mlp_hidden = 192;
  m.pattern = "LS";
  m.decay = decay;
  m.init_std = 0.05;
  m.ce_chunk = 64;
  // The per-head output norm of linear attention has a singularity: at a token whose output o is
  // near zero (o_0 = a (q_0 . k_0) v_0 at position 0 when q_0 . k_0 ~ 0) its gradient grows like
  // 1 / |o|, so with eps = 1e-6 some inputs make dq and dk depend on bf16 rounding by 100%
  // (measured on the CPU in fp64: rounding only the weights to bf16 moved layers.0.attn.wq by
  // 101% for LASP_TEST_SEED=2605311640). eps = 1e-2 bounds that gain; the model is the same code.
  m.norm_eps = 1e-2;
  return m;
}

// The CPU model with every matrix rounded to bf16, as the GPU model's compute copies are.
void round_matrices_to_bf16(Model& m) {
  for (Param* p : m.params())
    if (p->value.ndim() == 2)
      for (int64_t i = 0; i < p->value.numel(); ++i)
        p->value.set_item(i, bf16_to_float(float_to_bf16(static_cast<float>(p->value.item(i)))));
}

// bf16 activations: the loss agrees to ~1e-2 relative and each gradient tensor to a few 1e-2
// (Frobenius), the size of bf16 rounding accumulated through two layers, unless the gradient
// itself is that sensitive to bf16 rounding for these inputs. The sensitivity s is measured on
// the CPU: the same model with its matrices rounded to bf16, against the exact one. The bound per
// tensor is 5e-2 + 2 s; the test prints e and s for every tensor, worst first.
// One exception: layers.0.attn.bgate (2 elements) is the sum over all 262 tokens of per-token
// gate gradients that nearly cancel, so bf16 rounding of the activations moves it by more than
// rounding the weights does (H200, 40 repeats: up to 0.087 with s = 0.004; on the CPU rounding
// only the weights moved it by up to 24% for 1 seed in 40). Its bound is 0.25 + 2 s; the same
// per-token gradients are held to the ordinary bound through layers.0.attn.wgate.
TEST(ModelGpu, LossAndEveryGradientMatchTheFp32CpuModel) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU";
  for (const std::string decay : {"constant", "data"}) {
    SCOPED_TRACE("decay " + decay);
    const ModelConfig mc = gpu_model(decay);
    ModelParallel on_cpu, on_gpu;
    on_gpu.device = cuda(0);
    Model ref(mc, on_cpu, 7, DType::F32), rounded(mc, on_cpu, 7, DType::F32);
    round_matrices_to_bf16(rounded);
    Model model(mc, on_gpu, 7, DType::F32);
    const uint32_t seed = gpu_test::fresh_seed();
    SCOPED_TRACE("input seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> tok(0, 255);
    const int64_t B = 2, L = 131;  // not a multiple of the kernels' chunks
    Tensor in = Tensor::empty({B, L}, DType::I32), tg = Tensor::empty({B, L}, DType::I32);
    for (int64_t i = 0; i < B * L; ++i) {
      in.data<int32_t>()[i] = tok(rng);
      tg.data<int32_t>()[i] = i % 11 == 5 ? -1 : tok(rng);
    }
    const float scale = 1.0f / static_cast<float>(B * L);
    ref.zero_grad();
    rounded.zero_grad();
    model.zero_grad();
    const double ref_loss = ref.forward_backward(in, tg, scale);
    rounded.forward_backward(in, tg, scale);
    const double loss = model.forward_backward(in, tg, scale);
    EXPECT_NEAR(loss, ref_loss, 1e-2 * ref_loss);
    auto rp = ref.params(), sp = rounded.params(), gp = model.params();
    ASSERT_EQ(rp.size(), gp.size());
    // Every tensor's error e and sensitivity s are printed (the worst e first).
    std::vector<std::tuple<double, double, std::string>> errors;
    for (size_t i = 0; i < gp.size(); ++i) {
      EXPECT_TRUE(gp[i]->grad.is_cuda()) << gp[i]->name;
      const double e = gpu_test::rel_error(gp[i]->grad.to(cpu()), rp[i]->grad);
      const double sens = gpu_test::rel_error(sp[i]->grad, rp[i]->grad);
      const bool bias_sum = gp[i]->name.size() >= 10 &&
                            gp[i]->name.compare(gp[i]->name.size() - 10, 10, "attn.bgate") == 0;
      EXPECT_LE(e, (bias_sum ? 0.25 : 5e-2) + 2 * sens)
          << gp[i]->name << " (bf16 sensitivity " << sens << ")";
      errors.emplace_back(e, sens, gp[i]->name);
    }
    std::sort(errors.rbegin(), errors.rend());
    std::string line = "decay " + decay + ", seed " + std::to_string(seed) + ", loss error " +
                       std::to_string(std::fabs(loss - ref_loss) / ref_loss) +
                       ", gradient errors (e/s):";
    for (const auto& [e, sens, name] : errors)
      line += " " + name + " " + std::to_string(e) + "/" + std::to_string(sens);
    std::printf("%s\n", line.c_str());
  }
}

TEST(ModelGpu, TrainingOnCudaLowersTheLoss) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU";
  set_log_quiet(true);
  Config c = parse_config(
      "model:\n  hidden: 128\n  layers: 2\n  heads: 2\n  kv_heads: 1\n  head_dim: 64\n  mlp_hidden: 256\n"
      "  pattern: LS\ntrain:\n  device: cuda\n  batch_size: 8\n  seq_len: 256\n  steps: 60\n"
      "optim:\n  lr: 3.0e-3\n  warmup_steps: 5\neval:\n  every: 0\n  tokens: 4096\ncheckpoint:\n  every: 30\n"
      "run:\n  log_every: 1000\n",
      "gpu.yaml");
  c.run.dir = (std::filesystem::temp_directory_path() / "lasp_gpu_train").string();
  std::filesystem::remove_all(c.run.dir);
  const TrainResult r = train(c, "gpu.yaml");
  ASSERT_EQ(r.steps_done, 60);
  EXPECT_LT(r.last_loss, r.first_loss - 2.0);
  EXPECT_LT(r.val_loss, 3.0);
  EXPECT_GT(r.peak_memory_mib, 0.0);
  // Resume from the step-30 checkpoint reproduces the GPU run's last steps closely.
  Config again = c;
  again.checkpoint.resume = (std::filesystem::path(c.run.dir) / "checkpoints" / "step_00000030").string();
  const TrainResult r2 = train(again, "gpu.yaml");
  ASSERT_EQ(r2.losses.size(), 30u);
  EXPECT_NEAR(r2.losses.back(), r.losses.back(), 2e-2 * r.losses.back());
}

}  // namespace
}  // namespace lasp
