#include <gtest/gtest.h>
#include "core/dtype.h"
TEST(DType, Placeholder) { EXPECT_EQ(lasp::float_to_e2m1(6.0f), 7); }
