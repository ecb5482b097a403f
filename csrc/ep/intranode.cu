// Normal-mode intranode expert-parallel dispatch and combine for sm_90a (docs/ep.md,
// "Hand-written intranode kernels"). Every rank runs the same kernel at the same time; the
// ranks' communication buffers are mapped into each other through CUDA IPC (the emulator:
// one shared address space), and each kernel gets the base address of every rank's buffer.
//
// Rings. A buffer region holds num_channels x num_ranks single-producer single-consumer
// rings; ring (c, s) of rank d carries channel c's items from rank s to rank d, so it lives
// in the *receiver's* buffer. Each ring has a 128-byte control block (head at +0, tail at
// +64: written by different devices, kept on different lines) and num_slots slots of
// slot_bytes. Counters are uint32 and count items since the buffer was created (zeroed
// once): slot = counter mod num_slots (a power of two), used = tail - head (mod 2^32).
//  * the sender owns tail: it writes an item's payload (weak stores), then publishes
//    tail with st.release.sys after __syncwarp (so the release covers every lane's stores);
//  * the receiver owns head: it reads payload only after an acquire load of tail has
//    shown the item, and publishes head with st.release.sys once every thread has finished
//    reading the slots before it (__syncwarp / bar.sync, then one thread releases);
//  * the sender acquires head before it reuses a slot (tail - head < num_slots).
// Counters are never reset: the next call goes on where this one stopped, so no barrier
// or cleanup is needed between calls (a call's items follow the previous call's, FIFO).
//
// CTAs: blockIdx 2c sends channel c, 2c+1 receives channel c (warp w <-> peer rank w).
// Channel c covers source tokens [c * ceil(T/C), (c+1) * ceil(T/C)).
//
// Dispatch items: per channel and destination, first a header item (int32 start, count:
// the destination's tokens before this channel, and in it), then one item per token in
// token order: payload row (bf16 or e4m3 bytes), f32 scales (FP8), int32 top-k expert ids,
// f32 top-k weights, int32 source token index. The receiver puts the row of the j-th token
// of channel c from rank s at rank_offset[s] + start + j: received rows are ordered by
// (source rank, source token), whatever the channel count.
//
// Combine items: the received rows go back through the combine rings (the reverse
// direction): bf16 row, f32 weight sum (left to right from 0.0 over the top-k weights of
// the row, 1.0 without weights), int32 source token index. The receiving CTA of channel c
// walks its tokens in order and, per token, takes the next item of ring (c, r) for every
// rank r the token went to, in rank order: out = bf16(sum_r f32(row_r) * w_r), products and
// sums rounded to f32 one at a time (no fma), from 0.0 - the order of the reference.
//
// The receiver writes rows only below max_recv_rows (the rows of the outputs: the exact
// count, or num_worst_tokens when the host sized them without reading the counts); a
// (source, channel) range that would end past it is recorded (code 9, first occurrence,
// no trap) and its rows from the bound on are dropped: still consumed from the ring (head
// advances as if they were written), so senders and later calls stay in step.
//
// Every wait counts its polls; past max_spins it writes an error record (rank, channel,
// code, peer, value seen, value needed) and traps (pk::report_and_trap).
#include <cstdint>

#include "pk/ep_common.cuh"

using namespace pk::ep;

