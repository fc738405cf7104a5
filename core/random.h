// splitmix64: a small, fully specified 64-bit generator (std:: distributions differ between
// standard libraries, so everything that must be reproducible draws from this).
#pragma once

#include <cstdint>

namespace lasp {

// Advances `state` and returns the next value.
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The value splitmix64 returns from state `z` (a stateless hash of z).
inline uint64_t mix64(uint64_t z) { return splitmix64(z); }

}  // namespace lasp
