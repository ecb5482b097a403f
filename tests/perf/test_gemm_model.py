"""Whole-launch GEMM prediction (pykernels.perf.gemm): the wave reuse model and the unit
order against hand counts, the extrapolation arithmetic, and our kernel's replay against
the tensor-core and memory bounds derived by hand."""
import pytest
import torch

from pykernels import perf
from pykernels.cuda import gemm as G
from pykernels.perf import gemm as PG
from pykernels.perf.memory import MemoryShare
from pykernels.perf.trace import Recorder
from pykernels.runtime.executors import run_emu

H800 = perf.part("h800")


@pytest.mark.parametrize("m_blocks, n_blocks, band, cluster", [(3, 5, 2, 1), (4, 3, 3, 2), (5, 4, 1, 2)])
def test_unit_order_covers_every_tile_once(m_blocks, n_blocks, band, cluster):
    units = list(PG.unit_order(m_blocks, n_blocks, band, cluster))
    tiles = [(mb + j, nb) for mb, nb in units for j in range(cluster) if mb + j < m_blocks]
    assert sorted(tiles) == [(mb, nb) for mb in range(m_blocks) for nb in range(n_blocks)]


@pytest.mark.parametrize("cluster, slots, hit", [
    (1, 4, 0.5),          # one wave of 4 tiles: 2 A blocks + 2 B blocks unique of 4 x (A + B) requested
    (1, 1, 0.0),          # one tile per wave: nothing shared
    (2, 2, 1 / 3),        # 2 pairs: A 2 blocks + B 2 blocks unique of 2 x (2 A + B) requested
])
def test_wave_reuse_model_matches_hand_counts(cluster, slots, hit):
    assert PG.l2_hit_fraction(128, 128, cluster, 256, 256, 1024, slots) == pytest.approx(hit)


def test_extrapolation_over_k_blocks_and_units(monkeypatch):
    """Samples from a known cost (first unit 500 + 100 per K block, each further unit
    300 + 100 per K block): the prediction is first unit + (units per slot - 1) x further
    unit at the real K."""
    def fake(kernel, tiles, layout, units, kb, p, mem, k_full):
        return 500 + 100 * kb + (units - 1) * (300 + 100 * kb)
    monkeypatch.setattr(PG, "_sample", fake)
    tiles = PG.Tiles("ours", 128, 128, 1, "t")
    m, n, k = 128 * 3, 128 * 100, 128 * 40          # 300 units over 132 slots: 3 per busiest slot
    pred = PG.predict_config(PG.Ours(), tiles, PG.Problem("normal", 1, m, n, k), H800)
    assert pred.units == 300 and pred.units_per_slot == 3 and pred.grid == 132
    assert pred.per_kb_clk == pytest.approx(100)
    assert pred.first_unit_clk == pytest.approx(500 + 100 * 40)
    assert pred.next_unit_clk == pytest.approx(300 + 100 * 40)
    assert pred.cycles == pytest.approx(4500 + 2 * 4300)
    assert pred.tflops == pytest.approx(2 * m * n * k / (pred.cycles / H800.clock_hz) / 1e12)
    # grouped: 4 masked groups of the same problem run 4 x the units over the same slots
    grouped = PG.predict_config(PG.Ours(), tiles, PG.Problem("masked", 4, m, n, k), H800)
    assert grouped.units == 1200 and grouped.units_per_slot == 10
    assert grouped.cycles == pytest.approx(4500 + 9 * 4300)


def test_wave_reuse_model_keeps_groups_apart():
    """Two masked groups of one tile each: their A and B blocks differ, nothing is reused."""
    assert PG.l2_hit_fraction(128, 128, 1, 128, 128, 1024, 2, groups=2) == 0.0
    assert PG.l2_hit_fraction(128, 128, 1, 256, 128, 1024, 4, groups=2) == pytest.approx(0.25)


def test_wave_reuse_model_keeps_k_ranges_apart():
    """Split-K: one m-block, 2 n-blocks, 2 K ranges in one wave of 4 units: each A block is
    shared by the 2 n-blocks of its K range, no B block is shared (one m-block)."""
    # requested 4 x (A + B); unique 2 A (one per range) + 4 B
    assert PG.l2_hit_fraction(64, 128, 1, 64, 256, 1024, 4, splits=2) == pytest.approx(1 - (2 * 64 + 4 * 128) / (4 * 192))
    units = PG.Problem("normal", 1, 64, 256, 1024).units(64, 128, 1, 4, splits=2)
    assert units == [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 1, 1)]      # the K range slowest


def test_split_k_extrapolates_over_the_range_and_adds_the_reduction(monkeypatch):
    """A split-K config: units = tiles x ranges, each of ceil(KB / ranges) K blocks, plus the
    reduction pass's time."""
    def fake(kernel, tiles, layout, units, kb, p, mem, k_full):
        return 500 + 100 * kb + (units - 1) * (300 + 100 * kb)
    monkeypatch.setattr(PG, "_sample", fake)
    monkeypatch.setattr(PG, "_reduction_cycles", lambda prob, splits, p: 1000.0)
    tiles = PG.Tiles("ours", 64, 128, 1, "t", splits=4)
    m, n, k = 64, 128 * 16, 128 * 40                 # 16 tiles x 4 ranges of 10 K blocks: one wave
    pred = PG.predict_config(PG.Ours(), tiles, PG.Problem("normal", 1, m, n, k), H800)
    assert pred.units == 64 and pred.units_per_slot == 1 and pred.grid == 64
    assert pred.first_unit_clk == pytest.approx(500 + 100 * 10)
    assert pred.cycles == pytest.approx(1500 + 1000)


def test_problem_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k: expected a positive multiple of 128"):
        PG.Problem("normal", 1, 128, 128, 100)
    with pytest.raises(ValueError, match="layout: expected one of"):
        PG.Problem("ragged", 1, 128, 128, 128)
    with pytest.raises(ValueError, match="groups: the normal layout has 1 group"):
        PG.Problem("normal", 2, 128, 128, 128)


@pytest.mark.parametrize("block_m, block_n", [(128, 128), (64, 64)])
def test_our_gemm_tile_is_bounded_by_its_tensor_and_memory_time(seed, block_m, block_n):
    """One CTA of our kernel (block_m x block_n, 4 K blocks), all 132 SMs streaming, all L2
    hits: the tensor pipe is busy exactly block_m / 64 warpgroups x 4 x 64 block_n 32 / 4096
    clocks per K block, and the CTA takes at least that and at least its bytes at the SM's
    share of the L2 bandwidth."""
    cfg = G.Config(block_m, block_n, 1)
    kb = 4
    m, n, k = block_m, block_n, 128 * kb
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=gen).to(torch.float8_e4m3fn)
    sfa, sfb = torch.rand(m, kb, generator=gen) + 0.5, torch.rand(1, 1, kb, generator=gen) + 0.5
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg, sms=1)
    rec = Recorder()
    run_emu(plan, trace=rec)
    assert not torch.isnan(out.float()).any()
    mem = MemoryShare.of(H800, 132, 1.0)
    (res,) = perf.replay(rec, H800, mem)
    tensor = kb * (block_m // 64) * 4 * 64 * block_n * 32 / H800.mma_fp8_per_clk
    assert res.tensor_busy == [pytest.approx(tensor)]
    loads = kb * ((m + n) * 128 + 4 * m)
    assert res.cycles >= max(tensor, loads * mem.read_clk_per_byte)
    assert res.cycles < 4 * max(tensor, loads * mem.read_clk_per_byte) + 5000   # not stalled
