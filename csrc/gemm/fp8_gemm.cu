// FP8 (e4m3) block-scaled GEMM, NT layout, bf16 output, for sm_90a (docs/gemm.md). Compile-time
// variants of the epilogue and scales (template flags below): float32 out accumulated in place
// (kF32Acc, entries *_f32acc), with 1x128 B scales (kRowB, *_rowb), and e4m3 out quantized on
// store with 1x128 scales (kFp8Out, *_e4m3).
//
//   out[m, n] = sum_kb  sfa[m, kb] * sfb[n / 128, kb] * sum_{k in block kb} A[m, k] * B[n, k]
//
// A e4m3 [rows, K] with 1x128 scales sfa (f32, column-major TMA-aligned: per group
// [KB, M padded to 4] floats, KB = ceil(K/128), read by TMA through a 3-D map [G, KB, M]
// whose rows past M are zero-filled); B e4m3 [G * N, K] with 128x128 block scales sfb f32
// [G, ceil(N/128), KB] (contiguous, plain loads). K is a multiple of 16 (the TMA row
// stride of A and B); the maps of A and B have the true K extent, so the TMA zero-fills
// the tail of a partial last K block (its bytes still count towards the full barrier's
// transaction count) and the wgmma adds zeros there.
// One kernel per tile shape (BM x BN) serves the three layouts (runtime `kind`):
//   0 normal      A [M, K], B [N, K], out [M, N]
//   1 contiguous  A [M, K] rows grouped by m_indices (int32 [M], -1 = padding, skipped),
//                 B [G, N, K], out [M, N]
//   2 masked      A [G, M, K] (M = m_max), B [G, N, K], out [G, M, N]; rows >= masked_m[g]
//                 (int32 [G]) are skipped
// Rows and columns a layout does not own are never written.
// Device checks (pk/error_record.cuh; no host read, CUDA-graph safe), where the schedule
// reads the values: an m_indices value outside [-1, G) (kErrMIndexOutOfRange; its row is
// skipped like padding) and a masked_m value outside [0, M] (kErrMaskedMOutOfRange; the
// group is skipped) are recorded by the math warps; the producer skips the same work
// without recording. The kernel traps when launched with less dynamic shared memory than
// Layout::smem_bytes(stages) (the host's formula is checked against it by the tests).
//
// Structure (persistent, warp-specialised, one CTA per SM):
//  * warpgroup kMathWG (the last) is the producer: setmaxnreg.dec to 40; its first warp
//    walks the tile schedule and, per 128-wide K block, waits for a free stage (empty
//    mbarrier); one elected thread arms the stage's full mbarrier with the byte count of
//    the three boxes and issues three TMA loads (A: BM x 128, B: BN x 128, 128-byte
//    swizzle; sfa: the BM scales of the tile's rows for this K block, no swizzle).
//  * warpgroups 0 .. kMathWG-1 are math warpgroups (setmaxnreg.inc to 232), each owning 64
//    rows of the tile: per K block read its two rows' A scales from the stage (shared
//    memory), four wgmma m64nBNk32 (e4m3 x e4m3 -> f32) into `acc`, wait, release the
//    stage, then promote on CUDA cores:
//    fin += (sfa[row] * sfb[n-block]) * acc  (two-level accumulation).
//    BM 256 (kWaves = 2): two math warpgroups of 128 rows, each as two 64-row waves per K
//    block through the one `acc` (wgmma, wait, promote into the wave's own fin), the
//    stage released after the second wave's wait; the epilogue stores wave by wave.
//    After the last K block: fin -> bf16 into the warpgroup's staging tile (32-byte
//    swizzled 64 x 16 column boxes), then one thread TMA-stores the boxes when the
//    warpgroup owns all its 64 rows (always in the normal layout: the TMA clips rows >= M
//    and columns >= N); otherwise each warp writes the owned rows among its 16 with
//    bounds- and group-checked 16-byte st.global.
//  * shared memory (dynamic, aligned to 1024 here): stages x A tile, stages x B tile,
//    kMathWG staging tiles, stages x BM A scales (f32), 2 x stages mbarriers. `stages` is
//    a kernel argument.
//  * kCluster = 2 (entries *_mc2, launched with cluster dims (2, 1, 1)): the two CTAs of
//    a cluster walk the schedule in lockstep, one unit = two adjacent m-blocks of one
//    n-block. CTA `rank` computes m-block 2 u + rank: it loads its own A tile and rows
//    [rank BN/2, (rank+1) BN/2) of the B tile, multicast into the same stage of both CTAs
//    (ctaMask 0b11), so each CTA's full barrier receives A + its A scales + the whole B
//    (the scales are not multicast: each CTA loads its own rows'). Every math warp
//    releases a stage on the empty barriers of both CTAs (lanes 0 and 1, one CTA each,
//    through mapa), so a producer overwrites a stage only after both CTAs consumed it. The
//    hand-off orders shared memory only (pk::mbar_arrive_cluster_shared /
//    mbar_wait_cluster_shared: cluster scope restricted to shared memory, no GPU-scope
//    fence on the math warps' path and no L1 invalidation in the producer; the B scales
//    the math warps read through L1 are read-only input). A CTA whose m-block has no rows
//    for a pass (odd m-block count, masked tails, contiguous groups present in only one of
//    the two m-blocks) still loads and multicasts its B slice and consumes the stages, but
//    loads no A and no A scales, issues no wgmma and stores nothing. Cluster barriers after
//    the mbarrier init and before exit.
#include <cstdint>

#include "pk/error_record.cuh"
#include "pk/ptx.cuh"
#include "pk/wgmma_bf16.cuh"

namespace {

constexpr uint32_t kBlockK = 128;      // K per stage = one scale block = one 128-byte swizzle row
constexpr uint32_t kProducerRegs = 40;
constexpr uint32_t kMathRegs = 232;

enum : uint32_t { kNormal = 0, kContiguous = 1, kMasked = 2 };

struct Problem {
  const float* sfb;
  uint8_t* out;         // bf16 bytes
  const int* grouping;  // m_indices (contiguous) or masked_m (masked); unused for normal
  uint32_t m;           // rows of A per group (M; m_max for masked)
  uint32_t n;
  uint32_t num_kb;      // ceil(K / 128): the last K block may be partial (TMA zero-fills its tail)
  uint32_t groups;
  uint32_t kind;
  uint32_t stages;
  uint32_t band;        // rasterisation: n-blocks per band
  int* record;          // device error record (pk::record_error), may be null
  uint32_t splits;      // split-K (normal layout, *_splitk entries): K-block ranges per tile, else 1
  uint32_t kb_per;      // K blocks per split: ceil(num_kb / splits) (the last range may be shorter)
};

__device__ __forceinline__ uint32_t cdiv(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// max.NaN.f32: a NaN operand gives NaN (fmaxf would drop it): a NaN makes its group NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Two floats -> two e4m3 (RNE, saturating at +-448, NaN -> 0x7F): lo in the low byte.
__device__ __forceinline__ uint16_t e4m3x2_satfinite(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));  // first source: upper byte
  return r;
}

__device__ __forceinline__ uint32_t dynamic_smem_size() {
  uint32_t v;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
  return v;
}

// Persistent tile schedule, identical in every warp that walks it (deterministic).
// Tiles are numbered group by group (masked), and inside a (group's) M x N grid of
// blocks in bands of `band` n-blocks, n fastest inside a band, so that CTAs running at
// the same time share A rows and B columns in L2. The schedule's unit is kCluster
// adjacent m-blocks of one n-block (one per CTA of a cluster); a group's last unit may
// reach past its last m-block. kCheck: record bad masked_m values (math warps; every
// group is walked by the last get() of every CTA). kRuns (the A-resident entries, normal
// layout, cluster 1): CTA c walks the contiguous run [c per, (c + 1) per) of the units in
// m-major order (per = ceil(units / grid)), so that successive units share their m-block.
template <int BM, int BN, int kCluster, bool kCheck, bool kRuns = false>
struct Scheduler {
  const Problem& p;
  uint32_t n_blocks;
  uint32_t group = 0;        // masked: current group
  uint32_t group_first = 0;  // masked: first tile index of `group`
  uint32_t split = 0;        // the unit's K-block range (split-K; else 0 and the whole K):
  uint32_t kb_first = 0;     //   K blocks [kb_first, kb_first + kb_count)
  uint32_t kb_count = 0;

  __device__ explicit Scheduler(const Problem& prob) : p(prob), n_blocks(cdiv(prob.n, BN)) {}

