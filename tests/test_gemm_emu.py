"""The hand-written FP8 GEMM (csrc/gemm/fp8_gemm.cu) run by the PTX emulator through the
same launch plans the GPU uses: the three layouts against pykernels.reference on fresh
random inputs, outputs poisoned with NaN so rows a layout does not own must stay NaN.

Tolerance: calc_diff < 1e-3 against the float32 reference (DeepGEMM's bound; the emulator
accumulates each wgmma exactly, so the observed difference is ~1e-9, bf16 rounding).
Byte counts from the emulator's stats check that each owned element is written once
and nothing else is."""
import dataclasses
import re
from math import gcd

import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.cuda import gemm as G
from pykernels.metrics import calc_diff
from pykernels import emu
from pykernels.emu.errors import EmuError
from pykernels.runtime import artifacts
from pykernels.runtime.hardware import cdiv
from pykernels.runtime.executors import run_emu

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem


def _emu_supports_wgmma() -> bool:
    from pykernels.emu import ops
    return "wgmma" in ops.HANDLERS and "mbarrier" in ops.HANDLERS


pytestmark = pytest.mark.skipif(not _emu_supports_wgmma(),
                                reason="the emulator does not execute wgmma / mbarrier / TMA yet")

TOL = 1e-3


def _spread(rows, k, row_block, dtype=torch.bfloat16):
    """randn [rows, k] scaled by 2^e, e uniform in [-4, 4] per (row_block rows x 128
    columns) block: every scale factor (per row and K block of A, per 128x128 block of
    B) differs, so using a wrong one shows far above the tolerance."""
    e = torch.randint(-4, 5, (-(-rows // row_block), -(-k // 128))).float()
    f = torch.exp2(e).repeat_interleave(row_block, 0)[:rows].repeat_interleave(128, 1)[:, :k]
    return (torch.randn(rows, k) * f).to(dtype)


def _problem(m, n, k, dtype=torch.bfloat16):
    """Quantized operands (per-token A, per-block B) of randn inputs of `dtype`."""
    a, sfa = pk.per_token_cast_to_fp8(_spread(m, k, 1, dtype), backend="reference")
    b, sfb = pk.per_block_cast_to_fp8(_spread(n, k, 128, dtype), backend="reference")
    return a, sfa, b, sfb


def _weights(groups, n, k):
    pairs = [pk.per_block_cast_to_fp8(_spread(n, k, 128), backend="reference") for _ in range(groups)]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _contiguous_problem(group_rows, n, k, pad_to=128):
    b, sfb = _weights(len(group_rows), n, k)
    idx = contiguous_indices(group_rows, pad_to)
    a, sfa = pk.per_token_cast_to_fp8(_spread(idx.numel(), k, 1), backend="reference")
    return a, sfa, b, sfb, idx


def _masked_problem(groups, m_max, n, k):
    b, sfb = _weights(groups, n, k)
    a, sfa = pk.per_token_cast_to_fp8(_spread(groups * m_max, k, 1), backend="reference")
    return a.view(groups, m_max, k), sfa.view(groups, m_max, -1), b, sfb


# ------------------------------------------------------------------------ normal

@pytest.mark.parametrize("m,n,k,dtype", [
    (1, 2112, 128, torch.bfloat16),
    (7, 128, 512, torch.float32),
    (64, 256, 128, torch.bfloat16),
    (129, 384, 512, torch.bfloat16),
    (300, 128, 128, torch.float32),
    (256, 256, 512, torch.bfloat16),   # issue 3 item 6: the CI runs this warp-specialised GEMM in ~1 s
])
def test_normal_matches_reference(m, n, k, dtype, seed):
    a, sfa, b, sfb = _problem(m, n, k, dtype)
    out = nan_bf16(m, n)
    res = pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="emu")
    assert res is out
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    assert not out.isnan().any()
    assert calc_diff(out, ref) < TOL


def _cfg_id(c):
    return f"m{c.block_m}n{c.block_n}" + (f"_mc{c.cluster}" if c.cluster > 1 else "")


@pytest.mark.parametrize("cfg", G.CONFIGS, ids=[_cfg_id(c) for c in G.CONFIGS])
def test_every_config(cfg, seed):
    # 129 rows: a partial m-block; 384 columns: partial n-blocks for BN 112/160 and tiles
    # that straddle two 128-column sfb blocks
    m, n, k = 129, 384, 256
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg)
    stats = run_emu(plan)
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL and not out.isnan().any()
    assert stats.global_written == m * n * 2                 # every element once, nothing more
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    assert stats.wgmma == tiles * (k // 128) * 4 * (cfg.block_m // 64) * (cfg.block_n // cfg.chunk_n)  # per wave, chunk


WIDE = [c for c in G.CONFIGS if 128 % c.block_n]
SCHEDULES = ["lockstep", "cta_first", "cta_last", "wg_first", "wg_last"]


def _first_block_groups(block_n, n):
    """Per n-block of a BLOCK_N-column tiling of n columns: the count of the tile's leading
    8-column groups in its first 128-column sfb block, as the kernel clamps it (one
    compiled copy of its K loop per value)."""
    last = min(block_n // 8, 16)
    return [min(((n0 // 128 + 1) * 128 - n0) // 8, last) for n0 in range(0, n, block_n)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cfg", WIDE, ids=[_cfg_id(c) for c in WIDE])
def test_wide_tiles_take_each_groups_b_scale(cfg, schedule, seed):
    # BLOCK_N 112 / 144 / 160: a tile's start modulo 128 cycles through 128 / gcd(BLOCK_N,
    # 128) values, and with it the column where the B scale changes; the kernel compiles
    # its K loop once per count of leading groups in the first sfb block. n spans a whole
    # cycle plus a partial tile, so every copy runs (every sfb block has its own scale:
    # a group promoted with its neighbour block's scale fails the tolerance).
    period = 128 // gcd(cfg.block_n, 128)
    m, n, k = 128 * cfg.cluster - 64, period * cfg.block_n + 48, 256
    step = gcd(cfg.block_n, 128) // 8
    assert set(_first_block_groups(cfg.block_n, n)) == set(range(step, min(cfg.block_n // 8, 16) + 1, step))
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2 * cfg.cluster, resident_a=False)   # the streamed entry (resident A: below)
    stats = run_emu(plan, schedule=schedule)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    assert stats.global_written == m * n * 2


SMEM_CONFIGS = list(G.CONFIGS) + list(G.ROWB_CONFIGS)     # *_rowb: + B scales per stage


@pytest.mark.parametrize("cfg", SMEM_CONFIGS, ids=[_cfg_id(c) + ("_f32acc_rowb" if c.row_b else "")
                                                   for c in SMEM_CONFIGS])
def test_shared_memory_formula_is_the_kernels(cfg, seed):
    # The kernel traps when launched with less dynamic shared memory than its own
    # Layout::smem_bytes(stages): the plan's size (Config.smem_bytes) runs and one byte
    # less traps, at two stage counts (both formulas are affine in stages): they agree.
    m, n, k = 64, 128, 128
    a, sfa, b, sfb = _problem(m, n, k)
    rows = 1 if cfg.row_b else 128
    if cfg.row_b:
        b, sfb = pk.per_token_cast_to_fp8(_spread(n, k, 1), backend="reference")
    for stages in (2, cfg.max_stages()):
        out = torch.zeros(m, n) if cfg.f32acc else nan_bf16(m, n)
        plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                           cfg=cfg, stages=stages, b_scale_rows=rows)
        assert plan.shared_bytes == cfg.smem_bytes(stages)
        with pytest.raises(EmuError, match="trap executed"):
            run_emu(dataclasses.replace(plan, shared_bytes=plan.shared_bytes - 1))
        run_emu(plan)
        assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb, b_scale_rows=rows)) < TOL


def test_few_stages_wrap_the_ring(seed):
    # 2 stages and 12 K blocks per tile: the producer waits on every empty barrier and the
    # phase bits flip many times, across tiles of a persistent CTA (grid of 1)
    m, n, k = 70, 256, 1536
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                       cfg=G.Config(64, 64), stages=2, sms=1)
    assert plan.grid == (1, 1, 1)
    run_emu(plan)
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL


@pytest.mark.parametrize("cfg", [G.Config(64, 32), G.Config(128, 128)], ids=["m64n32", "m128n128"])
def test_persistent_cta_reuses_the_store_staging(cfg, seed):
    # one CTA walks many one-K-block tiles: each tile's TMA stores must have read the
    # staging tile before the next tile overwrites it (cp.async.bulk.wait_group.read)
    m, n, k = 256, 512, 128
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    stats = run_emu(G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                                cfg=cfg, sms=1))
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL and stats.global_written == m * n * 2


def test_column_major_scales_give_the_same_result(seed):
    m, n, k = 129, 256, 384
    a, sfa, b, sfb = _problem(m, n, k)
    row = pk.fp8_gemm_nt((a, sfa), (b, sfb), nan_bf16(m, n), backend="emu")
    col = pk.fp8_gemm_nt((a, pk.get_col_major_tma_aligned_tensor(sfa)), (b, sfb), nan_bf16(m, n), backend="emu")
    assert torch.equal(row, col)


def test_out_views_are_honoured(seed):
    m, n, k = 7, 128, 128
    a, sfa, b, sfb = _problem(m, n, k)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    big = nan_bf16(m + 2, n)
    view = big[1:1 + m]                                      # aligned view inside a larger buffer
    assert pk.fp8_gemm_nt((a, sfa), (b, sfb), view, backend="emu") is view
    assert calc_diff(big[1:1 + m], ref) < TOL and big[0].isnan().all() and big[-1].isnan().all()
    flat = torch.full((m * n + 1,), float("nan"), dtype=torch.bfloat16)
    odd = flat[1:].view(m, n)                                # 2-byte aligned: computed via a copy
    pk.fp8_gemm_nt((a, sfa), (b, sfb), odd, backend="emu")
    assert calc_diff(odd, ref) < TOL and flat[0].isnan()


# ------------------------------------------------------------------------ contiguous

@pytest.mark.parametrize("group_rows,pad_to,n,k", [
    ([5, 0, 130, 64], 128, 256, 256),       # an empty group, -1 padding rows, 128-row segments
    ([70, 0, 7], 64, 2112, 128),            # 64-row segments: some tiles hold two groups
    ([3, 50, 20, 90], 1, 384, 128),         # unpadded segments (several groups per tile)
])
def test_contiguous_matches_reference(group_rows, pad_to, n, k, seed):
    a, sfa, b, sfb, idx = _contiguous_problem(group_rows, n, k, pad_to)
    if pad_to == 1:                          # stray padding rows inside and after segments
        pad = torch.full((5,), -1, dtype=torch.int32)
        idx = torch.cat([idx[:10], pad, idx[10:], pad[:3]])
        a, sfa = pk.per_token_cast_to_fp8(_spread(idx.numel(), k, 1), backend="reference")
    m = idx.numel()
    out = nan_bf16(m, n)
    assert pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend="emu") is out
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(m, n))
    own = idx >= 0
    assert out[~own].isnan().all(), "padding rows were written"
    assert not out[own].isnan().any()
    assert calc_diff(out[own], ref[own]) < TOL


def test_contiguous_writes_owned_rows_only(seed):
    n, k = 128, 128
    a, sfa, b, sfb, idx = _contiguous_problem([33, 0, 64], n, k)
    m = idx.numel()
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b.reshape(-1, k), sfb, out, idx, kind=G.KIND_CONTIGUOUS, m=m, n=n, k=k,
                       groups=3, cfg=G.Config(128, 128))
    stats = run_emu(plan)
    assert stats.global_written == (33 + 64) * n * 2
    assert out[idx < 0].isnan().all()
    all_pad = torch.full((m,), -1, dtype=torch.int32)        # nothing owned: nothing written
    out2 = nan_bf16(m, n)
    pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out2, all_pad, backend="emu")
    assert out2.isnan().all()


