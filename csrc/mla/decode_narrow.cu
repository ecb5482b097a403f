// MLA decode for few query rows per KV head (s_q * h_q / h_kv <= 32: h_q 16 or 32 at s_q 1,
// h_q 16 at s_q 2) on sm_90a, bf16 or FP8 cache (docs/mla.md "The narrow kernel"; host side:
// pykernels/cuda/mla.py). The same parameters, schedule (tile_scheduler_metadata, num_splits),
// split scratch and combine kernel (pk_mla_combine in csrc/mla/decode.cu) as pk_mla_decode_*.
//
// decode.cu puts 64 query rows on wgmma's M: 16 rows would pay for 64. Here the products are
// transposed so the query rows are N (16 or 32) and the 64 keys of a block, or 64 of the 512
// value columns, are M:
//   S^T [64 keys x N]  = K [64 x 576] Q^T          A = the K block, B = Q (both K-major, smem)
//   O^T [512 x N]     += V^T [512 x 64] P^T        A = V^T: the K block's first 512 columns read
//                                                  MN-major (imm-trans-a), B = P [N x 64] (smem)
// One math warpgroup (warps 0-3) runs every block; warp 4 is the producer (one elected lane
// issues the TMA copies). In this memory-bound regime the tensor work of a block (~70 small
// wgmmas) is a fraction of its load time, so one warpgroup keeps up with HBM.
//
// Per block (64 keys), math warpgroup:
//   bf16 cache: wait for the K stage (9 TMA boxes of 64 x 64 bf16, 128-byte swizzle); a partial
//               last block has its stale rows (possibly NaN) zeroed in V's columns first;
//               S^T = K Q^T (9 chunks x 4 k16 steps of m64nNk16).
//   FP8 cache:  S^T was issued while the previous block's O^T ran (below).
//   Softmax over keys: mask keys past each row's last visible one; column (query row) maxima
//   in-thread, across the 8 lanes of a key column (shfl), across the 4 warps (shared memory,
//   one named barrier); P as bf16 into the P tile [N][64] (128-byte swizzle); O^T += V^T P^T
//   (8 value tiles x 4 k16 steps, one commit group per scale group of 128 columns).
//   bf16: the K stage released once O^T retired. FP8: meanwhile the next raw page (one TMA
//   box, 64 x 656 bytes) is converted into the one bf16 K block (e4m3 * scale in f32, rounded
//   once: exact for the quantizer's power-of-two scales; RoPE copied; rows past the sequence's
//   end zeros), scale group g as soon as O^T's group g retired, and the next block's S^T is
//   issued chunk by chunk as they are written; the raw page is released after its last loads,
//   so the ring's next TMA starts at once. A piece's first page is converted the same way
//   before its loop.
// Epilogue per piece: the row sums summed over the warpgroup; out / lse, or the split scratch
// row for pk_mla_combine, exactly as decode.cu's pieces write them.
//
// Sparse decode (pk_mla_sparse_decode_narrow_n{16,32}, FlashMLA's flash_mla_with_kvcache(...,
// indices=...) for h_q <= 32; host side pykernels/cuda/dsa.py): the FP8 path, a CTA's N rows
// are the h_q heads of ONE query token (blockIdx.y; each token has its own indices) and its
// "pages" are the 64-slot blocks of that token's index row (the schedule counts topk tokens per
// sequence). The producer warp gathers a block's used rows into the raw page by bulk copies
// (one 656-byte row per used slot, row = slot % 64, completing on the stage's full barrier) and
// stores the used-slot mask (slot < topk_length[b] and the index a token row of the cache) in the
// stage's mask word before its arrive; the conversion writes unused rows' latent as zeros (their
// raw rows are stale) and the softmax masks their keys. attn_sink where the output is normalised
// (here for one split, else pk_mla_combine_sink); lse that of the scores.
//
// Shared memory (dynamic, base aligned up to 1024): Q [9][N x 128 B] | bf16: 2 K stages,
// FP8: one bf16 K block + raw pages (3 for N = 16, 2 for N = 32) | P [N x 128 B] | row maxima
// [2 parities][4 warps][N] f32 | row sums [4][N] f32 | mbarriers full[s], empty[s], q_full, q_empty
// | sparse: a u64 used-slot mask per stage.
#include <cstdint>

#include "pk/error_record.cuh"
#include "pk/mla_partition.cuh"
#include "pk/ptx.cuh"
#include "pk/ptx_mla.cuh"
#include "pk/sparse_checks.cuh"
#include "pk/swizzle.cuh"
#include "pk/wgmma_bf16.cuh"
#include "pk/wgmma_narrow.cuh"

