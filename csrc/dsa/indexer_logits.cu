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
//   1. windows: each row's window, and which of the chunk's blocks meet at least one of them;
//   2. load (the producer warp's lane 0, up to kStages items ahead, once the math warps have
//      released the stage): the group's Q tiles and every used key block by TMA, one mbarrier
//      each; every barrier of the stage is armed for every item (0 bytes when unused), so
//      their phases advance in step with the item count;
//   3. per used block and query row: S = K Q^T (64 keys x H heads, f32) = 4 x wgmma m64nHk32
//      with both operands K-major in 128B-swizzled shared memory; each thread sums
//      w[h] * relu(S[key, h]) over its columns, the four lanes of a quad finish the key, and
//      lane 0 of the quad writes scale * sum inside the window, -inf outside;
//   4. clean: positions of blocks no window meets (not loaded) get -inf; each math warp
//      releases the stage (the empty barrier) for the producer.
#include <cstdint>

#include "pk/ptx.cuh"

namespace {

constexpr uint32_t kMathThreads = 128;                  // the math warpgroup
constexpr uint32_t kThreads = kMathThreads + 32;        // + the producer warp
constexpr uint32_t kBlockKeys = 64;                     // keys per block (a page) = the wgmma M
constexpr uint32_t kHeadDim = 128;                      // e4m3 bytes per key = one swizzled row
constexpr uint32_t kScaleBytes = 4;                     // one float32 scale per key
constexpr uint32_t kBlockBytes = kBlockKeys * kHeadDim; // 8 KB of keys
constexpr uint32_t kPageBytes = kBlockKeys * (kHeadDim + kScaleBytes);   // a paged block + its scales
constexpr uint32_t kBlocksPerCta = 4;
constexpr uint32_t kMaxGroupRows = 4;                   // query rows per group (next_n <= 4)
constexpr uint32_t kKSteps = kHeadDim / 32;             // wgmma k32 steps over the head dim
constexpr uint32_t kSmemAlign = 1024;                   // 128B-swizzle atoms
constexpr float kMinusInf = -__builtin_huge_valf();

// Shared memory (dynamic, base aligned up to 1024): kStages stages of [kBlocksPerCta key blocks
// | group_rows Q tiles of H x 128 bytes], each stage a multiple of 1024 bytes, then the
// mbarriers (per stage: one per key block, one for the Q tiles, one "empty" the math warps
// release), then one ItemInfo per stage. pykernels/cuda/dsa.py smem_bytes computes the same size.
constexpr uint32_t kStages = 2;
constexpr uint32_t kBarsPerStage = kBlocksPerCta + 2;
constexpr uint32_t kQBar = kBlocksPerCta, kEmptyBar = kBlocksPerCta + 1;   // a stage's barriers after the blocks'
constexpr uint32_t kMathWarps = kMathThreads / 32;

__host__ __device__ constexpr uint32_t stage_bytes(uint32_t heads, uint32_t group_rows) {
  return (kBlocksPerCta * kBlockBytes + group_rows * heads * kHeadDim + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
}

struct Window {
  uint32_t lo, hi;
};

// What the producer learned about an item, for the math warps (shared memory, one per stage,
// written before the stage's Q barrier is armed): the used blocks, the rows' windows, the
// blocks' TMA coordinates (page ids or first key rows; 0 for unused blocks).
struct ItemInfo {
  uint32_t mask;
  Window win[kMaxGroupRows];
  int32_t coord[kBlocksPerCta];
};
static_assert(sizeof(ItemInfo) == 4 + 8 * kMaxGroupRows + 4 * kBlocksPerCta, "pykernels/cuda/dsa.py ITEM_INFO_BYTES");

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
  const uint8_t* cache;
  const int* context_lens;
  const int* block_table;
  uint32_t bt_stride, next_n, lens_per_row;   // context_lens is [b, next_n] (1) or [b] (0)

  __device__ __forceinline__ uint32_t group_rows(uint32_t) const { return next_n; }
  __device__ __forceinline__ uint32_t row(uint32_t seq, uint32_t j) const { return seq * next_n + j; }
  __device__ __forceinline__ Window window(uint32_t seq, uint32_t j) const {
    const int end = lens_per_row ? context_lens[seq * next_n + j] : context_lens[seq] - (int)next_n + (int)j + 1;
    return {0u, (uint32_t)max(end, 0)};
  }
  __device__ __forceinline__ int page(uint32_t seq, uint32_t blk) const {
    return block_table[(uint64_t)seq * bt_stride + blk];
  }
  // The block's TMA coordinate (its page id; read for every block of an item before any load
  // is issued, so the reads overlap) and its load through the map over [num_blocks, 64, 128] bytes.
  __device__ __forceinline__ int32_t coord(uint32_t seq, uint32_t blk) const { return page(seq, blk); }
  __device__ __forceinline__ void load(uint32_t dst, const pk::TensorMap* tmap_k, uint32_t bar, int32_t page_id) const {
    pk::tma_load_3d(dst, tmap_k, bar, 0, 0, page_id);
  }
  // The scale of key `key` of the block at `page_id` (every page holds 64; read before the
  // window test, also for unused blocks: coordinate 0, a page that exists).
  __device__ __forceinline__ float scale(int32_t page_id, uint32_t key, uint32_t) const {
    return reinterpret_cast<const float*>(cache + (uint64_t)page_id * kPageBytes + kBlockBytes)[key];
  }
};

// Prefill: group g is query rows [4g, 4g + 4) (fewer in the last); keys are k's rows.
struct Ragged {
  const float* k_scales;
  const int* ks;
  const int* ke;
  uint32_t num_rows;

