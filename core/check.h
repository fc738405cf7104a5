// Error handling for lasp: one macro family that names file, line and rank.
//
//   LASP_CHECK(n > 0) << "model.layers must be positive, got " << n;
//   LASP_CHECK_EQ(a.numel(), b.numel()) << "in rmsnorm_forward";
//
// A failed check throws lasp::Error whose message is "[rank R] file:line: <message>", or
// "[rank R] file:line: check failed: <condition>" when the check streams no message.
// launch/ catches it at the top, prints it and exits non-zero; tests can EXPECT_THROW it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lasp {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The rank this process has in the world communicator (0 until MPI is initialised).
int process_rank();
void set_process_rank(int rank);

namespace detail {
// Collects a message and throws it when the full statement ends (destructor).
class CheckMessage {
 public:
  CheckMessage(const char* file, int line, const char* condition);
  CheckMessage(const CheckMessage&) = delete;
  ~CheckMessage() noexcept(false);
  template <typename T>
  CheckMessage& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }

 private:
  std::string prefix_;     // "[rank R] file:line: "
  const char* condition_;  // shown only when the check gives no message of its own
  std::ostringstream stream_;
};
}  // namespace detail

}  // namespace lasp

#define LASP_CHECK(cond) \
  if (cond) {            \
  } else                 \
    ::lasp::detail::CheckMessage(__FILE__, __LINE__, #cond)

#define LASP_CHECK_OP(a, op, b)                                                         \
  if ((a)op(b)) {                                                                       \
  } else                                                                                \
    ::lasp::detail::CheckMessage(__FILE__, __LINE__, #a " " #op " " #b) << "(" << (a)  \
                                                                         << " vs " << (b) << ") "
#define LASP_CHECK_EQ(a, b) LASP_CHECK_OP(a, ==, b)
#define LASP_CHECK_NE(a, b) LASP_CHECK_OP(a, !=, b)
#define LASP_CHECK_LE(a, b) LASP_CHECK_OP(a, <=, b)
#define LASP_CHECK_LT(a, b) LASP_CHECK_OP(a, <, b)
#define LASP_CHECK_GE(a, b) LASP_CHECK_OP(a, >=, b)
#define LASP_CHECK_GT(a, b) LASP_CHECK_OP(a, >, b)

// Unconditional failure: LASP_FAIL() << "unknown mode " << m;
#define LASP_FAIL() ::lasp::detail::CheckMessage(__FILE__, __LINE__, nullptr)
