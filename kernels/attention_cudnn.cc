// Softmax attention through cuDNN's fused flash-attention engines (kernels/attention_cudnn.h).
//
// cuDNN's backend API describes work as a graph of operations on tensor descriptors; its fused
// attention engines recognise the graph below and run it as one flash-attention kernel (the score
// matrix never reaches memory: every tensor marked virtual stays on chip). Our tensors are
// [B, T, H, D]; the graph sees them as [B, H, T, D] through strides, K^T and V^T as stride swaps.
//
// Forward (scale, the -inf fill and the causal shift are by-value scalars given at execution):
//   S  = Q K^T                     matmul, fp32 virtual [B, Hq, Tq, Tk] (K with Hkv heads: GQA)
//   S  = scale S
//   causal: S = (row + q_offset >= col) ? S : -inf      GEN_INDEX row / col, ADD, CMP_GE, SELECT
//   m  = rowmax S,  E = exp(S - m),  z = rowsum E
//   stats = m + log z              [B, Hq, Tq, 1] fp32 = our lse (natural log)
//   P  = E / z (bf16),  O = P V
// Backward, from the given o and lse (so a key subset with the global o, lse gives that subset's
// dk, dv and share of dq, as our kernel does):
//   Dr = rowsum(dO o O)            kept in the workspace (cuDNN wants it non-virtual)
//   P  = exp(scale Q K^T - lse), masked as above
//   dV = P^T dO                    (GQA: per query head, then summed over the group)
//   dS = scale P o (dO V^T - Dr)
//   dK = dS^T Q,  dQ = dS K        dQ accumulated in an fp32 workspace tensor, then cast
// The graph follows the lowering of NVIDIA's cudnn-frontend SDPA nodes (read for the operation
// list and tensor attributes, not copied).
//
// Plans (operation graph -> heuristics (mode A) -> first engine config that finalizes) are cached
// per (direction, device, B, Hq, Hkv, Tq, Tk, D, causal, q_offset != 0); scale and q_offset are
// runtime scalars, so one plan serves every LASP-2H chunk of a shape. A shape no engine takes is
// cached as unsupported with cuDNN's message.
#include "kernels/attention_cudnn.h"

#include <cstdlib>
#include <string>

#include "core/check.h"
#include "core/env.h"
#include "core/log.h"

#ifdef LASP_HAVE_CUDNN
#include <cuda_runtime.h>
#include <cudnn_graph.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "core/device.h"
#endif

namespace lasp {

AttentionPath attention_path_from_env() {
  return static_cast<AttentionPath>(env_choice("LASP_ATTENTION", {"auto", "cudnn", "own"}));
}

#ifndef LASP_HAVE_CUDNN

bool cudnn_attention_built() { return false; }

std::string cudnn_attention_version() {
  return "not built in (CUDA backend off, LASP_CUDNN=OFF, or cuDNN 9 not found at configure time)";
}

bool cudnn_attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, float,
                             bool, int64_t) {
  LASP_CHECK(attention_path_from_env() != AttentionPath::Cudnn)
      << "attention_forward: LASP_ATTENTION=cudnn but cuDNN is " << cudnn_attention_version();
  return false;
}

bool cudnn_attention_backward(Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&, float,
                              bool, int64_t) {
  LASP_CHECK(attention_path_from_env() != AttentionPath::Cudnn)
      << "attention_backward: LASP_ATTENTION=cudnn but cuDNN is " << cudnn_attention_version();
  return false;
}

#else  // LASP_HAVE_CUDNN