# ------------------------------------------------------------------------ masked

@pytest.mark.parametrize("groups,m_max,n,k,masked", [
    (3, 129, 384, 128, [0, 129, 37]),       # an empty group, a full one (partial m-block), a partial one
    (2, 64, 128, 512, [64, 1]),
    (4, 7, 256, 128, [7, 0, 3, 5]),
    (2, 300, 128, 128, [0, 0]),             # nothing to do
])
def test_masked_matches_reference(groups, m_max, n, k, masked, seed):
    a, sfa, b, sfb = _masked_problem(groups, m_max, n, k)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    assert pk.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, masked_m, max(1, max(masked)),
                                           backend="emu") is out
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    own = torch.arange(m_max)[None, :] < masked_m[:, None]
    assert out[~own].isnan().all(), "rows beyond masked_m were written"
    assert not out[own].isnan().any()
    if own.any():
        assert calc_diff(out[own], ref[own]) < TOL


def test_masked_column_major_scales_and_byte_count(seed):
    groups, m_max, n, k = 3, 65, 256, 256
    a, sfa, b, sfb = _masked_problem(groups, m_max, n, k)
    masked_m = torch.tensor([65, 2, 40], dtype=torch.int32)
    col = pk.get_col_major_tma_aligned_tensor(sfa)
    assert col.stride(-2) == 1
    out = nan_bf16(groups, m_max, n)
    plan = G.gemm_plan(a.reshape(-1, k), col, b.reshape(-1, k), sfb, out, masked_m, kind=G.KIND_MASKED,
                       m=m_max, n=n, k=k, groups=groups)
    stats = run_emu(plan)
    assert stats.global_written == int(masked_m.sum()) * n * 2
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    own = torch.arange(m_max)[None, :] < masked_m[:, None]
    assert out[~own].isnan().all() and calc_diff(out[own], ref[own]) < TOL


