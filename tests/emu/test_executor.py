"""The executor on small hand-written PTX: results, divergence, barriers, and the bugs
it must report with their place (out of bounds, deadlock, unsupported instruction)."""
import pytest
import torch

from pykernels import emu

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"

SCALE = HEAD + """
.visible .entry scale(.param .u64 p_x, .param .u64 p_y, .param .u32 p_n, .param .f32 p_a)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .f32 %f<4>; .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_x]; ld.param.u64 %rd2, [p_y]; ld.param.u32 %r1, [p_n]; ld.param.f32 %f1, [p_a];
    mov.u32 %r2, %ctaid.x; mov.u32 %r3, %ntid.x; mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    mul.wide.u32 %rd3, %r5, 4;
    add.u64 %rd4, %rd1, %rd3; add.u64 %rd5, %rd2, %rd3;
    ld.global.f32 %f2, [%rd4];
    fma.rn.f32 %f3, %f2, %f1, 0f3F800000;
    st.global.f32 [%rd5], %f3;
DONE:
    ret;
}
"""


def test_elementwise_kernel_and_stats(seed):
    x = torch.randn(300)
    y = torch.full_like(x, float("nan"))
    st = emu.launch(SCALE, "scale", (3,), (128,), [x, y, 300, 2.5])
    assert torch.equal(y, (x.double() * 2.5 + 1).float())   # fma: one rounding
    assert st.global_read == 300 * 4 and st.global_written == 300 * 4
    assert st.ctas == 3 and st.instructions["control"] > 0


def test_out_of_bounds_is_reported_with_its_place():
    x = torch.randn(100)
    y = torch.empty(100)
    with pytest.raises(emu.MemoryFault, match=r"scale, PTX line \d+ .*CTA \(0, 0, 0\), thread \(100, 0, 0\).*out-of-bounds"):
        emu.launch(SCALE, "scale", (1,), (128,), [x, y, 128, 1.0])   # n larger than the buffers


def test_wrong_argument_count_and_type():
    with pytest.raises(ValueError, match="takes 4 parameters"):
        emu.launch(SCALE, "scale", (1,), (32,), [torch.randn(4)])
    with pytest.raises(ValueError, match="p_a is .f32|got a float"):
        emu.launch(SCALE, "scale", (1,), (32,), [torch.randn(4), torch.randn(4), 2.0, 1.0])
    with pytest.raises(emu.EmuError, match="no kernel named 'nope'"):
        emu.launch(SCALE, "nope", (1,), (32,), [])


DEADLOCK = HEAD + """
.visible .entry stuck(.param .u64 p)
{
    .reg .pred %p<2>; .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 32;
    @%p1 bra SKIP;
    bar.sync 0;
SKIP:
    ret;
}
"""


def test_deadlock_lists_each_warp():
    # Warp 0 skips the barrier and exits; warps 1..3 wait at bar.sync 0 for it forever?
    # No: exited warps no longer count, so this completes. Make warp 0 wait elsewhere.
    emu.launch(DEADLOCK, "stuck", (1,), (128,), [0])
    two_barriers = DEADLOCK.replace("@%p1 bra SKIP;", "@%p1 bra OTHER;").replace(
        "SKIP:\n    ret;", "bra.uni END;\nOTHER:\n    bar.sync 1;\nEND:\n    ret;")
    with pytest.raises(emu.Deadlock, match=r"(?s)deadlock.*warp 0: 32 threads at PTX line \d+ \(bar.sync 1\).*warp 1"):
        emu.launch(two_barriers, "stuck", (1,), (128,), [0])


def test_unsupported_instruction_names_it_and_its_line():
    bad = HEAD + ".visible .entry k()\n{\n .reg .b32 %r<2>;\n    mov.u32 %r1, 1;\n    suld.b.1d.b32.trap {%r1}, [%r1, {%r1}];\n    ret;\n}\n"
    with pytest.raises(emu.UnsupportedInstruction, match=r"PTX line 8 .*suld.b.1d.b32.trap is not implemented"):
        emu.launch(bad, "k", (1,), (32,), [])


