#include "core/profile.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"

namespace lasp {

namespace {

struct Totals {
  std::mutex mu;
  struct Entry {
    int64_t calls = 0;
    double seconds = 0;  // exclusive
    double flops = 0;
  };
  std::map<std::string, Entry> by_name;
};
Totals& totals() {
  static Totals* t = new Totals();
  return *t;
}
thread_local ProfileScope* t_current = nullptr;

// Waits for the device's queued work, so that a region's wall time includes it; nothing to wait
// for in a process without a GPU (a CUDA build profiling a CPU run).
void sync_device() {
  static const bool gpu = cuda_available();
  if (gpu) cuda_synchronize();
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

namespace {
std::atomic<int> g_mode{-1};  // -1: not read from the environment yet
}  // namespace

ProfileMode profile_mode() {
  int m = g_mode.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* v = std::getenv("LASP_PROFILE");
    const ProfileMode from_env = !v || v[0] == '\0' || std::strcmp(v, "0") == 0 ? ProfileMode::Off
                                 : std::strcmp(v, "shapes") == 0               ? ProfileMode::Shapes
                                                                               : ProfileMode::Regions;
    int expected = -1;
    g_mode.compare_exchange_strong(expected, static_cast<int>(from_env));
    m = g_mode.load(std::memory_order_relaxed);
  }
  return static_cast<ProfileMode>(m);
}

void set_profile_mode(ProfileMode mode) { g_mode.store(static_cast<int>(mode), std::memory_order_relaxed); }

bool profile_enabled() { return profile_mode() != ProfileMode::Off; }

bool profile_shapes_enabled() { return profile_mode() == ProfileMode::Shapes; }

void ProfileScope::detail(std::string name, double flops) {
  detail_ = std::move(name);
  flops_ = flops;
}

void ProfileScope::gemm(const char* op, int64_t m, int64_t n, int64_t k, const std::string& tail) {
  if (!active_ || !profile_shapes_enabled()) return;
  detail(std::string(op) + " " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + tail,
         2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k));
}

void profile_reset() {
  std::lock_guard<std::mutex> lock(totals().mu);
  totals().by_name.clear();
}

ProfileScope::ProfileScope(const char* name) : name_(name), active_(profile_enabled()) {
  if (!active_) return;
  sync_device();
  parent_ = t_current;
  t_current = this;
  start_ = now();
}

ProfileScope::~ProfileScope() {
  if (!active_) return;
  sync_device();
  const double total = now() - start_;
  t_current = parent_;
  if (parent_) parent_->child_ += total;
  std::lock_guard<std::mutex> lock(totals().mu);
  auto& e = totals().by_name[detail_.empty() ? std::string(name_) : detail_];
  e.calls += 1;
  e.seconds += total - child_;
  e.flops += flops_;
}

std::string profile_report() {
  std::lock_guard<std::mutex> lock(totals().mu);
  std::vector<std::pair<std::string, Totals::Entry>> rows(totals().by_name.begin(), totals().by_name.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
  double sum = 0;
  for (const auto& r : rows) sum += r.second.seconds;
  std::string out = "profile (LASP_PROFILE; device synchronised around each region, exclusive times)\n";
  char line[200];
  std::snprintf(line, sizeof line, "%-44s %8s %11s %7s %9s\n", "region", "calls", "total_ms", "share",
                "TFLOP/s");
  out += line;
  for (const auto& [name, e] : rows) {
    char rate[32] = "";
    if (e.flops > 0 && e.seconds > 0) std::snprintf(rate, sizeof rate, "%9.1f", e.flops / e.seconds * 1e-12);
    std::snprintf(line, sizeof line, "%-44s %8lld %11.2f %6.1f%% %s\n", name.c_str(),
                  static_cast<long long>(e.calls), e.seconds * 1e3, sum > 0 ? 100 * e.seconds / sum : 0.0,
                  rate);
    out += line;
  }
  return out;
}

}  // namespace lasp
