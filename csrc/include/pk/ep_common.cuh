// pk/ep_common.cuh — what the expert-parallel kernels (csrc/ep/) share: launch shape, peer
// arguments, testing flags, warp-level acquire / release of counters, the slot payload
// copies and the bf16 weighted sum of the combines. One definition here keeps the kernels
// in step with each other and with pykernels/cuda/ep.py (THREADS, MAX_RANKS, the flags).
// Error codes stay in each kernel file: they are one numbering (ep.py WAIT_CODES) but each
// kernel family owns its own.
#pragma once

#include <cstdint>

#include "pk/ptx.cuh"  // pack_bf16x2
#include "pk/ptx_memory_order.cuh"

namespace pk {
namespace ep {

constexpr uint32_t kThreads = 256;  // block of every EP kernel (ep.py THREADS)
constexpr uint32_t kMaxRanks = 8;   // peers passed as 8 u64 arguments (ep.py MAX_RANKS)
constexpr uint32_t kFull = 0xffffffffu;

// Testing: sender / receiver CTAs return at once (both: a rank that never arrives).
enum : uint32_t { kFlagIdleSenders = 1, kFlagIdleReceivers = 2 };

// Every rank's buffer base (its own included; 0 beyond num_ranks) as scalar kernel
// parameters: an array parameter would be indexed dynamically.
#define PK_EP_PEER_PARAMS                                                                                   \
  uint64_t peer0, uint64_t peer1, uint64_t peer2, uint64_t peer3, uint64_t peer4, uint64_t peer5, uint64_t peer6, \
      uint64_t peer7
#define PK_EP_PEERS peer0, peer1, peer2, peer3, peer4, peer5, peer6, peer7

// Base of rank r's buffer: a select chain (no dynamic indexing, no local memory).
__device__ __forceinline__ uint8_t* select_peer(uint32_t r, uint64_t p0, uint64_t p1, uint64_t p2, uint64_t p3,
                                                uint64_t p4, uint64_t p5, uint64_t p6, uint64_t p7) {
  uint64_t v = p0;
  v = r == 1 ? p1 : v;
  v = r == 2 ? p2 : v;
  v = r == 3 ? p3 : v;
  v = r == 4 ? p4 : v;
  v = r == 5 ? p5 : v;
  v = r == 6 ? p6 : v;
  v = r == 7 ? p7 : v;
  return reinterpret_cast<uint8_t*>(v);
}

// A read-only byte left in its 16-bit register (pk::ld_nc_u8 widens it at once, so a batch
// of them would wait for each load in turn before issuing the next).
__device__ __forceinline__ uint16_t ld_nc_u8_narrow(const void* p) {
  uint16_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];\n" : "=h"(v) : "l"(p));
  return v;
}

// Every lane acquires; lane 0's value is the warp's. __syncwarp orders lane 0's acquire
// before the other lanes' later accesses (CUDA: __syncwarp orders memory among the lanes).
template <typename T>
__device__ __forceinline__ T warp_acquire(const T* p) {
  T v = pk::ld_acquire_sys(p);
  v = __shfl_sync(kFull, v, 0);
  __syncwarp();
  return v;
}

// Every lane's stores before the __syncwarp are covered by lane 0's release (cumulativity).
template <typename T>
__device__ __forceinline__ void warp_release(T* p, T v, uint32_t lane) {
  __syncwarp();
  if (lane == 0) pk::st_release_sys(p, v);
}

// The error record (pk::report_and_trap's layout: valid, rank, channel, code, peer, seen,
// needed, CTA) without the trap, for an error the kernel recovers from: the first report
// claims the record (CAS on word 0), later ones leave it. Call from one thread; the host
// reads it after the kernel (stream order / synchronisation makes the stores visible).
__device__ __forceinline__ void report_error(uint32_t* err, uint32_t rank, uint32_t channel, uint32_t what,
                                             uint32_t peer, uint32_t seen, uint32_t needed) {
  if (pk::atom_cas_sys(err, 0u, 1u) != 0u) return;
  pk::st_relaxed_sys(err + 1, rank);
  pk::st_relaxed_sys(err + 2, channel);
  pk::st_relaxed_sys(err + 3, what);
  pk::st_relaxed_sys(err + 4, peer);
  pk::st_relaxed_sys(err + 5, seen);
  pk::st_relaxed_sys(err + 6, needed);
  pk::st_relaxed_sys(err + 7, static_cast<uint32_t>(blockIdx.x));
}

// Warp copies issue kCopyBatch loads per lane before storing any of them: a warp keeps
// kCopyBatch x 32 requests in flight, so a row costs one read latency per kCopyBatch x 512
// bytes (16-byte chunks), not one per 512 bytes (a load and its dependent store per step).
// Loops have the same trip count in every lane (the tail is predicated): lanes never
// drift apart, which keeps the warp converged (and the emulator's lanes in one step).
constexpr uint32_t kCopyBatch = 8;

// Up to N elements per lane held in registers: element base + 32 u + lane, u < N, of n.
// load(i) / store(i, v) are called only for i < n.
template <uint32_t N, typename T>
struct WarpBatch {
  T v[N];

  template <typename Load>
  __device__ __forceinline__ void load(uint32_t base, uint32_t n, uint32_t lane, Load ld) {
#pragma unroll
    for (uint32_t u = 0; u < N; ++u) {
      const uint32_t i = base + 32 * u + lane;
      if (i < n) v[u] = ld(i);
    }
  }