namespace {

constexpr uint32_t kPage = pk::kMlaPage;          // keys per block
constexpr uint32_t kDimQK = 576;
constexpr uint32_t kDimV = 512;
constexpr uint32_t kBoxCols = 64;                 // bf16 columns per TMA box: one 128-byte swizzle row
constexpr uint32_t kChunks = kDimQK / kBoxCols;   // 9
constexpr uint32_t kVTiles = kDimV / kBoxCols;    // 8 M tiles of O^T (64 value columns each)
constexpr uint32_t kKChunkBytes = kPage * pk::kSwizzleRowBytes;   // 8,192: 64 keys x 64 columns
constexpr uint32_t kKBlockBytes = kChunks * kKChunkBytes;          // 73,728
constexpr uint32_t kAtomBytes = pk::kSwizzleRows * pk::kSwizzleRowBytes;   // 1,024: an 8-row atom
constexpr uint32_t kK16Bytes = 16 * 2;            // one k16 step along a K-major bf16 row
constexpr uint32_t kStepBytes = 16 * pk::kSwizzleRowBytes;   // one k16 step of V^T: 16 key rows
constexpr uint32_t kK16Steps = kBoxCols / 16;     // k16 steps per 64-column chunk / per block of keys

// FP8 cache token row (pykernels/reference/mla.py): 512 e4m3 | 4 f32 scales | 64 bf16 RoPE.
constexpr uint32_t kFp8Row = 656;
constexpr uint32_t kFp8SfOff = 512;
constexpr uint32_t kFp8RopeOff = 528;
constexpr uint32_t kFp8Group = 128;               // columns per scale
constexpr uint32_t kRawBytes = kPage * kFp8Row;   // 41,984: one page, one TMA box

constexpr uint32_t kMathWarps = 4;
constexpr uint32_t kMathThreads = 32 * kMathWarps;   // one warpgroup
constexpr uint32_t kThreads = kMathThreads + 32;     // + the producer warp
constexpr uint32_t kBarMath = 1;                     // named barrier of the math warpgroup
constexpr uint32_t kMbarBytes = 8;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

__device__ __forceinline__ constexpr uint64_t desc_advance(uint32_t bytes) { return bytes >> 4; }

template <uint32_t N, bool kFp8, bool kSparse = false>
struct Layout {
  static_assert(N == 16 || N == 32, "query rows per CTA");
  static constexpr uint32_t kQChunkBytes = N * pk::kSwizzleRowBytes;   // N rows x 64 columns
  static constexpr uint32_t kQBytes = kChunks * kQChunkBytes;
  static constexpr uint32_t kStages = kFp8 && N == 16 ? 3 : 2;         // TMA ring: raw pages or K blocks
  static constexpr uint32_t kStageBytes = kFp8 ? kRawBytes : kKBlockBytes;
  static constexpr uint32_t kKBlocks = kFp8 ? 1 : kStages;
  static constexpr uint32_t kQOff = 0;
  static constexpr uint32_t kKOff = kQOff + kQBytes;
  static constexpr uint32_t kRawOff = kKOff + kKBlocks * kKBlockBytes;
  static constexpr uint32_t kPOff = kRawOff + (kFp8 ? kStages * kRawBytes : 0);
  static constexpr uint32_t kRedOff = kPOff + N * pk::kSwizzleRowBytes;   // f32 [2][4][4][N / 4]
  static constexpr uint32_t kSumOff = kRedOff + 2 * kMathWarps * N * 4;   // f32 [4][N]
  static constexpr uint32_t kBarOff = kSumOff + kMathWarps * N * 4;
  static constexpr uint32_t kNumBars = 2 * kStages + 2;
  static constexpr uint32_t kMaskOff = kBarOff + kMbarBytes * kNumBars;   // sparse: u64 used slots per stage
  static constexpr uint32_t kBytes = 1024 + kMaskOff + (kSparse ? 8 * kStages : 0);   // pykernels/cuda/mla.py
  static_assert(kKOff % 1024 == 0 && kRawOff % 1024 == 0 && kPOff % 1024 == 0, "swizzle atoms / TMA");
  static_assert(kBytes <= 227 * 1024, "shared memory per block");
  static_assert(kFp8 || !kSparse, "the sparse decode reads the FP8 cache");
};
static_assert(Layout<16, false>::kBytes == 169776 && Layout<32, false>::kBytes == 191024 &&
              Layout<16, true>::kBytes == 222016 && Layout<32, true>::kBytes == 201264, "pykernels/cuda/mla.py");
static_assert(Layout<16, true, true>::kBytes == 222016 + 24 && Layout<32, true, true>::kBytes == 201264 + 16,
              "pykernels/cuda/mla.py");

using Params = pk::MlaDecodeArgs;   // pk/mla_partition.cuh

// attn_sink (decode.cu's sink_factor): out scaled by 1 / (1 + 2^(sink log2(e) - lse2)).
__device__ __forceinline__ float sink_factor(float sink, float lse2) {
  return __frcp_rn(1.0f + pk::ex2_approx(sink * kLog2e - lse2));
}

// ----------------------------------------------------------------------------- producer
// Sparse: the piece's blocks of query token blockIdx.y's slots through the ring (s, phase). Lane
// l takes slots 64 blk + l and + 32: used when below topk_length and naming a token row of the
// cache (pk::sparse_slot_limit, pk::sparse_index_used: decode.cu's rule, bad values recorded in
// the device error record, never read). After empty[s]: the elected lane stores the used-slot
// mask (bit r: row r of the raw page) and arrives expecting the used rows' bytes; each lane
// bulk-copies its used rows (656 bytes, row r = slot % 64 of the page), completing on full[s].
// Unused rows keep stale bytes.
template <typename L>
__device__ __forceinline__ void gather_slots(const Params& p, const pk::MlaPiece& pc, uint32_t base, uint32_t full_bar,
                                             uint32_t empty_bar, bool leader, uint32_t& s, uint32_t& phase) {
  const uint32_t lane = threadIdx.x % 32;
  const int* const slots = p.indices + pc.b * p.idx_sb + (uint64_t)blockIdx.y * p.idx_ss;
  const uint32_t limit = pk::sparse_slot_limit(p.topk_length, pc.b, p.topk, p.sched.err, lane == 0);
  for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
    int idx[2];
    bool used[2];
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h) {   // read before the wait: the latency overlaps
      const uint32_t slot = blk * kPage + lane + 32 * h;
      idx[h] = slot < limit ? __ldg(slots + slot) : -1;
      used[h] = pk::sparse_index_used(idx[h], p.num_tokens, p.sched.err, pc.b, p.s_q, [] { return blockIdx.y; },
                                      p.topk, slot);
    }
    const uint32_t mask_lo = __ballot_sync(0xffffffffu, used[0]), mask_hi = __ballot_sync(0xffffffffu, used[1]);
    const uint32_t full = full_bar + kMbarBytes * s, raw = base + L::kRawOff + s * kRawBytes;
    pk::mbar_wait(empty_bar + kMbarBytes * s, phase ^ 1);
    if (leader) {
      pk::st_shared_b32(base + L::kMaskOff + 8 * s, mask_lo);
      pk::st_shared_b32(base + L::kMaskOff + 8 * s + 4, mask_hi);
      pk::mbar_arrive_expect_tx(full, (__popc(mask_lo) + __popc(mask_hi)) * kFp8Row);
    }
    __syncwarp();
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h)
      if (used[h]) pk::bulk_load(raw + (lane + 32 * h) * kFp8Row, p.cache + (uint64_t)idx[h] * kFp8Row, kFp8Row, full);
    __syncwarp();
    if (++s == L::kStages) {
      s = 0;
      phase ^= 1;
    }
  }
}

