// Checkpoint save / load / inspect and safetensors export. Layout and protocol: checkpoint.h.
#include "launch/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/check.h"
#include "data/checksum.h"
#include "launch/checkpoint.pb.h"
#include "launch/metrics.h"

namespace lasp {

namespace fs = std::filesystem;

namespace {

constexpr const char* kManifestName = "manifest.pb";

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}
std::string rank_file_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "rank_%05d.bin", rank);
  return buf;
}
// Each rank's part of the manifest, written next to its file; rank 0 merges them.
std::string rank_meta_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "rank_%05d.meta.pb", rank);
  return buf;
}

// "step_00000040" -> 40; -1 for any other name.
int64_t parse_step_dir(const std::string& name) {
  if (name.size() < 6 || name.compare(0, 5, "step_") != 0) return -1;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || step > (int64_t{1} << 58)) return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::string errno_text() { return std::strerror(errno); }

// A file written with write(2) and made durable with fsync(2) before close.
class DurableFile {
 public:
  explicit DurableFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    LASP_CHECK(fd_ >= 0) << "checkpoint: cannot create " << path << " (" << errno_text() << ")";
  }
  DurableFile(const DurableFile&) = delete;
  ~DurableFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* data, size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min<size_t>(n, size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      LASP_CHECK(w > 0) << "checkpoint: writing " << path_ << " failed (" << errno_text() << ")";
      p += w;
      n -= static_cast<size_t>(w);
      written_ += static_cast<uint64_t>(w);
    }
  }
  void sync_and_close() {
    LASP_CHECK(::fsync(fd_) == 0) << "checkpoint: fsync of " << path_ << " failed (" << errno_text() << ")";
    const int rc = ::close(fd_);
    fd_ = -1;
    LASP_CHECK(rc == 0) << "checkpoint: closing " << path_ << " failed (" << errno_text() << ")";
  }
  uint64_t written() const { return written_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t written_ = 0;
};

void write_durable(const std::string& path, const std::string& bytes) {
  DurableFile f(path);
  f.write(bytes.data(), bytes.size());
  f.sync_and_close();
}

// Makes a directory's entries (created, renamed files) durable.
void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  LASP_CHECK(fd >= 0) << "checkpoint: cannot open directory " << dir << " (" << errno_text() << ")";
  const int rc = ::fsync(fd);
  ::close(fd);
  LASP_CHECK(rc == 0) << "checkpoint: fsync of directory " << dir << " failed (" << errno_text() << ")";
}

void make_dirs(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);  // several ranks may race here: only the result matters
  LASP_CHECK(fs::is_directory(dir)) << "checkpoint: cannot create directory " << dir << " (" << ec.message() << ")";
}

void rename_or_throw(const std::string& from, const std::string& to) {
  LASP_CHECK(std::rename(from.c_str(), to.c_str()) == 0)
      << "checkpoint: cannot rename " << from << " to " << to << " (" << errno_text() << ")";
}

std::string read_whole_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  LASP_CHECK(in.good()) << what << " " << path << " cannot be opened (" << errno_text() << ")";
  std::ostringstream ss;
  ss << in.rdbuf();
  LASP_CHECK(!in.bad()) << what << " " << path << ": read failed";
  return ss.str();
}

pb::Manifest read_manifest(const std::string& ckpt_dir) {
  const std::string path = ckpt_dir + "/" + kManifestName;
  LASP_CHECK(fs::is_regular_file(path)) << "checkpoint " << ckpt_dir << " has no " << kManifestName
                                        << " (not a checkpoint, or an incomplete save)";
  pb::Manifest m;
  LASP_CHECK(m.ParseFromString(read_whole_file(path, "checkpoint manifest")))
      << "checkpoint manifest " << path << " is corrupt (protobuf parse failed)";
  LASP_CHECK(m.format_version() == kCheckpointFormatVersion)
      << "checkpoint manifest " << path << ": format version " << m.format_version() << ", this build reads "
      << kCheckpointFormatVersion;
  LASP_CHECK(m.world_size() >= 1 && m.ranks_size() == m.world_size())
      << "checkpoint manifest " << path << ": describes " << m.ranks_size() << " rank files for world size "
      << m.world_size();
  return m;
}

