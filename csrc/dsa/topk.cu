// DSA top-k selection over the indexer logits (docs/dsa.md "Top-k") for sm_90a; host side
// pykernels/cuda/dsa.py. Both forms: prefill (row r's window [ks[r], ke[r]), out [M, topk]
// key positions) and paged decode (row r = i * next_n + j, window [0, end), out [b, next_n,
// topk] cache rows block_table[i, p / 64] * 64 + p % 64). Per row the n = min(topk, window)
// largest logits, largest first, ties to the lower position; -1 in slots n..topk. NaN ranks
// as -inf and -0.0 as +0.0 (the reference's float order).
//
// One CTA of 512 threads per row, in named steps:
//   1. threshold: a radix select over order-preserving 32-bit keys, 8 bits per pass from the
//      top: each pass histograms the window's keys that share the prefix found so far and
//      picks the bin holding the n-th largest; after 4 passes the prefix is T, the n-th
//      largest key, and `ties` says how many keys equal to T the row takes;
//   2. compaction: one pass in position order; every key > T goes to a shared slot (any
//      order), and keys == T take the `ties` lowest positions (a block-wide scan ranks them);
//   3. order: the n taken entries, each the 63-bit composite key << 31 | (2^31 - 1 - pos),
//      sorted descending by a bitonic sort in shared memory (padding: 0, below every entry);
//   4. write: positions (mapped to cache rows in the paged form), then -1.
// Before step 1 the row's window is checked (prefill: 0 <= ks <= ke <= width; paged: the length
// in [0, lens_limit] and the pages it uses in [0, num_pages)); a bad value goes to the device
// error record (pk/error_record.cuh) and the row is written as empty (all -1).
#include <cstdint>

#include "pk/error_record.cuh"

namespace {

constexpr uint32_t kThreads = 512;
constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t kRadixBits = 8;
constexpr uint32_t kBins = 1u << kRadixBits;
constexpr uint32_t kPasses = 32 / kRadixBits;
constexpr uint32_t kBinsPerLane = kBins / 32;
constexpr uint32_t kPage = 64;                          // tokens per page of the paged form
constexpr uint64_t kPosMask = 0x7FFFFFFFull;            // the position field of a composite

struct Params {
  const float* logits;
  int* out;
  const int* ks;            // prefill: window starts (nullptr in the paged form)
  const int* ke;            // prefill: window ends
  const int* context_lens;  // paged: [b] or [b, next_n]
  const int* block_table;   // paged: [b, bt_stride]
  uint64_t logits_stride, out_stride0, out_stride1;
  uint32_t topk, sort_size; // sort_size: a power of two >= topk (shared memory entries)
  uint32_t next_n, lens_per_row, bt_stride;
  int* err;                 // the device error record
  uint32_t width;           // logits columns (prefill windows inside [0, width])
  uint32_t lens_limit;      // paged: context_lens at most min(width, block table pages x 64)
  uint32_t num_pages;       // paged: page ids below it (page * 64 + offset fits int32)
};

struct Shared {
  uint32_t hist[kBins];
  uint32_t warp_sums[kWarps];
  uint32_t prefix, remaining, num_gt, ties_seen;
};

// float -> key in [0, 2^32), ordered as the floats (NaN as -inf, -0.0 as +0.0).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = -__builtin_huge_valf();
  if (x == 0.f) x = 0.f;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t composite(uint32_t key, uint32_t pos) {
  return (uint64_t)key << 31 | (kPosMask - pos);
}

// Exclusive block-wide prefix sum of one value per thread; *total gets the sum.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, Shared& sh, uint32_t* total) {
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t incl = v;
#pragma unroll
  for (uint32_t d = 1; d < 32; d *= 2) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += up;
  }
  if (lane == 31) sh.warp_sums[warp] = incl;
  __syncthreads();
  uint32_t before = 0, sum = 0;
  for (uint32_t w = 0; w < kWarps; ++w) {
    const uint32_t s = sh.warp_sums[w];
    before += w < warp ? s : 0;
    sum += s;
  }
  __syncthreads();          // warp_sums is reused by the next scan
  *total = sum;
  return before + incl - v;
}

