// Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11), keyed by a 64-bit seed and
// addressed by a 64-bit stream and a 64-bit index. Every draw is a pure function of
// (seed, stream, index), so a CPU loop and a CUDA kernel that visit elements in any order produce
// identical numbers; no generator state is carried between calls.
//
// Conventions used by the quantizers (kernels/quantize.h) and the randomized Hadamard transform:
//   element draw for stochastic rounding   philox_element_uniform(seed, stream, flat element index):
//                                           word i % 4 of the block at index i / 4, so one Philox
//                                           evaluation serves four consecutive elements (until
//                                           2026-12-02 each element took word 0 of its own block)
//   MS-EDEN group-scale draw                philox_uniform(seed, stream | kScaleStreamBit, group index)
//   Hadamard sign of column j (in a block)  philox_u32(seed, kHadamardSignStream, j) & 1
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LASP_HOST_DEVICE __host__ __device__
#else
#define LASP_HOST_DEVICE
#endif

namespace lasp {

constexpr uint64_t kScaleStreamBit = uint64_t{1} << 63;
constexpr uint64_t kHadamardSignStream = uint64_t{1} << 62;

struct Philox4x32 {
  uint32_t v[4];
};

// Ten Philox rounds on the 128-bit counter (c0..c3) with the 64-bit key (k0, k1).
LASP_HOST_DEVICE inline Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// 32 random bits for (seed, stream, index): counter = (index, stream), key = seed.
LASP_HOST_DEVICE inline uint32_t philox_u32(uint64_t seed, uint64_t stream, uint64_t index) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
      .v[0];
}

// A uniform float in [0, 1) with 24 random bits (exact in fp32) from 32 random bits.
LASP_HOST_DEVICE inline float uniform_from_bits(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// A uniform float in [0, 1) for (seed, stream, index) (word 0 of the block).
LASP_HOST_DEVICE inline float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return uniform_from_bits(philox_u32(seed, stream, index));
}

// The four words of the block at `block` for (seed, stream).
LASP_HOST_DEVICE inline Philox4x32 philox_block(uint64_t seed, uint64_t stream, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Word k (0..3) of a block, selected without indexing (a run-time index would put a CUDA
// thread's block in local memory).
LASP_HOST_DEVICE inline uint32_t philox_word(const Philox4x32& b, uint32_t k) {
  return k == 0 ? b.v[0] : k == 1 ? b.v[1] : k == 2 ? b.v[2] : b.v[3];
}

// The element draw of stochastic rounding: element i takes word i % 4 of block i / 4.
LASP_HOST_DEVICE inline float philox_element_uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  return uniform_from_bits(philox_word(philox_block(seed, stream, i >> 2), static_cast<uint32_t>(i & 3)));
}

// philox_element_uniform for elements visited mostly in order: the last block is kept, so a run
// of consecutive elements costs one Philox evaluation per four. Same values in any order.
struct PhiloxElementDraws {
  uint64_t seed = 0, stream = 0;
  uint64_t block = ~uint64_t{0};
  Philox4x32 words{};
  LASP_HOST_DEVICE PhiloxElementDraws(uint64_t seed_, uint64_t stream_) : seed(seed_), stream(stream_) {}
  LASP_HOST_DEVICE float operator()(uint64_t i) {
    if ((i >> 2) != block) {
      block = i >> 2;
      words = philox_block(seed, stream, block);
    }
    return uniform_from_bits(philox_word(words, static_cast<uint32_t>(i & 3)));
  }
};

}  // namespace lasp
