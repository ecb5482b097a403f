"""NaN, +-Inf and extreme finite inputs: one behaviour on every CPU-runnable backend
(docs/numerics.md).

Quantization: the reference's bits exactly (q bytes and scale bits, NaN payloads
included) from "triton" (interpreter) and "emu" (the PTX kernels on the emulator), with
poisoned outputs. GEMM and MLA decode: the same non-finite pattern as the reference (each
element NaN / +Inf / -Inf / finite alike) and the finite elements within the tolerance of
the op's own tests.
"""
import numpy as np
import pytest
import torch

from pykernels import reference as R
from pykernels.cuda import quant as cq
from pykernels.emu.numerics import f32_to_e4m3
from pykernels.metrics import calc_diff
from pykernels.reference.constants import BLOCK
from pykernels.reference.quant import E4M3_NAN_BITS, F32_CANONICAL_NAN_BITS, to_e4m3_satfinite
from pykernels.runtime.executors import run_emu
from pykernels.triton import quant as tq
from pykernels.triton.sm90 import run_launch

# Inf * 0, overflow and all-NaN rows in the interpreted kernels are what these inputs are
# for, not mistakes to warn about.
pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}:RuntimeWarning")
              for m in ("invalid value encountered", "overflow encountered", "All-NaN slice encountered")]

NAN, INF = float("nan"), float("inf")
QUANT_OPS = ("per_token", "per_block")
HUGE = {torch.float32: 3e38, torch.bfloat16: torch.finfo(torch.bfloat16).max,
        torch.float16: torch.finfo(torch.float16).max}
SUBNORMAL = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 6e-8}


# ----------------------------------------------------------------------------- quantization

def _quantize(backend, op, x):
    """(q, sf) of `op` on `backend`, outputs poisoned (NaN bytes / NaN scales) first. The
    backends' lower layers are called directly: one place to change if the API moves."""
    m, n = x.shape
    sf_shape = (-(-m // BLOCK) if op == "per_block" else m, -(-n // BLOCK))
    if backend == "reference":
        return getattr(R, f"{op}_cast_to_fp8")(x)
    q = torch.full(x.shape, 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    sf = torch.full(sf_shape, 12345.0)  # finite poison: a NaN poison could pass a NaN check
    if backend == "emu":
        run_emu(getattr(cq, f"{op}_plan")(x, q, sf))
    elif backend == "triton":
        run_launch(getattr(tq, f"{op}_launch_args")(x, q, sf))
    else:
        raise ValueError(f"backend: expected 'reference', 'triton' or 'emu', got {backend!r}")
    return q, sf


def _groups(op, shape):
    """(row slice, column slice) of every scaling group of a [m, n] tensor, in order."""
    m, n = shape
    rows = [slice(r, r + 1) for r in range(m)] if op == "per_token" else \
        [slice(i, min(i + BLOCK, m)) for i in range(0, m, BLOCK)]
    cols = [slice(j, min(j + BLOCK, n)) for j in range(0, n, BLOCK)]
    return [(r, c) for r in rows for c in cols]


def _special_input(op, dtype):
    """x [m, n] of `dtype`, random, with one kind of special value per group. Returns
    (x, kinds) where kinds[i] names what group i holds."""
    shape = (5, 300) if op == "per_token" else (260, 520)   # ragged last groups
    x = (torch.randn(shape) * 5).to(dtype)
    groups = _groups(op, shape)
    kinds = ["nan", "-nan", "+inf", "-inf", "inf+nan", "huge", "tiny", "subnormal", "zeros", "signed zeros"]
    assert len(groups) >= len(kinds)
    kinds += ["plain"] * (len(groups) - len(kinds))
    kinds[-1] = "nan"  # also in a ragged corner group
    for (r, c), kind in zip(groups, kinds):
        g = x[r, c]
        i, j = torch.randint(g.shape[0], ()).item(), torch.randint(g.shape[1], ()).item()
        if kind in ("nan", "inf+nan"):
            g[i, j] = NAN
        if kind == "-nan":
            g[i, j] = -NAN
        if kind in ("+inf", "inf+nan"):
            g[(i + 1) % g.shape[0], (j + 1) % g.shape[1]] = INF
        if kind == "-inf":
            g[i, j] = -INF
        if kind == "huge":
            g[i, j] = -HUGE[dtype]
        if kind == "tiny":      # amax below the floor: the floor scale, |q| < 448
            g.copy_((torch.rand(g.shape) - 0.5) * 1.5e-4)
        if kind == "subnormal":
            g.copy_(torch.randint(-3, 4, g.shape) * SUBNORMAL[dtype])
        if kind == "zeros":
            g.zero_()
        if kind == "signed zeros":
            g.copy_(torch.where(torch.rand(g.shape) < 0.5, -0.0, 0.0))
            g[i, j] = 1.0
    return x, groups, kinds


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int32)


def test_reference_cast_is_ptx_satfinite(seed):
    # The reference's cast against the emulator's model of cvt.rn.satfinite.e4m3x2.f32
    # (written from the PTX ISA, separately): RNE, saturation, NaN -> 0x7F.
    y = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-4, 4, (4096,)).float(),
                   torch.tensor([448.0, 449.0, 464.0, 464.1, 480.0, 1e30, INF, NAN, 0.0, 2.0 ** -10, 2.0 ** -9.5])])
    y = torch.cat([y, -y])
    ours = to_e4m3_satfinite(y).view(torch.uint8).numpy()
    assert np.array_equal(ours, f32_to_e4m3(y.numpy()))