// 1. threshold: the n-th largest key of the window (radix select, most significant bits first).
__device__ __forceinline__ void find_threshold(const float* row, uint32_t lo, uint32_t hi, uint32_t n, Shared& sh) {
  const uint32_t tid = threadIdx.x, lane = tid % 32;
  if (tid == 0) {
    sh.prefix = 0;
    sh.remaining = n;
  }
  for (uint32_t pass = 0; pass < kPasses; ++pass) {
    const uint32_t shift = 32 - kRadixBits * (pass + 1);
    const uint32_t mask = pass == 0 ? 0u : ~0u << (shift + kRadixBits);
    for (uint32_t b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (uint32_t pos = lo + tid; pos < hi; pos += kThreads) {
      const uint32_t key = order_key(row[pos]);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // lane l owns bins 255 - 8l .. 248 - 8l (descending); a scan over the lanes finds the
      // lane whose bins hold the remaining-th largest, then that lane walks its bins
      uint32_t own = 0;
#pragma unroll
      for (uint32_t t = 0; t < kBinsPerLane; ++t) own += sh.hist[kBins - 1 - kBinsPerLane * lane - t];
      uint32_t incl = own;
#pragma unroll
      for (uint32_t d = 1; d < 32; d *= 2) {
        const uint32_t up = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += up;
      }
      const uint32_t remaining = sh.remaining;
      const uint32_t hit = __ballot_sync(0xffffffffu, incl >= remaining);
      if (lane == (uint32_t)(__ffs(hit) - 1)) {
        uint32_t above = incl - own;
        for (uint32_t t = 0; t < kBinsPerLane; ++t) {
          const uint32_t bin = kBins - 1 - kBinsPerLane * lane - t, count = sh.hist[bin];
          if (above + count >= remaining) {
            sh.prefix = prefix | bin << shift;
            sh.remaining = remaining - above;
            break;
          }
          above += count;
        }
      }
    }
    __syncthreads();
  }
}

// 2. compaction: keys > T anywhere in [0, n - ties), the `ties` lowest positions of keys == T after.
__device__ __forceinline__ void compact(const float* row, uint32_t lo, uint32_t hi, uint32_t n, uint64_t* cand,
                                        Shared& sh) {
  const uint32_t tid = threadIdx.x;
  const uint32_t threshold = sh.prefix, ties = sh.remaining, num_gt = n - ties;
  if (tid == 0) {
    sh.num_gt = 0;
    sh.ties_seen = 0;
  }
  __syncthreads();
  for (uint32_t base = lo; base < hi; base += kThreads) {
    const uint32_t pos = base + tid;
    const uint32_t key = pos < hi ? order_key(row[pos]) : 0u;
    const bool in = pos < hi;
    if (in && key > threshold) cand[atomicAdd(&sh.num_gt, 1u)] = composite(key, pos);
    uint32_t chunk_ties;
    const uint32_t rank = block_exclusive_scan(in && key == threshold ? 1u : 0u, sh, &chunk_ties);
    const uint32_t seen = sh.ties_seen;
    if (in && key == threshold && seen + rank < ties) cand[num_gt + seen + rank] = composite(key, pos);
    __syncthreads();
    if (tid == 0) sh.ties_seen = seen + chunk_ties;
    __syncthreads();
  }
}

// 3. order: bitonic sort of cand[0, size) descending (size a power of two).
__device__ __forceinline__ void sort_descending(uint64_t* cand, uint32_t n, uint32_t size) {
  for (uint32_t i = n + threadIdx.x; i < size; i += kThreads) cand[i] = 0;
  __syncthreads();
  for (uint32_t k = 2; k <= size; k *= 2) {
    for (uint32_t j = k / 2; j > 0; j /= 2) {
      for (uint32_t i = threadIdx.x; i < size; i += kThreads) {
        const uint32_t partner = i ^ j;
        if (partner > i) {
          const uint64_t a = cand[i], b = cand[partner];
          const bool descending = (i & k) == 0;
          if (descending ? a < b : a > b) {
            cand[i] = b;
            cand[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ void topk_row(const Params& p, bool paged) {
  extern __shared__ __align__(16) uint8_t smem[];
  Shared& sh = *reinterpret_cast<Shared*>(smem);
  uint64_t* cand = reinterpret_cast<uint64_t*>(smem + ((sizeof(Shared) + 15) / 16) * 16);
  const uint32_t r = blockIdx.x;
  const uint32_t seq = paged ? r / p.next_n : r, j = paged ? r % p.next_n : 0;
  uint32_t lo = 0, hi;
  bool ok = true;
  if (paged) {
    const uint32_t at = p.lens_per_row ? r : seq;
    const int len = p.context_lens[at];
    if (len < 0 || (uint32_t)len > p.lens_limit) {
      if (threadIdx.x == 0) pk::record_error(p.err, pk::kErrContextLensOutOfRange, len, (int)p.lens_limit, (int)at);
      ok = false;
    }
    const int end = p.lens_per_row ? len : len - (int)p.next_n + (int)j + 1;
    hi = ok ? (uint32_t)max(end, 0) : 0u;
  } else {
    const int start = p.ks[r], stop = p.ke[r];
    if (start < 0 || (uint32_t)start > p.width) {
      if (threadIdx.x == 0) pk::record_error(p.err, pk::kErrWindowStartOutOfRange, start, (int)p.width, (int)r);
      ok = false;
    } else if (stop < start || (uint32_t)stop > p.width) {
      if (threadIdx.x == 0) pk::record_error(p.err, pk::kErrWindowEndOutOfRange, stop, (int)p.width, (int)r);
      ok = false;
    }
    lo = ok ? (uint32_t)start : 0u;
    hi = ok ? (uint32_t)stop : 0u;
  }
  const int* table = paged ? p.block_table + (uint64_t)seq * p.bt_stride : nullptr;
  if (paged) {   // the pages the window uses, checked before any position is mapped through them
    if (threadIdx.x == 0) sh.ties_seen = 0;   // the flag of a bad page (compaction resets the word)
    __syncthreads();
    for (uint32_t pg = threadIdx.x; pg < (hi + kPage - 1) / kPage; pg += kThreads) {
      const int id = table[pg];
      if ((uint32_t)id >= p.num_pages) {
        pk::record_error(p.err, pk::kErrBlockTableOutOfRange, id, (int)p.num_pages, (int)seq);
        sh.ties_seen = 1;
      }
    }
    __syncthreads();
    if (sh.ties_seen) hi = 0;
  }
  const uint32_t n = min(p.topk, hi - lo);
  const float* row = p.logits + r * p.logits_stride;
  if (n > 0) {
    find_threshold(row, lo, hi, n, sh);
    compact(row, lo, hi, n, cand, sh);
    sort_descending(cand, n, p.sort_size);
  }
  // 4. write
  int* out = p.out + seq * p.out_stride0 + j * p.out_stride1;
  for (uint32_t s = threadIdx.x; s < p.topk; s += kThreads) {
    int v = -1;
    if (s < n) {
      const uint32_t pos = (uint32_t)(kPosMask - (cand[s] & kPosMask));
      v = paged ? table[pos / kPage] * (int)kPage + (int)(pos % kPage) : (int)pos;
    }
    out[s] = v;
  }
}

}  // namespace

// pykernels/cuda/dsa.py packs the parameters (Params' fields, in order; the other form's
// pointers are null).
#define PK_DSA_TOPK_ENTRY(NAME, PAGED)                                                                     \
  extern "C" __global__ void __launch_bounds__(kThreads) NAME(                                             \
      const float* logits, int* out, const int* ks, const int* ke, const int* context_lens,                 \
      const int* block_table, uint64_t logits_stride, uint64_t out_stride0, uint64_t out_stride1,           \
      uint32_t topk, uint32_t sort_size, uint32_t next_n, uint32_t lens_per_row, uint32_t bt_stride,         \
      int* err, uint32_t width, uint32_t lens_limit, uint32_t num_pages) {                                  \
    topk_row(Params{logits, out, ks, ke, context_lens, block_table, logits_stride, out_stride0, out_stride1, \
                    topk, sort_size, next_n, lens_per_row, bt_stride, err, width, lens_limit, num_pages},    \
             PAGED);                                                                                        \
  }

PK_DSA_TOPK_ENTRY(pk_dsa_topk_prefill, false)
PK_DSA_TOPK_ENTRY(pk_dsa_topk_paged, true)
