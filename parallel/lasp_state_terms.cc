#include "parallel/lasp_state_terms.h"

#include <cmath>
#include <vector>

#include "core/profile.h"
#include "kernels/gemm.h"
#include "parallel/sp_layout.h"

namespace lasp {

namespace {

struct Sizes {
  int64_t B, L, H, D;
};

Sizes sizes_of(const Tensor& x, int64_t row, int64_t n, const char* fn) {
  LASP_CHECK(x.ndim() == 4 && x.is_contiguous())
      << fn << ": expected a contiguous [B, L, H, D] tensor, got " << x.str();
  LASP_CHECK(row >= 0 && n >= 1 && row + n <= x.dim(1))
      << fn << ": rows [" << row << ", " << row + n << ") out of range for " << x.str();
  return Sizes{x.dim(0), x.dim(1), x.dim(2), x.dim(3)};
}

void check_state(const Tensor& s, const Sizes& z, DType dt, const char* fn, const char* what) {
  LASP_CHECK(s.defined() && s.is_contiguous() && s.shape() == Shape({z.B, z.H, z.D, z.D}) &&
             s.dtype() == dt)
      << fn << ": " << what << " must be a contiguous " << dtype_name(dt) << " [" << z.B << ", "
      << z.H << ", " << z.D << ", " << z.D << "], got " << s.str();
}

void check_decay(const Decay& d, const Sizes& z, DType dt, const char* fn) {
  if (d.mode == DecayMode::Constant) {
    LASP_CHECK(d.per_head.defined() && d.per_head.shape() == Shape({z.H}) &&
               d.per_head.dtype() == dt)
        << fn << ": decay.per_head must be " << dtype_name(dt) << " [" << z.H << "], got "
        << d.per_head.str();
  } else if (d.mode == DecayMode::DataDependent) {
    LASP_CHECK(d.per_token.defined() && d.per_token.is_contiguous() &&
               d.per_token.shape() == Shape({z.B, z.L, z.H}) && d.per_token.dtype() == dt)
        << fn << ": decay.per_token must be " << dtype_name(dt) << " [" << z.B << ", " << z.L
        << ", " << z.H << "], got " << d.per_token.str();
  }
}

// Cumulative log decays Lambda_t of the chunk (rows row..row+n-1 of the local tensors) for (b, h).
template <typename T>
void chunk_log_cum(std::vector<double>& cum, const Decay& decay, const Sizes& z, int64_t b,
                   int64_t h, int64_t row, int64_t n) {
  cum.resize(static_cast<size_t>(n));
  double c = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (decay.mode == DecayMode::Constant)
      c += static_cast<double>(decay.per_head.data<T>()[h]);
    else if (decay.mode == DecayMode::DataDependent)
      c += static_cast<double>(decay.per_token.data<T>()[(b * z.L + row + t) * z.H + h]);
    cum[t] = c;
  }
}

// Rows [row, row + n) of head h of batch b of a [B, L, H, D] tensor, copied into a contiguous
// [n, D] tensor (times f[t] per row when f is given), and added back.
template <typename T>
Tensor head_rows(const Tensor& x, const Sizes& z, int64_t b, int64_t h, int64_t row, int64_t n,
                 const std::vector<T>* f = nullptr) {
  Tensor out = Tensor::empty({n, z.D}, x.dtype());
  T* dst = out.data<T>();
  const T* src = x.data<T>() + ((b * z.L + row) * z.H + h) * z.D;
  for (int64_t t = 0; t < n; ++t) {
    const T* s = src + t * z.H * z.D;
    const T a = f ? (*f)[t] : T(1);
    for (int64_t j = 0; j < z.D; ++j) dst[t * z.D + j] = a * s[j];
  }
  return out;
}
template <typename T>
void add_head_rows(Tensor& x, const Tensor& rows, const Sizes& z, int64_t b, int64_t h, int64_t row,
                   int64_t n, const std::vector<T>& f) {
  const T* src = rows.data<T>();
  T* dst = x.data<T>() + ((b * z.L + row) * z.H + h) * z.D;
  for (int64_t t = 0; t < n; ++t) {
    T* d = dst + t * z.H * z.D;
    for (int64_t j = 0; j < z.D; ++j) d[j] += f[t] * src[t * z.D + j];
  }
}

// The [D, D] state of (b, h) in a [B, H, D, D] tensor (a view).
Tensor state_of(const Tensor& s, const Sizes& z, int64_t b, int64_t h) {
  return s.select(0, b).select(0, h);
}

template <typename T>
std::vector<T> exp_of(const std::vector<double>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<T>(std::exp(x[i]));
  return out;
}

// Per (b, h) the terms are small GEMMs (OpenBLAS through gemm()) on contiguous copies of the
// head's rows, as in the CPU kernel.
template <typename T>
void add_prefix_output_cpu(Tensor& o, const Tensor& q, const Decay& decay, int64_t row, int64_t n,
                           const Tensor& p, const Sizes& z) {
  std::vector<double> cum;
  Tensor qp = Tensor::empty({n, z.D}, q.dtype());
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      gemm(qp, head_rows<T>(q, z, b, h, row, n), false, state_of(p, z, b, h), false);  // Q P
      add_head_rows<T>(o, qp, z, b, h, row, n, exp_of<T>(cum));  // o += diag(exp Lambda) Q P
    }
  }
}

template <typename T>
void prefix_state_grad_cpu(Tensor& dp, const Tensor& q, const Tensor& d_o, const Decay& decay,
                           int64_t row, int64_t n, const Sizes& z) {
  std::vector<double> cum;
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      const std::vector<T> s = exp_of<T>(cum);
      Tensor g = state_of(dp, z, b, h);
      gemm(g, head_rows<T>(q, z, b, h, row, n, &s), true, head_rows<T>(d_o, z, b, h, row, n),
           false);
    }
  }
}

