"""The bad-input table: edge-case and bad calls of every public op, each ending either in a
clear exception that names the argument (ValueError / TypeError) or in the reference's
result. Run per (family, backend) in a child process by tests/test_bad_input.py:

    python tests/bad_input_cases.py FAMILY BACKEND

prints one JSON line per (case, form) where form is "api" (pykernels.<op>) or "op"
(torch.ops.pykernels.<op>): {"case", "form", "verdict": "ok" | "bad", "detail"}. Each
case runs under an alarm (CASE_SECONDS); a case that crashes the process is named by the
parent from the last "start" line.
"""
import json
import math
import signal
import sys

import torch

CASE_SECONDS = 120
NAN = float("nan")

Case = dict   # name, api / op (callable(backend) -> outputs), expect: ("error", arg) | ("ref",) | ("either", arg)
# "either": the reference's result, or (a backend whose kernel does not take the shape) a
# clear error naming the argument.


def _err(arg):
    return ("error", arg)


REF = ("ref",)


def _either(arg):
    return ("either", arg)


def misaligned(t, elems=1):
    """A contiguous copy of t at a storage offset of `elems` elements (its data pointer off
    the allocator's alignment)."""
    view = torch.empty(t.numel() + elems, dtype=t.dtype)[elems:].view(t.shape)
    return view.copy_(t)


# --- quantization --------------------------------------------------------------------------

def quant_cases():
    import pykernels as pk

    def case(name, x, expect, op="per_token_cast_to_fp8", forms=("api", "op")):
        return dict(name=f"{op}/{name}", op_name=op, expect=expect, forms=forms,
                    api=lambda be: getattr(pk, op)(x, backend=be),
                    op=lambda be: getattr(torch.ops.pykernels, op)(x, be),
                    compare="bits")

    x = torch.randn(40, 300) * 3
    big = torch.randn(300, 260)
    special = torch.randn(8, 256)
    special[0, 5], special[1, 130], special[2, 0], special[3, 255] = NAN, float("inf"), -float("inf"), 3e38
    out = []
    for op in ("per_token_cast_to_fp8", "per_block_cast_to_fp8"):
        out += [
            case("int32", x.int(), _err("x"), op),
            case("float64", x.double(), _err("x"), op),
            case("rank3", x[None], _err("x"), op),
            case("rank1", x[0], _err("x"), op),
            case("transposed", big.t(), _err("x"), op),
            case("inner-stride-2", x[:, ::2], _err("x"), op),
            case("offset-view", big[3:, 5:], REF, op),
            case("row-stride-view", big[::2], REF, op),
            case("zero-rows", torch.empty(0, 256), REF, op),
            case("zero-cols", torch.empty(5, 0), REF, op),
            case("bf16", x.bfloat16(), REF, op),
            case("fp16-max", torch.full((4, 128), 65504.0).half(), REF, op),
            case("nan-inf-huge", special, REF, op),
            case("tiny-denormal", torch.full((2, 128), 1e-42), REF, op),
            case("not-a-tensor", [[1.0, 2.0]], _err("x"), op, forms=("api",)),
            dict(case("unknown-backend", x, _err("backend"), op),
                 api=lambda be, op=op: getattr(pk, op)(x, backend="bogus"),
                 op=lambda be, op=op: getattr(torch.ops.pykernels, op)(x, "cuda_v2")),
        ]
    return out


# --- GEMM ------------------------------------------------------------------------------------

def _fp8(x):
    from pykernels import reference as R
    return R.per_token_cast_to_fp8(x)


