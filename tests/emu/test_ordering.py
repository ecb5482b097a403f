"""The emulator's memory-ordering checker (pykernels.emu.ordering, docs/emulator.md).

Each rule on a seeded bug that it must catch, with both PTX lines named, and the same
kernel without the bug staying clean: small hand-written kernels (inter-warp races,
cp.async, DSMEM scopes, a wgmma accumulator), the GEMM's compiled PTX with its proxy
fences deleted, the MLA decode kernel with one of its mbarrier waits skipped. The
project's kernels running clean under every schedule is checked by their own tests
(tests/conftest.py turns the checker on for the whole suite).
"""
import re

import numpy as np
import pytest
import torch

from pykernels import emu
from pykernels.emu import ordering
from pykernels.emu.ordering import OrderingViolation

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"


def _launch(ptx, kernel, grid, block, args, mode="raise", **kw):
    with ordering.checking(mode):
        return emu.launch(ptx, kernel, grid, block, args, **kw)


def _line_of(ptx, text):
    """PTX line number (1-based) of the first line containing `text`."""
    return next(i for i, s in enumerate(ptx.splitlines(), 1) if text in s)


# ------------------------------------------------------------------------ rule c: races between warps

HANDOFF = HEAD + """
.visible .entry handoff(.param .u64 p_out, .param .u32 p_sync, .param .u32 p_lanes)
{
    .reg .pred %p<4>; .reg .b32 %r<12>; .reg .b64 %rd<4>;
    .shared .align 4 .b32 box[32];
    ld.param.u64 %rd1, [p_out]; ld.param.u32 %r7, [p_sync]; ld.param.u32 %r8, [p_lanes];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    shl.b32 %r3, %r2, 2;
    mov.u32 %r4, box;
    add.u32 %r4, %r4, %r3;
    setp.lt.u32 %p1, %r1, %r8;             // the writers: warp 0 (p_lanes 32) or lanes 0-15 of it
    @%p1 st.shared.u32 [%r4], %r1;
    setp.ne.u32 %p2, %r7, 0;
    @%p2 bar.sync 0;                       // the hand-off barrier (p_sync = 0: forgotten)
    @%p1 bra DONE;
    setp.ge.u32 %p3, %r1, 32;
    @%p3 bra DONE;                         // p_lanes 16: lanes 16-31 of warp 0 read
    ld.shared.u32 %r5, [%r4];              // the reader of the hand-off
    mul.wide.u32 %rd2, %r2, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r5;
DONE:
    ret;
}
"""


def _handoff(sync, lanes=32, block=64, schedule="lockstep", mode="raise"):
    out = torch.full((32,), -7, dtype=torch.int32)
    ptx = HANDOFF.replace("@%p3 bra DONE;", "@%p3 bra DONE;" if lanes == 16 else "")
    return _launch(ptx, "handoff", (1,), (block,), [out, sync, lanes], mode=mode, schedule=schedule), out, ptx


@pytest.mark.parametrize("schedule", ["lockstep", "wg_first", "cta_last"])
def test_race_between_warps_is_reported_whatever_the_schedule(schedule):
    # warp 0 stores, warp 1 loads the same words: lockstep gives the right values, the
    # checker reports the missing barrier anyway, with both lines and threads
    with pytest.raises(OrderingViolation) as e:
        _handoff(sync=0, schedule=schedule)
    v = e.value
    assert v.rule == "c" and v.address == ((0, 0, 0), 0)
    assert v.first["line"] == _line_of(HANDOFF, "@%p1 st.shared.u32") and v.first["thread"] == (0, 0, 0)
    assert v.second["line"] == _line_of(HANDOFF, "ld.shared.u32 %r5") and v.second["thread"] == (32, 0, 0)
    assert "rule c" in str(v) and "PTX line" in str(v)


def test_barrier_orders_the_handoff():
    _, out, _ = _handoff(sync=1)
    assert torch.equal(out, torch.arange(32, dtype=torch.int32))


def test_accesses_inside_one_warp_are_exempt():
    # lanes 0-15 write, lanes 16-31 of the same warp read (other words: no data flows;
    # the point is only that no report is made between lanes of one warp)
    stats, _, _ = _handoff(sync=0, lanes=16, block=32, mode="collect")
    assert stats.ordering_violations == []
    # the same unsynchronised hand-off across two warps is reported
    stats, _, _ = _handoff(sync=0, lanes=32, block=64, mode="collect")
    assert [v.rule for v in stats.ordering_violations] == ["c"]


