// pk/ptx.cuh — every inline-PTX wrapper used by the pykernels CUDA C++ kernels (sm_90a).
//
// One place for the asm: wgmma (fence / mma_async / commit / wait), shared-memory matrix
// descriptors, mbarrier (CTA-local and remote arrivals), TMA (cp.async.bulk.tensor loads,
// multicast, stores), proxy and barrier fences, clusters (rank, mapa, barrier.cluster),
// setmaxnreg, elect.sync, named barriers, grid dependency control (PDL), bf16 packing.
//
// Written against the PTX ISA (8.x) exactly, because the same PTX runs on the CPU
// emulator (pykernels.emu), which follows the ISA and reports deviations. Conventions:
//  * shared-memory addresses are 32-bit .shared::cta window offsets (smem_addr());
//  * every wrapper is __forceinline__ (the emulator runs nvcc's PTX: no .func calls);
//  * labels never appear in asm: waits loop in C++ around a try_wait that returns a bool.
#pragma once

#include <cstdint>

#include "pk/wgmma_operands.cuh"

namespace pk {

// A CUtensorMap as the kernel sees it: 128 opaque bytes, 64-byte aligned. Passed as a
// `const __grid_constant__` kernel parameter; the TMA instructions take its generic
// address (the driver's encoding on the GPU, the emulator's image on the CPU).
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

// Offset of a shared-memory object in the CTA's shared window (what .shared operands take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint64_t generic_addr(const void* p) {
  return reinterpret_cast<uint64_t>(p);
}

// ---------------------------------------------------------------------------------------
// Warp / warpgroup control
// ---------------------------------------------------------------------------------------

// elect.sync over the full warp: true in exactly one lane (all 32 lanes must call it).
__device__ __forceinline__ bool elect_one() {
  uint32_t is_leader;
  asm volatile(
      "{\n.reg .pred p;\n.reg .b32 r;\n"
      "elect.sync r|p, 0xffffffff;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(is_leader));
  return is_leader != 0;
}

// setmaxnreg: warpgroup-wide (.sync.aligned) change of the per-thread register budget.
template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, multiple of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <uint32_t kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, multiple of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Named barrier `id` (1..15; 0 is __syncthreads) over `count` threads (multiple of 32).
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Cluster-wide barrier (all threads of all CTAs of the cluster).
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// This CTA's rank in its cluster (%cluster_ctarank) and the cluster's CTA count.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

__device__ __forceinline__ uint32_t cluster_nctarank() {
  uint32_t r;
  asm("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
}

// The shared::cluster address of the object at .shared::cta offset `addr` in the shared
// memory of the cluster's CTA `rank` (which may be this CTA).
__device__ __forceinline__ uint32_t mapa_shared(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}

// ---------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------

// Make mbarrier.init visible to the other threads and to the async proxy (TMA).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Order this thread's generic-proxy shared-memory accesses with later async-proxy ones
// (TMA store reading shared memory written by st.shared, or barriers initialised by
// generic stores before TMA signals them).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// Grid dependency control (programmatic dependent launch: plans with pdl=True,
// pykernels/runtime/plan.py). A kernel launched with PDL may start while the previous
// kernel of its stream still runs, so it must not touch global memory that kernel may
// read or write before griddep_wait(). Without PDL both are no-ops.
// ---------------------------------------------------------------------------------------

// griddepcontrol.wait: this thread waits until every prerequisite grid has completed and
// its memory operations are visible. The clobber keeps the compiler's loads after it.
__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// griddepcontrol.launch_dependents: the next PDL launch of the stream may start its CTAs
// once every CTA of this grid has issued this or exited. It grants no visibility (the
// dependent's griddep_wait still waits for this grid's completion), so it is safe anywhere;
// the clobber keeps it after the stores that precede it in the source.
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// mbarrier (64-bit barrier objects in shared memory, 8-byte aligned)
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrive_count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrive_count) : "memory");
}

// Arrive once (release semantics at CTA scope, the default).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
      : "memory");
}

// Arrive once and add `tx_bytes` to the transaction count the current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t tx_bytes) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
      "r"(tx_bytes)
      : "memory");
}

// One bounded wait for the completion of the phase with parity `parity` (acquire, CTA
// scope). True when that phase has completed.
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// Cross-CTA stage hand-off inside a cluster at cluster scope, in the form the PTX ISA gives
// for releasing and acquiring shared memory (its `fence` examples): a release fence
// restricted to .shared::cta before a relaxed cluster-scope arrive, and a relaxed
// cluster-scope wait followed by an acquire fence restricted to .shared::cluster. The plain
// `.release.cluster` arrive and `.acquire.cluster` wait mean the same for shared memory
// but also cover global memory: ptxas lowers them to MEMBAR.ALL.GPU + ERRBAR + CGAERRBAR
// before the arrive and a whole-L1 invalidate (CCTL.IVALL) after the wait. The restricted
// fences compile to MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S and to nothing. Use them when the
// hand-off orders shared memory only (stage buffers, their mbarriers), never global data.

// Arrive once on the mbarrier at shared::cluster address `cluster_bar` (mapa_shared(); in
// this or another CTA of the cluster), releasing at cluster scope this thread's earlier
// accesses to its own CTA's shared memory (and the wgmma operand reads it waited for with
// wgmma.wait_group).
__device__ __forceinline__ void mbar_arrive_cluster_shared(uint32_t cluster_bar) {
  asm volatile(
      "fence.release.sync_restrict::shared::cta.cluster;\n"
      "mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar)
      : "memory");
}

