// MLA decode attention (FlashMLA's interface, bf16 KV cache, h_kv = 1) for sm_90a, and the
// split-KV combine kernel (docs/mla.md, host side: pykernels/cuda/mla.py).
//
//   q      [b, s_q, h_q, 576] bf16, read through a 3-D tensor map over [b, s_q*h_q, 576]
//   cache  [num_blocks, 64, 1, 576] bf16 (pages of 64 tokens; columns 0..511 are also V),
//          read through a 2-D tensor map over [num_blocks*64, 576]
//   out    [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] f32 (any strides, passed in elements)
//
// One CTA = one partition p of tile_scheduler_metadata (blockIdx.x) x one tile of 64 of the
// s_q*h_q query rows (blockIdx.y; row r is token r / h_q, head r % h_q, all sharing the one
// KV head). It walks the partition's pieces (consecutive sequences, the first may start and
// the last may end inside a sequence) block by block (64 keys = one page).
//
// Warp roles (384 threads, launch bound 1 CTA/SM):
//  * warpgroup 2 = producer (bf16 cache: setmaxnreg.dec 40; the FP8 cache: below). Its first
//    warp, one elected lane: per piece with blocks, waits q_empty, loads the Q tile (9 TMA
//    boxes of 64 rows x 64 columns, 128-byte swizzle) onto q_full; per block, waits empty[s]
//    and loads the K block's 9 boxes (page id from block_table), box c onto full[s][c]. Two
//    stages.
//  * warpgroups 0, 1 = math (setmaxnreg.inc 232; FP8 216), the seesaw (SeesawMath below).
//    Warpgroup w owns the blocks in stage w (alternate blocks) and output columns
//    [256w, 256w+256) of all of them. For its own block: S (64 x 64, m64n64k16 over 9
//    chunks, each after its TMA box landed), the online softmax carrying the running max over
//    from the partner's previous block, P published (bf16 into the stage's RoPE chunk, the max
//    to shared memory, bar.arrive), P V with P in registers; for the partner's block: wait for
//    its publication (bar.sync), rescale, P V with P from shared memory, taken between the own
//    block's Q K^T chunks. One warpgroup's softmax runs under the other's wgmmas.
//    The last block of a sequence whose length is not a multiple of 64 has stale rows
//    (possibly NaN) past the end: S masks them with a select; its owner zeroes those rows of
//    the V chunks before publishing (0 * NaN = NaN in P V).
//    Epilogue: l of both warpgroups summed through shared memory; a sequence with one split
//    writes out = acc / l (bf16) and lse = (m + log2 l) ln 2 (+inf, out 0 when no key is
//    visible); a piece of a split sequence writes acc / l (f32) and m + log2 l (base 2,
//    -inf when nothing was visible) to scratch row `split id` of oacc [*, R, 512] / lacc
//    [*, R], merged by pk_mla_combine.
//
// Input checks (pk::mla_partition_ok, docs/mla.md "Checks"): before the warp roles split, every warp
// checks the CTA's metadata row against cache_seqlens and its neighbours, num_splits, the
// seqlens and the page ids the CTA will read; on a failure warp 0 records the error in the
// device error record (pk/error_record.cuh) and the whole CTA returns, reading nothing more.
//
// FP8 cache (pk_mla_decode_fp8, docs/mla.md "FP8 KV cache", and the sparse decode
// pk_mla_sparse_decode_fp8): the producer warpgroup fills the same bf16 K ring itself (Fp8Producer):
// its 128 threads read each block's 64 token rows of 656 bytes from global memory (dense: the
// page's rows; sparse: the rows the slots' indices name), convert the e4m3 values to bf16
// times the row's group scale (exact for power-of-two scales), copy the bf16 RoPE columns and
// store both in the bf16 layout, chunk by chunk, each chunk published on its full barrier as
// a TMA box would be. The math warpgroups run the seesaw unchanged (sparse: S masked by slot).
// The sparse prefill (pk_mla_sparse_prefill_bf16, docs/dsa.md) is the sparse decode over the
// query tokens as its batch, its producer (Bf16RowProducer) copying kv's bf16 rows instead.
//
// Shared memory (dynamic, base aligned up to 1024), both caches: Q 72 KB | 2 K stages x 72 KB |
// red 512 B | lsum 512 B | 22 mbarriers (| sparse: 2 row masks): 222,384 bytes + 1,024
// alignment slack <= 227 KB.
#include <cstdint>
#include <type_traits>

#include "pk/error_record.cuh"
#include "pk/mla_partition.cuh"
#include "pk/ptx.cuh"
#include "pk/ptx_mla.cuh"
#include "pk/sparse_checks.cuh"
#include "pk/swizzle.cuh"

