// Tests of launch/metrics: metrics.jsonl lines and TensorBoard event files, read back by an
// independent TFRecord reader (its own bitwise CRC32C).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>

#include "core/check.h"
#include "data/checksum.h"
#include "tests/test_util.h"
#include "launch/metrics.h"
#include "launch/tensorboard.pb.h"

namespace lasp {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

// Bitwise CRC32C (Castagnoli, reflected 0x82F63B78) and TFRecord's mask, written from the spec.
uint32_t reference_crc32c(const void* data, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}
uint32_t reference_mask(uint32_t crc) {
  const uint32_t rotated = (crc >> 15) | (crc << 17);
  return rotated + 0xA282EAD8u;
}

uint64_t read_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// Reads every TFRecord of an event file, checking both CRCs of every record.
std::vector<tb::Event> read_events(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<uint8_t> f(std::istreambuf_iterator<char>(in), {});
  std::vector<tb::Event> events;
  size_t pos = 0;
  while (pos < f.size()) {
    EXPECT_LE(pos + 12, f.size()) << "truncated record header";
    if (pos + 12 > f.size()) break;
    const uint64_t len = read_le(&f[pos], 8);
    EXPECT_EQ(read_le(&f[pos + 8], 4), reference_mask(reference_crc32c(&f[pos], 8))) << "length CRC at " << pos;
    EXPECT_LE(pos + 12 + len + 4, f.size()) << "truncated record";
    if (pos + 12 + len + 4 > f.size()) break;
    const uint8_t* data = &f[pos + 12];
    EXPECT_EQ(read_le(data + len, 4), reference_mask(reference_crc32c(data, len))) << "data CRC at " << pos;
    tb::Event e;
    EXPECT_TRUE(e.ParseFromArray(data, static_cast<int>(len)));
    events.push_back(e);
    pos += 12 + len + 4;
  }
  return events;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

TEST(Checksum, Crc32cMatchesTheBitwiseReferenceAndTheCheckValue) {
  EXPECT_EQ(crc32c(0, "123456789", 9), 0xE3069283u);
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> buf(257);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t n = 0; n <= buf.size(); ++n) ASSERT_EQ(crc32c(0, buf.data(), n), reference_crc32c(buf.data(), n)) << n;
  for (int i = 0; i < 100; ++i) {
    const uint32_t c = static_cast<uint32_t>(rng());
    EXPECT_EQ(mask_crc32c(c), reference_mask(c));
  }
}

TEST(Metrics, JsonLinesHoldStepTimeAndValuesInOrder) {
  const std::string line = metrics_json_line(
      12, 1700000000.5, {{"train/loss", 2.5}, {"lr", 3e-4}, {"we\"ird\\key", -0.1}, {"nan", std::nan("")},
                         {"inf", std::numeric_limits<double>::infinity()}, {"n", 1234567.0}});
  EXPECT_EQ(line,
            "{\"step\":12,\"time\":1700000000.500,\"train/loss\":2.5,\"lr\":3e-04,\"we\\\"ird\\\\key\":-0.1,"
            "\"nan\":null,\"inf\":null,\"n\":1234567}");
  // Shortest round-trip: the printed number parses back to the same double.
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> u(-1e6, 1e6);
  for (int i = 0; i < 100; ++i) {
    const double v = u(rng);
    const std::string l = metrics_json_line(0, 0, {{"v", v}});
    const size_t at = l.find("\"v\":") + 4;
    EXPECT_EQ(std::strtod(l.c_str() + at, nullptr), v) << l;
  }
}

TEST(Metrics, JsonStringEscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(json_string("plain/name.0"), "\"plain/name.0\"");
  EXPECT_EQ(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(json_string(std::string("t\tn\n\x01") + '\0'), "\"t\\u0009n\\u000a\\u0001\\u0000\"");
  EXPECT_EQ(json_string("\xc3\xa9"), "\"\xc3\xa9\"");  // UTF-8 passes through
}

TEST(Metrics, WritesJsonlAndTensorBoardEventsThatReadBackWithValidCrcs) {
  TempDir dir;
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> u(0.5, 6.0);
  std::vector<std::vector<std::pair<std::string, double>>> logged;
  std::string event_path;
  {
    MetricsWriter w(dir.path() + "/run", true);
    EXPECT_TRUE(w.enabled());
    event_path = w.event_path();
    for (int step = 1; step <= 5; ++step) {
      logged.push_back({{"train/loss", u(rng)}, {"train/lr", 1e-3 * step}});
      w.log(step * 10, logged.back());
      // Flushed each line: visible before the writer closes.
      EXPECT_EQ(read_lines(dir.path() + "/run/metrics.jsonl").size(), static_cast<size_t>(step));
    }
  }
  EXPECT_EQ(fs::path(event_path).parent_path(), fs::path(dir.path() + "/run/tb"));
  EXPECT_EQ(fs::path(event_path).filename().string().rfind("events.out.tfevents.", 0), 0u);

  const std::vector<tb::Event> events = read_events(event_path);
  ASSERT_EQ(events.size(), 6u);
  EXPECT_EQ(events[0].file_version(), "brain.Event:2");
  EXPECT_GT(events[0].wall_time(), 1.6e9);
  for (int i = 1; i <= 5; ++i) {
    const tb::Event& e = events[i];
    EXPECT_EQ(e.step(), 10 * i);
    EXPECT_GE(e.wall_time(), events[0].wall_time());
    ASSERT_TRUE(e.has_summary());
    ASSERT_EQ(e.summary().value_size(), 2);
    EXPECT_EQ(e.summary().value(0).tag(), "train/loss");
    EXPECT_EQ(e.summary().value(0).simple_value(), static_cast<float>(logged[i - 1][0].second));
    EXPECT_EQ(e.summary().value(1).tag(), "train/lr");
    EXPECT_FLOAT_EQ(e.summary().value(1).simple_value(), 1e-3f * i);
  }
  const auto lines = read_lines(dir.path() + "/run/metrics.jsonl");
  ASSERT_EQ(lines.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(lines[i].rfind("{\"step\":" + std::to_string(10 * (i + 1)) + ",\"time\":", 0), 0u) << lines[i];
    const size_t at = lines[i].find("\"train/loss\":") + 13;
    EXPECT_EQ(std::strtod(lines[i].c_str() + at, nullptr), logged[i][0].second);
  }

  // A resumed run appends to metrics.jsonl.
  {
    MetricsWriter w(dir.path() + "/run", true);
    w.log(60, {{"train/loss", 1.0}});
  }
  EXPECT_EQ(read_lines(dir.path() + "/run/metrics.jsonl").size(), 6u);
}

TEST(Metrics, DisabledWriterCreatesNothing) {
  TempDir dir;
  MetricsWriter w(dir.path() + "/run", false);
  w.log(1, {{"train/loss", 3.0}});
  EXPECT_FALSE(w.enabled());
  EXPECT_FALSE(fs::exists(dir.path() + "/run"));
}

TEST(Metrics, UnwritableRunDirIsAClearError) {
  TempDir dir;
  std::ofstream(dir.path() + "/file") << "x";  // a file where the run directory should go
  try {
    MetricsWriter w(dir.path() + "/file/run", true);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir.path() + "/file/run"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lasp