WAR = HEAD + """
.visible .entry war(.param .u64 p_out, .param .u32 p_sync)
{
    .reg .pred %p<3>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 4 .b32 box[32];
    ld.param.u64 %rd1, [p_out]; ld.param.u32 %r7, [p_sync];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    shl.b32 %r3, %r2, 2;
    mov.u32 %r4, box;
    add.u32 %r4, %r4, %r3;
    setp.lt.u32 %p1, %r1, 32;
    @%p1 st.shared.u32 [%r4], %r2;         // warp 0 fills the box
    bar.sync 0;
    @!%p1 ld.shared.u32 %r5, [%r4];        // warp 1 reads it ...
    setp.ne.u32 %p2, %r7, 0;
    @%p2 bar.sync 0;                       // ... and must be done before warp 0 refills it
    @%p1 st.shared.u32 [%r4], %r1;
    ret;
}
"""


def test_write_after_read_between_warps():
    with pytest.raises(OrderingViolation) as e:
        _launch(WAR, "war", (1,), (64,), [torch.zeros(1, dtype=torch.int32), 0])
    v = e.value
    assert v.rule == "c"
    assert v.first["line"] == _line_of(WAR, "@!%p1 ld.shared.u32") and v.first["thread"][0] >= 32
    assert v.second["line"] == _line_of(WAR, "@%p1 st.shared.u32 [%r4], %r1") and v.second["thread"][0] < 32
    _launch(WAR, "war", (1,), (64,), [torch.zeros(1, dtype=torch.int32), 1])


NAMED = HEAD + """
.visible .entry named(.param .u64 p_out, .param .u32 p_wait)
{
    .reg .pred %p<4>; .reg .b32 %r<8>; .reg .b64 %rd<4>;
    .shared .align 8 .b64 bar;
    .shared .align 4 .b32 box[64];
    ld.param.u64 %rd1, [p_out]; ld.param.u32 %r7, [p_wait];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 31;
    shl.b32 %r3, %r2, 2;
    mov.u32 %r4, box;
    add.u32 %r4, %r4, %r3;
    mov.u32 %r6, bar;
    setp.eq.u32 %p3, %r1, 0;
    @%p3 mbarrier.init.shared::cta.b64 [%r6], 32;
    bar.sync 0;
    setp.lt.u32 %p1, %r1, 32;
    @!%p1 bra CONSUMER;
    st.shared.u32 [%r4], %r1;              // warp 0 produces, announces on named barrier 1
    bar.arrive 1, 64;                      // (64 threads: producer warp + consumer warp)
    st.shared.u32 [%r4+128], %r1;          // and a second box, announced on the mbarrier
    mbarrier.arrive.shared::cta.b64 _, [%r6];
    bra.uni DONE;
CONSUMER:
    setp.lt.u32 %p2, %r1, 64;
    @!%p2 bra DONE;                        // warps 2-3 take no part
    bar.sync 1, 64;
    ld.shared.u32 %r5, [%r4];
    setp.ne.u32 %p2, %r7, 0;
    @!%p2 bra READ2;
WAIT:
    mbarrier.try_wait.parity.shared::cta.b64 %p3, [%r6], 0;
    @!%p3 bra WAIT;
READ2:
    ld.shared.u32 %r5, [%r4+128];
DONE:
    ret;
}
"""


def test_named_barrier_with_a_thread_count_and_mbarrier_handoffs():
    # bar.arrive by the producer warp / bar.sync by the consumer warp (count 64 of the
    # CTA's 128 threads) and mbarrier arrive -> observed wait both order the hand-offs
    _launch(NAMED, "named", (1,), (128,), [torch.zeros(1, dtype=torch.int32), 1])
    with pytest.raises(OrderingViolation) as e:       # the mbarrier wait skipped
        _launch(NAMED, "named", (1,), (128,), [torch.zeros(1, dtype=torch.int32), 0])
    assert e.value.rule == "c" and e.value.second["line"] == _line_of(NAMED, "ld.shared.u32 %r5, [%r4+128]")


