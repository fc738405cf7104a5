// Tests of data/: token shards, the tokenizer, the default corpus, open_data, the sampler, sp_slice
// and prepare-data.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "core/check.h"
#include "data/dataset.h"
#include "tests/test_util.h"

namespace lasp {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;
using testing::expect_error;

std::vector<uint32_t> random_tokens(std::mt19937_64& rng, size_t n, uint32_t vocab) {
  std::vector<uint32_t> t(n);
  for (auto& x : t) x = static_cast<uint32_t>(rng() % vocab);
  return t;
}

// Writes a shard byte by byte, independently of write_token_shard, with any header values.
void write_raw_shard(const std::string& path, const char* magic, uint32_t version, uint32_t token_bytes,
                     uint64_t num_tokens, uint64_t reserved, size_t payload_bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(magic, 8);
  auto put = [&](uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) f.put(static_cast<char>((v >> (8 * i)) & 0xFF));
  };
  put(version, 4);
  put(token_bytes, 4);
  put(num_tokens, 8);
  put(reserved, 8);
  for (size_t i = 0; i < payload_bytes; ++i) f.put(static_cast<char>(i * 7));
}

TEST(TokenShard, WriteThenOpenRoundTripsBothTokenWidths) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  for (int token_bytes : {2, 4}) {
    const uint32_t vocab = token_bytes == 2 ? 65536u : 0xFFFFFFFFu;
    const auto tokens = random_tokens(rng, 1000 + rng() % 1000, vocab);
    const std::string path = dir.file("s" + std::to_string(token_bytes) + ".bin");
    write_token_shard(path, tokens, token_bytes);
    EXPECT_EQ(fs::file_size(path), 32 + tokens.size() * token_bytes);
    // The header, read independently.
    std::ifstream f(path, std::ios::binary);
    char header[32];
    f.read(header, 32);
    EXPECT_EQ(std::string(header, 8), "LASPTOK1");
    EXPECT_EQ(static_cast<uint8_t>(header[8]), 1);
    EXPECT_EQ(static_cast<uint8_t>(header[12]), token_bytes);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(header[16 + i])) << (8 * i);
    EXPECT_EQ(n, tokens.size());

    const TokenStream s = TokenStream::open({path});
    ASSERT_EQ(s.size(), static_cast<int64_t>(tokens.size()));
    for (size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ(s[static_cast<int64_t>(i)], tokens[i]) << i;
    EXPECT_EQ(s.max_token(), *std::max_element(tokens.begin(), tokens.end()));
  }
}

TEST(TokenShard, ConcatenatesShardsAndSlicesAcrossBoundaries) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint32_t> all;
  std::vector<std::string> paths;
  for (int k = 0; k < 4; ++k) {
    const auto t = random_tokens(rng, k == 2 ? 0 : 50 + rng() % 200, 5000);  // one empty shard
    all.insert(all.end(), t.begin(), t.end());
    paths.push_back(dir.file("shard" + std::to_string(k) + ".bin"));
    write_token_shard(paths.back(), t, k % 2 ? 4 : 2);
  }
  const TokenStream s = TokenStream::open(paths);
  ASSERT_EQ(s.size(), static_cast<int64_t>(all.size()));
  for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(s[static_cast<int64_t>(i)], all[i]);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t a = static_cast<int64_t>(rng() % all.size());
    const int64_t b = a + static_cast<int64_t>(rng() % (all.size() - a + 1));
    const TokenStream v = s.slice(a, b);
    ASSERT_EQ(v.size(), b - a);
    std::vector<int32_t> out(static_cast<size_t>(b - a));
    v.copy(0, b - a, out.data());
    uint32_t m = 0;
    for (int64_t i = a; i < b; ++i) {
      ASSERT_EQ(static_cast<uint32_t>(out[i - a]), all[i]);
      ASSERT_EQ(v[i - a], all[i]);
      m = std::max(m, all[i]);
    }
    EXPECT_EQ(v.max_token(), m);
    if (b - a >= 3) {  // a slice of a slice (non-empty: drop one token at each end)
      const TokenStream w = v.slice(1, b - a - 1);
      EXPECT_EQ(w[0], all[a + 1]);
    }
  }
  EXPECT_THROW(s[s.size()], Error);
  EXPECT_THROW(s.slice(0, s.size() + 1), Error);
  EXPECT_EQ(s.slice(3, 3).max_token(), 0u);
}