// One elected lane: per piece with blocks, the Q tile (9 boxes of N rows x 64 columns; rows past
// `rows` zero-filled) once the previous piece's S^T released it, then each block through the
// ring: bf16: 9 boxes of 64 keys x 64 columns; FP8: the raw page in one box; sparse: gather_slots.
template <uint32_t N, bool kFp8, bool kSparse>
__device__ __forceinline__ void produce(const Params& p, const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_kv,
                                        uint32_t base, const int* row, uint32_t num_pieces, uint32_t full_bar,
                                        uint32_t empty_bar, uint32_t q_full, uint32_t q_empty) {
  using L = Layout<N, kFp8, kSparse>;
  const uint32_t q_row = kSparse ? blockIdx.y * p.h_q : 0;   // sparse: query token blockIdx.y's heads
  const bool leader = pk::elect_one();
  uint32_t s = 0, phase = 0, q_phase = 0;
  for (uint32_t k = 0; k < num_pieces; ++k) {
    const pk::MlaPiece pc = pk::mla_piece(p.sched, row, k);
    if (pc.hi <= pc.lo) continue;
    pk::mbar_wait(q_empty, q_phase ^ 1);
    if (leader) {
      pk::mbar_arrive_expect_tx(q_full, L::kQBytes);
#pragma unroll
      for (uint32_t c = 0; c < kChunks; ++c)
        pk::tma_load_3d(base + L::kQOff + c * L::kQChunkBytes, tmap_q, q_full, (int32_t)(kBoxCols * c),
                        (int32_t)q_row, (int32_t)pc.b);
    }
    __syncwarp();
    q_phase ^= 1;
    if constexpr (kSparse) {
      gather_slots<L>(p, pc, base, full_bar, empty_bar, leader, s, phase);
      continue;
    }
    const int* const table = p.sched.block_table + (uint64_t)pc.b * p.sched.bt_stride;
    for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
      const int32_t first_row = __ldg(table + blk) * (int32_t)kPage;   // read before the wait
      const uint32_t full = full_bar + kMbarBytes * s;
      pk::mbar_wait(empty_bar + kMbarBytes * s, phase ^ 1);
      if (leader) {
        pk::mbar_arrive_expect_tx(full, L::kStageBytes);
        if constexpr (kFp8) {
          pk::tma_load_3d(base + L::kRawOff + s * kRawBytes, tmap_kv, full, 0, 0, first_row);
        } else {
#pragma unroll
          for (uint32_t c = 0; c < kChunks; ++c)
            pk::tma_load_2d(base + L::kKOff + s * kKBlockBytes + c * kKChunkBytes, tmap_kv, full,
                            (int32_t)(kBoxCols * c), first_row);
        }
      }
      __syncwarp();
      if (++s == L::kStages) {
        s = 0;
        phase ^= 1;
      }
    }
  }
}

// ----------------------------------------------------------------------------- FP8 page
// The raw page -> the bf16 K block (the TMA box layout: 9 chunks of 64 keys x 128 bytes,
// 128-byte swizzle), one scale group at a time: group g = latent columns [128g, +128) = chunks
// 2g, 2g + 1, all 64 keys (what the P V commit group g read, and what S^T chunks 2g, 2g + 1
// read next). Thread tid converts unit tid % 16 of the group (8 columns: chunk 2g + (tid % 16) / 8,
// unit tid % 8) of keys tid / 16 + 8q (q < 8): key % 8 is the thread's own, so every
// destination is one swizzled address + an immediate. Keys >= valid (stale or NaN in the cache)
// become zeros. Loads and conversions are separate calls, so a group's loads can be issued
// before the wait that frees its rows.
constexpr uint32_t kGroupUnits = kFp8Group / 8;                     // 16 units of 8 values per key
constexpr uint32_t kKeysPerPass = kMathThreads / kGroupUnits;       // 8
constexpr uint32_t kUnitsPerGroup = kPage / kKeysPerPass;           // 8 units per thread
constexpr uint32_t kFp8Groups = kDimV / kFp8Group;                  // 4
struct LatentGroup {
  uint2 x[kUnitsPerGroup];
  float scale[kUnitsPerGroup];
};

__device__ __forceinline__ void load_latent_group(uint32_t raw, uint32_t tid, uint32_t g, LatentGroup& lg) {
  const uint32_t row = raw + tid / kGroupUnits * kFp8Row;
  const uint32_t x_off = kFp8Group * g + 8 * (tid % kGroupUnits), sf_off = kFp8SfOff + 4 * g;
#pragma unroll
  for (uint32_t q = 0; q < kUnitsPerGroup; ++q) {
    lg.x[q] = pk::ld_shared_v2(row + q * kKeysPerPass * kFp8Row + x_off);
    lg.scale[q] = pk::ld_shared_f32(row + q * kKeysPerPass * kFp8Row + sf_off);
  }
}

// kPartial: keys >= valid (sparse: keys key0 + 8q with bit q of `keys` clear, unused slots) are
// written as zeros (only a partial or masked block pays for the test).
template <bool kPartial, bool kSparse>
__device__ __forceinline__ void store_latent_group(uint32_t kblk, uint32_t tid, uint32_t g, const LatentGroup& lg,
                                                   uint32_t valid, uint32_t keys) {
  const uint32_t key0 = tid / kGroupUnits, unit = tid % kGroupUnits;
  const uint32_t dst = kblk + (2 * g + unit / pk::kSwizzleRows) * kKChunkBytes +
                       pk::swizzle128_unit(key0, unit % pk::kSwizzleRows);   // + 1024 q: 8 keys, same key % 8
#pragma unroll
  for (uint32_t q = 0; q < kUnitsPerGroup; q += 2) {
    uint4 r[2];
    const uint2 x[2] = {lg.x[q], lg.x[q + 1]};
    const float sc[2] = {lg.scale[q], lg.scale[q + 1]};
    pk::e4m3x16_scaled_to_bf16x16(x, sc, r);
#pragma unroll
    for (uint32_t e = 0; e < 2; ++e) {
      uint4 v = r[e];
      const bool unused = kSparse ? !((keys >> (q + e)) & 1) : key0 + kKeysPerPass * (q + e) >= valid;
      if (kPartial && unused) v = make_uint4(0, 0, 0, 0);
      pk::st_shared_v4(dst + (q + e) * kKeysPerPass * pk::kSwizzleRowBytes, v);
    }
  }
}