namespace {

constexpr uint32_t kPage = 64;                    // tokens per KV block = keys per step
constexpr uint32_t kTileRows = 64;                // query rows per CTA
constexpr uint32_t kDimQK = 576;
constexpr uint32_t kDimV = 512;
constexpr uint32_t kBoxCols = 64;                 // bf16 columns per TMA box: one 128-byte swizzle row
constexpr uint32_t kChunks = kDimQK / kBoxCols;   // 9 boxes (chunks) per row
constexpr uint32_t kChunkBytes = kTileRows * pk::kSwizzleRowBytes;   // one 64 x 64 bf16 box
constexpr uint32_t kTileBytes = kChunks * kChunkBytes;  // 73,728: a Q tile or a K block
constexpr uint32_t kQOff = 0;
static_assert(kDimQK % 64 == 0 && kDimV == 512, "MLA head dims");

// FP8 cache token row (pykernels/reference/mla.py): 512 e4m3 | 4 f32 scales | 64 bf16 RoPE.
constexpr uint32_t kFp8Row = 656;
constexpr uint32_t kFp8SfOff = 512;
constexpr uint32_t kFp8RopeOff = 528;
constexpr uint32_t kGroups = 4;                   // FP8 scale groups of 128 columns
static_assert(kFp8Row % 16 == 0, "FP8 rows: 16-byte loads");

// Shared-memory layout (dynamic, base aligned up to 1024), the same for both caches (the FP8
// cache's producer converts into the bf16 K ring):
//   Q | 2 K stages (ring) | red | lsum | full[2][9] empty[2] q_full q_empty | sparse: u64 used
//   slots per stage
template <bool kSparse = false>
struct Smem {
  static constexpr uint32_t kStages = 2;
  static constexpr uint32_t kKOff = kQOff + kTileBytes;
  static constexpr uint32_t kRedOff = kKOff + kStages * kTileBytes;       // f32 [2][64] row maxima
  static constexpr uint32_t kSumOff = kRedOff + 2 * 64 * 4;               // f32 [2][64] row sums
  static constexpr uint32_t kBarOff = kSumOff + 2 * 64 * 4;
  static constexpr uint32_t kFullPerStage = kChunks;   // one full barrier per 64-column chunk
  static constexpr uint32_t kNumBars = kStages * kFullPerStage + kStages + 2;
  static constexpr uint32_t kMaskOff = kBarOff + 8 * kNumBars;           // sparse: u64 used slots per stage
  static constexpr uint32_t kIdxOff = kMaskOff + 8 * kStages;             // sparse: [2][128 threads][2] s32
  static constexpr uint32_t kIdxBytes = 2 * 128 * 2 * 4;                  //   slot indices, a block ahead
  static constexpr uint32_t kBytes = 1024 + kMaskOff + (kSparse ? 8 * kStages + kIdxBytes : 0);   // cuda/mla.py,
                                                                                                   // cuda/dsa.py
  static_assert(kBytes <= 227 * 1024, "shared memory per block");
  static_assert(kKOff % 1024 == 0 && kTileBytes % 1024 == 0, "swizzle atoms / TMA");
};
static_assert(Smem<false>::kBytes == 223408, "pykernels/cuda/mla.py");
static_assert(Smem<true>::kBytes == 223408 + 16 + 2048, "pykernels/cuda/dsa.py");

constexpr uint32_t kWarpgroupThreads = 128;
constexpr uint32_t kMathWarpgroups = 2;            // warpgroups 0, 1; warpgroup 2 is the producer
constexpr uint32_t kProducerWarpgroup = kMathWarpgroups;
constexpr uint32_t kThreads = (kMathWarpgroups + 1) * kWarpgroupThreads;   // 384
constexpr uint32_t kProducerRegs = 40;
constexpr uint32_t kMathRegs = 232;
constexpr uint32_t kBarMath = 1;                  // named barrier of both math warpgroups
constexpr uint32_t kMathThreads = kMathWarpgroups * kWarpgroupThreads;   // 256
constexpr uint32_t kMathWarpArrivals = kMathThreads / 32;   // a stage or Q is released by lane 0 of each math warp
constexpr uint32_t kMbarBytes = 8;                 // one mbarrier
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;
constexpr uint64_t kAllRows = ~0ull;              // a block's row mask with every token row valid

// The entries' arguments (pk/mla_partition.cuh) + the sparse prefill's (pk_mla_sparse_prefill_bf16;
// zero elsewhere): `cache` holds kv's bf16 token rows row_bytes apart; max_logits [b, h_q] f32
// (b: query tokens) and its strides.
struct Params : pk::MlaDecodeArgs {
  uint64_t row_bytes;
  float* max_logits;
  uint64_t ml_sb;
  uint32_t ml_sh;
};

// One piece of a partition: sequence b, KV blocks [lo, hi), split id, sequence length.
using Piece = pk::MlaPiece;

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// attn_sink: the softmax denominator gains exp(sink), so the output is scaled by
// 1 / (1 + 2^(sink log2(e) - lse2)) (lse2: the scores' base-2 log-sum-exp; the returned lse
// stays that of the scores alone).
__device__ __forceinline__ float sink_factor(float sink, float lse2) {
  return __frcp_rn(1.0f + pk::ex2_approx(sink * kLog2e - lse2));
}

constexpr uint32_t kMathWarps = 4;                           // warps per warpgroup
constexpr uint32_t kLatentPerWg = kDimV / 2;                 // 256 output columns per math warpgroup

// ----------------------------------------------------------------------------- FP8 producer
// FP8 cache (dense and sparse): the producer warpgroup fills the bf16 K ring itself. Per block,
// thread (warp, lane) of its 128 handles token rows 16 warp + lane / 4 and + 8, and within each
// 64-column chunk the 16 columns [16 (lane % 4), +16): one 16-byte load of e4m3 per row and
// chunk, two 16-byte bf16 units stored (the 128-byte swizzle's units 2 (lane % 4) and + 1, at
// addresses that differ by XOR 16); the RoPE chunk the same units, copied as they are. A
// warp's load covers 8 rows x 64 bytes, its stores 8 whole 128-byte rows (conflict-free).
// Global loads run ahead of the stores (kLoadAhead chunks, the first ones before the stage is
// free), each chunk is published on its full barrier by all 128 threads (st.shared,
// fence.proxy.async, mbarrier.arrive), so Q K^T starts on chunk 0 as with TMA. Rows not used
// (past the sequence's end, unused slots) are not read and written as zeros (scale 0).
constexpr uint32_t kConvThreads = kWarpgroupThreads;        // every producer thread converts
constexpr uint32_t kConvRegs = 72;                          // FP8 producer after setmaxnreg.dec
constexpr uint32_t kMathRegsFp8 = 216;                      // 2 x 128 x 216 + 128 x 72 = 384 x 168
constexpr uint32_t kEntryRegs = 168;                        // per thread at launch: 65,536 / 384, in 8s
static_assert(2 * kWarpgroupThreads * kMathRegsFp8 + kConvThreads * kConvRegs == kThreads * kEntryRegs,
              "setmaxnreg moves registers between warpgroups; the pool is the launch's");
constexpr uint32_t kLoadBytes = 16;                         // one load: 16 e4m3 values of a row
constexpr uint32_t kLatentChunks = kDimV / kBoxCols;        // 8 (chunk 8 is RoPE)
constexpr uint32_t kChunksPerGroup = kDimV / kGroups / kBoxCols;   // 2 chunks per scale group
// chunks loaded ahead of the conversion (as many as the producer's 72 registers hold without
// spilling: the sparse path's index staging costs one)
template <bool kSparse> constexpr uint32_t kLoadAhead = kSparse ? 2 : 3;
static_assert(kBoxCols / kLoadBytes == 4 && kPage / kMathWarps == 16, "lane % 4: the load; 2 rows per thread");

template <bool kSparse>
struct Fp8Producer {
  using L = Smem<kSparse>;
  // Few registers (72 in all): the empty barriers and the used-slot masks are addressed from
  // full_bar (constant offsets in the layout), this thread's warp from row0.
  uint32_t full_bar;
  uint32_t dst0;               // this thread's unit 2 (lane % 4) of row row0, stage 0, chunk 0 (row0 + 8: + 1024)
  uint32_t lane, row0;         // this thread's rows: row0 = 16 warp + lane / 4 and row0 + 8
  uint32_t s = 0, phase = 0;   // ring position
  static constexpr uint32_t kRowStep = 8;   // the second row: the same swizzle phase, 8 rows on

  __device__ __forceinline__ Fp8Producer(uint32_t base, uint32_t tid)
      : full_bar(base + L::kBarOff), lane(tid % 32), row0(16 * (tid / 32) + (tid % 32) / 4) {
    dst0 = base + L::kKOff + pk::swizzle128_unit(row0, 2 * (lane % 4));
  }
  __device__ __forceinline__ uint32_t warp() const { return row0 / 16; }
  __device__ __forceinline__ uint32_t empty_bar(uint32_t stage) const {   // empty[stage], after full[2][9]
    return full_bar + kMbarBytes * (L::kStages * L::kFullPerStage + stage);
  }
  __device__ __forceinline__ uint32_t dst(uint32_t h) const { return dst0 + h * kRowStep * pk::kSwizzleRowBytes; }

  // Sparse: the indices of this thread's two slots of block `blk` (token `tok`'s slots [64 blk,
  // +64)) fetched a block ahead of their use into staging buffer `buf` of shared memory by
  // cp.async (no register held meanwhile; each thread reads only its own); -1 at or past
  // `limit` (topk_length) or past the piece.
  __device__ __forceinline__ uint32_t idx_slot(uint32_t buf, uint32_t h) const {
    return full_bar + (L::kIdxOff - L::kBarOff) + 4 * (buf * 2 * kWarpgroupThreads + 2 * (32 * warp() + lane) + h);
  }
  __device__ __forceinline__ void fetch_indices(const Params& p, const Piece& pc, uint32_t tok, uint32_t blk,
                                                uint32_t limit, uint32_t buf) const {
    const int* slots = p.indices + pc.b * p.idx_sb + (uint64_t)tok * p.idx_ss;
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {
      const uint32_t slot = blk * kPage + row0 + kRowStep * h;
      if (blk < pc.hi && slot < limit)
        pk::cp_async_4(idx_slot(buf, h), slots + slot);
      else
        pk::st_shared_b32(idx_slot(buf, h), 0xFFFFFFFFu);
    }
    pk::cp_async_commit();
  }
  __device__ __forceinline__ int2 take_indices(uint32_t buf) const {
    pk::cp_async_wait_all();
    return make_int2(pk::ld_shared_s32(idx_slot(buf, 0)), pk::ld_shared_s32(idx_slot(buf, 1)));
  }