WARP = HEAD + """
.visible .entry warp_ops(.param .u64 p_out)
{
    .reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    shfl.sync.down.b32 %r2, %r1, 3, 31, -1;
    shfl.sync.idx.b32 %r3, %r1, 5, 31, -1;
    and.b32 %r4, %r1, 1;
    setp.eq.u32 %p1, %r4, 1;
    vote.sync.ballot.b32 %r5, %p1, -1;
    redux.sync.add.u32 %r6, %r1, -1;
    elect.sync %r7|%p2, -1;
    selp.u32 %r8, 1, 0, %p2;
    mul.wide.u32 %rd2, %r1, 24;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r2, %r3};
    st.global.v2.u32 [%rd3+8], {%r5, %r6};
    st.global.v2.u32 [%rd3+16], {%r7, %r8};
    ret;
}
"""


def test_warp_collectives():
    out = torch.full((64, 6), 7, dtype=torch.int32)
    emu.launch(WARP, "warp_ops", (1,), (64,), [out])
    t = torch.arange(64)
    lane = t % 32
    assert torch.equal(out[:, 0], torch.where(lane + 3 <= 31, t + 3, t).int())          # down, clamped
    assert torch.equal(out[:, 1], (t - lane + 5).int())                                   # idx
    assert (out[:, 2].view(torch.int32) == torch.tensor(0xAAAAAAAA - 2**32, dtype=torch.int32)).all()
    assert torch.equal(out[:32, 3], torch.full((32,), sum(range(32)), dtype=torch.int32))
    assert torch.equal(out[32:, 3], torch.full((32,), sum(range(32, 64)), dtype=torch.int32))
    assert (out[:, 4] == 0).all() and torch.equal(out[:, 5], (lane == 0).int())


MATCH = HEAD + """
.visible .entry match_ops(.param .u64 p_out)
{
    .reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    rem.u32 %r2, %r1, 3;                          // three value classes per warp
    match.any.sync.b32 %r3, %r2, -1;
    cvt.u64.u32 %rd4, %r2;
    mov.u32 %r4, 0;
    and.b32 %r10, %r1, 31;
    setp.lt.u32 %p3, %r10, 16;
    @%p3 match.any.sync.b64 %r4, %rd4, 0x0000FFFF;    // the low half of each warp only
    shr.u32 %r5, %r1, 5;                          // one value per warp: all agree
    match.all.sync.b32 %r6|%p1, %r5, -1;
    selp.u32 %r7, 1, 0, %p1;
    match.all.sync.b32 %r8|%p2, %r2, -1;          // values differ: 0, false
    selp.u32 %r9, 1, 0, %p2;
    mul.wide.u32 %rd2, %r1, 24;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r3, %r4};
    st.global.v2.u32 [%rd3+8], {%r6, %r7};
    st.global.v2.u32 [%rd3+16], {%r8, %r9};
    ret;
}
"""


def test_match_sync():
    out = torch.full((64, 6), 7, dtype=torch.int32)
    emu.launch(MATCH, "match_ops", (1,), (64,), [out])
    got = out.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    t = torch.arange(64)
    lane, cls = t % 32, t % 3

    def mask(lanes):
        return sum(1 << int(x) for x in lanes)
    for i in range(64):
        w = i // 32 * 32
        same = [j - w for j in range(w, w + 32) if cls[j] == cls[i]]
        assert got[i, 0] == mask(same), i
    for i in range(64):                         # mask 0x0000FFFF: only lanes 0..15 execute it
        w = i // 32 * 32
        want = mask(j - w for j in range(w, w + 16) if cls[j] == cls[i]) if lane[i] < 16 else 0
        assert got[i, 1] == want, i
    assert (got[:, 2] == 0xFFFFFFFF).all() and (got[:, 3] == 1).all()
    assert (got[:, 4] == 0).all() and (got[:, 5] == 0).all()