// RoPE (chunk 8), copied as it is: read by S^T only, where keys past the sequence's end are
// masked with a select (a NaN there never reaches P).
__device__ __forceinline__ void convert_rope(uint32_t raw, uint32_t kblk, uint32_t tid) {
  constexpr uint32_t kRopeUnits = kPage * (kDimQK - kDimV) * 2 / pk::kSwizzleUnitBytes;   // 512
  constexpr uint32_t kPerThread = kRopeUnits / kMathThreads;
  constexpr uint32_t kKeysPerPass = kMathThreads / pk::kSwizzleRows;                       // 16
  const uint32_t key0 = tid / pk::kSwizzleRows, un = tid % pk::kSwizzleRows;   // key0 + 16 j: same key % 8
  const uint32_t src = raw + key0 * kFp8Row + kFp8RopeOff + pk::kSwizzleUnitBytes * un;
  const uint32_t dst = kblk + (kChunks - 1) * kKChunkBytes + pk::swizzle128_unit(key0, un);
  uint4 x[kPerThread];
#pragma unroll
  for (uint32_t j = 0; j < kPerThread; ++j) x[j] = pk::ld_shared_v4(src + kKeysPerPass * j * kFp8Row);
#pragma unroll
  for (uint32_t j = 0; j < kPerThread; ++j) pk::st_shared_v4(dst + kKeysPerPass * j * pk::kSwizzleRowBytes, x[j]);
}

// bf16 cache, partial last block: rows >= valid of V's 8 chunks zeroed (0 * NaN = NaN in
// O^T; S masks those keys with a select).
__device__ __forceinline__ void zero_stale_rows(uint8_t* kblk, uint32_t valid, uint32_t tid) {
  constexpr uint32_t kUnitsPerChunkRow = pk::kSwizzleRowBytes / pk::kSwizzleUnitBytes;   // 8
  constexpr uint32_t kUnits = kVTiles * kPage * kUnitsPerChunkRow;
  for (uint32_t v = tid; v < kUnits; v += kMathThreads) {
    const uint32_t key = (v / kUnitsPerChunkRow) % kPage;   // whole rows: the swizzle does not matter
    if (key >= valid) *reinterpret_cast<uint4*>(kblk + pk::kSwizzleUnitBytes * v) = make_uint4(0, 0, 0, 0);
  }
}

// ----------------------------------------------------------------------------- math
// Fragment of an m64nN accumulator (S^T or one O^T tile), thread t = 32 warp + lane: element i
// is M row 16 warp + lane / 4 + 8 h (h = (i >> 1) & 1) and N column col(j) = 8 (j >> 1) +
// 2 (lane % 4) + (j & 1) with j = 2 (i >> 2) + (i & 1): each thread owns N / 4 query rows
// (columns) and, per tile, two M rows (keys of S^T; value columns of O^T).
template <uint32_t N>
struct Frag {
  static constexpr uint32_t kRegs = N / 2;
  static constexpr uint32_t kCols = N / 4;
  __device__ __forceinline__ static constexpr uint32_t col_of(uint32_t i) { return 2 * (i >> 2) + (i & 1); }
  __device__ __forceinline__ static constexpr uint32_t half_of(uint32_t i) { return (i >> 1) & 1; }
  __device__ __forceinline__ static uint32_t col(uint32_t j, uint32_t lane) {
    return 8 * (j >> 1) + 2 * (lane % 4) + (j & 1);
  }
};

// The last visible key of each of this thread's query rows in one piece (clamped below seqlen;
// row n is token n / h_q).
template <uint32_t N>
struct PieceRows {
  int lim[Frag<N>::kCols];
};

template <uint32_t N>
__device__ __forceinline__ PieceRows<N> piece_rows(const Params& p, const pk::MlaPiece& pc, uint32_t lane) {
  PieceRows<N> r;
#pragma unroll
  for (uint32_t j = 0; j < Frag<N>::kCols; ++j) {
    const int tok = (int)(Frag<N>::col(j, lane) / p.h_q);
    const int last = p.causal ? pc.seqlen - (int)p.s_q + tok : pc.seqlen - 1;
    r.lim[j] = min(last, pc.seqlen - 1);
  }
  return r;
}

template <uint32_t N, bool kFp8, bool kSparse>
struct NarrowMath {
  using L = Layout<N, kFp8, kSparse>;
  using F = Frag<N>;
  const Params& p;
  uint8_t* smem;
  uint32_t base, full_bar, empty_bar;
  uint32_t tid, warp, lane;
  uint32_t s = 0, phase = 0;   // ring position of the next block (FP8: the next page to convert)
  uint32_t parity = 0;         // of the row-maxima buffer (flips every block)
  uint32_t keys_used = 3;      // sparse: bit h = this thread's S^T key 16 warp + lane / 4 + 8h of the converted block used

  // S^T = K Q^T over chunks [c0, c1) of the block at kb (4 k16 steps each; `first`: the first
  // chunk of S^T overwrites it).
  __device__ __forceinline__ void issue_s(float (&st)[F::kRegs], uint32_t kb, uint32_t c0, uint32_t c1,
                                          bool first) const {
    const uint64_t dk = pk::make_desc_k128b(kb), dq = pk::make_desc_k128b(base + L::kQOff);
#pragma unroll
    for (uint32_t c = c0; c < c1; ++c)
#pragma unroll
      for (uint32_t kk = 0; kk < kK16Steps; ++kk)
        pk::WgmmaBF16<N>::mma(st, dk + desc_advance(c * kKChunkBytes + kk * kK16Bytes),
                              dq + desc_advance(c * L::kQChunkBytes + kk * kK16Bytes),
                              (first && c == c0 && kk == 0) ? 0u : 1u);
  }

