// Tests of launch/checkpoint: round trips, crash safety, corruption detection, pruning, the
// multi-rank protocol and safetensors export.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "core/check.h"
#include "data/checksum.h"
#include "tests/test_util.h"
#include "launch/checkpoint.h"
#include "launch/checkpoint.pb.h"

namespace lasp {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;
using testing::expect_error;

// Bitwise CRC32 (reflected 0xEDB88320), the reference for the table-driven one.
uint32_t reference_crc32(const void* data, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

// A tensor of random bytes (every bit pattern is a valid payload for a checkpoint).
Tensor random_tensor(std::mt19937_64& rng, const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  return t;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.raw());
  return std::vector<uint8_t>(p, p + t.nbytes());
}

CheckpointState make_state(std::mt19937_64& rng, int64_t step) {
  CheckpointState s;
  s.step = step;
  s.config_yaml = "model:\n  layers: 2\n  dim: 8\n";
  s.model_signature = "linear-llama d=8 L=2 vocab=256";
  s.tensors = {{"embed.weight", random_tensor(rng, {16, 8}, DType::F32)},
               {"layers.0.mixer.q", random_tensor(rng, {8, 8}, DType::BF16)},
               {"layers.0.norm", random_tensor(rng, {8}, DType::F64)},
               {"optim.step_counts", random_tensor(rng, {3}, DType::I64)},
               {"data.mask", random_tensor(rng, {2, 5}, DType::I32)},
               {"bytes", random_tensor(rng, {7}, DType::U8)},
               {"empty", Tensor::empty({0, 4}, DType::F32)},
               {"scalar", random_tensor(rng, {}, DType::F32)}};
  s.rng_state = {rng(), rng(), rng()};
  s.sampler = {3, rng() % 1000};
  s.scalars = {{"optimizer.step", static_cast<double>(step)}, {"loss_scale", 0.125}};
  return s;
}

// The same tensor names, dtypes and shapes, freshly allocated and filled with a sentinel.
CheckpointState empty_like(const CheckpointState& s) {
  CheckpointState e;
  e.model_signature = s.model_signature;
  e.world_size = s.world_size;
  for (const auto& nt : s.tensors) {
    Tensor t = Tensor::empty(nt.tensor.shape(), nt.tensor.dtype());
    std::memset(t.raw(), 0xAB, t.nbytes());
    e.tensors.push_back({nt.name, t});
  }
  return e;
}

void expect_untouched(const CheckpointState& e) {
  for (const auto& nt : e.tensors)
    for (uint8_t b : bytes_of(nt.tensor)) ASSERT_EQ(b, 0xAB) << nt.name << " was modified by a failed load";
  EXPECT_EQ(e.step, 0);
  EXPECT_TRUE(e.rng_state.empty());
}

pb::Manifest parse_manifest(const std::string& dir) {
  std::ifstream in(dir + "/manifest.pb", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  pb::Manifest m;
  EXPECT_TRUE(m.ParseFromString(ss.str()));
  return m;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

TEST(Checksum, Crc32MatchesTheBitwiseReferenceAtEveryLengthAndChunking) {
  EXPECT_EQ(crc32(0, "123456789", 9), 0xCBF43926u);  // the standard check value
  EXPECT_EQ(crc32(0, "", 0), 0u);
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> buf(300);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t n = 0; n <= buf.size(); n += 1 + n / 16) {
    const size_t split = n ? rng() % n : 0;  // continuing a running CRC gives the same value
    const uint32_t two_parts = crc32(crc32(0, buf.data(), split), buf.data() + split, n - split);
    EXPECT_EQ(crc32(0, buf.data(), n), reference_crc32(buf.data(), n)) << n;
    EXPECT_EQ(two_parts, reference_crc32(buf.data(), n)) << n;
  }
}

TEST(Checkpoint, RoundTripRestoresEveryDtypeBitExactAndTheTrainingState) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const CheckpointState s = make_state(rng, 40);
  save_checkpoint(dir.path(), s, 3);
  const std::string ckpt = find_latest_checkpoint(dir.path());
  EXPECT_EQ(ckpt, dir.path() + "/checkpoints/step_00000040");

  CheckpointState e = empty_like(s);
  load_checkpoint(ckpt, 0, e);
  for (size_t i = 0; i < s.tensors.size(); ++i) {
    EXPECT_EQ(bytes_of(e.tensors[i].tensor), bytes_of(s.tensors[i].tensor)) << s.tensors[i].name;
  }
  EXPECT_EQ(e.step, 40);
  EXPECT_EQ(e.config_yaml, s.config_yaml);
  EXPECT_EQ(e.rng_state, s.rng_state);
  EXPECT_EQ(e.sampler.epoch, s.sampler.epoch);
  EXPECT_EQ(e.sampler.index, s.sampler.index);
  EXPECT_EQ(e.scalars, s.scalars);

  // The on-disk layout, checked independently: back-to-back tensors, offsets, lengths and CRCs.
  const pb::Manifest m = parse_manifest(ckpt);
  EXPECT_EQ(m.format_version(), 1u);
  EXPECT_EQ(m.step(), 40);
  ASSERT_EQ(m.ranks_size(), 1);
  const std::vector<uint8_t> file = read_bytes(ckpt + "/rank_00000.bin");
  EXPECT_EQ(file.size(), m.ranks(0).file_bytes());
  uint64_t offset = 0;
  ASSERT_EQ(m.ranks(0).tensors_size(), static_cast<int>(s.tensors.size()));
  for (int i = 0; i < m.ranks(0).tensors_size(); ++i) {
    const auto& entry = m.ranks(0).tensors(i);
    const Tensor& t = s.tensors[i].tensor;
    EXPECT_EQ(entry.name(), s.tensors[i].name);
    EXPECT_EQ(entry.dtype(), dtype_name(t.dtype()));
    EXPECT_EQ(Shape(entry.shape().begin(), entry.shape().end()), t.shape());
    EXPECT_EQ(entry.offset(), offset);
    EXPECT_EQ(entry.length(), t.nbytes());
    EXPECT_EQ(entry.crc32(), reference_crc32(t.raw(), t.nbytes()));
    EXPECT_EQ(0, std::memcmp(file.data() + offset, t.raw(), t.nbytes()));
    offset += t.nbytes();
  }
  EXPECT_EQ(offset, file.size());
  // Only the manifest and the rank file are left in the directory.
  int entries = 0;
  for (auto& f : fs::directory_iterator(ckpt)) entries += f.is_regular_file();
  EXPECT_EQ(entries, 2);
  const std::string text = describe_checkpoint(ckpt);
  EXPECT_NE(text.find("step 40"), std::string::npos);
  EXPECT_NE(text.find("layers.0.mixer.q  bf16[8, 8]"), std::string::npos) << text;
  EXPECT_NE(text.find("optimizer.step = 40"), std::string::npos) << text;
}

TEST(Checkpoint, KilledSaveLeavesPreviousCheckpointLoadable) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const CheckpointState first = make_state(rng, 10);
  save_checkpoint(dir.path(), first, 5);
  const CheckpointState second = make_state(rng, 20);
  // A child process saves step 20 and is killed (_exit) once its rank file is written, before the
  // manifest: the barrier callback is exactly that point.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    try {
      save_checkpoint(dir.path(), second, 5, [] { _exit(42); });
    } catch (...) {
    }
    _exit(1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 42);
  EXPECT_TRUE(fs::exists(dir.path() + "/checkpoints/.tmp_step_00000020/rank_00000.bin"));
  // Also a step directory some other tool left without a manifest.
  fs::create_directories(dir.path() + "/checkpoints/step_00000030");
  std::ofstream(dir.path() + "/checkpoints/step_00000030/rank_00000.bin") << "junk";

  EXPECT_EQ(find_latest_checkpoint(dir.path()), dir.path() + "/checkpoints/step_00000010");
  CheckpointState e = empty_like(first);
  load_checkpoint(find_latest_checkpoint(dir.path()), 0, e);
  for (size_t i = 0; i < first.tensors.size(); ++i)
    EXPECT_EQ(bytes_of(e.tensors[i].tensor), bytes_of(first.tensors[i].tensor));
  EXPECT_EQ(e.step, 10);

  // The retried save succeeds and clears the stale temporary.
  save_checkpoint(dir.path(), second, 5);
  EXPECT_EQ(find_latest_checkpoint(dir.path()), dir.path() + "/checkpoints/step_00000020");
  EXPECT_FALSE(fs::exists(dir.path() + "/checkpoints/.tmp_step_00000020"));
  CheckpointState e2 = empty_like(second);
  load_checkpoint(find_latest_checkpoint(dir.path()), 0, e2);
  EXPECT_EQ(bytes_of(e2.tensors[0].tensor), bytes_of(second.tensors[0].tensor));
}

