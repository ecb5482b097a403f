"""Hopper asynchronous instructions on the emulator, checked against the PTX ISA.

Small hand-written sm_90a kernels exercise wgmma.mma_async, mbarrier and the TMA
(cp.async.bulk.tensor / cp.async.bulk); every expected value comes from an independent
numpy model written from the PTX ISA (8.x) text, not from pykernels/emu:

* wgmma (ISA 9.7.15): D = (scale-d ? D : 0) + (imm-scale-a * A) x (imm-scale-b * B)^T
  (B given N x K, "K-major"). Register fragments (9.7.15.5.1.1): accumulator d_i of
  warpgroup thread t (w = t/32, l = t%32) holds D[16w + l/4 + 8((i>>1)&1),
  8(i>>2) + 2(l%4) + (i&1)]; for .f16/.bf16 A in registers the same formula gives a_i
  (i = 0..7, two per .b32 register, low half first) with column 2(l%4) + (i&1) + 8(i>>2).
  Matrix descriptor (9.7.15.5.1.2.2): bits 0-13 start address >> 4, 16-29 leading
  byte offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset, 62-63 swizzle
  (0 none, 1 128B, 2 64B, 3 32B). Shared memory layouts (9.7.15.5.1.2): K-major without
  swizzle is built of "core matrices" of 8 rows x 16 bytes (rows 16 bytes apart); LBO is
  the distance between core matrices adjacent in K, SBO between core matrices adjacent
  in M/N. K-major 128B swizzle: rows of 128 bytes, 8-row atoms SBO = 1024 bytes apart,
  LBO unused, byte address bits [4:7) XOR-ed with bits [7:10).
* mbarrier (9.7.13.15): a phase completes when its pending arrival count and its
  transaction count both reach zero; test_wait/try_wait.parity P is true once the phase
  with parity P completed - P may name the current or the immediately preceding phase,
  so on a fresh barrier parity 1 (the phase "before" phase 0) reads as complete.
* TMA (5.5 Tensors, 9.7.9.25 cp.async.bulk.tensor): the box at the given coordinates
  (innermost first, signed) lands densely in shared memory in box order; elements
  outside the tensor's dimensions are filled with zero on loads and not written on
  stores; the transaction byte count is the whole box. Swizzle (CUDA TMA swizzle
  modes, as CuTe's Swizzle<3,4,3> / <2,4,3> / <1,4,3>): the 16-byte chunk index inside
  the 128/64/32-byte span is XOR-ed with bits [7:10) / [7:9) / [7:8) of the shared
  address (patterns repeat every 1024 / 512 / 256 bytes).

Inputs are fresh random values (the `seed` fixture prints the seed); arithmetic inputs
are small integers / halves so that bf16 and e4m3 products summed in f32 are exact and
the comparisons are bit-exact. Outputs are poisoned before each launch.
"""
import re

import numpy as np
import pytest
import torch

from pykernels import emu
from pykernels.emu.errors import Deadlock, EmuError
from pykernels.runtime.tensormap import TensorMapDesc

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"


