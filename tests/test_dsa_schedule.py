"""get_paged_mqa_logits_metadata on the device: the Triton kernel (pykernels/triton/
dsa_schedule.py, interpreted here) and the hand-written one (csrc/dsa/logits_schedule.cu on
the emulator, every CTA schedule), equal to the reference schedule exactly, on fresh random
context lengths ([b] and [b, next_n] forms, sequences with no split, more partitions than
splits), with the output poisoned first (rows left unwritten would fail)."""
import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
from pykernels.cuda import dsa as CD
from pykernels.runtime.executors import run_emu

SCHEDULES = ("lockstep", "cta_first", "cta_last", "wg_first", "wg_last")


def _lens(b, next_n, hi):
    lens = torch.randint(0, hi, (b, next_n) if next_n else (b,), dtype=torch.int32)
    if b > 2:
        lens[1] = 0                                                # a sequence with no split
    return lens


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("b,next_n,hi,block_kv,num_sms", [(37, 0, 3000, 64, 7), (5, 3, 700, 64, 132),
                                                          (300, 0, 20000, 32, 132), (1, 0, 1, 64, 3),
                                                          (70, 2, 5000, 64, 1), (0, 0, 1, 64, 4)])
def test_schedule_equals_the_reference(seed, backend, b, next_n, hi, block_kv, num_sms):
    lens = _lens(b, next_n, hi)
    ref = D.get_paged_mqa_logits_metadata(lens, block_kv, num_sms, backend="reference")
    got = D.get_paged_mqa_logits_metadata(lens, block_kv, num_sms, backend=backend)
    assert got.dtype == torch.int32 and got.shape == (num_sms + 1, 2)
    assert torch.equal(got, ref), (got.tolist(), ref.tolist())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emu_schedule_with_every_cta_schedule_and_poisoned_output(seed, schedule, monkeypatch):
    lens = _lens(2000, 0, 9000)                                    # two passes of the 1024-thread scan
    ref = D.get_paged_mqa_logits_metadata(lens, 64, 132, backend="reference")

    def run(plan, executor):
        plan.args[1].value.fill_(-7)                                # poison the output the plan writes
        return run_emu(plan, schedule=schedule)
    monkeypatch.setattr(CD, "run_plan", run)
    assert torch.equal(D.get_paged_mqa_logits_metadata(lens, 64, 132, backend="emu"), ref)


def test_schedule_feeds_the_logits_kernels(seed):
    # the device schedule is accepted wherever the reference one is (the logits ops check it)
    lens = _lens(3, 0, 300)
    meta = pk.get_paged_mqa_logits_metadata(lens, 64, 5, backend="emu")
    q = torch.randn(3, 1, 32, 128).to(torch.float8_e4m3fn)
    cache = D.quantize_indexer_k_cache(torch.randn(15, 64, 1, 128))
    table = torch.arange(15, dtype=torch.int32).view(3, 5)
    w = torch.randn(3, 32)
    out = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, 320, backend="emu")
    ref = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, 320, backend="reference")
    assert torch.equal(out.isneginf(), ref.isneginf())
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref[ref.isfinite()].abs().max()))


def test_emu_schedule_limit_is_an_error():
    lens = torch.zeros(CD.MAX_SCHEDULE_SEQUENCES + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"backend: 'emu' cannot run .*context_lens: .*at most "
                                         rf"{CD.MAX_SCHEDULE_SEQUENCES} sequences"):
        D.get_paged_mqa_logits_metadata(lens, 64, 4, backend="emu")
