"""The sparse MLA decode for h_q <= 32 (csrc/mla/decode_narrow.cu's
pk_mla_sparse_decode_narrow_n{16,32}, picked by pykernels/cuda/dsa.py sparse_decode_plans):
what was compiled (SASS, ptxas resources), the dispatch (h_q <= 32 narrow, multiples of 64 the
64-row kernel, anything else a ValueError naming q), and the same kernel's PTX on the emulator
(backend "emu", memory-ordering checker on: tests/conftest.py; every CTA schedule) against the
reference on fresh random inputs with NaN-poisoned out, lse and split scratch. GPU runs at
topk 2048 are marked `gpu` (not run yet: no GPU here).

Tolerances: those of the 64-row sparse decode (tests/test_dsa_cuda.py, the Triton kernel's,
tests/test_dsa_triton.py _assert_decode_matches): |out - ref| <= 2^-7 |ref| + 2^-9 max|ref|,
calc_diff <= 1e-5, lse within 1e-5 (rel and abs), +inf lse exactly where no slot is used.
The cases (tests/test_dsa_cuda.py _sparse_case): -1 slots (a whole 64-slot block of them, a
token with none used), a duplicate index, topk_length (a sequence with 5 slots, one with none,
indices past it out of range), attn_sink, cache rows no used slot names full of NaN bytes.
"""
import math
import re

import pytest
import torch

import pykernels.dsa as D
import pykernels.mla as M
from pykernels.cuda import dsa as CD
from pykernels.cuda import mla as CM
from pykernels.emu.launch import SCHEDULES
from pykernels.runtime import artifacts, device_errors, sass
from pykernels.runtime.hardware import num_sms
from pykernels.runtime.executors import gpu_unavailable_reason, run_emu, run_plan

from .test_dsa_cuda import _sparse_case, check_bad_sparse_decode
from .test_dsa_triton import _assert_decode_matches
from .test_mla_narrow import _sass_of

NAN = float("nan")
FUNCTIONS = [CM.narrow_function(n, True, sparse=True) for n in (16, 32)]


# ------------------------------------------------------------------------ compiled code