  // The t-th unit (t increasing between calls): false when there is none. Its m-blocks
  // are kCluster * m_unit + [0, kCluster). m_limit: rows of the group that exist / may be
  // written.
  __device__ bool get(uint32_t t, uint32_t& m_unit, uint32_t& n_blk, uint32_t& g, uint32_t& m_limit) {
    uint32_t m_blocks;
    if (p.kind == kMasked) {
      for (;;) {
        if (group >= p.groups) return false;
        const int valid = __ldg(p.grouping + group);
        const bool bad = valid < 0 || (uint32_t)valid > p.m;  // the group is skipped
        if (kCheck && bad && threadIdx.x == 0) pk::record_error(p.record, pk::kErrMaskedMOutOfRange, valid, (int)p.m, (int)group);
        m_limit = bad ? 0u : (uint32_t)valid;
        m_blocks = cdiv(cdiv(m_limit, BM), kCluster);  // units
        if (t < group_first + m_blocks * n_blocks) break;
        group_first += m_blocks * n_blocks;
        ++group;
      }
      t -= group_first;
      g = group;
    } else {
      m_blocks = cdiv(cdiv(p.m, BM), kCluster);  // units
      if constexpr (kRuns) {  // t = blockIdx.x + j gridDim.x: the CTA's j-th unit of its run
        const uint32_t total = m_blocks * n_blocks, per = cdiv(total, gridDim.x), j = t / gridDim.x;
        const uint32_t u = (t % gridDim.x) * per + j;
        if (j >= per || u >= total) return false;
        kb_first = 0;
        kb_count = p.num_kb;
        g = 0;
        m_limit = p.m;
        m_unit = u / n_blocks;
        n_blk = u % n_blocks;
        return true;
      }
      if (t >= m_blocks * n_blocks * p.splits) return false;
      split = t / (m_blocks * n_blocks);  // split-K: the K-block range is the slowest index
      t -= split * m_blocks * n_blocks;
      g = 0;
      m_limit = p.m;
    }
    kb_first = split * p.kb_per;
    kb_count = min(p.kb_per, p.num_kb - kb_first);
    const uint32_t per_band = m_blocks * p.band;
    const uint32_t band = t / per_band;
    const uint32_t first_n = band * p.band;
    const uint32_t width = min(p.band, n_blocks - first_n);
    const uint32_t r = t - band * per_band;
    m_unit = r / width;
    n_blk = first_n + r % width;
    return true;
  }
};

// Contiguous layout: the smallest group index > prev among the rows of m-block m_blk
// (indices outside [0, groups) are skipped like padding), or -1. A tile whose rows belong
// to several groups is computed once per group. Called by all 32 lanes of a warp. kCheck
// (the first call for an m-block, in the math warps): warp 0 records a value outside
// [-1, groups) (one of its lane's rows; one record call site).
template <int BM, bool kCheck>
__device__ __forceinline__ int next_group(const Problem& p, uint32_t m_blk, int prev) {
  const uint32_t lane = threadIdx.x % 32;
  int best = 0x7fffffff;
  int bad_row = -1, bad_value = 0;
  int gs[BM / 32];
#pragma unroll
  for (uint32_t i = 0; i < BM / 32; ++i) {  // every load first: their latencies overlap
    const uint32_t row = m_blk * BM + i * 32 + lane;
    gs[i] = row < p.m ? __ldg(p.grouping + row) : -1;  // rows past the end: padding
  }
#pragma unroll
  for (uint32_t i = 0; i < BM / 32; ++i) {
    const int g = gs[i];
    if (g > prev && (uint32_t)g < p.groups) best = min(best, g);
    if (kCheck && (g < -1 || g >= (int)p.groups)) {
      bad_row = (int)(m_blk * BM + i * 32 + lane);
      bad_value = g;
    }
  }
  if (kCheck && bad_row >= 0 && threadIdx.x < 32)
    pk::record_error(p.record, pk::kErrMIndexOutOfRange, bad_value, (int)p.groups, bad_row);
  best = __reduce_min_sync(0xffffffffu, best);
  return best == 0x7fffffff ? -1 : best;
}

// The passes over one schedule unit, in increasing group order: the groups whose B the
// cluster loads together. Normal / masked: one pass (group g). Contiguous: one per group
// with rows in any of the unit's m-blocks (kCluster = 1: the tile's own groups). `mine`:
// this CTA's m-block m_blk has rows of the pass's group; otherwise the CTA only loads its
// B slice for the peer. Walked identically by every warp of both CTAs of a cluster.
// kCheck: record bad m_indices values (next_group, once per m-block).
template <int BM, int kCluster, bool kCheck>
struct Passes {
  int group;          // current pass, -1 after the last
  bool mine;
  int own, peer;      // contiguous, kCluster 2: next group of this CTA's / the peer's m-block

  __device__ Passes(const Problem& p, uint32_t m_blk, uint32_t g, uint32_t m_limit) {
    if (kCluster == 1) {
      group = p.kind == kContiguous ? next_group<BM, kCheck>(p, m_blk, -1) : (int)g;
      mine = true;
    } else if (p.kind == kContiguous) {
      own = next_group<BM, kCheck>(p, opaque(m_blk), -1);
      peer = next_group<BM, false>(p, opaque(m_blk ^ 1u), -1);  // the cluster's other m-block (the peer checks it)
      pick();
    } else {
      group = (int)g;
      mine = m_blk * BM < m_limit;
    }
  }
  // A value the compiler cannot see through: keeps it from hoisting the 8 per-lane
  // m_indices addresses of the two m-blocks out of the pass loop (16 live registers,
  // which the 40-register producer would spill).
  static __device__ __forceinline__ uint32_t opaque(uint32_t v) {
    asm volatile("" : "+r"(v));
    return v;
  }
  __device__ void pick() {  // the smaller of own / peer, -1 (as unsigned, the largest) last
    group = (int)min((uint32_t)own, (uint32_t)peer);
    mine = own == group;
  }
  __device__ void advance(const Problem& p, uint32_t m_blk) {
    if (kCluster == 1) {
      // opaque: the loads' addresses are computed here, not hoisted above the caller's K loop
      // (into the producer's path to its first TMA load, whatever the layout).
      group = p.kind == kContiguous ? next_group<BM, false>(p, opaque(m_blk), group) : -1;
    } else if (p.kind == kContiguous) {
      if (own == group) own = next_group<BM, false>(p, opaque(m_blk), group);
      if (peer == group) peer = next_group<BM, false>(p, opaque(m_blk ^ 1u), group);
      pick();
    } else {
      group = -1;
    }
  }
};

template <int BM, int BN, bool kRowB = false, bool kBf16 = false>
struct Layout {
  // Math warpgroups: one per 64 rows up to BM 128; BM 256 has two, each computing its 128
  // rows as kWaves = 2 waves of 64 (one accumulator set reused by the waves, one promoted
  // result per wave): four math warpgroups would leave each warp under 120 registers.
  static constexpr uint32_t kMathWG = BM <= 128 ? BM / 64 : 2;
  static constexpr uint32_t kWaves = BM / 64 / kMathWG;  // 64-row waves per math warpgroup
  static constexpr uint32_t kThreads = 128 * (kMathWG + 1);
  static constexpr uint32_t kABytes = BM * kBlockK;  // one stage of A (128-byte rows: 128 e4m3 or 64 bf16)
  static constexpr uint32_t kBBytes = BN * kBlockK;  // one stage of B
  static constexpr uint32_t kSfaBytes = kBf16 ? 0 : BM * 4;  // one stage of A scales (f32 per row; bf16: none)
  static constexpr uint32_t kSfbBytes = kRowB ? BN * 4 : 0;  // one stage of 1x128 B scales (f32 per column)
  // Output staging of one math warpgroup (64 x BN bf16) as BN/16 column boxes of 64 rows
  // x 32 bytes, each in the TMA's 32-byte swizzle (16-byte chunk ^= row bit 2): the TMA
  // store's layout, and conflict-free for the fragment writes.
  static constexpr uint32_t kBoxCols = 16;
  static constexpr uint32_t kBoxBytes = 64 * kBoxCols * 2;
  static constexpr uint32_t kStagingBytes = (BN / kBoxCols) * kBoxBytes;
  static constexpr uint32_t kChunks = BN / 8;        // 16-byte chunks per output row
  static constexpr uint32_t kLanesPerRow = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  static constexpr uint32_t kRowsPerIter = 32 / kLanesPerRow;  // rows a warp stores per step
  // Dynamic shared memory for `stages` stages (plus 1024 bytes to align the base).
  // pykernels/cuda/gemm.py computes the same (the kernel traps when launched with less).
  static __host__ __device__ constexpr uint32_t smem_bytes(uint32_t stages) {
    return 1024 + stages * (kABytes + kBBytes + kSfaBytes + kSfbBytes) + kMathWG * kWaves * kStagingBytes + stages * 16;
  }
  // kAResident: num_kb A blocks and their scales (the whole K of one m-block), a ring of
  // `stages` B blocks, the staging tiles, the ring's barriers and A's full / empty pair.
  static __host__ __device__ constexpr uint32_t smem_bytes_resident(uint32_t stages, uint32_t num_kb) {
    return 1024 + num_kb * (kABytes + kSfaBytes) + stages * kBBytes + kMathWG * kWaves * kStagingBytes + stages * 16 +
           16;
  }
  // Byte offset in the staging area of the 16-byte chunk holding columns [8 c, 8 c + 8) of row r.
  static __device__ __forceinline__ uint32_t chunk_offset(uint32_t r, uint32_t c) {
    return (c / 2) * kBoxBytes + r * 32 + (((c & 1) ^ ((r >> 2) & 1)) << 4);
  }
};