# ------------------------------------------------------------------------ TMA multicast (clusters of 2)
# The *_mc2 entries: the two CTAs of a cluster compute adjacent m-blocks of one n-block in
# lockstep, each loading its A tile and half of B, multicast into both. A CTA whose
# m-block has no rows for a pass (odd m-block count, masked tails, contiguous groups in
# one m-block of the pair only) still loads and multicasts its half of B but computes and
# stores nothing. Forced here through the plan's cfg (the heuristic picks them only for
# large problems); few SMs make each cluster walk several units (ring wraps, phase flips).

MULTICAST = [c for c in G.CONFIGS if c.cluster == 2]
MC_IDS = [_cfg_id(c) for c in MULTICAST]


def _check_owned(out, ref, own):
    assert out[~own].isnan().all(), "rows the layout does not own were written"
    assert not out[own].isnan().any()
    if own.any():
        assert calc_diff(out[own], ref[own]) < TOL


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
@pytest.mark.parametrize("m,sms", [
    (300, 4),     # 3 m-blocks: the second pair's partner tile does not exist; 2 clusters
    (7, 132),     # one partial m-block: every pair has a partner without rows
    (520, 2),     # 5 m-blocks, 1 cluster walks all 3 pairs x n-blocks (persistent, phases flip)
])
def test_multicast_normal(cfg, m, sms, seed):
    n, k = 384, 256
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg, sms=sms)
    assert plan.cluster == (2, 1, 1) and plan.grid[0] % 2 == 0 and plan.function.endswith("_mc2")
    assert plan.args[1].value.box == (cfg.block_n // 2, 128)        # each CTA loads half of B
    stats = run_emu(plan)
    assert not out.isnan().any()
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    assert stats.global_written == m * n * 2                         # partner-less CTAs store nothing
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)             # ... and issue no wgmma
    assert stats.wgmma == tiles * (k // 128) * 4 * (cfg.block_m // 64) * (cfg.block_n // cfg.chunk_n)  # per wave, chunk


def test_multicast_two_stages_wrap_the_ring(seed):
    # 2 stages, 12 K blocks per tile, one cluster: each producer waits on every empty
    # barrier, whose 16 arrivals come from both CTAs (8 of them remote)
    m, n, k = 300, 320, 1536
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                       cfg=G.Config(128, 160, cluster=2), stages=2, sms=2)
    assert plan.grid == (2, 1, 1)
    run_emu(plan)
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL


@pytest.mark.parametrize("cfg,schedule", [(G.Config(128, 128), "wg_first"), (G.Config(64, 64), "wg_last"),
                                          (G.Config(128, 160, cluster=2), "wg_last")],
                         ids=["m128n128-wg_first", "m64n64-wg_last", "m128n160_mc2-wg_last"])
def test_protocol_holds_when_one_warpgroup_runs_ahead(cfg, schedule, seed):
    # One warpgroup (the first or the last: producer or math, of every CTA in turn) runs
    # whenever it can: the full / empty barriers, the stage ring of 2 and the output
    # staging must still order everything (docs/emulator.md: schedules).
    m, n, k = 200, 256, 512
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2)
    run_emu(plan, schedule=schedule)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL


def _without_remote_release(ptx: str, function: str) -> str:
    """The PTX of `function` changed into a broken protocol: each CTA releases a stage on
    its own empty barrier only (lanes 0 and 1 of every math warp, which release it in CTA 0
    and CTA 1, both arrive at their own CTA's barrier: its 16 arrivals all come from
    home), so a producer may multicast into the peer's stage before the peer consumed it."""
    start = ptx.index(f".entry {function}(")
    end = ptx.find(".entry ", start + 1)                   # the next kernel (or the end)
    end = len(ptx) if end < 0 else ptx.rfind("\n", start, end)
    body = ptx[start:end]
    rank = re.findall(r"mov\.u32 (%r\d+), %cluster_ctarank;", body)
    # the stage releases: mapa of the empty barrier to CTA `lane`, then the restricted
    # release fence and the relaxed cluster arrive
    release = re.compile(r"(mapa\.shared::cluster\.u32 (%r\d+), %r\d+, )(%r\d+)(;(?:(?!mapa)[\s\S])*?"
                         r"fence\.release\.sync_restrict::shared::cta\.cluster;\s*"
                         r"mbarrier\.arrive\.relaxed\.cluster\.shared::cluster\.b64 _, \[\2\];)")
    assert rank and len(release.findall(body)) == 2, "the kernel's PTX changed shape: update this patch"
    body = release.sub(lambda m: m.group(1) + rank[0] + m.group(4), body)
    return ptx[:start] + body + ptx[end:]


@pytest.mark.parametrize("schedule", ["cta_first", "cta_last"])
def test_multicast_protocol_holds_when_one_cta_runs_ahead(schedule, seed):
    # The emulator's default schedule keeps the two CTAs of a cluster in step, which would
    # hide a missing cross-CTA release. Here one CTA runs whenever it can (the other only
    # while it is blocked), so each CTA gets as far ahead as the protocol lets it.
    m, n, k = 256, 256, 1024
    a, sfa, b, sfb = _problem(m, n, k)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    cfg = G.Config(128, 128, cluster=2)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2)
    run_emu(plan, schedule=schedule)
    assert calc_diff(out, ref) < TOL and not out.isnan().any()

    # The same kernel without the remote releases: in step it still gives the right
    # answer (the race is invisible), with one CTA running ahead its producer multicasts
    # the next K block into the peer's stage before the peer read it, and the result is
    # wrong - the skewed schedule is what catches such a bug.
    broken = _without_remote_release(artifacts.ptx_text(G.MODULE), cfg.function)
    args = [x.value for x in plan.args]
    results = {}
    for sched in ("lockstep", schedule):
        o = nan_bf16(m, n)
        args[5] = o                                        # out pointer (the TMA store map keeps `out`)
        argv = list(args)
        argv[3] = dataclasses.replace(argv[3], tensor=o.view(-1, n))
        emu.launch(broken, cfg.function, plan.grid, plan.block, argv, shared_mem=plan.shared_bytes,
                   cluster=plan.cluster, schedule=sched)
        results[sched] = calc_diff(o.float().nan_to_num(1e4), ref)
    assert results["lockstep"] < TOL
    assert results[schedule] > 10 * TOL                  # 0.09 to 0.26 seen, data-dependent