@pytest.mark.parametrize("function", FUNCTIONS)
def test_sass_and_resources(function):
    assert function in artifacts.manifest()["kernels"][CM.NARROW_MODULE]["functions"]
    r = artifacts.resources(CM.NARROW_MODULE, function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert r["shared_bytes"] == 0                                   # all shared memory is dynamic
    listing = _sass_of(function)
    ops = sass.opcodes(listing)
    n = 16 if function.endswith("n16") else 32
    # the FP8 narrow kernel's wgmmas (S^T inlined at a piece's first page and during P V, for
    # whole and masked blocks: 4 x 36; O^T 32), the query rows as N
    assert set(re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32\.BF16", listing)) == {f"64x{n}x16"}
    assert len(re.findall(r"HGMMA\.", listing)) == 4 * 36 + 32
    assert ops["UTMALDG.3D"] == 9                                    # Q only: the rows come by bulk copies
    assert ops["UBLKCP.S.G"] >= 1                                    # cp.async.bulk, one row per used slot
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    log = (artifacts.KERNEL_DIR / f"{CM.NARROW_MODULE}.log").read_text()
    assert f"Function properties for {function}" in log and "C7515" not in log   # wgmmas stay asynchronous


def test_shared_memory_plan():
    # the FP8 narrow kernel's layout + one u64 used-slot mask per raw-page stage (3 for N 16, 2
    # for N 32): decode_narrow.cu static_asserts the same values
    assert CM.narrow_smem_bytes(16, True, sparse=True) == CM.narrow_smem_bytes(16, True) + 24 == 222040
    assert CM.narrow_smem_bytes(32, True, sparse=True) == CM.narrow_smem_bytes(32, True) + 16 == 201280
    assert CM.narrow_smem_bytes(16, True, sparse=True) <= 227 * 1024


# ------------------------------------------------------------------------ dispatch

def _plans(b, s_q, h_q, topk, sched=None, splits=None):
    q, cache, idx, _, _ = _sparse_case(b, s_q, h_q, topk, 2, False, False)
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16)
    lse = torch.empty(b, h_q, s_q)
    record = device_errors.record_for(q.device, CD.SPARSE_OP_NAME)
    return CD.sparse_decode_plans(q, cache, idx, None, None, sched, splits, out, lse, 0.1, record)


@pytest.mark.parametrize("h_q,function", [(16, "pk_mla_sparse_decode_narrow_n16"), (8, "pk_mla_sparse_decode_narrow_n16"),
                                          (32, "pk_mla_sparse_decode_narrow_n32"), (24, "pk_mla_sparse_decode_narrow_n32"),
                                          (64, CD.SPARSE_DECODE_FUNCTION), (128, CD.SPARSE_DECODE_FUNCTION)])
def test_dispatch(h_q, function):
    b, s_q, topk, parts = 2, 2, 130, 5
    sched, splits = M.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), s_q * h_q, 1, parts,
                                       backend="reference")
    decode, combine = _plans(b, s_q, h_q, topk, sched, splits)
    assert decode.function == function and combine.function == CD.SPARSE_COMBINE_FUNCTION
    if function == CD.SPARSE_DECODE_FUNCTION:
        assert decode.grid == (parts, s_q * h_q // 64, 1) and decode.shared_bytes == CD.sparse_decode_smem_bytes()
    else:
        # one CTA row per query token (its own indices); the 26 narrow parameters + the FP8 tail
        n = 16 if function.endswith("n16") else 32
        assert decode.grid == (parts, s_q, 1) and decode.block == (CM.NARROW_THREADS, 1, 1)
        assert decode.shared_bytes == CM.narrow_smem_bytes(n, True, sparse=True)
        assert len(decode.args) == 26 + CM.FP8_TAIL_ARGS


def test_dispatch_default_schedule_counts_query_tokens():
    # without a schedule: partitions per query token for the narrow kernel (one wave of s_q CTA rows)
    decode, _ = _plans(2, 2, 16, 64)
    parts = decode.grid[0]
    assert decode.grid[1] == 2 and parts == max(1, num_sms(torch.device("cpu")) // 2)


@pytest.mark.parametrize("h_q", [48, 96])
def test_other_head_counts_are_a_value_error_naming_q(h_q):
    q, cache, idx, _, _ = _sparse_case(2, 1, h_q, 64, 2, False, False)
    with pytest.raises(ValueError, match=rf"q: the cuda/emu sparse decode kernels need h_q at most 32 or a multiple "
                                         rf"of 64 .*got h_q {h_q}"):
        D.flash_mla_sparse_decode(q, cache, idx, backend="emu")


# ------------------------------------------------------------------------ emulator

def _run(q, cache, idx, sink, length, sched=None, splits=None, scale=0.07, monkeypatch=None, schedule=None):
    """The emu decode into NaN-poisoned out / lse; returns them and the functions launched."""
    b, s_q, h_q, _ = q.shape
    launched = []

    def record_and_run(plan, executor):
        launched.append(plan.function)
        return run_emu(plan, schedule=schedule) if schedule else run_plan(plan, executor)
    monkeypatch.setattr(CD, "run_plan", record_and_run)
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    got = D.flash_mla_sparse_decode(q, cache, idx, scale, sink, length, sched, splits, backend="emu", out=out,
                                    softmax_lse=lse)
    assert got[0] is out and got[1] is lse
    assert launched[0] == CM.narrow_function(CM.narrow_tile_rows(h_q), True, sparse=True)
    return out, lse


@pytest.mark.usefixtures("poisoned_scratch")
@pytest.mark.parametrize("b,s_q,h_q,topk,parts,with_sink,with_length",
                         [(2, 1, 16, 64, None, False, False), (2, 2, 32, 130, 8, True, True),
                          (2, 2, 16, 192, "flashmla", True, False), (3, 1, 24, 100, 1, True, True)])
def test_emu_matches_reference(seed, b, s_q, h_q, topk, parts, with_sink, with_length, monkeypatch):
    q, cache, idx, sink, length = _sparse_case(b, s_q, h_q, topk, 4, with_sink, with_length)
    sched = splits = None                                          # None: the host makes its own schedule
    if parts == "flashmla":                                        # FlashMLA's sparse form (topk per sequence)
        sched, splits = M.get_mla_metadata(torch.full((b,), 4 * 64, dtype=torch.int32), s_q * h_q, 1, h_q, True,
                                           topk, backend="reference")
    elif parts is not None:     # 8: sequences split (the combine with attn_sink); 1: a partition's pieces
        sched, splits = M.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), s_q * h_q, 1, parts,
                                           backend="reference")
        assert bool((splits.diff() > 1).any()) == (parts > 1)
    out, lse = _run(q, cache, idx, sink, length, sched, splits, monkeypatch=monkeypatch)
    ref_out, ref_lse = D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, backend="reference")
    _assert_decode_matches(out, lse, ref_out, ref_lse)
    assert (out[1, s_q - 1] == 0).all() and (lse[1, :, s_q - 1] == math.inf).all()   # no used slot


@pytest.mark.usefixtures("poisoned_scratch")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emu_every_schedule(seed, schedule, monkeypatch):
    # The producer warp, the math warpgroup and the CTAs each running ahead as far as their
    # barriers allow, the ordering checker on: the gathered raw pages and their masks through the
    # ring (3 stages for N 16, a partial and a masked block), split sequences, the combine with
    # attn_sink.
    q, cache, idx, sink, length = _sparse_case(2, 1, 16, 130, 3, True, True)
    sched, splits = M.get_mla_metadata(torch.full((2,), 130, dtype=torch.int32), 16, 1, 8, backend="reference")
    assert bool((splits.diff() > 1).any())
    out, lse = _run(q, cache, idx, sink, length, sched, splits, monkeypatch=monkeypatch, schedule=schedule)
    _assert_decode_matches(out, lse, *D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length,
                                                                backend="reference"))


