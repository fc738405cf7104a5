// Token shards: writing, memory-mapped reading with header validation, and the concatenated view.
#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/check.h"
#include "data/dataset.h"

namespace lasp {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token shards are read in place: little-endian hosts only");

struct TokenStream::Segment {
  const uint8_t* base = nullptr;  // first token
  int token_bytes = 4;
  int64_t count = 0;
  std::shared_ptr<const void> owner;  // keeps the mapping / buffer alive
};

struct TokenStream::Source {
  std::vector<Segment> segments;
  std::vector<int64_t> starts;  // starts[i] = first global index of segment i; back() = total
  std::string description;
};

namespace {

uint32_t load_token(const uint8_t* base, int token_bytes, int64_t i) {
  if (token_bytes == 2) {
    uint16_t v;
    std::memcpy(&v, base + 2 * i, 2);
    return v;
  }
  uint32_t v;
  std::memcpy(&v, base + 4 * i, 4);
  return v;
}

struct MappedFile {
  void* addr = nullptr;
  size_t length = 0;
  ~MappedFile() {
    if (addr) munmap(addr, length);
  }
};

// Maps one shard and validates it; errors name the file and what is wrong.
TokenStream::Segment map_shard(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LASP_CHECK(fd >= 0) << "token shard " << path << ": cannot open (" << std::strerror(errno) << ")";
  struct stat st;
  const int stat_rc = fstat(fd, &st);
  const int stat_errno = errno;
  if (stat_rc != 0 || !S_ISREG(st.st_mode)) ::close(fd);
  LASP_CHECK(stat_rc == 0) << "token shard " << path << ": cannot stat (" << std::strerror(stat_errno) << ")";
  LASP_CHECK(S_ISREG(st.st_mode)) << "token shard " << path << ": not a regular file";
  const int64_t file_bytes = st.st_size;
  if (file_bytes < kTokenShardHeaderBytes) ::close(fd);
  LASP_CHECK(file_bytes >= kTokenShardHeaderBytes)
      << "token shard " << path << ": truncated header (" << file_bytes << " bytes, the header is "
      << kTokenShardHeaderBytes << ")";
  auto mapping = std::make_shared<MappedFile>();
  mapping->length = static_cast<size_t>(file_bytes);
  void* addr = mmap(nullptr, mapping->length, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  LASP_CHECK(addr != MAP_FAILED) << "token shard " << path << ": mmap failed (" << std::strerror(map_errno) << ")";
  mapping->addr = addr;
  const auto* bytes = static_cast<const uint8_t*>(addr);

  LASP_CHECK(std::memcmp(bytes, kTokenShardMagic, 8) == 0)
      << "token shard " << path << ": wrong magic (expected \"LASPTOK1\"; not a lasp token shard)";
  uint32_t version, token_bytes;
  uint64_t num_tokens, reserved;
  std::memcpy(&version, bytes + 8, 4);
  std::memcpy(&token_bytes, bytes + 12, 4);
  std::memcpy(&num_tokens, bytes + 16, 8);
  std::memcpy(&reserved, bytes + 24, 8);
  LASP_CHECK(version == kTokenShardVersion)
      << "token shard " << path << ": unsupported version " << version << " (expected " << kTokenShardVersion << ")";
  LASP_CHECK(token_bytes == 2 || token_bytes == 4)
      << "token shard " << path << ": token_bytes is " << token_bytes << ", expected 2 or 4";
  LASP_CHECK(reserved == 0) << "token shard " << path << ": reserved header field is " << reserved << ", expected 0";
  const uint64_t payload = static_cast<uint64_t>(file_bytes - kTokenShardHeaderBytes);
  LASP_CHECK(num_tokens <= payload / token_bytes)
      << "token shard " << path << ": truncated: header says " << num_tokens << " tokens ("
      << num_tokens * token_bytes << " bytes) but the file holds " << payload << " bytes of tokens";
  LASP_CHECK(num_tokens * token_bytes == payload)
      << "token shard " << path << ": size mismatch: header says " << num_tokens << " tokens of "
      << token_bytes << " bytes but the file holds " << payload << " bytes of tokens";

  TokenStream::Segment seg;
  seg.base = bytes + kTokenShardHeaderBytes;
  seg.token_bytes = static_cast<int>(token_bytes);
  seg.count = static_cast<int64_t>(num_tokens);
  seg.owner = mapping;
  return seg;
}

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\n");
  if (a == std::string::npos) return "";
  const size_t b = s.find_last_not_of(" \t\n");
  return s.substr(a, b - a + 1);
}

// "a.bin, dir/train_*.bin" -> the paths, globs expanded and sorted, in order of the list.
std::vector<std::string> expand_spec(const std::string& spec, const char* what) {
  std::vector<std::string> paths;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string::npos) comma = spec.size();
    const std::string item = trim(spec.substr(start, comma - start));
    start = comma + 1;
    if (item.empty()) continue;
    if (!has_glob_chars(item)) {
      paths.push_back(item);
      continue;
    }
    glob_t g;
    const int rc = ::glob(item.c_str(), 0, nullptr, &g);
    if (rc == 0) {
      std::vector<std::string> matches(g.gl_pathv, g.gl_pathv + g.gl_pathc);
      std::sort(matches.begin(), matches.end());
      paths.insert(paths.end(), matches.begin(), matches.end());
    }
    globfree(&g);
    LASP_CHECK(rc == 0) << what << ": the pattern \"" << item << "\" matches no file";
  }
  LASP_CHECK(!paths.empty()) << what << ": \"" << spec << "\" names no shard file";
  return paths;
}

}  // namespace

