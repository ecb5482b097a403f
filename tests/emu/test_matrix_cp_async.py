"""ldmatrix / stmatrix and cp.async on small hand-written PTX kernels.

The expected fragments come from a numpy model written here from the ISA's description
(lane 8j+r gives the address of row r of matrix j; register j of lane l holds matrix j's
row l/4, columns 2(l%4) and 2(l%4)+1, low column in the low half; .trans transposes each
matrix), independent of pykernels.emu.hopper.layouts which the emulator uses.
"""
import re

import numpy as np
import pytest
import torch

from pykernels import emu

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"
TILE = 1024            # shared bytes per CTA of the ldmatrix/stmatrix kernels (64 rows of 16 B)
REGS = ["%r10", "%r11", "%r12", "%r13"]


def _vec_ld(num, regs, addr):
    return f"ld.global.u32 {regs[0]}, [{addr}];" if num == 1 else \
        f"ld.global.v{num}.u32 {{{', '.join(regs)}}}, [{addr}];"


def _vec_st(num, regs, addr):
    return f"st.global.u32 [{addr}], {regs[0]};" if num == 1 else \
        f"st.global.v{num}.u32 [{addr}], {{{', '.join(regs)}}};"


def ldmatrix_kernel(num, trans, generic=False, cutlass_order=False, guard=""):
    """Each CTA fills its 1024-byte tile from src (words cta*256 ..), then every thread
    gives the row address tile + offs[gtid] and the warp runs ldmatrix; register j of
    global thread g goes to out[g*num + j]."""
    regs = REGS[:num]
    shape = f"x{num}.m8n8" if cutlass_order else f"m8n8.x{num}"
    t = ".trans" if trans else ""
    if generic:
        addr = "cvt.u64.u32 %rd11, %r9;\n    cvta.shared.u64 %rd10, %rd11;"
        ins = f"ldmatrix.sync.aligned.{shape}{t}.b16 {{{', '.join(regs)}}}, [%rd10];"
    else:
        addr = ""
        ins = f"ldmatrix.sync.aligned.{shape}{t}.shared.b16 {{{', '.join(regs)}}}, [%r9];"
    return HEAD + f"""
.visible .entry ldm(.param .u64 p_src, .param .u64 p_offs, .param .u64 p_out)
{{
    .reg .pred %p<4>; .reg .b32 %r<32>; .reg .b64 %rd<16>;
    .shared .align 16 .b8 tile[{TILE}];
    ld.param.u64 %rd1, [p_src]; ld.param.u64 %rd2, [p_offs]; ld.param.u64 %rd3, [p_out];
    mov.u32 %r1, %tid.x; mov.u32 %r20, %ctaid.x; mov.u32 %r21, %ntid.x;
    mad.lo.u32 %r22, %r20, %r21, %r1;
    mov.u32 %r5, tile;
    mov.u32 %r2, %r1;
FILL:
    mad.lo.u32 %r3, %r20, {TILE // 4}, %r2;
    mul.wide.u32 %rd4, %r3, 4; add.u64 %rd5, %rd1, %rd4; ld.global.u32 %r4, [%rd5];
    shl.b32 %r6, %r2, 2; add.u32 %r7, %r5, %r6; st.shared.u32 [%r7], %r4;
    add.u32 %r2, %r2, %r21;
    setp.lt.u32 %p1, %r2, {TILE // 4};
    @%p1 bra FILL;
    bar.sync 0;
    mul.wide.u32 %rd6, %r22, 4; add.u64 %rd7, %rd2, %rd6; ld.global.u32 %r8, [%rd7];
    add.u32 %r9, %r5, %r8;
    {addr}
    setp.lt.u32 %p2, %r1, 16;
    {guard}{ins}
    mul.wide.u32 %rd8, %r22, {4 * num}; add.u64 %rd9, %rd3, %rd8;
    {_vec_st(num, regs, "%rd9")}
    ret;
}}
"""