def test_collect_mode_gathers_every_violation_and_goes_on():
    out = torch.full((32,), -7, dtype=torch.int32)
    st = _launch(WAR.replace("@%p2 bar.sync 0;", ""), "war", (1,), (64,), [out, 0], mode="collect")
    assert [v.rule for v in st.ordering_violations] == ["c"]
    st = _launch(HANDOFF, "handoff", (1,), (64,), [out, 1, 32], mode="collect")
    assert st.ordering_violations == []


def test_modes():
    with ordering.checking("collect"):
        assert ordering.mode() == "collect"
        with ordering.checking("off", reason="nested override"):
            assert ordering.mode() == "off"
    with pytest.raises(ValueError, match="reason"):
        with ordering.checking("off"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with ordering.checking("loud"):
            pass


# ------------------------------------------------------------------------ rule b: asynchronous copies

CP_ASYNC = HEAD + """
.visible .entry cpa(.param .u64 p_src, .param .u64 p_out, .param .u32 p_mode)
{
    .reg .pred %p<3>; .reg .b32 %r<10>; .reg .b64 %rd<8>;
    .shared .align 16 .b32 buf[64];
    ld.param.u64 %rd1, [p_src]; ld.param.u64 %rd2, [p_out]; ld.param.u32 %r9, [p_mode];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, buf;
    add.u32 %r5, %r3, %r2;
    cvt.u64.u32 %rd3, %r2;
    add.u64 %rd4, %rd1, %rd3;
    cp.async.ca.shared.global [%r5], [%rd4], 4;
    cp.async.commit_group;
    setp.ne.u32 %p1, %r9, 0;
    @%p1 cp.async.wait_group 0;            // mode 0: forgotten
    setp.eq.u32 %p2, %r9, 2;
    @%p2 bar.sync 0;                       // mode 2: the other warp's copies are ordered too
    xor.b32 %r6, %r2, 128;                 // mode 1 and 2 read the other warp's word
    selp.b32 %r7, %r6, %r2, %p1;
    add.u32 %r8, %r3, %r7;
    ld.shared.u32 %r4, [%r8];
    cp.async.wait_all;
    add.u64 %rd5, %rd2, %rd3;
    st.global.u32 [%rd5], %r4;
    ret;
}
"""


@pytest.mark.parametrize("mode,rule", [(0, "b"), (1, "b"), (2, None)])
def test_cp_async_data_used_before_its_wait(mode, rule):
    # 0: read of the own copy before cp.async.wait_group; 1: the own wait, but the other
    # warp's copy is read without a barrier after that warp's wait; 2: both (clean)
    src = torch.arange(64, dtype=torch.int32) * 3 + 1
    out = torch.zeros(64, dtype=torch.int32)
    args = [src, out, mode]
    if rule is None:
        _launch(CP_ASYNC, "cpa", (1,), (64,), args)
        assert torch.equal(out, src.view(2, 32).flip(0).reshape(-1))
        return
    with pytest.raises(OrderingViolation) as e:
        _launch(CP_ASYNC, "cpa", (1,), (64,), args)
    v = e.value
    assert v.rule == rule and v.first["line"] == _line_of(CP_ASYNC, "cp.async.ca.shared.global")
    assert v.second["line"] == _line_of(CP_ASYNC, "ld.shared.u32 %r4")
    if mode == 1:
        assert (v.first["thread"][0] < 32) != (v.second["thread"][0] < 32)


def test_tma_destination_read_before_its_mbarrier_wait():
    from .test_hopper_async import _rand_tensor, run_tma_load
    t = _rand_tensor((512,), torch.uint8, torch.Generator().manual_seed(1))
    with ordering.checking("raise"):
        run_tma_load(t, (256,), (128,), 0, wait=True)                  # clean
        with pytest.raises(OrderingViolation) as e:
            run_tma_load(t, (256,), (128,), 0, wait=False)
    v = e.value
    assert v.rule == "b" and "async proxy" in v.first["what"] and v.first["text"].startswith("cp.async.bulk.tensor")
    assert v.second["text"].startswith("ld.shared")


def _mla_decode_ptx_without(wait_index, fp8=False):
    """The MLA decode kernel's PTX with its `wait_index`-th mbarrier try_wait replaced by
    `p = true` (the wait skipped), and the number of try_waits of that kernel."""
    from pykernels.cuda import mla as CM
    from pykernels.runtime import artifacts
    ptx = artifacts.ptx_text(CM.MODULE)
    fn = CM.DECODE_FUNCTION_FP8 if fp8 else CM.DECODE_FUNCTION
    start = ptx.index(f".entry {fn}(")
    end = ptx.find(".entry ", start + 1)
    end = len(ptx) if end < 0 else end
    body = ptx[start:end]
    waits = list(re.finditer(r"mbarrier\.try_wait\.parity\.shared::cta\.b64 (\w+), \[%r\d+\], %r\d+;", body))
    w = waits[wait_index]
    body = body[:w.start()] + f"setp.eq.u32 {w.group(1)}, 0, 0;" + body[w.end():]
    return ptx[:start] + body + ptx[end:], len(waits), fn


def _run_mla(monkeypatch, decode_ptx, fn, fp8=False):
    """One MLA decode (3 sequences, 2 partitions) with the decode kernel's PTX
    replaced; returns the ordering violations collected over its launches."""
    from pykernels import mla as M
    from pykernels.cuda import mla as CM
    from pykernels.runtime import artifacts
    from tests.mla_cases import make_problem
    found = []

    def run(plan, executor):
        ptx = decode_ptx if plan.function == fn else artifacts.ptx_text(plan.module)
        st = emu.launch(ptx, plan.function, plan.grid, plan.block, [a.value for a in plan.args],
                        shared_mem=plan.shared_bytes, cluster=plan.cluster)
        found.extend(st.ordering_violations)
        return st

    torch.manual_seed(5)
    seqlens, s_q, h_q = [150, 70, 40], 1, 64  # 64 rows (the 64-row kernel); 2 partitions, each CTA walks pieces
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 2)
    monkeypatch.setattr(CM, "run_plan", run)
    out = torch.full((len(seqlens), s_q, h_q, 512), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((len(seqlens), h_q, s_q), float("nan"))
    with ordering.checking("collect"):
        CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, True, executor="emu")
    return found


