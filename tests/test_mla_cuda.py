"""The hand-written MLA decode kernel and its combine kernel (csrc/mla/decode.cu, host side
pykernels/cuda/mla.py): what was compiled (SASS, PTX, ptxas resources), the launch plans,
correctness of the same kernel's PTX run by the emulator (backend "emu") against the
float32 reference, and the errors of the cuda/emu backends. GPU runs are marked `gpu`.

Tolerances (emu vs pykernels.reference, per sequence), the same as the Triton kernel's:
- calc_diff(out) < 1e-5. The kernel rounds P to bf16 for its P.V wgmma (relative error
  <= 2^-9 per weight) and both outputs are rounded to bf16 (2^-9 each): calc_diff of
  two independent bf16 roundings alone is ~2^-18 / 3 * 2 / 2 ~ 1.3e-6; measured 2.2e-6 to
  2.7e-6 (0 for a sequence with one key).
- softmax_lse max abs error < 1e-4: the LSE comes from the float32 S and row sums (no bf16
  rounding); the approximate ex2 / lg2 cost ~1e-7 relative; measured <= 1e-6.
- identical +inf rows (no visible key), out exactly 0 there, no NaN left in the
  NaN-poisoned out, lse and split scratch; cache slots past each seqlen and pages not in
  use are NaN (the kernel must mask and zero them, 0 * NaN = NaN in a wgmma).

FP8 cache (pk_mla_decode_fp8) vs the reference run on the same FP8 cache (which
dequantizes in float32): the same tolerances. The kernel's producer converts e4m3 * scale
to bf16, exact for the layout's power-of-two scales, so the only roundings are the bf16 path's
(P, the output); every case here has power-of-two scales (the quantizer's rule).
Against the bf16-cache result (what FP8 storage costs, dominated by the e4m3 quantization
of the keys and values, 2^-4 relative per element): calc_diff(out) < 2e-3, and the kernel's
deviation from the bf16 result no larger than the reference's own (same FP8 cache in
float32) plus 1e-4 (calc_diff) and 1e-3 (LSE); the reference's LSE deviation reaches 0.06
on these cases.
"""
import math
import re

import pytest
import torch

import pykernels.mla as M
from pykernels.cuda import mla as CM
from pykernels.emu.parser import parse
from pykernels.metrics import calc_diff
from pykernels.runtime import artifacts, sass
from pykernels.runtime.executors import gpu_unavailable_reason, run_emu

from .mla_cases import OUT_CALC_DIFF, PAGE, check_decode, make_problem, poisoned
from .mla_cases import cdiv as _cdiv

PRODUCER_REGS, MATH_REGS = 40, 232       # setmaxnreg targets in decode.cu (bf16 cache)
CONV_REGS, MATH_REGS_FP8 = 72, 216        # the FP8 cache's (its producer warpgroup converts)
REGISTER_FILE = 65536


def _sass_of(function: str) -> str:
    parts = re.split(r"\n\s*Function : ", sass.sass(CM.MODULE))
    for p in parts[1:]:
        if p.split()[0] == function:
            return p
    raise AssertionError(f"{function} not in the SASS of {CM.MODULE}")


# ------------------------------------------------------------------------ compiled code

def test_all_kernels_are_compiled():
    funcs = artifacts.manifest()["kernels"][CM.MODULE]["functions"]
    # decode for the bf16 cache, for the FP8 cache, combine; and the sparse decode over the
    # FP8 cache with its combine (attn_sink), and the sparse prefill over bf16 rows, launched by
    # pykernels/cuda/dsa.py
    assert set(funcs) == {CM.DECODE_FUNCTION, CM.DECODE_FUNCTION_FP8, CM.COMBINE_FUNCTION,
                          "pk_mla_sparse_decode_fp8", "pk_mla_combine_sink", "pk_mla_sparse_prefill_bf16"}