TEST(TokenShard, BadFilesAreRejectedNamingFileAndProblem) {
  TempDir dir;
  const std::string p = dir.file("bad.bin");
  write_raw_shard(p, "LASPTOK1", 1, 2, 10, 0, 5);
  expect_error([&] { TokenStream::open({p}); }, {p, "truncated"});
  write_raw_shard(p, "LASPTOK1", 1, 2, 10, 0, 22);
  expect_error([&] { TokenStream::open({p}); }, {p, "size mismatch"});
  write_raw_shard(p, "NOTTOKEN", 1, 2, 10, 0, 20);
  expect_error([&] { TokenStream::open({p}); }, {p, "wrong magic"});
  write_raw_shard(p, "LASPTOK1", 2, 2, 10, 0, 20);
  expect_error([&] { TokenStream::open({p}); }, {p, "version 2"});
  write_raw_shard(p, "LASPTOK1", 1, 3, 10, 0, 30);
  expect_error([&] { TokenStream::open({p}); }, {p, "token_bytes is 3"});
  write_raw_shard(p, "LASPTOK1", 1, 2, 10, 9, 20);
  expect_error([&] { TokenStream::open({p}); }, {p, "reserved"});
  {
    std::ofstream f(p, std::ios::binary);
    f << "LASPTOK1abc";  // shorter than a header
  }
  expect_error([&] { TokenStream::open({p}); }, {p, "truncated header"});
  const std::string missing = dir.file("missing.bin");
  expect_error([&] { TokenStream::open({missing}); }, {missing, "cannot open"});
  // A good file next to a bad one: the bad one is named.
  write_raw_shard(p, "LASPTOK1", 1, 4, 3, 0, 12);
  EXPECT_EQ(TokenStream::open({p}).size(), 3);
  expect_error([&] { write_token_shard(dir.file("x.bin"), {1, 70000}, 2); }, {"70000", "2 bytes"});
  expect_error([&] { write_token_shard(dir.file("x.bin"), {1}, 3); }, {"token_bytes"});
}

TEST(ByteTokenizer, RoundTripsEveryByteValue) {
  std::string text;
  for (int b = 0; b < 256; ++b) text.push_back(static_cast<char>(b));
  text += "hello, world\n";
  const auto tokens = byte_tokenize(text);
  ASSERT_EQ(tokens.size(), text.size());
  for (int b = 0; b < 256; ++b) EXPECT_EQ(tokens[b], static_cast<uint32_t>(b));
  EXPECT_EQ(tokens[256], static_cast<uint32_t>('h'));
  EXPECT_EQ(byte_detokenize(tokens), text);
  EXPECT_THROW(byte_detokenize({65, 256}), Error);
}

TEST(DefaultCorpus, IsDeterministicFastAndOneToTwoMegabytes) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string a = default_corpus_text();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 0.5);
  EXPECT_GE(a.size(), 1000000u);
  EXPECT_LE(a.size(), 2000000u);
  EXPECT_EQ(default_corpus_text(), a);
  for (char c : a) ASSERT_TRUE(c == '\n' || (c >= 32 && c < 127)) << "non-printable byte " << int(c);
}

TEST(DefaultCorpus, ArithmeticLinesAreCorrect) {
  const std::string text = default_corpus_text();
  const std::regex line_re(R"((?:^|\n)(\d+) ([-+*]) (\d+) = (\d+)\.)");
  int checked = 0;
  for (std::sregex_iterator it(text.begin(), text.end(), line_re), end; it != end; ++it) {
    const long a = std::stol((*it)[1]), b = std::stol((*it)[3]), c = std::stol((*it)[4]);
    const char op = (*it)[2].str()[0];
    const long expected = op == '+' ? a + b : op == '-' ? a - b : a * b;
    ASSERT_EQ(c, expected) << (*it)[0];
    ++checked;
  }
  EXPECT_GT(checked, 5000);
}

