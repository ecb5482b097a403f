"""The timing model (pykernels.perf) on small kernels whose time is derived by hand from
the machine description: a dependent FP32 chain (latency-bound), a bank-conflicted
shared-memory loop, a pure wgmma stream and a bulk-copy (TMA) stream.

Each test times the same kernel at two sizes and compares the difference (the per-item
cost, free of the fixed start-up and exit cost) with the hand derivation at a stated
tolerance; the kernels also compute something checked against the expected values, so a
kernel that does not run as written fails."""
import pytest
import torch

from pykernels import perf

HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n"
H800 = perf.part("h800")


def _chain(n):
    body = ["fma.rn.f32 %f1, %f1, %f2, %f2;"] * n           # f1 = f1 * 1 + 1: each waits for the last
    return "\n".join([HEAD, ".visible .entry k(.param .u64 p_out)\n{", ".reg .f32 %f<4>; .reg .b64 %rd<4>;",
                      "ld.param.u64 %rd1, [p_out];", "mov.f32 %f1, 0f3F800000;", "mov.f32 %f2, 0f3F800000;",
                      *body, "st.global.f32 [%rd1], %f1;", "ret;", "}"])


def test_dependent_chain_costs_the_alu_latency_per_instruction(seed):
    """n dependent fma: each issues when the previous result is ready, lat_alu clocks."""
    times = {}
    for n in (16, 80):
        out = torch.full((32,), float("nan"))
        t = perf.time_launch(_chain(n), "k", 1, 32, [out], part=H800)
        assert out[0] == n + 1                               # every thread stores to out[0]
        times[n] = t.cycles
    per = (times[80] - times[16]) / 64
    assert per == pytest.approx(H800.lat_alu, rel=0.05)


def _smem_loads(n, stride):
    """One warp: n independent 4-byte shared loads of its own word at tid * stride; the
    last one is stored."""
    L = [HEAD, ".visible .entry k(.param .u64 p_out)\n{", ".reg .b32 %r<200>; .reg .b64 %rd<4>;",
         ".shared .align 16 .b8 buf[8192];",
         "mov.u32 %r1, %tid.x;", f"mul.lo.u32 %r2, %r1, {stride};", "mov.u32 %r3, buf;", "add.u32 %r4, %r3, %r2;",
         "st.shared.u32 [%r4], %r1;", "bar.sync 0;"]
    for i in range(n):
        L.append(f"ld.shared.u32 %r{10 + i}, [%r4];")
    L.append(f"mov.u32 %r5, %r{10 + n - 1};")
    L += ["ld.param.u64 %rd1, [p_out];", "mul.wide.u32 %rd2, %r1, 4;", "add.u64 %rd3, %rd1, %rd2;",
          "st.global.u32 [%rd3], %r5;", "ret;", "}"]
    return "\n".join(L)


@pytest.mark.parametrize("stride, ways", [(4, 1), (128, 32), (8, 2)])
def test_bank_conflicts_serialise_shared_loads(seed, stride, ways):
    """A warp's 4-byte loads at tid * stride hit `ways` distinct words per bank: `ways`
    wavefronts of the SM's one 128-byte-per-clock port each; independent loads queue on
    the port, so each costs `ways` clocks, and at least its issue slot (1 clock)."""
    times = {}
    for n in (8, 72):
        out = torch.full((32,), -1, dtype=torch.int32)
        t = perf.time_launch(_smem_loads(n, stride), "k", 1, 32, [out], part=H800)
        assert torch.equal(out, torch.arange(32, dtype=torch.int32))
        times[n] = t.cycles
    per_load = (times[72] - times[8]) / 64
    wavefront_clocks = ways * 128 / H800.smem_bytes_per_clk
    assert per_load == pytest.approx(max(1.0, wavefront_clocks), rel=0.05)