__host__ __device__ constexpr int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }

// Two waves with BN > 128: the widest wgmma N (a multiple of 8) dividing BN that is at most 72.
__host__ __device__ constexpr uint32_t chunk_n(uint32_t bn, uint32_t n = 72) {
  return bn % n == 0 ? n : chunk_n(bn, n - 8);
}

template <uint32_t V>
struct Const {
  static constexpr uint32_t value = V;
};

// Calls f(Const<G>()) for the run-time value g, which must be one of kStep, 2 kStep, ...,
// kLast (the last candidate is taken without a compare): one compiled copy of f per value.
template <uint32_t kStep, uint32_t kLast, uint32_t G = kStep, class F>
__device__ __forceinline__ void with_const(uint32_t g, F&& f) {
  if constexpr (G >= kLast) {
    f(Const<kLast>());
  } else if (g == G) {
    f(Const<G>());
  } else {
    with_const<kStep, kLast, G + kStep>(g, f);
  }
}

// kF32Acc: float32 output accumulated in place, out[row, col] += the tile's result (the
// weight-gradient form d = c + A B^T with c = d; the host copies a separate c into out
// first, or zeroes out when there is no c). Compile-time: the bf16 entries keep their code.
// kRowB: 1x128 B scales (DeepGEMM's recipe (1, 1, 128)), one per column of the tile and K
// block, staged by TMA with the stage (map [G, KB, N] over sfb column-major TMA-aligned,
// like the A scales) instead of sfb's 128x128 blocks read by __ldg.
// kFp8Out: e4m3 output quantized on store with 1x128 scales (BN = 128: one group per row
// of the tile), sfd f32 [M, ceil(N/128)]: exactly per_token_cast_to_fp8 of the float32
// result (amax with NaN propagation, floor 1e-4, inv = 448 / amax and sf = amax / 448 by
// div.rn, q = cvt.rn.satfinite.e4m3(x * inv)).
// kSplitK: split-K (normal layout): unit t of the schedule is a tile and a range of
// p.kb_per K blocks (the range slowest); out is a float32 workspace [splits, M, N] and each
// unit stores its tile's partial sum (plain stores) at slice `split`; a second kernel
// (csrc/gemm/splitk_reduce.cu) adds the slices in order into the bf16 output.
// kBf16: bf16 A and B, no scales (bf16_gemm_nt; entries pk_bf16_gemm_nt_*): a stage holds
// 64 bf16 of K (the same 128-byte swizzled rows), four wgmma m64nBNk16 per stage accumulate
// into `acc` across all K blocks (no promotion: the accumulator is the result), K block kb's
// wgmma group stays in flight while kb + 1 is issued; no A-scale loads. bf16 or (kF32Acc)
// float32 out, normal layout, cluster 1.
// kAResident (entries *_ares; BM 128, bf16 out, normal layout, cluster 1): the whole K of
// the unit's m-block of A and its scales stay in shared memory (own full / empty barrier
// pair) while the CTA walks a contiguous m-major run of units (Scheduler kRuns); the
// producer loads A only when the m-block changes, the ring carries B alone. The math
// warps release the old A when they start a unit of a new m-block (its wgmma retired
// with the last unit's wait_group 0), so a change of m-block waits for A's load.
template <int BM, int BN, int kCluster, bool kF32Acc, bool kRowB, bool kFp8Out, bool kSplitK, bool kBf16 = false,
          bool kAResident = false>