def test_decode_sass_has_the_intended_instructions():
    listing = _sass_of(CM.DECODE_FUNCTION)
    ops = sass.opcodes(listing)
    # the seesaw: per own KV block 36 Q.K^T (9 chunks x 4 k16 steps, N = 64 keys) and 4 P.V
    # with P in registers (k16 steps over 64 keys, N = 256 columns); per partner block 4 P.V
    # with P from shared memory, written twice (inside the block loop and after it)
    assert len(re.findall(r"HGMMA\.64x64x16\.F32\.BF16", listing)) == 36
    assert not re.search(r"HGMMA\.64x32x16", listing)
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc", listing)) == 4
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc", listing)) == 8
    assert ops["UTMALDG.3D"] == 9 and ops["UTMALDG.2D"] == 9        # Q tile, K block: 9 boxes each
    assert ops["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1 and ops["USETMAXREG.DEALLOC.CTAPOOL"] == 1
    assert any(op.startswith("SYNCS.PHASECHK") for op in ops)       # mbarrier waits
    assert any(op.startswith("SYNCS.ARRIVE.TRANS64") for op in ops)  # arrive / expect_tx
    assert ops["WARPGROUP.ARRIVE"] >= 2 and any(op.startswith("WARPGROUP.DEPBAR") for op in ops)
    assert ops["MUFU.EX2"] >= 34                                    # 32 P + 2 alpha per own block
    assert any(op.startswith("BAR.SYNC") for op in ops)             # named barriers of the math warpgroups
    assert any(op.startswith("BAR.ARV") for op in ops)              # P and the max published (bar.arrive)
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    # ptxas reports the entry count (168); the math region may use up to its setmaxnreg 232
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS


@pytest.mark.parametrize("function", [CM.DECODE_FUNCTION_FP8, "pk_mla_sparse_decode_fp8"])
def test_decode_fp8_sass_has_the_intended_instructions(function):
    listing = _sass_of(function)
    ops = sass.opcodes(listing)
    # the bf16 cache's seesaw (the producer converts into the same bf16 K ring): 36 Q.K^T per
    # own block, 4 P.V with P in registers, 8 with P from shared memory
    assert len(re.findall(r"HGMMA\.64x64x16\.F32\.BF16", listing)) == 36
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc", listing)) == 4
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc", listing)) == 8
    assert not re.search(r"HGMMA\.64x(32|128)x16", listing)
    assert ops["UTMALDG.3D"] == 9 and "UTMALDG.2D" not in ops      # the Q tile only: the rows are loaded
    assert any(op.startswith("LDG.E.128.CONSTANT") for op in ops)   # 16-byte row loads (ld.global.nc)
    assert any(op.startswith("PRMT") for op in ops)                 # the e4m3 -> bf16 bit steps
    assert any(op.startswith("HMUL2.BF16") for op in ops)           # x 2^60 x the group's factor
    assert any(op.startswith("STS.128") for op in ops)              # into the swizzled K block
    assert ops["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1 and ops["USETMAXREG.DEALLOC.CTAPOOL"] == 1
    assert any(op.startswith("SYNCS.PHASECHK") for op in ops)
    assert any(op.startswith("WARPGROUP.DEPBAR") for op in ops)
    assert any(op.startswith("BAR.SYNC") for op in ops) and any(op.startswith("BAR.ARV") for op in ops)
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS_FP8


def test_combine_sass():
    ops = sass.opcodes(_sass_of(CM.COMBINE_FUNCTION))
    assert any(op.startswith("LDG.E.128") for op in ops)            # float4 partial rows
    assert any(op.startswith("STG.E.64") for op in ops)             # 4 bf16 per store
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"


def test_resources_within_budget():
    for fn, producer, math_regs in ((CM.DECODE_FUNCTION, PRODUCER_REGS, MATH_REGS),
                                    (CM.DECODE_FUNCTION_FP8, CONV_REGS, MATH_REGS_FP8),
                                    ("pk_mla_sparse_decode_fp8", CONV_REGS, MATH_REGS_FP8)):
        r = artifacts.resources(CM.MODULE, fn)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0, fn
        assert r["shared_bytes"] == 0                               # all shared memory is dynamic
        assert producer <= r["registers"] < math_regs
        assert r["registers"] * CM.THREADS <= REGISTER_FILE
        # after setmaxnreg (the producer down, two math warpgroups up) the pool still suffices
        assert 128 * (producer + 2 * math_regs) <= r["registers"] * CM.THREADS
    c = artifacts.resources(CM.MODULE, CM.COMBINE_FUNCTION)
    assert c["spill_stores"] == 0 and c["spill_loads"] == 0 and c["stack_bytes"] == 0
    assert c["registers"] <= 64 and c["shared_bytes"] == 0


def test_shared_memory_plan():
    # Q tile + 2 K stages (64 x 576 bf16 each; a block's P goes to its RoPE chunk, no P tile)
    # + published row maxima and row sums (2 x 2 x 64 f32) + 22 mbarriers (a full barrier per
    # chunk and stage, an empty one per stage, Q full and empty) + 1024 alignment slack
    assert CM.SMEM_BYTES == 1024 + 3 * 73728 + 1024 + 8 * (2 * 9 + 2 + 2) == 223408
    assert CM.SMEM_BYTES <= 227 * 1024
    assert CM.smem_bytes(3) > 227 * 1024                            # a third stage does not fit
    # FP8: the same (the producer converts into the bf16 K ring; no raw page in shared memory,
    # which with Q and two K stages would not fit: 41,984 bytes a page)
    assert CM.SMEM_BYTES_FP8 == CM.SMEM_BYTES
    assert CM.SMEM_BYTES + 64 * 656 > 227 * 1024


def test_ptx_has_the_intended_instructions():
    mod = parse(artifacts.ptx_text(CM.MODULE))
    k = mod.kernel(CM.DECODE_FUNCTION)
    assert len(k.params) == 26
    assert [(p.size, p.align) for p in k.params[:2]] == [(128, 64)] * 2       # tensor maps
    full = [i.full for i in k.instrs]
    assert full.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == 36
    assert full.count("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16") == 12
    assert full.count("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes") == 9
    assert full.count("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes") == 9
    assert "fence.proxy.async.shared::cta" in full and "mbarrier.try_wait.parity.shared::cta.b64" in full
    assert "bar.arrive" in full and "bar.sync" in full
    assert "ex2.approx.ftz.f32" in full
    assert not any(f.startswith(("call", "ld.local", "st.local")) for f in full)
    text = artifacts.ptx_text(CM.MODULE)
    # Q.K^T: both operands K-major; P.V: B (the V block) MN-major, imm-trans-b = 1, A (P) from
    # shared memory (the partner's block) or registers (the own block: no imm-trans-a)
    assert re.search(r"m64n64k16\.f32\.bf16\.bf16 \{[^}]*\}, %rd\d+, %rd\d+, p, 1, 1, 0, 0;", text)
    assert re.search(r"m64n256k16\.f32\.bf16\.bf16 \{[^}]*\}, %rd\d+, %rd\d+, p, 1, 1, 0, 1;", text)
    assert re.search(r"m64n256k16\.f32\.bf16\.bf16 \{[^}]*\}, \{%r\d+, %r\d+, %r\d+, %r\d+\}, %rd\d+, p, 1, 1, 1;",
                     text)
    assert f"setmaxnreg.inc.sync.aligned.u32 {MATH_REGS};" in text
    assert f"setmaxnreg.dec.sync.aligned.u32 {PRODUCER_REGS};" in text
    assert len(mod.kernel(CM.COMBINE_FUNCTION).params) == 14
    for fn in (CM.DECODE_FUNCTION_FP8, "pk_mla_sparse_decode_fp8"):   # the same parameters
        k8 = mod.kernel(fn)
        assert [(p.size, p.align) for p in k8.params[:2]] == [(128, 64)] * 2
        assert len(k8.params) == 26 + CM.FP8_TAIL_ARGS
        full = [i.full for i in k8.instrs]
        assert full.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == 36
        assert full.count("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16") == 12
        assert full.count("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes") == 9
        assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" not in full
        assert "ld.global.nc.v4.u32" in full and "prmt.b32" in full and "mul.rn.bf16x2" in full
        assert "st.shared.v4.b32" in full and "fence.proxy.async.shared::cta" in full
        assert not any(f.startswith(("call", "ld.local", "st.local")) for f in full)
    assert f"setmaxnreg.inc.sync.aligned.u32 {MATH_REGS_FP8};" in text
    assert f"setmaxnreg.dec.sync.aligned.u32 {CONV_REGS};" in text


# ------------------------------------------------------------------------ problems

def _run_emu(q, cache, table, sl, meta, ns, causal, scale=None, out=None, lse=None):
    b, s_q, h_q, _ = q.shape
    if out is None:
        out, lse = poisoned(b, s_q, h_q)
    ret = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, softmax_scale=scale, causal=causal,
                                   backend="emu", out=out, softmax_lse=lse)
    assert ret[0] is out and ret[1] is lse
    return out, lse


def _reference(q, cache, table, sl, meta, ns, causal, scale=None):
    return M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, softmax_scale=scale, causal=causal,
                                    backend="reference")


