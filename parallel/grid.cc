#include "parallel/grid.h"

#include <sstream>

namespace lasp {

void check_grid_shape(int tp, int sp, int dp, int world_size) {
  LASP_CHECK(tp >= 1 && sp >= 1 && dp >= 1)
      << "parallel.tp, parallel.sp and parallel.dp must each be >= 1, got tp=" << tp
      << " sp=" << sp << " dp=" << dp;
  LASP_CHECK(static_cast<int64_t>(tp) * sp * dp == world_size)
      << "parallel.tp (" << tp << ") * parallel.sp (" << sp << ") * parallel.dp (" << dp
      << ") = " << static_cast<int64_t>(tp) * sp * dp << " does not match the world size "
      << world_size << " (the number of ranks mpirun started); change the config or -np";
}

Grid::Grid(Comm& world, int tp, int sp, int dp) : world_(&world), tp_(tp), sp_(sp), dp_(dp) {
  check_grid_shape(tp, sp, dp, world.size());
  const int r = world.rank();
  tp_rank_ = r % tp;
  sp_rank_ = (r / tp) % sp;
  dp_rank_ = r / (tp * sp);
  // Three collective splits, in the same order on every rank.
  tp_group_ = world.split(sp_rank_ + sp * dp_rank_, tp_rank_, "tp");
  sp_group_ = world.split(tp_rank_ + tp * dp_rank_, sp_rank_, "sp");
  dp_group_ = world.split(tp_rank_ + tp * sp_rank_, dp_rank_, "dp");
  LASP_CHECK(tp_group_->size() == tp && sp_group_->size() == sp && dp_group_->size() == dp)
      << "grid split produced groups of sizes tp " << tp_group_->size() << ", sp "
      << sp_group_->size() << ", dp " << dp_group_->size();
}

std::string Grid::str() const {
  std::ostringstream os;
  os << "tp " << tp_rank_ << "/" << tp_ << ", sp " << sp_rank_ << "/" << sp_ << ", dp " << dp_rank_
     << "/" << dp_;
  return os.str();
}

}  // namespace lasp