NAMED = HEAD + """
.visible .entry named(.param .u64 p_out, .param .u32 p_count_a, .param .u32 p_count_b)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out]; ld.param.u32 %r6, [p_count_a]; ld.param.u32 %r7, [p_count_b];
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 32;
    @%p1 bra PRODUCER;
    bar.sync 1, %r7;                    // consumers (warps 1..) wait for the producer's arrive
    mul.wide.u32 %rd2, %r1, 4; add.u64 %rd3, %rd1, %rd2;
    ld.global.u32 %r3, [%rd1];
    st.global.u32 [%rd3], %r3;
    ret;
PRODUCER:
    mov.u32 %r2, 777;
    st.global.u32 [%rd1], %r2;
    bar.arrive 1, %r6;
    ret;
}
"""


def test_named_barrier_producer_consumer_and_count_errors():
    out = torch.zeros(96, dtype=torch.int32)
    emu.launch(NAMED, "named", (1,), (96,), [out, 96, 96])
    assert (out[32:] == 777).all()                 # consumers ran after the producer's store
    with pytest.raises(emu.EmuError, match="thread counts differ between arrivals"):
        emu.launch(NAMED, "named", (1,), (96,), [torch.zeros(96, dtype=torch.int32), 64, 96])
    with pytest.raises(emu.EmuError, match="thread-count mismatch"):
        emu.launch(NAMED, "named", (1,), (96,), [torch.zeros(96, dtype=torch.int32), 32, 32])
    with pytest.raises(emu.Deadlock, match=r"bar.sync 1"):
        emu.launch(NAMED, "named", (1,), (96,), [torch.zeros(96, dtype=torch.int32), 128, 128])


ATOM2 = HEAD + """
.visible .entry atom2(.param .u64 p_a, .param .u64 p_b, .param .u64 p_old)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_a]; ld.param.u64 %rd2, [p_b]; ld.param.u64 %rd3, [p_old];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 1;
    setp.eq.u32 %p1, %r2, 1;
    selp.b64 %rd4, %rd2, %rd1, %p1;          // odd threads add into b, even ones into a
    atom.global.add.u32 %r3, [%rd4], %r1;
    mul.wide.u32 %rd5, %r1, 4; add.u64 %rd6, %rd3, %rd5;
    st.global.u32 [%rd6], %r3;
    ret;
}
"""


def test_one_atomic_instruction_over_two_buffers():
    a = torch.tensor([5], dtype=torch.int32)
    b = torch.tensor([7], dtype=torch.int32)
    old = torch.full((64,), -1, dtype=torch.int32)
    emu.launch(ATOM2, "atom2", (1,), (64,), [a, b, old])
    assert a.item() == 5 + sum(range(0, 64, 2)) and b.item() == 7 + sum(range(1, 64, 2))
    # the values returned are the running sums of one serialisation per buffer
    assert sorted(old[0::2].tolist())[0] == 5 and sorted(old[1::2].tolist())[0] == 7


def _bank_kernel(stride, vec):
    regs = "{%r2, %r2, %r2, %r2}" if vec == 4 else "%r2"
    return HEAD + f"""
.visible .entry banks()
{{
    .reg .b32 %r<4>;
    .shared .align 16 .b8 buf[8192];
    mov.u32 %r1, %tid.x;
    mul.lo.u32 %r1, %r1, {stride};
    mov.u32 %r3, buf;
    add.u32 %r1, %r1, %r3;
    mov.u32 %r2, 7;
    st.shared{'.v4' if vec == 4 else ''}.u32 [%r1], {regs};
    ret;
}}
"""


