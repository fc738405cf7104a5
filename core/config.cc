#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include "core/check.h"

namespace lasp {

namespace {

// One configuration key: where it lives in Config and what it accepts.
struct Field {
  std::string section, key;
  enum Kind { Int, UInt, Float, Bool, String } kind;
  void* ptr;
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  std::vector<std::string> choices;  // String fields: allowed values (empty = any)
  std::string help;
  std::string name() const { return section + "." + key; }
};

constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<Field> schema(Config& c) {
  using K = Field;
  return {
      {"run", "dir", K::String, &c.run.dir, 0, 0, {}, "output folder (config, metrics, checkpoints)"},
      {"run", "log_every", K::Int, &c.run.log_every, 1, kInf, {}, "steps between progress lines"},
      {"train", "steps", K::Int, &c.train.steps, 0, kInf, {}, "optimizer steps"},
      {"train", "seed", K::UInt, &c.train.seed, 0, kInf, {}, "seed of weights, data order and rounding"},
      {"train", "batch_size", K::Int, &c.train.batch_size, 1, kInf, {}, "sequences per data-parallel rank per step"},
      {"train", "seq_len", K::Int, &c.train.seq_len, 1, kInf, {}, "tokens per sequence (split across SP ranks)"},
      {"train", "device", K::String, &c.train.device, 0, 0, {"auto", "cpu", "cuda"}, "where to train"},
      {"train", "dtype", K::String, &c.train.dtype, 0, 0, {"auto", "fp32", "bf16"}, "compute dtype (auto: fp32 on CPU, bf16 on CUDA)"},
      {"train", "recompute", K::String, &c.train.recompute, 0, 0, {"none", "swiglu", "mlp", "block"}, "activation recomputation (swiglu: the MLP's SwiGLU output; mlp: selective, the MLP only; block: keep block inputs only)"},
      {"model", "vocab_size", K::Int, &c.model.vocab_size, 2, kInf, {}, "vocabulary size"},
      {"model", "hidden", K::Int, &c.model.hidden, 1, kInf, {}, "model width"},
      {"model", "layers", K::Int, &c.model.layers, 1, kInf, {}, "number of blocks"},
      {"model", "heads", K::Int, &c.model.heads, 1, kInf, {}, "attention heads"},
      {"model", "kv_heads", K::Int, &c.model.kv_heads, 1, kInf, {}, "key/value heads of softmax layers (GQA)"},
      {"model", "head_dim", K::Int, &c.model.head_dim, 1, kInf, {}, "dimension per head"},
      {"model", "mlp_hidden", K::Int, &c.model.mlp_hidden, 1, kInf, {}, "SwiGLU inner width"},
      {"model", "pattern", K::String, &c.model.pattern, 0, 0, {}, "mixer per layer, repeated (L linear, S softmax)"},
      {"model", "tie_embeddings", K::Bool, &c.model.tie_embeddings, 0, 0, {}, "LM head shares the embedding"},
      {"model", "decay", K::String, &c.model.decay, 0, 0, {"none", "constant", "data"}, "linear attention decay"},
      {"model", "feature_map", K::String, &c.model.feature_map, 0, 0, {"none", "silu", "relu", "elu1"}, "q/k feature map"},
      {"model", "chunk", K::Int, &c.model.chunk, 1, 4096, {}, "linear attention chunk length"},
      {"model", "norm_eps", K::Float, &c.model.norm_eps, 0, 1, {}, "RMSNorm epsilon"},
      {"model", "rope_theta", K::Float, &c.model.rope_theta, 1, kInf, {}, "RoPE base (softmax layers)"},
      {"model", "init_std", K::Float, &c.model.init_std, 0, 10, {}, "weight init standard deviation"},
      {"model", "ce_chunk", K::Int, &c.model.ce_chunk, 1, kInf, {}, "rows per fused LM-head/cross-entropy chunk"},
      {"precision", "attention", K::String, &c.model.precision.attention, 0, 0, {"bf16", "fp8", "fp4"}, "attention projections"},
      {"precision", "mlp", K::String, &c.model.precision.mlp, 0, 0, {"bf16", "fp8", "fp4"}, "MLP projections"},
      {"precision", "lm_head", K::String, &c.model.precision.lm_head, 0, 0, {"bf16", "fp8", "fp4"}, "LM head (bf16 | fp8)"},
      {"precision", "fp8_scaling", K::String, &c.model.precision.fp8_scaling, 0, 0, {"per_tensor", "delayed", "block"}, "FP8 scales"},
      {"precision", "fp8_fast_accum", K::Bool, &c.model.precision.fp8_fast_accum, 0, 0, {}, "FP8 forward GEMMs with fast accumulation (CUDA; not with block scaling)"},
      {"precision", "fp4_format", K::String, &c.model.precision.fp4_format, 0, 0, {"mxfp4", "nvfp4"}, "FP4 element/scale format"},
      {"precision", "fp4_backward", K::String, &c.model.precision.fp4_backward, 0, 0, {"sr", "ms_eden"}, "FP4 backward quantizer"},
      {"precision", "hadamard_block", K::Int, &c.model.precision.hadamard_block, 2, 4096, {}, "Hadamard rotation block"},
      {"data", "train", K::String, &c.data.train, 0, 0, {}, "'builtin', 'builtin:<MB>' (more generated text) or comma-separated shard paths/globs"},
      {"data", "val", K::String, &c.data.val, 0, 0, {}, "validation shards (empty: tail of train)"},
      {"data", "val_fraction", K::Float, &c.data.val_fraction, 0, 0.5, {}, "tail share held out when val is empty"},
      {"optim", "lr", K::Float, &c.optim.lr, 0, 10, {}, "peak learning rate"},
      {"optim", "min_lr_ratio", K::Float, &c.optim.min_lr_ratio, 0, 1, {}, "final lr as a share of the peak"},
      {"optim", "schedule", K::String, &c.optim.schedule, 0, 0, {"cosine", "wsd", "constant"}, "lr schedule after warmup"},
      {"optim", "warmup_steps", K::Int, &c.optim.warmup_steps, 0, kInf, {}, "linear warmup steps"},
      {"optim", "decay_fraction", K::Float, &c.optim.decay_fraction, 0, 1, {}, "wsd: share of steps in the decay"},
      {"optim", "weight_decay", K::Float, &c.optim.weight_decay, 0, 10, {}, "decoupled weight decay (matrices only)"},
      {"optim", "beta1", K::Float, &c.optim.beta1, 0, 0.999999, {}, "Adam beta1"},
      {"optim", "beta2", K::Float, &c.optim.beta2, 0, 0.999999, {}, "Adam beta2"},
      {"optim", "eps", K::Float, &c.optim.eps, 0, 1, {}, "Adam epsilon"},
      {"optim", "grad_clip", K::Float, &c.optim.grad_clip, 0, kInf, {}, "global gradient-norm clip (0: off)"},
      {"parallel", "dp", K::Int, &c.parallel.dp, 1, kInf, {}, "data-parallel degree"},
      {"parallel", "tp", K::Int, &c.parallel.tp, 1, kInf, {}, "tensor-parallel degree"},
      {"parallel", "sp", K::Int, &c.parallel.sp, 1, kInf, {}, "sequence-parallel degree"},
      {"parallel", "sp_method", K::String, &c.parallel.sp_method, 0, 0, {"lasp2", "lasp1", "ring", "allgather_kv"}, "sequence-parallel method"},
      {"parallel", "zigzag", K::Bool, &c.parallel.zigzag, 0, 0, {}, "zigzag sequence split (load balance)"},
      {"parallel", "bucket_mb", K::Float, &c.parallel.bucket_mb, 0.001, kInf, {}, "gradient all-reduce bucket size"},
      {"parallel", "overlap_grad_reduce", K::Bool, &c.parallel.overlap_grad_reduce, 0, 0, {}, "all-reduce gradient buckets while the backward runs (false: after it)"},
      {"parallel", "lasp2_overlap", K::Bool, &c.parallel.lasp2_overlap, 0, 0, {}, "LASP-2: all-gather the states while the local attention runs, then add the prefix term"},
      {"parallel", "comm_timeout_s", K::Float, &c.parallel.comm_timeout_s, 1, kInf, {}, "collective timeout before abort"},
      {"checkpoint", "every", K::Int, &c.checkpoint.every, -1, kInf, {}, "steps between checkpoints (0: at the end only, -1: never)"},
      {"checkpoint", "keep_last", K::Int, &c.checkpoint.keep_last, 1, kInf, {}, "checkpoints kept"},
      {"checkpoint", "resume", K::String, &c.checkpoint.resume, 0, 0, {}, "none | auto | <checkpoint dir>"},
      {"eval", "every", K::Int, &c.eval.every, -1, kInf, {}, "steps between validation runs (0: at the end only, -1: never)"},
      {"eval", "tokens", K::Int, &c.eval.tokens, 1, kInf, {}, "validation tokens per run"},
  };
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest(const std::string& word, const std::vector<std::string>& options) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& o : options) {
    const size_t d = edit_distance(word, o);
    if (d < best_d) best_d = d, best = o;
  }
  return best;
}

std::string where(const std::string& source, const YAML::Node& node) {
  std::ostringstream os;
  os << source;
  if (node.Mark().line >= 0) os << ":" << node.Mark().line + 1;
  return os.str();
}

const char* kind_name(Field::Kind k) {
  switch (k) {
    case Field::Int: return "an integer";
    case Field::UInt: return "a non-negative integer";
    case Field::Float: return "a number";
    case Field::Bool: return "a boolean (true/false)";
    case Field::String: return "a string";
  }
  return "?";
}

// Converts one YAML scalar into the field, with the checks of the schema.
void assign(const Field& f, const YAML::Node& node, const std::string& at) {
  LASP_CHECK(node.IsScalar()) << at << ": " << f.name() << " must be " << kind_name(f.kind)
                              << ", got a " << (node.IsMap() ? "map" : node.IsSequence() ? "list" : "null");
  const std::string text = node.Scalar();
  auto bad_type = [&]() {
    LASP_FAIL() << at << ": " << f.name() << " must be " << kind_name(f.kind) << ", got '" << text << "'";
  };
  auto check_range = [&](double v) {
    LASP_CHECK(v >= f.lo && v <= f.hi) << at << ": " << f.name() << " = " << text << " is out of range, allowed ["
                                       << f.lo << ", " << f.hi << "]";
  };
  try {
    switch (f.kind) {
      case Field::Int: {
        const auto v = node.as<int64_t>();
        check_range(static_cast<double>(v));
        *static_cast<int64_t*>(f.ptr) = v;
        break;
      }
      case Field::UInt: {
        LASP_CHECK(text.empty() || text[0] != '-') << at << ": " << f.name() << " must be >= 0, got " << text;
        *static_cast<uint64_t*>(f.ptr) = node.as<uint64_t>();
        break;
      }
      case Field::Float: {
        const auto v = node.as<double>();
        LASP_CHECK(std::isfinite(v)) << at << ": " << f.name() << " must be finite, got " << text;
        check_range(v);
        *static_cast<double*>(f.ptr) = v;
        break;
      }
      case Field::Bool: *static_cast<bool*>(f.ptr) = node.as<bool>(); break;
      case Field::String: {
        if (!f.choices.empty() &&
            std::find(f.choices.begin(), f.choices.end(), text) == f.choices.end()) {
          std::ostringstream os;
          for (size_t i = 0; i < f.choices.size(); ++i) os << (i ? " | " : "") << f.choices[i];
          LASP_FAIL() << at << ": " << f.name() << " = '" << text << "' is not allowed, expected " << os.str();
        }
        *static_cast<std::string*>(f.ptr) = text;
        break;
      }
    }
  } catch (const YAML::Exception&) {
    bad_type();
  }
}

// Cross-key rules that one key alone cannot express.
void validate(const Config& c, const std::string& source) {
  const auto& m = c.model;
  LASP_CHECK(!m.pattern.empty() && m.pattern.find_first_not_of("LS") == std::string::npos)
      << source << ": model.pattern = '" << m.pattern << "' must be a non-empty string of L (linear) and S (softmax)";
  LASP_CHECK(m.heads % m.kv_heads == 0) << source << ": model.heads (" << m.heads
                                        << ") must be a multiple of model.kv_heads (" << m.kv_heads << ")";
  if (m.pattern.find('S') != std::string::npos) {
    LASP_CHECK(m.head_dim % 2 == 0) << source << ": model.head_dim must be even for RoPE, got " << m.head_dim;
  }
  const auto& p = c.parallel;
  LASP_CHECK(c.train.seq_len % p.sp == 0) << source << ": train.seq_len (" << c.train.seq_len
                                          << ") must be divisible by parallel.sp (" << p.sp << ")";
  if (p.zigzag) {
    LASP_CHECK(c.train.seq_len % (2 * p.sp) == 0) << source << ": with parallel.zigzag, train.seq_len ("
                                                  << c.train.seq_len << ") must be divisible by 2 * parallel.sp";
  }
  LASP_CHECK(m.heads % p.tp == 0) << source << ": model.heads (" << m.heads << ") must be divisible by parallel.tp ("
                                  << p.tp << ")";
  LASP_CHECK(m.kv_heads % p.tp == 0 || m.pattern.find('S') == std::string::npos)
      << source << ": model.kv_heads (" << m.kv_heads << ") must be divisible by parallel.tp (" << p.tp << ")";
  LASP_CHECK(m.mlp_hidden % p.tp == 0) << source << ": model.mlp_hidden (" << m.mlp_hidden
                                       << ") must be divisible by parallel.tp (" << p.tp << ")";
  LASP_CHECK(c.model.precision.lm_head != "fp4")
      << source << ": precision.lm_head = fp4 is not supported (the fused LM head + cross-entropy runs "
      << "bf16 or fp8; fp4 applies to precision.attention and precision.mlp)";
  const int64_t hb = c.model.precision.hadamard_block;
  LASP_CHECK((hb & (hb - 1)) == 0) << source << ": precision.hadamard_block must be a power of two, got " << hb;
  LASP_CHECK(c.checkpoint.resume == "none" || c.checkpoint.resume == "auto" || !c.checkpoint.resume.empty())
      << source << ": checkpoint.resume must be none, auto or a checkpoint directory";
}

void apply_node(Config& c, const YAML::Node& root, const std::string& source) {
  if (!root || root.IsNull()) return;
  LASP_CHECK(root.IsMap()) << where(source, root) << ": the top level must be a map of sections";
  auto fields = schema(c);
  std::vector<std::string> sections;
  for (const auto& f : fields) {
    if (std::find(sections.begin(), sections.end(), f.section) == sections.end()) sections.push_back(f.section);
  }
  for (const auto& sec : root) {
    const std::string sname = sec.first.as<std::string>();
    if (std::find(sections.begin(), sections.end(), sname) == sections.end()) {
      LASP_FAIL() << where(source, sec.first) << ": unknown section '" << sname << "'; did you mean '"
                  << closest(sname, sections) << "'?";
    }
    if (sec.second.IsNull()) continue;
    LASP_CHECK(sec.second.IsMap()) << where(source, sec.second) << ": section '" << sname << "' must be a map";
    std::vector<std::string> keys;
    for (const auto& f : fields) {
      if (f.section == sname) keys.push_back(f.key);
    }
    for (const auto& kv : sec.second) {
      const std::string key = kv.first.as<std::string>();
      auto it = std::find_if(fields.begin(), fields.end(),
                             [&](const Field& f) { return f.section == sname && f.key == key; });
      if (it == fields.end()) {
        LASP_FAIL() << where(source, kv.first) << ": unknown key '" << sname << "." << key << "'; did you mean '"
                    << sname << "." << closest(key, keys) << "'?";
      }
      assign(*it, kv.second, where(source, kv.second));
    }
  }
}

}  // namespace

Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides) {
  Config c;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    LASP_FAIL() << source << ":" << e.mark.line + 1 << ":" << e.mark.column + 1 << ": YAML syntax error: " << e.msg;
  }
  apply_node(c, root, source);
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    const auto dot = o.find('.');
    LASP_CHECK(eq != std::string::npos && dot != std::string::npos && dot < eq)
        << "--set " << o << ": expected section.key=value";
    YAML::Node n;
    YAML::Node value;
    try {
      value = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception&) {
      value = YAML::Node(o.substr(eq + 1));
    }
    if (value.IsNull()) value = YAML::Node(std::string());
    n[o.substr(0, dot)][o.substr(dot + 1, eq - dot - 1)] = value;
    apply_node(c, n, "--set " + o);
  }
  validate(c, source);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return parse_config("", "<defaults>", overrides);
  std::ifstream in(path);
  LASP_CHECK(in.good()) << "cannot open config file '" << path << "'";
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), path, overrides);
}

