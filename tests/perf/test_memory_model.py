"""The memory mechanisms of model version 0.2 on small kernels whose time is derived by
hand from the machine description (docs/perf-model.md, "Model version 0.2"):
- one SM receives at most its port's rate, the L2 bandwidth split evenly over the SMs,
  however many SMs load at once;
- bytes that reach HBM move at the sustained rate (datasheet x hbm_efficiency);
- TMA multicast to a cluster of 2 halves the L2 reads but not the bytes each SM
  receives: where the port binds, a K block of our GEMM costs the same at cluster 1 and 2.

Each kernel is timed at two sizes and the per-item difference compared (fixed start and
exit costs cancel); each kernel's result is checked."""
import pytest
import torch

from pykernels import perf

from .test_sm_model import HEAD, bulk_stream_clk_per_byte

H800 = perf.part("h800")


@pytest.mark.parametrize("active_sms", [1, 33, 132])
def test_one_sm_receives_at_its_port_rate_whatever_the_active_sms(seed, active_sms):
    """A bulk-copy stream of one SM costs 1 / sm_l2_bytes_per_clk clocks per byte at 1, 33
    or 132 SMs loading: the port (L2 bytes per clock / SMs) binds before the L2's share."""
    per_byte = bulk_stream_clk_per_byte(active_sms)
    hand = H800.sms * H800.clock_hz / H800.l2_bytes_per_s          # = 1 / sm_l2_bytes_per_clk
    assert per_byte == pytest.approx(hand, rel=0.05)


def _store_stream(r, size):
    """Thread 0 fills a shared buffer's words with their index + 1, then stores it r times
    to consecutive global chunks with cp.async.bulk (one bulk group), waits for it."""
    words = size // 4
    L = [HEAD, ".visible .entry k(.param .u64 p_out)\n{",
         ".reg .pred %p<4>; .reg .b32 %r<16>; .reg .b64 %rd<16>;",
         f".shared .align 128 .b8 buf[{size}];",
         "ld.param.u64 %rd1, [p_out];", "mov.u32 %r1, %tid.x;", "mov.u32 %r2, buf;",
         "mov.u32 %r3, %r1;",
         "F:", "shl.b32 %r4, %r3, 2;", "add.u32 %r5, %r2, %r4;", "add.u32 %r6, %r3, 1;",
         "st.shared.u32 [%r5], %r6;", "add.u32 %r3, %r3, 32;", f"setp.lt.u32 %p1, %r3, {words};", "@%p1 bra F;",
         "fence.proxy.async.shared::cta;", "bar.sync 0;", "setp.ne.u32 %p2, %r1, 0;", "@%p2 bra E;"]
    for i in range(r):
        L.append(f"cp.async.bulk.global.shared::cta.bulk_group [%rd1+{i * size}], [buf], {size};")
    L += ["cp.async.bulk.commit_group;", "cp.async.bulk.wait_group 0;", "E:", "ret;", "}"]
    return "\n".join(L)


@pytest.mark.parametrize("part_key", ["h800", "h200"])
def test_stores_reach_hbm_at_the_sustained_rate(seed, part_key):
    """132 SMs storing at once: each SM's bytes leave at its share of the sustained HBM
    bandwidth, 132 / (hbm_bytes_per_s x hbm_efficiency / clock) clocks per byte (slower than
    its port: the HBM binds)."""
    p = perf.part(part_key)
    size = 4096
    times = {}
    for r in (2, 10):
        out = torch.full((r * size // 4,), -1, dtype=torch.int32)
        t = perf.time_launch(_store_stream(r, size), "k", 1, 32, [out], part=p, active_sms=132, l2_hit=1.0)
        assert torch.equal(out, torch.arange(1, size // 4 + 1, dtype=torch.int32).repeat(r))
        times[r] = t.cycles
    per_byte = (times[10] - times[2]) / (8 * size)
    hand = 132 / (p.hbm_bytes_per_s * p.hbm_efficiency / p.clock_hz)
    assert hand > 1 / p.sm_l2_bytes_per_clk
    assert per_byte == pytest.approx(hand, rel=0.05)


def test_multicast_saves_l2_reads_not_port_time():
    """Our FP8 GEMM, 128x128 tiles, 132 SMs loading, all L2 hits: per K block each SM
    receives its A tile, the whole B tile and its A scales, 128 x 128 + 128 x 128 + 128 x 4
    bytes, at its port's rate, at cluster 1 and at cluster 2 (multicast B): the K block
    costs bytes / sm_l2_bytes_per_clk in both (the tensor work, 128 x 128 x 128 / 4096 =
    512 clocks, hides under it)."""
    from pykernels.perf import gemm as PG
    from pykernels.perf.memory import MemoryShare
    mem = MemoryShare.of(H800, 132, 1.0)
    per_kb = {}
    for cluster in (1, 2):
        tiles = PG.Tiles("ours", 128, 128, cluster, "pk_fp8_gemm_nt_m128n128" + ("_mc2" if cluster == 2 else ""))
        lo = PG._sample(PG.Ours(), tiles, "normal", 1, 3, H800, mem, 3 * 128)
        hi = PG._sample(PG.Ours(), tiles, "normal", 1, 9, H800, mem, 9 * 128)
        per_kb[cluster] = (hi - lo) / 6
    hand = (128 * 128 + 128 * 128 + 128 * 4) / H800.sm_l2_bytes_per_clk
    assert per_kb[1] == pytest.approx(hand, rel=0.05)
    assert per_kb[2] == pytest.approx(hand, rel=0.05)
