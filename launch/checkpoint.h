// Checkpoints: generic, model-agnostic, one directory per step.
//
//   <run_dir>/checkpoints/step_00000040/manifest.pb      binary lasp.pb.Manifest (launch/checkpoint.proto)
//                                      /rank_00000.bin   rank 0's tensors, raw, back to back
//                                      /rank_00001.bin   ...
//
// A save writes into <run_dir>/checkpoints/.tmp_step_00000040/, fsyncs every file and the directory,
// and renames it to step_00000040 only after the manifest (written last, by rank 0) is durable.
// A directory named step_* therefore always holds a complete checkpoint; a killed save leaves only
// a .tmp_* directory, which find_latest_checkpoint ignores and the next save by rank 0 removes.
// Format details and a Python reader: docs/checkpoints.md.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "data/dataset.h"

namespace lasp {

constexpr uint32_t kCheckpointFormatVersion = 1;

struct NamedTensor {
  std::string name;
  Tensor tensor;  // CPU tensors (CUDA tensors are copied through the host)
  // On load: a checkpoint without this tensor is not an error (it was written before the tensor
  // existed); the tensor is left as it is and `found` stays false.
  bool optional = false;
  bool found = false;  // set by load_checkpoint
};

struct CheckpointState {
  int64_t step = 0;
  std::string config_yaml;
  std::string model_signature;
  std::vector<NamedTensor> tensors;  // this rank's tensors (weights, Adam m/v), names unique
  std::vector<uint64_t> rng_state;
  SamplerPosition sampler;
  std::map<std::string, double> scalars;
  int world_size = 1, rank = 0;
  // The rank grid; 0 = not recorded. When set on save, tp * sp * dp must equal world_size; on load
  // a layout set both here and in the checkpoint must match.
  int tp = 0, sp = 0, dp = 0;
};

// Saves this rank's part of step `state.step`. Every rank calls it (collectively); `barrier` must
// synchronise all ranks when world_size > 1 and is called twice: after every rank's file is durable
// (then rank 0 writes the manifest and publishes the directory) and after publishing (so every rank
// returns only once the checkpoint is complete). Rank 0 then deletes all but the newest `keep_last`
// complete checkpoints (keep_last <= 0 keeps all) and stale .tmp_* directories.
void save_checkpoint(const std::string& run_dir, const CheckpointState& state, int keep_last,
                     const std::function<void()>& barrier = {});

// Newest complete checkpoint directory under run_dir/checkpoints, or "" if none.
std::string find_latest_checkpoint(const std::string& run_dir);
// Complete checkpoint directories under run_dir/checkpoints, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

// Loads rank `rank`'s part of the checkpoint in `ckpt_dir` into `state`. state.tensors names the
// expected tensors, allocated with the current model's dtypes and shapes; their data is overwritten
// by name (tensors in the checkpoint that state does not name are ignored; missing optional ones
// are skipped, see NamedTensor). Also sets step,
// config_yaml, rng_state, sampler, scalars and the layout fields. Checks the format version, the
// model signature, world size and layout, every expected tensor's presence, dtype and shape, the
// rank file's size and every CRC before anything is modified: on any mismatch it throws lasp::Error
// naming the file, the tensor and what differs, and `state` is unchanged.
void load_checkpoint(const std::string& ckpt_dir, int rank, CheckpointState& state);

// A human-readable summary (step, layout, signature, per-rank tensors, scalars) for `lasp inspect`.
std::string describe_checkpoint(const std::string& ckpt_dir);

// Writes tensors as .safetensors: 8-byte little-endian header length N, N bytes of JSON header
// (padded with spaces to a multiple of 8), then the raw little-endian tensor data in the given order.
void export_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors);

}  // namespace lasp
