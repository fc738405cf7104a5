// Sequence parallelism for linear-attention layers: LASP-2, LASP-1 and Ring (DESIGN.md "LASP-2").
//
// Notation (per batch b and head h; chunks c = 0..V-1 of the global sequence, see sp_layout.h):
//   M_c  state of chunk c's tokens alone, from zero        (state-only kernel call)
//   g_c  product of the decays a_s over chunk c            (kept as log g_c)
//   P_c  state entering chunk c = sum_{j<c} (prod_{j<i<c} g_i) M_j
// The local kernel with initial state P_c gives chunk c's output, and its final state is
// g_c P_c + M_c = P_{c+1}.
//
// Backward. With dP_c^out = d_initial_state of chunk c's kernel for d_o alone, the total gradient
// reaching P_{c+1} is
//   dM_c = sum_{i>c} (prod_{c<l<i} g_l) dP_i^out,
// which is also the gradient of M_c and of g_c P_c (P_{c+1} = g_c P_c + M_c). So the local
// backward with initial state P_c and d_final_state = dM_c returns exact dq, dk, dv, and its
// d_log_decay includes the path through the prefix: d/d log a_s of <dM_c, g_c P_c> is
// <dM_c, P_c> g_c for every s in the chunk, which is d L / d log g_c.
//
// LASP-2's overlapped schedule (SpContext::overlap). Both the output and the final state are
// linear in the initial state (parallel/lasp_state_terms.h), so the work that needs no remote data
// can run while the all-gather is in flight:
//   forward   start the gather of (M_c, log g_c); o_c = kernel from a zero state; wait; then
//             o_c += diag(exp(Lambda)) Q_c P_c
//   backward  start the gather of dP^out; kernel backward with initial state P_c (saved) and no
//             final-state gradient (exact dq; dk, dv, d_log_decay without the dM_c path); wait;
//             then add the gradients of <dM_c, S_final>: e_t v_t dM^T to dk, e_t k_t dM to dv, and
//             exp(Lambda_end) <dM_c, P_c> + sum_{s<u} e_s k_s dM_c v_s^T to d log a_u.
// The sums are regrouped, so results agree with the plain schedule to rounding, not bit for bit.
#include <algorithm>
#include <cmath>

#include "kernels/linear_attention.h"
#include "parallel/comm.h"
#include "parallel/lasp_state_terms.h"
#include "parallel/sp_methods.h"

namespace lasp {

namespace {

// Sizes of one linear-attention call.
struct Dims {
  int64_t B, L, H, D;
  int64_t bh() const { return B * H; }
  int64_t dd() const { return D * D; }
  DType state_dtype;
  Device device;
};

Dims dims_of(const Tensor& q, const Tensor& k, const Tensor& v) {
  LASP_CHECK(q.ndim() == 4 && k.shape() == q.shape() && v.shape() == q.shape())
      << "sequence-parallel linear attention: q, k, v must be [B, L, H, D] of one shape, got "
      << q.str() << ", " << k.str() << ", " << v.str();
  return Dims{q.dim(0), q.dim(1), q.dim(2), q.dim(3), q.is_cuda() ? DType::F32 : q.dtype(),
              q.device()};
}

// One chunk's slice of the local inputs.
struct ChunkIn {
  Tensor q, k, v;
  Decay decay;
};

ChunkIn chunk_in(const SpLayout& lay, int c, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Decay& decay) {
  const int64_t row = lay.local_row(c), n = lay.chunk_len;
  return ChunkIn{q.defined() ? seq_rows(q, row, n) : Tensor(), seq_rows(k, row, n),
                 seq_rows(v, row, n), decay_rows(decay, row, n)};
}

// log g per (b, h) of a decay restricted to `rows` tokens.
std::vector<double> log_total_decay(const Decay& d, int64_t B, int64_t H, int64_t rows) {
  std::vector<double> out(static_cast<size_t>(B * H), 0.0);
  if (d.mode == DecayMode::Constant) {
    const std::vector<double> lam = d.per_head.to_vector();
    LASP_CHECK_EQ(static_cast<int64_t>(lam.size()), H) << "decay.per_head must be [H]";
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) out[b * H + h] = static_cast<double>(rows) * lam[h];
  } else if (d.mode == DecayMode::DataDependent) {
    LASP_CHECK(d.per_token.ndim() == 3 && d.per_token.dim(0) == B && d.per_token.dim(1) == rows &&
               d.per_token.dim(2) == H)
        << "decay.per_token must be [B, L, H] = [" << B << ", " << rows << ", " << H << "], got "
        << d.per_token.str();
    const std::vector<double> a = d.per_token.to_vector();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t h = 0; h < H; ++h) out[b * H + h] += a[(b * rows + t) * H + h];
  }
  return out;
}