def _w(n, k, groups=None):
    from pykernels import reference as R
    if groups is None:
        return R.per_block_cast_to_fp8(torch.randn(n, k))
    pairs = [R.per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(groups)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def gemm_cases():
    import pykernels as pk
    from pykernels.quant import get_col_major_tma_aligned_tensor as col_major

    def nan_out(*shape):
        return torch.full(shape, NAN, dtype=torch.bfloat16)

    def normal(name, a, sfa, b, sfb, out, expect, forms=("api", "op")):
        return dict(name=f"fp8_gemm_nt/{name}", op_name="fp8_gemm_nt", expect=expect, forms=forms,
                    compare="close", outs=(out,),
                    api=lambda be: pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend=be),
                    op=lambda be: torch.ops.pykernels.fp8_gemm_nt(a, sfa, b, sfb, out, be))

    def contiguous(name, a, sfa, b, sfb, out, idx, expect, forms=("api", "op")):
        return dict(name=f"m_grouped_contiguous/{name}", op_name="m_grouped_fp8_gemm_nt_contiguous", expect=expect,
                    forms=forms, compare="close", outs=(out,),
                    api=lambda be: pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend=be),
                    op=lambda be: torch.ops.pykernels.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, out, idx, be))

    def masked(name, a, sfa, b, sfb, out, mm, em, expect, forms=("api", "op")):
        return dict(name=f"m_grouped_masked/{name}", op_name="m_grouped_fp8_gemm_nt_masked", expect=expect,
                    forms=forms, compare="close", outs=(out,),
                    api=lambda be: pk.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, mm, em, backend=be),
                    op=lambda be: torch.ops.pykernels.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, out, mm, em, be))

    m, n, k = 40, 64, 256
    a, sfa = _fp8(torch.randn(m, k))
    b, sfb = _w(n, k)
    a_nan = a.clone()
    a_nan.view(torch.uint8)[3, 7] = 0x7F                       # e4m3 NaN
    sfa_inf = sfa.clone()
    sfa_inf[5, 1] = float("inf")
    sfb_huge = sfb * 1e30
    big_a, big_sfa = _fp8(torch.randn(m + 16, k))
    a_off, sfa_off = big_a[16:], big_sfa[16:]                  # offset views (16 rows of k bytes)
    a_sq, sfa_sq = _fp8(torch.randn(64, 128))
    b_sq, sfb_sq = _w(64, 128)
    out_alias = a_sq.view(torch.bfloat16)                       # [64, 64] bf16 over a's bytes
    cases = [
        normal("valid", a, sfa, b, sfb, nan_out(m, n), REF),
        normal("col-major-sfa", a, col_major(sfa), b, sfb, nan_out(m, n), REF),
        normal("offset-views", a_off, sfa_off, b, sfb, nan_out(m, n), REF),
        normal("a-bf16", a.bfloat16(), sfa, b, sfb, nan_out(m, n), _err("a")),
        normal("b-int8", a, sfa, b.view(torch.int8), sfb, nan_out(m, n), _err("b")),
        normal("a-rank3", a[None], sfa[None], b, sfb, nan_out(m, n), _err("a")),
        normal("k-mismatch", a, sfa, _w(n, 128)[0], _w(n, 128)[1], nan_out(m, n), _err("b")),
        normal("k-not-16", a[:, :200].contiguous(), sfa[:, :2].contiguous(), b[:, :200].contiguous(),
               sfb[:, :2].contiguous(), nan_out(m, n), _err("k")),
        normal("k-partial-block", a[:, :208].contiguous(), sfa[:, :2].contiguous(), b[:, :208].contiguous(),
               sfb[:, :2].contiguous(), nan_out(m, n), REF),
        normal("k-16", a[:, :16].contiguous(), sfa[:, :1].contiguous(), b[:, :16].contiguous(),
               sfb[:, :1].contiguous(), nan_out(m, n), REF),
        normal("sfa-shape", a, sfa[:, :1].contiguous(), b, sfb, nan_out(m, n), _err("sfa")),
        normal("sfa-float16", a, sfa.half(), b, sfb, nan_out(m, n), _err("sfa")),
        normal("sfa-strided", a, torch.empty(m, 4)[:, ::2].copy_(sfa), b, sfb, nan_out(m, n), _err("sfa")),
        normal("sfb-shape", a, sfa, b, sfb[:, :1].contiguous(), nan_out(m, n), _err("sfb")),
        normal("a-transposed", _fp8(torch.randn(k, m))[0].t(), sfa, b, sfb, nan_out(m, n), _err("a")),
        normal("b-transposed", a, sfa, _fp8(torch.randn(k, n))[0].t(), sfb, nan_out(m, n), _err("b")),
        normal("out-too-small", a, sfa, b, sfb, nan_out(m - 1, n), _err("out")),
        normal("out-float32", a, sfa, b, sfb, torch.full((m, n), NAN), REF),
        normal("out-float16", a, sfa, b, sfb, torch.full((m, n), NAN).half(), _err("out")),
        normal("out-transposed", a, sfa, b, sfb, nan_out(n, m).t(), _err("out")),
        normal("out-aliases-a", a_sq, sfa_sq, b_sq, sfb_sq, out_alias, _err("out")),
        normal("out-requires-grad", a, sfa, b, sfb, nan_out(m, n).requires_grad_(), _err("out"), forms=("api",)),
        normal("mixed-devices", a, sfa, b, sfb.to("meta"), nan_out(m, n), _err("sfb")),
        normal("zero-m", a[:0], sfa[:0], b, sfb, nan_out(0, n), REF),
        normal("zero-n", a, sfa, b[:0], sfb[:0], nan_out(m, 0), REF),
        normal("zero-k", a[:, :0], sfa[:, :0], b[:, :0], sfb[:, :0], nan_out(m, n), REF),
        normal("nan-in-a", a_nan, sfa, b, sfb, nan_out(m, n), REF),
        normal("inf-in-sfa", a, sfa_inf, b, sfb, nan_out(m, n), REF),
        normal("huge-sfb", a, sfa, b, sfb_huge, nan_out(m, n), REF),
        normal("n-not-multiple-of-8", a, sfa, *_w(100, k), nan_out(m, 100), _either("n")),
        normal("unknown-backend", a, sfa, b, sfb, nan_out(m, n), _err("backend")),
        normal("not-a-pair", a, sfa, b, sfb, nan_out(m, n), _err("a"), forms=("api",)),
    ]
    cases[-2]["api"] = lambda be: pk.fp8_gemm_nt((a, sfa), (b, sfb), nan_out(m, n), backend="Triton")
    cases[-2]["op"] = lambda be: torch.ops.pykernels.fp8_gemm_nt(a, sfa, b, sfb, nan_out(m, n), "")
    cases[-1]["api"] = lambda be: pk.fp8_gemm_nt(a, (b, sfb), nan_out(m, n), backend=be)
    cases.append(dict(normal("pair-of-three", a, sfa, b, sfb, nan_out(m, n), _err("a"), forms=("api",)),
                      api=lambda be: pk.fp8_gemm_nt((a, sfa, sfa), (b, sfb), nan_out(m, n), backend=be)))

    # float32 out with c (DeepGEMM's fp32 forms); c = out accumulates in place; recipe (1, 1, 128)
    def with_c(name, out, c, expect, rows=128, accumulate=False):
        recipe = (1, 1, 128) if rows == 1 else None
        bb, sf = (b1, sfb1) if rows == 1 else (b, sfb)
        return dict(name=f"fp8_gemm_nt/{name}", op_name="fp8_gemm_nt", expect=expect, forms=("api", "op"),
                    compare="close", outs=(out,),
                    api=lambda be: pk.fp8_gemm_nt((a, sfa), (bb, sf), out, c=out if accumulate else c, recipe=recipe,
                                                  backend=be),
                    op=lambda be: torch.ops.pykernels.fp8_gemm_nt(a, sfa, bb, sf, out, be, None if accumulate else c,
                                                                  accumulate, rows))
    b1, sfb1 = _fp8(torch.randn(n, k))
    c32 = torch.randn(m, n)
    cases += [
        with_c("c-float32", torch.full((m, n), NAN), c32, REF),
        with_c("c-is-out", torch.randn(m, n), None, REF, accumulate=True),
        with_c("c-with-bf16-out", nan_out(m, n), c32, _err("c")),
        with_c("c-bfloat16", torch.full((m, n), NAN), c32.bfloat16(), _err("c")),
        with_c("c-shape", torch.full((m, n), NAN), c32[:, :8], _err("c")),
        with_c("wgrad-per-row-b-scales", torch.randn(m, n), None, _either("recipe"), rows=1, accumulate=True),
    ]

    # e4m3 out with its 1x128 scales (quantize-on-store): out given as the pair (out, sfd)
    def fp8_out(name, out, sfd, expect):
        return dict(name=f"fp8_gemm_nt/{name}", op_name="fp8_gemm_nt", expect=expect, forms=("api", "op"),
                    compare="close", outs=(out,) + (() if sfd is None else (sfd,)),   # Triton's sums: another order
                    api=lambda be: pk.fp8_gemm_nt((a, sfa), (b, sfb), out if sfd is None else (out, sfd), backend=be),
                    op=lambda be: torch.ops.pykernels.fp8_gemm_nt(a, sfa, b, sfb, out, be, None, False, 128, sfd))
    e4m3 = torch.float8_e4m3fn
    cases += [
        fp8_out("e4m3-out", torch.zeros(m, n, dtype=e4m3), torch.full((m, 1), NAN), _either("out")),
        fp8_out("e4m3-out-without-sfd", torch.zeros(m, n, dtype=e4m3), None, _err("sfd")),
        fp8_out("sfd-with-bf16-out", nan_out(m, n), torch.full((m, 1), NAN), _err("sfd")),
        fp8_out("sfd-shape", torch.zeros(m, n, dtype=e4m3), torch.full((m, 2), NAN), _err("sfd")),
    ]

    g = 3
    bg, sfbg = _w(n, k, g)
    rows = 4 * 128
    ac, sfac = _fp8(torch.randn(rows, k))
    idx = torch.cat([torch.full((100,), 0), torch.full((28,), -1), torch.full((128,), 2),
                     torch.full((60,), 1), torch.full((196,), -1)]).int()
    bad_hi, bad_lo = idx.clone(), idx.clone()
    bad_hi[130] = g
    bad_lo[5] = -2
    cases += [
        contiguous("valid", ac, sfac, bg, sfbg, nan_out(rows, n), idx, REF),
        contiguous("m_indices-past-groups", ac, sfac, bg, sfbg, nan_out(rows, n), bad_hi, _err("m_indices")),
        contiguous("m_indices-below-minus-one", ac, sfac, bg, sfbg, nan_out(rows, n), bad_lo, _err("m_indices")),
        contiguous("m_indices-int64", ac, sfac, bg, sfbg, nan_out(rows, n), idx.long(), _err("m_indices")),
        contiguous("m_indices-short", ac, sfac, bg, sfbg, nan_out(rows, n), idx[:-1], _err("m_indices")),
        contiguous("m_indices-strided", ac, sfac, bg, sfbg, nan_out(rows, n),
                   torch.stack([idx, idx], 1)[:, 0], _err("m_indices")),
        contiguous("b-not-grouped", ac, sfac, b, sfb, nan_out(rows, n), idx, _err("b")),
        contiguous("zero-groups", ac, sfac, bg[:0], sfbg[:0], nan_out(rows, n), torch.full((rows,), -1).int(), REF),
    ]

    m_max = 64
    am, sfam = (torch.stack(t) for t in zip(*[_fp8(torch.randn(m_max, k)) for _ in range(g)]))
    mm = torch.tensor([5, 0, 64], dtype=torch.int32)
    cases += [
        masked("valid", am, sfam, bg, sfbg, nan_out(g, m_max, n), mm, 32, REF),
        masked("masked_m-past-m_max", am, sfam, bg, sfbg, nan_out(g, m_max, n),
               torch.tensor([5, 65, 1], dtype=torch.int32), 32, _err("masked_m")),
        masked("masked_m-negative", am, sfam, bg, sfbg, nan_out(g, m_max, n),
               torch.tensor([5, -1, 1], dtype=torch.int32), 32, _err("masked_m")),
        masked("masked_m-strided", am, sfam, bg, sfbg, nan_out(g, m_max, n),
               torch.stack([mm, mm], 1)[:, 0], 32, _err("masked_m")),
        masked("masked_m-int64", am, sfam, bg, sfbg, nan_out(g, m_max, n), mm.long(), 32, _err("masked_m")),
        masked("groups-mismatch", am[:2], sfam[:2], bg, sfbg, nan_out(2, m_max, n), mm[:2], 32, _err("b")),
        masked("expected_m-negative", am, sfam, bg, sfbg, nan_out(g, m_max, n), mm, -1, _err("expected_m")),
    ]
    return cases + bf16_gemm_cases(m, n, k)


