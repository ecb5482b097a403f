// Expert-parallel dispatch layout (docs/ep.md, "Hand-written intranode kernels").
//
//   topk_idx int64 [T, K] (-1 = no expert), experts split evenly over R ranks
//   -> num_tokens_per_rank   int32 [R]  tokens with at least one expert on rank r
//      num_tokens_per_expert int32 [E]  (token, slot) pairs routed to expert e
//      is_token_in_rank      bool  [T, R]
//
// One thread per token; counts are gathered in shared memory (atomics) and added to the
// global counters once per CTA (red.add), so the two counters must be zero on entry (the
// host allocates them with zeros). Integer sums: the result does not depend on the order.
// Dynamic shared memory: (E + R) int32.
#include <cstdint>

#include "pk/ep_common.cuh"

extern "C" __global__ void __launch_bounds__(pk::ep::kThreads)
    pk_ep_layout(const int64_t* __restrict__ topk_idx, int32_t* __restrict__ num_tokens_per_rank,
                 int32_t* __restrict__ num_tokens_per_expert, uint8_t* __restrict__ is_token_in_rank,
                 uint32_t num_tokens, uint32_t num_topk, uint32_t num_experts, uint32_t num_ranks) {
  extern __shared__ int32_t counts[];  // [num_experts] per expert, then [num_ranks] per rank
  int32_t* per_rank = counts + num_experts;
  const uint32_t experts_per_rank = num_experts / num_ranks;
  for (uint32_t i = threadIdx.x; i < num_experts + num_ranks; i += blockDim.x) counts[i] = 0;
  __syncthreads();

  // loops with the same trip count in every thread (out-of-range tokens predicated off)
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  const bool valid = t < num_tokens;
  uint32_t mask = 0;
  for (uint32_t k = 0; k < num_topk; ++k) {
    const int64_t e = valid ? pk::ld_nc_s64(topk_idx + static_cast<uint64_t>(t) * num_topk + k) : -1;
    if (e >= 0) {
      atomicAdd(&counts[e], 1);
      mask |= 1u << (static_cast<uint32_t>(e) / experts_per_rank);
    }
  }
  uint8_t* row = is_token_in_rank + static_cast<uint64_t>(t) * num_ranks;
  for (uint32_t r = 0; r < num_ranks; ++r) {
    const uint32_t in = (mask >> r) & 1u;
    if (valid) row[r] = static_cast<uint8_t>(in);
    if (in) atomicAdd(&per_rank[r], 1);
  }
  __syncthreads();
  // two loops: one red instruction per output tensor
  for (uint32_t i = threadIdx.x; i < num_experts; i += blockDim.x)
    if (counts[i] != 0) pk::red_add_gpu(num_tokens_per_expert + i, counts[i]);
  for (uint32_t i = threadIdx.x; i < num_ranks; i += blockDim.x)
    if (per_rank[i] != 0) pk::red_add_gpu(num_tokens_per_rank + i, per_rank[i]);
}
