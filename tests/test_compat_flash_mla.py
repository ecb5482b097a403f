"""pykernels.compat.flash_mla against FlashMLA's documented interface (v1.0 `flash_mla/__init__.py`
and the docstrings of flash_mla_interface.py): its names and parameters, get_mla_metadata's
schedule object built on first use, dense decode (bf16 and FP8 cache) and sparse decode and
prefill compared with pykernels.reference on the CPU backends with poisoned outputs, the FP8
cache's power-of-two scales, and NotImplementedError naming what pykernels does not implement."""
import inspect

import pytest
import torch

import pykernels.compat.flash_mla as flash_mla
from pykernels.metrics import calc_diff
from pykernels.mla_schedule import MlaSchedule
from pykernels.ops import mla as OM
from pykernels.reference import dsa as RD
from pykernels.reference import mla as RM

from .mla_cases import LSE_ABS, OUT_CALC_DIFF, check_decode, make_problem

E = inspect.Parameter.empty
FLASH_MLA_NAMES = ["get_mla_metadata", "flash_mla_with_kvcache", "flash_attn_varlen_func",
                   "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_mla_sparse_fwd",
                   "fused_norm_rope_attn_rope_cast"]
SIGNATURES = {
    "flash_mla_with_kvcache": dict(q=E, k_cache=E, block_table=E, cache_seqlens=E, head_dim_v=E,
                                   tile_scheduler_metadata=E, num_splits=None, softmax_scale=None, causal=False,
                                   is_fp8_kvcache=False, indices=None, attn_sink=None, extra_k_cache=None,
                                   extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None),
    "flash_mla_sparse_fwd": dict(q=E, kv=E, indices=E, sm_scale=E, d_v=512, attn_sink=None, topk_length=None,
                                 indexer_topk=0),
}


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """FlashMLA's functions allocate their outputs: make every allocation NaN so unwritten
    elements fail the comparisons."""
    real = OM.outputs

    def nan_outputs(q, out=None, softmax_lse=None):
        q, out_, lse_ = real(q, out, softmax_lse)
        return q, out_ if out is not None else out_.fill_(float("nan")), \
            lse_ if softmax_lse is not None else lse_.fill_(float("nan"))
    monkeypatch.setattr(OM, "outputs", nan_outputs)


def test_public_names_and_parameters_are_flash_mlas():
    assert flash_mla.__all__ == FLASH_MLA_NAMES and all(hasattr(flash_mla, n) for n in FLASH_MLA_NAMES)
    for name, want in SIGNATURES.items():
        params = inspect.signature(getattr(flash_mla, name)).parameters
        positional = {n: p.default for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY}
        assert positional == want and list(positional) == list(want), name
        assert set(params) - set(positional) <= {"backend"}
    kinds = [p.kind for p in inspect.signature(flash_mla.get_mla_metadata).parameters.values()]
    assert kinds == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    from pykernels.compat.flash_mla.fused_norm_rope_attn_rope_cast import decode, prefill  # noqa: F401


def test_get_mla_metadata_returns_a_fresh_schedule_whatever_it_is_given():
    lens = torch.tensor([5, 7], dtype=torch.int32)
    for args in ((), (lens, 64, 1), (lens, 64, 1, 64, True, 2048)):
        sched, none = flash_mla.get_mla_metadata(*args)
        assert isinstance(sched, flash_mla.FlashMLASchedMeta) and isinstance(sched, MlaSchedule) and none is None
        assert sched.builds == 0
    assert flash_mla.get_mla_metadata()[0] is not flash_mla.get_mla_metadata()[0]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("fp8", [False, True])
def test_dense_decode_with_a_schedule_built_on_first_use(backend, fp8, seed, poisoned_outputs):
    seqlens = [int(s) for s in torch.randint(2, 100, (2,))]
    s_q, h_q, causal = int(torch.randint(1, 3, ())), 16, bool(torch.randint(0, 2, ()))
    q, cache, table, lens = make_problem(seqlens, s_q, h_q)
    cache = flash_mla.quantize_kv_cache_fp8(cache) if fp8 else cache
    sched, _ = flash_mla.get_mla_metadata()
    for step in range(2):      # one schedule, two calls with other cache_seqlens (past them: NaN-poisoned slots)
        steps_lens = lens - step
        out, lse = flash_mla.flash_mla_with_kvcache(q, cache, table, steps_lens, 512, sched, None, None, causal, fp8,
                                                    backend=backend)
        ref, ref_lse = RM.flash_mla_with_kvcache(q, cache, table, steps_lens, 512, None, causal)
        check_decode(out, lse, ref, ref_lse)
    assert sched.builds == 2                    # rebuilt for the new cache_seqlens


@pytest.mark.parametrize("h_kv, backend", [(2, "triton"), (3, "reference"), (8, "reference")])   # FlashMLA's h_kv
def test_dense_decode_with_several_kv_heads(h_kv, backend, seed, poisoned_outputs):
    b, s_q, h_q = 2, 1, 8 * h_kv
    lens = torch.randint(1, 140, (b,), dtype=torch.int32)
    pages = -(-int(lens.max()) // 64)
    cache = torch.randn(b * pages, 64, h_kv, 576).to(torch.bfloat16)
    table = torch.randperm(b * pages, dtype=torch.int32).view(b, pages)
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    sched, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, cache, table, lens, 512, sched, causal=True, backend=backend)
    ref, ref_lse = RM.flash_mla_with_kvcache(q, cache, table, lens, 512, None, True)
    check_decode(out, lse, ref, ref_lse)


