// Kernel benchmark (see bench_kernels.h). Inputs are random bf16 (a 16 Mi-element random block
// tiled over each tensor: never zeros, which run faster than real data), and every tensor is far
// larger than L2, so repeated runs measure HBM, not the cache.
#include "launch/bench_kernels.h"
#include "launch/bench_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/log.h"
#include "core/profile.h"
#include "core/tensor.h"
#include "kernels/attention.h"
#include "kernels/attention_cudnn.h"
#include "kernels/gemm.h"
#include "kernels/linear_attention.h"

#ifdef LASP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace lasp {

#ifndef LASP_HAVE_CUDA

int bench_kernels_main(int, char**) {
  std::fprintf(stderr,
               "lasp bench kernels: this build has no CUDA backend (configure with -DLASP_CUDA=ON "
               "on a machine with nvcc); nothing to measure\n");
  return 2;
}

#else

namespace {

constexpr double kBf16PeakFlops = 790e12;  // measured dense bf16 rate on an H200 (KINDS.md)

#define BENCH_CUDA(expr)                                                                  \
  do {                                                                                    \
    cudaError_t e_ = (expr);                                                              \
    LASP_CHECK(e_ == cudaSuccess) << #expr << ": " << cudaGetErrorString(e_);            \
  } while (0)

struct Options {
  std::string csv;
  std::string only;  // "", or "gemm", "linear", "attention" or a comma-separated list: just those tables
  int iters = 10, warmup = 3;
  bool quick = false;
};

struct Row {
  std::string op, shape;
  double ms, floor_ms;
};

double time_ms(const std::function<void()>& fn, const Options& opt) {
  return median_event_ms(fn, opt.iters, opt.warmup);
}

// A random bf16 tensor on the GPU: one random block, tiled.
Tensor random_bf16(const Shape& shape, double stddev, uint32_t seed) {
  return random_bf16_cuda(shape, stddev, seed);
}

Tensor random_f32(const Shape& shape, float lo, float hi, uint32_t seed) {
  Tensor h = Tensor::empty(shape, DType::F32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  float* p = h.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i) p[i] = dist(rng);
  return h.to(cuda());
}

double measure_bandwidth(const Options& opt) {
  const size_t bytes = size_t{2} << 30;  // 2 GiB each way
  Tensor src = Tensor::empty({static_cast<int64_t>(bytes)}, DType::U8, cuda());
  Tensor dst = Tensor::empty({static_cast<int64_t>(bytes)}, DType::U8, cuda());
  BENCH_CUDA(cudaMemset(src.raw(), 1, bytes));
  auto stream = static_cast<cudaStream_t>(current_stream().handle);
  const double ms = time_ms(
      [&] { BENCH_CUDA(cudaMemcpyAsync(dst.raw(), src.raw(), bytes, cudaMemcpyDeviceToDevice, stream)); },
      opt);
  return 2.0 * bytes / (ms * 1e-3);
}

void print_table(const char* title, const std::vector<Row>& rows, const char* floor_what) {
  std::printf("\n%s (floor: %s)\n", title, floor_what);
  std::printf("%-34s %-30s %10s %10s %8s\n", "op", "shape", "time_ms", "floor_ms", "ratio");
  for (const Row& r : rows)
    std::printf("%-34s %-30s %10.3f %10.3f %8.2f\n", r.op.c_str(), r.shape.c_str(), r.ms, r.floor_ms,
                r.ms / r.floor_ms);
  std::fflush(stdout);
}

std::vector<Row> bench_gemm(const Options& opt) {
  // The 1B model's projections in the three layouts of a training step, y = x W^T (forward),
  // dx = dy W (dgrad) and dW += dy^T x into the fp32 master gradient (wgrad).
  enum class Kind { Fwd, Dgrad, Wgrad };
  struct G {
    int64_t m, n, k;  // forward problem: y[m, n] = x[m, k] W[n, k]^T
    Kind kind;
    const char* what;
  };
  std::vector<G> shapes = {{8192, 8192, 8192, Kind::Fwd, "square"},
                           {16384, 2048, 2048, Kind::Fwd, "1B attn proj 2048->2048"},
                           {16384, 6144, 2048, Kind::Fwd, "1B fused q/k/v 2048->6144"},
                           {16384, 8192, 2048, Kind::Fwd, "1B mlp up 2048->8192"},
                           {16384, 2048, 8192, Kind::Fwd, "1B mlp down 8192->2048"},
                           {16384, 2048, 2048, Kind::Dgrad, "1B attn proj dgrad"},
                           {16384, 6144, 2048, Kind::Dgrad, "1B fused q/k/v dgrad"},
                           {16384, 8192, 2048, Kind::Dgrad, "1B mlp up dgrad"},
                           {16384, 2048, 8192, Kind::Dgrad, "1B mlp down dgrad"},
                           {16384, 2048, 2048, Kind::Wgrad, "1B attn proj wgrad fp32+="},
                           {16384, 6144, 2048, Kind::Wgrad, "1B fused q/k/v wgrad fp32+="},
                           {16384, 8192, 2048, Kind::Wgrad, "1B mlp up wgrad fp32+="},
                           {16384, 2048, 8192, Kind::Wgrad, "1B mlp down wgrad fp32+="}};
  if (opt.quick) shapes[0] = {4096, 4096, 4096, Kind::Fwd, "square"};
  std::vector<Row> rows;
  uint32_t seed = 1;
  for (const G& g : shapes) {
    Tensor x = random_bf16({g.m, g.k}, 1.0, seed++), w = random_bf16({g.n, g.k}, 0.02, seed++);
    Tensor dy = random_bf16({g.m, g.n}, 1.0, seed++);
    Tensor y = Tensor::empty({g.m, g.n}, DType::BF16, cuda()), dx = Tensor::empty({g.m, g.k}, DType::BF16, cuda());
    Tensor dw = Tensor::zeros({g.n, g.k}, DType::F32, cuda());
    auto run = [&] {
      switch (g.kind) {
        case Kind::Fwd: gemm(y, x, false, w, true); break;
        case Kind::Dgrad: gemm(dx, dy, false, w, false); break;
        case Kind::Wgrad: gemm(dw, dy, true, x, false, 1.0f, 1.0f); break;
      }
    };
    const double ms = time_ms(run, opt);
    const double flops = 2.0 * g.m * g.n * g.k;
    char shape[96];
    std::snprintf(shape, sizeof shape, "%ldx%ldx%ld", static_cast<long>(g.m), static_cast<long>(g.n),
                  static_cast<long>(g.k));
    rows.push_back({std::string("gemm bf16 ") + g.what, shape, ms, flops / kBf16PeakFlops * 1e3});
    std::printf("  gemm %s %s: %.3f ms, %.0f TFLOP/s\n", g.what, shape, ms, flops / (ms * 1e-3) / 1e12);
  }
  return rows;
}

std::vector<Row> bench_linear_attention(const Options& opt, double bandwidth) {
  std::vector<int64_t> lengths = {8192, 65536, 262144};
  if (opt.quick) lengths = {8192, 65536};
  const int64_t B = 1, H = 16, D = 128;
  std::vector<Row> rows;
  for (int64_t T : lengths) {
    const Shape x{B, T, H, D};
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    Tensor q = random_bf16(x, scale, 11), k = random_bf16(x, scale, 12), v = random_bf16(x, 1.0, 13);
    Tensor d_o = random_bf16(x, 1.0, 14);
    Tensor o = Tensor::empty(x, DType::BF16, cuda()), fs;
    Tensor dq = Tensor::empty(x, DType::BF16, cuda()), dk = Tensor::empty(x, DType::BF16, cuda()),
           dv = Tensor::empty(x, DType::BF16, cuda());
    const double tensor_bytes = static_cast<double>(B * T * H * D) * 2;
    for (DecayMode mode : {DecayMode::Constant, DecayMode::DataDependent}) {
      Decay decay;
      decay.mode = mode;
      Tensor dlog, dinit;
      double decay_bytes = 0;
      if (mode == DecayMode::Constant) decay.per_head = random_f32({H}, -0.1f, -0.001f, 21);
      if (mode == DecayMode::DataDependent) {
        decay.per_token = random_f32({B, T, H}, -0.1f, 0.0f, 22);
        dlog = Tensor::empty({B, T, H}, DType::F32, cuda());
        decay_bytes = static_cast<double>(B * T * H) * 4;
      }
      const Tensor none;
      // Forward, forward + backward, and the same with the forward's segment states kept for the
      // backward (LinearAttentionSaved), measured in interleaved rounds (median of --iters each).
      LinearAttentionSaved saved;
      const std::vector<double> ms = median_event_ms_interleaved(
          {[&] { linear_attention_forward(o, fs, q, k, v, decay, none); },
           [&] {
             linear_attention_forward(o, fs, q, k, v, decay, none);
             linear_attention_backward(dq, dk, dv, dlog, dinit, q, k, v, decay, none, d_o, none);
           },
           [&] {
             linear_attention_forward(o, fs, q, k, v, decay, none, 64, &saved);
             linear_attention_backward(dq, dk, dv, dlog, dinit, q, k, v, decay, none, d_o, none, 64, &saved);
           }},
          opt.iters, opt.warmup);
      const double fwd = ms[0], fwdbwd = ms[1], fwdbwd_saved = ms[2];
      char shape[96];
      std::snprintf(shape, sizeof shape, "B=%ld T=%ld H=%ld D=%ld", static_cast<long>(B),
                    static_cast<long>(T), static_cast<long>(H), static_cast<long>(D));
      const std::string name = std::string("linear_attention ") + decay_mode_name(mode);
      // Floors: fwd moves q, k, v, o once; fwd+bwd moves q, k, v, o, dO, dq, dk, dv once
      // (plus the per-token decays and their gradient).
      rows.push_back({name + " fwd", shape, fwd, (4 * tensor_bytes + decay_bytes) / bandwidth * 1e3});
      rows.push_back({name + " fwd+bwd", shape, fwdbwd,
                      (8 * tensor_bytes + 2 * decay_bytes) / bandwidth * 1e3});
      rows.push_back({name + " fwd+bwd saved", shape, fwdbwd_saved,
                      (8 * tensor_bytes + 2 * decay_bytes) / bandwidth * 1e3});
      std::printf("  %s %s: fwd %.3f ms, fwd+bwd %.3f ms, fwd+bwd with saved states %.3f ms\n",
                  name.c_str(), shape, fwd, fwdbwd, fwdbwd_saved);
    }
  }
  return rows;
}

// Sets LASP_ATTENTION for its lifetime (the attention path, kernels/attention_cudnn.h), then
// restores it.
class ScopedAttentionPath {
 public:
  explicit ScopedAttentionPath(const char* value) {
    const char* old = std::getenv("LASP_ATTENTION");
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv("LASP_ATTENTION", value, 1);
  }
  ~ScopedAttentionPath() {
    if (had_) setenv("LASP_ATTENTION", old_.c_str(), 1);
    else unsetenv("LASP_ATTENTION");
  }

