#include "launch/train.h"

#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "core/check.h"
#include "core/log.h"
#include "core/model/model.h"
#include "core/model/projection.h"
#include "core/profile.h"
#include "data/dataset.h"
#include "launch/checkpoint.h"
#include "launch/metrics.h"
#include "kernels/ops.h"
#include "kernels/ops_batched.h"
#include "optim/optim.h"
#include "parallel/comm.h"
#include "parallel/grad_sync.h"
#include "parallel/grid.h"

namespace lasp {

namespace {

std::atomic<int> g_stop_signal{0};
void on_stop_signal(int sig) { g_stop_signal = sig; }

// Routes SIGINT and SIGTERM to the stop flag while a run is in progress; restores the old handlers.
struct StopSignalGuard {
  StopSignalGuard() : prev_int(std::signal(SIGINT, on_stop_signal)), prev_term(std::signal(SIGTERM, on_stop_signal)) {}
  ~StopSignalGuard() {
    std::signal(SIGINT, prev_int);
    std::signal(SIGTERM, prev_term);
  }
  void (*prev_int)(int);
  void (*prev_term)(int);
};

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;
}

std::string format_eta(double seconds) {
  char buf[32];
  const int s = static_cast<int>(seconds);
  std::snprintf(buf, sizeof buf, "%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

// Sums a scalar over a communicator.
double all_reduce_scalar(Comm& comm, double v) {
  if (comm.size() == 1) return v;
  Tensor t = Tensor::full({1}, v, DType::F64);
  comm.all_reduce_sum(t);
  return t.item(0);
}

// This rank's tokens of one batch as [B, L] int32 tensors.
void local_batch(const std::vector<int32_t>& window, const Config& cfg, const Grid& grid,
                 Tensor& inputs, Tensor& targets) {
  std::vector<int32_t> in, tg;
  sp_slice(window, cfg.train.batch_size, cfg.train.seq_len, grid.sp_rank(), grid.sp(),
           cfg.parallel.zigzag, in, tg);
  const int64_t B = cfg.train.batch_size, L = cfg.train.seq_len / grid.sp();
  inputs = Tensor::empty({B, L}, DType::I32);
  targets = Tensor::empty({B, L}, DType::I32);
  std::copy(in.begin(), in.end(), inputs.data<int32_t>());
  std::copy(tg.begin(), tg.end(), targets.data<int32_t>());
}

// Validation loss (nats per token) over about eval.tokens tokens from the start of `val`.
double evaluate(Model& model, const TokenStream& val, const Config& cfg, const Grid& grid) {
  const int64_t T = cfg.train.seq_len, B = cfg.train.batch_size;
  const int64_t windows = (val.size() - 1) / T;
  LASP_CHECK(windows >= 1) << "validation data has " << val.size() << " tokens, fewer than train.seq_len + 1 = "
                           << T + 1;
  const int64_t wanted = std::max<int64_t>(1, cfg.eval.tokens / T);
  const int64_t per_rank = std::max<int64_t>(1, std::min(wanted, windows) / (B * grid.dp()));
  double loss = 0, count = 0;
  std::vector<int32_t> window(static_cast<size_t>(B * (T + 1)));
  for (int64_t it = 0; it < per_rank; ++it) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t w = ((it * grid.dp() + grid.dp_rank()) * B + b) % windows;
      val.copy(w * T, T + 1, window.data() + b * (T + 1));
    }
    Tensor inputs, targets;
    local_batch(window, cfg, grid, inputs, targets);
    loss += model.forward_loss(inputs, targets);
    count += static_cast<double>(inputs.numel());
  }
  // Sum over SP and DP ranks (TP ranks hold the same loss: count them once).
  loss = all_reduce_scalar(grid.world(), loss) / grid.tp();
  count = all_reduce_scalar(grid.world(), count) / grid.tp();
  return loss / count;
}

// The first parameter whose gradient holds NaN or Inf, for the report.
std::string first_non_finite_grad(Model& model) {
  for (Param* p : model.params()) {
    if (!all_finite(p->grad)) return p->name;
  }
  return "";
}

// The device this rank trains on: train.device (auto = CUDA when present), the GPU picked by the
// node-local rank. Checks train.dtype against it (CPU: fp32; CUDA: bf16 with fp32 master weights).
Device training_device(const Config& cfg, const std::string& source) {
  const bool want_cuda = cfg.train.device == "cuda" || (cfg.train.device == "auto" && cuda_available());
  LASP_CHECK(!want_cuda || cuda_available())
      << source << ": train.device = cuda, but " << (cuda_device_count() == 0 ? "no CUDA device is visible" : "")
      << " (this build " << (cuda_available() ? "has" : "may lack") << " CUDA support)";
  if (!want_cuda) {
    LASP_CHECK(cfg.train.dtype == "fp32" || cfg.train.dtype == "auto")
        << source << ": train.dtype = " << cfg.train.dtype << ": CPU training computes in fp32";
    return cpu();
  }
  LASP_CHECK(cfg.train.dtype == "bf16" || cfg.train.dtype == "auto")
      << source << ": train.dtype = " << cfg.train.dtype << ": CUDA training computes in bf16 (fp32 master weights)";
  int local = 0;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (const char* v = std::getenv(var)) {
      local = std::atoi(v);
      break;
    }
  }
  const int index = local % cuda_device_count();
  cuda_set_device(index);
  return cuda(index);
}