  // O^T += V^T P^T: tile t = value columns [64t, +64) (chunk t of the block, MN-major: LBO one
  // chunk, SBO one 8-key atom), k16 step kk = keys [16kk, +16). One commit group per scale
  // group g (tiles 2g, 2g + 1): the FP8 path rewrites those chunks for the next page as each
  // group retires.
  __device__ __forceinline__ void issue_pv(float (&acc)[kVTiles][F::kRegs], uint32_t kb) const {
    const uint64_t dp = pk::make_desc_k128b(base + L::kPOff);
    const uint64_t dv = pk::make_desc_mn128b(kb, kKChunkBytes, kAtomBytes);   // advanced by constants below
#pragma unroll
    for (uint32_t t = 0; t < kVTiles; ++t) {
#pragma unroll
      for (uint32_t kk = 0; kk < kK16Steps; ++kk)
        pk::WgmmaBF16TransA<N>::mma(acc[t], dv + desc_advance(t * kKChunkBytes + kk * kStepBytes),
                                    dp + desc_advance(kk * kK16Bytes), 1u);
      if (t % 2 == 1) pk::wgmma_commit();
    }
  }

  // FP8: the next raw page of the ring into the K block, and S^T of it issued chunk by chunk as
  // they are written: RoPE (chunk 8) first (S^T, its only reader, has retired), then scale
  // group g (chunks 2g, 2g + 1) once P V commit group g retired (wait_group 4: the later P V
  // groups and the S^T groups issued so far may stay pending; with no P V in flight, as for
  // a piece's first page, it waits for nothing); the page released after its last loads.
  // Returns with S^T's 5 groups (and P V's last) in flight.
  // Sparse: the stage's used-slot mask read after the wait (before the page is released) into
  // this thread's conversion keys and its S^T keys (keys_used, for the block's softmax).
  __device__ __forceinline__ void convert_and_issue_s(float (&st)[F::kRegs], uint32_t valid) {
    pk::mbar_wait(full_bar + kMbarBytes * s, phase);
    if constexpr (kSparse) {
      const uint2 m2 = pk::ld_shared_v2(base + L::kMaskOff + 8 * s);
      const uint64_t used = ((uint64_t)m2.y << 32) | m2.x;
      const uint32_t key_l = 16 * warp + lane / 4;
      keys_used = (uint32_t)((used >> key_l) & 1) | (uint32_t)((used >> (key_l + 8)) & 1) << 1;
      const uint64_t mine = used >> (tid / kGroupUnits);   // bit 8q: key tid / 16 + 8q
      uint32_t keys = 0;
#pragma unroll
      for (uint32_t q = 0; q < kUnitsPerGroup; ++q) keys |= (uint32_t)((mine >> (kKeysPerPass * q)) & 1) << q;
      if (used != ~0ull)
        convert_and_issue_s<true>(st, valid, keys);
      else
        convert_and_issue_s<false>(st, valid, keys);
    } else if (valid < kPage) {
      convert_and_issue_s<true>(st, valid, 0);
    } else {
      convert_and_issue_s<false>(st, valid, 0);
    }
  }

  template <bool kPartial>
  __device__ __forceinline__ void convert_and_issue_s(float (&st)[F::kRegs], uint32_t valid, uint32_t keys) {
    constexpr uint32_t kPending = kFp8Groups;   // P V groups after the one awaited + S^T groups so far
    const uint32_t raw = base + L::kRawOff + s * kRawBytes, kb = base + L::kKOff;
    convert_rope(raw, kb, tid);
    pk::fence_proxy_async_shared();   // st.shared (K block) -> wgmma reads
    pk::named_barrier_sync(kBarMath, kMathThreads);
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(st[i]);
    pk::wgmma_fence();
    issue_s(st, kb, kChunks - 1, kChunks, true);
    pk::wgmma_commit();
#pragma unroll
    for (uint32_t g = 0; g < kFp8Groups; ++g) {
      LatentGroup lg;
      load_latent_group(raw, tid, g, lg);
      if (g + 1 == kFp8Groups) {
        __syncwarp();
        if (lane == 0) pk::mbar_arrive(empty_bar + kMbarBytes * s);   // the raw page is read
      }
      pk::wgmma_wait<kPending>();
      store_latent_group<kPartial, kSparse>(kb, tid, g, lg, valid, keys);
      pk::fence_proxy_async_shared();
      pk::named_barrier_sync(kBarMath, kMathThreads);
      pk::wgmma_fence();
      issue_s(st, kb, 2 * g, 2 * g + 2, false);
      pk::wgmma_commit();
    }
    if (++s == L::kStages) {
      s = 0;
      phase ^= 1;
    }
  }

  // P tile address of this thread's element i, less (i >> 2) * 1024: row n = col(j), key
  // k = key_l + 8h (key_l = 16 warp + lane / 4) at byte 2k of the row, its unit swizzled by
  // n % 8 = 2 (lane % 4) + (j & 1); so four addresses (h, j & 1), the rest an immediate.
  __device__ __forceinline__ uint32_t p_addr(uint32_t h, uint32_t odd) const {
    const uint32_t n = 2 * (lane % 4) + odd, key = 16 * warp + lane / 4 + 8 * h;
    return base + L::kPOff + pk::swizzle128_byte(n, 2 * key);
  }