TEST(Checkpoint, TruncatedRankFileIsRejectedAndNothingIsModified) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const CheckpointState s = make_state(rng, 7);
  save_checkpoint(dir.path(), s, 1);
  const std::string ckpt = find_latest_checkpoint(dir.path());
  const std::string file = ckpt + "/rank_00000.bin";
  fs::resize_file(file, fs::file_size(file) - 1);
  CheckpointState e = empty_like(s);
  expect_error([&] { load_checkpoint(ckpt, 0, e); }, {file, "truncated"});
  expect_untouched(e);
  fs::remove(file);
  expect_error([&] { load_checkpoint(ckpt, 0, e); }, {file, "missing"});
  fs::remove(ckpt + "/manifest.pb");
  expect_error([&] { load_checkpoint(ckpt, 0, e); }, {ckpt, "manifest.pb"});
}

TEST(Checkpoint, FlippedByteFailsTheCrcOfThatTensorBeforeAnyTensorIsWritten) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const CheckpointState s = make_state(rng, 8);
  save_checkpoint(dir.path(), s, 1);
  const std::string ckpt = find_latest_checkpoint(dir.path());
  const pb::Manifest m = parse_manifest(ckpt);
  const auto& entry = m.ranks(0).tensors(2);  // layers.0.norm: earlier tensors are valid
  std::fstream f(ckpt + "/rank_00000.bin", std::ios::in | std::ios::out | std::ios::binary);
  const uint64_t pos = entry.offset() + rng() % entry.length();
  f.seekg(static_cast<std::streamoff>(pos));
  const char c = static_cast<char>(f.get());
  f.seekp(static_cast<std::streamoff>(pos));
  f.put(static_cast<char>(c ^ (1 << (rng() % 8))));
  f.close();
  CheckpointState e = empty_like(s);
  expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"rank_00000.bin", "\"layers.0.norm\"", "CRC32"});
  expect_untouched(e);
}