// Checkpoint name of a projection's FP8 delayed-scaling state (projection_scaling_state).
const std::string kScalingStatePrefix = "fp8_amax_history.";

// CPU copies of device tensors for checkpoint files (CPU tensors are used as they are).
std::vector<NamedTensor> host_views(const std::vector<NamedTensor>& tensors) {
  std::vector<NamedTensor> out;
  for (const auto& t : tensors) out.push_back({t.name, t.tensor.to(cpu()), t.optional});
  return out;
}

// After a load into host copies: copy back to the device and refresh the bf16 compute copies.
void copy_back(const std::vector<NamedTensor>& device, const std::vector<NamedTensor>& host, Model& model) {
  for (size_t i = 0; i < device.size(); ++i) {
    if (device[i].tensor.is_cuda()) {
      Tensor d = device[i].tensor;
      d.copy_from(host[i].tensor);
    }
  }
  for (Param* p : model.params()) {
    if (p->compute.defined()) cast(p->compute, p->value);
  }
  // The FP8 delayed-scaling histories (checkpoints written before they were saved lack them: the
  // histories then start empty, as in a fresh run).
  for (Param* p : model.params()) {
    if (!projection_keeps_scaling_state(*p)) continue;
    for (const NamedTensor& t : host)
      if (t.name == kScalingStatePrefix + p->name && t.found) set_projection_scaling_state(*p, t.tensor);
  }
}

std::vector<NamedTensor> checkpoint_tensors(Model& model, AdamW& opt) {
  std::vector<NamedTensor> out;
  auto params = model.params();
  for (size_t i = 0; i < params.size(); ++i) {
    out.push_back({params[i]->name, params[i]->value});
    out.push_back({"adam_m." + params[i]->name, opt.first_moments()[i]});
    out.push_back({"adam_v." + params[i]->name, opt.second_moments()[i]});
  }
  for (Param* p : params) {
    if (projection_keeps_scaling_state(*p))
      out.push_back({kScalingStatePrefix + p->name, projection_scaling_state(*p), /*optional=*/true});
  }
  return out;
}

}  // namespace

