// CPU implementations of kernels/ops.h.
#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/profile.h"
#include "kernels/dispatch.h"
#include "kernels/gemm.h"

namespace lasp {

// CUDA implementations (kernels/ops.cu), same arguments as the public functions.
#ifdef LASP_HAVE_CUDA
void rmsnorm_forward_cuda(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, float eps, int64_t group,
                          const Tensor& residual, Tensor* sum);
void rmsnorm_backward_cuda(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                           const Tensor& rstd, int64_t group, const Tensor& d_residual);
void swiglu_forward_cuda(Tensor& h, const Tensor& gate, const Tensor& up, Tensor* h_amax);
void swiglu_backward_cuda(Tensor& d_gate, Tensor& d_up, const Tensor& dh, const Tensor& gate, const Tensor& up,
                          Tensor* d_gate_amax, Tensor* d_up_amax);
void activation_forward_cuda(Tensor& y, const Tensor& x, Activation f, float scale);
void activation_backward_cuda(Tensor& dx, const Tensor& dy, const Tensor& x, Activation f, float scale);
void rope_rotate_cuda(Tensor& x, const std::vector<int64_t>& positions, float theta, float sign);
void embedding_forward_cuda(Tensor& out, const Tensor& table, const Tensor& tokens);
void embedding_backward_cuda(Tensor& d_table, const Tensor& d_out, const Tensor& tokens);
void bias_add_cuda(Tensor& y, const Tensor& b);
void bias_backward_cuda(Tensor& db, const Tensor& dy);
void adamw_update_cuda(Tensor& w, Tensor& w_compute, const Tensor& g, Tensor& m, Tensor& v, float lr,
                       float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                       float grad_scale);
void cast_cuda(Tensor& dst, const Tensor& src);
void add_inplace_cuda(Tensor& y, const Tensor& x, float alpha);
void scale_inplace_cuda(Tensor& y, float alpha);
double sum_of_squares_cuda(const Tensor& x);
bool all_finite_cuda(const Tensor& x);
#define LASP_ON_CUDA(t, call) \
  if ((t).defined() && (t).is_cuda()) return call
#else
#define LASP_ON_CUDA(t, call) \
  LASP_CHECK(!(t).defined() || !(t).is_cuda()) << "this build of lasp has no CUDA support"
#endif

namespace {

void check_cpu(const Tensor& t, const char* what) {
  LASP_CHECK(t.defined()) << what << ": undefined tensor";
  LASP_CHECK(t.device().is_cpu()) << what << ": this op has no CUDA implementation yet, got " << t.str();
  LASP_CHECK(t.is_contiguous()) << what << ": expected a contiguous tensor, got " << t.str();
}

void check_like(const Tensor& a, const Tensor& b, const char* what) {
  check_cpu(a, what);
  check_cpu(b, what);
  LASP_CHECK(a.shape() == b.shape() && a.dtype() == b.dtype())
      << what << ": tensors differ: " << a.str() << " vs " << b.str();
}

template <typename T>
T sigmoid(T x) {
  return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}

}  // namespace

// ---------------------------------------------------------------- RMSNorm
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, float eps,
                     int64_t group) {
  LASP_PROFILE_SCOPE("rmsnorm_forward");
  LASP_ON_CUDA(x, rmsnorm_forward_cuda(y, rstd, x, w, eps, group, Tensor(), nullptr));
  check_like(y, x, "rmsnorm_forward");
  const int64_t C = x.dim(-1), N = x.numel() / C;
  if (group == 0) group = C;
  LASP_CHECK(C % group == 0) << "rmsnorm_forward: " << C << " features not divisible by group " << group;
  const int64_t G = C / group;
  check_tensor(rstd, "rmsnorm_forward: rstd", x.dtype(), {N, G});
  if (w.defined()) check_tensor(w, "rmsnorm_forward: w", x.dtype(), {C});
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "rmsnorm_forward", T, {
    const T* xp = x.data<T>();
    const T* wp = w.defined() ? w.data<T>() : nullptr;
    T* yp = y.data<T>();
    T* rp = rstd.data<T>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const T* xr = xp + n * C + g * group;
        T* yr = yp + n * C + g * group;
        double ss = 0;
        for (int64_t i = 0; i < group; ++i) ss += double(xr[i]) * xr[i];
        const T r = T(1.0 / std::sqrt(ss / group + eps));
        rp[n * G + g] = r;
        for (int64_t i = 0; i < group; ++i) yr[i] = xr[i] * r * (wp ? wp[g * group + i] : T(1));
      }
    }
  });
}

