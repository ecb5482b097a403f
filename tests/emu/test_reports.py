"""What the emulator reports instead of hanging or crashing: spin-waits that cannot make
progress, instruction forms it does not know, and the mbarrier state queries."""
import time

import pytest
import torch

from pykernels import emu
from pykernels.emu.progress import QUIET_DEADLOCK

LATE = QUIET_DEADLOCK + 500       # a setter busy for longer than the quiet bound

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"

# Warp 0 polls a flag (with a spin counter, as the EP kernels do); warp 1 sets it after
# `p_delay` iterations of a loop that polls nothing, unless p_delay is 0 (then nobody does).
SPIN = HEAD + """
.visible .entry spin(.param .u64 p_flag, .param .u64 p_out, .param .u32 p_delay)
{
    .reg .pred %p<4>; .reg .b32 %r<12>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_flag]; ld.param.u64 %rd2, [p_out]; ld.param.u32 %r9, [p_delay];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    setp.ne.u32 %p3, %r2, 0;
    @%p3 bra SETTER;                    // CTA 1 sets the flag
    mov.u32 %r5, 0;
POLL:
    ld.volatile.global.u32 %r3, [%rd1];
    add.u32 %r5, %r5, 1;
    setp.eq.u32 %p1, %r3, 0;
    @%p1 bra POLL;
    st.global.u32 [%rd2], %r3;
    ret;
SETTER:
    setp.eq.u32 %p2, %r9, 0;
    @%p2 bra END;
    setp.ne.u32 %p2, %r1, 0;
    @%p2 bra END;
    mov.u32 %r6, %r9;
WORK:
    sub.u32 %r6, %r6, 1;
    setp.ne.u32 %p2, %r6, 0;
    @%p2 bra WORK;
    st.volatile.global.u32 [%rd1], 77;
END:
    ret;
}
"""


