#include "parallel/lasp_state_terms.h"

#include <cmath>
#include <vector>

#include "core/profile.h"
#include "parallel/sp_layout.h"

namespace lasp {

namespace {

struct Sizes {
  int64_t B, L, H, D;
};

Sizes sizes_of(const Tensor& x, int64_t row, int64_t n, const char* fn) {
  LASP_CHECK(x.ndim() == 4 && x.is_contiguous()) << fn << ": expected a contiguous [B, L, H, D] tensor, got "
                                                  << x.str();
  LASP_CHECK(row >= 0 && n >= 1 && row + n <= x.dim(1))
      << fn << ": rows [" << row << ", " << row + n << ") out of range for " << x.str();
  return Sizes{x.dim(0), x.dim(1), x.dim(2), x.dim(3)};
}

void check_state(const Tensor& s, const Sizes& z, DType dt, const char* fn, const char* what) {
  LASP_CHECK(s.defined() && s.is_contiguous() && s.shape() == Shape({z.B, z.H, z.D, z.D}) && s.dtype() == dt)
      << fn << ": " << what << " must be a contiguous " << dtype_name(dt) << " [" << z.B << ", " << z.H << ", "
      << z.D << ", " << z.D << "], got " << s.str();
}

void check_decay(const Decay& d, const Sizes& z, DType dt, const char* fn) {
  if (d.mode == DecayMode::Constant) {
    LASP_CHECK(d.per_head.defined() && d.per_head.shape() == Shape({z.H}) && d.per_head.dtype() == dt)
        << fn << ": decay.per_head must be " << dtype_name(dt) << " [" << z.H << "], got " << d.per_head.str();
  } else if (d.mode == DecayMode::DataDependent) {
    LASP_CHECK(d.per_token.defined() && d.per_token.is_contiguous() &&
               d.per_token.shape() == Shape({z.B, z.L, z.H}) && d.per_token.dtype() == dt)
        << fn << ": decay.per_token must be " << dtype_name(dt) << " [" << z.B << ", " << z.L << ", " << z.H
        << "], got " << d.per_token.str();
  }
}

// Cumulative log decays Lambda_t of the chunk (rows row..row+n-1 of the local tensors) for (b, h).
template <typename T>
void chunk_log_cum(std::vector<double>& cum, const Decay& decay, const Sizes& z, int64_t b, int64_t h,
                   int64_t row, int64_t n) {
  cum.resize(static_cast<size_t>(n));
  double c = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (decay.mode == DecayMode::Constant) c += static_cast<double>(decay.per_head.data<T>()[h]);
    else if (decay.mode == DecayMode::DataDependent)
      c += static_cast<double>(decay.per_token.data<T>()[(b * z.L + row + t) * z.H + h]);
    cum[t] = c;
  }
}

template <typename T>
void add_prefix_output_cpu(Tensor& o, const Tensor& q, const Decay& decay, int64_t row, int64_t n,
                           const Tensor& p, const Sizes& z) {
  const int64_t D = z.D, DD = D * D;
  std::vector<double> cum;
  std::vector<T> acc(static_cast<size_t>(D));
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      const T* P = p.data<T>() + (b * z.H + h) * DD;
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((b * z.L + row + t) * z.H + h) * D;
        const T* qt = q.data<T>() + off;
        T* ot = o.data<T>() + off;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t i = 0; i < D; ++i) {  // acc = q_t P (rows of P: axpy, vectorises)
          const T a = qt[i];
          const T* Pi = P + i * D;
          for (int64_t j = 0; j < D; ++j) acc[j] += a * Pi[j];
        }
        const T s = static_cast<T>(std::exp(cum[t]));
        for (int64_t j = 0; j < D; ++j) ot[j] += s * acc[j];
      }
    }
  }
}

template <typename T>
void prefix_state_grad_cpu(Tensor& dp, const Tensor& q, const Tensor& d_o, const Decay& decay, int64_t row,
                           int64_t n, const Sizes& z) {
  const int64_t D = z.D, DD = D * D;
  std::vector<double> cum;
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      T* G = dp.data<T>() + (b * z.H + h) * DD;
      std::fill(G, G + DD, T(0));
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((b * z.L + row + t) * z.H + h) * D;
        const T* qt = q.data<T>() + off;
        const T* dt = d_o.data<T>() + off;
        const T s = static_cast<T>(std::exp(cum[t]));
        for (int64_t i = 0; i < D; ++i) {  // row i of dP += (s q_t[i]) do_t
          const T a = s * qt[i];
          T* Gi = G + i * D;
          for (int64_t j = 0; j < D; ++j) Gi[j] += a * dt[j];
        }
      }
    }
  }
}