  template <typename Store>
  __device__ __forceinline__ void store(uint32_t base, uint32_t n, uint32_t lane, Store st) const {
#pragma unroll
    for (uint32_t u = 0; u < N; ++u) {
      const uint32_t i = base + 32 * u + lane;
      if (i < n) st(i, v[u]);
    }
  }
};

// Elements [first, n): batches of N per lane, each loaded whole before it is stored.
template <uint32_t N, typename T, typename Load, typename Store>
__device__ __forceinline__ void warp_copy_batched(uint32_t first, uint32_t n, uint32_t lane, Load ld, Store st) {
  for (uint32_t base = first; base < n; base += 32 * N) {
    WarpBatch<N, T> b;
    b.load(base, n, lane, ld);
    b.store(base, n, lane, st);
  }
}

// Read-only input -> a (peer's) buffer, and buffer -> output, in 16-byte chunks.
__device__ __forceinline__ void warp_copy_to_buffer(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                                    uint32_t lane) {
  warp_copy_batched<kCopyBatch, int4>(
      0, bytes / 16, lane, [&](uint32_t i) { return pk::ld_nc_v4(src + 16 * i); },
      [&](uint32_t i, int4 v) { pk::st_na_v4(dst + 16 * i, v); });
}

__device__ __forceinline__ void warp_copy_from_buffer(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                                      uint32_t lane) {
  warp_copy_batched<kCopyBatch, int4>(
      0, bytes / 16, lane, [&](uint32_t i) { return pk::ld_na_v4(src + 16 * i); },
      [&](uint32_t i, int4 v) { *reinterpret_cast<int4*>(dst + 16 * i) = v; });
}

// Scales of a row: the first kRowScales (two per lane: H up to 8192) are loaded before the
// row's chunks and stored after them, so their latency hides under the row's; more follow.
constexpr uint32_t kRowScaleBatch = 2;

// A dispatched slot starts with the token's row (row_bytes, a multiple of 16) and its f32
// scales (num_scales, FP8 only); what follows is the kernel's own.
__device__ __forceinline__ void warp_put_row(uint8_t* slot, const uint8_t* x, const float* x_scales, uint32_t token,
                                             uint32_t row_bytes, uint32_t num_scales, uint32_t lane) {
  const float* scales = x_scales + static_cast<uint64_t>(token) * num_scales;
  auto ld = [&](uint32_t i) { return pk::ld_nc_f32(scales + i); };
  auto st = [&](uint32_t i, float v) { pk::st_na_f32(slot + row_bytes + 4 * i, v); };
  WarpBatch<kRowScaleBatch, float> first;
  first.load(0, num_scales, lane, ld);
  warp_copy_to_buffer(slot, x + static_cast<uint64_t>(token) * row_bytes, row_bytes, lane);
  first.store(0, num_scales, lane, st);
  warp_copy_batched<kRowScaleBatch, float>(32 * kRowScaleBatch, num_scales, lane, ld, st);
}

__device__ __forceinline__ void warp_get_row(uint8_t* recv_x, float* recv_scales, uint64_t row, const uint8_t* slot,
                                             uint32_t row_bytes, uint32_t num_scales, uint32_t lane) {
  auto ld = [&](uint32_t i) { return pk::ld_na_f32(slot + row_bytes + 4 * i); };
  auto st = [&](uint32_t i, float v) { recv_scales[row * num_scales + i] = v; };
  WarpBatch<kRowScaleBatch, float> first;
  first.load(0, num_scales, lane, ld);
  warp_copy_from_buffer(recv_x + row * row_bytes, slot, row_bytes, lane);
  first.store(0, num_scales, lane, st);
  warp_copy_batched<kRowScaleBatch, float>(32 * kRowScaleBatch, num_scales, lane, ld, st);
}

// Combine: eight f32 sums for one 16-byte chunk of bf16 columns. Products and sums are
// rounded to f32 one at a time (no FMA), from 0.0, in the caller's order: the reference's.
struct Bf16x8Sum {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;

  // lo, hi += f32(bf16 pair w) * s
  static __device__ __forceinline__ void add_pair(float& lo, float& hi, uint32_t w, float s) {
    lo = __fadd_rn(lo, __fmul_rn(__uint_as_float(w << 16), s));
    hi = __fadd_rn(hi, __fmul_rn(__uint_as_float(w & 0xffff0000u), s));
  }

  __device__ __forceinline__ void add(int4 v, float s) {
    add_pair(a0, a1, static_cast<uint32_t>(v.x), s);
    add_pair(a2, a3, static_cast<uint32_t>(v.y), s);
    add_pair(a4, a5, static_cast<uint32_t>(v.z), s);
    add_pair(a6, a7, static_cast<uint32_t>(v.w), s);
  }

  __device__ __forceinline__ int4 to_bf16() const {
    int4 o;
    o.x = static_cast<int32_t>(pk::pack_bf16x2(a0, a1));
    o.y = static_cast<int32_t>(pk::pack_bf16x2(a2, a3));
    o.z = static_cast<int32_t>(pk::pack_bf16x2(a4, a5));
    o.w = static_cast<int32_t>(pk::pack_bf16x2(a6, a7));
    return o;
  }
};

}  // namespace ep
}  // namespace pk
