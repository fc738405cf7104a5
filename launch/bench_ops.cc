// Small-op benchmark (see bench_ops.h). Activations are random bf16 (bench_util.h), far larger
// than L2 (50 MB), so repeated runs measure HBM. The whole-parameter rows replay what one
// optimizer step does over the 1B model's 179 parameters: clip (sum of squares, scale), AdamW.
#include "launch/bench_ops.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/device.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/ops_batched.h"
#include "launch/bench_util.h"

#ifdef LASP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace lasp {

#ifndef LASP_HAVE_CUDA

int bench_ops_main(int, char**) {
  std::fprintf(stderr, "lasp bench ops: this build has no CUDA backend; nothing to measure\n");
  return 2;
}

#else

namespace {

struct Options {
  int iters = 10, warmup = 2;
  bool quick = false;
};

struct Row {
  std::string op, shape;
  double ms, bytes;
};

double measure_bandwidth(const Options& opt) {
  const int64_t bytes = int64_t{2} << 30;
  Tensor src = Tensor::empty({bytes}, DType::U8, cuda()),
         dst = Tensor::empty({bytes}, DType::U8, cuda());
  LASP_CHECK(cudaMemset(src.raw(), 1, static_cast<size_t>(bytes)) == cudaSuccess)
      << "bench ops: memset failed";
  auto stream = static_cast<cudaStream_t>(current_stream().handle);
  const double ms = median_event_ms(
      [&] {
        const cudaError_t e = cudaMemcpyAsync(dst.raw(), src.raw(), static_cast<size_t>(bytes),
                                              cudaMemcpyDeviceToDevice, stream);
        LASP_CHECK(e == cudaSuccess) << "bench ops: copy failed: " << cudaGetErrorString(e);
      },
      opt.iters, opt.warmup);
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
}

// An fp32 CUDA tensor of `shape` holding scale * the first values of `pool` (flat bf16).
Tensor f32_from_pool(const Shape& shape, const Tensor& pool, float scale) {
  Tensor t = Tensor::empty(shape, DType::F32, cuda());
  Tensor flat = t.view({-1});
  cast(flat, pool.slice(0, 0, t.numel()));
  scale_inplace(t, scale);
  return t;
}

std::string shape_str(const Shape& s, const char* dtype) {
  std::string r;
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "x" : "") + std::to_string(s[i]);
  return r + " " + dtype;
}

// The activation ops at T = 16384 tokens.
void bench_activations(const Options& opt, std::vector<Row>& rows) {
  const int64_t T = 16384, C = 2048, F = 8192, head = 128;
  auto time = [&](const std::function<void()>& fn) {
    return median_event_ms(fn, opt.iters, opt.warmup);
  };
  {
    const Tensor gate = random_bf16_cuda({T, F}, 2.0, 1), up = random_bf16_cuda({T, F}, 1.0, 2),
                 dh = random_bf16_cuda({T, F}, 1.0, 3);
    Tensor h = Tensor::empty({T, F}, DType::BF16, cuda()),
           dg = Tensor::empty({T, F}, DType::BF16, cuda()),
           du = Tensor::empty({T, F}, DType::BF16, cuda());
    const double n = static_cast<double>(T * F);
    rows.push_back({"swiglu_forward", shape_str({T, F}, "bf16"),
                    time([&] { swiglu_forward(h, gate, up); }), 3 * 2 * n});
    rows.push_back({"swiglu_backward", shape_str({T, F}, "bf16"),
                    time([&] { swiglu_backward(dg, du, dh, gate, up); }), 5 * 2 * n});
  }
  for (int64_t group : {C, head}) {
    const Tensor x = random_bf16_cuda({T, C}, 1.0, 4), dy = random_bf16_cuda({T, C}, 1.0, 5);
    const Tensor w = Tensor::full({C}, 1.0, DType::F32, cuda());
    Tensor y = Tensor::empty({T, C}, DType::BF16, cuda()),
           dx = Tensor::empty({T, C}, DType::BF16, cuda());
    Tensor rstd = Tensor::empty({T, C / group}, DType::F32, cuda()),
           dw = Tensor::zeros({C}, DType::F32, cuda());
    const double n = static_cast<double>(T * C), r = static_cast<double>(T * (C / group)) * 4;
    const std::string sh = shape_str({T, C}, "bf16") + " group " + std::to_string(group);
    rows.push_back({"rmsnorm_forward", sh,
                    time([&] { rmsnorm_forward(y, rstd, x, w, 1e-5f, group); }), 2 * 2 * n + r});
    rows.push_back({"rmsnorm_backward (+dw)", sh,
                    time([&] { rmsnorm_backward(dx, dw, dy, x, w, rstd, group); }), 3 * 2 * n + r});
  }
  {
    Tensor y = random_bf16_cuda({T, C}, 1.0, 6);
    const Tensor x = random_bf16_cuda({T, C}, 1.0, 7);
    rows.push_back({"add_inplace", shape_str({T, C}, "bf16"),
                    time([&] { add_inplace(y, x, 1.0f); }), 3 * 2 * static_cast<double>(T * C)});
  }
}