  __device__ __forceinline__ uint32_t group_rows(uint32_t g) const {
    return min(kMaxGroupRows, num_rows - g * kMaxGroupRows);
  }
  __device__ __forceinline__ uint32_t row(uint32_t g, uint32_t j) const { return g * kMaxGroupRows + j; }
  __device__ __forceinline__ Window window(uint32_t g, uint32_t j) const {
    return {(uint32_t)ks[row(g, j)], (uint32_t)ke[row(g, j)]};
  }
  __device__ __forceinline__ int32_t coord(uint32_t, uint32_t blk) const { return (int32_t)(blk * kBlockKeys); }
  __device__ __forceinline__ void load(uint32_t dst, const pk::TensorMap* tmap_k, uint32_t bar, int32_t row) const {
    pk::tma_load_2d(dst, tmap_k, bar, 0, row);   // keys past N: zero-filled
  }
  // (the index clamped below width = N: a last block's keys past N have no scale; never written)
  __device__ __forceinline__ float scale(int32_t first_key, uint32_t key, uint32_t width) const {
    return k_scales[min((uint32_t)first_key + key, width - 1)];
  }
};

template <int kHeads, class Keys>
__device__ __forceinline__ void indexer_logits(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_k,
                                               const Common& c, const Keys& keys) {
  constexpr int kAccRegs = kHeads / 2;      // wgmma m64nHk32 fragment per thread
  constexpr int kColGroups = kHeads / 8;    // 8-column groups; a thread holds 2 columns of each
  constexpr uint32_t kQTileBytes = kHeads * kHeadDim;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t base = (pk::smem_addr(smem_raw) + kSmemAlign - 1) & ~(kSmemAlign - 1);
  const uint32_t stage_size = stage_bytes(kHeads, c.group_rows);
  const uint32_t bars = base + kStages * stage_size;    // + 8 * (kBarsPerStage * stage + block or Q)
  ItemInfo* const infos = reinterpret_cast<ItemInfo*>(smem_raw + (bars + 8 * kStages * kBarsPerStage
                                                                  - pk::smem_addr(smem_raw)));

  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t chunks = (c.width + kBlocksPerCta * kBlockKeys - 1) / (kBlocksPerCta * kBlockKeys);
  const uint32_t num_items = c.num_groups * chunks;
  const auto key_tile = [&](uint32_t s, uint32_t u) { return base + s * stage_size + u * kBlockBytes; };
  const auto q_tile = [&](uint32_t s, uint32_t j) {
    return base + s * stage_size + kBlocksPerCta * kBlockBytes + j * kQTileBytes;
  };
  const auto bar = [&](uint32_t s, uint32_t u) { return bars + 8 * (s * kBarsPerStage + u); };

  // 1-2. windows and load (the producer): the item's info read ahead (a block is used when it
  //    meets some row's window), then,
  //    once the stage is free, the info stored for the math warps, every barrier of the stage
  //    armed and the used tiles loaded
  const auto item_info = [&](uint32_t item) {   // global reads: windows, page ids
    const uint32_t group = item / chunks, first_blk = item % chunks * kBlocksPerCta;
    const uint32_t rows = keys.group_rows(group);
    ItemInfo info;
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) info.win[j] = j < rows ? keys.window(group, j) : Window{0u, 0u};
    info.mask = 0;
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
#pragma unroll
      for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
        const uint32_t lo = (first_blk + u) * kBlockKeys;
        const Window win = info.win[j];
        if (win.lo < win.hi && win.lo < lo + kBlockKeys && lo < win.hi) info.mask |= 1u << u;
      }
    }
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u)
      info.coord[u] = info.mask >> u & 1 ? keys.coord(group, first_blk + u) : 0;
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
      pk::mbar_arrive_expect_tx(bar(s, u), used ? kBlockBytes : 0u);
      if (used) keys.load(key_tile(s, u), tmap_k, bar(s, u), info.coord[u]);
    }
  };

  if (tid == 0) {
    for (uint32_t st = 0; st < kStages; ++st)
      for (uint32_t u = 0; u < kBarsPerStage; ++u) pk::mbar_init(bar(st, u), u == kEmptyBar ? kMathWarps : 1);
    pk::fence_mbarrier_init();
  }
  __syncthreads();

  if (warp == kMathWarps) {
    // ------------------------------------------------------------------ producer
    if (lane != 0) return;
    uint32_t k = 0;
    for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x, ++k) {
      const uint32_t s = k % kStages;
      const ItemInfo info = item_info(item);                         // while the stage may still be in use
      pk::mbar_wait(bar(s, kEmptyBar), ((k / kStages) & 1) ^ 1);   // the stage's previous item released
      load_item(item, info, s);
    }
    return;
  }

  // Fragment of this thread: rows (keys) key0 and key0 + 8, columns (heads) 8g + 2*(lane%4) + {0, 1}.
  const uint32_t key0 = 16 * warp + lane / 4;
  const uint32_t col0 = 2 * (lane % 4);
  uint32_t k = 0;
  for (uint32_t item = blockIdx.x; item < num_items; item += gridDim.x, ++k) {
    const uint32_t s = k % kStages, parity = (k / kStages) & 1;
    const uint32_t group = item / chunks, first_blk = item % chunks * kBlocksPerCta;
    const uint32_t first_pos = first_blk * kBlockKeys;
    const uint32_t rows = keys.group_rows(group);

    // this thread's weights of every row, read while the loads are in flight
    float wts[kMaxGroupRows][kColGroups][2];
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
      const float* w = c.weights + (uint64_t)keys.row(group, min(j, rows - 1)) * c.weights_stride + col0;
#pragma unroll
      for (int g = 0; g < kColGroups; ++g) {
        wts[j][g][0] = j < rows ? w[8 * g] : 0.f;
        wts[j][g][1] = j < rows ? w[8 * g + 1] : 0.f;
      }
    }
    pk::mbar_wait(bar(s, kQBar), parity);   // always armed: even an item with no block waits for the producer
    const ItemInfo& info = infos[s];
    const uint32_t mask = info.mask;
    Window wins[kMaxGroupRows];
