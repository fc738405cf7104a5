// `lasp train` and `lasp eval`: the training loop, readable top to bottom.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"

namespace lasp {

class Comm;

struct TrainResult {
  int64_t steps_done = 0;
  double first_loss = 0, last_loss = 0;
  double val_loss = 0;  // final validation loss (nats per token)
  std::vector<double> losses;  // training loss per step (this run's steps)
  std::vector<double> step_seconds;  // wall time per step
  std::vector<double> comm_seconds;  // time inside collectives per step (all groups, host side)
  double peak_memory_mib = 0;        // CUDA peak allocated, or the process's peak RSS on CPU
  bool on_cuda = false;
};

// Trains with `cfg` (MPI must be initialised when the world has several ranks). Returns the losses
// for tests; writes run.dir (config.yaml, metrics.jsonl, tb/, checkpoints/). With stop_after > 0
// the run ends after that many steps of this invocation with a checkpoint, as if the job had been
// stopped (resume with checkpoint.resume=auto); the schedule still spans train.steps.
// `comm` is the group of ranks that train together (default: the world).
TrainResult train(const Config& cfg, const std::string& config_source, int64_t stop_after = -1,
                  Comm* comm = nullptr);

int train_main(int argc, char** argv);  // lasp train CONFIG [--set k=v ...]
int eval_main(int argc, char** argv);    // lasp eval CONFIG [--checkpoint DIR] [--set k=v ...]
int export_main(int argc, char** argv);  // lasp export CONFIG --output FILE [--checkpoint DIR]

}  // namespace lasp
