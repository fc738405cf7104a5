// Table-driven CRC32 / CRC32C, eight bytes per step ("slicing by 8"): table k holds the CRC of a
// byte followed by k zero bytes, so eight table lookups advance the CRC by eight input bytes.
#include "data/checksum.h"

#include <array>
#include <cstring>

namespace lasp {

namespace {

using CrcTables = std::array<std::array<uint32_t, 256>, 8>;

CrcTables make_tables(uint32_t poly) {
  CrcTables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
    t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k)
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  return t;
}

uint32_t crc_update(const CrcTables& t, uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);  // little-endian host (x86-64, aarch64)
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return ~crc;
}

}  // namespace

uint32_t crc32(uint32_t crc, const void* data, size_t n) {
  static const CrcTables tables = make_tables(0xEDB88320u);
  return crc_update(tables, crc, data, n);
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
  static const CrcTables tables = make_tables(0x82F63B78u);
  return crc_update(tables, crc, data, n);
}

}  // namespace lasp
