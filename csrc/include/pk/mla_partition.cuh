// pk/mla_partition.cuh — the split-KV schedule seen from one decode CTA (docs/mla.md "The
// split-KV schedule" and "Checks"): the input checks of a partition's metadata row, and its
// pieces. The checks serve both decode kernels (csrc/mla/decode.cu, csrc/mla/decode_narrow.cu);
// the same rules as pykernels.mla_schedule.check_schedule. Also what both kernels' entries take
// (one parameter order for pykernels/cuda/mla.py to pack) and pass on (pk::MlaDecodeArgs).
#pragma once

#include <cstdint>

#include "pk/error_record.cuh"

namespace pk {

constexpr uint32_t kMlaPage = 64;   // tokens per KV block (one page)

// What the checks and the piece walk read: the schedule, the seqlens, num_splits, the
// block table (b rows of bt_stride), the device error record and the sizes they are checked
// against (b, the cache's pages, the block table's columns).
struct MlaSchedule {
  const int* meta;       // [num_sm_parts, 8]
  const int* seqlens;    // [b]
  const int* nsplits;    // [b + 1]
  const int* block_table;
  int* err;
  uint32_t bt_stride, batch, num_blocks, max_blocks;
};

// Columns of a metadata row (pykernels/reference/mla.py METADATA_COLUMNS).
constexpr int kMlaMetaCols = 8;
enum MlaMetaColumn : int { kMetaFirstBatch = 0, kMetaFirstBlock, kMetaLastBatch, kMetaLastEnd, kMetaFirstSplit,
                           kMetaNumPieces, kMetaFirstSeqlen, kMetaLastSeqlen };

__device__ __forceinline__ int mla_blocks_of(int seqlen) {   // seqlen in [0, 2^31): no overflow in uint32
  return (int)(((uint32_t)seqlen + kMlaPage - 1) / kMlaPage);
}

// The checks of CTA blockIdx.x's partition (docs/mla.md "Checks", rules 1-5, the seqlens
// and the page ids its pieces read). Every warp runs them and gets the same verdict (the
// lanes share the page ids, vote.any), so the CTA can return as a whole before reading
// anything else; lane 0 of warp 0 (or the lane of warp 0 that found a page id) records the
// first error. Each check runs only after those its values depend on passed. kSparse (the
// sparse decode): no block table, the token rows come from indices (masked in range by the
// producers), so its page checks are skipped.
template <bool kSparse = false>
__device__ __forceinline__ bool mla_partition_ok(const MlaSchedule& p) {
  const uint32_t lane = threadIdx.x % 32;
  const bool warp0 = threadIdx.x < 32;
  const auto fail = [&](bool record, int code, int a0, int a1, int a2) {
    if (record) record_error(p.err, code, a0, a1, a2);
    return false;
  };
  const bool rec = warp0 && lane == 0;
  const int B = (int)p.batch, parts = (int)gridDim.x, part = (int)blockIdx.x, e = kMlaMetaCols * part;
  const int64_t max_len64 = (int64_t)p.max_blocks * kMlaPage;
  const int max_len = (int)min(max_len64, (int64_t)INT32_MAX);
  const auto bad_len = [&](int len) { return len < 0 || (int64_t)len > max_len64; };
  const int* row = p.meta + e;
  const int fb = __ldg(row + kMetaFirstBatch), fblk = __ldg(row + kMetaFirstBlock);
  const int lb = __ldg(row + kMetaLastBatch), lend = __ldg(row + kMetaLastEnd);
  const int fs = __ldg(row + kMetaFirstSplit), n = __ldg(row + kMetaNumPieces);
  const bool busy = n != 0;
  int nb_last = 0;
  if (n < 0 || n > B) return fail(rec, kErrMetadataOutOfRange, n, B + 1, e + kMetaNumPieces);
  if (busy) {
    if (fb < 0 || fb >= B) return fail(rec, kErrMetadataOutOfRange, fb, B, e + kMetaFirstBatch);
    if (n > B - fb) return fail(rec, kErrMetadataOutOfRange, n, B - fb + 1, e + kMetaNumPieces);
    if (lb != fb + n - 1) return fail(rec, kErrMetadataMismatch, lb, fb + n - 1, e + kMetaLastBatch);
    const int len_first = __ldg(p.seqlens + fb), len_last = __ldg(p.seqlens + lb);
    if (bad_len(len_first)) return fail(rec, kErrSeqlenOutOfRange, len_first, max_len, fb);
    if (bad_len(len_last)) return fail(rec, kErrSeqlenOutOfRange, len_last, max_len, lb);
    const int made_first = __ldg(row + kMetaFirstSeqlen), made_last = __ldg(row + kMetaLastSeqlen);
    if (made_first != len_first) return fail(rec, kErrMetadataStale, len_first, made_first, fb);
    if (made_last != len_last) return fail(rec, kErrMetadataStale, len_last, made_last, lb);
    const int nb_first = mla_blocks_of(len_first);
    nb_last = mla_blocks_of(len_last);
    if (lend < 0 || lend > nb_last) return fail(rec, kErrMetadataOutOfRange, lend, nb_last + 1, e + kMetaLastEnd);
    const int first_hi = n > 1 ? max(nb_first, 1) : min(max(nb_first, 1), lend + 1);
    if (fblk < 0 || fblk >= first_hi) return fail(rec, kErrMetadataOutOfRange, fblk, first_hi, e + kMetaFirstBlock);
    if (fs < 0 || fs > B + parts - n)
      return fail(rec, kErrMetadataOutOfRange, fs, B + parts - n + 1, e + kMetaFirstSplit);
  }
  // continuity: where the previous row ended (row 0: batch 0, block 0, split 0)
  int want_b = 0, want_blk = 0, want_s = 0;
  if (part > 0) {
    const int* prev = row - kMlaMetaCols;
    const int p_n = __ldg(prev + kMetaNumPieces), p_fs = __ldg(prev + kMetaFirstSplit);
    want_b = __ldg(prev + kMetaFirstBatch);
    want_blk = __ldg(prev + kMetaFirstBlock);
    want_s = p_fs;
    if (p_n != 0) {
      const int p_lb = __ldg(prev + kMetaLastBatch), p_lend = __ldg(prev + kMetaLastEnd);
      if (p_lb < 0 || p_lb >= B) return fail(rec, kErrMetadataOutOfRange, p_lb, B, e - kMlaMetaCols + kMetaLastBatch);
      const int p_len = __ldg(p.seqlens + p_lb), p_made = __ldg(prev + kMetaLastSeqlen);
      if (bad_len(p_len)) return fail(rec, kErrSeqlenOutOfRange, p_len, max_len, p_lb);
      if (p_made != p_len) return fail(rec, kErrMetadataStale, p_len, p_made, p_lb);
      const bool goes_on = p_lend < mla_blocks_of(p_len);   // its last sequence continues on this row
      want_b = goes_on ? p_lb : p_lb + 1;
      want_blk = goes_on ? p_lend : 0;
      want_s = (int)((uint32_t)p_fs + (uint32_t)p_n);   // the previous CTA checks its own entries
    }
  }
  if (fb != want_b) return fail(rec, kErrMetadataMismatch, fb, want_b, e + kMetaFirstBatch);
  if (fblk != want_blk) return fail(rec, kErrMetadataMismatch, fblk, want_blk, e + kMetaFirstBlock);
  if (fs != want_s) return fail(rec, kErrMetadataMismatch, fs, want_s, e + kMetaFirstSplit);
  // the last row ends after the last block of batch b - 1, with num_splits[b] splits
  if (part == parts - 1) {
    if (busy && lb != B - 1) return fail(rec, kErrMetadataMismatch, lb, B - 1, e + kMetaLastBatch);
    if (busy && lend != nb_last) return fail(rec, kErrMetadataMismatch, lend, nb_last, e + kMetaLastEnd);
    if (!busy && fb != B) return fail(rec, kErrMetadataMismatch, fb, B, e + kMetaFirstBatch);
    if (!busy && fblk != 0) return fail(rec, kErrMetadataMismatch, fblk, 0, e + kMetaFirstBlock);
    const int total = __ldg(p.nsplits + B);
    if (total != fs + n) return fail(rec, kErrNumSplitsMismatch, total, fs + n, B);
  }
  // each piece: its seqlen, num_splits at its ends, the page ids of its blocks
  for (int k = 0; k < n; ++k) {
    const int bi = fb + k;
    const int len = __ldg(p.seqlens + bi);
    if (bad_len(len)) return fail(rec, kErrSeqlenOutOfRange, len, max_len, bi);
    const int nb = mla_blocks_of(len);
    const int lo = k == 0 ? fblk : 0, hi = bi == lb ? lend : nb, sid = fs + k;
    const int ns_lo = __ldg(p.nsplits + bi), ns_hi = __ldg(p.nsplits + bi + 1);
    if (lo == 0 && ns_lo != sid) return fail(rec, kErrNumSplitsMismatch, ns_lo, sid, bi);
    if (hi == nb && ns_hi != sid + 1) return fail(rec, kErrNumSplitsMismatch, ns_hi, sid + 1, bi + 1);
    if constexpr (kSparse) continue;
    const int* table = p.block_table + (uint64_t)bi * p.bt_stride;
    int bad_page = 0;
    bool bad = false;
    for (int blk = lo + (int)lane; blk < hi && !bad; blk += 32) {
      bad_page = __ldg(table + blk);
      bad = bad_page < 0 || (uint32_t)bad_page >= p.num_blocks;
    }
    if (__any_sync(0xffffffffu, bad))
      return fail(warp0 && bad, kErrBlockTableOutOfRange, bad_page, (int)p.num_blocks, bi);
  }
  return true;
}

// Piece k of a partition's row: sequence b, KV blocks [lo, hi), split id, sequence length.
struct MlaPiece {
  uint32_t b, lo, hi, split;
  int seqlen;

