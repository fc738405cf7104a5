// CPU linear attention: the chunked algorithm of DESIGN.md "Linear attention math", forward and
// exact backward, for fp32 and fp64. CUDA tensors go to linear_attention_*_cuda
// (linear_attention.cu).
//
// Per (batch, head) the head's rows are copied into contiguous [T, D] buffers; each chunk of
// L <= C rows is then a handful of small GEMMs (CBLAS) plus the decay mask. All decay factors
// come from within-chunk cumulative log decays cum[r] = sum_{i<=r} log a_i:
//   M[r,s] = exp(cum[r] - cum[s])  (s <= r)     intra-chunk mask, never b_r / b_s
//   b[r]   = exp(cum[r])                        decay from the chunk start to row r
//   e[r]   = exp(cum[L-1] - cum[r])             decay from row r to the chunk end
//   bL     = exp(cum[L-1])                      whole-chunk decay
// Every factor is <= 1, so strong decays underflow to 0 gracefully instead of overflowing.
#include "kernels/linear_attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "core/profile.h"
#include "kernels/dispatch.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
void linear_attention_forward_cuda(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Decay& decay, const Tensor& initial_state,
                                   int chunk, LinearAttentionSaved* saved);
void linear_attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay,
                                    Tensor& d_initial_state, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Decay& decay,
                                    const Tensor& initial_state, const Tensor& d_o,
                                    const Tensor& d_final_state, int chunk,
                                    const LinearAttentionSaved* saved);
#endif

DecayMode decay_mode_from_name(const std::string& name) {
  if (name == "none") return DecayMode::None;
  if (name == "constant") return DecayMode::Constant;
  if (name == "data") return DecayMode::DataDependent;
  LASP_FAIL() << "unknown decay mode '" << name << "', expected one of: none, constant, data";
  return DecayMode::None;
}

const char* decay_mode_name(DecayMode m) {
  switch (m) {
    case DecayMode::None:
      return "none";
    case DecayMode::Constant:
      return "constant";
    case DecayMode::DataDependent:
      return "data";
  }
  return "?";
}

namespace {

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C on raw pointers (leading dimensions given).
inline void mm(bool ta, bool tb, int m, int n, int k, double alpha, const float* a, int lda,
               const float* b, int ldb, double beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, static_cast<float>(alpha), a, lda, b, ldb, static_cast<float>(beta), c, ldc);
}
inline void mm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Dims {
  int64_t B = 0, T = 0, H = 0, D = 0;
};

// Copies x[b, :, h, :] of a [B, T, H, D] tensor into dst[T, D] and back.
template <typename T>
void gather_head(T* dst, const T* x, const Dims& d, int64_t b, int64_t h) {
  for (int64_t t = 0; t < d.T; ++t) {
    const T* src = x + ((b * d.T + t) * d.H + h) * d.D;
    std::copy(src, src + d.D, dst + t * d.D);
  }
}
template <typename T>
void scatter_head(T* x, const T* src, const Dims& d, int64_t b, int64_t h) {
  for (int64_t t = 0; t < d.T; ++t) {
    std::copy(src + t * d.D, src + (t + 1) * d.D, x + ((b * d.T + t) * d.H + h) * d.D);
  }
}

// Per-token log decays of head (b, h): 0 (None), per_head[h] (Constant) or per_token[b, t, h].
template <typename T>
void gather_log_decay(std::vector<T>& logd, const Decay& decay, const Dims& d, int64_t b,
                      int64_t h) {
  logd.assign(d.T, T(0));
  if (decay.mode == DecayMode::Constant) {
    std::fill(logd.begin(), logd.end(), decay.per_head.data<T>()[h]);
  } else if (decay.mode == DecayMode::DataDependent) {
    const T* pt = decay.per_token.data<T>();
    for (int64_t t = 0; t < d.T; ++t) logd[t] = pt[(b * d.T + t) * d.H + h];
  }
}