__device__ __forceinline__ void fp8_gemm_kernel(const pk::TensorMap* tmap_a, const pk::TensorMap* tmap_b,
                                                const pk::TensorMap* tmap_sfa, const pk::TensorMap* tmap_out,
                                                const pk::TensorMap* tmap_sfb, float* sfd, const Problem& p) {
  using L = Layout<BM, BN, kRowB, kBf16>;
  static_assert(!kBf16 || (kCluster == 1 && !kRowB && !kFp8Out && !kSplitK), "bf16: bf16 / f32 out, cluster 1");
  static_assert(!kRowB || kCluster == 1, "1x128 B scales: cluster 1 only");
  static_assert(!kFp8Out || (BN == 128 && kCluster == 1 && !kF32Acc), "e4m3 out: one 128-column group per tile");
  static_assert(kCluster == 1 || kCluster == 2, "clusters of 1 or 2 CTAs");
  static_assert(!kSplitK || (kCluster == 1 && !kF32Acc && !kRowB && !kFp8Out), "split-K: bf16 entries of cluster 1");
  static_assert(!kAResident || (BM == 128 && kCluster == 1 && !kF32Acc && !kRowB && !kFp8Out && !kSplitK && !kBf16),
                "resident A: the bf16-out FP8 entries of BM 128 (one wave, one accumulator set), cluster 1");
  constexpr bool kMulticast = kCluster > 1;
  // Each CTA of a cluster loads BN / kCluster rows of B: whole 8-row (1024-byte) swizzle
  // atoms, so the slices land exactly where one load of the whole box would put them.
  constexpr uint32_t kBSliceRows = BN / kCluster;
  static_assert(BN % kCluster == 0 && kBSliceRows % 8 == 0, "B slices: whole swizzle atoms");
  constexpr uint32_t kBSliceBytes = kBSliceRows * kBlockK;
  static_assert(BM == 64 || BM == 128 || BM == 256, "BM: one or two math warpgroups of 64 rows, or two of 2 x 64");
  constexpr uint32_t kWaves = L::kWaves;  // 64-row waves per math warpgroup (BM 256: 2)
  static_assert(kWaves == 1 || (!kBf16 && kCluster == 1), "two waves: the FP8 entries of cluster 1");
  static_assert(BN % 16 == 0 && BN >= 16 && BN <= 256, "BN: multiple of 16 up to 256");
  // A tile of BN columns starting at any multiple of BN meets at most two 128-column
  // scale blocks of B.
  static_assert(BN <= 128 + gcd_int(BN, 128), "BN: a tile may span at most two sfb blocks");
  constexpr bool kUniformB = (128 % BN) == 0;  // a tile never crosses a sfb block
  constexpr uint32_t kAcc = BN / 2;             // f32 accumulator registers per thread
  // One math warpgroup (BM 64): two accumulator sets, so that the wgmma of K block kb + 1
  // runs while kb is promoted (with two warpgroups the other one's wgmma fills that gap).
  // Up to BN 64: three BN/2-register sets (acc, acc2, fin) of 64 x 128 spill the 232 registers.
  constexpr bool kDoubleAcc = !kBf16 && L::kMathWG == 1 && BN <= 64;
  // Two waves with BN > 128: each wave's wgmma in two column halves (m64 x BN/2), so that the
  // accumulator set (BN/4 registers) and a result per wave fit the 232 registers.
  constexpr uint32_t kChunkN = kWaves > 1 && BN > 128 ? chunk_n(BN) : BN;  // columns of one wgmma
  constexpr uint32_t kNChunks = BN / kChunkN;
  constexpr uint32_t kChunkAcc = kChunkN / 2;    // its accumulator registers per thread
  static_assert(kChunkN % 8 == 0, "chunks: whole 8-row B swizzle atoms");
  static_assert(kWaves == 1 || kChunkAcc + kWaves * kAcc <= 200, "two waves: acc + one result per wave in the registers");

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_addr = pk::smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023u) & ~1023u;
  uint8_t* const smem = smem_raw + (base - raw_addr);  // generic view of `base`
  // A blocks (and A-scale blocks): one per stage, or (kAResident) one per K block of the unit
  const uint32_t a_slots = kAResident ? p.num_kb : p.stages;
  const uint32_t smem_a = base;
  const uint32_t smem_b = smem_a + a_slots * L::kABytes;
  const uint32_t staging_off = a_slots * L::kABytes + p.stages * L::kBBytes;
  // A scales of stage s at sfa_off + s * kSfaBytes (after the staging tiles: those keep the
  // 1024-byte alignment of the stage tiles; a scale box needs 128 bytes, BM * 4 is 256 or 512)
  const uint32_t sfa_off = staging_off + L::kMathWG * kWaves * L::kStagingBytes;
  // kRowB: B scales of stage s at sfb_off + s * kSfbBytes (256-byte aligned: BM * 4 is)
  const uint32_t sfb_off = sfa_off + a_slots * L::kSfaBytes;
  const uint32_t bars = base + sfb_off + p.stages * L::kSfbBytes;
  // full[s] at bars + 8 s, empty[s] at bars + 8 (stages + s)
  const uint32_t empty_bars = bars + 8 * p.stages;
  // kAResident: A's full barrier (producer's arrive + A and A-scale bytes) and empty barrier
  // (one arrive per math warp)
  const uint32_t a_full_bar = bars + 16 * p.stages, a_empty_bar = a_full_bar + 8;

  const uint32_t wg = threadIdx.x / 128;
  // Cluster geometry: this CTA's rank; its cluster walks schedule units blockIdx.x /
  // kCluster, + gridDim.x / kCluster, ...
  const uint32_t rank = kMulticast ? pk::cluster_ctarank() : 0u;
  if (kMulticast && pk::cluster_nctarank() != kCluster) __trap();  // launched without the cluster
  if (kAResident && p.kind != kNormal) __trap();                   // the runs' schedule: normal layout only
  // launched with too little shared memory
  if (dynamic_smem_size() < (kAResident ? L::smem_bytes_resident(p.stages, p.num_kb) : L::smem_bytes(p.stages))) __trap();
  // Thread s initialises stage s's barriers (straight-line code: no divergent loop
  // before the CTA barrier).
  if (threadIdx.x < p.stages) {
    pk::mbar_init(bars + 8 * threadIdx.x, 1);  // producer's arrive + TMA bytes
    // one arrive per math warp of every CTA of the cluster
    pk::mbar_init(empty_bars + 8 * threadIdx.x, 4 * L::kMathWG * kCluster);
    if (kAResident && threadIdx.x == 0) {
      pk::mbar_init(a_full_bar, 1);
      pk::mbar_init(a_empty_bar, 4 * L::kMathWG);
    }
    pk::fence_mbarrier_init();
    pk::fence_proxy_async_shared();
  }
  // Multicast: the peer's barriers must be initialised before this CTA's first multicast
  // or remote arrive reaches them.
  if constexpr (kMulticast) {
    pk::cluster_sync();
  } else {
    __syncthreads();
  }
  // PDL: the setup above overlaps the previous kernel's tail; every global access (TMA loads,
  // m_indices / masked_m, sfb, f32 out read) comes after the previous grid completed.
  pk::griddep_wait();

  if (wg == L::kMathWG) {
    // ---------------------------------------------------------------- producer
    pk::setmaxnreg_dec<kProducerRegs>();
    const bool loader = (threadIdx.x / 32) % 4 == 0;
    if (!kMulticast && !loader) return;  // multicast: warps 1-3 wait at the final cluster barrier
    if (loader) {
      // Lane 0 of the converged warp (not elect.sync: its result would stall the first
      // unit's schedule arithmetic, which stands between the launch and the first TMA load).
      const bool leader = (threadIdx.x % 32) == 0;
      Scheduler<BM, BN, kCluster, false, kAResident> sched(p);
      uint32_t s = 0, phase = 0;
      uint32_t a_blk = ~0u, a_phase = 0;  // kAResident: the resident m-block, A's barrier phase
      uint32_t m_unit, n_blk, g, m_limit;
      for (uint32_t t = blockIdx.x / kCluster; sched.get(t, m_unit, n_blk, g, m_limit); t += gridDim.x / kCluster) {
        const uint32_t m_blk = m_unit * kCluster + rank;
        Passes<BM, kCluster, false> pass(p, m_blk, g, m_limit);
        while (pass.group >= 0) {
          const int32_t a_row = (int32_t)((p.kind == kMasked ? g * p.m : 0u) + m_blk * BM);
          const int32_t sfa_g = (int32_t)(p.kind == kMasked ? g : 0u);  // sfa map: [G, K/128, M]
          const int32_t b_row = (int32_t)((uint32_t)pass.group * p.n + n_blk * BN + rank * kBSliceRows);
          if constexpr (kAResident) {
            if (m_blk != a_blk) {  // a new m-block: once the math warps left the old one, all its K blocks
              pk::mbar_wait(a_empty_bar, a_phase ^ 1);
              if (leader) {
                pk::mbar_arrive_expect_tx(a_full_bar, sched.kb_count * (L::kABytes + L::kSfaBytes));
                for (uint32_t kb = 0; kb < sched.kb_count; ++kb) {
                  pk::tma_load_2d(smem_a + kb * L::kABytes, tmap_a, a_full_bar, (int32_t)(kb * kBlockK), a_row);
                  pk::tma_load_3d(base + sfa_off + kb * L::kSfaBytes, tmap_sfa, a_full_bar, (int32_t)(m_blk * BM),
                                  (int32_t)kb, sfa_g);
                }
              }
              __syncwarp();
              a_blk = m_blk;
              a_phase ^= 1;
            }
          }
          for (uint32_t kb = sched.kb_first; kb < sched.kb_first + sched.kb_count; ++kb) {
            // The whole warp waits (it stays converged); one thread arms the barrier and
            // issues the loads.
            if constexpr (kMulticast) {
              pk::mbar_wait_cluster_shared(empty_bars + 8 * s, phase ^ 1);  // released by both CTAs
            } else {
              pk::mbar_wait(empty_bars + 8 * s, phase ^ 1);
            }
            if (leader) {
              if constexpr (kMulticast) {
                // This stage receives this CTA's A and A scales (when it has rows) and both B
                // slices (its own and the peer's multicast, which may land before this
                // expect_tx: the transaction count goes negative, the pending arrival keeps
                // the phase open).
                pk::mbar_arrive_expect_tx(bars + 8 * s, (pass.mine ? L::kABytes + L::kSfaBytes : 0u) + L::kBBytes);
                if (pass.mine) {
                  pk::tma_load_2d(smem_a + s * L::kABytes, tmap_a, bars + 8 * s, (int32_t)(kb * kBlockK), a_row);
                  pk::tma_load_3d(base + sfa_off + s * L::kSfaBytes, tmap_sfa, bars + 8 * s, (int32_t)(m_blk * BM),
                                  (int32_t)kb, sfa_g);
                }
                pk::tma_load_2d_multicast(smem_b + s * L::kBBytes + rank * kBSliceBytes, tmap_b, bars + 8 * s,
                                          (int32_t)(kb * kBlockK), b_row, (uint16_t)((1u << kCluster) - 1));
              } else {
                // The whole box counts, rows past M included (the TMA zero-fills them).
                pk::mbar_arrive_expect_tx(bars + 8 * s,
                                          (kAResident ? 0u : L::kABytes + L::kSfaBytes) + L::kBBytes + L::kSfbBytes);
                if constexpr (!kAResident) {
                  pk::tma_load_2d(smem_a + s * L::kABytes, tmap_a, bars + 8 * s,
                                  (int32_t)(kb * kBlockK / (kBf16 ? 2 : 1)), a_row);
                }
                if constexpr (kRowB) {  // the tile's BN column scales of this K block (columns past N: zeros)
                  pk::tma_load_3d(base + sfb_off + s * L::kSfbBytes, tmap_sfb, bars + 8 * s, (int32_t)(n_blk * BN),
                                  (int32_t)kb, pass.group);
                }
                if constexpr (!kBf16 && !kAResident) {
                  pk::tma_load_3d(base + sfa_off + s * L::kSfaBytes, tmap_sfa, bars + 8 * s, (int32_t)(m_blk * BM),
                                  (int32_t)kb, sfa_g);
                }
                pk::tma_load_2d(smem_b + s * L::kBBytes, tmap_b, bars + 8 * s, (int32_t)(kb * kBlockK / (kBf16 ? 2 : 1)),
                                b_row);
              }
            }
            __syncwarp();
            if (++s == p.stages) {
              s = 0;
              phase ^= 1;
            }
          }
          pass.advance(p, m_blk);
        }
      }
    }
    // No CTA of a cluster exits while its peer may still arrive on its barriers; the peer's
    // multicasts into it have landed once its own consumers passed their last full barrier.
    if constexpr (kMulticast) pk::cluster_sync();
    return;
  }

  // ------------------------------------------------------------------ math
  pk::setmaxnreg_inc<kMathRegs>();
  // One math warpgroup, normal layout (the strided schedule): a CTA that has a unit (t =
  // blockIdx.x / kCluster below the unit count) receives its first K block in stage 0, phase 0.
  // Waiting for it before the math warps' own schedule arithmetic runs that arithmetic during
  // the first load, not on the issue slots the producer needs for its first unit (each math
  // warp shares a sub-partition with a producer warp). The K loop's wait for that phase then
  // returns at once. Not with two math warpgroups: there the first wgmma would wait for eight
  // warps' arithmetic after the load (model v0.2, H800: 128x7168x16384 slower).
  if (L::kMathWG == 1 && !kAResident && p.kind == kNormal &&
      blockIdx.x / kCluster < cdiv(cdiv(p.m, BM), kCluster) * cdiv(p.n, BN) * p.splits)
    pk::mbar_wait(bars, 0);
  const uint32_t tid = threadIdx.x % 128;
  const uint32_t warp = tid / 32, lane = tid % 32;
  const uint32_t frag_row = 16 * warp + lane / 4;     // first of this thread's two rows (+8)
  const uint32_t nb_total = cdiv(p.n, 128);

  float acc[kChunkAcc];
  float acc2[kDoubleAcc ? kChunkAcc : 1];  // the second accumulator set (odd K blocks)
  float fin[kWaves][kAcc];  // the promoted result of each 64-row wave