  // Token rows of block `blk` inside the sequence (64 but in a partial last block).
  __device__ __forceinline__ uint32_t valid_rows(uint32_t blk) const {
    return min((uint32_t)seqlen - blk * kMlaPage, kMlaPage);
  }
};

__device__ __forceinline__ MlaPiece mla_piece(const MlaSchedule& p, const int* row, uint32_t k) {
  MlaPiece pc;
  // the row's entries loaded first: their latency overlaps the seqlen's (its address needs one)
  const uint32_t first_blk = (uint32_t)row[kMetaFirstBlock];
  const uint32_t last_b = (uint32_t)row[kMetaLastBatch], last_end = (uint32_t)row[kMetaLastEnd];
  pc.b = (uint32_t)row[kMetaFirstBatch] + k;
  pc.seqlen = max(__ldg(p.seqlens + pc.b), 0);
  const uint32_t nblk = ((uint32_t)pc.seqlen + kMlaPage - 1) / kMlaPage;
  pc.lo = k == 0 ? first_blk : 0u;
  pc.hi = pc.b == last_b ? last_end : nblk;
  pc.split = (uint32_t)row[kMetaFirstSplit] + k;
  return pc;
}

// What both decode kernels' entries pass on (PK_MLA_DECODE_ARGS, PK_MLA_FP8_TAIL_ARGS below):
// the schedule view, the outputs and split scratch with their strides (elements), the causal
// flag, the softmax scale (log2 domain) and the FP8 entries' tail.
struct MlaDecodeArgs {
  MlaSchedule sched;
  uint16_t* out;   // bf16 bits
  float* lse;
  float* oacc;     // [splits, rows, 512]
  float* lacc;     // [splits, rows]
  uint32_t s_q, h_q, rows;
  uint64_t out_sb;
  uint32_t out_ss, out_sh;
  uint64_t lse_sb;
  uint32_t lse_sh, lse_ss;
  uint32_t causal;
  float scale_log2;
  // The FP8 entries' tail (zero in the bf16 entries; the dense FP8 entry: `cache` alone): the
  // sparse decode's indices [b, s_q, topk] (-1 unused), the cache's bytes, topk_length [b] and
  // attn_sink [h_q] (each may be null; pk/sparse_checks.cuh).
  const int* indices;
  const uint8_t* cache;
  const int* topk_length;
  const float* sink;
  uint64_t idx_sb;
  uint32_t idx_ss, topk, num_tokens;
};

}  // namespace pk