  // Where this thread's rows of block `blk` are (nullptr: not used). Dense: the rows of page
  // idx.x (read a block ahead) below the sequence's end; sparse: the slots' indices (`idx`,
  // take_indices; -1 past the limit) under pk::sparse_index_used.
  __device__ __forceinline__ void locate(const Params& p, const Piece& pc, uint32_t blk, int2 idx,
                                         const uint8_t* (&src)[2]) const {
    if constexpr (kSparse) {
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) {
        const int i = h ? idx.y : idx.x;
        const auto tok = [&] { return blockIdx.y * kTileRows / p.h_q; };
        const bool used = pk::sparse_index_used(i, p.num_tokens, p.sched.err, pc.b, p.s_q, tok, p.topk,
                                                blk * kPage + row0 + kRowStep * h);
        src[h] = used ? p.cache + (uint64_t)i * kFp8Row : nullptr;
      }
    } else {
      const int page = idx.x;
      const uint32_t valid = pc.valid_rows(blk);
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h)
        src[h] = row0 + kRowStep * h < valid ? p.cache + ((uint64_t)page * kPage + row0 + kRowStep * h) * kFp8Row
                                             : nullptr;
    }
  }

  // Sparse: bit r of the stage's mask = token row r used (warp w's rows 16w..16w+15: lanes 4j of
  // its two ballots, compacted).
  __device__ __forceinline__ void store_mask(const uint8_t* const (&src)[2], uint32_t stage) const {
    uint32_t bits = 0;
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {
      uint32_t b = __ballot_sync(0xffffffffu, src[h] != nullptr) & 0x11111111u;   // lane 4j: row 8h + j
      b = (b | (b >> 3)) & 0x03030303u;
      b = (b | (b >> 6)) & 0x000F000Fu;
      bits |= ((b | (b >> 12)) & 0xFFu) << (8 * h);
    }
    if (lane == 0) pk::st_shared_b16(full_bar + (L::kMaskOff - L::kBarOff) + 8 * stage + 2 * warp(), (uint16_t)bits);
  }

  // The 16-byte load of chunk c (0..7: e4m3 columns [64c + 16 (lane % 4), +16); 8, 9: RoPE
  // units 2 (lane % 4) and + 1) of row h; zeros for an unused row.
  __device__ __forceinline__ static uint4 load(const uint8_t* src, uint32_t c, uint32_t lane) {
    if (src == nullptr) return make_uint4(0, 0, 0, 0);
    const uint32_t off = c < kLatentChunks ? c * kBoxCols + kLoadBytes * (lane % 4)
                                           : kFp8RopeOff + 2 * pk::kSwizzleUnitBytes * (lane % 4) +
                                                 pk::kSwizzleUnitBytes * (c - kLatentChunks);
    return __ldg(reinterpret_cast<const uint4*>(src + off));
  }

  // Load, convert and publish block `blk` of the piece into the next stage.
  __device__ __forceinline__ void block(const Params& p, const Piece& pc, uint32_t blk, int2 idx) {
    constexpr uint32_t kLoads = kLatentChunks + 2;   // loads per row: 8 latent chunks, RoPE in two
    const uint8_t* src[2];
    locate(p, pc, blk, idx, src);
    // The rows' group scales as conversion factors (0 for an unused row: 0 * 0, no NaN), two
    // groups' bf16 factors per register (low half: group 2j, high: 2j + 1), duplicated per use.
    uint32_t factors[2][kGroups / 2];
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {
      const float4 sc = src[h] != nullptr ? __ldg(reinterpret_cast<const float4*>(src[h] + kFp8SfOff))
                                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      factors[h][0] = pk::pack_bf16x2(sc.x * 0x1p60f, sc.y * 0x1p60f);
      factors[h][1] = pk::pack_bf16x2(sc.z * 0x1p60f, sc.w * 0x1p60f);
    }
    constexpr uint32_t kAhead = kLoadAhead<kSparse>;
    uint4 x[kAhead][2];
#pragma unroll
    for (uint32_t c = 0; c < kAhead; ++c)
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) x[c][h] = load(src[h], c, lane);
    const uint32_t stage = s;
    pk::mbar_wait(empty_bar(stage), phase ^ 1);
    if constexpr (kSparse) store_mask(src, stage);
    const uint32_t kblk = stage * kTileBytes;
#pragma unroll
    for (uint32_t c = 0; c < kLoads; ++c) {
      const uint4 cur[2] = {x[c % kAhead][0], x[c % kAhead][1]};
      if (c + kAhead < kLoads) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) x[c % kAhead][h] = load(src[h], c + kAhead, lane);
      }
      if (c < kLatentChunks) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
          uint4 lo, hi;
          uint32_t nan;
          const uint32_t g = c / kChunksPerGroup;
          const uint32_t factor =   // (g a constant once unrolled)
              g % 2 ? pk::dup_bf16_half<1>(factors[h][g / 2]) : pk::dup_bf16_half<0>(factors[h][g / 2]);
          pk::e4m3x16_to_bf16x16_pow2scaled(cur[h], factor, lo, hi, nan);
          if (nan != 0) pk::e4m3_nan_fixup(load(src[h], c, lane), lo, hi);   // an e4m3 NaN stays NaN (rare: reloaded)
          const uint32_t a = dst(h) + kblk + c * kChunkBytes;
          pk::st_shared_v4(a, lo);
          pk::st_shared_v4(a ^ pk::kSwizzleUnitBytes, hi);
        }
      } else {   // RoPE: units 2 (lane % 4) (c = 8) and + 1 (c = 9), as they are
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h)
          pk::st_shared_v4((dst(h) + kblk + kLatentChunks * kChunkBytes) ^ (pk::kSwizzleUnitBytes * (c - kLatentChunks)),
                           cur[h]);
      }
      if (c < kLatentChunks || c == kLoads - 1) {   // a whole chunk stored: publish it
        pk::fence_proxy_async_shared();
        pk::mbar_arrive(full_bar + kMbarBytes * (stage * kChunks + min(c, kLatentChunks)));
      }
    }
    if (++s == L::kStages) {
      s = 0;
      phase ^= 1;
    }
  }
};

// The sparse prefill's producer (kv's bf16 token rows, pk_mla_sparse_prefill_bf16): the sparse
// FP8 producer's thread map, index staging and used-slot masks, but a row's 72 16-byte units
// are copied as they are. Step c (18 per block) is chunk c / 2, unit (c % 2) of the thread's
// pair 2 (lane % 4), + 1 in each of its two rows (the FP8 producer's RoPE step, for all nine
// chunks: conflict-free stores); a chunk is published after its second step. Unused rows:
// zeros, not read.
struct Bf16RowProducer : Fp8Producer<true> {
  static constexpr uint32_t kSteps = 2 * kChunks;   // 16-byte loads per row and block
  static constexpr uint32_t kAhead = 4;             // steps loaded ahead of their stores (the 72 registers)
  using Fp8Producer<true>::Fp8Producer;

  // This thread's unit pair of the rows the slots' indices name (nullptr: unused slot).
  __device__ __forceinline__ void locate(const Params& p, int2 idx, const uint8_t* (&src)[2]) const {
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {
      const int i = h ? idx.y : idx.x;
      src[h] = pk::sparse_index_in_range(i, p.num_tokens)   // FlashMLA's rule: out of range = unused
                   ? p.cache + (uint64_t)i * p.row_bytes + 2 * pk::kSwizzleUnitBytes * (lane % 4)
                   : nullptr;
    }
  }
  __device__ __forceinline__ static uint4 load(const uint8_t* src, uint32_t c) {
    if (src == nullptr) return make_uint4(0, 0, 0, 0);
    return __ldg(reinterpret_cast<const uint4*>(src + (c / 2) * pk::kSwizzleRowBytes + (c % 2) * pk::kSwizzleUnitBytes));
  }

  // Load, copy and publish block `blk` (its slots' indices `idx`) into the next stage.
  __device__ __forceinline__ void block(const Params& p, const Piece&, uint32_t, int2 idx) {
    const uint8_t* src[2];
    locate(p, idx, src);
    uint4 x[kAhead][2];
#pragma unroll
    for (uint32_t c = 0; c < kAhead; ++c)
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) x[c][h] = load(src[h], c);
    const uint32_t stage = s;
    pk::mbar_wait(empty_bar(stage), phase ^ 1);
    store_mask(src, stage);
    const uint32_t kblk = stage * kTileBytes;
#pragma unroll
    for (uint32_t c = 0; c < kSteps; ++c) {
      const uint4 cur[2] = {x[c % kAhead][0], x[c % kAhead][1]};
      if (c + kAhead < kSteps) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) x[c % kAhead][h] = load(src[h], c + kAhead);
      }
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h)
        pk::st_shared_v4((dst(h) + kblk + (c / 2) * kChunkBytes) ^ (pk::kSwizzleUnitBytes * (c % 2)), cur[h]);
      if (c % 2) {   // the chunk's second unit stored: publish it
        pk::fence_proxy_async_shared();
        pk::mbar_arrive(full_bar + kMbarBytes * (stage * kChunks + c / 2));
      }
    }
    if (++s == L::kStages) {
      s = 0;
      phase ^= 1;
    }
  }
};

// Row sums of both warpgroups' keys: this thread's columns -> its quad -> shared memory ->
// summed in a fixed order (identical in both warpgroups).
__device__ __forceinline__ void sum_rows_across_warpgroups(float (&l)[2], float* lsum, uint32_t wg, uint32_t r0,
                                                           uint32_t lane) {
#pragma unroll
  for (uint32_t h = 0; h < 2; ++h) {
    l[h] = quad_sum(l[h]);
    if (lane % 4 == 0) lsum[wg * kTileRows + r0 + 8 * h] = l[h];
  }
  pk::named_barrier_sync(kBarMath, kMathThreads);
#pragma unroll
  for (uint32_t h = 0; h < 2; ++h) l[h] = lsum[r0 + 8 * h] + lsum[kTileRows + r0 + 8 * h];
}

// ----------------------------------------------------------------------------- per-thread rows
// This thread's two query rows of the tile (r0 and r0 + 8, r0 = 16 warp + lane / 4: the rows of
// a wgmma accumulator fragment) in one piece: global row, token, head, last visible key.
struct ThreadRows {
  uint32_t grow[2], tok[2], head[2];
  int lim[2];
};