Tensor new_state(const Dims& d) { return Tensor::empty({d.B, d.H, d.D, d.D}, d.state_dtype, d.device); }

// M_c: the final state of the chunk's tokens from a zero state.
Tensor local_state(const Dims& d, const ChunkIn& in, int chunk) {
  Tensor none;
  Tensor m = new_state(d);
  // q does not enter the state; a rank folding a remote chunk has none, so k stands in for it.
  const Tensor& q = in.q.defined() ? in.q : in.k;
  linear_attention_forward(none, m, q, in.k, in.v, in.decay, Tensor(), chunk);
  return m;
}

// P_c = sum_{j<c} (prod_{j<i<c} g_i) M_j, from the states of every earlier chunk ([BH, DD] views).
Tensor prefix_combine(const Dims& d, const std::vector<Tensor>& m_of,
                      const std::vector<std::vector<double>>& log_g, int c) {
  Tensor p = Tensor::zeros({d.B, d.H, d.D, d.D}, d.state_dtype, d.device);
  Tensor pf = p.view({d.bh(), d.dd()});
  std::vector<double> acc(static_cast<size_t>(d.bh()), 0.0), coef(acc.size());
  for (int j = c - 1; j >= 0; --j) {
    LASP_CHECK(m_of[j].defined()) << "prefix_combine: state of chunk " << j << " missing";
    for (size_t i = 0; i < acc.size(); ++i) coef[i] = std::exp(acc[i]);
    axpy_rows(pf, coef, m_of[j]);
    for (size_t i = 0; i < acc.size(); ++i) acc[i] += log_g[j][i];
  }
  return p;
}

// dM_c = sum_{i>c} (prod_{c<l<i} g_l) dP_i^out.
Tensor suffix_combine(const Dims& d, const std::vector<Tensor>& dp_of,
                      const std::vector<std::vector<double>>& log_g, int c) {
  const int V = static_cast<int>(dp_of.size());
  Tensor dm = Tensor::zeros({d.B, d.H, d.D, d.D}, d.state_dtype, d.device);
  Tensor df = dm.view({d.bh(), d.dd()});
  std::vector<double> acc(static_cast<size_t>(d.bh()), 0.0), coef(acc.size());
  for (int i = c + 1; i < V; ++i) {
    LASP_CHECK(dp_of[i].defined()) << "suffix_combine: gradient of chunk " << i << " missing";
    for (size_t x = 0; x < acc.size(); ++x) coef[x] = std::exp(acc[x]);
    axpy_rows(df, coef, dp_of[i]);
    for (size_t x = 0; x < acc.size(); ++x) acc[x] += log_g[i][x];
  }
  return dm;
}

// log g of every chunk as a host fp64 tensor [V, BH] (kept for the backward).
Tensor log_g_tensor(const std::vector<std::vector<double>>& log_g) {
  const int64_t V = static_cast<int64_t>(log_g.size());
  const int64_t n = V ? static_cast<int64_t>(log_g[0].size()) : 0;
  Tensor t = Tensor::empty({V, n}, DType::F64);
  double* p = t.data<double>();
  for (int64_t c = 0; c < V; ++c) {
    LASP_CHECK_EQ(static_cast<int64_t>(log_g[c].size()), n) << "log decay of chunk " << c << " missing";
    std::copy(log_g[c].begin(), log_g[c].end(), p + c * n);
  }
  return t;
}

