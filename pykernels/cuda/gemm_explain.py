"""What pykernels.explain prints about an FP8 / BF16 GEMM kernel launch (Backend.describe).

Every figure comes from the functions the launch itself calls (cuda/gemm.py
heuristic_ranking, split_k_choice, _tuned_geometry / _geometry; cuda/bf16_gemm.py
geometry): nothing here decides, so the config printed is the config launched
(tests/test_explain.py checks it against the plans of real calls).
"""
import torch

from ..runtime.hardware import SCALE_BLOCK, SMEM_PER_BLOCK, cdiv, num_sms
from . import bf16_gemm as CB
from . import gemm as CG

TOP = 5                         # runners-up listed per candidate set
_KINDS = {"normal": CG.KIND_NORMAL, "contiguous": CG.KIND_CONTIGUOUS, "masked": CG.KIND_MASKED}


def _tile(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}" + (f" cluster {cfg.cluster}" if getattr(cfg, "cluster", 1) > 1 else "")


def launch_line(function: str, grid: int, cluster: int, stages: int, smem: int, splits: int = 1) -> str:
    """The first line: what is launched (the entry, grid, cluster, stages, K splits)."""
    split = f", split-K {splits} K ranges (+ the reduction pass)" if splits > 1 else ""
    return (f"launch: {function}, grid {grid}, cluster {cluster}, {stages} stages "
            f"({smem} of {SMEM_PER_BLOCK} bytes shared memory){split}")


def _ranking_lines(title: str, ranked: tuple, pick_time: float) -> list:
    lines = [title]
    for i, (cfg, t) in enumerate(ranked[:TOP]):
        lines.append(f"  {'->' if i == 0 else '  '} {_tile(cfg):<18} {t:>12,.0f} clk  {t / pick_time:5.2f}x")
    if len(ranked) > TOP:
        lines.append(f"     ... {len(ranked) - TOP} more")
    return lines


def _rows_assumed(p) -> str:
    if p.layout == "masked":
        clamp = f" (clamped to m_max {p.m})" if p.expected_m and p.expected_m > p.m else ""
        given = f"expected_m {p.expected_m}{clamp}" if p.expected_m else f"m_max {p.m} (expected_m not given)"
        return f"{given} rows per group, {p.groups} groups"
    if p.layout == "contiguous":
        return f"{p.m} rows in all, {p.groups - 1} group boundaries (pairs a boundary splits run twice)"
    return f"{p.m} rows"


def fp8_gemm_choice(p) -> list:
    """Lines for one FP8 GEMM problem (ops.gemm.GemmProblem): the launch, then why: the cost
    model's clocks (estimate_cycles, SM clocks) of the pick and its runners-up, the
    multicast rule, the split-K rule."""
    if p.m == 0 or p.n == 0 or p.k == 0 or p.groups == 0:
        return ["launch: none (an empty problem: zeros / nothing are written on the host side)"]
    kind, sms = _KINDS[p.layout], num_sms(p.device)
    variant = (p.f32_out, p.b_scale_rows == 1, p.fp8_out)
    heuristic_m = (p.expected_m or p.m) if p.layout == "masked" else None   # as cuda.gemm.m_grouped_..._masked
    cfg, splits = CG.split_k_choice(p.m, p.n, p.k, p.out.dtype, p.b_scale_rows, sms) if p.layout == "normal" \
        else (None, 1)
    ranking = CG.heuristic_ranking(kind, p.m, p.n, p.k, p.groups, heuristic_m, p.device, sms, variant)
    if splits > 1:
        cfg, stages, grid = CG._geometry(kind, p.m, p.n, p.k, p.groups, None, p.device, sms, (False, False, False),
                                         cfg, None, None, splits)
    else:
        cfg, stages, grid = CG._tuned_geometry(kind, p.m, p.n, p.k, p.groups, heuristic_m, p.device, sms, variant)
        cfg, stages, grid = CG.resident_geometry(cfg, stages, grid, p.m, p.n, p.k,
                                                 kind == CG.KIND_NORMAL and not any(variant))
    lines = [launch_line(cfg.function, grid, cfg.cluster, stages, cfg.smem_bytes(stages, p.k), splits)]
    lines.append(f"why: tile BLOCK_M x BLOCK_N {_tile(cfg)}; the cost model (cuda/gemm.py estimate_cycles, "
                 f"SM clocks on {sms} SMs) scored {ranking.m} x {ranking.n} x {ranking.k} for {_rows_assumed(p)}; "
                 "ties within 1% go to the larger tile within the problem")
    single, paired = ranking.single, ranking.multicast
    best = single[0][1]
    lines += _ranking_lines("cluster-1 candidates (pick first, relative to the pick):", single, best)
    if paired:
        verdict = "taken" if ranking.multicast_wins else "not taken"
        lines += _ranking_lines(f"multicast pairs (cluster 2), {verdict}: a pair needs < MULTICAST_GAIN "
                                f"{CG.MULTICAST_GAIN} x the best cluster-1 time ({CG.MULTICAST_GAIN * best:,.0f} clk):",
                                paired, best)
    else:
        lines.append(f"multicast pairs: none among the heuristic's entries (NOT_AUTO: {', '.join(sorted(CG.NOT_AUTO))}"
                     f", measured slower; a pair would need < MULTICAST_GAIN {CG.MULTICAST_GAIN} x the best "
                     "cluster-1 time)")
    if splits > 1:
        base = ranking.chosen
        t_split = CG.streaming_cycles(cfg, p.m, p.n, p.k, sms, splits)
        t_base = CG.streaming_cycles(base, p.m, p.n, p.k, sms)
        lines.append(f"split-K: {splits} K ranges of {_tile(cfg)} model {t_split:,.0f} clk against {t_base:,.0f} "
                     f"for {_tile(base)} unsplit (choose_split_k's one-wave rule, streaming_cycles)")
    elif p.layout == "normal" and p.out.dtype == torch.bfloat16 and p.b_scale_rows == SCALE_BLOCK:
        lines.append("split-K: not taken (choose_split_k: the unsplit tile needs more than one wave, or no K split "
                     "models faster in streaming_cycles)")
    units = (p.groups if p.layout == "masked" else 1) * cdiv(p.m, cfg.block_m) * cdiv(p.n, cfg.block_n) * splits
    bound = " (masked: at most, m_max rows per group)" if p.layout == "masked" else ""
    lines.append(f"grid: {units} tiles{bound} over a persistent grid of {grid} CTAs; "
                 "stages: the most that fit in shared memory")
    return lines


def bf16_gemm_choice(p) -> list:
    """Lines for one BF16 GEMM problem (ops.gemm.Bf16GemmProblem): the launch and the tile rule."""
    if p.m == 0 or p.n == 0 or p.k == 0:
        return ["launch: none (an empty problem: zeros / nothing are written on the host side)"]
    sms = num_sms(p.device)
    cfg, stages, grid = CB.geometry(p.m, p.n, p.f32_out, sms)
    lines = [launch_line(cfg.function, grid, 1, stages, cfg.smem_bytes(stages))]
    lines.append(f"why: tile {_tile(cfg)} by cuda/bf16_gemm.py choose_config's hand rule (no cost model): the largest "
                 f"tile that gives each of the {sms} SMs a tile, else the smallest")
    for c in CB.compiled_configs(p.f32_out):
        tiles = cdiv(p.m, c.block_m) * cdiv(p.n, c.block_n)
        lines.append(f"  {'->' if c == cfg else '  '} {_tile(c):<10} {tiles:>8} tiles")
    return lines