def bf16_gemm_cases(m, n, k):
    """bf16_gemm_nt: bf16 a [m, k], b [n, k], out bf16 or float32 (+ c)."""
    import pykernels as pk

    def bf16(name, a, b, out, expect, c=None, accumulate=False, forms=("api", "op")):
        return dict(name=f"bf16_gemm_nt/{name}", op_name="bf16_gemm_nt", expect=expect, forms=forms,
                    compare="close", outs=(out,),
                    api=lambda be: pk.bf16_gemm_nt(a, b, out, c=out if accumulate else c, backend=be),
                    op=lambda be: torch.ops.pykernels.bf16_gemm_nt(a, b, out, be, None if accumulate else c,
                                                                   accumulate))

    def nan_out(*shape, dtype=torch.bfloat16):
        return torch.full(shape, NAN, dtype=dtype)

    a, b = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
    rows = torch.randn(m + 3, k).bfloat16()                    # rows[3:]: a contiguous view at an offset
    wide = torch.randn(n, k + 16).bfloat16()                   # wide[:, :k]: row stride k + 16
    a_nan, b_inf = a.clone(), b.clone()
    a_nan[3, 7], b_inf[5, 0] = NAN, float("inf")
    sq = torch.randn(64, 64).bfloat16()
    c32 = torch.randn(m, n)
    return [
        bf16("valid", a, b, nan_out(m, n), REF),
        bf16("offset-view", rows[3:], b, nan_out(m, n), REF),
        bf16("a-float32", a.float(), b, nan_out(m, n), _err("a")),
        bf16("b-e4m3", a, b.to(torch.float8_e4m3fn), nan_out(m, n), _err("b")),
        bf16("a-rank3", a[None], b, nan_out(m, n), _err("a")),
        bf16("k-mismatch", a, b[:, :128].contiguous(), nan_out(m, n), _err("b")),
        bf16("k-not-16", a[:, :200].contiguous(), b[:, :200].contiguous(), nan_out(m, n), _err("k")),
        bf16("k-16", a[:, :16].contiguous(), b[:, :16].contiguous(), nan_out(m, n), REF),
        bf16("k-partial-64", a[:, :208].contiguous(), b[:, :208].contiguous(), nan_out(m, n), REF),
        bf16("a-transposed", torch.randn(k, m).bfloat16().t(), b, nan_out(m, n), _err("a")),
        bf16("b-row-stride", a, wide[:, :k], nan_out(m, n), _err("b")),
        bf16("out-too-small", a, b, nan_out(m - 1, n), _err("out")),
        bf16("out-float32", a, b, nan_out(m, n, dtype=torch.float32), REF),
        bf16("out-float16", a, b, nan_out(m, n, dtype=torch.float16), _err("out")),
        bf16("out-transposed", a, b, nan_out(n, m).t(), _err("out")),
        bf16("out-aliases-a", sq, sq[:32], sq.view(-1)[:64 * 32].view(64, 32), _err("out")),
        bf16("mixed-devices", a, b.to("meta"), nan_out(m, n), _err("b")),
        bf16("zero-m", a[:0], b, nan_out(0, n), REF),
        bf16("zero-n", a, b[:0], nan_out(m, 0), REF),
        bf16("zero-k", a[:, :0], b[:, :0], nan_out(m, n), REF),
        bf16("nan-in-a-inf-in-b", a_nan, b_inf, nan_out(m, n), REF),
        bf16("c-float32", a, b, nan_out(m, n, dtype=torch.float32), REF, c=c32),
        bf16("c-is-out", a, b, torch.randn(m, n), REF, accumulate=True),
        bf16("c-with-bf16-out", a, b, nan_out(m, n), _err("c"), c=c32),
        bf16("c-bfloat16", a, b, nan_out(m, n, dtype=torch.float32), _err("c"), c=c32.bfloat16()),
        bf16("c-shape", a, b, nan_out(m, n, dtype=torch.float32), _err("c"), c=c32[:, :8]),
        dict(bf16("unknown-backend", a, b, nan_out(m, n), _err("backend")),
             api=lambda be: pk.bf16_gemm_nt(a, b, nan_out(m, n), backend="Triton"),
             op=lambda be: torch.ops.pykernels.bf16_gemm_nt(a, b, nan_out(m, n), "")),
        dict(bf16("not-a-tensor", a, b, nan_out(m, n), _err("a"), forms=("api",)),
             api=lambda be: pk.bf16_gemm_nt(a.tolist(), b, nan_out(m, n), backend=be)),
    ]