std::vector<std::vector<double>> log_g_from(const Tensor& t) {
  std::vector<std::vector<double>> out(static_cast<size_t>(t.dim(0)));
  const double* p = t.data<double>();
  for (int64_t c = 0; c < t.dim(0); ++c) out[c].assign(p + c * t.dim(1), p + (c + 1) * t.dim(1));
  return out;
}

// Runs the local forward of chunk c with initial state p and writes its rows of o.
void chunk_forward(const SpLayout& lay, int c, Tensor& o, Tensor& final_state, const ChunkIn& in,
                   const Tensor& p, int chunk) {
  if (lay.chunk_len == lay.local_len) {
    linear_attention_forward(o, final_state, in.q, in.k, in.v, in.decay, p, chunk);
    return;
  }
  Tensor oc = Tensor::empty(in.q.shape(), o.dtype(), o.device());
  linear_attention_forward(oc, final_state, in.q, in.k, in.v, in.decay, p, chunk);
  copy_seq_rows(o, lay.local_row(c), oc, 0, lay.chunk_len);
}

// The gradient outputs of one call, restricted to one chunk.
struct Grads {
  Tensor& dq;
  Tensor& dk;
  Tensor& dv;
  Tensor& d_log_decay;  // undefined unless the decay is data dependent
};

// Local backward of chunk c (initial state p, final-state gradient dm) into its rows of the
// outputs; returns d_initial_state when `want_d_initial`.
Tensor chunk_backward(const Dims& d, const SpLayout& lay, int c, Grads g, const ChunkIn& in,
                      const Tensor& p, const Tensor& d_o, const Tensor& dm, bool want_d_initial,
                      int chunk) {
  Tensor d_init = want_d_initial ? new_state(d) : Tensor();
  const Tensor doc = seq_rows(d_o, lay.local_row(c), lay.chunk_len);
  const bool data_decay = in.decay.mode == DecayMode::DataDependent && g.d_log_decay.defined();
  if (lay.chunk_len == lay.local_len) {
    Tensor none;
    linear_attention_backward(g.dq, g.dk, g.dv, data_decay ? g.d_log_decay : none, d_init, in.q,
                              in.k, in.v, in.decay, p, doc, dm, chunk);
    return d_init;
  }
  Tensor dqc = Tensor::empty(in.q.shape(), g.dq.dtype(), g.dq.device());
  Tensor dkc = Tensor::empty(in.k.shape(), g.dk.dtype(), g.dk.device());
  Tensor dvc = Tensor::empty(in.v.shape(), g.dv.dtype(), g.dv.device());
  Tensor dlc = data_decay ? Tensor::empty(in.decay.per_token.shape(), g.d_log_decay.dtype(),
                                          g.d_log_decay.device())
                          : Tensor();
  linear_attention_backward(dqc, dkc, dvc, dlc, d_init, in.q, in.k, in.v, in.decay, p, doc, dm,
                            chunk);
  const int64_t row = lay.local_row(c);
  copy_seq_rows(g.dq, row, dqc, 0, lay.chunk_len);
  copy_seq_rows(g.dk, row, dkc, 0, lay.chunk_len);
  copy_seq_rows(g.dv, row, dvc, 0, lay.chunk_len);
  if (data_decay) copy_seq_rows(g.d_log_decay, row, dlc, 0, lay.chunk_len);
  return d_init;
}

// dP_c^out: the gradient of chunk c's initial state through its own output only,
// sum_t exp(Lambda_t) q_t^T do_t (CPU: that sum directly; CUDA: the kernel's state passes).
Tensor output_state_grad(const Dims& d, const SpLayout& lay, int c, const Tensor& q, const Tensor& k,
                         const Tensor& v, const Decay& decay, const Tensor& d_o, int chunk) {
  Tensor d_init = new_state(d);
  prefix_state_grad(d_init, q, k, v, d_o, decay, lay.local_row(c), lay.chunk_len, chunk);
  return d_init;
}