TEST(DefaultCorpus, AnswersRepeatTheFactsStatedBefore) {
  const std::string text = default_corpus_text();
  // "The red cup is in the kitchen." must follow "... the red cup in the kitchen." in the same line.
  const std::regex q_re(R"(Where is the (\w+) (\w+)\? The \1 \2 is ([a-z ]+)\.)");
  std::istringstream lines(text);
  std::string line;
  int questions = 0;
  while (std::getline(lines, line)) {
    std::smatch m;
    if (!std::regex_search(line, m, q_re)) continue;
    const std::string fact = "the " + m[1].str() + " " + m[2].str() + " " + m[3].str() + ".";
    ASSERT_NE(line.find(fact), std::string::npos) << line;
    ASSERT_LT(line.find(fact), static_cast<size_t>(m.position(0))) << line;
    if (++questions == 2000) break;
  }
  EXPECT_EQ(questions, 2000);
}

TEST(DefaultCorpus, HasLowConditionalEntropyButRichUnigrams) {
  // Plug-in estimates over the whole corpus: H(byte) and H(byte | previous 4 bytes), in nats.
  // Learnable structure: a model with a short context already does much better than unigrams.
  const std::string text = default_corpus_text();
  std::map<unsigned char, double> uni;
  std::map<std::string, std::map<char, double>> ctx;
  for (size_t i = 0; i < text.size(); ++i) {
    uni[static_cast<unsigned char>(text[i])] += 1;
    if (i >= 4) ctx[text.substr(i - 4, 4)][text[i]] += 1;
  }
  const double n = static_cast<double>(text.size());
  double h1 = 0;
  for (auto& [c, k] : uni) h1 -= k / n * std::log(k / n);
  double h5 = 0, total = 0;
  for (auto& [c, next] : ctx) {
    double sum = 0;
    for (auto& [x, k] : next) sum += k;
    for (auto& [x, k] : next) h5 -= k * std::log(k / sum);
    total += sum;
  }
  h5 /= total;
  EXPECT_GT(h1, 2.5);  // not trivial: dozens of symbols in use
  EXPECT_LT(h5, 1.2);  // but well under 2.5 nats once a little context is used
  EXPECT_LT(uni.size(), 80u);
}

TEST(OpenData, BuiltinSplitsTheTailOffAsValidation) {
  const DataSplit d = open_data("builtin", "", 0.05);
  const std::string text = default_corpus_text();
  const int64_t n = static_cast<int64_t>(text.size());
  EXPECT_EQ(d.train.size() + d.val.size(), n);
  EXPECT_EQ(d.val.size(), static_cast<int64_t>(n * 0.05));
  EXPECT_EQ(d.train[0], static_cast<uint32_t>(text[0]));
  EXPECT_EQ(d.val[0], static_cast<uint32_t>(text[d.train.size()]));
  EXPECT_EQ(d.val[d.val.size() - 1], static_cast<uint32_t>(text.back()));
  EXPECT_LT(d.train.max_token(), 128u);
  EXPECT_EQ(open_data("builtin", "", 0.0).val.size(), 0);
  expect_error([] { open_data("builtin", "", 1.0); }, {"val_fraction"});
  expect_error([] { open_data("builtin", "", -0.1); }, {"val_fraction"});
}

// builtin:<MB> runs the same generator longer: at least that many bytes, starting with the
// default corpus (so validation moves to the new tail), and bad sizes are refused naming the key.
TEST(OpenData, BuiltinWithASizeExtendsTheDefaultCorpus) {
  const std::string base = default_corpus_text();
  const DataSplit d = open_data(" builtin:3.5 ", "", 0.02);
  const int64_t n = d.train.size() + d.val.size();
  EXPECT_GE(n, static_cast<int64_t>(3.5 * 1024 * 1024));
  EXPECT_LT(n, static_cast<int64_t>(3.5 * 1024 * 1024) + 8192);  // whole paragraphs, not much more
  for (size_t i = 0; i < base.size(); i += 997) ASSERT_EQ(d.train[static_cast<int64_t>(i)], static_cast<uint32_t>(base[i])) << i;
  EXPECT_EQ(d.val.size(), static_cast<int64_t>(n * 0.02));
  EXPECT_NE(d.train.description().find("3.5 MB"), std::string::npos) << d.train.description();
  for (const char* bad : {"builtin:", "builtin:0", "builtin:-1", "builtin:2x", "builtin:4096"})
    expect_error([bad] { open_data(bad, "", 0.02); }, {"data.train", "builtin:<MB>"});
}