namespace {

std::string status_text(cudnnStatus_t st) {
  std::string s = cudnnGetErrorString(st);
  char detail[1024] = {0};
  cudnnGetLastErrorString(detail, sizeof detail);
  if (detail[0]) s += std::string(": ") + detail;
  return s;
}

#define CUDNN_CHECK(expr, what)                                                              \
  do {                                                                                       \
    const cudnnStatus_t lasp_st_ = (expr);                                                   \
    LASP_CHECK(lasp_st_ == CUDNN_STATUS_SUCCESS) << (what) << ": " << status_text(lasp_st_); \
  } while (0)

// ------------------------------------------------------------------ backend descriptors (RAII)
class Desc {
 public:
  Desc() = default;
  explicit Desc(cudnnBackendDescriptorType_t type) {
    CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_),
                "cudnnBackendCreateDescriptor(" + std::to_string(type) + ")");
  }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(Desc&& o) noexcept : d_(o.d_) { o.d_ = nullptr; }
  Desc& operator=(Desc&& o) noexcept {
    std::swap(d_, o.d_);
    return *this;
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }

  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t n,
            const void* value) {
    CUDNN_CHECK(cudnnBackendSetAttribute(d_, name, type, n, value),
                "cudnnBackendSetAttribute(attribute " + std::to_string(name) + ")");
    return *this;
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, int64_t v) {
    return set(name, CUDNN_TYPE_INT64, 1, &v);
  }
  Desc& set_i64s(cudnnBackendAttributeName_t name, const std::vector<int64_t>& v) {
    return set(name, CUDNN_TYPE_INT64, static_cast<int64_t>(v.size()), v.data());
  }
  Desc& set_bool(cudnnBackendAttributeName_t name, bool v) {
    return set(name, CUDNN_TYPE_BOOLEAN, 1, &v);
  }
  Desc& set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t t) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &t);
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& d) {
    cudnnBackendDescriptor_t h = d.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &h);
  }
  Desc& set_handle(cudnnBackendAttributeName_t name, cudnnHandle_t h) {
    return set(name, CUDNN_TYPE_HANDLE, 1, &h);
  }
  void finalize(const char* what) {
    CUDNN_CHECK(cudnnBackendFinalize(d_), std::string("finalize ") + what);
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

// ------------------------------------------------------------------ graph builder
// Ids of the real (non-virtual) tensors and by-value scalars; virtual tensors count up from
// kFirstVirtual.
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kDO,
  kDQ,
  kDK,
  kDV,
  kRowDot,
  kDQAccum,
  kScale = 20,
  kNegInf,
  kShift,
  kOne,
  kFirstVirtual = 100,
};

struct Layout4 {
  std::vector<int64_t> dims, strides;
};

class GraphBuilder {
 public:
  // A real tensor (data pointer given at execution) with a fixed id.
  void tensor(int64_t uid, const Layout4& l, cudnnDataType_t type) {
    make(uid, l, type, false, false);
  }
  // A by-value scalar (host pointer given at execution), rank 4 like the tensors it meets.
  void scalar(int64_t uid, cudnnDataType_t type) {
    make(uid, {{1, 1, 1, 1}, {1, 1, 1, 1}}, type, false, true);
  }
  // An intermediate that stays inside the fused kernel.
  int64_t virt(const Layout4& l, cudnnDataType_t type) {
    const int64_t uid = next_virtual_++;
    make(uid, l, type, true, false);
    return uid;
  }

