// Dispatch of sequence_parallel.h: no communicator -> the kernels themselves; otherwise the
// method of ctx (sp_methods.h), for any group size (a group of one runs the same code path).
#include "parallel/sequence_parallel.h"

#include "core/check.h"
#include "kernels/attention.h"
#include "parallel/comm.h"
#include "parallel/sp_methods.h"

namespace lasp {

SpMethod sp_method_from_name(const std::string& name) {
  if (name == "lasp2") return SpMethod::Lasp2;
  if (name == "lasp1") return SpMethod::Lasp1;
  if (name == "ring") return SpMethod::Ring;
  if (name == "allgather_kv") return SpMethod::AllGatherKV;
  LASP_FAIL() << "unknown sp_method '" << name << "', expected lasp2 | lasp1 | ring | allgather_kv";
  return SpMethod::Lasp2;
}

const char* sp_method_name(SpMethod m) {
  switch (m) {
    case SpMethod::Lasp2: return "lasp2";
    case SpMethod::Lasp1: return "lasp1";
    case SpMethod::Ring: return "ring";
    case SpMethod::AllGatherKV: return "allgather_kv";
  }
  return "?";
}

int SpContext::size() const { return comm ? comm->size() : 1; }
int SpContext::rank() const { return comm ? comm->rank() : 0; }

std::vector<int64_t> sp_local_positions(const SpContext& ctx, int64_t local_len) {
  std::vector<int64_t> p(static_cast<size_t>(local_len));
  if (!ctx.comm) {
    for (int64_t i = 0; i < local_len; ++i) p[i] = i;
    return p;
  }
  const SpLayout lay = make_sp_layout(ctx, local_len);
  for (int c : lay.my_chunks())
    for (int64_t i = 0; i < lay.chunk_len; ++i) p[lay.local_row(c) + i] = lay.global_row(c) + i;
  return p;
}

void sp_linear_attention_forward(const SpContext& ctx, Tensor& o, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const Decay& decay, SpSaved& saved, int chunk) {
  if (!ctx.comm) {
    // One process: the CUDA kernel keeps its segment states for the backward (16 MiB per layer at
    // B*H = 16, D = 128), which spares the backward one pass over k and v.
    Tensor no_state;
    LinearAttentionSaved la;
    linear_attention_forward(o, no_state, q, k, v, decay, Tensor(), chunk, &la);
    saved.tensors = {la.segment_states, la.segment_log_decay, la.final_state};
    return;
  }
  const SpLayout lay = make_sp_layout(ctx, q.dim(1));
  switch (ctx.method) {
    case SpMethod::Lasp1: return lasp1_linear_forward(ctx, lay, o, q, k, v, decay, saved, chunk);
    case SpMethod::Ring: return ring_linear_forward(ctx, lay, o, q, k, v, decay, saved, chunk);
    case SpMethod::Lasp2:
    case SpMethod::AllGatherKV:  // all-gather-KV is a softmax-layer method; linear layers use LASP-2
      return lasp2_linear_forward(ctx, lay, o, q, k, v, decay, saved, chunk);
  }
}

void sp_linear_attention_backward(const SpContext& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                                  Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Decay& decay, const SpSaved& saved,
                                  const Tensor& d_o, int chunk) {
  if (!ctx.comm) {
    Tensor no_grad;
    LinearAttentionSaved la;
    if (saved.tensors.size() == 3) la = {saved.tensors[0], saved.tensors[1], saved.tensors[2]};
    linear_attention_backward(dq, dk, dv, d_log_decay, no_grad, q, k, v, decay, Tensor(), d_o,
                              Tensor(), chunk, &la);
    return;
  }
  const SpLayout lay = make_sp_layout(ctx, q.dim(1));
  switch (ctx.method) {
    case SpMethod::Lasp1:
      return lasp1_linear_backward(ctx, lay, dq, dk, dv, d_log_decay, q, k, v, decay, saved, d_o, chunk);
    case SpMethod::Ring:
      return ring_linear_backward(ctx, lay, dq, dk, dv, d_log_decay, q, k, v, decay, saved, d_o, chunk);
    case SpMethod::Lasp2:
    case SpMethod::AllGatherKV:
      return lasp2_linear_backward(ctx, lay, dq, dk, dv, d_log_decay, q, k, v, decay, saved, d_o, chunk);
  }
}

void sp_attention_forward(const SpContext& ctx, Tensor& o, const Tensor& q, const Tensor& k,
                          const Tensor& v, float scale, SpSaved& saved) {
  if (!ctx.comm) {
    Tensor lse = Tensor::empty({q.dim(0), q.dim(2), q.dim(1)},
                               q.is_cuda() ? DType::F32 : q.dtype(), q.device());
    attention_forward(o, lse, q, k, v, scale, /*causal=*/true, 0);
    saved.tensors = {lse};
    return;
  }
  const SpLayout lay = make_sp_layout(ctx, q.dim(1));
  if (ctx.method == SpMethod::Ring) return ring_attention_forward(ctx, lay, o, q, k, v, scale, saved);
  // lasp2, lasp1 and allgather_kv: LASP-2H.
  lasp2h_attention_forward(ctx, lay, o, q, k, v, scale, saved);
}

void sp_attention_backward(const SpContext& ctx, Tensor& dq, Tensor& dk, Tensor& dv,
                           const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                           const Tensor& d_o, float scale, const SpSaved& saved) {
  if (!ctx.comm) {
    attention_backward(dq, dk, dv, q, k, v, o, saved.tensors.at(0), d_o, scale, true, 0);
    return;
  }
  const SpLayout lay = make_sp_layout(ctx, q.dim(1));
  if (ctx.method == SpMethod::Ring)
    return ring_attention_backward(ctx, lay, dq, dk, dv, q, k, v, o, d_o, scale, saved);
  lasp2h_attention_backward(ctx, lay, dq, dk, dv, q, k, v, o, d_o, scale, saved);
}

}  // namespace lasp
