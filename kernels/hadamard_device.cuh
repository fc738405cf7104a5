// Device pieces of the blockwise Hadamard transform, shared by hadamard_cuda (kernels/hadamard.cu)
// and the FP4 quantizer's fused rotation (kernels/quantize.cu), so both apply the CPU's butterfly
// stages (kernels/hadamard.cc) in the same order with the same float operations.
//
// A block of G elements is held by kLanes = min(G, 32) lanes of a warp, kPerLane = G / kLanes
// registers each: lane l holds elements e * kLanes + l. Stages h < kLanes are lane shuffles,
// stages h >= kLanes pairs of registers; each replaces (a, b) by (a + b, a - b), the upper
// element computing a - b from its partner a.
#pragma once

#include <cstdint>

#include "kernels/counter_rng.h"

namespace lasp {

template <int G>
struct HadamardLanes {
  static constexpr int kLanes = G >= 32 ? 32 : G;          // lanes per block
  static constexpr int kPerLane = G / kLanes;              // elements per lane
  static constexpr int kBlocksPerWarp = 32 / kLanes;       // blocks side by side in a warp
};

// The unnormalized butterfly of the block this lane holds part of (l = lane % kLanes). Every lane
// of the warp must call it (the shuffles are warp-wide).
template <int G>
__device__ __forceinline__ void hadamard_butterfly(float (&v)[HadamardLanes<G>::kPerLane], int l) {
  constexpr int kLanes = HadamardLanes<G>::kLanes, kPerLane = HadamardLanes<G>::kPerLane;
#pragma unroll
  for (int h = 1; h < kLanes; h *= 2) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const float p = __shfl_xor_sync(0xffffffffu, v[e], h);
      v[e] = (l & h) ? p - v[e] : v[e] + p;
    }
  }
#pragma unroll
  for (int hb = 1; hb < kPerLane; hb *= 2) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      if ((e & hb) == 0) {
        const float a = v[e], c = v[e | hb];
        v[e] = a + c;
        v[e | hb] = a - c;
      }
    }
  }
}

// The G signs of a rotation into shared memory (+1, or -1 where the randomized spec's draw is
// odd: philox_u32(seed, kHadamardSignStream, j) & 1, as hadamard_sign on the CPU), by the CTA.
template <int G>
__device__ __forceinline__ void hadamard_signs(float* sign, bool randomized, uint64_t seed) {
  for (int j = threadIdx.x; j < G; j += blockDim.x) {
    sign[j] =
        randomized && (philox_u32(seed, kHadamardSignStream, static_cast<uint64_t>(j)) & 1u) ? -1.0f : 1.0f;
  }
}

}  // namespace lasp