# A sample of the cross product: lengths 0, 1, 2 (< s_q), multiples and non-multiples of 64;
# s_q 1..4; h_q 16, 32, 64, 128 (and 48: a 64-row tile that starts inside a token);
# sequences split over partitions (combine), partitions holding several sequences.
CASES = [
    # seqlens,   s_q, h_q, causal, parts, split, scale
    ([0, 130],    1, 16,  False, 7,  True,  None),
    ([1, 200],    2, 32,  True,  6,  True,  None),
    ([130, 2],    3, 64,  True,  7,  True,  None),   # seq 1: token 0 sees nothing; seq 0's last split: token 0 sees nothing
    ([190, 64],   4, 128, True,  7,  True,  None),   # 8 row tiles
    ([127, 0],    4, 16,  False, 2,  False, None),
    ([64, 129],   1, 128, False, 1,  False, 0.1),    # one partition, two whole sequences
    ([33, 200],   2, 48,  True,  2,  True,  None),   # a partition with a whole sequence and a split's piece;
                                                     # row tile 1 (rows 64..95) starts inside token 1
    ([200, 150],  2, 64,  False, 9,  True,  None),   # both sequences split
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,scale", CASES,
                         ids=[f"L{'-'.join(map(str, c[0]))}_sq{c[1]}_h{c[2]}{'_causal' if c[3] else ''}_p{c[4]}"
                              for c in CASES])
def test_emu_matches_reference(seqlens, s_q, h_q, causal, parts, split, scale, poisoned_scratch):
    torch.manual_seed(sum(seqlens) + 7 * s_q + h_q)
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    assert bool((ns.diff() > 1).any()) == split, "case meant to (not) exercise the combine kernel"
    out, lse = _run_emu(q, cache, table, sl, meta, ns, causal, scale)
    ref, ref_lse = _reference(q, cache, table, sl, meta, ns, causal, scale)
    check_decode(out, lse, ref, ref_lse)


def test_emu_long_sequence_sharp_softmax(poisoned_scratch):
    # 32 blocks through the 2-stage ring (16 phase flips) with q x 3 (logits ~ N(0, 9)):
    # the running max moves often, so the alpha rescaling of acc and l is exercised.
    torch.manual_seed(6)
    q, cache, table, sl = make_problem([2000, 5], 2, 16)
    q = (q.float() * 3).to(torch.bfloat16)
    meta, ns = M.get_mla_metadata(sl, 32, 1, 2)
    assert ns.tolist() == [0, 2, 3]
    out, lse = _run_emu(q, cache, table, sl, meta, ns, True)
    check_decode(out, lse, *_reference(q, cache, table, sl, meta, ns, True))


def test_emu_empty_cache():
    # every length 0 and no pages at all: out 0, lse +inf, no tensor map over an empty cache
    q = torch.randn(2, 1, 16, 576).to(torch.bfloat16)
    cache = torch.empty(0, PAGE, 1, 576, dtype=torch.bfloat16)
    table = torch.full((2, 1), -1, dtype=torch.int32)
    sl = torch.zeros(2, dtype=torch.int32)
    meta, ns = M.get_mla_metadata(sl, 16, 1, 3)
    out, lse = _run_emu(q, cache, table, sl, meta, ns, False)
    assert (out == 0).all() and (lse == math.inf).all()


