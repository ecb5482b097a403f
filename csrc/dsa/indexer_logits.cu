// DSA indexer logits (DeepGEMM's fp8_paged_mqa_logits and fp8_mqa_logits) for sm_90a; host
// side pykernels/cuda/dsa.py, formats docs/dsa.md.
//
//   logit[row, pos] = scale[pos] * sum_h w[row, h] * relu(q[row, h] . k[pos])
// for pos inside the row's window [lo, hi), -inf for the rest of [0, width).
//
//   q       [rows, H, 128] e4m3, read through a 2-D tensor map over [rows*H, 128]
//   weights [rows, H] f32 (row stride weights_stride); out [rows, width] f32 (row stride out_stride)
// and the keys in one of two layouts (a KeySource below):
//   Paged   (decode): cache [num_blocks, 64, 1, 132] bytes, per page 64 key rows of 128 e4m3
//           (8 KB) then 64 float32 scales; the keys of row group g (a sequence: its next_n
//           query rows) are its block table's pages; windows [0, end) from context_lens.
//   Ragged  (prefill): k [N, 128] e4m3 and k_scales [N] f32; row group g = query rows
//           [4g, 4g + 4); windows [ks, ke) from cu_seqlen_ks / cu_seqlen_ke.
//
// Persistent CTAs (a math warpgroup + a producer warp) walk work items (a row group: a paged sequence's next_n
// rows or 4 consecutive prefill rows, x a chunk of kBlocksPerCta consecutive 64-key blocks);
// CTA c takes items c, c + gridDim.x, ... through a two-stage ring, so the keys of the next
// item stream in while this one is computed. Per item:
//   1. windows: each row's window, and which of the chunk's blocks meet their hull; a value
//      out of range (a context length, a window bound, a page id in use) goes to the device
//      error record (pk/error_record.cuh) and leaves the row (page: the item) empty: -inf;
//   2. load (the producer warp, up to kStages items ahead, once the math warps have released
//      the stage): its lanes copy the group's weights rows into the stage (coalesced loads,
//      issued before the stage frees); lane 0 issues the TMA loads of the group's Q tiles and
//      of every used key block with its 64 scales, one mbarrier each; every barrier of the
//      stage is armed for every item (0 bytes when unused), so their phases advance in step
//      with the item count;
//   3. per pair (a used block and kRows query rows: 1, or 2 for an even next_n), in order, the
//      next pair's wgmma running while this one's sum is computed: S = K Q^T (64 keys x kRows*H,
//      f32) = 4 x wgmma m64n(kRows*H)k32 with both operands K-major in 128B-swizzled shared
//      memory (the rows' Q tiles are consecutive); each thread sums w[h] * relu(S[key, h]) over
//      its columns (four independent chains per key and row), the four lanes of a quad finish
//      the block's keys with a reduce-scatter (one row: 2 shuffles, lanes 0 and 2 end with the
//      first key, 1 and 3 with the second, lanes 0 and 1 write; two rows: 3 shuffles, lane q
//      ends with row q / 2, key q % 2, every lane writes) scale * sum inside the window, -inf
//      outside;
//   4. clean: positions of blocks no window meets (not loaded) get -inf; each math warp
//      releases the stage (the empty barrier) for the producer.
#include <cstdint>

#include "pk/error_record.cuh"
#include "pk/ptx.cuh"