def test_mla_decode_with_a_skipped_mbarrier_wait(monkeypatch):
    # Every mbarrier wait of the bf16 decode kernel is needed: skipping any one of them is
    # reported. Skipping a wait of the math warpgroups (a stage of K, or Q, consumed before
    # its TMA completed) is rule b, naming the TMA load and the reading wgmma; skipping a
    # wait of the producer (a stage refilled while still read) is a race, rule c.
    # (Skipping the producer's wait for the Q buffer also over-arrives on its full barrier:
    # the emulator's own mbarrier check reports that one first.)
    _, n, fn = _mla_decode_ptx_without(0)
    rules = []
    for i in range(n):
        ptx, _, _ = _mla_decode_ptx_without(i)
        try:
            found = _run_mla(monkeypatch, ptx, fn)
        except emu.EmuError as e:
            assert "more arrivals than" in str(e)
            continue
        assert found, f"skipping try_wait {i} of {n} went unreported"
        rules.append({v.rule for v in found})
        for v in found:
            if v.rule == "b":
                assert "async proxy" in v.first["what"] and v.first["text"].startswith("cp.async.bulk.tensor")
                # the K stage's readers (wgmma) and writers (P into its RoPE chunk, zeroed stale V rows)
                assert v.second["text"].startswith(("wgmma.mma_async", "ld.shared", "st.shared"))
    assert any("b" in r for r in rules) and any("c" in r for r in rules)
    clean, _, _ = _mla_decode_ptx_without(0)
    from pykernels.runtime import artifacts
    from pykernels.cuda import mla as CM
    assert _run_mla(monkeypatch, artifacts.ptx_text(CM.MODULE), fn) == []
    assert clean != artifacts.ptx_text(CM.MODULE)


# ------------------------------------------------------------------------ rule a: the async proxy