def test_emu_result_independent_of_schedule(poisoned_scratch):
    torch.manual_seed(3)
    q, cache, table, sl = make_problem([250, 70], 2, 16)
    outs = []
    for parts in (1, 5, 16):
        meta, ns = M.get_mla_metadata(sl, 32, 1, parts)
        outs.append(_run_emu(q, cache, table, sl, meta, ns, True))
    ref, ref_lse = _reference(q, cache, table, sl, meta, ns, True)
    for o, l in outs:
        check_decode(o, l, ref, ref_lse)
        assert calc_diff(o, outs[0][0]) < 1e-5 and (l - outs[0][1]).abs().max() < 1e-5


def test_emu_strided_inputs_and_outputs(poisoned_scratch):
    # q with a padded head stride (read in place by TMA), q with token and head dims that
    # cannot be merged (copied), out with a row stride that is not a multiple of 4 (written
    # through a temporary), lse as a transposed view.
    torch.manual_seed(4)
    seqlens, s_q, h_q = [90, 17], 2, 32
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 4)
    ref, ref_lse = _reference(q, cache, table, sl, meta, ns, True)
    padded = torch.full((2, s_q, h_q, 640), float("nan"), dtype=torch.bfloat16)
    padded[..., :576] = q
    q_pad = padded[..., :576]
    assert CM.q_view(q_pad).data_ptr() == q_pad.data_ptr()          # no copy
    q_swapped = q.transpose(1, 2).contiguous().transpose(1, 2)      # [b, s_q, h_q] with s fastest
    assert CM.q_view(q_swapped).is_contiguous()
    out_big = torch.full((2, s_q, h_q, 514), float("nan"), dtype=torch.bfloat16)
    out = out_big[..., :512]
    lse = torch.full((2, s_q, h_q), float("nan")).transpose(1, 2)
    assert not CM._out_ok(out) and CM._lse_ok(lse)
    for qq in (q_pad, q_swapped):
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        _run_emu(qq, cache, table, sl, meta, ns, True, out=out, lse=lse)
        check_decode(out, lse, ref, ref_lse)
    assert out_big[..., 512:].isnan().all(), "wrote outside out's view"


@pytest.mark.parametrize("parts", [4, 6])      # 4: two whole sequences; 6: the first split in two
def test_emu_counters(parts, poisoned_scratch):
    # The emulator's cost counters for one shape (docs/mla.md quotes them): wgmma issued
    # = 36 + 4 (the block's owner: Q.K^T, P.V) + 4 (its partner: P.V) per (KV block, row
    # tile); every byte written is accounted for by out / lse, the split partials and the
    # combine's rows; the shared-memory accesses (P stores, zeroed stale V rows, row maxima
    # and sums) are free of bank conflicts.
    torch.manual_seed(5)
    seqlens, s_q, h_q = [256, 192], 2, 64
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    b, rows = len(seqlens), s_q * h_q
    out, lse = poisoned(b, s_q, h_q)
    decode, combine = CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, True,
                                                executor="emu")
    ref, ref_lse = _reference(q, cache, table, sl, meta, ns, True)
    check_decode(out, lse, ref, ref_lse)
    d, c = decode.as_dict(), combine.as_dict()
    tiles = _cdiv(rows, 64)
    blocks = sum(_cdiv(L, PAGE) for L in seqlens)
    assert d["wgmma_issued"] == (36 + 4 + 4) * blocks * tiles
    assert d["ctas"] == parts * tiles and c["ctas"] == b * _cdiv(rows, 4)
    splits = (ns.diff()).tolist()
    pieces = int(ns[-1])
    split_pieces = sum(n for n in splits if n > 1)
    whole = sum(1 for n in splits if n == 1)
    assert d["global_bytes_written"] == whole * rows * (512 * 2 + 4) + split_pieces * rows * (512 * 4 + 4)
    assert c["global_bytes_written"] == (b - whole) * rows * (512 * 2 + 4)
    # reads: every KV block once per row tile (9 boxes of 8 KB), q once per piece and tile;
    # the rest are metadata, lengths, num_splits and page ids, counted per thread: the input
    # checks read the row, the previous row, the seqlens and num_splits of each piece and a
    # page id per lane and 32 blocks; the decode loops read lengths and page ids again
    # (< 128 B per thread here)
    kv, qb = blocks * tiles * 9 * 8192, pieces * rows * 576 * 2
    assert kv + qb <= d["global_bytes_read"] <= kv + qb + d["ctas"] * CM.THREADS * 128
    assert d["shared_bank_conflicts"] == 0          # P tile stores and reductions (docs/mla.md)
    assert pieces == (b if parts == 4 else b + 1)


# ------------------------------------------------------------------------ FP8 cache

# What FP8 storage costs against the bf16 cache, on this file's data (make_problem): the
# kernel's deviation from the bf16 result may not exceed the reference's own deviation (the
# same FP8 cache dequantized in float32) by more than these margins; measured: calc_diff
# equal to the reference's within 1e-5, LSE within 1e-5 of the reference's error, whose
# maximum here is 0.06 (h_q = 64, 200 keys).
FP8_CALC_DIFF_VS_BF16 = 2e-3
FP8_CALC_DIFF_MARGIN = 1e-4
FP8_LSE_MARGIN = 1e-3