namespace {

constexpr uint32_t kMathThreads = 128;                  // the math warpgroup
constexpr uint32_t kProducerThreads = 32;               // the producer warp
constexpr uint32_t kThreads = kMathThreads + kProducerThreads;
constexpr uint32_t kBlockKeys = 64;                     // keys per block (a page) = the wgmma M
constexpr uint32_t kHeadDim = 128;                      // e4m3 bytes per key = one swizzled row
constexpr uint32_t kScaleBytes = 4;                     // one float32 scale per key
constexpr uint32_t kBlockBytes = kBlockKeys * kHeadDim; // 8 KB of keys
constexpr uint32_t kBlockScaleBytes = kBlockKeys * kScaleBytes;          // their 64 scales
constexpr uint32_t kBlocksPerCta = 4;
constexpr uint32_t kMaxGroupRows = 4;                   // query rows per group (next_n <= 4)
constexpr uint32_t kKSteps = kHeadDim / 32;             // wgmma k32 steps over the head dim
constexpr uint32_t kSmemAlign = 1024;                   // 128B-swizzle atoms
constexpr float kMinusInf = -__builtin_huge_valf();

// Shared memory (dynamic, base aligned up to 1024): kStages stages of [kBlocksPerCta key blocks
// | group_rows Q tiles of H x 128 bytes | kBlocksPerCta x 64 key scales | group_rows x H
// weights], each stage a multiple of 1024 bytes, then the mbarriers (per stage: one per key
// block (its keys and scales), one for the Q tiles (and the weights and item info), one
// "empty" the math warps release), then one ItemInfo per stage. pykernels/cuda/dsa.py
// smem_bytes computes the same size.
constexpr uint32_t kStages = 2;
constexpr uint32_t kBarsPerStage = kBlocksPerCta + 2;
constexpr uint32_t kQBar = kBlocksPerCta, kEmptyBar = kBlocksPerCta + 1;   // a stage's barriers after the blocks'
constexpr uint32_t kMathWarps = kMathThreads / 32;

__host__ __device__ constexpr uint32_t stage_bytes(uint32_t heads, uint32_t group_rows) {
  return (kBlocksPerCta * (kBlockBytes + kBlockScaleBytes) + group_rows * heads * (kHeadDim + 4) + kSmemAlign - 1)
         / kSmemAlign * kSmemAlign;
}

struct Window {
  uint32_t lo, hi;
};

// What the producer learned about an item, for the math warps (shared memory, one per stage,
// written before the stage's Q barrier is armed): the used blocks, the rows' windows, the
// blocks' TMA coordinates (page ids or first key rows; 0 for unused blocks).
// The global values an item's windows come from, read before any is used (paged: the rows'
// context lengths in a; prefill: ks in a, ke in b).
struct RawWindows {
  int a[kMaxGroupRows], b[kMaxGroupRows];
};

struct ItemInfo {
  uint32_t mask;
  Window win[kMaxGroupRows];
  int32_t coord[kBlocksPerCta];
};
static_assert(sizeof(ItemInfo) == 4 + 8 * kMaxGroupRows + 4 * kBlocksPerCta, "pykernels/cuda/dsa.py ITEM_INFO_BYTES");

// cp.async.bulk.tensor over a 1-D map (ptx.cuh has 2-D and 3-D): `bar` receives complete_tx
// of the whole box (elements past the tensor zero-filled).
__device__ __forceinline__ void tma_load_1d(uint32_t dst, const pk::TensorMap* map, uint32_t bar, int32_t c0) {
  asm volatile(
      "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3}], [%2];\n" ::"r"(dst),
      "l"(pk::generic_addr(map)), "r"(bar), "r"(c0)
      : "memory");
}

// shfl.sync.bfly on a float register with immediate operands (__shfl_xor_sync moves the value
// through a b32 register and materialises the lane mask and clamp in registers first)
template <int kLaneMask>
__device__ __forceinline__ float shfl_xor(float v) {
  float r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n" : "=f"(r) : "f"(v), "n"(kLaneMask));
  return r;
}

// What the two layouts share: q, weights, out.
struct Common {
  const float* weights;
  float* out;
  uint64_t out_stride;
  uint32_t weights_stride;
  uint32_t width;          // columns of out: max_context_len (paged) or N (ragged)
  uint32_t group_rows;     // Q tiles per stage: next_n (paged) or kMaxGroupRows (ragged)
  uint32_t num_groups;     // b (paged) or ceil(M / 4) (ragged)
};

// Decode: the keys of group `seq` (its next_n rows) are the pages of its block table.
struct Paged {
  const int* context_lens;
  const int* block_table;
  uint32_t bt_stride, next_n, lens_per_row;   // context_lens is [b, next_n] (1) or [b] (0)
  int* err;                 // the device error record
  uint32_t lens_limit;      // context_lens at most min(width, block table pages x 64)
  uint32_t num_blocks;      // the cache's pages