# --- MLA ---------------------------------------------------------------------------------------

def mla_cases():
    import pykernels.mla as M

    b, s_q, h_q, pages, max_blocks = 2, 1, 16, 8, 3
    seqlens = torch.tensor([150, 17], dtype=torch.int32)
    cache = torch.randn(pages, 64, 1, 576).bfloat16()
    cache8 = M.quantize_kv_cache_fp8(cache)
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    meta, splits = M.get_mla_metadata(seqlens, s_q * h_q, 1, 4, backend="reference")

    def decode(name, expect, forms=("api", "op"), **over):
        kw = dict(q=q, k_cache=cache, block_table=table, cache_seqlens=seqlens, head_dim_v=512,
                  tile_scheduler_metadata=meta, num_splits=splits, softmax_scale=None, causal=True)
        kw.update(over)
        qq = kw["q"]
        shape_ok = isinstance(qq, torch.Tensor) and qq.dim() == 4
        bb, sq, hq = (qq.shape[:3] if shape_ok else (b, s_q, h_q))
        out = kw.pop("out", torch.full((bb, sq, hq, 512), NAN, dtype=torch.bfloat16))
        lse = kw.pop("softmax_lse", torch.full((bb, hq, sq), NAN))
        scale = kw["softmax_scale"] if kw["softmax_scale"] is not None else 576 ** -0.5

        def api(be):
            return M.flash_mla_with_kvcache(**kw, backend=be, out=out, softmax_lse=lse)

        def op(be):
            torch.ops.pykernels.flash_mla_with_kvcache(
                kw["q"], kw["k_cache"], kw["block_table"], kw["cache_seqlens"], kw["tile_scheduler_metadata"],
                kw["num_splits"], out, lse, kw["head_dim_v"], scale, kw["causal"], be)
            return out, lse
        return dict(name=f"flash_mla_with_kvcache/{name}", op_name="flash_mla_with_kvcache", expect=expect,
                    forms=forms, compare="close", outs=(out, lse), api=api, op=op)

    def metadata(name, sl, parts, expect, forms=("api", "op")):
        return dict(name=f"get_mla_metadata/{name}", op_name="get_mla_metadata", expect=expect, forms=forms,
                    compare="bits",
                    api=lambda be: M.get_mla_metadata(sl, s_q * h_q, 1, parts, backend=be),
                    op=lambda be: torch.ops.pykernels.get_mla_metadata(sl, parts, be))

    q_nan = q.clone()
    q_nan[0, 0, 3, 10] = NAN
    q_inf = q.clone()
    q_inf[1, 0, 0, 5] = float("inf")
    cache_unused_nan = cache.clone()
    unused_page = int(table[1, 2])                         # batch 1 has 17 tokens: page 2 unused
    cache_unused_nan[unused_page] = NAN
    cache_tail_nan = cache.clone()
    cache_tail_nan[int(table[1, 0]), 17:] = NAN            # past seqlen 17 in a used page
    t_neg, t_past, t_unused_past = table.clone(), table.clone(), table.clone()
    t_neg[0, 1] = -1
    t_past[0, 2] = pages
    t_unused_past[1, 2] = 10 ** 6                          # unused: never read
    stale_meta, stale_splits = M.get_mla_metadata(torch.tensor([64, 17], dtype=torch.int32), s_q * h_q, 1, 4,
                                                  backend="reference")
    bad_meta = meta.clone()
    bad_meta[0, 2] = b + 5                                 # last batch index past b
    cases = [
        decode("valid", REF),
        decode("valid-fp8", REF, k_cache=cache8),
        decode("q-float32", _err("q"), q=q.float()),
        decode("q-head-dim", _err("q"), q=q[..., :512].contiguous()),
        decode("q-rank3", _err("q"), forms=("api",), q=q[0]),
        decode("q-inner-stride", _err("q"), q=torch.randn(b, s_q, h_q, 1152).bfloat16()[..., ::2]),
        decode("q-permuted-view", REF, q=torch.randn(b, h_q, s_q, 576).bfloat16().transpose(1, 2)),
        decode("cache-float32", _err("k_cache"), k_cache=cache.float()),
        decode("cache-page-32", _err("k_cache"), k_cache=cache.view(pages * 2, 32, 1, 576)),
        decode("cache-h_kv-2-page-32", _err("k_cache"), k_cache=cache.view(pages, 32, 2, 576)),
        decode("valid-h_kv-2", REF, k_cache=torch.randn(pages, 64, 2, 576).bfloat16()),
        decode("cache-h_kv-3-not-dividing-h_q", _err("k_cache"), k_cache=cache.expand(-1, -1, 3, -1).contiguous()),
        decode("cache-fp8-h_kv-2", _err("k_cache"),
               k_cache=M.quantize_kv_cache_fp8(cache.expand(-1, -1, 2, -1).contiguous())),
        decode("cache-fp8-wrong-width", _err("k_cache"), k_cache=cache8[..., :600].contiguous()),
        decode("block_table-int64", _err("block_table"), block_table=table.long()),
        decode("block_table-negative", _err("block_table"), block_table=t_neg),
        decode("block_table-past-cache", _err("block_table"), block_table=t_past),
        decode("block_table-unused-past-cache", REF, block_table=t_unused_past),
        decode("block_table-rows", _err("block_table"), block_table=table[:1]),
        decode("seqlens-past-table", _err("cache_seqlens"), cache_seqlens=torch.tensor([150, 193], dtype=torch.int32)),
        decode("seqlens-negative", _err("cache_seqlens"), cache_seqlens=torch.tensor([150, -1], dtype=torch.int32)),
        decode("seqlens-int64", _err("cache_seqlens"), cache_seqlens=seqlens.long()),
        decode("stale-metadata", _err("tile_scheduler_metadata"), tile_scheduler_metadata=stale_meta,
               num_splits=stale_splits),
        decode("corrupt-metadata", _err("tile_scheduler_metadata"), tile_scheduler_metadata=bad_meta),
        decode("metadata-shape", _err("tile_scheduler_metadata"), tile_scheduler_metadata=meta[:, :4].contiguous()),
        decode("num_splits-shape", _err("num_splits"), num_splits=splits[:-1]),
        decode("head_dim_v", _err("head_dim_v"), head_dim_v=576),
        decode("softmax_scale-negative", _err("softmax_scale"), softmax_scale=-1.0),
        decode("softmax_scale-nan", _err("softmax_scale"), softmax_scale=NAN),
        decode("causal-string", _err("causal"), forms=("api",), causal="yes"),
        decode("out-too-small", _err("out"), out=torch.full((b, s_q, h_q, 256), NAN, dtype=torch.bfloat16)),
        decode("out-float32", _err("out"), out=torch.full((b, s_q, h_q, 512), NAN)),
        decode("out-aliases-q", _err("out"), out=q[..., :512]),
        decode("out-requires-grad", _err("out"), forms=("api",),
               out=torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16).requires_grad_()),
        decode("out-expanded-heads", _err("out"),
               out=torch.full((b, s_q, 1, 512), NAN, dtype=torch.bfloat16).expand(b, s_q, h_q, 512)),
        decode("lse-expanded", _err("softmax_lse"), softmax_lse=torch.full((b, 1, s_q), NAN).expand(b, h_q, s_q)),
        decode("fp8-cache-misaligned", _either("k_cache"), k_cache=misaligned(cache8, 1)),
        decode("lse-shape", _err("softmax_lse"), softmax_lse=torch.full((b, s_q, h_q), NAN)),
        decode("mixed-devices", _err("block_table"), block_table=table.to("meta")),
        decode("nan-in-q", REF, q=q_nan),
        decode("inf-in-q", REF, q=q_inf),
        decode("nan-in-unused-page", REF, k_cache=cache_unused_nan),
        decode("nan-past-seqlen-in-used-page", REF, k_cache=cache_tail_nan),
        metadata("valid", seqlens, 4, REF),
        metadata("num_sm_parts-zero", seqlens, 0, _err("num_sm_parts")),
        metadata("num_sm_parts-negative", seqlens, -3, _err("num_sm_parts")),
        metadata("seqlens-int64", seqlens.long(), 4, _err("cache_seqlens")),
        metadata("seqlens-2d", seqlens[None], 4, _err("cache_seqlens")),
        metadata("seqlens-negative", torch.tensor([5, -1], dtype=torch.int32), 4, _err("cache_seqlens")),
        metadata("seqlen-2^31-1", torch.tensor([2**31 - 1, 5], dtype=torch.int32), 132, REF),
        metadata("empty-batch", torch.empty(0, dtype=torch.int32), 4, REF),
        metadata("seqlens-meta", seqlens.to("meta"), 4, _err("backend"), forms=("api",)),   # op form: shapes only
        dict(decode("unknown-backend", _err("backend")),
             api=lambda be: M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, meta, splits, backend="gpu"),
             op=lambda be: torch.ops.pykernels.flash_mla_with_kvcache(
                 q, cache, table, seqlens, meta, splits, torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16),
                 torch.empty(b, h_q, s_q), 512, 0.1, True, "bogus")),
    ]
    return cases