// Copies a [B, H, D, D] state into slot `slot` of a flat buffer.
void put_state(Tensor& buf, int64_t slot, const Tensor& s) {
  const size_t es = dtype_size(s.dtype());
  device_memcpy(static_cast<char*>(buf.raw()) + slot * s.numel() * es, buf.device(), s.raw(),
                s.device(), s.nbytes());
}

// A [BH, DD] view of slot `slot` of a flat state buffer.
Tensor state_view(const Tensor& flat, const Dims& d, int64_t slot) {
  return flat.slice(0, slot * d.bh() * d.dd(), (slot + 1) * d.bh() * d.dd()).view({d.bh(), d.dd()});
}

// Pieces of SpSaved for the linear methods: {P_c for my chunks..., log g of all chunks}.
void save_prefix(SpSaved& saved, std::vector<Tensor> p, const std::vector<std::vector<double>>& log_g) {
  saved.tensors = std::move(p);
  saved.tensors.push_back(log_g_tensor(log_g));
}

}  // namespace

// ------------------------------------------------------------------------------------------ LASP-2
namespace {
// M_c and log g_c of my chunks, packed as [M_c0, (M_c1), log g_c0, (log g_c1)].
Tensor lasp2_states(const Dims& d, const SpLayout& lay, const std::vector<ChunkIn>& ins, int chunk) {
  const int64_t nm = static_cast<int64_t>(ins.size()), state_n = d.bh() * d.dd();
  Tensor send = Tensor::empty({nm * (state_n + d.bh())}, d.state_dtype, d.device);
  Tensor host_g = Tensor::empty({nm * d.bh()}, d.state_dtype);
  for (int64_t i = 0; i < nm; ++i) {
    put_state(send, i, local_state(d, ins[i], chunk));
    const std::vector<double> lg = log_total_decay(ins[i].decay, d.B, d.H, lay.chunk_len);
    for (int64_t x = 0; x < d.bh(); ++x) host_g.set_item(i * d.bh() + x, lg[x]);
  }
  device_memcpy(static_cast<char*>(send.raw()) + nm * state_n * dtype_size(d.state_dtype),
                d.device, host_g.raw(), cpu(), host_g.nbytes());
  return send;
}

// Every chunk's state (views into the gathered buffer) and log decay.
void lasp2_unpack_states(const Dims& d, const SpLayout& lay, const Tensor& gathered, int64_t nm,
                         std::vector<Tensor>& m_of, std::vector<std::vector<double>>& log_g) {
  const int64_t state_n = d.bh() * d.dd();
  m_of.assign(lay.num_chunks, Tensor());
  log_g.assign(lay.num_chunks, {});
  for (int r = 0; r < lay.world; ++r) {
    const Tensor row = gathered.select(0, r);
    const std::vector<double> g = row.slice(0, nm * state_n, row.numel()).to_vector();
    const std::vector<int> cs = lay.chunks_of(r);
    for (size_t s = 0; s < cs.size(); ++s) {
      m_of[cs[s]] = state_view(row, d, static_cast<int64_t>(s));
      log_g[cs[s]].assign(g.begin() + s * d.bh(), g.begin() + (s + 1) * d.bh());
    }
  }
}
}  // namespace

void lasp2_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                          int chunk) {
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  const int64_t nm = static_cast<int64_t>(mine.size());

  // 1. Local states M_c and log decays log g_c.
  std::vector<ChunkIn> ins;
  for (int c : mine) ins.push_back(chunk_in(lay, c, q, k, v, decay));
  const Tensor send = lasp2_states(d, lay, ins, chunk);
  Tensor gathered = Tensor::empty({static_cast<int64_t>(lay.world), send.numel()}, d.state_dtype, d.device);
  std::vector<Tensor> m_of, prefixes;
  std::vector<std::vector<double>> log_g;
  Tensor none;
  if (!ctx.overlap) {
    // 2. ONE all-gather of (M, g); 3. prefix P_c and the local output from it.
    comm.all_gather(gathered, send);
    lasp2_unpack_states(d, lay, gathered, nm, m_of, log_g);
    for (int64_t i = 0; i < nm; ++i) {
      Tensor p = prefix_combine(d, m_of, log_g, mine[i]);
      chunk_forward(lay, mine[i], o, none, ins[i], p, chunk);
      prefixes.push_back(p);
    }
  } else {
    // 2. ONE all-gather of (M, g), in flight (CUDA: on the SP group's stream) while the local
    // output from a zero state runs here; 3. prefix P_c and its term of the output.
    CommRequest gather = comm.all_gather_async(gathered, send);
    for (int64_t i = 0; i < nm; ++i) chunk_forward(lay, mine[i], o, none, ins[i], Tensor(), chunk);
    gather.wait();
    lasp2_unpack_states(d, lay, gathered, nm, m_of, log_g);
    for (int64_t i = 0; i < nm; ++i) {
      Tensor p = prefix_combine(d, m_of, log_g, mine[i]);
      if (mine[i] > 0) add_prefix_output(o, q, decay, lay.local_row(mine[i]), lay.chunk_len, p, chunk);
      prefixes.push_back(p);
    }
  }
  save_prefix(saved, std::move(prefixes), log_g);
}