__device__ __forceinline__ ThreadRows thread_rows(const Params& p, const Piece& pc, uint32_t tile, uint32_t r0) {
  ThreadRows tr;
#pragma unroll
  for (uint32_t h = 0; h < 2; ++h) {
    tr.grow[h] = tile * kTileRows + r0 + 8 * h;
    tr.tok[h] = tr.grow[h] / p.h_q;
    tr.head[h] = tr.grow[h] - tr.tok[h] * p.h_q;
    const int last = p.causal ? pc.seqlen - (int)p.s_q + (int)tr.tok[h] : pc.seqlen - 1;
    tr.lim[h] = min(last, pc.seqlen - 1);   // clamped below seqlen
  }
  return tr;
}

// Epilogue of a piece, this thread's rows and its warpgroup's 256 output columns: a sequence with
// one split writes out = acc / l (bf16) and lse = (m + log2 l) ln 2 (+inf, out 0 when no key is
// visible); a piece of a split sequence writes acc / l (f32) and m + log2 l (base 2, -inf when
// nothing was visible) to scratch row `split id`, merged by pk_mla_combine. kMaxLogits (the
// sparse prefill, whose schedule never splits a token): also max_logits = m ln 2, the largest
// scaled score (-inf: none; NaN where the row's scores hold a NaN, as l does).
template <bool kSparse, bool kMaxLogits = false>
__device__ __forceinline__ void write_piece_output(const Params& p, const Piece& pc, const ThreadRows& tr,
                                                   const float (&acc)[128], const float (&m)[2], const float (&l)[2],
                                                   uint32_t wg, uint32_t lane) {
  const int nsplit = __ldg(p.sched.nsplits + pc.b + 1) - __ldg(p.sched.nsplits + pc.b);
  const uint32_t col0 = kLatentPerWg * wg + 2 * (lane % 4);   // this thread's first output column
#pragma unroll
  for (uint32_t h = 0; h < 2; ++h) {
    if (tr.grow[h] >= p.rows) continue;
    // a row with a NaN score: lse +inf and out NaN for the dense decode (docs/numerics.md), lse
    // and out NaN for the sparse one (FlashMLA's sparse convention, the reference's)
    const bool seen = kSparse ? !(l[h] <= 0.0f) : l[h] > 0.0f;
    float inv = seen ? __frcp_rn(l[h]) : 0.0f;
    const float lse2 = seen ? m[h] + pk::lg2_approx(l[h]) : -INFINITY;
    if (nsplit == 1) {
      if (kSparse && p.sink != nullptr) inv *= sink_factor(__ldg(p.sink + tr.head[h]), lse2);
      uint16_t* dst = p.out + pc.b * p.out_sb + (uint64_t)tr.tok[h] * p.out_ss + (uint64_t)tr.head[h] * p.out_sh + col0;
#pragma unroll
      for (uint32_t c = 0; c < 32; ++c)
        *reinterpret_cast<uint32_t*>(dst + 8 * c) =
            pk::pack_bf16x2(acc[4 * c + 2 * h] * inv, acc[4 * c + 2 * h + 1] * inv);
      if (wg == 0 && lane % 4 == 0) {
        p.lse[pc.b * p.lse_sb + (uint64_t)tr.head[h] * p.lse_sh + (uint64_t)tr.tok[h] * p.lse_ss] =
            seen ? lse2 * kLn2 : INFINITY;
        if constexpr (kMaxLogits)
          p.max_logits[pc.b * p.ml_sb + (uint64_t)tr.head[h] * p.ml_sh] = isnan(l[h]) ? l[h] : m[h] * kLn2;
      }
    } else {
      const uint64_t split_row = (uint64_t)pc.split * p.rows + tr.grow[h];
      float* dst = p.oacc + split_row * kDimV + col0;
#pragma unroll
      for (uint32_t c = 0; c < 32; ++c)
        *reinterpret_cast<float2*>(dst + 8 * c) = make_float2(acc[4 * c + 2 * h] * inv, acc[4 * c + 2 * h + 1] * inv);
      if (wg == 0 && lane % 4 == 0) p.lacc[split_row] = lse2;
    }
  }
}

// The running max moves to m_new (identical bits in both warpgroups: the same operands): the
// row sum is rescaled and alpha, the rescale of everything accumulated so far, returned;
// m_use is the exponent's offset (0 while no key was seen: keeps exponents finite).
__device__ __forceinline__ float advance_max(float& m, float& l, float m_new, float& m_use) {
  m_use = m_new == -INFINITY ? 0.0f : m_new;
  const float alpha = pk::ex2_approx(m - m_use);   // 0 while m was -inf
  m = m_new;
  l *= alpha;
  return alpha;
}

// ----------------------------------------------------------------------------- seesaw (bf16 cache)
// Warpgroup w owns the blocks that land in K ring stage w; consecutive blocks alternate
// stages, so the two warpgroups own alternate blocks. For its own block the owner computes
// all of S = Q K^T (64 rows x 64 keys) and the online softmax, carrying the running max over
// from the partner's previous block; it publishes P (bf16) and the new max, and adds P V over
// its 256 output columns with P in registers. The partner adds the same block's P V over its
// own 256 columns with P read from shared memory, after rescaling by the published max. One
// warpgroup's softmax runs while the other's wgmmas (its Q K^T, its P V) run.
//
//   own block j:  [retire P V(j-2), release its stage] wait K(j) | Q K^T(j) ->
//                 [partner's block j-1: wait its P, rescale, P V(j-1) from shared memory] ->
//                 wait Q K^T | softmax(j) | zero stale V rows (partial last block) |
//                 publish P(j), m(j) | retire P V(j-1), release its stage | rescale, P V(j) (registers)
//   after a piece's last block: retire the own P V; the partner's last block as above.
constexpr uint32_t kBarPublished = 2;        // + stage: P and m of the stage's block are published
constexpr uint32_t kPChunk = kChunks - 1;    // the RoPE chunk of a stage: P's home once Q K^T has read it
constexpr uint32_t kVChunksPerWg = kLatentPerWg / 64;   // output columns of a warpgroup, in 64-column chunks
constexpr uint32_t kKeysPerStep = 16;                   // keys of one k16 step of P V
constexpr uint32_t kPvSteps = kPage / kKeysPerStep;     // k16 steps of P V
constexpr uint32_t kStepBytes = kKeysPerStep * pk::kSwizzleRowBytes;   // one k16 step of V rows
constexpr uint32_t kAtomBytes = pk::kSwizzleRows * pk::kSwizzleRowBytes;   // an 8-row swizzle atom
constexpr uint32_t kK16Bytes = 16 * 2;       // one k16 step along a K-major bf16 row
// A matrix descriptor's start address field counts 16-byte units: advancing the operand by
// `bytes` adds bytes / 16 (no carry out of the field inside shared memory).
__device__ __forceinline__ constexpr uint64_t desc_advance(uint32_t bytes) { return bytes >> 4; }
constexpr uint32_t kScoreRegs = kPage / 2;   // S of a 64 x 64 block: 32 f32 per thread
constexpr uint32_t kPRegs = kPage / 4;       // P as bf16 pairs: 16 registers, 4 per k16 step
constexpr uint32_t kQkChunksBeforeTake = 4;  // Q K^T chunks issued before the partner's block is taken
static_assert(kPvSteps * kKeysPerStep == kPage, "P V covers the block");

// In a 1024-byte aligned 128B-swizzled tile, the address of 16-byte unit `unit` of a row from
// the address of the row's unit 0 (byte inside the unit kept): the swizzle is an XOR of the
// unit index (address bits 4-6) with row % 8, so unit u is unit 0 XOR u.
__device__ __forceinline__ uint32_t swizzle128_unit_xor(uint32_t unit0_addr, uint32_t unit) {
  return unit0_addr ^ (unit * pk::kSwizzleUnitBytes);
}

// quad_max of two rows, their shuffles interleaved.
__device__ __forceinline__ void quad_max2(float (&v)[2]) {
#pragma unroll
  for (uint32_t d = 1; d <= 2; d *= 2) {
    const float o0 = __shfl_xor_sync(0xffffffffu, v[0], d), o1 = __shfl_xor_sync(0xffffffffu, v[1], d);
    v[0] = fmaxf(v[0], o0);
    v[1] = fmaxf(v[1], o1);
  }
}

// Reduction with `op` of this thread's 16 fragment elements of row half h (elements i with
// (i >> 1) & 1 == h), as a tree of depth 4 (independent operations back to back).
template <uint32_t h, typename Op>
__device__ __forceinline__ float row_reduce(Op op, const float (&v)[kScoreRegs]) {
  constexpr uint32_t n = kScoreRegs / 2;
  static_assert(n == 16, "tree of depth 4");
  float t[n];
#pragma unroll
  for (uint32_t j = 0; j < n; ++j) t[j] = v[4 * (j / 2) + 2 * h + (j & 1)];
#pragma unroll
  for (uint32_t j = 0; j < 8; ++j) t[j] = op(t[j], t[j + 8]);
#pragma unroll
  for (uint32_t j = 0; j < 4; ++j) t[j] = op(t[j], t[j + 4]);
#pragma unroll
  for (uint32_t j = 0; j < 2; ++j) t[j] = op(t[j], t[j + 2]);
  return op(t[0], t[1]);
}