SKEWS = {"aligned": "cta_first", "unaligned": "cta_last", "padding_block": "lockstep",
         128: "cta_first", 160: "cta_last"}


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
@pytest.mark.parametrize("case", ["aligned", "unaligned", "padding_block"])
def test_multicast_contiguous(cfg, case, seed):
    n, k = 320, 256
    if case == "aligned":
        # 128-row segments [5 | empty | 130 | 64]: pairs of m-blocks hold two different
        # groups (two passes, each computed by one CTA), -1 rows, an empty group
        a, sfa, b, sfb, idx = _contiguous_problem([5, 0, 130, 64], n, k)
    elif case == "unaligned":
        # unpadded segments with stray -1 rows: several groups per m-block and per pair
        b, sfb = _weights(4, n, k)
        idx = contiguous_indices([3, 150, 20, 90], 1)
        pad = torch.full((5,), -1, dtype=torch.int32)
        idx = torch.cat([idx[:10], pad, idx[10:], pad[:3]])
        a, sfa = pk.per_token_cast_to_fp8(_spread(idx.numel(), k, 1), backend="reference")
    else:
        # an m-block of padding only beside a group's block, and a last pair whose second
        # m-block lies past the end
        b, sfb = _weights(2, n, k)
        idx = torch.cat([torch.full((128,), 0), torch.full((128,), -1), torch.full((60,), 1)]).int()
        a, sfa = pk.per_token_cast_to_fp8(_spread(idx.numel(), k, 1), backend="reference")
    m, groups = idx.numel(), b.shape[0]
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b.reshape(-1, k), sfb, out, idx, kind=G.KIND_CONTIGUOUS, m=m, n=n, k=k,
                       groups=groups, cfg=cfg, sms=4)
    # partner-less passes (one CTA computes, the other only consumes stages) also with one
    # CTA running ahead of the other (docs/emulator.md: schedules)
    stats = run_emu(plan, schedule=SKEWS[case])
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(m, n))
    own = (idx >= 0) & (idx < groups)
    _check_owned(out, ref, own)
    assert stats.global_written == int(own.sum()) * n * 2


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_multicast_masked(cfg, seed):
    # masked_m: 0 (no units), 130 (2 m-blocks, the second partial: checked stores),
    # m_max (3 m-blocks: a partner-less last pair), 37 (1 m-block)
    groups, m_max, n, k = 4, 300, 256, 256
    a, sfa, b, sfb = _masked_problem(groups, m_max, n, k)
    masked_m = torch.tensor([0, 130, m_max, 37], dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    plan = G.gemm_plan(a.reshape(-1, k), sfa, b.reshape(-1, k), sfb, out, masked_m, kind=G.KIND_MASKED,
                       m=m_max, n=n, k=k, groups=groups, cfg=cfg, sms=6)
    stats = run_emu(plan, schedule=SKEWS[cfg.block_n])
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    own = torch.arange(m_max)[None, :] < masked_m[:, None]
    _check_owned(out, ref, own)
    assert stats.global_written == int(masked_m.sum()) * n * 2


def test_multicast_masked_nothing_to_do(seed):
    groups, m_max, n, k = 2, 129, 128, 128
    a, sfa, b, sfb = _masked_problem(groups, m_max, n, k)
    masked_m = torch.zeros(groups, dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    plan = G.gemm_plan(a.reshape(-1, k), sfa, b.reshape(-1, k), sfb, out, masked_m, kind=G.KIND_MASKED,
                       m=m_max, n=n, k=k, groups=groups, cfg=G.Config(128, 128, cluster=2))
    stats = run_emu(plan)
    assert out.isnan().all() and stats.global_written == 0 and stats.wgmma == 0


@pytest.mark.parametrize("m", [512, 300])
def test_multicast_reads_b_once_per_pair(m, seed):
    # The emulator counts the bytes each TMA load reads from global memory once (a
    # multicast load too), and every scale load. Same problem, same tile, cluster 1 vs 2:
    # A and the scales are read alike (a partner-less CTA loads neither), B once per pair
    # of m-blocks instead of once per tile.
    n, k = 256, 512
    a, sfa, b, sfb = _problem(m, n, k)
    reads, outs = {}, {}
    for cluster in (1, 2):
        out = nan_bf16(m, n)
        plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                           cfg=G.Config(128, 128, cluster=cluster))
        reads[cluster] = run_emu(plan).global_read
        outs[cluster] = out
    m_blocks, n_blocks = cdiv(m, 128), cdiv(n, 128)
    pairs = cdiv(m_blocks, 2)
    b_bytes_1 = m_blocks * n_blocks * 128 * k          # B tile per tile
    b_bytes_2 = pairs * n_blocks * 128 * k             # B tile per pair (two halves)
    assert reads[1] - reads[2] == b_bytes_1 - b_bytes_2 > 0
    assert torch.equal(outs[1], outs[2])               # same arithmetic, bit for bit


# ------------------------------------------------------------------------ K not a multiple of 128

# (config, K): K = 208 (a whole K block and a partial one of 80), 16 (one partial block of
# the smallest legal K), 336 (two whole blocks and 80) with a cluster-2 config; a ring of 2
# stages throughout.
PARTIAL_K = [(G.Config(64, 64), 208), (G.Config(128, 128), 16), (G.Config(128, 160, cluster=2), 336)]
PARTIAL_K_IDS = [f"{_cfg_id(c)}-k{k}" for c, k in PARTIAL_K]


def _partial_k_plan(layout, cfg, k):
    """A small problem of `layout` with K not a multiple of 128, its plan (2 stages, few
    SMs: the ring wraps and CTAs are persistent) and the owned-row mask."""
    n = 192
    if layout == "normal":
        m = 100
        a, sfa, b, sfb = _problem(m, n, k)
        out = nan_bf16(m, n)
        ref = R.fp8_gemm_nt(a, sfa, b, sfb)
        plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                           stages=2, sms=2 * cfg.cluster)
        return plan, out, ref, torch.ones(m, dtype=torch.bool)
    if layout == "contiguous":
        a, sfa, b, sfb, idx = _contiguous_problem([40, 0, 90], n, k, pad_to=64)
        m = idx.numel()
        out = nan_bf16(m, n)
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(m, n))
        plan = G.gemm_plan(a, sfa, b.reshape(-1, k), sfb, out, idx, kind=G.KIND_CONTIGUOUS, m=m, n=n, k=k,
                           groups=3, cfg=cfg, stages=2, sms=2 * cfg.cluster)
        return plan, out, ref, idx >= 0
    groups, m_max = 3, 70
    a, sfa, b, sfb = _masked_problem(groups, m_max, n, k)
    masked_m = torch.tensor([70, 0, 33], dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    plan = G.gemm_plan(a.reshape(-1, k), sfa, b.reshape(-1, k), sfb, out, masked_m, kind=G.KIND_MASKED,
                       m=m_max, n=n, k=k, groups=groups, cfg=cfg, stages=2, sms=2 * cfg.cluster)
    return plan, out, ref, torch.arange(m_max)[None, :] < masked_m[:, None]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layout", ["normal", "contiguous", "masked"])
@pytest.mark.parametrize("cfg,k", PARTIAL_K, ids=PARTIAL_K_IDS)
def test_partial_last_k_block(cfg, k, layout, schedule, seed):
    # The kernel walks ceil(K/128) K blocks; the TMA zero-fills the tail of the last one
    # (the maps of A and B have the true K extent) and still counts the whole box towards
    # the full barrier.
    plan, out, ref, own = _partial_k_plan(layout, cfg, k)
    assert G.arg(plan, "k") == k
    stats = run_emu(plan, schedule=schedule)
    _check_owned(out, ref, own)
    assert stats.global_written == int(own.sum()) * out.shape[-1] * 2


# One math warpgroup, BLOCK_N <= 64: two accumulator sets (fp8_gemm.cu kDoubleAcc; K block
# kb + 1 is issued before kb is promoted)
DOUBLE_ACC = [c for c in list(G.CONFIGS) + list(G.F32ACC_CONFIGS) if c.block_m == 64 and c.block_n <= 64]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k", [128, 256, 384, 464])
@pytest.mark.parametrize("cfg", DOUBLE_ACC, ids=[c.function.removeprefix("pk_fp8_gemm_nt_") for c in DOUBLE_ACC])
def test_double_accumulators_promote_like_one(cfg, k, schedule, seed):
    # 1-4 K blocks (every path of the two-set loop: prologue only, the tail with one more
    # block, one steady-state round with either tail; 464: a partial last block), 2 stages
    # and one persistent CTA for several tiles (the ring and its held-stage count run on
    # across tiles): bit for bit the single-set 128-row kernel's result (same K blocks
    # promoted in the same order), within the tolerance of the reference
    m, n = 64, 128
    a, sfa, b, sfb = _problem(m, n, k)
    single = G.Config(128, 128, f32acc=cfg.f32acc)

    def run(c, sched):
        out = torch.zeros(m, n) if c.f32acc else nan_bf16(m, n)
        run_emu(G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=c,
                            stages=2, sms=1), schedule=sched)
        return out
    out = run(cfg, schedule)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    assert torch.equal(out, run(single, "lockstep"))