def _wgmma_stream(r):
    """One warpgroup: shared memory filled with bf16 1.0, r chained m64n128k16 bf16
    wgmma (A and B from shared memory) in one group, then wait_group 0; every
    accumulator ends at 16 r."""
    dvec = "{" + ", ".join(f"%f{i}" for i in range(64)) + "}"
    L = [HEAD, ".visible .entry k(.param .u64 p_out)\n{",
         ".reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<16>; .reg .f32 %f<64>;",
         ".shared .align 1024 .b8 buf[8192];",
         "mov.u32 %r1, %tid.x;", "mov.u32 %r2, buf;", "shl.b32 %r3, %r1, 6;", "add.u32 %r4, %r2, %r3;",
         "mov.u32 %r5, 0x3F803F80;"]
    L += [f"st.shared.v4.u32 [%r4+{16 * i}], {{%r5, %r5, %r5, %r5}};" for i in range(4)]
    L += ["fence.proxy.async.shared::cta;", "bar.sync 0;"]
    L += [f"mov.f32 %f{i}, 0f00000000;" for i in range(64)]
    # descriptor: start >> 4, LBO 128 B, SBO 256 B, no swizzle
    L += ["shr.u32 %r6, %r2, 4;", "cvt.u64.u32 %rd1, %r6;", "or.b64 %rd2, %rd1, 0x0000001000080000;",
          "setp.eq.u32 %p1, %r1, %r1;", "wgmma.fence.sync.aligned;"]
    L += [f"wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {dvec}, %rd2, %rd2, %p1, 1, 1, 0, 0;"] * r
    L += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 0;",
          "ld.param.u64 %rd3, [p_out];", "mul.wide.u32 %rd4, %r1, 4;", "add.u64 %rd5, %rd3, %rd4;",
          "st.global.f32 [%rd5], %f63;", "ret;", "}"]
    return "\n".join(L)


def test_wgmma_stream_runs_at_the_tensor_core_rate(seed):
    """Chained wgmma of one warpgroup occupy the SM's tensor cores back to back: each
    m64n128k16 bf16 is 64 x 128 x 16 multiply-adds at mma_bf16_per_clk (its 6 KB of
    shared-memory operands at 128 B/clock take less)."""
    times = {}
    for r in (2, 10):
        out = torch.full((128,), float("nan"))
        t = perf.time_launch(_wgmma_stream(r), "k", 1, 128, [out], part=H800)
        assert torch.all(out == 16 * r)
        times[r] = t.cycles
    per = (times[10] - times[2]) / 8
    hand = max(64 * 128 * 16 / H800.mma_bf16_per_clk, (64 + 128) * 16 * 2 / H800.smem_bytes_per_clk)
    assert per == pytest.approx(hand, rel=0.05)


def _bulk_stream(r, size):
    """One thread copies r chunks of `size` bytes global -> shared with cp.async.bulk, all
    completing on one mbarrier armed with r x size transaction bytes; thread 0 then stores
    the last word of the last chunk."""
    L = [HEAD, ".visible .entry k(.param .u64 p_x, .param .u64 p_out)\n{",
         ".reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<16>;",
         f".shared .align 128 .b8 buf[{r * size}];", ".shared .align 8 .b64 bar;",
         "ld.param.u64 %rd1, [p_x];", "mov.u32 %r1, %tid.x;", "setp.eq.u32 %p1, %r1, 0;",
         "@!%p1 bra W;", "mbarrier.init.shared::cta.b64 [bar], 1;", "fence.mbarrier_init.release.cluster;",
         f"mbarrier.arrive.expect_tx.shared::cta.b64 %rd2, [bar], {r * size};"]
    for i in range(r):
        L.append(f"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [buf+{i * size}], "
                 f"[%rd1+{i * size}], {size}, [bar];")
    L += ["W:", "mbarrier.try_wait.parity.shared::cta.b64 %p2, [bar], 0;", "@!%p2 bra W;",
          f"ld.shared.u32 %r2, [buf+{r * size - 4}];", "ld.param.u64 %rd3, [p_out];", "st.global.u32 [%rd3], %r2;",
          "ret;", "}"]
    return "\n".join(L)


