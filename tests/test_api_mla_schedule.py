"""FlashMLA's argument-less get_mla_metadata() through the public API: the schedule is
built from the call's cache_seqlens on first use, reused while they stay, rebuilt when
they change; and old-form metadata reused after the sequences grew is refused."""
import pytest
import torch

import pykernels.mla as M
from pykernels.metrics import calc_diff
from pykernels.mla_schedule import MlaSchedule


def _problem(seed_lens=(150, 17)):
    b, s_q, h_q, pages = 2, 1, 16, 8
    seqlens = torch.tensor(seed_lens, dtype=torch.int32)
    cache = torch.randn(pages, 64, 1, 576).bfloat16()
    table = torch.randperm(pages)[:6].int().view(b, 3)
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    return q, cache, table, seqlens


@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
def test_schedule_object_built_on_first_use_and_rebuilt_on_change(seed, backend):
    q, cache, table, seqlens = _problem()
    sched, none = M.get_mla_metadata()
    assert isinstance(sched, MlaSchedule) and none is None
    for step in range(2):
        out, lse = M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, sched, None, causal=True,
                                            backend=backend)
        ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, sched, None, causal=True,
                                                backend="reference")
        assert calc_diff(out.double(), ref.double()) < 1e-5            # same tolerance as the main job
        assert torch.allclose(lse, ref_lse, atol=1e-4, rtol=0)
        assert sched.builds == step + 1                               # reused within a step
        seqlens.add_(20)                                              # the next decode step: sequences grew


def test_old_form_metadata_reused_after_growth_is_refused():
    q, cache, table, seqlens = _problem()
    meta, splits = M.get_mla_metadata(seqlens, 16, 1, 4)
    grown = seqlens + 20
    for backend in ("reference", "triton", "emu"):
        with pytest.raises(ValueError, match="tile_scheduler_metadata: row 0 was made for other cache_seqlens"):
            M.flash_mla_with_kvcache(q, cache, table, grown, 512, meta, splits, backend=backend)


def test_schedule_object_needs_num_splits_none():
    q, cache, table, seqlens = _problem()
    sched, _ = M.get_mla_metadata()
    with pytest.raises(ValueError, match="num_splits: expected None with an MlaSchedule"):
        M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, sched, torch.zeros(3, dtype=torch.int32))
