// pk/ptx_memory_order.cuh — inline-PTX wrappers for kernels that talk to other GPUs
// through CUDA-IPC-mapped memory (the expert-parallel kernels in csrc/ep/).
//
// Memory-model vocabulary (PTX ISA, "Memory Consistency Model"):
//  * ld.acquire.sys / st.release.sys: the counters and flags of a protocol. A release store
//    makes every write the storing thread has observed (its own, and those ordered before
//    it by a barrier: bar.sync, bar.warp.sync) visible before the flag; an acquire load that
//    reads the flag orders every later access of the loading thread after it.
//    .sys scope because the peer is another device (NVLink, through IPC mappings) or the
//    host (error records in pinned memory).
//  * ld.relaxed.sys: a strong read with no ordering (a counter this thread itself wrote).
//  * ld.global.nc.L1::no_allocate: the read-only path for inputs that no one writes during
//    the kernel (x, top-k ids and weights, layouts); never for ring buffers.
//  * ld/st.global.L1::no_allocate (weak): payload in ring buffers. Weak accesses are
//    ordered by the acquire/release operations around them; no_allocate keeps streaming
//    data out of L1.
//  * fence.acq_rel.sys / fence.sc.sys: explicit fences (error records before trap).
//
// Conventions shared with pk/ptx.cuh: every wrapper is __forceinline__ (the CPU emulator
// runs nvcc's PTX and has no .func calls), no labels inside asm, no dynamic indexing of
// register arrays in callers.
#pragma once

#include <cstdint>