// A contiguous CPU copy (or the tensor itself when it already is one).
Tensor host_contiguous(const Tensor& t) {
  Tensor h = t.is_cuda() ? t.to(cpu()) : t;
  return h.is_contiguous() ? h : h.contiguous();
}

bool pread_all(int fd, void* dst, uint64_t n, uint64_t offset) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, std::min<uint64_t>(n, uint64_t{1} << 30), static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<uint64_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return true;
}

std::string shape_of(const pb::TensorEntry& e) {
  Shape s(e.shape().begin(), e.shape().end());
  return shape_str(s);
}

void check_layout_fields(const CheckpointState& s) {
  const bool any = s.tp || s.sp || s.dp;
  if (!any) return;
  LASP_CHECK(s.tp >= 1 && s.sp >= 1 && s.dp >= 1 && s.tp * s.sp * s.dp == s.world_size)
      << "save_checkpoint: layout tp " << s.tp << " x sp " << s.sp << " x dp " << s.dp
      << " does not multiply to world_size " << s.world_size;
}

// Rank 0, after every rank's file is durable: merge the per-rank metadata into the manifest and
// publish the directory.
void publish(const std::string& ckpt_root, const std::string& tmp_dir, const CheckpointState& state) {
  pb::Manifest m;
  m.set_format_version(kCheckpointFormatVersion);
  m.set_step(state.step);
  m.set_world_size(state.world_size);
  m.mutable_layout()->set_tp(state.tp);
  m.mutable_layout()->set_sp(state.sp);
  m.mutable_layout()->set_dp(state.dp);
  m.set_config_yaml(state.config_yaml);
  m.set_model_signature(state.model_signature);
  m.set_created_unix(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  std::set<std::string> keep = {kManifestName};
  for (int r = 0; r < state.world_size; ++r) {
    const std::string meta = tmp_dir + "/" + rank_meta_name(r);
    LASP_CHECK(fs::is_regular_file(meta)) << "save_checkpoint: rank " << r << "'s part is missing (" << meta
                                          << "); did every rank call save_checkpoint?";
    pb::RankFile* rf = m.add_ranks();
    LASP_CHECK(rf->ParseFromString(read_whole_file(meta, "checkpoint rank metadata")) && rf->rank() == r)
        << "save_checkpoint: rank metadata " << meta << " is corrupt";
    keep.insert(rf->file());
  }
  write_durable(tmp_dir + "/" + kManifestName, m.SerializeAsString());
  // Drop the per-rank metadata and anything left by an earlier, killed attempt at this step.
  for (const auto& entry : fs::directory_iterator(tmp_dir)) {
    if (!keep.count(entry.path().filename().string())) fs::remove_all(entry.path());
  }
  fsync_dir(tmp_dir);

  const std::string final_dir = ckpt_root + "/" + step_dir_name(state.step);
  if (fs::exists(final_dir)) {  // re-saving a step: swap, so a complete copy always exists
    const std::string old_dir = ckpt_root + "/.old_" + step_dir_name(state.step);
    fs::remove_all(old_dir);
    rename_or_throw(final_dir, old_dir);
    rename_or_throw(tmp_dir, final_dir);
    fsync_dir(ckpt_root);
    fs::remove_all(old_dir);
  } else {
    rename_or_throw(tmp_dir, final_dir);
  }
  fsync_dir(ckpt_root);
}

void prune(const std::string& run_dir, const std::string& ckpt_root, int keep_last) {
  if (keep_last > 0) {
    const std::vector<std::string> all = list_checkpoints(run_dir);
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) fs::remove_all(all[i]);
  }
  for (const auto& entry : fs::directory_iterator(ckpt_root)) {  // stale temporaries of killed saves
    const std::string name = entry.path().filename().string();
    if (name.rfind(".tmp_step_", 0) == 0 || name.rfind(".old_step_", 0) == 0) fs::remove_all(entry.path());
  }
}

}  // namespace