// The 1B model's 179 parameters: embedding and LM head [128256, 2048], a final norm, and per
// layer q, k, v, o [2048, 2048], gate, up [8192, 2048], down [2048, 8192] and four [2048] vectors.
std::vector<Shape> parameter_shapes() {
  const int64_t V = 128256, C = 2048, F = 8192;
  std::vector<Shape> s = {{V, C}, {V, C}, {C}};
  for (int l = 0; l < 16; ++l) {
    for (int i = 0; i < 4; ++i) s.push_back({C, C});
    s.push_back({F, C});
    s.push_back({F, C});
    s.push_back({C, F});
    for (int i = 0; i < 4; ++i) s.push_back({C});
  }
  return s;
}

void bench_parameters(const Options& opt, std::vector<Row>& rows) {
  std::vector<Tensor> w, g, m, v, wc;
  double n = 0;
  const Tensor pool = random_bf16_cuda({int64_t{128256} * 2048}, 1.0, 100);
  for (const Shape& s : parameter_shapes()) {
    w.push_back(f32_from_pool(s, pool, 0.02f));
    g.push_back(f32_from_pool(s, pool, 1e-4f));
    m.push_back(Tensor::zeros(s, DType::F32, cuda()));
    v.push_back(Tensor::zeros(s, DType::F32, cuda()));
    wc.push_back(Tensor::empty(s, DType::BF16, cuda()));
    n += static_cast<double>(w.back().numel());
  }
  const std::string sh =
      std::to_string(w.size()) + " params, " + std::to_string(n / 1e9).substr(0, 4) + " G fp32";
  auto time = [&](const std::function<void()>& fn) {
    return median_event_ms(fn, std::max(3, opt.iters / 2), 1);
  };
  double sink = 0;
  rows.push_back({"sum_of_squares (loop)", sh, time([&] {
                    for (const Tensor& t : g) sink += sum_of_squares(t);
                  }),
                  4 * n});
  rows.push_back({"sum_of_squares_many", sh, time([&] { sink += sum_of_squares_many(g); }), 4 * n});
  rows.push_back({"scale_inplace (loop)", sh, time([&] {
                    for (Tensor& t : g) scale_inplace(t, 1.0f);
                  }),
                  2 * 4 * n});
  // w, m, v read and written, g read, the bf16 compute copy written: 30 bytes per value.
  rows.push_back({"adamw_update (loop)", sh, time([&] {
                    for (size_t i = 0; i < w.size(); ++i)
                      adamw_update(w[i], wc[i], g[i], m[i], v[i], 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f,
                                   0.5f, 0.5f);
                  }),
                  30 * n});
  if (sink < 0) std::printf("unreachable\n");
}

}  // namespace

int bench_ops_main(int argc, char** argv) {
  Options opt;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* what) {
      LASP_CHECK(i + 1 < argc) << "bench ops: " << what << " needs a value";
      return std::string(argv[++i]);
    };
    if (a == "--iters")
      opt.iters = std::stoi(value("--iters"));
    else if (a == "--warmup")
      opt.warmup = std::stoi(value("--warmup"));
    else if (a == "--quick")
      opt.quick = true;
    else if (a == "ops" || a == "bench")
      continue;
    else
      LASP_FAIL() << "bench ops: unknown argument '" << a
                  << "' (expected --iters N, --warmup N, --quick)";
  }
  LASP_CHECK(opt.iters >= 1 && opt.warmup >= 0) << "bench ops: --iters must be >= 1";
  if (!cuda_available()) {
    std::fprintf(stderr, "lasp bench ops: no CUDA device visible; nothing to measure\n");
    return 2;
  }
  const double bw = measure_bandwidth(opt);
  std::printf("HBM bandwidth (2 GiB device-to-device copy, read + write): %.2f TB/s\n", bw / 1e12);
  std::vector<Row> rows;
  bench_activations(opt, rows);
  if (!opt.quick) bench_parameters(opt, rows);
  std::printf("\nSmall ops (floor: bytes / %.2f TB/s measured)\n", bw / 1e12);
  std::printf("%-24s %-34s %10s %10s %10s %7s\n", "op", "shape", "time_ms", "MB", "floor_ms",
              "ratio");
  for (const Row& r : rows) {
    const double floor_ms = r.bytes / bw * 1e3;
    std::printf("%-24s %-34s %10.3f %10.1f %10.3f %7.2f\n", r.op.c_str(), r.shape.c_str(), r.ms,
                r.bytes / 1e6, floor_ms, r.ms / floor_ms);
  }
  std::fflush(stdout);
  return 0;
}

#endif  // LASP_HAVE_CUDA

}  // namespace lasp
