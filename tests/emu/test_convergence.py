"""Warp convergence at .sync warp collectives: a lane that lags behind its warp (still in
an inner loop of the previous iteration) is waited for, as on the hardware; a mask lane
that never arrives is a deadlock naming the instruction and the lanes."""
import pytest
import torch

from pykernels import emu

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"
SCHEDULES = ["lockstep", "cta_first", "cta_last", "wg_first", "wg_last"]

# A CUTLASS-style producer loop: every iteration the warp elects a leader that counts the
# iteration (atomic), records the elected lane and issues one bulk copy completing on the
# CTA's mbarrier (one arrival per warp and phase); the whole warp then waits for the phase.
# Lane 0 does extra work first (an inner loop of it+2 iterations), so it reaches
# elect.sync after the other lanes: without convergence lane 1 would be elected in that
# iteration and lane 0 again on its own, which counts twice and arrives three times.
PRODUCER = HEAD + """
.visible .entry producer(.param .u64 p_count, .param .u64 p_leader, .param .u64 p_src, .param .u64 p_out,
                         .param .u32 p_iters)
{
    .reg .pred %p<5>; .reg .b32 %r<24>; .reg .b64 %rd<16>;
    .shared .align 128 .b8 stage[32];
    .shared .align 8 .b64 bar;
    ld.param.u64 %rd1, [p_count]; ld.param.u64 %rd2, [p_leader]; ld.param.u64 %rd3, [p_src];
    ld.param.u64 %rd4, [p_out]; ld.param.u32 %r20, [p_iters];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;                    // lane
    shr.u32 %r3, %r1, 5;                     // warp
    mov.u32 %r13, %ctaid.x;
    shl.b32 %r14, %r13, 1;
    add.u32 %r14, %r14, %r3;                 // global warp index
    mul.lo.u32 %r14, %r14, %r20;             // first counter of this warp
    mov.u32 %r10, bar;
    mov.u32 %r11, stage;
    shl.b32 %r15, %r3, 4;
    add.u32 %r11, %r11, %r15;                // this warp's 16-byte slot
    setp.eq.u32 %p1, %r1, 0;
    @%p1 mbarrier.init.shared.b64 [%r10], 2;
    bar.sync 0;
    mov.u32 %r4, 0;                          // iteration
    mov.u32 %r12, 0;                         // phase
LOOP:
    setp.ne.u32 %p2, %r2, 0;
    @%p2 bra ELECT;
    add.u32 %r5, %r4, 2;
INNER:
    sub.u32 %r5, %r5, 1;
    setp.ne.u32 %p3, %r5, 0;
    @%p3 bra INNER;
ELECT:
    elect.sync %r6|%p1, -1;
    @!%p1 bra WAIT;
    add.u32 %r7, %r14, %r4;
    mul.wide.u32 %rd5, %r7, 4;
    add.u64 %rd6, %rd1, %rd5;
    atom.global.add.u32 %r8, [%rd6], 1;
    add.u64 %rd7, %rd2, %rd5;
    st.global.u32 [%rd7], %r6;
    mbarrier.arrive.expect_tx.shared.b64 _, [%r10], 16;
    mul.wide.u32 %rd8, %r4, 16;
    add.u64 %rd9, %rd3, %rd8;
    cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r11], [%rd9], 16, [%r10];
WAIT:
    mbarrier.try_wait.parity.shared.b64 %p3, [%r10], %r12;
    @!%p3 bra WAIT;
    xor.b32 %r12, %r12, 1;
    add.u32 %r4, %r4, 1;
    setp.lt.u32 %p2, %r4, %r20;
    @%p2 bra LOOP;
    setp.ne.u32 %p2, %r2, 0;
    @%p2 bra DONE;
    ld.shared.v4.u32 {%r16, %r17, %r18, %r19}, [%r11];    // the last iteration's copy landed
    shl.b32 %r15, %r13, 1;
    add.u32 %r15, %r15, %r3;
    mul.wide.u32 %rd10, %r15, 16;
    add.u64 %rd11, %rd4, %rd10;
    st.global.v4.u32 [%rd11], {%r16, %r17, %r18, %r19};
DONE:
    ret;
}
"""


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_elect_in_a_divergent_producer_loop_elects_one_leader_per_iteration(seed, schedule):
    iters = 6
    count = torch.zeros(2 * 2 * iters, dtype=torch.int32)
    leader = torch.full((2 * 2 * iters,), -1, dtype=torch.int32)
    src = torch.randint(-2**31, 2**31 - 1, (iters, 4), dtype=torch.int32)
    out = torch.full((4, 4), -7, dtype=torch.int32)
    emu.launch(PRODUCER, "producer", (2,), (64,), [count, leader, src, out, iters], cluster=(2, 1, 1),
               schedule=schedule)
    assert count.tolist() == [1] * len(count)          # one leader, one copy, per warp and iteration
    assert leader.tolist() == [0] * len(leader)        # the lowest lane of the full mask
    assert torch.equal(out, src[-1].expand(4, 4))


