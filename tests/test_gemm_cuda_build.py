"""The hand-written FP8 GEMM (csrc/gemm/fp8_gemm.cu): what was compiled (SASS, PTX, ptxas
resources per instantiation) and the host logic that launches it (pykernels/cuda/gemm.py:
config heuristic, grid, shared memory, tensor maps, argument packing, shape errors).
None of this needs a GPU or the emulator's execution; GPU runs are marked `gpu`."""
import collections
import re
from math import gcd
from pathlib import Path

import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.cuda import gemm as G
from pykernels.emu.parser import parse
from pykernels.metrics import calc_diff
from pykernels.runtime import artifacts, device_errors, sass
from pykernels.runtime.hardware import SMEM_PER_BLOCK
from pykernels.runtime.executors import gpu_unavailable_reason, run_cuda

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights

PRODUCER_REGS, MATH_REGS = 40, 232     # setmaxnreg targets in fp8_gemm.cu
REGISTER_FILE = 65536
CONFIG_IDS = [f"m{c.block_m}n{c.block_n}" + (f"_mc{c.cluster}" if c.cluster > 1 else "") for c in G.CONFIGS]
MULTICAST = [c for c in G.CONFIGS if c.cluster == 2]
MC_IDS = [i for i, c in zip(CONFIG_IDS, G.CONFIGS) if c.cluster == 2]