TrainResult train(const Config& cfg, const std::string& config_source, int64_t stop_after, Comm* comm) {
  Grid grid(comm ? *comm : world(), static_cast<int>(cfg.parallel.tp), static_cast<int>(cfg.parallel.sp), static_cast<int>(cfg.parallel.dp));
  const bool rank0 = grid.world().rank() == 0;
  const Device device = training_device(cfg, config_source);
  g_stop_signal = 0;  // a signal that stopped an earlier run in this process is spent
  StopSignalGuard signals;  // SIGTERM/SIGINT from here on: finish the step, checkpoint, return
  set_comm_timeout(cfg.parallel.comm_timeout_s);

  // Run folder and the resolved configuration.
  const std::string yaml = config_to_yaml(cfg);
  if (rank0) {
    std::filesystem::create_directories(cfg.run.dir);
    std::ofstream(cfg.run.dir + "/config.yaml") << yaml;
    LASP_INFO() << "lasp train: " << config_source << " (world " << grid.world().size() << " = dp " << grid.dp()
                << " x sp " << grid.sp() << " x tp " << grid.tp() << ", sp_method "
                << cfg.parallel.sp_method << ")\n--- resolved config ---\n" << yaml << "---";
  }

  // Data.
  DataSplit data = open_data(cfg.data.train, cfg.data.val, cfg.data.val_fraction);
  LASP_CHECK(data.train.max_token() < static_cast<uint32_t>(cfg.model.vocab_size))
      << "data.train holds token " << data.train.max_token() << " but model.vocab_size is " << cfg.model.vocab_size;
  Sampler sampler(&data.train, cfg.train.seq_len, cfg.train.batch_size, grid.dp_rank(), grid.dp(),
                  cfg.train.seed);

  // Model and optimizer.
  ModelParallel par;
  par.sp.comm = grid.sp() > 1 ? &grid.sp_group() : nullptr;
  par.sp.method = sp_method_from_name(cfg.parallel.sp_method);
  par.sp.zigzag = cfg.parallel.zigzag;
  par.sp.overlap = cfg.parallel.lasp2_overlap;
  par.tp_size = grid.tp();
  par.tp_rank = grid.tp_rank();
  par.tp_all_reduce = [&grid](Tensor& t) { grid.tp_group().all_reduce_sum(t); };
  par.device = device;
  Model model(cfg.model, par, cfg.train.seed, DType::F32);
  model.set_recompute(cfg.train.recompute);
  set_projection_options(cfg.model.precision, cfg.train.seed);
  auto params = model.params();
  AdamW opt(cfg.optim, params);
  std::vector<Tensor> sharded_grads, replicated_grads;
  for (Param* p : params) (p->tp_sharded ? sharded_grads : replicated_grads).push_back(p->grad);
  if (rank0) {
    LASP_INFO() << "model: " << model.signature() << ", " << model.num_params_full() << " parameters; data: "
                << data.train.description() << " (" << data.train.size() << " train / " << data.val.size()
                << " validation tokens)";
  }

  // Resume.
  int64_t start_step = 0;
  std::string resume_dir;
  if (cfg.checkpoint.resume == "auto") resume_dir = find_latest_checkpoint(cfg.run.dir);
  else if (cfg.checkpoint.resume != "none") resume_dir = cfg.checkpoint.resume;
  if (!resume_dir.empty()) {
    CheckpointState st;
    st.model_signature = model.signature();
    const std::vector<NamedTensor> live = checkpoint_tensors(model, opt);
    st.tensors = host_views(live);
    st.world_size = grid.world().size();
    st.rank = grid.world().rank();
    st.tp = grid.tp();
    st.sp = grid.sp();
    st.dp = grid.dp();
    load_checkpoint(resume_dir, grid.world().rank(), st);
    copy_back(live, st.tensors, model);
    start_step = st.step;
    opt.set_steps_taken(static_cast<int64_t>(st.scalars.count("adam_steps") ? st.scalars.at("adam_steps") : st.step));
    sampler.set_position(st.sampler);
    if (rank0) LASP_INFO() << "resumed from " << resume_dir << " at step " << start_step;
  }

  MetricsWriter metrics(cfg.run.dir, rank0);
  auto save = [&](int64_t step) {
    CheckpointState st;
    st.step = step;
    st.config_yaml = yaml;
    st.model_signature = model.signature();
    st.tensors = host_views(checkpoint_tensors(model, opt));
    st.sampler = sampler.position();
    st.scalars["adam_steps"] = static_cast<double>(opt.steps_taken());
    st.world_size = grid.world().size();
    st.rank = grid.world().rank();
    st.tp = grid.tp();
    st.sp = grid.sp();
    st.dp = grid.dp();
    save_checkpoint(cfg.run.dir, st, static_cast<int>(cfg.checkpoint.keep_last), [&grid] { grid.world().barrier(); });
    if (rank0) LASP_INFO() << "checkpoint saved at step " << step;
  };

  const int64_t T = cfg.train.seq_len, B = cfg.train.batch_size;
  const double global_tokens = static_cast<double>(B * T * grid.dp());
  // Model FLOPs per token of the global sequence (T = the whole sequence, split over SP ranks).
  const double flops_per_token = model_flops_per_token(cfg.model, T);
  const double world_size = static_cast<double>(grid.world().size());
  const size_t bucket = static_cast<size_t>(cfg.parallel.bucket_mb * (1 << 20));
  // Every SP and DP rank sees different tokens of the same weights: their gradients are summed
  // over the SP group, then the DP group, in buckets formed in the order the backward finishes
  // the gradients. With parallel.overlap_grad_reduce each bucket's reduction starts as soon as
  // the backward has finished its gradients (the model's gradient-ready hook); otherwise all of
  // them after the backward.
  std::vector<Tensor> ready_grads;
  for (Param* p : model.grad_ready_order()) ready_grads.push_back(p->grad);
  std::vector<Comm*> reduce_over;
  if (grid.sp() > 1) reduce_over.push_back(&grid.sp_group());
  if (grid.dp() > 1) reduce_over.push_back(&grid.dp_group());
  GradReducer reducer(ready_grads, reduce_over, bucket, cfg.parallel.overlap_grad_reduce);
  struct HookGuard {  // the hook refers to the reducer: remove it before the reducer goes
    Model& m;
    ~HookGuard() { m.set_grad_ready_hook(nullptr); }
  } hook_guard{model};
  if (reducer.active() && reducer.overlap()) {
    model.set_grad_ready_hook([&reducer](const std::vector<Param*>& ready) {
      for (Param* p : ready) reducer.mark_ready(p->grad);
    });
  }
  TrainResult result;
  std::vector<int32_t> window;
  const double t_start = now_s();
  double t_last = t_start;
  int64_t tokens_since = 0;
  std::vector<Comm*> groups = {&grid.world(), &grid.tp_group(), &grid.sp_group(), &grid.dp_group()};
  for (Comm* c : reducer.comms()) groups.push_back(c);
  auto comm_time = [&groups]() {
    double s = 0;
    for (Comm* g : groups) s += g->total_seconds();
    return s;
  };
  for (int64_t step = start_step; step < cfg.train.steps; ++step) {
    if (step == start_step + 1) profile_reset();  // leave the first (warm-up) step out
    set_projection_step(step);  // low-precision rounding draws depend on (seed, step), so resume is exact
    const double step_t0 = now_s(), comm_t0 = comm_time();
    // Batch: DP picks sequences, SP slices them.
    sampler.next(window);
    Tensor inputs, targets;
    local_batch(window, cfg, grid, inputs, targets);

    // Forward + backward; gradients are of the mean loss over every token of the global batch.
    model.zero_grad();
    reducer.begin();
    double loss = model.forward_backward(inputs, targets, static_cast<float>(1.0 / global_tokens));
    reducer.finish();  // gradients summed over SP and DP
    loss = all_reduce_scalar(grid.world(), loss) / grid.tp() / global_tokens;

    // Global gradient norm: TP shards summed over the TP group, replicated tensors counted once.
    double sq = sum_of_squares_many(replicated_grads);
    double sq_sharded = sum_of_squares_many(sharded_grads);
    if (grid.tp() > 1) sq_sharded = all_reduce_scalar(grid.tp_group(), sq_sharded);
    const double grad_norm = std::sqrt(sq + sq_sharded);
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      const std::string bad = first_non_finite_grad(model);
      LASP_FAIL() << "non-finite training state at step " << step + 1 << ": loss " << loss << ", grad norm "
                  << grad_norm << (bad.empty() ? std::string() : ", first non-finite gradient in '" + bad + "'")
                  << "; stopping without a checkpoint (the last good one is kept)";
    }
    // Clipping is folded into the update: AdamW reads clip_scale * grad.
    const double clip_scale =
        cfg.optim.grad_clip > 0 && grad_norm > cfg.optim.grad_clip ? cfg.optim.grad_clip / grad_norm : 1.0;
    const double lr = learning_rate(cfg.optim, step, cfg.train.steps);
    opt.step(lr, clip_scale);
    projection_weights_changed();  // the quantized-weight caches of fp8/fp4 projections are stale now
    result.step_seconds.push_back(now_s() - step_t0);
    result.comm_seconds.push_back(comm_time() - comm_t0);

    // Progress and metrics.
    tokens_since += static_cast<int64_t>(global_tokens);
    result.losses.push_back(loss);
    if (result.losses.size() == 1) result.first_loss = loss;
    result.last_loss = loss;
    result.steps_done = step + 1;
    const bool last = step + 1 == cfg.train.steps;
    if ((step + 1) % cfg.run.log_every == 0 || last || step == start_step) {
      const double t = now_s();
      const double tok_s = tokens_since / std::max(1e-9, t - t_last);
      const double tflops_rank = tok_s * flops_per_token / world_size / 1e12;  // model TFLOP/s per rank
      const double eta = (cfg.train.steps - step - 1) * (t - t_start) / double(step + 1 - start_step);
      if (rank0) {
        char line[320];
        const double mem_gib = device.is_cuda() ? cuda_memory_stats().peak_allocated / 1073741824.0 : peak_rss_mib() / 1024;
        std::snprintf(line, sizeof line,
                      "step %6lld/%lld | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | %.3g TFLOP/s/rank | "
                      "peak mem %.1f GiB | ETA %s",
                      static_cast<long long>(step + 1), static_cast<long long>(cfg.train.steps), loss, lr, grad_norm,
                      tok_s, tflops_rank, mem_gib, format_eta(eta).c_str());
        LASP_INFO() << line;
      }
      metrics.log(step + 1, {{"loss", loss}, {"lr", lr}, {"grad_norm", grad_norm}, {"tokens_per_s", tok_s},
                             {"model_tflops_per_rank", tflops_rank},
                             {"peak_memory_mib", device.is_cuda() ? cuda_memory_stats().peak_allocated / 1048576.0 : peak_rss_mib()}, {"elapsed_s", t - t_start}});
      t_last = t;
      tokens_since = 0;
    }
    if (cfg.eval.every > 0 && (step + 1) % cfg.eval.every == 0 && !last) {
      const double vl = evaluate(model, data.val, cfg, grid);
      if (rank0) LASP_INFO() << "validation loss " << vl << " at step " << step + 1;
      metrics.log(step + 1, {{"val_loss", vl}});
    }
    const bool stop_requested = stop_after > 0 && step + 1 - start_step >= stop_after;
    const bool stop = all_reduce_scalar(grid.world(), g_stop_signal.load() != 0 ? 1.0 : 0.0) > 0 || stop_requested;
    if (cfg.checkpoint.every >= 0 &&
        ((cfg.checkpoint.every > 0 && (step + 1) % cfg.checkpoint.every == 0) || last || stop)) {
      save(step + 1);
    }
    if (stop) {
      if (!stop_requested) {
        LASP_WARN() << "stopped by signal " << g_stop_signal.load() << " after step " << step + 1
                    << "; checkpoint saved, resume with checkpoint.resume=auto";
      } else if (rank0) {
        LASP_INFO() << "stopped after " << stop_after << " steps (--stop-after); resume with checkpoint.resume=auto";
      }
      return result;
    }
  }
  if (profile_enabled() && rank0) LASP_INFO() << profile_report();
  result.on_cuda = device.is_cuda();
  result.peak_memory_mib = device.is_cuda() ? cuda_memory_stats().peak_allocated / 1048576.0 : peak_rss_mib();
  if (cfg.eval.every < 0) return result;
  result.val_loss = evaluate(model, data.val, cfg, grid);
  if (rank0) LASP_INFO() << "final validation loss " << result.val_loss << " (" << cfg.train.steps << " steps, "
                         << format_eta(now_s() - t_start) << " elapsed)";
  metrics.log(cfg.train.steps, {{"val_loss", result.val_loss}});
  return result;
}

namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string checkpoint;
  int64_t stop_after = -1;
  bool help = false;
};

TrainArgs parse_args(int argc, char** argv, const char* usage) {
  TrainArgs a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--help" || s == "-h") {
      a.help = true;
    } else if (s == "--set") {
      LASP_CHECK(i + 1 < argc) << "--set needs section.key=value\n" << usage;
      a.overrides.push_back(argv[++i]);
    } else if (s.rfind("--set=", 0) == 0) {
      a.overrides.push_back(s.substr(6));
    } else if (s == "--stop-after") {
      LASP_CHECK(i + 1 < argc) << "--stop-after needs a number of steps\n" << usage;
      a.stop_after = std::stoll(argv[++i]);
    } else if (s == "--checkpoint") {
      LASP_CHECK(i + 1 < argc) << "--checkpoint needs a directory\n" << usage;
      a.checkpoint = argv[++i];
    } else if (!s.empty() && s[0] == '-') {
      LASP_FAIL() << "unknown option '" << s << "'\n" << usage;
    } else {
      LASP_CHECK(a.config.empty()) << "more than one config file given ('" << a.config << "', '" << s << "')\n"
                                   << usage;
      a.config = s;
    }
  }
  return a;
}

}  // namespace

int train_main(int argc, char** argv) {
  const char* usage =
      "usage: lasp train CONFIG.yaml [--set section.key=value ...] [--stop-after N]\n"
      "  Trains the model the config describes; writes run.dir/{config.yaml,metrics.jsonl,tb/,checkpoints/}.\n"
      "  Launch several ranks with mpirun -np N (parallel.dp * parallel.sp * parallel.tp = N).\n"
      "  --stop-after N ends this invocation after N steps with a checkpoint (continue with\n"
      "  --set checkpoint.resume=auto); SIGTERM/SIGINT also save a checkpoint before exiting.\n";
  TrainArgs a = parse_args(argc, argv, usage);
  if (a.help) {
    std::cout << usage << "\nconfig keys (key, default, meaning):\n" << config_reference();
    return 0;
  }
  const Config cfg = load_config(a.config, a.overrides);
  const TrainResult r = train(cfg, a.config.empty() ? "<defaults>" : a.config, a.stop_after);
  return r.steps_done > 0 || cfg.train.steps == 0 ? 0 : 1;
}

