// The rank grid: validation, coordinates (TP fastest, then SP, then DP) and group membership.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "mpi_test_util.h"
#include "parallel/grid.h"

namespace lasp {
namespace {

std::vector<int> world_ranks_of(Comm& group) {
  Tensor me = Tensor::zeros({1}, DType::I32);
  me.data<int32_t>()[0] = world().rank();
  Tensor all = Tensor::empty({group.size()}, DType::I32);
  group.all_gather(all, me);
  return std::vector<int>(all.data<int32_t>(), all.data<int32_t>() + group.size());
}

TEST(Grid, RejectsAShapeThatDoesNotMatchTheWorldNamingTheConfigKeys) {
  const int W = world().size();
  try {
    Grid g(world(), 2, W, 1);  // 2W ranks asked for
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const char* key : {"parallel.tp", "parallel.sp", "parallel.dp", "world size"})
      EXPECT_NE(m.find(key), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(W)), std::string::npos) << m;
  }
  EXPECT_THROW(check_grid_shape(0, W, 1, W), Error);
  EXPECT_THROW(check_grid_shape(1, W, -1, W), Error);
  EXPECT_NO_THROW(check_grid_shape(1, W, 1, W));
}

TEST(Grid, EveryFactorisationPlacesRanksTpFastestThenSpThenDp) {
  const int W = world().size();
  for (int tp = 1; tp <= W; ++tp) {
    if (W % tp) continue;
    for (int sp = 1; sp <= W / tp; ++sp) {
      if ((W / tp) % sp) continue;
      const int dp = W / tp / sp;
      SCOPED_TRACE("tp " + std::to_string(tp) + " sp " + std::to_string(sp) + " dp " + std::to_string(dp));
      Grid g(world(), tp, sp, dp);
      EXPECT_EQ(world().rank(), g.tp_rank() + tp * (g.sp_rank() + sp * g.dp_rank()));
      EXPECT_EQ(g.tp_group().size(), tp);
      EXPECT_EQ(g.sp_group().size(), sp);
      EXPECT_EQ(g.dp_group().size(), dp);
      EXPECT_EQ(g.tp_group().rank(), g.tp_rank());
      EXPECT_EQ(g.sp_group().rank(), g.sp_rank());
      EXPECT_EQ(g.dp_group().rank(), g.dp_rank());
      // Members: same (sp, dp) for TP, same (tp, dp) for SP, same (tp, sp) for DP.
      const std::vector<int> tpm = world_ranks_of(g.tp_group());
      for (int i = 0; i < tp; ++i) EXPECT_EQ(tpm[i], i + tp * (g.sp_rank() + sp * g.dp_rank()));
      const std::vector<int> spm = world_ranks_of(g.sp_group());
      for (int i = 0; i < sp; ++i) EXPECT_EQ(spm[i], g.tp_rank() + tp * (i + sp * g.dp_rank()));
      const std::vector<int> dpm = world_ranks_of(g.dp_group());
      for (int i = 0; i < dp; ++i) EXPECT_EQ(dpm[i], g.tp_rank() + tp * (g.sp_rank() + sp * i));
    }
  }
}

}  // namespace
}  // namespace lasp