@pytest.mark.parametrize("op", QUANT_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_quantization_follows_the_stated_rules(op, dtype, seed):
    # The rules of docs/numerics.md, checked on the reference itself.
    x, groups, kinds = _special_input(op, dtype)
    q, sf = _quantize("reference", op, x)
    qb, sfb = _bits(q), _bits(sf).view(sf.shape[0], -1)
    ncol = sf.shape[1]
    for gi, ((r, c), kind) in enumerate(zip(groups, kinds)):
        s, g = sfb.flatten()[gi].item(), x[r, c].float()
        if torch.isnan(g).any():
            assert s == F32_CANONICAL_NAN_BITS and (qb[r, c] == E4M3_NAN_BITS).all(), (kind, gi, ncol)
        elif torch.isinf(g).any():
            assert sf.flatten()[gi].item() == INF
            expected = torch.where(torch.signbit(g), 0x80, 0x00).to(torch.uint8)
            expected[torch.isinf(g)] = E4M3_NAN_BITS
            assert torch.equal(qb[r, c], expected), kind
        else:
            assert torch.isfinite(sf.flatten()[gi]) and sf.flatten()[gi] > 0, kind
            assert not torch.isnan(q[r, c].float()).any(), kind
            assert torch.equal(torch.signbit(q[r, c].float()), torch.signbit(g)), kind
            if kind == "huge":
                assert q[r, c].float().abs().max().item() == 448.0


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("op", QUANT_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_non_finite_bits_match_reference(backend, op, dtype, seed):
    x, _, _ = _special_input(op, dtype)
    q, sf = _quantize(backend, op, x)
    rq, rsf = _quantize("reference", op, x)
    assert torch.equal(_bits(q), _bits(rq))
    assert torch.equal(_bits(sf), _bits(rsf))


@pytest.mark.slow
def test_compiled_triton_quantization_non_finite_bits(seed):
    # The Triton kernels as a GPU runs them (compiled for sm_90a: hardware cvt, tl.max,
    # no software rounding), their PTX on the emulator: the reference's bits as well.
    from pykernels import emu
    from pykernels.triton import sm90
    cases = []
    for op, dtype in (("per_token", torch.float32), ("per_token", torch.bfloat16), ("per_block", torch.float16)):
        x, _, _ = _special_input(op, dtype)
        sf_rows = -(-x.shape[0] // BLOCK) if op == "per_block" else x.shape[0]
        q = torch.full(x.shape, 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
        sf = torch.full((sf_rows, -(-x.shape[1] // BLOCK)), 12345.0)
        cases.append((op, x, q, sf, tq.quant_launch_spec(f"{op} {dtype}", op == "per_block", x, q, sf)))
    compiled = sm90.compile_sm90([c[-1] for c in cases], jobs=2)
    for (op, x, q, sf, spec), c in zip(cases, compiled):
        emu.launch_triton(c, spec.grid, *spec.args)
        rq, rsf = _quantize("reference", op, x)
        assert torch.equal(_bits(q), _bits(rq)), spec.label
        assert torch.equal(_bits(sf), _bits(rsf)), spec.label


# ----------------------------------------------------------------------------- GEMM

GEMM_TOL = 1e-3          # calc_diff per output row over its finite elements (DeepGEMM's bound)
POISON = 12352.0         # finite and exactly a bf16: an unwritten element shows, even where NaN is due
GEMM_LAYOUTS = ("normal", "contiguous", "masked")


def _gemm(backend, layout, a, sfa, b, sfb, extra, out):
    """One GEMM layout on a backend's lower layer (extra = m_indices or masked_m)."""
    if backend == "reference":
        mod = R
    elif backend == "triton":
        from pykernels import triton as mod
    elif backend == "emu":
        from pykernels.cuda import gemm as G

        def mod_call(name, *args):
            return getattr(G, name)(*args, executor="emu")
    else:
        raise ValueError(f"backend: expected 'reference', 'triton' or 'emu', got {backend!r}")
    call = mod_call if backend == "emu" else (lambda name, *args: getattr(mod, name)(*args))
    if layout == "normal":
        return call("fp8_gemm_nt", a, sfa, b, sfb, out)
    name = "m_grouped_fp8_gemm_nt_contiguous" if layout == "contiguous" else "m_grouped_fp8_gemm_nt_masked"
    return call(name, a, sfa, b, sfb, extra, out)


def _special_activations(m, k):
    """a e4m3 [m, k], sfa [m, k/128]: rows 1-4 quantized from NaN, +Inf, -Inf, 3e38;
    rows 7-8 e4m3 NaN bytes 0x7F / 0xFF; rows 9-11 sfa NaN, 0, and Inf over a zero block;
    row 12 a huge but representable 1e30; the other rows plain."""
    x = torch.randn(m, k)
    x[1, 10], x[2, 200], x[3, 5], x[4, 7], x[12, 3] = NAN, INF, -INF, 3e38, 1e30
    a, sfa = R.per_token_cast_to_fp8(x)
    a.view(torch.uint8)[7, 20] = 0x7F
    a.view(torch.uint8)[8, 150] = 0xFF
    sfa[9, 0], sfa[10, 1], sfa[11, 0] = NAN, 0.0, INF
    a.view(torch.uint8)[11, :BLOCK] = 0
    return a, sfa


def _special_weights(n, k):
    """b e4m3 [n, k], sfb [n/128, k/128] (n = 512): block 0 quantized from weights with a
    NaN and an Inf plus sfb NaN (the whole block NaN); block 1 NaN bytes in columns 130
    and 200; block 2 a zero scale; block 3 a 3e38 weight (K block 1: sfa * sfb stays finite,
    see docs/numerics.md for huge scales on both sides of one K block)."""
    y = torch.randn(n, k)
    y[3, 40], y[60, 130], y[400, 200] = NAN, INF, 3e38   # 3e38 in another K block than a's
    b, sfb = R.per_block_cast_to_fp8(y)
    b.view(torch.uint8)[130, 17] = 0x7F
    b.view(torch.uint8)[200, 220] = 0xFF
    sfb[0, 1], sfb[2, 1] = NAN, 0.0
    return b, sfb


def _pattern(t):
    """0 finite, 1 +Inf, 2 -Inf, 3 NaN per element."""
    t = t.float()
    return torch.where(torch.isnan(t), 3, torch.where(t == INF, 1, torch.where(t == -INF, 2, 0)))


def _assert_same_non_finite(out, ref, ref_fused=None):
    """out's NaN / +-Inf pattern is ref's (or, per element, ref_fused's: with FMA
    contraction an overflowing product can come back in range, docs/numerics.md)."""
    assert (out.float() != POISON).all(), "owned elements left unwritten"
    ok = _pattern(out) == _pattern(ref)
    if ref_fused is not None:
        ok |= _pattern(out) == _pattern(ref_fused)
    assert ok.all(), f"non-finite pattern differs at {(~ok).nonzero()[:8].tolist()}"
    for row_out, row_ref in zip(out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1])):
        fin = torch.isfinite(row_ref)
        if fin.any() and row_ref[fin].abs().max() > 0:
            assert calc_diff(row_out[fin], row_ref[fin]) < GEMM_TOL


def _gemm_problem(layout, m=16, n=512, k=256):
    """(a, sfa, b, sfb, extra, owned rows mask) with the special rows and weights above;
    grouped layouts get a second, plain weight group and rows they must not write."""
    a, sfa = _special_activations(m, k)
    b, sfb = _special_weights(n, k)
    if layout == "normal":
        return a, sfa, b, sfb, None, torch.ones(m, dtype=torch.bool)
    b2, sfb2 = R.per_block_cast_to_fp8(torch.randn(n, k))
    b, sfb = torch.stack([b, b2]), torch.stack([sfb, sfb2])
    if layout == "contiguous":   # rows 8-9 (NaN byte, NaN scale) are padding: not written
        idx = torch.tensor([0] * 8 + [-1] * 2 + [1] * (m - 10), dtype=torch.int32)
        return a, sfa, b, sfb, idx, idx >= 0
    a2, sfa2 = _special_activations(m, k)
    masked_m = torch.tensor([12, 5], dtype=torch.int32)   # group 1: its NaN/Inf rows 7+ are past masked_m
    owned = torch.arange(m)[None, :] < masked_m[:, None]
    return torch.stack([a, a2]), torch.stack([sfa, sfa2]), b, sfb, masked_m, owned


def _mm_fused(a, sfa, b, sfb, b_scale_rows=BLOCK):
    """The reference's per-K-block accumulation with each step as one fused multiply-add
    (exact product and sum in float64, one rounding to float32): what the kernels' FFMA
    computes where an intermediate product overflows float32. (The reference's _mm's
    arguments: b_scale_rows 128 for 128x128 B scales, 1 for 1x128.)"""
    n, k = b.shape
    qa, qb = a.double(), b.double()
    out = torch.zeros(a.shape[0], n, dtype=torch.float32)
    for kb in range(sfa.shape[-1]):
        cols = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
        partial = (qa[:, cols] @ qb[:, cols].T).float().double()
        scale = (sfa[:, kb, None] * sfb[:, kb].repeat_interleave(b_scale_rows)[None, :n]).double()
        out = (out.double() + scale * partial).float()
    return out


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("layout", GEMM_LAYOUTS)
def test_gemm_non_finite_pattern_matches_reference(backend, layout, seed, monkeypatch):
    a, sfa, b, sfb, extra, owned = _gemm_problem(layout)
    shape = a.shape[:-1] + (b.shape[-2],)
    ref = _gemm("reference", layout, a, sfa, b, sfb, extra, torch.full(shape, POISON, dtype=torch.bfloat16))
    with monkeypatch.context() as mp:
        import pykernels.reference.gemm as RG
        mp.setattr(RG, "_mm", _mm_fused)
        ref_fused = _gemm("reference", layout, a, sfa, b, sfb, extra, torch.full(shape, POISON, dtype=torch.bfloat16))
    out = _gemm(backend, layout, a, sfa, b, sfb, extra, torch.full(shape, POISON, dtype=torch.bfloat16))
    assert (out[~owned].float() == POISON).all(), "rows the layout does not own were written"
    _assert_same_non_finite(out[owned], ref[owned], ref_fused[owned])
    # the reference itself: NaN rows / columns where the inputs say so
    pat = _pattern(ref[owned] if layout == "normal" else ref[owned][:8])
    assert (pat[[1, 2, 3, 7]] == 3).all() and (pat[:, :BLOCK] == 3).all() and (pat[:, [130, 200]] == 3).all()


def test_gemm_inf_scale_over_nonzero_values(seed):
    a, sfa = R.per_token_cast_to_fp8(torch.randn(4, 256))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(128, 256))
    sfa[1, 0] = INF
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    out = _gemm("triton", "normal", a, sfa, b, sfb, None, torch.full((4, 128), POISON, dtype=torch.bfloat16))
    assert torch.equal(_pattern(out), _pattern(ref))


# ----------------------------------------------------------------------------- MLA decode

MLA_OUT_CALC_DIFF = 1e-5  # per query row over its finite elements (tests/test_mla_cuda.py)
MLA_LSE_ABS = 1e-4
MLA_SEQLENS = [70, 130, 64]
MLA_SPLITS = 4            # SM partitions: sequences are split, so the combine runs too


def _mla(backend, q, cache, table, seqlens, causal, scale=None):
    """(out bf16 [b, s_q, h_q, 512], lse f32 [b, h_q, s_q]) of a backend's lower layer,
    outputs poisoned with a finite value first."""
    from pykernels.reference import mla as RM
    if backend == "reference":
        return R.flash_mla_with_kvcache(q, cache, table, seqlens, 512, scale, causal)
    b, s_q, h_q, _ = q.shape
    out = torch.full((b, s_q, h_q, 512), POISON, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), POISON)
    meta, num_splits = RM.get_mla_metadata(seqlens, MLA_SPLITS)
    if backend == "triton":
        from pykernels.triton import mla as TM
        TM.flash_mla_with_kvcache(q, cache, table, seqlens, meta, num_splits, out, lse, softmax_scale=scale,
                                  causal=causal)
    elif backend == "emu":
        from pykernels.cuda import mla as CM
        CM.flash_mla_with_kvcache(q, cache, table, seqlens, meta, num_splits, out, lse, softmax_scale=scale,
                                  causal=causal, executor="emu")
    else:
        raise ValueError(f"backend: expected 'reference', 'triton' or 'emu', got {backend!r}")
    return out, lse


def _unused_slots(table, seqlens, num_blocks):
    """bool [num_blocks, 64]: cache slots no sequence reads (past its length, or pages no
    block table row uses)."""
    from .mla_cases import PAGE
    used = torch.zeros(num_blocks, PAGE, dtype=torch.bool)
    for row, L in zip(table.tolist(), seqlens.tolist()):
        for i in range(-(-L // PAGE)):
            used[row[i], :min(PAGE, L - i * PAGE)] = True
    return ~used


def _mla_problem(fp8, specials_in_use):
    """q, cache (bf16 or FP8), block table, seqlens. Unused slots always hold NaN, +Inf,
    -Inf (bf16), or NaN bytes, NaN / Inf scales and NaN RoPE (FP8). With specials_in_use:
    sequence 0 gets a NaN query head (3), a +Inf query RoPE column (head 5), a key with a
    +Inf RoPE column and one with a -Inf latent; sequence 1 a key with a NaN latent."""
    from pykernels.reference import mla as RM
    from .mla_cases import make_problem
    q, cache, table, seqlens = make_problem(MLA_SEQLENS, 1, 16)
    unused = _unused_slots(table, seqlens, cache.shape[0])
    cache[unused] = 0.0
    if specials_in_use:
        q[0, 0, 3, 10], q[0, 0, 5, 520] = NAN, INF
        p0, p1 = table[0, 0].item(), table[1, 0].item()
        cache[p0, 20, 0, 530], cache[p0, 21, 0, 100], cache[p1, 10, 0, 7] = INF, -INF, NAN
    if fp8:
        cache = RM.quantize_kv_cache_fp8(cache)
        slots = cache.view(torch.uint8)[unused]                       # [n, 1, 656] bytes
        slots[:, :, :512] = 0x7F
        scales = slots[:, :, 512:528].contiguous().view(torch.float32)
        scales[0::2], scales[1::2] = NAN, INF
        slots[:, :, 512:528] = scales.view(torch.uint8)
        slots[:, :, 528:] = torch.full((1,), NAN, dtype=torch.bfloat16).view(torch.uint8).repeat(64)
        cache.view(torch.uint8)[unused] = slots
    else:
        fill = torch.tensor([NAN, INF, -INF], dtype=torch.bfloat16)
        cache[unused] = fill[torch.arange(int(unused.sum())) % 3][:, None, None].expand(-1, 1, 576)
    return q, cache, table, seqlens


def _finite_rows_close(out, lse, ref, ref_lse):
    """Rows whose reference lse is finite: the same non-finite pattern, finite values
    within the MLA tolerances."""
    rows_ok = torch.isfinite(ref_lse.transpose(1, 2))           # [b, s_q, h_q]
    assert (lse[torch.isfinite(ref_lse)] - ref_lse[torch.isfinite(ref_lse)]).abs().max() < MLA_LSE_ABS
    o, r = out[rows_ok].float(), ref[rows_ok].float()
    assert (o != POISON).all()
    assert torch.equal(_pattern(o), _pattern(r))
    for row_o, row_r in zip(o, r):
        fin = torch.isfinite(row_r)
        assert calc_diff(row_o[fin], row_r[fin]) < MLA_OUT_CALC_DIFF
    return rows_ok


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize("causal", [False, True])
def test_mla_unused_slots_do_not_leak(backend, fp8, causal, seed):
    q, cache, table, seqlens = _mla_problem(fp8, specials_in_use=False)
    out, lse = _mla(backend, q, cache, table, seqlens, causal)
    ref, ref_lse = _mla("reference", q, cache, table, seqlens, causal)
    assert torch.isfinite(ref_lse).all() and torch.isfinite(ref.float()).all()
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    _finite_rows_close(out, lse, ref, ref_lse)


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
def test_mla_non_finite_inputs(backend, fp8, seed):
    # Rows whose scores stay finite match the reference, non-finite output columns (a -Inf
    # value under a zero weight gives NaN, as 0 * Inf) included; rows with a NaN or +Inf
    # score get lse = +Inf as in the reference; sequence 2 is untouched.
    q, cache, table, seqlens = _mla_problem(fp8, specials_in_use=True)
    out, lse = _mla(backend, q, cache, table, seqlens, False)
    ref, ref_lse = _mla("reference", q, cache, table, seqlens, False)
    rows_ok = _finite_rows_close(out, lse, ref, ref_lse)
    assert rows_ok[2].all() and not rows_ok[1].any() and not rows_ok[0, 0, 3]
    assert torch.equal(_pattern(lse), _pattern(ref_lse))
    assert (out[~rows_ok].float() != POISON).all()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
def test_mla_rows_with_non_finite_scores(fp8, seed):
    q, cache, table, seqlens = _mla_problem(fp8, specials_in_use=True)
    out, _ = _mla("triton", q, cache, table, seqlens, False)
    ref, ref_lse = _mla("reference", q, cache, table, seqlens, False)
    bad = ~torch.isfinite(ref_lse.transpose(1, 2))
    assert torch.equal(_pattern(out[bad]), _pattern(ref[bad]))


# Scores x softmax_scale beyond 2^31 in the kernels' log2 domain (softmax_scale 1e9 on ordinary
# q and keys, or ordinary softmax_scale on a huge q): the softmax is one-hot (distinct scores
# are hundreds of units or more apart there), so out is the V row of the largest score, lse finite.
# The running max is a rounded product; the exponents must round theirs alike, or 2^(the
# rounding) overflows (it did: NaN out, +-inf lse). Tolerances: out as the other MLA tests
# here; lse relative 1e-6 (an absolute one means nothing at |lse| ~ 1e10; the log2-domain
# scale and the rounded max make a few ulp).
HUGE_LOGIT_CASES = {"scale": (1e9, 1.0), "q": (0.05, 1e10)}   # (softmax_scale, q factor)
HUGE_LSE_RTOL = 1e-6


def _assert_one_hot_matches(out, lse, ref, ref_lse):
    assert torch.isfinite(ref_lse).all() and torch.isfinite(ref.float()).all()
    assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all(), "non-finite out / lse"
    assert torch.allclose(lse, ref_lse, rtol=HUGE_LSE_RTOL, atol=0), f"lse: {(lse - ref_lse).abs().max()}"
    assert calc_diff(out.float(), ref.float()) < MLA_OUT_CALC_DIFF


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize("h_q", [16, 64], ids=["narrow", "64_rows"])
@pytest.mark.parametrize("case", HUGE_LOGIT_CASES)
def test_mla_decode_huge_logits(backend, fp8, h_q, case, seed):
    from pykernels.reference import mla as RM
    from .mla_cases import make_problem
    scale, q_factor = HUGE_LOGIT_CASES[case]
    q, cache, table, seqlens = make_problem([70, 130], 1, h_q)
    q = (q.float() * q_factor).bfloat16()
    if fp8:
        cache = RM.quantize_kv_cache_fp8(cache)
    out, lse = _mla(backend, q, cache, table, seqlens, True, scale)
    _assert_one_hot_matches(out, lse, *_mla("reference", q, cache, table, seqlens, True, scale))


def _distinct_indices(rows, n, topk):
    """int32 [rows, 1, topk]: topk distinct random indices below n per row (a duplicated
    maximum: tests/test_dsa_reference.py's huge-scores test)."""
    return torch.stack([torch.randperm(n)[:topk] for _ in range(rows)]).int().view(rows, 1, topk)


def _sparse_problem(b, s_q, h_q, topk, pages, q_factor):
    """Random q (times q_factor), FP8 cache and indices (a few -1) of a sparse decode."""
    from pykernels.reference import mla as RM
    cache = RM.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16())
    q = (torch.randn(b, s_q, h_q, 576) * q_factor).bfloat16()
    idx = _distinct_indices(b * s_q, pages * 64, topk).view(b, s_q, topk)
    idx[0, 0, 3:9] = -1
    return q, cache, idx


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("h_q", [16, 64], ids=["narrow", "64_rows"])
@pytest.mark.parametrize("case", HUGE_LOGIT_CASES)
def test_sparse_decode_huge_logits(backend, h_q, case, seed):
    import pykernels.dsa as D
    scale, q_factor = HUGE_LOGIT_CASES[case]
    q, cache, idx = _sparse_problem(2, 1, h_q, 80, 3, q_factor)
    got = D.flash_mla_sparse_decode(q, cache, idx, scale, backend=backend)
    _assert_one_hot_matches(*got, *D.flash_mla_sparse_decode(q, cache, idx, scale, backend="reference"))


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("case", HUGE_LOGIT_CASES)
def test_sparse_prefill_huge_logits(backend, case, seed):
    import pykernels.dsa as D
    scale, q_factor = HUGE_LOGIT_CASES[case]
    q = (torch.randn(2, 64, 576) * q_factor).bfloat16()
    kv = torch.randn(100, 1, 576).bfloat16()
    idx = _distinct_indices(2, 100, 80)
    out, mx, lse = D.flash_mla_sparse_fwd(q, kv, idx, scale, backend=backend)
    ref, ref_mx, ref_lse = D.flash_mla_sparse_fwd(q, kv, idx, scale, backend="reference")
    _assert_one_hot_matches(out, lse, ref, ref_lse)
    assert torch.allclose(mx, ref_mx, rtol=HUGE_LSE_RTOL, atol=0)