template <typename T>
void add_final_state_grads_cpu(Tensor& dk, Tensor& dv, Tensor& dl, const Tensor& k, const Tensor& v,
                               const Decay& decay, int64_t row, int64_t n, const Tensor& p,
                               const Tensor& dm, const Sizes& z) {
  const int64_t D = z.D, DD = D * D;
  const bool want_dlog = dl.defined() && decay.mode == DecayMode::DataDependent;
  std::vector<double> cum;
  std::vector<T> mt(static_cast<size_t>(DD)), u(static_cast<size_t>(D)), w(static_cast<size_t>(D));
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      const T* M = dm.data<T>() + (b * z.H + h) * DD;
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) mt[j * D + i] = M[i * D + j];
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      const double total = cum[n - 1];
      // d log a_u = exp(Lambda_{n-1}) <dM, P> + sum_{s<u} c_s,  c_s = e_s k_s dM v_s^T.
      double base = 0, before = 0;
      if (want_dlog) {
        const T* P = p.data<T>() + (b * z.H + h) * DD;
        double dot = 0;
        for (int64_t i = 0; i < DD; ++i) dot += static_cast<double>(M[i]) * static_cast<double>(P[i]);
        base = std::exp(total) * dot;
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((b * z.L + row + t) * z.H + h) * D;
        const T* kt = k.data<T>() + off;
        const T* vt = v.data<T>() + off;
        std::fill(u.begin(), u.end(), T(0));
        std::fill(w.begin(), w.end(), T(0));
        for (int64_t i = 0; i < D; ++i) {  // u = k_t dM
          const T a = kt[i];
          const T* Mi = M + i * D;
          for (int64_t j = 0; j < D; ++j) u[j] += a * Mi[j];
        }
        for (int64_t j = 0; j < D; ++j) {  // w = v_t dM^T
          const T a = vt[j];
          const T* Mj = mt.data() + j * D;
          for (int64_t i = 0; i < D; ++i) w[i] += a * Mj[i];
        }
        const T e = static_cast<T>(std::exp(total - cum[t]));
        T* dvt = dv.data<T>() + off;
        T* dkt = dk.data<T>() + off;
        for (int64_t j = 0; j < D; ++j) dvt[j] += e * u[j];
        for (int64_t i = 0; i < D; ++i) dkt[i] += e * w[i];
        if (want_dlog) {
          T* g = dl.data<T>() + (b * z.L + row + t) * z.H + h;
          *g += static_cast<T>(base + before);
          double c = 0;
          for (int64_t j = 0; j < D; ++j) c += static_cast<double>(u[j]) * static_cast<double>(vt[j]);
          before += static_cast<double>(e) * c;
        }
      }
    }
  }
}

}  // namespace

void add_prefix_output(Tensor& o, const Tensor& q, const Decay& decay, int64_t row, int64_t n,
                       const Tensor& p, int chunk) {
  ProfileScope prof("lasp2_prefix_output");
  const char* fn = "add_prefix_output";
  const Sizes z = sizes_of(q, row, n, fn);
  LASP_CHECK(o.shape() == q.shape() && o.is_contiguous()) << fn << ": o " << o.str() << " must match q " << q.str();
  if (q.is_cuda()) {
    // o_c = kernel(q_c, k = 0, v = 0, P): exactly diag(exp(Lambda)) q_c P.
    const Tensor qc = seq_rows(q, row, n);
    const Tensor zero = Tensor::zeros(qc.shape(), qc.dtype(), qc.device());
    Tensor oc = Tensor::empty(qc.shape(), o.dtype(), o.device()), none;
    linear_attention_forward(oc, none, qc, zero, zero, decay_rows(decay, row, n), p, chunk);
    add_seq_rows(o, row, oc);
    return;
  }
  check_state(p, z, q.dtype(), fn, "P");
  check_decay(decay, z, q.dtype(), fn);
  LASP_CHECK(o.dtype() == q.dtype()) << fn << ": o and q differ in dtype";
  if (q.dtype() == DType::F64) add_prefix_output_cpu<double>(o, q, decay, row, n, p, z);
  else if (q.dtype() == DType::F32) add_prefix_output_cpu<float>(o, q, decay, row, n, p, z);
  else LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << q.str();
}

