"""The narrow MLA decode kernel (csrc/mla/decode_narrow.cu; host side pykernels/cuda/mla.py:
narrow_decode_plan, picked by plan_decode for s_q * h_q / h_kv <= 32 query rows per KV head):
what was compiled (SASS, ptxas resources), the dispatch and launch plans, and the same
kernel's PTX on the emulator (backend "emu", memory-ordering checker on, tests/conftest.py)
against the float32 reference, bf16 and FP8 caches, under every emulator schedule. GPU runs of
the same cases are marked `gpu` (not run yet: no GPU here).

Tolerances (emu vs pykernels.reference, per sequence), those of tests/test_mla_cuda.py:
- calc_diff(out) < 1e-5: P is rounded to bf16 for O^T = V^T P^T (2^-9 relative per weight)
  and out to bf16; measured 2.2e-6 to 2.7e-6 (0 for a sequence with one key).
- softmax_lse max abs error < 1e-4 (float32 S and row sums; ex2 / lg2 approximate to
  ~1e-7 relative); measured <= 1e-6.
- identical +inf rows (no visible key), out exactly 0 there, nothing left NaN in the
  NaN-poisoned out, lse and split scratch; cache slots past each seqlen and pages not in use
  are NaN (FP8: NaN bytes, scales and RoPE), which the kernel must mask or zero.
The FP8 cache is compared with the reference on the same FP8 cache (float32 dequantization):
the kernel's e4m3 * scale -> bf16 is exact for the quantizer's power-of-two scales, so the
tolerances are the bf16 cache's.
"""
import re

import pytest
import torch

import pykernels.mla as M
import pykernels.mla_schedule as MS
from pykernels.cuda import mla as CM
from pykernels.emu.launch import SCHEDULES
from pykernels.runtime import artifacts, device_errors, sass
from pykernels.runtime.executors import gpu_unavailable_reason, run_emu

from .mla_cases import PAGE, check_decode, make_problem, poisoned
from .mla_cases import cdiv as _cdiv

REGISTER_FILE = 65536
FUNCTIONS = [CM.narrow_function(n, fp8) for fp8 in (False, True) for n in (16, 32)]


# ------------------------------------------------------------------------ compiled code

def _sass_of(function: str) -> str:
    for p in re.split(r"\n\s*Function : ", sass.sass(CM.NARROW_MODULE))[1:]:
        if p.split()[0] == function:
            return p
    raise AssertionError(f"{function} not in the SASS of {CM.NARROW_MODULE}")


def test_all_kernels_are_compiled():
    sparse = {CM.narrow_function(n, True, sparse=True) for n in (16, 32)}   # tests/test_dsa_sparse_narrow.py
    assert set(artifacts.manifest()["kernels"][CM.NARROW_MODULE]["functions"]) == set(FUNCTIONS) | sparse


