// The rank grid: every rank of the world sits at one (tp, sp, dp) coordinate.
//
// Order (fastest varying first): TP, then SP, then DP (Megatron-style), so a TP group is a run of
// consecutive ranks (one node) and an SP group strides by tp:
//   world_rank = tp_rank + tp * (sp_rank + sp * dp_rank)
// tp_group(): the ranks that share (sp_rank, dp_rank); sp_group(): share (tp_rank, dp_rank);
// dp_group(): share (tp_rank, sp_rank). Built once (collective over the world) and queried by name.
#pragma once

#include <memory>
#include <string>

#include "parallel/comm.h"

namespace lasp {

class Grid {
 public:
  // Checks tp * sp * dp == world.size() (the config keys parallel.tp / parallel.sp / parallel.dp)
  // and splits the world into the three groups. Collective over `world`.
  Grid(Comm& world, int tp, int sp, int dp);
  Grid(const Grid&) = delete;
  Grid& operator=(const Grid&) = delete;

  int tp() const { return tp_; }
  int sp() const { return sp_; }
  int dp() const { return dp_; }
  int tp_rank() const { return tp_rank_; }
  int sp_rank() const { return sp_rank_; }
  int dp_rank() const { return dp_rank_; }

  Comm& world() const { return *world_; }
  Comm& tp_group() const { return *tp_group_; }
  Comm& sp_group() const { return *sp_group_; }
  Comm& dp_group() const { return *dp_group_; }

  // "tp 1/2, sp 0/4, dp 0/1" for logs.
  std::string str() const;

 private:
  Comm* world_;
  int tp_, sp_, dp_;
  int tp_rank_ = 0, sp_rank_ = 0, dp_rank_ = 0;
  std::unique_ptr<Comm> tp_group_, sp_group_, dp_group_;
};

// Validation only (no communicators): throws the same error Grid would.
void check_grid_shape(int tp, int sp, int dp, int world_size);

}  // namespace lasp
