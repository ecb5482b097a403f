// Second pass of the split-K FP8 GEMM (docs/gemm.md, fp8_gemm.cu kSplitK): out = the sum
// of the `splits` float32 partial slices of a workspace [splits, M, N], added in slice
// order 0, 1, ... (deterministic: no atomics, the same order on every run), rounded once
// to bf16. N is a multiple of 8: each thread owns one 8-column chunk of a row (two 16-byte
// loads per slice, one 16-byte store). Grid-stride over the M x N / 8 chunks.
// Launched with PDL (programmatic dependent launch) right after the split-K GEMM: it may
// start while the GEMM's last CTAs run, and waits for the GEMM's workspace writes
// (griddep_wait) before its first load.
#include <cstdint>

#include "pk/ptx.cuh"

extern "C" __global__ void __launch_bounds__(256) pk_fp8_gemm_splitk_reduce(const float* ws, uint8_t* out, uint32_t m,
                                                                         uint32_t n, uint32_t splits) {
  const uint64_t chunks = (uint64_t)m * (n / 8);
  const uint64_t slice = (uint64_t)m * n;  // floats per slice
  pk::griddep_wait();                      // the GEMM's partial slices are complete and visible
  for (uint64_t c = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; c < chunks; c += (uint64_t)gridDim.x * blockDim.x) {
    const float4* src = reinterpret_cast<const float4*>(ws + 8 * c);
    float4 lo = __ldg(src), hi = __ldg(src + 1);
#pragma unroll 1  // no unrolled remainder handling before the second slice's loads
    for (uint32_t s = 1; s < splits; ++s) {
      const float4* part = reinterpret_cast<const float4*>(ws + s * slice + 8 * c);
      const float4 a = __ldg(part), b = __ldg(part + 1);
      lo.x += a.x; lo.y += a.y; lo.z += a.z; lo.w += a.w;
      hi.x += b.x; hi.y += b.y; hi.z += b.z; hi.w += b.w;
    }
    const uint4 v{pk::pack_bf16x2(lo.x, lo.y), pk::pack_bf16x2(lo.z, lo.w), pk::pack_bf16x2(hi.x, hi.y),
                  pk::pack_bf16x2(hi.z, hi.w)};
    *reinterpret_cast<uint4*>(out + 16 * c) = v;
  }
  // This thread's stores are issued: the next PDL kernel may start its CTAs (its wait
  // still waits for this grid's completion, so nothing it reads can be stale).
  pk::griddep_launch_dependents();
}
