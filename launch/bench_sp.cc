#include "launch/bench_sp.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/config.h"
#include "core/log.h"
#include "launch/train.h"
#include "parallel/comm.h"

namespace lasp {

namespace {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int bench_sp_main(int argc, char** argv) {
  const char* usage =
      "usage: mpirun -np W lasp bench sp [--config C.yaml] [--methods lasp2,lasp1,ring,allgather_kv]\n"
      "                                  [--lengths 2048,4096,...] [--steps N] [--out DIR] [--set k=v ...]\n"
      "  Trains N steps (the first is warm-up) of the config's model for every method and total\n"
      "  sequence length, the sequence split over the W ranks (parallel.sp = W). Prints one table;\n"
      "  writes DIR/bench_sp.csv and, when python3 with matplotlib is present, DIR/bench_sp.png.\n";
  std::string config = "configs/tiny.yaml", out = "runs/bench_sp";
  std::vector<std::string> methods = {"lasp2", "lasp1", "ring", "allgather_kv"};
  std::vector<int64_t> lengths = {1024, 2048, 4096, 8192};
  std::vector<std::string> overrides;
  int64_t steps = 4;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      LASP_CHECK(i + 1 < argc) << a << " needs a value\n" << usage;
      return argv[++i];
    };
    if (a == "--help") {
      if (world().rank() == 0) std::cout << usage;
      return 0;
    } else if (a == "--config") {
      config = value();
    } else if (a == "--methods") {
      methods = split_list(value());
    } else if (a == "--lengths") {
      lengths.clear();
      for (const auto& s : split_list(value())) lengths.push_back(std::stoll(s));
    } else if (a == "--steps") {
      steps = std::stoll(value());
    } else if (a == "--out") {
      out = value();
    } else if (a == "--set") {
      overrides.push_back(value());
    } else {
      LASP_FAIL() << "unknown option '" << a << "'\n" << usage;
    }
  }
  LASP_CHECK(steps >= 2) << "--steps must be at least 2 (the first step is warm-up)";
  const int W = world().size();
  const bool rank0 = world().rank() == 0;
  set_log_quiet(true);
  struct Row {
    std::string method;
    int64_t length;
    double tokens_per_s, step_ms, peak_mib, comm_share;
  };
  std::vector<Row> rows;
  for (int64_t L : lengths) {
    for (const std::string& m : methods) {
      std::vector<std::string> o = overrides;
      o.insert(o.end(), {"parallel.sp=" + std::to_string(W), "parallel.tp=1", "parallel.dp=1",
                         "parallel.sp_method=" + m, "train.seq_len=" + std::to_string(L),
                         "train.steps=" + std::to_string(steps), "eval.every=-1", "checkpoint.every=-1",
                         "checkpoint.resume=none", "run.dir=" + out + "/run", "run.log_every=1000000"});
      const Config cfg = load_config(config, o);
      const TrainResult r = train(cfg, config);
      std::vector<double> t(r.step_seconds.begin() + 1, r.step_seconds.end());
      std::vector<double> c(r.comm_seconds.begin() + 1, r.comm_seconds.end());
      double tsum = 0, csum = 0;
      for (double x : t) tsum += x;
      for (double x : c) csum += x;
      const double step_s = median(t);
      const double tokens = static_cast<double>(cfg.train.batch_size * L);
      // On CUDA the collectives are asynchronous: host-side time says nothing (-1 = not measured).
      const double comm = r.on_cuda ? -1.0 : (tsum > 0 ? csum / tsum : 0);
      rows.push_back({m, L, tokens / step_s, step_s * 1e3, r.peak_memory_mib, comm});
      if (rank0) {
        std::fprintf(stdout, "  done: %-12s T=%lld  %.1f ms/step\n", m.c_str(), static_cast<long long>(L), step_s * 1e3);
        std::fflush(stdout);
      }
    }
  }
  if (!rank0) return 0;
  // The table: one row per (length, method), with the speed-up of LASP-2 over each method.
  std::printf("\nsequence-parallel benchmark: %s, W = %d ranks, %lld steps (median of all but the first)\n",
              config.c_str(), W, static_cast<long long>(steps));
  std::printf("%-13s %10s %10s %12s %10s %10s %8s %10s\n", "method", "seq_len", "per_rank", "tokens/s", "step_ms",
              "peak_MiB", "comm_%", "lasp2_x");
  std::filesystem::create_directories(out);
  std::ofstream csv(out + "/bench_sp.csv");
  csv << "method,seq_len,per_rank,tokens_per_s,step_ms,peak_mib,comm_share,world\n";
  for (const Row& r : rows) {
    double lasp2 = 0;
    for (const Row& q : rows) {
      if (q.length == r.length && q.method == "lasp2") lasp2 = q.tokens_per_s;
    }
    char comm[16];
    if (r.comm_share < 0) std::snprintf(comm, sizeof comm, "n/a");
    else std::snprintf(comm, sizeof comm, "%.1f", 100 * r.comm_share);
    std::printf("%-13s %10lld %10lld %12.0f %10.2f %10.1f %8s %10.2f\n", r.method.c_str(),
                static_cast<long long>(r.length), static_cast<long long>(r.length / W), r.tokens_per_s, r.step_ms,
                r.peak_mib, comm, lasp2 > 0 ? lasp2 / r.tokens_per_s : 0.0);
    csv << r.method << "," << r.length << "," << r.length / W << "," << r.tokens_per_s << "," << r.step_ms << ","
        << r.peak_mib << "," << r.comm_share << "," << W << "\n";
  }
  csv.close();
  const std::string plot = "python3 scripts/plot_bench_sp.py " + out + "/bench_sp.csv " + out + "/bench_sp.png";
  if (std::filesystem::exists("scripts/plot_bench_sp.py") && std::system((plot + " >/dev/null 2>&1").c_str()) == 0) {
    std::printf("wrote %s/bench_sp.csv and %s/bench_sp.png\n", out.c_str(), out.c_str());
  } else {
    std::printf("wrote %s/bench_sp.csv (no plot: run %s with matplotlib installed)\n", out.c_str(), plot.c_str());
  }
  return 0;
}

}  // namespace lasp