// Wait for the phase with parity `parity` of a barrier of this CTA that threads of other
// CTAs arrive on (mbar_arrive_cluster_shared), then acquire at cluster scope for this
// thread's later shared::cluster accesses (TMA multicast writes into the cluster's CTAs).
__device__ __forceinline__ bool mbar_try_wait_relaxed_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.relaxed.cluster.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbar_wait_cluster_shared(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait_relaxed_cluster(bar, parity)) {
  }
  asm volatile("fence.acquire.sync_restrict::shared::cluster.cluster;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// TMA: cp.async.bulk.tensor (tile mode). Coordinates are in elements, innermost first.
// Loads signal `bar` with complete_tx of the full box bytes (out-of-bound elements are
// filled and counted too).
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TensorMap* map, uint32_t bar, int32_t c0,
                                            int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(generic_addr(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TensorMap* map, uint32_t bar, int32_t c0,
                                            int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(generic_addr(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// The same box written into the shared memory (same offset) of every CTA in `cta_mask`
// of the cluster; each destination CTA's barrier at offset `bar` receives complete_tx.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const TensorMap* map, uint32_t bar,
                                                      int32_t c0, int32_t c1, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(generic_addr(map)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

// Plain bulk copy (no tensor map) of `bytes` from global memory into this CTA's shared
// memory, signalling `bar` with complete_tx of those bytes. Addresses and size: multiples of
// 16 bytes. For rows a tensor map cannot gather (one token row per copy).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Shared -> global tile store (bulk-group completion). Elements outside the tensor's
// bounds are not written. Needs fence_proxy_async_shared() after the st.shared that
// produced `src`.
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, uint32_t src, int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
          generic_addr(map)),
      "r"(src), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_store_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Wait until at most kPending bulk groups still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

// ---------------------------------------------------------------------------------------
// wgmma
// ---------------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a K-major operand stored with the 128-byte swizzle:
// rows of 128 bytes, 8-row atoms 1024 bytes apart (SBO = 1024), LBO unused for swizzled
// K-major layouts (encoded as 1, i.e. 16 bytes), base offset 0 (atoms 1024-byte aligned),
// layout type 1 (128B swizzle) in bits 62-63. Stepping K by 32 one-byte elements inside
// the 128-byte atom adds 32 bytes (2 in the >>4 encoding) to the start address.
__device__ __forceinline__ uint64_t make_desc_k128b(uint32_t smem) {
  uint64_t desc = (uint64_t)((smem & 0x3FFFFu) >> 4);  // bits 0-13: start address >> 4
  desc |= (uint64_t)(16u >> 4) << 16;                  // bits 16-29: leading byte offset >> 4
  desc |= (uint64_t)(1024u >> 4) << 32;                // bits 32-45: stride byte offset >> 4
  desc |= (uint64_t)1 << 62;                           // bits 62-63: 1 = 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins a register between asm statements so the compiler neither reads an accumulator
// before the wgmma.wait_group that completes it nor moves writes past a wgmma.fence.
__device__ __forceinline__ void fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// D[64 x N] (f32, fragment d[N/2]) = A[64 x 32] * B[N x 32]^T (+ D when scale_d != 0):
// wgmma.mma_async.sync.aligned.m64nNk32.f32.e4m3.e4m3 with both operands K-major in
// shared memory (descriptors), no negation (imm-scale-a/b = 1). Fragment of thread t:
// d[i] is row 16*(t/32) + (t%32)/4 + 8*((i>>1)&1), column 8*(i>>2) + 2*(t%4) + (i&1).
template <int N>
struct WgmmaE4M3;

// One specialisation per N in use; the accumulator lists (N / 2 registers) are the macros of
// pk/wgmma_operands.cuh.

template <>
struct WgmmaE4M3<16> {
  static __device__ __forceinline__ void mma(float (&d)[8], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {" PK_WGMMA_D(8)
      "}, %8, %9, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(8, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<32> {
  static __device__ __forceinline__ void mma(float (&d)[16], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {" PK_WGMMA_D(16)
      "}, %16, %17, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(16, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<72> {
  static __device__ __forceinline__ void mma(float (&d)[36], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n72k32.f32.e4m3.e4m3 {" PK_WGMMA_D(36)
      "}, %36, %37, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(36, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<64> {
  static __device__ __forceinline__ void mma(float (&d)[32], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {" PK_WGMMA_D(32)
      "}, %32, %33, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(32, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<112> {
  static __device__ __forceinline__ void mma(float (&d)[56], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %58, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n112k32.f32.e4m3.e4m3 {" PK_WGMMA_D(56)
      "}, %56, %57, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(56, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<128> {
  static __device__ __forceinline__ void mma(float (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" PK_WGMMA_D(64)
      "}, %64, %65, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(64, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<144> {
  static __device__ __forceinline__ void mma(float (&d)[72], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %74, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n144k32.f32.e4m3.e4m3 {" PK_WGMMA_D(72)
      "}, %72, %73, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(72, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaE4M3<160> {
  static __device__ __forceinline__ void mma(float (&d)[80], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
    asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %82, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n160k32.f32.e4m3.e4m3 {" PK_WGMMA_D(80)
      "}, %80, %81, p, 1, 1;\n}\n"
      : PK_WGMMA_D_OPERANDS(80, d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

// ---------------------------------------------------------------------------------------
// Numeric packing
// ---------------------------------------------------------------------------------------

// Two floats -> bf16x2 (round to nearest even): `lo` in bits 0-15, `hi` in bits 16-31.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace pk