namespace {

// Builds the model of `cfg` and loads the newest checkpoint of run.dir (or `dir`) into it.
struct LoadedModel {
  std::unique_ptr<Grid> grid;
  ModelParallel par;
  std::unique_ptr<Model> model;
  int64_t step = 0;
  std::string dir;
};

LoadedModel load_trained_model(const Config& cfg, const std::string& dir_arg) {
  LoadedModel m;
  m.grid = std::make_unique<Grid>(world(), static_cast<int>(cfg.parallel.tp), static_cast<int>(cfg.parallel.sp),
                                  static_cast<int>(cfg.parallel.dp));
  Grid& grid = *m.grid;
  m.dir = dir_arg.empty() ? find_latest_checkpoint(cfg.run.dir) : dir_arg;
  LASP_CHECK(!m.dir.empty()) << "no checkpoint found under " << cfg.run.dir << "/checkpoints";
  m.par.sp.comm = grid.sp() > 1 ? &grid.sp_group() : nullptr;
  m.par.sp.method = sp_method_from_name(cfg.parallel.sp_method);
  m.par.sp.zigzag = cfg.parallel.zigzag;
  m.par.sp.overlap = cfg.parallel.lasp2_overlap;
  m.par.tp_size = grid.tp();
  m.par.tp_rank = grid.tp_rank();
  m.par.tp_all_reduce = [&grid](Tensor& t) { grid.tp_group().all_reduce_sum(t); };
  m.par.device = training_device(cfg, "config");
  m.model = std::make_unique<Model>(cfg.model, m.par, cfg.train.seed, DType::F32);
  set_projection_options(cfg.model.precision, cfg.train.seed);
  AdamW opt(cfg.optim, m.model->params());
  CheckpointState st;
  st.model_signature = m.model->signature();
  const std::vector<NamedTensor> live = checkpoint_tensors(*m.model, opt);
  st.tensors = host_views(live);
  st.world_size = world().size();
  st.rank = world().rank();
  load_checkpoint(m.dir, world().rank(), st);
  copy_back(live, st.tensors, *m.model);
  m.step = st.step;
  return m;
}

}  // namespace