@pytest.mark.parametrize("function", FUNCTIONS)
def test_sass_has_the_intended_instructions(function):
    listing = _sass_of(function)
    ops = sass.opcodes(listing)
    n = 16 if function.endswith("n16") else 32
    fp8 = "_fp8_" in function
    # only wgmma m64nNk16 with the query rows as N: per block S^T (9 chunks x 4 k16 steps) and
    # O^T (8 value tiles x 4 k16 steps); FP8: S^T inlined at the piece's first page and during
    # P V, each for full and partial pages (4 x 36)
    shapes = set(re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32\.BF16", listing))
    assert shapes == {f"64x{n}x16"}
    assert len(re.findall(r"HGMMA\.", listing)) == (4 * 36 + 32 if fp8 else 36 + 32)
    assert ops["UTMALDG.3D"] == 9 + (1 if fp8 else 0)               # Q: 9 boxes; FP8: a page per box
    assert ops.get("UTMALDG.2D", 0) == (0 if fp8 else 9)           # bf16: a K block in 9 boxes
    if fp8:
        assert any(op.startswith("F2FP.F16.E4M3.UNPACK_B") for op in ops)   # cvt.rn.f16x2.e4m3x2
        assert any(op.startswith("STS.128") for op in ops)                  # the swizzled K block
    assert any(op.startswith("SYNCS.PHASECHK") for op in ops) and any(op.startswith("BAR.SYNC") for op in ops)
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_resources_within_budget(function):
    r = artifacts.resources(CM.NARROW_MODULE, function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert r["shared_bytes"] == 0                                   # all shared memory is dynamic
    assert r["registers"] <= 255 and r["registers"] * CM.NARROW_THREADS <= REGISTER_FILE


def test_ptxas_keeps_the_wgmmas_asynchronous():
    # ptxas C7515 ("wgmma.mma_async instructions are serialized ...") appears when a wgmma's
    # accumulators are defined by other instructions while it is in flight, e.g. their
    # loop-carried copies when S^T or O^T stays in flight across the block loop's back edge
    log = artifacts.KERNEL_DIR / f"{CM.NARROW_MODULE}.log"      # ptxas -v output of the build
    text = log.read_text()
    assert all(f"Function properties for {f}" in text for f in FUNCTIONS)
    assert "C7515" not in text and "serialized" not in text


def test_shared_memory_plan():
    # Q (9 chunks of N x 128 B) + bf16: 2 K stages | FP8: 1 bf16 K block + 3 (N 16) or 2 raw
    # pages + P (N x 128 B) + row maxima (2 x 4 x N f32) + row sums (4 x N f32) + 2 mbarriers a
    # stage + 2 + 1024 alignment slack; the values decode_narrow.cu static_asserts
    k, raw = 64 * 576 * 2, 64 * 656
    assert CM.narrow_smem_bytes(16, False) == 1024 + 9 * 2048 + 2 * k + 2048 + 768 + 48 == 169776
    assert CM.narrow_smem_bytes(32, False) == 191024
    assert CM.narrow_smem_bytes(16, True) == 1024 + 9 * 2048 + k + 3 * raw + 2048 + 768 + 64 == 222016
    assert CM.narrow_smem_bytes(32, True) == 201264
    assert all(CM.narrow_smem_bytes(n, f) <= 227 * 1024 for n in (16, 32) for f in (False, True))
    # a third bf16 stage fits for neither N; a third raw page not for N = 32
    assert CM.narrow_smem_bytes(16, False) + k > 227 * 1024
    assert CM.narrow_smem_bytes(32, True) + raw > 227 * 1024


# ------------------------------------------------------------------------ dispatch and plans

@pytest.mark.parametrize("s_q,h_q,h_kv,narrow", [(1, 16, 1, 16), (1, 32, 1, 32), (2, 16, 1, 32), (1, 24, 1, 32),
                                                  (1, 32, 2, 16), (1, 48, 1, 0), (2, 32, 1, 0), (1, 64, 1, 0),
                                                  (1, 128, 1, 0)])
def test_dispatch_picks_the_narrow_kernel_up_to_32_rows(s_q, h_q, h_kv, narrow):
    rows = s_q * h_q // h_kv
    assert CM.narrow_tile_rows(rows) == narrow
    q3 = torch.zeros(2, rows, 576, dtype=torch.bfloat16)
    for fp8 in (False, True):
        cache = torch.zeros(3, PAGE, 1, 576, dtype=torch.bfloat16)
        if fp8:
            cache = M.quantize_kv_cache_fp8(cache)
        sl = torch.tensor([100, 30], dtype=torch.int32)
        table = torch.zeros(2, 2, dtype=torch.int32)
        meta, ns = M.get_mla_metadata(sl, rows, 1, 5)
        out = torch.empty(2, s_q, h_q // h_kv, 512, dtype=torch.bfloat16)
        lse = torch.empty(2, h_q // h_kv, s_q)
        oacc, lacc = MS.split_scratch(2, 5, rows, 512, q3.device)
        record = device_errors.record_for(q3.device, CM.OP_NAME)
        plan = CM.plan_decode(q3, CM.kv_view(cache), table, sl, meta, ns, out, lse, oacc, lacc, record, s_q=s_q,
                              h_q=h_q // h_kv, scale=0.1, causal=True, num_blocks=3)
        if not narrow:
            assert plan.module == CM.MODULE
            continue
        assert plan.module == CM.NARROW_MODULE and plan.function == CM.narrow_function(narrow, fp8)
        assert plan.grid == (5, 1, 1) and plan.block == (CM.NARROW_THREADS, 1, 1)
        assert plan.shared_bytes == CM.narrow_smem_bytes(narrow, fp8)
        assert len(plan.args) == 26                                  # decode.cu's dense parameters
        tq = plan.args[0].value
        assert tq.box_bytes() == narrow * 64 * 2                     # N rows x 64 columns per Q box
        assert plan.args[1].value.box_bytes() == (64 * 656 if fp8 else 64 * 64 * 2)
    if narrow:
        with pytest.raises(ValueError, match="q: the narrow MLA kernel takes at most 32"):
            CM.narrow_decode_plan(torch.zeros(1, 33, 576, dtype=torch.bfloat16), CM.kv_view(cache), table, sl,
                                  meta, ns, out, lse, oacc, lacc, record, s_q=1, h_q=33, scale=0.1, causal=True,
                                  num_blocks=3)


# ------------------------------------------------------------------------ emulator

def _problem(seqlens, s_q, h_q, fp8, h_kv=1):
    q, cache, table, sl = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    return q, (M.quantize_kv_cache_fp8(cache) if fp8 else cache), table, sl


def _run_and_check(q, cache, table, sl, meta, ns, causal, scale=None):
    b, s_q, h_q, _ = q.shape
    out, lse = poisoned(b, s_q, h_q)
    stats = CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, scale, causal, executor="emu")
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, softmax_scale=scale, causal=causal,
                                            backend="reference")
    check_decode(out, lse, ref, ref_lse)
    return stats


# Lengths 0, 1 (< s_q), non-multiples of 64 (partial last pages) and multiples; the three
# narrow shapes (h_q 16 / 32 at s_q 1, 16 at s_q 2) and 24 rows (N = 32 with 8 padding rows);
# causal and not; split sequences (combine) and partitions holding several whole sequences.
CASES = [
    # seqlens,      s_q, h_q, causal, parts, split, fp8
    ([0, 130],       1, 16,  False, 7,  True,  False),
    ([1, 300, 64],   2, 16,  True,  6,  True,  False),
    ([127, 33],      1, 32,  True,  2,  False, False),
    ([70, 0, 400],   1, 24,  True,  4,  True,  False),
    ([0, 130],       1, 16,  True,  7,  True,  True),
    ([1, 300, 64],   2, 16,  True,  6,  True,  True),
    ([127, 33],      1, 32,  False, 2,  False, True),
    ([70, 0, 400],   1, 24,  False, 4,  True,  True),
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,fp8", CASES,
                         ids=[f"L{'-'.join(map(str, c[0]))}_sq{c[1]}_h{c[2]}{'_causal' if c[3] else ''}_p{c[4]}"
                              f"_{'fp8' if c[6] else 'bf16'}" for c in CASES])
def test_emu_matches_reference(seqlens, s_q, h_q, causal, parts, split, fp8, poisoned_scratch):
    torch.manual_seed(sum(seqlens) + 7 * s_q + h_q + fp8)
    q, cache, table, sl = _problem(seqlens, s_q, h_q, fp8)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    assert bool((ns.diff() > 1).any()) == split, "case meant to (not) exercise the combine kernel"
    decode, _ = _run_and_check(q, cache, table, sl, meta, ns, causal)
    assert decode.as_dict()["ctas"] == parts                     # one CTA per partition: no row tiles


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emu_every_schedule(schedule, fp8, seed, poisoned_scratch, monkeypatch):
    # The producer warp and the math warpgroup, and the CTAs, each running ahead as far as
    # their synchronisation allows (docs/emulator.md: schedules), with the memory-ordering
    # checker on: the K ring / raw page ring, Q across pieces, the P tile, the row-max
    # exchange (two parities) and the FP8 K block rewritten as P V's groups retire must be
    # ordered by the barriers alone. A split sequence (its last piece a partial page), an
    # empty sequence.
    q, cache, table, sl = _problem([330, 0, 70], 2, 16, fp8)
    meta, ns = M.get_mla_metadata(sl, 32, 1, 4)
    assert bool((ns.diff() > 1).any())
    monkeypatch.setattr(CM, "run_plan", lambda plan, executor: run_emu(plan, schedule=schedule))
    _run_and_check(q, cache, table, sl, meta, ns, True)


@pytest.mark.parametrize("fp8", [False, True])
def test_emu_pieces_of_one_partition(fp8, seed, poisoned_scratch):
    # One partition walks pieces of 1, 3, 1 (partial), 3 (partial), 0 and 2 blocks: the ring
    # phases, Q and the row sums are handed over between pieces (an empty one among them), and
    # the FP8 first page of each piece is converted before its loop. A custom softmax scale.
    q, cache, table, sl = _problem([64, 192, 1, 130, 0, 128], 1, 32, fp8)
    meta, ns = M.get_mla_metadata(sl, 32, 1, 1)
    assert ns.tolist() == list(range(7))                          # one partition, whole sequences
    _run_and_check(q, cache, table, sl, meta, ns, False, scale=0.05)


@pytest.mark.parametrize("fp8", [False, True])
def test_emu_long_sequence_sharp_softmax(fp8, seed, poisoned_scratch):
    # 20 blocks split over 3 partitions, q x 3 (a sharp softmax: the running max moves often)
    q, cache, table, sl = _problem([1250], 1, 16, fp8)
    meta, ns = M.get_mla_metadata(sl, 16, 1, 3)
    assert int(ns[-1]) == 3
    _run_and_check(q * 3, cache, table, sl, meta, ns, True)


def test_emu_several_kv_heads(seed, poisoned_scratch):
    # h_kv 2, h_q 32: 16 query rows per KV head, each head one narrow launch over its own
    # strided cache view (NaN in the other head's columns past each seqlen)
    q, cache, table, sl = _problem([100, 64], 1, 32, False, h_kv=2)
    meta, ns = M.get_mla_metadata(sl, 16, 2, 3)
    assert CM.narrow_tile_rows(q.shape[2] // 2) == 16        # each KV head's rows take the N 16 kernel
    _run_and_check(q, cache, table, sl, meta, ns, True)     # asserts out / lse against the reference


@pytest.mark.parametrize("fp8", [False, True])
def test_emu_counters(fp8, seed, poisoned_scratch):
    # wgmma issued: 36 (S^T) + 32 (O^T) per KV block; the KV bytes read: each block once
    # (bf16: 9 boxes of 8 KB; FP8: one 41,984-byte page) and Q once per piece; bytes written:
    # out / lse of whole sequences, the split partials of split ones
    seqlens, s_q, h_q = [256, 130], 1, 32
    q, cache, table, sl = _problem(seqlens, s_q, h_q, fp8)
    meta, ns = M.get_mla_metadata(sl, 32, 1, 6)
    assert ns.tolist() == [0, 2, 3]                               # the first sequence split in two
    decode, combine = _run_and_check(q, cache, table, sl, meta, ns, True)
    d = decode.as_dict()
    blocks = sum(_cdiv(L, PAGE) for L in seqlens)
    assert d["wgmma_issued"] == (36 + 32) * blocks
    pieces, rows = int(ns[-1]), s_q * h_q
    kv = blocks * (64 * 656 if fp8 else 9 * 8192)
    qb = pieces * rows * 576 * 2
    assert kv + qb <= d["global_bytes_read"] <= kv + qb + d["ctas"] * CM.NARROW_THREADS * 128
    splits = ns.diff().tolist()
    whole = sum(1 for n in splits if n == 1)
    split_pieces = sum(n for n in splits if n > 1)
    assert d["global_bytes_written"] == whole * rows * (512 * 2 + 4) + split_pieces * rows * (512 * 4 + 4)


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,fp8", CASES,
                         ids=[f"L{'-'.join(map(str, c[0]))}_sq{c[1]}_h{c[2]}{'_causal' if c[3] else ''}_p{c[4]}"
                              f"_{'fp8' if c[6] else 'bf16'}" for c in CASES])
def test_cuda_matches_reference(seqlens, s_q, h_q, causal, parts, split, fp8, poisoned_scratch):
    assert gpu_unavailable_reason() == ""
    torch.manual_seed(sum(seqlens) + 7 * s_q + h_q + fp8)
    q, cache, table, sl = _problem(seqlens, s_q, h_q, fp8)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    out, lse = poisoned(len(seqlens), s_q, h_q)
    dev = [t.cuda() for t in (q, cache, table, sl, meta, ns, out, lse)]
    M.flash_mla_with_kvcache(*dev[:4], 512, dev[4], dev[5], causal=causal, backend="cuda", out=dev[6],
                             softmax_lse=dev[7])
    torch.cuda.synchronize()
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal, backend="reference")
    check_decode(dev[6].cpu(), dev[7].cpu(), ref, ref_lse)
