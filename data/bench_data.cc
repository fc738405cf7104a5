// `lasp bench data`: throughput of the sampler alone (window gathering, no model).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "core/check.h"
#include "data/dataset.h"

namespace lasp {

int bench_data_main(int argc, char** argv) {
  int64_t seq_len = 2048, batch = 8, steps = 200;
  std::string shards = "builtin";
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto int_value = [&](const char* flag) {
      LASP_CHECK(i + 1 < argc) << "bench data: " << flag << " needs a value";
      char* end = nullptr;
      const long long v = std::strtoll(argv[++i], &end, 10);
      LASP_CHECK(end && *end == '\0' && v > 0) << "bench data: " << flag << " must be a positive integer, got \""
                                               << argv[i] << "\"";
      return static_cast<int64_t>(v);
    };
    if (a == "--seq-len") {
      seq_len = int_value("--seq-len");
    } else if (a == "--batch") {
      batch = int_value("--batch");
    } else if (a == "--steps") {
      steps = int_value("--steps");
    } else if (a == "--shards") {
      LASP_CHECK(i + 1 < argc) << "bench data: --shards needs a value";
      shards = argv[++i];
    } else if (a == "--help" || a == "-h") {
      std::cout << "usage: lasp bench data [--seq-len 2048] [--batch 8] [--steps 200] [--shards builtin|GLOB]\n";
      return 0;
    } else if (i == 0 && a == "data") {
      continue;
    } else {
      std::cerr << "bench data: unknown argument \"" << a << "\"\n";
      return 2;
    }
  }
  const DataSplit data = open_data(shards, "", 0.0);
  Sampler sampler(&data.train, seq_len, batch, 0, 1, 1234);
  std::vector<int32_t> tokens;
  sampler.next(tokens);  // warm the permutation and the page cache
  const auto t0 = std::chrono::steady_clock::now();
  int64_t checksum = 0;
  for (int64_t s = 0; s < steps; ++s) {
    sampler.next(tokens);
    checksum += tokens[static_cast<size_t>(s) % tokens.size()];
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double tokens_per_s = static_cast<double>(steps * batch * (seq_len + 1)) / secs;
  std::printf("%-28s %10s %8s %8s %12s %14s\n", "data", "tokens", "seq_len", "batch", "time/step", "tokens/s");
  std::printf("%-28s %10lld %8lld %8lld %10.3f ms %14.3e\n", data.train.description().substr(0, 28).c_str(),
              static_cast<long long>(data.train.size()), static_cast<long long>(seq_len),
              static_cast<long long>(batch), 1e3 * secs / static_cast<double>(steps), tokens_per_s);
  std::printf("(sampler alone: window gather + copy to int32; checksum %lld)\n", static_cast<long long>(checksum));
  return 0;
}

}  // namespace lasp
