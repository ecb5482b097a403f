"""The main job's correctness pass: every op through every backend that can run here,
on small shapes, compared with the PyTorch reference.

Tolerances: quantization must be bit-identical to the reference (q bytes and scales);
GEMM outputs must reach calc_diff < 1e-6 and relative error < 2e-3 against the
reference on the rows they own, and leave padding / masked rows untouched (NaN-poisoned).
MLA decode (bf16 and FP8 cache): out calc_diff < 1e-5 against the reference, LSE max
absolute error < 1e-4, same +inf rows; the MLA schedule must equal the reference's.
DSA indexer logits: within 1e-5 of the row's largest |logit| and the same -inf positions;
DSA top-k (both forms): bit-identical to the reference; DSA sparse decode and prefill: as
MLA decode (out calc_diff, LSE, same +inf rows), the prefill's max_logits within 1e-4.
EP intranode dispatch + weighted combine (2 ranks, LocalNode: every rank's kernels at
once, on the emulator or on one GPU): received rows, top-k ids and weights bit-identical
to the reference simulation, combined tokens bit-identical to its bf16 rounding.
"""
import dataclasses
import time

import torch

from . import reference as R
from . import registry
from .metrics import calc_diff, rel_error
from .runtime.executors import gpu_unavailable_reason

GEMM_CALC_DIFF = 1e-6
GEMM_REL = 2e-3
MLA_CALC_DIFF = 1e-5
MLA_LSE_ABS = 1e-4


class NotApplicable(Exception):
    """A backend that exists for the op but cannot run in this single-process check."""


@dataclasses.dataclass
class Row:
    op: str
    backend: str
    shape: str
    error: str
    verdict: str
    seconds: float


def available_backends(device: torch.device) -> list:
    """Backends that can run on `device` on this machine."""
    names = ["reference", "triton"]
    if device.type == "cpu":
        names.append("emu")
    elif gpu_unavailable_reason() == "":
        names.append("cuda")
    return names


def _quant_case(op, shape, dtype, device):
    x = (torch.randn(*shape, device=device) * 4).to(dtype)

    def run(backend):
        import pykernels as pk
        q, sf = getattr(pk, op)(x, backend=backend)
        rq, rsf = getattr(R, op)(x.cpu())
        same = torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sf.cpu(), rsf)
        deq = R.dequantize_per_token if op == "per_token_cast_to_fp8" else R.dequantize_per_block
        err = rel_error(deq(q.cpu(), sf.cpu()), deq(rq, rsf))
        return f"rel {err:.1e}, {'bit-exact' if same else 'bits differ'}", same
    return f"{list(shape)} {str(dtype).replace('torch.', '')}", run


def _gemm_case(layout, device):
    import pykernels as pk
    k, n = 384, 256
    if layout == "normal":
        m, groups = 65, 1
    elif layout == "contiguous":
        rows = [70, 0, 130]
        groups = len(rows)
        idx = torch.cat([torch.cat([torch.full((r,), g), torch.full((-(-r // 128) * 128 - r,), -1)])
                         for g, r in enumerate(rows)]).int().to(device)
        m = idx.numel()
    else:
        groups, m_max = 3, 64
        masked = torch.tensor([5, 0, 64], dtype=torch.int32, device=device)
    a_rows = (groups, m_max, k) if layout == "masked" else (m, k)
    x = torch.randn(*a_rows, dtype=torch.bfloat16, device=device)
    a, sfa = (pk.per_token_cast_to_fp8(x, backend="reference") if layout != "masked" else
              [torch.stack(t) for t in zip(*[R.per_token_cast_to_fp8(x[g]) for g in range(groups)])])
    wb = [R.per_block_cast_to_fp8(torch.randn(n, k, dtype=torch.bfloat16, device=device)) for _ in range(groups)]
    b, sfb = torch.stack([w[0] for w in wb]), torch.stack([w[1] for w in wb])
    if layout == "normal":
        b, sfb = b[0], sfb[0]

    def run(backend):
        out = torch.full((*a.shape[:-1], n), float("nan"), dtype=torch.bfloat16, device=device)
        ref = out.clone()
        if layout == "normal":
            pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend=backend)
            pk.fp8_gemm_nt((a, sfa), (b, sfb), ref, backend="reference")
        elif layout == "contiguous":
            pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend=backend)
            pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), ref, idx, backend="reference")
        else:
            pk.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, masked, 64, backend=backend)
            pk.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), ref, masked, 64, backend="reference")
        owned = ~ref.isnan()
        untouched = bool(out[~owned].isnan().all())
        d, r = calc_diff(out[owned], ref[owned]), rel_error(out[owned], ref[owned])
        ok = d < GEMM_CALC_DIFF and r < GEMM_REL and untouched and not out[owned].isnan().any()
        return f"diff {d:.1e}, rel {r:.1e}{'' if untouched else ', wrote padding'}", ok
    if layout == "normal":
        shape = f"m={m} n={n} k={k}"
    elif layout == "contiguous":
        shape = f"groups {rows} n={n} k={k}"
    else:
        shape = f"G=3 m_max=64 masked_m=[5,0,64] n={n} k={k}"
    return shape, run