  void matmul(int64_t a, int64_t b, int64_t c) {
    Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm.set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize("matmul descriptor");
    Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, at(a))
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, at(b))
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, at(c))
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm)
        .finalize("matmul operation");
    keep(std::move(mm));
    ops_.push_back(std::move(op));
  }

  // y = mode(x[, b[, t]]) computed in `math`; axis is GEN_INDEX's dimension.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, int64_t x, int64_t b, int64_t t,
                 int64_t y, int64_t axis = -1) {
    Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (mode == CUDNN_POINTWISE_GEN_INDEX) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.finalize("pointwise descriptor");
    Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, at(x));
    if (b >= 0) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, at(b));
    if (t >= 0) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, at(t));
    const float one = 1.0f;
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, at(y))
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one)
        .finalize("pointwise operation");
    keep(std::move(pw));
    ops_.push_back(std::move(op));
  }

  void reduction(cudnnReduceTensorOp_t mode, int64_t x, int64_t y) {
    Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red.set_dtype(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode)
        .finalize("reduction descriptor");
    Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, at(x))
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, at(y))
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red)
        .finalize("reduction operation");
    keep(std::move(red));
    ops_.push_back(std::move(op));
  }

  // y: the same elements as x seen through other dims / strides (a transpose here).
  void reshape(int64_t x, int64_t y) {
    Desc op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, at(x))
        .set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, at(y))
        .finalize("reshape operation");
    ops_.push_back(std::move(op));
  }

  const std::vector<Desc>& ops() const { return ops_; }

 private:
  void make(int64_t uid, const Layout4& l, cudnnDataType_t type, bool is_virtual, bool by_value) {
    Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t.set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .set_i64s(CUDNN_ATTR_TENSOR_DIMENSIONS, l.dims)
        .set_i64s(CUDNN_ATTR_TENSOR_STRIDES, l.strides)
        .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16)
        .set_bool(CUDNN_ATTR_TENSOR_IS_VIRTUAL, is_virtual);
    if (by_value) t.set_bool(CUDNN_ATTR_TENSOR_IS_BY_VALUE, true);
    t.finalize("tensor descriptor");
    LASP_CHECK(tensors_.emplace(uid, std::move(t)).second)
        << "cuDNN attention graph: tensor id " << uid << " used twice";
  }
  const Desc& at(int64_t uid) const {
    auto it = tensors_.find(uid);
    LASP_CHECK(it != tensors_.end()) << "cuDNN attention graph: no tensor with id " << uid;
    return it->second;
  }
  void keep(Desc d) { aux_.push_back(std::move(d)); }

  std::map<int64_t, Desc> tensors_;
  std::vector<Desc> aux_;  // matmul / pointwise / reduction descriptors the operations point at
  std::vector<Desc> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// ------------------------------------------------------------------ the two graphs
struct AttnShape {
  int64_t B, Hq, Hkv, Tq, Tk, D;
  bool causal, shifted;  // shifted: q_offset != 0 (an ADD on the row index)
};

// [B, T, H, D] memory seen as [B, H, T, D]; `transposed` gives [B, H, D, T] (K^T, V^T).
Layout4 bthd(int64_t B, int64_t T, int64_t H, int64_t D, bool transposed = false) {
  if (transposed) return {{B, H, D, T}, {T * H * D, D, 1, H * D}};
  return {{B, H, T, D}, {T * H * D, D, H * D, 1}};
}
Layout4 scores(const AttnShape& s) {
  return {{s.B, s.Hq, s.Tq, s.Tk}, {s.Hq * s.Tq * s.Tk, s.Tq * s.Tk, s.Tk, 1}};
}
Layout4 scores_t(const AttnShape& s) {
  return {{s.B, s.Hq, s.Tk, s.Tq}, {s.Hq * s.Tq * s.Tk, s.Tq * s.Tk, 1, s.Tk}};
}
Layout4 per_row(const AttnShape& s) { return {{s.B, s.Hq, s.Tq, 1}, {s.Hq * s.Tq, s.Tq, 1, 1}}; }

// x where key col is visible to query row (row + q_offset >= col), else -inf.
int64_t causal_mask(GraphBuilder& g, const AttnShape& s, int64_t x) {
  const Layout4 sc = scores(s);
  int64_t row = g.virt(sc, CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, -1, -1, row, 2);
  const int64_t col = g.virt(sc, CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, -1, -1, col, 3);
  if (s.shifted) {
    const int64_t shifted = g.virt(sc, CUDNN_DATA_INT32);
    g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_INT32, row, kShift, -1, shifted);
    row = shifted;
  }
  const int64_t visible = g.virt(sc, CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, -1, visible);
  const int64_t y = g.virt(sc, CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, kNegInf, visible, y);
  return y;
}

