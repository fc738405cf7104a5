// Logging: rank-0 info by default; every rank for warnings and errors.
//   LASP_INFO() << "step " << s;     (rank 0 only)
//   LASP_WARN() << "...";            (every rank, prefixed with the rank)
#pragma once

#include <sstream>

namespace lasp {

class LogLine {
 public:
  LogLine(const char* level, bool all_ranks);
  ~LogLine();
  template <typename T>
  LogLine& operator<<(const T& v) {
    if (enabled_) stream_ << v;
    return *this;
  }

 private:
  bool enabled_;
  std::ostringstream stream_;
};

// Silences rank-0 info lines (tests, benchmarks).
void set_log_quiet(bool quiet);

}  // namespace lasp

#define LASP_INFO() ::lasp::LogLine("info", false)
#define LASP_WARN() ::lasp::LogLine("warn", true)
