// `lasp prepare-data`: text files -> token shards with the byte tokenizer.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "core/check.h"
#include "data/dataset.h"

namespace lasp {

namespace {

void print_prepare_usage() {
  std::cerr << "usage: lasp prepare-data --input FILE [FILE...] --output-dir DIR\n"
               "                         [--val-fraction 0.01] [--shard-tokens 100000000]\n"
               "Tokenizes the text files (concatenated, byte-level: vocab 256) into\n"
               "DIR/train_00000.bin ... and DIR/val_00000.bin ... (the last val-fraction of the text).\n";
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LASP_CHECK(in.good()) << "prepare-data: cannot open input " << path << " (" << std::strerror(errno) << ")";
  std::ostringstream ss;
  ss << in.rdbuf();
  LASP_CHECK(!in.bad()) << "prepare-data: reading " << path << " failed";
  return ss.str();
}

// Writes tokens [begin, end) as <dir>/<prefix>_NNNNN.bin shards of at most shard_tokens each.
int write_shards(const std::vector<uint32_t>& tokens, size_t begin, size_t end, const std::string& dir,
                 const std::string& prefix, int64_t shard_tokens) {
  int shards = 0;
  for (size_t s = begin; s < end; s += static_cast<size_t>(shard_tokens)) {
    const size_t e = std::min(end, s + static_cast<size_t>(shard_tokens));
    char name[64];
    std::snprintf(name, sizeof(name), "%s_%05d.bin", prefix.c_str(), shards);
    write_token_shard(dir + "/" + name,
                      std::vector<uint32_t>(tokens.begin() + static_cast<std::ptrdiff_t>(s),
                                            tokens.begin() + static_cast<std::ptrdiff_t>(e)),
                      2);
    ++shards;
  }
  return shards;
}

}  // namespace

int prepare_data_main(int argc, char** argv) {
  std::vector<std::string> inputs;
  std::string output_dir;
  double val_fraction = 0.01;
  int64_t shard_tokens = 100000000;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      LASP_CHECK(i + 1 < argc) << "prepare-data: " << flag << " needs a value";
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      print_prepare_usage();
      return 0;
    } else if (a == "--input") {
      while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) inputs.push_back(argv[++i]);
    } else if (a == "--output-dir") {
      output_dir = value("--output-dir");
    } else if (a == "--val-fraction") {
      const std::string v = value("--val-fraction");
      char* end = nullptr;
      val_fraction = std::strtod(v.c_str(), &end);
      LASP_CHECK(end && *end == '\0' && val_fraction >= 0 && val_fraction < 1)
          << "prepare-data: --val-fraction must be a number in [0, 1), got \"" << v << "\"";
    } else if (a == "--shard-tokens") {
      const std::string v = value("--shard-tokens");
      char* end = nullptr;
      shard_tokens = std::strtoll(v.c_str(), &end, 10);
      LASP_CHECK(end && *end == '\0' && shard_tokens > 0)
          << "prepare-data: --shard-tokens must be a positive integer, got \"" << v << "\"";
    } else if (i == 0 && a == "prepare-data") {
      continue;  // tolerate being handed the subcommand name
    } else {
      std::cerr << "prepare-data: unknown argument \"" << a << "\"\n";
      print_prepare_usage();
      return 2;
    }
  }
  if (inputs.empty() || output_dir.empty()) {
    std::cerr << "prepare-data: --input and --output-dir are required\n";
    print_prepare_usage();
    return 2;
  }
  std::string text;
  for (const std::string& path : inputs) text += read_text_file(path);
  LASP_CHECK(!text.empty()) << "prepare-data: the input files hold no text";
  const std::vector<uint32_t> tokens = byte_tokenize(text);
  const size_t n = tokens.size();
  const size_t n_val = static_cast<size_t>(static_cast<double>(n) * val_fraction);

  std::error_code ec;
  std::filesystem::create_directories(output_dir, ec);
  LASP_CHECK(!ec) << "prepare-data: cannot create " << output_dir << " (" << ec.message() << ")";
  const int train_shards = write_shards(tokens, 0, n - n_val, output_dir, "train", shard_tokens);
  const int val_shards = write_shards(tokens, n - n_val, n, output_dir, "val", shard_tokens);
  std::cout << "prepare-data: " << inputs.size() << " file(s), " << n << " tokens (byte-level, vocab 256)\n"
            << "  train: " << (n - n_val) << " tokens in " << train_shards << " shard(s) " << output_dir
            << "/train_*.bin\n"
            << "  val:   " << n_val << " tokens in " << val_shards << " shard(s) " << output_dir << "/val_*.bin\n";
  return 0;
}

}  // namespace lasp