# ------------------------------------------------------------------------ two waves (BLOCK_M 256)

TWO_WAVES = [c for c in G.CONFIGS if c.block_m // 64 > c.math_warpgroups]


def _two_wave_case(layout, cfg):
    """(run(cfg, schedule) -> out, reference, owned-row mask) of a small `layout` problem
    with several 256-row m-blocks per CTA (2 CTAs, a ring of 2 stages): normal with a
    partial m-block; contiguous with segments of 64-row padding, so a 256-row tile holds
    three groups (a pass per group, waves owned partly or not at all); masked with a full
    group, an empty one and a tail that leaves the second wave and warpgroup without rows."""
    n, k = 128, 256
    if layout == "normal":
        m = 300
        n = 256                                              # two n-blocks: 4 tiles, 2 per CTA
        a, sfa, b, sfb = _problem(m, n, k)
        ref = R.fp8_gemm_nt(a, sfa, b, sfb)
        grouping, kind, groups, own = None, G.KIND_NORMAL, 1, torch.ones(m, dtype=torch.bool)
        a2, b2, shape = a, b, (m, n)
    elif layout == "contiguous":
        a, sfa, b, sfb, grouping = _contiguous_problem([40, 0, 90, 200], n, k, pad_to=64)
        m, groups = grouping.numel(), 4
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, grouping, nan_bf16(m, n))
        kind, own, a2, b2, shape = G.KIND_CONTIGUOUS, grouping >= 0, a, b.reshape(-1, k), (m, n)
    else:
        groups, m = 3, 300
        a, sfa, b, sfb = _masked_problem(groups, m, n, k)
        grouping = torch.tensor([300, 0, 70], dtype=torch.int32)
        ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, grouping, nan_bf16(groups, m, n))
        kind, own = G.KIND_MASKED, torch.arange(m)[None, :] < grouping[:, None]
        a2, b2, shape = a.reshape(-1, k), b.reshape(-1, k), (groups, m, n)

    def run(c, schedule):
        out = nan_bf16(*shape)
        run_emu(G.gemm_plan(a2, sfa, b2, sfb, out, grouping, kind=kind, m=m, n=n, k=k, groups=groups, cfg=c,
                            stages=2, sms=2, resident_a=False), schedule=schedule)
        return out
    return run, ref, own


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layout", ["normal", "contiguous", "masked"])
@pytest.mark.parametrize("cfg", TWO_WAVES, ids=[_cfg_id(c) for c in TWO_WAVES])
def test_two_waves_match_the_128_row_tile(cfg, layout, schedule, seed):
    # BLOCK_M 256: each math warpgroup computes its 128 rows as two 64-row waves through one
    # accumulator set (fp8_gemm.cu kWaves). Every element is promoted in the same order as
    # by the 128-row tile (the same K blocks, the same scales): bit for bit its result, under
    # every schedule with the memory-ordering checker on; rows not owned stay NaN.
    run, ref, own = _two_wave_case(layout, cfg)
    out = run(cfg, schedule)
    _check_owned(out, ref, own)
    assert torch.equal(out.nan_to_num(), run(G.Config(128, cfg.block_n), "lockstep").nan_to_num())


# ------------------------------------------------------------------------ split-K

SPLIT_K = list(G.SPLITK_CONFIGS)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cfg", SPLIT_K, ids=[c.function.removeprefix("pk_fp8_gemm_nt_") for c in SPLIT_K])
def test_split_k_partials_and_reduction(cfg, schedule, seed):
    # 6 K blocks (the last partial) in 3 ranges of 2, a partial m-block and partial
    # n-blocks, 2 stages, fewer CTAs than units (persistent: a CTA runs units of several
    # ranges). Slice s of the workspace is the float32 product of K range s alone (NaN
    # poison: every element written once); the reduction adds the slices in order (bit
    # for bit the float32 sum, rounded once) and matches the reference.
    m, n, k, splits = 100, 192, 720, 3
    assert G.split_count(k, splits) == splits
    a, sfa, b, sfb = _problem(m, n, k)
    workspace = torch.full((splits * m, n), float("nan"))
    plan = G.gemm_plan(a, sfa, b, sfb, workspace, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       splits=splits, stages=2, sms=4)
    assert plan.function == cfg.function and G.arg(plan, "splits") == splits
    stats = run_emu(plan, schedule=schedule)
    assert stats.global_written == splits * m * n * 4
    for s in range(splits):
        lo, hi = 256 * s, min(k, 256 * (s + 1))
        part = (a[:, lo:hi], sfa[:, 2 * s:2 * s + 2], b[:, lo:hi], sfb[:, 2 * s:2 * s + 2])
        _assert_accumulated(workspace[s * m:(s + 1) * m], R.fp8_gemm_nt(*part, torch.empty(m, n)), *part)
    out = nan_bf16(m, n)
    run_emu(G.reduce_plan(workspace, out, m, n, splits, sms=2), schedule=schedule)
    slices = workspace.view(splits, m, n)
    assert torch.equal(out, (slices[0] + slices[1] + slices[2]).to(torch.bfloat16))
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL


def test_split_k_through_the_api(seed):
    # with 8 SMs the heuristic splits 64 x 256 x 2048 (2 tiles of 64 x 128) into K ranges
    # (G.choose_split_k); the public call runs both passes
    m, n, k = 64, 256, 2048
    pk.set_num_sms(8)
    try:
        cfg, splits = G.choose_split_k(m, n, k, 8)
        assert cfg.split_k and splits > 1
        a, sfa, b, sfb = _problem(m, n, k)
        out = nan_bf16(m, n)
        pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="emu")
    finally:
        pk.set_num_sms(0)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL


@pytest.mark.parametrize("k", [576, 832])
def test_partial_k_is_the_zero_padded_product(k, seed):
    # DeepGEMM's test K values through the public call (the heuristic's tile): bit for bit
    # the same kernel's result on A and B padded with zero columns to a multiple of 128,
    # i.e. the zero fill is exactly what the partial block adds (and the tolerance holds)
    m, n = 65, 256
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="emu")
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    kp = cdiv(k, 128) * 128

    def pad(t):
        return torch.cat([t, torch.zeros(t.shape[0], kp - k, dtype=t.dtype)], 1)
    padded = pk.fp8_gemm_nt((pad(a), sfa), (pad(b), sfb), nan_bf16(m, n), backend="emu")
    assert torch.equal(out, padded)


# ------------------------------------------------------------------------ float32 out, accumulated

F32ACC = list(G.F32ACC_CONFIGS) + list(G.ROWB_CONFIGS)
F32ACC_IDS = [_cfg_id(c) + ("_f32acc_rowb" if c.row_b else "_f32acc") for c in F32ACC]


def _assert_accumulated(out, ref, a, sfa, b, sfb, c=None, b_scale_rows=128):
    """Every element within float32 summation-order error of ref = c + A B^T, bounded by 2^-14
    of its terms' magnitudes |c| + |A| |B|^T (K <= 576 products summed in float32 in
    another order: at most ~K 2^-24 of them): an element the kernel skipped still holds c,
    off by its whole product term."""
    deq_b = R.dequantize_per_token(b, sfb) if b_scale_rows == 1 else R.dequantize_per_block(b, sfb)
    mag = R.dequantize_per_token(a, sfa).abs() @ deq_b.abs().T + (0 if c is None else c.abs())
    assert not out.isnan().any()
    assert ((out - ref).abs() <= mag * 2.0 ** -14).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cfg", F32ACC, ids=F32ACC_IDS)
def test_f32_out_accumulates_in_place(cfg, schedule, seed):
    # The *_f32acc entries: out (float32) += the product, each thread reading and writing its
    # own fragment elements; *_rowb: 1x128 B scales (one per column, staged by TMA). A
    # partial m-block, partial n-blocks and a partial last K block; NaN rows around the
    # [m, n] view must stay NaN (nothing written past M)
    m, n, k = 100, 192, 208
    a, sfa, b, sfb = _problem(m, n, k)
    rows = 1 if cfg.row_b else 128
    if cfg.row_b:                   # every column's scale differs: a wrong one fails the bound
        b, sfb = pk.per_token_cast_to_fp8(_spread(n, k, 1), backend="reference")
    c = torch.randn(m, n)
    big = torch.full((m + 2, n), float("nan"))
    out = big[1:1 + m]
    out.copy_(c)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2, b_scale_rows=rows)
    assert plan.function == cfg.function and "_f32acc" in plan.function
    stats = run_emu(plan, schedule=schedule)
    _assert_accumulated(out, R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n), c=c, b_scale_rows=rows),
                        a, sfa, b, sfb, c, rows)
    assert big[0].isnan().all() and big[-1].isnan().all()
    assert stats.global_written == m * n * 4                   # every element once, nothing more
    with pytest.raises(ValueError, match="cfg: .* writes bf16, out is torch.float32"):
        G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=G.Config(64, 64),
                    b_scale_rows=rows)


def test_f32_out_forms_through_the_api(seed):
    # DeepGEMM's fp32 forms: d = c + A B^T with c apart from d, c = d (the weight-gradient
    # form, accumulated in place), and no c (d = A B^T); the heuristic's f32acc tile
    m, n, k = 65, 128, 576
    a, sfa, b, sfb = _problem(m, n, k)
    c = torch.randn(m, n)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n), c=c)
    d = torch.full((m, n), float("nan"))
    assert pk.fp8_gemm_nt((a, sfa), (b, sfb), d, c=c, backend="emu") is d
    _assert_accumulated(d, ref, a, sfa, b, sfb, c)
    d = c.clone()
    pk.fp8_gemm_nt((a, sfa), (b, sfb), d, c=d, backend="emu")
    _assert_accumulated(d, ref, a, sfa, b, sfb, c)
    d = torch.full((m, n), float("nan"))
    pk.fp8_gemm_nt((a, sfa), (b, sfb), d, backend="emu")
    _assert_accumulated(d, R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n)), a, sfa, b, sfb)
    # the weight-gradient GEMM: 1x128 B scales (column-major TMA-aligned, read in place)
    b1, sfb1 = pk.per_token_cast_to_fp8(_spread(n, k, 1), backend="reference")
    d = c.clone()
    pk.wgrad_gemm_fp8_fp8_fp32_nt((a, sfa), (b1, pk.get_col_major_tma_aligned_tensor(sfb1)), d, backend="emu")
    _assert_accumulated(d, R.fp8_gemm_nt(a, sfa, b1, sfb1, torch.empty(m, n), c=c, b_scale_rows=1),
                        a, sfa, b1, sfb1, c, 1)