def _bf16_gemm_case(device):
    import pykernels as pk
    m, n, k = 65, 256, 208             # ragged M, a partial last 64-wide K step
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, k, dtype=torch.bfloat16, device=device)

    def run(backend):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        pk.bf16_gemm_nt(a, b, out, backend=backend)
        ref = R.bf16_gemm_nt(a.cpu(), b.cpu())
        d, r = calc_diff(out.cpu(), ref), rel_error(out.cpu(), ref)
        return f"diff {d:.1e}, rel {r:.1e}", d < GEMM_CALC_DIFF and r < GEMM_REL and not out.isnan().any()
    return f"m={m} n={n} k={k}", run


def _mla_case(fp8: bool, device):
    import pykernels.mla as M
    b, s_q, h_q, max_blocks = 2, 2, 16, 3
    seqlens = torch.tensor([150, 17], dtype=torch.int32, device=device)
    cache = torch.randn(b * max_blocks, 64, 1, 576, device=device).to(torch.bfloat16)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    table = torch.randperm(b * max_blocks, device=device).int().view(b, max_blocks)
    q = torch.randn(b, s_q, h_q, 576, device=device).to(torch.bfloat16)
    # 8 partitions split the 150-token sequence, so the combine kernel runs too.
    meta, splits = M.get_mla_metadata(seqlens, s_q * h_q, 1, 8, backend="reference")

    def run(backend):
        out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16, device=device)
        lse = torch.full((b, h_q, s_q), float("nan"), device=device)
        M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, meta, splits, causal=True,
                                 backend=backend, out=out, softmax_lse=lse)
        ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, seqlens, 512, meta, splits,
                                                causal=True, backend="reference")
        return _compare_attention(out, lse, ref, ref_lse)
    return f"b={b} s_q={s_q} h_q={h_q} seqlens=[150,17] causal{' fp8 cache' if fp8 else ''}", run


def _compare_attention(out, lse, ref, ref_lse):
    """(text, ok) of an attention output against the reference: out calc_diff, LSE error
    on the finite rows, the same +inf rows, nothing left unwritten."""
    d = calc_diff(out, ref)
    same_inf = torch.equal(lse.isinf(), ref_lse.isinf())
    fin = torch.isfinite(ref_lse)
    e = float((lse[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
    ok = d < MLA_CALC_DIFF and e < MLA_LSE_ABS and same_inf and not out.isnan().any()
    return f"diff {d:.1e}, lse {e:.1e}", ok


def _mla_metadata_case(device):
    import pykernels.mla as M
    seqlens = torch.tensor([6400, 64, 0, 1, 200], dtype=torch.int32, device=device)

    def run(backend):
        meta, splits = M.get_mla_metadata(seqlens, 64, 1, 16, backend=backend)
        r_meta, r_splits = M.get_mla_metadata(seqlens.cpu(), 64, 1, 16, backend="reference")
        same = torch.equal(meta.cpu(), r_meta) and torch.equal(splits.cpu(), r_splits)
        return f"{int(splits[-1])} splits, {'same as' if same else 'differs from'} reference", same
    return "seqlens=[6400,64,0,1,200] parts=16", run


DSA_LOGIT_REL = 1e-5


def _dsa_logits_case(device):
    import pykernels.dsa as D
    m, n, h, d = 5, 130, 32, 128            # inside every backend's limits (the CUDA kernel's: 32/64 heads of 128)
    q = (torch.randn(m, h, d, device=device) * 2).to(torch.float8_e4m3fn)
    k, sf = D.indexer_k_cast_to_fp8(torch.randn(n, d, device=device) * 3)
    w = torch.randn(m, h, device=device)
    ks = torch.tensor([0, 10, 64, 129, 50], dtype=torch.int32, device=device)
    ke = torch.tensor([130, 90, 64, 130, 51], dtype=torch.int32, device=device)   # row 2: an empty window

    def run(backend):
        out = torch.full((m, n), float("nan"), device=device)
        D.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend=backend, out=out)
        ref = D.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="reference")
        same_inf = torch.equal(out.isneginf(), ref.isneginf())
        fin = torch.isfinite(ref)
        err = float((out[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-30)) if fin.any() else 0.0
        return f"rel {err:.1e}", same_inf and err < DSA_LOGIT_REL and not out.isnan().any()
    return f"m={m} n={n} h={h} d={d} ragged windows", run


def _dsa_sparse_decode_case(device):
    import pykernels.dsa as D
    import pykernels.mla as M
    b, s_q, h_q, blocks, topk = 2, 2, 64, 4, 48    # h_q 64: inside the CUDA kernel's limits (multiples of 64)
    cache = M.quantize_kv_cache_fp8(torch.randn(blocks, 64, 1, 576, device=device).to(torch.bfloat16))
    q = torch.randn(b, s_q, h_q, 576, device=device).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(blocks * 64, device=device)[:topk] for _ in range(b * s_q)]).view(b, s_q, topk)
    idx = idx.int()
    idx[0, 0, ::5] = -1                                              # unused slots
    idx[1, 1] = -1                                                   # a row with no key
    sink = torch.randn(h_q, device=device)
    length = torch.tensor([topk, 30], dtype=torch.int32, device=device)

    def run(backend):
        out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16, device=device)
        lse = torch.full((b, h_q, s_q), float("nan"), device=device)
        D.flash_mla_sparse_decode(q, cache, idx, None, sink, length, backend=backend, out=out, softmax_lse=lse)
        ref, ref_lse = D.flash_mla_sparse_decode(q, cache, idx, None, sink, length, backend="reference")
        return _compare_attention(out, lse, ref, ref_lse)
    return f"b={b} s_q={s_q} h_q={h_q} topk={topk} FP8 cache, -1 slots, sink, topk_length", run


