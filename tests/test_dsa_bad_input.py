"""Bad and edge-case calls of every DSA op, in the bad-input table's format
(tests/bad_input_cases.py, family "dsa"): each must end in a clear exception naming the
argument, or in the reference's result, through both the public function and the
torch.ops.pykernels form. The table runs in a child process, as for the other families."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NAN = float("nan")
FP8 = torch.float8_e4m3fn


def _err(arg):
    return ("error", arg)


REF = ("ref",)


def _either(arg):
    return ("either", arg)


def _case(op_name, name, expect, api, op, outs=(), compare="close", forms=("api", "op")):
    return dict(name=f"{op_name}/{name}", op_name=op_name, expect=expect, forms=forms, compare=compare,
                outs=tuple(outs), api=api, op=op)


def _mqa_cases():
    import pykernels.dsa as D
    m, n, h, d = 4, 40, 4, 64
    q = torch.randn(m, h, d).to(FP8)
    k, sf = D.indexer_k_cast_to_fp8(torch.randn(n, d))
    w = torch.randn(m, h)
    ks = torch.tensor([0, 3, 10, 40], dtype=torch.int32)
    ke = torch.tensor([40, 3, 20, 40], dtype=torch.int32)

    def case(name, expect, forms=("api", "op"), **over):
        a = dict(q=q, k=k, sf=sf, w=w, ks=ks, ke=ke, clean=True)
        a.update(over)
        aq = a["q"]
        out = a.pop("out", torch.full((aq.shape[0] if aq.dim() else 1, a["k"].shape[0]), NAN))
        return _case("fp8_mqa_logits", name, expect, outs=(out,), forms=forms,
                     api=lambda be: D.fp8_mqa_logits(a["q"], (a["k"], a["sf"]), a["w"], a["ks"], a["ke"], a["clean"],
                                                     backend=be, out=out),
                     op=lambda be: torch.ops.pykernels.fp8_mqa_logits(a["q"], a["k"], a["sf"], a["w"], a["ks"],
                                                                      a["ke"], out, a["clean"], be))
    shared = torch.full((m, n), NAN)
    return [
        case("valid", REF),
        case("q-bf16", _err("q"), q=q.bfloat16()),
        case("q-head-dim-48", _err("q"), q=q[..., :48].contiguous(), k=k[:, :48].contiguous()),
        case("q-non-contiguous", _err("q"), q=torch.randn(h, m, d).to(FP8).transpose(0, 1)),
        case("k-head-dim", _err("k"), k=torch.zeros(n, 32, dtype=FP8)),
        case("k_scales-shape", _err("k_scales"), sf=sf[:-1]),
        case("k_scales-float16", _err("k_scales"), sf=sf.half()),
        case("weights-shape", _err("weights"), w=w[:, :2]),
        case("ks-int64", _err("cu_seqlen_ks"), ks=ks.long()),
        case("ks-negative", _err("cu_seqlen_ks"), ks=torch.tensor([-1, 3, 10, 40], dtype=torch.int32)),
        case("ke-past-keys", _err("cu_seqlen_ke"), ke=torch.tensor([41, 3, 20, 40], dtype=torch.int32)),
        case("ke-before-ks", _err("cu_seqlen_ke"), ke=torch.tensor([40, 2, 20, 40], dtype=torch.int32)),
        case("out-shape", _err("out"), out=torch.full((m, n + 1), NAN)),
        case("out-expanded", _err("out"), out=torch.full((1, n), NAN).expand(m, n)),
        case("out-overlaps-weights", _err("out"), out=shared, w=shared[:, :h]),
        case("clean_logits-string", _err("clean_logits"), forms=("api",), clean="yes"),
        case("mixed-devices", _err("cu_seqlen_ks"), ks=ks.to("meta")),
        dict(case("kv-not-a-pair", _err("kv"), forms=("api",)),
             api=lambda be: D.fp8_mqa_logits(q, k, w, ks, ke, backend=be)),
        dict(case("unknown-backend", _err("backend")),
             api=lambda be: D.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="gpu"),
             op=lambda be: torch.ops.pykernels.fp8_mqa_logits(q, k, sf, w, ks, ke, torch.empty(m, n), True, "bogus")),
    ]


def _paged_cases():
    import pykernels.dsa as D
    b, next_n, h, d, pages, max_blocks, width = 2, 2, 4, 64, 6, 3, 200
    q = torch.randn(b, next_n, h, d).to(FP8)
    cache = D.quantize_indexer_k_cache(torch.randn(pages, 64, 1, d))
    w = torch.randn(b * next_n, h)
    lens = torch.tensor([150, 17], dtype=torch.int32)
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    meta = D.get_paged_mqa_logits_metadata(lens, 64, 4)
    stale = D.get_paged_mqa_logits_metadata(torch.tensor([150, 1000], dtype=torch.int32), 64, 4)

    def case(name, expect, forms=("api", "op"), **over):
        a = dict(q=q, cache=cache, w=w, lens=lens, table=table, meta=meta, width=width)
        a.update(over)
        out = a.pop("out", torch.full((b * next_n, a["width"] if a["width"] >= 0 else 1), NAN))
        return _case("fp8_paged_mqa_logits", name, expect, outs=(out,), forms=forms,
                     api=lambda be: D.fp8_paged_mqa_logits(a["q"], a["cache"], a["w"], a["lens"], a["table"],
                                                           a["meta"], a["width"], backend=be, out=out),
                     op=lambda be: torch.ops.pykernels.fp8_paged_mqa_logits(
                         a["q"], a["cache"], a["w"], a["lens"], a["table"], a["meta"], out, a["width"], True, be))
    t_neg, t_past, t_unused = table.clone(), table.clone(), table.clone()
    t_neg[0, 1] = -1
    t_past[0, 2] = pages
    t_unused[1, 2] = 10 ** 6                                       # sequence 1 uses one page
    lens2 = torch.tensor([[149, 150], [0, 17]], dtype=torch.int32)
    return [
        case("valid", REF),
        case("valid-2d-context-lens", REF, lens=lens2, meta=D.get_paged_mqa_logits_metadata(lens2, 64, 4)),
        case("block_table-unused-past-cache", REF, table=t_unused),
        case("q-rank3", _err("q"), q=q[0]),
        case("kv_cache-float32", _err("kv_cache"), cache=cache.float()),
        case("kv_cache-width", _err("kv_cache"), cache=cache[..., :66].contiguous()),
        case("weights-rows", _err("weights"), w=w[:3]),
        case("context_lens-past-table", _err("context_lens"), lens=torch.tensor([150, 193], dtype=torch.int32)),
        case("context_lens-negative", _err("context_lens"), lens=torch.tensor([150, -1], dtype=torch.int32)),
        case("context_lens-shape", _err("context_lens"), lens=lens[:1]),
        case("block_table-negative", _err("block_table"), table=t_neg),
        case("block_table-past-cache", _err("block_table"), table=t_past),
        case("schedule-stale", _err("schedule_metadata"), meta=stale),
        case("schedule-shape", _err("schedule_metadata"), meta=meta[:, :1].contiguous()),
        case("max_context_len-short", _err("context_lens"), width=100),
        case("max_context_len-negative", _err("max_context_len"), forms=("api",), width=-1),
        case("out-shape", _err("out"), out=torch.full((b * next_n, width - 1), NAN)),
    ]


def _metadata_cases():
    import pykernels.dsa as D
    lens = torch.tensor([150, 17, 0], dtype=torch.int32)

    def case(name, expect, sl=lens, blk=64, sms=8):
        return _case("get_paged_mqa_logits_metadata", name, expect, compare="bits",
                     api=lambda be: D.get_paged_mqa_logits_metadata(sl, blk, sms, backend=be),
                     op=lambda be: torch.ops.pykernels.get_paged_mqa_logits_metadata(sl, blk, sms, be))
    return [
        case("valid", REF),
        case("valid-2d", REF, sl=torch.tensor([[3, 4], [200, 0]], dtype=torch.int32)),
        case("empty-batch", REF, sl=torch.empty(0, dtype=torch.int32)),
        case("block_kv-zero", _err("block_kv"), blk=0),
        case("num_sms-zero", _err("num_sms"), sms=0),
        case("context_lens-int64", _err("context_lens"), sl=lens.long()),
        case("context_lens-3d", _err("context_lens"), sl=lens.view(1, 3, 1)),
        case("context_lens-negative", _err("context_lens"), sl=torch.tensor([3, -2], dtype=torch.int32)),
    ]


def _topk_cases():
    import pykernels.dsa as D
    m, n, k = 3, 50, 8
    logits = torch.randn(m, n)
    ks = torch.tensor([0, 10, 50], dtype=torch.int32)
    ke = torch.tensor([50, 12, 50], dtype=torch.int32)
    b, next_n, max_blocks = 2, 2, 3
    plogits = torch.randn(b * next_n, 190)
    lens = torch.tensor([150, 17], dtype=torch.int32)
    table = torch.randperm(10)[:b * max_blocks].int().view(b, max_blocks)

    def case(name, expect, forms=("api", "op"), **over):
        a = dict(logits=logits, ks=ks, ke=ke, k=k)
        a.update(over)
        out = a.pop("out", torch.full((a["logits"].shape[0], max(a["k"], 1)), -7, dtype=torch.int32))
        return _case("topk_indices", name, expect, outs=(out,), compare="bits", forms=forms,
                     api=lambda be: D.topk_indices(a["logits"], a["k"], a["ks"], a["ke"], backend=be, out=out),
                     op=lambda be: torch.ops.pykernels.topk_indices(a["logits"], a["ks"], a["ke"], a["k"], out, be))

    def paged(name, expect, forms=("api", "op"), **over):
        a = dict(logits=plogits, lens=lens, table=table, k=k)
        a.update(over)
        out = a.pop("out", torch.full((b, next_n, max(a["k"], 1)), -7, dtype=torch.int32))
        return _case("paged_topk_indices", name, expect, outs=(out,), compare="bits", forms=forms,
                     api=lambda be: D.paged_topk_indices(a["logits"], a["k"], a["lens"], a["table"], backend=be,
                                                         out=out),
                     op=lambda be: torch.ops.pykernels.paged_topk_indices(a["logits"], a["lens"], a["table"], a["k"],
                                                                          out, be))
    t_neg = table.clone()
    t_neg[0, 2] = -5
    return [
        case("valid", REF),
        case("topk-past-window", REF, k=60, out=torch.full((m, 60), -7, dtype=torch.int32)),
        case("topk-zero", _err("topk"), k=0),
        case("logits-float16", _err("logits"), logits=logits.half()),
        case("ke-before-ks", _err("cu_seqlen_ke"), ke=torch.tensor([50, 9, 50], dtype=torch.int32)),
        case("out-shape", _err("out"), out=torch.full((m, k + 1), -7, dtype=torch.int32)),
        case("out-expanded", _err("out"), out=torch.full((1, k), -7, dtype=torch.int32).expand(m, k)),
        paged("valid", REF),
        paged("topk-zero", _err("topk"), k=0),
        paged("logits-rows", _err("logits"), logits=plogits[:3]),
        paged("context_lens-past-logits", _err("context_lens"), lens=torch.tensor([191, 17], dtype=torch.int32)),
        paged("block_table-negative", _err("block_table"), table=t_neg),
        paged("out-int64", _err("out"), out=torch.full((b, next_n, k), -7, dtype=torch.int64)),
    ]


def _sparse_decode_cases():
    import pykernels.mla as M
    from bad_input_cases import misaligned     # the table's module (the child process runs from tests/)
    b, s_q, h_q, topk, pages = 2, 2, 16, 12, 4
    c8 = M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, pages * 64, (b, s_q, topk), dtype=torch.int32)
    idx[0, 1, 4:] = -1
    sink = torch.randn(h_q)
    length = torch.tensor([12, 5], dtype=torch.int32)
    meta, splits = M.get_mla_metadata(torch.zeros(b, dtype=torch.int32), s_q * h_q, 1, h_q, True, topk)
    stale_meta, stale_splits = M.get_mla_metadata(torch.zeros(b, dtype=torch.int32), s_q * h_q, 1, h_q, True, 500)

    def case(name, expect, forms=("api", "op"), **over):
        a = dict(q=q, cache=c8, idx=idx, sink=sink, length=length, meta=meta, splits=splits, scale=0.05,
                 causal=False, fp8=True, head_dim_v=512)
        a.update(over)
        out = a.pop("out", torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16))
        lse = a.pop("lse", torch.full((b, h_q, s_q), NAN))
        return _case("flash_mla_sparse_decode", name, expect, outs=(out, lse), forms=forms,
                     api=lambda be: M.flash_mla_with_kvcache(
                         a["q"], a["cache"], None, None, a["head_dim_v"], a["meta"], a["splits"], a["scale"],
                         a["causal"], a["fp8"], a["idx"], a["sink"], topk_length=a["length"], backend=be, out=out,
                         softmax_lse=lse),
                     op=lambda be: torch.ops.pykernels.flash_mla_sparse_decode(
                         a["q"], a["cache"], a["idx"], a["sink"], a["length"], a["meta"], a["splits"], out, lse,
                         a["head_dim_v"], a["scale"], be))
    i_past, i_neg, i_unused = idx.clone(), idx.clone(), idx.clone()
    i_past[1, 0, 0] = pages * 64
    i_neg[0, 0, 2] = -2
    i_unused[1, 1, 7] = 10 ** 6                                 # at/past topk_length 5: never read
    nan_cache = c8.clone().view(-1, 656)
    nan_cache[int(idx[0, 1, 5]), :512] = 0x7F                   # an unused slot's row: NaN bytes
    return [
        case("valid", REF),
        case("no-sink-no-length-no-schedule", REF, sink=None, length=None, meta=None, splits=None),
        case("unused-slot-past-cache", REF, idx=i_unused),
        case("nan-in-unused-row", REF, cache=nan_cache.view(pages, 64, 1, 656)),
        case("float8-view-cache", REF, cache=c8.view(FP8)),
        case("cache-bf16", _err("k_cache"), cache=torch.randn(pages, 64, 1, 576).bfloat16()),
        case("indices-int64", _err("indices"), idx=idx.long()),
        case("indices-shape", _err("indices"), idx=idx[:1]),
        case("indices-past-cache", _err("indices"), idx=i_past),
        case("indices-minus-two", _err("indices"), idx=i_neg),
        case("topk_length-past-topk", _err("topk_length"), length=torch.tensor([13, 5], dtype=torch.int32)),
        case("topk_length-shape", _err("topk_length"), length=length[:1]),
        case("attn_sink-shape", _err("attn_sink"), sink=sink[:8]),
        case("attn_sink-float64", _err("attn_sink"), sink=sink.double()),
        case("schedule-stale", _err("tile_scheduler_metadata"), meta=stale_meta, splits=stale_splits),
        case("num_splits-shape", _err("num_splits"), splits=splits[:-1]),
        case("softmax_scale-negative", _err("softmax_scale"), scale=-1.0),
        case("head_dim_v", _err("head_dim_v"), head_dim_v=576),
        case("out-shape", _err("out"), out=torch.full((b, s_q, h_q, 256), NAN, dtype=torch.bfloat16)),
        case("lse-shape", _err("softmax_lse"), lse=torch.full((b, s_q, h_q), NAN)),
        case("lse-expanded", _err("softmax_lse"), lse=torch.full((b, 1, s_q), NAN).expand(b, h_q, s_q)),
        case("cache-misaligned", _either("k_cache"), cache=misaligned(c8, 1)),   # a kernel's limit or the result
        case("is_fp8_kvcache-false", _err("is_fp8_kvcache"), forms=("api",), fp8=False),
        case("causal-true", _err("causal"), forms=("api",), causal=True),
    ]


def _sparse_prefill_cases():
    import pykernels.dsa as D
    s_q, h_q, s_kv, topk = 4, 8, 30, 6
    q = torch.randn(s_q, h_q, 576).bfloat16()
    kv = torch.randn(s_kv, 1, 576).bfloat16()
    idx = torch.randint(-1, s_kv + 3, (s_q, 1, topk), dtype=torch.int32)
    sink = torch.randn(h_q)
    length = torch.tensor([6, 0, 3, 6], dtype=torch.int32)

    def case(name, expect, forms=("api", "op"), **over):
        a = dict(q=q, kv=kv, idx=idx, scale=0.05, d_v=512, sink=sink, length=length)
        a.update(over)
        out = a.pop("out", torch.full((s_q, h_q, 512), NAN, dtype=torch.bfloat16))
        mx = a.pop("max_logits", torch.full((s_q, h_q), NAN))
        lse = a.pop("lse", torch.full((s_q, h_q), NAN))
        return _case("flash_mla_sparse_fwd", name, expect, outs=(out, mx, lse), forms=forms,
                     api=lambda be: D.flash_mla_sparse_fwd(a["q"], a["kv"], a["idx"], a["scale"], a["d_v"], a["sink"],
                                                           a["length"], backend=be, out=out, max_logits=mx, lse=lse),
                     op=lambda be: torch.ops.pykernels.flash_mla_sparse_fwd(
                         a["q"], a["kv"], a["idx"], a["sink"], a["length"], out, mx, lse, a["scale"], a["d_v"], be))
    return [
        case("valid", REF),
        case("valid-no-sink-no-length", REF, sink=None, length=None),
        case("kv-no-rows", REF, kv=torch.randn(0, 1, 576).bfloat16()),     # every slot unused
        case("q-head-dim-600", _err("q"), q=torch.randn(s_q, h_q, 600).bfloat16()),
        case("kv-h_kv-2", _err("kv"), kv=torch.randn(s_kv, 2, 576).bfloat16()),
        case("indices-shape", _err("indices"), idx=idx[:, :, None, :]),
        case("sm_scale-zero", _err("sm_scale"), scale=0.0),
        case("d_v-576", _err("d_v"), d_v=576, out=torch.full((s_q, h_q, 576), NAN, dtype=torch.bfloat16)),
        case("topk_length-past-topk", _err("topk_length"), length=torch.tensor([7, 0, 3, 6], dtype=torch.int32)),
        case("attn_sink-shape", _err("attn_sink"), sink=sink[:4]),
        case("out-float32", _err("out"), out=torch.full((s_q, h_q, 512), NAN)),
        case("lse-shape", _err("lse"), lse=torch.full((h_q, s_q), NAN)),
        case("lse-expanded", _err("lse"), lse=torch.full((1, h_q), NAN).expand(s_q, h_q)),
        case("out-expanded", _err("out"),
             out=torch.full((s_q, 1, 512), NAN, dtype=torch.bfloat16).expand(s_q, h_q, 512)),
    ]


def dsa_cases():
    """The DSA family's rows of the bad-input table (tests/bad_input_cases.py)."""
    return (_mqa_cases() + _paged_cases() + _metadata_cases() + _topk_cases() + _sparse_decode_cases()
            + _sparse_prefill_cases())


