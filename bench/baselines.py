"""The implementations compared on each shape, built as zero-argument callables.

cuBLAS / cuBLASLt baselines use torch so they run in the same process, on the same
device and inputs as ours. Grouped ops have no single cuBLASLt FP8 call, so the FP8
baselines loop over groups there (the note on each row says so).
"""
import torch

from . import shapes as S
from .timing import measure_row, wrong_output

DEVICE = "cuda"  # a module attribute so a CPU check can point the builders elsewhere
_F8 = torch.float8_e4m3fn
_BF16 = torch.bfloat16

# impl -> precision, which picks both the bytes counted and the roofline ceiling.
IMPLS = {
    "cublas_bf16": "bf16",
    "cublaslt_fp8_tensor": "fp8_tensor",
    "scaled_mm_blockwise": "fp8_block",
    "pykernels_triton": "fp8_block",
    "pykernels_cuda": "fp8_block",
}


class Unsupported(Exception):
    """The implementation cannot run here; the message becomes the row's note."""


def _blockwise(a8, sfa, b8, sfb):
    # torch wants the 1x128 scales column-major and B's 128x128 scales as [k/128, n/128].
    sfa_col = sfa.t().contiguous().t()
    return torch._scaled_mm(a8, b8.t(), sfa_col, sfb.t(), out_dtype=_BF16)


_blockwise_ok = None


def blockwise_supported():
    """(ok, note): whether this torch build runs 1x128 / 128x128 scaled_mm (probed once)."""
    global _blockwise_ok
    if _blockwise_ok is None:
        import pykernels
        try:
            x = torch.randn(256, 256, device=DEVICE)
            a8, sfa = pykernels.per_token_cast_to_fp8(x)
            b8, sfb = pykernels.per_block_cast_to_fp8(x)
            _blockwise(a8, sfa, b8, sfb)
            torch.cuda.synchronize()
            _blockwise_ok = (True, "")
        except Exception as e:  # any failure means "not available in this build"
            _blockwise_ok = (False, f"unsupported: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
    return _blockwise_ok


def make_inputs(s: S.Shape) -> dict:
    """One input set: bf16 originals plus block-scaled and per-tensor FP8 copies."""
    import pykernels
    g, m, n, k = s.groups, s.m, s.n, s.k
    x = torch.randn(g * m, k, device=DEVICE, dtype=_BF16)
    w = torch.randn(g, n, k, device=DEVICE, dtype=_BF16)
    a8, sfa = pykernels.per_token_cast_to_fp8(x)
    bq = [pykernels.per_block_cast_to_fp8(w[i]) for i in range(g)]
    b8, sfb = torch.stack([q for q, _ in bq]), torch.stack([f for _, f in bq])
    if s.op == "masked":  # masked takes A as [G, m_max, k]
        a8, sfa = a8.view(g, m, k), sfa.view(g, m, -1)
    sa = x.abs().amax().float() / 448
    sb = w.abs().amax(dim=(1, 2)).float() / 448
    return dict(x=x, w=w, a8=a8, sfa=sfa, b8=b8, sfb=sfb, sa=sa, sb=sb,
                at8=(x / sa).to(_F8), bt8=(w / sb[:, None, None]).to(_F8))


def _groups_a(s, t):
    # Per-group [m, ...] views of an A-side tensor in either grouped layout.
    return [t[i] for i in range(s.groups)] if s.op == "masked" else list(t.split(s.m))


def build(impl: str, s: S.Shape, d: dict):
    """Zero-argument callable running `impl` on input set d, or raise Unsupported."""
    import pykernels
    g, m, n = s.groups, s.m, s.n
    if impl == "cublas_bf16":
        if g == 1:
            out = torch.empty(m, n, device=DEVICE, dtype=_BF16)
            return lambda: torch.matmul(d["x"], d["w"][0].t(), out=out)
        out = torch.empty(g, m, n, device=DEVICE, dtype=_BF16)
        x3, wt = d["x"].view(g, m, -1), d["w"].transpose(1, 2)
        return lambda: torch.matmul(x3, wt, out=out)
    if impl == "cublaslt_fp8_tensor":
        a_g, sb = list(d["at8"].split(m)), list(d["sb"].unbind())
        return lambda: [torch._scaled_mm(a_g[i], d["bt8"][i].t(), d["sa"], sb[i], out_dtype=_BF16)
                        for i in range(g)]
    if impl == "scaled_mm_blockwise":
        ok, note = blockwise_supported()
        if not ok:
            raise Unsupported(note)
        a_g, sf_g = _groups_a(s, d["a8"]), _groups_a(s, d["sfa"])
        return lambda: [_blockwise(a_g[i], sf_g[i], d["b8"][i], d["sfb"][i]) for i in range(g)]
    if impl in ("pykernels_triton", "pykernels_cuda", "pykernels_reference"):
        backend = impl.split("_")[1]
        sfa = d["sfa"]
        if backend == "cuda":
            # the kernel's TMA reads sfa column-major (TMA-aligned); made once here, as
            # DeepGEMM's benchmarks do, so the timed call has no transposition copy
            sfa = pykernels.get_col_major_tma_aligned_tensor(sfa)
        a, b = (d["a8"], sfa), (d["b8"], d["sfb"])
        if s.op == "normal":
            out = torch.empty(m, n, device=DEVICE, dtype=_BF16)
            b = (d["b8"][0], d["sfb"][0])
            return lambda: pykernels.fp8_gemm_nt(a, b, out, backend=backend)
        if s.op == "contiguous":
            out = torch.empty(g * m, n, device=DEVICE, dtype=_BF16)
            idx = torch.arange(g, device=DEVICE, dtype=torch.int32).repeat_interleave(m)
            return lambda: pykernels.m_grouped_fp8_gemm_nt_contiguous(a, b, out, idx, backend=backend)
        out = torch.empty(g, m, n, device=DEVICE, dtype=_BF16)
        masked_m = torch.full((g,), m, device=DEVICE, dtype=torch.int32)  # every row valid
        return lambda: pykernels.m_grouped_fp8_gemm_nt_masked(a, b, out, masked_m, m, backend=backend)
    raise ValueError(f"impl: unknown {impl!r}; expected one of {sorted(IMPLS)}")


def _note(impl, s):
    notes = []
    if impl in ("cublaslt_fp8_tensor", "scaled_mm_blockwise") and s.groups > 1:
        notes.append(f"loop of {s.groups} calls")
    if s.op == "masked":
        notes.append("all rows valid (masked_m = m)")
    return "; ".join(notes)


def measure_shape(s: S.Shape, runs: int = 50, n_sets: int = 4, impls=tuple(IMPLS)) -> list:
    """Raw measurements for one shape: one dict per impl, seconds None when it cannot run;
    ours are checked against the reference backend before they are timed."""
    sets = [make_inputs(s) for _ in range(n_sets)]
    want = build("pykernels_reference", s, sets[0])().clone()
    rows = []
    for impl in impls:
        row = dict(op=s.op, shape=s.label(), groups=s.groups, m=s.m, n=s.n, k=s.k, impl=impl,
                   precision=IMPLS[impl], flops=S.flops(s), bytes=S.bytes_moved(s, IMPLS[impl]),
                   seconds=None, seconds_min=None, seconds_max=None, kernel_seconds=None, note=_note(impl, s))
        rows.append(measure_row(row, lambda: [build(impl, s, d) for d in sets],
                                lambda out: wrong_output(impl, out, want), runs, Unsupported))
    sets = want = None  # the inputs freed before the cache is emptied
    torch.cuda.empty_cache()
    return rows