def test_a_spin_on_a_flag_nobody_sets_is_a_deadlock_within_seconds():
    flag = torch.zeros(4, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    start = time.monotonic()
    with pytest.raises(emu.Deadlock, match=r"(?s)livelock.*CTA \(0, 0, 0\) warp 0: 32 threads spin in the loop at "
                                           rf"PTX lines 15-18 .*polling global address {flag.data_ptr():#x}"):
        emu.launch(SPIN, "spin", (2,), (32,), [flag, out, 0], co_resident=True)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("schedule", ["lockstep", "cta_first", "cta_last"])
def test_a_spin_that_another_cta_ends_runs_to_completion(schedule):
    # The setter works longer than the quiet bound before it stores; under
    # cta_first the spinning CTA 0 leads and yields to CTA 1 once its loop is quiet.
    flag = torch.zeros(4, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    emu.launch(SPIN, "spin", (2,), (32,), [flag, out, LATE], co_resident=True, cluster=(2, 1, 1),
               schedule=schedule)
    assert out.item() == 77


def test_mbarrier_pending_count_of_arrival_tokens():
    ptx = HEAD + """
.visible .entry k(.param .u64 p_out)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .b64 %rd<8>;
    .shared .align 8 .b64 bar;
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, bar;
    setp.eq.u32 %p1, %r1, 0;
    @%p1 mbarrier.init.shared.b64 [%r2], 3;
    bar.sync 0;
    setp.lt.u32 %p1, %r1, 3;
    @!%p1 bra DONE;
    mbarrier.arrive.shared.b64 %rd2, [%r2];
    mbarrier.pending_count.b64 %r3, %rd2;
    mul.wide.u32 %rd3, %r1, 4;
    add.u64 %rd4, %rd1, %rd3;
    st.global.u32 [%rd4], %r3;
DONE:
    ret;
}
"""
    out = torch.full((3,), -1, dtype=torch.int32)
    emu.launch(ptx, "k", (1,), (32,), [out])
    assert out.tolist() == [2, 1, 0]          # arrivals in thread order: 3 expected, one each


@pytest.mark.parametrize("line", [
    "shfl.sync.b32 %r2, %r1, 1, 31, -1;",        # no shuffle mode: the handler cannot pick one
    "redux.sync.u32 %r2, %r1, -1;",               # no reduction operator
    "mbarrier.init.shared.b64 %r2, 1;",           # no barrier address operand
])
def test_malformed_instruction_forms_are_unsupported_with_their_line(line):
    ptx = HEAD + ".visible .entry k()\n{\n .reg .b32 %r<4>;\n    mov.u32 %r1, 1;\n    " + line + "\n    ret;\n}\n"
    with pytest.raises(emu.UnsupportedInstruction, match=r"PTX line 8 .*not supported by the emulator"):
        emu.launch(ptx, "k", (1,), (32,), [])


def test_unparsable_instruction_is_unsupported_with_its_line():
    ptx = HEAD + ".visible .entry k()\n{\n .reg .b32 %r<4>;\n    mov.u32 %r1, 1;\n    ld.global.u32 %r2, [%r1, ];\n    ret;\n}\n"
    with pytest.raises(emu.UnsupportedInstruction, match=r"line 8: cannot parse"):
        emu.launch(ptx, "k", (1,), (32,), [])


SCALE = HEAD + """
.visible .entry scale(.param .u64 p_x, .param .u64 p_y, .param .u32 p_n)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .f32 %f<4>; .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [p_x]; ld.param.u64 %rd2, [p_y]; ld.param.u32 %r1, [p_n];
    mov.u32 %r4, %tid.x;
    setp.ge.u32 %p1, %r4, %r1;
    @%p1 bra DONE;
    mul.wide.u32 %rd3, %r4, 4;
    add.u64 %rd4, %rd1, %rd3; add.u64 %rd5, %rd2, %rd3;
    ld.global.f32 %f2, [%rd4];
    add.f32 %f3, %f2, %f2;
    st.global.f32 [%rd5], %f3;
DONE:
    ret;
}
"""


def test_access_past_a_view_inside_its_storage_names_the_argument(seed):
    storage = torch.randn(256)
    x, y = storage[:100], storage[100:200]           # two arguments, views of one storage
    emu.launch(SCALE, "scale", (1,), (128,), [x, y, 100])
    assert torch.equal(y, x * 2)
    other = torch.full((128,), float("nan"))
    with pytest.raises(emu.MemoryFault, match=r"thread \(100, 0, 0\).*4 bytes past the end of argument p_x "
                                              r"\(\[0x[0-9a-f]+, 0x[0-9a-f]+\), 400 bytes\), inside its 1024-byte storage"):
        emu.launch(SCALE, "scale", (1,), (128,), [storage[:100], other, 110])
    with pytest.raises(emu.MemoryFault, match=r"past the end of argument p_y \(\[0x[0-9a-f]+, 0x[0-9a-f]+\), 200 bytes"):
        emu.launch(SCALE, "scale", (1,), (128,), [storage[:60], storage[60:110], 60])


def test_launches_that_all_spin_without_progress_are_a_deadlock():
    flags = [torch.zeros(4, dtype=torch.int32) for _ in range(2)]
    outs = [torch.zeros(1, dtype=torch.int32) for _ in range(2)]
    specs = [dict(ptx=SPIN, kernel="spin", grid=(1,), block=(32,), args=[f, o, 0]) for f, o in zip(flags, outs)]
    with pytest.raises(emu.Deadlock, match=r"(?s)launch_many: deadlock.*launch 0 \(spin\).*polling global address "
                                           rf"{flags[0].data_ptr():#x}.*launch 1 \(spin\)"):
        emu.launch_many(specs)


def test_a_spin_that_another_launch_ends_runs_to_completion():
    # launch 0 polls the flag; launch 1 (grid of 2: its CTA 1 is the setter) sets it late
    flag = torch.zeros(4, dtype=torch.int32)
    outs = [torch.zeros(1, dtype=torch.int32) for _ in range(2)]
    emu.launch_many([dict(ptx=SPIN, kernel="spin", grid=(1,), block=(32,), args=[flag, outs[0], 0]),
                     dict(ptx=SPIN, kernel="spin", grid=(2,), block=(32,), args=[flag, outs[1], LATE])])
    assert outs[0].item() == 77 and outs[1].item() == 77