def test_kernel_backends_decline_a_misaligned_k_scales(monkeypatch):
    # supports() names it (so backend="auto" on a GPU falls back) rather than the launch: the
    # cuda backend's answer on CPU tensors, its device check stubbed out; emu gives the same reason
    from pykernels import registry
    from pykernels.ops import backends

    import pykernels.dsa as D

    from .bad_input_cases import misaligned
    monkeypatch.setattr(backends, "_cuda_unavailable", lambda device: None)
    m, n, h = 4, 96, 32                                       # a shape the kernel takes (head dim 128)
    q = torch.randn(m, h, 128).to(FP8)
    k, sf = D.indexer_k_cast_to_fp8(torch.randn(n, 128))
    w, ks, ke = torch.randn(m, h), torch.zeros(m, dtype=torch.int32), torch.full((m,), n, dtype=torch.int32)
    op = registry.get("fp8_mqa_logits")
    assert op.backends["cuda"].supports(op.build(q, (k, sf), w, ks, ke)) is None
    problem = op.build(q, (k, misaligned(sf, 1 + int(torch.randint(0, 3, ())))), w, ks, ke)
    for name in ("cuda", "emu"):
        reason = op.backends[name].supports(problem)
        assert reason.startswith("k_scales:") and "16-byte aligned" in reason, (name, reason)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dsa_bad_input_table(backend):
    script = Path(__file__).with_name("bad_input_cases.py")
    proc = subprocess.run([sys.executable, str(script), "dsa", backend], capture_output=True, text=True,
                          timeout=900, cwd=script.parent.parent)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"case"')]
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = [r for r in results if r["verdict"] != "n/a"]      # ops without this backend: n/a
    assert len(ran) >= (100 if backend == "reference" else 40), f"only {len(ran)} cases ran: {proc.stderr[-2000:]}"
    bad = [f"{r['case']} [{r['form']}]: {r['detail']}" for r in ran if r["verdict"] != "ok"]
    assert not bad, f"{len(bad)} of {len(results)} cases wrong:\n" + "\n".join(bad)