void add_scalars(GraphBuilder& g, const AttnShape& s) {
  g.scalar(kScale, CUDNN_DATA_FLOAT);
  if (s.causal) g.scalar(kNegInf, CUDNN_DATA_FLOAT);
  if (s.causal && s.shifted) g.scalar(kShift, CUDNN_DATA_INT32);
}

void build_forward(GraphBuilder& g, const AttnShape& s) {
  const auto F = CUDNN_DATA_FLOAT, BF = CUDNN_DATA_BFLOAT16;
  g.tensor(kQ, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kK, bthd(s.B, s.Tk, s.Hkv, s.D, true), BF);
  g.tensor(kV, bthd(s.B, s.Tk, s.Hkv, s.D), BF);
  g.tensor(kO, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kStats, per_row(s), F);
  add_scalars(g, s);
  const Layout4 sc = scores(s), row = per_row(s);

  const int64_t qk = g.virt(sc, F);
  g.matmul(kQ, kK, qk);
  int64_t x = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_MUL, F, qk, kScale, -1, x);
  if (s.causal) x = causal_mask(g, s, x);
  const int64_t m = g.virt(row, F);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, x, m);
  const int64_t xm = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_SUB, F, x, m, -1, xm);
  const int64_t e = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_EXP, F, xm, -1, -1, e);
  const int64_t z = g.virt(row, F);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  const int64_t log_z = g.virt(row, F);
  g.pointwise(CUDNN_POINTWISE_LOG, F, z, -1, -1, log_z);
  g.pointwise(CUDNN_POINTWISE_ADD, F, m, log_z, -1, kStats);
  const int64_t p = g.virt(sc, BF);
  g.pointwise(CUDNN_POINTWISE_DIV, F, e, z, -1, p);
  g.matmul(p, kV, kO);
}

// out = lhs @ rhs for a key-side gradient ([B, Hkv, Tk, D]): with grouped heads the product is
// formed per query head and summed over each group.
void key_side_product(GraphBuilder& g, const AttnShape& s, int64_t lhs, int64_t rhs, int64_t out) {
  if (s.Hq == s.Hkv) {
    g.matmul(lhs, rhs, out);
    return;
  }
  const int64_t full = g.virt({{s.B, s.Hq, s.Tk, s.D}, {s.Hq * s.Tk * s.D, s.Tk * s.D, s.D, 1}},
                              CUDNN_DATA_BFLOAT16);
  g.matmul(lhs, rhs, full);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, full, out);
}