def test_gemm_without_its_proxy_fences(seed):
    # The GEMM's epilogue stores the output tile with st.shared, fences the generic proxy
    # and lets one thread TMA-store it. Without the fences the stores may not be visible
    # to the TMA engine: rule a, naming the st.shared and the TMA store.
    from tests.test_gemm_emu import G, _problem, nan_bf16
    from pykernels.runtime import artifacts
    m, n, k = 129, 256, 256
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    cfg = G.Config(128, 128)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg)
    ptx = artifacts.ptx_text(G.MODULE)
    broken = re.sub(r"\n\s*fence\.proxy\.async\.shared::cta;", "", ptx)
    assert broken.count("fence.proxy.async") == 0 < ptx.count("fence.proxy.async")
    args = [x.value for x in plan.args]
    _launch(ptx, plan.function, plan.grid, plan.block, args, shared_mem=plan.shared_bytes, cluster=plan.cluster)
    with pytest.raises(OrderingViolation) as e:
        _launch(broken, plan.function, plan.grid, plan.block, args, shared_mem=plan.shared_bytes,
                cluster=plan.cluster)
    v = e.value
    assert v.rule == "a"
    assert v.first["text"].startswith(("st.shared", "stmatrix")) and v.first["what"] == "generic-proxy write"
    assert v.second["text"].startswith("cp.async.bulk.tensor") and "TMA store" in v.second["what"]


# ------------------------------------------------------------------------ rule d: wgmma accumulators

def test_accumulator_read_before_wait_group(seed):
    from .test_hopper_async import run_wgmma
    rng = np.random.default_rng(seed)
    with ordering.checking("raise"):
        out, want, _ = run_wgmma(rng, "bf16", 16, "k_inner")
        assert torch.equal(out, want)
        with pytest.raises(OrderingViolation) as e:
            run_wgmma(rng, "bf16", 16, "k_inner", poke="add.f32 %f0, %f0, %f1;")
    v = e.value
    assert v.rule == "d" and v.address is None
    assert v.first["text"].startswith("wgmma.mma_async") and v.second["text"] == "add.f32 %f0, %f0, %f1"
    assert "wait_group" in str(v)


# ------------------------------------------------------------------------ rule e: cluster scopes

DSMEM = HEAD + """
.visible .entry dsm(.param .u64 p_out)
{
    .reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<4>;
    .shared .align 8 .b64 bar;
    .shared .align 4 .b32 buf[32];
    ld.param.u64 %rd1, [p_out];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %cluster_ctarank;
    mov.u32 %r3, bar;
    shl.b32 %r4, %r1, 2;
    mov.u32 %r5, buf;
    add.u32 %r5, %r5, %r4;
    setp.eq.u32 %p1, %r1, 0;
    @%p1 mbarrier.init.shared::cta.b64 [%r3], 32;
    fence.mbarrier_init.release.cluster;
    barrier.cluster.arrive.release.aligned;
    barrier.cluster.wait.acquire.aligned;
    setp.eq.u32 %p2, %r2, 1;
    @%p2 bra PRODUCER;
WAIT:                                      // CTA 0: wait for the peer's data, read it
    mbarrier.try_wait.parity.WAIT_SEM.shared::cta.b64 %p3, [%r3], 0;
    @!%p3 bra WAIT;
    ld.shared.u32 %r6, [%r5];
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r6;
    bra.uni END;
PRODUCER:                                  // CTA 1: write into CTA 0's buffer, then arrive there
    mapa.shared::cluster.u32 %r7, %r5, 0;
    add.u32 %r8, %r1, 100;
    st.shared::cluster.u32 [%r7], %r8;
    mapa.shared::cluster.u32 %r9, %r3, 0;
    mbarrier.arrive.ARRIVE_SEM.shared::cluster.b64 _, [%r9];
END:
    barrier.cluster.arrive.release.aligned;
    barrier.cluster.wait.acquire.aligned;
    ret;
}
"""


@pytest.mark.parametrize("arrive,wait,rule", [
    ("release.cluster", "acquire.cluster", None),
    ("", "acquire.cluster", "e"),                 # release at .cta scope for a peer's consumer
    ("release.cluster", "", "e"),                 # the consumer acquires at .cta scope only
    ("relaxed.cluster", "acquire.cluster", "c"),  # no release at all: a plain race
])
def test_dsmem_handoff_scopes(arrive, wait, rule):
    ptx = DSMEM.replace("ARRIVE_SEM.", arrive + "." if arrive else "").replace("WAIT_SEM.", wait + "." if wait else "")
    out = torch.zeros(32, dtype=torch.int32)
    args = [out]
    if rule is None:
        _launch(ptx, "dsm", (2,), (32,), args, cluster=(2, 1, 1))
        assert torch.equal(out, torch.arange(32, dtype=torch.int32) + 100)
        return
    with pytest.raises(OrderingViolation) as e:
        _launch(ptx, "dsm", (2,), (32,), args, cluster=(2, 1, 1))
    v = e.value
    assert v.rule == rule and v.address == ((0, 0, 0), 8)          # buf[0], after the barrier
    assert v.first["text"].startswith("st.shared::cluster") and v.first["cta"] == (1, 0, 0)
    assert v.second["text"].startswith("ld.shared.u32") and v.second["cta"] == (0, 0, 0)
    if rule == "e":
        named = "mbarrier.arrive" if not arrive else "mbarrier.try_wait"
        assert named in v.detail and ".cluster" in v.detail