namespace {

constexpr uint32_t kCtrlBytes = 128;  // per ring: head at +0, tail at +64

// Error codes (pykernels/cuda/ep.py: WAIT_CODES)
enum : uint32_t {
  kDispatchSendWaitHead = 1,
  kDispatchRecvWaitTail = 2,
  kCombineSendWaitHead = 3,
  kCombineRecvWaitTail = 4,
  kCombineSourceMismatch = 5,
  // 6..8: low_latency.cu
  kDispatchRecvOverflow = 9,
};

struct Ring {
  uint32_t* head;
  uint32_t* tail;
  uint8_t* data;
};

__device__ __forceinline__ Ring ring_at(uint8_t* base, uint64_t region, uint32_t index, uint32_t num_rings,
                                        uint32_t num_slots, uint32_t slot_bytes) {
  uint8_t* ctrl = base + region + static_cast<uint64_t>(index) * kCtrlBytes;
  Ring r;
  r.head = reinterpret_cast<uint32_t*>(ctrl);
  r.tail = reinterpret_cast<uint32_t*>(ctrl + 64);
  r.data = base + region + static_cast<uint64_t>(num_rings) * kCtrlBytes +
           static_cast<uint64_t>(index) * num_slots * slot_bytes;
  return r;
}

__device__ __forceinline__ uint8_t* slot_at(const Ring& r, uint32_t counter, uint32_t num_slots, uint32_t slot_bytes) {
  return r.data + static_cast<uint64_t>(counter & (num_slots - 1)) * slot_bytes;
}

// Who waits: for the error record.
struct Who {
  uint32_t* err;
  uint32_t rank;
  uint32_t channel;
  uint32_t peer;
  uint32_t max_spins;
};

// Sender: wait until slot `tail` is free (tail - head < num_slots); returns the head seen.
__device__ __forceinline__ uint32_t wait_free_slot(const uint32_t* head_p, uint32_t tail, uint32_t head,
                                                   uint32_t num_slots, const Who& who, uint32_t what) {
  uint32_t spins = 0;
  while (tail - head >= num_slots) {
    head = warp_acquire(head_p);
    if (tail - head >= num_slots && ++spins >= who.max_spins)
      pk::report_and_trap(who.err, who.rank, who.channel, what, who.peer, head, tail - num_slots + 1);
  }
  return head;
}

// Receiver: wait until item `head` is published (tail != head); returns the tail seen.
__device__ __forceinline__ uint32_t wait_item(const uint32_t* tail_p, uint32_t head, uint32_t tail, const Who& who,
                                              uint32_t what) {
  uint32_t spins = 0;
  while (tail == head) {
    tail = warp_acquire(tail_p);
    if (tail == head && ++spins >= who.max_spins)
      pk::report_and_trap(who.err, who.rank, who.channel, what, who.peer, tail, head + 1);
  }
  return tail;
}

__device__ __forceinline__ void channel_range(uint32_t channel, uint32_t num_channels, uint32_t num_tokens,
                                              uint32_t& begin, uint32_t& end) {
  const uint32_t per_channel = (num_tokens + num_channels - 1) / num_channels;
  begin = min(channel * per_channel, num_tokens);
  end = min(begin + per_channel, num_tokens);
}

}  // namespace

