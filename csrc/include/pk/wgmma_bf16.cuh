// bf16 wgmma with both operands K-major in shared memory: the bf16 GEMM (csrc/gemm/fp8_gemm.cu's
// kBf16 entries) and the MLA decode's Q K^T (pk/ptx_mla.cuh); the FP8 wrappers are in pk/ptx.cuh.
#pragma once
#include <cstdint>

#include "pk/wgmma_operands.cuh"

namespace pk {

// D[64 x N] (f32, fragment d[N/2]) = A[64 x 16] * B[N x 16]^T (+ D when scale_d != 0):
// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with both operands K-major in shared
// memory (descriptors; imm-trans-a/b = 0), no negation (imm-scale-a/b = 1). The fragment
// layout is WgmmaE4M3's (pk/ptx.cuh). 16 bf16 of K = 32 bytes: one K step advances the
// descriptors as one e4m3 step does.
template <int N>
struct WgmmaBF16;

// One specialisation per N in use; the accumulator lists (N / 2 registers) are the macros of
// pk/wgmma_operands.cuh.

template <>
struct WgmmaBF16<16> {
  static __device__ __forceinline__ void mma(float (&d)[8], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {" PK_WGMMA_D(8)
      "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(8, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaBF16<32> {
  static __device__ __forceinline__ void mma(float (&d)[16], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {" PK_WGMMA_D(16)
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(16, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaBF16<64> {
  static __device__ __forceinline__ void mma(float (&d)[32], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" PK_WGMMA_D(32)
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(32, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaBF16<128> {
  static __device__ __forceinline__ void mma(float (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" PK_WGMMA_D(64)
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : PK_WGMMA_D_OPERANDS(64, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

}  // namespace pk
