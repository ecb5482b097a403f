// pk/ptx_mla.cuh — inline-PTX wrappers the MLA decode kernel (csrc/mla/) needs beyond
// pk/ptx.cuh: bf16 wgmma shapes (K-major B for Q.K^T, MN-major "transposed" B for P.V, the
// latter also on half an accumulator for the FP8 cache and with A (P) in registers), the
// MN-major 128-byte-swizzle matrix descriptor, bar.arrive, the approximate ex2 / lg2, the
// online softmax's exponent rule, and the exact e4m3 -> bf16 conversion (also scaled by a power
// of two, for the FP8 cache).
//
// Same conventions as pk/ptx.cuh (written against the PTX ISA exactly, because the CPU
// emulator runs the same PTX): every wrapper is __forceinline__, no labels in asm,
// shared-memory operands are 32-bit .shared::cta offsets.
#pragma once

#include <cstdint>

#include "pk/ptx.cuh"
#include "pk/wgmma_bf16.cuh"
#include "pk/wgmma_operands.cuh"

namespace pk {

// ---------------------------------------------------------------------------------------
// Matrix descriptors (bits 0-13 start >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 62-63 layout)
// ---------------------------------------------------------------------------------------

// MN-major ("transposed") operand stored with the 128-byte swizzle: each 8 x 128-byte atom
// holds 64 consecutive MN elements (bf16) of 8 consecutive K rows. Canonical layout (CuTe
// notation, T = 8 elements of 16 bits): ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), i.e.
// LBO = byte distance between atoms along MN (the next 64 columns), SBO = byte distance
// between atoms along K (the next 8 K rows; 1024 for densely stacked atoms).
// Atoms must be 1024-byte aligned (base offset 0).
__device__ __forceinline__ uint64_t make_desc_mn128b(uint32_t smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t desc = (uint64_t)((smem & 0x3FFFFu) >> 4);       // bits 0-13: start address >> 4
  desc |= (uint64_t)((lbo_bytes >> 4) & 0x3FFFu) << 16;     // bits 16-29: leading byte offset >> 4
  desc |= (uint64_t)((sbo_bytes >> 4) & 0x3FFFu) << 32;     // bits 32-45: stride byte offset >> 4
  desc |= (uint64_t)1 << 62;                                // bits 62-63: 1 = 128-byte swizzle
  return desc;
}

// ---------------------------------------------------------------------------------------
// wgmma, bf16 inputs, f32 accumulators, both operands in shared memory (descriptors)
// ---------------------------------------------------------------------------------------
// Syntax (PTX ISA, .bf16 form with A from shared memory):
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 d, a-desc, b-desc, scale-d,
//       imm-scale-a, imm-scale-b, imm-trans-a, imm-trans-b;
// Fragment of d as in pk/ptx.cuh: d[i] of thread t is row 16*(t/32) + (t%32)/4 +
// 8*((i>>1)&1), column 8*(i>>2) + 2*(t%4) + (i&1). scale_d = 0 ignores the old d.

// Both operands K-major in shared memory: pk::WgmmaBF16<N> (pk/wgmma_bf16.cuh), shared with the
// bf16 GEMM.

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256] with A in registers (four .b32 of bf16 pairs per
// thread, the fragment of an m64n16 accumulator: a[0] row r cols 2(t%4)+{0,1}, a[1] row r + 8,
// a[2] / a[3] the same rows at cols + 8, r = 16 warp + lane / 4) and B MN-major in shared
// memory (imm-trans-b = 1). The register form has no imm-trans-a.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rt(float (&d)[128], const uint32_t (&a)[4],
                                                         uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" PK_WGMMA_D(128)
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(128, d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256]: A K-major, B MN-major (imm-trans-b = 1: B is
// stored with its N index contiguous, e.g. V rows of a K-cache block read as [key][column]).
__device__ __forceinline__ void wgmma_m64n256k16_bf16_kt(float (&d)[128], uint64_t desc_a,
                                                          uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" PK_WGMMA_D(128)
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(128, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D[64 x 128] (+)= A[64 x 16] * B[16 x 128], A K-major, B MN-major (imm-trans-b = 1), with D
// the 64 registers d[kOff .. kOff + 63] of a larger accumulator: two of these with kOff = 0
// and 64 hold the same fragment as one m64n256k16 (columns 0..127, 128..255), so the two
// column halves can take different A operands (the FP8 cache's per-group scaled P tiles).
template <int kOff>
__device__ __forceinline__ void wgmma_m64n128k16_bf16_kt(float (&d)[128], uint64_t desc_a,
                                                          uint64_t desc_b, uint32_t scale_d) {
  static_assert(kOff == 0 || kOff == 64, "one of the two column halves");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" PK_WGMMA_D(64)
      "}, %64, %65, p, 1, 1, 0, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS_FROM(64, d, kOff)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// ---------------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------------

// fence_operand (pk/ptx.cuh) for a .b32 operand: pins an A fragment register of a wgmma with
// A in registers between asm statements, so it is neither rewritten nor reallocated before the
// wgmma.wait_group that retires its reader.
__device__ __forceinline__ void fence_operand(uint32_t& r) {
  asm volatile("" : "+r"(r)::"memory");
}

// 32-bit store to shared memory at a .shared::cta address (for addresses computed as such,
// e.g. swizzled by XOR, which a generic pointer would not express).
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// cp.async of 4 bytes (global -> shared, through L1), one commit group, waiting for all.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// 32-bit load from shared memory at a .shared::cta address.
__device__ __forceinline__ int ld_shared_s32(uint32_t addr) {
  int v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

// 16-bit store to shared memory at a .shared::cta address.
__device__ __forceinline__ void st_shared_b16(uint32_t addr, uint16_t v) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}

// 16-byte store to shared memory at a .shared::cta address.
__device__ __forceinline__ void st_shared_v4(uint32_t addr, const uint4& v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Arrive on named barrier `id` over `count` threads without waiting (bar.arrive: the other
// threads of the count wait with bar.sync). Memory accesses before it are ordered before
// the waiters' accesses after their bar.sync.
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// ---------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------

// 2^x (ex2.approx.ftz.f32: -inf -> +0, relative error ~2^-22).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The online softmax's exponent of a score s is s * scale_log2 - m, m the running max of the
// rounded products RN(s * scale_log2): one FMA (the exact product) normally. From |m| >= 2^24
// (below it m's rounding, half an ulp of m, is at most 1/2) the product is rounded first, as
// in m, so the largest score's exponent is 0 exactly and none exceeds 0: else that rounding
// (over 128 from |m| >= 2^31) reaches the exponent and 2^x overflows (NaN out). Such rows
// take the FMA with offset 0 (the rounded product), then subtract m: no per-element cost
// where no row of the thread has |m| >= 2^24, whose bits stay as they were.
__device__ __forceinline__ bool exponent_rounded(float m) { return fabsf(m) >= 0x1p24f; }

// log2(x) (lg2.approx.ftz.f32).
__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------
// FP8 (e4m3) -> bf16
// ---------------------------------------------------------------------------------------

// Four e4m3 values (bytes 0..3 of v, element 0 in the low byte) -> four bf16: r.x holds
// elements 0 (low half) and 1, r.y elements 2 and 3. Exact: e4m3 -> f16 (cvt.rn.f16x2.e4m3x2,
// sm_89+; the low byte goes to the low half) -> f32 -> bf16, and every e4m3 value (normal
// or subnormal, |x| <= 448) is representable in all three. NaN (0x7F / 0xFF) stays NaN.
__device__ __forceinline__ uint2 e4m3x4_to_bf16x4(uint32_t v) {
  uint2 r;
  asm("{\n.reg .b16 a0, a1, h0, h1, h2, h3;\n.reg .b32 p0, p1;\n.reg .f32 f0, f1, f2, f3;\n"
      "mov.b32 {a0, a1}, %2;\n"
      "cvt.rn.f16x2.e4m3x2 p0, a0;\n"
      "cvt.rn.f16x2.e4m3x2 p1, a1;\n"
      "mov.b32 {h0, h1}, p0;\n"
      "mov.b32 {h2, h3}, p1;\n"
      "cvt.f32.f16 f0, h0;\n"
      "cvt.f32.f16 f1, h1;\n"
      "cvt.f32.f16 f2, h2;\n"
      "cvt.f32.f16 f3, h3;\n"
      "cvt.rn.bf16x2.f32 %0, f1, f0;\n"
      "cvt.rn.bf16x2.f32 %1, f3, f2;\n}\n"
      : "=r"(r.x), "=r"(r.y)
      : "r"(v));
  return r;
}

// Sixteen e4m3 values (x.x bytes 0..3 = elements 0..3, ..., x.w = elements 12..15) -> sixteen
// bf16 times a scale, for the FP8 MLA cache (a row's 128-column group scale): lo = elements
// 0..7, hi = 8..15, each .b32 a pair (the lower element in the low half). `factor` is the bf16
// pair (scale * 2^60, scale * 2^60) (pack_bf16x2). Bit steps, no cvt: prmt puts two e4m3 bytes in the low
// bytes of the two halves with their signs replicated above (selector nibble bit 3), then
// (t << 4) & 0x87F087F0 is each value's bf16 with the e4m3 exponent field unbiased: exactly
// value * 2^-120 (e4m3 subnormals land on bf16 subnormals, exact too); two bf16x2 products
// (* 2^60, * factor; bf16 keeps subnormals) give value * scale, exact when the scale is a power
// of two (the layout's quantizer rule: 4 + 4 significant bits fit bf16's 8) in bf16's range.
// These steps read an e4m3 NaN byte (0x7F / 0xFF) as +-480 * scale: `nan` (nonzero when x holds
// one: bit 7 of a byte of (x & 0x7F..) + 0x01.. is set exactly for the low bits 0x7F) sends the
// rare piece with one to e4m3_nan_fixup. The eight pairs' steps are interleaved (independent
// instructions back to back).
__device__ __forceinline__ void e4m3x16_to_bf16x16_pow2scaled(const uint4& x, uint32_t factor, uint4& lo,
                                                               uint4& hi, uint32_t& nan) {
  const uint32_t c = 0x5D805D80u, cm = 0x21802180u;   // bf16x2 (2^60, 2^60), (2^-60, 2^-60)
  asm("{\n.reg .b32 t0, t1, t2, t3, n0, n1, fs, p0, p1, p2, p3;\n"
      ".reg .b16 a0, a1, a2, a3, h0, h1, h2, h3, h4, h5, h6, h7;\n"
      ".reg .f32 f0, f1, f2, f3, f4, f5, f6, f7;\n"
      "mov.b32 {a0, a1}, %11;\n"
      "mov.b32 {a2, a3}, %12;\n"
      "and.b32 n0, %9, 0x7F7F7F7F;\n"
      "and.b32 n1, %10, 0x7F7F7F7F;\n"
      "cvt.rn.f16x2.e4m3x2 p0, a0;\n"
      "cvt.rn.f16x2.e4m3x2 p1, a1;\n"
      "prmt.b32 t0, %9, 0, 0x9180;\n"
      "prmt.b32 t1, %9, 0, 0xB3A2;\n"
      "cvt.rn.f16x2.e4m3x2 p2, a2;\n"
      "cvt.rn.f16x2.e4m3x2 p3, a3;\n"
      "prmt.b32 t2, %10, 0, 0x9180;\n"
      "prmt.b32 t3, %10, 0, 0xB3A2;\n"
      "mov.b32 {h0, h1}, p0;\n"
      "mov.b32 {h2, h3}, p1;\n"
      "mov.b32 {h4, h5}, p2;\n"
      "mov.b32 {h6, h7}, p3;\n"
      "cvt.f32.f16 f0, h0;\n"
      "shl.b32 t0, t0, 4;\n"
      "cvt.f32.f16 f1, h1;\n"
      "shl.b32 t1, t1, 4;\n"
      "cvt.f32.f16 f2, h2;\n"
      "shl.b32 t2, t2, 4;\n"
      "cvt.f32.f16 f3, h3;\n"
      "shl.b32 t3, t3, 4;\n"
      "cvt.f32.f16 f4, h4;\n"
      "add.u32 n0, n0, 0x01010101;\n"
      "cvt.f32.f16 f5, h5;\n"
      "add.u32 n1, n1, 0x01010101;\n"
      "cvt.f32.f16 f6, h6;\n"
      "and.b32 t0, t0, 0x87F087F0;\n"
      "cvt.f32.f16 f7, h7;\n"
      "and.b32 t1, t1, 0x87F087F0;\n"
      "cvt.rn.bf16x2.f32 p0, f1, f0;\n"
      "and.b32 t2, t2, 0x87F087F0;\n"
      "cvt.rn.bf16x2.f32 p1, f3, f2;\n"
      "and.b32 t3, t3, 0x87F087F0;\n"
      "cvt.rn.bf16x2.f32 p2, f5, f4;\n"
      "or.b32 n0, n0, n1;\n"
      "cvt.rn.bf16x2.f32 p3, f7, f6;\n"
      "and.b32 %8, n0, 0x80808080;\n"
      "mul.rn.bf16x2 fs, %13, %15;\n"      // the factor / 2^60: the scale
      "mul.rn.bf16x2 t0, t0, %14;\n"
      "mul.rn.bf16x2 t1, t1, %14;\n"
      "mul.rn.bf16x2 t2, t2, %14;\n"
      "mul.rn.bf16x2 t3, t3, %14;\n"
      "mul.rn.bf16x2 %4, p0, fs;\n"
      "mul.rn.bf16x2 %5, p1, fs;\n"
      "mul.rn.bf16x2 %6, p2, fs;\n"
      "mul.rn.bf16x2 %7, p3, fs;\n"
      "mul.rn.bf16x2 %0, t0, %13;\n"
      "mul.rn.bf16x2 %1, t1, %13;\n"
      "mul.rn.bf16x2 %2, t2, %13;\n"
      "mul.rn.bf16x2 %3, t3, %13;\n}\n"
      : "=r"(lo.x), "=r"(lo.y), "=r"(lo.z), "=r"(lo.w), "=r"(hi.x), "=r"(hi.y), "=r"(hi.z), "=r"(hi.w), "=r"(nan)
      : "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w), "r"(factor), "r"(c), "r"(cm));
}

// The rare path of e4m3x16_to_bf16x16_pow2scaled: the values of x's NaN bytes become bf16 NaN
// (exponent and quiet bit set), as an exact conversion would give.
__device__ __forceinline__ void e4m3_nan_fixup(const uint4& x, uint4& lo, uint4& hi) {
#pragma unroll
  for (uint32_t i = 0; i < 8; ++i) {   // elements 0..7 (8..15 took cvt, which keeps NaN)
    const uint32_t byte = ((&x.x)[i / 4] >> (8 * (i % 4))) & 0x7Fu;
    if (byte == 0x7Fu) (&lo.x)[i / 2] |= 0x7FC0u << (16 * (i % 2));
  }
}

// Half kHi (0: low, 1: high) of a bf16 pair, in both halves (e.g. a factor of
// e4m3x16_to_bf16x16_pow2scaled kept two to a register).
template <uint32_t kHi>
__device__ __forceinline__ uint32_t dup_bf16_half(uint32_t pair) {
  static_assert(kHi < 2, "a pair's half");
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(r) : "r"(pair), "n"(kHi ? 0x3232u : 0x1010u));
  return r;
}

}  // namespace pk