def bulk_stream_clk_per_byte(active_sms, size=4096):
    """Clocks per byte of one SM's bulk-copy stream with `active_sms` SMs loading, all L2 hits:
    the time of 10 copies of `size` bytes less that of 2 (fixed costs cancel), each run's last
    word checked."""
    times = {}
    for r in (2, 10):
        x = torch.randint(0, 2**31 - 1, (r * size // 4,), dtype=torch.int32)
        out = torch.full((1,), -1, dtype=torch.int32)
        t = perf.time_launch(_bulk_stream(r, size), "k", 1, 32, [x, out], part=H800, active_sms=active_sms,
                             l2_hit=1.0)
        assert out[0] == x[-1]
        times[r] = t.cycles
    return (times[10] - times[2]) / (8 * size)


@pytest.mark.parametrize("active_sms", [132, 1])
def test_bulk_copy_stream_moves_bytes_at_the_sms_share_of_l2(seed, active_sms):
    """Back-to-back bulk copies stream through the SM's memory port at its share of the L2
    bandwidth when every SM streams (active_sms = 132: L2 bytes per clock / 132), or at
    the port's own rate alone (active_sms = 1); all hit L2 (l2_hit = 1)."""
    per_byte = bulk_stream_clk_per_byte(active_sms)
    hand = max(1 / H800.sm_l2_bytes_per_clk, active_sms / (H800.l2_bytes_per_s / H800.clock_hz))
    assert per_byte == pytest.approx(hand, rel=0.05)


def _tma_stream(r, rows):
    """Thread 0 loads r boxes of rows x 128 bytes (a 2-D tensor map, no swizzle) into
    consecutive shared buffers, all completing on one mbarrier; then stores the last word."""
    box = rows * 128
    L = [HEAD, ".visible .entry k(.param .align 64 .b8 p_map[128], .param .u64 p_out)\n{",
         ".reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<16>;",
         f".shared .align 1024 .b8 buf[{r * box}];", ".shared .align 8 .b64 bar;",
         "mov.u32 %r1, %tid.x;", "setp.eq.u32 %p1, %r1, 0;", "mov.u32 %r2, 0;",
         "@!%p1 bra W;", "mbarrier.init.shared::cta.b64 [bar], 1;", "fence.mbarrier_init.release.cluster;",
         f"mbarrier.arrive.expect_tx.shared::cta.b64 %rd2, [bar], {r * box};"]
    for i in range(r):
        L += [f"mov.u32 %r3, {i * rows};",
              "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
              f"[buf+{i * box}], [p_map, {{%r2, %r3}}], [bar];"]
    L += ["W:", "mbarrier.try_wait.parity.shared::cta.b64 %p2, [bar], 0;", "@!%p2 bra W;",
          f"ld.shared.u32 %r4, [buf+{r * box - 4}];", "ld.param.u64 %rd3, [p_out];", "st.global.u32 [%rd3], %r4;",
          "ret;", "}"]
    return "\n".join(L)


def test_tma_tensor_stream_moves_bytes_at_the_sms_share_of_l2(seed):
    """The same as the bulk stream with cp.async.bulk.tensor boxes (32 x 128 bytes)."""
    from pykernels.runtime.tensormap import TensorMapDesc
    rows = 32
    times = {}
    for r in (2, 10):
        x = torch.randint(0, 256, (r * rows, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        out = torch.full((1,), -1, dtype=torch.int32)
        t = perf.time_launch(_tma_stream(r, rows), "k", 1, 32, [TensorMapDesc(x, (rows, 128)), out], part=H800,
                             active_sms=132, l2_hit=1.0)
        assert out[0] == x[-1, -4:].contiguous().view(torch.int32)[0]
        times[r] = t.cycles
    per_byte = (times[10] - times[2]) / (8 * rows * 128)
    hand = max(1 / H800.sm_l2_bytes_per_clk, 132 / (H800.l2_bytes_per_s / H800.clock_hz))
    assert per_byte == pytest.approx(hand, rel=0.05)


def test_machine_descriptions_cite_a_source_for_every_number():
    """Every number names a known source; the tensor rates reproduce the datasheet's dense
    TFLOP/s at the stated clock; the parts differ only in HBM and NVLink."""
    parts = {k: perf.part(k) for k in perf.PARTS}
    for p in parts.values():
        for name, fact in p.facts.items():
            assert fact.source in perf.machines.SOURCES, name
        for dtype, tflops in (("e4m3", 1978.9), ("bf16", 989.4)):
            assert 2 * p.sms * p.mma_per_clk(dtype) * p.clock_hz / 1e12 == pytest.approx(tflops, rel=2e-3)
        assert p.fp32_lanes * 2 * p.sms * 1.98e9 / 1e12 == pytest.approx(66.9, rel=1e-2)   # at the 1.98 GHz boost
    differ = {n for n in parts["h100"].facts if any(parts[k].facts[n].value != parts["h100"].facts[n].value
                                                      for k in parts)}
    assert differ == {"name", "hbm_bytes_per_s", "nvlink_bytes_per_s", "hbm_efficiency"}
    for p in parts.values():                     # the SM's port is its even share of the L2 bandwidth
        assert p.sm_l2_bytes_per_clk * p.sms * p.clock_hz == pytest.approx(p.l2_bytes_per_s, rel=1e-9)
        assert 0.8 < p.hbm_efficiency < 1.0
    assert parts["h200"].hbm_bytes_per_s == 4.8e12 and parts["h800"].nvlink_bytes_per_s == 400e9
    with pytest.raises(ValueError, match="part: expected one of"):
        perf.part("a100")


def _cp_async_stream(r):
    """One warp: r cp.async.cg of 16 bytes per thread (512 bytes per instruction), one
    group, wait_all; thread 31 stores the last word it copied."""
    L = [HEAD, ".visible .entry k(.param .u64 p_x, .param .u64 p_out)\n{",
         ".reg .b32 %r<16>; .reg .b64 %rd<16>;", f".shared .align 128 .b8 buf[{r * 512}];",
         "ld.param.u64 %rd1, [p_x];", "mov.u32 %r1, %tid.x;", "shl.b32 %r2, %r1, 4;", "mov.u32 %r3, buf;",
         "add.u32 %r4, %r3, %r2;", "cvt.u64.u32 %rd2, %r2;", "add.u64 %rd3, %rd1, %rd2;"]
    for i in range(r):
        L.append(f"cp.async.cg.shared.global [%r4+{i * 512}], [%rd3+{i * 512}], 16;")
    L += ["cp.async.commit_group;", "cp.async.wait_all;", f"ld.shared.u32 %r5, [%r4+{(r - 1) * 512 + 12}];",
          "ld.param.u64 %rd4, [p_out];", "mul.wide.u32 %rd5, %r1, 4;", "add.u64 %rd6, %rd4, %rd5;",
          "st.global.u32 [%rd6], %r5;", "ret;", "}"]
    return "\n".join(L)


def test_cp_async_stream_moves_bytes_at_the_sms_share_of_l2(seed):
    """cp.async bytes use the same memory path as bulk copies: per byte, max(1 / port,
    active SMs / L2 bytes per clock); wait_all waits for the last of them."""
    times = {}
    for r in (4, 36):
        x = torch.randint(0, 2**31 - 1, (r * 128,), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
        out = torch.full((32,), -1, dtype=torch.int32)
        t = perf.time_launch(_cp_async_stream(r), "k", 1, 32, [x, out], part=H800, active_sms=132, l2_hit=1.0)
        assert torch.equal(out, x.view(r, 32, 4)[-1, :, 3])
        times[r] = t.cycles
    per_byte = (times[36] - times[4]) / (32 * 512)
    hand = max(1 / H800.sm_l2_bytes_per_clk, 132 / (H800.l2_bytes_per_s / H800.clock_hz))
    assert per_byte == pytest.approx(hand, rel=0.05)
