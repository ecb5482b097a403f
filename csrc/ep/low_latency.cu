// Low-latency intranode expert-parallel dispatch and combine for sm_90a (docs/ep.md,
// "Hand-written intranode kernels", low-latency mode).
//
// Fixed receive slots instead of rings: rank d's buffer holds, per (local expert le,
// source rank s), max_tokens slots; the j-th (token, top-k slot) of rank s routed to expert
// e = d * E_local + le goes to slot j (tokens in order: deterministic). After its last row,
// the sender publishes the count with one st.release.sys.u64 of (seq << 32 | count); the
// receiver polls that word with ld.acquire.sys until its high half is this call's seq.
// seq (a host counter, the same on every rank, never 0) replaces any reset: a word left
// by an earlier call never matches.
//
// Combine: the owner of expert e sends each row back into its source rank's buffer at
// (e, j) and publishes flag[e] = seq with a release store after the rows. The source
// rank's receiver CTAs wait for all E flags (acquire), then each token's output is
// bf16(sum over its valid top-k slots k, in order, of f32(row_k) * w_k), every product
// and sum rounded to f32 (no fma), from 0.0.
//
// Buffer reuse between calls is safe for the alternation dispatch, combine, dispatch...:
// a rank starts dispatch k+1 only after its combine k saw every expert's flag, i.e. after
// every rank finished dispatch k (a rank's combine sends follow its dispatch on its stream).
//
// CTAs: blockIdx < num_send_ctas send (warp per expert: global expert in dispatch, local
// expert in combine), the others receive.
#include <cstdint>

#include "pk/ptx_memory_order.cuh"

