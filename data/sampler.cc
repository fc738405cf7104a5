// The distributed sampler (DP: which windows) and the SP slice (which positions of a window).
#include <numeric>
#include <utility>

#include "core/check.h"
#include "core/random.h"
#include "data/dataset.h"

namespace lasp {

namespace {

// Uniform in [0, n), exact (Lemire's multiply-shift with rejection).
uint64_t uniform_below(uint64_t& state, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
  while (true) {
    const unsigned __int128 m = static_cast<unsigned __int128>(splitmix64(state)) * n;
    if (static_cast<uint64_t>(m) >= threshold) return static_cast<uint64_t>(m >> 64);
  }
}

}  // namespace

Sampler::Sampler(const TokenStream* stream, int64_t seq_len, int64_t batch, int dp_rank, int dp_size,
                 uint64_t seed)
    : stream_(stream), seq_len_(seq_len), batch_(batch), dp_rank_(dp_rank), dp_size_(dp_size), seed_(seed) {
  LASP_CHECK(stream_ != nullptr) << "Sampler: no token stream";
  LASP_CHECK(seq_len_ >= 1) << "Sampler: seq_len must be >= 1, got " << seq_len_;
  LASP_CHECK(batch_ >= 1) << "Sampler: batch must be >= 1, got " << batch_;
  LASP_CHECK(dp_size_ >= 1 && dp_rank_ >= 0 && dp_rank_ < dp_size_)
      << "Sampler: dp_rank " << dp_rank_ << " is not in [0, dp_size = " << dp_size_ << ")";
  num_windows_ = stream_->size() > 0 ? (stream_->size() - 1) / seq_len_ : 0;
  LASP_CHECK(num_windows_ >= 1) << "Sampler: the data (" << stream_->description() << ", "
                                << stream_->size() << " tokens) is shorter than one window of seq_len + 1 = "
                                << seq_len_ + 1 << " tokens";
  LASP_CHECK(num_windows_ <= int64_t{0xFFFFFFFF})
      << "Sampler: " << num_windows_ << " windows is more than this sampler indexes (2^32 - 1); raise seq_len";
}

const std::vector<uint32_t>& Sampler::permutation(uint64_t epoch) {
  if (epoch == perm_epoch_) return perm_;
  perm_.resize(static_cast<size_t>(num_windows_));
  std::iota(perm_.begin(), perm_.end(), 0u);
  uint64_t state = seed_ ^ 0x5A3C9E1F00000000ull;
  state = splitmix64(state) ^ (epoch * 0xD1B54A32D192ED03ull);
  for (size_t i = perm_.size(); i > 1; --i) {  // Fisher-Yates
    const size_t j = static_cast<size_t>(uniform_below(state, i));
    std::swap(perm_[i - 1], perm_[j]);
  }
  perm_epoch_ = epoch;
  return perm_;
}

void Sampler::next(std::vector<int32_t>& tokens) {
  const uint64_t n = static_cast<uint64_t>(num_windows_);
  const uint64_t global = static_cast<uint64_t>(batch_) * static_cast<uint64_t>(dp_size_);
  // A step never mixes epochs unless one epoch is too small for a step.
  if (n >= global && pos_.index + global > n) {
    ++pos_.epoch;
    pos_.index = 0;
  }
  const int64_t row = seq_len_ + 1;
  tokens.resize(static_cast<size_t>(batch_ * row));
  for (int64_t b = 0; b < batch_; ++b) {
    const uint64_t j = pos_.index + static_cast<uint64_t>(dp_rank_) * batch_ + b;
    const uint64_t window = permutation(pos_.epoch + j / n)[j % n];
    stream_->copy(static_cast<int64_t>(window) * seq_len_, row, tokens.data() + b * row);
  }
  pos_.index += global;
  pos_.epoch += pos_.index / n;
  pos_.index %= n;
}

void Sampler::set_position(const SamplerPosition& p) {
  LASP_CHECK(p.index < static_cast<uint64_t>(num_windows_))
      << "Sampler::set_position: index " << p.index << " is past the " << num_windows_
      << " windows of an epoch (was the checkpoint written with other data or seq_len?)";
  pos_ = p;
}

void sp_slice(const std::vector<int32_t>& tokens, int64_t batch, int64_t seq_len, int sp_rank,
              int sp_size, bool zigzag, std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  LASP_CHECK(batch >= 1 && seq_len >= 1) << "sp_slice: batch " << batch << " and seq_len " << seq_len
                                         << " must be positive";
  LASP_CHECK(static_cast<int64_t>(tokens.size()) == batch * (seq_len + 1))
      << "sp_slice: tokens holds " << tokens.size() << " values, expected batch * (seq_len + 1) = "
      << batch * (seq_len + 1);
  LASP_CHECK(sp_size >= 1 && sp_rank >= 0 && sp_rank < sp_size)
      << "sp_slice: sp_rank " << sp_rank << " is not in [0, sp_size = " << sp_size << ")";
  LASP_CHECK(seq_len % sp_size == 0) << "sp_slice: seq_len " << seq_len << " is not divisible by sp_size " << sp_size;
  const int64_t L = seq_len / sp_size;
  LASP_CHECK(!zigzag || L % 2 == 0) << "sp_slice: zigzag needs seq_len divisible by 2 * sp_size, got seq_len "
                                    << seq_len << " and sp_size " << sp_size;
  // The kept ranges of positions of a row, in order.
  int64_t starts[2], lens[2];
  int parts;
  if (zigzag) {
    const int64_t h = L / 2;
    starts[0] = sp_rank * h;
    starts[1] = (2 * sp_size - 1 - sp_rank) * h;
    lens[0] = lens[1] = h;
    parts = 2;
  } else {
    starts[0] = sp_rank * L;
    lens[0] = L;
    parts = 1;
  }
  inputs.resize(static_cast<size_t>(batch * L));
  targets.resize(static_cast<size_t>(batch * L));
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = tokens.data() + b * (seq_len + 1);
    int32_t* in = inputs.data() + b * L;
    int32_t* tg = targets.data() + b * L;
    for (int k = 0; k < parts; ++k) {
      for (int64_t i = 0; i < lens[k]; ++i) {
        *in++ = row[starts[k] + i];
        *tg++ = row[starts[k] + i + 1];
      }
    }
  }
}

}  // namespace lasp
