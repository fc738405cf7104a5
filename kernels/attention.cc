// CPU softmax attention (causal or not, grouped-query heads, q_offset, log-sum-exp output),
// forward and backward, fp32 and fp64. CUDA tensors go to attention_*_cuda (attention.cu).
//
// Per (batch, kv head) K and V are copied into contiguous [Tk, D] buffers and reused by every
// query head of the group. Queries are processed in blocks of kQueryBlock rows; a block computes
// its score tile S = scale Q_blk K^T against the keys its last row can see, then
//   forward:  m = rowmax(S), p = exp(S - m), l = rowsum(p), O = (p / l) V, lse = m + log l
//   backward: P = exp(S - lse), dP = dO V^T, dS = P o (dP - rowsum(dO o O)),
//             dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO
// The backward uses the lse it is given, so called on a subset of the keys with the merged
// (global) o and lse it returns exactly that subset's share of dk, dv and a summand of dq
// (ring attention relies on this).
#include "kernels/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/profile.h"
#include "kernels/dispatch.h"

namespace lasp {

#ifdef LASP_HAVE_CUDA
void attention_forward_cuda(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k,
                            const Tensor& v, float scale, bool causal, int64_t q_offset);
void attention_backward_cuda(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                             const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                             float scale, bool causal, int64_t q_offset);
#endif

namespace {

constexpr int64_t kQueryBlock = 64;  // query rows per score tile

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

struct Dims {
  int64_t B = 0, Tq = 0, Tk = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t group() const { return Hq / Hkv; }
};

// x[b, :, h, :] of a [B, T, H, D] tensor <-> dst[T, D].
template <typename T>
void gather_head(T* dst, const T* x, int64_t Tn, int64_t H, int64_t D, int64_t b, int64_t h) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* src = x + ((b * Tn + t) * H + h) * D;
    std::copy(src, src + D, dst + t * D);
  }
}
template <typename T>
void scatter_head(T* x, const T* src, int64_t Tn, int64_t H, int64_t D, int64_t b, int64_t h) {
  for (int64_t t = 0; t < Tn; ++t)
    std::copy(src + t * D, src + (t + 1) * D, x + ((b * Tn + t) * H + h) * D);
}

// Number of keys query row i sees: keys j < visible(i).
inline int64_t visible_keys(const Dims& d, bool causal, int64_t q_offset, int64_t i) {
  if (!causal) return d.Tk;
  return std::clamp<int64_t>(q_offset + i + 1, 0, d.Tk);
}

void check_layout(const Tensor& t, const char* fn, const char* what, const Shape& shape,
                  const Tensor& q) {
  LASP_CHECK(t.defined()) << fn << ": " << what << " is undefined";
  LASP_CHECK(t.shape() == shape) << fn << ": " << what << " must have shape " << shape_str(shape)
                                 << ", got " << t.str();
  LASP_CHECK(t.is_contiguous()) << fn << ": " << what << " must be contiguous, got " << t.str();
  check_same_device(t, q, fn);
}

