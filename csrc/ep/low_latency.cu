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
// Receive layout, packed per local expert (DeepEP's, what the masked grouped GEMM takes
// with masked_m = recv_count): the receiver takes the sources in order, so slot j of
// source s lands in output row (rows from sources < s) + j of expert le - rows in
// (source rank, source token, k) order, no gap; recv_count[le] = the total. The scales
// are written column-major per expert (element (le, row, c) at (le * cols + c) *
// scale_stride + row), optionally as UE8M0 exponent bytes packed four to a word.
//
// Combine: the owner of expert e reads y in the same packed layout (source s's rows start
// at the running sum of recv_layout[le, :s]) and sends each row back into its source
// rank's buffer at (e, j) and publishes flag[e] = seq with a release store after the rows. The source
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

#include "pk/ep_common.cuh"

using namespace pk::ep;

namespace {

constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t kMaxTopk = 16;  // ep.py MAX_TOPK

// Error codes (pykernels/cuda/ep.py: WAIT_CODES; 1-5 are intranode.cu's)
enum : uint32_t {
  kLowLatencyWaitCount = 6,
  kLowLatencyWaitFlag = 7,
  kLowLatencyOverflow = 8,
};

// A column of the received scales as bits: one f32, or (UE8M0) the four f32 whose exponent
// bytes pack into one word, byte b from bits[b]. Loaded as 32-bit integers: an f32 load
// would be moved to an integer register right after it, waiting for the load there.
struct ScaleColumn {
  uint32_t bits[4];

  __device__ __forceinline__ uint32_t word(uint32_t ue8m0) const {
    if (!ue8m0) return bits[0];
    uint32_t w = 0;
#pragma unroll
    for (uint32_t b = 0; b < 4; ++b) w |= ((bits[b] >> 23) & 0xFFu) << (8 * b);
    return w;
  }
};

}  // namespace

// Grid num_send_ctas (= ceil(E / 8)) + ceil(E_local / 8), block 256.
// Buffer (every rank): counts uint64 [E_local][R] at off_counts; slots [E_local][R][M]
// x slot_bytes at off_data (row bytes, f32 scales, int32 source token).
// Outputs: recv_x [E_local, R*M] rows (expert le's first recv_count[le] written, packed),
// recv_scales: FP8 only, f32 (scale_ue8m0 0: num_scales columns) or uint32 (1: num_scales / 4
// words of exponent bytes) per row, column-major per expert (scale_stride >= R*M elements
// per column); recv_src_info int32 [E_local, R*M] (source token, packed like the rows),
// recv_layout int32 [E_local, R] (rows from each rank), recv_count int32 [E_local];
// slot_of int32 [T, K]: the slot each (token, k) was sent to (entries with topk_idx -1 are
// left as they are).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    pk_ep_ll_dispatch(uint8_t* buffer, PK_EP_PEER_PARAMS, const uint8_t* __restrict__ x,
                      const float* __restrict__ x_scales, const int64_t* __restrict__ topk_idx,
                      uint8_t* __restrict__ recv_x, uint32_t* __restrict__ recv_scales,
                      int32_t* __restrict__ recv_src_info, int32_t* __restrict__ recv_layout,
                      int32_t* __restrict__ recv_count, int32_t* __restrict__ slot_of, uint32_t* err, uint32_t rank,
                      uint32_t num_ranks, uint32_t num_tokens, uint32_t hidden_bytes, uint32_t num_scales,
                      uint32_t num_topk, uint32_t num_experts, uint32_t max_tokens, uint32_t seq,
                      uint32_t slot_bytes, uint64_t off_counts, uint64_t off_data, uint32_t scale_stride,
                      uint32_t scale_ue8m0, uint32_t num_send_ctas, uint32_t max_spins, uint32_t flags) {
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
          warp_put_row(slot, x, x_scales, token, hidden_bytes, num_scales, lane);
          if (lane == 0) {
            pk::st_na_s32(slot + off_src, static_cast<int32_t>(token));
            slot_of[static_cast<uint64_t>(token) * num_topk + k] = static_cast<int32_t>(j);
          }
          ++j;
        }
      }
    }
    warp_release(reinterpret_cast<uint64_t*>(dst_buffer + off_counts) + le * num_ranks + rank,
                 (static_cast<uint64_t>(seq) << 32) | j, lane);  // after every lane's rows
    return;
  }

  // ------------------------------------------------------------------ receiver: local expert le
  if (flags & kFlagIdleReceivers) return;
  const uint32_t le = (blockIdx.x - num_send_ctas) * kWarps + warp;
  if (le >= local_experts) return;
  const uint32_t scale_cols = scale_ue8m0 ? num_scales / 4 : num_scales;
  uint32_t total = 0;  // rows of this expert from the sources before s: where s's rows start
  const uint64_t* const counts = reinterpret_cast<const uint64_t*>(buffer + off_counts) + le * num_ranks;
  // Every source's count word in one acquire load (lane s: source s), not one round per
  // source; lane s's value is the warp's for source s, ordered for the other lanes by
  // __syncwarp (as in warp_acquire). A source not yet published is then polled alone.
  const uint64_t first = lane < num_ranks ? pk::ld_acquire_sys(counts + lane) : 0;
  for (uint32_t s = 0; s < num_ranks; ++s) {
    uint64_t v = __shfl_sync(kFull, first, s);
    __syncwarp();
    uint32_t spins = 0;
    while (static_cast<uint32_t>(v >> 32) != seq) {
      if (++spins >= max_spins)
        pk::report_and_trap(err, rank, le, kLowLatencyWaitCount, s, static_cast<uint32_t>(v >> 32), seq);
      v = warp_acquire(counts + s);
    }
    const uint32_t n = static_cast<uint32_t>(v);
    const uint64_t slot0 = static_cast<uint64_t>(le * num_ranks + s) * max_tokens;
    for (uint32_t j = 0; j < n; ++j) {
      const uint8_t* slot = buffer + off_data + (slot0 + j) * slot_bytes;
      const uint32_t row = total + j;  // within expert le
      const uint64_t out_row = static_cast<uint64_t>(le) * num_ranks * max_tokens + row;
      // the scales (the first two columns per lane) and the source token are loaded before
      // the row's chunks and stored after them: their latency hides under the row's
      auto ld = [&](uint32_t c) {  // column c: 1 f32, or the 4 f32 behind 4 packed exponents
        ScaleColumn col;
        if (scale_ue8m0) {
#pragma unroll
          for (uint32_t b = 0; b < 4; ++b)
            col.bits[b] = static_cast<uint32_t>(pk::ld_na_s32(slot + hidden_bytes + 16 * c + 4 * b));
        } else {
          col.bits[0] = static_cast<uint32_t>(pk::ld_na_s32(slot + hidden_bytes + 4 * c));
        }
        return col;
      };
      auto st = [&](uint32_t c, const ScaleColumn& col) {
        recv_scales[(static_cast<uint64_t>(le) * scale_cols + c) * scale_stride + row] = col.word(scale_ue8m0);
      };
      WarpBatch<kRowScaleBatch, ScaleColumn> first;
      first.load(0, scale_cols, lane, ld);
      const int32_t src_token = lane == 0 ? pk::ld_na_s32(slot + off_src) : 0;
      warp_copy_from_buffer(recv_x + out_row * hidden_bytes, slot, hidden_bytes, lane);
      first.store(0, scale_cols, lane, st);
      warp_copy_batched<kRowScaleBatch, ScaleColumn>(32 * kRowScaleBatch, scale_cols, lane, ld, st);
      if (lane == 0) recv_src_info[out_row] = src_token;
    }
    if (lane == 0) recv_layout[le * num_ranks + s] = static_cast<int32_t>(n);
    total += n;
  }
  if (lane == 0) recv_count[le] = static_cast<int32_t>(total);
}

