// metrics.jsonl and TensorBoard event files. Formats: metrics.h.
#include "launch/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/check.h"
#include "data/checksum.h"
#include "launch/tensorboard.pb.h"

namespace lasp {

namespace {

double now_unix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void append_json_number(std::string& out, double v) {
  if (!std::isfinite(v)) {  // JSON has no NaN / inf
    out += "null";
    return;
  }
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);  // shortest round-trip form
  out.append(buf, r.ptr);
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

}  // namespace

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string metrics_json_line(int64_t step, double wall_time,
                              const std::vector<std::pair<std::string, double>>& values) {
  std::string line = "{\"step\":" + std::to_string(step) + ",\"time\":";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", wall_time);
  line += buf;
  for (const auto& [key, value] : values) {
    line += ',';
    line += json_string(key);
    line += ':';
    append_json_number(line, value);
  }
  line += '}';
  return line;
}

MetricsWriter::MetricsWriter(const std::string& run_dir, bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(run_dir + "/tb", ec);
  LASP_CHECK(fs::is_directory(run_dir + "/tb")) << "metrics: cannot create " << run_dir << "/tb (" << ec.message() << ")";
  jsonl_path_ = run_dir + "/metrics.jsonl";
  jsonl_ = std::fopen(jsonl_path_.c_str(), "ab");
  LASP_CHECK(jsonl_) << "metrics: cannot open " << jsonl_path_ << " (" << std::strerror(errno) << ")";
  const double t = now_unix();
  event_path_ = run_dir + "/tb/events.out.tfevents." + std::to_string(static_cast<int64_t>(t)) + "." + host_name();
  events_ = std::fopen(event_path_.c_str(), "ab");
  LASP_CHECK(events_) << "metrics: cannot open " << event_path_ << " (" << std::strerror(errno) << ")";
  tb::Event first;
  first.set_wall_time(t);
  first.set_step(0);
  first.set_file_version("brain.Event:2");
  write_record(first.SerializeAsString());
  std::fflush(events_);
}

MetricsWriter::~MetricsWriter() {
  if (jsonl_) std::fclose(jsonl_);
  if (events_) std::fclose(events_);
}

void MetricsWriter::write_record(const std::string& data) {
  uint8_t header[12];
  const uint64_t len = data.size();
  for (int i = 0; i < 8; ++i) header[i] = static_cast<uint8_t>(len >> (8 * i));
  const uint32_t len_crc = mask_crc32c(crc32c(0, header, 8));
  const uint32_t data_crc = mask_crc32c(crc32c(0, data.data(), data.size()));
  for (int i = 0; i < 4; ++i) header[8 + i] = static_cast<uint8_t>(len_crc >> (8 * i));
  uint8_t footer[4];
  for (int i = 0; i < 4; ++i) footer[i] = static_cast<uint8_t>(data_crc >> (8 * i));
  const bool ok = std::fwrite(header, 1, 12, events_) == 12 &&
                  std::fwrite(data.data(), 1, data.size(), events_) == data.size() &&
                  std::fwrite(footer, 1, 4, events_) == 4;
  LASP_CHECK(ok) << "metrics: writing " << event_path_ << " failed (" << std::strerror(errno) << ")";
}

void MetricsWriter::log(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  if (!enabled_) return;
  const double t = now_unix();
  const std::string line = metrics_json_line(step, t, values) + "\n";
  LASP_CHECK(std::fwrite(line.data(), 1, line.size(), jsonl_) == line.size() && std::fflush(jsonl_) == 0)
      << "metrics: writing " << jsonl_path_ << " failed (" << std::strerror(errno) << ")";

  tb::Event event;
  event.set_wall_time(t);
  event.set_step(step);
  tb::Summary* summary = event.mutable_summary();
  for (const auto& [key, value] : values) {
    tb::SummaryValue* v = summary->add_value();
    v->set_tag(key);
    v->set_simple_value(static_cast<float>(value));
  }
  write_record(event.SerializeAsString());
  LASP_CHECK(std::fflush(events_) == 0) << "metrics: writing " << event_path_ << " failed (" << std::strerror(errno) << ")";
}

}  // namespace lasp
