// Sequence parallelism for softmax-attention layers: LASP-2H (all-gather K, V) and Ring Attention.
//
// LASP-2H: one all-gather of the packed (K, V) of every rank; each local query chunk c attends
// causally to the gathered keys [0, (c+1) Lc) with q_offset = c Lc. Backward gathers K, V again
// (nothing of size W L is kept between the passes), computes dK, dV over the gathered keys and
// returns each rank its own rows with one reduce-scatter.
//
// Ring: K, V blocks travel the ring (W-1 steps); each query chunk attends to every earlier key
// chunk (non-causal) and to its own chunk (causal), and the partial outputs are merged with the
// log-sum-exp rule. Backward: the blocks travel again with their dK, dV accumulators; each rank
// adds its share, computed from the GLOBAL o and lse, and a last step returns them to the owner.
#include <cmath>
#include <limits>

#include "kernels/attention.h"
#include "parallel/comm.h"
#include "parallel/sp_methods.h"

namespace lasp {

namespace {

struct AttnDims {
  int64_t B, L, Hq, Hkv, D;
  DType lse_dtype;
  Device device;
};

AttnDims attn_dims(const Tensor& q, const Tensor& k, const Tensor& v) {
  LASP_CHECK(q.ndim() == 4 && k.ndim() == 4 && k.shape() == v.shape() && k.dim(0) == q.dim(0) &&
             k.dim(1) == q.dim(1) && k.dim(3) == q.dim(3) && q.dim(2) % k.dim(2) == 0)
      << "sequence-parallel attention: q [B, L, Hq, D], k and v [B, L, Hkv, D] with Hq a multiple "
         "of Hkv expected, got "
      << q.str() << ", " << k.str() << ", " << v.str();
  return AttnDims{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3),
                  q.is_cuda() ? DType::F32 : q.dtype(), q.device()};
}

// One all-gather of the packed [2, B, L, Hkv, D] (K, V), rearranged into global order:
// k_full, v_full [B, V Lc, Hkv, D].
void gather_kv(Comm& comm, const SpLayout& lay, const Tensor& k, const Tensor& v, Tensor& k_full,
               Tensor& v_full) {
  const AttnDims d = attn_dims(k, k, v);
  Tensor send = Tensor::empty({2, d.B, d.L, d.Hkv, d.D}, k.dtype(), d.device);
  Tensor s0 = send.select(0, 0), s1 = send.select(0, 1);
  s0.copy_from(k);
  s1.copy_from(v);
  Tensor gathered = Tensor::empty({static_cast<int64_t>(lay.world), 2, d.B, d.L, d.Hkv, d.D},
                                  k.dtype(), d.device);
  comm.all_gather(gathered, send);
  const int64_t total = lay.num_chunks * lay.chunk_len;
  k_full = Tensor::empty({d.B, total, d.Hkv, d.D}, k.dtype(), d.device);
  v_full = Tensor::empty({d.B, total, d.Hkv, d.D}, v.dtype(), d.device);
  for (int r = 0; r < lay.world; ++r) {
    for (int c : lay.chunks_of(r)) {
      copy_seq_rows(k_full, lay.global_row(c), gathered.select(0, r).select(0, 0), lay.local_row(c),
                    lay.chunk_len);
      copy_seq_rows(v_full, lay.global_row(c), gathered.select(0, r).select(0, 1), lay.local_row(c),
                    lay.chunk_len);
    }
  }
}

void check_saved_lse(const SpSaved& saved, const SpLayout& lay, const char* method) {
  LASP_CHECK_EQ(saved.tensors.size(), lay.my_chunks().size())
      << method << " backward: the saved tensors do not come from its forward";
}

}  // namespace

// ----------------------------------------------------------------------------------------- LASP-2H
void lasp2h_attention_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o,
                              const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                              SpSaved& saved) {
  const AttnDims d = attn_dims(q, k, v);
  Tensor k_full, v_full;
  gather_kv(*ctx.comm, lay, k, v, k_full, v_full);
  saved.tensors.clear();
  for (int c : lay.my_chunks()) {
    const int64_t end = lay.global_row(c) + lay.chunk_len;
    const Tensor qc = seq_rows(q, lay.local_row(c), lay.chunk_len);
    const Tensor kc = seq_rows(k_full, 0, end), vc = seq_rows(v_full, 0, end);
    Tensor lse = Tensor::empty({d.B, d.Hq, lay.chunk_len}, d.lse_dtype, d.device);
    if (lay.chunk_len == lay.local_len) {
      attention_forward(o, lse, qc, kc, vc, scale, true, lay.global_row(c));
    } else {
      Tensor oc = Tensor::empty(qc.shape(), o.dtype(), d.device);
      attention_forward(oc, lse, qc, kc, vc, scale, true, lay.global_row(c));
      copy_seq_rows(o, lay.local_row(c), oc, 0, lay.chunk_len);
    }
    saved.tensors.push_back(lse);
  }
}