// Grid 2 x num_channels, block 256 (warp w <-> rank w; warps >= num_ranks exit).
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    pk_ep_dispatch(uint8_t* buffer, PK_EP_PEER_PARAMS, const uint8_t* __restrict__ x,
                   const float* __restrict__ x_scales, const int64_t* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const uint8_t* __restrict__ is_token_in_rank,
                   const int32_t* __restrict__ rank_offset, uint8_t* __restrict__ recv_x,
                   float* __restrict__ recv_scales, int64_t* __restrict__ recv_topk_idx,
                   float* __restrict__ recv_topk_weights, int32_t* __restrict__ recv_src_idx,
                   int32_t* __restrict__ recv_channel_offset, uint32_t* err, uint32_t rank, uint32_t num_ranks,
                   uint32_t num_tokens, uint32_t hidden_bytes, uint32_t num_scales, uint32_t num_topk,
                   uint32_t experts_per_rank, uint32_t num_channels, uint32_t num_slots, uint32_t slot_bytes,
                   uint64_t region, uint32_t publish_every, uint32_t max_recv_rows, uint32_t max_spins,
                   uint32_t flags) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t channel = blockIdx.x >> 1;
  if (warp >= num_ranks) return;
  uint32_t begin, end;
  channel_range(channel, num_channels, num_tokens, begin, end);
  const uint32_t num_rings = num_channels * num_ranks;
  const uint32_t off_idx = hidden_bytes + 4 * num_scales;
  const uint32_t off_w = off_idx + 4 * num_topk;
  const uint32_t off_src = off_w + 4 * num_topk;

  if ((blockIdx.x & 1) == 0) {
    // ---------------------------------------------------------------- sender: rank -> dst
    if (flags & kFlagIdleSenders) return;
    const uint32_t dst = warp;
    const Ring ring = ring_at(select_peer(dst, PK_EP_PEERS), region, channel * num_ranks + rank, num_rings,
                              num_slots, slot_bytes);
    const Who who{err, rank, channel, dst, max_spins};
    // the destination's tokens before this channel (start) and in it (count)
    uint32_t start = 0, count = 0;
    for (uint32_t t0 = 0; t0 < end; t0 += 32) {
      const uint32_t t = t0 + lane;
      const bool in = t < end && pk::ld_nc_u8(is_token_in_rank + static_cast<uint64_t>(t) * num_ranks + dst) != 0;
      start += __popc(__ballot_sync(kFull, in && t < begin));
      count += __popc(__ballot_sync(kFull, in && t >= begin));
    }
    uint32_t tail = pk::ld_relaxed_sys(ring.tail);  // only this warp ever writes it
    uint32_t head = warp_acquire(ring.head);
    uint32_t published = tail;
    head = wait_free_slot(ring.head, tail, head, num_slots, who, kDispatchSendWaitHead);
    uint8_t* slot = slot_at(ring, tail, num_slots, slot_bytes);
    if (lane == 0) {
      pk::st_na_s32(slot, static_cast<int32_t>(start));
      pk::st_na_s32(slot + 4, static_cast<int32_t>(count));
    }
    ++tail;
    for (uint32_t t0 = begin; t0 < end; t0 += 32) {
      const uint32_t t = t0 + lane;
      const bool in = t < end && pk::ld_nc_u8(is_token_in_rank + static_cast<uint64_t>(t) * num_ranks + dst) != 0;
      uint32_t mask = __ballot_sync(kFull, in);
      while (mask != 0) {
        const uint32_t token = t0 + __ffs(mask) - 1;
        mask &= mask - 1;
        if (tail - head >= num_slots) {
          if (published != tail) {  // the receiver may be waiting for these
            warp_release(ring.tail, tail, lane);
            published = tail;
          }
          head = wait_free_slot(ring.head, tail, head, num_slots, who, kDispatchSendWaitHead);
        }
        slot = slot_at(ring, tail, num_slots, slot_bytes);
        int64_t e = 0;  // top-k entry `lane`: loaded before the row, stored after it
        float w = 0.f;
        if (lane < num_topk) {
          const uint64_t k = static_cast<uint64_t>(token) * num_topk + lane;
          e = pk::ld_nc_s64(topk_idx + k);
          w = pk::ld_nc_f32(topk_weights + k);
        }
        warp_put_row(slot, x, x_scales, token, hidden_bytes, num_scales, lane);
        if (lane < num_topk) {
          pk::st_na_s32(slot + off_idx + 4 * lane, static_cast<int32_t>(e));
          pk::st_na_f32(slot + off_w + 4 * lane, w);
        }
        if (lane == 0) pk::st_na_s32(slot + off_src, static_cast<int32_t>(token));
        ++tail;
        if (tail - published >= publish_every) {
          warp_release(ring.tail, tail, lane);
          published = tail;
        }
      }
    }
    warp_release(ring.tail, tail, lane);
  } else {
    // ---------------------------------------------------------------- receiver: src -> rank
    if (flags & kFlagIdleReceivers) return;
    const uint32_t src = warp;
    const Ring ring = ring_at(buffer, region, channel * num_ranks + src, num_rings, num_slots, slot_bytes);
    const Who who{err, rank, channel, src, max_spins};
    uint32_t head = pk::ld_relaxed_sys(ring.head);  // only this warp ever writes it
    uint32_t published = head;
    uint32_t tail = wait_item(ring.tail, head, head, who, kDispatchRecvWaitTail);
    const uint8_t* slot = slot_at(ring, head, num_slots, slot_bytes);
    const int32_t start = pk::ld_na_s32(slot);
    const int32_t count = pk::ld_na_s32(slot + 4);
    ++head;
    const int64_t row0 = static_cast<int64_t>(pk::ld_nc_s32(rank_offset + src)) + start;
    // rows [row0, row0 + count) must fit the outputs (num_worst_tokens rows when the host
    // did not read the counts): checked before the first write, warp-uniform. Past the
    // bound the rows are dropped (consumed from the ring, head advanced as usual, nothing
    // written) and code 9 is recorded; no trap, the kernel and the rings go on.
    int32_t fit = count;
    if (row0 + count > static_cast<int64_t>(max_recv_rows)) {
      fit = row0 >= static_cast<int64_t>(max_recv_rows) ? 0 : static_cast<int32_t>(max_recv_rows - row0);
      if (lane == 0)
        report_error(err, rank, channel, kDispatchRecvOverflow, src, static_cast<uint32_t>(row0 + count),
                     max_recv_rows);
    }
    const int32_t lo = static_cast<int32_t>(rank * experts_per_rank);
    for (int32_t j = 0; j < count; ++j) {
      if (tail == head) {
        if (published != head) {  // the sender may be waiting for these slots
          warp_release(ring.head, head, lane);
          published = head;
        }
        tail = wait_item(ring.tail, head, tail, who, kDispatchRecvWaitTail);
      }
      if (j < fit) {  // warp-uniform; a dropped item is only consumed
        slot = slot_at(ring, head, num_slots, slot_bytes);
        const uint64_t row = static_cast<uint64_t>(row0 + j);
        int32_t e = -1, src_token = 0;  // the item's tail: loaded before the row, stored after it
        float w = 0.f;
        if (lane < num_topk) {
          e = pk::ld_na_s32(slot + off_idx + 4 * lane);
          w = pk::ld_na_f32(slot + off_w + 4 * lane);
        }
        if (lane == 0) src_token = pk::ld_na_s32(slot + off_src);
        warp_get_row(recv_x, recv_scales, row, slot, hidden_bytes, num_scales, lane);
        if (lane < num_topk) {
          const int32_t local = e - lo;
          const bool mine = e >= 0 && local >= 0 && local < static_cast<int32_t>(experts_per_rank);
          recv_topk_idx[row * num_topk + lane] = mine ? local : -1;
          recv_topk_weights[row * num_topk + lane] = mine ? w : 0.0f;
        }
        if (lane == 0) recv_src_idx[row] = src_token;
      }
      ++head;
      if (head - published >= publish_every) {
        warp_release(ring.head, head, lane);
        published = head;
      }
    }
    warp_release(ring.head, head, lane);
    if (lane == 0) {
      recv_channel_offset[(src * num_channels + channel) * 2] = static_cast<int32_t>(row0);
      recv_channel_offset[(src * num_channels + channel) * 2 + 1] = fit;  // rows written
    }
  }
}