  __device__ __forceinline__ uint32_t group_rows(uint32_t) const { return next_n; }
  __device__ __forceinline__ uint32_t row(uint32_t seq, uint32_t j) const { return seq * next_n + j; }
  // the rows' windows ({0, 0} past the group): every length read before any is used; a length
  // outside [0, lens_limit] is recorded and empties the group's windows (nothing read, -inf written)
  __device__ __forceinline__ void read(uint32_t seq, RawWindows& raw) const {
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j)
      raw.a[j] = j < (lens_per_row ? next_n : 1u) ? context_lens[lens_per_row ? seq * next_n + j : seq] : 0;
  }
  __device__ __forceinline__ void windows(uint32_t seq, const RawWindows& raw, Window (&win)[kMaxGroupRows]) const {
    int end[kMaxGroupRows];
    bool bad = false;
    if (lens_per_row) {
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) end[j] = raw.a[j];
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
        if (j < next_n && (end[j] < 0 || (uint32_t)end[j] > lens_limit)) {
          pk::record_error(err, pk::kErrContextLensOutOfRange, end[j], (int)lens_limit, (int)(seq * next_n + j));
          bad = true;
        }
      }
    } else {
      const int len = raw.a[0];
      if (len < 0 || (uint32_t)len > lens_limit) {
        pk::record_error(err, pk::kErrContextLensOutOfRange, len, (int)lens_limit, (int)seq);
        bad = true;
      }
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) end[j] = j < next_n ? len - (int)next_n + (int)j + 1 : 0;
    }
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) win[j] = {0u, bad ? 0u : (uint32_t)max(end[j], 0)};
  }
  // the block's page id read before the windows are known: any block a valid length can use
  // (below ceil(lens_limit / 64), inside the table), else 0 (then unused)
  __device__ __forceinline__ int32_t coord_ahead(uint32_t seq, uint32_t blk) const {
    return blk * kBlockKeys < lens_limit ? block_table[(uint64_t)seq * bt_stride + blk] : 0;
  }
  // a page id outside the cache is recorded (the item then loads nothing and writes -inf)
  __device__ __forceinline__ bool coord_ok(uint32_t seq, int32_t page_id) const {
    if ((uint32_t)page_id < num_blocks) return true;
    pk::record_error(err, pk::kErrBlockTableOutOfRange, page_id, (int)num_blocks, (int)seq);
    return false;
  }
  // The block's TMA coordinate: its page id (read for every block of an item before any load
  // is issued, so the reads overlap).
  __device__ __forceinline__ int32_t coord(uint32_t seq, uint32_t blk) const {
    return block_table[(uint64_t)seq * bt_stride + blk];
  }
  // The page's keys through the map over [num_blocks, 64, 128] bytes (skipping the scales),
  // its scales through the map over [num_blocks, 64] float32 (page stride 132 x 64 bytes).
  __device__ __forceinline__ void load(uint32_t keys_dst, uint32_t scales_dst, const pk::TensorMap* tmap_k,
                                       const pk::TensorMap* tmap_s, uint32_t bar, int32_t page_id) const {
    pk::tma_load_3d(keys_dst, tmap_k, bar, 0, 0, page_id);
    pk::tma_load_2d(scales_dst, tmap_s, bar, 0, page_id);
  }
};

// Prefill: group g is query rows [4g, 4g + 4) (fewer in the last); keys are k's rows.
struct Ragged {
  const int* ks;
  const int* ke;
  uint32_t num_rows;
  int* err;                 // the device error record
  uint32_t n;               // k's rows: windows inside [0, n]