void save_checkpoint(const std::string& run_dir, const CheckpointState& state, int keep_last,
                     const std::function<void()>& barrier) {
  LASP_CHECK(state.world_size >= 1 && state.rank >= 0 && state.rank < state.world_size)
      << "save_checkpoint: rank " << state.rank << " is not in [0, world_size = " << state.world_size << ")";
  LASP_CHECK(state.step >= 0) << "save_checkpoint: step must be >= 0, got " << state.step;
  LASP_CHECK(state.world_size == 1 || barrier)
      << "save_checkpoint: world_size " << state.world_size << " needs a barrier callback";
  check_layout_fields(state);
  std::set<std::string> names;
  for (const NamedTensor& nt : state.tensors) {
    LASP_CHECK(!nt.name.empty()) << "save_checkpoint: a tensor has an empty name";
    LASP_CHECK(names.insert(nt.name).second) << "save_checkpoint: tensor name \"" << nt.name << "\" appears twice";
    LASP_CHECK(nt.tensor.defined()) << "save_checkpoint: tensor \"" << nt.name << "\" is not allocated";
  }

  const std::string ckpt_root = run_dir + "/checkpoints";
  const std::string tmp_dir = ckpt_root + "/.tmp_" + step_dir_name(state.step);
  make_dirs(tmp_dir);

  // 1. This rank's tensors, back to back, with a CRC32 each; then its part of the manifest.
  pb::RankFile rf;
  rf.set_rank(state.rank);
  rf.set_file(rank_file_name(state.rank));
  {
    const std::string partial = tmp_dir + "/" + rf.file() + ".partial";
    DurableFile f(partial);
    for (const NamedTensor& nt : state.tensors) {
      const Tensor h = host_contiguous(nt.tensor);
      pb::TensorEntry* e = rf.add_tensors();
      e->set_name(nt.name);
      e->set_dtype(dtype_name(h.dtype()));
      for (int64_t d : h.shape()) e->add_shape(d);
      e->set_offset(f.written());
      e->set_length(h.nbytes());
      e->set_crc32(crc32(0, h.raw(), h.nbytes()));
      f.write(h.raw(), h.nbytes());
    }
    rf.set_file_bytes(f.written());
    f.sync_and_close();
    rename_or_throw(partial, tmp_dir + "/" + rf.file());
  }
  rf.mutable_sampler()->set_epoch(state.sampler.epoch);
  rf.mutable_sampler()->set_index(state.sampler.index);
  for (uint64_t v : state.rng_state) rf.add_rng_state(v);
  for (const auto& [k, v] : state.scalars) (*rf.mutable_scalars())[k] = v;
  write_durable(tmp_dir + "/" + rank_meta_name(state.rank), rf.SerializeAsString());
  fsync_dir(tmp_dir);

  // 2. Everyone's file is durable -> rank 0 writes the manifest last and publishes.
  if (barrier) barrier();
  if (state.rank == 0) {
    publish(ckpt_root, tmp_dir, state);
    prune(run_dir, ckpt_root, keep_last);
  }
  if (barrier) barrier();
}

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  const std::string root = run_dir + "/checkpoints";
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return {};
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const int64_t step = parse_step_dir(entry.path().filename().string());
    if (step < 0 || !fs::is_regular_file(entry.path() / kManifestName, ec)) continue;
    found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> dirs;
  for (auto& f : found) dirs.push_back(f.second);
  return dirs;
}

std::string find_latest_checkpoint(const std::string& run_dir) {
  const std::vector<std::string> all = list_checkpoints(run_dir);
  return all.empty() ? std::string() : all.back();
}