def _k_loop_copies(cfg) -> int:
    """Compiled copies of the math warps' K loop: one per split of a 112/144/160-column
    tile's 8-column groups between two sfb blocks (fp8_gemm.cu, with_const), else one."""
    if 128 % cfg.block_n == 0:
        return 1
    return min(cfg.block_n // 8, 16) // (gcd(cfg.block_n, 128) // 8)


def _double_acc(cfg) -> bool:
    """One math warpgroup and BLOCK_N <= 64: the K loop runs two accumulator sets
    (fp8_gemm.cu kDoubleAcc), K block kb + 1 issued before kb is promoted."""
    return cfg.block_m == 64 and cfg.block_n <= 64


def _waves(cfg) -> int:
    """64-row waves per math warpgroup (fp8_gemm.cu Layout::kWaves): 2 for BLOCK_M 256 (two
    math warpgroups of 128 rows, one accumulator set reused by the waves), else 1."""
    assert cfg.waves == cfg.block_m // 64 // cfg.math_warpgroups
    return cfg.waves


def _chunks(cfg) -> int:
    """wgmma column chunks per wave (fp8_gemm.cu chunk_n): BLOCK_N / 72 for 256 x 144, else 1."""
    return cfg.block_n // cfg.chunk_n


def _issue_sites(cfg) -> int:
    """Places the K loop's four k32 wgmma of a K block are compiled: once per copy of the
    loop, wave and column chunk; with two accumulator sets four (the prologue's block, the
    two blocks of a steady-state round, the tail's odd block)."""
    return 4 if _double_acc(cfg) else _k_loop_copies(cfg) * _waves(cfg) * _chunks(cfg)


def _qgmma(cfg) -> str:
    return rf"QGMMA\.64x{cfg.chunk_n}x32\.F32\.E4M3\.E4M3"


def _sass_of(function: str) -> str:
    listing = sass.sass(G.MODULE)
    parts = re.split(r"\n\s*Function : ", listing)
    for p in parts[1:]:
        if p.split()[0] == function:
            return p
    raise AssertionError(f"{function} not in the SASS of {G.MODULE}")


@pytest.fixture(scope="module")
def ptx_module():
    return parse(artifacts.ptx_text(G.MODULE))


# ------------------------------------------------------------------------ compiled code

def _source_entries():
    """Configs named by the PK_FP8_GEMM_ENTRY / _MC2 lines of the kernel source."""
    src = (Path(__file__).resolve().parents[1] / "csrc" / "gemm" / "fp8_gemm.cu").read_text()
    found = {G.Config(int(bm), int(bn)) for bm, bn in re.findall(r"^PK_FP8_GEMM_ENTRY\((\d+), (\d+)\)$", src, re.M)}
    return found | {G.Config(int(bm), int(bn), 2)
                    for bm, bn in re.findall(r"^PK_FP8_GEMM_ENTRY_MC2\((\d+), (\d+)\)$", src, re.M)}


def _source_f32acc_entries(row_b=False):
    """Configs named by the PK_FP8_GEMM_ENTRY_F32ACC (row_b: _F32ACC_ROWB) lines (float32
    out, accumulated; 1x128 B scales)."""
    src = (Path(__file__).resolve().parents[1] / "csrc" / "gemm" / "fp8_gemm.cu").read_text()
    macro = "PK_FP8_GEMM_ENTRY_F32ACC_ROWB" if row_b else "PK_FP8_GEMM_ENTRY_F32ACC"
    return {G.Config(int(bm), int(bn), f32acc=True, row_b=row_b)
            for bm, bn in re.findall(rf"^{macro}\((\d+), (\d+)\)$", src, re.M)}


F32ACC_ALL = G.F32ACC_CONFIGS + G.ROWB_CONFIGS


def _source_e4m3_entries():
    src = (Path(__file__).resolve().parents[1] / "csrc" / "gemm" / "fp8_gemm.cu").read_text()
    return {G.Config(int(bm), int(bn), e4m3=True)
            for bm, bn in re.findall(r"^PK_FP8_GEMM_ENTRY_E4M3\((\d+), (\d+)\)$", src, re.M)}


def _source_splitk_entries():
    src = (Path(__file__).resolve().parents[1] / "csrc" / "gemm" / "fp8_gemm.cu").read_text()
    return {G.Config(int(bm), int(bn), split_k=True)
            for bm, bn in re.findall(r"^PK_FP8_GEMM_ENTRY_SPLITK\((\d+), (\d+)\)$", src, re.M)}


def _source_ares_entries():
    src = (Path(__file__).resolve().parents[1] / "csrc" / "gemm" / "fp8_gemm.cu").read_text()
    return {G.Config(int(bm), int(bn), a_resident=True)
            for bm, bn in re.findall(r"^PK_FP8_GEMM_ENTRY_ARES\((\d+), (\d+)\)$", src, re.M)}


ARES = G.compiled_configs(a_resident=True)


def test_every_config_is_compiled():
    # CONFIGS come from the build manifest; the build is current with the source's entries
    funcs = artifacts.manifest()["kernels"][G.MODULE]["functions"]
    from pykernels.cuda import bf16_gemm as CB     # the bf16 entries (kBf16): tests/test_bf16_gemm.py
    bf16 = {c.function for c in CB.compiled_configs() + CB.compiled_configs(True)}
    assert set(funcs) == {c.function for c in G.CONFIGS + F32ACC_ALL + G.E4M3_CONFIGS + G.SPLITK_CONFIGS + ARES} | bf16
    assert set(ARES) == _source_ares_entries() and {(c.block_m, c.block_n) for c in ARES} == {(128, 144), (128, 160)}
    assert set(G.SPLITK_CONFIGS) == _source_splitk_entries() and len(G.SPLITK_CONFIGS) >= 1
    assert list(artifacts.manifest()["kernels"][G.REDUCE_MODULE]["functions"]) == [G.REDUCE_FUNCTION]
    assert set(G.E4M3_CONFIGS) == _source_e4m3_entries() and all(c.block_n == 128 for c in G.E4M3_CONFIGS)
    assert set(G.CONFIGS) == _source_entries() and len(G.CONFIGS) == len(set(G.CONFIGS))
    assert set(G.F32ACC_CONFIGS) == _source_f32acc_entries() and not any(c.f32acc for c in G.CONFIGS)
    assert set(G.ROWB_CONFIGS) == _source_f32acc_entries(row_b=True)
    assert 5 <= len(G.CONFIGS) <= 12                     # CI builds them on 2 cores
    # non-power-of-two BLOCK_N: 112, 144 and 160 (the issue's examples), with BLOCK_M 128 (and 256)
    assert {c.block_n for c in G.CONFIGS if 128 % c.block_n and c.cluster == 1} == {112, 144, 160}
    assert {c.block_m for c in G.CONFIGS} == {64, 128, 256}
    # BLOCK_M 256 (two 64-row waves per math warpgroup): cluster 1, BLOCK_N 112 and 128 (acc + a
    # result per wave: 3 x BLOCK_N / 2 registers) and 144 (wgmma in two 72-column chunks:
    # 36 + 2 x 72)
    assert {(c.block_n, c.cluster) for c in G.CONFIGS if c.block_m == 256} == {(112, 1), (128, 1), (144, 1)}
    assert G.Config(256, 144).chunk_n == 72 and G.Config(256, 128).chunk_n == 128 == G.Config(128, 128).chunk_n
    # TMA-multicast variants (clusters of 2) for two tile shapes only, beside the seven
    # cluster-1 instantiations
    assert {(c.block_m, c.block_n) for c in MULTICAST} == {(128, 128), (128, 160)}
    assert all(c.cluster in (1, 2) for c in G.CONFIGS) and len(G.CONFIGS) - len(MULTICAST) == 10
    assert {f for f in funcs if f.endswith("_mc2")} == {c.function for c in MULTICAST}


@pytest.mark.parametrize("cfg", G.CONFIGS, ids=CONFIG_IDS)
def test_sass_has_the_intended_instructions(cfg):
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    # four fp8 wgmma per 128-wide K block (k32 each), N = BLOCK_N, f32 accumulators, in
    # each copy of the K loop
    assert len(re.findall(_qgmma(cfg), listing)) == 4 * _issue_sites(cfg)
    assert ops["UTMALDG.3D"] == 1                         # the tile's A scales of a K block
    if cfg.cluster == 1:
        assert ops["UTMALDG.2D"] == 2                     # A and B tiles by TMA
        assert not any("MULTICAST" in op or op.startswith("UCGABAR") for op in ops)   # no cluster code
    else:                                                 # A by TMA, the B half multicast
        assert ops["UTMALDG.2D"] == 1 and ops["UTMALDG.2D.MULTICAST"] == 1
    assert ops["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1 and ops["USETMAXREG.DEALLOC.CTAPOOL"] == 1
    assert any(op.startswith("SYNCS.PHASECHK") for op in ops)       # mbarrier waits
    assert any(op.startswith("SYNCS.ARRIVE.TRANS64") for op in ops)  # arrive / expect_tx
    assert ops["WARPGROUP.ARRIVE"] >= 1 and any(op.startswith("WARPGROUP.DEPBAR") for op in ops)
    assert ops["UTMASTG.2D"] >= 1                                   # TMA store of whole tiles
    assert ops["STG.E.128"] >= 1 and ops["LDS.128"] >= 1          # checked 16-byte stores of partial tiles
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    # the device checks: one pk::record_error site for masked_m and one for m_indices (math
    # warps only), and the trap on too little dynamic shared memory
    assert ops["ATOMG.E.CAS.STRONG.GPU"] == 2 and ops["BPT.TRAP"] >= 1
    # ptxas reports the entry count (168); the math region may use up to its setmaxnreg 232
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS


@pytest.mark.parametrize("cfg", F32ACC_ALL, ids=[c.function.removeprefix("pk_fp8_gemm_nt_") for c in F32ACC_ALL])
def test_f32acc_sass_and_resources(cfg):
    # float32 out accumulated in place: the same K loop (4 QGMMA, TMA loads of A, B and the A
    # scales; *_rowb: and the B scales, a second 3-D box), then per thread 2 x BLOCK_N/8
    # 8-byte read-add-writes of its fragment (rows r, r + 8; column pairs): no TMA store, no
    # staging; no local memory, no spill
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    assert len(re.findall(rf"QGMMA\.64x{cfg.block_n}x32\.F32\.E4M3\.E4M3", listing)) == 4 * _issue_sites(cfg)
    assert ops["UTMALDG.2D"] == 2 and ops["UTMALDG.3D"] == (2 if cfg.row_b else 1)
    if cfg.row_b:       # the thread's BLOCK_N/4 column scales: BLOCK_N/8 8-byte shared loads per issue site
        assert ops["LDS.64"] == cfg.block_n // 8 * _issue_sites(cfg)
    assert "UTMASTG.2D" not in ops and "STG.E.128" not in ops
    assert ops["LDG.E.64"] == ops["STG.E.64"] == 2 * cfg.block_n // 8 * _waves(cfg)   # per 64-row wave
    assert ops["ATOMG.E.CAS.STRONG.GPU"] == 2 and ops["BPT.TRAP"] >= 1
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS
    r = artifacts.resources(G.MODULE, cfg.function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert PRODUCER_REGS <= r["registers"] < MATH_REGS


@pytest.mark.parametrize("cfg", G.E4M3_CONFIGS, ids=[c.function.removeprefix("pk_fp8_gemm_nt_")
                                                     for c in G.E4M3_CONFIGS])
def test_e4m3_out_sass_and_resources(cfg):
    # e4m3 out quantized on store: the same K loop, then per row of the thread a quad
    # reduction of the amax (2 SHFL.BFLY), two div.rn (inv, scale), BLOCK_N/8
    # 2-byte stores per row (F2FP e4m3 packs), the scale by one lane per quad; no TMA store
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    assert len(re.findall(rf"QGMMA\.64x{cfg.block_n}x32\.F32\.E4M3\.E4M3", listing)) == 4 * _issue_sites(cfg)
    assert ops["UTMALDG.2D"] == 2 and ops["UTMALDG.3D"] == 1 and "UTMASTG.2D" not in ops
    assert ops["STG.E.U16"] == 2 * cfg.block_n // 8 * _waves(cfg)               # per 64-row wave
    assert sum(v for op, v in ops.items() if op.startswith("SHFL.BFLY")) == 4 * _waves(cfg)
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS
    r = artifacts.resources(G.MODULE, cfg.function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0


@pytest.mark.parametrize("cfg", G.SPLITK_CONFIGS, ids=[c.function.removeprefix("pk_fp8_gemm_nt_")
                                                       for c in G.SPLITK_CONFIGS])
def test_split_k_sass_and_resources(cfg):
    # split-K's first pass: the bf16 entries' K loop over a K range, then per thread 2 x
    # BLOCK_N/8 8-byte stores of its float32 fragment into the workspace slice (no read:
    # a plain store, unlike *_f32acc), no TMA store; no local memory, no spill
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    assert len(re.findall(rf"QGMMA\.64x{cfg.block_n}x32\.F32\.E4M3\.E4M3", listing)) == 4 * _issue_sites(cfg)
    assert ops["UTMALDG.2D"] == 2 and ops["UTMALDG.3D"] == 1 and "UTMASTG.2D" not in ops
    assert ops["STG.E.64"] == 2 * cfg.block_n // 8 and "LDG.E.64" not in ops
    assert ops["ATOMG.E.CAS.STRONG.GPU"] == 2 and ops["BPT.TRAP"] >= 1
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    r = artifacts.resources(G.MODULE, cfg.function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert PRODUCER_REGS <= r["registers"] < MATH_REGS


def test_split_k_reduction_sass():
    # the second pass: per thread and slice two 16-byte read-only loads of its 8 columns,
    # float adds, one bf16 pack per pair and one 16-byte store; no atomics, no local memory
    ops = sass.opcodes(sass.sass(G.REDUCE_MODULE))
    assert ops["LDG.E.128.CONSTANT"] >= 4 and ops["STG.E.128"] == 1 and ops["F2FP.BF16.F32.PACK_AB"] == 4
    assert not any(op.startswith(("ATOM", "RED", "STL", "LDL")) for op in ops)
    r = artifacts.resources(G.REDUCE_MODULE, G.REDUCE_FUNCTION)
    assert r["spill_stores"] == 0 and r["stack_bytes"] == 0 and r["shared_bytes"] == 0


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _k_loops(listing: str, qgmma: int = 4) -> list:
    """Opcode counts of each K loop of a kernel's SASS: the regions from a backward BRA's
    target to the BRA that hold `qgmma` QGMMA (four per K block; a round of the two-set
    loop has two blocks), shortest first, each kept unless it overlaps a shorter one
    (outer loops, and the out-of-line retries of the mbarrier waits that branch back
    into a loop)."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(listing)]
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    spans = []
    for i, (a, op, rest) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in at:
            j = at[int(target.group(1), 16)]
            if sum(o.startswith("QGMMA") for _, o, _ in ins[j:i + 1]) == qgmma:
                spans.append((j, i))
    kept = []
    for j, i in sorted(spans, key=lambda span: span[1] - span[0]):
        if all(i < u or v < j for u, v in kept):
            kept.append((j, i))
    return [collections.Counter(o for _, o, _ in ins[j:i + 1]) for j, i in sorted(kept)]


def _isetp(ops) -> int:
    return sum(v for k, v in ops.items() if k.startswith("ISETP"))


@pytest.mark.parametrize("cfg", G.CONFIGS, ids=CONFIG_IDS)
def test_k_loop_promotion_picks_b_scales_at_compile_time(cfg):
    # A tile of 112 / 144 / 160 columns takes the B scale of sfb block nb0 for its leading
    # 8-column groups and of nb0 + 1 for the rest; the split point depends on the tile's
    # start (a multiple of gcd(BLOCK_N, 128) columns), so the K loop is compiled once per
    # split (issue 14 item 4) and its promotion has no per-group select: the same
    # instruction mix as the 128-column tile's (before: 17 FSEL, 20 ISETP and 34 FMUL per
    # K block for 128x160, 13 / 16 / 26 for 128x112).
    # Two accumulator sets: one loop round is two K blocks (two promotions); two waves
    # (BLOCK_M 256): one K block, a promotion per wave.
    blocks = 2 if _double_acc(cfg) else _waves(cfg)
    loops = _k_loops(_sass_of(cfg.function), 4 * blocks * _chunks(cfg))
    assert len(loops) == _k_loop_copies(cfg)
    (uniform,) = _k_loops(_sass_of(G.Config(128, 128).function))
    for ops in loops:
        assert ops["FSEL"] == 0 and ops["FFMA"] == blocks * cfg.block_n // 2, ops
        assert ops["FMUL"] <= 4 * blocks            # sfa rows (r, r+8) x sfb blocks (nb0, nb0+1)
        assert _isetp(ops) <= blocks * _isetp(uniform), ops


def test_double_accumulators_overlap_the_promotion(ptx_module):
    # BLOCK_M 64, BLOCK_N <= 64: the K loop waits for all but the newest wgmma group
    # (wait_group 1: K block kb + 1 runs while kb is promoted), the others retire theirs at
    # once (wait_group 0 only); and ptxas kept every kernel's wgmma asynchronous (it notes
    # "wgmma.mma_async instructions are serialized" when a path may read an accumulator in
    # flight, which would silently undo the overlap)
    for cfg in G.CONFIGS + F32ACC_ALL + G.E4M3_CONFIGS + G.SPLITK_CONFIGS:
        waits = {i.text for i in ptx_module.kernel(cfg.function).instrs if i.full.startswith("wgmma.wait_group")}
        expect = {"wgmma.wait_group.sync.aligned 0"} | ({"wgmma.wait_group.sync.aligned 1"} if _double_acc(cfg) else set())
        assert waits == expect, (cfg.function, waits)
    log = artifacts.KERNEL_DIR / artifacts.manifest()["kernels"][G.MODULE]["log"]
    assert "serialized" not in log.read_text()


@pytest.mark.parametrize("cfg", G.CONFIGS, ids=CONFIG_IDS)
def test_resources_within_budget(cfg):
    r = artifacts.resources(G.MODULE, cfg.function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert r["shared_bytes"] == 0                        # all shared memory is dynamic
    # registers at launch: fit the register file, and lie between the producer's
    # setmaxnreg.dec and the math warpgroups' setmaxnreg.inc targets (strictly below: .inc
    # raises the count)
    assert PRODUCER_REGS <= r["registers"] < MATH_REGS
    assert r["registers"] * cfg.threads <= REGISTER_FILE
    # after the hand-over (1 producer warpgroup at 40, BLOCK_M/64 math at 232) the CTA's
    # pool, allocated at launch, covers everyone
    after = 128 * (PRODUCER_REGS + cfg.math_warpgroups * MATH_REGS)
    assert after <= r["registers"] * cfg.threads <= REGISTER_FILE


@pytest.mark.parametrize("cfg", G.CONFIGS, ids=CONFIG_IDS)
def test_shared_memory_fits(cfg):
    stages = cfg.max_stages()
    assert G.MIN_STAGES <= stages <= G.MAX_STAGES
    assert cfg.smem_bytes(stages) <= SMEM_PER_BLOCK
    assert stages == G.MAX_STAGES or cfg.smem_bytes(stages + 1) > SMEM_PER_BLOCK
    # A and B stage tiles are whole 1024-byte swizzle atoms (8 rows x 128 bytes)
    assert cfg.block_m * 128 % 1024 == 0 and cfg.block_n * 128 % 1024 == 0


def test_shared_memory_formula():
    # 1024 alignment slack + stages * (A + B + BM f32 A scales) + 64 x BN bf16 staging per math
    # warpgroup + mbarriers; the A scales cost 128 x 128 its sixth stage (233,568 > 232,448)
    assert G.Config(128, 128).smem_bytes(5) == 1024 + 5 * (32768 + 512) + 2 * 64 * 256 + 80 == 200272
    assert G.Config(128, 128).smem_bytes(6) == 233568
    assert G.Config(128, 128).max_stages() == 5 and G.Config(128, 160).max_stages() == 5
    assert G.Config(128, 112).max_stages() == 6
    assert G.Config(64, 32).smem_bytes(8) == 1024 + 8 * (12288 + 256) + 64 * 64 + 128


def test_ptx_parses_with_the_intended_instructions(ptx_module):
    from pykernels.cuda import bf16_gemm as CB     # the bf16 entries (kBf16): tests/test_bf16_gemm.py
    bf16 = {c.function for c in CB.compiled_configs() + CB.compiled_configs(True)}
    assert set(ptx_module.kernels) == {c.function for c in G.CONFIGS + F32ACC_ALL + G.E4M3_CONFIGS
                                       + G.SPLITK_CONFIGS + ARES} | bf16
    for cfg in G.CONFIGS + ARES:
        k = ptx_module.kernel(cfg.function)
        assert len(k.params) == len(G.PARAMS)
        assert [(p.size, p.align) for p in k.params[:4]] == [(128, 64)] * 4          # tensor maps
        full = [i.full for i in k.instrs]
        assert full.count(f"wgmma.mma_async.sync.aligned.m64n{cfg.chunk_n}k32.f32.e4m3.e4m3") == 4 * _issue_sites(cfg)
        tma = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        assert full.count(tma) >= (2 if cfg.cluster == 1 else 1)
        assert (full.count(tma + ".multicast::cluster") >= 1) == (cfg.cluster == 2)
        # the A scales: one 3-D box per stage ([G, K/128, M] map), no plain global loads of them
        assert full.count(tma.replace(".2d.", ".3d.")) >= 1
        assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in full
        assert "cp.async.bulk.wait_group.read" in full and "fence.proxy.async.shared::cta" in full
        assert "mbarrier.try_wait.parity.shared::cta.b64" in full
        assert "setmaxnreg.inc.sync.aligned.u32" in full and "setmaxnreg.dec.sync.aligned.u32" in full
        assert not any(f.startswith(("call", "ld.local", "st.local")) for f in full)
        assert not k.locals
    text = artifacts.ptx_text(G.MODULE)
    assert f"setmaxnreg.inc.sync.aligned.u32 {MATH_REGS};" in text
    assert f"setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGS};" in text


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_multicast_sass(cfg):
    # what cuobjdump prints for the cluster code of the *_mc2 entries
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    assert ops["UTMALDG.2D.MULTICAST"] == 1               # the B half, into both CTAs (mask in a UR)
    # stage release in both CTAs through a mapa'd address, in the computing path (each copy
    # of the K loop) and the idle path
    assert ops["SYNCS.ARRIVE.TRANS64.RED.A1T0"] == _k_loop_copies(cfg) + 1
    # cluster barriers: after the mbarrier init, and at the end of the producer and math paths
    assert ops["UCGABAR_ARV"] == 3 and ops["UCGABAR_WAIT"] == 3
    assert ops["BPT.TRAP"] >= 1                           # launched without its cluster: trap
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_multicast_stage_handoff_has_no_gpu_fence_or_l1_invalidate(cfg):
    # The stage hand-off between the CTAs of a cluster orders shared memory only: the
    # release before each stage arrive is the restricted cluster fence (FENCE.VIEW.ASYNC.S,
    # no MEMBAR.ALL.GPU / ERRBAR / CGAERRBAR on the math warps' K loop) and the producer's
    # empty-barrier wait is followed by no whole-L1 invalidate (CCTL.IVALL), which would
    # evict the B scales the math warps read through L1. The only GPU-scope fences and L1
    # invalidates left are those of the three barrier.cluster (outside every loop).
    ops = [m.group(2) for m in sass._INSTR.finditer(_sass_of(cfg.function))]
    at = {op: [i for i, o in enumerate(ops) if o == op]
          for op in ("MEMBAR.ALL.GPU", "CCTL.IVALL", "UCGABAR_ARV", "UCGABAR_WAIT", "SYNCS.ARRIVE.TRANS64.RED.A1T0")}
    assert len(at["UCGABAR_ARV"]) == len(at["UCGABAR_WAIT"]) == 3
    assert len(at["MEMBAR.ALL.GPU"]) == 3 and all(any(0 < a - i <= 4 for a in at["UCGABAR_ARV"])
                                                  for i in at["MEMBAR.ALL.GPU"])
    assert len(at["CCTL.IVALL"]) == 3 and all(any(0 < i - w <= 2 for w in at["UCGABAR_WAIT"])
                                              for i in at["CCTL.IVALL"])
    for i in at["SYNCS.ARRIVE.TRANS64.RED.A1T0"]:                   # the stage-release sites
        before = ops[i - 8:i]
        assert "FENCE.VIEW.ASYNC.S" in before and "MEMBAR.ALL.CTA" in before, before
    phasechk = [i for i, o in enumerate(ops) if o.startswith("SYNCS.PHASECHK")]
    assert not any(ops[i + 1] == "CCTL.IVALL" or ops[i + 2] == "CCTL.IVALL" for i in phasechk)


@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_multicast_ptx(cfg, ptx_module):
    full = [i.full for i in ptx_module.kernel(cfg.function).instrs]
    assert full.count("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                      ".multicast::cluster") == 1
    # stage releases (computing and idle path): restricted release fence, relaxed cluster arrive
    assert full.count("mbarrier.arrive.relaxed.cluster.shared::cluster.b64") == _k_loop_copies(cfg) + 1
    assert full.count("fence.release.sync_restrict::shared::cta.cluster") == _k_loop_copies(cfg) + 1
    assert "mapa.shared::cluster.u32" in full
    # the producer's empty wait: relaxed at cluster scope, then the restricted acquire fence
    assert "mbarrier.try_wait.parity.relaxed.cluster.shared::cta.b64" in full
    assert "fence.acquire.sync_restrict::shared::cluster.cluster" in full
    assert not any(f.startswith(("mbarrier.arrive.release.cluster", "mbarrier.try_wait.parity.acquire.cluster"))
                   for f in full)
    assert full.count("barrier.cluster.arrive.release.aligned") == 3
    assert full.count("barrier.cluster.wait.acquire.aligned") == 3


# ------------------------------------------------------------------------ heuristic

@pytest.mark.parametrize("m,n,k,expect", [
    (1, 2112, 7168, lambda c: c.block_m == 64 and c.block_n <= 64),    # decode: spread N over SMs
    (64, 2112, 7168, lambda c: c.block_m == 64 and c.block_n <= 64),
    (128, 4096, 7168, lambda c: c.block_m == 64),                      # 2 x 64 blocks fill 1 wave
    # large M and N: the two-wave 256-row tiles (fewer bytes per MAC: (256 + 128) x 128 per 4.19 M
    # MACs against (128 + 160) x 128 per 2.62 M for 128 x 160), each where model v0.2 (H800) has it
    # fastest: 256 x 144 gives 4096 x 2112 two waves of tiles (1284 TFLOP/s against 921 for 256 x 128)
    (4096, 2112, 7168, lambda c: (c.block_m, c.block_n) == (256, 144)),
    (4096, 7168, 16384, lambda c: (c.block_m, c.block_n) == (256, 128)),         # 1395 against 1299
    (4096, 32768, 512, lambda c: (c.block_m, c.block_n) == (256, 144)),          # 878 against 846
])
def test_config_heuristic(m, n, k, expect):
    cfg = G.choose_config(m, n, k)
    assert cfg in G.CONFIGS and expect(cfg), cfg


@pytest.mark.parametrize("m,n,k,expect", [
    # 33 x 64 tiles of 56 K blocks: K ranges fill the SMs; 66 tiles of 64 x 32 x 2 ranges on 132 SMs model
    # fastest (model v0.2 H800: 298 TFLOP/s against m64n64 x 3's 286 and x 4's 285; docs/gemm.md, Split-K)
    (64, 2112, 7168, lambda c, s: (c.block_m, c.block_n, c.split_k, s) == (64, 32, True, 2)),
    (128, 4096, 7168, lambda c, s: c.split_k and s > 1),
    # 56 tiles of 128 x 128: under the per-SM L2 port (model 0.2) two K ranges on 112 SMs pay
    # (the H200 measured the same direction: m64n128 on 112 SMs 51.8 us, m128n128 on 56 SMs 59.1)
    (128, 7168, 16384, lambda c, s: (c.block_m, c.block_n, c.split_k, s) == (128, 128, True, 2)),
    (4096, 7168, 16384, lambda c, s: not c.split_k and s == 1),  # several waves of tiles: never split
    (256, 256, 512, lambda c, s: not c.split_k and s == 1),      # 4 K blocks: the reduction does not pay
])
def test_split_k_heuristic(m, n, k, expect):
    cfg, splits = G.choose_split_k(m, n, k, 132)
    assert expect(cfg, splits), (cfg, splits)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert G.split_count(k, splits) == splits
    if splits > 1:      # one wave, and chosen because the cost rule finds it faster than the unsplit choice
        assert tiles * splits <= 132
        base = G.choose_config(m, n, k, 1, 132)
        assert G.streaming_cycles(cfg, m, n, k, 132, splits) < G.streaming_cycles(base, m, n, k, 132)


def test_split_k_plan_errors(seed):
    m, n, k = 64, 128, 1024
    a, sfa, b, sfb = normal_problem(m, n, k)[2:]
    ws = torch.empty(4 * m, n)
    cfg = G.Config(64, 128, split_k=True)
    with pytest.raises(ValueError, match="splits: 4 K ranges need a split-K cfg"):
        G.gemm_plan(a, sfa, b, sfb, ws, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=G.Config(64, 128),
                    splits=4)
    with pytest.raises(ValueError, match="out: split-K writes a float32 workspace"):
        G.gemm_plan(a, sfa, b, sfb, torch.empty(3 * m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                    cfg=cfg, splits=4)
    with pytest.raises(ValueError, match="out: split-K writes a float32 workspace"):   # 8 K blocks: 4 ranges of 2
        G.gemm_plan(a, sfa, b, sfb, torch.empty(7 * m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                    cfg=cfg, splits=7)
    plan = G.gemm_plan(a, sfa, b, sfb, ws, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg, splits=4)
    assert plan.grid == (4, 1, 1) and G.arg(plan, "splits") == 4           # 1 tile x 4 ranges
    with pytest.raises(ValueError, match="workspace: expected float32"):
        G.reduce_plan(ws, torch.empty(m, n, dtype=torch.bfloat16), m, n, 3)


def test_heuristic_model_properties():
    cfg = G.Config(128, 128)
    # more K, more time; twice the tiles in one wave cost no more than twice
    assert G.estimate_cycles(cfg, 4096, 4096, 1024, 1, 132) < G.estimate_cycles(cfg, 4096, 4096, 2048, 1, 132)
    assert G.estimate_cycles(cfg, 128, 128, 1024, 1, 132) == G.estimate_cycles(cfg, 128, 256, 1024, 1, 132)
    # grouped problems count all groups' tiles
    # (masked 4 x 256 rows: 256 x 112 gives 4 x 64 = 256 tiles, two waves like 256 x 128's 224, with
    # fewer bytes per tile; model v0.2 H800: 1037 against 950 TFLOP/s)
    assert G.choose_config(256, 7168, 2048, groups=4) == G.Config(256, 112)
    assert G.choose_config(8, 4096, 7168, groups=1).block_m == 64


# The multicast model, over every compiled config (the default candidates leave the
# multicast configs out: NOT_AUTO, measured slower on an H200)
ALL = G.CONFIGS


def test_heuristic_uses_the_resident_cluster_count():
    # On a GPU the persistent multicast grid holds as many clusters as the driver says;
    # fewer co-resident clusters than #SMs / 2 mean more waves, and the model counts them.
    m, n, k = 4096, 7168, 16384
    mc = G.Config(128, 160, cluster=2)
    full, fewer = (G.estimate_cycles(mc, m, n, k, 1, 132, clusters=c) for c in (66, 40))
    assert fewer > full == G.estimate_cycles(mc, m, n, k, 1, 132)
    for slots in (66, 40):
        assert _multicast_rule_holds((m, n, k), dict(slots=lambda c, s=slots: s))


def _multicast_rule_holds(args, kw) -> bool:
    """choose_config takes a pair config exactly when it models MULTICAST_GAIN faster than the
    best cluster-1 config (both among ALL)."""
    choice = G.choose_config(*args, candidates=ALL, **kw)
    single = G.choose_config(*args, candidates=tuple(c for c in ALL if c.cluster == 1), **kw)
    pairs = [c for c in ALL if c.cluster == 2]
    slots = kw.get("slots")
    m, n, k = args[:3]
    extra = {key: kw[key] for key in ("groups", "boundaries", "sms") if key in kw}

    def t(c):
        return G.estimate_cycles(c, m, n, k, extra.get("groups", 1), extra.get("sms", 132),
                                 extra.get("boundaries", 0), slots(c) if slots and c.cluster > 1 else None)
    wins = min(t(c) for c in pairs) < G.MULTICAST_GAIN * t(single) and extra.get("sms", 132) >= 4
    return (choice.cluster == 2) == wins and (wins or choice == single)


def test_multicast_heuristic():
    # The per-SM L2 port bounds the large shapes (model v0.2): the two CTAs of a pair still each
    # receive A and the whole B per K block, so pairs model no faster than cluster 1 there (the
    # H200 measured them 2-6 % slower, docs/results.md); the heuristic keeps cluster 1.
    for args, kw in [((4096, 7168, 16384), {}), ((4096, 2112, 7168), {}), ((32768, 4096, 7168), dict(boundaries=3)),
                     ((1024, 4096, 7168), dict(groups=8))]:
        assert G.choose_config(*args, candidates=ALL, **kw).cluster == 1, args
        assert _multicast_rule_holds(args, kw), args
    for args in [(128, 7168, 16384), (64, 2112, 7168), (128, 4096, 7168), (256, 256, 512)]:
        assert G.choose_config(*args, candidates=ALL).cluster == 1, args
    # the L2 bound counts B once per pair: where it binds (10 000 SMs, one wave) the pair is faster
    m, n, k = 4096, 7168, 16384
    assert (G.estimate_cycles(G.Config(128, 160, 2), m, n, k, 1, 10000)
            < G.MULTICAST_GAIN * G.estimate_cycles(G.Config(128, 160), m, n, k, 1, 10000))
    # an odd m-block count: the last pair's partner idles for a whole unit
    odd = G.estimate_cycles(G.Config(128, 128, 2), 3 * 128, 128, 1024, 1, 2)
    even = G.estimate_cycles(G.Config(128, 128, 2), 4 * 128, 128, 1024, 1, 2)
    assert odd == even


def test_heuristic_leaves_out_the_configs_measured_slower():
    assert G.NOT_AUTO <= {c.function for c in G.CONFIGS}              # names of compiled entries
    assert set(G.auto_configs()) == {c for c in G.CONFIGS if c.function not in G.NOT_AUTO}
    shapes = [(1, 2112, 7168), (64, 2112, 7168), (128, 4096, 7168), (128, 7168, 16384), (4096, 2112, 7168),
              (4096, 32768, 512), (4096, 7168, 16384), (32768, 4096, 7168)]
    for m, n, k in shapes:
        for groups in (1, 4):
            assert G.choose_config(m, n, k, groups).function not in G.NOT_AUTO, (m, n, k, groups)


def test_raster_band():
    assert G.raster_band(56, 132) == 11
    assert G.raster_band(3, 132) == 3
    assert G.raster_band(100, 1) == 1


# ------------------------------------------------------------------------ plans

def test_normal_plan_geometry_and_arguments(seed):
    m, n, k = 300, 2112, 512
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n)
    cfg = G.Config(128, 112)
    p = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg)
    assert p.module == G.MODULE and p.function == "pk_fp8_gemm_nt_m128n112"
    tiles = 3 * 19
    assert p.grid == (tiles, 1, 1) and p.block == (384, 1, 1) and p.cluster == (1, 1, 1)
    assert p.shared_bytes == cfg.smem_bytes(6)
    ta, tb, ts, to = (x.value for x in p.args[:4])
    assert [a_.ptype for a_ in p.args[:4]] == ["tensormap"] * 4
    assert ta.box == (128, 128) and ta.swizzle == 128 and ta.tensor.shape == (m, k)
    assert tb.box == (112, 128) and tb.swizzle == 128 and tb.tensor.shape == (n, k)
    # A scales: row-major sfa [m, k/128] copied to the column-major TMA-aligned layout
    # [1, k/128, m] (m padded to 4 floats), one box = the 128 rows of one K block
    assert ts.box == (1, 1, 128) and ts.swizzle == 0 and ts.tensor.shape == (1, k // 128, m)
    assert ts.tensor.stride() == (4 * 300, 300, 1) and torch.equal(ts.tensor[0].T, sfa)
    assert ts.image().dims == (m, k // 128, 1)                        # rows past m: zero fill
    assert ta.box_bytes() + tb.box_bytes() + ts.box_bytes() == (128 + 112) * 128 + 512  # expect_tx
    assert to.box == (64, 16) and to.swizzle == 32 and to.tensor.shape == (m, n)   # TMA store boxes
    assert to.tensor.data_ptr() == out.data_ptr()
    img = ta.image()
    assert img.dims == (k, m) and img.box == (128, 128) and img.strides_bytes == (1, k)
    assert [x.ptype for x in p.args[4:7]] == ["ptr", "ptr", "u64"]   # no grouping tensor
    assert p.args[4].value is sfb and p.args[5].value is out
    assert [x.value for x in p.args[6:-4]] == [0, m, n, k, 1, G.KIND_NORMAL, 6, 7]
    assert G.arg(p, "sfd") == 0                           # no e4m3 out
    assert G.arg(p, "splits") == 1                        # the whole K per tile (split-K: *_splitk entries)
    assert G.arg(p, "record") is device_errors.record_for(out.device, "fp8_gemm_nt")   # the device's record
    assert G.arg(p, "tmap_sfb") is ts                    # 128x128 B scales: the 1x128 map unused (sfa's)
    # grid: at most one CTA per SM (persistent)
    big = G.gemm_plan(a, sfa, b, sfb, out, None, kind=0, m=m, n=n, k=k, groups=1, cfg=cfg, sms=10)
    assert big.grid == (10, 1, 1) and big.args[13].value == 3


def test_multicast_plans(seed):
    m, n, k = 300, 2112, 512
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    cfg = G.Config(128, 160, cluster=2)
    p = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg)
    assert p.function == "pk_fp8_gemm_nt_m128n160_mc2" and p.cluster == (2, 1, 1) and p.block == (384, 1, 1)
    units = 2 * 14                                   # pairs of m-blocks (3 m-blocks: 2 pairs) x n-blocks
    assert p.grid == (2 * units, 1, 1)
    assert p.shared_bytes == G.Config(128, 160).smem_bytes(5) == cfg.smem_bytes(cfg.max_stages())
    tb = p.args[1].value
    assert tb.box == (80, 128) and tb.swizzle == 128                # each CTA loads half of B
    assert p.args[0].value.box == (128, 128)
    assert p.args[13].value == G.raster_band(14, 2 * units)
    # persistent: one cluster per 2 SMs, an even grid also for an odd SM count
    for sms, grid in [(10, 10), (11, 10), (3, 2), (1, 2)]:
        q = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=0, m=m, n=n, k=k, groups=1, cfg=cfg, sms=sms)
        assert q.grid == (grid, 1, 1), sms
    # at most the clusters the GPU holds at once (max_clusters, from the driver on a GPU)
    for clusters, grid in [(3, 6), (1, 2), (100, 2 * units)]:
        q = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=0, m=m, n=n, k=k, groups=1, cfg=cfg,
                        max_clusters=clusters)
        assert q.grid == (grid, 1, 1), clusters
    assert G.resident_clusters(cfg, 5, a.device, 132) == 66       # CPU tensors: #SMs / 2
    # masked: units of the largest group (m_max) in every group, an upper bound
    groups, m_max = 3, 129
    b3, sfb3 = quantized_weights(groups, 256, k)
    a3, sfa3 = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    q = G.gemm_plan(a3, sfa3.view(groups, m_max, -1), b3.reshape(-1, k), sfb3, nan_bf16(groups, m_max, 256),
                    torch.tensor([1, 2, 3], dtype=torch.int32), kind=G.KIND_MASKED, m=m_max, n=256, k=k,
                    groups=groups, cfg=G.Config(128, 128, cluster=2))
    assert q.grid == (2 * groups * 1 * 2, 1, 1) and q.args[1].value.box == (64, 128)


def test_masked_expected_m_reaches_the_heuristic(monkeypatch, seed):
    # pk.m_grouped_fp8_gemm_nt_masked(..., expected_m) -> torch op -> backend -> gemm_plan
    groups, m_max, n, k = 1, 256, 4096, 128
    b, sfb = quantized_weights(groups, n, k)
    a, sfa = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    a, sfa = a.view(groups, m_max, k), sfa.view(groups, m_max, -1)
    masked = torch.tensor([m_max], dtype=torch.int32)
    seen = []
    monkeypatch.setattr(G, "_run", lambda plan, executor: seen.append(plan.function))
    for expected in (8, 256):
        pk.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), nan_bf16(groups, m_max, n), masked, expected,
                                        backend="emu")
    assert seen == [G.choose_config(8, n, k, groups).function, G.choose_config(256, n, k, groups).function]
    assert seen[0] != seen[1]


def test_column_major_sfa_is_read_in_place(seed):
    m, n, k = 129, 256, 384
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    col = pk.get_col_major_tma_aligned_tensor(sfa)
    assert col.stride() == (1, 132)
    p = G.gemm_plan(a, col, b, sfb, nan_bf16(m, n), None, kind=0, m=m, n=n, k=k, groups=1)
    ts = p.args[2].value
    assert ts.tensor.data_ptr() == col.data_ptr()                      # a view, no copy
    assert ts.tensor.shape == (1, k // 128, m) and ts.tensor.stride()[1:] == (132, 1)
    # a row-major sfa is copied into that layout, with the same values
    t2 = G.sfa_tma_aligned(sfa)
    assert t2.data_ptr() != sfa.data_ptr() and t2.stride()[1:] == (132, 1) and torch.equal(t2[0].T, sfa)


def test_grouped_plans(seed):
    groups, n, k = 3, 384, 256
    b, sfb = quantized_weights(groups, n, k)
    idx = contiguous_indices([5, 0, 130])
    a, sfa = R.per_token_cast_to_fp8(torch.randn(idx.numel(), k))
    p = G.gemm_plan(a, sfa, b.reshape(groups * n, k), sfb, nan_bf16(idx.numel(), n), idx,
                    kind=G.KIND_CONTIGUOUS, m=idx.numel(), n=n, k=k, groups=groups)
    assert p.args[6].ptype == "ptr" and p.args[6].value is idx
    assert p.args[1].value.tensor.shape == (groups * n, k)
    assert [x.value for x in p.args[7:12]] == [384, n, k, groups, G.KIND_CONTIGUOUS]
    m_max = 129
    a3, sfa3 = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    masked = torch.tensor([0, 129, 37], dtype=torch.int32)
    cfg = G.Config(64, 128)
    p = G.gemm_plan(a3, sfa3.view(groups, m_max, 2), b.reshape(groups * n, k), sfb, nan_bf16(groups, m_max, n),
                    masked, kind=G.KIND_MASKED, m=m_max, n=n, k=k, groups=groups, cfg=cfg)
    assert p.grid == (groups * 3 * 3, 1, 1) and p.block == (256, 1, 1)    # upper bound of the tiles
    assert p.args[0].value.tensor.shape == (groups * m_max, k) and p.args[0].value.box == (64, 128)
    assert p.args[3].value.tensor.shape == (groups * m_max, n)           # out flattened over groups
    assert p.args[6].value is masked
    assert [x.value for x in p.args[7:12]] == [m_max, n, k, groups, G.KIND_MASKED]
    ts = p.args[2].value                                                 # A scales per group
    assert ts.tensor.shape == (groups, 2, m_max) and ts.tensor.stride() == (2 * 132, 132, 1)
    assert torch.equal(ts.tensor.transpose(1, 2), sfa3.view(groups, m_max, 2))


def test_unsupported_shapes_raise_clear_errors():
    a, sfa = R.per_token_cast_to_fp8(torch.randn(8, 128))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(100, 128))
    with pytest.raises(ValueError, match="n: the cuda FP8 GEMM needs N to be a multiple of 8.*got 100"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), nan_bf16(8, 100), backend="emu")
    with pytest.raises(ValueError, match="k: expected a multiple of 16 .*got 200"):
        G.check_shapes(8, 128, 200, 8, 1)
    with pytest.raises(ValueError, match="TMA coordinates are 32-bit"):
        G.check_shapes(8, 128, 128, 2**31, 1)
    with pytest.raises(ValueError, match="TMA coordinates are 32-bit"):
        G.check_shapes(8, 2**20, 128, 8, 2**11)
    # the public API rejects what the kernel cannot take before any backend runs
    b2, sfb2 = R.per_block_cast_to_fp8(torch.randn(128, 256))
    with pytest.raises(ValueError, match="b: expected K = 128"):
        pk.fp8_gemm_nt((a, sfa), (b2, sfb2), nan_bf16(8, 128), backend="emu")
    a3, sfa3 = R.per_token_cast_to_fp8(torch.randn(8, 256))
    with pytest.raises(ValueError, match="sfb: expected a contiguous"):
        pk.fp8_gemm_nt((a3, sfa3), (b2, torch.randn(1, 4)[:, ::2]), nan_bf16(8, 128), backend="emu")
    with pytest.raises(ValueError, match="sfa: expected row-major contiguous scales or column-major"):
        pk.fp8_gemm_nt((a3, torch.randn(8, 4)[:, ::2]), (b2, sfb2), nan_bf16(8, 128), backend="emu")


def test_plan_errors():
    m, n, k = 64, 128, 128
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n)
    with pytest.raises(ValueError, match="stages: 20 stages of .* need .* bytes of shared memory"):
        G.gemm_plan(a, sfa, b, sfb, out, None, kind=0, m=m, n=n, k=k, groups=1, cfg=G.Config(128, 128), stages=20)
    flat = torch.empty(m * k + 1, dtype=torch.float8_e4m3fn)
    shifted = flat[1:].view(m, k)                                # data pointer not 16-byte aligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        G.gemm_plan(shifted, sfa, b, sfb, out, None, kind=0, m=m, n=n, k=k, groups=1)


def test_backend_registration_and_device_errors():
    from pykernels import registry
    for op in ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"):
        assert {"cuda", "emu", "triton", "reference"} <= set(registry.get(op).backends)
    a, sfa = R.per_token_cast_to_fp8(torch.randn(8, 128))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(128, 128))
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run .*runs on GPU tensors, got cpu tensors"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), nan_bf16(8, 128), backend="cuda")


def test_cuda_executor_without_gpu_raises_clearly():
    if gpu_unavailable_reason() == "":
        pytest.skip("a GPU is present: the error path cannot be exercised")
    _, _, a, sfa, b, sfb = normal_problem(8, 128, 128)
    plan = G.gemm_plan(a, sfa, b, sfb, nan_bf16(8, 128), None, kind=0, m=8, n=128, k=128, groups=1)
    with pytest.raises(RuntimeError, match="'cuda' backend needs an NVIDIA GPU"):
        run_cuda(plan)


def test_k_zero_writes_zeros_to_owned_rows_only():
    # K = 0 needs no kernel: owned rows are 0, the others untouched (no launch, no sync)
    a, sfa = torch.empty(5, 0, dtype=torch.float8_e4m3fn), torch.empty(5, 0)
    b, sfb = torch.empty(2, 128, 0, dtype=torch.float8_e4m3fn), torch.empty(2, 1, 0)
    idx = torch.tensor([0, -1, 1, 1, -1], dtype=torch.int32)
    out = nan_bf16(5, 128)
    pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend="emu")
    assert (out[idx >= 0] == 0).all() and out[idx < 0].isnan().all()
    out3 = nan_bf16(2, 5, 128)
    a3, sfa3 = torch.empty(2, 5, 0, dtype=torch.float8_e4m3fn), torch.empty(2, 5, 0)
    pk.m_grouped_fp8_gemm_nt_masked((a3, sfa3), (b, sfb), out3, torch.tensor([2, 0], dtype=torch.int32), 2,
                                    backend="emu")
    assert (out3[0, :2] == 0).all() and out3[0, 2:].isnan().all() and out3[1].isnan().all()
    out2 = nan_bf16(5, 128)
    pk.fp8_gemm_nt((a, sfa), (b[0], sfb[0]), out2, backend="emu")
    assert (out2 == 0).all()


def test_misaligned_out_goes_through_an_aligned_copy():
    flat = torch.full((4 * 8 + 1,), 7.0, dtype=torch.bfloat16)
    out = flat[1:].view(4, 8)
    assert out.data_ptr() % 16
    seen = []

    def fill(o):
        seen.append(o.data_ptr() % 16)
        o[1] = 1.0
    assert G._with_aligned(out, fill) is out
    assert seen == [0] and (out[1] == 1).all() and (out[0] == 7).all()


# ------------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (129, 384, 512), (300, 256, 128), (4096, 2112, 7168)])
def test_cuda_normal_matches_reference(m, n, k, seed):
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n).cuda()
    pk.fp8_gemm_nt((a.cuda(), sfa.cuda()), (b.cuda(), sfb.cuda()), out, backend="cuda")
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    # tolerance 1e-3 (DeepGEMM's); Hopper's fp8 wgmma accumulates with reduced precision
    assert not out.isnan().any() and calc_diff(out.cpu(), ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("k", [576, 7168])
def test_cuda_other_outputs_match_reference(k, seed):
    # K not a multiple of 128, float32 d = c + A B^T, the weight-gradient GEMM (1x128 B
    # scales, d += A B^T), e4m3 d with its scales (quantize-on-store); tolerance 1e-3
    m, n = 257, 384
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    b1, sfb1 = R.per_token_cast_to_fp8(torch.randn(n, k))
    c = torch.randn(m, n)
    ga, gb, gb1 = (a.cuda(), sfa.cuda()), (b.cuda(), sfb.cuda()), (b1.cuda(), sfb1.cuda())
    out = nan_bf16(m, n).cuda()
    pk.fp8_gemm_nt(ga, gb, out, backend="cuda")
    assert calc_diff(out.cpu(), R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3
    d = torch.full((m, n), float("nan"), device="cuda")
    pk.fp8_gemm_nt(ga, gb, d, c=c.cuda(), backend="cuda")
    assert calc_diff(d.cpu(), R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n), c=c)) < 1e-3
    d = c.cuda()
    pk.wgrad_gemm_fp8_fp8_fp32_nt(ga, gb1, d, backend="cuda")
    assert calc_diff(d.cpu(), R.fp8_gemm_nt(a, sfa, b1, sfb1, torch.empty(m, n), c=c, b_scale_rows=1)) < 1e-3
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device="cuda")
    sfd = torch.full((m, 3), float("nan"), device="cuda")
    pk.fp8_gemm_nt(ga, gb, (q, sfd), backend="cuda")
    assert calc_diff(R.dequantize_per_token(q.cpu(), sfd.cpu()), R.fp8_gemm_nt(a, sfa, b, sfb).float()) < 1e-3


@pytest.mark.gpu
def test_cuda_grouped_match_reference(seed):
    groups, n, k = 4, 256, 512
    b, sfb = quantized_weights(groups, n, k)
    idx = contiguous_indices([5, 0, 130, 64])
    a, sfa = R.per_token_cast_to_fp8(torch.randn(idx.numel(), k))
    out = nan_bf16(idx.numel(), n).cuda()
    pk.m_grouped_fp8_gemm_nt_contiguous((a.cuda(), sfa.cuda()), (b.cuda(), sfb.cuda()), out, idx.cuda(),
                                        backend="cuda")
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
    own = idx >= 0
    assert out.cpu()[~own].isnan().all() and calc_diff(out.cpu()[own], ref[own]) < 1e-3
    m_max = 129
    a3, sfa3 = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    a3, sfa3 = a3.view(groups, m_max, k), sfa3.view(groups, m_max, -1)
    masked = torch.tensor([0, 129, 37, 1], dtype=torch.int32)
    out3 = nan_bf16(groups, m_max, n).cuda()
    pk.m_grouped_fp8_gemm_nt_masked((a3.cuda(), sfa3.cuda()), (b.cuda(), sfb.cuda()), out3, masked.cuda(), 64,
                                    backend="cuda")
    ref3 = R.m_grouped_fp8_gemm_nt_masked(a3, sfa3, b, sfb, masked, nan_bf16(groups, m_max, n))
    own3 = torch.arange(m_max)[None, :] < masked[:, None]
    assert out3.cpu()[~own3].isnan().all() and calc_diff(out3.cpu()[own3], ref3[own3]) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_cuda_resident_clusters(cfg):
    # the driver's count of co-resident 2-CTA clusters bounds the persistent grid
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = G.num_sms(dev)
    n = G.resident_clusters(cfg, cfg.max_stages(), dev, sms)
    assert 1 <= n <= sms // 2
    a = torch.zeros(4096, 512, dtype=torch.float8_e4m3fn, device=dev)
    sfa = torch.ones(4096, 4, device=dev)
    b = torch.zeros(2112, 512, dtype=torch.float8_e4m3fn, device=dev)
    sfb = torch.ones(1, 17, 4, device=dev)
    p = G.gemm_plan(a, sfa, b, sfb, torch.empty(4096, 2112, dtype=torch.bfloat16, device=dev), None, kind=0,
                    m=4096, n=2112, k=512, groups=1, cfg=cfg)
    assert p.grid[0] == 2 * n


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", MULTICAST, ids=MC_IDS)
def test_cuda_multicast_matches_reference(cfg, seed):
    # clusters of 2 sharing B by TMA multicast, forced: odd m-block count (a partner-less
    # last pair), contiguous pairs with two groups and -1 rows, masked 0 / partial / full
    m, n, k = 300, 2112, 1024
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n).cuda()
    run_cuda(G.gemm_plan(a.cuda(), sfa.cuda(), b.cuda(), sfb.cuda(), out, None, kind=G.KIND_NORMAL, m=m, n=n,
                         k=k, groups=1, cfg=cfg))
    assert not out.isnan().any() and calc_diff(out.cpu(), R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3
    groups, n = 4, 256
    bg, sfbg = quantized_weights(groups, n, k)
    idx = contiguous_indices([5, 0, 130, 64])
    a2, sfa2 = R.per_token_cast_to_fp8(torch.randn(idx.numel(), k))
    out2 = nan_bf16(idx.numel(), n).cuda()
    run_cuda(G.gemm_plan(a2.cuda(), sfa2.cuda(), bg.reshape(-1, k).cuda(), sfbg.cuda(), out2, idx.cuda(),
                         kind=G.KIND_CONTIGUOUS, m=idx.numel(), n=n, k=k, groups=groups, cfg=cfg))
    ref2 = R.m_grouped_fp8_gemm_nt_contiguous(a2, sfa2, bg, sfbg, idx, nan_bf16(idx.numel(), n))
    own = idx >= 0
    assert out2.cpu()[~own].isnan().all() and calc_diff(out2.cpu()[own], ref2[own]) < 1e-3
    m_max = 300
    a3, sfa3 = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    masked = torch.tensor([0, 130, m_max, 37], dtype=torch.int32)
    out3 = nan_bf16(groups, m_max, n).cuda()
    run_cuda(G.gemm_plan(a3.cuda(), sfa3.view(groups, m_max, -1).cuda(), bg.reshape(-1, k).cuda(), sfbg.cuda(),
                         out3, masked.cuda(), kind=G.KIND_MASKED, m=m_max, n=n, k=k, groups=groups, cfg=cfg))
    ref3 = R.m_grouped_fp8_gemm_nt_masked(a3.view(groups, m_max, k), sfa3.view(groups, m_max, -1), bg, sfbg,
                                          masked, nan_bf16(groups, m_max, n))
    own3 = torch.arange(m_max)[None, :] < masked[:, None]
    assert out3.cpu()[~own3].isnan().all() and calc_diff(out3.cpu()[own3], ref3[own3]) < 1e-3


# ------------------------------------------------------------------------ resident A (*_ares)

@pytest.mark.parametrize("cfg", ARES, ids=lambda c: c.function.removeprefix("pk_fp8_gemm_nt_"))
def test_resident_a_sass_and_resources(cfg):
    # the streamed entry's K loop (4 QGMMA per issue site) and epilogue; the producer's TMA loads:
    # A and its scales in the resident loop (once per m-block), B in the ring; no local memory
    listing = _sass_of(cfg.function)
    ops = sass.opcodes(listing)
    assert len(re.findall(_qgmma(cfg), listing)) == 4 * _issue_sites(cfg)
    # (ptxas unrolls the resident loop: each copy loads an A box with its scale box)
    assert ops["UTMALDG.3D"] == ops["UTMALDG.2D"] - 1 >= 1 and ops["UTMASTG.2D"] >= 1
    assert ops["ATOMG.E.CAS.STRONG.GPU"] == 2 and ops["BPT.TRAP"] >= 2     # + the normal-layout-only trap
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS
    r = artifacts.resources(G.MODULE, cfg.function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0 and r["shared_bytes"] == 0
    assert PRODUCER_REGS <= r["registers"] < MATH_REGS


def test_resident_a_shared_memory_and_rule():
    # 1024 slack + K blocks x (A 128 x 128 + 512 B of scales) + stages x B + staging + barriers (+ A's two)
    c = G.Config(128, 160, a_resident=True)
    assert c.smem_bytes(5, 512) == 1024 + 4 * (16384 + 512) + 5 * 20480 + 2 * 64 * 320 + 80 + 16 == 212064
    assert c.max_stages(512) == 5 and c.max_stages(1024) == 2
    plain = G.Config(128, 160)
    assert G.resident_twin(plain, 4096, 32768, 512, 132) == c
    assert G.resident_twin(plain, 4096, 32768, 1024, 132) is None          # 8 K blocks: < MIN_STAGES of B
    assert G.resident_twin(plain, 4096, 7168, 7168, 132) is None           # A does not fit
    assert G.resident_twin(plain, 256, 1280, 512, 132) is None             # one unit per CTA: no reuse
    assert G.resident_twin(G.Config(128, 128), 4096, 32768, 512, 132) is None   # no *_ares entry


def test_resident_a_heuristic_and_plan(seed):
    # 4096 x 32768 x 512 (docs/gemm.md): model v0.2 (H800) has m128n160 with resident A at 974
    # TFLOP/s against 878 for 256 x 144 (DeepGEMM 877); the normal-layout heuristic costs the
    # twin (estimate_cycles normal=True) and the plan launches it. Grouped layouts never.
    m, n, k = 4096, 32768, 512
    cfg, splits = G.choose_split_k(m, n, k, 132)
    assert (cfg.block_m, cfg.block_n, splits) == (128, 160, 1) and not cfg.a_resident
    assert G.choose_config(m, n, k, 1, 132) == G.Config(256, 144)          # streamed costs only
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    sfa, sfb = torch.ones(m, k // 128), torch.ones(1, n // 128, k // 128)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    p = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, sms=132)
    assert p.function == "pk_fp8_gemm_nt_m128n160_ares" and p.grid == (132, 1, 1)
    assert p.shared_bytes == G.Config(128, 160, a_resident=True).smem_bytes(5, k) <= SMEM_PER_BLOCK
    q = G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg, sms=132,
                    resident_a=False)
    assert q.function == "pk_fp8_gemm_nt_m128n160"
    with pytest.raises(ValueError, match="resident_a"):
        G.gemm_plan(a, sfa, b, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=G.Config(256, 144),
                    sms=132, resident_a=True)
    # 10 units on 8 SMs: runs of 2 on 5 CTAs (a CTA without a run would wait for a first stage forever)
    small = G.gemm_plan(a[:128], sfa[:128], b[:1600], sfb[:, :13], out[:128, :1600], None, kind=G.KIND_NORMAL,
                        m=128, n=1600, k=k, groups=1, cfg=G.Config(128, 160), sms=8)
    assert small.function == "pk_fp8_gemm_nt_m128n160_ares" and small.grid == (5, 1, 1)
    idx = torch.zeros(m, dtype=torch.int32)
    with pytest.raises(ValueError, match="resident A"):
        G.gemm_plan(a, sfa, b.view(1, n, k).reshape(n, k), sfb, out, idx, kind=G.KIND_CONTIGUOUS, m=m, n=n, k=k,
                    groups=1, cfg=G.Config(128, 160, a_resident=True), sms=132)