// Grid num_send_ctas (= ceil(E_local / 8)) + receiver CTAs, block 256.
// y bf16 [E_local, R*M, H]: the expert outputs for the rows dispatch delivered, in its packed
// layout (rows past recv_count[le] are not read). Buffer:
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
    uint64_t first = static_cast<uint64_t>(le) * num_ranks * max_tokens;  // packed row of source s's first
    for (uint32_t s = 0; s < num_ranks; ++s) {
      const uint32_t n = static_cast<uint32_t>(pk::ld_nc_s32(recv_layout + le * num_ranks + s));
      uint8_t* const dst_buffer = select_peer(s, PK_EP_PEERS);
      uint8_t* const dst = dst_buffer + off_data + static_cast<uint64_t>(e) * max_tokens * slot_bytes;
      const uint8_t* const src = y + first * row_bytes;
      first += n;
      for (uint32_t j = 0; j < n; ++j)
        warp_copy_to_buffer(dst + static_cast<uint64_t>(j) * slot_bytes, src + static_cast<uint64_t>(j) * row_bytes,
                            row_bytes, lane);
      warp_release(reinterpret_cast<uint32_t*>(dst_buffer + off_flags) + e, seq, lane);
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
      kj[k] = static_cast<uint32_t>(pk::ld_nc_s32(slot_of + i));  // read only where ke[k] >= 0
      kw[k] = pk::ld_nc_f32(topk_weights + i);
    }
    for (uint32_t base = 0; base < hidden / 8; base += blockDim.x) {  // same trip count in every thread
      const uint32_t i = base + tid;
      if (i >= hidden / 8) continue;
      int4 v[kMaxTopk];  // every top-k row's chunk loaded before the first is added
#pragma unroll
      for (uint32_t k = 0; k < kMaxTopk; ++k) {
        if (k < num_topk && ke[k] >= 0)
          v[k] = pk::ld_na_v4(buffer + off_data + (static_cast<uint64_t>(ke[k]) * max_tokens + kj[k]) * slot_bytes +
                              16 * i);
      }
      Bf16x8Sum sum;
#pragma unroll
      for (uint32_t k = 0; k < kMaxTopk; ++k)
        if (k < num_topk && ke[k] >= 0) sum.add(v[k], kw[k]);
      *reinterpret_cast<int4*>(out + (static_cast<uint64_t>(t) * hidden + 8 * i) * 2) = sum.to_bf16();
    }
  }
}