std::string config_to_yaml(const Config& cfg) {
  Config c = cfg;
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string current;
  for (const auto& f : schema(c)) {
    if (f.section != current) {
      if (!current.empty()) out << YAML::EndMap;
      out << YAML::Key << f.section << YAML::Value << YAML::BeginMap;
      current = f.section;
    }
    out << YAML::Key << f.key << YAML::Value;
    switch (f.kind) {
      case Field::Int: out << *static_cast<int64_t*>(f.ptr); break;
      case Field::UInt: out << *static_cast<uint64_t*>(f.ptr); break;
      case Field::Float: out << *static_cast<double*>(f.ptr); break;
      case Field::Bool: out << *static_cast<bool*>(f.ptr); break;
      case Field::String: out << YAML::DoubleQuoted << *static_cast<std::string*>(f.ptr); break;
    }
  }
  out << YAML::EndMap << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::string config_reference() {
  Config c;
  std::ostringstream os;
  const std::string yaml = config_to_yaml(c);
  YAML::Node defaults = YAML::Load(yaml);
  for (const auto& f : schema(c)) {
    std::string name = f.name();
    name.resize(std::max<size_t>(name.size(), 26), ' ');
    std::string def = defaults[f.section][f.key].Scalar();
    if (def.empty()) def = "\"\"";
    os << "  " << name << " " << def << "  " << f.help;
    if (!f.choices.empty()) {
      os << " (";
      for (size_t i = 0; i < f.choices.size(); ++i) os << (i ? "|" : "") << f.choices[i];
      os << ")";
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace lasp