  // Online softmax over the block's keys (blk * 64 + this thread's two key rows) for this
  // thread's columns; P (bf16) into the P tile; acc rescaled. Written as stages over all
  // columns (each stage's operations independent), for in-order issue.
  __device__ __forceinline__ void softmax(float (&st)[F::kRegs], float (&m)[F::kCols], float (&l)[F::kCols],
                                          float (&acc)[kVTiles][F::kRegs], uint32_t blk, const int (&lim)[F::kCols],
                                          int min_lim) {
    const int key0 = (int)(blk * kPage + 16 * warp + lane / 4);   // + 8 h: this thread's keys
    if constexpr (kSparse) {   // unused slots (their rows stale: maybe NaN)
      if (keys_used != 3) {
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i)
          if (!((keys_used >> F::half_of(i)) & 1)) st[i] = -INFINITY;
      }
    } else if ((int)(blk * kPage + kPage - 1) > min_lim) {   // only blocks with keys past some row's last
#pragma unroll
      for (uint32_t i = 0; i < F::kRegs; ++i)
        if (key0 + 8 * (int)F::half_of(i) > lim[F::col_of(i)]) st[i] = -INFINITY;
    }
    float cmax[F::kCols];
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) cmax[j] = fmaxf(st[4 * (j >> 1) + (j & 1)], st[4 * (j >> 1) + 2 + (j & 1)]);
#pragma unroll
    for (uint32_t d = 4; d <= 16; d *= 2) {
      float other[F::kCols];   // every shuffle of a round first: one shuffle latency per round
#pragma unroll
      for (uint32_t j = 0; j < F::kCols; ++j) other[j] = __shfl_xor_sync(0xffffffffu, cmax[j], d);
#pragma unroll
      for (uint32_t j = 0; j < F::kCols; ++j) cmax[j] = fmaxf(cmax[j], other[j]);
    }
    // The warps' maxima [parity][warp][lane % 4][j]: a thread's N / 4 columns are contiguous
    // (float4 stores by lanes 0-3, float4 loads by every thread)
    float* const red = reinterpret_cast<float*>(smem + L::kRedOff) + parity * kMathWarps * N + (lane % 4) * F::kCols;
    if (lane < 4) {
#pragma unroll
      for (uint32_t j = 0; j < F::kCols; j += 4)
        *reinterpret_cast<float4*>(red + warp * N + j) = make_float4(cmax[j], cmax[j + 1], cmax[j + 2], cmax[j + 3]);
    }
    pk::named_barrier_sync(kBarMath, kMathThreads);
    parity ^= 1;
    float wmax[kMathWarps][F::kCols];
#pragma unroll
    for (uint32_t w = 0; w < kMathWarps; ++w)
#pragma unroll
      for (uint32_t j = 0; j < F::kCols; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(red + w * N + j);
        wmax[w][j] = v.x;
        wmax[w][j + 1] = v.y;
        wmax[w][j + 2] = v.z;
        wmax[w][j + 3] = v.w;
      }
    // the same operands in the same order in every thread: identical bits
    float m_new[F::kCols], alpha[F::kCols], neg_m[F::kCols];
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j)
      m_new[j] = fmaxf(m[j], fmaxf(fmaxf(wmax[0][j], wmax[1][j]), fmaxf(wmax[2][j], wmax[3][j])) * p.scale_log2);
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) neg_m[j] = m_new[j] == -INFINITY ? 0.0f : -m_new[j];   // finite exponents
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) alpha[j] = pk::ex2_approx(m[j] + neg_m[j]);   // 0 while m was -inf
    bool rounded[F::kCols], any_rounded = false;   // |S x scale_log2| >= 2^24 (pk::exponent_rounded): rare
    float neg_fma[F::kCols];
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) {
      rounded[j] = pk::exponent_rounded(neg_m[j]);
      any_rounded |= rounded[j];
      neg_fma[j] = rounded[j] ? 0.0f : neg_m[j];
    }
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) st[i] = fmaf(st[i], p.scale_log2, neg_fma[F::col_of(i)]);
    if (any_rounded) {
#pragma unroll
      for (uint32_t i = 0; i < F::kRegs; ++i)
        if (rounded[F::col_of(i)]) st[i] = __fadd_rn(st[i], neg_m[F::col_of(i)]);
    }
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) st[i] = pk::ex2_approx(st[i]);
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) {
      m[j] = m_new[j];
      l[j] *= alpha[j];
    }
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) l[F::col_of(i)] += st[i];
    const uint32_t pa[4] = {p_addr(0, 0), p_addr(0, 1), p_addr(1, 0), p_addr(1, 1)};   // (few registers held)
    uint32_t bits[F::kRegs];
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) bits[i] = pk::pack_bf16x2(st[i], 0.0f);
#pragma unroll
    for (uint32_t i = 0; i < F::kRegs; ++i) {
      const uint32_t addr = pa[2 * F::half_of(i) + (i & 1)] + (i >> 2) * pk::kSwizzleRows * pk::kSwizzleRowBytes;
      asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"((uint16_t)bits[i]) : "memory");
    }
    bool moved = false;   // the running max moved for some column: acc needs the rescale
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) moved |= alpha[j] != 1.0f;
    if (moved) {
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) acc[t][i] *= alpha[F::col_of(i)];
    }
  }

  // One piece's blocks [lo, hi) (hi > lo) into acc, m, l (l: this thread's keys only).
  __device__ __forceinline__ void run_piece(const pk::MlaPiece& pc, const PieceRows<N>& rows,
                                            float (&acc)[kVTiles][F::kRegs], float (&m)[F::kCols],
                                            float (&l)[F::kCols]) {
    int min_lim = rows.lim[0];
#pragma unroll
    for (uint32_t j = 1; j < F::kCols; ++j) min_lim = min(min_lim, rows.lim[j]);
    float st[F::kRegs];
    // FP8: S^T of a piece's first page issued here, of every later one during the previous
    // block's P V
    if constexpr (kFp8) convert_and_issue_s(st, pc.valid_rows(pc.lo));
    for (uint32_t blk = pc.lo; blk < pc.hi; ++blk) {
      const uint32_t valid = pc.valid_rows(blk);
      uint32_t kb, stage = 0;
      if constexpr (kFp8) {
        kb = base + L::kKOff;
      } else {
        stage = s;
        pk::mbar_wait(full_bar + kMbarBytes * stage, phase);
        if (++s == L::kStages) {
          s = 0;
          phase ^= 1;
        }
        kb = base + L::kKOff + stage * kKBlockBytes;
        if (valid < kPage) {
          zero_stale_rows(smem + L::kKOff + stage * kKBlockBytes, valid, tid);
          pk::fence_proxy_async_shared();
          pk::named_barrier_sync(kBarMath, kMathThreads);
        }
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(st[i]);
        pk::wgmma_fence();
        issue_s(st, kb, 0, kChunks, true);
        pk::wgmma_commit();
      }
      pk::wgmma_wait<0>();   // S^T (FP8: retired already)
#pragma unroll
      for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(st[i]);
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(acc[t][i]);
      softmax(st, m, l, acc, blk, rows.lim, min_lim);
      pk::fence_proxy_async_shared();   // st.shared (P) -> wgmma reads
      pk::named_barrier_sync(kBarMath, kMathThreads);
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(acc[t][i]);
      pk::wgmma_fence();
      issue_pv(acc, kb);
      if constexpr (kFp8) {
        if (blk + 1 < pc.hi) convert_and_issue_s(st, pc.valid_rows(blk + 1));
        // nothing in flight across the loop's back edge (else ptxas serializes the wgmmas: the
        // accumulators' loop-carried copies); the next block waits for this at once anyway
        pk::wgmma_wait<0>();
        continue;
      }
      pk::wgmma_wait<0>();
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(acc[t][i]);
      if (lane == 0) pk::mbar_arrive(empty_bar + kMbarBytes * stage);   // the K stage is read
    }
    if constexpr (kFp8) {
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t i = 0; i < F::kRegs; ++i) pk::fence_operand(acc[t][i]);
    }
  }
};