void build_backward(GraphBuilder& g, const AttnShape& s) {
  const auto F = CUDNN_DATA_FLOAT, BF = CUDNN_DATA_BFLOAT16;
  g.tensor(kQ, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kK, bthd(s.B, s.Tk, s.Hkv, s.D, true), BF);
  g.tensor(kV, bthd(s.B, s.Tk, s.Hkv, s.D, true), BF);
  g.tensor(kO, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kDO, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kStats, per_row(s), F);
  g.tensor(kDQ, bthd(s.B, s.Tq, s.Hq, s.D), BF);
  g.tensor(kDK, bthd(s.B, s.Tk, s.Hkv, s.D), BF);
  g.tensor(kDV, bthd(s.B, s.Tk, s.Hkv, s.D), BF);
  g.tensor(kRowDot, per_row(s), F);
  g.tensor(kDQAccum, {{s.B, s.Hq, s.Tq, s.D}, {s.Hq * s.Tq * s.D, s.Tq * s.D, s.D, 1}}, F);
  add_scalars(g, s);
  g.scalar(kOne, F);
  const Layout4 sc = scores(s), row = per_row(s);

  // Dr = rowsum(dO o O)
  const int64_t doo =
      g.virt({{s.B, s.Hq, s.Tq, s.D}, {s.Hq * s.Tq * s.D, s.Tq * s.D, s.Hq * s.D, 1}}, F);
  g.pointwise(CUDNN_POINTWISE_MUL, F, kDO, kO, -1, doo);
  const int64_t dr = g.virt(row, F);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, doo, dr);
  g.pointwise(CUDNN_POINTWISE_MUL, F, dr, kOne, -1, kRowDot);

  // P = exp(scale Q K^T - lse), masked
  const int64_t qk = g.virt(sc, F);
  g.matmul(kQ, kK, qk);
  const int64_t x = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_MUL, F, qk, kScale, -1, x);
  int64_t xl = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_SUB, F, x, kStats, -1, xl);
  if (s.causal) xl = causal_mask(g, s, xl);
  const int64_t p = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_EXP, F, xl, -1, -1, p);

  // dV = P^T dO
  const int64_t pt = g.virt(scores_t(s), BF);
  g.reshape(p, pt);
  key_side_product(g, s, pt, kDO, kDV);

  // dS = scale P o (dO V^T - Dr)
  const int64_t dp = g.virt(sc, F);
  g.matmul(kDO, kV, dp);
  const int64_t dpr = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_SUB, F, dp, kRowDot, -1, dpr);
  const int64_t pdp = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_MUL, F, dpr, p, -1, pdp);
  const int64_t ds = g.virt(sc, F);
  g.pointwise(CUDNN_POINTWISE_MUL, F, pdp, kScale, -1, ds);

  // dK = dS^T Q
  const int64_t dst = g.virt(scores_t(s), BF);
  g.reshape(ds, dst);
  key_side_product(g, s, dst, kQ, kDK);

  // dQ = dS K (fp32 accumulator, then cast)
  const int64_t kk = g.virt(bthd(s.B, s.Tk, s.Hkv, s.D), BF);
  g.reshape(kK, kk);
  g.matmul(ds, kk, kDQAccum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, F, kDQAccum, -1, -1, kDQ);
}

// ------------------------------------------------------------------ handles, plans, cache
int runtime_version() { return static_cast<int>(cudnnGetVersion()); }

cudnnHandle_t handle_for(int device) {
  static std::mutex mu;
  static std::map<int, cudnnHandle_t> handles;  // one per device, kept for the process's life
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cudnnHandle_t h = nullptr;
  CUDNN_CHECK(cudnnCreate(&h), "cudnnCreate on device " + std::to_string(device));
  handles.emplace(device, h);
  return h;
}

struct Plan {
  GraphBuilder graph;
  Desc op_graph, heuristics;
  std::vector<Desc> configs;  // the heuristics' engine configs (the plan points at one)
  Desc plan;
  int64_t workspace = 0;
  int64_t engine = -1;  // cuDNN's global engine index, for the log
  std::string error;    // why no plan, when plan is empty
};

std::string describe(const AttnShape& s, bool backward) {
  std::ostringstream os;
  os << (backward ? "backward" : "forward") << " B=" << s.B << " Hq=" << s.Hq << " Hkv=" << s.Hkv
     << " Tq=" << s.Tq << " Tk=" << s.Tk << " D=" << s.D << (s.causal ? " causal" : " full")
     << (s.shifted ? " q_offset!=0" : "");
  return os.str();
}

