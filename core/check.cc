#include "core/check.h"

#include <cstring>
#include <exception>

namespace lasp {

namespace {
int g_rank = 0;
}

int process_rank() { return g_rank; }
void set_process_rank(int rank) { g_rank = rank; }

namespace detail {

CheckMessage::CheckMessage(const char* file, int line, const char* condition) {
  const char* base = std::strrchr(file, '/');
  stream_ << "[rank " << process_rank() << "] " << (base ? base + 1 : file) << ":" << line << ": ";
  if (condition) stream_ << "check failed: " << condition << ": ";
}

CheckMessage::~CheckMessage() noexcept(false) {
  // Never throw while another exception is unwinding the stack.
  if (std::uncaught_exceptions() == 0) throw Error(stream_.str());
}

}  // namespace detail
}  // namespace lasp