  __device__ __forceinline__ uint32_t group_rows(uint32_t g) const {
    return min(kMaxGroupRows, num_rows - g * kMaxGroupRows);
  }
  __device__ __forceinline__ uint32_t row(uint32_t g, uint32_t j) const { return g * kMaxGroupRows + j; }
  // a window outside [0, n] (or ending before it starts) is recorded and left empty (-inf written)
  __device__ __forceinline__ void read(uint32_t g, RawWindows& raw) const {
    const uint32_t rows = group_rows(g);
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
      raw.a[j] = j < rows ? ks[row(g, j)] : 0;
      raw.b[j] = j < rows ? ke[row(g, j)] : 0;
    }
  }
  __device__ __forceinline__ void windows(uint32_t g, const RawWindows& raw, Window (&win)[kMaxGroupRows]) const {
    const int* const lo = raw.a;
    const int* const hi = raw.b;
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
      const int r = (int)row(g, j);
      bool ok = true;
      if (lo[j] < 0 || (uint32_t)lo[j] > n) {
        pk::record_error(err, pk::kErrWindowStartOutOfRange, lo[j], (int)n, r);
        ok = false;
      } else if (hi[j] < lo[j] || (uint32_t)hi[j] > n) {
        pk::record_error(err, pk::kErrWindowEndOutOfRange, hi[j], (int)n, r);
        ok = false;
      }
      win[j] = ok ? Window{(uint32_t)lo[j], (uint32_t)hi[j]} : Window{0u, 0u};
    }
  }
  __device__ __forceinline__ bool coord_ok(uint32_t, int32_t) const { return true; }
  __device__ __forceinline__ int32_t coord_ahead(uint32_t g, uint32_t blk) const { return coord(g, blk); }
  __device__ __forceinline__ int32_t coord(uint32_t, uint32_t blk) const { return (int32_t)(blk * kBlockKeys); }
  // k's rows through a 2-D map, k_scales through a 1-D one (keys past N: zero-filled, never written)
  __device__ __forceinline__ void load(uint32_t keys_dst, uint32_t scales_dst, const pk::TensorMap* tmap_k,
                                       const pk::TensorMap* tmap_s, uint32_t bar, int32_t row) const {
    pk::tma_load_2d(keys_dst, tmap_k, bar, 0, row);
    tma_load_1d(scales_dst, tmap_s, bar, row);
  }
};