// Builds the graph and the first execution plan any heuristic engine config finalizes; on failure
// plan.error says why (throws only for misuse of the API, which the caller also reports).
void build_plan(Plan& pl, const AttnShape& s, bool backward, cudnnHandle_t handle) {
  if (backward)
    build_backward(pl.graph, s);
  else
    build_forward(pl.graph, s);
  std::vector<cudnnBackendDescriptor_t> ops;
  for (const Desc& d : pl.graph.ops()) ops.push_back(d.get());
  pl.op_graph = Desc(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  pl.op_graph
      .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
           static_cast<int64_t>(ops.size()), ops.data())
      .set_handle(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, handle)
      .finalize("operation graph");

  pl.heuristics = Desc(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  pl.heuristics.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, pl.op_graph)
      .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
      .finalize("engine heuristics");
  int64_t count = 0;
  CUDNN_CHECK(cudnnBackendGetAttribute(pl.heuristics.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
              "engine heuristics: number of results");
  if (count <= 0) {
    pl.error = "the heuristics found no engine for the graph";
    return;
  }
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    pl.configs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    raw.push_back(pl.configs.back().get());
  }
  int64_t got = 0;
  CUDNN_CHECK(cudnnBackendGetAttribute(pl.heuristics.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, raw.data()),
              "engine heuristics: results");
  std::string tried;
  for (int64_t i = 0; i < got; ++i) {
    Desc plan(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    plan.set_handle(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)
        .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, pl.configs[i]);
    const cudnnStatus_t st = cudnnBackendFinalize(plan.get());
    if (st != CUDNN_STATUS_SUCCESS) {
      tried += " [config " + std::to_string(i) + ": " + status_text(st) + "]";
      continue;
    }
    int64_t n = 0;
    CUDNN_CHECK(cudnnBackendGetAttribute(plan.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                         CUDNN_TYPE_INT64, 1, &n, &pl.workspace),
                "execution plan: workspace size");
    Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
    cudnnBackendDescriptor_t e = engine.get();
    if (cudnnBackendGetAttribute(pl.configs[i].get(), CUDNN_ATTR_ENGINECFG_ENGINE,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &e) == CUDNN_STATUS_SUCCESS)
      cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                               &pl.engine);
    pl.plan = std::move(plan);
    return;
  }
  pl.error = "no engine config finalized (" + std::to_string(got) + " tried):" + tried;
}