// The decay factors of one chunk (rows t0 .. t0+L-1), see the file comment. The cumulative
// sums are kept in double even for fp32 data: with strong decays cum reaches -1000s, and a float
// difference cum[r] - cum[s] of two such values would lose the digits that matter.
template <typename T>
struct ChunkDecay {
  int L = 0;
  std::vector<double> cum;        // [L]
  std::vector<T> b, e, mask, pw;  // b, e: [L]; mask: [L, L] lower triangle incl. diagonal
  T bL = 1;

  // with_mask = false skips the [L, L] mask (state-only passes need b, e and bL alone).
  void compute(const T* logd, int len, DecayMode mode, bool with_mask = true) {
    L = len;
    cum.resize(L);
    b.resize(L);
    e.resize(L);
    if (with_mask) mask.assign(static_cast<size_t>(L) * L, T(0));
    double c = 0;
    for (int r = 0; r < L; ++r) cum[r] = (c += logd[r]);
    for (int r = 0; r < L; ++r) {
      b[r] = static_cast<T>(std::exp(cum[r]));
      e[r] = static_cast<T>(std::exp(cum[L - 1] - cum[r]));
    }
    bL = static_cast<T>(std::exp(cum[L - 1]));
    if (!with_mask) {
      return;
    } else if (mode == DecayMode::None) {
      for (int r = 0; r < L; ++r) std::fill(&mask[r * L], &mask[r * L] + r + 1, T(1));
    } else if (mode == DecayMode::Constant) {
      // Toeplitz: M[r, s] = a^(r - s); L exponentials instead of L^2 / 2.
      pw.resize(L);
      for (int j = 0; j < L; ++j)
        pw[j] = static_cast<T>(std::exp(j * static_cast<double>(logd[0])));
      for (int r = 0; r < L; ++r)
        for (int s = 0; s <= r; ++s) mask[r * L + s] = pw[r - s];
    } else {
      for (int r = 0; r < L; ++r)
        for (int s = 0; s <= r; ++s) mask[r * L + s] = std::exp(static_cast<T>(cum[r] - cum[s]));
    }
  }
};

