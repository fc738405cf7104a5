#include "core/log.h"

#include <cstdio>
#include <cstring>

#include "core/check.h"

namespace lasp {

namespace {
bool g_quiet = false;
}

void set_log_quiet(bool quiet) { g_quiet = quiet; }

LogLine::LogLine(const char* level, bool all_ranks) {
  const bool is_info = std::strcmp(level, "info") == 0;
  enabled_ = all_ranks ? true : (process_rank() == 0 && !(is_info && g_quiet));
  if (enabled_ && !is_info) stream_ << "[" << level << " rank " << process_rank() << "] ";
}

LogLine::~LogLine() {
  if (!enabled_) return;
  stream_ << "\n";
  FILE* f = stream_.str().rfind("[", 0) == 0 ? stderr : stdout;  // warnings carry a prefix
  std::fputs(stream_.str().c_str(), f);
  std::fflush(f);
}

}  // namespace lasp