#pragma unroll
  for (uint32_t i = 0; i < kChunkAcc; ++i) acc[i] = 0.0f;

  // Stage 0's descriptors and this thread's first A-scale row, once (per stage: plus an offset).
  const uint64_t desc_a0 = pk::make_desc_k128b(smem_a), desc_b0 = pk::make_desc_k128b(smem_b);
  const float* const sfa_rows = reinterpret_cast<const float*>(smem + sfa_off) + 64 * kWaves * wg + frag_row;

  Scheduler<BM, BN, kCluster, true, kAResident> sched(p);
  uint32_t s = 0, phase = 0;
  uint32_t a_blk = ~0u, a_phase = 0;  // kAResident: the resident m-block, A's barrier phase
  uint32_t m_unit, n_blk, g, m_limit;
  for (uint32_t t = blockIdx.x / kCluster; sched.get(t, m_unit, n_blk, g, m_limit); t += gridDim.x / kCluster) {
    const uint32_t m_blk = m_unit * kCluster + rank;
    Passes<BM, kCluster, true> pass(p, m_blk, g, m_limit);
    if constexpr (kAResident) {
      if (m_blk != a_blk) {  // the old m-block's wgmma retired (the last unit's wait_group 0): release it
        if (a_blk != ~0u && lane == 0) pk::mbar_arrive(a_empty_bar);
        pk::mbar_wait(a_full_bar, a_phase);
        a_blk = m_blk;
        a_phase ^= 1;
      }
    }
    while (pass.group >= 0) {
      if constexpr (kMulticast) {
        if (!pass.mine) {
          // The peer's pass: this CTA's m-block has no rows of the group. Wait for each
          // stage (the peer's B slice lands here too) and release it in both CTAs.
          for (uint32_t kb = 0; kb < sched.kb_count; ++kb) {
            pk::mbar_wait(bars + 8 * s, phase);
            if (lane < kCluster) pk::mbar_arrive_cluster_shared(pk::mapa_shared(empty_bars + 8 * s, lane));
            if (++s == p.stages) {
              s = 0;
              phase ^= 1;
            }
          }
          pass.advance(p, m_blk);
          continue;
        }
      }
      const uint32_t gb = (uint32_t)pass.group;            // group of B / sfb / out rows
      const uint32_t wg_row = 64 * kWaves * wg;           // first row of this warpgroup in the tile
      const uint32_t n_base = n_blk * BN;
      const uint32_t nb0 = n_base / 128;
      const float* sfb0 = p.sfb + ((uint64_t)gb * nb_total + nb0) * p.num_kb + sched.kb_first;
      const float* sfb1 = sfb0 + (nb0 + 1 < nb_total ? p.num_kb : 0u);
      const uint32_t num_kb = sched.kb_count;  // this unit's K blocks (split-K: a range of K)
      // f32 out (kF32Acc, kSplitK): the index in out of this thread's first element of wave 0
      // (row frag_row), computed and pinned here: its 64-bit arithmetic is not left for the
      // unit's tail, after the last K block.
      [[maybe_unused]] uint64_t f32_first = 0;
      if constexpr (kF32Acc || kSplitK) {
        const uint32_t row = (p.kind == kMasked ? g * p.m : 0u) + (kSplitK ? sched.split * p.m : 0u) + m_blk * BM +
                             wg_row + frag_row;
        f32_first = (uint64_t)row * p.n + n_base + 2 * (lane % 4);
        asm volatile("" : "+l"(f32_first));
      }
#pragma unroll
      for (uint32_t w = 0; w < kWaves; ++w) {
#pragma unroll
        for (uint32_t i = 0; i < kAcc; ++i) fin[w][i] = 0.0f;
      }

      // The K loop, compiled once per count of the tile's leading 8-column groups that lie
      // in sfb block nb0 (kFirst; the rest lie in nb0 + 1), so that the promotion takes
      // each group's B scale at compile time, with no per-group select.
      auto k_loop = [&](auto first_groups) {
        [[maybe_unused]] constexpr uint32_t kFirst = decltype(first_groups)::value;
        struct Scales {  // one K block's scales of this thread's rows and columns
          float sa0, sa1;                   // A: rows frag_row, frag_row + 8 (of the current wave)
          float sb0, sb1;                   // B: sfb blocks nb0, nb0 + 1 (128x128 scales)
          float sbc[kRowB ? kAcc / 2 : 1];  // kRowB: columns 8 j + 2 (lane % 4) + {0, 1}
        };
        // B scale loads first: their latency hides behind the wait and the wgmma.
        auto load_sfb = [&](uint32_t kb, Scales& sc) {
          if constexpr (!kRowB) {
            sc.sb0 = __ldg(sfb0 + kb);
            sc.sb1 = kFirst < kAcc / 4 ? __ldg(sfb1 + kb) : sc.sb0;
          }
        };
        [[maybe_unused]] uint32_t chain = 0;  // kBf16: the first step of a K block adds to the accumulator (1) or not (0)
        [[maybe_unused]] uint32_t a_kb = 0;   // kAResident: the K block whose resident A and A scales are read
        // A scales of this thread's two rows in wave w, landed with stage s (rows past the
        // tensor's end read the TMA's zero fill; they are computed but never stored). Read
        // before the stage is released; the ld.shared latency hides behind the wgmma.
        auto read_sfa = [&](Scales& sc, uint32_t w) {
          const float* sfa_s = sfa_rows + (kAResident ? a_kb : s) * (L::kSfaBytes / 4) + 64 * w;
          sc.sa0 = sfa_s[0];
          sc.sa1 = sfa_s[8];
        };
        // Stage s's descriptors (this warpgroup's first A row, the B tile), set by arrive before
        // its wait (pinned there, not sunk past it): the first wgmma follows the barrier closely.
        uint64_t desc_a_s = 0, desc_b_s = 0;
        // Waits for stage s and reads its scales (two waves: the A scales per wave, later).
        auto arrive = [&](Scales& sc) {
          desc_a_s = desc_a0 + ((kAResident ? a_kb : s) * L::kABytes + wg_row * kBlockK) / 16;
          desc_b_s = desc_b0 + s * L::kBBytes / 16;
          asm volatile("" : "+l"(desc_a_s), "+l"(desc_b_s));
          pk::mbar_wait(bars + 8 * s, phase);
          if constexpr (!kBf16 && kWaves == 1) read_sfa(sc, 0);
          if constexpr (kRowB) {  // this thread's columns' B scales, also read before the release
            const float2* sfb_s = reinterpret_cast<const float2*>(smem + sfb_off + s * L::kSfbBytes) + lane % 4;
#pragma unroll
            for (uint32_t j = 0; j < kAcc / 4; ++j) {
              const float2 v = sfb_s[4 * j];
              sc.sbc[2 * j] = v.x;
              sc.sbc[2 * j + 1] = v.y;
            }
          }
        };
        // Issues the four wgmma of stage s's wave w (rows wg_row + 64 w), columns chunk c, into a
        // (one commit group).
        auto mma = [&](float(&a)[kChunkAcc], uint32_t w, uint32_t c = 0) {
#pragma unroll
          for (uint32_t i = 0; i < kChunkAcc; ++i) pk::fence_operand(a[i]);
          pk::wgmma_fence();
          // The descriptor's start-address field is linear in the address (shared memory < 256 KB):
          // the wave's and chunk's offsets added to the stage's descriptors.
          const uint64_t desc_a = desc_a_s + 64 * w * kBlockK / 16;
          const uint64_t desc_b = desc_b_s + c * kChunkN * kBlockK / 16;
#pragma unroll
          for (uint32_t kk = 0; kk < kBlockK / 32; ++kk) {
            // +32 bytes of K per step = +2 in the descriptor's start-address field
            if constexpr (kBf16) {  // chained across K blocks: only the tile's first step starts from zero
              pk::WgmmaBF16<kChunkN>::mma(a, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0 ? 1u : chain);
            } else {
              pk::WgmmaE4M3<kChunkN>::mma(a, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0 ? 1u : 0u);
            }
          }
          pk::wgmma_commit();
        };
        auto next_stage = [&]() {
          if (++s == p.stages) {
            s = 0;
            phase ^= 1;
          }
        };
        // Waits for stage s, reads its scales, issues its four wgmma into a (one commit group).
        auto issue = [&](float(&a)[kChunkAcc], Scales& sc) {
          arrive(sc);
          mma(a, 0);
          next_stage();
        };
        // Stage `stage` consumed by this warp (a wait_group retired its wgmma reads).
        // Multicast: lane r releases it in CTA r of the cluster.
        auto release = [&](uint32_t stage) {
          if constexpr (kMulticast) {
            if (lane < kCluster) pk::mbar_arrive_cluster_shared(pk::mapa_shared(empty_bars + 8 * stage, lane));
          } else if (lane == 0) {
            pk::mbar_arrive(empty_bars + 8 * stage);
          }
        };
        // fin[w] += the scaled accumulator a of wave w, columns chunk c (8-column groups
        // j = c kChunkAcc / 4 + i of the tile).
        auto promote = [&](float(&a)[kChunkAcc], const Scales& sc, uint32_t w = 0, uint32_t c = 0) {
#pragma unroll
          for (uint32_t i = 0; i < kChunkAcc; ++i) pk::fence_operand(a[i]);  // after the wait_group
          float(&f)[kAcc] = fin[w];
          if constexpr (kRowB) {  // fin += (sfa[row] * sfb[column]) * acc
#pragma unroll
            for (uint32_t i = 0; i < kChunkAcc / 4; ++i) {
              const uint32_t j = c * kChunkAcc / 4 + i;
              f[4 * j + 0] = fmaf(sc.sa0 * sc.sbc[2 * j], a[4 * i + 0], f[4 * j + 0]);
              f[4 * j + 1] = fmaf(sc.sa0 * sc.sbc[2 * j + 1], a[4 * i + 1], f[4 * j + 1]);
              f[4 * j + 2] = fmaf(sc.sa1 * sc.sbc[2 * j], a[4 * i + 2], f[4 * j + 2]);
              f[4 * j + 3] = fmaf(sc.sa1 * sc.sbc[2 * j + 1], a[4 * i + 3], f[4 * j + 3]);
            }
          } else {  // fin += sfa[row] * sfb[block of column] * acc
            const float c00 = sc.sa0 * sc.sb0, c10 = sc.sa1 * sc.sb0;  // rows (r, r+8) x first block
            const float c01 = sc.sa0 * sc.sb1, c11 = sc.sa1 * sc.sb1;  // rows (r, r+8) x second block
#pragma unroll
            for (uint32_t i = 0; i < kChunkAcc / 4; ++i) {
              const uint32_t j = c * kChunkAcc / 4 + i;
              const float r0 = j < kFirst ? c00 : c01;  // j: unrolled, kFirst: compile time
              const float r1 = j < kFirst ? c10 : c11;
              f[4 * j + 0] = fmaf(r0, a[4 * i + 0], f[4 * j + 0]);
              f[4 * j + 1] = fmaf(r0, a[4 * i + 1], f[4 * j + 1]);
              f[4 * j + 2] = fmaf(r1, a[4 * i + 2], f[4 * j + 2]);
              f[4 * j + 3] = fmaf(r1, a[4 * i + 3], f[4 * j + 3]);
            }
          }
        };
        uint32_t held = s;  // two sets: the oldest stage this warpgroup has not released
        auto release_held = [&]() {
          release(held);
          if (++held == p.stages) held = 0;
        };
        if constexpr (kBf16) {
          // No scales: the wgmma chain into acc across the K blocks; K block kb's group stays
          // in flight while kb + 1 is issued (wait_group 1), then kb's stage is released.
          uint32_t prev = s;
          for (uint32_t kb = 0; kb < num_kb; ++kb) {
            Scales sc;
            const uint32_t stage = s;
            chain = kb > 0 ? 1u : 0u;
            issue(acc, sc);
            if (kb > 0) {
              pk::wgmma_wait<1>();
              release(prev);
            }
            prev = stage;
          }
          pk::wgmma_wait<0>();
          release(prev);
#pragma unroll
          for (uint32_t i = 0; i < kAcc; ++i) {
            pk::fence_operand(acc[i]);  // after the wait_group
            fin[0][i] = acc[i];
          }
        } else if constexpr (kWaves > 1) {
          // Two 64-row waves per warpgroup (BM 256) through one accumulator set: per K block
          // wave 0's wgmma, wait, promote into fin[0], then wave 1's into fin[1] (BN > 128: each
          // wave as two column chunks); the stage is released once the last wgmma has read it. The other math warpgroup's wgmma keeps
          // the tensor core busy during each promotion.
          for (uint32_t kb = 0; kb < num_kb; ++kb) {
            Scales sc;
            load_sfb(kb, sc);
            const uint32_t stage = s;
            arrive(sc);
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
#pragma unroll
              for (uint32_t c = 0; c < kNChunks; ++c) {
                mma(acc, w, c);
                if (c == 0) read_sfa(sc, w);
                pk::wgmma_wait<0>();
                if (w + 1 == kWaves && c + 1 == kNChunks) release(stage);
                promote(acc, sc, w, c);
              }
            }
            next_stage();
          }
        } else if constexpr (!kDoubleAcc) {
          // One accumulator set: wgmma of K block kb, wait, promote (the tensor core idles
          // during the promotion unless the other math warpgroup has wgmma in flight).
          for (uint32_t kb = 0; kb < num_kb; ++kb) {
            Scales sc;
            load_sfb(kb, sc);
            const uint32_t stage = s;
            a_kb = kb;
            issue(acc, sc);
            pk::wgmma_wait<0>();
            release(stage);
            promote(acc, sc);
          }
        } else {
          // Two accumulator sets (one math warpgroup): acc takes the even K blocks, acc2 the
          // odd ones. K block kb + 1 is issued before kb is promoted, so the promotion runs
          // while the tensor core works on the next block (wait_group 1: kb's group only).
          // At the loop's head K block kb is in flight in acc on every path, and both tails
          // end with wait_group 0 (ptxas serialises the wgmma if a path may read an
          // accumulator still in flight).
          Scales sc0, sc1;
          load_sfb(0, sc0);
          issue(acc, sc0);
          uint32_t kb = 0;
          for (; kb + 2 < num_kb; kb += 2) {
            load_sfb(kb + 1, sc1);
            issue(acc2, sc1);
            pk::wgmma_wait<1>();
            release_held();
            promote(acc, sc0);
            load_sfb(kb + 2, sc0);
            issue(acc, sc0);
            pk::wgmma_wait<1>();
            release_held();
            promote(acc2, sc1);
          }
          if (kb + 1 < num_kb) {
            load_sfb(kb + 1, sc1);
            issue(acc2, sc1);
            pk::wgmma_wait<1>();
            release_held();
            promote(acc, sc0);
            pk::wgmma_wait<0>();
            release_held();
            promote(acc2, sc1);
          } else {
            pk::wgmma_wait<0>();
            release_held();
            promote(acc, sc0);
          }
        }
      };
      if constexpr (kUniformB || kRowB || kBf16) {
        k_loop(Const<kAcc / 4>());
      } else {
        // The tile starts at a multiple of BN, so (nb0 + 1) * 128 - n_base, the columns in
        // block nb0, is a multiple of gcd(BN, 128) (a whole number of 8-column groups: no
        // group straddles the boundary), at most 128; groups past the tile are clamped.
        constexpr uint32_t kStep = gcd_int(BN, 128) / 8;
        constexpr uint32_t kLast = kAcc / 4 < 16 ? kAcc / 4 : 16;
        static_assert(kLast % kStep == 0, "the candidate counts end at kLast");
        const uint32_t first = min(((nb0 + 1) * 128 - n_base) / 8, kLast);
        with_const<kStep, kLast>(first, k_loop);
      }

      // The result of wave w (f, its first row m_base) to out. Each wave has its own staging
      // tile, so a wave's stores need not wait for the previous wave's to leave shared memory.
      auto epilogue = [&](const float(&f)[kAcc], uint32_t m_base, uint32_t w) {
        uint8_t* const staging = smem + staging_off + (wg * kWaves + w) * L::kStagingBytes;
        const uint32_t staging_addr = base + staging_off + (wg * kWaves + w) * L::kStagingBytes;
        if constexpr (kFp8Out) {
          // e4m3 out: this thread holds columns 8 j + 2 (lane % 4) + {0, 1} of rows frag_row
          // (h = 0) and frag_row + 8 (h = 1); the 4 lanes of a quad hold a whole 128-column
          // row, so the row's amax is a quad reduction (max.NaN: a NaN makes the group NaN).
          const uint32_t col0 = n_base + 2 * (lane % 4);
#pragma unroll
          for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t row = m_base + frag_row + 8 * h;
            float amax = 0.0f;
#pragma unroll
            for (uint32_t j = 0; j < kAcc / 4; ++j) {
              if (col0 + 8 * j < p.n) {  // N is a multiple of 8: both columns of the pair or neither
                amax = max_nan(amax, fabsf(f[4 * j + 2 * h]));
                amax = max_nan(amax, fabsf(f[4 * j + 2 * h + 1]));
              }
            }
            amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            amax = max_nan(amax, 1e-4f);  // the floor: an all-zero group gets a finite scale
            const float inv = __fdiv_rn(448.0f, amax);
            if (row < m_limit) {
              uint8_t* dst = p.out + (uint64_t)row * p.n + col0;
#pragma unroll
              for (uint32_t j = 0; j < kAcc / 4; ++j) {
                if (col0 + 8 * j < p.n)
                  *reinterpret_cast<uint16_t*>(dst + 8 * j) =
                      e4m3x2_satfinite(f[4 * j + 2 * h] * inv, f[4 * j + 2 * h + 1] * inv);
              }
              if (lane % 4 == 0) {  // a NaN scale is written as the canonical NaN, whatever div.rn's payload
                const float sf = __fdiv_rn(amax, 448.0f);
                sfd[(uint64_t)row * cdiv(p.n, 128) + n_blk] = sf != sf ? __int_as_float(0x7fffffff) : sf;
              }
            }
          }
          return;
        }
        if constexpr (kF32Acc || kSplitK) {
          // float32 out += fin: each thread its own fragment elements (rows frag_row and
          // frag_row + 8, column pairs 8 j + 2 (lane % 4)), 8-byte read-add-write; no other
          // thread touches them, so no staging and no barrier. Owned rows as below.
          // kSplitK: fin is stored (no read) to the workspace's slice of this K range.
          const uint32_t col0 = n_base + 2 * (lane % 4);
          // kSplitK (normal layout: no grouping): the stores end every unit, so each one's
          // predicate is one compare of its constant column offset with the row's bound
          // (independent of the others): they issue back to back.
          const int cols = (int)p.n - (int)col0;  // this thread's columns left in a row (N < 2^31)
          int limit[2];
          float* dst[2];
          float2 v[2][kAcc / 4];  // every value of both rows first, then the stores
#pragma unroll
          for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t r = frag_row + 8 * h;
            bool ok = m_base + r < m_limit;
            if (!kSplitK && ok && p.kind == kContiguous) ok = __ldg(p.grouping + m_base + r) == pass.group;
            limit[h] = ok ? cols : 0;
            dst[h] = reinterpret_cast<float*>(p.out) + f32_first + (uint64_t)(m_base - m_blk * BM - wg_row + 8 * h) * p.n;
#pragma unroll
            for (uint32_t j = 0; j < kAcc / 4; ++j) {
              v[h][j] = make_float2(0.0f, 0.0f);
              if (!kSplitK && (int)(8 * j) < limit[h]) v[h][j] = *reinterpret_cast<const float2*>(dst[h] + 8 * j);
              v[h][j].x += f[4 * j + 2 * h];
              v[h][j].y += f[4 * j + 2 * h + 1];
              pk::fence_operand(v[h][j].x);  // computed here, not sunk into the stores' branches
              pk::fence_operand(v[h][j].y);
            }
          }
#pragma unroll
          for (uint32_t h = 0; h < 2; ++h) {
#pragma unroll
            for (uint32_t j = 0; j < kAcc / 4; ++j) {
              if ((int)(8 * j) < limit[h]) *reinterpret_cast<float2*>(dst[h] + 8 * j) = v[h][j];
            }
          }
          return;
        }

        // bf16 out. The wave's 64 rows go to the warpgroup's staging tile; when it owns all of
        // them (rows past the tensor's end count as owned: TMA clips them), one thread
        // stores the tile with BN/16 TMA stores; otherwise (padding rows, masked tails)
        // each warp stores the owned rows among its own 16 with checked 16-byte st.global.
        bool use_tma;
        if (p.kind == kNormal) {
          use_tma = true;
        } else if (p.kind == kMasked) {
          use_tma = m_base + 64 <= m_limit;
        } else {  // every warp checks all 64 rows: the same answer in the whole warpgroup
          bool own = true;
          int gs[2];
#pragma unroll
          for (uint32_t i = 0; i < 2; ++i) {  // both loads first: their latencies overlap
            const uint32_t row = m_base + 32 * i + lane;
            gs[i] = row < p.m ? __ldg(p.grouping + row) : pass.group;  // rows past the end count as owned
          }
#pragma unroll
          for (uint32_t i = 0; i < 2; ++i) own = own && gs[i] == pass.group;
          use_tma = __all_sync(0xffffffffu, own);
        }
        // Earlier TMA stores from this staging tile have read it (one bulk group per wave and
        // tile, in wave order: the kWaves - 1 newest groups are the other waves' tiles) ...
        if (tid == 0) pk::tma_store_wait_read<kWaves - 1>();
        pk::named_barrier_sync(1 + wg, 128);          // ... and every warp is done with it