// x[r, :] = y[r, :] * f[r] for a [L, D] matrix.
template <typename T>
void scale_rows(T* x, const T* y, const T* f, int L, int64_t D) {
  for (int r = 0; r < L; ++r)
    for (int64_t j = 0; j < D; ++j) x[r * D + j] = y[r * D + j] * f[r];
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by forward and backward
// ---------------------------------------------------------------------------------------------

// A tensor argument: defined, of `shape`, on q's device, contiguous. With `row_strided`
// ([B, T, H, D] q, k, v, o and their gradients) the tokens may instead be a fixed row stride
// apart, each token's H x D values packed (a head slice of a wider tensor, e.g. the model's fused
// q/k/v projection output viewed as [B, T, 3 H, D]).
void check_layout(const Tensor& t, const char* fn, const char* what, const Shape& shape,
                  const Tensor& q, bool row_strided = false) {
  LASP_CHECK(t.defined()) << fn << ": " << what << " is undefined";
  LASP_CHECK(t.shape() == shape) << fn << ": " << what << " must have shape " << shape_str(shape)
                                 << ", got " << t.str();
  if (row_strided) {
    const Shape& st = t.strides();
    const bool packed_rows = st[3] == 1 && st[2] == shape[3] && st[1] >= shape[2] * shape[3] &&
                             st[0] == shape[1] * st[1];
    LASP_CHECK(t.is_contiguous() || packed_rows)
        << fn << ": " << what << " must be contiguous or [B, T, H, D] with packed heads and a row stride, got "
        << t.str();
  } else {
    LASP_CHECK(t.is_contiguous()) << fn << ": " << what << " must be contiguous, got " << t.str();
  }
  check_same_device(t, q, fn);
}

Dims check_common(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Decay& decay, const Tensor& initial_state, int chunk) {
  LASP_CHECK(q.defined()) << fn << ": q is undefined";
  LASP_CHECK(q.ndim() == 4) << fn << ": q must be [B, T, H, D], got " << q.str();
  Dims d{q.dim(0), q.dim(1), q.dim(2), q.dim(3)};
  LASP_CHECK(d.D >= 1 && d.H >= 1) << fn << ": q must have H >= 1 and D >= 1, got " << q.str();
  LASP_CHECK(chunk >= 1) << fn << ": chunk must be >= 1, got " << chunk;
  check_layout(q, fn, "q", q.shape(), q, true);
  check_layout(k, fn, "k", q.shape(), q, true);
  check_layout(v, fn, "v", q.shape(), q, true);
  if (initial_state.defined())
    check_layout(initial_state, fn, "initial_state", {d.B, d.H, d.D, d.D}, q);
  if (decay.mode == DecayMode::Constant) {
    LASP_CHECK(decay.per_head.defined())
        << fn << ": Constant decay needs decay.per_head [H] (log a per head)";
    check_layout(decay.per_head, fn, "decay.per_head", {d.H}, q);
  } else if (decay.mode == DecayMode::DataDependent) {
    LASP_CHECK(decay.per_token.defined())
        << fn << ": DataDependent decay needs decay.per_token [B, T, H] (log a per token)";
    check_layout(decay.per_token, fn, "decay.per_token", {d.B, d.T, d.H}, q);
  }
  return d;
}

// The CPU path: every defined tensor is fp32, or every one is fp64, and log decays are <= 0.
void check_cpu_decay_values(const char* fn, const Decay& decay) {
  const Tensor* t = decay.mode == DecayMode::Constant        ? &decay.per_head
                    : decay.mode == DecayMode::DataDependent ? &decay.per_token
                                                             : nullptr;
  if (!t) return;
  for (int64_t i = 0; i < t->numel(); ++i) {
    const double x = t->dtype() == DType::F64 ? t->data<double>()[i] : t->data<float>()[i];
    // NaN passes on purpose: it propagates to the loss, where the trainer reports it.
    LASP_CHECK(!(x > 0)) << fn << ": log decays must be <= 0 (a in (0, 1]), got " << x
                         << " at flat index " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_cpu(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Decay& decay, const Tensor& initial_state, int chunk, const Dims& d) {
  const bool want_o = o.defined(), want_state = final_state.defined();
  if (!want_o && !want_state) return;
  const int64_t D = d.D, DD = D * D;
  const int Di = static_cast<int>(D);
  const int C = static_cast<int>(std::min<int64_t>(chunk, std::max<int64_t>(d.T, 1)));
  std::vector<T> Q(d.T * D), K(d.T * D), V(d.T * D), O(want_o ? d.T * D : 0), S(DD);
  std::vector<T> A(static_cast<size_t>(C) * C), scaled(C * D), logd;
  ChunkDecay<T> cd;

  for (int64_t bi = 0; bi < d.B; ++bi) {
    for (int64_t h = 0; h < d.H; ++h) {
      if (want_o) gather_head(Q.data(), q.data<T>(), d, bi, h);
      gather_head(K.data(), k.data<T>(), d, bi, h);
      gather_head(V.data(), v.data<T>(), d, bi, h);
      gather_log_decay(logd, decay, d, bi, h);
      bool have_state = initial_state.defined();
      if (have_state) {
        const T* s0 = initial_state.data<T>() + (bi * d.H + h) * DD;
        std::copy(s0, s0 + DD, S.begin());
      } else {
        std::fill(S.begin(), S.end(), T(0));
      }
      for (int64_t t0 = 0; t0 < d.T; t0 += C) {
        const int L = static_cast<int>(std::min<int64_t>(C, d.T - t0));
        const T *Qc = Q.data() + t0 * D, *Kc = K.data() + t0 * D, *Vc = V.data() + t0 * D;
        cd.compute(logd.data() + t0, L, decay.mode, want_o);
        if (want_o) {
          T* Oc = O.data() + t0 * D;
          // intra: O_c = ((Q_c K_c^T) o M) V_c
          mm(false, true, L, L, Di, 1.0, Qc, Di, Kc, Di, 0.0, A.data(), L);
          for (int i = 0; i < L * L; ++i) A[i] *= cd.mask[i];
          mm(false, false, L, Di, L, 1.0, A.data(), L, Vc, Di, 0.0, Oc, Di);
          // inter: O_c += diag(b) Q_c S_prev
          if (have_state) {
            scale_rows(scaled.data(), Qc, cd.b.data(), L, D);
            mm(false, false, L, Di, Di, 1.0, scaled.data(), Di, S.data(), Di, 1.0, Oc, Di);
          }
        }
        const bool last = t0 + L >= d.T;
        if (!last || want_state) {
          // state: S = bL S_prev + (diag(e) K_c)^T V_c
          scale_rows(scaled.data(), Kc, cd.e.data(), L, D);
          mm(true, false, Di, Di, L, 1.0, scaled.data(), Di, Vc, Di, have_state ? cd.bL : 0.0,
             S.data(), Di);
          have_state = true;
        }
      }
      if (want_o) scatter_head(o.data<T>(), O.data(), d, bi, h);
      if (want_state) std::copy(S.begin(), S.end(), final_state.data<T>() + (bi * d.H + h) * DD);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
//
// Chunk c (rows r = 0..L-1, state S_p before it, S after it, upstream gradients dO and dS):
//   O   = (P o M) V + diag(b) Q S_p,        P = Q K^T
//   S   = bL S_p + (diag(e) K)^T V
// Differentiating (G = (dO V^T) o M, A = P o M):
//   dQ  = G K + diag(b) dO S_p^T
//   dK  = G^T Q + diag(e) V dS^T
//   dV  = A^T dO + diag(e) K dS
//   dS_p = bL dS + (diag(b) Q)^T dO                  (flows to chunk c-1; after chunk 0 it is
//                                                     d_initial_state)
// Log decays: the chunk's factors depend on cum[0..L-1] only, so first collect dL/dcum[r]:
//   intra  W = P o (dO V^T) o M:   dcum[r] += sum_s W[r, s] - sum_s W[s, r]
//   inter  dcum[r] += b[r] (q_r S_p) . do_r
//   state  with u[r] = e[r] k_r dS v_r^T:  dcum[r] -= u[r],  dcum[L-1] += sum_r u[r] + bL <S_p, dS>
// and since cum[r] = sum_{i<=r} log a_i, dL/dlog a_i = sum_{r>=i} dcum[r] (reverse cumsum).
// The states S_p are recomputed by a forward state pass and kept per chunk.

template <typename T>
void backward_cpu(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay, Tensor& d_initial_state,
                  const Tensor& q, const Tensor& k, const Tensor& v, const Decay& decay,
                  const Tensor& initial_state, const Tensor& d_o, const Tensor& d_final_state,
                  int chunk, const Dims& d) {
  const bool want_dq = dq.defined(), want_dk = dk.defined(), want_dv = dv.defined();
  const bool want_dlog = d_log_decay.defined(), want_dinit = d_initial_state.defined();
  if (!want_dq && !want_dk && !want_dv && !want_dlog && !want_dinit) return;
  const int64_t D = d.D, DD = D * D;
  const int Di = static_cast<int>(D);
  const int C = static_cast<int>(std::min<int64_t>(chunk, std::max<int64_t>(d.T, 1)));
  const int64_t n_chunks = (d.T + C - 1) / C;
  const size_t TD = static_cast<size_t>(d.T * D), CC = static_cast<size_t>(C) * C;
  std::vector<T> Q(TD), K(TD), V(TD), dO(TD, T(0)), dQ(TD), dK(TD), dV(TD);
  std::vector<T> states(n_chunks * DD), dS(DD), S(DD), logd, dlog(d.T), dcum(C);
  std::vector<T> P(CC), G(CC), scaled(C * D), tmp(C * D);
  ChunkDecay<T> cd;

  for (int64_t bi = 0; bi < d.B; ++bi) {
    for (int64_t h = 0; h < d.H; ++h) {
      gather_head(Q.data(), q.data<T>(), d, bi, h);
      gather_head(K.data(), k.data<T>(), d, bi, h);
      gather_head(V.data(), v.data<T>(), d, bi, h);
      if (d_o.defined()) gather_head(dO.data(), d_o.data<T>(), d, bi, h);
      gather_log_decay(logd, decay, d, bi, h);

      // Forward state pass: states[c] = the state before chunk c.
      if (initial_state.defined()) {
        const T* s0 = initial_state.data<T>() + (bi * d.H + h) * DD;
        std::copy(s0, s0 + DD, S.begin());
      } else {
        std::fill(S.begin(), S.end(), T(0));
      }
      for (int64_t c = 0; c < n_chunks; ++c) {
        std::copy(S.begin(), S.end(), states.begin() + c * DD);
        if (c + 1 == n_chunks) break;
        const int64_t t0 = c * C;
        const int L = static_cast<int>(std::min<int64_t>(C, d.T - t0));
        cd.compute(logd.data() + t0, L, decay.mode, false);
        scale_rows(scaled.data(), K.data() + t0 * D, cd.e.data(), L, D);
        mm(true, false, Di, Di, L, 1.0, scaled.data(), Di, V.data() + t0 * D, Di, cd.bL, S.data(),
           Di);
      }

      // Reverse pass.
      if (d_final_state.defined()) {
        const T* g = d_final_state.data<T>() + (bi * d.H + h) * DD;
        std::copy(g, g + DD, dS.begin());
      } else {
        std::fill(dS.begin(), dS.end(), T(0));
      }
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * C;
        const int L = static_cast<int>(std::min<int64_t>(C, d.T - t0));
        const T *Qc = Q.data() + t0 * D, *Kc = K.data() + t0 * D, *Vc = V.data() + t0 * D;
        const T* dOc = dO.data() + t0 * D;
        const T* Sp = states.data() + c * DD;
        cd.compute(logd.data() + t0, L, decay.mode);

        mm(false, true, L, L, Di, 1.0, Qc, Di, Kc, Di, 0.0, P.data(), L);   // P = Q K^T
        mm(false, true, L, L, Di, 1.0, dOc, Di, Vc, Di, 0.0, G.data(), L);  // dO V^T
        if (want_dlog) {
          std::fill(dcum.begin(), dcum.begin() + L, T(0));
          for (int r = 0; r < L; ++r) {
            for (int s = 0; s <= r; ++s) {
              const T w = P[r * L + s] * G[r * L + s] * cd.mask[r * L + s];
              dcum[r] += w;
              dcum[s] -= w;
            }
          }
        }
        for (size_t i = 0; i < static_cast<size_t>(L) * L; ++i) {
          P[i] *= cd.mask[i];  // A
          G[i] *= cd.mask[i];
        }
        // scaled = diag(b) dO, used by dQ, dS_p and the inter decay term.
        scale_rows(scaled.data(), dOc, cd.b.data(), L, D);
        if (want_dq) {
          T* dQc = dQ.data() + t0 * D;
          mm(false, false, L, Di, L, 1.0, G.data(), L, Kc, Di, 0.0, dQc, Di);
          mm(false, true, L, Di, Di, 1.0, scaled.data(), Di, Sp, Di, 1.0, dQc, Di);
        }
        if (want_dlog) {
          // inter: b[r] (q_r S_p) . do_r
          mm(false, false, L, Di, Di, 1.0, Qc, Di, Sp, Di, 0.0, tmp.data(), Di);
          for (int r = 0; r < L; ++r) dcum[r] += dot(&tmp[r * D], &scaled[r * D], D);
        }
        if (want_dk) {
          T* dKc = dK.data() + t0 * D;
          mm(true, false, L, Di, L, 1.0, G.data(), L, Qc, Di, 0.0, dKc, Di);
          // + diag(e) V dS^T
          mm(false, true, L, Di, Di, 1.0, Vc, Di, dS.data(), Di, 0.0, tmp.data(), Di);
          for (int r = 0; r < L; ++r)
            for (int64_t j = 0; j < D; ++j) dKc[r * D + j] += cd.e[r] * tmp[r * D + j];
        }
        if (want_dv || want_dlog) {
          // tmp = diag(e) K dS
          mm(false, false, L, Di, Di, 1.0, Kc, Di, dS.data(), Di, 0.0, tmp.data(), Di);
          for (int r = 0; r < L; ++r)
            for (int64_t j = 0; j < D; ++j) tmp[r * D + j] *= cd.e[r];
          if (want_dlog) {
            T total = cd.bL * dot(Sp, dS.data(), DD);
            for (int r = 0; r < L; ++r) {
              const T u = dot(&tmp[r * D], Vc + r * D, D);
              dcum[r] -= u;
              total += u;
            }
            dcum[L - 1] += total;
            T run = 0;
            for (int r = L - 1; r >= 0; --r) dlog[t0 + r] = (run += dcum[r]);
          }
          if (want_dv) {
            T* dVc = dV.data() + t0 * D;
            std::copy(tmp.begin(), tmp.begin() + L * D, dVc);
            mm(true, false, L, Di, L, 1.0, P.data(), L, dOc, Di, 1.0, dVc, Di);
          }
        }
        // dS_p = bL dS + Q^T diag(b) dO
        mm(true, false, Di, Di, L, 1.0, Qc, Di, scaled.data(), Di, cd.bL, dS.data(), Di);
      }

      if (want_dq) scatter_head(dq.data<T>(), dQ.data(), d, bi, h);
      if (want_dk) scatter_head(dk.data<T>(), dK.data(), d, bi, h);
      if (want_dv) scatter_head(dv.data<T>(), dV.data(), d, bi, h);
      if (want_dlog) {
        T* out = d_log_decay.data<T>();
        for (int64_t t = 0; t < d.T; ++t) out[(bi * d.T + t) * d.H + h] = dlog[t];
      }
      if (want_dinit)
        std::copy(dS.begin(), dS.end(), d_initial_state.data<T>() + (bi * d.H + h) * DD);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points: check, then dispatch on device and dtype.
// ---------------------------------------------------------------------------------------------

void linear_attention_forward(Tensor& o, Tensor& final_state, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Decay& decay, const Tensor& initial_state,
                              int chunk, LinearAttentionSaved* saved) {
  LASP_PROFILE_SCOPE("linear_attention_forward");
  if (saved) *saved = LinearAttentionSaved{};
  const char* fn = "linear_attention_forward";
  const Dims d = check_common(fn, q, k, v, decay, initial_state, chunk);
  if (o.defined()) check_layout(o, fn, "o", q.shape(), q, true);
  if (final_state.defined()) check_layout(final_state, fn, "final_state", {d.B, d.H, d.D, d.D}, q);
  if (q.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return linear_attention_forward_cuda(o, final_state, q, k, v, decay, initial_state, chunk,
                                         saved);
#else
    LASP_FAIL() << fn << ": got CUDA tensors but lasp was built without CUDA";
#endif
  }
  const DType dt = q.dtype();
  LASP_CHECK(dt == DType::F32 || dt == DType::F64)
      << fn << ": CPU path supports fp32 and fp64, got " << q.str();
  check_cpu_dtype(k, fn, "k", dt);
  check_cpu_dtype(v, fn, "v", dt);
  check_cpu_dtype(o, fn, "o", dt);
  check_cpu_dtype(final_state, fn, "final_state", dt);
  check_cpu_dtype(initial_state, fn, "initial_state", dt);
  if (decay.mode == DecayMode::Constant) check_cpu_dtype(decay.per_head, fn, "decay.per_head", dt);
  if (decay.mode == DecayMode::DataDependent)
    check_cpu_dtype(decay.per_token, fn, "decay.per_token", dt);
  check_cpu_decay_values(fn, decay);
  // The CPU kernels read and write contiguous tensors: strided ones go through copies.
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor oc = o.defined() && !o.is_contiguous() ? Tensor::empty(o.shape(), o.dtype()) : o;
  if (dt == DType::F32) {
    forward_cpu<float>(oc, final_state, qc, kc, vc, decay, initial_state, chunk, d);
  } else {
    forward_cpu<double>(oc, final_state, qc, kc, vc, decay, initial_state, chunk, d);
  }
  if (o.defined() && !o.is_contiguous()) o.copy_from(oc);
}

void linear_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_log_decay,
                               Tensor& d_initial_state, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Decay& decay, const Tensor& initial_state,
                               const Tensor& d_o, const Tensor& d_final_state, int chunk,
                               const LinearAttentionSaved* saved) {
  LASP_PROFILE_SCOPE("linear_attention_backward");
  const char* fn = "linear_attention_backward";
  const Dims d = check_common(fn, q, k, v, decay, initial_state, chunk);
  const Shape state_shape{d.B, d.H, d.D, d.D};
  if (d_o.defined()) check_layout(d_o, fn, "d_o", q.shape(), q, true);
  if (d_final_state.defined()) check_layout(d_final_state, fn, "d_final_state", state_shape, q);
  if (dq.defined()) check_layout(dq, fn, "dq", q.shape(), q, true);
  if (dk.defined()) check_layout(dk, fn, "dk", q.shape(), q, true);
  if (dv.defined()) check_layout(dv, fn, "dv", q.shape(), q, true);
  if (d_initial_state.defined())
    check_layout(d_initial_state, fn, "d_initial_state", state_shape, q);
  if (d_log_decay.defined()) {
    LASP_CHECK(decay.mode == DecayMode::DataDependent)
        << fn << ": d_log_decay is only defined for DataDependent decay, got mode "
        << decay_mode_name(decay.mode);
    check_layout(d_log_decay, fn, "d_log_decay", {d.B, d.T, d.H}, q);
  }
  if (q.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return linear_attention_backward_cuda(dq, dk, dv, d_log_decay, d_initial_state, q, k, v, decay,
                                          initial_state, d_o, d_final_state, chunk, saved);
#else
    LASP_FAIL() << fn << ": got CUDA tensors but lasp was built without CUDA";
#endif
  }
  const DType dt = q.dtype();
  LASP_CHECK(dt == DType::F32 || dt == DType::F64)
      << fn << ": CPU path supports fp32 and fp64, got " << q.str();
  const std::pair<const Tensor*, const char*> args[] = {{&k, "k"},
                                                        {&v, "v"},
                                                        {&initial_state, "initial_state"},
                                                        {&d_o, "d_o"},
                                                        {&d_final_state, "d_final_state"},
                                                        {&dq, "dq"},
                                                        {&dk, "dk"},
                                                        {&dv, "dv"},
                                                        {&d_log_decay, "d_log_decay"},
                                                        {&d_initial_state, "d_initial_state"}};
  for (const auto& [t, what] : args) check_cpu_dtype(*t, fn, what, dt);
  if (decay.mode == DecayMode::Constant) check_cpu_dtype(decay.per_head, fn, "decay.per_head", dt);
  if (decay.mode == DecayMode::DataDependent)
    check_cpu_dtype(decay.per_token, fn, "decay.per_token", dt);
  check_cpu_decay_values(fn, decay);
  // The CPU kernels read and write contiguous tensors: strided ones go through copies.
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const Tensor d_oc = d_o.defined() ? d_o.contiguous() : d_o;
  auto out = [](const Tensor& t) {
    return t.defined() && !t.is_contiguous() ? Tensor::empty(t.shape(), t.dtype()) : t;
  };
  Tensor dqc = out(dq), dkc = out(dk), dvc = out(dv);
  if (dt == DType::F32) {
    backward_cpu<float>(dqc, dkc, dvc, d_log_decay, d_initial_state, qc, kc, vc, decay, initial_state,
                        d_oc, d_final_state, chunk, d);
  } else {
    backward_cpu<double>(dqc, dkc, dvc, d_log_decay, d_initial_state, qc, kc, vc, decay, initial_state,
                         d_oc, d_final_state, chunk, d);
  }
  for (auto [dst, src] : {std::pair<Tensor*, Tensor*>{&dq, &dqc}, {&dk, &dkc}, {&dv, &dvc}})
    if (dst->defined() && !dst->is_contiguous()) dst->copy_from(*src);
}

}  // namespace lasp