// Row sums over the warpgroup: this thread's keys -> the 8 lanes of its columns -> the 4 warps
// (shared memory, summed in a fixed order: identical in every thread).
template <uint32_t N>
__device__ __forceinline__ void sum_rows(float (&l)[Frag<N>::kCols], float* lsum, uint32_t warp, uint32_t lane) {
#pragma unroll
  for (uint32_t d = 4; d <= 16; d *= 2) {
    float other[Frag<N>::kCols];
#pragma unroll
    for (uint32_t j = 0; j < Frag<N>::kCols; ++j) other[j] = __shfl_xor_sync(0xffffffffu, l[j], d);
#pragma unroll
    for (uint32_t j = 0; j < Frag<N>::kCols; ++j) l[j] += other[j];
  }
  if (lane < 4) {
#pragma unroll
    for (uint32_t j = 0; j < Frag<N>::kCols; ++j) lsum[warp * N + Frag<N>::col(j, lane)] = l[j];
  }
  pk::named_barrier_sync(kBarMath, kMathThreads);
#pragma unroll
  for (uint32_t j = 0; j < Frag<N>::kCols; ++j) {
    const uint32_t n = Frag<N>::col(j, lane);
    l[j] = (lsum[n] + lsum[N + n]) + (lsum[2 * N + n] + lsum[3 * N + n]);
  }
}

// Epilogue of a piece (decode.cu's convention): a sequence with one split writes out = acc / l
// (bf16) and lse = (m + log2 l) ln 2 (+inf, out 0 when no key is visible); a piece of a split
// sequence writes acc / l (f32) and m + log2 l (base 2, -inf when nothing was visible) to
// scratch row `split id`, merged by pk_mla_combine. This thread: its columns (query rows) x
// the value columns 64t + 16 warp + lane / 4 + 8h of its O^T fragment. Column n is query row
// row0 + n of the s_q * h_q (dense: row0 0, n < rows; sparse: token blockIdx.y's heads, row0 =
// blockIdx.y * h_q, n < h_q), which also applies attn_sink for one split and takes a NaN row
// sum as NaN out and lse (decode.cu's sparse convention).
template <uint32_t N, bool kSparse>
__device__ __forceinline__ void write_piece(const Params& p, const pk::MlaPiece& pc,
                                            const float (&acc)[kVTiles][Frag<N>::kRegs],
                                            const float (&m)[Frag<N>::kCols], const float (&l)[Frag<N>::kCols],
                                            uint32_t warp, uint32_t lane) {
  using F = Frag<N>;
  const uint32_t row0 = kSparse ? blockIdx.y * p.h_q : 0, nrows = kSparse ? p.h_q : p.rows;
  const int nsplit = __ldg(p.sched.nsplits + pc.b + 1) - __ldg(p.sched.nsplits + pc.b);
  const uint32_t dim0 = 16 * warp + lane / 4;
#pragma unroll
  for (uint32_t j = 0; j < F::kCols; ++j) {
    const uint32_t n = F::col(j, lane);
    if (n >= nrows) continue;
    const uint32_t grow = row0 + n, tok = grow / p.h_q, head = grow - tok * p.h_q;
    const bool seen = kSparse ? !(l[j] <= 0.0f) : l[j] > 0.0f;
    float inv = seen ? __frcp_rn(l[j]) : 0.0f;
    const float lse2 = seen ? m[j] + pk::lg2_approx(l[j]) : -INFINITY;
    const bool lse_writer = warp == 0 && lane < 4;
    if (nsplit == 1) {
      if (kSparse && p.sink != nullptr) inv *= sink_factor(__ldg(p.sink + head), lse2);
      // this thread's first value column; the others at constant offsets (immediates)
      uint16_t* const dst = p.out + pc.b * p.out_sb + (uint64_t)tok * p.out_ss + (uint64_t)head * p.out_sh + dim0;
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
          const uint32_t i = 4 * (j >> 1) + 2 * h + (j & 1);
          dst[64 * t + 8 * h] = (uint16_t)(pk::pack_bf16x2(acc[t][i] * inv, 0.0f) & 0xFFFFu);
        }
      if (lse_writer)
        p.lse[pc.b * p.lse_sb + (uint64_t)head * p.lse_sh + (uint64_t)tok * p.lse_ss] =
            seen ? lse2 * kLn2 : INFINITY;
    } else {
      const uint64_t split_row = (uint64_t)pc.split * p.rows + grow;
      float* const dst = p.oacc + split_row * kDimV + dim0;
#pragma unroll
      for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
          const uint32_t i = 4 * (j >> 1) + 2 * h + (j & 1);
          dst[64 * t + 8 * h] = acc[t][i] * inv;
        }
      if (lse_writer) p.lacc[split_row] = lse2;
    }
  }
}