 private:
  bool had_ = false;
  std::string old_;
};

// Causal softmax attention, B=1, H=16, D=128, on each path: cuDNN's fused flash attention (when
// built in) and our WMMA kernel. FLOP convention (also scripts/bench_sdpa.py's, which times
// PyTorch's scaled_dot_product_attention on the same shapes): forward 2 B H T^2 D (the causal half
// of 4 B H T^2 D), backward 2.5x that, fwd+bwd 3.5x. Floor: those FLOPs at the 790 TFLOP/s bf16
// peak; the target is 85% of SDPA's TFLOP/s.
std::vector<Row> bench_attention(const Options& opt) {
  std::vector<Row> rows;
  const int64_t B = 1, H = 16, D = 128;
  std::vector<int64_t> lengths = {8192, 32768};
  if (!opt.quick) lengths.push_back(65536);
  std::vector<const char*> paths;
  if (cudnn_attention_built()) paths.push_back("cudnn");
  paths.push_back("own");
  std::printf("  softmax attention paths: %s; %s\n", cudnn_attention_built() ? "cudnn, own" : "own",
              cudnn_attention_version().c_str());
  for (int64_t T : lengths) {
    const Shape x = {B, T, H, D};
    Tensor q = random_bf16(x, 1.0, 31), k = random_bf16(x, 1.0, 32), v = random_bf16(x, 1.0, 33);
    Tensor d_o = random_bf16(x, 1.0, 34);
    Tensor o = Tensor::empty(x, DType::BF16, cuda()), lse = Tensor::empty({B, H, T}, DType::F32, cuda());
    Tensor dq = Tensor::empty(x, DType::BF16, cuda()), dk = Tensor::empty(x, DType::BF16, cuda()),
           dv = Tensor::empty(x, DType::BF16, cuda());
    const float scale = static_cast<float>(1.0 / std::sqrt(double(D)));
    const double fwd_flops = 2.0 * double(T) * double(T) * D * H * B;  // causal: half of 4 T^2 D
    char shape[96];
    std::snprintf(shape, sizeof shape, "B=%ld T=%ld H=%ld D=%ld", static_cast<long>(B), static_cast<long>(T),
                  static_cast<long>(H), static_cast<long>(D));
    for (const char* path : paths) {
      ScopedAttentionPath use(path);
      const double fwd = time_ms([&] { attention_forward(o, lse, q, k, v, scale, true); }, opt);
      const double bwd =
          time_ms([&] { attention_backward(dq, dk, dv, q, k, v, o, lse, d_o, scale, true); }, opt);
      const std::string tag = std::string(" [") + path + "]";
      rows.push_back({"attention causal fwd" + tag, shape, fwd, fwd_flops / kBf16PeakFlops * 1e3});
      rows.push_back({"attention causal fwd+bwd" + tag, shape, fwd + bwd, 3.5 * fwd_flops / kBf16PeakFlops * 1e3});
      std::printf("  attention causal %s %s: fwd %.3f ms (%.0f TFLOP/s), bwd %.3f ms (%.0f TFLOP/s), fwd+bwd %.3f ms "
                  "(%.0f TFLOP/s)\n",
                  path, shape, fwd, fwd_flops / fwd / 1e9, bwd, 2.5 * fwd_flops / bwd / 1e9, fwd + bwd,
                  3.5 * fwd_flops / (fwd + bwd) / 1e9);
      std::fflush(stdout);
    }
  }
  return rows;
}

}  // namespace