struct Key {
  bool backward;
  int device;
  AttnShape s;
  auto tie() const {
    return std::make_tuple(backward, device, s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.D, s.causal,
                           s.shifted);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

// The cached plan for `key`, built on first use; null with *why set when cuDNN cannot run it.
const Plan* plan_for(const Key& key, std::string* why) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan> > cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto pl = std::make_unique<Plan>();
    const auto t0 = std::chrono::steady_clock::now();
    try {
      build_plan(*pl, key.s, key.backward, handle_for(key.device));
    } catch (const Error& e) {
      pl->error = e.what();
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (pl->plan.get())
      LASP_INFO() << "attention: cuDNN plan for " << describe(key.s, key.backward) << " built in "
                  << static_cast<int>(ms) << " ms (engine " << pl->engine << ", workspace "
                  << pl->workspace << " bytes)";
    if (!pl->plan.get())
      LASP_WARN() << "attention: cuDNN " << runtime_version() << " cannot run "
                  << describe(key.s, key.backward) << ": " << pl->error
                  << " (our kernel runs it instead)";
    it = cache.emplace(key, std::move(pl)).first;
  }
  if (!it->second->plan.get()) {
    *why = it->second->error;
    return nullptr;
  }
  return it->second.get();
}

// Shape rules checked before any plan is built ("" = fine). Besides our own (head dims, rows that
// see a key, alignment, int32 offsets), the version-specific limits cudnn-frontend documents for
// these engines.
std::string unsupported_reason(const AttnShape& s, bool backward, int64_t q_offset,
                               std::initializer_list<const Tensor*> tensors) {
  const int v = runtime_version();
  if (s.D != 64 && s.D != 128) return "head dim " + std::to_string(s.D) + " (64 or 128 here)";
  if (s.B < 1 || s.Tq < 1 || s.Tk < 1 || s.Hq < 1) return "an empty dimension";
  if (s.causal && q_offset < 0) return "q_offset < 0: the first rows see no key";
  if (q_offset > std::numeric_limits<int32_t>::max()) return "q_offset beyond int32";
  for (const Tensor* t : tensors)
    if (t->defined() && reinterpret_cast<uintptr_t>(t->raw()) % 16 != 0)
      return "a pointer not 16-byte aligned";
  if (v >= 91000 && v < 91002) return "cuDNN 9.10.0/9.10.1 have known SDPA bugs";
  if (!backward && s.Tq == 1 && s.causal && v < 91000)
    return "one query row with a causal mask needs cuDNN >= 9.10";
  if (backward && s.Tq == 1 && s.Tk == 1) return "Tq = Tk = 1";
  if (backward && s.Tk % 128 != 0 && v < 91600)
    return "Tk not a multiple of 128 needs cuDNN >= 9.16 in the backward (older versions need a "
           "padding mask)";
  return "";
}

// Logs, once per direction and path, which implementation runs attention.
void note_path(bool backward, bool cudnn, const std::string& detail) {
  static std::atomic<bool> seen[2][2];
  if (seen[backward][cudnn].exchange(true)) return;
  LASP_INFO() << "attention " << (backward ? "backward" : "forward") << ": "
              << (cudnn ? "cuDNN fused flash attention" : "our WMMA flash kernel") << " (" << detail
              << ")";
}

// The call goes to cuDNN (returns its plan) or to our kernel (null); forced cuDNN fails instead.
const Plan* choose(const char* fn, const AttnShape& s, bool backward, int64_t q_offset, int device,
                   std::initializer_list<const Tensor*> tensors) {
  const AttentionPath path = attention_path_from_env();
  if (path == AttentionPath::Own) {
    note_path(backward, false, "LASP_ATTENTION=own");
    return nullptr;
  }
  std::string why = unsupported_reason(s, backward, q_offset, tensors);
  const Plan* plan = why.empty() ? plan_for(Key{backward, device, s}, &why) : nullptr;
  if (!plan) {
    LASP_CHECK(path != AttentionPath::Cudnn)
        << fn << ": LASP_ATTENTION=cudnn but cuDNN " << runtime_version() << " cannot run "
        << describe(s, backward) << ": " << why;
    note_path(backward, false, "cuDNN declined: " + why);
    return nullptr;
  }
  note_path(
      backward, true,
      "cuDNN " + std::to_string(runtime_version()) + ", engine " + std::to_string(plan->engine));
  return plan;
}

size_t round_up(size_t n) { return (n + 255) / 256 * 256; }

void execute(const Plan& plan, int device, const std::vector<std::pair<int64_t, void*> >& bindings,
             void* workspace) {
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (const auto& [uid, ptr] : bindings) {
    uids.push_back(uid);
    ptrs.push_back(ptr);
  }
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()),
           uids.data())
      .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
           static_cast<int64_t>(ptrs.size()), ptrs.data())
      .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace)
      .finalize("variant pack");
  cudnnHandle_t h = handle_for(device);
  CUDNN_CHECK(cudnnSetStream(h, static_cast<cudaStream_t>(current_stream().handle)),
              "cudnnSetStream");
  CUDNN_CHECK(cudnnBackendExecute(h, plan.plan.get(), pack.get()),
              "cudnnBackendExecute (attention)");
}

AttnShape shape_of(const Tensor& q, const Tensor& k, bool causal, int64_t q_offset) {
  return AttnShape{q.dim(0), q.dim(2), k.dim(2), q.dim(1),
                   k.dim(1), q.dim(3), causal,   causal && q_offset != 0};
}

}  // namespace

bool cudnn_attention_built() { return true; }

std::string cudnn_attention_version() {
  const int v = runtime_version();
  std::ostringstream os;
  os << "cuDNN " << v / 10000 << "." << (v / 100) % 100 << "." << v % 100 << " (built against "
     << CUDNN_MAJOR << "." << CUDNN_MINOR << "." << CUDNN_PATCHLEVEL << ")";
  return os.str();
}