TEST(OpenData, ShardGlobsAreSortedAndValidationComesFromValSpec) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  std::vector<std::vector<uint32_t>> shards;
  for (int k = 0; k < 3; ++k) {
    shards.push_back(random_tokens(rng, 100 + k, 1000));
    write_token_shard(dir.file("train_" + std::to_string(k) + ".bin"), shards.back(), 2);
  }
  const auto val = random_tokens(rng, 77, 1000);
  write_token_shard(dir.file("val.bin"), val, 4);
  // Given out of order, the glob sorts: train_0, train_1, train_2.
  const DataSplit d = open_data(dir.file("train_2.bin") + ", " + dir.file("train_[01].bin"), dir.file("val.bin"), 0.5);
  ASSERT_EQ(d.train.size(), 102 + 100 + 101);
  EXPECT_EQ(d.train[0], shards[2][0]);
  EXPECT_EQ(d.train[102], shards[0][0]);
  EXPECT_EQ(d.train[202], shards[1][0]);
  ASSERT_EQ(d.val.size(), 77);
  EXPECT_EQ(d.val[76], val[76]);
  // No val_spec: the tail fraction of train.
  const DataSplit t = open_data(dir.file("train_*.bin"), "", 0.1);
  EXPECT_EQ(t.val.size(), 30);
  EXPECT_EQ(t.train.size(), 273);
  EXPECT_EQ(t.val[29], shards[2][101]);
  expect_error([&] { open_data(dir.file("nothing_*.bin"), "", 0.1); }, {"nothing_*.bin", "matches no file"});
  expect_error([&] { open_data(dir.file("absent.bin"), "", 0.1); }, {"absent.bin", "cannot open"});
  expect_error([&] { open_data(" , ", "", 0.1); }, {"names no shard"});
}

// Every row of a batch must be a window of the stream starting at a multiple of seq_len.
int64_t window_of_row(const TokenStream& s, const std::vector<int32_t>& tokens, int64_t row, int64_t seq_len,
                      const std::map<std::vector<int32_t>, int64_t>& windows) {
  std::vector<int32_t> r(tokens.begin() + row * (seq_len + 1), tokens.begin() + (row + 1) * (seq_len + 1));
  auto it = windows.find(r);
  return it == windows.end() ? -1 : it->second;
}

std::map<std::vector<int32_t>, int64_t> all_windows(const TokenStream& s, int64_t seq_len) {
  std::map<std::vector<int32_t>, int64_t> w;
  for (int64_t k = 0; (k + 1) * seq_len + 1 <= s.size(); ++k) {
    std::vector<int32_t> r;
    for (int64_t i = 0; i <= seq_len; ++i) r.push_back(static_cast<int32_t>(s[k * seq_len + i]));
    w.emplace(r, k);
  }
  return w;
}

TEST(Sampler, EachEpochVisitsEveryWindowOnceAcrossDataParallelRanks) {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t seq_len = 16, batch = 3;
  const int dp = 2;
  // Distinct windows (random tokens from a big vocab), 36 windows = 6 steps of 6 per epoch.
  const TokenStream s = TokenStream::from_tokens(random_tokens(rng, 36 * seq_len + 1, 1u << 30));
  const auto windows = all_windows(s, seq_len);
  ASSERT_EQ(windows.size(), 36u);
  std::vector<Sampler> ranks;
  for (int r = 0; r < dp; ++r) ranks.emplace_back(&s, seq_len, batch, r, dp, 99);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::vector<int> seen(36, 0);
    for (int step = 0; step < 6; ++step) {
      std::set<int64_t> this_step;
      for (int r = 0; r < dp; ++r) {
        std::vector<int32_t> tokens;
        ranks[r].next(tokens);
        ASSERT_EQ(tokens.size(), static_cast<size_t>(batch * (seq_len + 1)));
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t w = window_of_row(s, tokens, b, seq_len, windows);
          ASSERT_GE(w, 0) << "row is not a window at a multiple of seq_len";
          this_step.insert(w);
          ++seen[w];
        }
      }
      EXPECT_EQ(this_step.size(), static_cast<size_t>(batch * dp)) << "windows of one step must differ";
    }
    for (int k = 0; k < 36; ++k) EXPECT_EQ(seen[k], 1) << "window " << k << " in epoch " << epoch;
    EXPECT_EQ(ranks[0].position().epoch, static_cast<uint64_t>(epoch + 1));
    EXPECT_EQ(ranks[0].position().index, 0u);
  }
}

