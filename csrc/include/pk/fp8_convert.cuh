// pk/fp8_convert.cuh — e4m3 -> bf16 conversion of a whole 16-byte bf16 unit (eight values),
// the exact rule of pk::e4m3x4_to_bf16x4 (pk/ptx_mla.cuh) with the eight values' steps
// interleaved in one asm block, so no conversion waits on the result of the one just before
// it (the in-order issue of a warp sees independent instructions back to back).
//
// Exact: e4m3 -> f16 (cvt.rn.f16x2.e4m3x2, sm_89+; the low byte goes to the low half) -> f32
// -> bf16; every e4m3 value (normal or subnormal, |x| <= 448) is representable in all three,
// and NaN (0x7F / 0xFF) stays NaN.
#pragma once

#include <cstdint>

namespace pk {

// Eight e4m3 values (x.x bytes 0..3 = elements 0..3, x.y = elements 4..7) -> eight bf16:
// r.x = elements 0 (low half) and 1, r.y = 2, 3, r.z = 4, 5, r.w = 6, 7.
__device__ __forceinline__ uint4 e4m3x8_to_bf16x8(uint2 x) {
  uint4 r;
  asm("{\n.reg .b16 a0, a1, a2, a3, h0, h1, h2, h3, h4, h5, h6, h7;\n"
      ".reg .b32 p0, p1, p2, p3;\n.reg .f32 f0, f1, f2, f3, f4, f5, f6, f7;\n"
      "mov.b32 {a0, a1}, %4;\n"
      "mov.b32 {a2, a3}, %5;\n"
      "cvt.rn.f16x2.e4m3x2 p0, a0;\n"
      "cvt.rn.f16x2.e4m3x2 p1, a1;\n"
      "cvt.rn.f16x2.e4m3x2 p2, a2;\n"
      "cvt.rn.f16x2.e4m3x2 p3, a3;\n"
      "mov.b32 {h0, h1}, p0;\n"
      "mov.b32 {h2, h3}, p1;\n"
      "mov.b32 {h4, h5}, p2;\n"
      "mov.b32 {h6, h7}, p3;\n"
      "cvt.f32.f16 f0, h0;\n"
      "cvt.f32.f16 f1, h1;\n"
      "cvt.f32.f16 f2, h2;\n"
      "cvt.f32.f16 f3, h3;\n"
      "cvt.f32.f16 f4, h4;\n"
      "cvt.f32.f16 f5, h5;\n"
      "cvt.f32.f16 f6, h6;\n"
      "cvt.f32.f16 f7, h7;\n"
      "cvt.rn.bf16x2.f32 %0, f1, f0;\n"
      "cvt.rn.bf16x2.f32 %1, f3, f2;\n"
      "cvt.rn.bf16x2.f32 %2, f5, f4;\n"
      "cvt.rn.bf16x2.f32 %3, f7, f6;\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "r"(x.x), "r"(x.y));
  return r;
}

}  // namespace pk
