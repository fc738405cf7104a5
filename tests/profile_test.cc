// The profile (core/profile.h): regions and their exclusive times, and with ProfileMode::Shapes the
// GEMM regions split by shape with their TFLOP/s.
#include "core/profile.h"

#include <gtest/gtest.h>

#include <string>

#include "kernels/gemm.h"

namespace lasp {
namespace {

struct ModeGuard {  // restores the mode read from the environment's default (off in the tests)
  ~ModeGuard() {
    set_profile_mode(ProfileMode::Off);
    profile_reset();
  }
};

TEST(Profile, ShapesModeSplitsGemmsByShapeWithTheirRate) {
  ModeGuard guard;
  set_profile_mode(ProfileMode::Shapes);
  profile_reset();
  Tensor a = Tensor::full({3, 4}, 1.0, DType::F32), b = Tensor::full({5, 4}, 2.0, DType::F32);
  Tensor c = Tensor::empty({3, 5}, DType::F32);
  gemm(c, a, false, b, true);              // C = A B^T: 3x5, inner 4
  gemm(c, a, false, b, true, 1.0f, 1.0f);  // accumulating
  { ProfileScope outer("outer"); }
  const std::string report = profile_report();
  EXPECT_NE(report.find("gemm 3x5x4 NT fp32->fp32 "), std::string::npos) << report;
  EXPECT_NE(report.find("gemm 3x5x4 NT fp32->fp32+"), std::string::npos) << report;
  EXPECT_NE(report.find("outer"), std::string::npos) << report;
  EXPECT_NE(report.find("TFLOP/s"), std::string::npos) << report;
  EXPECT_EQ(c.item(0), 16.0);  // the product is still computed: 2 x (4 x 1 x 2)
}

TEST(Profile, RegionsModeKeepsOneGemmRegionAndOffRecordsNothing) {
  ModeGuard guard;
  set_profile_mode(ProfileMode::Regions);
  profile_reset();
  Tensor a = Tensor::full({2, 2}, 1.0, DType::F32), c = Tensor::empty({2, 2}, DType::F32);
  gemm(c, a, false, a, false);
  std::string report = profile_report();
  EXPECT_NE(report.find("\ngemm "), std::string::npos) << report;
  EXPECT_EQ(report.find("gemm 2x2x2"), std::string::npos) << report;
  set_profile_mode(ProfileMode::Off);
  profile_reset();
  gemm(c, a, false, a, false);
  report = profile_report();
  EXPECT_EQ(report.find("gemm"), std::string::npos) << report;
}

}  // namespace
}  // namespace lasp