TEST(Sampler, ResumesExactlyFromASavedPosition) {
  std::mt19937_64 rng(std::random_device{}());
  const TokenStream s = TokenStream::from_tokens(random_tokens(rng, 10000, 50000));
  const int64_t seq_len = 32, batch = 4;
  Sampler a(&s, seq_len, batch, 1, 3, 7);
  std::vector<int32_t> t;
  const int before = 5 + static_cast<int>(rng() % 100);
  for (int i = 0; i < before; ++i) a.next(t);
  const SamplerPosition p = a.position();
  std::vector<std::vector<int32_t>> expected(30);
  for (auto& e : expected) a.next(e);

  Sampler b(&s, seq_len, batch, 1, 3, 7);
  b.set_position(p);
  for (auto& e : expected) {
    b.next(t);
    ASSERT_EQ(t, e);
  }
  // Same seed -> same stream; another seed -> another order.
  Sampler c(&s, seq_len, batch, 0, 1, 7), d(&s, seq_len, batch, 0, 1, 7), e(&s, seq_len, batch, 0, 1, 8);
  std::vector<int32_t> tc, td, te;
  c.next(tc);
  d.next(td);
  e.next(te);
  EXPECT_EQ(tc, td);
  EXPECT_NE(tc, te);
  expect_error([&] { b.set_position({0, static_cast<uint64_t>(b.num_windows())}); }, {"set_position"});
}

TEST(Sampler, SkipsTheEpochRemainderAndWrapsTinyStreams) {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t seq_len = 8;
  // 10 windows, 4 per step: steps 1, 2 use 8; the 2 left over are skipped.
  const TokenStream s = TokenStream::from_tokens(random_tokens(rng, 10 * seq_len + 1 + 5, 1u << 30));
  Sampler a(&s, seq_len, 4, 0, 1, 3);
  std::vector<int32_t> t;
  a.next(t);
  a.next(t);
  EXPECT_EQ(a.position().epoch, 0u);
  EXPECT_EQ(a.position().index, 8u);
  a.next(t);
  EXPECT_EQ(a.position().epoch, 1u);
  EXPECT_EQ(a.position().index, 4u);
  // 3 windows but 4 rows per step: the step wraps into the next epoch.
  const TokenStream tiny = s.slice(0, 3 * seq_len + 1);
  const auto windows = all_windows(tiny, seq_len);
  Sampler b(&tiny, seq_len, 4, 0, 1, 3);
  b.next(t);
  for (int64_t r = 0; r < 4; ++r) EXPECT_GE(window_of_row(tiny, t, r, seq_len, windows), 0);
  EXPECT_EQ(b.position().epoch, 1u);
  EXPECT_EQ(b.position().index, 1u);
  const TokenStream too_small = s.slice(0, seq_len);
  expect_error([&] { Sampler(&too_small, seq_len, 1, 0, 1, 0); }, {"shorter than one window"});
  expect_error([&] { Sampler(&s, seq_len, 1, 2, 2, 0); }, {"dp_rank"});
}

TEST(SpSlice, ContiguousRanksTileTheRowAndTargetsAreShiftedByOne) {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t batch = 3, seq_len = 24;
  std::vector<int32_t> tokens(batch * (seq_len + 1));
  for (auto& x : tokens) x = static_cast<int32_t>(rng() % 100000);
  for (int W : {1, 2, 3, 4, 6}) {
    const int64_t L = seq_len / W;
    for (int r = 0; r < W; ++r) {
      std::vector<int32_t> in, tg;
      sp_slice(tokens, batch, seq_len, r, W, false, in, tg);
      ASSERT_EQ(in.size(), static_cast<size_t>(batch * L));
      ASSERT_EQ(tg.size(), static_cast<size_t>(batch * L));
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < L; ++i) {
          EXPECT_EQ(in[b * L + i], tokens[b * (seq_len + 1) + r * L + i]);
          EXPECT_EQ(tg[b * L + i], tokens[b * (seq_len + 1) + r * L + i + 1]);
        }
    }
  }
}