// Every decode entry's parameters, in the order decode_plan / narrow_decode_plan of
// pykernels/cuda/mla.py pack them (strides in elements; err: the device error record; batch,
// num_blocks, max_blocks: the sizes the checks above compare with; pk::TensorMap: pk/ptx.cuh).
#define PK_MLA_DECODE_PARAMS                                                                                    \
  const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_kv,                \
      const int *block_table, const int *seqlens, const int *meta, const int *nsplits, uint16_t *out,          \
      float *lse, float *oacc, float *lacc, uint32_t s_q, uint32_t h_q, uint32_t rows, uint32_t bt_stride,     \
      uint64_t out_sb, uint32_t out_ss, uint32_t out_sh, uint64_t lse_sb, uint32_t lse_sh, uint32_t lse_ss,    \
      uint32_t causal, float scale_log2, int *err, uint32_t batch, uint32_t num_blocks, uint32_t max_blocks

// The FP8 entries' parameters after those (fp8_tail_args of pykernels/cuda/mla.py): the tail
// of pk::MlaDecodeArgs.
#define PK_MLA_FP8_TAIL_PARAMS                                                                                  \
  const int *indices, const uint8_t *cache, const int *topk_length, const float *sink, uint64_t idx_sb,       \
      uint32_t idx_ss, uint32_t topk, uint32_t num_tokens

// Those parameters as the initializers of pk::MlaDecodeArgs (its members in order).
#define PK_MLA_DECODE_ARGS                                                                                      \
  {meta, seqlens, nsplits, block_table, err, bt_stride, batch, num_blocks, max_blocks}, out, lse, oacc, lacc,  \
      s_q, h_q, rows, out_sb, out_ss, out_sh, lse_sb, lse_sh, lse_ss, causal, scale_log2
#define PK_MLA_FP8_TAIL_ARGS indices, cache, topk_length, sink, idx_sb, idx_ss, topk, num_tokens