namespace {
// Shared tail of the LASP-2 and Ring backward: given every chunk's dP^out ([BH, DD] views),
// suffix-combine and run the local backward of my chunks.
void linear_backward_from_dp(const Dims& d, const SpLayout& lay, Grads g,
                             const std::vector<ChunkIn>& ins, const SpSaved& saved,
                             const std::vector<Tensor>& dp_of, const Tensor& d_o, int chunk) {
  const std::vector<int> mine = lay.my_chunks();
  const std::vector<std::vector<double>> log_g = log_g_from(saved.tensors.back());
  for (size_t i = 0; i < mine.size(); ++i) {
    const Tensor dm = suffix_combine(d, dp_of, log_g, mine[i]);
    chunk_backward(d, lay, mine[i], g, ins[i], saved.tensors[i], d_o, dm, false, chunk);
  }
}

void check_saved(const SpSaved& saved, const SpLayout& lay, const char* method) {
  LASP_CHECK_EQ(saved.tensors.size(), lay.my_chunks().size() + 1)
      << method << " backward: the saved tensors do not come from its forward";
}
}  // namespace

void lasp2_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                           Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                           const Tensor& v, const Decay& decay, const SpSaved& saved,
                           const Tensor& d_o, int chunk) {
  check_saved(saved, lay, "lasp2");
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  const int64_t nm = static_cast<int64_t>(mine.size());
  const int64_t state_n = d.bh() * d.dd();

  // 1. dP^out of my chunks, then ONE all-gather.
  Tensor send = Tensor::empty({nm * state_n}, d.state_dtype, d.device);
  std::vector<ChunkIn> ins;
  for (int64_t i = 0; i < nm; ++i) {
    ins.push_back(chunk_in(lay, mine[i], q, k, v, decay));
    put_state(send, i, output_state_grad(d, lay, mine[i], q, k, v, decay, d_o, chunk));
  }
  Tensor gathered = Tensor::empty({static_cast<int64_t>(lay.world), send.numel()}, d.state_dtype, d.device);
  auto unpack = [&]() {
    std::vector<Tensor> dp_of(lay.num_chunks);
    for (int r = 0; r < lay.world; ++r) {
      const std::vector<int> cs = lay.chunks_of(r);
      for (size_t s = 0; s < cs.size(); ++s)
        dp_of[cs[s]] = state_view(gathered.select(0, r), d, static_cast<int64_t>(s));
    }
    return dp_of;
  };
  const Grads g{dq, dk, dv, d_log_decay};
  if (!ctx.overlap) {
    comm.all_gather(gathered, send);
    // 2. Suffix combine and the local backward.
    linear_backward_from_dp(d, lay, g, ins, saved, unpack(), d_o, chunk);
    return;
  }
  // 2. The gather in flight (CUDA: on the SP group's stream) while the local backward without the
  // final-state gradient runs here; 3. suffix combine and the final-state terms.
  CommRequest gather = comm.all_gather_async(gathered, send);
  for (int64_t i = 0; i < nm; ++i)
    chunk_backward(d, lay, mine[i], g, ins[i], saved.tensors[i], d_o, Tensor(), false, chunk);
  gather.wait();
  const std::vector<Tensor> dp_of = unpack();
  const std::vector<std::vector<double>> log_g = log_g_from(saved.tensors.back());
  Tensor no_dlog;
  Tensor& dl = decay.mode == DecayMode::DataDependent ? d_log_decay : no_dlog;
  for (int64_t i = 0; i < nm; ++i) {
    if (mine[i] == lay.num_chunks - 1) continue;  // nothing after the last chunk: dM = 0
    const Tensor dm = suffix_combine(d, dp_of, log_g, mine[i]);
    add_final_state_grads(dk, dv, dl, q, k, v, decay, lay.local_row(mine[i]), lay.chunk_len,
                          saved.tensors[i], dm, chunk);
  }
}