TEST(SpSlice, ZigzagRanksHoldChunksRAndTwoWMinusOneMinusRCoveringEachPositionOnce) {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t batch = 2, seq_len = 48;
  std::vector<int32_t> tokens(batch * (seq_len + 1));
  for (int64_t b = 0; b < batch; ++b)  // token = its position (+1000 per row): easy to trace
    for (int64_t p = 0; p <= seq_len; ++p) tokens[b * (seq_len + 1) + p] = static_cast<int32_t>(1000 * b + p);
  for (int W : {1, 2, 3, 4}) {
    const int64_t L = seq_len / W, h = L / 2;
    std::vector<int> covered(seq_len, 0);
    for (int r = 0; r < W; ++r) {
      std::vector<int32_t> in, tg;
      sp_slice(tokens, batch, seq_len, r, W, true, in, tg);
      ASSERT_EQ(in.size(), static_cast<size_t>(batch * L));
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < L; ++i) {
          const int64_t chunk = i < h ? r : 2 * W - 1 - r;
          const int64_t pos = chunk * h + (i % h);
          EXPECT_EQ(in[b * L + i], 1000 * b + pos);
          EXPECT_EQ(tg[b * L + i], 1000 * b + pos + 1);
          if (b == 0) ++covered[pos];
        }
      }
    }
    for (int p = 0; p < seq_len; ++p) EXPECT_EQ(covered[p], 1) << "W=" << W << " position " << p;
  }
  std::vector<int32_t> in, tg;
  expect_error([&] { sp_slice(tokens, batch, seq_len, 0, 5, false, in, tg); }, {"not divisible"});
  expect_error([&] { sp_slice(tokens, batch, seq_len, 0, 16, true, in, tg); }, {"zigzag"});
  expect_error([&] { sp_slice(tokens, batch + 1, seq_len, 0, 2, false, in, tg); }, {"tokens holds"});
  expect_error([&] { sp_slice(tokens, batch, seq_len, 2, 2, false, in, tg); }, {"sp_rank"});
}

TEST(PrepareData, TextFilesBecomeTrainAndValShardsThatDetokenizeBack) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  std::string a, b;
  for (int i = 0; i < 3000; ++i) a.push_back(static_cast<char>(rng() % 256));
  for (int i = 0; i < 1000; ++i) b.push_back(static_cast<char>('a' + rng() % 26));
  std::ofstream(dir.file("a.txt"), std::ios::binary) << a;
  std::ofstream(dir.file("b.txt"), std::ios::binary) << b;
  const std::string out = dir.file("out");
  std::vector<std::string> args = {"--input",        dir.file("a.txt"), dir.file("b.txt"), "--output-dir", out,
                                   "--val-fraction", "0.1",             "--shard-tokens",  "1500"};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  ASSERT_EQ(prepare_data_main(static_cast<int>(argv.size()), argv.data()), 0);
  // 4000 tokens: 3600 train in shards of 1500, 1500, 600; 400 val.
  EXPECT_TRUE(fs::exists(out + "/train_00002.bin"));
  EXPECT_FALSE(fs::exists(out + "/train_00003.bin"));
  const DataSplit d = open_data(out + "/train_*.bin", out + "/val_*.bin", 0.0);
  ASSERT_EQ(d.train.size(), 3600);
  ASSERT_EQ(d.val.size(), 400);
  std::vector<uint32_t> back;
  for (int64_t i = 0; i < d.train.size(); ++i) back.push_back(d.train[i]);
  for (int64_t i = 0; i < d.val.size(); ++i) back.push_back(d.val[i]);
  EXPECT_EQ(byte_detokenize(back), a + b);

  std::vector<std::string> bad = {"--output-dir", out};
  std::vector<char*> bad_argv;
  for (auto& s : bad) bad_argv.push_back(s.data());
  EXPECT_EQ(prepare_data_main(static_cast<int>(bad_argv.size()), bad_argv.data()), 2);
}

}  // namespace
}  // namespace lasp