def dsa_cases():
    from test_dsa_bad_input import dsa_cases as cases   # the DSA family's rows live beside its tests
    return cases()


FAMILIES = {"quant": quant_cases, "gemm": gemm_cases, "mla": mla_cases, "dsa": dsa_cases}


# --- running ------------------------------------------------------------------------------------

def _as_list(r):
    if r is None:
        return []
    return list(r) if isinstance(r, (tuple, list)) else [r]


def _same(got, want, compare):
    """'' when got matches want, else what differs. bits: identical bytes; close: the same
    non-finite pattern and finite values within calc_diff 1e-5 (GEMM / attention sum in
    another order than the float32 reference)."""
    from pykernels.metrics import calc_diff
    if len(got) != len(want):
        return f"{len(got)} outputs, reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i}: {g.dtype}{list(g.shape)} vs reference {w.dtype}{list(w.shape)}"
        if compare == "bits" or not g.dtype.is_floating_point:
            if not torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)):
                return f"output {i}: bits differ from the reference"
            continue
        gf, wf = g.float(), w.float()
        for what, f in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf)):
            if not torch.equal(f(gf), f(wf)):
                return f"output {i}: {what} positions differ from the reference"
        fin = torch.isfinite(wf)
        if fin.any():
            d = calc_diff(gf[fin].double(), wf[fin].double())
            if not d <= 1e-5:
                return f"output {i}: calc_diff {d:.2e} against the reference"
    return ""


