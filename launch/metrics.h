// Training metrics: one JSON object per line in <run_dir>/metrics.jsonl and the same scalars in a
// TensorBoard event file <run_dir>/tb/events.out.tfevents.<unix time>.<host>.
//
//   MetricsWriter metrics(run_dir, grid.rank() == 0);
//   metrics.log(step, {{"train/loss", loss}, {"train/lr", lr}, {"perf/tokens_per_s", tps}});
//
// metrics.jsonl line: {"step":40,"time":1700000000.123,"train/loss":2.4107,...} -- keys in the
// order given, numbers in shortest round-trip form, non-finite values as null. Both files are
// opened for appending (a resumed run continues them) and flushed after every log() call.
// Event file: TFRecord frames (uint64 length, masked CRC32C of the length, the serialized Event,
// masked CRC32C of it); the first Event holds file_version "brain.Event:2", then one Event per
// log() call with a Summary of simple_value scalars (float32: TensorBoard's scalar type).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace lasp {

class MetricsWriter {  // only rank 0 constructs it enabled
 public:
  MetricsWriter(const std::string& run_dir, bool enabled);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  // Appends one line to metrics.jsonl and one Event to the event file; a no-op when disabled.
  void log(int64_t step, const std::vector<std::pair<std::string, double>>& values);

  bool enabled() const { return enabled_; }
  const std::string& jsonl_path() const { return jsonl_path_; }
  const std::string& event_path() const { return event_path_; }

 private:
  void write_record(const std::string& data);

  bool enabled_;
  std::string jsonl_path_, event_path_;
  std::FILE* jsonl_ = nullptr;
  std::FILE* events_ = nullptr;
};

// s as a JSON string literal: quoted, with " \ and control characters escaped (metrics.jsonl
// keys, the safetensors header's tensor names).
std::string json_string(const std::string& s);

// Formats one metrics.jsonl line (without the newline); exposed for tests and tools.
std::string metrics_json_line(int64_t step, double wall_time,
                              const std::vector<std::pair<std::string, double>>& values);

}  // namespace lasp