#pragma unroll
    for (uint32_t j = 0; j < kMaxGroupRows; ++j) wins[j] = info.win[j];
    // the scales of this thread's two keys in every block (independent loads, all in flight at once)
    float key_scale[kBlocksPerCta][2];
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      const int32_t at = info.coord[u];
#pragma unroll
      for (uint32_t half = 0; half < 2; ++half) key_scale[u][half] = keys.scale(at, key0 + 8 * half, c.width);
    }

    // 3. logits of the loaded blocks
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      if (!(mask >> u & 1)) continue;
      pk::mbar_wait(bar(s, u), parity);
#pragma unroll
      for (uint32_t j = 0; j < kMaxGroupRows; ++j) {
        if (j >= rows) break;
        const uint32_t row = keys.row(group, j);
        float acc[kAccRegs];
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) acc[r] = 0.f;
        pk::wgmma_fence();
#pragma unroll
        for (uint32_t ks = 0; ks < kKSteps; ++ks)
          pk::WgmmaE4M3<kHeads>::mma(acc, pk::make_desc_k128b(key_tile(s, u) + 32 * ks),
                                     pk::make_desc_k128b(q_tile(s, j) + 32 * ks), ks > 0);
        pk::wgmma_commit();
        pk::wgmma_wait<0>();