void lasp2h_attention_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                               Tensor& dv, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& o, const Tensor& d_o, float scale,
                               const SpSaved& saved) {
  check_saved_lse(saved, lay, "lasp2h");
  const AttnDims d = attn_dims(q, k, v);
  Tensor k_full, v_full;
  gather_kv(*ctx.comm, lay, k, v, k_full, v_full);
  const int64_t total = k_full.dim(1);
  Tensor dk_full = Tensor::zeros({d.B, total, d.Hkv, d.D}, dk.dtype(), d.device);
  Tensor dv_full = Tensor::zeros({d.B, total, d.Hkv, d.D}, dv.dtype(), d.device);
  const std::vector<int> mine = lay.my_chunks();
  for (size_t i = 0; i < mine.size(); ++i) {
    const int c = mine[i];
    const int64_t end = lay.global_row(c) + lay.chunk_len, row = lay.local_row(c);
    const Tensor qc = seq_rows(q, row, lay.chunk_len), oc = seq_rows(o, row, lay.chunk_len);
    const Tensor doc = seq_rows(d_o, row, lay.chunk_len);
    const Tensor kc = seq_rows(k_full, 0, end), vc = seq_rows(v_full, 0, end);
    Tensor dqc = Tensor::empty(qc.shape(), dq.dtype(), d.device);
    Tensor dkc = Tensor::empty(kc.shape(), dk.dtype(), d.device);
    Tensor dvc = Tensor::empty(vc.shape(), dv.dtype(), d.device);
    attention_backward(dqc, dkc, dvc, qc, kc, vc, oc, saved.tensors[i], doc, scale, true,
                       lay.global_row(c));
    copy_seq_rows(dq, row, dqc, 0, lay.chunk_len);
    add_seq_rows(dk_full, 0, dkc);
    add_seq_rows(dv_full, 0, dvc);
  }
  // Back to rank order [W, 2, B, L, Hkv, D], then ONE reduce-scatter.
  Tensor send = Tensor::empty({static_cast<int64_t>(lay.world), 2, d.B, d.L, d.Hkv, d.D},
                              dk.dtype(), d.device);
  for (int r = 0; r < lay.world; ++r) {
    Tensor sk = send.select(0, r).select(0, 0), sv = send.select(0, r).select(0, 1);
    for (int c : lay.chunks_of(r)) {
      copy_seq_rows(sk, lay.local_row(c), dk_full, lay.global_row(c), lay.chunk_len);
      copy_seq_rows(sv, lay.local_row(c), dv_full, lay.global_row(c), lay.chunk_len);
    }
  }
  Tensor mine_kv = Tensor::empty({2, d.B, d.L, d.Hkv, d.D}, dk.dtype(), d.device);
  ctx.comm->reduce_scatter_sum(mine_kv, send);
  dk.copy_from(mine_kv.select(0, 0));
  dv.copy_from(mine_kv.select(0, 1));
}

// -------------------------------------------------------------------------------------------- Ring
namespace {

// Running (o, lse) of one query chunk, merged on the host in double precision.
struct Merged {
  std::vector<double> o, lse;  // o [B, Lc, Hq, D], lse [B, Hq, Lc]
};

void merge_into(Merged& m, const AttnDims& d, int64_t lc, const Tensor& o_part,
                const Tensor& lse_part) {
  const std::vector<double> op = o_part.to_vector(), lp = lse_part.to_vector();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  if (m.o.empty()) {
    m.o.assign(op.size(), 0.0);
    m.lse.assign(lp.size(), neg_inf);
  }
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h)
      for (int64_t i = 0; i < lc; ++i) {
        const int64_t li = (b * d.Hq + h) * lc + i;
        const double la = m.lse[li], lb = lp[li];
        if (lb == neg_inf) continue;
        const double hi = std::max(la, lb);
        const double l = hi + std::log(std::exp(la - hi) + std::exp(lb - hi));
        const double wa = std::exp(la - l), wb = std::exp(lb - l);
        double* oa = &m.o[((b * lc + i) * d.Hq + h) * d.D];
        const double* ob = &op[((b * lc + i) * d.Hq + h) * d.D];
        for (int64_t x = 0; x < d.D; ++x) oa[x] = wa * oa[x] + wb * ob[x];
        m.lse[li] = l;
      }
}

Tensor host_to_tensor(const std::vector<double>& values, const Shape& shape, DType dtype,
                      Device device) {
  Tensor h = Tensor::from_values(values, shape, dtype);
  return device.is_cpu() ? h : h.to(device);
}

}  // namespace

