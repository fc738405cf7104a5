// The FP8 delayed-scaling state of a projection as a checkpointable tensor (projection.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/check.h"
#include "core/model/projection.h"
#include "core/model/projection_internal.h"

namespace lasp {

using projection_detail::DeviceAmaxHistory;
using projection_detail::kAmaxHistoryLength;
using projection_detail::kDeviceHistorySlots;

namespace {

constexpr int kRows = 3;  // x, W, dy

float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// The device window in record order: record k lives in slot k % kDeviceHistorySlots, and the
// window is the newest min(count, kAmaxHistoryLength) records.
std::vector<float> device_values(const DeviceAmaxHistory& h) {
  if (h.count == 0 || !h.slots.defined()) return {};
  const Tensor slots = h.slots.to(cpu());
  const int32_t* s = slots.data<int32_t>();
  const int64_t n = std::min<int64_t>(h.count, kAmaxHistoryLength);
  std::vector<float> v;
  for (int64_t k = h.count - n; k < h.count; ++k) v.push_back(bits_to_float(s[k % kDeviceHistorySlots]));
  return v;
}

// Records 0 .. n-1 in slots 0 .. n-1 and count = n: the same window and the same next slot rule.
void set_device_values(DeviceAmaxHistory& h, const std::vector<float>& v, const Device& device) {
  Tensor host = Tensor::zeros({kDeviceHistorySlots}, DType::I32);
  for (size_t k = 0; k < v.size(); ++k) host.data<int32_t>()[k] = float_to_bits(v[k]);
  if (!h.slots.defined()) h.slots = Tensor::zeros({kDeviceHistorySlots}, DType::I32, device);
  h.slots.copy_from(host);
  h.count = static_cast<int64_t>(v.size());
}

}  // namespace

bool projection_keeps_scaling_state(const Param& w) {
  return w.precision == Precision::Fp8 && projection_detail::options().fp8_scaling == projection_detail::Fp8ScaleMode::Delayed;
}

Shape projection_scaling_state_shape() { return {kRows, 1 + kAmaxHistoryLength}; }

Tensor projection_scaling_state(Param& w) {
  ProjectionState& st = projection_detail::state_of(w);
  const bool dev = w.value.defined() && w.value.is_cuda();
  const std::vector<float> rows[kRows] = {
      dev ? device_values(st.x_dev) : st.x_history.values(),
      dev ? device_values(st.w_dev) : st.w_history.values(),
      dev ? device_values(st.dy_dev) : st.dy_history.values()};
  Tensor t = Tensor::zeros(projection_scaling_state_shape(), DType::F32);
  float* p = t.data<float>();
  for (int r = 0; r < kRows; ++r) {
    float* row = p + r * (1 + kAmaxHistoryLength);
    row[0] = static_cast<float>(rows[r].size());
    for (size_t k = 0; k < rows[r].size(); ++k) row[1 + k] = rows[r][k];
  }
  return t;
}

void set_projection_scaling_state(Param& w, const Tensor& state) {
  LASP_CHECK(state.defined() && state.device().is_cpu() && state.dtype() == DType::F32 &&
             state.shape() == projection_scaling_state_shape())
      << w.name << ": FP8 scaling state must be an fp32 CPU tensor " << shape_str(projection_scaling_state_shape())
      << ", got " << (state.defined() ? state.str() : std::string("nothing"));
  const Tensor c = state.contiguous();
  const float* p = c.data<float>();
  std::vector<float> rows[kRows];
  for (int r = 0; r < kRows; ++r) {
    const float* row = p + r * (1 + kAmaxHistoryLength);
    const float n = row[0];
    LASP_CHECK(n >= 0 && n <= kAmaxHistoryLength && n == static_cast<float>(static_cast<int>(n)))
        << w.name << ": FP8 scaling state row " << r << " says " << n << " records, expected 0.."
        << kAmaxHistoryLength;
    for (int k = 0; k < static_cast<int>(n); ++k) {
      LASP_CHECK(std::isfinite(row[1 + k]) && row[1 + k] >= 0)
          << w.name << ": FP8 scaling state row " << r << " record " << k << " is " << row[1 + k]
          << ", expected a finite amax >= 0";
      rows[r].push_back(row[1 + k]);
    }
  }
  ProjectionState& st = projection_detail::state_of(w);
  if (w.value.defined() && w.value.is_cuda()) {
    set_device_values(st.x_dev, rows[0], w.value.device());
    set_device_values(st.w_dev, rows[1], w.value.device());
    set_device_values(st.dy_dev, rows[2], w.value.device());
  } else {
    st.x_history.restore(rows[0]);
    st.w_history.restore(rows[1]);
    st.dy_history.restore(rows[2]);
  }
}

}  // namespace lasp