#pragma unroll
        for (int r = 0; r < kAccRegs; ++r) pk::fence_operand(acc[r]);

        // sum_h w[h] * relu(S[key, h]) over this thread's columns, then over the quad
        float sum[2] = {0.f, 0.f};
#pragma unroll
        for (int g = 0; g < kColGroups; ++g) {
          const float w0 = wts[j][g][0], w1 = wts[j][g][1];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            sum[half] += w0 * fmaxf(acc[4 * g + 2 * half], 0.f);
            sum[half] += w1 * fmaxf(acc[4 * g + 2 * half + 1], 0.f);
          }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          sum[half] += __shfl_xor_sync(0xffffffffu, sum[half], 1);
          sum[half] += __shfl_xor_sync(0xffffffffu, sum[half], 2);
        }
        if (lane % 4 == 0) {
          const Window win = wins[j];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const uint32_t pos = first_pos + u * kBlockKeys + key0 + 8 * half;
            if (pos < c.width)
              c.out[row * c.out_stride + pos] =
                  pos >= win.lo && pos < win.hi ? sum[half] * key_scale[u][half] : kMinusInf;
          }
        }
      }
    }

    // 4. clean the positions of blocks no window meets, then hand the stage back
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      if (mask >> u & 1) continue;
      const uint32_t lo = first_pos + u * kBlockKeys, hi = min(lo + kBlockKeys, c.width);
      for (uint32_t j = 0; j < rows; ++j)
        for (uint32_t pos = lo + tid; pos < hi; pos += kMathThreads)
          c.out[(uint64_t)keys.row(group, j) * c.out_stride + pos] = kMinusInf;
    }
    __syncwarp();
    if (lane == 0) pk::mbar_arrive(bar(s, kEmptyBar));   // this warp's wgmma reads of the stage are done
  }
}

}  // namespace

// One entry per layout and head count (the wgmma N); pykernels/cuda/dsa.py packs the parameters.
#define PK_DSA_PAGED_LOGITS_ENTRY(NAME, HEADS)                                                                \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                                \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,             \
      const float* weights, float* out, uint64_t out_stride, uint32_t weights_stride, uint32_t width,         \
      const uint8_t* cache, const int* context_lens, const int* block_table, uint32_t bt_stride,               \
      uint32_t next_n, uint32_t lens_per_row, uint32_t batch) {                                                \
    indexer_logits<HEADS>(&tmap_q, &tmap_k, Common{weights, out, out_stride, weights_stride, width, next_n, batch}, \
                          Paged{cache, context_lens, block_table, bt_stride, next_n, lens_per_row});           \
  }

#define PK_DSA_RAGGED_LOGITS_ENTRY(NAME, HEADS)                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                                \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,             \
      const float* weights, float* out, uint64_t out_stride, uint32_t weights_stride, uint32_t width,         \
      const float* k_scales, const int* ks, const int* ke, uint32_t num_rows) {                                \
    indexer_logits<HEADS>(&tmap_q, &tmap_k,                                                                    \
                          Common{weights, out, out_stride, weights_stride, width, kMaxGroupRows,               \
                                 (num_rows + kMaxGroupRows - 1) / kMaxGroupRows},                              \
                          Ragged{k_scales, ks, ke, num_rows});                                                 \
  }

PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h32, 32)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h64, 64)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h32, 32)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h64, 64)