def make_fp8_problem(seqlens, s_q, h_q):
    """make_problem's q and bf16 cache, and that cache in the FP8 layout: the NaN slots
    (past each seqlen, pages not in use) quantize to NaN bytes (e4m3 0x7F), NaN scales and
    NaN RoPE columns, which the kernel must not let into S or P.V."""
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    return q, M.quantize_kv_cache_fp8(cache), cache, table, sl


# lengths 0, 1 (< s_q), non-multiples and multiples of 64; s_q 1-2; h_q 16 and 64; causal and
# not; split sequences (combine) and partitions holding whole sequences; float8_e4m3fn view.
FP8_CASES = [
    # seqlens,   s_q, h_q, causal, parts, split, dtype
    ([0, 130],    1, 16,  False, 7,  True,  torch.uint8),
    ([1, 200],    2, 64,  True,  6,  True,  torch.uint8),
    ([127, 64],   2, 16,  True,  2,  False, torch.float8_e4m3fn),
    ([190, 33],   1, 64,  False, 4,  False, torch.uint8),
    ([97, 64],    4, 32,  True,  3,  False, torch.uint8),          # 128 rows of 4 tokens, 2 row tiles
    ([129],       3, 128, False, 4,  True,  torch.float8_e4m3fn),  # 384 rows, a partial last block
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,dtype", FP8_CASES,
                         ids=[f"L{'-'.join(map(str, c[0]))}_sq{c[1]}_h{c[2]}{'_causal' if c[3] else ''}_p{c[4]}"
                              f"_{str(c[6]).replace('torch.', '')}" for c in FP8_CASES])
def test_emu_fp8_matches_reference(seqlens, s_q, h_q, causal, parts, split, dtype, poisoned_scratch):
    torch.manual_seed(sum(seqlens) + 7 * s_q + h_q + 1)
    q, c8, cache, table, sl = make_fp8_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    assert bool((ns.diff() > 1).any()) == split, "case meant to (not) exercise the combine kernel"
    out, lse = _run_emu(q, c8.view(dtype), table, sl, meta, ns, causal)
    ref, ref_lse = _reference(q, c8, table, sl, meta, ns, causal)
    check_decode(out, lse, ref, ref_lse)
    # what FP8 storage costs against the bf16 cache (the keys and values are quantized)
    ref16, ref16_lse = _reference(q, cache, table, sl, meta, ns, causal)
    fin = ref16_lse.isfinite()
    assert torch.equal(lse.isinf(), ref16_lse.isinf())
    assert calc_diff(out, ref16) < min(FP8_CALC_DIFF_VS_BF16, calc_diff(ref, ref16) + FP8_CALC_DIFF_MARGIN)
    lse_err, ref_lse_err = (lse[fin] - ref16_lse[fin]).abs(), (ref_lse[fin] - ref16_lse[fin]).abs()
    assert (lse_err - ref_lse_err).max() < FP8_LSE_MARGIN


@pytest.mark.parametrize("fp8,schedule,h_q", [(False, "wg_first", 16), (False, "wg_last", 16), (True, "wg_first", 16),
                                              (True, "wg_last", 16), (True, "wg_first", 32), (True, "wg_last", 32),
                                              (True, "cta_last", 32)])
def test_emu_when_one_warpgroup_runs_ahead(fp8, schedule, h_q, poisoned_scratch, monkeypatch):
    # One warpgroup (math 0, math 1 or the producer) runs whenever it can: the shared P
    # tile, the row-max exchange, the K ring (bf16) or the converted K block (FP8) must be
    # ordered by the barriers alone (docs/emulator.md: schedules). A split sequence and a
    # partial last block. h_q 16: 32 rows, the narrow kernel; 32: 64 rows, the 64-row kernel.
    torch.manual_seed(31 + fp8)
    seqlens, s_q = [150, 70], 2
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 8)
    assert bool((ns.diff() > 1).any())
    monkeypatch.setattr(CM, "run_plan", lambda plan, executor: run_emu(plan, schedule=schedule))
    out, lse = poisoned(len(seqlens), s_q, h_q)
    CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, True, executor="emu")
    check_decode(out, lse, *_reference(q, cache, table, sl, meta, ns, True))


@pytest.mark.parametrize("h_q,fp8", [(16, False), (64, False), (64, True)])   # 16: the narrow kernel
@pytest.mark.parametrize("schedule", ["lockstep", "wg_first", "wg_last"])
def test_emu_seesaw_across_pieces(schedule, h_q, fp8, seed, monkeypatch):
    # The bf16 kernel's seesaw: warpgroup w owns the blocks in ring stage w, and the ring runs on
    # across pieces. One partition walks pieces of 1, 3, 1 (partial), 3 (partial), 0 and 2 blocks,
    # so pieces start and end in either stage (either warpgroup owns the first and the last
    # block: the partner's last block is taken after the loop), the published P and max, the
    # row sums and Q are handed over between pieces, and an empty piece sits between two busy
    # ones; under each emulator schedule (one warpgroup running ahead as far as the barriers
    # allow). FP8: the producer warpgroup converts each block into the same ring.
    seqlens, s_q = [64, 192, 1, 130, 0, 128], 1
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 1)
    assert ns.tolist() == list(range(len(seqlens) + 1))           # one partition, whole sequences
    monkeypatch.setattr(CM, "run_plan", lambda plan, executor: run_emu(plan, schedule=schedule))
    out, lse = poisoned(len(seqlens), s_q, h_q)
    CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, True, executor="emu")
    check_decode(out, lse, *_reference(q, cache, table, sl, meta, ns, True))