namespace {

constexpr uint32_t kThreads = 256;
constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t kMaxTopk = 16;
constexpr uint32_t kFull = 0xffffffffu;

// Error codes (pykernels/cuda/ep.py: WAIT_CODES)
enum : uint32_t {
  kLowLatencyWaitCount = 6,
  kLowLatencyWaitFlag = 7,
  kLowLatencyOverflow = 8,
};
// Testing: sender / receiver CTAs return at once (both: a rank that never arrives).
enum : uint32_t { kFlagIdleSenders = 1, kFlagIdleReceivers = 2 };

#define PK_EP_PEER_PARAMS                                                                                   \
  uint64_t peer0, uint64_t peer1, uint64_t peer2, uint64_t peer3, uint64_t peer4, uint64_t peer5, uint64_t peer6, \
      uint64_t peer7
#define PK_EP_PEERS peer0, peer1, peer2, peer3, peer4, peer5, peer6, peer7

__device__ __forceinline__ uint8_t* select_peer(uint32_t r, uint64_t p0, uint64_t p1, uint64_t p2, uint64_t p3,
                                                uint64_t p4, uint64_t p5, uint64_t p6, uint64_t p7) {
  uint64_t v = p0;
  v = r == 1 ? p1 : v;
  v = r == 2 ? p2 : v;
  v = r == 3 ? p3 : v;
  v = r == 4 ? p4 : v;
  v = r == 5 ? p5 : v;
  v = r == 6 ? p6 : v;
  v = r == 7 ? p7 : v;
  return reinterpret_cast<uint8_t*>(v);
}

// Loops have the same trip count in every lane / thread (tails predicated), so warps stay
// converged (and the emulator runs their lanes in one step).
__device__ __forceinline__ void warp_copy_to_peer(uint8_t* dst, const uint8_t* src, uint32_t bytes, uint32_t lane) {
  for (uint32_t base = 0; base < bytes; base += 32 * 16) {
    const uint32_t i = base + lane * 16;
    if (i < bytes) pk::st_na_v4(dst + i, pk::ld_nc_v4(src + i));
  }
}

__device__ __forceinline__ void warp_copy_from_buffer(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                                      uint32_t lane) {
  for (uint32_t base = 0; base < bytes; base += 32 * 16) {
    const uint32_t i = base + lane * 16;
    if (i < bytes) *reinterpret_cast<int4*>(dst + i) = pk::ld_na_v4(src + i);
  }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ void accumulate_bf16x2(float& lo, float& hi, uint32_t w, float s) {
  lo = __fadd_rn(lo, __fmul_rn(__uint_as_float(w << 16), s));
  hi = __fadd_rn(hi, __fmul_rn(__uint_as_float(w & 0xffff0000u), s));
}

}  // namespace

// Grid num_send_ctas (= ceil(E / 8)) + ceil(E_local / 8), block 256.
// Buffer (every rank): counts uint64 [E_local][R] at off_counts; slots [E_local][R][M]
// x slot_bytes at off_data (row bytes, f32 scales, int32 source token).
// Outputs: recv_x [E_local, R*M] rows, recv_scales [E_local, R*M, num_scales],
// recv_src_info int32 [E_local, R*M] (source token), recv_layout int32 [E_local, R]
// (rows from each rank), recv_count int32 [E_local]; slot_of int32 [T, K]: the slot each
// (token, k) was sent to (entries with topk_idx -1 are left as they are).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    pk_ep_ll_dispatch(uint8_t* buffer, PK_EP_PEER_PARAMS, const uint8_t* __restrict__ x,
                      const float* __restrict__ x_scales, const int64_t* __restrict__ topk_idx,
                      uint8_t* __restrict__ recv_x, float* __restrict__ recv_scales,
                      int32_t* __restrict__ recv_src_info, int32_t* __restrict__ recv_layout,
                      int32_t* __restrict__ recv_count, int32_t* __restrict__ slot_of, uint32_t* err, uint32_t rank,
                      uint32_t num_ranks, uint32_t num_tokens, uint32_t hidden_bytes, uint32_t num_scales,
                      uint32_t num_topk, uint32_t num_experts, uint32_t max_tokens, uint32_t seq,
                      uint32_t slot_bytes, uint64_t off_counts, uint64_t off_data, uint32_t num_send_ctas,
                      uint32_t max_spins, uint32_t flags) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t local_experts = num_experts / num_ranks;
  const uint32_t off_src = hidden_bytes + 4 * num_scales;

  if (blockIdx.x < num_send_ctas) {
    // ---------------------------------------------------------------- sender: expert e
    const uint32_t e = blockIdx.x * kWarps + warp;
    if ((flags & kFlagIdleSenders) || e >= num_experts) return;
    const uint32_t dst = e / local_experts, le = e % local_experts;
    uint8_t* const dst_buffer = select_peer(dst, PK_EP_PEERS);
    uint8_t* const slots =
        dst_buffer + off_data + static_cast<uint64_t>(le * num_ranks + rank) * max_tokens * slot_bytes;
    uint32_t j = 0;
    for (uint32_t t0 = 0; t0 < num_tokens; t0 += 32) {
      const uint32_t t = t0 + lane;
      uint32_t kbits = 0;  // the top-k slots of token t that name expert e
      for (uint32_t k = 0; k < num_topk; ++k)
        if (t < num_tokens &&
            pk::ld_nc_s64(topk_idx + static_cast<uint64_t>(t) * num_topk + k) == static_cast<int64_t>(e))
          kbits |= 1u << k;
      uint32_t mask = __ballot_sync(kFull, kbits != 0);
      while (mask != 0) {
        const uint32_t b = __ffs(mask) - 1;
        mask &= mask - 1;
        const uint32_t token = t0 + b;
        uint32_t kb = __shfl_sync(kFull, kbits, b);
        while (kb != 0) {
          const uint32_t k = __ffs(kb) - 1;
          kb &= kb - 1;
          if (j >= max_tokens) pk::report_and_trap(err, rank, e, kLowLatencyOverflow, dst, j, max_tokens);
          uint8_t* slot = slots + static_cast<uint64_t>(j) * slot_bytes;
          warp_copy_to_peer(slot, x + static_cast<uint64_t>(token) * hidden_bytes, hidden_bytes, lane);
          for (uint32_t base = 0; base < num_scales; base += 32) {
            const uint32_t i = base + lane;
            if (i < num_scales)
              pk::st_na_f32(slot + hidden_bytes + 4 * i,
                            pk::ld_nc_f32(x_scales + static_cast<uint64_t>(token) * num_scales + i));
          }
          if (lane == 0) {
            pk::st_na_s32(slot + off_src, static_cast<int32_t>(token));
            slot_of[static_cast<uint64_t>(token) * num_topk + k] = static_cast<int32_t>(j);
          }
          ++j;
        }
      }
    }
    __syncwarp();  // every lane's rows before lane 0's release
    if (lane == 0)
      pk::st_release_sys(reinterpret_cast<uint64_t*>(dst_buffer + off_counts) + le * num_ranks + rank,
                         (static_cast<uint64_t>(seq) << 32) | j);
    return;
  }

  // ------------------------------------------------------------------ receiver: local expert le
  if (flags & kFlagIdleReceivers) return;
  const uint32_t le = (blockIdx.x - num_send_ctas) * kWarps + warp;
  if (le >= local_experts) return;
  int32_t total = 0;
  for (uint32_t s = 0; s < num_ranks; ++s) {
    const uint64_t* count_p = reinterpret_cast<const uint64_t*>(buffer + off_counts) + le * num_ranks + s;
    uint64_t v = 0;
    uint32_t spins = 0;
    while (true) {
      v = pk::ld_acquire_sys(count_p);
      v = __shfl_sync(kFull, v, 0);
      __syncwarp();
      if (static_cast<uint32_t>(v >> 32) == seq) break;
      if (++spins >= max_spins)
        pk::report_and_trap(err, rank, le, kLowLatencyWaitCount, s, static_cast<uint32_t>(v >> 32), seq);
    }
    const uint32_t n = static_cast<uint32_t>(v);
    const uint64_t base = static_cast<uint64_t>(le * num_ranks + s) * max_tokens;
    for (uint32_t j = 0; j < n; ++j) {
      const uint8_t* slot = buffer + off_data + (base + j) * slot_bytes;
      warp_copy_from_buffer(recv_x + (base + j) * hidden_bytes, slot, hidden_bytes, lane);
      for (uint32_t b = 0; b < num_scales; b += 32) {
        const uint32_t i = b + lane;
        if (i < num_scales) recv_scales[(base + j) * num_scales + i] = pk::ld_na_f32(slot + hidden_bytes + 4 * i);
      }
      if (lane == 0) recv_src_info[base + j] = pk::ld_na_s32(slot + off_src);
    }
    if (lane == 0) recv_layout[le * num_ranks + s] = static_cast<int32_t>(n);
    total += static_cast<int32_t>(n);
  }
  if (lane == 0) recv_count[le] = total;
}

