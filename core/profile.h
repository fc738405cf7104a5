// Where the time goes: with LASP_PROFILE=1 in the environment, every LASP_PROFILE_SCOPE region
// synchronises the device at its ends and adds its wall time, minus the time of regions nested in
// it, to a per-name total. `lasp train` prints the table at the end. Off (the default) a scope
// costs one branch. LASP_PROFILE=shapes also splits the GEMM regions by shape and layout
// (ProfileScope::detail) and prints their TFLOP/s, to compare a GEMM inside the training step
// with the same shape in `lasp bench kernels`.
#pragma once

#include <cstdint>
#include <string>

namespace lasp {

enum class ProfileMode { Off, Regions, Shapes };
// From LASP_PROFILE on first use (unset or "0": off; "shapes": shapes; anything else: regions),
// unless set_profile_mode was called.
ProfileMode profile_mode();
void set_profile_mode(ProfileMode mode);  // overrides the environment (tests, tools)
bool profile_enabled();         // mode != Off
bool profile_shapes_enabled();  // mode == Shapes
void profile_reset();
// One line per region: name, calls, total ms, share of the profiled time.
std::string profile_report();

class ProfileScope {
 public:
  explicit ProfileScope(const char* name);
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;
  // Files this region under `name` instead, and counts `flops` floating-point operations for it
  // (the report then gives its TFLOP/s). Meant for profile_shapes_enabled().
  void detail(std::string name, double flops);
  // A GEMM region in ProfileMode::Shapes: files it as "<op> MxNxK<tail>" with 2 M N K flops
  // (C [M, N], inner dimension K); a no-op in the other modes.
  void gemm(const char* op, int64_t m, int64_t n, int64_t k, const std::string& tail);

 private:
  const char* name_;
  bool active_;  // profiling was on when the scope opened
  std::string detail_;
  double flops_ = 0;
  double start_ = 0;
  double child_ = 0;  // seconds spent in nested scopes
  ProfileScope* parent_ = nullptr;
};

}  // namespace lasp

#define LASP_PROFILE_CONCAT_(a, b) a##b
#define LASP_PROFILE_CONCAT(a, b) LASP_PROFILE_CONCAT_(a, b)
#define LASP_PROFILE_SCOPE(name) ::lasp::ProfileScope LASP_PROFILE_CONCAT(lasp_profile_, __LINE__)(name)