void residual_rmsnorm_forward(Tensor& sum, Tensor& y, Tensor& rstd, const Tensor& x,
                              const Tensor& residual, const Tensor& w, float eps, int64_t group) {
  LASP_PROFILE_SCOPE("residual_rmsnorm_forward");
  LASP_ON_CUDA(x, rmsnorm_forward_cuda(y, rstd, x, w, eps, group, residual, &sum));
  check_like(sum, x, "residual_rmsnorm_forward");
  check_like(residual, x, "residual_rmsnorm_forward");
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "residual_rmsnorm_forward", T, {
    const T* a = x.data<T>();
    const T* b = residual.data<T>();
    T* s = sum.data<T>();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) s[i] = a[i] + b[i];
  });
  rmsnorm_forward(y, rstd, sum, w, eps, group);
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, int64_t group, const Tensor& d_residual) {
  LASP_PROFILE_SCOPE("rmsnorm_backward");
  LASP_ON_CUDA(x, rmsnorm_backward_cuda(dx, dw, dy, x, w, rstd, group, d_residual));
  check_like(dx, x, "rmsnorm_backward");
  check_like(dy, x, "rmsnorm_backward");
  if (d_residual.defined()) check_like(d_residual, x, "rmsnorm_backward: d_residual");
  const int64_t C = x.dim(-1), N = x.numel() / C;
  if (group == 0) group = C;
  const int64_t G = C / group;
  check_tensor(rstd, "rmsnorm_backward: rstd", x.dtype(), {N, G});
  if (dw.defined()) check_tensor(dw, "rmsnorm_backward: dw", x.dtype(), {C});
  // With xhat = x * r: dx = r * (g - xhat * mean(g * xhat)), g = dy * w.
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "rmsnorm_backward", T, {
    const T* xp = x.data<T>();
    const T* dyp = dy.data<T>();
    const T* wp = w.defined() ? w.data<T>() : nullptr;
    const T* rp = rstd.data<T>();
    const T* drp = d_residual.defined() ? d_residual.data<T>() : nullptr;
    T* dxp = dx.data<T>();
    T* dwp = dw.defined() ? dw.data<T>() : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t o = n * C + g * group;
        const T r = rp[n * G + g];
        double dot = 0;
        for (int64_t i = 0; i < group; ++i) {
          const T gi = dyp[o + i] * (wp ? wp[g * group + i] : T(1));
          dot += double(gi) * xp[o + i] * r;
          if (dwp) dwp[g * group + i] += dyp[o + i] * xp[o + i] * r;
        }
        const T m = T(dot / group);
        for (int64_t i = 0; i < group; ++i) {
          const T gi = dyp[o + i] * (wp ? wp[g * group + i] : T(1));
          dxp[o + i] = r * (gi - xp[o + i] * r * m) + (drp ? drp[o + i] : T(0));
        }
      }
    }
  });
}