# ------------------------------------------------------------------------ e4m3 out, quantized on store

E4M3 = list(G.E4M3_CONFIGS)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cfg", E4M3, ids=[_cfg_id(c) + "_e4m3" for c in E4M3])
def test_fp8_out_quantizes_on_store(cfg, schedule, seed):
    # The *_e4m3 entries: bit for bit per_token_cast_to_fp8 of the float32 result of the
    # same K loop (the f32acc entry of the same tile, from zeros), partial m-, n- and K
    # blocks; a NaN in a row of A makes its groups NaN (canonical NaN scale, q 0x7F);
    # poisoned outputs and NaN guard rows around d (nothing written past M)
    m, n, k = 70, 304, 208
    a, sfa, b, sfb = _problem(m, n, k)
    a.view(torch.uint8)[5, 7] = 0x7F
    f32 = torch.zeros(m, n)
    run_emu(G.gemm_plan(a, sfa, b, sfb, f32, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                        cfg=dataclasses.replace(cfg, e4m3=False, f32acc=True)))
    q_ref, sf_ref = R.per_token_cast_to_fp8(f32)
    big = torch.full((m + 2, n), 0x55, dtype=torch.uint8)
    d = big[1:1 + m].view(torch.float8_e4m3fn)
    sfd = torch.full((m, 3), float("nan"))
    plan = G.gemm_plan(a, sfa, b, sfb, d, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=2, sfd=sfd)
    assert plan.function == cfg.function
    stats = run_emu(plan, schedule=schedule)
    assert torch.equal(d.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(sfd.view(torch.int32), sf_ref.view(torch.int32))
    assert (big[0] == 0x55).all() and (big[-1] == 0x55).all()
    assert stats.global_written == m * n + m * 3 * 4            # every byte and scale once
    assert calc_diff(R.dequantize_per_token(d, sfd)[6:], R.fp8_gemm_nt(a, sfa, b, sfb)[6:].float()) < TOL


def test_fp8_out_through_the_api(seed):
    m, n, k = 65, 256, 576
    a, sfa, b, sfb = _problem(m, n, k)
    d, sfd = torch.empty(m, n, dtype=torch.float8_e4m3fn), torch.full((m, 2), float("nan"))
    got = pk.fp8_gemm_nt((a, sfa), (b, sfb), (d, sfd), backend="emu")
    assert got[0] is d and got[1] is sfd
    assert calc_diff(R.dequantize_per_token(d, sfd), R.fp8_gemm_nt(a, sfa, b, sfb).float()) < TOL


# ------------------------------------------------------------------------ large K

@pytest.mark.slow
def test_large_k(seed):
    # K = 7168 (DeepSeek-V3 hidden size): 56 K blocks through the stage ring; also
    # within DeepGEMM's bound of the unquantized bf16 product
    m, n, k = 129, 256, 7168
    x, y, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n)
    pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="emu")
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    assert calc_diff(out, x.float() @ y.float().T) < TOL


# ------------------------------------------------------------------------ resident A (*_ares)

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("bn,k", [(144, 512), (160, 256)])
def test_resident_a_matches_the_streamed_kernel(bn, k, schedule, seed):
    # Resident A (fp8_gemm.cu kAResident): 2 m-blocks x 4 n-blocks (the last partial) on 3
    # CTAs, runs of 3 m-major units: CTA 0 keeps m-block 0's A for three units, CTA 1 moves
    # from m-block 0 to 1 (A reloaded once its math warps released the old one), CTA 2 keeps
    # m-block 1. Bit for bit the streamed entry's result (the same K blocks and scales in the
    # same order) under every schedule with the memory-ordering checker on; NaN poison and the
    # byte count: every element written once.
    m, n = 256, 3 * bn + 16
    a, sfa, b, sfb = _problem(m, n, k)

    def run(resident, schedule):
        out = nan_bf16(m, n)
        plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                           cfg=G.Config(128, bn), stages=3, sms=3, resident_a=resident)
        assert plan.function == G.Config(128, bn, a_resident=resident).function and plan.grid == (3, 1, 1)
        assert run_emu(plan, schedule=schedule).global_written == m * n * 2
        return out
    out = run(True, schedule)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
    assert torch.equal(out, run(False, "lockstep"))


@pytest.mark.parametrize("cfg", G.compiled_configs(a_resident=True), ids=lambda c: c.function[15:])
def test_resident_a_shared_memory_formula_is_the_kernels(cfg, seed):
    # Layout::smem_bytes_resident: the plan's size (Config.smem_bytes with k) runs, one byte
    # less traps; 3 K blocks resident, 2 B stages, one CTA for both n-blocks
    m, n, k = 64, 2 * cfg.block_n, 384
    a, sfa, b, sfb = _problem(m, n, k)
    out = nan_bf16(m, n)
    plan = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                       stages=2, sms=1)
    assert plan.function == cfg.function and plan.shared_bytes == cfg.smem_bytes(2, k)
    with pytest.raises(EmuError, match="trap executed"):
        run_emu(dataclasses.replace(plan, shared_bytes=plan.shared_bytes - 1))
    run_emu(plan)
    assert not out.isnan().any() and calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < TOL