def stmatrix_kernel(num, trans, cutlass_order=False):
    """Every thread loads its num registers from inp[g*num ..] and gives the row address
    tile + offs[g]; the warp runs stmatrix; then the CTA copies its tile to out."""
    regs = REGS[:num]
    shape = f"x{num}.m8n8" if cutlass_order else f"m8n8.x{num}"
    t = ".trans" if trans else ""
    return HEAD + f"""
.visible .entry stm(.param .u64 p_in, .param .u64 p_offs, .param .u64 p_out)
{{
    .reg .pred %p<4>; .reg .b32 %r<32>; .reg .b64 %rd<16>;
    .shared .align 16 .b8 tile[{TILE}];
    ld.param.u64 %rd1, [p_in]; ld.param.u64 %rd2, [p_offs]; ld.param.u64 %rd3, [p_out];
    mov.u32 %r1, %tid.x; mov.u32 %r20, %ctaid.x; mov.u32 %r21, %ntid.x;
    mad.lo.u32 %r22, %r20, %r21, %r1;
    mov.u32 %r5, tile;
    mul.wide.u32 %rd8, %r22, {4 * num}; add.u64 %rd9, %rd1, %rd8;
    {_vec_ld(num, regs, "%rd9")}
    mul.wide.u32 %rd6, %r22, 4; add.u64 %rd7, %rd2, %rd6; ld.global.u32 %r8, [%rd7];
    add.u32 %r9, %r5, %r8;
    stmatrix.sync.aligned.{shape}{t}.shared::cta.b16 [%r9], {{{', '.join(regs)}}};
    bar.sync 0;
    mov.u32 %r2, %r1;
COPY:
    shl.b32 %r6, %r2, 2; add.u32 %r7, %r5, %r6; ld.shared.u32 %r4, [%r7];
    mad.lo.u32 %r3, %r20, {TILE // 4}, %r2;
    mul.wide.u32 %rd4, %r3, 4; add.u64 %rd5, %rd3, %rd4; st.global.u32 [%rd5], %r4;
    add.u32 %r2, %r2, %r21;
    setp.lt.u32 %p1, %r2, {TILE // 4};
    @%p1 bra COPY;
    ret;
}}
"""