void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens, int token_bytes) {
  LASP_CHECK(token_bytes == 2 || token_bytes == 4)
      << "write_token_shard " << path << ": token_bytes must be 2 or 4, got " << token_bytes;
  std::vector<uint8_t> buf(kTokenShardHeaderBytes + tokens.size() * token_bytes);
  std::memcpy(buf.data(), kTokenShardMagic, 8);
  const uint32_t version = kTokenShardVersion, tb = static_cast<uint32_t>(token_bytes);
  const uint64_t n = tokens.size(), reserved = 0;
  std::memcpy(buf.data() + 8, &version, 4);
  std::memcpy(buf.data() + 12, &tb, 4);
  std::memcpy(buf.data() + 16, &n, 8);
  std::memcpy(buf.data() + 24, &reserved, 8);
  uint8_t* out = buf.data() + kTokenShardHeaderBytes;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (token_bytes == 2) {
      LASP_CHECK(tokens[i] <= 0xFFFF) << "write_token_shard " << path << ": token " << tokens[i]
                                       << " at index " << i << " does not fit in 2 bytes";
      const uint16_t v = static_cast<uint16_t>(tokens[i]);
      std::memcpy(out + 2 * i, &v, 2);
    } else {
      std::memcpy(out + 4 * i, &tokens[i], 4);
    }
  }
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  LASP_CHECK(f) << "write_token_shard: cannot create " << tmp << " (" << std::strerror(errno) << ")";
  const size_t written = std::fwrite(buf.data(), 1, buf.size(), f);
  const bool ok = written == buf.size() && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  std::fclose(f);
  if (!ok) std::remove(tmp.c_str());
  LASP_CHECK(ok) << "write_token_shard: writing " << tmp << " failed (" << std::strerror(errno) << ")";
  LASP_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0)
      << "write_token_shard: cannot rename " << tmp << " to " << path << " (" << std::strerror(errno) << ")";
}

TokenStream TokenStream::open(const std::vector<std::string>& paths) {
  LASP_CHECK(!paths.empty()) << "TokenStream::open: no shard paths given";
  auto src = std::make_shared<Source>();
  src->starts.push_back(0);
  for (const std::string& p : paths) {
    src->segments.push_back(map_shard(p));
    src->starts.push_back(src->starts.back() + src->segments.back().count);
  }
  src->description = std::to_string(paths.size()) + (paths.size() == 1 ? " shard: " : " shards: ") + paths[0];
  if (paths.size() > 1) src->description += ", ...";
  TokenStream s;
  s.end_ = src->starts.back();
  s.source_ = std::move(src);
  return s;
}

TokenStream TokenStream::from_tokens(std::vector<uint32_t> tokens, std::string description) {
  auto buffer = std::make_shared<std::vector<uint32_t>>(std::move(tokens));
  auto src = std::make_shared<Source>();
  Segment seg;
  seg.base = reinterpret_cast<const uint8_t*>(buffer->data());
  seg.token_bytes = 4;
  seg.count = static_cast<int64_t>(buffer->size());
  seg.owner = buffer;
  src->segments.push_back(seg);
  src->starts = {0, seg.count};
  src->description = std::move(description);
  TokenStream s;
  s.end_ = seg.count;
  s.source_ = std::move(src);
  return s;
}