void load_checkpoint(const std::string& ckpt_dir, int rank, CheckpointState& state) {
  const pb::Manifest m = read_manifest(ckpt_dir);
  const std::string manifest_path = ckpt_dir + "/" + kManifestName;
  LASP_CHECK(m.model_signature() == state.model_signature)
      << "checkpoint " << manifest_path << " was written by another model: its signature is \""
      << m.model_signature() << "\", this model's is \"" << state.model_signature << "\"";
  LASP_CHECK(m.world_size() == state.world_size)
      << "checkpoint " << manifest_path << " was written by " << m.world_size() << " ranks, this run has "
      << state.world_size << " (resharding is not supported)";
  const auto& L = m.layout();
  if ((L.tp() || L.sp() || L.dp()) && (state.tp || state.sp || state.dp)) {
    LASP_CHECK(L.tp() == state.tp && L.sp() == state.sp && L.dp() == state.dp)
        << "checkpoint " << manifest_path << " has rank layout tp " << L.tp() << " x sp " << L.sp() << " x dp "
        << L.dp() << ", this run has tp " << state.tp << " x sp " << state.sp << " x dp " << state.dp;
  }
  LASP_CHECK(rank >= 0 && rank < m.world_size())
      << "load_checkpoint: rank " << rank << " is not in [0, " << m.world_size() << ") of " << manifest_path;
  const pb::RankFile& rf = m.ranks(rank);
  const std::string file = ckpt_dir + "/" + rf.file();

  // Validate everything before touching state.
  std::error_code ec;
  const uint64_t size = fs::file_size(file, ec);
  LASP_CHECK(!ec) << "checkpoint file " << file << " is missing (" << ec.message() << ")";
  LASP_CHECK(size == rf.file_bytes()) << "checkpoint file " << file << " is " << size << " bytes, the manifest says "
                                      << rf.file_bytes() << (size < rf.file_bytes() ? " (truncated)" : "");
  std::map<std::string, const pb::TensorEntry*> entries;
  for (const pb::TensorEntry& e : rf.tensors()) entries[e.name()] = &e;
  std::vector<const pb::TensorEntry*> plan;  // one per state tensor; nullptr: optional and absent
  for (const NamedTensor& nt : state.tensors) {
    auto it = entries.find(nt.name);
    if (it == entries.end() && nt.optional) {
      plan.push_back(nullptr);
      continue;
    }
    LASP_CHECK(it != entries.end()) << "checkpoint file " << file << " has no tensor \"" << nt.name << "\"";
    const pb::TensorEntry& e = *it->second;
    LASP_CHECK(nt.tensor.defined()) << "load_checkpoint: expected tensor \"" << nt.name << "\" is not allocated";
    LASP_CHECK(e.dtype() == dtype_name(nt.tensor.dtype()))
        << "checkpoint file " << file << ": tensor \"" << nt.name << "\" is " << e.dtype() << ", the model has "
        << dtype_name(nt.tensor.dtype());
    const Shape shape(e.shape().begin(), e.shape().end());
    LASP_CHECK(shape == nt.tensor.shape()) << "checkpoint file " << file << ": tensor \"" << nt.name << "\" has shape "
                                           << shape_str(shape) << ", the model has " << shape_str(nt.tensor.shape());
    LASP_CHECK(e.length() == nt.tensor.nbytes() && e.offset() <= size && e.length() <= size - e.offset())
        << "checkpoint manifest " << manifest_path << ": tensor \"" << nt.name << "\" has a bad byte range";
    plan.push_back(&e);
  }
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  LASP_CHECK(fd >= 0) << "checkpoint file " << file << " cannot be opened (" << errno_text() << ")";
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  std::vector<char> buf(size_t{8} << 20);
  for (const pb::TensorEntry* e : plan) {  // pass 1: checksums
    if (!e) continue;
    uint32_t crc = 0;
    for (uint64_t done = 0; done < e->length();) {
      const uint64_t n = std::min<uint64_t>(buf.size(), e->length() - done);
      LASP_CHECK(pread_all(fd, buf.data(), n, e->offset() + done)) << "checkpoint file " << file << ": read failed";
      crc = crc32(crc, buf.data(), n);
      done += n;
    }
    LASP_CHECK(crc == e->crc32()) << "checkpoint file " << file << ": tensor \"" << e->name()
                                  << "\" fails its CRC32 check (stored " << e->crc32() << ", computed " << crc
                                  << "): the file is corrupt";
  }

  // Pass 2: copy into the tensors.
  for (size_t i = 0; i < plan.size(); ++i) {
    Tensor& dst = state.tensors[i].tensor;
    const pb::TensorEntry* e = plan[i];
    state.tensors[i].found = e != nullptr;
    if (!e) continue;
    if (dst.device().is_cpu() && dst.is_contiguous()) {
      LASP_CHECK(pread_all(fd, dst.raw(), e->length(), e->offset())) << "checkpoint file " << file << ": read failed";
    } else {
      Tensor h = Tensor::empty(dst.shape(), dst.dtype(), cpu());
      LASP_CHECK(pread_all(fd, h.raw(), e->length(), e->offset())) << "checkpoint file " << file << ": read failed";
      dst.copy_from(h);
    }
  }
  state.step = m.step();
  state.config_yaml = m.config_yaml();
  state.rank = rank;
  state.tp = L.tp();
  state.sp = L.sp();
  state.dp = L.dp();
  state.rng_state.assign(rf.rng_state().begin(), rf.rng_state().end());
  state.sampler.epoch = rf.sampler().epoch();
  state.sampler.index = rf.sampler().index();
  state.scalars.clear();
  for (const auto& [k, v] : rf.scalars()) state.scalars[k] = v;
}

