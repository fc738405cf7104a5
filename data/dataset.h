// Training data: token shards, the byte tokenizer, the built-in corpus, the sampler and the SP slice.
//
// Flow of one step:  shards / builtin text -> TokenStream -> Sampler (DP: which windows this rank
// reads) -> sp_slice (SP: which positions of each window this rank computes) -> inputs, targets.
//
// Token shard file (little-endian), memory-mapped when read:
//   offset  0: magic "LASPTOK1" (8 bytes)
//   offset  8: uint32 version = 1
//   offset 12: uint32 token_bytes (2 or 4)
//   offset 16: uint64 num_tokens
//   offset 24: uint64 reserved = 0
//   offset 32: num_tokens tokens of token_bytes each
// The file size must be exactly 32 + num_tokens * token_bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lasp {

constexpr char kTokenShardMagic[8] = {'L', 'A', 'S', 'P', 'T', 'O', 'K', '1'};
constexpr uint32_t kTokenShardVersion = 1;
constexpr int64_t kTokenShardHeaderBytes = 32;

// Writes `tokens` as one shard (token_bytes 2 or 4; every token must fit). Written to a temporary
// name and renamed, so a reader never sees a half-written shard.
void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens, int token_bytes);

// A read-only view of tokens [begin, end) of one or more shards (or an in-memory buffer),
// concatenated in the order given. Copies are cheap (shared ownership of the mappings).
class TokenStream {
 public:
  TokenStream() = default;

  // Maps every file and validates its header and size; errors name the file and the problem.
  static TokenStream open(const std::vector<std::string>& paths);
  static TokenStream from_tokens(std::vector<uint32_t> tokens,
                                 std::string description = "in-memory tokens");

  int64_t size() const { return end_ - begin_; }
  uint32_t operator[](int64_t i) const;
  // Copies tokens [i, i + n) of this view to `out` (bounds-checked, crosses shard boundaries).
  void copy(int64_t i, int64_t n, int32_t* out) const;
  // The largest token in this view (0 for an empty view); scans the view once, then cached.
  uint32_t max_token() const;
  // A sub-range view: tokens [begin, end) of this view.
  TokenStream slice(int64_t begin, int64_t end) const;
  // Human-readable origin ("builtin", "3 shards: a.bin, ...") for logs.
  const std::string& description() const;

  struct Segment;  // one shard or buffer: a base pointer, token width, token count
  struct Source;   // the segments and their cumulative starts, shared by all views

 private:
  std::shared_ptr<const Source> source_;
  int64_t begin_ = 0, end_ = 0;
  mutable int64_t max_token_cache_ = -1;
};

// Byte-level tokenizer: token = byte value (vocabulary 256).
std::vector<uint32_t> byte_tokenize(const std::string& text);
std::string byte_detokenize(const std::vector<uint32_t>& tokens);  // tokens must be < 256

// The built-in default corpus: deterministic, generated text (~1.5 MB) from a small grammar of
// sentences about people, objects, places and actions, plus arithmetic lines ("17 + 25 = 42.").
// Learnable by a byte-level model: loss falls from ln(256) ~ 5.5 nats to well under 2.5.
// One generator writes whole paragraphs until the text holds min_bytes, so a longer corpus
// starts with every shorter one (data.train "builtin:<MB>").
constexpr size_t kDefaultCorpusBytes = 1536 * 1024;
std::string default_corpus_text(size_t min_bytes = kDefaultCorpusBytes);

// Train / validation streams from the config.
//   train_spec "builtin": the default corpus; its last `val_fraction` is validation.
//   "builtin:<MB>": the same generator run to at least <MB> megabytes (0 < MB <= 1024), for runs
//   that must not repeat the 1.5 MB corpus.
//   otherwise a comma-separated list of shard paths or globs (each glob sorted, must match);
//   validation from val_spec (same syntax) or, when val_spec is empty, the tail `val_fraction`
//   of the train stream (which is then removed from train).
struct DataSplit {
  TokenStream train, val;
};
DataSplit open_data(const std::string& train_spec, const std::string& val_spec, double val_fraction);

// Deterministic distributed sampler. A window is seq_len + 1 consecutive tokens (inputs and their
// next-token targets); window w starts at w * seq_len, so there are (size - 1) / seq_len windows.
// Every epoch draws a permutation of the windows from (seed, epoch). One call of next() is one
// optimizer step: the step takes the next batch * dp_size windows of the permutation and rank r
// gets windows [r * batch, (r + 1) * batch) of them, so the windows of one step are all different.
// When fewer than batch * dp_size windows are left in the epoch the rest is skipped and the next
// epoch starts (if the stream has fewer windows than one step needs, steps wrap across epochs and
// windows repeat). position() / set_position() resume at the exact step.
struct SamplerPosition {
  uint64_t epoch = 0;  // current epoch
  uint64_t index = 0;  // windows of this epoch's permutation already consumed (all DP ranks)
};

class Sampler {
 public:
  // `stream` must outlive the sampler.
  Sampler(const TokenStream* stream, int64_t seq_len, int64_t batch, int dp_rank, int dp_size,
          uint64_t seed);
  // Fills `tokens` with this rank's batch: batch rows of seq_len + 1 tokens, row-major.
  void next(std::vector<int32_t>& tokens);
  SamplerPosition position() const { return pos_; }
  void set_position(const SamplerPosition& p);
  int64_t num_windows() const { return num_windows_; }

 private:
  const std::vector<uint32_t>& permutation(uint64_t epoch);  // cached for the current epoch

  const TokenStream* stream_;
  int64_t seq_len_, batch_;
  int dp_rank_, dp_size_;
  uint64_t seed_;
  int64_t num_windows_;
  SamplerPosition pos_;
  uint64_t perm_epoch_ = ~uint64_t{0};
  std::vector<uint32_t> perm_;
};

// The SP slice of one batch (tokens: batch rows of seq_len + 1). Rank r of W keeps positions
// [r*L, (r+1)*L) of each row, L = seq_len / W; with zigzag it keeps the chunks r and 2W-1-r of
// length L/2 (in that order). For each kept position p: inputs = tokens[p], targets = tokens[p+1].
// inputs and targets are resized to batch * L.
void sp_slice(const std::vector<int32_t>& tokens, int64_t batch, int64_t seq_len, int sp_rank,
              int sp_size, bool zigzag, std::vector<int32_t>& inputs, std::vector<int32_t>& targets);

// `lasp prepare-data --input F [F...] --output-dir D [--val-fraction 0.01] [--shard-tokens N]`:
// text files -> D/train_00000.bin ... and D/val_00000.bin with the byte tokenizer.
int prepare_data_main(int argc, char** argv);

// `lasp bench data [--seq-len N] [--batch B] [--steps S] [--shards glob]`: sampler tokens/s.
int bench_data_main(int argc, char** argv);

}  // namespace lasp