@pytest.mark.parametrize("before_arrive,after_arrive,after_wait,rule", [
    # the PTX ISA's fence-based patterns with relaxed cluster-scope mbarrier operations
    ("fence.acq_rel.cluster;", "", "fence.acq_rel.cluster;", None),
    ("fence.acq_rel.cluster;", "", "fence.acquire.sync_restrict::shared::cluster.cluster;", None),
    ("", "", "fence.acq_rel.cluster;", "c"),                       # relaxed arrive, no release fence
    ("fence.acq_rel.cluster;", "", "", "c"),                       # relaxed wait, no acquire fence
    ("", "fence.acq_rel.cluster;", "fence.acq_rel.cluster;", "c"),  # the fence comes after the arrive
    ("fence.acq_rel.cta;", "", "fence.acq_rel.cta;", "c"),          # .cta fences do not reach the peer
])
def test_dsmem_handoff_fences_with_relaxed_mbarrier(before_arrive, after_arrive, after_wait, rule):
    ptx = DSMEM.replace("mbarrier.arrive.ARRIVE_SEM.shared::cluster.b64 _, [%r9];",
                        f"{before_arrive}\n    mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [%r9];"
                        f"\n    {after_arrive}")
    ptx = ptx.replace("WAIT_SEM.", "relaxed.cluster.").replace("@!%p3 bra WAIT;", f"@!%p3 bra WAIT;\n    {after_wait}")
    out = torch.zeros(32, dtype=torch.int32)
    if rule is None:
        _launch(ptx, "dsm", (2,), (32,), [out], cluster=(2, 1, 1))
        assert torch.equal(out, torch.arange(32, dtype=torch.int32) + 100)
        return
    with pytest.raises(OrderingViolation) as e:
        _launch(ptx, "dsm", (2,), (32,), [out], cluster=(2, 1, 1))
    v = e.value
    assert v.rule == rule and v.address == ((0, 0, 0), 8)
    assert v.first["text"].startswith("st.shared::cluster") and v.second["text"].startswith("ld.shared.u32")


def test_multicast_without_remote_release_is_caught_in_lockstep(seed):
    # tests/test_gemm_emu.py needs a skewed schedule to see this broken protocol (each CTA
    # releases a stage on its own empty barrier only, so a producer multicasts into the
    # peer's stage before the peer consumed it): in lockstep the result is right. The
    # checker reports it in lockstep: the peer's wgmma read of the stage is not ordered
    # before the multicast that overwrites it.
    from tests.test_gemm_emu import G, _problem, _without_remote_release, nan_bf16
    from pykernels.runtime import artifacts
    m, n, k = 256, 256, 512
    a, sfa, b, sfb = _problem(m, n, k)
    cfg = G.Config(128, 128, cluster=2)
    plan = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2)
    broken = _without_remote_release(artifacts.ptx_text(G.MODULE), cfg.function)
    args = [x.value for x in plan.args]
    st = _launch(broken, plan.function, plan.grid, plan.block, args, shared_mem=plan.shared_bytes,
                 cluster=plan.cluster, mode="collect")
    war = [v for v in st.ordering_violations if "wgmma" in v.first["what"]]
    assert war and all(v.rule == "c" for v in st.ordering_violations)
    v = war[0]
    assert v.first["cta"] != v.second["cta"] and v.address[0] == v.first["cta"]     # the peer's stage
    assert v.second["text"].startswith("cp.async.bulk.tensor") and "multicast::cluster" in v.second["text"]
    st = _launch(artifacts.ptx_text(G.MODULE), plan.function, plan.grid, plan.block, args,
                 shared_mem=plan.shared_bytes, cluster=plan.cluster, mode="collect")
    assert st.ordering_violations == []
