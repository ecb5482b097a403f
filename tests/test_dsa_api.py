"""FlashMLA's sparse call forms on pykernels.mla: get_mla_metadata's (num_heads_q,
is_fp8_kvcache, topk) form, flash_mla_with_kvcache's routing to the sparse decode, and that
the dense path keeps its behaviour with the new arguments."""
import pytest
import torch

import pykernels.dsa as D
import pykernels.mla as M
from pykernels.mla_schedule import MlaSchedule


def _sparse_problem(b=2, s_q=1, h_q=16, topk=8, pages=3):
    c8 = M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, pages * 64, (b, s_q, topk), dtype=torch.int32)
    return q, c8, idx


def test_sparse_metadata_form_schedules_topk_tokens_per_sequence():
    lens = torch.tensor([5000, 3, 0], dtype=torch.int32)
    meta, splits = M.get_mla_metadata(lens, 2 * 64, 1, 64, True, 2048)
    want_meta, want_splits = M.get_mla_metadata(torch.full((3,), 2048, dtype=torch.int32), 2 * 64, 1)
    assert torch.equal(meta, want_meta) and torch.equal(splits, want_splits)
    # the same by keyword, and FlashMLA's dense form with num_heads_q / is_fp8_kvcache
    meta_kw, _ = M.get_mla_metadata(lens, 128, 1, is_fp8_kvcache=True, topk=2048, num_heads_q=64)
    assert torch.equal(meta_kw, want_meta)
    dense, _ = M.get_mla_metadata(lens, 128, 1, 64, False)
    assert torch.equal(dense, M.get_mla_metadata(lens, 128, 1)[0])


@pytest.mark.parametrize("call,exc,match", [
    (lambda s: M.get_mla_metadata(s, 16, 1, 16, True, 0), ValueError, "topk: expected an int in"),
    (lambda s: M.get_mla_metadata(s, 16, 1, 16, "yes", 8), TypeError, "is_fp8_kvcache: expected a bool, got str"),
    (lambda s: M.get_mla_metadata(s, 16, 1, 0, True, 8), ValueError, "num_heads_q: expected an int >= 1, got 0"),
    (lambda s: M.get_mla_metadata(s, 16, 1, 16, True, 8, num_heads_q=16), ValueError, "num_heads_q: given twice"),
    (lambda s: M.get_mla_metadata(s.long(), 16, 1, 16, True, 8), TypeError, "cache_seqlens: expected dtype int32"),
])
def test_sparse_metadata_form_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.tensor([5, 7], dtype=torch.int32))


def test_flash_mla_with_kvcache_routes_to_the_sparse_decode(seed):
    q, c8, idx = _sparse_problem()
    sink = torch.randn(16)
    length = torch.tensor([8, 3], dtype=torch.int32)
    want = D.flash_mla_sparse_decode(q, c8, idx, None, sink, length, backend="reference")
    sched = M.get_mla_metadata()
    for meta, splits in (sched, (None, None), M.get_mla_metadata(torch.zeros(2, dtype=torch.int32), 16, 1, 16, True, 8)):
        got = M.flash_mla_with_kvcache(q, c8, None, None, 512, meta, splits, is_fp8_kvcache=True, indices=idx,
                                       attn_sink=sink, topk_length=length)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert isinstance(sched[0], MlaSchedule) and sched[0].builds == 0      # the sparse path takes no schedule


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(attn_sink=torch.zeros(16)), ValueError, "indices: expected int32 .* got None"),
    (dict(indices="IDX", is_fp8_kvcache=True, extra_k_cache=torch.zeros(1)), ValueError, "extra_k_cache: expected None"),
    (dict(indices="IDX", is_fp8_kvcache=True, extra_topk_length=torch.zeros(1)), ValueError,
     "extra_topk_length: expected None"),
    (dict(indices="IDX", is_fp8_kvcache=1), TypeError, "is_fp8_kvcache: expected a bool, got int"),
    (dict(indices="IDX", is_fp8_kvcache=True, num_splits=torch.zeros(3, dtype=torch.int32),
          tile_scheduler_metadata="SCHED"), ValueError, "num_splits: expected None with an MlaSchedule"),
])
def test_sparse_routing_errors_name_the_argument(kwargs, exc, match):
    q, c8, idx = _sparse_problem()
    kw = {"tile_scheduler_metadata": None, "num_splits": None, **kwargs}
    if isinstance(kw.get("indices"), str):
        kw["indices"] = idx
    if isinstance(kw["tile_scheduler_metadata"], str):
        kw["tile_scheduler_metadata"] = M.get_mla_metadata()[0]
    with pytest.raises(exc, match=match):
        M.flash_mla_with_kvcache(q, c8, None, None, 512, **kw)


def test_dense_path_unchanged_with_is_fp8_kvcache(seed):
    q, c8, _ = _sparse_problem(b=1, s_q=2)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    lens = torch.tensor([100], dtype=torch.int32)
    meta, splits = M.get_mla_metadata(lens, 32, 1)
    plain = M.flash_mla_with_kvcache(q, c8, table, lens, 512, meta, splits, causal=True)
    flagged = M.flash_mla_with_kvcache(q, c8, table, lens, 512, meta, splits, None, True, True)
    assert torch.equal(plain[0], flagged[0]) and torch.equal(plain[1], flagged[1])
    with pytest.raises(ValueError, match="k_cache: expected the FP8 layout .* with is_fp8_kvcache=True, got bfloat16"):
        M.flash_mla_with_kvcache(q, torch.zeros(3, 64, 1, 576, dtype=torch.bfloat16), table, lens, 512, meta,
                                 splits, is_fp8_kvcache=True)