// ---------------------------------------------------------------- gated units
void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up, Tensor* h_amax) {
  LASP_PROFILE_SCOPE("swiglu_forward");
  LASP_ON_CUDA(gate, swiglu_forward_cuda(h, gate, up, h_amax));
  LASP_CHECK(h_amax == nullptr) << "swiglu_forward: the amax output is for CUDA tensors only";
  check_like(h, gate, "swiglu_forward");
  check_like(up, gate, "swiglu_forward");
  LASP_DISPATCH_CPU_FLOAT(gate.dtype(), "swiglu_forward", T, {
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    T* o = h.data<T>();
    for (int64_t i = 0, n = gate.numel(); i < n; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
  });
}

void swiglu_backward(Tensor& d_gate, Tensor& d_up, const Tensor& dh, const Tensor& gate,
                     const Tensor& up, Tensor* d_gate_amax, Tensor* d_up_amax) {
  LASP_PROFILE_SCOPE("swiglu_backward");
  LASP_ON_CUDA(gate, swiglu_backward_cuda(d_gate, d_up, dh, gate, up, d_gate_amax, d_up_amax));
  LASP_CHECK(d_gate_amax == nullptr && d_up_amax == nullptr)
      << "swiglu_backward: the amax outputs are for CUDA tensors only";
  check_like(d_gate, gate, "swiglu_backward");
  check_like(d_up, gate, "swiglu_backward");
  check_like(dh, gate, "swiglu_backward");
  LASP_DISPATCH_CPU_FLOAT(gate.dtype(), "swiglu_backward", T, {
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    const T* d = dh.data<T>();
    T* dg = d_gate.data<T>();
    T* du = d_up.data<T>();
    for (int64_t i = 0, n = gate.numel(); i < n; ++i) {
      const T s = sigmoid(g[i]);
      du[i] = d[i] * g[i] * s;
      dg[i] = d[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));  // d silu = s (1 + x (1 - s))
    }
  });
}

// ---------------------------------------------------------------- pointwise
void activation_forward(Tensor& y, const Tensor& x, Activation f, float scale) {
  LASP_PROFILE_SCOPE("activation_forward");
  LASP_ON_CUDA(x, activation_forward_cuda(y, x, f, scale));
  check_like(y, x, "activation_forward");
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "activation_forward", T, {
    const T* xp = x.data<T>();
    T* yp = y.data<T>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) {
      const T v = xp[i];
      switch (f) {
        case Activation::Silu: yp[i] = v * sigmoid(v); break;
        case Activation::Relu: yp[i] = v > 0 ? v : T(0); break;
        case Activation::Elu1: yp[i] = v > 0 ? v + T(1) : std::exp(v); break;
        // log sigmoid(v) = -log(1 + e^-v), computed stably on both sides.
        case Activation::LogSigmoid:
          yp[i] = T(scale) * (v >= 0 ? -std::log1p(std::exp(-v)) : v - std::log1p(std::exp(v)));
          break;
      }
    }
  });
}

void activation_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Activation f, float scale) {
  LASP_PROFILE_SCOPE("activation_backward");
  LASP_ON_CUDA(x, activation_backward_cuda(dx, dy, x, f, scale));
  check_like(dx, x, "activation_backward");
  check_like(dy, x, "activation_backward");
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "activation_backward", T, {
    const T* xp = x.data<T>();
    const T* dyp = dy.data<T>();
    T* dxp = dx.data<T>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) {
      const T v = xp[i];
      T d = 0;
      switch (f) {
        case Activation::Silu: {
          const T s = sigmoid(v);
          d = s * (T(1) + v * (T(1) - s));
          break;
        }
        case Activation::Relu: d = v > 0 ? T(1) : T(0); break;
        case Activation::Elu1: d = v > 0 ? T(1) : std::exp(v); break;
        case Activation::LogSigmoid: d = T(scale) * sigmoid(-v); break;
      }
      dxp[i] = dyp[i] * d;
    }
  });
}