// ------------------------------------------------------------------------------------------ LASP-1
// The running state travels chunk to chunk: owner(c) sends P_{c+1} to owner(c+1) (W-1 sequential
// sends for the contiguous split, 2W-2 for zigzag, where rank W-1 keeps its two chunks local).
void lasp1_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                          const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                          int chunk) {
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  std::vector<Tensor> prefixes;
  Tensor carry;
  for (int c : lay.my_chunks()) {
    Tensor p;
    if (c == 0) {
      p = Tensor::zeros({d.B, d.H, d.D, d.D}, d.state_dtype, d.device);
    } else if (lay.owner(c - 1) == lay.rank) {
      p = carry;
    } else {
      p = new_state(d);
      comm.recv(p, lay.owner(c - 1));
    }
    const bool last = c == lay.num_chunks - 1;
    Tensor f = last ? Tensor() : new_state(d);
    chunk_forward(lay, c, o, f, chunk_in(lay, c, q, k, v, decay), p, chunk);
    if (!last) {
      if (lay.owner(c + 1) == lay.rank) carry = f;
      else comm.send(f, lay.owner(c + 1));
    }
    prefixes.push_back(p);
  }
  saved.tensors = std::move(prefixes);
  saved.tensors.push_back(Tensor());  // same shape of SpSaved as the other methods
}

void lasp1_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                           Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                           const Tensor& v, const Decay& decay, const SpSaved& saved,
                           const Tensor& d_o, int chunk) {
  check_saved(saved, lay, "lasp1");
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  Tensor carry;
  for (int i = static_cast<int>(mine.size()) - 1; i >= 0; --i) {
    const int c = mine[i];
    Tensor dm;  // gradient of this chunk's final state (undefined = zero for the last chunk)
    if (c < lay.num_chunks - 1) {
      if (lay.owner(c + 1) == lay.rank) {
        dm = carry;
      } else {
        dm = new_state(d);
        comm.recv(dm, lay.owner(c + 1));
      }
    }
    const Tensor dp = chunk_backward(d, lay, c, Grads{dq, dk, dv, d_log_decay},
                                     chunk_in(lay, c, q, k, v, decay), saved.tensors[i], d_o, dm,
                                     c > 0, chunk);
    if (c > 0) {
      if (lay.owner(c - 1) == lay.rank) carry = dp;
      else comm.send(dp, lay.owner(c - 1));
    }
  }
}

