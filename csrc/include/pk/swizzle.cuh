// pk/swizzle.cuh — the 128-byte shared-memory swizzle (TMA CU_TENSOR_MAP_SWIZZLE_128B, wgmma
// layout type 1) as one named address rule, for kernels that write such tiles with st.shared.
//
// A swizzled tile is stored in rows of 128 bytes = eight 16-byte units; unit u of row r lives
// at unit position u XOR (r mod 8). Rows are consecutive, so an 8-row atom is 1024 bytes and
// must start 1024-byte aligned (the pattern repeats every atom).
#pragma once

#include <cstdint>

namespace pk {

constexpr uint32_t kSwizzleRowBytes = 128;   // one row of a 128B-swizzled tile
constexpr uint32_t kSwizzleUnitBytes = 16;   // the permuted unit
constexpr uint32_t kSwizzleRows = 8;         // rows per atom (the XOR pattern's period)

// Byte offset, inside a 128B-swizzled tile, of 16-byte unit `unit` (0..7) of row `row`.
__device__ __forceinline__ uint32_t swizzle128_unit(uint32_t row, uint32_t unit) {
  return row * kSwizzleRowBytes + ((unit ^ (row % kSwizzleRows)) * kSwizzleUnitBytes);
}

// Byte offset of byte `byte` (0..127) of row `row` (the unit is swizzled, the byte inside
// the unit is not).
__device__ __forceinline__ uint32_t swizzle128_byte(uint32_t row, uint32_t byte) {
  return swizzle128_unit(row, byte / kSwizzleUnitBytes) + byte % kSwizzleUnitBytes;
}

}  // namespace pk