// kFp8: the FP8 cache's producer wrote the K block (rows past the sequence's end already zero);
// kSparse: keys masked by the stage's used-slot mask instead of the rows' visible range.
template <bool kFp8, bool kSparse>
struct SeesawMath {
  using L = Smem<kSparse>;
  const Params& p;
  uint8_t* smem;
  uint32_t base, full_bar, empty_bar;
  uint32_t wg, tid, lane, r0;
  float* mx;                  // [stage][64]: the running max after the stage's block (published)
  uint32_t s = 0, phase = 0;  // K ring position (every block, both warpgroups)

  __device__ __forceinline__ uint32_t kblock(uint32_t stage) const { return base + L::kKOff + stage * kTileBytes; }

  // Q K^T of the block in `stage` over chunks [c0, c1) (of 9, 4 k16 steps of m64n64k16 each,
  // both operands K-major), each chunk issued once its TMA box has landed; chunk 0 starts S.
  template <uint32_t c0, uint32_t c1>
  __device__ __forceinline__ void issue_qk(float (&sc)[kScoreRegs], uint32_t stage, uint32_t ph) const {
    const uint64_t q_desc = pk::make_desc_k128b(base + kQOff), k_desc = pk::make_desc_k128b(kblock(stage));
#pragma unroll
    for (uint32_t c = c0; c < c1; ++c) {
      pk::mbar_wait(full_bar + 8 * (stage * kChunks + c), ph);
      const uint64_t da = q_desc + desc_advance(c * kChunkBytes), db = k_desc + desc_advance(c * kChunkBytes);
#pragma unroll
      for (uint32_t kk = 0; kk < 4; ++kk)
        pk::WgmmaBF16<64>::mma(sc, da + desc_advance(kk * kK16Bytes), db + desc_advance(kk * kK16Bytes),
                                    (c | kk) != 0 ? 1u : 0u);
    }
  }

  // The descriptor of V's k16 step kk over this warpgroup's columns: MN-major, LBO = one
  // 64-column chunk, SBO = one 8-key atom.
  __device__ __forceinline__ uint64_t v_desc(uint32_t stage) const {
    return pk::make_desc_mn128b(kblock(stage) + kVChunksPerWg * wg * kChunkBytes, kChunkBytes, kAtomBytes);
  }

  // acc += P V over this warpgroup's columns, P of the own block in registers.
  __device__ __forceinline__ void issue_pv_regs(float (&acc)[128], uint32_t (&pa)[kPRegs], uint32_t stage) const {
#pragma unroll
    for (uint32_t i = 0; i < 128; ++i) pk::fence_operand(acc[i]);
#pragma unroll
    for (uint32_t i = 0; i < kPRegs; ++i) pk::fence_operand(pa[i]);
    pk::wgmma_fence();
    const uint64_t dv = v_desc(stage);
#pragma unroll
    for (uint32_t kk = 0; kk < kPvSteps; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      pk::wgmma_m64n256k16_bf16_rt(acc, a, dv + desc_advance(kk * kStepBytes), 1u);
    }
    pk::wgmma_commit();
  }

  // acc += P V over this warpgroup's columns, P of the partner's block from the stage's P chunk.
  __device__ __forceinline__ void issue_pv_smem(float (&acc)[128], uint32_t stage) const {
#pragma unroll
    for (uint32_t i = 0; i < 128; ++i) pk::fence_operand(acc[i]);
    pk::wgmma_fence();
    const uint64_t dp = pk::make_desc_k128b(kblock(stage) + kPChunk * kChunkBytes), dv = v_desc(stage);
#pragma unroll
    for (uint32_t kk = 0; kk < kPvSteps; ++kk)
      pk::wgmma_m64n256k16_bf16_kt(acc, dp + desc_advance(kk * kK16Bytes), dv + desc_advance(kk * kStepBytes), 1u);
    pk::wgmma_commit();
  }

  // After the wait that retired a block's P V (acc readable): its stage released (one arrival
  // per math warp).
  __device__ __forceinline__ void release_after_retired(float (&acc)[128], uint32_t stage) const {
#pragma unroll
    for (uint32_t i = 0; i < 128; ++i) pk::fence_operand(acc[i]);
    if (lane == 0) pk::mbar_arrive(empty_bar + 8 * stage);
  }

  // Every wgmma retired, the last P V's stage released.
  __device__ __forceinline__ void retire_pv(float (&acc)[128], uint32_t stage) const {
    pk::wgmma_wait<0>();
    release_after_retired(acc, stage);
  }

  __device__ __forceinline__ static void rescale(float (&acc)[128], const float (&alpha)[2]) {
#pragma unroll
    for (uint32_t i = 0; i < 128; ++i) acc[i] *= alpha[(i >> 1) & 1];
  }

  // Online softmax of the own block (keys key0 + its fragment columns): mask keys past the
  // row's last visible one (only where the block has such keys), advance the running max over
  // the base-2 logits S * scale_log2, P = 2^(S * scale_log2 - m) in place, add P's row sums to
  // l (this warpgroup's keys only), and rescale acc by alpha (4 registers per exponential: the
  // multiplies issue while the exponentials wait on their pipe). Reductions are trees, so
  // independent operations issue back to back; scale_log2 > 0, so max(S) * scale_log2 is the
  // max of the scaled logits. Sparse: the keys of slots not in `used` are masked instead.
  __device__ __forceinline__ void softmax(float (&sc)[kScoreRegs], float (&m)[2], float (&l)[2], float (&acc)[128],
                                          int key0, const int (&lim)[2], uint64_t used) const {
    if constexpr (kSparse) {
      if (used != kAllRows) {
        const uint32_t slot0 = 2 * (lane % 4);
#pragma unroll
        for (uint32_t i = 0; i < kScoreRegs; ++i)
          if (!((used >> (slot0 + 8 * (i >> 2) + (i & 1))) & 1)) sc[i] = -INFINITY;
      }
    } else if (key0 + (int)(kPage - 1) > min(lim[0], lim[1])) {
#pragma unroll
      for (uint32_t i = 0; i < kScoreRegs; ++i)
        if (key0 + (int)(8 * (i >> 2) + (i & 1)) > lim[(i >> 1) & 1]) sc[i] = -INFINITY;
    }
    const auto max_op = [](float a, float b) { return fmaxf(a, b); };
    const auto add_op = [](float a, float b) { return a + b; };
    float row_max[2] = {row_reduce<0>(max_op, sc), row_reduce<1>(max_op, sc)};
    quad_max2(row_max);
    float alpha[2], neg_m[2], neg_fma[2];
    bool rounded[2];
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {
      float m_use;
      alpha[h] = advance_max(m[h], l[h], fmaxf(m[h], row_max[h] * p.scale_log2), m_use);
      neg_m[h] = -m_use;
      rounded[h] = pk::exponent_rounded(m_use);
      neg_fma[h] = rounded[h] ? 0.0f : neg_m[h];
    }
#pragma unroll
    for (uint32_t i = 0; i < kScoreRegs; ++i) sc[i] = fmaf(sc[i], p.scale_log2, neg_fma[(i >> 1) & 1]);
    if (rounded[0] || rounded[1]) {   // |S x scale_log2| >= 2^24 (pk::exponent_rounded): rare
#pragma unroll
      for (uint32_t i = 0; i < kScoreRegs; ++i)
        if (rounded[(i >> 1) & 1]) sc[i] = __fadd_rn(sc[i], neg_m[(i >> 1) & 1]);
    }
    constexpr uint32_t kAccPerExp = 128 / kScoreRegs;
#pragma unroll
    for (uint32_t i = 0; i < kScoreRegs; ++i) {
      sc[i] = pk::ex2_approx(sc[i]);
#pragma unroll
      for (uint32_t a = kAccPerExp * i; a < kAccPerExp * (i + 1); ++a) {
        acc[a] *= alpha[(a >> 1) & 1];
        pk::fence_operand(acc[a]);   // keeps the multiply here, not sunk to the wgmma
      }
    }
    l[0] += row_reduce<0>(add_op, sc);
    l[1] += row_reduce<1>(add_op, sc);
  }