template <typename T>
void add_final_state_grads_cpu(Tensor& dk, Tensor& dv, Tensor& dl, const Tensor& k, const Tensor& v,
                               const Decay& decay, int64_t row, int64_t n, const Tensor& p,
                               const Tensor& dm, const Sizes& z) {
  const bool want_dlog = dl.defined() && decay.mode == DecayMode::DataDependent;
  std::vector<double> cum;
  Tensor u = Tensor::empty({n, z.D}, k.dtype()), w = Tensor::empty({n, z.D}, k.dtype());
  for (int64_t b = 0; b < z.B; ++b) {
    for (int64_t h = 0; h < z.H; ++h) {
      chunk_log_cum<T>(cum, decay, z, b, h, row, n);
      const double total = cum[n - 1];
      std::vector<T> ef(cum.size());  // e_t = exp(Lambda_end - Lambda_t) <= 1
      for (size_t t = 0; t < cum.size(); ++t) ef[t] = static_cast<T>(std::exp(total - cum[t]));
      const Tensor m = state_of(dm, z, b, h);
      const Tensor kh = head_rows<T>(k, z, b, h, row, n), vh = head_rows<T>(v, z, b, h, row, n);
      gemm(u, kh, false, m, false);  // U = K dM
      gemm(w, vh, false, m, true);   // W = V dM^T
      add_head_rows<T>(dv, u, z, b, h, row, n, ef);
      add_head_rows<T>(dk, w, z, b, h, row, n, ef);
      if (!want_dlog) continue;
      // d log a_u += exp(Lambda_end) <dM, P> + sum_{s<u} c_s,  c_s = e_s (k_s dM) . v_s
      const T* M = m.data<T>();
      const T* P = state_of(p, z, b, h).data<T>();
      double dot = 0;
      for (int64_t i = 0; i < z.D * z.D; ++i)
        dot += static_cast<double>(M[i]) * static_cast<double>(P[i]);
      const double base = std::exp(total) * dot;
      double before = 0;
      const T* U = u.data<T>();
      const T* V = vh.data<T>();
      for (int64_t t = 0; t < n; ++t) {
        dl.data<T>()[(b * z.L + row + t) * z.H + h] += static_cast<T>(base + before);
        double c = 0;
        for (int64_t j = 0; j < z.D; ++j)
          c += static_cast<double>(U[t * z.D + j]) * static_cast<double>(V[t * z.D + j]);
        before += static_cast<double>(ef[t]) * c;
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
  LASP_CHECK(o.shape() == q.shape() && o.is_contiguous())
      << fn << ": o " << o.str() << " must match q " << q.str();
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
  if (q.dtype() == DType::F64)
    add_prefix_output_cpu<double>(o, q, decay, row, n, p, z);
  else if (q.dtype() == DType::F32)
    add_prefix_output_cpu<float>(o, q, decay, row, n, p, z);
  else
    LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << q.str();
}

void prefix_state_grad(Tensor& dp, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& d_o, const Decay& decay, int64_t row, int64_t n, int chunk) {
  ProfileScope prof("lasp2_prefix_state_grad");
  const char* fn = "prefix_state_grad";
  const Sizes z = sizes_of(q, row, n, fn);
  LASP_CHECK(d_o.shape() == q.shape() && d_o.is_contiguous())
      << fn << ": d_o " << d_o.str() << " must match q";
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
  if (q.dtype() == DType::F64)
    prefix_state_grad_cpu<double>(dp, q, d_o, decay, row, n, z);
  else if (q.dtype() == DType::F32)
    prefix_state_grad_cpu<float>(dp, q, d_o, decay, row, n, z);
  else
    LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << q.str();
}

void add_final_state_grads(Tensor& dk, Tensor& dv, Tensor& d_log_decay, const Tensor& q,
                           const Tensor& k, const Tensor& v, const Decay& decay, int64_t row,
                           int64_t n, const Tensor& p, const Tensor& dm, int chunk) {
  ProfileScope prof("lasp2_final_state_grads");
  const char* fn = "add_final_state_grads";
  const Sizes z = sizes_of(k, row, n, fn);
  LASP_CHECK(dk.shape() == k.shape() && dv.shape() == k.shape() && dk.is_contiguous() &&
             dv.is_contiguous())
      << fn << ": dk " << dk.str() << " and dv " << dv.str() << " must match k " << k.str();
  const bool data = decay.mode == DecayMode::DataDependent && d_log_decay.defined();
  if (k.is_cuda()) {
    // The kernel's backward with d_o = 0 and d_final_state = dM: exactly these terms.
    const Tensor qc = seq_rows(q, row, n), kc = seq_rows(k, row, n), vc = seq_rows(v, row, n);
    Tensor dkc = Tensor::empty(kc.shape(), dk.dtype(), dk.device());
    Tensor dvc = Tensor::empty(vc.shape(), dv.dtype(), dv.device());
    Tensor dlc =
        data ? Tensor::empty({z.B, n, z.H}, d_log_decay.dtype(), d_log_decay.device()) : Tensor();
    Tensor none;
    linear_attention_backward(none, dkc, dvc, dlc, none, qc, kc, vc, decay_rows(decay, row, n), p,
                              Tensor(), dm, chunk);
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
  if (k.dtype() == DType::F64)
    add_final_state_grads_cpu<double>(dk, dv, dl, k, v, decay, row, n, p, dm, z);
  else if (k.dtype() == DType::F32)
    add_final_state_grads_cpu<float>(dk, dv, dl, k, v, decay, row, n, p, dm, z);
  else
    LASP_FAIL() << fn << ": CPU path takes fp32 or fp64, got " << k.str();
}

}  // namespace lasp