TEST(Checkpoint, ModelMismatchesAreRejectedNamingTheTensorAndTheDifference) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const CheckpointState s = make_state(rng, 9);
  save_checkpoint(dir.path(), s, 1);
  const std::string ckpt = find_latest_checkpoint(dir.path());
  {
    CheckpointState e = empty_like(s);
    e.tensors[1].tensor = Tensor::empty({8, 9}, DType::BF16);
    std::memset(e.tensors[1].tensor.raw(), 0xAB, e.tensors[1].tensor.nbytes());
    expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"layers.0.mixer.q", "[8, 9]", "[8, 8]"});
    expect_untouched(e);
  }
  {
    CheckpointState e = empty_like(s);
    e.tensors[0].tensor = Tensor::empty({16, 8}, DType::BF16);
    std::memset(e.tensors[0].tensor.raw(), 0xAB, e.tensors[0].tensor.nbytes());
    expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"embed.weight", "fp32", "bf16"});
    expect_untouched(e);
  }
  {
    CheckpointState e = empty_like(s);
    Tensor t = Tensor::empty({2}, DType::F32);
    std::memset(t.raw(), 0xAB, t.nbytes());
    e.tensors.push_back({"layers.1.norm", t});
    expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"no tensor \"layers.1.norm\""});
    expect_untouched(e);
  }
  {
    CheckpointState e = empty_like(s);
    e.model_signature = "softmax-llama d=8";
    expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"signature", "softmax-llama d=8", s.model_signature});
    expect_untouched(e);
  }
  {
    CheckpointState e = empty_like(s);
    e.world_size = 2;
    expect_error([&] { load_checkpoint(ckpt, 0, e); }, {"1 ranks", "this run has 2"});
    expect_untouched(e);
  }
  {  // An optional tensor the checkpoint lacks (written before it existed) is skipped and
     // reported as not found; the stored ones load.
    CheckpointState e = empty_like(s);
    Tensor t = Tensor::empty({3, 17}, DType::F32);
    std::memset(t.raw(), 0xAB, t.nbytes());
    e.tensors.push_back({"fp8_amax_history.layers.0.mixer.q", t, /*optional=*/true});
    load_checkpoint(ckpt, 0, e);
    EXPECT_FALSE(e.tensors.back().found);
    EXPECT_EQ(bytes_of(e.tensors.back().tensor), std::vector<uint8_t>(t.nbytes(), 0xAB)) << "left as it was";
    EXPECT_TRUE(e.tensors[1].found);
    EXPECT_EQ(bytes_of(e.tensors[1].tensor), bytes_of(s.tensors[1].tensor));
  }
  {  // Fewer expected tensors than stored: the rest is ignored.
    CheckpointState e = empty_like(s);
    e.tensors.resize(2);
    load_checkpoint(ckpt, 0, e);
    EXPECT_EQ(bytes_of(e.tensors[1].tensor), bytes_of(s.tensors[1].tensor));
  }
}

