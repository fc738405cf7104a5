// The run configuration: YAML (yaml-cpp) into typed structs, one section per concern.
//
// Every key is declared once in config.cc's schema (name, type, default, allowed range or choices,
// help). Loading validates each value against it: an unknown key fails with the file, line and the
// closest valid key; a value of the wrong type or out of range fails naming the key and what is
// allowed. `--set section.key=value` overrides go through the same checks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lasp {

struct RunConfig {
  std::string dir = "runs/default";  // output folder: config.yaml, metrics.jsonl, checkpoints/
  int64_t log_every = 10;
};

struct TrainConfig {
  int64_t steps = 300;
  uint64_t seed = 1234;
  int64_t batch_size = 8;     // sequences per data-parallel rank per step
  int64_t seq_len = 256;      // tokens per sequence (split across SP ranks)
  std::string device = "auto";  // auto | cpu | cuda
  std::string dtype = "auto";   // compute dtype: auto | fp32 (CPU) | bf16 (CUDA, fp32 master weights)
  std::string recompute = "none";  // activation recomputation: none | swiglu | mlp (selective) | block
};

// Precision of the matrix products per kind of layer (core/model/projection.h). Embeddings,
// norms and the attention kernels always stay in bf16/fp32.
struct PrecisionConfig {
  std::string attention = "bf16";    // q, k, v, gate, out projections: bf16 | fp8 | fp4
  std::string mlp = "bf16";          // SwiGLU projections: bf16 | fp8 | fp4
  std::string lm_head = "bf16";      // LM head + cross-entropy: bf16 | fp8 (fp4 is refused)
  std::string fp8_scaling = "per_tensor";  // per_tensor | delayed | block
  // FP8 forward GEMMs (y = x W^T) with Hopper's fast accumulation (partial sums kept in the
  // tensor cores' reduced precision, as Transformer Engine's default forward); dgrad / wgrad
  // always accumulate in full fp32. CUDA only (the CPU emulation accumulates in fp32); not with
  // block scaling.
  bool fp8_fast_accum = false;
  std::string fp4_format = "mxfp4";  // mxfp4 | nvfp4
  std::string fp4_backward = "sr";   // sr (stochastic rounding) | ms_eden
  int64_t hadamard_block = 32;       // rotation block (power of two)
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t hidden = 128;
  int64_t layers = 4;
  int64_t heads = 4;
  int64_t kv_heads = 4;       // softmax layers: grouped-query heads
  int64_t head_dim = 32;
  int64_t mlp_hidden = 384;
  std::string pattern = "L";  // mixer per layer, repeated: L = linear, S = softmax ("LLLS")
  bool tie_embeddings = true;
  std::string decay = "constant";  // none | constant | data
  std::string feature_map = "none";  // none | silu | relu | elu1
  int64_t chunk = 64;
  double norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double init_std = 0.02;
  int64_t ce_chunk = 1024;    // rows per chunk of the fused LM head + cross-entropy
  PrecisionConfig precision;
};

struct DataConfig {
  std::string train = "builtin";  // "builtin" or comma-separated shard paths / globs
  std::string val = "";           // shard paths; empty = tail of the train data
  double val_fraction = 0.02;
};

struct OptimConfig {
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  std::string schedule = "cosine";  // cosine | wsd | constant
  int64_t warmup_steps = 20;
  double decay_fraction = 0.2;      // wsd: share of steps in the final decay
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;           // global norm; 0 disables
};

struct ParallelConfig {
  int64_t dp = 1, tp = 1, sp = 1;
  std::string sp_method = "lasp2";  // lasp2 | lasp1 | ring | allgather_kv
  bool zigzag = false;
  double bucket_mb = 25.0;
  bool overlap_grad_reduce = false;  // reduce gradient buckets while the backward runs (opt-in until measured on GPUs)
  bool lasp2_overlap = false;       // LASP-2 state all-gather concurrent with the local attention
  double comm_timeout_s = 300.0;
};

struct CheckpointConfig {
  int64_t every = 0;        // steps between checkpoints; 0 = only at the end; -1 = never
  int64_t keep_last = 3;
  std::string resume = "none";  // none | auto | <checkpoint directory>
};

struct EvalConfig {
  int64_t every = 100;      // steps between validation runs; 0 = only at the end; -1 = never
  int64_t tokens = 16384;   // validation tokens per run
};

struct Config {
  RunConfig run;
  TrainConfig train;
  ModelConfig model;
  DataConfig data;
  OptimConfig optim;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  EvalConfig eval;
};

// Loads `path` (empty = defaults only), applies overrides "section.key=value", validates.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Parses YAML text (the `source` names it in messages).
Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides = {});
// The fully resolved configuration as YAML (every key, defaults included).
std::string config_to_yaml(const Config& c);
// One line per key: "section.key  type  default  help" (for `lasp train --help`).
std::string config_reference();

}  // namespace lasp