// Grid num_send_ctas (= ceil(E_local / 8)) + receiver CTAs, block 256.
// y bf16 [E_local, R*M, H]: the expert outputs for the rows dispatch delivered. Buffer:
// flags uint32 [E] at off_flags; rows [E][M] x slot_bytes at off_data (bf16 rows).
// out bf16 [T, H]; tokens with no valid top-k slot get zeros.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    pk_ep_ll_combine(uint8_t* buffer, PK_EP_PEER_PARAMS, const uint8_t* __restrict__ y,
                     const int32_t* __restrict__ recv_layout, const int64_t* __restrict__ topk_idx,
                     const float* __restrict__ topk_weights, const int32_t* __restrict__ slot_of,
                     uint8_t* __restrict__ out, uint32_t* err, uint32_t rank, uint32_t num_ranks, uint32_t num_tokens,
                     uint32_t hidden, uint32_t num_topk, uint32_t num_experts, uint32_t max_tokens, uint32_t seq,
                     uint32_t slot_bytes, uint64_t off_flags, uint64_t off_data, uint32_t num_send_ctas,
                     uint32_t max_spins, uint32_t flags) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t local_experts = num_experts / num_ranks;
  const uint32_t row_bytes = 2 * hidden;

  if (blockIdx.x < num_send_ctas) {
    // ---------------------------------------------------------------- sender: local expert le
    const uint32_t le = blockIdx.x * kWarps + warp;
    if ((flags & kFlagIdleSenders) || le >= local_experts) return;
    const uint32_t e = rank * local_experts + le;
    for (uint32_t s = 0; s < num_ranks; ++s) {
      const uint32_t n = static_cast<uint32_t>(pk::ld_nc_s32(recv_layout + le * num_ranks + s));
      uint8_t* const dst_buffer = select_peer(s, PK_EP_PEERS);
      uint8_t* const dst = dst_buffer + off_data + static_cast<uint64_t>(e) * max_tokens * slot_bytes;
      const uint8_t* const src = y + static_cast<uint64_t>(le * num_ranks + s) * max_tokens * row_bytes;
      for (uint32_t j = 0; j < n; ++j)
        warp_copy_to_peer(dst + static_cast<uint64_t>(j) * slot_bytes, src + static_cast<uint64_t>(j) * row_bytes,
                          row_bytes, lane);
      __syncwarp();
      if (lane == 0) pk::st_release_sys(reinterpret_cast<uint32_t*>(dst_buffer + off_flags) + e, seq);
    }
    return;
  }

  // ------------------------------------------------------------------ receivers
  if (flags & kFlagIdleReceivers) return;
  const uint32_t tid = threadIdx.x;
  const uint32_t cta = blockIdx.x - num_send_ctas, num_recv_ctas = gridDim.x - num_send_ctas;
  // Every warp waits for every flag (lane l polls flags l, l + 32, ...; the loop is
  // warp-uniform through __all_sync), so each thread's own acquires order its row reads.
  for (uint32_t e0 = 0; e0 < num_experts; e0 += 32) {
    const uint32_t e = e0 + lane;
    const uint32_t* flag = reinterpret_cast<const uint32_t*>(buffer + off_flags) + (e < num_experts ? e : 0);
    uint32_t v = e < num_experts ? pk::ld_acquire_sys(flag) : seq;
    uint32_t spins = 0;
    while (!__all_sync(kFull, v == seq)) {
      if (++spins >= max_spins && v != seq)
        pk::report_and_trap(err, rank, e, kLowLatencyWaitFlag, e / local_experts, v, seq);
      if (v != seq) v = pk::ld_acquire_sys(flag);
    }
  }
  __syncwarp();  // each lane's acquires ordered before the other lanes' row reads
  for (uint32_t t = cta; t < num_tokens; t += num_recv_ctas) {
    int32_t ke[kMaxTopk];
    uint32_t kj[kMaxTopk];
    float kw[kMaxTopk];
#pragma unroll
    for (uint32_t k = 0; k < kMaxTopk; ++k) {  // entries >= num_topk are never read
      if (k >= num_topk) break;
      const uint64_t i = static_cast<uint64_t>(t) * num_topk + k;
      ke[k] = static_cast<int32_t>(pk::ld_nc_s64(topk_idx + i));
      kj[k] = ke[k] >= 0 ? static_cast<uint32_t>(pk::ld_nc_s32(slot_of + i)) : 0u;
      kw[k] = ke[k] >= 0 ? pk::ld_nc_f32(topk_weights + i) : 0.f;
    }
    for (uint32_t base = 0; base < hidden / 8; base += blockDim.x) {  // same trip count in every thread
      const uint32_t i = base + tid;
      if (i >= hidden / 8) continue;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
#pragma unroll
      for (uint32_t k = 0; k < kMaxTopk; ++k) {
        if (k >= num_topk) break;
        if (ke[k] >= 0) {
          const uint8_t* row = buffer + off_data +
                               (static_cast<uint64_t>(ke[k]) * max_tokens + kj[k]) * slot_bytes;
          const int4 v = pk::ld_na_v4(row + 16 * i);
          accumulate_bf16x2(a0, a1, static_cast<uint32_t>(v.x), kw[k]);
          accumulate_bf16x2(a2, a3, static_cast<uint32_t>(v.y), kw[k]);
          accumulate_bf16x2(a4, a5, static_cast<uint32_t>(v.z), kw[k]);
          accumulate_bf16x2(a6, a7, static_cast<uint32_t>(v.w), kw[k]);
        }
      }
      int4 o;
      o.x = static_cast<int32_t>(pack_bf16x2(a0, a1));
      o.y = static_cast<int32_t>(pack_bf16x2(a2, a3));
      o.z = static_cast<int32_t>(pack_bf16x2(a4, a5));
      o.w = static_cast<int32_t>(pack_bf16x2(a6, a7));
      *reinterpret_cast<int4*>(out + (static_cast<uint64_t>(t) * hidden + 8 * i) * 2) = o;
    }
  }
}