@pytest.mark.parametrize("stride,vec,conflicts", [
    (16, 4, 0),      # 32 x 16 contiguous bytes: 4 conflict-free 128-byte phases
    (4, 1, 0),       # one word per bank
    (128, 1, 31),    # every lane in bank 0: 32 wavefronts
    (32, 4, 4),      # 16 B at a 32 B stride: 2-way in each of the 4 phases of 8 lanes
])
def test_bank_conflict_model(stride, vec, conflicts):
    st = emu.launch(_bank_kernel(stride, vec), "banks", (1,), (32,), [])
    assert st.shared_accesses == 1 and st.bank_conflicts == conflicts



CLUSTER_LIVE_WARP = r"""
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out)
{
  .reg .pred p;
  .reg .b32 r<6>;
  .reg .b64 rd<3>;
  .shared .align 4 .b32 flag;
  mov.u32 r0, %tid.x;
  shr.u32 r4, r0, 5;               // warp
  setp.eq.u32 p, r4, 1;
  @p bra EARLY;                    // warp 1: arrive, then exit
  setp.eq.u32 p, r4, 2;
  @p bra SLOW;                     // warp 2: spin, set the flag, arrive, wait
  mov.u32 r3, 0;
SPIN0:
  add.u32 r3, r3, 1;
  setp.lt.u32 p, r3, 10;
  @p bra SPIN0;
  barrier.cluster.arrive.release.aligned;    // warp 0: spin a little, arrive, wait, read the flag
  barrier.cluster.wait.acquire.aligned;
  ld.shared.u32 r5, [flag];
  ld.param.u64 rd0, [out];
  mov.u32 r1, %cluster_ctarank;
  mul.wide.u32 rd1, r1, 4;
  add.s64 rd2, rd0, rd1;
  st.global.u32 [rd2], r5;
  ret;
EARLY:
  barrier.cluster.arrive.release.aligned;
  ret;
SLOW:
  mov.u32 r2, 0;
LOOP:
  add.u32 r2, r2, 1;
  setp.lt.u32 p, r2, 100;
  @p bra LOOP;
  st.shared.u32 [flag], 7;
  barrier.cluster.arrive.release.aligned;
  barrier.cluster.wait.acquire.aligned;
  ret;
}
"""

CLUSTER_EXITING_WARP = r"""
.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out)
{
  .reg .pred p;
  .reg .b32 r<4>;
  .reg .b64 rd<3>;
  mov.u32 r0, %tid.x;
  setp.ge.u32 p, r0, 32;       // warp 1 of each CTA: spin a little, then exit without arriving
  @p bra LATE;
  barrier.cluster.arrive.release.aligned;
  barrier.cluster.wait.acquire.aligned;
  ld.param.u64 rd0, [out];
  mov.u32 r1, %cluster_ctarank;
  mul.wide.u32 rd1, r1, 4;
  add.s64 rd2, rd0, rd1;
  st.global.u32 [rd2], 1;
  ret;
LATE:
  mov.u32 r2, 0;
LOOP:
  add.u32 r2, r2, 1;
  setp.lt.u32 p, r2, 100;
  @p bra LOOP;
  ret;
}
"""


def test_cluster_barrier_waits_for_every_live_thread():
    # warp 1 arrives and exits; warp 2 arrives last, after writing a flag: warp 0 must see it
    out = torch.zeros(2, dtype=torch.int32)
    emu.launch(CLUSTER_LIVE_WARP, "k", (2, 1, 1), (96, 1, 1), [out], cluster=(2, 1, 1))
    assert out.tolist() == [7, 7]


def test_cluster_barrier_completes_when_the_last_missing_thread_exits():
    out = torch.zeros(2, dtype=torch.int32)
    emu.launch(CLUSTER_EXITING_WARP, "k", (2, 1, 1), (64, 1, 1), [out], cluster=(2, 1, 1))
    assert out.tolist() == [1, 1]