int eval_main(int argc, char** argv) {
  const char* usage =
      "usage: lasp eval CONFIG.yaml [--checkpoint DIR] [--set section.key=value ...]\n"
      "  Prints the validation loss of the newest checkpoint in run.dir (or of DIR).\n";
  TrainArgs a = parse_args(argc, argv, usage);
  if (a.help) {
    std::cout << usage;
    return 0;
  }
  const Config cfg = load_config(a.config, a.overrides);
  LoadedModel m = load_trained_model(cfg, a.checkpoint);
  DataSplit data = open_data(cfg.data.train, cfg.data.val, cfg.data.val_fraction);
  const double vl = evaluate(*m.model, data.val, cfg, *m.grid);
  if (world().rank() == 0) std::cout << "validation loss " << vl << " at step " << m.step << " (" << m.dir << ")\n";
  return 0;
}

int export_main(int argc, char** argv) {
  const char* usage =
      "usage: lasp export CONFIG.yaml --output FILE.safetensors [--checkpoint DIR] [--set k=v ...]\n"
      "  Writes the weights of the newest checkpoint in run.dir (or of DIR) as safetensors.\n";
  std::string output;
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--output" && i + 1 < argc) output = argv[++i];
    else if (std::string(argv[i]) == "--format" && i + 1 < argc) {
      LASP_CHECK(std::string(argv[i + 1]) == "safetensors") << "unknown --format '" << argv[i + 1] << "', expected safetensors";
      ++i;
    } else rest.push_back(argv[i]);
  }
  TrainArgs a = parse_args(static_cast<int>(rest.size()), rest.data(), usage);
  if (a.help) {
    std::cout << usage;
    return 0;
  }
  LASP_CHECK(!output.empty()) << "missing --output FILE\n" << usage;
  const Config cfg = load_config(a.config, a.overrides);
  LASP_CHECK(cfg.parallel.tp == 1) << "export of tensor-parallel checkpoints is not supported yet";
  LoadedModel m = load_trained_model(cfg, a.checkpoint);
  std::vector<NamedTensor> tensors;
  for (Param* p : m.model->params()) tensors.push_back({p->name, p->value.to(cpu())});
  if (world().rank() == 0) {
    export_safetensors(output, tensors);
    std::cout << "wrote " << tensors.size() << " tensors of step " << m.step << " to " << output << "\n";
  }
  return 0;
}

}  // namespace lasp