def _dsa_topk_case(paged, device):
    import pykernels.dsa as D
    rows, n, k = 4, 300, 40
    logits = (torch.randint(-8, 8, (rows, n), device=device) / 4).float()      # many ties
    if paged:
        lens = torch.tensor([300, 20], dtype=torch.int32, device=device)     # next_n 2: windows 299 / 300, 19 / 20
        table = torch.randperm(10, device=device)[:10].int().view(2, 5)
        args = (lens, table)
    else:
        args = (torch.tensor([0, 10, 50, 7], dtype=torch.int32, device=device),
                torch.tensor([300, 30, 50, 300], dtype=torch.int32, device=device))   # row 1 short, row 2 empty
    fn = D.paged_topk_indices if paged else D.topk_indices

    def run(backend):
        out = torch.full((2, 2, k) if paged else (rows, k), -7, dtype=torch.int32, device=device)
        fn(logits, k, *args, backend=backend, out=out)
        same = torch.equal(out, fn(logits, k, *args, backend="reference"))
        return f"{'bit-exact' if same else 'DIFFERS'}", same
    form = "next_n=2, pages of 64" if paged else "ragged windows"
    return f"rows={rows} N={n} topk={k} ties, {form}, -1 slots", run


def _dsa_sparse_prefill_case(device):
    import pykernels.dsa as D
    s_q, h_q, s_kv, topk = 3, 64, 100, 48          # h_q 64: inside the CUDA kernel's limits (multiples of 64)
    q = torch.randn(s_q, h_q, 576, device=device).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, 576, device=device).to(torch.bfloat16)
    idx = torch.randint(-2, s_kv + 2, (s_q, 1, topk), dtype=torch.int32, device=device)  # outside: skipped
    idx[2] = -1                                                      # a query with no key
    sink = torch.randn(h_q, device=device)
    length = torch.tensor([topk, 30, topk], dtype=torch.int32, device=device)

    def run(backend):
        out = torch.full((s_q, h_q, 512), float("nan"), dtype=torch.bfloat16, device=device)
        mx = torch.full((s_q, h_q), float("nan"), device=device)
        lse = torch.full((s_q, h_q), float("nan"), device=device)
        D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend=backend, out=out, max_logits=mx, lse=lse)
        ref, ref_mx, ref_lse = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="reference")
        text, ok = _compare_attention(out, lse, ref, ref_lse)
        fin = torch.isfinite(ref_mx)
        same_mx = torch.equal(mx.isinf(), ref_mx.isinf()) and bool(torch.allclose(mx[fin], ref_mx[fin], atol=1e-4))
        return text, ok and same_mx
    return f"s_q={s_q} h_q={h_q} s_kv={s_kv} topk={topk} bf16 kv, skipped slots, sink, topk_length", run