@pytest.mark.parametrize("h_q", [16, 64])           # 32 rows: the narrow kernel; 128: the 64-row one
def test_emu_fp8_arbitrary_bytes(h_q, poisoned_scratch):
    # An FP8 cache written byte by byte rather than by quantize_kv_cache_fp8: every e4m3 code
    # but NaN (subnormals, both zeros, +-448), power-of-two scales (the layout's rule) varying
    # over 2^-12..2^-5 per token and group, RoPE columns of another magnitude. Exercises the
    # exact e4m3 * scale -> bf16 conversion and the mapping of each scale to its group and
    # token; checked per 128-column group.
    torch.manual_seed(11)
    seqlens, s_q = [150, 70], 2
    q, _, _, table, sl = make_fp8_problem(seqlens, s_q, h_q)
    num_blocks = int(table.max()) + 1
    codes = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)
    lat = codes[torch.randint(0, codes.numel(), (num_blocks, PAGE, 1, 512))]
    sf = torch.pow(2.0, torch.randint(-12, -4, (num_blocks, PAGE, 1, 4)).float())
    rope = (torch.randn(num_blocks, PAGE, 1, 64) * 3).to(torch.bfloat16)
    c8 = torch.cat([lat, sf.view(torch.uint8), rope.view(torch.uint8)], dim=-1).contiguous()
    assert c8.shape[-1] == 656
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 5)
    out, lse = _run_emu(q, c8, table, sl, meta, ns, True)
    ref, ref_lse = _reference(q, c8, table, sl, meta, ns, True)
    check_decode(out, lse, ref, ref_lse)
    for g in range(4):
        cols = slice(128 * g, 128 * g + 128)
        assert calc_diff(out[..., cols], ref[..., cols]) < OUT_CALC_DIFF, f"group {g}"


def test_emu_fp8_equals_bf16_kernel_on_its_dequantized_cache(poisoned_scratch):
    # The FP8 path is the bf16 path on the keys its producer writes: bf16(e4m3 * bf16(scale))
    # (bf16(scale * 2^60) * 2^-60 is bf16(scale); the product rounded once). So the 64-row
    # kernel gives bit for bit the bf16 cache's result on that cache, for any scale: here scales
    # that are not powers of two (2^u, u uniform in [-12, -5]), where it is not exact against
    # the float32 reference (docs/mla.md "FP8 KV cache"), every e4m3 code but NaN, a partial
    # last block and a split sequence.
    torch.manual_seed(12)
    seqlens, s_q, h_q = [150, 70], 2, 32                       # 64 rows: the 64-row kernel
    q, _, _, table, sl = make_fp8_problem(seqlens, s_q, h_q)
    num_blocks = int(table.max()) + 1
    codes = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)
    lat = codes[torch.randint(0, codes.numel(), (num_blocks, PAGE, 1, 512))]
    sf = torch.pow(2.0, torch.empty(num_blocks, PAGE, 1, 4).uniform_(-12, -5))
    rope = (torch.randn(num_blocks, PAGE, 1, 64) * 3).to(torch.bfloat16)
    c8 = torch.cat([lat, sf.view(torch.uint8), rope.view(torch.uint8)], dim=-1).contiguous()
    sf_bf16 = sf.to(torch.bfloat16).float().repeat_interleave(128, dim=-1)
    k16 = (lat.view(torch.float8_e4m3fn).float() * sf_bf16).to(torch.bfloat16)
    cache16 = torch.cat([k16, rope], dim=-1).contiguous()
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 8)
    assert bool((ns.diff() > 1).any())
    out8, lse8 = _run_emu(q, c8, table, sl, meta, ns, True)
    out16, lse16 = _run_emu(q, cache16, table, sl, meta, ns, True)
    assert torch.equal(out8, out16) and torch.equal(lse8, lse16)


def test_emu_fp8_counters(poisoned_scratch):
    # wgmma issued as for the bf16 cache (the seesaw: 36 + 4 by the block's owner, 4 by the
    # partner per (KV block, row tile)); KV bytes read = each row's 656 bytes per (block, row
    # tile), 57% of the bf16 cache's 1,152, + its 16 scale bytes read by 3 more of the 4 lanes
    # sharing the row (the emulator counts bytes per lane); bytes written as for the bf16
    # cache; no bank conflicts in the converted rows' stores.
    torch.manual_seed(5)
    seqlens, s_q, h_q, parts = [256, 192], 2, 64, 6
    q, c8, _, table, sl = make_fp8_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    b, rows = len(seqlens), s_q * h_q
    out, lse = poisoned(b, s_q, h_q)
    decode, combine = CM.flash_mla_with_kvcache(q, c8, table, sl, meta, ns, out, lse, 512, None, True,
                                                executor="emu")
    check_decode(out, lse, *_reference(q, c8, table, sl, meta, ns, True))
    d = decode.as_dict()
    tiles = _cdiv(rows, 64)
    blocks = sum(_cdiv(L, PAGE) for L in seqlens)
    assert d["wgmma_issued"] == 44 * blocks * tiles
    assert d["ctas"] == parts * tiles
    splits = (ns.diff()).tolist()
    pieces = int(ns[-1])
    split_pieces = sum(n for n in splits if n > 1)
    whole = sum(1 for n in splits if n == 1)
    assert d["global_bytes_written"] == whole * rows * (512 * 2 + 4) + split_pieces * rows * (512 * 4 + 4)
    kv, qb = blocks * tiles * 64 * (656 + 3 * 16), pieces * rows * 576 * 2
    assert kv + qb <= d["global_bytes_read"] <= kv + qb + d["ctas"] * CM.THREADS * 128
    assert d["shared_bank_conflicts"] == 0