#pragma unroll
        for (uint32_t j = 0; j < kAcc / 4; ++j) {
          const uint32_t byte = 4 * (lane % 4);
          *reinterpret_cast<uint32_t*>(staging + L::chunk_offset(frag_row, j) + byte) =
              pk::pack_bf16x2(f[4 * j + 0], f[4 * j + 1]);
          *reinterpret_cast<uint32_t*>(staging + L::chunk_offset(frag_row + 8, j) + byte) =
              pk::pack_bf16x2(f[4 * j + 2], f[4 * j + 3]);
        }
        const uint32_t out_row = (p.kind == kMasked ? g * p.m : 0u) + m_base;  // row in out (flattened)
        if (use_tma) {
          pk::fence_proxy_async_shared();               // st.shared -> visible to the TMA (async proxy)
          pk::named_barrier_sync(1 + wg, 128);
          if (tid == 0) {
#pragma unroll
            for (uint32_t c = 0; c < BN / L::kBoxCols; ++c) {
              if (n_base + c * L::kBoxCols < p.n)
                pk::tma_store_2d(tmap_out, staging_addr + c * L::kBoxBytes, (int32_t)(n_base + c * L::kBoxCols),
                                 (int32_t)out_row);
            }
            pk::tma_store_commit();
          }
        } else {
          if (kWaves > 1 && tid == 0) pk::tma_store_commit();  // an empty group keeps one per wave
          __syncwarp();
          // Lanes split into rows of kLanesPerRow lanes, one 16-byte chunk each.
          const uint32_t chunk = lane % L::kLanesPerRow;
          const uint32_t col = n_base + 8 * chunk;
          const bool col_ok = chunk < L::kChunks && col < p.n;
          const uint32_t r_first = 16 * warp + lane / L::kLanesPerRow;  // row in the warpgroup's 64
          uint8_t* dst = p.out + ((uint64_t)(out_row + r_first) * p.n + col) * 2;
#pragma unroll(kWaves > 1 ? 1 : 16)
          for (uint32_t it = 0; it < 16 / L::kRowsPerIter; ++it) {
            const uint32_t r = r_first + it * L::kRowsPerIter;
            const uint32_t row = m_base + r;
            bool ok = col_ok && row < m_limit;
            if (ok && p.kind == kContiguous) ok = __ldg(p.grouping + row) == pass.group;
            if (ok) {
              *reinterpret_cast<uint4*>(dst + (uint64_t)it * L::kRowsPerIter * p.n * 2) =
                  *reinterpret_cast<const uint4*>(staging + L::chunk_offset(r, chunk));
            }
          }
        }
      };