// ---------------------------------------------------------------- RoPE
namespace {
void rope_rotate(Tensor& x, const std::vector<int64_t>& positions, float theta, double sign) {
  LASP_PROFILE_SCOPE("rope");
  LASP_ON_CUDA(x, rope_rotate_cuda(x, positions, theta, static_cast<float>(sign)));
  check_cpu(x, "rope");
  LASP_CHECK(x.ndim() == 4) << "rope: expected [B, T, H, D], got " << x.str();
  const int64_t B = x.dim(0), T_ = x.dim(1), H = x.dim(2), D = x.dim(3);
  LASP_CHECK(D % 2 == 0) << "rope: head dim must be even, got " << D;
  LASP_CHECK_EQ(static_cast<int64_t>(positions.size()), T_) << "rope: one position per token";
  const int64_t half = D / 2;
  std::vector<double> cs(static_cast<size_t>(T_ * half)), sn(cs.size());
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double ang = positions[t] * std::pow(double(theta), -2.0 * i / D);
      cs[t * half + i] = std::cos(ang);
      sn[t * half + i] = sign * std::sin(ang);
    }
  }
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "rope", T, {
    T* p = x.data<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t h = 0; h < H; ++h) {
          T* r = p + ((b * T_ + t) * H + h) * D;
          for (int64_t i = 0; i < half; ++i) {
            const T c = T(cs[t * half + i]), s = T(sn[t * half + i]);
            const T a = r[i], bb = r[i + half];
            r[i] = a * c - bb * s;
            r[i + half] = a * s + bb * c;
          }
        }
  });
}
}  // namespace

void rope_forward(Tensor& x, const std::vector<int64_t>& positions, float theta) {
  rope_rotate(x, positions, theta, 1.0);
}
// The rotation is orthogonal, so its gradient is the inverse rotation.
void rope_backward(Tensor& dx, const std::vector<int64_t>& positions, float theta) {
  rope_rotate(dx, positions, theta, -1.0);
}

// ---------------------------------------------------------------- embedding
void embedding_forward(Tensor& out, const Tensor& table, const Tensor& tokens) {
  LASP_PROFILE_SCOPE("embedding_forward");
  LASP_ON_CUDA(table, embedding_forward_cuda(out, table, tokens));
  check_cpu(out, "embedding_forward");
  check_cpu(table, "embedding_forward");
  check_cpu(tokens, "embedding_forward");
  const int64_t V = table.dim(0), C = table.dim(1), N = tokens.numel();
  check_tensor(out, "embedding_forward: out", table.dtype(), {N, C});
  const int32_t* tok = tokens.data<int32_t>();
  LASP_DISPATCH_CPU_FLOAT(table.dtype(), "embedding_forward", T, {
    const T* tp = table.data<T>();
    T* op = out.data<T>();
    for (int64_t n = 0; n < N; ++n) {
      LASP_CHECK(tok[n] >= 0 && tok[n] < V) << "embedding_forward: token " << tok[n] << " at position " << n
                                            << " is outside the vocabulary [0, " << V << ")";
      std::copy(tp + tok[n] * C, tp + (tok[n] + 1) * C, op + n * C);
    }
  });
}

void embedding_backward(Tensor& d_table, const Tensor& d_out, const Tensor& tokens) {
  LASP_PROFILE_SCOPE("embedding_backward");
  LASP_ON_CUDA(d_table, embedding_backward_cuda(d_table, d_out, tokens));
  check_cpu(d_table, "embedding_backward");
  const int64_t C = d_table.dim(1), N = tokens.numel();
  check_tensor(d_out, "embedding_backward: d_out", d_table.dtype(), {N, C});
  const int32_t* tok = tokens.data<int32_t>();
  LASP_DISPATCH_CPU_FLOAT(d_table.dtype(), "embedding_backward", T, {
    T* dt = d_table.data<T>();
    const T* dp = d_out.data<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) dt[tok[n] * C + c] += dp[n * C + c];
  });
}

// ---------------------------------------------------------------- bias
void bias_add(Tensor& y, const Tensor& b) {
  LASP_PROFILE_SCOPE("bias_add");
  LASP_ON_CUDA(y, bias_add_cuda(y, b));
  check_cpu(y, "bias_add");
  const int64_t C = y.dim(-1), N = y.numel() / C;
  check_tensor(b, "bias_add: b", y.dtype(), {C});
  LASP_DISPATCH_CPU_FLOAT(y.dtype(), "bias_add", T, {
    T* yp = y.data<T>();
    const T* bp = b.data<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) yp[n * C + c] += bp[c];
  });
}