template <int kHeads, int kRows, class Keys>
__device__ __forceinline__ void indexer_logits(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_k,
                                               const pk::TensorMap* tmap_s, const Common& c, const Keys& keys) {
  constexpr int kAccRegs = kRows * kHeads / 2;   // wgmma m64nNk32 fragment per thread, N = kRows x H
  constexpr int kColGroups = kHeads / 8;    // 8-column groups per row; a thread holds 2 columns of each
  constexpr int kChains = 4;                // independent partial sums per key (latency, not issue, bound)
  static_assert(kChains == 4 && kColGroups >= 2, "the head sum's chains: 2 column groups x 2 columns");
  constexpr uint32_t kQTileBytes = kHeads * kHeadDim;
  constexpr uint32_t kWeightsPerLane = kHeads / 32;   // the producer lanes' share of a weights row
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t raw = pk::smem_addr(smem_raw);
  const uint32_t base = (raw + kSmemAlign - 1) & ~(kSmemAlign - 1);
  const uint32_t stage_size = stage_bytes(kHeads, c.group_rows);
  const uint32_t bars = base + kStages * stage_size;    // + 8 * (kBarsPerStage * stage + block or Q)
  ItemInfo* const infos = reinterpret_cast<ItemInfo*>(smem_raw + (bars + 8 * kStages * kBarsPerStage - raw));

  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t chunks = (c.width + kBlocksPerCta * kBlockKeys - 1) / (kBlocksPerCta * kBlockKeys);
  const uint32_t num_items = c.num_groups * chunks;
  const auto key_tile = [&](uint32_t s, uint32_t u) { return base + s * stage_size + u * kBlockBytes; };
  const auto q_tile = [&](uint32_t s, uint32_t j) {
    return base + s * stage_size + kBlocksPerCta * kBlockBytes + j * kQTileBytes;
  };
  const auto scale_tile = [&](uint32_t s, uint32_t u) {
    return base + s * stage_size + kBlocksPerCta * kBlockBytes + c.group_rows * kQTileBytes + u * kBlockScaleBytes;
  };
  const auto weights_of = [&](uint32_t s) {   // the stage's weights, [group_rows][kHeads] f32
    return reinterpret_cast<float*>(smem_raw + (scale_tile(s, kBlocksPerCta) - raw));
  };
  const auto bar = [&](uint32_t s, uint32_t u) { return bars + 8 * (s * kBarsPerStage + u); };

  // 1-2. windows and load (the producer): the item's info read ahead (a block is used when it
  //    meets the hull of the rows' non-empty windows: for paged rows, whose windows all start
  //    at 0, the blocks that meet some window), then, once the stage is free, the info stored
  //    for the math warps, every barrier of the stage armed and the used tiles loaded
  struct Reads {              // an item's global reads: window bounds, then page ids
    RawWindows raw;
    int32_t ahead[kBlocksPerCta];
  };
  const auto item_read = [&](uint32_t item) {
    const uint32_t group = item / chunks, first_blk = item % chunks * kBlocksPerCta;
    Reads r;
    keys.read(group, r.raw);
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) r.ahead[u] = keys.coord_ahead(group, first_blk + u);
    return r;
  };
  const auto item_info = [&](uint32_t item, const Reads& r) {
    const uint32_t group = item / chunks, first_blk = item % chunks * kBlocksPerCta;
    ItemInfo info;
    const int32_t* const ahead = r.ahead;
    keys.windows(group, r.raw, info.win);
    uint32_t lo = 0xffffffffu, hi = 0;
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
      const Window win = info.win[j];
      if (win.lo < win.hi) lo = min(lo, win.lo), hi = max(hi, win.hi);
    }
    info.mask = 0;
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      const uint32_t first = (first_blk + u) * kBlockKeys;
      if (lo < first + kBlockKeys && first < hi) info.mask |= 1u << u;
    }
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u)
      info.coord[u] = info.mask >> u & 1 ? ahead[u] : 0;
    bool ok = true;
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u)
      if (info.mask >> u & 1) ok = ok && keys.coord_ok(group, info.coord[u]);
    if (!ok) info.mask = 0;   // a bad page: the item loads nothing (its positions get -inf)
    return info;
  };
  const auto load_item = [&](uint32_t item, const ItemInfo& info, uint32_t s) {
    const uint32_t group = item / chunks, rows = keys.group_rows(group);
    infos[s] = info;
    pk::mbar_arrive_expect_tx(bar(s, kQBar), info.mask ? rows * kQTileBytes : 0u);   // releases the info too
    if (info.mask)
      for (uint32_t j = 0; j < rows; ++j)
        pk::tma_load_2d(q_tile(s, j), tmap_q, bar(s, kQBar), 0, (int32_t)(keys.row(group, j) * kHeads));
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      const bool used = info.mask >> u & 1;
      pk::mbar_arrive_expect_tx(bar(s, u), used ? kBlockBytes + kBlockScaleBytes : 0u);
      if (used) keys.load(key_tile(s, u), scale_tile(s, u), tmap_k, tmap_s, bar(s, u), info.coord[u]);
    }
  };

  // the producer's first reads issued while the barriers are set up (their latency is the
  // launch's first cost)
  Reads first{};
  if (warp == kMathWarps && lane == 0 && blockIdx.x < num_items) first = item_read(blockIdx.x);
  if (tid == 0) {
    for (uint32_t st = 0; st < kStages; ++st)
      for (uint32_t u = 0; u < kBarsPerStage; ++u)
        pk::mbar_init(bar(st, u), u == kEmptyBar ? kMathWarps : u == kQBar ? kProducerThreads : 1);
    pk::fence_mbarrier_init();
  }
  __syncthreads();

  if (warp == kMathWarps) {
    // ------------------------------------------------------------------ producer
    uint32_t k = 0;
    for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x, ++k) {
      const uint32_t s = k % kStages, group = item / chunks, rows = keys.group_rows(group);
      // while the stage may still be in use: lane 0 the item's info, every lane its share of
      // the rows' weights (one coalesced load per 32 heads and row)
      float w[kMaxGroupRows][kWeightsPerLane];
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
        const float* src = c.weights + (uint64_t)keys.row(group, min(j, rows - 1)) * c.weights_stride + lane;
#pragma unroll
        for (uint32_t i = 0; i < kWeightsPerLane; ++i) w[j][i] = j < rows ? src[32 * i] : 0.f;
      }
      ItemInfo info{};
      if (lane == 0) info = item_info(item, k == 0 ? first : item_read(item));
      pk::mbar_wait(bar(s, kEmptyBar), ((k / kStages) & 1) ^ 1);   // the stage's previous item released
      float* const dst = weights_of(s);
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
        if (j >= rows) break;
