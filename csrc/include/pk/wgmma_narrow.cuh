// pk/wgmma_narrow.cuh — the bf16 wgmma form of the narrow MLA decode's O^T = V^T P^T
// (csrc/mla/decode_narrow.cu): A MN-major ("transposed": V stored [key][column] read as
// V^T [column][key]) and B K-major, both from shared memory, N = 16 or 32 query rows.
//
// Syntax (PTX ISA): wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 d, a-desc, b-desc,
// scale-d, imm-scale-a, imm-scale-b, imm-trans-a = 1, imm-trans-b = 0. Fragment of d as in
// pk/ptx.cuh: d[i] of thread t is row 16*(t/32) + (t%32)/4 + 8*((i>>1)&1), column
// 8*(i>>2) + 2*(t%4) + (i&1). scale_d = 0 ignores the old d.
#pragma once

#include <cstdint>

namespace pk {

template <int N>
struct WgmmaBF16TransA;

template <>
struct WgmmaBF16TransA<16> {
  static __device__ __forceinline__ void mma(float (&d)[8], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, %8, %9, p, 1, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaBF16TransA<32> {
  static __device__ __forceinline__ void mma(float (&d)[16], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

// Eight e4m3 values (x.x bytes 0..3 = elements 0..3, x.y = elements 4..7) times `scale` ->
// eight bf16 (r.x = elements 0 (low half) and 1, ..., r.w = 6, 7): e4m3 -> f16 -> f32 (exact),
// the product in f32, rounded to bf16 once. Exact when scale is a power of two (the FP8
// cache's quantizer, pykernels/reference/mla.py) and the product stays in bf16's normal range.
__device__ __forceinline__ uint4 e4m3x8_scaled_to_bf16x8(uint2 x, float scale) {
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
      "mul.rn.f32 f0, f0, %6;\n"
      "mul.rn.f32 f1, f1, %6;\n"
      "mul.rn.f32 f2, f2, %6;\n"
      "mul.rn.f32 f3, f3, %6;\n"
      "mul.rn.f32 f4, f4, %6;\n"
      "mul.rn.f32 f5, f5, %6;\n"
      "mul.rn.f32 f6, f6, %6;\n"
      "mul.rn.f32 f7, f7, %6;\n"
      "cvt.rn.bf16x2.f32 %0, f1, f0;\n"
      "cvt.rn.bf16x2.f32 %1, f3, f2;\n"
      "cvt.rn.bf16x2.f32 %2, f5, f4;\n"
      "cvt.rn.bf16x2.f32 %3, f7, f6;\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "r"(x.x), "r"(x.y), "f"(scale));
  return r;
}

}  // namespace pk
