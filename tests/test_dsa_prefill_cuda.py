"""The hand-written sparse MLA prefill (flash_mla_sparse_fwd; csrc/mla/decode.cu's
pk_mla_sparse_prefill_bf16, host side pykernels/cuda/dsa.py): the sparse decode's kernel with
the query tokens as its batch and kv's bf16 token rows gathered by the producer warpgroup.
What was compiled (SASS, PTX, ptxas resources), the schedule and the launch plan, the same
kernel's PTX run by the emulator (backend "emu", memory-ordering checker on, every CTA
schedule) against the reference on fresh random inputs with NaN-poisoned outputs, its limits
and the errors naming the argument; a GPU run (marked `gpu`).

Tolerances: out and lse as the sparse decode's (tests/test_dsa_triton.py _assert_decode_matches:
out within 2^-7 relative + 2^-9 max|out| elementwise and calc_diff <= 1e-5, the kernel rounding
P to bf16 for P.V; lse within 1e-5; +inf exactly where no slot is used); max_logits (the
largest scaled score, kept by the kernel in the log2 domain and scaled back by ln 2: a few
ulp) within 1e-5 relative + 1e-5, -inf exactly where no slot is used. kv rows no used slot
names hold NaN (the kernel must not read them).
"""
import math
import re

import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
from pykernels import mla_schedule as MS
from pykernels.cuda import dsa as CD
from pykernels.emu.parser import parse
from pykernels.runtime import artifacts, device_errors, sass
from pykernels.runtime.executors import gpu_unavailable_reason, run_emu

from .test_dsa_triton import _assert_decode_matches, check_sparse_prefill_nan_in_a_used_row_propagates
from .test_mla_cuda import CONV_REGS, MATH_REGS_FP8, REGISTER_FILE, _sass_of

NAN = float("nan")
SCHEDULES = ("lockstep", "cta_first", "cta_last", "wg_first", "wg_last")


