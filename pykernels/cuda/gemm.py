"""Host side of the hand-written FP8 block-scaled GEMM (csrc/gemm/fp8_gemm.cu, docs/gemm.md).

Inputs are validated by pykernels.ops.gemm; here: tile-config choice, stage count, grid,
shared-memory size, tensor maps, argument packing -> LaunchPlan, run on the GPU
("cuda") or on the PTX emulator ("emu"). No host-device synchronisation.

One kernel per tile shape serves the three layouts (runtime `kind`). Kernel parameters, in
order: tmap_a, tmap_b, tmap_sfa, tmap_out, sfb, out, grouping, m, n, k, groups, kind,
stages, band, record (the device error record: the kernel checks m_indices / masked_m
values where its schedule reads them; on the emulator the record is raised right after the
launch, on the GPU never read here), tmap_sfb (1x128 B scales, *_rowb entries). K: a
multiple of 16 (the TMA row stride of A and B); the kernel walks ceil(K/128) K blocks and
the TMA zero-fills the tail of the last one (the maps of A and B have the true K extent).
The A scales travel by TMA with A: tmap_sfa is a 3-D map [G, ceil(K/128), M] over sfa in
the column-major TMA-aligned layout (M contiguous, padded to 4 floats; DeepGEMM's
`get_col_major_tma_aligned_tensor` layout), read in place when given so and transposed
into that layout by one torch copy otherwise (`sfa_tma_aligned`). Configs with cluster = 2
(entries `*_mc2`) run pairs of CTAs that share each B tile by TMA multicast: launched with
cluster dims (2, 1, 1), an even grid, and a B tensor map whose box is half the tile (each
CTA loads one half for both). Split-K (`*_splitk` entries, normal layout, bf16 out; the
last parameter `splits`): `splits` K ranges per tile write float32 partials into a
workspace, then a second kernel (REDUCE_MODULE) adds them in order into out; fp8_gemm_nt
takes it when choose_split_k's cost rule says so.

The compiled instantiations (CONFIGS) are read from the build manifest: the kernel's
PK_FP8_GEMM_ENTRY lines are their one source.
"""
import dataclasses
import functools
import math
import re

import torch

from ..reference.constants import FP8_E4M3_MAX, FP8_SCALE_FLOOR
from ..runtime import artifacts, device_errors
from ..runtime.executors import max_active_clusters, run_plan
from ..runtime.hardware import (DEFAULT_NUM_SMS, SCALE_BLOCK, SMEM_PER_BLOCK, TMA_ALIGNMENT_BYTES, cdiv, num_sms,
                                round_up)
from ..runtime.plan import Arg, LaunchPlan, ptr, ptr_or_null, u32
from ..runtime.tensormap import TensorMapDesc

MODULE = "gemm_fp8_gemm"
MAX_STAGES = 8                  # deeper rings buy nothing once TMA latency is covered
MIN_STAGES = 3
OUT_BOX_ROWS, OUT_BOX_COLS = 64, 16   # TMA store box (bf16, 32-byte swizzle)

KIND_NORMAL, KIND_CONTIGUOUS, KIND_MASKED = 0, 1, 2
# the kernel's parameters, in order (LaunchPlan.args)
PARAMS = ("tmap_a", "tmap_b", "tmap_sfa", "tmap_out", "sfb", "out", "grouping", "m", "n", "k", "groups", "kind",
          "stages", "band", "record", "tmap_sfb", "sfd", "splits")
REDUCE_MODULE, REDUCE_FUNCTION = "gemm_splitk_reduce", "pk_fp8_gemm_splitk_reduce"   # split-K's second pass
REDUCE_THREADS = 256
OPS = {KIND_NORMAL: "fp8_gemm_nt", KIND_CONTIGUOUS: "m_grouped_fp8_gemm_nt_contiguous",
       KIND_MASKED: "m_grouped_fp8_gemm_nt_masked"}     # op names in recorded errors

# Cost-model constants (per SM, per clock; H100 SXM at ~1.75 GHz). Assumptions, to be
# calibrated on a GPU (docs/gemm.md): tensor core 4096 e4m3 MACs/clk, shared-memory
# operand reads 128 B/clk, L2 -> SM 64 B/clk per SM and ~5.7 KB/clk (10 TB/s) in all,
# HBM ~1.7 KB/clk (3 TB/s), output stores 32 B/clk per SM.
_MACS_PER_CLK = 4096
_SMEM_BYTES_PER_CLK = 128
_L2_BYTES_PER_CLK = 5700
_DRAM_BYTES_PER_CLK = 1700
_TILE_FIXED_CLK = 600           # scheduler, pipeline hand-over, epilogue latency
COST_PART = "h800"              # split-K's cost rule (streaming_cycles): the timing model's part (DeepGEMM's table)
MULTICAST_GAIN = 0.97           # a cluster-2 config must model >= 3% faster than the best
                                # cluster-1 one (the model ignores lockstep stalls between the pair)