namespace pk {

// The scalar wrappers are one line each, stamped out by these macros: an asm template must
// be a string literal, so a C++ template could not splice in the PTX type. `reg` is the
// operand constraint ("r" 32-bit, "l" 64-bit, "f" f32); P is the pointer parameter's type.
//  * PK_MO_LOAD / PK_MO_STORE: ordered accesses (strong, or weak payload ordered by strong
//    ones): the "memory" clobber keeps the compiler from moving memory accesses across them.
//  * PK_MO_LOAD_NC: read-only inputs, no clobber (the compiler may move them).
#define PK_MO_LOAD(name, T, P, insn, reg)                                 \
  __device__ __forceinline__ T name(P p) {                                \
    T v;                                                                  \
    asm volatile(insn " %0, [%1];\n" : "=" reg(v) : "l"(p) : "memory");  \
    return v;                                                             \
  }
#define PK_MO_LOAD_NC(name, T, insn, reg)                     \
  __device__ __forceinline__ T name(const void* p) {          \
    T v;                                                      \
    asm volatile(insn " %0, [%1];\n" : "=" reg(v) : "l"(p));  \
    return v;                                                 \
  }
#define PK_MO_STORE(name, P, T, insn, reg)                          \
  __device__ __forceinline__ void name(P p, T v) {                  \
    asm volatile(insn " [%0], %1;\n" ::"l"(p), reg(v) : "memory");  \
  }

// ---------------------------------------------------------------------------------------
// Strong loads and stores (counters, flags)
// ---------------------------------------------------------------------------------------

PK_MO_LOAD(ld_acquire_sys, uint32_t, const uint32_t*, "ld.acquire.sys.global.u32", "r")
PK_MO_LOAD(ld_acquire_sys, uint64_t, const uint64_t*, "ld.acquire.sys.global.u64", "l")
PK_MO_LOAD(ld_relaxed_sys, uint32_t, const uint32_t*, "ld.relaxed.sys.global.u32", "r")
PK_MO_STORE(st_release_sys, uint32_t*, uint32_t, "st.release.sys.global.u32", "r")
PK_MO_STORE(st_release_sys, uint64_t*, uint64_t, "st.release.sys.global.u64", "l")
PK_MO_STORE(st_relaxed_sys, uint32_t*, uint32_t, "st.relaxed.sys.global.u32", "r")

// ---------------------------------------------------------------------------------------
// Fences and atomics
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;\n" ::: "memory"); }

__device__ __forceinline__ void fence_sc_sys() { asm volatile("fence.sc.sys;\n" ::: "memory"); }

// Compare-and-swap at system scope (claims the error record); returns the old value.
__device__ __forceinline__ uint32_t atom_cas_sys(uint32_t* p, uint32_t compare, uint32_t value) {
  uint32_t old;
  asm volatile("atom.relaxed.sys.global.cas.b32 %0, [%1], %2, %3;\n"
               : "=r"(old)
               : "l"(p), "r"(compare), "r"(value)
               : "memory");
  return old;
}

// Fire-and-forget add at device scope (layout counters; the kernel boundary publishes them).
__device__ __forceinline__ void red_add_gpu(int32_t* p, int32_t v) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// ---------------------------------------------------------------------------------------
// Read-only inputs: the non-coherent path, not allocated in L1
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ int4 ld_nc_v4(const void* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_nc_u8(const void* p) {
  uint16_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];\n" : "=h"(v) : "l"(p));
  return v;
}

PK_MO_LOAD_NC(ld_nc_s32, int32_t, "ld.global.nc.L1::no_allocate.s32", "r")
PK_MO_LOAD_NC(ld_nc_f32, float, "ld.global.nc.L1::no_allocate.f32", "f")
PK_MO_LOAD_NC(ld_nc_s64, int64_t, "ld.global.nc.L1::no_allocate.s64", "l")

// ---------------------------------------------------------------------------------------
// Ring-buffer payload: weak (coherent) accesses that bypass L1 allocation. Ordered by the
// acquire / release operations on the counters around them.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ int4 ld_na_v4(const void* p) {
  int4 v;
  asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

PK_MO_LOAD(ld_na_s32, int32_t, const void*, "ld.global.L1::no_allocate.s32", "r")
PK_MO_LOAD(ld_na_f32, float, const void*, "ld.global.L1::no_allocate.f32", "f")

__device__ __forceinline__ void st_na_v4(void* p, int4 v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

PK_MO_STORE(st_na_s32, void*, int32_t, "st.global.L1::no_allocate.s32", "r")
PK_MO_STORE(st_na_f32, void*, float, "st.global.L1::no_allocate.f32", "f")
PK_MO_STORE(st_na_s64, void*, int64_t, "st.global.L1::no_allocate.s64", "l")

#undef PK_MO_LOAD
#undef PK_MO_LOAD_NC
#undef PK_MO_STORE

// ---------------------------------------------------------------------------------------
// Time and failure
// ---------------------------------------------------------------------------------------

// Nanoseconds (a global timer; the emulator returns its instruction count).
__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

__device__ __forceinline__ void trap() { asm volatile("trap;\n" ::: "memory"); }

}  // namespace pk

namespace pk {

// ---------------------------------------------------------------------------------------
// Error records of timed-out waits
// ---------------------------------------------------------------------------------------
// A host-visible uint32 [8] buffer (pinned host memory on the GPU, a CPU tensor on the
// emulator): [0] 1 once a record is written, [1] rank, [2] channel (or expert), [3] what was
// awaited (a code of the kernel family), [4] peer rank, [5] value seen, [6] value needed,
// [7] CTA. The first thread to claim [0] writes the record; every caller then traps.
// The stores are predicated inside one asm block (no branch), so every thread reaches the
// trap only after the record is written, whatever the code layout.
__device__ __forceinline__ void report_and_trap(uint32_t* err, uint32_t rank, uint32_t channel, uint32_t what,
                                                uint32_t peer, uint32_t seen, uint32_t needed) {
  const uint32_t old = atom_cas_sys(err, 0u, 1u);
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.eq.u32 p, %0, 0;\n"
      "@p st.relaxed.sys.global.u32 [%1+4], %2;\n"
      "@p st.relaxed.sys.global.u32 [%1+8], %3;\n"
      "@p st.relaxed.sys.global.u32 [%1+12], %4;\n"
      "@p st.relaxed.sys.global.u32 [%1+16], %5;\n"
      "@p st.relaxed.sys.global.u32 [%1+20], %6;\n"
      "@p st.relaxed.sys.global.u32 [%1+24], %7;\n"
      "@p st.relaxed.sys.global.u32 [%1+28], %8;\n"
      "}\n" ::"r"(old),
      "l"(err), "r"(rank), "r"(channel), "r"(what), "r"(peer), "r"(seen), "r"(needed), "r"(blockIdx.x)
      : "memory");
  fence_sc_sys();
  trap();
}

}  // namespace pk