def _ep_case(device):
    from .ops import ep as OE
    ranks, experts, hidden, topk_k = 2, 8, 256, 4
    tokens = [20, 30]
    topk = []
    for t in tokens:
        idx = torch.stack([torch.randperm(experts)[:topk_k] for _ in range(t)])
        idx[torch.rand(t, topk_k) < 0.15] = -1          # empty slots
        idx[0] = -1                                      # a token routed nowhere
        topk.append(idx)
    weights = [torch.rand(t, topk_k) for t in tokens]
    xs = [(torch.randn(t, hidden) * 4).to(torch.bfloat16) for t in tokens]

    def bits(t):
        return t.contiguous().cpu().view(torch.uint8)

    def run(backend):
        dev = torch.device("cpu") if backend in ("emu", "reference") else device
        p = OE.problem([x.to(dev) for x in xs], [t.to(dev) for t in topk], [w.to(dev) for w in weights], experts)
        reason = OE.DISPATCH_COMBINE.backends[backend].supports(p)
        if reason is not None:
            raise NotApplicable(reason)
        got = OE.DISPATCH_COMBINE(p, backend)
        want = OE.DISPATCH_COMBINE(OE.problem(xs, topk, weights, experts), "reference")
        rows = sum(int(w["recv_x"].shape[0]) for w in want)
        same = all(torch.equal(bits(g[k]), bits(w[k])) for g, w in zip(got, want)
                   for k in ("recv_x", "recv_topk_idx", "recv_topk_weights"))
        same_out = all(torch.equal(bits(g["combined"]), bits(w["combined"])) for g, w in zip(got, want))
        return (f"{rows} rows {'bit-exact' if same else 'DIFFER'}, combine "
                f"{'bit-exact' if same_out else 'DIFFERS'}"), same and same_out
    return f"ranks={ranks} tokens={tokens} hidden={hidden} top-{topk_k} of {experts}", run


def cases(device):
    """(op name, shape text, runner) for the small problems of the main job."""
    yield ("per_token_cast_to_fp8", *_quant_case("per_token_cast_to_fp8", (37, 300), torch.bfloat16, device))
    yield ("per_block_cast_to_fp8", *_quant_case("per_block_cast_to_fp8", (200, 300), torch.float32, device))
    yield ("fp8_gemm_nt", *_gemm_case("normal", device))
    yield ("m_grouped_fp8_gemm_nt_contiguous", *_gemm_case("contiguous", device))
    yield ("m_grouped_fp8_gemm_nt_masked", *_gemm_case("masked", device))
    yield ("bf16_gemm_nt", *_bf16_gemm_case(device))
    yield ("get_mla_metadata", *_mla_metadata_case(device))
    yield ("flash_mla_with_kvcache", *_mla_case(False, device))
    yield ("flash_mla_with_kvcache", *_mla_case(True, device))
    yield ("fp8_mqa_logits", *_dsa_logits_case(device))
    yield ("topk_indices", *_dsa_topk_case(False, device))
    yield ("paged_topk_indices", *_dsa_topk_case(True, device))
    yield ("flash_mla_sparse_decode", *_dsa_sparse_decode_case(device))
    yield ("flash_mla_sparse_fwd", *_dsa_sparse_prefill_case(device))
    yield ("ep_dispatch_combine", *_ep_case(device))


def run_all(device: torch.device, backends=None, ops=None) -> list:
    """Run every (op, backend) pair; a backend an op does not have yet is listed as such."""
    rows = []
    for op, shape, runner in cases(device):
        if ops and op not in ops:
            continue
        for backend in backends or available_backends(device):
            if backend not in registry.get(op).backends:
                rows.append(Row(op, backend, shape, "-", "not implemented yet", 0.0))
                continue
            t0 = time.perf_counter()
            try:
                err, ok = runner(backend)
                verdict = "PASS" if ok else "FAIL"
            except NotImplementedError:
                rows.append(Row(op, backend, shape, "-", "not implemented yet", time.perf_counter() - t0))
                continue
            except NotApplicable as e:
                rows.append(Row(op, backend, shape, str(e), "n/a here", time.perf_counter() - t0))
                continue
            except Exception as e:  # report, keep going: one broken backend must not hide the rest
                err, verdict = f"{type(e).__name__}: {e}"[:80], "ERROR"
            rows.append(Row(op, backend, shape, err, verdict, time.perf_counter() - t0))
    return rows


def format_table(rows) -> str:
    head = ("op", "backend", "shape", "error", "verdict", "time")
    cells = [head] + [(r.op, r.backend, r.shape, r.error, r.verdict, f"{r.seconds:.2f}s") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