def test_fp8_cache_bytes_follow_flash_mlas_quantizer(seed):
    cache = (torch.randn(3, 64, 1, 576) * torch.rand(3, 64, 1, 1) * 30).to(torch.bfloat16)
    cache[0, 0, 0, :128] = 0                                   # an all-zero group: the 1e-4 floor
    c8 = flash_mla.quantize_kv_cache_fp8(cache)
    assert c8.dtype == torch.uint8 and c8.shape == (3, 64, 1, 656)
    raw = c8.view(-1, 656)
    x = cache.view(-1, 576).float()
    # FlashMLA: per 128 values, scale = max(amax / 448, 1e-4) rounded up to a power of two,
    # value = e4m3(x / scale); then the 4 float32 scales, then the 64 RoPE values in bf16
    amax = x[:, :512].view(-1, 4, 128).abs().amax(dim=2)
    scale = torch.exp2(torch.ceil(torch.log2((amax / 448).clamp(min=1e-4).double()))).float()
    assert torch.equal(raw[:, 512:528].contiguous().view(torch.float32), scale)
    want_q = (x[:, :512].view(-1, 4, 128) / scale[:, :, None]).to(torch.float8_e4m3fn).view(-1, 512)
    assert torch.equal(raw[:, :512], want_q.view(torch.uint8))
    assert torch.equal(raw[:, 528:].contiguous().view(torch.bfloat16), cache.view(-1, 576)[:, 512:])


def _sparse_problem(b, s_q, h_q, topk, pages):
    c8 = flash_mla.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).to(torch.bfloat16))
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    idx = torch.randint(0, pages * 64, (b, s_q, topk), dtype=torch.int32)
    idx[torch.rand(idx.shape) < 0.2] = -1                      # unused slots
    return q, c8, idx


def test_sparse_decode_with_flash_mlas_positional_arguments(seed, poisoned_outputs):
    b, s_q, h_q, topk = 2, 2, 16, 24
    q, c8, idx = _sparse_problem(b, s_q, h_q, topk, pages=3)
    sink = torch.randn(h_q)
    topk_length = torch.randint(0, topk + 1, (b,), dtype=torch.int32)
    sched, _ = flash_mla.get_mla_metadata()
    # FlashMLA's order: ..., indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length
    out, lse = flash_mla.flash_mla_with_kvcache(q, c8, None, None, 512, sched, None, None, False, True, idx, sink,
                                                None, None, topk_length)
    ref, ref_lse = RD.flash_mla_sparse_decode(q, c8, idx, None, sink, topk_length)
    check_decode(out, lse, ref, ref_lse)


def test_sparse_prefill_against_the_reference(seed):
    s_q, s_kv, h_q, topk = 5, 90, 16, 32
    q = torch.randn(s_q, h_q, 576).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, 576).to(torch.bfloat16)
    idx = torch.randint(-1, s_kv + 5, (s_q, 1, topk), dtype=torch.int32)     # -1 and >= s_kv: unused
    sink = torch.randn(h_q)
    got = flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink)
    want = RD.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink)
    assert len(got) == 3
    assert calc_diff(got[0], want[0]) < OUT_CALC_DIFF
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.isinf(), w.isinf()) and (g[w.isfinite()] - w[w.isfinite()]).abs().max() < LSE_ABS


@pytest.mark.parametrize("call, name", [
    (lambda q, c8, idx: flash_mla.flash_mla_with_kvcache(q, c8, None, None, 512, flash_mla.get_mla_metadata()[0],
                                                         is_fp8_kvcache=True, indices=idx, extra_k_cache=c8),
     "flash_mla_with_kvcache: extra_k_cache"),
    (lambda q, c8, idx: flash_mla.flash_mla_with_kvcache(q.half(), c8, None, None, 512, flash_mla.get_mla_metadata()[0],
                                                         is_fp8_kvcache=True, indices=idx),
     "flash_mla_with_kvcache: a float16 q"),
    (lambda q, c8, idx: flash_mla.flash_mla_sparse_fwd(q[0], c8, idx[0], 0.1, indexer_topk=512),
     "flash_mla_sparse_fwd: indexer_topk=512"),
    (lambda q, c8, idx: flash_mla.flash_attn_varlen_func(q, q, q, idx, idx, 1, 1), "flash_attn_varlen_func: the dense"),
    (lambda q, c8, idx: flash_mla.flash_attn_varlen_kvpacked_func(q, q, idx, idx, 1, 1, 576),
     "flash_attn_varlen_kvpacked_func"),
    (lambda q, c8, idx: flash_mla.fused_norm_rope_attn_rope_cast.decode(True, 1e-6),
     "fused_norm_rope_attn_rope_cast.decode"),
])
def test_what_is_not_implemented_names_the_function(call, name, seed):
    q, c8, idx = _sparse_problem(1, 1, 16, 8, pages=1)
    with pytest.raises(NotImplementedError, match=f"flash_mla.{name}.*not implemented by pykernels"):
        call(q, c8, idx)