@dataclasses.dataclass(frozen=True)
class Config:
    """One compiled tile shape: BLOCK_M x BLOCK_N (K blocks of SCALE_BLOCK); cluster = 2: pairs of
    CTAs (adjacent m-blocks, same n-block) share B by TMA multicast."""
    block_m: int
    block_n: int
    cluster: int = 1
    f32acc: bool = False       # float32 out, accumulated in place (entries *_f32acc)
    row_b: bool = False        # 1x128 B scales by TMA (entries *_rowb; f32acc only)
    e4m3: bool = False         # e4m3 out with 1x128 scales computed on store (entries *_e4m3)
    split_k: bool = False      # float32 partials of K-block ranges into a workspace (entries *_splitk)
    a_resident: bool = False   # the whole K of an m-block's A resident, runs of units (entries *_ares; resident_twin)

    @property
    def math_warpgroups(self) -> int:
        """One per 64 rows up to BLOCK_M 128; BLOCK_M 256: two, each computing its 128 rows
        as two 64-row waves (fp8_gemm.cu Layout::kWaves)."""
        return min(self.block_m // 64, 2)

    @property
    def waves(self) -> int:
        """64-row waves per math warpgroup (2 for BLOCK_M 256)."""
        return self.block_m // 64 // self.math_warpgroups

    @property
    def chunk_n(self) -> int:
        """Columns of one wgmma: BLOCK_N; two waves and BLOCK_N > 128: the widest multiple of 8
        up to 72 dividing BLOCK_N (fp8_gemm.cu chunk_n: the accumulator set is chunk_n / 2
        registers beside a BLOCK_N / 2 result per wave)."""
        if self.waves > 1 and self.block_n > 128:
            return next(c for c in range(72, 0, -8) if self.block_n % c == 0)
        return self.block_n

    @property
    def threads(self) -> int:
        return 128 * (self.math_warpgroups + 1)   # + the producer warpgroup

    @property
    def function(self) -> str:
        suffix = ((f"_mc{self.cluster}" if self.cluster > 1 else "") + ("_f32acc" if self.f32acc else "")
                  + ("_rowb" if self.row_b else "") + ("_e4m3" if self.e4m3 else "")
                  + ("_splitk" if self.split_k else "") + ("_ares" if self.a_resident else ""))
        return f"pk_fp8_gemm_nt_m{self.block_m}n{self.block_n}{suffix}"

    @property
    def b_box_rows(self) -> int:
        """Rows of B one CTA loads per stage (multicast: its half of the tile)."""
        return self.block_n // self.cluster

    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * SCALE_BLOCK

    def smem_bytes(self, stages: int, k: int = 0) -> int:
        """Dynamic shared memory (Layout::smem_bytes in the kernel, which traps when given
        less: tests/test_gemm_emu.py checks the two agree): 1024 alignment slack + stages
        x (A + B tiles + BLOCK_M f32 A scales) + a 64 x BLOCK_N bf16 output staging tile
        per 64-row wave of each math warpgroup + 2 mbarriers per stage. a_resident
        (Layout::smem_bytes_resident): A and its scales for every K block of k instead of
        per stage, + A's two mbarriers."""
        staging = self.math_warpgroups * self.waves * 64 * 2 * self.block_n     # one tile per 64-row wave
        scales = 4 * self.block_m + (4 * self.block_n if self.row_b else 0)     # per stage: A (and B) scales
        if self.a_resident:
            a = cdiv(k, SCALE_BLOCK) * (self.block_m * SCALE_BLOCK + 4 * self.block_m)
            return 1024 + a + stages * self.block_n * SCALE_BLOCK + staging + 16 * stages + 16
        return 1024 + stages * (self.stage_bytes() + scales) + staging + 16 * stages

    def max_stages(self, k: int = 0) -> int:
        """The most stages (at most MAX_STAGES) that fit (a_resident: with k's A resident; may be 0)."""
        s = MAX_STAGES
        while s > (0 if self.a_resident else 1) and self.smem_bytes(s, k) > SMEM_PER_BLOCK:
            s -= 1
        return s


_ENTRY = re.compile(r"pk_fp8_gemm_nt_m(\d+)n(\d+)(?:_mc(\d+))?(_f32acc)?(_rowb)?(_e4m3)?(_splitk)?(_ares)?")


@functools.lru_cache(maxsize=None)
def compiled_configs(f32acc: bool = False, row_b: bool = False, e4m3: bool = False, split_k: bool = False,
                     a_resident: bool = False) -> tuple:
    """The Configs compiled into MODULE (the entry functions of the build manifest, i.e.
    the PK_FP8_GEMM_ENTRY lines of fp8_gemm.cu) with bf16 output (f32acc False) or float32
    output accumulated in place (True: the *_f32acc entries), with 128x128 B scales or
    (row_b) 1x128 ones (*_rowb), or e4m3 output quantized on store (e4m3: *_e4m3), or the
    split-K first pass (split_k: *_splitk), or the resident-A entries (a_resident: *_ares):
    cluster 1 first, larger tiles first."""
    found = []
    for function in artifacts.manifest()["kernels"][MODULE]["functions"]:
        if function.startswith("pk_bf16_gemm_nt_"):          # the bf16 entries: cuda/bf16_gemm.py
            continue
        match = _ENTRY.fullmatch(function)
        if match is None:
            raise RuntimeError(f"{MODULE}: entry {function!r} does not name a tile shape "
                               "(pk_fp8_gemm_nt_m<BM>n<BN>[_mc2][_f32acc][_rowb][_e4m3][_splitk][_ares])")
        bm, bn, cluster, acc, rows, q, split, ares = match.groups()
        if (bool(acc), bool(rows), bool(q), bool(split), bool(ares)) == (f32acc, row_b, e4m3, split_k, a_resident):
            found.append(Config(int(bm), int(bn), int(cluster or 1), bool(acc), bool(rows), bool(q), bool(split),
                                bool(ares)))
    return tuple(sorted(found, key=lambda c: (c.cluster, -c.block_m, -c.block_n)))


# Tile shapes the heuristic does not pick (still compiled, and run when a plan names
# them): the multicast pairs. On an H200 (docs/results.md) they were 1.3-2.6x slower than
# the best cluster-1 config with the old GPU-scope stage release (commit 8d5587c), and
# after the shared-memory-only release (commit e5015a6) still 2-6% slower than the same
# tile at cluster 1 on the four shapes measured. The 112/144/160-column tiles were out too until their B-scale select
# became compile-time (e5015a6: m128n160 1.08x m128n128 at 4096x7168x16384, m128n144
# 1.13x at 4096x2112x7168).
NOT_AUTO = frozenset({"pk_fp8_gemm_nt_m128n160_mc2", "pk_fp8_gemm_nt_m128n128_mc2"})


def auto_configs(f32acc: bool = False, row_b: bool = False, e4m3: bool = False) -> tuple:
    """The compiled configs the heuristic chooses from (compiled_configs minus NOT_AUTO)."""
    return tuple(c for c in compiled_configs(f32acc, row_b, e4m3) if c.function not in NOT_AUTO)


def __getattr__(name):
    if name == "CONFIGS":       # read on first use: importing this module needs no build
        return compiled_configs()
    if name == "F32ACC_CONFIGS":
        return compiled_configs(True)
    if name == "ROWB_CONFIGS":
        return compiled_configs(True, True)
    if name == "E4M3_CONFIGS":
        return compiled_configs(e4m3=True)
    if name == "SPLITK_CONFIGS":
        return compiled_configs(split_k=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kblock_mma_cycles(cfg: Config, macs_per_clk: float) -> float:
    """Tensor-core time of one K block of a tile: 64-row waves x column chunks x 4 k32 steps of
    wgmma m64 x chunk_n, each bounded by its MACs or by its shared-memory operand reads (A
    64 x 32 and B chunk_n x 32 bytes) at _SMEM_BYTES_PER_CLK."""
    cn = cfg.chunk_n
    per = max(64 * cn * 32 / macs_per_clk, (64 * 32 + cn * 32) / _SMEM_BYTES_PER_CLK)
    return cfg.block_m // 64 * (cfg.block_n // cn) * 4 * per


@functools.lru_cache(maxsize=None)
def _sm_port_bytes_per_clk() -> float:
    """What one SM receives (and stores) per clock through its L2 port on COST_PART (the timing
    model's machine description, model v0.2: the L2 bandwidth's even share)."""
    from ..perf.machines import part
    return part(COST_PART).sm_l2_bytes_per_clk


def resident_twin(cfg: Config, m: int, n: int, k: int, sms: int):
    """The *_ares entry that gemm_plan launches for `cfg` in the normal layout (bf16 out), or
    None: when it is compiled, k's A blocks and scales fit beside at least MIN_STAGES B
    stages, and A is reused (each CTA runs at least two units and a row of n has two). Its
    CTAs walk contiguous m-major runs of units and load an m-block's A once per run."""
    if cfg.a_resident:
        return cfg
    twin = dataclasses.replace(cfg, a_resident=True)
    if twin not in compiled_configs(a_resident=True) or twin.max_stages(k) < MIN_STAGES:
        return None
    units = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    if cdiv(n, cfg.block_n) < 2 or cdiv(units, max(1, min(sms, units))) < 2:
        return None
    return twin


def estimate_cycles(cfg: Config, m: int, n: int, k: int, groups: int, sms: int, boundaries: int = 0,
                    clusters: int = None, normal: bool = False) -> float:
    """Model of the kernel's run time in SM clocks for `groups` problems of m x n x k.

    Per K block of a tile: the wgmma time (BM/64 warpgroups x 4 instructions of
    m64nBNk32, each bounded by tensor throughput or by its shared-memory operand reads)
    against the TMA bytes at the per-SM L2 rate; a tile adds the output stores and a
    fixed cost; tiles run in waves over the SMs. Bounded below by total L2 -> SM traffic
    and by the HBM traffic of reading A and B once and writing out.

    Multicast (cluster = 2): the schedule's unit is a pair of adjacent m-blocks run by
    the two CTAs of a cluster in lockstep (an odd last m-block leaves one CTA of its pair
    idle but busy for the same time); units run in waves over sms / 2 clusters. Each SM
    still receives A + the whole B per K block, but L2 sends B once per pair: the L2
    bound counts A per tile and B per unit. `boundaries` (contiguous layout: groups - 1)
    adds, per n-block, one unit for each group boundary that may split a pair (its two
    m-blocks then need two passes, one per group).

    normal (the normal layout, bf16 out): a config whose resident-A twin gemm_plan launches
    (resident_twin) loads only B per K block and each of a CTA's m-blocks of A once (its
    run of ceil(units / #SMs) units meets at most ceil(run / n-blocks) + 1 m-blocks).
    """
    bm, bn, c = cfg.block_m, cfg.block_n, cfg.cluster
    kb = cdiv(k, SCALE_BLOCK)                             # a partial last K block costs a whole one
    n_blocks = cdiv(n, bn)
    tiles = groups * cdiv(m, bm) * n_blocks
    units = groups * cdiv(cdiv(m, bm), c) * n_blocks + (boundaries * n_blocks if c > 1 else 0)
    mma = kblock_mma_cycles(cfg, _MACS_PER_CLK)
    port = _sm_port_bytes_per_clk()
    load = (bm + bn) * SCALE_BLOCK / port
    tile = kb * max(mma, load) + bm * bn * 2 / port + _TILE_FIXED_CLK
    waves = cdiv(units, max(1, clusters or sms // c))     # clusters: co-resident (multicast)
    l2 = (tiles * bm + units * bn) * k / _L2_BYTES_PER_CLK
    dram = groups * (m * k + n * k + 2 * m * n) / _DRAM_BYTES_PER_CLK
    if normal and groups == 1 and resident_twin(cfg, m, n, k, sms) is not None:
        run = cdiv(units, min(sms, units))
        a_loads = min(run, cdiv(run, n_blocks) + 1)
        tile = kb * max(mma, bn * SCALE_BLOCK / port) + bm * bn * 2 / port + _TILE_FIXED_CLK
        l2 = (min(sms, units) * a_loads * bm + units * bn) * k / _L2_BYTES_PER_CLK
        return max(run * tile + a_loads * bm * kb * SCALE_BLOCK / port, l2, dram)
    return max(waves * tile, l2, dram)


def _ranked(configs, m, n, k, groups, sms, boundaries, slots=None, normal=False) -> tuple:
    """((config, modelled cycles), ...) of `configs`, the pick first, then by modelled time. The
    pick: the smallest modelled time; ties (within 1%) go to the larger tile within the
    problem (min(BLOCK_M, m) x min(BLOCK_N, n): a tile taller than m computes rows nobody
    needs), then to the smaller tile. slots(cfg): the clusters of a multicast config that
    run at once (default #SMs / 2)."""
    def t(c):
        return estimate_cycles(c, m, n, k, groups, sms, boundaries, slots(c) if slots and c.cluster > 1 else None,
                               normal)

    def size(c):
        return min(c.block_m, m) * min(c.block_n, n), -c.block_m * c.block_n
    scored = sorted(((c, t(c)) for c in configs), key=lambda ct: (ct[1], [-v for v in size(ct[0])]))
    if not scored:
        return ()
    best = 0
    for i, (c, tc) in enumerate(scored[1:], 1):
        if tc <= 1.01 * scored[best][1] and size(c) > size(scored[best][0]):
            best = i
    return (scored[best],) + tuple(scored[:best] + scored[best + 1:])


@dataclasses.dataclass(frozen=True)
class Ranking:
    """choose_config's scoring of one problem: the cluster-1 and the multicast candidates,
    each ((config, modelled cycles), ...) with its pick first (_ranked), and what was
    scored (m: the rows per group the model assumed). `chosen` is choose_config's answer;
    pykernels.explain prints the same object."""
    single: tuple
    multicast: tuple
    m: int
    n: int
    k: int
    groups: int
    boundaries: int

    @property
    def multicast_wins(self) -> bool:
        """The best pair models faster than MULTICAST_GAIN x the best cluster-1 config's time."""
        return bool(self.multicast) and self.multicast[0][1] < MULTICAST_GAIN * self.single[0][1]

    @property
    def chosen(self) -> Config:
        return (self.multicast if self.multicast_wins else self.single)[0][0]


def rank_configs(m: int, n: int, k: int, groups: int = 1, sms: int = DEFAULT_NUM_SMS, boundaries: int = 0,
                 slots=None, candidates=None, normal: bool = False) -> Ranking:
    """choose_config's Ranking of `candidates` (default auto_configs()); .chosen is its answer.
    normal: a normal-layout bf16-out launch (resident-A twins costed, estimate_cycles)."""
    m, k = max(m, 1), max(k, SCALE_BLOCK)
    configs = auto_configs() if candidates is None else candidates
    single = _ranked([c for c in configs if c.cluster == 1], m, n, k, groups, sms, boundaries, normal=normal)
    multicast = [c for c in configs if c.cluster > 1 and sms >= 2 * c.cluster]
    return Ranking(single, _ranked(multicast, m, n, k, groups, sms, boundaries, slots), m, n, k, groups, boundaries)


def choose_config(m: int, n: int, k: int, groups: int = 1, sms: int = DEFAULT_NUM_SMS, boundaries: int = 0,
                  slots=None, candidates=None, normal: bool = False) -> Config:
    """The tile shape among `candidates` (default auto_configs()) with the smallest
    modelled time (estimate_cycles); ties
    (within 1%) go to the larger tile. m is rows per group (contiguous: all rows, groups=1,
    boundaries = number of groups - 1). A multicast (cluster-2) config is chosen only when
    it models at least 3% faster than the best cluster-1 config (MULTICAST_GAIN): in
    practice when the L2 -> SM traffic bounds the cluster-1 kernel (large M and N, every
    SM busy) and M has pairs of m-blocks. slots(cfg): co-resident clusters of a multicast
    config (on a GPU the driver's count, `resident_clusters`; default #SMs / 2). The
    scoring itself: rank_configs (what pykernels.explain prints)."""
    return rank_configs(m, n, k, groups, sms, boundaries, slots, candidates, normal).chosen


def split_count(k: int, splits: int) -> int:
    """The K ranges of ceil(KB / splits) K blocks each that cover KB = ceil(k/128) (none empty)."""
    kb = cdiv(k, SCALE_BLOCK)
    return cdiv(kb, cdiv(kb, splits))


def streaming_cycles(cfg: Config, m: int, n: int, k: int, sms: int, splits: int = 1) -> float:
    """Cost rule of a normal-layout launch whose units all run at once (one wave: units =
    tiles x splits <= #SMs), the regime where split-K is considered, in the timing model's
    terms (pykernels.perf: the machine description of COST_PART, its memory share rule):
    per K block the most of the wgmma time and the unit's A + B bytes at one SM's read
    rate when all units stream (max of its L2 port, its share of the L2 bandwidth and, for
    the bytes the wave does not share, of the HBM bandwidth; the wave shares each A block
    of a K range among its n-blocks and each B block among its m-blocks); per unit its
    output (float32 partials for split-K) at its share of the HBM write bandwidth and
    _TILE_FIXED_CLK; split-K adds the reduction pass: the partials read at the L2 rate
    (just written: L2 hits, as the model assumes), the bf16 output written at the HBM
    rate, _TILE_FIXED_CLK. Like the model it counts no gap between the two launches."""
    from ..perf.machines import part
    from ..perf.memory import MemoryShare
    p = part(COST_PART)
    bm, bn = cfg.block_m, cfg.block_n
    kb = cdiv(cdiv(k, SCALE_BLOCK), splits)
    m_blocks, n_blocks = cdiv(m, bm), cdiv(n, bn)
    active = min(m_blocks * n_blocks * splits, p.sms)
    unit_bytes = (bm + bn) * SCALE_BLOCK
    distinct = splits * (m_blocks * bm + n_blocks * bn) * SCALE_BLOCK
    mem = MemoryShare.of(p, active, max(0.0, 1.0 - distinct / (active * unit_bytes)))
    mma = kblock_mma_cycles(cfg, p.mma_fp8_per_clk)
    per_kb = max(mma, unit_bytes * mem.read_clk_per_byte)
    out_bytes = 4 if splits > 1 else 2
    t = kb * per_kb + bm * bn * out_bytes * mem.share_write_clk_per_byte + _TILE_FIXED_CLK
    if splits > 1:
        t += 4 * splits * m * n / p.l2_bytes_per_clk() + 2 * m * n / p.hbm_bytes_per_clk() + _TILE_FIXED_CLK
    return t


def choose_split_k(m: int, n: int, k: int, sms: int = DEFAULT_NUM_SMS, slots=None) -> tuple:
    """(config, splits) of a normal-layout bf16 GEMM: choose_config's config (splits 1), or
    a split-K entry (*_splitk) with a K-range count, when the one-wave cost rule
    (streaming_cycles) finds it faster than choose_config's config. Considered only when
    that config runs in one wave (small M x N) and among counts that keep one wave (tiles x
    splits <= #SMs): more CTAs than tiles, each streaming its K range of B."""
    m, k = max(m, 1), max(k, SCALE_BLOCK)
    base = choose_config(m, n, k, 1, sms, slots=slots, normal=True)
    if base.cluster > 1 or cdiv(m, base.block_m) * cdiv(n, base.block_n) > sms:
        return base, 1
    best = (streaming_cycles(base, m, n, k, sms), base, 1)
    for cfg in compiled_configs(split_k=True):
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        for s in sorted({split_count(k, s) for s in range(2, max(2, sms // tiles) + 1)}):
            if s > 1 and tiles * s <= sms:
                t = streaming_cycles(cfg, m, n, k, sms, s)
                if t < best[0]:
                    best = (t, cfg, s)
    return best[1], best[2]


def raster_band(n_blocks: int, grid: int) -> int:
    """n-blocks per rasterisation band: about sqrt(grid) so that the tiles running at
    once form a square-ish patch (A rows and B columns reused from L2)."""
    return max(1, min(n_blocks, math.isqrt(max(grid, 1))))


def check_shapes(m: int, n: int, k: int, rows_total: int, groups: int) -> None:
    """Shapes this kernel supports (beyond pykernels.gemm's validation)."""
    if n % 8:
        raise ValueError(f"n: the cuda FP8 GEMM needs N to be a multiple of 8 (16-byte output rows), got {n}")
    if k % TMA_ALIGNMENT_BYTES:    # rows of A and B (1-byte e4m3) are TMA rows: 16-byte strides
        raise ValueError(f"k: expected a multiple of {TMA_ALIGNMENT_BYTES} (the TMA's row stride of A and B), "
                         f"got {k}")
    if rows_total >= 2**31 or groups * n >= 2**31 or k >= 2**31:
        raise ValueError(f"a/b: TMA coordinates are 32-bit: rows {rows_total}, groups x n {groups * n}, "
                         f"k {k} must stay below 2^31")


def sfa_tma_aligned(sfa: torch.Tensor) -> torch.Tensor:
    """sfa f32 [m, ceil(k/128)] or [G, m, ceil(k/128)] as the kernel's TMA reads it: a [G, ceil(k/128), m]
    view (G = 1 for 2-D sfa) with m contiguous and the K-block stride m rounded up to 4
    floats (16 bytes, TMA's stride unit), on a 16-byte aligned base. Returned as a view of
    sfa when sfa already has that layout (column-major TMA-aligned), else a copy."""
    s3 = sfa.unsqueeze(0) if sfa.dim() == 2 else sfa
    g, m, kb = s3.shape
    pad = round_up(m, 4)
    t = s3.transpose(1, 2)                                   # [G, kb, m], m innermost if col-major
    # strides of size-1 dims are free in torch; give them values TMA accepts
    sg = t.stride(0) if g > 1 else kb * pad
    sk = t.stride(1) if kb > 1 else pad
    sm = t.stride(2) if m > 1 else 1
    if sm == 1 and sk % 4 == 0 and sk >= m and sg % 4 == 0 and sg >= kb * sk and _aligned(t):
        return t.as_strided(t.shape, (sg, sk, 1))
    buf = torch.empty(g, kb, pad, dtype=torch.float32, device=sfa.device)
    buf[..., :m] = t
    return buf[..., :m]


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def gemm_plan(a2: torch.Tensor, sfa: torch.Tensor, b2: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
              grouping, *, kind: int, m: int, n: int, k: int, groups: int, cfg: Config = None,
              sms: int = None, stages: int = None, heuristic_m: int = None, max_clusters: int = None,
              record: torch.Tensor = None, b_scale_rows: int = SCALE_BLOCK, sfd: torch.Tensor = None,
              splits: int = 1, resident_a: bool = None) -> LaunchPlan:
    """Launch plan for the kernel.

    a2: e4m3 [rows, k] (masked: [G * m_max, k]); b2: e4m3 [G * n, k]; sfa: f32 [.., m,
    ceil(k/128)] (any strides); sfb: f32 [G, ceil(n/128), ceil(k/128)] contiguous; out:
    contiguous, bf16 (written) or float32 (accumulated in place, out += the product: the
    *_f32acc configs); b_scale_rows 1: sfb f32 [n, ceil(k/128)] (any strides), 1x128 B
    scales (float32 out, normal layout: the *_rowb configs); out e4m3 with sfd f32 [m,
    ceil(n/128)] contiguous: quantized on store (normal layout: the *_e4m3 configs);
    grouping: m_indices (contiguous), masked_m (masked) or None; m: rows per group. cfg /
    stages default to the heuristic and to the most stages that fit; heuristic_m: the rows
    per group the heuristic assumes (masked: expected_m). A cfg with cluster = 2 gives a
    plan with cluster dims (2, 1, 1) and an even grid of at most `max_clusters` clusters
    (default: what the GPU holds at once, `resident_clusters`; #SMs / 2 on the CPU).
    record: the int32 device error record the kernel's checks write to (default: the
    device's, device_errors.record_for). A split-K cfg (*_splitk, normal layout): the first
    pass, `splits` K ranges (split_count(k, splits) == splits: none empty) whose float32
    partials go to out = the workspace f32 [splits * m, n] (reduce_plan: the second pass).
    resident_a (normal layout, bf16 out): None launches the config's resident-A twin (*_ares)
    where resident_twin finds one, False never, True requires it (ValueError otherwise).
    """
    sms = sms or num_sms(a2.device)
    rows_total = a2.shape[0]
    split_k = cfg is not None and cfg.split_k
    if splits > 1 and not split_k:
        raise ValueError(f"splits: {splits} K ranges need a split-K cfg (*_splitk), got {cfg}")
    if split_k and (kind != KIND_NORMAL or out.dtype != torch.float32 or out.shape != (splits * m, n)
                    or split_count(k, splits) != splits):
        raise ValueError(f"out: split-K writes a float32 workspace [splits * m, n] = [{splits * m}, {n}] of the normal "
                         f"layout in {splits} non-empty K ranges; got {out.dtype} {tuple(out.shape)}, kind {kind}, "
                         f"{split_count(k, splits)} ranges")
    f32acc = out.dtype == torch.float32 and not split_k
    row_b, e4m3 = b_scale_rows == 1, out.dtype == torch.float8_e4m3fn
    if row_b and not (f32acc and kind == KIND_NORMAL):
        raise ValueError("b_scale_rows: 1x128 B scales are compiled for float32 out of the normal layout only")
    if e4m3 != (sfd is not None) or (e4m3 and kind != KIND_NORMAL):
        raise ValueError("sfd: e4m3 out (normal layout) comes with its scales sfd, and only then")
    check_shapes(m, n, k, rows_total, groups)
    if not (_aligned(a2) and _aligned(b2) and _aligned(out)):
        raise ValueError("a, b, out: data pointers must be 16-byte aligned (TMA and 16-byte stores)")
    if cfg is None and stages is None and max_clusters is None:
        cfg, stages, grid = _tuned_geometry(kind, m, n, k, groups, heuristic_m, a2.device, sms,
                                            (f32acc, row_b, e4m3))
    else:
        cfg, stages, grid = _geometry(kind, m, n, k, groups, heuristic_m, a2.device, sms, (f32acc, row_b, e4m3),
                                      cfg, stages, max_clusters, splits)
    if cfg.e4m3 != e4m3:
        raise ValueError(f"cfg: {cfg.function} {'quantizes on store' if cfg.e4m3 else 'does not'}, "
                         f"out is {out.dtype}")
    if cfg.f32acc != f32acc:
        raise ValueError(f"cfg: {cfg.function} writes {'float32' if cfg.f32acc else 'bf16'}, out is {out.dtype}")
    if cfg.row_b != row_b:
        raise ValueError(f"cfg: {cfg.function} takes {'1x128' if cfg.row_b else '128x128'} B scales, "
                         f"b_scale_rows is {b_scale_rows}")
    plain = kind == KIND_NORMAL and not (f32acc or row_b or e4m3 or split_k)
    cfg, stages, grid = resident_geometry(cfg, stages, grid, m, n, k, plain, resident_a,
                                          f"kind {kind}, out {out.dtype}")
    n_blocks = cdiv(n, cfg.block_n)
    tmap_a = TensorMapDesc(a2, (cfg.block_m, SCALE_BLOCK), swizzle=128)
    tmap_b = TensorMapDesc(b2, (cfg.b_box_rows, SCALE_BLOCK), swizzle=128)
    # A scales: one box = the BLOCK_M scales of one K block of one group; rows past m are
    # zero-filled by the TMA (computed, never stored)
    tmap_sfa = TensorMapDesc(sfa_tma_aligned(sfa), (1, 1, cfg.block_m))
    # 1x128 B scales: one box = the BLOCK_N column scales of one K block, [1, KB, n] like
    # sfa (columns past n zero-filled); other configs do not read the map (sfa's, unused)
    tmap_sfb = TensorMapDesc(sfa_tma_aligned(sfb), (1, 1, cfg.block_n)) if row_b else tmap_sfa
    # output: 64-row x 16-column boxes (one per 16 columns of a math warpgroup's half),
    # 32-byte swizzle; out viewed as [rows, n] (masked: [G * m_max, n])
    # (float32 / e4m3 out: the kernel stores with st.global; a valid map of 32-byte rows, unused)
    tmap_out = TensorMapDesc(out.view(-1, n), (OUT_BOX_ROWS, 32 // out.element_size()), swizzle=32)
    group_arg = ptr_or_null(grouping)
    record = device_errors.record_for(out.device, OPS[kind]) if record is None else record
    args = (Arg("tensormap", tmap_a), Arg("tensormap", tmap_b), Arg("tensormap", tmap_sfa),
            Arg("tensormap", tmap_out), ptr(sfb), ptr(out), group_arg,
            u32(m), u32(n), u32(k), u32(groups), u32(kind), u32(stages), u32(raster_band(n_blocks, grid)),
            ptr(record), Arg("tensormap", tmap_sfb), ptr_or_null(sfd if e4m3 else None), u32(splits))
    assert len(args) == len(PARAMS)
    # PDL: the kernel waits (griddepcontrol.wait) after its barrier setup, before any global
    # access, so back-to-back GEMMs overlap one's prologue with the other's tail
    return LaunchPlan(MODULE, cfg.function, grid=(grid, 1, 1), block=(cfg.threads, 1, 1), args=args,
                      shared_bytes=cfg.smem_bytes(stages, k), cluster=(cfg.cluster, 1, 1), pdl=True)


def heuristic_ranking(kind, m, n, k, groups, heuristic_m, device, sms, variant=(False, False, False),
                      max_clusters=None) -> Ranking:
    """The heuristic's Ranking for one launch of layout `kind` (m: rows per group; masked:
    it assumes min(heuristic_m or m, m) rows per group, heuristic_m being expected_m;
    contiguous: all rows, one group, groups - 1 boundaries) among the entries of `variant`."""
    def slots(c):                        # the persistent grid's clusters (the driver's count on a GPU)
        return max_clusters or resident_clusters(c, c.max_stages(), device, sms)
    if kind == KIND_MASKED:
        return rank_configs(min(heuristic_m or m, m), n, k, groups, sms, slots=slots, candidates=auto_configs(*variant))
    return rank_configs(m, n, k, 1, sms, boundaries=groups - 1 if kind == KIND_CONTIGUOUS else 0,
                        slots=slots, candidates=auto_configs(*variant),
                        normal=kind == KIND_NORMAL and not any(variant))


def _geometry(kind, m, n, k, groups, heuristic_m, device, sms, variant=(False, False, False), cfg=None, stages=None,
              max_clusters=None, splits=1):
    """(config, stages, grid) of one launch: the heuristic's config unless given, the most
    stages that fit unless given, and the persistent grid (at most one CTA per SM; for
    multicast, the clusters that run at once). variant: (float32 out, 1x128 B scales, e4m3
    out), the compiled entries the heuristic chooses from."""
    if cfg is None:
        cfg = heuristic_ranking(kind, m, n, k, groups, heuristic_m, device, sms, variant, max_clusters).chosen
    stages = stages or cfg.max_stages()
    if not 1 <= stages or cfg.smem_bytes(stages) > SMEM_PER_BLOCK:
        raise ValueError(f"stages: {stages} stages of {cfg} need {cfg.smem_bytes(stages)} bytes of shared "
                         f"memory, more than {SMEM_PER_BLOCK}")
    n_blocks = cdiv(n, cfg.block_n)
    # schedule units: tiles (cluster 1) or pairs of m-blocks of one n-block (cluster 2)
    units = cdiv(cdiv(m, cfg.block_m), cfg.cluster) * n_blocks * splits
    if kind == KIND_MASKED:
        units *= groups                                       # upper bound: masked_m <= m_max
    if cfg.cluster == 1:
        slots = sms                                          # persistent: <= 1 CTA per SM
    else:
        slots = max_clusters or resident_clusters(cfg, stages, device, sms)
    return cfg, stages, max(1, min(slots, units)) * cfg.cluster


def resident_geometry(cfg: Config, stages: int, grid: int, m: int, n: int, k: int, plain: bool,
                      resident_a: bool = None, what: str = "") -> tuple:
    """(config, stages, grid) after the resident-A step of a launch whose geometry is (cfg,
    stages, grid): plain (the normal layout, bf16 out, 128x128 B scales, no split) swaps in
    cfg's *_ares twin where resident_twin finds one (resident_a None), never (False) or must
    (True: ValueError otherwise); a resident cfg keeps the stages that fit beside k's A and a
    grid whose runs of ceil(units / grid) units are none empty. what: the launch, for errors."""
    if plain and resident_a is not False and not cfg.a_resident:
        cfg = resident_twin(cfg, m, n, k, grid) or cfg
    if cfg.a_resident:
        stages = min(stages, cfg.max_stages(k))
        units = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        if not plain or resident_a is False or stages < 1:
            raise ValueError(f"cfg: {cfg.function} (resident A) runs the normal layout with bf16 out and k's A "
                             f"in shared memory; got {what}, k {k}, resident_a {resident_a}")
        return cfg, stages, cdiv(units, cdiv(units, grid))
    if resident_a:
        raise ValueError(f"resident_a: no resident-A entry of {cfg.function} fits or pays at m {m}, n {n}, k {k}, "
                         f"grid {grid} (resident_twin)")
    return cfg, stages, grid


# The heuristic's answer per problem size and device: computed once (it scores every
# compiled config), so a call's host cost is the tensor maps and the launch.
_tuned_geometry = functools.lru_cache(maxsize=4096)(_geometry)


def reduce_plan(workspace: torch.Tensor, out: torch.Tensor, m: int, n: int, splits: int, sms: int = None) -> LaunchPlan:
    """Split-K's second pass (csrc/gemm/splitk_reduce.cu): out bf16 [m, n] = the sum of the
    workspace's float32 slices [splits, m, n] in slice order, rounded once; a grid-stride
    grid of at most #SMs CTAs of REDUCE_THREADS threads (half as many when that spreads the
    chunks over more SMs: each SM's port caps what its CTA reads), one 8-column chunk per thread;
    chained to the split-K GEMM with PDL (it waits for the workspace with griddepcontrol.wait)."""
    if n % 8 or workspace.dtype != torch.float32 or workspace.numel() != splits * m * n:
        raise ValueError(f"workspace: expected float32 [{splits} x {m}, {n}] with n a multiple of 8, "
                         f"got {workspace.dtype} {tuple(workspace.shape)}")
    sms = sms or num_sms(out.device)
    chunks = m * n // 8
    threads = REDUCE_THREADS if chunks > sms * REDUCE_THREADS // 2 else REDUCE_THREADS // 2
    grid = max(1, min(sms, cdiv(chunks, threads)))
    return LaunchPlan(REDUCE_MODULE, REDUCE_FUNCTION, grid=(grid, 1, 1), block=(threads, 1, 1),
                      args=(ptr(workspace), ptr(out), u32(m), u32(n), u32(splits)), pdl=True)


_tuned_split_k = functools.lru_cache(maxsize=4096)(lambda m, n, k, sms: choose_split_k(m, n, k, sms))


def split_k_choice(m: int, n: int, k: int, out_dtype: torch.dtype, b_scale_rows: int, sms: int) -> tuple:
    """(split-K cfg, splits) of a normal-layout launch, or (None, 1): the heuristic's config, no
    split. Split-K is for bf16 out with 128x128 B scales only (choose_split_k decides)."""
    if out_dtype == torch.bfloat16 and b_scale_rows == SCALE_BLOCK:
        cfg, splits = _tuned_split_k(m, n, k, sms)
        if splits > 1:
            return cfg, splits
    return None, 1


def resident_clusters(cfg: Config, stages: int, device: torch.device, sms: int) -> int:
    """Clusters of cfg that run at once: the driver's count on a GPU (GPC sizes can hold
    fewer than #SMs / 2 pairs; a larger persistent grid would run its surplus clusters
    after the others), #SMs / cluster size elsewhere or when the driver cannot say."""
    if device.type == "cuda":
        try:
            n = max_active_clusters(MODULE, cfg.function, device.index or 0, (cfg.threads, 1, 1),
                                    (cfg.cluster, 1, 1), cfg.smem_bytes(stages))
            if n > 0:
                return min(n, sms // cfg.cluster)
        except RuntimeError:
            pass
    return sms // cfg.cluster


def arg(plan: LaunchPlan, name: str):
    """The value of the kernel parameter `name` (PARAMS) in `plan`."""
    return plan.args[PARAMS.index(name)].value


def _run(plan: LaunchPlan, executor: str):
    """Run the plan; on the emulator raise an input error the kernel recorded (on the GPU
    the record is not read: device_errors.check_errors does)."""
    run_plan(plan, executor)
    if executor == "emu":
        device_errors.raise_if_set(arg(plan, "record"), OPS[arg(plan, "kind")])


def _with_aligned(out: torch.Tensor, fn):
    """Run fn(out') on a 16-byte aligned out' (a copy when out is not aligned; the copy
    starts from out's values, so rows the kernel does not own keep them)."""
    if _aligned(out):
        fn(out)
        return out
    tmp = out.clone()
    try:
        fn(tmp)
    finally:                                 # rows computed before an input error is raised
        out.copy_(tmp)
    return out


def _aligned_input(t: torch.Tensor) -> torch.Tensor:
    return t if _aligned(t) else t.clone()


def _raise_now(executor: str, device: torch.device, kind: int) -> None:
    """The emulator raises a recorded input error at once (as after a launch)."""
    if executor == "emu":
        device_errors.raise_if_set(device_errors.record_for(device, OPS[kind]), OPS[kind])


def fp8_gemm_nt(a, sfa, b, sfb, out, executor: str = "cuda", b_scale_rows: int = SCALE_BLOCK, sfd=None):
    """out[m, n] = (a * sfa) @ (b * sfb)^T; a e4m3 [m, k], sfa f32 [m, ceil(k/128)], b e4m3
    [n, k], sfb f32 [ceil(n/128), ceil(k/128)]; out bf16 [m, n] (written), or float32 [m, n]
    (out += the product: the *_f32acc entries; the caller puts c or zeros there first,
    ops.gemm.accumulation_base). b_scale_rows 1: sfb f32 [n, ceil(k/128)], 1x128 B scales
    (float32 out only). out e4m3 with sfd f32 [m, ceil(n/128)]: quantized on store (the
    *_e4m3 entries). bf16 out: split-K (two launches: K-range partials into a float32
    workspace, then their ordered sum) when choose_split_k picks it. K = 0: bf16 zeros,
    float32 unchanged, e4m3 the cast of zeros; M = 0 or N = 0: nothing to do (no launch)."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:
        if sfd is not None:          # the cast of zeros: q = 0, scale = the floor / 448 (div.rn)
            sfd.fill_((torch.tensor(FP8_SCALE_FLOOR, dtype=torch.float32).double() / FP8_E4M3_MAX).float().item())
            out.view(torch.uint8).zero_()
            return out
        return out if out.dtype == torch.float32 else out.zero_()
    a, b = _aligned_input(a), _aligned_input(b)
    cfg, splits = split_k_choice(m, n, k, out.dtype, b_scale_rows, num_sms(a.device))

    def go(o):
        if splits == 1:
            _run(gemm_plan(a, sfa, b, sfb, o, None, kind=KIND_NORMAL, m=m, n=n, k=k, groups=1,
                           b_scale_rows=b_scale_rows, sfd=sfd), executor)
            return
        workspace = torch.empty(splits * m, n, dtype=torch.float32, device=o.device)
        _run(gemm_plan(a, sfa, b, sfb, workspace, None, kind=KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       splits=splits), executor)
        run_plan(reduce_plan(workspace, o, m, n, splits), executor)
    return _with_aligned(out, go)


def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out, executor: str = "cuda"):
    """Rows of a e4m3 [m_sum, k] (sfa f32 [m_sum, ceil(k/128)]) grouped by m_indices (int32
    [m_sum], -1 = padding); b e4m3 [G, n, k], sfb f32 [G, ceil(n/128), ceil(k/128)]; out bf16
    [m_sum, n]. Rows whose index is outside [0, G) are not written; values outside
    [-1, G) are recorded in the device error record (raised at once by the emulator).
    K = 0: zeros in the owned rows (checked the same way, by torch ops); M, N or G = 0:
    nothing to do."""
    m, k = a.shape
    groups, n, _ = b.shape
    if m == 0 or n == 0 or groups == 0:
        return out
    m_indices = m_indices if m_indices.is_contiguous() else m_indices.contiguous()
    if k == 0:
        record = device_errors.record_for(out.device, OPS[KIND_CONTIGUOUS])
        device_errors.record_first(record, device_errors.code("MIndexOutOfRange"),
                                   (m_indices < -1) | (m_indices >= groups), m_indices, groups)
        out.masked_fill_(((m_indices >= 0) & (m_indices < groups))[:, None], 0)
        _raise_now(executor, out.device, KIND_CONTIGUOUS)
        return out
    a, b = _aligned_input(a), _aligned_input(b)

    def go(o):
        _run(gemm_plan(a, sfa, b.reshape(groups * n, k), sfb, o, m_indices, kind=KIND_CONTIGUOUS,
                       m=m, n=n, k=k, groups=groups), executor)
    return _with_aligned(out, go)


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out, executor: str = "cuda", expected_m: int = None):
    """a e4m3 [G, m_max, k] (sfa f32 [G, m_max, ceil(k/128)]), b e4m3 [G, n, k] (sfb f32
    [G, ceil(n/128), ceil(k/128)]), out bf16 [G, m_max, n]; rows >= masked_m[g] (int32 [G],
    read on the device) are not written; a value outside [0, m_max] is recorded in the
    device error record (raised at once by the emulator) and its group is not written.
    expected_m: hint for the tile choice. K = 0: zeros in the owned rows (checked the
    same way, by torch ops); G, m_max or N = 0: nothing to do."""
    groups, m_max, k = a.shape
    n = b.shape[1]
    if groups == 0 or m_max == 0 or n == 0:
        return out
    masked_m = masked_m if masked_m.is_contiguous() else masked_m.contiguous()
    if k == 0:
        record = device_errors.record_for(out.device, OPS[KIND_MASKED])
        bad = (masked_m < 0) | (masked_m > m_max)
        device_errors.record_first(record, device_errors.code("MaskedMOutOfRange"), bad, masked_m, m_max)
        rows = torch.where(bad, 0, masked_m)
        out.masked_fill_((torch.arange(m_max, device=out.device)[None, :] < rows[:, None])[..., None], 0)
        _raise_now(executor, out.device, KIND_MASKED)
        return out
    a, b = _aligned_input(a), _aligned_input(b)

    def go(o):
        _run(gemm_plan(a.reshape(groups * m_max, k), sfa, b.reshape(groups * n, k), sfb, o, masked_m,
                       kind=KIND_MASKED, m=m_max, n=n, k=k, groups=groups,
                       heuristic_m=expected_m or m_max), executor)
    return _with_aligned(out, go)