# ------------------------------------------------------------------------ errors

def _good(seqlens=(70, 5), s_q=2, h_q=16):
    q, cache, table, sl = make_problem(list(seqlens), s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 4)
    return dict(q=q, k_cache=cache, block_table=table, cache_seqlens=sl, head_dim_v=512,
                tile_scheduler_metadata=meta, num_splits=ns)


@pytest.mark.parametrize("backend", ["emu", "cuda"])
def test_cuda_emu_validation_errors(backend):
    args = _good()
    if backend == "cuda":
        # CPU tensors: the cuda backend says where its tensors must live
        with pytest.raises(ValueError, match="backend: 'cuda' .*runs on GPU tensors, got (tensors on )?cpu"):
            M.flash_mla_with_kvcache(**args, backend=backend)
        return
    # the kernel-level check: a cache that is neither bf16 nor the FP8 layout
    bad8 = torch.zeros(2, 64, 1, 576, dtype=torch.uint8)
    with pytest.raises(TypeError, match="k_cache: the cuda/emu MLA kernel supports dtype bfloat16 .or uint8 / "
                                        "float8_e4m3fn in the FP8 layout of 656 bytes per token., got uint8 "
                                        "with last dim 576"):
        CM.check_supported(args["q"], bad8)
    CM.check_supported(args["q"], M.quantize_kv_cache_fp8(args["k_cache"]).view(torch.float8_e4m3fn))
    # head dims and dtypes are checked by the public API before any backend runs
    with pytest.raises(ValueError, match=r"q: expected head dim 576 \(last dim\), got 512"):
        M.flash_mla_with_kvcache(**{**args, "q": args["q"][..., :512]}, backend=backend)
    with pytest.raises(ValueError, match="head_dim_v: expected 512, got 576"):
        M.flash_mla_with_kvcache(**{**args, "head_dim_v": 576}, backend=backend)
    with pytest.raises(TypeError, match="q: expected dtype bfloat16, got float16"):
        M.flash_mla_with_kvcache(**{**args, "q": args["q"].half()}, backend=backend)
    # a cache view that is not 16-byte aligned cannot be a TMA source
    flat = torch.zeros(args["k_cache"].numel() + 8, dtype=torch.bfloat16)
    shifted = flat[4:4 + args["k_cache"].numel()].view(args["k_cache"].shape)
    shifted.copy_(args["k_cache"])
    with pytest.raises(ValueError, match="k_cache: the cuda/emu MLA kernel reads the cache with TMA, which "
                                         "needs a 16-byte aligned data pointer"):
        M.flash_mla_with_kvcache(**{**args, "k_cache": shifted}, backend=backend)
    c8 = M.quantize_kv_cache_fp8(args["k_cache"])
    flat8 = torch.zeros(c8.numel() + 16, dtype=torch.uint8)
    shifted8 = flat8[8:8 + c8.numel()].view(c8.shape)
    shifted8.copy_(c8)
    with pytest.raises(ValueError, match="k_cache: the cuda/emu MLA kernel reads the cache with TMA"):
        M.flash_mla_with_kvcache(**{**args, "k_cache": shifted8}, backend=backend)
    # the kernel-level check rejects what the public API would never pass, too
    with pytest.raises(ValueError, match="head_dim_v: the cuda/emu MLA kernel needs 512, got 256"):
        CM.check_supported(args["q"], args["k_cache"], 256)


