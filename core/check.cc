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

CheckMessage::CheckMessage(const char* file, int line, const char* condition) : condition_(condition) {
  const char* base = std::strrchr(file, '/');
  prefix_ = "[rank " + std::to_string(process_rank()) + "] " + (base ? base + 1 : file) + ":" +
            std::to_string(line) + ": ";
}

CheckMessage::~CheckMessage() noexcept(false) {
  // Never throw while another exception is unwinding the stack.
  if (std::uncaught_exceptions() != 0) return;
  std::string message = stream_.str();
  if (message.empty() || (condition_ && message.rfind("(", 0) == 0)) {
    message = std::string("check failed: ") + (condition_ ? condition_ : "") + " " + message;
  }
  throw Error(prefix_ + message);
}

}  // namespace detail
}  // namespace lasp
