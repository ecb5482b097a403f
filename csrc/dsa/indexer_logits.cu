// DSA indexer logits over the paged FP8 key cache (DeepGEMM's fp8_paged_mqa_logits) for
// sm_90a; host side pykernels/cuda/dsa.py, formats docs/dsa.md.
//
//   q       [b, next_n, H, 128] e4m3, read through a 2-D tensor map over [b*next_n*H, 128]
//   cache   [num_blocks, 64, 1, 132] bytes: per page 64 key rows of 128 e4m3 (8 KB), then
//           64 float32 scales; the keys are read through a 3-D tensor map over
//           [num_blocks, 64, 128] bytes (page stride 8448), the scales by plain loads
//   weights [b*next_n, H] f32;  out [b*next_n, max_context_len] f32 (row stride out_stride)
//
//   logit[row, pos] = scale[pos] * sum_h w[row, h] * relu(q[row, h] . k[pos])
// for pos inside the row's window [0, end), -inf for the rest of [0, max_context_len).
// end = context_lens[i, j] (a [b, next_n] table) or context_lens[i] - next_n + j + 1.
//
// One CTA = one warpgroup = kPagesPerCta consecutive pages of one sequence (blockIdx.y) for
// all its next_n query rows. Steps:
//   1. windows: each row's end, and how many of the CTA's pages hold a visible position;
//   2. load: one elected thread issues the TMA loads of the rows' Q tiles (one mbarrier) and
//      of every used page (one mbarrier each, all in flight at once: the kernel is bound by
//      reading the keys, so each CTA keeps 32 KB of them in flight);
//   3. per page and query row: S = K Q^T (64 keys x H heads, f32) = 4 x wgmma m64nHk32 with
//      both operands K-major in 128B-swizzled shared memory; each thread reduces its part of
//      sum_h w[h] * relu(S[key, h]) over its columns, the four lanes of a quad finish the
//      row, and lane 0 of the quad writes scale * sum (or -inf past the window);
//   4. clean: positions of the CTA's range past every window (pages not loaded) get -inf.
#include <cstdint>

#include "pk/ptx.cuh"