def test_plan_geometry():
    args = _good(seqlens=(70, 5), s_q=3, h_q=32)
    q, cache = args["q"], args["k_cache"]
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    out, lse = poisoned(b, s_q, h_q)
    oacc = torch.empty(b + 4, rows, 512)
    lacc = torch.empty(b + 4, rows)
    record = torch.zeros(8, dtype=torch.int32)
    p = CM.decode_plan(CM.q_view(q), cache.view(-1, 576), args["block_table"], args["cache_seqlens"],
                       args["tile_scheduler_metadata"], args["num_splits"], out, lse, oacc, lacc, record,
                       s_q=s_q, h_q=h_q, scale=0.5, causal=True, num_blocks=cache.shape[0])
    assert p.module == "mla_decode" and p.function == "pk_mla_decode_bf16"
    assert p.grid == (4, 2, 1) and p.block == (384, 1, 1) and p.shared_bytes == CM.SMEM_BYTES
    tq, tk = p.args[0].value, p.args[1].value
    assert tq.box == (1, 64, 64) and tq.swizzle == 128 and tq.tensor.shape == (b, rows, 576)
    assert tk.box == (64, 64) and tk.swizzle == 128 and tk.tensor.shape == (cache.shape[0] * 64, 576)
    assert tq.box_bytes() * 9 == tk.box_bytes() * 9 == 73728          # the expect_tx count per tile
    assert tq.image().dims == (576, rows, b) and not tq.oob_nan      # rows past s_q*h_q read as 0
    assert [a.ptype for a in p.args[2:10]] == ["ptr"] * 8
    assert [a.value for a in p.args[10:14]] == [s_q, h_q, rows, args["block_table"].stride(0)]
    assert [a.value for a in p.args[14:17]] == list(out.stride()[:3])
    assert [a.value for a in p.args[17:20]] == list(lse.stride())
    assert p.args[20].value == 1 and p.args[21].ptype == "f32"
    assert math.isclose(p.args[21].value, 0.5 * 1.4426950408889634)
    # the input checks: the error record, b, the cache's pages, the block table's columns
    assert p.args[22].ptype == "ptr" and p.args[22].value is record
    assert [a.value for a in p.args[23:26]] == [b, cache.shape[0], args["block_table"].shape[1]]
    # FP8 cache: the other instantiation, one box per page over [num_blocks * 64, 41, 16] bytes
    c8 = M.quantize_kv_cache_fp8(cache)
    p8 = CM.decode_plan(CM.q_view(q), CM.kv_view(c8.view(torch.float8_e4m3fn)), args["block_table"],
                        args["cache_seqlens"], args["tile_scheduler_metadata"], args["num_splits"], out, lse, oacc,
                        lacc, record, s_q=s_q, h_q=h_q, scale=0.5, causal=True, num_blocks=cache.shape[0])
    assert p8.function == "pk_mla_decode_fp8" and p8.shared_bytes == CM.SMEM_BYTES_FP8 == 223408
    assert p8.grid == p.grid and p8.block == p.block and len(p8.args) == len(p.args) + CM.FP8_TAIL_ARGS
    assert [(a.ptype, a.value) for a in p8.args[2:len(p.args)]] == [(a.ptype, a.value) for a in p.args[2:]]
    # the FP8 tail of the dense decode: indices, cache bytes, topk_length, sink, idx strides, topk, num_tokens
    tail = p8.args[len(p.args):]
    assert tail[1].ptype == "ptr" and tail[1].value.data_ptr() == c8.data_ptr()
    assert [a.value for a in tail[:1] + tail[2:]] == [0] * 7                 # nulls and zeros
    t8 = p8.args[1].value                                             # (not read by this kernel)
    assert t8.box == (64, 41, 16) and t8.swizzle == 0 and t8.tensor.dtype == torch.uint8
    assert t8.tensor.shape == (cache.shape[0] * 64, 41, 16) and t8.tensor.data_ptr() == c8.data_ptr()
    assert CM.kv_view(c8[:0]).shape == (64, 41, 16)                   # no pages: a dummy page of zeros
    c = CM.combine_plan(args["num_splits"], oacc, lacc, out, lse, h_q=h_q)
    assert c.function == "pk_mla_combine" and c.grid == (b, rows // 4, 1) and c.block == (128, 1, 1)
    assert c.shared_bytes == 0 and [a.value for a in c.args[5:7]] == [rows, h_q] and c.args[13].value == b + 4


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,scale", CASES)
def test_cuda_matches_reference(seqlens, s_q, h_q, causal, parts, split, scale, poisoned_scratch):
    assert gpu_unavailable_reason() == ""
    torch.manual_seed(sum(seqlens))
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts, backend="reference")
    out, lse = poisoned(len(seqlens), s_q, h_q)
    dev = [t.cuda() for t in (q, cache, table, sl, meta, ns, out, lse)]
    M.flash_mla_with_kvcache(*dev[:4], 512, dev[4], dev[5], softmax_scale=scale, causal=causal, backend="cuda",
                             out=dev[6], softmax_lse=dev[7])
    torch.cuda.synchronize()
    ref, ref_lse = _reference(q, cache, table, sl, meta, ns, causal, scale)
    check_decode(dev[6].cpu(), dev[7].cpu(), ref, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split,dtype", FP8_CASES)
def test_cuda_fp8_matches_reference(seqlens, s_q, h_q, causal, parts, split, dtype, poisoned_scratch):
    assert gpu_unavailable_reason() == ""
    torch.manual_seed(sum(seqlens))
    q, c8, _, table, sl = make_fp8_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts, backend="reference")
    out, lse = poisoned(len(seqlens), s_q, h_q)
    dev = [t.cuda() for t in (q, c8.view(dtype), table, sl, meta, ns, out, lse)]
    M.flash_mla_with_kvcache(*dev[:4], 512, dev[4], dev[5], causal=causal, backend="cuda",
                             out=dev[6], softmax_lse=dev[7])
    torch.cuda.synchronize()
    ref, ref_lse = _reference(q, c8, table, sl, meta, ns, causal)
    check_decode(dev[6].cpu(), dev[7].cpu(), ref, ref_lse)


@pytest.mark.gpu
def test_auto_picks_cuda_for_bf16_and_fp8(monkeypatch):
    from pykernels import registry
    calls = []
    o = registry.get("flash_mla_with_kvcache")
    for name in ("cuda", "triton"):
        monkeypatch.setitem(o.backends, name, registry.Backend(name, o.backends[name].supports,
                                                                lambda p, _n=name: calls.append(_n)))
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    M.flash_mla_with_kvcache(**args)
    M.flash_mla_with_kvcache(**{**args, "k_cache": M.quantize_kv_cache_fp8(args["k_cache"])})
    assert calls == ["cuda", "cuda"]
