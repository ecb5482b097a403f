"""Whole-launch prediction of FP8 block-scaled GEMMs (normal layout, out = A·Bᵀ) at real
sizes on a named part: our kernel (pykernels/cuda/gemm.py) and DeepGEMM's SM90 1D2D kernel
(bench/peers/deep_gemm.py, when its headers and nvcc are there).

What is simulated: the real kernel, compiled for the config in question, on the emulator
at small sizes, one CTA (one cluster for multicast configs) per sample: 1 unit of `kb_lo`
K blocks, 1 unit of `kb_hi` K blocks, 2 units of `kb_lo` K blocks (a unit: one output tile,
or a pair of m-blocks sharing B for cluster 2). Each sample is timed by the SM model with
the memory share of the full launch (all its SMs streaming, the L2 hit fraction below).
From the samples: one K block in steady state, the first unit, each further unit on the
same SM (the persistent loop overlaps a unit's loads with the previous epilogue).
Extrapolated explicitly: the busiest slot (SM or cluster) runs ceil(units / slots) units;
the launch ends with it (waves and the tail wave).

L2 reuse (first version): the units that run at once (one wave of the persistent grid, in
the banded order of unit_order) read each A row block and B column block they share once
from HBM; nothing is reused across waves. l2_hit = 1 - unique bytes / requested bytes.
DeepGEMM's own block order is not modelled: it is given the same reuse.
"""
import dataclasses

import torch

from ..cuda import gemm as G
from ..runtime.executors import run_emu
from ..runtime.hardware import SCALE_BLOCK, cdiv
from . import MODEL_VERSION, replay
from .machines import Part, part as get_part
from .memory import MemoryShare
from .trace import Recorder


def unit_order(m_blocks: int, n_blocks: int, band: int, cluster: int):
    """(first m-block, n-block) of each schedule unit in banded order: bands of `band`
    n-blocks, m (pairs for cluster 2) slowest inside a band, n fastest."""
    pairs = cdiv(m_blocks, cluster)
    for n0 in range(0, n_blocks, band):
        for p in range(pairs):
            for n in range(n0, min(n_blocks, n0 + band)):
                yield p * cluster, n


LAYOUTS = {"normal": G.KIND_NORMAL, "contiguous": G.KIND_CONTIGUOUS, "masked": G.KIND_MASKED}


@dataclasses.dataclass(frozen=True)
class Problem:
    """`groups` products of m x k by (n x k)ᵀ (normal: groups = 1). contiguous: the groups'
    row segments are stacked (each a multiple of the tile rows); masked: every group has
    m valid rows."""
    layout: str
    groups: int
    m: int
    n: int
    k: int

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "normal" and self.groups != 1:
            raise ValueError(f"groups: the normal layout has 1 group, got {self.groups}")
        if self.k % SCALE_BLOCK or self.k <= 0:
            raise ValueError(f"k: expected a positive multiple of {SCALE_BLOCK}, got {self.k}")
        if min(self.m, self.n, self.groups) <= 0:
            raise ValueError(f"groups, m, n: expected positive sizes, got {self.groups}, {self.m}, {self.n}")

    @property
    def flops(self) -> float:
        return 2.0 * self.groups * self.m * self.n * self.k

    def label(self) -> str:
        mnk = f"{self.m}x{self.n}x{self.k}"
        return mnk if self.layout == "normal" else f"{self.layout} {self.groups} x {mnk}"

    def units(self, block_m, block_n, cluster, slots, splits=1):
        """(group, first m-block, n-block, K range) of each unit, group by group, banded
        inside; split-K: the K range slowest (the kernel's order)."""
        m_blocks, n_blocks = cdiv(self.m, block_m), cdiv(self.n, block_n)
        band = G.raster_band(n_blocks, slots * cluster)
        return [(g, mb, nb, sp) for sp in range(splits) for g in range(self.groups)
                for mb, nb in unit_order(m_blocks, n_blocks, band, cluster)]