int bench_kernels_main(int argc, char** argv) {
  Options opt;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      LASP_CHECK(i + 1 < argc) << "bench kernels: " << flag << " needs a value";
      return argv[++i];
    };
    if (a == "--csv") opt.csv = value("--csv");
    else if (a == "--iters") opt.iters = std::stoi(value("--iters"));
    else if (a == "--warmup") opt.warmup = std::stoi(value("--warmup"));
    else if (a == "--quick") opt.quick = true;
    else if (a == "--only") opt.only = value("--only");
    else if (a == "kernels" || a == "bench") continue;
    else LASP_FAIL() << "bench kernels: unknown argument '" << a
                     << "' (expected --csv PATH, --iters N, --warmup N, --quick, --only SECTION)";
  }
  LASP_CHECK(opt.iters >= 1 && opt.warmup >= 0) << "bench kernels: --iters must be >= 1";
  // --only takes one section or a comma-separated list of them.
  std::vector<std::string> sections;
  for (size_t start = 0; !opt.only.empty() && start <= opt.only.size();) {
    const size_t comma = std::min(opt.only.find(',', start), opt.only.size());
    sections.push_back(opt.only.substr(start, comma - start));
    LASP_CHECK(sections.back() == "gemm" || sections.back() == "linear" || sections.back() == "attention")
        << "bench kernels: --only " << opt.only << ": expected gemm, linear or attention (or a comma-separated list)";
    start = comma + 1;
  }
  const auto want = [&](const char* section) {
    return sections.empty() || std::find(sections.begin(), sections.end(), section) != sections.end();
  };
  if (!cuda_available()) {
    std::fprintf(stderr, "lasp bench kernels: no CUDA device visible; nothing to measure\n");
    return 2;
  }
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  const double bw = measure_bandwidth(opt);
  std::printf("HBM bandwidth (2 GiB device-to-device copy, read + write): %.2f TB/s\n", bw / 1e12);

  std::vector<Row> gemm_rows, la_rows, attn_rows;
  if (want("gemm")) {
    gemm_rows = bench_gemm(opt);
    print_table("GEMM (bf16 in, bf16 out or fp32 += for wgrad, fp32 accumulate)", gemm_rows,
                "flops / 790 TFLOP/s");
  }
  if (want("linear")) {
    la_rows = bench_linear_attention(opt, bw);
    char floor_what[96];
    std::snprintf(floor_what, sizeof floor_what, "bytes / %.2f TB/s measured", bw / 1e12);
    print_table("Linear attention (bf16 q/k/v/o, fp32 state)", la_rows, floor_what);
  }
  if (want("attention")) {
    attn_rows = bench_attention(opt);
    print_table("Softmax attention (bf16, causal; [path])", attn_rows,
                "causal flops (fwd 2 B H T^2 D, fwd+bwd 3.5x) / 790 TFLOP/s");
  }

  if (!opt.csv.empty()) {
    std::ofstream f(opt.csv);
    LASP_CHECK(f.good()) << "bench kernels: cannot write --csv " << opt.csv;
    f << "op,shape,time_ms,floor_ms,ratio\n";
    f << "hbm_copy,2GiB," << 0 << "," << 0 << "," << bw / 1e12 << "\n";
    for (const auto* rows : {&gemm_rows, &la_rows, &attn_rows})
      for (const Row& r : *rows)
        f << r.op << "," << r.shape << "," << r.ms << "," << r.floor_ms << "," << r.ms / r.floor_ms
          << "\n";
  }
  // LASP_PROFILE=shapes: the regions of every timed run (the linear-attention passes one by one;
  // the device is synchronised around each region, so the table's times include those syncs).
  if (profile_enabled()) std::printf("\nprofile (LASP_PROFILE; all timed runs)\n%s", profile_report().c_str());
  return 0;
}

#endif  // LASP_HAVE_CUDA

}  // namespace lasp