std::string describe_checkpoint(const std::string& ckpt_dir) {
  const pb::Manifest m = read_manifest(ckpt_dir);
  std::ostringstream out;
  out << "checkpoint " << ckpt_dir << "\n"
      << "  format version " << m.format_version() << ", step " << m.step() << ", world size " << m.world_size();
  if (m.layout().tp()) out << " (tp " << m.layout().tp() << " x sp " << m.layout().sp() << " x dp " << m.layout().dp() << ")";
  out << "\n  model signature: " << m.model_signature() << "\n";
  for (const pb::RankFile& rf : m.ranks()) {
    out << "  rank " << rf.rank() << ": " << rf.file() << ", " << rf.file_bytes() << " bytes, " << rf.tensors_size()
        << " tensors, sampler epoch " << rf.sampler().epoch() << " index " << rf.sampler().index() << ", "
        << rf.rng_state_size() << " rng words\n";
    std::map<std::string, double> scalars(rf.scalars().begin(), rf.scalars().end());
    for (const auto& [k, v] : scalars) out << "    scalar " << k << " = " << v << "\n";
    if (rf.rank() != 0) continue;  // every rank holds the same names in the usual layouts
    for (const pb::TensorEntry& e : rf.tensors()) {
      char crc[16];
      std::snprintf(crc, sizeof(crc), "%08x", e.crc32());
      out << "    " << e.name() << "  " << e.dtype() << shape_of(e) << "  " << e.length() << " bytes at " << e.offset()
          << "  crc32 " << crc << "\n";
    }
  }
  out << "  config:\n";
  std::istringstream yaml(m.config_yaml());
  for (std::string line; std::getline(yaml, line);) out << "    " << line << "\n";
  return out.str();
}

namespace {

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8E4M3: return "F8_E4M3";
    case DType::F8E5M2: return "F8_E5M2";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  LASP_FAIL() << "export_safetensors: unknown dtype";
  return "";
}

}  // namespace

void export_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors) {
  std::set<std::string> names;
  std::vector<Tensor> host;
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t offset = 0;
  for (const NamedTensor& nt : tensors) {
    LASP_CHECK(!nt.name.empty() && nt.name != "__metadata__")
        << "export_safetensors " << path << ": bad tensor name \"" << nt.name << "\"";
    LASP_CHECK(names.insert(nt.name).second) << "export_safetensors " << path << ": tensor name \"" << nt.name
                                             << "\" appears twice";
    LASP_CHECK(nt.tensor.defined()) << "export_safetensors " << path << ": tensor \"" << nt.name << "\" is not allocated";
    host.push_back(host_contiguous(nt.tensor));
    const Tensor& h = host.back();
    header += "," + json_string(nt.name) + ":{\"dtype\":\"" + safetensors_dtype(h.dtype()) + "\",\"shape\":[";
    for (int d = 0; d < h.ndim(); ++d) header += (d ? "," : "") + std::to_string(h.dim(d));
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + h.nbytes()) + "]}";
    offset += h.nbytes();
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  const uint64_t header_len = header.size();
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(header_len >> (8 * i));

  const std::string tmp = path + ".tmp";
  {
    DurableFile f(tmp);
    f.write(len_bytes, 8);
    f.write(header.data(), header.size());
    for (const Tensor& h : host) f.write(h.raw(), h.nbytes());
    f.sync_and_close();
  }
  rename_or_throw(tmp, path);
}

}  // namespace lasp
