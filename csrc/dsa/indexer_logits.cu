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
// One CTA = one warpgroup = kBlocksPerCta consecutive 64-key blocks (blockIdx.x) for every
// query row of one row group (blockIdx.y). Steps:
//   1. windows: each row's window, and which of the CTA's blocks meet at least one of them;
//   2. load: one elected thread issues the TMA loads of the group's Q tiles (one mbarrier) and
//      of every used key block (one mbarrier each, all in flight at once: reading keys bounds
//      the kernel, so each CTA keeps 32 KB of them in flight);
//   3. per used block and query row: S = K Q^T (64 keys x H heads, f32) = 4 x wgmma m64nHk32
//      with both operands K-major in 128B-swizzled shared memory; each thread sums
//      w[h] * relu(S[key, h]) over its columns, the four lanes of a quad finish the key, and
//      lane 0 of the quad writes scale * sum inside the window, -inf outside;
//   4. clean: positions of blocks no window meets (not loaded) get -inf.
#include <cstdint>

#include "pk/ptx.cuh"

namespace {

constexpr uint32_t kThreads = 128;                      // one warpgroup
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

template <int kHeads>
struct Smem {
  static constexpr uint32_t kQTileBytes = kHeads * kHeadDim;
  static constexpr uint32_t kKeys = 0;
  static constexpr uint32_t kQ = kKeys + kBlocksPerCta * kBlockBytes;
  static constexpr uint32_t kBars = kQ + kMaxGroupRows * kQTileBytes;   // kBlocksPerCta + 1 mbarriers
  static constexpr uint32_t kBytes = kSmemAlign + kBars + 8 * (kBlocksPerCta + 1);
};

struct Window {
  uint32_t lo, hi;
};

// What the two layouts share: q, weights, out.
struct Common {
  const float* weights;
  float* out;
  uint64_t out_stride;
  uint32_t weights_stride;
  uint32_t width;          // columns of out: max_context_len (paged) or N (ragged)
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
  __device__ __forceinline__ void load(uint32_t dst, const pk::TensorMap* tmap_k, uint32_t bar, uint32_t seq,
                                       uint32_t blk) const {
    pk::tma_load_3d(dst, tmap_k, bar, 0, 0, page(seq, blk));   // map over [num_blocks, 64, 128] bytes
  }
  __device__ __forceinline__ const float* scales(uint32_t seq, uint32_t blk) const {
    return reinterpret_cast<const float*>(cache + (uint64_t)page(seq, blk) * kPageBytes + kBlockBytes);
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
  __device__ __forceinline__ void load(uint32_t dst, const pk::TensorMap* tmap_k, uint32_t bar, uint32_t,
                                       uint32_t blk) const {
    pk::tma_load_2d(dst, tmap_k, bar, 0, (int32_t)(blk * kBlockKeys));   // keys past N: zero-filled
  }
  __device__ __forceinline__ const float* scales(uint32_t, uint32_t blk) const { return k_scales + blk * kBlockKeys; }
};

template <int kHeads, class Keys>
__device__ __forceinline__ void indexer_logits(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_k,
                                               const Common& c, const Keys& keys) {
  using S = Smem<kHeads>;
  constexpr int kAccRegs = kHeads / 2;      // wgmma m64nHk32 fragment per thread
  constexpr int kColGroups = kHeads / 8;    // 8-column groups; a thread holds 2 columns of each
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t base = (pk::smem_addr(smem_raw) + kSmemAlign - 1) & ~(kSmemAlign - 1);
  const uint32_t key_tiles = base + S::kKeys, q_tiles = base + S::kQ;
  const uint32_t bars = base + S::kBars, q_bar = bars + 8 * kBlocksPerCta;

  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t group = blockIdx.y, first_blk = blockIdx.x * kBlocksPerCta;
  const uint32_t first_pos = first_blk * kBlockKeys;
  const uint32_t rows = keys.group_rows(group);

  // 1. windows: a block is used when it meets some row's window
  uint32_t used_mask = 0;
  for (uint32_t j = 0; j < rows; ++j) {
    const Window win = keys.window(group, j);
#pragma unroll
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      const uint32_t lo = first_pos + u * kBlockKeys;
      if (win.lo < win.hi && win.lo < lo + kBlockKeys && lo < win.hi) used_mask |= 1u << u;
    }
  }

