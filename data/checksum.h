// Checksums for files that must outlive a process.
//   crc32:  the zlib / PNG / safetensors-tooling CRC (reflected polynomial 0xEDB88320), init and
//           final xor 0xFFFFFFFF: crc32("123456789") = 0xCBF43926. Checkpoints store it per tensor.
//   crc32c: the Castagnoli CRC (reflected polynomial 0x82F63B78), same conventions:
//           crc32c("123456789") = 0xE3069283. TFRecord (TensorBoard event files) frames use it.
// Both continue a running value: crc = crc32(crc, more, n) with crc = 0 to start.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lasp {

uint32_t crc32(uint32_t crc, const void* data, size_t n);
uint32_t crc32c(uint32_t crc, const void* data, size_t n);

// TFRecord's "masked" CRC32C: rotate right by 15 and add a constant.
inline uint32_t mask_crc32c(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u; }

}  // namespace lasp