TICKETS = HEAD + """
.visible .entry tickets(.param .u64 p_counter, .param .u64 p_out)
{
    .reg .b32 %r<8>; .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_counter]; ld.param.u64 %rd2, [p_out];
    mov.u32 %r1, %ctaid.x; mov.u32 %r2, %ntid.x; mov.u32 %r3, %tid.x;
    mad.lo.u32 %r4, %r1, %r2, %r3;
    atom.global.add.u32 %r5, [%rd1], 1;
    atom.global.add.u32 %r6, [%rd1], 1;
    mul.wide.u32 %rd3, %r4, 8;
    add.u64 %rd4, %rd2, %rd3;
    st.global.v2.u32 [%rd4], {%r5, %r6};
    ret;
}
"""


@pytest.mark.parametrize("schedule", ["lockstep", "cta_first", "cta_last"])
def test_schedules_order_the_ctas_of_a_cluster(schedule):
    # Two CTAs of one cluster (64 threads each) take two tickets each from one counter.
    # lockstep: both CTAs' threads sit at the same PC, so each instruction serves all
    # 128 threads: first tickets 0..127, second 128..255. cta_first / cta_last: one CTA
    # runs to its end before the other moves.
    counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((128, 2), -1, dtype=torch.int32)
    emu.launch(TICKETS, "tickets", (2,), (64,), [counter, out], cluster=(2, 1, 1), schedule=schedule)
    assert int(counter) == 256
    assert sorted(out.flatten().tolist()) == list(range(256))      # every ticket once
    first = {"lockstep": 0, "cta_first": 0, "cta_last": 1}[schedule]
    lead, other = out[64 * first:64 * first + 64], out[64 * (1 - first):64 * (1 - first) + 64]
    if schedule == "lockstep":
        assert out[:, 0].max() < 128 <= out[:, 1].min()
    else:
        assert lead.max() < 128 <= other.min()                  # the leader took all of its tickets first
        assert lead[:, 0].max() < lead[:, 1].min()


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        emu.launch(TICKETS, "tickets", (1,), (32,), [torch.zeros(1, dtype=torch.int32),
                                                     torch.zeros(32, 2, dtype=torch.int32)], schedule="random")


HANDOFF = HEAD + """
.visible .entry handoff(.param .u64 p_out, .param .u32 p_sync)
{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 4 .b32 box[128];
    ld.param.u64 %rd1, [p_out]; ld.param.u32 %r7, [p_sync];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 127;                 // lane within the warpgroup
    shl.b32 %r3, %r2, 2;
    mov.u32 %r4, box;
    add.u32 %r4, %r4, %r3;
    setp.lt.u32 %p1, %r1, 128;             // warpgroup 0 writes, warpgroup 1 reads
    @%p1 st.shared.u32 [%r4], %r1;
    setp.ne.u32 %p2, %r7, 0;
    @%p2 bar.sync 0;                       // the hand-off barrier (p_sync = 0: forgotten)
    @%p1 bra DONE;
    ld.shared.u32 %r5, [%r4];
    mul.wide.u32 %rd2, %r2, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r5;
DONE:
    ret;
}
"""


@pytest.mark.parametrize("schedule", ["lockstep", "wg_first", "wg_last"])
def test_warpgroup_schedules_expose_a_missing_barrier(schedule):
    # Warpgroup 0 stores to shared memory, warpgroup 1 loads it. With the barrier every
    # schedule gives the right values. Without it, lockstep still does (both warpgroups sit
    # at the same PCs, so the store runs first) and so does wg_first (warpgroup 0 runs to
    # its end first); wg_last lets warpgroup 1 read before warpgroup 0 wrote: the 0xFF fill.
    want = torch.arange(128, dtype=torch.int32)
    for sync in (1, 0):
        out = torch.full((128,), -7, dtype=torch.int32)
        emu.launch(HANDOFF, "handoff", (1,), (256,), [out, sync], schedule=schedule)
        if sync or schedule != "wg_last":
            assert torch.equal(out, want), (schedule, sync)
        else:
            assert (out == -1).all(), "wg_last should have read the unwritten shared memory"