#pragma unroll
      for (uint32_t w = 0; w < kWaves; ++w) epilogue(fin[w], m_blk * BM + wg_row + 64 * w, w);
      pass.advance(p, m_blk);
    }
  }
  if (tid == 0) pk::tma_store_wait_read<0>();  // shared memory must outlive the last stores' reads
  // PDL: every store of this thread is issued; the next PDL kernel (split-K reduction, next
  // GEMM) may start its CTAs: its griddep_wait still waits for this grid's completion.
  pk::griddep_launch_dependents();
  if constexpr (kMulticast) pk::cluster_sync();  // see the producer's end
}

}  // namespace

// Entry points: pk_fp8_gemm_nt_m<BM>n<BN> (kCluster 1) and pk_fp8_gemm_nt_m<BM>n<BN>_mc2
// (kCluster 2: TMA multicast of B across a cluster of 2, launched with cluster dims
// (2, 1, 1) and an even grid), launched with Layout::kThreads threads (256 or 384).
// Host side: pykernels/cuda/gemm.py. Every entry declares the 384-thread launch bound so
// that ptxas starts it at 168 registers: the CTA's register pool then holds the
// producer's 40 and the math warpgroups' 232 after setmaxnreg, which always raises (never
// merely keeps) a math warp's count.
constexpr uint32_t kLaunchBound = 384;
#define PK_FP8_GEMM_ENTRY_NAMED(NAME, BM, BN, CLUSTER, F32ACC, ROWB, FP8OUT, SPLITK, ARES)           \
  static_assert(Layout<BM, BN>::kThreads <= kLaunchBound, "launch bound");                          \
  extern "C" __global__ void __launch_bounds__(kLaunchBound, 1) NAME(                                \
      const __grid_constant__ pk::TensorMap tmap_a, const __grid_constant__ pk::TensorMap tmap_b,      \
      const __grid_constant__ pk::TensorMap tmap_sfa, const __grid_constant__ pk::TensorMap tmap_out,  \
      const float* sfb, uint8_t* out, const int* grouping, uint32_t m, uint32_t n, uint32_t k,         \
      uint32_t groups, uint32_t kind, uint32_t stages, uint32_t band, int* record,                     \
      const __grid_constant__ pk::TensorMap tmap_sfb, float* sfd, uint32_t splits) {                   \
    const uint32_t num_kb = cdiv(k, kBlockK), split_k = SPLITK ? splits : 1u;                          \
    const Problem p{sfb, out, grouping, m, n, num_kb, groups, kind, stages, band, record,               \
                    split_k, cdiv(num_kb, split_k)};                                                   \
    fp8_gemm_kernel<BM, BN, CLUSTER, F32ACC, ROWB, FP8OUT, SPLITK, false, ARES>(                         \
        &tmap_a, &tmap_b, &tmap_sfa, &tmap_out, &tmap_sfb, sfd, p);                                      \
  }