def l2_hit_fraction(block_m, block_n, cluster, m, n, k, slots: int, groups: int = 1, splits: int = 1) -> float:
    """Hit fraction of the A / B bytes the launch reads, per the wave reuse model (A row
    blocks and B column blocks are per group, and per K range for split-K)."""
    m_blocks = cdiv(m, block_m)
    units = Problem("normal" if groups == 1 else "masked", groups, m, n, k).units(block_m, block_n, cluster, slots,
                                                                                   splits)
    requested = unique = 0
    for w in range(0, len(units), slots):
        wave = units[w:w + slots]
        ms = {(g, mb + j, sp) for g, mb, _, sp in wave for j in range(cluster) if mb + j < m_blocks}
        ns = {(g, nb, sp) for g, _, nb, sp in wave}
        requested += sum(min(cluster, m_blocks - mb) * block_m + block_n for _, mb, _, _ in wave)
        unique += len(ms) * block_m + len(ns) * block_n
    return max(0.0, 1.0 - unique / requested)


def _operands(m, n, k, gen):
    a = torch.randn(m, k, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=gen).to(torch.float8_e4m3fn)
    sfa = torch.ones(m, k // SCALE_BLOCK)
    sfb = torch.ones(cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    return a, sfa, b, sfb, out


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One config of one kernel."""
    kernel: str          # "ours" | "deepgemm"
    block_m: int
    block_n: int
    cluster: int
    name: str
    splits: int = 1      # split-K: K ranges per tile (ours, *_splitk entries; then a reduction pass)
    a_resident: bool = False   # ours: the *_ares entry (A resident per m-block run)


class Ours:
    name = "ours"
    approximation = ""

    def configs(self, prob: Problem, sms):
        """The kernel's own heuristic, as gemm_plan asks it."""
        splits = 1
        if prob.layout == "masked":
            c = G.choose_config(prob.m, prob.n, prob.k, prob.groups, sms)
        elif prob.layout == "normal":                # split-K considered (fp8_gemm_nt with bf16 out)
            c, splits = G.choose_split_k(prob.m, prob.n, prob.k, sms)
            if splits == 1:                          # gemm_plan launches the resident-A twin where it applies
                c = G.resident_twin(c, prob.m, prob.n, prob.k, sms) or c
        else:
            c = G.choose_config(prob.m * prob.groups, prob.n, prob.k, 1, sms, boundaries=prob.groups - 1)
        name = c.function + (f" x {splits} K ranges + reduction" if splits > 1 else "")
        return [Tiles("ours", c.block_m, c.block_n, c.cluster, name, splits, c.a_resident)]

    def run(self, tiles, layout, m, n, k, trace, k_full=None):
        """One group of m rows in `layout` (contiguous: every row in group 0; masked: all valid)."""
        split_k = tiles.splits > 1          # one unit of a K range: the *_splitk entry, float32 partials
        cfg = G.Config(tiles.block_m, tiles.block_n, tiles.cluster, split_k=split_k)
        a, sfa, b, sfb, out = _operands(m, n, k, torch.Generator().manual_seed(0))
        if split_k:
            out = torch.empty(m, n, dtype=torch.float32)
        grouping = {"normal": None, "contiguous": torch.zeros(m, dtype=torch.int32),
                    "masked": torch.tensor([m], dtype=torch.int32)}[layout]
        if layout == "masked":
            sfa = sfa[None]
        plan = G.gemm_plan(a, sfa, b, sfb[None], out, grouping, kind=LAYOUTS[layout], m=m, n=n, k=k, groups=1,
                           cfg=cfg, sms=tiles.cluster, max_clusters=1,
                           resident_a=None if tiles.a_resident else False)   # None: as its rule says for the sample
        run_emu(plan, trace=trace)


class DeepGemm:
    """DeepGEMM's sm90_fp8_gemm_1d2d_impl through bench/peers (its plausible configs:
    block_m 64 when M <= 64, else 128; block_n such that the tiles fill the fewest waves,
    the fullest last wave first; multicast on B when M has pairs of m-blocks)."""
    name = "deepgemm"
    approximation = ("grouped layouts: DeepGEMM's normal kernel per unit (the harness has only the normal "
                     "GEMM), with the grouped schedule and reuse")

    def __init__(self, max_configs=2):
        import importlib
        import pathlib
        import sys
        root = str(pathlib.Path(__file__).resolve().parents[2])      # the repository (bench/ is not installed)
        if root not in sys.path:
            sys.path.append(root)
        self.D = importlib.import_module("bench.peers.deep_gemm")
        self.max_configs = max_configs
        self._compiled = {}

    def configs(self, prob: Problem, sms):
        m, n, k = prob.m, prob.n, prob.k
        bms = [64] if m <= 64 else [128]
        scored = []
        for bm in bms:
            for bn in list(range(16, 129, 8)) + [144, 160]:
                for c in (1, 2):
                    if c == 2 and cdiv(m, bm) < 2:
                        continue
                    try:
                        self.D.max_stages(bm, bn, k)
                    except ValueError:
                        continue
                    units = prob.groups * cdiv(cdiv(m, bm), c) * cdiv(n, bn)
                    slots = sms // c
                    waves = cdiv(units, slots)
                    last = units / (waves * slots)
                    scored.append((waves, -last, -bm * bn, c, bm, bn))
        scored.sort()
        picks = []
        for waves, _, _, c, bm, bn in scored:
            if len(picks) == self.max_configs:
                break
            picks.append(Tiles("deepgemm", bm, bn, c, f"deepgemm_m{bm}n{bn}" + (f"_mc{c}" if c > 1 else "")))
        return picks

    def run(self, tiles, layout, m, n, k, trace, k_full=None):
        key = (tiles.block_m, tiles.block_n, tiles.cluster, k_full)
        if key not in self._compiled:
            stages = self.D.max_stages(tiles.block_m, tiles.block_n, k_full or k)
            self._compiled[key] = self.D.compile_fp8_gemm(tiles.block_m, tiles.block_n, num_sms=tiles.cluster,
                                                         cluster=tiles.cluster, stages=stages)
        a, sfa, b, sfb, out = _operands(m, n, k, torch.Generator().manual_seed(0))
        self.D.launch_fp8_gemm(self._compiled[key], a, sfa, b, sfb, out, trace=trace)


@dataclasses.dataclass
class Prediction:
    kernel: str
    part: str
    problem: Problem
    config: str
    grid: int
    units: int
    units_per_slot: int
    l2_hit: float
    per_kb_clk: float
    first_unit_clk: float
    next_unit_clk: float
    cycles: float
    seconds: float
    tflops: float
    sampled: str
    model_version: str = MODEL_VERSION

    @property
    def m(self):
        return self.problem.m

    @property
    def n(self):
        return self.problem.n

    @property
    def k(self):
        return self.problem.k

    def lines(self):
        return [f"model ({self.part.upper()}, model version {self.model_version}): {self.kernel} FP8 GEMM "
                f"{self.problem.label()}",
                f"  config {self.config}, grid {self.grid} CTAs, {self.units} units, the busiest slot runs "
                f"{self.units_per_slot}",
                f"  memory: {self.grid} SMs streaming, L2 hit fraction {self.l2_hit:.3f} (wave reuse model)",
                f"  sampled: {self.sampled}",
                f"  per K block {self.per_kb_clk:.1f} clk, first unit {self.first_unit_clk:.0f} clk, "
                f"each further unit {self.next_unit_clk:.0f} clk",
                f"  predicted {self.cycles:.0f} clk = {self.seconds * 1e6:.1f} us = {self.tflops:.0f} TFLOP/s"]


def _sample(kernel, tiles, layout, units, kb, p, mem, k_full):
    c = tiles.cluster
    rec = Recorder()
    kernel.run(tiles, layout, tiles.block_m * c, tiles.block_n * units, kb * SCALE_BLOCK, rec, k_full=k_full)
    return max(r.cycles for r in replay(rec, p, mem))


def _reduction_cycles(prob: Problem, splits: int, p: Part) -> float:
    """Split-K's second pass (cuda/gemm.reduce_plan) at the problem's real size on the
    emulator, timed with all its CTAs streaming. Its reads are the float32 partials the
    first pass has just written: L2 hits when they fit in half the L2 (an assumption: no
    cache is simulated), else HBM reads. No launch gap is counted (the model has none)."""
    m, n = prob.m, prob.n
    workspace = torch.zeros(splits * m, n)
    plan = G.reduce_plan(workspace, torch.empty(m, n, dtype=torch.bfloat16), m, n, splits, sms=p.sms)
    hit = 1.0 if workspace.numel() * 4 <= p.l2_bytes / 2 else 0.0
    rec = Recorder()
    run_emu(plan, trace=rec)
    return max(r.cycles for r in replay(rec, p, MemoryShare.of(p, plan.grid[0], hit)))


def predict_config(kernel, tiles: Tiles, prob: Problem, p: Part, kb_lo=3, kb_hi=11) -> Prediction:
    c = tiles.cluster
    k = prob.k
    probe = prob.units(tiles.block_m, tiles.block_n, c, p.sms // c, tiles.splits)
    units = len(probe)
    slots = min(p.sms // c, units)
    grid = slots * c
    hit = l2_hit_fraction(tiles.block_m, tiles.block_n, c, prob.m, prob.n, k, slots, prob.groups, tiles.splits)
    mem = MemoryShare.of(p, grid, hit)
    kb = cdiv(k // SCALE_BLOCK, tiles.splits)        # K blocks of a unit (split-K: of the longest range)
    s_lo = _sample(kernel, tiles, prob.layout, 1, kb_lo, p, mem, k)
    s_hi = _sample(kernel, tiles, prob.layout, 1, kb_hi, p, mem, k)
    s_two = _sample(kernel, tiles, prob.layout, 2, kb_lo, p, mem, k)
    per_kb = (s_hi - s_lo) / (kb_hi - kb_lo)
    first = s_lo + (kb - kb_lo) * per_kb
    further = (s_two - s_lo) + (kb - kb_lo) * per_kb
    per_slot = cdiv(units, slots)
    reduce = _reduction_cycles(prob, tiles.splits, p) if tiles.splits > 1 else 0.0
    cycles = first + (per_slot - 1) * further + reduce
    seconds = cycles / p.clock_hz
    sampled = (f"the kernel ({kernel.name}) on the emulator, one {'cluster' if c > 1 else 'CTA'}: 1 unit x {kb_lo} "
               f"K blocks, 1 unit x {kb_hi}, 2 units x {kb_lo}")
    if reduce:
        sampled += f"; the reduction pass of the {tiles.splits} float32 slices run whole: {reduce:.0f} clk"
    if prob.layout != "normal" and kernel.approximation:
        sampled += f" [{kernel.approximation}]"
    return Prediction(kernel.name, p.key, prob, tiles.name, grid, units, per_slot, hit, per_kb, first, further,
                      cycles, seconds, prob.flops / seconds / 1e12, sampled)


def predict(m: int, n: int, k: int, part="h800", kernel="ours", layout="normal", groups=1, **kw) -> Prediction:
    """Predicted time of `kernel` ("ours" or "deepgemm", the best of its plausible
    configs) for an FP8 GEMM on `part`: `groups` problems of m (rows per group) x n x k
    in `layout` ("normal", "contiguous" with aligned segments, "masked" with every row
    valid)."""
    prob = Problem(layout, groups, m, n, k)
    p = part if isinstance(part, Part) else get_part(part)
    kern = {"ours": Ours, "deepgemm": DeepGemm}
    if kernel not in kern:
        raise ValueError(f"kernel: expected one of {sorted(kern)}, got {kernel!r}")
    kern = kern[kernel]()
    preds = [predict_config(kern, t, prob, p, **kw) for t in kern.configs(prob, p.sms)]
    return min(preds, key=lambda x: x.cycles)