// ------------------------------------------------------------------------------------------ Ring
// K, V (and per-token decays) travel the ring: W-1 sendrecv steps, each rank forwarding the block
// it received. Every rank folds each earlier chunk into its prefix state by computing that
// chunk's K^T V product (M_j) itself, so the output is exact after one pass, without the
// quadratic block-by-block attention of softmax ring attention.
// Backward: the dP^out blocks (D x D per chunk) travel the ring the other way, then each rank
// suffix-combines and runs its local backward (as LASP-2 does after its all-gather).
void ring_linear_forward(const SpContext& ctx, const SpLayout& lay, Tensor& o, const Tensor& q,
                         const Tensor& k, const Tensor& v, const Decay& decay, SpSaved& saved,
                         int chunk) {
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  const int max_mine = *std::max_element(mine.begin(), mine.end());
  const bool data_decay = decay.mode == DecayMode::DataDependent;

  std::vector<Tensor> m_of(lay.num_chunks);
  std::vector<std::vector<double>> log_g(lay.num_chunks);
  // Folds the chunks of rank r, whose local K, V and decay are given.
  auto fold = [&](int r, const Tensor& kr, const Tensor& vr, const Decay& dr) {
    for (int c : lay.chunks_of(r)) {
      const ChunkIn in = chunk_in(lay, c, Tensor(), kr, vr, dr);
      log_g[c] = log_total_decay(in.decay, d.B, d.H, lay.chunk_len);
      if (c < max_mine) m_of[c] = local_state(d, in, chunk).view({d.bh(), d.dd()});
    }
  };
  fold(lay.rank, k, v, decay);

  std::vector<Tensor> parts = {k, v};
  if (data_decay) parts.push_back(decay.per_token);
  Tensor cur = pack_bytes(parts);
  Tensor next = Tensor::empty(cur.shape(), DType::U8, d.device);
  Tensor kj = Tensor::empty(k.shape(), k.dtype(), d.device);
  Tensor vj = Tensor::empty(v.shape(), v.dtype(), d.device);
  Decay dj = decay;
  if (data_decay) dj.per_token = Tensor::empty(decay.per_token.shape(), decay.per_token.dtype(), d.device);
  const int to = (lay.rank + 1) % lay.world, from = (lay.rank + lay.world - 1) % lay.world;
  for (int s = 1; s < lay.world; ++s) {
    comm.sendrecv(cur, to, next, from);
    std::swap(cur, next);
    std::vector<Tensor*> outs = {&kj, &vj};
    if (data_decay) outs.push_back(&dj.per_token);
    unpack_bytes(cur, outs);
    fold((lay.rank - s + lay.world) % lay.world, kj, vj, dj);
  }

  std::vector<Tensor> prefixes;
  for (int c : mine) {
    Tensor p = prefix_combine(d, m_of, log_g, c);
    Tensor none;
    chunk_forward(lay, c, o, none, chunk_in(lay, c, q, k, v, decay), p, chunk);
    prefixes.push_back(p);
  }
  save_prefix(saved, std::move(prefixes), log_g);
}

void ring_linear_backward(const SpContext& ctx, const SpLayout& lay, Tensor& dq, Tensor& dk,
                          Tensor& dv, Tensor& d_log_decay, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Decay& decay, const SpSaved& saved,
                          const Tensor& d_o, int chunk) {
  check_saved(saved, lay, "ring");
  Comm& comm = *ctx.comm;
  const Dims d = dims_of(q, k, v);
  const std::vector<int> mine = lay.my_chunks();
  const int64_t nm = static_cast<int64_t>(mine.size());
  const int64_t state_n = d.bh() * d.dd();

  Tensor cur = Tensor::empty({nm * state_n}, d.state_dtype, d.device);
  std::vector<ChunkIn> ins;
  for (int64_t i = 0; i < nm; ++i) {
    ins.push_back(chunk_in(lay, mine[i], q, k, v, decay));
    put_state(cur, i, output_state_grad(d, lay, mine[i], q, k, v, decay, d_o, chunk));
  }
  std::vector<Tensor> dp_of(lay.num_chunks);
  auto keep = [&](int r, const Tensor& buf) {
    const std::vector<int> cs = lay.chunks_of(r);
    for (size_t s = 0; s < cs.size(); ++s) dp_of[cs[s]] = state_view(buf, d, static_cast<int64_t>(s));
  };
  keep(lay.rank, cur);
  const int to = (lay.rank + lay.world - 1) % lay.world, from = (lay.rank + 1) % lay.world;
  for (int s = 1; s < lay.world; ++s) {
    Tensor next = Tensor::empty(cur.shape(), cur.dtype(), d.device);
    comm.sendrecv(cur, to, next, from);
    cur = next;  // the received buffer stays alive in dp_of
    keep((lay.rank + s) % lay.world, cur);
  }
  linear_backward_from_dp(d, lay, Grads{dq, dk, dv, d_log_decay}, ins, saved, dp_of, d_o, chunk);
}

}  // namespace lasp