def _snapshot(case):
    return [t.clone() for t in case.get("outs", ())]


def _restore(case, saved):
    for t, s in zip(case.get("outs", ()), saved):
        t.copy_(s)


def run_case(case, form, backend):
    from pykernels import registry
    if backend not in registry.get(case["op_name"]).backends:
        return "n/a", f"{case['op_name']} has no {backend} backend"
    expect = case["expect"]
    saved = _snapshot(case)
    fn = case[form]
    try:
        got = _as_list(fn(backend))
        if case.get("outs"):
            got = [t.clone() for t in case["outs"]]
    except (ValueError, TypeError) as e:
        msg = str(e)
        if expect[0] in ("error", "either"):
            named = msg.startswith(expect[1] + ":") or f": {expect[1]}:" in msg or f"{expect[1]}:" in msg.split("\n")[0]
            return ("ok", msg) if named else ("bad", f"error does not name {expect[1]!r}: {msg}")
        return "bad", f"{type(e).__name__}: {msg}"
    except Exception as e:  # any other exception type is a bad message
        return "bad", f"{type(e).__name__}: {e}"
    if expect[0] == "error":
        return "bad", f"no error (expected one naming {expect[1]!r})"
    _restore(case, saved)
    want = _as_list(case[form]("reference"))
    if case.get("outs"):
        want = [t.clone() for t in case["outs"]]
    _restore(case, saved)
    diff = _same(got, want, case["compare"])
    return ("bad", diff) if diff else ("ok", "matches the reference")


def main(family, backend):
    import pykernels  # noqa: F401  (selects Triton's interpreter on CPU)

    def alarm(*_):
        raise TimeoutError(f"case ran past {CASE_SECONDS} s")
    signal.signal(signal.SIGALRM, alarm)
    for case in FAMILIES[family]():
        for form in case["forms"]:
            print(json.dumps({"start": case["name"], "form": form}), flush=True)
            signal.alarm(CASE_SECONDS)
            try:
                verdict, detail = run_case(case, form, backend)
            except TimeoutError as e:
                verdict, detail = "bad", f"hang: {e}"
            finally:
                signal.alarm(0)
            print(json.dumps({"case": case["name"], "form": form, "verdict": verdict, "detail": detail[:400]}),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
