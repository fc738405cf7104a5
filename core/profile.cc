#include "core/profile.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "core/device.h"

namespace lasp {

namespace {

struct Totals {
  std::mutex mu;
  std::map<std::string, std::pair<int64_t, double>> by_name;  // calls, exclusive seconds
};
Totals& totals() {
  static Totals* t = new Totals();
  return *t;
}
thread_local ProfileScope* t_current = nullptr;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

bool profile_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LASP_PROFILE");
    return v && std::strcmp(v, "0") != 0 && v[0] != '\0';
  }();
  return on;
}

void profile_reset() {
  std::lock_guard<std::mutex> lock(totals().mu);
  totals().by_name.clear();
}

ProfileScope::ProfileScope(const char* name) : name_(name) {
  if (!profile_enabled()) return;
  cuda_synchronize();
  parent_ = t_current;
  t_current = this;
  start_ = now();
}

ProfileScope::~ProfileScope() {
  if (!profile_enabled()) return;
  cuda_synchronize();
  const double total = now() - start_;
  t_current = parent_;
  if (parent_) parent_->child_ += total;
  std::lock_guard<std::mutex> lock(totals().mu);
  auto& e = totals().by_name[name_];
  e.first += 1;
  e.second += total - child_;
}

std::string profile_report() {
  std::lock_guard<std::mutex> lock(totals().mu);
  std::vector<std::pair<std::string, std::pair<int64_t, double>>> rows(totals().by_name.begin(), totals().by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.second > b.second.second; });
  double sum = 0;
  for (const auto& r : rows) sum += r.second.second;
  std::string out = "profile (LASP_PROFILE=1; device synchronised around each region, exclusive times)\n";
  char line[160];
  std::snprintf(line, sizeof line, "%-34s %10s %12s %8s\n", "region", "calls", "total_ms", "share");
  out += line;
  for (const auto& r : rows) {
    std::snprintf(line, sizeof line, "%-34s %10lld %12.2f %7.1f%%\n", r.first.c_str(),
                  static_cast<long long>(r.second.first), r.second.second * 1e3,
                  sum > 0 ? 100 * r.second.second / sum : 0.0);
    out += line;
  }
  return out;
}

}  // namespace lasp
