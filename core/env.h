// Environment switches that pick one of a few named choices (LASP_ATTENTION, LASP_FP4_GEMM,
// LASP_LA_KERNEL): one parser, so every switch treats unset / empty the same way and names the
// valid values when it gets anything else.
#pragma once

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "core/check.h"

namespace lasp {

// The index in `choices` of environment variable `name`'s value; unset or empty gives 0 (the
// first choice is the default). Any other value fails with an error naming the variable, the
// value and the choices.
inline int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* env = std::getenv(name);
  if (!env || !*env) return 0;
  const int n = static_cast<int>(choices.size());
  int i = 0;
  std::string valid;  // "a, b or c"
  for (const char* c : choices) {
    if (std::strcmp(env, c) == 0) return i;
    valid += (i == 0 ? "" : i == n - 1 ? " or " : ", ") + std::string(c);
    ++i;
  }
  LASP_FAIL() << name << "=" << env << ": expected " << valid;
  return 0;
}

}  // namespace lasp