#define PK_FP8_GEMM_ENTRY(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN, BM, BN, 1, false, false, false, false, false)
#define PK_FP8_GEMM_ENTRY_MC2(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_mc2, BM, BN, 2, false, false, false, false, false)
// float32 out accumulated in place (kF32Acc), with 128x128 B scales or (_rowb) 1x128 ones
#define PK_FP8_GEMM_ENTRY_F32ACC(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_f32acc, BM, BN, 1, true, false, false, false, false)
#define PK_FP8_GEMM_ENTRY_F32ACC_ROWB(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_f32acc_rowb, BM, BN, 1, true, true, false, false, false)
// split-K (kSplitK): float32 partials of K-block ranges into a workspace (normal layout)
#define PK_FP8_GEMM_ENTRY_SPLITK(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_splitk, BM, BN, 1, false, false, false, true, false)
// e4m3 out with 1x128 scales computed on store (kFp8Out; BN = 128)
#define PK_FP8_GEMM_ENTRY_E4M3(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_e4m3, BM, BN, 1, false, false, true, false, false)
// resident A (kAResident): a CTA's run of units shares each m-block's A, loaded once (normal layout)
#define PK_FP8_GEMM_ENTRY_ARES(BM, BN) \
  PK_FP8_GEMM_ENTRY_NAMED(pk_fp8_gemm_nt_m##BM##n##BN##_ares, BM, BN, 1, false, false, false, false, true)

// bf16 A and B, no scales (kBf16; bf16_gemm_nt): K blocks of 64 bf16, bf16 or (_f32acc) float32 out.
// The FP8 parameter list (tmap_sfa, sfb, grouping, sfd, splits are not read; kind is normal).
#define PK_BF16_GEMM_ENTRY_NAMED(NAME, BM, BN, F32ACC)                                                 \
  static_assert(Layout<BM, BN>::kThreads <= kLaunchBound, "launch bound");                          \
  extern "C" __global__ void __launch_bounds__(kLaunchBound, 1) NAME(                                \
      const __grid_constant__ pk::TensorMap tmap_a, const __grid_constant__ pk::TensorMap tmap_b,      \
      const __grid_constant__ pk::TensorMap tmap_sfa, const __grid_constant__ pk::TensorMap tmap_out,  \
      const float* sfb, uint8_t* out, const int* grouping, uint32_t m, uint32_t n, uint32_t k,         \
      uint32_t groups, uint32_t kind, uint32_t stages, uint32_t band, int* record,                     \
      const __grid_constant__ pk::TensorMap tmap_sfb, float* sfd, uint32_t splits) {                   \
    const Problem p{sfb, out, grouping, m, n, cdiv(k, kBlockK / 2), groups, kind, stages, band, record, 1u, \
                    cdiv(k, kBlockK / 2)};                                                             \
    fp8_gemm_kernel<BM, BN, 1, F32ACC, false, false, false, true>(&tmap_a, &tmap_b, &tmap_sfa, &tmap_out, \
                                                                  &tmap_sfb, sfd, p);                  \
  }
#define PK_BF16_GEMM_ENTRY(BM, BN) PK_BF16_GEMM_ENTRY_NAMED(pk_bf16_gemm_nt_m##BM##n##BN, BM, BN, false)
#define PK_BF16_GEMM_ENTRY_F32ACC(BM, BN) \
  PK_BF16_GEMM_ENTRY_NAMED(pk_bf16_gemm_nt_m##BM##n##BN##_f32acc, BM, BN, true)

PK_FP8_GEMM_ENTRY(256, 128)
PK_FP8_GEMM_ENTRY(256, 144)
PK_FP8_GEMM_ENTRY(256, 112)
PK_FP8_GEMM_ENTRY(128, 128)
PK_FP8_GEMM_ENTRY(128, 112)
PK_FP8_GEMM_ENTRY(128, 160)
PK_FP8_GEMM_ENTRY(128, 144)
PK_FP8_GEMM_ENTRY_ARES(128, 144)
PK_FP8_GEMM_ENTRY_ARES(128, 160)
PK_FP8_GEMM_ENTRY(64, 128)
PK_FP8_GEMM_ENTRY(64, 64)
PK_FP8_GEMM_ENTRY(64, 32)
PK_FP8_GEMM_ENTRY_MC2(128, 128)
PK_FP8_GEMM_ENTRY_MC2(128, 160)
PK_FP8_GEMM_ENTRY_F32ACC(256, 128)
PK_FP8_GEMM_ENTRY_F32ACC(128, 128)
PK_FP8_GEMM_ENTRY_F32ACC(64, 128)
PK_FP8_GEMM_ENTRY_F32ACC(64, 64)
PK_FP8_GEMM_ENTRY_F32ACC_ROWB(128, 128)
PK_FP8_GEMM_ENTRY_F32ACC_ROWB(64, 64)
PK_FP8_GEMM_ENTRY_E4M3(256, 128)
PK_FP8_GEMM_ENTRY_E4M3(128, 128)
PK_FP8_GEMM_ENTRY_E4M3(64, 128)
PK_FP8_GEMM_ENTRY_SPLITK(128, 128)
PK_FP8_GEMM_ENTRY_SPLITK(64, 128)
PK_FP8_GEMM_ENTRY_SPLITK(64, 64)
PK_FP8_GEMM_ENTRY_SPLITK(64, 32)
PK_BF16_GEMM_ENTRY(128, 128)
PK_BF16_GEMM_ENTRY(64, 64)
PK_BF16_GEMM_ENTRY_F32ACC(128, 128)
PK_BF16_GEMM_ENTRY_F32ACC(64, 64)