#pragma unroll
        for (uint32_t i = 0; i < kWeightsPerLane; ++i) dst[j * kHeads + lane + 32 * i] = w[j][i];
      }
      if (lane == 0)
        load_item(item, info, s);       // its arrive (with the Q tiles' bytes) is one of the Q barrier's 32
      else
        pk::mbar_arrive(bar(s, kQBar)); // releases this lane's weights
    }
    return;
  }

  // Fragment of this thread: rows (keys) key0 and key0 + 8, columns 8g + 2*(lane%4) + {0, 1}: of
  // query row g / (H / 8) of the pair, head 8 (g % (H / 8)) + 2*(lane%4) + {0, 1}. After the
  // quad's reduce-scatter it holds the sum of key key0 + 8 * half of the pair's row my_row.
  const uint32_t key0 = 16 * warp + lane / 4;
  const uint32_t col0 = 2 * (lane % 4);
  const uint32_t half = lane % 2;
  const uint32_t my_row = kRows == 2 ? lane % 4 / 2 : 0;
  const bool writer = kRows == 2 || lane % 4 < 2;   // one row: lanes 0 and 1 of the quad write its two keys
  const uint32_t my_key = key0 + 8 * half;

  // A pair = (used key block u, query rows j .. j + kRows - 1: one wgmma of N = kRows x H, the
  // rows' Q tiles being consecutive), taken in order: blocks ascending, rows inside a block.
  // Two accumulators: the wgmma of the next pair runs while this one's head sum is computed.
  // What a pair's sum needs besides its accumulator and weights is read (shared memory) while
  // its wgmma runs. The accumulators are zeroed once: a pair's first k32 step ignores them.
  struct Pair {
    const float* w;         // this thread's columns of row j's weights (rows j.. consecutive)
    float scale;            // the scale of my_key
    Window win;             // row j + my_row's window
    float* out;             // where my_key of row j + my_row goes
    uint32_t pos;           // its position
  };
  // Where the pair (u, j) is, kept up to date step by step (no multiply per pair): its
  // operands' descriptors, and this thread's weights row, window, scale and output address.
  struct Cursor {
    uint32_t u, j;
    uint64_t kd, qd;
    const float* w;
    const Window* win;
    const float* scale;
    float* out;
    uint32_t pos;
  };
  float acc_a[kAccRegs], acc_b[kAccRegs];