TEST(Checkpoint, KeepLastDeletesAllButTheNewestCompleteCheckpoints) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  for (int64_t step : {5, 10, 15, 20, 25}) save_checkpoint(dir.path(), make_state(rng, step), 2);
  const auto all = list_checkpoints(dir.path());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], dir.path() + "/checkpoints/step_00000020");
  EXPECT_EQ(all[1], dir.path() + "/checkpoints/step_00000025");
  // Steps sort numerically, not by name length; keep_last 0 keeps everything.
  save_checkpoint(dir.path(), make_state(rng, 100000000), 0);
  save_checkpoint(dir.path(), make_state(rng, 30), 0);
  EXPECT_EQ(list_checkpoints(dir.path()).size(), 4u);
  EXPECT_EQ(find_latest_checkpoint(dir.path()), dir.path() + "/checkpoints/step_100000000");
  EXPECT_EQ(find_latest_checkpoint(dir.path() + "/nowhere"), "");
}

TEST(Checkpoint, ResavingAStepReplacesItAtomically) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  save_checkpoint(dir.path(), make_state(rng, 12), 2);
  const CheckpointState again = make_state(rng, 12);
  save_checkpoint(dir.path(), again, 2);
  CheckpointState e = empty_like(again);
  load_checkpoint(find_latest_checkpoint(dir.path()), 0, e);
  EXPECT_EQ(bytes_of(e.tensors[0].tensor), bytes_of(again.tensors[0].tensor));
  EXPECT_EQ(list_checkpoints(dir.path()).size(), 1u);
}

// A reusable barrier for threads standing in for ranks.
class ThreadBarrier {
 public:
  explicit ThreadBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int gen = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0, generation_ = 0;
};