def _line_of(ptx, needle):
    """1-based PTX line of the first line containing `needle`."""
    for i, line in enumerate(ptx.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


# =====================================================================================
# wgmma.mma_async
# =====================================================================================

def d_fragment(n, threads=128):
    """(row, col) of accumulator register i of thread t: arrays [threads, n/2]."""
    t = np.arange(threads)[:, None] % 128
    i = np.arange(n // 2)[None, :]
    w, l = t // 32, t % 32
    return 16 * w + l // 4 + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (l % 4) + (i & 1)


def a_fragment_16bit():
    """(row, col) of A element a_i (i = 0..7) of thread t for m64nNk16 .f16/.bf16."""
    t = np.arange(128)[:, None]
    i = np.arange(8)[None, :]
    w, l = t // 32, t % 32
    return 16 * w + l // 4 + 8 * ((i >> 1) & 1), 2 * (l % 4) + (i & 1) + 8 * (i >> 2)


def make_desc(start, lbo, sbo, swizzle_code=0, base_offset=0):
    """The 64-bit shared-memory matrix descriptor from its documented fields."""
    assert start % 16 == 0 and lbo % 16 == 0 and sbo % 16 == 0
    return (((start >> 4) & 0x3FFF) | (((lbo >> 4) & 0x3FFF) << 16) | (((sbo >> 4) & 0x3FFF) << 32)
            | ((base_offset & 7) << 49) | ((swizzle_code & 3) << 62))


def place_interleaved(img, base, mat, lbo, sbo):
    """K-major, no swizzle: byte (r, kb) of `mat` [rows, K bytes] in core matrices of
    8 rows x 16 bytes; K-adjacent core matrices LBO apart, M/N-adjacent SBO apart."""
    rows, kbytes = mat.shape
    r = np.arange(rows)[:, None]
    kb = np.arange(kbytes)[None, :]
    addr = base + (r // 8) * sbo + (kb // 16) * lbo + (r % 8) * 16 + kb % 16
    assert len(np.unique(addr)) == addr.size
    img[addr] = mat


def swz(addr, span):
    """TMA / wgmma swizzle of shared byte addresses: the 16-byte chunk index within the
    `span`-byte span XOR-ed with the 128-byte line index (mod span/16)."""
    if span == 0:
        return addr
    mask = span // 16 - 1
    return addr ^ (((addr >> 7) & mask) << 4)


def place_sw128(img, base, mat):
    """K-major 128B swizzle: row r at base + (r//8)*1024 + (r%8)*128, swizzled."""
    rows, kbytes = mat.shape
    assert base % 1024 == 0 and kbytes <= 128
    r = np.arange(rows)[:, None]
    kb = np.arange(kbytes)[None, :]
    img[swz(base + (r // 8) * 1024 + (r % 8) * 128 + kb, 128)] = mat


def wgmma_ptx(n, kind, steps, a_regs=False, threads=128, smem_bytes=16, poke=None, scale_a=1):
    """A kernel that memcpys the shared image in, loads the initial accumulators (and A
    fragments), runs fence / len(steps) x mma_async / commit / wait_group 0, and stores
    every accumulator register: out[thread, i]. `steps`: (A, B) descriptor start-address
    increments in bytes per mma_async. `poke`: an instruction touching %f0 placed between
    the mma_async and the wait_group (a bug the emulator must report)."""
    nreg = n // 2
    if kind == "bf16":
        shape, types = f"m64n{n}k16", "f32.bf16.bf16"
        imms = "1, 0" if a_regs else "1, 0, 0"       # imm-scale-b, (imm-trans-a,) imm-trans-b
    else:
        shape, types = f"m64n{n}k32", "f32.e4m3.e4m3"
        imms = "1"                                   # imm-scale-b (no transpose for fp8)
    dvec = "{" + ", ".join(f"%f{i}" for i in range(nreg)) + "}"
    L = []
    e = L.append
    params = [".param .u64 p_img", ".param .u32 p_nbytes", ".param .u64 p_da", ".param .u64 p_db",
              ".param .u32 p_sd", ".param .u64 p_c", ".param .u64 p_out", ".param .u64 p_af"]
    e(f".visible .entry wg({', '.join(params)})")
    e("{")
    e(f"    .reg .pred %p<8>; .reg .b32 %r<32>; .reg .b64 %rd<64>; .reg .f32 %f<{nreg}>; .reg .b32 %a<4>;")
    e(f"    .shared .align 1024 .b8 smem[{smem_bytes}];")
    e("    ld.param.u64 %rd1, [p_img];")
    e("    ld.param.u32 %r1, [p_nbytes];")
    e("    mov.u32 %r2, %tid.x;")
    e("    mov.u32 %r3, smem;")
    e("    shl.b32 %r4, %r2, 4;")
    e("COPY:")                               # p_nbytes is a multiple of 16 x threads: same trip count in
    e("    setp.ge.u32 %p1, %r4, %r1;")           # every thread, no diverged warp at the bar.sync
    e("    @%p1 bra COPIED;")
    e("    cvt.u64.u32 %rd2, %r4;")
    e("    add.u64 %rd3, %rd1, %rd2;")
    e("    ld.global.v4.u32 {%r5, %r6, %r7, %r8}, [%rd3];")
    e("    add.u32 %r9, %r3, %r4;")
    e("    st.shared.v4.u32 [%r9], {%r5, %r6, %r7, %r8};")
    e(f"    add.u32 %r4, %r4, {16 * threads};")
    e("    bra.uni COPY;")
    e("COPIED:")
    e("    fence.proxy.async.shared::cta;")       # generic-proxy stores -> visible to wgmma
    e("    bar.sync 0;")
    # descriptors: Python passes them with the start address relative to `smem`
    e("    shr.u32 %r10, %r3, 4;")
    e("    cvt.u64.u32 %rd4, %r10;")
    e("    ld.param.u64 %rd5, [p_da];")
    e("    add.u64 %rd5, %rd5, %rd4;")
    e("    ld.param.u64 %rd6, [p_db];")
    e("    add.u64 %rd6, %rd6, %rd4;")
    e("    ld.param.u32 %r11, [p_sd];")
    e("    setp.ne.u32 %p2, %r11, 0;")
    e("    setp.eq.u32 %p3, %r2, %r2;")          # always true: later steps accumulate
    e("    ld.param.u64 %rd7, [p_c];")
    e("    mov.u32 %r13, %ctaid.x;")
    e(f"    mad.lo.u32 %r14, %r13, {threads}, %r2;")    # global thread index
    e(f"    mul.wide.u32 %rd8, %r14, {4 * nreg};")
    e("    add.u64 %rd9, %rd7, %rd8;")
    for i in range(nreg):
        e(f"    ld.global.f32 %f{i}, [%rd9+{4 * i}];")
    if a_regs:
        e("    ld.param.u64 %rd10, [p_af];")
        e("    mul.wide.u32 %rd11, %r14, 16;")
        e("    add.u64 %rd12, %rd10, %rd11;")
        e("    ld.global.v4.b32 {%a0, %a1, %a2, %a3}, [%rd12];")
    e("    wgmma.fence.sync.aligned;")
    sa = str(scale_a)                       # imm-scale-a
    for s, (da, db) in enumerate(steps):
        e(f"    add.s64 %rd{20 + s}, %rd5, {da >> 4};")
        e(f"    add.s64 %rd{40 + s}, %rd6, {db >> 4};")
        a_op = "{%a0, %a1, %a2, %a3}" if a_regs else f"%rd{20 + s}"
        pd = "%p2" if s == 0 else "%p3"
        e(f"    wgmma.mma_async.sync.aligned.{shape}.{types} {dvec}, {a_op}, %rd{40 + s}, {pd}, {sa}, {imms};")
    if poke:
        e("    " + poke)
    e("    wgmma.commit_group.sync.aligned;")
    e("    wgmma.wait_group.sync.aligned 0;")
    e("    ld.param.u64 %rd13, [p_out];")
    e("    add.u64 %rd14, %rd13, %rd8;")
    for i in range(nreg):
        e(f"    st.global.f32 [%rd14+{4 * i}], %f{i};")
    e("    ret;")
    e("}")
    return HEAD + "\n".join(L) + "\n"


def _operand(rng, rows, k, kind, halves):
    v = rng.integers(-8, 9, size=(rows, k)).astype(np.float32)
    if halves:
        v = v / 2
    v[0, 0] = 3.0                      # never all zeros
    t = torch.from_numpy(v)
    return t.to(torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn)


def run_wgmma(rng, kind, n, layout, *, ksteps=1, scale_d=1, scale_a=1, a_regs=False, threads=128, ctas=1,
              poke=None):
    """Build A [64, K], B [n, K], C [64, n] (K = ksteps x the instruction's K), the shared
    image for `layout` ('k_inner': K-adjacent core matrices contiguous, 'mn_inner':
    M/N-adjacent contiguous, 'sw128'), launch, and return (out, expected, stats)."""
    eb = 2 if kind == "bf16" else 1
    kel = 32 // eb                    # K of one instruction: 32 bytes of K
    K = kel * ksteps
    A = _operand(rng, 64, K, kind, halves=True)
    B = _operand(rng, n, K, kind, halves=False)
    Ab = A.view(torch.uint8).numpy().reshape(64, K * eb)
    Bb = B.view(torch.uint8).numpy().reshape(n, K * eb)
    kb = K * eb
    if layout == "sw128":
        a_base, b_base = 0, 8 * 1024
        size = b_base + (n + 7) // 8 * 1024
        img = rng.integers(0, 256, size=size, dtype=np.uint8)     # junk where the operands are not
        place_sw128(img, a_base, Ab)
        place_sw128(img, b_base, Bb)
        da = make_desc(a_base, 16, 1024, 1)
        db = make_desc(b_base, 16, 1024, 1)
        steps = [(32 * s, 32 * s) for s in range(ksteps)]
    else:
        nk = kb // 16                 # core matrices along K
        if layout == "k_inner":       # [row group][k core] ; 128 junk bytes between row groups
            a_l, a_s = 128, 128 * nk + 128
            b_l, b_s = 128, 128 * nk + 128
        else:                         # [k core][row group] ; 256 junk bytes between K columns
            a_l, a_s = 128 * 8 + 256, 128
            b_l, b_s = 128 * (n // 8) + 256, 128
        a_size = 8 * a_s + nk * a_l
        b_base = (a_size + 1023) // 1024 * 1024
        size = b_base + (n // 8) * b_s + nk * b_l
        size = (size + 15) // 16 * 16
        img = rng.integers(0, 256, size=size, dtype=np.uint8)
        place_interleaved(img, 0, Ab, a_l, a_s)
        place_interleaved(img, b_base, Bb, b_l, b_s)
        da = make_desc(0, a_l, a_s)
        db = make_desc(b_base, b_l, b_s)
        steps = [(2 * a_l * s, 2 * b_l * s) for s in range(ksteps)]
    # every thread runs the copy loop the same number of times (no divergent warps at
    # the bar.sync that follows): pad the image with junk to a multiple of 16 x threads
    pad = (-size) % (16 * threads)
    img = np.concatenate([img, rng.integers(0, 256, size=pad, dtype=np.uint8)])
    size += pad
    nreg = n // 2
    total = threads * ctas            # out / C / A fragments are indexed by global thread
    C = torch.from_numpy(rng.integers(-20, 21, size=(64, n)).astype(np.float32))
    C[0, 0] = 7.0
    row, col = d_fragment(n, total)
    cinit = torch.from_numpy(C.numpy()[row, col].copy())
    afrag = torch.zeros(total, 4, dtype=torch.int32)
    if a_regs:
        ar, ac = a_fragment_16bit()
        a16 = A.view(torch.int16).numpy().view(np.uint16)[ar, ac].astype(np.uint32)   # [128, 8]
        words = a16[:, 0::2] | (a16[:, 1::2] << 16)
        afrag = torch.from_numpy(words.view(np.int32).copy())
        afrag = afrag.repeat(total // 128, 1)
    out = torch.full((total, nreg), float("nan"))
    ptx = wgmma_ptx(n, kind, steps, a_regs=a_regs, threads=threads, smem_bytes=size, poke=poke, scale_a=scale_a)
    st = emu.launch(ptx, "wg", (ctas,), (threads,),
                    [torch.from_numpy(img), size, da, db, scale_d, cinit, out, afrag])
    prod = A.double().numpy() @ B.double().numpy().T
    D = (C.double().numpy() if scale_d else 0) + scale_a * prod
    expected = torch.from_numpy(D[row, col].astype(np.float32))
    return out, expected, st


@pytest.mark.parametrize("kind", ["bf16", "e4m3"])
@pytest.mark.parametrize("n", [8, 16, 24, 64, 136, 256])
@pytest.mark.parametrize("layout", ["k_inner", "mn_inner", "sw128"])
def test_wgmma_smem_operands(seed, kind, n, layout):
    rng = np.random.default_rng(seed)
    out, expected, st = run_wgmma(rng, kind, n, layout)
    assert torch.equal(out, expected)
    assert st.wgmma_issued == 1


@pytest.mark.parametrize("kind", ["bf16", "e4m3"])
@pytest.mark.parametrize("scale_d", [0, 1])
def test_wgmma_scale_d_ignores_or_adds_the_accumulator(seed, kind, scale_d):
    rng = np.random.default_rng(seed)
    out, expected, _ = run_wgmma(rng, kind, 24, "sw128", scale_d=scale_d)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind,layout", [("bf16", "k_inner"), ("e4m3", "sw128"), ("bf16", "sw128")])
def test_wgmma_imm_scale_a_negates_a(seed, kind, layout):
    rng = np.random.default_rng(seed)
    out, expected, _ = run_wgmma(rng, kind, 16, layout, scale_a=-1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("layout", ["k_inner", "sw128"])
@pytest.mark.parametrize("scale_d", [0, 1])
def test_wgmma_a_from_registers_bf16(seed, layout, scale_d):
    rng = np.random.default_rng(seed)
    out, expected, _ = run_wgmma(rng, "bf16", 32, layout, a_regs=True, scale_d=scale_d)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["bf16", "e4m3"])
@pytest.mark.parametrize("layout,ksteps", [("k_inner", 2), ("mn_inner", 2), ("sw128", 2), ("sw128", 4)])
def test_wgmma_chained_in_one_group_accumulate(seed, kind, layout, ksteps):
    """ksteps mma_async in one commit group, each on the next K slice (descriptor start
    address advanced: by 2 x LBO without swizzle, by 32 bytes inside the 128B-swizzled
    rows), the first with scale-d = 0: D = A[:, :K] @ B[:, :K]^T over all slices."""
    rng = np.random.default_rng(seed)
    out, expected, st = run_wgmma(rng, kind, 40, layout, ksteps=ksteps, scale_d=0)
    assert torch.equal(out, expected)
    assert st.wgmma_issued == ksteps


def test_wgmma_issued_counts_warpgroups(seed):
    """2 CTAs x 2 warpgroups x 2 mma_async = 8 issued (one per warpgroup, not per warp or
    thread); both warpgroups compute the same product from the same shared memory."""
    rng = np.random.default_rng(seed)
    out, expected, st = run_wgmma(rng, "bf16", 16, "k_inner", ksteps=2, threads=256, ctas=2)
    assert torch.equal(out, expected)
    assert st.wgmma_issued == 8


@pytest.mark.parametrize("poke", ["mov.b32 %r12, %f0;", "add.f32 %f0, %f0, %f1;",
                                  "st.global.f32 [%rd9], %f0;"])
def test_wgmma_accumulator_touched_before_wait_group_is_reported(seed, poke):
    rng = np.random.default_rng(seed)
    with pytest.raises(EmuError, match="wait_group"):
        run_wgmma(rng, "bf16", 16, "k_inner", poke=poke)


# =====================================================================================
# mbarrier
# =====================================================================================

PRODUCER_CONSUMER = HEAD + """
.visible .entry pc(.param .u64 p_x, .param .u64 p_out, .param .u32 p_phases)
{
    .reg .pred %p<8>; .reg .b32 %r<32>; .reg .b64 %rd<16>; .reg .f32 %f<4>;
    .shared .align 8 .b64 full;
    .shared .align 8 .b64 empty;
    .shared .align 16 .f32 buf[64];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    shr.u32 %r3, %r1, 5;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra INIT_DONE;
    mbarrier.init.shared::cta.b64 [full], 2;      // lane 0 of each producer warp arrives
    mbarrier.init.shared::cta.b64 [empty], 1;     // lane 0 of the consumer warp arrives
INIT_DONE:
    bar.sync 0;
    ld.param.u64 %rd1, [p_x];
    ld.param.u64 %rd2, [p_out];
    ld.param.u32 %r30, [p_phases];
    mov.u32 %r4, 0;
    mov.u32 %r8, buf;
    setp.ne.u32 %p5, %r2, 0;
    setp.eq.u32 %p2, %r3, 2;
    @%p2 bra CONSUMER_LOOP;
PRODUCER_LOOP:
    setp.ge.u32 %p3, %r4, %r30;
    @%p3 bra DONE;
    and.b32 %r5, %r4, 1;
    xor.b32 %r6, %r5, 1;                           // slot free: parity of the previous phase
WAIT_EMPTY:
    mbarrier.try_wait.parity.shared::cta.b64 %p4, [empty], %r6;
    @!%p4 bra WAIT_EMPTY;
    DELAY(PD)
    mad.lo.u32 %r7, %r4, 64, %r1;
    mul.wide.u32 %rd3, %r7, 4;
    add.u64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    shl.b32 %r9, %r1, 2;
    add.u32 %r10, %r8, %r9;
    st.shared.f32 [%r10], %f1;
    bar.warp.sync -1;
    @%p5 bra ARRIVED;
    mbarrier.arrive.shared::cta.b64 %rd5, [full];
ARRIVED:
    add.u32 %r4, %r4, 1;
    bra.uni PRODUCER_LOOP;
CONSUMER_LOOP:
    setp.ge.u32 %p3, %r4, %r30;
    @%p3 bra DONE;
    and.b32 %r5, %r4, 1;
WAIT_FULL:
    mbarrier.try_wait.parity.shared::cta.b64 %p4, [full], %r5;
    @!%p4 bra WAIT_FULL;
    DELAY(CD)
    shl.b32 %r9, %r2, 2;
    add.u32 %r10, %r8, %r9;
    ld.shared.f32 %f1, [%r10];
    ld.shared.f32 %f2, [%r10+128];
    mad.lo.u32 %r7, %r4, 64, %r2;
    mul.wide.u32 %rd3, %r7, 4;
    add.u64 %rd4, %rd2, %rd3;
    st.global.f32 [%rd4], %f1;
    st.global.f32 [%rd4+128], %f2;
    bar.warp.sync -1;
    @%p5 bra RELEASED;
    mbarrier.arrive.shared::cta.b64 %rd5, [empty];
RELEASED:
    add.u32 %r4, %r4, 1;
    bra.uni CONSUMER_LOOP;
DONE:
    ret;
}
"""


@pytest.mark.parametrize("producer_delay,consumer_delay", [(1, 7), (7, 1)])
def test_mbarrier_producer_consumer_over_phases(seed, producer_delay, consumer_delay):
    """Two producer warps fill a 64-float buffer and arrive (count 2) on `full`; a consumer
    warp waits on `full` with parity phase&1, copies the buffer out and arrives on `empty`,
    which the producers wait on with the parity of the previous phase (parity 1 on the
    fresh barrier passes). One side is made slower than the other (busy loops after its
    waits), so a wait that passes early lets the faster side overwrite or read the
    buffer at the wrong time, and a missed phase hangs (Deadlock)."""
    phases = 6
    x = torch.randn(phases, 64)
    out = torch.full((phases, 64), float("nan"))
    ptx = _with_delays(PRODUCER_CONSUMER, {"PD": producer_delay, "CD": consumer_delay})
    emu.launch(ptx, "pc", (1,), (96,), [x, out, phases])
    assert torch.equal(out, x)


def _with_delays(ptx, spins):
    """A busy loop of spins[tag] iterations at each DELAY(tag)."""
    def delay(m):
        tag = m.group(1)
        return (f"mov.u32 %r20, 0;\n{tag}_SPIN:\n    add.u32 %r20, %r20, 1;\n"
                f"    setp.lt.u32 %p6, %r20, {spins[tag]};\n    @%p6 bra {tag}_SPIN;")
    return re.sub(r"DELAY\((\w+)\)", delay, ptx)


TEST_WAIT = HEAD + """
.visible .entry tw(.param .u64 p_out)
{
    .reg .pred %p<8>; .reg .b32 %r<32>; .reg .b64 %rd<16>;
    .shared .align 8 .b64 bar;
    .shared .align 8 .b64 bar2;
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    setp.eq.u32 %p1, %r1, 0;                    // thread 0
    setp.eq.u32 %p2, %r1, 32;                   // lane 0 of warp 1
    ld.param.u64 %rd1, [p_out];
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;                   // out[step, tid] at %rd3 + step * 256
    @!%p1 bra I;
    mbarrier.init.shared::cta.b64 [bar], 2;
    mbarrier.init.shared::cta.b64 [bar2], 1;
I:
    bar.sync 0;
    RECORD(0, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar], 0;)
    RECORD(1, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar], 1;)
    @%p1 mbarrier.arrive.shared::cta.b64 %rd8, [bar];
    bar.sync 0;
    RECORD(2, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar], 0;)
    @%p2 mbarrier.arrive.shared::cta.b64 %rd9, [bar];
    bar.sync 0;
    RECORD(3, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar], 0;)
    RECORD(4, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar], 1;)
    @!%p1 bra T;
    mbarrier.test_wait.shared::cta.b64 %p3, [bar], %rd8;     // thread 0's token of phase 0
    selp.u32 %r5, 1, 0, %p3;
    st.global.u32 [%rd3+1280], %r5;
T:
    @%p1 mbarrier.arrive.expect_tx.shared::cta.b64 %rd10, [bar2], 64;
    bar.sync 0;
    RECORD(6, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar2], 0;)
    @%p2 mbarrier.complete_tx.shared::cta.b64 [bar2], 48;
    bar.sync 0;
    RECORD(7, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar2], 0;)
    @%p2 mbarrier.complete_tx.shared::cta.b64 [bar2], 16;
    bar.sync 0;
    RECORD(8, mbarrier.test_wait.parity.shared::cta.b64 %p3, [bar2], 0;)
    ret;
}
"""


def _record(m):
    step, ins = int(m.group(1)), m.group(2)
    return f"{ins}\n    selp.u32 %r5, 1, 0, %p3;\n    st.global.u32 [%rd3+{256 * step}], %r5;"


def test_mbarrier_test_wait_phases_tokens_and_tx():
    """test_wait never blocks: false before the phase completes (1 of 2 arrivals; all
    arrivals but transaction bytes pending), true after; parity 1 on a fresh barrier
    is the preceding phase (true) and becomes the incomplete current phase after phase 0
    completes (false); a state token from phase 0 tests true once it completed."""
    ptx = re.sub(r"RECORD\((\d+), (.*?)\)\n", lambda m: _record(m) + "\n", TEST_WAIT)
    out = torch.full((9, 64), -1, dtype=torch.int32)
    emu.launch(ptx, "tw", (1,), (64,), [out])
    want = {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 6: 0, 7: 0, 8: 1}
    for step, v in want.items():
        assert (out[step] == v).all(), (step, out[step])
    assert out[5, 0] == 1 and (out[5, 1:] == -1).all()


DEADLOCK = HEAD + """
.visible .entry stuck(.param .u64 p_out)
{
    .reg .pred %p<4>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 8 .b64 bar;
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 0;
    @%p1 mbarrier.init.shared::cta.b64 [bar], 1;
    bar.sync 0;
WAIT:
    mbarrier.try_wait.parity.shared::cta.b64 %p2, [bar], 0;
    @!%p2 bra WAIT;
    ld.param.u64 %rd1, [p_out];
    st.global.u32 [%rd1], %r1;
    ret;
}
"""


def test_mbarrier_wait_nobody_arrives_on_is_a_deadlock():
    line = _line_of(DEADLOCK, "mbarrier.try_wait")
    out = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(Deadlock, match=rf"(?s)deadlock.*PTX line {line}\b.*mbarrier"):
        emu.launch(DEADLOCK, "stuck", (1,), (64,), [out])


# =====================================================================================
# TMA: cp.async.bulk.tensor and cp.async.bulk
# =====================================================================================

def _np(t):
    """A tensor's elements as a numpy array of the same element size (bits kept)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def tma_box_model(tensor, dims, box, coords, swizzle):
    """Shared-memory image of a tile-mode TMA load: the box (torch order) at `coords`
    (innermost first), out-of-bound elements zero, laid out densely, then swizzled."""
    arr = _np(tensor)
    c = list(reversed(coords))
    idx, valid = [], []
    for d in range(len(box)):
        g = c[d] + np.arange(box[d])
        valid.append((g >= 0) & (g < dims[d]))
        idx.append(np.clip(g, 0, arr.shape[d] - 1))
    vals = arr[np.ix_(*idx)].copy()
    mask = np.ones(vals.shape, dtype=bool)
    for d, v in enumerate(valid):
        shape = [1] * len(box)
        shape[d] = len(v)
        mask &= v.reshape(shape)
    vals[~mask] = 0
    raw = np.ascontiguousarray(vals).view(np.uint8).reshape(-1)
    img = np.empty_like(raw)
    img[swz(np.arange(raw.size), swizzle)] = raw
    return img


def tma_load_ptx(rank, smem_bytes, multicast=False, wait=True):
    coords = ", ".join(f"%r{10 + d}" for d in range(rank))
    cparams = "".join(f", .param .s32 p_c{d}" for d in range(rank))
    cloads = "\n".join(f"    ld.param.s32 %r{10 + d}, [p_c{d}];" for d in range(rank))
    issue = (f"cp.async.bulk.tensor.{rank}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
             f"{'.multicast::cluster' if multicast else ''} [smem], [p_map, {{{coords}}}], [bar]"
             f"{', %rs1' if multicast else ''};")
    who = "%p4" if multicast else "%p1"
    early = """
    // read the destination without waiting on the barrier
    mov.u32 %r20, smem;
    shl.b32 %r21, %r1, 2;
    add.u32 %r22, %r20, %r21;
    ld.shared.u32 %r23, [%r22];
    ld.param.u64 %rd6, [p_early];
    mul.wide.u32 %rd7, %r1, 4;
    add.u64 %rd8, %rd6, %rd7;
    st.global.u32 [%rd8], %r23;
""" if not wait else ""
    return HEAD + f"""
.visible .entry tma_load(.param .align 64 .b8 p_map[128], .param .u64 p_out, .param .u64 p_early,
                         .param .u32 p_bytes{cparams})
{{
    .reg .pred %p<8>; .reg .b32 %r<40>; .reg .b64 %rd<16>; .reg .b16 %rs<2>;
    .shared .align 1024 .b8 smem[{smem_bytes}];
    .shared .align 8 .b64 bar;
    mov.u32 %r1, %tid.x;
    mov.u32 %r3, %cluster_ctarank;
    setp.eq.u32 %p1, %r1, 0;
    setp.eq.u32 %p2, %r3, 0;
    and.pred %p4, %p1, %p2;                      // thread 0 of CTA rank 0
    ld.param.u32 %r2, [p_bytes];
{cloads}
    @!%p1 bra INIT_DONE;
    mbarrier.init.shared::cta.b64 [bar], 1;
    fence.mbarrier_init.release.cluster;
    mbarrier.arrive.expect_tx.shared::cta.b64 %rd1, [bar], %r2;
INIT_DONE:
    barrier.cluster.arrive.release.aligned;      // every CTA's barrier is armed before the copy
    barrier.cluster.wait.acquire.aligned;
    mov.b16 %rs1, 3;
    @{who} {issue}
{early}
WAIT:
    mbarrier.try_wait.parity.shared::cta.b64 %p3, [bar], 0;
    @!%p3 bra WAIT;
    // copy the shared image out: out[rank, 0:bytes]
    ld.param.u64 %rd2, [p_out];
    mul.wide.u32 %rd3, %r3, %r2;
    add.u64 %rd2, %rd2, %rd3;
    mov.u32 %r5, smem;
    shl.b32 %r4, %r1, 2;
COPY:                                        // same trip count in every thread
    setp.ge.u32 %p5, %r4, {smem_bytes};
    @%p5 bra DONE;
    setp.lt.u32 %p6, %r4, %r2;
    add.u32 %r6, %r5, %r4;
    ld.shared.u32 %r7, [%r6];
    cvt.u64.u32 %rd4, %r4;
    add.u64 %rd5, %rd2, %rd4;
    @%p6 st.global.u32 [%rd5], %r7;
    add.u32 %r4, %r4, 512;
    bra.uni COPY;
DONE:
    barrier.cluster.arrive.release.aligned;
    barrier.cluster.wait.acquire.aligned;
    ret;
}}
"""


def _rand_tensor(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(1, 256, shape, dtype=torch.uint8, generator=gen)   # 0 only from the fill
    t = torch.randn(shape, generator=gen) * 4 + 0.25
    t[t == 0] = 1.0
    return t.to(dtype)


def run_tma_load(tensor, box, coords, swizzle, dims=None, cluster=1, wait=True):
    desc = TensorMapDesc(tensor, box, swizzle, shape=dims)
    nbytes = desc.box_bytes()
    dims = tuple(dims or tensor.shape)
    out = torch.full((cluster, nbytes), 0xA5, dtype=torch.uint8)
    early = torch.full((128,), 0x5A5A5A5A, dtype=torch.int32)
    ptx = tma_load_ptx(len(box), (nbytes + 1023) // 1024 * 1024, multicast=cluster > 1, wait=wait)
    emu.launch(ptx, "tma_load", (cluster,), (128,), [desc, out, early, nbytes, *coords],
               cluster=(cluster, 1, 1))
    return out, early, tma_box_model(tensor, dims, box, coords, swizzle)


COLS_8_ON = (slice(None), slice(8, None))
TMA_LOAD_CASES = {
    # name: (tensor shape, dtype, view slice or None, dims override, box, coords innermost first, swizzle)
    "1d_u8_negative": ((200,), torch.uint8, None, None, (64,), (-24,), 0),
    "1d_u8_past_end": ((200,), torch.uint8, None, None, (64,), (170,), 0),
    "1d_f32_inside": ((100,), torch.float32, None, None, (32,), (40,), 0),
    "2d_u8_none": ((30, 48), torch.uint8, None, None, (8, 48), (0, -4), 0),
    # a strided view (rows 272 bytes apart, base 16 bytes in) with dims hiding its edges
    "2d_bf16_sw128_view": ((40, 136), torch.bfloat16, COLS_8_ON, (37, 120), (16, 64), (-8, 30), 128),
    "2d_bf16_sw128_end": ((40, 136), torch.bfloat16, COLS_8_ON, (37, 120), (16, 64), (100, -5), 128),
    "2d_bf16_sw64": ((40, 128), torch.bfloat16, None, (40, 120), (16, 32), (90, -3), 64),
    "2d_f32_sw32": ((20, 36), torch.float32, None, None, (8, 8), (32, 15), 32),
    "2d_u8_sw128": ((24, 160), torch.uint8, None, None, (16, 128), (40, 12), 128),
    "3d_f32_none": ((3, 10, 24), torch.float32, None, None, (2, 8, 4), (22, -2, 2), 0),
    "3d_bf16_sw128": ((4, 12, 64), torch.bfloat16, None, None, (2, 8, 64), (0, 6, -1), 128),
    "5d_u8_none": ((2, 3, 4, 5, 32), torch.uint8, None, None, (2, 2, 3, 4, 16), (24, -1, 2, 1, -1), 0),
    "5d_bf16_sw32": ((2, 2, 3, 4, 16), torch.bfloat16, None, None, (1, 2, 2, 4, 16), (0, 2, 1, 1, 1), 32),
}


@pytest.mark.parametrize("case", list(TMA_LOAD_CASES))
def test_tma_tile_load(seed, case):
    shape, dtype, view, dims, box, coords, swizzle = TMA_LOAD_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    base = _rand_tensor(shape, dtype, gen)
    tensor = base[view] if view else base
    out, _, want = run_tma_load(tensor, box, coords, swizzle, dims=dims)
    oob = (want == 0).mean()
    if case != "1d_f32_inside":
        assert 0 < oob < 1          # the case really is partly out of bounds
    np.testing.assert_array_equal(out[0].numpy(), want)


def test_tma_multicast_to_both_ctas_of_the_cluster(seed):
    """CTA rank 0 issues one .multicast::cluster load with ctaMask 0b11: the box lands at
    the same offset in both CTAs and each CTA's barrier (same offset) gets the bytes."""
    gen = torch.Generator().manual_seed(seed)
    t = _rand_tensor((20, 64), torch.bfloat16, gen)
    out, _, want = run_tma_load(t, (8, 64), (0, 16), 128, cluster=2)
    np.testing.assert_array_equal(out[0].numpy(), want)
    np.testing.assert_array_equal(out[1].numpy(), want)


def test_tma_destination_read_before_the_wait_is_not_yet_written(seed):
    """Asynchrony. Reading a TMA destination without waiting on its mbarrier is a race on
    the GPU; the emulator resolves it deterministically by landing copies later (only
    when the threads wait, have nothing else to run, or after a fixed latency - see
    Machine.issue_async), so the early read sees shared memory's uninitialised pattern
    (0xFF bytes) and the read after the wait sees the data. This is what makes a missing
    wait show up in tests instead of passing by luck."""
    gen = torch.Generator().manual_seed(seed)
    t = _rand_tensor((512,), torch.uint8, gen)
    out, early, want = run_tma_load(t, (256,), (128,), 0, wait=False)
    assert (early[:64] == -1).all()                      # 0xFFFFFFFF
    np.testing.assert_array_equal(out[0].numpy(), want)
    assert not (want == 0xFF).all()


TMA_STORE = HEAD + """
.visible .entry tma_store(.param .align 64 .b8 p_map[128], .param .u64 p_img, .param .u32 p_bytes,
                          .param .s32 p_c0, .param .s32 p_c1, .param .s32 p_c2)
{
    .reg .pred %p<8>; .reg .b32 %r<40>; .reg .b64 %rd<16>;
    .shared .align 1024 .b8 smem[SMEM];
    mov.u32 %r1, %tid.x;
    ld.param.u32 %r2, [p_bytes];
    ld.param.u64 %rd1, [p_img];
    mov.u32 %r3, smem;
    shl.b32 %r4, %r1, 2;
COPY:
    setp.ge.u32 %p1, %r4, %r2;
    @%p1 bra COPIED;
    cvt.u64.u32 %rd2, %r4;
    add.u64 %rd3, %rd1, %rd2;
    ld.global.u32 %r5, [%rd3];
    add.u32 %r6, %r3, %r4;
    st.shared.u32 [%r6], %r5;
    add.u32 %r4, %r4, 512;
    bra.uni COPY;
COPIED:
    fence.proxy.async.shared::cta;               // make the generic stores visible to the TMA
    bar.sync 0;
    setp.eq.u32 %p2, %r1, 0;
    @!%p2 bra DONE;
    ld.param.s32 %r10, [p_c0];
    ld.param.s32 %r11, [p_c1];
    ld.param.s32 %r12, [p_c2];
    STORE
    cp.async.bulk.commit_group;
    cp.async.bulk.wait_group.read 0;
DONE:
    ret;
}
"""


TMA_STORE_CASES = {
    "2d_f32_sw64": ((24, 40), torch.float32, (8, 16), (32, -3), 64),
    "2d_bf16_sw128": ((20, 72), torch.bfloat16, (16, 64), (-16, 10), 128),
    "3d_u8_none": ((3, 9, 48), torch.uint8, (2, 4, 32), (24, 7, -1), 0),
}


@pytest.mark.parametrize("case", list(TMA_STORE_CASES))
def test_tma_tile_store_skips_out_of_bound_elements(seed, case):
    """Shared image (swizzled per the tensor map) -> global box at coords: in-bound
    elements get the box's values, out-of-bound ones are not written (poison stays)."""
    shape, dtype, box, coords, swizzle = TMA_STORE_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    boxval = _rand_tensor(box, dtype, gen)
    raw = _np(boxval).reshape(-1).view(np.uint8)
    img = np.empty_like(raw)
    img[swz(np.arange(raw.size), swizzle)] = raw
    target = torch.full(shape, 0x7B, dtype=torch.uint8) if dtype == torch.uint8 else \
        torch.full(shape, -7777.0).to(dtype)
    before = _np(target).copy()
    desc = TensorMapDesc(target, box, swizzle)
    rank = len(box)
    coord_args = list(coords) + [0] * (3 - rank)
    store = (f"cp.async.bulk.tensor.{rank}d.global.shared::cta.bulk_group "
             f"[p_map, {{{', '.join(f'%r{10 + d}' for d in range(rank))}}}], [smem];")
    smem = (img.size + 1023) // 1024 * 1024        # copy loop: same trip count in every thread
    padded = np.concatenate([img, np.full(smem - img.size, 0xEE, dtype=np.uint8)])
    ptx = TMA_STORE.replace("SMEM", str(smem)).replace("STORE", store)
    emu.launch(ptx, "tma_store", (1,), (128,), [desc, torch.from_numpy(padded), smem, *coord_args])
    want = before.copy()
    c = list(reversed(coords))
    bv = _np(boxval)
    sl_dst, sl_src = [], []
    for d in range(rank):
        lo, hi = max(c[d], 0), min(c[d] + box[d], shape[d])
        assert lo < hi
        sl_dst.append(slice(lo, hi))
        sl_src.append(slice(lo - c[d], hi - c[d]))
    want[tuple(sl_dst)] = bv[tuple(sl_src)]
    assert (want != before).any() and (want == before).any()     # partly in, partly out
    np.testing.assert_array_equal(_np(target), want)


BULK = HEAD + """
.visible .entry bulk(.param .u64 p_x, .param .u64 p_out, .param .u64 p_early)
{
    .reg .pred %p<8>; .reg .b32 %r<16>; .reg .b64 %rd<16>;
    .shared .align 128 .b8 smem[512];
    .shared .align 8 .b64 bar;
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 0;
    ld.param.u64 %rd1, [p_x];
    ld.param.u64 %rd2, [p_out];
    @!%p1 bra I;
    mbarrier.init.shared::cta.b64 [bar], 1;
    fence.mbarrier_init.release.cluster;
I:
    bar.sync 0;
    @!%p1 bra W;
    mbarrier.arrive.expect_tx.shared::cta.b64 %rd3, [bar], 256;
    add.u64 %rd4, %rd1, 64;
    cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [smem+48], [%rd4], 256, [bar];
W:
    mbarrier.try_wait.parity.shared::cta.b64 %p2, [bar], 0;
    @!%p2 bra W;
    // shared bytes 32..47 were not part of the copy: still the uninitialised pattern
    ld.param.u64 %rd7, [p_early];
    ld.shared.v4.u32 {%r4, %r5, %r6, %r7}, [smem+32];
    @%p1 st.global.v4.u32 [%rd7], {%r4, %r5, %r6, %r7};
    @!%p1 bra DONE;
    add.u64 %rd5, %rd2, 32;
    cp.async.bulk.global.shared::cta.bulk_group [%rd5], [smem+48], 256;
    cp.async.bulk.commit_group;
    cp.async.bulk.wait_group 0;
DONE:
    ret;
}
"""


def test_plain_bulk_copies_global_shared_global(seed):
    """cp.async.bulk global->shared completing 256 transaction bytes on an mbarrier, then
    shared->global in a bulk async-group: out[32:288] = x[64:320], the rest untouched."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (512,), dtype=torch.uint8, generator=gen)
    out = torch.full((352,), 0xC3, dtype=torch.uint8)
    early = torch.zeros(16, dtype=torch.uint8)
    emu.launch(BULK, "bulk", (1,), (64,), [x, out, early])
    want = np.full(352, 0xC3, dtype=np.uint8)
    want[32:288] = x.numpy()[64:320]
    np.testing.assert_array_equal(out.numpy(), want)
    assert (early == 0xFF).all()


# =====================================================================================
# Found while writing the kernels above: CTA barrier after a divergent loop exit
# =====================================================================================

DIVERGENT_BARRIER = HEAD + """
.visible .entry k(.param .u64 p_out, .param .u32 p_n)
{
    .reg .pred %p<4>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 4 .u32 cnt;
    mov.u32 %r2, %tid.x;
    setp.eq.u32 %p2, %r2, 0;
    @%p2 st.shared.u32 [cnt], 0;
    barrier.sync 0;
    ld.param.u32 %r1, [p_n];
LOOP:                                   // per-thread trip count (lanes 0..15 run once more)
    setp.ge.u32 %p1, %r2, %r1;
    @%p1 bra DONE;
    add.u32 %r2, %r2, 64;
    bra.uni LOOP;
DONE:
    barrier.sync 0;
    mov.u32 %r2, %tid.x;
    atom.shared.add.u32 %r3, [cnt], 1;  // every thread counts itself between the barriers
    barrier.sync 0;
    ld.shared.u32 %r3, [cnt];           // so after the second barrier every thread sees 64
    ld.param.u64 %rd1, [p_out];
    mul.wide.u32 %rd2, %r2, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r3;
    ret;
}
"""


def test_barrier_sync_after_divergent_loop_waits_for_lagging_lanes():
    """barrier.sync (non-.aligned) may be reached by the threads of a warp at different
    times on sm_70+ (PTX ISA, bar/barrier: the executing thread waits for the non-exited
    threads of its warp, then the warp's arrival is marked) - the pattern nvcc emits for
    `for (...) {...} __syncthreads();`. The wgmma kernels above avoid it by giving every
    thread the same trip count in their copy loops."""
    out = torch.full((64,), -1, dtype=torch.int32)
    emu.launch(DIVERGENT_BARRIER, "k", (1,), (64,), [out, 80])
    assert (out == 64).all(), sorted(set(out.tolist()))