bool cudnn_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k,
                             const Tensor& v, float scale, bool causal, int64_t q_offset) {
  const AttnShape s = shape_of(q, k, causal, q_offset);
  const int device = q.device().index;
  const Plan* plan =
      choose("attention_forward", s, false, q_offset, device, {&o, &lse, &q, &k, &v});
  if (!plan) return false;
  Tensor stats =
      lse.defined() ? lse : Tensor::empty(lasp::Shape{s.B, s.Hq, s.Tq}, DType::F32, q.device());
  Tensor ws = Tensor::empty(lasp::Shape{static_cast<int64_t>(round_up(plan->workspace))}, DType::U8,
                            q.device());
  float scale_v = scale, neg_inf = -std::numeric_limits<float>::infinity();
  int32_t shift = static_cast<int32_t>(q_offset);
  std::vector<std::pair<int64_t, void*> > b = {{kQ, q.raw()},         {kK, k.raw()},
                                               {kV, v.raw()},         {kO, o.raw()},
                                               {kStats, stats.raw()}, {kScale, &scale_v}};
  if (s.causal) b.push_back({kNegInf, &neg_inf});
  if (s.shifted) b.push_back({kShift, &shift});
  execute(*plan, device, b, ws.raw());
  return true;
}

bool cudnn_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& o, const Tensor& lse,
                              const Tensor& d_o, float scale, bool causal, int64_t q_offset) {
  const AttnShape s = shape_of(q, k, causal, q_offset);
  const int device = q.device().index;
  const Plan* plan = choose("attention_backward", s, true, q_offset, device,
                            {&dq, &dk, &dv, &q, &k, &v, &o, &lse, &d_o});
  if (!plan) return false;
  const Device dev = q.device();
  Tensor dq_out = dq.defined() ? dq : Tensor::empty(q.shape(), DType::BF16, dev);
  Tensor dk_out = dk.defined() ? dk : Tensor::empty(k.shape(), DType::BF16, dev);
  Tensor dv_out = dv.defined() ? dv : Tensor::empty(k.shape(), DType::BF16, dev);
  // Workspace: cuDNN's own, then Dr [B, Hq, Tq] and the dQ accumulator [B, Hq, Tq, D] (fp32).
  const size_t own = round_up(plan->workspace), rows = round_up(sizeof(float) * s.B * s.Hq * s.Tq),
               acc = round_up(sizeof(float) * s.B * s.Hq * s.Tq * s.D);
  Tensor ws = Tensor::empty(lasp::Shape{static_cast<int64_t>(own + rows + acc)}, DType::U8, dev);
  unsigned char* base = static_cast<unsigned char*>(ws.raw());
  if (runtime_version() < 90600) {  // older engines accumulate dQ into a zeroed buffer
    const cudaError_t err = cudaMemsetAsync(base + own + rows, 0, acc,
                                            static_cast<cudaStream_t>(current_stream().handle));
    LASP_CHECK(err == cudaSuccess)
        << "attention_backward: zeroing the dQ accumulator: " << cudaGetErrorString(err);
  }
  float scale_v = scale, one = 1.0f, neg_inf = -std::numeric_limits<float>::infinity();
  int32_t shift = static_cast<int32_t>(q_offset);
  std::vector<std::pair<int64_t, void*> > b = {{kQ, q.raw()},
                                               {kK, k.raw()},
                                               {kV, v.raw()},
                                               {kO, o.raw()},
                                               {kDO, d_o.raw()},
                                               {kStats, lse.raw()},
                                               {kDQ, dq_out.raw()},
                                               {kDK, dk_out.raw()},
                                               {kDV, dv_out.raw()},
                                               {kRowDot, base + own},
                                               {kDQAccum, base + own + rows},
                                               {kScale, &scale_v},
                                               {kOne, &one}};
  if (s.causal) b.push_back({kNegInf, &neg_inf});
  if (s.shifted) b.push_back({kShift, &shift});
  execute(*plan, device, b, base);
  return true;
}

#endif  // LASP_HAVE_CUDNN

}  // namespace lasp