def _case(s_q, h_q, s_kv, topk, with_sink, with_length, strided=True):
    """A sparse prefill problem: indices outside [0, s_kv) (-1, < -1, >= s_kv: skipped), a whole
    64-slot block of -1, a token with no used slot, a duplicate index, topk_length with a token
    of none; kv rows no used slot names are NaN; q and kv strided (row stride a multiple of 8)."""
    q = torch.randn(s_q, h_q + 1, 576).bfloat16()[:, 1:] if strided else torch.randn(s_q, h_q, 576).bfloat16()
    kv = torch.randn(s_kv, 2, 576).bfloat16()[:, 1:] if strided else torch.randn(s_kv, 1, 576).bfloat16()
    idx = torch.randint(-3, s_kv + 3, (s_q, 1, topk), dtype=torch.int32)
    idx[0, 0, 3:70] = -1
    idx[1, 0, :] = s_kv                                           # token 1: no used slot
    idx[0, 0, 1] = idx[0, 0, 2] = 7                               # a duplicate counts twice
    sink = torch.randn(h_q) * 3 if with_sink else None
    length = None
    if with_length:                                               # token 2 (s_q > 2): no slot
        length = torch.tensor(([topk, 5, 0] + [topk // 2] * s_q)[:s_q], dtype=torch.int32)
        idx[:, 0, :][torch.arange(topk)[None, :] >= length[:, None]] = 10 ** 6   # past topk_length: skipped
    used = (idx[:, 0] >= 0) & (idx[:, 0] < s_kv)
    if with_length:
        used &= torch.arange(topk)[None, :] < length[:, None]
    kv[~torch.isin(torch.arange(s_kv), idx[:, 0][used])] = NAN
    return q, kv, idx, sink, length


def _poisoned(s_q, h_q):
    """out, max_logits (transposed strides), lse, all NaN."""
    return (torch.full((s_q, h_q, 512), NAN, dtype=torch.bfloat16), torch.full((h_q, s_q), NAN).t(),
            torch.full((s_q, h_q), NAN))


def _assert_prefill_matches(out, mx, lse, ref_out, ref_mx, ref_lse):
    _assert_decode_matches(out, lse, ref_out, ref_lse)
    none = ref_mx == -math.inf
    assert torch.equal(mx == -math.inf, none) and torch.equal(none, ref_lse == math.inf)
    assert torch.allclose(mx[~none], ref_mx[~none], rtol=1e-5, atol=1e-5), f"max_logits: {(mx - ref_mx)[~none]}"


# ------------------------------------------------------------------------ compiled code, plan

def test_sass_has_the_intended_instructions():
    listing = _sass_of(CD.SPARSE_PREFILL_FUNCTION)
    ops = sass.opcodes(listing)
    # the sparse decode's seesaw over the bf16 K ring: 36 Q.K^T per own block, 4 P.V with P in
    # registers, 8 with P from shared memory
    assert len(re.findall(r"HGMMA\.64x64x16\.F32\.BF16", listing)) == 36
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc", listing)) == 4
    assert len(re.findall(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, gdesc", listing)) == 8
    assert ops["UTMALDG.3D"] == 9 and "UTMALDG.2D" not in ops      # the Q tile by TMA; the rows are loaded
    assert any(op.startswith("LDG.E.128.CONSTANT") for op in ops)   # 16-byte row loads (ld.global.nc)
    assert any(op.startswith("STS.128") for op in ops)              # into the swizzled K block
    assert not any(op.startswith("HMUL2.BF16") for op in ops)       # copied: no FP8 conversion
    assert any(op.startswith("LDGSTS") for op in ops)               # the slots' indices by cp.async
    assert ops["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1 and ops["USETMAXREG.DEALLOC.CTAPOOL"] == 1
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    assert max(int(r) for r in re.findall(r"\bR(\d+)\b", listing)) < MATH_REGS_FP8


def test_resources_within_budget():
    r = artifacts.resources("mla_decode", CD.SPARSE_PREFILL_FUNCTION)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert r["shared_bytes"] == 0                                   # all shared memory is dynamic
    assert CONV_REGS <= r["registers"] < MATH_REGS_FP8
    assert 128 * (CONV_REGS + 2 * MATH_REGS_FP8) <= r["registers"] * 384 <= REGISTER_FILE


def test_ptx_parameters():
    k = parse(artifacts.ptx_text("mla_decode")).kernel(CD.SPARSE_PREFILL_FUNCTION)
    decode = parse(artifacts.ptx_text("mla_decode")).kernel("pk_mla_sparse_decode_fp8")
    assert len(k.params) == len(decode.params) + CD.SPARSE_PREFILL_TAIL_ARGS
    assert [(p.size, p.align) for p in k.params[:2]] == [(128, 64)] * 2     # tensor maps


@pytest.mark.parametrize("s_q,topk,parts", [(7, 150, 3), (2, 64, 8), (5, 1, 5)])
def test_schedule_keeps_each_token_whole(s_q, topk, parts):
    meta, splits = CD.sparse_prefill_schedule(s_q, topk, parts, "cpu")
    MS.check_schedule(meta, splits, torch.full((s_q,), topk, dtype=torch.int32))   # the decode's rules
    assert meta.shape[0] == min(s_q, parts) and (meta[:, 5] >= 1).all()           # no empty partition
    assert torch.equal(splits, torch.arange(s_q + 1, dtype=torch.int32))           # one split per token


def test_plan_geometry():
    q, kv, idx, sink, length = _case(5, 128, 90, 100, True, True)
    out, mx, lse = _poisoned(5, 128)
    plan = CD.sparse_prefill_plan(q, kv, idx, sink, length, out, mx, lse, 0.05, torch.zeros(8, dtype=torch.int32),
                                  parts=2)
    assert plan.function == CD.SPARSE_PREFILL_FUNCTION and plan.module == "mla_decode"
    assert plan.grid == (2, 2, 1) and plan.block == (384, 1, 1)     # partitions x (h_q / 64 head tiles)
    assert plan.shared_bytes == CD.sparse_decode_smem_bytes()


# ------------------------------------------------------------------------ emulator vs reference

@pytest.mark.parametrize("s_q,h_q,s_kv,topk,with_sink,with_length",
                         [(3, 64, 100, 80, True, True), (2, 128, 300, 192, False, False),
                          (3, 64, 250, 150, True, False), (2, 64, 120, 64, False, True)])
def test_emu_matches_reference(seed, s_q, h_q, s_kv, topk, with_sink, with_length):
    q, kv, idx, sink, length = _case(s_q, h_q, s_kv, topk, with_sink, with_length)
    out, mx, lse = _poisoned(s_q, h_q)
    got = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="emu", out=out, max_logits=mx, lse=lse)
    assert got[0] is out and got[1] is mx and got[2] is lse
    ref = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="reference")
    _assert_prefill_matches(out, mx, lse, *ref)
    assert (out[1] == 0).all() and (mx[1] == -math.inf).all() and (lse[1] == math.inf).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emu_every_cta_schedule(seed, schedule):
    # 2 partitions over 3 tokens: one CTA walks two tokens (the Q tile and the ring carried over)
    q, kv, idx, sink, length = _case(3, 64, 140, 130, True, True, strided=False)
    out, mx, lse = _poisoned(3, 64)
    record = device_errors.record_for(torch.device("cpu"), CD.SPARSE_PREFILL_OP_NAME)
    run_emu(CD.sparse_prefill_plan(q, kv, idx, sink, length, out, mx, lse, 0.05, record, parts=2), schedule=schedule)
    device_errors.raise_if_set(record, CD.SPARSE_PREFILL_OP_NAME)
    _assert_prefill_matches(out, mx, lse, *D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length,
                                                                  backend="reference"))


def test_emu_writes_the_outputs_in_place(seed, monkeypatch):
    # contiguous out / lse and a transposed max_logits are written through their strides (no copy)
    q, kv, idx, sink, length = _case(2, 64, 100, 64, False, False, strided=False)
    out, mx, lse = _poisoned(2, 64)
    plans = []
    monkeypatch.setattr(CD, "run_plan", lambda plan, executor: plans.append(plan) or run_emu(plan))
    D.flash_mla_sparse_fwd(q, kv, idx, 0.05, backend="emu", out=out, max_logits=mx, lse=lse)
    ptrs = {a.value.data_ptr() for a in plans[0].args if a.ptype == "ptr"}
    assert len(plans) == 1 and {out.data_ptr(), mx.data_ptr(), lse.data_ptr(), kv.data_ptr()} <= ptrs
    _assert_prefill_matches(out, mx, lse, *D.flash_mla_sparse_fwd(q, kv, idx, 0.05, backend="reference"))


def test_emu_nan_in_a_used_row_propagates(seed):
    check_sparse_prefill_nan_in_a_used_row_propagates("emu", 64)


def test_emu_through_torch_ops_and_no_kv_rows(seed):
    q = torch.randn(2, 64, 576).bfloat16()
    idx = torch.randint(-1, 4, (2, 1, 70), dtype=torch.int32)
    kv = torch.randn(3, 1, 576).bfloat16()
    out, mx, lse = _poisoned(2, 64)
    torch.ops.pykernels.flash_mla_sparse_fwd(q, kv, idx, None, None, out, mx, lse, 0.1, 512, "emu")
    _assert_prefill_matches(out, mx, lse, *D.flash_mla_sparse_fwd(q, kv, idx, 0.1, backend="reference"))
    # s_kv 0: every slot unused (FlashMLA's convention for a row with none: out 0, -inf, +inf)
    out, mx, lse = _poisoned(2, 64)
    torch.ops.pykernels.flash_mla_sparse_fwd(q, kv[:0], idx, None, None, out, mx, lse, 0.1, 512, "emu")
    assert (out == 0).all() and (mx == -math.inf).all() and (lse == math.inf).all()


# ------------------------------------------------------------------------ limits, bad input

@pytest.mark.parametrize("what,make,message", [
    ("h_q", lambda q, kv: (q[:, :32], kv), r"q: the cuda/emu sparse prefill kernel needs h_q a multiple of 64"),
    ("d_qk", lambda q, kv: (q[..., :512].contiguous(), kv[..., :512].contiguous()),
     r"q: the cuda/emu sparse prefill kernel needs d_qk 576, got 512"),
    ("row stride", lambda q, kv: (q, torch.randn(6, 579).bfloat16()[:, None, :576]),
     r"kv: .* row stride that is a multiple of 8 elements, got 579"),
    ("pointer", lambda q, kv: (q, torch.randn(6 * 576 + 1).bfloat16()[1:].view(6, 1, 576)),
     r"kv: .* 16-byte aligned data pointer"),
])
def test_kernel_limits_are_named_errors(what, make, message):
    q, kv = make(torch.randn(2, 64, 576).bfloat16(), torch.randn(6, 1, 576).bfloat16())
    idx = torch.zeros(2, 1, 8, dtype=torch.int32)
    # (backend "cuda" checks the same limits after the device: CPU tensors are refused first)
    with pytest.raises(ValueError, match=message):
        D.flash_mla_sparse_fwd(q, kv, idx, 0.1, backend="emu")
    with pytest.raises(ValueError, match=message):
        torch.ops.pykernels.flash_mla_sparse_fwd(q, kv, idx, None, None, *_poisoned(2, q.shape[1]), 0.1, 512, "emu")
    assert re.search(message, pk.explain("flash_mla_sparse_fwd", q, kv, idx, 0.1, backend="auto"))


def test_auto_takes_triton_where_the_kernel_cannot(seed):
    # a CPU tensor: "auto" is the reference; explain lists the kernel's reason for the MODEL1 dims
    q = torch.randn(2, 64, 512).bfloat16()
    kv = torch.randn(6, 1, 512).bfloat16()
    text = pk.explain("flash_mla_sparse_fwd", q, kv, torch.zeros(2, 1, 8, dtype=torch.int32), 0.1, backend="auto")
    assert "needs d_qk 576, got 512" in text


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("h_q,with_sink", [(64, True), (128, False)])
def test_cuda_matches_reference(seed, h_q, with_sink):
    if gpu_unavailable_reason():
        pytest.skip(gpu_unavailable_reason())
    q, kv, idx, sink, length = _case(37, h_q, 5000, 2048, with_sink, True)
    ref = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="reference")
    cuda = [None if t is None else t.cuda() for t in (q, kv, idx, sink, length)]
    out, mx, lse = (t.cuda() for t in _poisoned(37, h_q))
    D.flash_mla_sparse_fwd(*cuda[:3], 0.05, 512, *cuda[3:], backend="cuda", out=out, max_logits=mx, lse=lse)
    pk.check_errors()
    _assert_prefill_matches(out.cpu(), mx.cpu(), lse.cpu(), *ref)



@pytest.mark.parametrize("token,bad,clamped", [(2, 81, 80), (1, -1, 0)])
def test_emu_records_a_bad_topk_length(seed, token, bad, clamped):
    # topk_length outside [0, topk]: the kernel's KernelInputError (no host read), the length
    # clamped, every output as the reference's with the clamped length; indices outside
    # [0, s_kv) stay unused slots (no error)
    from .test_dsa_cuda import _host_raises, _raises_recorded
    q, kv, idx, sink, length = _case(3, 64, 100, 80, True, True)
    fixed = length.clone()
    length[token], fixed[token] = bad, clamped
    out, mx, lse = _poisoned(3, 64)
    message = _raises_recorded(lambda: CD.sparse_prefill(q, kv, idx, sink, length, out, mx, lse, 0.05, 512, "emu"),
                               CD.SPARSE_PREFILL_OP_NAME, "TopkLengthOutOfRange", bad, 80, token)
    _assert_prefill_matches(out, mx, lse, *D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, fixed,
                                                                  backend="reference"))
    _host_raises(lambda be: D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend=be), message)