#pragma unroll
  for (int r = 0; r < kAccRegs; ++r) acc_a[r] = acc_b[r] = 0.f;

  uint32_t k = 0;
  for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x, ++k) {
    const uint32_t s = k % kStages, parity = (k / kStages) & 1;
    const uint32_t group = item / chunks, first_blk = item % chunks * kBlocksPerCta;
    const uint32_t first_pos = first_blk * kBlockKeys;
    const uint32_t rows = keys.group_rows(group);
    const ItemInfo& info = infos[s];
    // row 0's Q descriptor and this thread's columns of row 0's weights (the cursor returns to
    // them at each block); the group's rows are consecutive out rows too
    const uint64_t q_desc = pk::make_desc_k128b(q_tile(s, 0));
    const float* const w0 = weights_of(s) + col0;
    const uint64_t row_stride = c.out_stride;

    pk::mbar_wait(bar(s, kQBar), parity);   // always armed: even an item with no block waits for the producer
    const uint32_t mask = info.mask;

    const auto issue = [&](float (&acc)[kAccRegs], const Cursor& at) {
      pk::wgmma_fence();
#pragma unroll
      for (uint32_t ks = 0; ks < kKSteps; ++ks)   // a k32 step: 32 bytes further along the swizzled rows
        pk::WgmmaE4M3<kRows * kHeads>::mma(acc, at.kd + 2 * ks, at.qd + 2 * ks, ks > 0);
      pk::wgmma_commit();
    };
    const auto prepare = [&](const Cursor& at) {
      Pair p;
      p.w = at.w;
      p.scale = *at.scale;
      p.win = at.win[my_row];
      p.out = at.out + my_row * row_stride;
      p.pos = at.pos;
      return p;
    };
    // sum_h w[h] * relu(S[key, h]) over this thread's columns (the weights read, the ReLUs, then
    // kChains independent partial sums per key and row), the quad's reduce-scatter, the scale,
    // the store
    const auto finish = [&](float (&acc)[kAccRegs], const Pair& p) {
      float2 w[kRows][kColGroups];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int g = 0; g < kColGroups; ++g) w[r][g] = *reinterpret_cast<const float2*>(p.w + r * kHeads + 8 * g);
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) pk::fence_operand(acc[r]);
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) acc[r] = fmaxf(acc[r], 0.f);
      // term (g, e) of key h (column 8g + col0 + e) goes to its chain (g % 2) * 2 + e:
      // consecutive instructions feed different chains
      float part[kRows][2][kChains];
#pragma unroll
      for (int g = 0; g < kColGroups; ++g) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& q = part[r][h][(g % 2) * 2 + e];
              const float wt = e ? w[r][g].y : w[r][g].x, x = acc[4 * (r * kColGroups + g) + 2 * h + e];
              q = g < 2 ? wt * x : fmaf(wt, x, q);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) pk::fence_operand(acc[r]);
      float sum[kRows][2];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) sum[r][h] = (part[r][h][0] + part[r][h][1]) + (part[r][h][2] + part[r][h][3]);
      // the quad's reduce-scatter: pass the other key's sums to the neighbour (xor 1), then,
      // one row: add across the pairs of lanes; two rows: pass the other row's (xor 2)
      float keep[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        keep[r] = (half ? sum[r][1] : sum[r][0]) + shfl_xor<1>(half ? sum[r][0] : sum[r][1]);
      float total;
      if constexpr (kRows == 1) {
        total = keep[0] + shfl_xor<2>(keep[0]);
      } else {
        total = (my_row ? keep[1] : keep[0]) + shfl_xor<2>(my_row ? keep[0] : keep[1]);
      }
      if (writer && p.pos < c.width) *p.out = p.pos >= p.win.lo && p.pos < p.win.hi ? total * p.scale : kMinusInf;
    };

    // 3. logits of the loaded blocks (consecutive: those meeting the windows' hull)
    if (mask) {
      const uint32_t first = __ffs(mask) - 1, last = 31 - __clz(mask);
      Cursor at;
      at.u = first, at.j = 0;
      at.kd = pk::make_desc_k128b(key_tile(s, first));
      at.qd = q_desc;
      at.w = w0;
      at.win = info.win;
      at.scale = reinterpret_cast<const float*>(smem_raw + (scale_tile(s, first) - raw)) + my_key;
      at.out = c.out + keys.row(group, 0) * row_stride + first_pos + first * kBlockKeys + my_key;
      at.pos = first_pos + first * kBlockKeys + my_key;
      float* block_out = at.out;   // row 0 of the cursor's block
      // the pair after: the next row, else row 0 of the next block; false past the last pair
      const auto step = [&](Cursor& c2) {
        if (c2.j + kRows < rows) {
          c2.j += kRows;
          c2.qd += kRows * kQTileBytes / 16;
          c2.w += kRows * kHeads;
          c2.win += kRows;
          c2.out += kRows * row_stride;
        } else {
          if (c2.u == last) return false;
          ++c2.u;
          c2.j = 0;
          c2.kd += kBlockBytes / 16;
          c2.qd = q_desc;
          c2.w = w0;
          c2.win = info.win;
          c2.scale += kBlockKeys;
          block_out += kBlockKeys;
          c2.out = block_out;
          c2.pos += kBlockKeys;
        }
        return true;
      };
      pk::mbar_wait(bar(s, first), parity);
      issue(acc_a, at);
      Pair pa = prepare(at), pb;
      for (;;) {
        uint32_t u = at.u;
        bool more = step(at);
        if (more) {
          if (at.u != u) pk::mbar_wait(bar(s, at.u), parity);
          issue(acc_b, at);
          pb = prepare(at);
          pk::wgmma_wait<1>();
        } else {
          pk::wgmma_wait<0>();
        }
        finish(acc_a, pa);
        if (!more) break;
        u = at.u;
        more = step(at);
        if (more) {
          if (at.u != u) pk::mbar_wait(bar(s, at.u), parity);
          issue(acc_a, at);
          pa = prepare(at);
          pk::wgmma_wait<1>();
        } else {
          pk::wgmma_wait<0>();
        }
        finish(acc_b, pb);
        if (!more) break;
      }
    }

    // 4. clean the positions of blocks no window meets, then hand the stage back
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      if (mask >> u & 1) continue;
      const uint32_t lo = first_pos + u * kBlockKeys, hi = min(lo + kBlockKeys, c.width);
      for (uint32_t j = 0; j < rows; ++j)
        for (uint32_t p = lo + tid; p < hi; p += kMathThreads)
          c.out[(uint64_t)keys.row(group, j) * c.out_stride + p] = kMinusInf;
    }
    __syncwarp();
    if (lane == 0) pk::mbar_arrive(bar(s, kEmptyBar));   // this warp's reads of the stage are done
  }
}

}  // namespace