Dims check_qkv(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v) {
  LASP_CHECK(q.defined() && k.defined() && v.defined()) << fn << ": q, k and v must be defined";
  LASP_CHECK(q.ndim() == 4) << fn << ": q must be [B, Tq, Hq, D], got " << q.str();
  LASP_CHECK(k.ndim() == 4) << fn << ": k must be [B, Tk, Hkv, D], got " << k.str();
  Dims d{q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  LASP_CHECK(d.D >= 1 && d.Hq >= 1 && d.Hkv >= 1)
      << fn << ": need D >= 1 and at least one head, got q " << q.str() << ", k " << k.str();
  LASP_CHECK(d.Hq % d.Hkv == 0) << fn << ": query heads (" << d.Hq
                                << ") must be a multiple of kv heads (" << d.Hkv << ")";
  check_layout(q, fn, "q", q.shape(), q);
  check_layout(k, fn, "k", {d.B, d.Tk, d.Hkv, d.D}, q);
  check_layout(v, fn, "v", k.shape(), q);
  return d;
}

DType check_cpu_float(const char* fn, const Tensor& q) {
  const DType dt = q.dtype();
  LASP_CHECK(dt == DType::F32 || dt == DType::F64)
      << fn << ": CPU path supports fp32 and fp64, got " << q.str();
  return dt;
}

// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_cpu(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v, T scale,
                 bool causal, int64_t q_offset, const Dims& d) {
  const int64_t D = d.D;
  const int Di = static_cast<int>(D);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> K(d.Tk * D), V(d.Tk * D), Q(d.Tq * D), O(d.Tq * D), lrow(d.Tq);
  std::vector<T> S(kQueryBlock * std::max<int64_t>(d.Tk, 1));

  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t hk = 0; hk < d.Hkv; ++hk) {
      gather_head(K.data(), k.data<T>(), d.Tk, d.Hkv, D, b, hk);
      gather_head(V.data(), v.data<T>(), d.Tk, d.Hkv, D, b, hk);
      for (int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
        gather_head(Q.data(), q.data<T>(), d.Tq, d.Hq, D, b, h);
        for (int64_t i0 = 0; i0 < d.Tq; i0 += kQueryBlock) {
          const int64_t R = std::min(kQueryBlock, d.Tq - i0);
          const int64_t nk = visible_keys(d, causal, q_offset, i0 + R - 1);  // widest row
          T* Ob = O.data() + i0 * D;
          if (nk == 0) {
            std::fill(Ob, Ob + R * D, T(0));
            std::fill(lrow.begin() + i0, lrow.begin() + i0 + R, neg_inf);
            continue;
          }
          const int nki = static_cast<int>(nk);
          mm(false, true, static_cast<int>(R), nki, Di, scale, Q.data() + i0 * D, Di, K.data(), Di,
             0.0, S.data(), nki);
          for (int64_t r = 0; r < R; ++r) {
            T* s = S.data() + r * nk;
            const int64_t n = visible_keys(d, causal, q_offset, i0 + r);
            if (n == 0) {
              std::fill(s, s + nk, T(0));
              lrow[i0 + r] = neg_inf;
              continue;
            }
            const T m = *std::max_element(s, s + n);
            T l = 0;
            for (int64_t j = 0; j < n; ++j) l += (s[j] = std::exp(s[j] - m));
            const T inv = T(1) / l;
            for (int64_t j = 0; j < n; ++j) s[j] *= inv;
            std::fill(s + n, s + nk, T(0));
            lrow[i0 + r] = m + std::log(l);
          }
          mm(false, false, static_cast<int>(R), Di, nki, 1.0, S.data(), nki, V.data(), Di, 0.0, Ob,
             Di);
        }
        scatter_head(o.data<T>(), O.data(), d.Tq, d.Hq, D, b, h);
        if (lse.defined())
          std::copy(lrow.begin(), lrow.end(), lse.data<T>() + (b * d.Hq + h) * d.Tq);
      }
    }
  }
}

template <typename T>
void backward_cpu(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                  const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o, T scale,
                  bool causal, int64_t q_offset, const Dims& d) {
  const bool want_dq = dq.defined(), want_dk = dk.defined(), want_dv = dv.defined();
  if (!want_dq && !want_dk && !want_dv) return;
  const int64_t D = d.D;
  const int Di = static_cast<int>(D);
  const size_t kd = static_cast<size_t>(d.Tk * D), qd = static_cast<size_t>(d.Tq * D);
  std::vector<T> K(kd), V(kd), dK(kd), dV(kd), Q(qd), O(qd), dO(qd), dQ(qd), Drow(d.Tq);
  const size_t tile = static_cast<size_t>(kQueryBlock * std::max<int64_t>(d.Tk, 1));
  std::vector<T> P(tile), dP(tile);

  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t hk = 0; hk < d.Hkv; ++hk) {
      gather_head(K.data(), k.data<T>(), d.Tk, d.Hkv, D, b, hk);
      gather_head(V.data(), v.data<T>(), d.Tk, d.Hkv, D, b, hk);
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      for (int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
        gather_head(Q.data(), q.data<T>(), d.Tq, d.Hq, D, b, h);
        gather_head(O.data(), o.data<T>(), d.Tq, d.Hq, D, b, h);
        gather_head(dO.data(), d_o.data<T>(), d.Tq, d.Hq, D, b, h);
        const T* L = lse.data<T>() + (b * d.Hq + h) * d.Tq;
        for (int64_t i = 0; i < d.Tq; ++i) {
          T s = 0;
          for (int64_t j = 0; j < D; ++j) s += dO[i * D + j] * O[i * D + j];
          Drow[i] = s;
        }
        for (int64_t i0 = 0; i0 < d.Tq; i0 += kQueryBlock) {
          const int64_t R = std::min(kQueryBlock, d.Tq - i0);
          const int Ri = static_cast<int>(R);
          const int64_t nk = visible_keys(d, causal, q_offset, i0 + R - 1);
          if (nk == 0) {
            std::fill(dQ.begin() + i0 * D, dQ.begin() + (i0 + R) * D, T(0));
            continue;
          }
          const int nki = static_cast<int>(nk);
          const T* Qb = Q.data() + i0 * D;
          const T* dOb = dO.data() + i0 * D;
          mm(false, true, Ri, nki, Di, scale, Qb, Di, K.data(), Di, 0.0, P.data(), nki);
          mm(false, true, Ri, nki, Di, 1.0, dOb, Di, V.data(), Di, 0.0, dP.data(), nki);
          for (int64_t r = 0; r < R; ++r) {
            T* p = P.data() + r * nk;
            T* g = dP.data() + r * nk;
            const T l = L[i0 + r];
            // A row with no visible key (lse = -inf) has no probabilities and no gradient.
            const int64_t n = std::isinf(l) ? 0 : visible_keys(d, causal, q_offset, i0 + r);
            for (int64_t j = 0; j < n; ++j) {
              p[j] = std::exp(p[j] - l);
              g[j] = p[j] * (g[j] - Drow[i0 + r]);  // dS
            }
            std::fill(p + n, p + nk, T(0));
            std::fill(g + n, g + nk, T(0));
          }
          if (want_dv)
            mm(true, false, nki, Di, Ri, 1.0, P.data(), nki, dOb, Di, 1.0, dV.data(), Di);
          if (want_dq)
            mm(false, false, Ri, Di, nki, scale, dP.data(), nki, K.data(), Di, 0.0,
               dQ.data() + i0 * D, Di);
          if (want_dk)
            mm(true, false, nki, Di, Ri, scale, dP.data(), nki, Qb, Di, 1.0, dK.data(), Di);
        }
        if (want_dq) scatter_head(dq.data<T>(), dQ.data(), d.Tq, d.Hq, D, b, h);
      }
      if (want_dk) scatter_head(dk.data<T>(), dK.data(), d.Tk, d.Hkv, D, b, hk);
      if (want_dv) scatter_head(dv.data<T>(), dV.data(), d.Tk, d.Hkv, D, b, hk);
    }
  }
}

}  // namespace

void attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       float scale, bool causal, int64_t q_offset) {
  LASP_PROFILE_SCOPE("attention_forward");
  const char* fn = "attention_forward";
  const Dims d = check_qkv(fn, q, k, v);
  check_layout(o, fn, "o", q.shape(), q);
  if (lse.defined()) check_layout(lse, fn, "lse", {d.B, d.Hq, d.Tq}, q);
  if (q.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return attention_forward_cuda(o, lse, q, k, v, scale, causal, q_offset);
#else
    LASP_FAIL() << fn << ": got CUDA tensors but lasp was built without CUDA";
#endif
  }
  const DType dt = check_cpu_float(fn, q);
  check_cpu_dtype(k, fn, "k", dt);
  check_cpu_dtype(v, fn, "v", dt);
  check_cpu_dtype(o, fn, "o", dt);
  check_cpu_dtype(lse, fn, "lse", dt);
  if (dt == DType::F32) {
    forward_cpu<float>(o, lse, q, k, v, scale, causal, q_offset, d);
  } else {
    forward_cpu<double>(o, lse, q, k, v, scale, causal, q_offset, d);
  }
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                        float scale, bool causal, int64_t q_offset) {
  LASP_PROFILE_SCOPE("attention_backward");
  const char* fn = "attention_backward";
  const Dims d = check_qkv(fn, q, k, v);
  check_layout(o, fn, "o", q.shape(), q);
  check_layout(lse, fn, "lse", {d.B, d.Hq, d.Tq}, q);
  check_layout(d_o, fn, "d_o", q.shape(), q);
  if (dq.defined()) check_layout(dq, fn, "dq", q.shape(), q);
  if (dk.defined()) check_layout(dk, fn, "dk", k.shape(), q);
  if (dv.defined()) check_layout(dv, fn, "dv", k.shape(), q);
  if (q.is_cuda()) {
#ifdef LASP_HAVE_CUDA
    return attention_backward_cuda(dq, dk, dv, q, k, v, o, lse, d_o, scale, causal, q_offset);
#else
    LASP_FAIL() << fn << ": got CUDA tensors but lasp was built without CUDA";
#endif
  }
  const DType dt = check_cpu_float(fn, q);
  check_cpu_dtype(k, fn, "k", dt);
  check_cpu_dtype(v, fn, "v", dt);
  check_cpu_dtype(o, fn, "o", dt);
  check_cpu_dtype(lse, fn, "lse", dt);
  check_cpu_dtype(d_o, fn, "d_o", dt);
  check_cpu_dtype(dq, fn, "dq", dt);
  check_cpu_dtype(dk, fn, "dk", dt);
  check_cpu_dtype(dv, fn, "dv", dt);
  if (dt == DType::F32) {
    backward_cpu<float>(dq, dk, dv, q, k, v, o, lse, d_o, scale, causal, q_offset, d);
  } else {
    backward_cpu<double>(dq, dk, dv, q, k, v, o, lse, d_o, scale, causal, q_offset, d);
  }
}

}  // namespace lasp