  // Partial last block: the stale rows (keys >= valid, possibly NaN) of all eight V chunks
  // zeroed (0 * NaN = NaN in P V), after the own Q K^T (their only other reader) retired.
  __device__ __forceinline__ void zero_stale_v(uint32_t stage, uint32_t valid) const {
    constexpr uint32_t kUnits = (kChunks - 1) * kPage * pk::kSwizzleRowBytes / pk::kSwizzleUnitBytes;
    uint8_t* const v = smem + (kblock(stage) - base);
#pragma unroll 4
    for (uint32_t u = tid; u < kUnits; u += 128) {
      const uint32_t key = (u / (pk::kSwizzleRowBytes / pk::kSwizzleUnitBytes)) % kPage;
      if (key >= valid) *reinterpret_cast<uint4*>(v + pk::kSwizzleUnitBytes * u) = make_uint4(0, 0, 0, 0);
    }
  }

  // P -> bf16 pairs: the A fragments of the own P V (k16 step kk = registers 4kk..4kk+3) and
  // the partner's copy in the stage's P chunk (K-major, 128B swizzle); the new max to
  // mx[stage]; then published on the stage's barrier (the partner waits there).
  __device__ __forceinline__ void publish(const float (&sc)[kScoreRegs], uint32_t (&pa)[kPRegs], const float (&m)[2],
                                          uint32_t stage) const {
    // This thread's pairs sit at bytes 4 (lane % 4) of unit c = i / 2 (keys 8c + 2 (lane % 4)) in
    // rows r0, r0 + 8: the address of unit 0, swizzled, then XOR c (swizzle128_unit_xor).
    const uint32_t ptile = kblock(stage) + kPChunk * kChunkBytes;
    const uint32_t unit0[2] = {ptile + pk::swizzle128_byte(r0, 4 * (lane % 4)),
                               ptile + pk::swizzle128_byte(r0 + 8, 4 * (lane % 4))};
#pragma unroll
    for (uint32_t i = 0; i < kPRegs; ++i) {
      pa[i] = pk::pack_bf16x2(sc[2 * i], sc[2 * i + 1]);
      pk::st_shared_b32(swizzle128_unit_xor(unit0[i & 1], i >> 1), pa[i]);
    }
    if (lane % 4 == 0) {
      mx[stage * kTileRows + r0] = m[0];
      mx[stage * kTileRows + r0 + 8] = m[1];
    }
    pk::fence_proxy_async_shared();   // st.shared (P, zeroed V rows) -> the partner's wgmma reads
    pk::named_barrier_arrive(kBarPublished + stage, kMathThreads);
  }

  // The partner's block in `stage`: wait until it is published, advance the max to its
  // value, rescale, and issue its P V (P from shared memory).
  __device__ __forceinline__ void take_partner_block(float (&acc)[128], float (&m)[2], float (&l)[2],
                                                     uint32_t stage) const {
    pk::named_barrier_sync(kBarPublished + stage, kMathThreads);
    float alpha[2], m_use[2];
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) alpha[h] = advance_max(m[h], l[h], mx[stage * kTileRows + r0 + 8 * h], m_use[h]);
    rescale(acc, alpha);
    issue_pv_smem(acc, stage);
  }

  // One piece's blocks [lo, hi) (hi > lo) into acc, m, l. For an own block j: the Q K^T
  // chunks that have landed first, then the partner's block j - 1 (published meanwhile, P V
  // from shared memory), then the rest of Q K^T; as soon as that P V retired, block j - 1's
  // stage is released, so the ring refills while this Q K^T and softmax run. On the tensor pipe the partner's
  // P V (both halves) slots in between Q K^T chunks of the next block, which land one by one.
  __device__ __forceinline__ void run_piece(const Piece& pc, const ThreadRows& tr, float (&acc)[128], float (&m)[2],
                                            float (&l)[2]) {
    const uint32_t valid_last = pc.valid_rows(pc.hi - 1);
    uint32_t pa[kPRegs];
#pragma unroll
    for (uint32_t i = 0; i < kPRegs; ++i) pa[i] = 0;
    bool own_pending = false;   // the own P V in flight (acc, pa busy)
    uint32_t own_stage = 0, last_stage = 0;
    for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
      const uint32_t stage = s, ph = phase;
      last_stage = stage;
      if (++s == L::kStages) {
        s = 0;
        phase ^= 1;
      }
      if (stage != wg) continue;   // the partner's: taken at the next own block or after the loop

      if (own_pending) retire_pv(acc, own_stage);
      own_pending = false;
      float sc[kScoreRegs];
#pragma unroll
      for (uint32_t i = 0; i < kScoreRegs; ++i) pk::fence_operand(sc[i]);
#pragma unroll
      for (uint32_t i = 0; i < kPRegs; ++i) pk::fence_operand(pa[i]);
      pk::wgmma_fence();
      issue_qk<0, kQkChunksBeforeTake>(sc, stage, ph);
      pk::wgmma_commit();
      const bool partner = blk > pc.lo;   // block blk - 1, the partner's, in the other stage
      if (partner) take_partner_block(acc, m, l, stage ^ 1);
      // One more chunk queued behind that P V, then its retirement awaited: the stage of block
      // blk - 1 refills as soon as it retired, while the pipe runs on with this chunk.
      issue_qk<kQkChunksBeforeTake, kQkChunksBeforeTake + 1>(sc, stage, ph);
      pk::wgmma_commit();
      if (partner) {
        pk::wgmma_wait<1>();
        release_after_retired(acc, stage ^ 1);
      }
      issue_qk<kQkChunksBeforeTake + 1, kChunks>(sc, stage, ph);
      pk::wgmma_commit();
      pk::wgmma_wait<0>();
#pragma unroll
      for (uint32_t i = 0; i < kScoreRegs; ++i) pk::fence_operand(sc[i]);
      const uint64_t used = kSparse ? reinterpret_cast<const uint64_t*>(smem + L::kMaskOff)[stage] : kAllRows;
      softmax(sc, m, l, acc, (int)(blk * kPage + 2 * (lane % 4)), tr.lim, used);
      if (!kFp8 && blk + 1 == pc.hi && valid_last < kPage) zero_stale_v(stage, valid_last);
      publish(sc, pa, m, stage);
      issue_pv_regs(acc, pa, stage);
      own_pending = true;
      own_stage = stage;
    }
    if (own_pending) retire_pv(acc, own_stage);
    if (last_stage != wg) {        // the piece ends with the partner's block
      take_partner_block(acc, m, l, last_stage);
      retire_pv(acc, last_stage);
    }
  }
};

// ----------------------------------------------------------------------------- producer
// Load the Q tile of piece `pc` (9 TMA boxes of 64 rows x 64 columns, 128-byte swizzle, onto
// q_full) once the previous piece's Q K^T released it (q_empty); one elected lane issues.
__device__ __forceinline__ void load_q_tile(const pk::TensorMap* tmap_q, uint32_t base, uint32_t b, uint32_t tile,
                                            uint32_t q_full, uint32_t q_empty, uint32_t& q_phase, bool leader) {
  pk::mbar_wait(q_empty, q_phase ^ 1);
  if (leader) {
    pk::mbar_arrive_expect_tx(q_full, kTileBytes);
#pragma unroll
    for (uint32_t c = 0; c < kChunks; ++c)
      pk::tma_load_3d(base + kQOff + c * kChunkBytes, tmap_q, q_full, (int32_t)(kBoxCols * c),
                      (int32_t)(tile * kTileRows), (int32_t)b);
  }
  __syncwarp();
  q_phase ^= 1;
}

// Load KV chunks, bf16 cache: block `blk` (page id `page`) into ring stage s, after empty[s]:
// the page's 9 boxes of 64 columns, box c onto its own full[s][c] (Q K^T starts on the first
// chunk).
__device__ __forceinline__ void load_kv_block(const pk::TensorMap* tmap_kv, uint32_t base, int32_t page, uint32_t s,
                                              uint32_t full_bar, bool leader) {
  using L = Smem<false>;
  const int32_t first_row = page * (int32_t)kPage;
  if (leader) {
#pragma unroll
    for (uint32_t c = 0; c < kChunks; ++c) {
      const uint32_t bar = full_bar + kMbarBytes * (s * kChunks + c);
      pk::mbar_arrive_expect_tx(bar, kChunkBytes);
      pk::tma_load_2d(base + L::kKOff + s * kTileBytes + c * kChunkBytes, tmap_kv, bar, (int32_t)(kBoxCols * c),
                      first_row);
    }
  }
  __syncwarp();
}

