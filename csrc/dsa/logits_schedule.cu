// get_paged_mqa_logits_metadata on the device (DeepGEMM's schedule of the paged indexer
// logits; pykernels/reference/dsa.py paged_mqa_logits_schedule is the definition; host side
// pykernels/cuda/dsa.py): no host read of context_lens, so a decode step can be captured.
//
// Sequence i has ceil(len_i / split) splits (split = 4 pages of block_kv tokens; len_i its
// context length, or the largest of its next_n rows'); the total is dealt out evenly in order:
// partition p starts at split p * (total / P) + min(p, total % P), written as [first sequence,
// first split inside it]; row P is [b, 0].
//
// One CTA of 1024 threads, two steps:
//   1. prefix: the inclusive prefix sum of the splits, 1024 sequences per pass (a block scan),
//      into shared memory (b entries);
//   2. partitions: thread p binary-searches the first sequence whose prefix passes its start.
// A negative length goes to the device error record (pk/error_record.cuh) and counts as 0.
#include <cstdint>

#include "pk/error_record.cuh"

namespace {

constexpr uint32_t kThreads = 1024;
constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t kSplitPages = 4;          // pykernels/reference/dsa.py SPLIT_BLOCKS

// Inclusive block-wide prefix sum of one value per thread; *total gets the sum.
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t v, uint32_t* warp_sums, uint32_t* total) {
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (uint32_t d = 1; d < 32; d *= 2) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  uint32_t before = 0, sum = 0;
  for (uint32_t w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    sum += warp_sums[w];
  }
  __syncthreads();
  *total = sum;
  return before + v;
}

}  // namespace

// context_lens int32 [b] (lens_per_row 0) or [b, next_n] (1); meta int32 [num_parts + 1, 2];
// err the device error record.
extern "C" __global__ void __launch_bounds__(kThreads) pk_dsa_logits_schedule(
    const int* context_lens, int* meta, uint32_t b, uint32_t next_n, uint32_t lens_per_row, uint32_t block_kv,
    uint32_t num_parts, int* err) {
  extern __shared__ __align__(16) uint32_t prefix[];   // b entries
  __shared__ uint32_t warp_sums[kWarps];
  const uint32_t split = kSplitPages * block_kv;

  // 1. prefix
  uint32_t carry = 0;
  for (uint32_t base = 0; base < b; base += kThreads) {
    const uint32_t i = base + threadIdx.x;
    uint32_t len = 0;
    if (i < b) {
      const uint32_t count = lens_per_row ? next_n : 1;
      for (uint32_t j = 0; j < count; ++j) {
        const int v = context_lens[i * count + j];
        if (v < 0) pk::record_error(err, pk::kErrContextLensOutOfRange, v, 0x7fffffff, (int)(i * count + j));
        len = max(len, (uint32_t)max(v, 0));
      }
    }
    uint32_t chunk;
    const uint32_t incl = block_inclusive_scan((len + split - 1) / split, warp_sums, &chunk);
    if (i < b) prefix[i] = carry + incl;
    carry += chunk;
  }
  __syncthreads();

  // 2. partitions
  const uint32_t total = carry, per = total / num_parts, extra = total % num_parts;
  for (uint32_t p = threadIdx.x; p <= num_parts; p += kThreads) {
    int seq = (int)b, first = 0;
    if (p < num_parts) {
      const uint32_t start = p * per + min(p, extra);
      uint32_t lo = 0, hi = b;            // the first sequence with prefix > start
      while (lo < hi) {
        const uint32_t mid = (lo + hi) / 2;
        if (prefix[mid] > start) hi = mid; else lo = mid + 1;
      }
      if (lo < b) {
        seq = (int)lo;
        first = (int)(start - (lo > 0 ? prefix[lo - 1] : 0u));
      }
    }
    meta[2 * p] = seq;
    meta[2 * p + 1] = first;
  }
}
