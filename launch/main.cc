// The `lasp` command line: one binary, one subcommand per job.
#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "core/check.h"
#include "data/dataset.h"
#include "launch/bench_kernels.h"
#include "launch/bench_lowp.h"
#include "launch/bench_ops.h"
#include "launch/bench_sp.h"
#include "launch/checkpoint.h"
#include "launch/train.h"
#include "parallel/comm.h"

#ifdef LASP_HAVE_MPI
#include <mpi.h>
#endif

namespace {

// After an error on one rank the others may wait in a collective forever: end them all.
void abort_all_ranks() {
#ifdef LASP_HAVE_MPI
  if (lasp::distributed_initialized() && lasp::world().size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
  lasp::finalize_distributed();
}

const char* kUsage =
    "usage: lasp <command> [args]\n"
    "commands:\n"
    "  train CONFIG [--set section.key=value ...]   train a model (mpirun -np N lasp train ... for N ranks)\n"
    "  eval CONFIG [--checkpoint DIR]               validation loss of a checkpoint\n"
    "  prepare-data --input F... --output-dir D     text files -> token shards (byte tokenizer)\n"
    "  inspect CHECKPOINT_DIR                       print what a checkpoint holds\n"
    "  export CONFIG --output FILE [--checkpoint DIR]   weights as .safetensors for Python\n"
    "  bench kernels|ops|data|sp|lowp [options]     benchmarks (each prints one table)\n"
    "Run `lasp <command> --help` for the options of a command.\n";

int inspect_main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::cout << "usage: lasp inspect CHECKPOINT_DIR\n";
    return argc < 2 ? 2 : 0;
  }
  std::cout << lasp::describe_checkpoint(argv[1]);
  return 0;
}

int bench_main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "kernels") return lasp::bench_kernels_main(argc - 1, argv + 1);
  if (what == "data") return lasp::bench_data_main(argc - 1, argv + 1);
  if (what == "sp") return lasp::bench_sp_main(argc - 1, argv + 1);
  if (what == "lowp") return lasp::bench_lowp_main(argc - 1, argv + 1);
  if (what == "ops") return lasp::bench_ops_main(argc - 1, argv + 1);
  std::cerr << "usage: lasp bench kernels|ops|data|sp|lowp [options]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  int rc = 2;
  try {
    lasp::init_distributed(&argc, &argv);
    if (cmd == "train") rc = lasp::train_main(argc - 1, argv + 1);
    else if (cmd == "eval") rc = lasp::eval_main(argc - 1, argv + 1);
    else if (cmd == "prepare-data") rc = lasp::prepare_data_main(argc - 1, argv + 1);
    else if (cmd == "inspect") rc = inspect_main(argc - 1, argv + 1);
    else if (cmd == "export") rc = lasp::export_main(argc - 1, argv + 1);
    else if (cmd == "bench") rc = bench_main(argc - 1, argv + 1);
    else std::cerr << "lasp: unknown command '" << cmd << "'\n" << kUsage;
  } catch (const lasp::Error& e) {
    std::cerr << "lasp " << cmd << ": error: " << e.what() << "\n";
    std::cerr.flush();
    abort_all_ranks();
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lasp " << cmd << ": error: [rank " << lasp::process_rank() << "] " << e.what() << "\n";
    abort_all_ranks();
    return 1;
  }
  lasp::finalize_distributed();
  return rc;
}