void prefix_state_grad(Tensor& dp, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& d_o, const Decay& decay, int64_t row, int64_t n, int chunk) {
  ProfileScope prof("lasp2_prefix_state_grad");
  const char* fn = "prefix_state_grad";
  const Sizes z = sizes_of(q, row, n, fn);
  LASP_CHECK(d_o.shape() == q.shape() && d_o.is_contiguous()) << fn << ": d_o " << d_o.str() << " must match q";
  if (q.is_cuda()) {
    // The kernel's initial-state gradient for d_o alone (its state passes only, no walks).
    Tensor none;
    linear_attention_backward(none, none, none, none, dp, seq_rows(q, row, n), seq_rows(k, row, n),
                              seq_rows(v, row, n), decay_rows(decay, row, n), Tensor(),
                              seq_rows(d_o, row, n), Tensor(), chunk);
    return;
  }
  check_state(dp, z, q.dtype(), fn, "dP");
  check_decay(decay, z, q.dtype(), fn);
  if (q.dtype() == DType::F64) prefix_state_grad_cpu<double>(dp, q, d_o, decay, row, n, z);
  else if (q.dtype() == DType::F32) prefix_state_grad_cpu<float>(dp, q, d_o, decay, row, n, z);
  else LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << q.str();
}

void add_final_state_grads(Tensor& dk, Tensor& dv, Tensor& d_log_decay, const Tensor& q,
                           const Tensor& k, const Tensor& v, const Decay& decay, int64_t row,
                           int64_t n, const Tensor& p, const Tensor& dm, int chunk) {
  ProfileScope prof("lasp2_final_state_grads");
  const char* fn = "add_final_state_grads";
  const Sizes z = sizes_of(k, row, n, fn);
  LASP_CHECK(dk.shape() == k.shape() && dv.shape() == k.shape() && dk.is_contiguous() && dv.is_contiguous())
      << fn << ": dk " << dk.str() << " and dv " << dv.str() << " must match k " << k.str();
  const bool data = decay.mode == DecayMode::DataDependent && d_log_decay.defined();
  if (k.is_cuda()) {
    // The kernel's backward with d_o = 0 and d_final_state = dM: exactly these terms.
    const Tensor qc = seq_rows(q, row, n), kc = seq_rows(k, row, n), vc = seq_rows(v, row, n);
    Tensor dkc = Tensor::empty(kc.shape(), dk.dtype(), dk.device());
    Tensor dvc = Tensor::empty(vc.shape(), dv.dtype(), dv.device());
    Tensor dlc = data ? Tensor::empty({z.B, n, z.H}, d_log_decay.dtype(), d_log_decay.device()) : Tensor();
    Tensor none;
    linear_attention_backward(none, dkc, dvc, dlc, none, qc, kc, vc, decay_rows(decay, row, n), p, Tensor(),
                              dm, chunk);
    add_seq_rows(dk, row, dkc);
    add_seq_rows(dv, row, dvc);
    if (data) add_seq_rows(d_log_decay, row, dlc);
    return;
  }
  check_state(dm, z, k.dtype(), fn, "dM");
  check_decay(decay, z, k.dtype(), fn);
  if (data) {
    check_state(p, z, k.dtype(), fn, "P");
    LASP_CHECK(d_log_decay.shape() == Shape({z.B, z.L, z.H}) && d_log_decay.is_contiguous())
        << fn << ": d_log_decay must be [B, L, H], got " << d_log_decay.str();
  }
  Tensor dl = data ? d_log_decay : Tensor();
  if (k.dtype() == DType::F64) add_final_state_grads_cpu<double>(dk, dv, dl, k, v, decay, row, n, p, dm, z);
  else if (k.dtype() == DType::F32) add_final_state_grads_cpu<float>(dk, dv, dl, k, v, decay, row, n, p, dm, z);
  else LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << k.str();
}

}  // namespace lasp