TEST(Checkpoint, EveryRankWritesItsFileAndRankZeroTheManifest) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  const int world = 3;
  std::vector<CheckpointState> states;
  for (int r = 0; r < world; ++r) {
    CheckpointState s = make_state(rng, 60);
    s.world_size = world;
    s.rank = r;
    s.tp = 1;
    s.sp = 3;
    s.dp = 1;
    s.tensors.resize(2 + r);  // ranks may hold different tensors (e.g. ZeRO shards)
    states.push_back(s);
  }
  ThreadBarrier barrier(world);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        save_checkpoint(dir.path(), states[r], 2, [&] { barrier.wait(); });
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  const std::string ckpt = find_latest_checkpoint(dir.path());
  const pb::Manifest m = parse_manifest(ckpt);
  ASSERT_EQ(m.ranks_size(), world);
  EXPECT_EQ(m.layout().sp(), 3);
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(m.ranks(r).file(), "rank_0000" + std::to_string(r) + ".bin");
    EXPECT_EQ(m.ranks(r).tensors_size(), 2 + r);
    CheckpointState e = empty_like(states[r]);
    e.tp = 1;
    e.sp = 3;
    e.dp = 1;
    load_checkpoint(ckpt, r, e);
    for (size_t i = 0; i < e.tensors.size(); ++i)
      EXPECT_EQ(bytes_of(e.tensors[i].tensor), bytes_of(states[r].tensors[i].tensor));
    EXPECT_EQ(e.rng_state, states[r].rng_state);
    EXPECT_EQ(e.sampler.index, states[r].sampler.index);
  }
  CheckpointState wrong = empty_like(states[0]);
  wrong.tp = 3;
  wrong.sp = 1;
  wrong.dp = 1;
  expect_error([&] { load_checkpoint(ckpt, 0, wrong); }, {"layout", "tp 1 x sp 3 x dp 1"});
  CheckpointState bad = states[0];
  bad.tp = 2;
  expect_error([&] { save_checkpoint(dir.path(), bad, 2, [] {}); }, {"does not multiply"});
  expect_error([&] { save_checkpoint(dir.path(), states[1], 2); }, {"barrier"});
}

TEST(Checkpoint, BadStatesAreRejectedOnSave) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  CheckpointState s = make_state(rng, 1);
  s.tensors.push_back(s.tensors[0]);
  expect_error([&] { save_checkpoint(dir.path(), s, 1); }, {"embed.weight", "twice"});
  s = make_state(rng, 1);
  s.rank = 1;
  expect_error([&] { save_checkpoint(dir.path(), s, 1); }, {"rank 1"});
  EXPECT_EQ(find_latest_checkpoint(dir.path()), "");
}

TEST(Safetensors, HeaderJsonAndOffsetsDescribeTheRawData) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  Tensor a = random_tensor(rng, {2, 3}, DType::F32);
  Tensor b = random_tensor(rng, {5}, DType::BF16);
  Tensor c = random_tensor(rng, {1, 2, 2}, DType::I64);
  const std::string path = dir.path() + "/model.safetensors";
  export_safetensors(path, {{"w.a", a}, {"w\"b", b}, {"c", c}});
  const std::vector<uint8_t> file = read_bytes(path);
  ASSERT_GE(file.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(file[i]) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  const std::string header(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  const std::string expected =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"w.a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
      "\"w\\\"b\":{\"dtype\":\"BF16\",\"shape\":[5],\"data_offsets\":[24,34]},"
      "\"c\":{\"dtype\":\"I64\",\"shape\":[1,2,2],\"data_offsets\":[34,66]}}";
  EXPECT_EQ(header.substr(0, expected.size()), expected);
  EXPECT_EQ(header.find_first_not_of(' ', expected.size()), std::string::npos) << "padding must be spaces";
  ASSERT_EQ(file.size(), 8 + n + 66);
  const uint8_t* data = file.data() + 8 + n;
  EXPECT_EQ(0, std::memcmp(data, a.raw(), 24));
  EXPECT_EQ(0, std::memcmp(data + 24, b.raw(), 10));
  EXPECT_EQ(0, std::memcmp(data + 34, c.raw(), 32));
  expect_error([&] { export_safetensors(path, {{"x", a}, {"x", b}}); }, {"\"x\" appears twice"});
}

}  // namespace
}  // namespace lasp