// The bf16 cache's producer warp (one elected lane issues the copies): per piece with blocks,
// the Q tile, then each block (load_kv_block) through the ring.
__device__ __forceinline__ void produce_bf16(const Params& p, const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_kv,
                                             uint32_t base, const int* row, uint32_t num_pieces, uint32_t tile,
                                             uint32_t full_bar, uint32_t empty_bar, uint32_t q_full, uint32_t q_empty) {
  constexpr uint32_t kStages = Smem<false>::kStages;
  const bool leader = pk::elect_one();
  uint32_t s = 0, phase = 0, q_phase = 0;
  for (uint32_t k = 0; k < num_pieces; ++k) {
    const Piece pc = pk::mla_piece(p.sched, row, k);
    if (pc.hi <= pc.lo) continue;
    load_q_tile(tmap_q, base, pc.b, tile, q_full, q_empty, q_phase, leader);
    const int* const table = p.sched.block_table + (uint64_t)pc.b * p.sched.bt_stride;
    for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
      const int32_t page = __ldg(table + blk);   // read before the wait: its latency overlaps
      pk::mbar_wait(empty_bar + kMbarBytes * s, phase ^ 1);
      load_kv_block(tmap_kv, base, page, s, full_bar, leader);
      if (++s == kStages) {
        s = 0;
        phase ^= 1;
      }
    }
  }
}

// The row-loading producer warpgroup (Producer: Fp8Producer, or Bf16RowProducer for the sparse
// prefill): per piece with blocks, its first warp loads the Q tile, then all four convert (copy)
// each block into the ring. Sparse: the CTA's 64 query rows are the heads of query token
// tile * 64 / h_q (h_q % 64 == 0).
template <bool kSparse, typename Producer>
__device__ __forceinline__ void produce_rows(const Params& p, const pk::TensorMap* tmap_q, uint32_t base, const int* row,
                                            uint32_t num_pieces, uint32_t tile, uint32_t q_full, uint32_t q_empty) {
  const uint32_t tid = threadIdx.x % kWarpgroupThreads;
  const bool leader = pk::elect_one();
  Producer conv(base, tid);
  const uint32_t tok = kSparse ? tile * kTileRows / p.h_q : 0;
  uint32_t q_phase = 0;
  for (uint32_t k = 0; k < num_pieces; ++k) {
    const Piece pc = pk::mla_piece(p.sched, row, k);
    if (pc.hi <= pc.lo) continue;
    if (conv.warp() == 0) load_q_tile(tmap_q, base, pc.b, tile, q_full, q_empty, q_phase, leader);
    uint32_t limit = 0, buf = 0;
    if constexpr (kSparse) {
      limit = pk::sparse_slot_limit(p.topk_length, pc.b, p.topk, p.sched.err, tid == 0);
      conv.fetch_indices(p, pc, tok, pc.lo, limit, buf);
    }
    const int* const table = p.sched.block_table + (uint64_t)pc.b * p.sched.bt_stride;   // dense: page ids a block ahead
    int page = kSparse ? 0 : __ldg(table + pc.lo);
    for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
      int2 idx = make_int2(page, -1);
      if constexpr (kSparse) {
        idx = conv.take_indices(buf);
        buf ^= 1;
        conv.fetch_indices(p, pc, tok, blk + 1, limit, buf);   // in flight while this block converts
      } else {
        page = blk + 1 < pc.hi ? __ldg(table + blk + 1) : 0;   // in flight while this block converts
      }
      conv.block(p, pc, blk, idx);
    }
  }
}

// ----------------------------------------------------------------------------- pieces
// The math warpgroups' loop over the partition's pieces (Math: SeesawMath<kFp8, kSparse>): wait
// for the Q tile, the piece's blocks, release Q, the row sums of
// both warpgroups, the epilogue. The barrier after the row sums keeps a warpgroup from writing
// the next piece's sums before the other has read these (the seesaw's warpgroups do not meet
// at a barrier every block).
template <bool kSparse, bool kMaxLogits, typename Math>
__device__ __forceinline__ void run_pieces(const Params& p, Math& math, const int* row, uint32_t num_pieces,
                                           uint32_t tile, uint32_t q_full, uint32_t q_empty, float* lsum, uint32_t wg,
                                           uint32_t lane, uint32_t r0) {
  uint32_t q_phase = 0;
  for (uint32_t k = 0; k < num_pieces; ++k) {
    const Piece pc = pk::mla_piece(p.sched, row, k);
    const ThreadRows tr = thread_rows(p, pc, tile, r0);
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};
    float acc[128];
#pragma unroll
    for (uint32_t i = 0; i < 128; ++i) acc[i] = 0.0f;
    if (pc.hi > pc.lo) {
      pk::mbar_wait(q_full, q_phase);
      q_phase ^= 1;
      math.run_piece(pc, tr, acc, m, l);
      if (lane == 0) pk::mbar_arrive(q_empty);   // this piece's Q K^T are done
      sum_rows_across_warpgroups(l, lsum, wg, r0, lane);
      pk::named_barrier_sync(kBarMath, kMathThreads);
    }
    write_piece_output<kSparse, kMaxLogits>(p, pc, tr, acc, m, l, wg, lane);
  }
}

// kFp8: the producer warpgroup loads the K rows itself (the FP8 cache; kBf16Rows: the sparse
// prefill's bf16 rows, copied) and the math runs with its register split.
template <bool kFp8, bool kSparse, bool kBf16Rows = false>
__device__ __forceinline__ void mla_decode(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_kv,
                                           const Params& p) {
  static_assert(kFp8 || !kSparse, "sparse attention: the producer warpgroup gathers the rows (the kFp8 path)");
  static_assert(!kBf16Rows || (kFp8 && kSparse), "bf16 row gathering: the sparse prefill");
  if (!pk::mla_partition_ok<kSparse>(p.sched)) return;   // the same verdict in every warp: the CTA returns
  using L = Smem<kSparse>;
  constexpr uint32_t kStages = L::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_addr = pk::smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;
  uint8_t* const smem = smem_raw + (base - raw_addr);
  const uint32_t full_bar = base + L::kBarOff;   // + kMbarBytes (s kFullPerStage + chunk)
  const uint32_t empty_bar = full_bar + kMbarBytes * kStages * L::kFullPerStage;   // + kMbarBytes s
  const uint32_t q_full = empty_bar + kMbarBytes * kStages;
  const uint32_t q_empty = q_full + kMbarBytes;
  // a chunk lands: bf16, the producer's arrive.expect_tx (then the TMA's bytes); FP8, an arrival
  // of every converting thread
  constexpr uint32_t kFullArrivals = kFp8 ? kConvThreads : 1;

  if (threadIdx.x == 0) {
#pragma unroll
    for (uint32_t s = 0; s < kStages; ++s) {
#pragma unroll
      for (uint32_t c = 0; c < L::kFullPerStage; ++c)
        pk::mbar_init(full_bar + kMbarBytes * (s * L::kFullPerStage + c), kFullArrivals);
      pk::mbar_init(empty_bar + kMbarBytes * s, kMathWarpArrivals);
    }
    pk::mbar_init(q_full, 1);
    pk::mbar_init(q_empty, kMathWarpArrivals);
    pk::fence_mbarrier_init();
    pk::fence_proxy_async_shared();
  }
  __syncthreads();

  const uint32_t wg = threadIdx.x / kWarpgroupThreads;
  const int* const row = p.sched.meta + pk::kMlaMetaCols * blockIdx.x;   // its metadata row (pk/mla_partition.cuh)
  const uint32_t num_pieces = (uint32_t)__ldg(row + pk::kMetaNumPieces);
  const uint32_t tile = blockIdx.y;

  if (wg == kProducerWarpgroup) {
    if constexpr (kFp8) {
      pk::setmaxnreg_dec<kConvRegs>();
      using Producer = std::conditional_t<kBf16Rows, Bf16RowProducer, Fp8Producer<kSparse>>;
      produce_rows<kSparse, Producer>(p, tmap_q, base, row, num_pieces, tile, q_full, q_empty);
    } else {
      pk::setmaxnreg_dec<kProducerRegs>();
      if ((threadIdx.x / 32) % kMathWarps == 0)   // one producer warp
        produce_bf16(p, tmap_q, tmap_kv, base, row, num_pieces, tile, full_bar, empty_bar, q_full, q_empty);
    }
    return;
  }

  // -------------------------------------------------------------------- math
  pk::setmaxnreg_inc<kFp8 ? kMathRegsFp8 : kMathRegs>();
  const uint32_t tid = threadIdx.x % kWarpgroupThreads;
  const uint32_t lane = tid % 32;
  const uint32_t r0 = 16 * (tid / 32) + lane / 4;   // this thread's rows (wgmma fragment): r0 and r0 + 8
  float* const red = reinterpret_cast<float*>(smem + L::kRedOff);   // the published maxima [stage][64]
  float* const lsum = reinterpret_cast<float*>(smem + L::kSumOff);
  SeesawMath<kFp8, kSparse> math{p, smem, base, full_bar, empty_bar, wg, tid, lane, r0, red};
  run_pieces<kSparse, kBf16Rows>(p, math, row, num_pieces, tile, q_full, q_empty, lsum, wg, lane, r0);
  // PDL: this CTA's last out / scratch stores are issued; the combine may start its CTAs (its
  // griddep_wait still waits for this whole grid, so it reads nothing stale).
  pk::griddep_launch_dependents();
}

}  // namespace