// Grid 2 x num_channels, block 256. Sender CTAs (even): warp w sends the rows received
// from rank w in this channel back to it. Receiver CTAs (odd): all threads, one token at a
// time, 8 bf16 columns per thread per step.
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    pk_ep_combine(uint8_t* buffer, PK_EP_PEER_PARAMS, const uint8_t* __restrict__ x,
                  const float* __restrict__ topk_weights, const int32_t* __restrict__ recv_src_idx,
                  const int32_t* __restrict__ recv_channel_offset, const uint8_t* __restrict__ is_token_in_rank,
                  uint8_t* __restrict__ out, uint32_t* err, uint32_t rank, uint32_t num_ranks, uint32_t num_tokens,
                  uint32_t hidden, uint32_t num_topk, uint32_t num_channels, uint32_t num_slots,
                  uint32_t slot_bytes, uint64_t region, uint32_t publish_every, uint32_t max_spins, uint32_t flags) {
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t channel = blockIdx.x >> 1;
  const uint32_t num_rings = num_channels * num_ranks;
  const uint32_t row_bytes = 2 * hidden;
  const uint32_t off_ws = row_bytes, off_src = row_bytes + 4;

  if ((blockIdx.x & 1) == 0) {
    // ---------------------------------------------------------------- sender: rank -> dst
    if ((flags & kFlagIdleSenders) || warp >= num_ranks) return;
    const uint32_t dst = warp;
    const Ring ring = ring_at(select_peer(dst, PK_EP_PEERS), region, channel * num_ranks + rank, num_rings,
                              num_slots, slot_bytes);
    const Who who{err, rank, channel, dst, max_spins};
    const int32_t* offsets = recv_channel_offset + (dst * num_channels + channel) * 2;  // (first row, rows)
    const uint64_t row0 = static_cast<uint64_t>(pk::ld_nc_s32(offsets));
    const uint32_t count = static_cast<uint32_t>(pk::ld_nc_s32(offsets + 1));
    uint32_t tail = pk::ld_relaxed_sys(ring.tail);
    uint32_t head = warp_acquire(ring.head);
    uint32_t published = tail;
    for (uint32_t j = 0; j < count; ++j) {
      if (tail - head >= num_slots) {
        if (published != tail) {
          warp_release(ring.tail, tail, lane);
          published = tail;
        }
        head = wait_free_slot(ring.head, tail, head, num_slots, who, kCombineSendWaitHead);
      }
      uint8_t* slot = slot_at(ring, tail, num_slots, slot_bytes);
      const uint64_t row = row0 + j;
      // the row's weights (lane k: weight k) and source index, loaded before the row is copied
      const float wk = lane < num_topk ? pk::ld_nc_f32(topk_weights + row * num_topk + lane) : 0.f;
      const int32_t src_token = lane == 0 ? pk::ld_nc_s32(recv_src_idx + row) : 0;
      warp_copy_to_buffer(slot, x + row * row_bytes, row_bytes, lane);
      float ws = 1.0f;  // left to right from 0.0 over the top-k weights
      if (num_topk != 0) {
        ws = 0.0f;
        for (uint32_t k = 0; k < num_topk; ++k) ws = __fadd_rn(ws, __shfl_sync(kFull, wk, k));
      }
      if (lane == 0) {
        pk::st_na_f32(slot + off_ws, ws);
        pk::st_na_s32(slot + off_src, src_token);
      }
      ++tail;
      if (tail - published >= publish_every) {
        warp_release(ring.tail, tail, lane);
        published = tail;
      }
    }
    warp_release(ring.tail, tail, lane);
    return;
  }

  // ------------------------------------------------------------------ receiver: all ranks -> rank
  if (flags & kFlagIdleReceivers) return;
  const uint32_t tid = threadIdx.x;
  uint32_t begin, end;
  channel_range(channel, num_channels, num_tokens, begin, end);
  const uint64_t ring_bytes = static_cast<uint64_t>(num_slots) * slot_bytes;
  uint8_t* const ctrl0 = buffer + region + static_cast<uint64_t>(channel * num_ranks) * kCtrlBytes;
  uint8_t* const data0 = buffer + region + static_cast<uint64_t>(num_rings) * kCtrlBytes +
                         static_cast<uint64_t>(channel * num_ranks) * ring_bytes;
  uint32_t pos[kMaxRanks], seen[kMaxRanks], published[kMaxRanks];
#pragma unroll
  for (uint32_t r = 0; r < kMaxRanks; ++r) {
    pos[r] = r < num_ranks ? pk::ld_relaxed_sys(reinterpret_cast<uint32_t*>(ctrl0 + r * kCtrlBytes)) : 0;
    seen[r] = published[r] = pos[r];
  }
  // The ranks a token went to: its is_token_in_rank bytes, loaded one token ahead (all of a
  // token's loads are issued before any is tested, the next token's before this one's rows).
  uint16_t in_rank[kMaxRanks] = {};
  auto load_in_rank = [&](uint32_t t) {
    if (t >= end) return;
    const uint8_t* row = is_token_in_rank + static_cast<uint64_t>(t) * num_ranks;
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) in_rank[r] = ld_nc_u8_narrow(row + min(r, num_ranks - 1));
  };
  load_in_rank(begin);
  for (uint32_t t = begin; t < end; ++t) {
    uint32_t mask = 0;
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) mask |= (r < num_ranks && in_rank[r] != 0 ? 1u : 0u) << r;
    load_in_rank(t + 1);
    // wait for this token's item in every ring it uses
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) {
      if (r >= num_ranks) break;
      if ((mask >> r) & 1u) {
        uint32_t spins = 0;
        uint32_t* head_p = reinterpret_cast<uint32_t*>(ctrl0 + r * kCtrlBytes);
        while (seen[r] == pos[r]) {
          // every thread is past the barrier after the last token: slots before pos are read
          if (tid == 0 && published[r] != pos[r]) pk::st_release_sys(head_p, pos[r]);
          published[r] = pos[r];
          seen[r] = pk::ld_acquire_sys(reinterpret_cast<const uint32_t*>(ctrl0 + r * kCtrlBytes + 64));
          if (seen[r] == pos[r] && ++spins >= max_spins)
            pk::report_and_trap(err, rank, channel, kCombineRecvWaitTail, r, seen[r], pos[r] + 1);
        }
      }
    }
    // Every load of the token's items is issued before any is used: per column step the row
    // chunk and the weight sum of every rank it went to (the sums re-read: one round, not
    // two); thread 0's source indices before the first step, checked after the last.
    const uint8_t* slot[kMaxRanks];
    int32_t src[kMaxRanks];
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) {
      slot[r] = data0 + r * ring_bytes + static_cast<uint64_t>(pos[r] & (num_slots - 1)) * slot_bytes;
      src[r] = tid == 0 && ((mask >> r) & 1u) ? pk::ld_na_s32(slot[r] + off_src) : static_cast<int32_t>(t);
    }
    for (uint32_t base = 0; base < hidden / 8; base += blockDim.x) {  // same trip count in every thread
      const uint32_t i = base + tid;
      if (i >= hidden / 8) continue;
      int4 v[kMaxRanks];
      float ws[kMaxRanks];
#pragma unroll
      for (uint32_t r = 0; r < kMaxRanks; ++r) {
        if ((mask >> r) & 1u) {  // mask has no bit at or past num_ranks
          v[r] = pk::ld_na_v4(slot[r] + 16 * i);
          ws[r] = pk::ld_na_f32(slot[r] + off_ws);
        }
      }
      Bf16x8Sum sum;
#pragma unroll
      for (uint32_t r = 0; r < kMaxRanks; ++r)
        if ((mask >> r) & 1u) sum.add(v[r], ws[r]);
      *reinterpret_cast<int4*>(out + (static_cast<uint64_t>(t) * hidden + 8 * i) * 2) = sum.to_bf16();
    }
    if (tid == 0) {  // protocol check: the items were this token's
#pragma unroll
      for (uint32_t r = 0; r < kMaxRanks; ++r)
        if (src[r] != static_cast<int32_t>(t))
          pk::report_and_trap(err, rank, channel, kCombineSourceMismatch, r, static_cast<uint32_t>(src[r]), t);
    }
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) pos[r] += (mask >> r) & 1u;
    __syncthreads();  // every thread has read this token's slots
    if (tid == 0) {
#pragma unroll
      for (uint32_t r = 0; r < kMaxRanks; ++r) {
        if (r >= num_ranks) break;
        if (pos[r] - published[r] >= publish_every) {
          pk::st_release_sys(reinterpret_cast<uint32_t*>(ctrl0 + r * kCtrlBytes), pos[r]);
          published[r] = pos[r];
        }
      }
    }
  }
  if (tid == 0) {
#pragma unroll
    for (uint32_t r = 0; r < kMaxRanks; ++r) {
      if (r >= num_ranks) break;
      if (published[r] != pos[r]) pk::st_release_sys(reinterpret_cast<uint32_t*>(ctrl0 + r * kCtrlBytes), pos[r]);
    }
  }
}