namespace {

constexpr uint32_t kThreads = 128;                      // one warpgroup
constexpr uint32_t kBlockKv = 64;                       // keys per page = the wgmma M
constexpr uint32_t kHeadDim = 128;                      // e4m3 bytes per key = one swizzled row
constexpr uint32_t kScaleBytes = 4;                     // one float32 scale per key
constexpr uint32_t kPageKeyBytes = kBlockKv * kHeadDim; // 8 KB of keys, then the scales
constexpr uint32_t kPageBytes = kBlockKv * (kHeadDim + kScaleBytes);
constexpr uint32_t kPagesPerCta = 4;
constexpr uint32_t kMaxNextN = 4;                       // query rows per sequence (MTP)
constexpr uint32_t kKSteps = kHeadDim / 32;             // wgmma k32 steps over the head dim
constexpr uint32_t kSmemAlign = 1024;                   // 128B-swizzle atoms

template <int kHeads>
struct Smem {
  static constexpr uint32_t kQTileBytes = kHeads * kHeadDim;
  static constexpr uint32_t kKeys = 0;
  static constexpr uint32_t kQ = kKeys + kPagesPerCta * kPageKeyBytes;
  static constexpr uint32_t kBars = kQ + kMaxNextN * kQTileBytes;   // kPagesPerCta + 1 mbarriers
  static constexpr uint32_t kBytes = kSmemAlign + kBars + 8 * (kPagesPerCta + 1);
};

struct Params {
  const uint8_t* cache;
  const float* weights;
  const int* context_lens;
  const int* block_table;
  float* out;
  uint64_t out_stride;
  uint32_t weights_stride;
  uint32_t bt_stride;
  uint32_t next_n;
  uint32_t lens_per_row;   // context_lens is [b, next_n] (1) or [b] (0)
  uint32_t max_context_len;
};

// End (exclusive) of the window of query row j of sequence i.
__device__ __forceinline__ uint32_t window_end(const Params& p, uint32_t i, uint32_t j) {
  if (p.lens_per_row) return (uint32_t)max(p.context_lens[i * p.next_n + j], 0);
  const int end = p.context_lens[i] - (int)p.next_n + (int)j + 1;
  return (uint32_t)max(end, 0);
}

template <int kHeads>
__device__ __forceinline__ void paged_logits(const pk::TensorMap* tmap_q, const pk::TensorMap* tmap_k,
                                             const Params& p) {
  using S = Smem<kHeads>;
  constexpr int kAccRegs = kHeads / 2;      // wgmma m64nHk32 fragment per thread
  constexpr int kColGroups = kHeads / 8;    // 8-column groups; a thread holds 2 columns of each
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t base = (pk::smem_addr(smem_raw) + kSmemAlign - 1) & ~(kSmemAlign - 1);
  const uint32_t keys = base + S::kKeys, qtiles = base + S::kQ;
  const uint32_t bars = base + S::kBars, q_bar = bars + 8 * kPagesPerCta;

  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t seq = blockIdx.y, first_page = blockIdx.x * kPagesPerCta;
  const uint32_t first_pos = first_page * kBlockKv;

  // 1. windows
  uint32_t seq_end = 0;
  for (uint32_t j = 0; j < p.next_n; ++j) seq_end = max(seq_end, window_end(p, seq, j));
  const uint32_t pages_visible = (seq_end + kBlockKv - 1) / kBlockKv;
  const uint32_t used = pages_visible > first_page ? min(pages_visible - first_page, kPagesPerCta) : 0;

  // 2. load
  if (tid == 0) {
    for (uint32_t u = 0; u <= kPagesPerCta; ++u) pk::mbar_init(bars + 8 * u, 1);
    pk::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0 && used > 0) {
    pk::mbar_arrive_expect_tx(q_bar, p.next_n * S::kQTileBytes);
    for (uint32_t j = 0; j < p.next_n; ++j)
      pk::tma_load_2d(qtiles + j * S::kQTileBytes, tmap_q, q_bar, 0, (int32_t)((seq * p.next_n + j) * kHeads));
    for (uint32_t u = 0; u < used; ++u) {
      const int page = p.block_table[(uint64_t)seq * p.bt_stride + first_page + u];
      pk::mbar_arrive_expect_tx(bars + 8 * u, kPageKeyBytes);
      pk::tma_load_3d(keys + u * kPageKeyBytes, tmap_k, bars + 8 * u, 0, 0, page);
    }
  }

  // 3. logits of the loaded pages. Fragment of this thread: rows (keys) r and r + 8,
  // columns (heads) 8g + 2*(lane%4) + {0, 1} for g < kColGroups.
  const uint32_t row0 = 16 * warp + lane / 4;
  const uint32_t col0 = 2 * (lane % 4);
  if (used > 0) pk::mbar_wait(q_bar, 0);
  for (uint32_t u = 0; u < used; ++u) {
    pk::mbar_wait(bars + 8 * u, 0);
    const int page = p.block_table[(uint64_t)seq * p.bt_stride + first_page + u];
    const float* scales = reinterpret_cast<const float*>(p.cache + (uint64_t)page * kPageBytes + kPageKeyBytes);
    for (uint32_t j = 0; j < p.next_n; ++j) {
      const uint32_t row = seq * p.next_n + j;
      float acc[kAccRegs];
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) acc[r] = 0.f;
      pk::wgmma_fence();
#pragma unroll
      for (uint32_t ks = 0; ks < kKSteps; ++ks)
        pk::WgmmaE4M3<kHeads>::mma(acc, pk::make_desc_k128b(keys + u * kPageKeyBytes + 32 * ks),
                                   pk::make_desc_k128b(qtiles + j * S::kQTileBytes + 32 * ks), ks > 0);
      pk::wgmma_commit();
      pk::wgmma_wait<0>();
#pragma unroll
      for (int r = 0; r < kAccRegs; ++r) pk::fence_operand(acc[r]);

      // sum_h w[h] * relu(S[key, h]) over this thread's columns, then over the quad
      const float* w = p.weights + (uint64_t)row * p.weights_stride + col0;
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
        const uint32_t end = window_end(p, seq, j);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t key = row0 + 8 * half;
          const uint32_t pos = first_pos + u * kBlockKv + key;
          if (pos < p.max_context_len)
            p.out[row * p.out_stride + pos] = pos < end ? sum[half] * scales[key] : -__int_as_float(0x7f800000);
        }
      }
    }
  }

  // 4. clean the positions of pages past every window
  const uint32_t clean_from = first_pos + used * kBlockKv;
  const uint32_t clean_to = min(first_pos + kPagesPerCta * kBlockKv, p.max_context_len);
  for (uint32_t j = 0; j < p.next_n; ++j)
    for (uint32_t pos = clean_from + tid; pos < clean_to; pos += kThreads)
      p.out[(uint64_t)(seq * p.next_n + j) * p.out_stride + pos] = -__int_as_float(0x7f800000);
}

}  // namespace

// One entry per head count (the wgmma N); the same parameters (pykernels/cuda/dsa.py).
#define PK_DSA_PAGED_LOGITS_ENTRY(NAME, HEADS)                                                                \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                                \
      const __grid_constant__ pk::TensorMap tmap_q, const __grid_constant__ pk::TensorMap tmap_k,             \
      const uint8_t* cache, const float* weights, const int* context_lens, const int* block_table, float* out, \
      uint64_t out_stride, uint32_t weights_stride, uint32_t bt_stride, uint32_t next_n, uint32_t lens_per_row, \
      uint32_t max_context_len) {                                                                              \
    const Params p{cache, weights, context_lens, block_table, out, out_stride, weights_stride, bt_stride,       \
                   next_n, lens_per_row, max_context_len};                                                     \
    paged_logits<HEADS>(&tmap_q, &tmap_k, p);                                                                  \
  }

PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h32, 32)
PK_DSA_PAGED_LOGITS_ENTRY(pk_dsa_paged_logits_h64, 64)