uint32_t TokenStream::operator[](int64_t i) const {
  LASP_CHECK(i >= 0 && i < size()) << "TokenStream index " << i << " out of range [0, " << size() << ")";
  const int64_t g = begin_ + i;
  const auto& starts = source_->starts;
  const size_t k = std::upper_bound(starts.begin(), starts.end(), g) - starts.begin() - 1;
  const Segment& seg = source_->segments[k];
  return load_token(seg.base, seg.token_bytes, g - starts[k]);
}

void TokenStream::copy(int64_t i, int64_t n, int32_t* out) const {
  LASP_CHECK(i >= 0 && n >= 0 && i + n <= size())
      << "TokenStream::copy [" << i << ", " << i + n << ") out of range [0, " << size() << ")";
  if (n == 0) return;
  int64_t g = begin_ + i;
  const auto& starts = source_->starts;
  size_t k = std::upper_bound(starts.begin(), starts.end(), g) - starts.begin() - 1;
  while (n > 0) {
    const Segment& seg = source_->segments[k];
    const int64_t off = g - starts[k];
    const int64_t take = std::min(n, seg.count - off);
    if (seg.token_bytes == 2) {
      for (int64_t j = 0; j < take; ++j) out[j] = static_cast<int32_t>(load_token(seg.base, 2, off + j));
    } else {
      for (int64_t j = 0; j < take; ++j) out[j] = static_cast<int32_t>(load_token(seg.base, 4, off + j));
    }
    out += take;
    g += take;
    n -= take;
    ++k;
  }
}

uint32_t TokenStream::max_token() const {
  if (max_token_cache_ >= 0) return static_cast<uint32_t>(max_token_cache_);
  uint32_t m = 0;
  if (size() > 0) {
    const auto& starts = source_->starts;
    for (size_t k = 0; k < source_->segments.size(); ++k) {
      const int64_t lo = std::max(begin_, starts[k]), hi = std::min(end_, starts[k + 1]);
      const Segment& seg = source_->segments[k];
      for (int64_t g = lo; g < hi; ++g) m = std::max(m, load_token(seg.base, seg.token_bytes, g - starts[k]));
    }
  }
  max_token_cache_ = m;
  return m;
}

TokenStream TokenStream::slice(int64_t begin, int64_t end) const {
  LASP_CHECK(0 <= begin && begin <= end && end <= size())
      << "TokenStream::slice [" << begin << ", " << end << ") out of range [0, " << size() << "]";
  TokenStream s;
  s.source_ = source_;
  s.begin_ = begin_ + begin;
  s.end_ = begin_ + end;
  return s;
}

const std::string& TokenStream::description() const {
  static const std::string empty = "empty";
  return source_ ? source_->description : empty;
}

DataSplit open_data(const std::string& train_spec, const std::string& val_spec, double val_fraction) {
  LASP_CHECK(val_fraction >= 0 && val_fraction < 1)
      << "data.val_fraction must be in [0, 1), got " << val_fraction;
  DataSplit split;
  TokenStream train;
  const std::string spec = trim(train_spec);
  if (spec == "builtin" || spec.rfind("builtin:", 0) == 0) {
    size_t bytes = kDefaultCorpusBytes;
    if (spec != "builtin") {
      const std::string mb = spec.substr(8);
      char* end = nullptr;
      const double v = std::strtod(mb.c_str(), &end);
      LASP_CHECK(!mb.empty() && end && *end == '\0' && v > 0 && v <= 1024)
          << "data.train \"" << spec << "\": expected builtin:<MB> with 0 < MB <= 1024 (megabytes of generated text)";
      bytes = static_cast<size_t>(v * 1024 * 1024);
    }
    train = TokenStream::from_tokens(byte_tokenize(default_corpus_text(bytes)),
                                     spec == "builtin" ? "builtin corpus" : "builtin corpus (" + spec.substr(8) + " MB)");
  } else {
    LASP_CHECK(!trim(train_spec).empty()) << "data.train is empty: give \"builtin\" or shard paths/globs";
    train = TokenStream::open(expand_spec(train_spec, "data.train"));
  }
  if (!trim(val_spec).empty()) {
    LASP_CHECK(trim(val_spec) != "builtin") << "data.val cannot be \"builtin\": leave it empty and set data.val_fraction";
    split.val = TokenStream::open(expand_spec(val_spec, "data.val"));
    split.train = train;
  } else {
    const int64_t n = train.size();
    const int64_t n_val = static_cast<int64_t>(static_cast<double>(n) * val_fraction);
    split.train = train.slice(0, n - n_val);
    split.val = train.slice(n - n_val, n);
  }
  LASP_CHECK(split.train.size() > 0) << "data.train \"" << train_spec << "\" holds no tokens";
  return split;
}

}  // namespace lasp
