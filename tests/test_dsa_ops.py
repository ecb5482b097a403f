"""The DSA custom ops (torch.ops.pykernels.*): schema, fake implementations (the same
validation on fake tensors), registry entries, and a whole DSA decode step traced by
torch.compile with the same result as the eager call."""
import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
import pykernels.mla as M
from pykernels import registry

FP8 = torch.float8_e4m3fn
OPS = ("fp8_mqa_logits", "fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "topk_indices",
       "paged_topk_indices", "flash_mla_sparse_decode", "flash_mla_sparse_fwd")


TRITON_OPS = OPS    # every DSA op has a Triton version (tests/test_dsa_triton.py, test_dsa_schedule.py)


def test_every_dsa_op_is_registered_with_its_reference_backend():
    for name in OPS:
        got = set(registry.get(name).backends)
        assert "reference" in got and (name not in TRITON_OPS or "triton" in got), (name, got)
        assert ("cuda" in got) == ("emu" in got), (name, got)       # a hand-written kernel: GPU and emulator
        assert hasattr(torch.ops.pykernels, name), name


def _step_inputs(b=2, next_n=2, h=4, d=64, h_q=16, pages=6, max_blocks=3, topk=20):
    lens = torch.tensor([150, 17], dtype=torch.int32)[:b]
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    return dict(q_idx=torch.randn(b, next_n, h, d).to(FP8),
                index_cache=D.quantize_indexer_k_cache(torch.randn(pages, 64, 1, d)),
                w=torch.randn(b * next_n, h), lens=lens, table=table,
                c8=M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16()),
                q=torch.randn(b, next_n, h_q, 576).bfloat16(), topk=topk, width=max_blocks * 64)


def test_custom_ops_opcheck(seed):
    a = _step_inputs()
    b, next_n, h_q = a["q"].shape[:3]
    meta = D.get_paged_mqa_logits_metadata(a["lens"], 64, 4)
    logits = D.fp8_paged_mqa_logits(a["q_idx"], a["index_cache"], a["w"], a["lens"], a["table"], meta, a["width"])
    idx = D.paged_topk_indices(logits, a["topk"], a["lens"], a["table"])
    k8, sf = D.indexer_k_cast_to_fp8(torch.randn(30, 64))
    mq, ks, ke = torch.randn(5, 4, 64).to(FP8), torch.zeros(5, dtype=torch.int32), torch.full((5,), 30, dtype=torch.int32)
    sq, skv = 3, 20
    checks = [
        (torch.ops.pykernels.fp8_mqa_logits.default,
         (mq, k8, sf, torch.randn(5, 4), ks, ke, torch.empty(5, 30), True, "reference")),
        (torch.ops.pykernels.get_paged_mqa_logits_metadata.default, (a["lens"], 64, 4, "reference")),
        (torch.ops.pykernels.fp8_paged_mqa_logits.default,
         (a["q_idx"], a["index_cache"], a["w"], a["lens"], a["table"], meta, torch.empty(b * next_n, a["width"]),
          a["width"], True, "reference")),
        (torch.ops.pykernels.topk_indices.default,
         (torch.randn(5, 30), ks, ke, 8, torch.empty(5, 8, dtype=torch.int32), "reference")),
        (torch.ops.pykernels.paged_topk_indices.default,
         (logits, a["lens"], a["table"], a["topk"], torch.empty(b, next_n, a["topk"], dtype=torch.int32),
          "reference")),
        (torch.ops.pykernels.flash_mla_sparse_decode.default,
         (a["q"], a["c8"], idx, torch.randn(h_q), None, None, None,
          torch.empty(b, next_n, h_q, 512, dtype=torch.bfloat16), torch.empty(b, h_q, next_n), 512, 0.05,
          "reference")),
        (torch.ops.pykernels.flash_mla_sparse_fwd.default,
         (torch.randn(sq, 8, 576).bfloat16(), torch.randn(skv, 1, 576).bfloat16(),
          torch.randint(-1, skv, (sq, 1, 6), dtype=torch.int32), None, torch.tensor([6, 2, 0], dtype=torch.int32),
          torch.empty(sq, 8, 512, dtype=torch.bfloat16), torch.empty(sq, 8), torch.empty(sq, 8), 0.05, 512,
          "reference")),
    ]
    # test_aot_dispatch_dynamic would make the lengths symbolic; the reference reads them.
    # test_schema compares inputs with an op torch lacks for fp8 on CPU: not run on fp8 inputs.
    for fn, args in checks:
        fp8_input = any(isinstance(t, torch.Tensor) and t.dtype == FP8 for t in args)
        utils = ("test_faketensor", "test_autograd_registration") + (() if fp8_input else ("test_schema",))
        result = torch.library.opcheck(fn, args, test_utils=utils)
        assert result == {u: "SUCCESS" for u in utils}, (fn, result)


def test_fake_tensors_are_validated_like_real_ones():
    # The fake implementation runs the same problem builder: a bad shape fails while tracing.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 1, 16, 576, dtype=torch.bfloat16)
        c8 = torch.empty(3, 64, 1, 656, dtype=torch.uint8)
        idx = torch.empty(2, 1, 8, dtype=torch.int64)
        with pytest.raises(TypeError, match="indices: expected dtype int32, got int64"):
            torch.ops.pykernels.flash_mla_sparse_decode(
                q, c8, idx, None, None, None, None, torch.empty(2, 1, 16, 512, dtype=torch.bfloat16),
                torch.empty(2, 16, 1), 512, 0.05, "reference")


def test_torch_compile_dsa_decode_step(seed):
    a = _step_inputs()

    def step(q_idx, index_cache, w, lens, table, c8, q):
        meta = pk.get_paged_mqa_logits_metadata(lens, 64, 4)
        logits = pk.fp8_paged_mqa_logits(q_idx, index_cache, w, lens, table, meta, 192)
        idx = pk.paged_topk_indices(logits, 20, lens, table)
        return M.flash_mla_with_kvcache(q, c8, None, None, 512, None, None, is_fp8_kvcache=True, indices=idx)

    args = (a["q_idx"], a["index_cache"], a["w"], a["lens"], a["table"], a["c8"], a["q"])
    got, got_lse = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want, want_lse = step(*args)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