  // 2. load
  if (tid == 0) {
    for (uint32_t u = 0; u <= kBlocksPerCta; ++u) pk::mbar_init(bars + 8 * u, 1);
    pk::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0 && used_mask) {
    pk::mbar_arrive_expect_tx(q_bar, rows * S::kQTileBytes);
    for (uint32_t j = 0; j < rows; ++j)
      pk::tma_load_2d(q_tiles + j * S::kQTileBytes, tmap_q, q_bar, 0, (int32_t)(keys.row(group, j) * kHeads));
    for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
      if (!(used_mask >> u & 1)) continue;
      pk::mbar_arrive_expect_tx(bars + 8 * u, kBlockBytes);
      keys.load(key_tiles + u * kBlockBytes, tmap_k, bars + 8 * u, group, first_blk + u);
    }
  }

  // 3. logits of the loaded blocks. Fragment of this thread: rows (keys) key0 and key0 + 8,
  // columns (heads) 8g + 2*(lane%4) + {0, 1} for g < kColGroups.
  const uint32_t key0 = 16 * warp + lane / 4;
  const uint32_t col0 = 2 * (lane % 4);
  if (used_mask) pk::mbar_wait(q_bar, 0);
  for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
    if (!(used_mask >> u & 1)) continue;
    pk::mbar_wait(bars + 8 * u, 0);
    const float* scales = keys.scales(group, first_blk + u);
    for (uint32_t j = 0; j < rows; ++j) {
      const uint32_t row = keys.row(group, j);
      float acc[kAccRegs];
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) acc[r] = 0.f;
      pk::wgmma_fence();
#pragma unroll
      for (uint32_t ks = 0; ks < kKSteps; ++ks)
        pk::WgmmaE4M3<kHeads>::mma(acc, pk::make_desc_k128b(key_tiles + u * kBlockBytes + 32 * ks),
                                   pk::make_desc_k128b(q_tiles + j * S::kQTileBytes + 32 * ks), ks > 0);
      pk::wgmma_commit();
      pk::wgmma_wait<0>();
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) pk::fence_operand(acc[r]);

      // sum_h w[h] * relu(S[key, h]) over this thread's columns, then over the quad
      const float* w = c.weights + (uint64_t)row * c.weights_stride + col0;
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int g = 0; g < kColGroups; ++g) {
        const float w0 = w[8 * g], w1 = w[8 * g + 1];
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
        const Window win = keys.window(group, j);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t key = key0 + 8 * half;
          const uint32_t pos = first_pos + u * kBlockKeys + key;
          if (pos < c.width)
            c.out[row * c.out_stride + pos] = pos >= win.lo && pos < win.hi ? sum[half] * scales[key] : kMinusInf;
        }
      }
    }
  }

  // 4. clean the positions of blocks no window meets
  for (uint32_t u = 0; u < kBlocksPerCta; ++u) {
    if (used_mask >> u & 1) continue;
    const uint32_t lo = first_pos + u * kBlockKeys, hi = min(lo + kBlockKeys, c.width);
    for (uint32_t j = 0; j < rows; ++j)
      for (uint32_t pos = lo + tid; pos < hi; pos += kThreads)
        c.out[(uint64_t)keys.row(group, j) * c.out_stride + pos] = kMinusInf;
  }
}

}  // namespace

// One entry per layout and head count (the wgmma N); pykernels/cuda/dsa.py packs the parameters.
#define PK_DSA_PAGED_LOGITS_ENTRY(NAME, HEADS)                                                                \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                                \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,             \
      const float* weights, float* out, uint64_t out_stride, uint32_t weights_stride, uint32_t width,         \
      const uint8_t* cache, const int* context_lens, const int* block_table, uint32_t bt_stride,               \
      uint32_t next_n, uint32_t lens_per_row) {                                                                \
    indexer_logits<HEADS>(&tmap_q, &tmap_k, Common{weights, out, out_stride, weights_stride, width},           \
                          Paged{cache, context_lens, block_table, bt_stride, next_n, lens_per_row});           \
  }

#define PK_DSA_RAGGED_LOGITS_ENTRY(NAME, HEADS)                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                                \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,             \
      const float* weights, float* out, uint64_t out_stride, uint32_t weights_stride, uint32_t width,         \
      const float* k_scales, const int* ks, const int* ke, uint32_t num_rows) {                                \
    indexer_logits<HEADS>(&tmap_q, &tmap_k, Common{weights, out, out_stride, weights_stride, width},           \
                          Ragged{k_scales, ks, ke, num_rows});                                                 \
  }

PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h32, 32)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h64, 64)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h32, 32)
PK_DSA_RAGGED_LOGITS_ENTRY(pk_dsa_ragged_logits_h64, 64)