# ------------------------------------------------------------------ the ISA model
def model_fragments(tile_u16, offs, num, trans):
    """tile_u16: [TILE//2] uint16 of one CTA; offs: [32] byte offsets of one warp.
    Returns [32, num] uint32: register j of lane l."""
    out = np.zeros((32, num), dtype=np.uint32)
    for j in range(num):
        mat = np.array([[tile_u16[(int(offs[8 * j + r]) + 2 * c) // 2] for c in range(8)] for r in range(8)])
        for lane in range(32):
            g, q = lane // 4, lane % 4
            lo, hi = (mat[2 * q, g], mat[2 * q + 1, g]) if trans else (mat[g, 2 * q], mat[g, 2 * q + 1])
            out[lane, j] = int(lo) | (int(hi) << 16)
    return out


def model_store(tile_u16, offs, regs, num, trans):
    """Inverse: write lane l's registers [32, num] of one warp into tile_u16 (in place)."""
    for j in range(num):
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for h in range(2):
                v = (int(regs[lane, j]) >> (16 * h)) & 0xFFFF
                r, c = (2 * q + h, g) if trans else (g, 2 * q + h)
                tile_u16[(int(offs[8 * j + r]) + 2 * c) // 2] = v


def _random_offsets(ctas, threads, num):
    """Per CTA a random permutation of the 64 16-byte row slots; lanes that supply no
    address (8*num and above) get a misaligned, out-of-range offset that must be ignored."""
    offs = np.zeros((ctas, threads), dtype=np.int64)
    for c in range(ctas):
        offs[c] = torch.randperm(TILE // 16)[:threads].numpy() * 16
    lane = np.arange(threads) % 32
    offs[:, lane >= 8 * num] = 100_003
    return offs


def _u16(x):
    return torch.from_numpy(np.ascontiguousarray(x).view(np.int16))


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_matches_isa_model(seed, num, trans):
    ctas, threads = 2, 64
    src = torch.randint(-2**15, 2**15, (ctas * TILE // 2,), dtype=torch.int16)
    offs = _random_offsets(ctas, threads, num)
    out = torch.full((ctas * threads * num,), -7, dtype=torch.int32)
    st = emu.launch(ldmatrix_kernel(num, trans), "ldm", (ctas,), (threads,),
                    [src, torch.from_numpy(offs.astype(np.int32).reshape(-1)), out])
    got = out.numpy().view(np.uint32).reshape(ctas, threads, num)
    tiles = src.numpy().view(np.uint16).reshape(ctas, TILE // 2)
    for c in range(ctas):
        for w in range(threads // 32):
            want = model_fragments(tiles[c], offs[c, 32 * w:32 * w + 32], num, trans)
            np.testing.assert_array_equal(got[c, 32 * w:32 * w + 32], want, err_msg=f"CTA {c} warp {w}")
    assert st.instructions["memory.shared"] >= ctas * 2    # one ldmatrix per warp at least


@pytest.mark.parametrize("generic,cutlass_order", [(True, False), (False, True), (True, True)])
def test_ldmatrix_generic_address_and_spelling(seed, generic, cutlass_order):
    src = torch.randint(-2**15, 2**15, (TILE // 2,), dtype=torch.int16)
    offs = _random_offsets(1, 32, 4)
    out = torch.zeros(32 * 4, dtype=torch.int32)
    emu.launch(ldmatrix_kernel(4, True, generic=generic, cutlass_order=cutlass_order), "ldm", (1,), (32,),
               [src, torch.from_numpy(offs.astype(np.int32).reshape(-1)), out])
    want = model_fragments(src.numpy().view(np.uint16), offs[0], 4, True)
    np.testing.assert_array_equal(out.numpy().view(np.uint32).reshape(32, 4), want)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_stmatrix_is_the_inverse(seed, num, trans):
    ctas, threads = 2, 64
    inp = torch.randint(-2**31, 2**31 - 1, (ctas * threads * num,), dtype=torch.int32)
    offs = _random_offsets(ctas, threads, num)
    out = torch.zeros(ctas * TILE // 4, dtype=torch.int32)
    emu.launch(stmatrix_kernel(num, trans, cutlass_order=num == 2), "stm", (ctas,), (threads,),
               [inp, torch.from_numpy(offs.astype(np.int32).reshape(-1)), out])
    regs = inp.numpy().view(np.uint32).reshape(ctas, threads, num)
    got = out.numpy().view(np.uint16).reshape(ctas, TILE // 2)
    for c in range(ctas):
        want = np.full(TILE // 2, 0xFFFF, dtype=np.uint16)     # rows not stored keep the 0xFF fill
        for w in range(threads // 32):
            model_store(want, offs[c, 32 * w:32 * w + 32], regs[c, 32 * w:32 * w + 32], num, trans)
        np.testing.assert_array_equal(got[c], want, err_msg=f"CTA {c}")
    # round trip: ldmatrix of what stmatrix wrote gives the registers back
    back = torch.full((ctas * threads * num,), -1, dtype=torch.int32)
    emu.launch(ldmatrix_kernel(num, trans), "ldm", (ctas,), (threads,),
               [out, torch.from_numpy(offs.astype(np.int32).reshape(-1)), back])
    assert torch.equal(back, inp)


def test_ldmatrix_bank_conflicts_are_counted(seed):
    src = torch.randint(-2**15, 2**15, (TILE // 2,), dtype=torch.int16)
    lane = np.arange(32)
    rows = [(lane % 8) * 16 + (lane // 8) * 128,    # each matrix 128 contiguous bytes: no conflict
            (lane % 8) * 128 + (lane // 8) * 16]    # rows 128 B apart: 8 words in each bank
    conflicts = []
    for offs in rows:
        out = torch.zeros(32 * 4, dtype=torch.int32)
        st = emu.launch(ldmatrix_kernel(4, False), "ldm", (1,), (32,),
                        [src, torch.from_numpy(offs.astype(np.int32)), out])
        want = model_fragments(src.numpy().view(np.uint16), offs, 4, False)
        np.testing.assert_array_equal(out.numpy().view(np.uint32).reshape(32, 4), want)
        conflicts.append(st.bank_conflicts)
    assert conflicts == [0, 4 * 7]


def test_misaligned_row_address_is_a_memory_fault():
    src = torch.randint(-2**15, 2**15, (TILE // 2,), dtype=torch.int16)
    offs = _random_offsets(1, 32, 4)
    offs[0, 13] += 8
    out = torch.zeros(32 * 4, dtype=torch.int32)
    with pytest.raises(emu.MemoryFault, match=r"ldm, PTX line \d+ \(ldmatrix.sync.aligned.m8n8.x4.shared.b16"
                                              r".*thread \(13, 0, 0\).*misaligned row address"):
        emu.launch(ldmatrix_kernel(4, False), "ldm", (1,), (32,),
                   [src, torch.from_numpy(offs.astype(np.int32).reshape(-1)), out])
    # stmatrix too
    with pytest.raises(emu.MemoryFault, match=r"stm, PTX line \d+ \(stmatrix.*thread \(13, 0, 0\).*misaligned"):
        emu.launch(stmatrix_kernel(4, True), "stm", (1,), (32,),
                   [torch.zeros(32 * 4, dtype=torch.int32), torch.from_numpy(offs.astype(np.int32).reshape(-1)),
                    torch.zeros(TILE // 4, dtype=torch.int32)])


def test_ldmatrix_by_part_of_a_warp_is_reported():
    src = torch.randint(-2**15, 2**15, (TILE // 2,), dtype=torch.int16)
    offs = _random_offsets(1, 32, 1)
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(emu.EmuError, match=r"PTX line \d+ .*ldmatrix.sync.aligned.m8n8.x1.shared.b16 is \.aligned"
                                           r".*only 16 threads"):
        emu.launch(ldmatrix_kernel(1, False, guard="@%p2 "), "ldm", (1,), (32,),
                   [src, torch.from_numpy(offs.astype(np.int32).reshape(-1)), out])


# ------------------------------------------------------------------ cp.async
THREADS = 64
ROW = 16


def cp_async_kernel(body):
    """Thread t: %r4 = &tile[16t], %r6 = &tile2[16t] (shared), %rd5 = src + 16t,
    %rd6 = src + 1024 + 16t (global), %r7/%r8 = ss[2t], ss[2t+1], %p1 = t odd.
    READ(k) stores the thread's two shared rows to out[k][t] (32 bytes)."""
    def read(k):
        return (f"ld.shared.v4.u32 {{%r10, %r11, %r12, %r13}}, [%r4];\n"
                f"    ld.shared.v4.u32 {{%r14, %r15, %r16, %r17}}, [%r6];\n"
                f"    add.u64 %rd11, %rd10, {k * THREADS * 32};\n"
                f"    st.global.v4.u32 [%rd11], {{%r10, %r11, %r12, %r13}};\n"
                f"    st.global.v4.u32 [%rd11+16], {{%r14, %r15, %r16, %r17}};")
    body = re.sub(r"READ\((\d)\)", lambda mo: read(int(mo.group(1))), body)
    return HEAD + f"""
.visible .entry cpa(.param .u64 p_src, .param .u64 p_ss, .param .u64 p_out)
{{
    .reg .pred %p<4>; .reg .b32 %r<32>; .reg .b64 %rd<32>;
    .shared .align 16 .b8 tile[{THREADS * ROW}];
    .shared .align 16 .b8 tile2[{THREADS * ROW}];
    .shared .align 8 .b64 bar;
    ld.param.u64 %rd1, [p_src]; ld.param.u64 %rd2, [p_ss]; ld.param.u64 %rd3, [p_out];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 16; add.u64 %rd5, %rd1, %rd4; add.u64 %rd6, %rd5, {THREADS * ROW};
    mov.u32 %r2, tile; shl.b32 %r3, %r1, 4; add.u32 %r4, %r2, %r3;
    mov.u32 %r5, tile2; add.u32 %r6, %r5, %r3;
    mul.wide.u32 %rd7, %r1, 8; add.u64 %rd8, %rd2, %rd7; ld.global.v2.u32 {{%r7, %r8}}, [%rd8];
    and.b32 %r9, %r1, 1; setp.eq.u32 %p1, %r9, 1;
    mul.wide.u32 %rd9, %r1, 32; add.u64 %rd10, %rd3, %rd9;
    {body}
    ret;
}}
"""


GROUPS = cp_async_kernel("""
    cp.async.ca.shared.global [%r4], [%rd5], 4;
    cp.async.ca.shared::cta.global [%r4+4], [%rd5+4], 4, %p1;
    cp.async.ca.shared.global.L2::128B [%r4+8], [%rd5+8], 8, %r7;
    cp.async.commit_group;
    mov.b64 %rd20, 0;
    cp.async.cg.shared.global.L2::cache_hint [%r6], [%rd6], 16, %r8, %rd20;
    cp.async.commit_group;
    READ(0)
    cp.async.wait_group 1;
    READ(1)
    cp.async.wait_group 0;
    READ(2)
""")


def _src():
    # bytes 1..254: never 0x00 (the zero fill) nor 0xFF (the unwritten-shared fill)
    return torch.randint(1, 255, (2 * THREADS * ROW,), dtype=torch.uint8)


def _rows(out, k):
    return out.numpy().reshape(3, THREADS, 2, ROW)[k]


def test_cp_async_groups_zero_fill_and_wait_group(seed):
    src = _src()
    ss = torch.stack([torch.randint(0, 9, (THREADS,)), torch.randint(0, 17, (THREADS,))], 1).int()
    ss[:4] = torch.tensor([[0, 0], [8, 16], [3, 5], [8, 0]], dtype=torch.int32)   # the edges, always
    out = torch.zeros(3 * THREADS * 32, dtype=torch.uint8)
    st = emu.launch(GROUPS, "cpa", (1,), (THREADS,), [src, ss.reshape(-1), out])
    s = src.numpy().reshape(2, THREADS, ROW)
    n8, n16 = ss[:, 0].numpy(), ss[:, 1].numpy()
    tile = np.full((THREADS, ROW), 0xFF, dtype=np.uint8)
    tile2 = np.full((THREADS, ROW), 0xFF, dtype=np.uint8)
    # before any wait: nothing has landed
    np.testing.assert_array_equal(_rows(out, 0)[:, 0], tile)
    np.testing.assert_array_equal(_rows(out, 0)[:, 1], tile2)
    # wait_group 1: only the older group (the three .ca copies)
    for t in range(THREADS):
        tile[t, 0:4] = s[0, t, 0:4]
        tile[t, 4:8] = 0 if t % 2 else s[0, t, 4:8]           # ignore-src on odd threads
        tile[t, 8:16] = 0
        tile[t, 8:8 + n8[t]] = s[0, t, 8:8 + n8[t]]           # src-size, zero-filled
    np.testing.assert_array_equal(_rows(out, 1)[:, 0], tile)
    np.testing.assert_array_equal(_rows(out, 1)[:, 1], tile2)
    # wait_group 0: the .cg copy too
    for t in range(THREADS):
        tile2[t] = 0
        tile2[t, :n16[t]] = s[1, t, :n16[t]]
    np.testing.assert_array_equal(_rows(out, 2)[:, 0], tile)
    np.testing.assert_array_equal(_rows(out, 2)[:, 1], tile2)
    copied = THREADS * 4 + (THREADS // 2) * 4 + int(n8.sum()) + int(n16.sum())
    assert st.global_read == THREADS * 8 + copied          # the ss loads + the bytes really copied
    assert st.instructions["async_copy"] == 2 * 8          # 2 warps x 8 cp.async.* instructions


def test_cp_async_uncommitted_copies_wait_for_wait_all(seed):
    src = _src()
    ss = torch.full((THREADS, 2), 16, dtype=torch.int32)
    out = torch.zeros(3 * THREADS * 32, dtype=torch.uint8)
    kernel = cp_async_kernel("""
    cp.async.ca.shared.global [%r4], [%rd5], 16;
    cp.async.wait_group 0;
    READ(0)
    cp.async.wait_all;
    READ(1)
    cp.async.cg.shared.global [%r6], [%rd6], 16;
    cp.async.commit_group;
    cp.async.commit_group;
    cp.async.wait_group 1;
    READ(2)
""")
    emu.launch(kernel, "cpa", (1,), (THREADS,), [src, ss.reshape(-1), out])
    s = src.numpy().reshape(2, THREADS, ROW)
    assert (_rows(out, 0) == 0xFF).all()                   # not committed: wait_group 0 does not wait
    np.testing.assert_array_equal(_rows(out, 1)[:, 0], s[0])
    assert (_rows(out, 1)[:, 1] == 0xFF).all()
    np.testing.assert_array_equal(_rows(out, 2)[:, 1], s[1])   # older than the (empty) newest group


def test_cp_async_bad_source_is_reported_at_its_line_unless_src_size_is_zero(seed):
    src = _src()[:-ROW].clone()                            # thread 63's second row is out of bounds
    ss = torch.full((THREADS, 2), 16, dtype=torch.int32)
    ss[:, 0] = 8
    out = torch.zeros(3 * THREADS * 32, dtype=torch.uint8)
    with pytest.raises(emu.MemoryFault, match=r"cpa, PTX line \d+ \(cp.async.cg.shared.global.L2::cache_hint"
                                              r".*thread \(63, 0, 0\).*out-of-bounds"):
        emu.launch(GROUPS, "cpa", (1,), (THREADS,), [src, ss.reshape(-1), out])
    ss[63, 1] = 0                                          # src-size 0: nothing is read
    emu.launch(GROUPS, "cpa", (1,), (THREADS,), [src, ss.reshape(-1), out])
    assert (_rows(out, 2)[63, 1] == 0).all()
    bad = cp_async_kernel("cp.async.ca.shared.global [%r4+4], [%rd5], 8;")
    with pytest.raises(emu.MemoryFault, match=r"PTX line \d+ \(cp.async.ca.*thread \(0, 0, 0\).*misaligned"):
        emu.launch(bad, "cpa", (1,), (THREADS,), [_src(), ss.reshape(-1), out])


MBAR_WAIT = cp_async_kernel("""
    setp.eq.u32 %p2, %r1, 0;
    @%p2 mbarrier.init.shared.b64 [bar], %r20;
    bar.sync 0;
    cp.async.cg.shared.global [%r4], [%rd5], 16;
    cp.async.mbarrier.arrive.noinc.shared.b64 [bar];
WAIT:
    mbarrier.try_wait.parity.shared.b64 %p3, [bar], 0;
    @!%p3 bra WAIT;
    READ(0)
""").replace("ld.param.u64 %rd1, [p_src];", "mov.u32 %r20, 64; ld.param.u64 %rd1, [p_src];")


def test_cp_async_mbarrier_arrive_completes_the_phase_after_the_copies(seed):
    assert THREADS == 64
    src = _src()
    out = torch.zeros(3 * THREADS * 32, dtype=torch.uint8)
    emu.launch(MBAR_WAIT, "cpa", (1,), (THREADS,), [src, torch.zeros(2 * THREADS, dtype=torch.int32), out])
    # the barrier (64 expected arrivals, one .noinc arrive per thread) completes only when
    # every thread's copy has landed, so every thread reads its data after the wait
    np.testing.assert_array_equal(_rows(out, 0)[:, 0], src.numpy().reshape(2, THREADS, ROW)[0])