// Two CTAs per SM (what shared memory allows at next_n <= 2) must fit the register file too:
// 10 warps of at most 200 registers (a warp's registers are allocated in units of 8 per thread;
// __launch_bounds__'s minimum-blocks form made ptxas assume 168 and spill).
#define PK_DSA_MAX_REGS 200

// One entry per layout, head count and rows per wgmma (its N = ROWS x HEADS; 2 rows only for an
// even next_n); pykernels/cuda/dsa.py picks it and packs the parameters.
#define PK_DSA_PAGED_LOGITS_ENTRY(NAME, HEADS, ROWS)                                                           \
  extern "C" __global__ void __maxnreg__(PK_DSA_MAX_REGS) NAME(                                                 \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,              \
      const __grid_constant__ pk::TensorMap tmap_s, const float* weights, float* out, uint64_t out_stride,     \
      uint32_t weights_stride, uint32_t width, const int* context_lens, const int* block_table,                \
      uint32_t bt_stride, uint32_t next_n, uint32_t lens_per_row, uint32_t batch, int* err,                  \
      uint32_t lens_limit, uint32_t num_blocks) {                                                              \
    indexer_logits<HEADS, ROWS>(&tmap_q, &tmap_k, &tmap_s,                                                     \
                                Common{weights, out, out_stride, weights_stride, width, next_n, batch},        \
                                Paged{context_lens, block_table, bt_stride, next_n, lens_per_row, err,         \
                                      lens_limit, num_blocks});                                                \
  }

#define PK_DSA_RAGGED_LOGITS_ENTRY(NAME, HEADS)                                                                \
  extern "C" __global__ void __maxnreg__(PK_DSA_MAX_REGS) NAME(                                                 \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,              \
      const __grid_constant__ pk::TensorMap tmap_s, const float* weights, float* out, uint64_t out_stride,     \
      uint32_t weights_stride, uint32_t width, const int* ks, const int* ke, uint32_t num_rows, int* err) {    \
    indexer_logits<HEADS, 1>(&tmap_q, &tmap_k, &tmap_s,                                                        \
                             Common{weights, out, out_stride, weights_stride, width, kMaxGroupRows,            \
                                    (num_rows + kMaxGroupRows - 1) / kMaxGroupRows},                           \
                             Ragged{ks, ke, num_rows, err, width});                                            \
  }

PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h32, 32, 1)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h64, 64, 1)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h32_x2, 32, 2)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h64_x2, 64, 2)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h32, 32)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h64, 64)