@pytest.mark.usefixtures("poisoned_scratch")
def test_emu_out_of_range_indices_are_skipped_and_recorded(seed):
    # A used slot whose index is not a token row of the cache (-2, num_blocks * 64, INT32_MAX,
    # INT32_MIN) is masked like -1, its row never read, and one of them recorded (the device
    # error record: SparseIndexOutOfRange). Compared with those slots as -1.
    b, s_q, h_q, topk = 2, 1, 32, 70
    q, cache, idx, sink, _ = _sparse_case(b, s_q, h_q, topk, 2, True, False)
    clean = idx.clone()
    bad = torch.tensor([3, 17, 64, 69])
    values = [-2, 2 * 64, 2**31 - 1, -(2**31)]
    idx[0, 0, bad] = torch.tensor(values, dtype=torch.int32)
    clean[0, 0, bad] = -1
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    with pytest.raises(device_errors.KernelInputError) as info:
        CD.sparse_decode(q, cache, idx, sink, None, None, None, out, lse, 512, 0.07, executor="emu")
    err = info.value
    assert err.code == device_errors.code("SparseIndexOutOfRange") and err.argument == "indices"
    assert (err.args_recorded[0], err.args_recorded[2]) in set(zip(values, bad.tolist())), err.args_recorded
    assert err.args_recorded[1] == 2 * 64
    _assert_decode_matches(out, lse, *D.flash_mla_sparse_decode(q, cache, clean, 0.07, sink, backend="reference"))


def test_emu_nan_in_a_used_row_propagates(monkeypatch):
    # a used row's e4m3 NaN: that token's out and lse NaN (FlashMLA's sparse convention, the
    # reference's); the other sequence finite
    cache = M.quantize_kv_cache_fp8(torch.randn(2, 64, 1, 576).bfloat16()).view(-1, 656)
    cache[70, 3] = 0x7F
    q = torch.randn(2, 1, 16, 576).bfloat16()
    idx = torch.tensor([[[70, 5, -1]], [[5, 6, 7]]], dtype=torch.int32)
    out, lse = D.flash_mla_sparse_decode(q, cache.view(2, 64, 1, 656), idx, backend="emu")
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all() and lse[1].isfinite().all()


def test_emu_counters(seed, monkeypatch):
    # One 656-byte bulk copy per used slot (a duplicate twice; -1 slots and slots past
    # topk_length never) + Q's 9 boxes once per piece and token; wgmma: (36 + 32) per 64-slot
    # block of every token; the bytes read at least those rows and Q tiles.
    b, s_q, h_q, topk = 2, 2, 16, 130
    q, cache, idx, _, length = _sparse_case(b, s_q, h_q, topk, 2, False, True)
    sched, splits = M.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), s_q * h_q, 1, 8,
                                       backend="reference")
    pieces = int(splits[-1])
    assert pieces == 4                                             # each sequence split in two
    stats = []

    def record(plan, executor):
        stats.append(run_plan(plan, executor))
        return stats[-1]
    monkeypatch.setattr(CD, "run_plan", record)
    D.flash_mla_sparse_decode(q, cache, idx, None, None, length, sched, splits, backend="emu")
    d = stats[0].as_dict()
    assert d["wgmma_issued"] == (36 + 32) * b * s_q * -(-topk // 64)
    used = int(((idx != -1) & (torch.arange(topk)[None, None] < length[:, None, None])).sum())
    assert d["bulk_copies"] == used + 9 * pieces * s_q and d["bulk_copies_duplicate"] == 0
    assert d["global_bytes_read"] >= used * 656 + pieces * s_q * h_q * 576 * 2


def test_model_samples_the_kernel_the_host_picks():
    # python -m pykernels.perf mla ... --topk K: h_q <= 32 samples the narrow sparse entry with
    # one CTA row per query token (partitions = SMs / s_q) and no L2 sharing between CTAs
    from pykernels.perf import mla as PM
    from pykernels.perf.machines import part
    pred = PM.predict([0] * 4, 2, 16, part="h800", topk=128)
    assert "narrow sparse decode kernel" in pred.sampled and "16 query rows" in pred.sampled
    assert pred.grid == (part("h800").sms // 2, 2) and pred.l2_hit == 0.0
    assert pred.per_block_clk > 0 and pred.seconds > 0


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("h_q,with_sink", [(16, True), (32, False)])
def test_cuda_matches_reference(seed, h_q, with_sink):
    assert not gpu_unavailable_reason()
    q, cache, idx, sink, length = _sparse_case(3, 2, h_q, 2048, 64, with_sink, True)
    ref = D.flash_mla_sparse_decode(q, cache, idx, None, sink, length, backend="reference")
    got = D.flash_mla_sparse_decode(*(None if t is None else t.cuda() for t in (q, cache, idx)), None,
                                    *(None if t is None else t.cuda() for t in (sink, length)), backend="cuda")
    _assert_decode_matches(got[0].cpu(), got[1].cpu(), *ref)


@pytest.mark.parametrize("case,h_q", [("index-minus-two", 16), ("length-past-topk", 32)])
def test_emu_records_bad_values(seed, case, h_q):
    # a used slot's index outside the cache or topk_length outside [0, topk]: the kernel's
    # KernelInputError (no host read), the bad slot skipped / the length clamped, the rest exact
    check_bad_sparse_decode(case, h_q)