template <uint32_t N, bool kFp8, bool kSparse>
__device__ __forceinline__ void narrow_decode(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_kv,
                                              const Params& p) {
  if (!pk::mla_partition_ok<kSparse>(p.sched)) return;   // the same verdict in every warp: the CTA does nothing
  using L = Layout<N, kFp8, kSparse>;
  using F = Frag<N>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_addr = pk::smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;
  uint8_t* const smem = smem_raw + (base - raw_addr);
  const uint32_t full_bar = base + L::kBarOff;                    // + 8 s
  const uint32_t empty_bar = full_bar + kMbarBytes * L::kStages;  // + 8 s
  const uint32_t q_full = empty_bar + kMbarBytes * L::kStages;
  const uint32_t q_empty = q_full + kMbarBytes;
  if (threadIdx.x == 0) {
#pragma unroll
    for (uint32_t s = 0; s < L::kStages; ++s) {
      pk::mbar_init(full_bar + kMbarBytes * s, 1);            // the producer's arrive.expect_tx
      pk::mbar_init(empty_bar + kMbarBytes * s, kMathWarps);  // lane 0 of each math warp
    }
    pk::mbar_init(q_full, 1);
    pk::mbar_init(q_empty, kMathWarps);
    pk::fence_mbarrier_init();
    pk::fence_proxy_async_shared();
  }
  __syncthreads();

  const int* const row = p.sched.meta + pk::kMlaMetaCols * blockIdx.x;
  const uint32_t num_pieces = (uint32_t)__ldg(row + pk::kMetaNumPieces);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == kMathWarps) {
    produce<N, kFp8, kSparse>(p, tmap_q, tmap_kv, base, row, num_pieces, full_bar, empty_bar, q_full, q_empty);
    return;
  }
  NarrowMath<N, kFp8, kSparse> math{p, smem, base, full_bar, empty_bar, threadIdx.x, warp, lane};
  float* const lsum = reinterpret_cast<float*>(smem + L::kSumOff);
  uint32_t q_phase = 0;
  for (uint32_t k = 0; k < num_pieces; ++k) {
    const pk::MlaPiece pc = pk::mla_piece(p.sched, row, k);
    const PieceRows<N> rows = piece_rows<N>(p, pc, lane);
    float m[F::kCols], l[F::kCols];
    float acc[kVTiles][F::kRegs];
#pragma unroll
    for (uint32_t j = 0; j < F::kCols; ++j) {
      m[j] = -INFINITY;
      l[j] = 0.0f;
    }
#pragma unroll
    for (uint32_t t = 0; t < kVTiles; ++t)
#pragma unroll
      for (uint32_t i = 0; i < F::kRegs; ++i) acc[t][i] = 0.0f;
    if (pc.hi > pc.lo) {
      pk::mbar_wait(q_full, q_phase);
      q_phase ^= 1;
      math.run_piece(pc, rows, acc, m, l);
      if (lane == 0) pk::mbar_arrive(q_empty);   // this piece's S^T are done
      sum_rows<N>(l, lsum, warp, lane);
    }
    // FP8, N = 32: the piece read again, so its sequence and split id hold no registers across
    // the block loop (else ptxas spills at 255); elsewhere the two dependent loads cost more
    if constexpr (kFp8 && N == 32)
      write_piece<N, kSparse>(p, pk::mla_piece(p.sched, row, k), acc, m, l, warp, lane);
    else
      write_piece<N, kSparse>(p, pc, acc, m, l, warp, lane);
  }
  // PDL: this CTA's last out / scratch stores are issued; the combine may start its CTAs (its
  // griddep_wait still waits for this whole grid, so it reads nothing stale).
  pk::griddep_launch_dependents();
}

}  // namespace

// One entry per cache layout and row count N (16 or 32), decode.cu's parameters
// (pykernels/cuda/mla.py packs them); tmap_q's box is N rows.
#define PK_MLA_NARROW_ENTRY(NAME, N, FP8)                                                                     \
  extern "C" __global__ void __launch_bounds__(kThreads, 1) NAME(PK_MLA_DECODE_PARAMS) {                     \
    const Params p{PK_MLA_DECODE_ARGS};                                                                        \
    narrow_decode<N, FP8, false>(&tmap_q, &tmap_kv, p);                                                        \
  }

PK_MLA_NARROW_ENTRY(pk_mla_decode_narrow_bf16_n16, 16, false)
PK_MLA_NARROW_ENTRY(pk_mla_decode_narrow_bf16_n32, 32, false)
PK_MLA_NARROW_ENTRY(pk_mla_decode_narrow_fp8_n16, 16, true)
PK_MLA_NARROW_ENTRY(pk_mla_decode_narrow_fp8_n32, 32, true)

// The sparse decode for h_q <= N (pykernels/cuda/dsa.py): the FP8 entry's parameters + decode.cu's
// FP8 tail (PK_MLA_FP8_TAIL_PARAMS, pk/mla_partition.cuh); tmap_kv and
// block_table unused (rows gathered by index), seqlens = topk per sequence; grid (partitions, s_q).
#define PK_MLA_NARROW_SPARSE_ENTRY(NAME, N)                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads, 1) NAME(PK_MLA_DECODE_PARAMS, PK_MLA_FP8_TAIL_PARAMS) { \
    const Params p{PK_MLA_DECODE_ARGS, PK_MLA_FP8_TAIL_ARGS};                                                  \
    narrow_decode<N, true, true>(&tmap_q, &tmap_kv, p);                                                        \
  }

PK_MLA_NARROW_SPARSE_ENTRY(pk_mla_sparse_decode_narrow_n16, 16)
PK_MLA_NARROW_SPARSE_ENTRY(pk_mla_sparse_decode_narrow_n32, 32)