// One entry per cache layout, the same parameters (pykernels/cuda/mla.py packs them).
#define PK_MLA_DECODE_ENTRY(NAME, FP8)                                                                         \
  extern "C" __global__ void __launch_bounds__(kThreads, 1) NAME(PK_MLA_DECODE_PARAMS) {                     \
    const Params p{{PK_MLA_DECODE_ARGS}};                                                                      \
    mla_decode<FP8, false>(&tmap_q, &tmap_kv, p);                                                              \
  }

// bf16 cache [num_blocks, 64, 1, 576]: tmap_kv is a 2-D map over [num_blocks * 64, 576].
PK_MLA_DECODE_ENTRY(pk_mla_decode_bf16, false)

// The FP8 cache ([num_blocks, 64, 1, 656] bytes, pykernels/reference/mla.py), dense and sparse:
// the bf16 entry's parameters (tmap_kv unused: the producer reads the rows itself) + those of
// Params' sparse part, `cache` the cache's bytes in both. Dense (pk_mla_decode_fp8): indices,
// topk_length and sink null. Sparse (FlashMLA's flash_mla_with_kvcache(..., indices=...);
// pykernels/cuda/dsa.py): block_table unused, seqlens = topk per sequence (the schedule's unit);
// the CTA's 64 query rows are 64 heads of one query token (h_q a multiple of 64), each 64-slot
// block of its index row gathered token row by token row and masked by slot.
#define PK_MLA_DECODE_FP8_ENTRY(NAME, SPARSE)                                                                  \
  extern "C" __global__ void __launch_bounds__(kThreads, 1) NAME(PK_MLA_DECODE_PARAMS, PK_MLA_FP8_TAIL_PARAMS) { \
    const Params p{{PK_MLA_DECODE_ARGS, PK_MLA_FP8_TAIL_ARGS}};                                                \
    mla_decode<true, SPARSE>(&tmap_q, &tmap_kv, p);                                                            \
  }

PK_MLA_DECODE_FP8_ENTRY(pk_mla_decode_fp8, false)
PK_MLA_DECODE_FP8_ENTRY(pk_mla_sparse_decode_fp8, true)

// The sparse prefill (FlashMLA's flash_mla_sparse_fwd; pykernels/cuda/dsa.py): the sparse
// decode over b = the query tokens (s_q 1), `cache` kv's bf16 token rows (576 columns, row_bytes
// apart, 16-byte aligned), + row_bytes, max_logits [b, h_q] f32 and its strides (b: u64, h).
// Its schedule never splits a token (max_logits is written where lse is: no combine).
extern "C" __global__ void __launch_bounds__(kThreads, 1) pk_mla_sparse_prefill_bf16(
    PK_MLA_DECODE_PARAMS, PK_MLA_FP8_TAIL_PARAMS, uint64_t row_bytes, float* max_logits, uint64_t ml_sb,
    uint32_t ml_sh) {
  const Params p{{PK_MLA_DECODE_ARGS, PK_MLA_FP8_TAIL_ARGS}, row_bytes, max_logits, ml_sb, ml_sh};
  mla_decode<true, true, true>(&tmap_q, &tmap_kv, p);
}

// ----------------------------------------------------------------------------- combine
// Grid (b, ceil(rows / 4)), 128 threads: one warp per query row of a sequence with more
// than one split (others return at once). lse = log-sum-exp of the splits' base-2 LSEs,
// out = sum_j 2^(lse_j - lse) out_j; lane l owns columns 4l + 128q (q = 0..3, float4 loads).
// Rows no split saw: out 0, lse +inf. With attn_sink (pk_mla_combine_sink, the sparse
// decode's), out is scaled by sink_factor(sink[head], lse) before rounding.
namespace {
__device__ __forceinline__ void combine(const int* nsplits, const float* oacc, const float* lacc, uint16_t* out,
                                        float* lse, uint32_t rows, uint32_t h_q, uint64_t out_sb, uint32_t out_ss,
                                        uint32_t out_sh, uint64_t lse_sb, uint32_t lse_sh, uint32_t lse_ss,
                                        uint32_t max_splits, const float* sink) {
  pk::griddep_wait();   // PDL: the decode kernel's scratch (and the schedule) complete and visible
  const uint32_t b = blockIdx.x;
  const int s0 = __ldg(nsplits + b);
  const int n = __ldg(nsplits + b + 1) - s0;
  const uint32_t row = blockIdx.y * 4 + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (n <= 1 || row >= rows) return;
  // Scratch rows outside [0, max_splits) are never read. Such num_splits fail the decode
  // kernel's checks (every entry is compared with the metadata there): the error is recorded.
  if (s0 < 0 || s0 > (int)max_splits - n) return;
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = fmaxf(mx, __ldg(lacc + (uint64_t)(s0 + j) * rows + row));
  const float m_use = mx == -INFINITY ? 0.0f : mx;
  float total = 0.0f;
  float4 acc[4];
#pragma unroll
  for (uint32_t q = 0; q < 4; ++q) acc[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int j = 0; j < n; ++j) {
    const uint64_t prow = (uint64_t)(s0 + j) * rows + row;
    const float w = pk::ex2_approx(__ldg(lacc + prow) - m_use);
    if (w > 0.0f) {   // the same for the whole warp (one row): skips unwritten splits' rows
      total += w;
      const float4* src = reinterpret_cast<const float4*>(oacc + prow * kDimV) + lane;
#pragma unroll
      for (uint32_t q = 0; q < 4; ++q) {
        const float4 v = __ldg(src + 32 * q);
        acc[q].x = fmaf(w, v.x, acc[q].x);
        acc[q].y = fmaf(w, v.y, acc[q].y);
        acc[q].z = fmaf(w, v.z, acc[q].z);
        acc[q].w = fmaf(w, v.w, acc[q].w);
      }
    }
  }
  const bool seen = total > 0.0f;
  const uint32_t tok = row / h_q, head = row - (row / h_q) * h_q;
  float inv = seen ? __frcp_rn(total) : 0.0f;
  if (sink != nullptr && seen) inv *= sink_factor(__ldg(sink + head), m_use + pk::lg2_approx(total));
  uint16_t* dst = out + b * out_sb + (uint64_t)tok * out_ss + (uint64_t)head * out_sh + 4 * lane;
#pragma unroll
  for (uint32_t q = 0; q < 4; ++q) {
    uint2 v;
    v.x = pk::pack_bf16x2(acc[q].x * inv, acc[q].y * inv);
    v.y = pk::pack_bf16x2(acc[q].z * inv, acc[q].w * inv);
    *reinterpret_cast<uint2*>(dst + 128 * q) = v;
  }
  if (lane == 0)
    lse[b * lse_sb + (uint64_t)head * lse_sh + (uint64_t)tok * lse_ss] =
        seen ? (m_use + pk::lg2_approx(total)) * kLn2 : INFINITY;
  pk::griddep_launch_dependents();   // stores issued: the next PDL kernel may start its CTAs
}
}  // namespace

extern "C" __global__ void __launch_bounds__(128) pk_mla_combine(
    const int* nsplits, const float* oacc, const float* lacc, uint16_t* out, float* lse, uint32_t rows,
    uint32_t h_q, uint64_t out_sb, uint32_t out_ss, uint32_t out_sh, uint64_t lse_sb, uint32_t lse_sh,
    uint32_t lse_ss, uint32_t max_splits) {
  combine(nsplits, oacc, lacc, out, lse, rows, h_q, out_sb, out_ss, out_sh, lse_sb, lse_sh, lse_ss, max_splits,
          nullptr);
}

// The sparse decode's combine: the same parameters + attn_sink float32 [h_q] (may be null).
extern "C" __global__ void __launch_bounds__(128) pk_mla_combine_sink(
    const int* nsplits, const float* oacc, const float* lacc, uint16_t* out, float* lse, uint32_t rows,
    uint32_t h_q, uint64_t out_sb, uint32_t out_ss, uint32_t out_sh, uint64_t lse_sb, uint32_t lse_sh,
    uint32_t lse_ss, uint32_t max_splits, const float* sink) {
  combine(nsplits, oacc, lacc, out, lse, rows, h_q, out_sb, out_ss, out_sh, lse_sb, lse_sh, lse_ss, max_splits,
          sink);
}