void bias_backward(Tensor& db, const Tensor& dy) {
  LASP_PROFILE_SCOPE("bias_backward");
  LASP_ON_CUDA(dy, bias_backward_cuda(db, dy));
  check_cpu(dy, "bias_backward");
  const int64_t C = dy.dim(-1), N = dy.numel() / C;
  check_tensor(db, "bias_backward: db", dy.dtype(), {C});
  LASP_DISPATCH_CPU_FLOAT(dy.dtype(), "bias_backward", T, {
    T* dp = db.data<T>();
    const T* gp = dy.data<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) dp[c] += gp[n * C + c];
  });
}

// ---------------------------------------------------------------- vectors
void add_inplace(Tensor& y, const Tensor& x, float alpha) {
  LASP_PROFILE_SCOPE("add_inplace");
  LASP_ON_CUDA(y, add_inplace_cuda(y, x, alpha));
  check_like(y, x, "add_inplace");
  LASP_DISPATCH_CPU_FLOAT(y.dtype(), "add_inplace", T, {
    T* yp = y.data<T>();
    const T* xp = x.data<T>();
    for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] += T(alpha) * xp[i];
  });
}

void scale_inplace(Tensor& y, float alpha) {
  LASP_PROFILE_SCOPE("scale_inplace");
  LASP_ON_CUDA(y, scale_inplace_cuda(y, alpha));
  check_cpu(y, "scale_inplace");
  LASP_DISPATCH_CPU_FLOAT(y.dtype(), "scale_inplace", T, {
    T* yp = y.data<T>();
    for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] *= T(alpha);
  });
}

double sum_of_squares(const Tensor& x) {
  LASP_PROFILE_SCOPE("sum_of_squares");
  LASP_ON_CUDA(x, sum_of_squares_cuda(x));
  check_cpu(x, "sum_of_squares");
  double s = 0;
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "sum_of_squares", T, {
    const T* p = x.data<T>();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) s += double(p[i]) * p[i];
  });
  return s;
}

bool all_finite(const Tensor& x) {
  LASP_PROFILE_SCOPE("all_finite");
  LASP_ON_CUDA(x, all_finite_cuda(x));
  check_cpu(x, "all_finite");
  bool ok = true;
  LASP_DISPATCH_CPU_FLOAT(x.dtype(), "all_finite", T, {
    const T* p = x.data<T>();
    for (int64_t i = 0, n = x.numel(); i < n && ok; ++i) ok = std::isfinite(p[i]);
  });
  return ok;
}

// ---------------------------------------------------------------- AdamW, cast
void adamw_update(Tensor& w, Tensor& w_compute, const Tensor& g, Tensor& m, Tensor& v, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float c1, float c2,
                  float grad_scale) {
  LASP_PROFILE_SCOPE("adamw_update");
  LASP_ON_CUDA(w, adamw_update_cuda(w, w_compute, g, m, v, lr, beta1, beta2, eps, weight_decay, c1, c2, grad_scale));
  check_like(g, w, "adamw_update");
  check_like(m, w, "adamw_update");
  check_like(v, w, "adamw_update");
  LASP_DISPATCH_CPU_FLOAT(w.dtype(), "adamw_update", T, {
    T* wp = w.data<T>();
    const T* gp = g.data<T>();
    T* mp = m.data<T>();
    T* vp = v.data<T>();
    for (int64_t j = 0, n = w.numel(); j < n; ++j) {
      const T gj = gp[j] * T(grad_scale);
      mp[j] = T(beta1 * mp[j] + (1 - beta1) * gj);
      vp[j] = T(beta2 * vp[j] + (1 - beta2) * double(gj) * gj);
      const double update = (mp[j] / c1) / (std::sqrt(vp[j] / c2) + eps) + weight_decay * double(wp[j]);
      wp[j] = T(wp[j] - double(lr) * update);
    }
  });
  if (w_compute.defined()) w_compute.copy_from(w);
}

void cast(Tensor& dst, const Tensor& src) {
  LASP_PROFILE_SCOPE("cast");
  LASP_ON_CUDA(dst, cast_cuda(dst, src));
  LASP_CHECK(dst.shape() == src.shape()) << "cast: " << src.str() << " -> " << dst.str();
  dst.copy_from(src);
}

}  // namespace lasp