void ring_attention_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                            const Tensor& k, const Tensor& v, float scale, SpSaved& saved) {
  const AttnDims d = attn_dims(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  std::vector<Tensor> qs;
  for (int c : mine) qs.push_back(seq_rows(q, lay.local_row(c), lay.chunk_len));
  std::vector<Merged> acc(mine.size());

  // Attends my query chunks to the key chunks of rank r (local K, V kr, vr).
  auto attend = [&](int r, const Tensor& kr, const Tensor& vr) {
    for (size_t i = 0; i < mine.size(); ++i)
      for (int kc : lay.chunks_of(r)) {
        if (kc > mine[i]) continue;
        const Tensor ks = seq_rows(kr, lay.local_row(kc), lay.chunk_len);
        const Tensor vs = seq_rows(vr, lay.local_row(kc), lay.chunk_len);
        Tensor op = Tensor::empty(qs[i].shape(), o.dtype(), d.device);
        Tensor lp = Tensor::empty({d.B, d.Hq, lay.chunk_len}, d.lse_dtype, d.device);
        attention_forward(op, lp, qs[i], ks, vs, scale, /*causal=*/kc == mine[i], 0);
        merge_into(acc[i], d, lay.chunk_len, op, lp);
      }
  };
  attend(lay.rank, k, v);
  Tensor cur = Tensor::empty({2, d.B, d.L, d.Hkv, d.D}, k.dtype(), d.device);
  Tensor c0 = cur.select(0, 0), c1 = cur.select(0, 1);
  c0.copy_from(k);
  c1.copy_from(v);
  Tensor next = Tensor::empty(cur.shape(), cur.dtype(), d.device);
  const int to = (lay.rank + 1) % lay.world, from = (lay.rank + lay.world - 1) % lay.world;
  for (int s = 1; s < lay.world; ++s) {
    ctx.comm->sendrecv(cur, to, next, from);
    std::swap(cur, next);
    attend((lay.rank - s + lay.world) % lay.world, cur.select(0, 0), cur.select(0, 1));
  }

  saved.tensors.clear();
  for (size_t i = 0; i < mine.size(); ++i) {
    const Tensor oc = host_to_tensor(acc[i].o, qs[i].shape(), o.dtype(), d.device);
    copy_seq_rows(o, lay.local_row(mine[i]), oc, 0, lay.chunk_len);
    saved.tensors.push_back(
        host_to_tensor(acc[i].lse, {d.B, d.Hq, lay.chunk_len}, d.lse_dtype, d.device));
  }
}

void ring_attention_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                             Tensor& dv, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& o, const Tensor& d_o, float scale,
                             const SpSaved& saved) {
  check_saved_lse(saved, lay, "ring");
  const AttnDims d = attn_dims(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  std::vector<Tensor> qs, os, dos, dqs;
  for (int c : mine) {
    const int64_t row = lay.local_row(c);
    qs.push_back(seq_rows(q, row, lay.chunk_len));
    os.push_back(seq_rows(o, row, lay.chunk_len));
    dos.push_back(seq_rows(d_o, row, lay.chunk_len));
    dqs.push_back(Tensor::zeros(qs.back().shape(), dq.dtype(), d.device));
  }
  // The travelling block: [K, V, dK, dV] of one rank, each [B, L, Hkv, D].
  Tensor cur = Tensor::zeros({4, d.B, d.L, d.Hkv, d.D}, k.dtype(), d.device);
  Tensor c0 = cur.select(0, 0), c1 = cur.select(0, 1);
  c0.copy_from(k);
  c1.copy_from(v);
  Tensor next = Tensor::empty(cur.shape(), cur.dtype(), d.device);
  const int to = (lay.rank + 1) % lay.world, from = (lay.rank + lay.world - 1) % lay.world;
  for (int s = 0; s < lay.world; ++s) {
    if (s > 0) {
      ctx.comm->sendrecv(cur, to, next, from);
      std::swap(cur, next);
    }
    const int r = (lay.rank - s + lay.world) % lay.world;
    const Tensor kr = cur.select(0, 0), vr = cur.select(0, 1);
    Tensor dkr = cur.select(0, 2), dvr = cur.select(0, 3);
    for (size_t i = 0; i < mine.size(); ++i)
      for (int kc : lay.chunks_of(r)) {
        if (kc > mine[i]) continue;
        const int64_t krow = lay.local_row(kc);
        const Tensor ks = seq_rows(kr, krow, lay.chunk_len), vs = seq_rows(vr, krow, lay.chunk_len);
        Tensor dqp = Tensor::empty(qs[i].shape(), dq.dtype(), d.device);
        Tensor dkp = Tensor::empty(ks.shape(), dk.dtype(), d.device);
        Tensor dvp = Tensor::empty(vs.shape(), dv.dtype(), d.device);
        attention_backward(dqp, dkp, dvp, qs[i], ks, vs, os[i], saved.tensors[i], dos[i], scale,
                           /*causal=*/kc == mine[i], 0);
        add_into(dqs[i], dqp);
        add_seq_rows(dkr, krow, dkp);
        add_seq_rows(dvr, krow, dvp);
      }
  }
  // One more step returns every block's dK, dV to its owner (rank r + 1 holds block r + 1 ... ).
  Tensor grads = cur.slice(0, 2, 4);
  if (lay.world > 1) {
    Tensor back = Tensor::empty(grads.shape(), grads.dtype(), d.device);
    ctx.comm->sendrecv(grads, to, back, from);
    grads = back;
  }
  dk.copy_from(grads.select(0, 0));
  dv.copy_from(grads.select(0, 1));
  for (size_t i = 0; i < mine.size(); ++i) copy_seq_rows(dq, lay.local_row(mine[i]), dqs[i], 0, lay.chunk_len);
}

}  // namespace lasp