PARTIAL = HEAD + """
.visible .entry halves(.param .u64 p_out)
{
    .reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    setp.lt.u32 %p1, %r2, 16;
    selp.b32 %r3, 0x0000FFFF, 0xFFFF0000, %p1;   // each half-warp syncs on its own mask
    and.b32 %r9, %r2, 15;
    setp.ne.u32 %p2, %r9, 3;
    @%p2 bra GO;
    mov.u32 %r4, 5;                              // lanes 3 and 19 lag (an inner loop)
LAG:
    sub.u32 %r4, %r4, 1;
    setp.ne.u32 %p2, %r4, 0;
    @%p2 bra LAG;
GO:
    mul.lo.u32 %r5, %r2, 3;
    shfl.sync.idx.b32 %r6, %r5, 2, 0x101f, %r3;  // lane 2 of each 16-lane segment
    and.b32 %r7, %r2, 1;
    setp.eq.u32 %p3, %r7, 1;
    vote.sync.ballot.b32 %r8, %p3, %r3;
    mul.wide.u32 %rd2, %r1, 8;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r6, %r8};
    ret;
}
"""


@pytest.mark.parametrize("schedule", ["lockstep", "wg_last"])
def test_shfl_and_vote_with_partial_masks(schedule):
    out = torch.full((64, 2), -1, dtype=torch.int64).to(torch.int32)
    emu.launch(PARTIAL, "halves", (1,), (64,), [out], schedule=schedule)
    lane = torch.arange(64) % 32
    low = lane < 16
    assert torch.equal(out[:, 0], torch.where(low, 2 * 3, 18 * 3).int())
    ballot = torch.where(low, 0x0000AAAA, 0xAAAA0000 - 2**32).int()
    assert torch.equal(out[:, 1], ballot)


def _elect_kernel(lane5):
    """Lane 5 does `lane5` instead of the warp's elect.sync."""
    return HEAD + f"""
.visible .entry k(.param .u64 p_out)
{{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 5;
    @%p1 bra ODD;
    elect.sync %r2|%p2, -1;
    st.global.u32 [%rd1], %r2;
    ret;
ODD:
    {lane5}
    ret;
}}
"""


def test_elect_waiting_for_a_lane_at_another_instruction_is_a_deadlock():
    with pytest.raises(emu.Deadlock, match=r"(?s)elect.sync \(PTX line 12\) waits for lanes \[5\].*"
                                           r"lanes \[5\]\) at PTX line 16 .*waits for lanes \[0, 1, 2, 3, 4, 6"):
        emu.launch(_elect_kernel("elect.sync %r2|%p2, -1;"), "k", (1,), (32,), [torch.zeros(1, dtype=torch.int32)])


def test_elect_whose_mask_names_an_exited_lane_is_a_deadlock():
    with pytest.raises(emu.Deadlock, match=r"elect.sync waits for every thread of its membermask 0xffffffff, "
                                           r"but lanes \[5\] have exited"):
        emu.launch(_elect_kernel(""), "k", (1,), (32,), [torch.zeros(1, dtype=torch.int32)])


def test_shfl_skips_exited_lanes_of_its_mask():
    ptx = HEAD + """
.visible .entry k(.param .u64 p_out)
{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    setp.ge.u32 %p1, %r1, 16;
    @%p1 ret;                                    // the upper half exits
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;       // PTX: waits for the non-exited lanes only
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
    ret;
}
"""
    out = torch.full((16,), -1, dtype=torch.int32)
    emu.launch(ptx, "k", (1,), (32,), [out])
    assert out.tolist() == [i ^ 1 for i in range(16)]


def test_bar_warp_sync_orders_a_lane_behind_its_warp():
    # lane 0 stores after an inner loop; the others read after bar.warp.sync: they must see it
    ptx = HEAD + """
.visible .entry k(.param .u64 p_out)
{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 4 .b32 box;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra SYNC;
    mov.u32 %r3, 4;
LAG:
    sub.u32 %r3, %r3, 1;
    setp.ne.u32 %p2, %r3, 0;
    @%p2 bra LAG;
    st.shared.u32 [box], 4242;
SYNC:
    bar.warp.sync -1;
    ld.shared.u32 %r2, [box];
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
    ret;
}
"""
    out = torch.zeros(32, dtype=torch.int32)
    emu.launch(ptx, "k", (1,), (32,), [out])
    assert out.tolist() == [4242] * 32


def test_elect_with_two_half_warp_masks_elects_one_leader_per_half():
    ptx = HEAD + """
.visible .entry k(.param .u64 p_out)
{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 16;
    selp.b32 %r3, 0x0000FFFF, 0xFFFF0000, %p1;
    elect.sync %r2|%p2, %r3;
    selp.u32 %r4, 1, 0, %p2;
    mul.wide.u32 %rd2, %r1, 8;
    add.u64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r2, %r4};
    ret;
}
"""
    out = torch.full((32, 2), -1, dtype=torch.int32)
    emu.launch(ptx, "k", (1,), (32,), [out])
    lane = torch.arange(32)
    assert torch.equal(out[:, 0], torch.where(lane < 16, 0, 16).int())
    assert torch.equal(out[:, 1], ((lane == 0) | (lane == 16)).int())
