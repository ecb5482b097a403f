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

#include "pk/wgmma_operands.cuh"

namespace pk {

template <int N>
struct WgmmaBF16TransA;

template <>
struct WgmmaBF16TransA<16> {
  static __device__ __forceinline__ void mma(float (&d)[8], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {" PK_WGMMA_D(8)
      "}, %8, %9, p, 1, 1, 1, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(8, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaBF16TransA<32> {
  static __device__ __forceinline__ void mma(float (&d)[16], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {" PK_WGMMA_D(16)
      "}, %16, %17, p, 1, 1, 1, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(16, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

// Two units of eight e4m3 values (x[u].x bytes 0..3 = elements 0..3, x[u].y = 4..7), unit u
// times scale[u] -> eight bf16 each (r[u].x = elements 0 (low half) and 1, ..., r[u].w = 6, 7):
// e4m3 -> f16 -> f32 (exact), the product in f32, rounded to bf16 once. Exact when the scale is
// a power of two (the FP8 cache's quantizer, pykernels/reference/mla.py) and the product stays
// in bf16's normal range. The instructions of both units are in one list-scheduled order (for
// in-order issue: the conversion pipe's cvt interleaved with the integer unpacks and the f32
// multiplies, each result at least 4 clocks before its use).
__device__ __forceinline__ void e4m3x16_scaled_to_bf16x16(const uint2 (&x)[2], const float (&scale)[2],
                                                          uint4 (&r)[2]) {
  asm("{\n.reg .b16 a<8>, h<16>;\n.reg .b32 p<8>;\n.reg .f32 f<16>;\n"
      "mov.b32 {a6, a7}, %11;\n"
      "mov.b32 {a0, a1}, %8;\n"
      "mov.b32 {a4, a5}, %10;\n"
      "cvt.rn.f16x2.e4m3x2 p7, a7;\n"
      "mov.b32 {a2, a3}, %9;\n"
      "cvt.rn.f16x2.e4m3x2 p1, a1;\n"
      "cvt.rn.f16x2.e4m3x2 p4, a4;\n"
      "mov.b32 {h14, h15}, p7;\n"
      "cvt.rn.f16x2.e4m3x2 p3, a3;\n"
      "mov.b32 {h2, h3}, p1;\n"
      "cvt.rn.f16x2.e4m3x2 p5, a5;\n"
      "mov.b32 {h8, h9}, p4;\n"
      "cvt.rn.f16x2.e4m3x2 p6, a6;\n"
      "mov.b32 {h6, h7}, p3;\n"
      "cvt.rn.f16x2.e4m3x2 p2, a2;\n"
      "mov.b32 {h10, h11}, p5;\n"
      "cvt.rn.f16x2.e4m3x2 p0, a0;\n"
      "mov.b32 {h12, h13}, p6;\n"
      "cvt.f32.f16 f7, h7;\n"
      "mov.b32 {h4, h5}, p2;\n"
      "cvt.f32.f16 f14, h14;\n"
      "mov.b32 {h0, h1}, p0;\n"
      "cvt.f32.f16 f12, h12;\n"
      "mul.rn.f32 f7, f7, %12;\n"
      "cvt.f32.f16 f4, h4;\n"
      "mul.rn.f32 f14, f14, %13;\n"
      "cvt.f32.f16 f15, h15;\n"
      "mul.rn.f32 f12, f12, %13;\n"
      "cvt.f32.f16 f10, h10;\n"
      "mul.rn.f32 f4, f4, %12;\n"
      "cvt.f32.f16 f11, h11;\n"
      "mul.rn.f32 f15, f15, %13;\n"
      "cvt.f32.f16 f0, h0;\n"
      "mul.rn.f32 f10, f10, %13;\n"
      "cvt.f32.f16 f3, h3;\n"
      "mul.rn.f32 f11, f11, %13;\n"
      "cvt.f32.f16 f9, h9;\n"
      "mul.rn.f32 f0, f0, %12;\n"
      "cvt.f32.f16 f2, h2;\n"
      "mul.rn.f32 f3, f3, %12;\n"
      "cvt.f32.f16 f6, h6;\n"
      "mul.rn.f32 f9, f9, %13;\n"
      "cvt.f32.f16 f5, h5;\n"
      "mul.rn.f32 f2, f2, %12;\n"
      "cvt.f32.f16 f8, h8;\n"
      "mul.rn.f32 f6, f6, %12;\n"
      "cvt.f32.f16 f1, h1;\n"
      "mul.rn.f32 f5, f5, %12;\n"
      "cvt.f32.f16 f13, h13;\n"
      "mul.rn.f32 f8, f8, %13;\n"
      "mul.rn.f32 f1, f1, %12;\n"
      "cvt.rn.bf16x2.f32 %2, f5, f4;\n"
      "mul.rn.f32 f13, f13, %13;\n"
      "cvt.rn.bf16x2.f32 %4, f9, f8;\n"
      "cvt.rn.bf16x2.f32 %0, f1, f0;\n"
      "cvt.rn.bf16x2.f32 %3, f7, f6;\n"
      "cvt.rn.bf16x2.f32 %7, f15, f14;\n"
      "cvt.rn.bf16x2.f32 %6, f13, f12;\n"
      "cvt.rn.bf16x2.f32 %1, f3, f2;\n"
      "cvt.rn.bf16x2.f32 %5, f11, f10;\n}\n"
      : "=r"(r[0].x), "=r"(r[0].y), "=r"(r[0].z), "=r"(r[0].w), "=r"(r[1].x), "=r"(r[1].y), "=r"(r[1].z),
        "=r"(r[1].w)
      : "r"(x[0].x), "r"(x[0].y), "r"(x[1].x), "r"(x[1].y), "f"(scale[0]), "f"(scale[1]));
}

// Shared-memory loads at .shared::cta addresses (32-bit: half the registers of a generic
// pointer; stores: pk::st_shared_v4 in pk/ptx_mla.cuh).
__device__ __forceinline__ uint2 ld_shared_v2(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}

}  // namespace pk
