"""DeepGEMM users' code through `import pykernels as deep_gemm` (docs/compat.md): the helpers
against their definitions, the v1 names as aliases, set_num_sms reaching the launch plan,
DeepGEMM's keywords accepted where they mean what we compute and rejected by name
otherwise, and a DeepGEMM-style script on the reference backend (CPU shapes)."""
import random

import pytest
import torch

import pykernels as pk
from pykernels import gemm as PG
from pykernels import mla_schedule, registry
from pykernels import reference as R
from pykernels.cuda import gemm as CG
from pykernels.metrics import calc_diff
from pykernels.runtime import hardware

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights


@pytest.fixture
def sms_cap_restored():
    yield
    pk.set_num_sms(0)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.uint8)


# ------------------------------------------------------------------ helpers

def test_get_tma_aligned_size_against_its_definition(seed):
    for _ in range(200):
        mn, es = random.randrange(0, 5000), random.choice((1, 2, 4, 8, 16))
        got = pk.get_tma_aligned_size(mn, es)
        # the smallest size >= mn whose rows span a multiple of 16 bytes
        assert got >= mn and (got * es) % 16 == 0 and got - mn < 16 // es
    assert pk.utils.get_tma_aligned_size is pk.get_tma_aligned_size
    for args, exc, msg in (((5, 3), ValueError, "element_size: expected a divisor of 16 bytes, got 3"),
                           ((5, 32), ValueError, "element_size: expected a divisor of 16 bytes, got 32"),
                           ((5, 0), ValueError, "element_size: expected an int >= 1, got 0"),
                           ((-1, 4), ValueError, "mn: expected an int >= 0, got -1"),
                           ((5.0, 4), TypeError, "mn: expected an int, got float 5.0")):
        with pytest.raises(exc, match=msg):
            pk.get_tma_aligned_size(*args)


def _random_scales(seed_shape):
    """float32 scales [.., m, kb] in a random layout: contiguous, transposed storage or sliced."""
    *lead, m, kb = seed_shape
    layout = random.choice(("contiguous", "transposed", "sliced"))
    if layout == "contiguous":
        return torch.rand(*lead, m, kb)
    if layout == "transposed":
        return torch.rand(*lead, kb, m).transpose(-1, -2)
    return torch.rand(*lead, m, kb + 3)[..., 1:kb + 1]


def test_mn_major_tma_aligned_tensor_is_the_col_major_helper(seed):
    assert pk.get_mn_major_tma_aligned_tensor is pk.get_col_major_tma_aligned_tensor
    assert pk.utils.get_mn_major_tma_aligned_tensor is pk.get_col_major_tma_aligned_tensor
    for _ in range(30):
        m, kb = random.randrange(1, 300), random.randrange(1, 9)
        lead = random.choice(((), (random.randrange(1, 4),)))
        sf = _random_scales((*lead, m, kb))
        got = pk.get_mn_major_tma_aligned_tensor(sf)
        m_pad = pk.get_tma_aligned_size(m, 4)
        want_strides = (1, m_pad) if not lead else (kb * m_pad, 1, m_pad)
        assert torch.equal(got, sf) and got.dtype == torch.float32
        if m > 1 and kb > 1:                         # size-1 dims: torch keeps any stride
            assert got.stride() == want_strides
        assert got.data_ptr() % 16 == 0
        assert pk.get_mn_major_tma_aligned_tensor(got) is got      # aligned input: returned as is
    with pytest.raises(TypeError, match="sf: expected dtype float32, got bfloat16"):
        pk.get_mn_major_tma_aligned_tensor(torch.rand(4, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"sf: expected a 2-D \[m, kb\] or 3-D \[G, m, kb\] tensor, got shape \[4\]"):
        pk.get_mn_major_tma_aligned_tensor(torch.rand(4))


def test_contiguous_alignment_tiles_every_tile_height():
    # DeepGEMM's 128; aligned groups fill whole 64/128-row tiles, or whole halves of a 256-row
    # tile (which computes a tile holding two groups once per group)
    assert pk.get_mk_alignment_for_contiguous_layout() == PG.CONTIGUOUS_ALIGNMENT == 128
    heights = {c.block_m for c in CG.compiled_configs()}
    assert PG.CONTIGUOUS_ALIGNMENT in heights
    assert all(PG.CONTIGUOUS_ALIGNMENT % h == 0 or h % PG.CONTIGUOUS_ALIGNMENT == 0 for h in heights), heights
    assert pk.get_m_alignment_for_contiguous_layout is pk.get_mk_alignment_for_contiguous_layout
    pk.set_mk_alignment_for_contiguous_layout(PG.CONTIGUOUS_ALIGNMENT)
    with pytest.raises(ValueError, match="value: expected 128 .*not supported yet.*, got 64"):
        pk.set_mk_alignment_for_contiguous_layout(64)


def test_utils_math_and_testing_helpers(seed):
    for _ in range(100):
        x, y = random.randrange(0, 10_000), random.randrange(1, 300)
        assert pk.ceil_div(x, y) == -(-x // y) and pk.utils.ceil_div is pk.ceil_div
        assert pk.align(x, y) % y == 0 and 0 <= pk.align(x, y) - x < y
    parts = [torch.empty(random.randrange(0, 50), dtype=random.choice((torch.float32, torch.bfloat16,
                                                                        torch.float8_e4m3fn)))
             for _ in range(6)]
    nested = (parts[0], [parts[1], (parts[2], None)], None, parts[3:])
    assert pk.testing.count_bytes(*nested) == sum(p.numel() * p.element_size() for p in parts)
    assert pk.testing.calc_diff is calc_diff and pk.utils.calc_diff is calc_diff
    assert pk.testing.get_arch_major() == 9


# ------------------------------------------------------------------ casts

def test_casts_accept_deepgemm_keywords(seed):
    x = torch.randn(random.randrange(1, 200), random.randrange(1, 400), dtype=torch.bfloat16)
    assert pk.utils.per_token_cast_to_fp8 is pk.per_token_cast_to_fp8
    assert pk.utils.per_block_cast_to_fp8 is pk.per_block_cast_to_fp8
    for cast in (pk.per_token_cast_to_fp8, pk.per_block_cast_to_fp8):
        q0, s0 = cast(x)
        q1, s1 = cast(x, use_ue8m0=False, gran_k=128)
        q2, s2 = cast(x, False)                      # DeepGEMM passes use_ue8m0 positionally too
        for q, s in ((q1, s1), (q2, s2)):
            assert torch.equal(_bits(q), _bits(q0)) and torch.equal(s, s0)
    for kw, exc, msg in ((dict(gran_k=32), ValueError, "gran_k: expected 128 .*, got 32"),
                         (dict(use_packed_ue8m0=True), ValueError, "use_packed_ue8m0: expected False .*, got True"),
                         (dict(use_ue8m0=1), TypeError, "use_ue8m0: expected a bool, got int")):
        with pytest.raises(exc, match=msg):
            pk.per_token_cast_to_fp8(x, **kw)
    with pytest.raises(ValueError, match="gran_k: expected 128 .*, got 64"):
        pk.per_block_cast_to_fp8(x, True, 64)


def test_ceil_to_ue8m0_against_its_definition(seed):
    sf = torch.cat([torch.rand(500) * 10.0 ** torch.randint(-30, 30, (500,)),
                    2.0 ** torch.randint(-100, 100, (20,)).float(),            # exact powers stay
                    torch.tensor([0.0, 1e-45, 3e38, -0.3, float("inf"), float("nan")])])
    got = pk.utils.ceil_to_ue8m0(sf)
    finite = torch.isfinite(sf)
    want = torch.exp2(torch.ceil(torch.log2(sf.abs().double()))).clamp(2.0 ** -126, 2.0 ** 127).float()
    assert torch.equal(got[finite], want[finite])
    assert got[-2] == float("inf") and got[-1].isnan()


@pytest.mark.parametrize("cast, rows, cols", [("per_token_cast_to_fp8", 1, 128), ("per_block_cast_to_fp8", 128, 128),
                                              ("per_channel_cast_to_fp8", 128, 1)])
def test_ue8m0_casts_against_their_definition(cast, rows, cols, seed):
    m, n = random.randrange(1, 300), random.randrange(1, 400)
    x = torch.randn(m, n, dtype=torch.bfloat16) * torch.rand(m, 1, dtype=torch.bfloat16) * 100
    q, sf = getattr(pk.utils, cast)(x, use_ue8m0=True)
    _, sf_plain = getattr(pk.utils, cast)(x, use_ue8m0=False)
    assert sf.shape == sf_plain.shape and torch.equal(sf, pk.utils.ceil_to_ue8m0(sf_plain))
    assert ((sf >= sf_plain) & (sf < 2 * sf_plain)).all()          # the next power of two up
    full = sf.repeat_interleave(rows, 0)[:m].repeat_interleave(cols, 1)[:, :n]     # each element's scale
    # q = e4m3(x / sf): x / sf is exact (a power of two), then one round-to-nearest-even
    want = (x.float() / full).to(torch.float8_e4m3fn)
    assert torch.equal(_bits(q), _bits(want)) and q.is_contiguous()


def test_ue8m0_casts_keep_the_non_finite_rules(seed):
    # docs/numerics.md: a NaN group keeps a NaN scale and all-NaN q, an Inf group an Inf scale
    x = torch.randn(3, 256)
    x[0, random.randrange(128)], x[1, random.randrange(128)] = float("nan"), float("inf")
    q, sf = pk.per_token_cast_to_fp8(x, use_ue8m0=True)
    q0, sf0 = pk.per_token_cast_to_fp8(x)
    assert sf[0, 0].isnan() and sf[1, 0] == float("inf")
    assert torch.equal(_bits(q[:2, :128]), _bits(q0[:2, :128]))


def test_gemm_on_ue8m0_scales(seed):
    # power-of-two float32 scales are just scales: the GEMM needs nothing else
    m, n, k = 33, 256, 384
    x, y = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    a = pk.per_token_cast_to_fp8(x, use_ue8m0=True)
    b = pk.per_block_cast_to_fp8(y, use_ue8m0=True)
    out = pk.fp8_gemm_nt(a, b, nan_bf16(m, n))
    assert torch.equal(_bits(out), _bits(R.fp8_gemm_nt(*a, *b)))
    assert calc_diff(out, x.float() @ y.float().T) < 1e-3


def test_per_channel_cast_against_its_definition(seed):
    m, n = random.randrange(1, 400), random.randrange(1, 100)
    x = torch.randn(m, n) * torch.rand(1, n) * 50
    q, sf = pk.per_channel_cast_to_fp8(x, use_ue8m0=False)
    mb = -(-m // 128)
    assert q.shape == (m, n) and q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert sf.shape == (mb, n) and sf.dtype == torch.float32
    padded = torch.zeros(mb * 128, n)
    padded[:m] = x
    amax = padded.view(mb, 128, n).abs().amax(dim=1).clamp(min=1e-4)
    assert torch.equal(sf, (amax.double() / 448).float())          # amax / 448 per 128 rows of a column
    sf_rows = sf.repeat_interleave(128, dim=0)[:m]
    deq = q.float() * sf_rows
    # e4m3 rounding: half an ulp is at most 2^-4 of the value (normals), 2^-10 x sf (subnormals)
    assert ((deq - x).abs() <= (2.0 ** -4 * x.abs() + 2.0 ** -10 * sf_rows) * (1 + 1e-5)).all()
    qt, st = R.per_token_cast_to_fp8(x.t().contiguous())             # same bits as the per-token cast of x^T
    assert torch.equal(_bits(q), _bits(qt.t().contiguous())) and torch.equal(sf, st.t())
    with pytest.raises(ValueError, match="x: expected a 2-D tensor, got 3-D"):
        pk.per_channel_cast_to_fp8(torch.randn(2, 3, 4))


# ------------------------------------------------------------------ SM count

def _heuristic_plan(m, n, k):
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    return CG.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=CG.KIND_NORMAL, m=m, n=n, k=k, groups=1)


def test_set_num_sms_caps_the_plans_grid(seed, sms_cap_restored):
    m, n, k = 4096, 2048, 128                        # more tiles than SMs for every config
    full = _heuristic_plan(m, n, k)
    assert pk.get_num_sms() == hardware.device_sms(None) and full.grid[0] == hardware.DEFAULT_NUM_SMS
    cap = random.randrange(2, 60)
    pk.set_num_sms(cap)
    assert pk.get_num_sms() == cap and hardware.num_sms("cpu") == cap
    capped = _heuristic_plan(m, n, k)                # the cached heuristic answer is keyed by the SM count
    assert capped.grid[0] == cap
    cfg = next(c for c in CG.compiled_configs() if c.function == capped.function)
    assert CG.arg(capped, "band") == CG.raster_band(-(-n // cfg.block_n), cap)
    assert mla_schedule.default_num_sm_parts(torch.device("cpu"), 1, 1) == cap
    pk.set_num_sms(0)
    assert pk.get_num_sms() == hardware.DEFAULT_NUM_SMS and _heuristic_plan(m, n, k).grid == full.grid


@pytest.mark.parametrize("bad, exc, msg", [
    (-1, ValueError, r"num_sms: expected an int in \[0, 132\], got -1"),
    (133, ValueError, r"num_sms: expected an int in \[0, 132\], got 133"),
    (8.0, TypeError, "num_sms: expected an int, got float 8.0"),
    (True, TypeError, "num_sms: expected an int, got bool True"),
    ("8", TypeError, "num_sms: expected an int, got str '8'"),
])
def test_set_num_sms_rejects_bad_values(bad, exc, msg, sms_cap_restored):
    if torch.cuda.is_available():
        pytest.skip("the bound is the GPU's SM count")
    pk.set_num_sms(7)
    with pytest.raises(exc, match=msg):
        pk.set_num_sms(bad)
    assert pk.get_num_sms() == 7                     # a rejected value leaves the cap as it was


@pytest.mark.gpu
def test_set_num_sms_on_the_gpu(seed, sms_cap_restored):
    # the bound is the device's SM count; a capped cuda GEMM launches at most that many CTAs
    # and computes what the uncapped one does (the heuristic may pick another tile)
    device_sms = hardware.device_sms(torch.device("cuda"))
    assert pk.get_num_sms() == device_sms
    with pytest.raises(ValueError, match=rf"num_sms: expected an int in \[0, {device_sms}\], got {device_sms + 1}"):
        pk.set_num_sms(device_sms + 1)
    x, y, a, sfa, b, sfb = (t.cuda() for t in normal_problem(2048, 2048, 512))
    full = pk.fp8_gemm_nt((a, sfa), (b, sfb), torch.full((2048, 2048), float("nan"), dtype=torch.bfloat16,
                                                         device="cuda"), backend="cuda")
    pk.set_num_sms(16)
    plan = CG.gemm_plan(a, sfa, b, sfb, torch.empty_like(full), None, kind=CG.KIND_NORMAL, m=2048, n=2048, k=512,
                        groups=1)
    assert plan.grid[0] == 16
    capped = pk.fp8_gemm_nt((a, sfa), (b, sfb), torch.full_like(full, float("nan")), backend="cuda")
    pk.check_errors()
    assert not capped.isnan().any() and calc_diff(capped, full) < 1e-6
    assert calc_diff(full, x.float() @ y.float().T) < 1e-3


# ------------------------------------------------------------------ GEMM names and keywords

def _normal_args(m=48, n=256, k=384):
    x, y, a, sfa, b, sfb = normal_problem(m, n, k)
    return x, y, (a, sfa), (b, sfb)


def _contiguous_args(groups=3, n=256, k=256):
    rows = [random.randrange(0, 150) for _ in range(groups)]
    m_indices = contiguous_indices(rows, pad_to=pk.get_mk_alignment_for_contiguous_layout())
    a = pk.per_token_cast_to_fp8(torch.randn(m_indices.numel(), k))
    return a, quantized_weights(groups, n, k), m_indices


def _masked_args(groups=3, m_max=64, n=256, k=256):
    a, sfa = pk.per_token_cast_to_fp8(torch.randn(groups * m_max, k))
    masked_m = torch.randint(0, m_max + 1, (groups,), dtype=torch.int32)
    return (a.view(groups, m_max, k), sfa.view(groups, m_max, -1)), quantized_weights(groups, n, k), masked_m


def test_v1_names_are_the_current_functions(seed):
    assert pk.gemm_fp8_fp8_bf16_nt is pk.fp8_gemm_nt
    assert pk.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous is pk.m_grouped_fp8_gemm_nt_contiguous
    assert pk.m_grouped_gemm_fp8_fp8_bf16_nt_masked is pk.m_grouped_fp8_gemm_nt_masked
    x, y, a, b = _normal_args()
    o1, o2 = nan_bf16(48, 256), nan_bf16(48, 256)
    pk.gemm_fp8_fp8_bf16_nt(a, b, o1)
    pk.fp8_gemm_nt(a, b, o2, backend="reference")
    assert torch.equal(_bits(o1), _bits(o2)) and calc_diff(o1, x.float() @ y.float().T) < 1e-3

    a, b, m_indices = _contiguous_args()
    o1, o2 = nan_bf16(m_indices.numel(), 256), nan_bf16(m_indices.numel(), 256)
    pk.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, o1, m_indices)
    pk.m_grouped_fp8_gemm_nt_contiguous(a, b, o2, m_indices, backend="reference")
    assert torch.equal(_bits(o1), _bits(o2))
    assert o1[m_indices < 0].isnan().all() and not o1[m_indices >= 0].isnan().any()   # padding rows untouched

    a, b, masked_m = _masked_args()
    o1, o2 = nan_bf16(3, 64, 256), nan_bf16(3, 64, 256)
    pk.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, b, o1, masked_m, 32)
    pk.m_grouped_fp8_gemm_nt_masked(a, b, o2, masked_m, 32, backend="reference")
    assert torch.equal(_bits(o1), _bits(o2))
    for g in range(3):
        assert o1[g, masked_m[g]:].isnan().all() and not o1[g, :masked_m[g]].isnan().any()


ACCEPTED = [
    dict(recipe=(1, 128, 128)), dict(recipe=[1, 128, 128]), dict(recipe_a=(1, 128), recipe_b=(128, 128)),
    dict(compiled_dims="nk"), dict(compiled_dims="mn"), dict(compiled_dims=""), dict(compiled_dims="kmn"),
    dict(disable_ue8m0_cast=True), dict(disable_ue8m0_cast=False), dict(recipe=None, recipe_a=None, recipe_b=None),
]
CONTIGUOUS_ONLY = [dict(use_psum_layout=False), dict(ensure_zero_padding=False), dict(ensure_zero_padding=None),
                   dict(expected_m_for_psum_layout=None)]


def test_accepted_keywords_compute_the_same(seed):
    _, _, a, b = _normal_args()
    ref = pk.fp8_gemm_nt(a, b, nan_bf16(48, 256))
    for kw in ACCEPTED + [dict(c=None)]:
        assert torch.equal(_bits(pk.fp8_gemm_nt(a, b, nan_bf16(48, 256), **kw)), _bits(ref)), kw
    a, b, m_indices = _contiguous_args()
    ref = pk.m_grouped_fp8_gemm_nt_contiguous(a, b, nan_bf16(m_indices.numel(), 256), m_indices)
    for kw in ACCEPTED + CONTIGUOUS_ONLY:
        out = pk.m_grouped_fp8_gemm_nt_contiguous(a, b, nan_bf16(m_indices.numel(), 256), m_indices, **kw)
        assert torch.equal(_bits(out), _bits(ref)), kw
    a, b, masked_m = _masked_args()
    ref = pk.m_grouped_fp8_gemm_nt_masked(a, b, nan_bf16(3, 64, 256), masked_m, 16)
    for kw in ACCEPTED:
        assert torch.equal(_bits(pk.m_grouped_fp8_gemm_nt_masked(a, b, nan_bf16(3, 64, 256), masked_m, 16, **kw)),
                           _bits(ref)), kw


def test_accepted_keywords_trace_whole(seed):
    # the checks are plain Python on non-tensor arguments: torch.compile traces through them
    x, y, a, b = _normal_args()

    def f(x, b, sfb):
        q = pk.per_token_cast_to_fp8(x, use_ue8m0=False, gran_k=128)
        out = torch.empty(x.shape[0], b.shape[0], dtype=torch.bfloat16)
        return pk.fp8_gemm_nt(q, (b, sfb), out, c=None, recipe=(1, 128, 128), compiled_dims="nk",
                              disable_ue8m0_cast=True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, *b)
    assert torch.equal(_bits(got), _bits(f(x, *b)))


# 1x128 B scales: fp8_gemm_nt's (tests/test_api_fp8.py), rejected by the grouped GEMMs
GROUPED_REJECTED = [
    (dict(recipe=(1, 1, 128)), ValueError, r"recipe: expected \(1, 128, 128\) .*, got \(1, 1, 128\)"),
    (dict(recipe_a=(1, 128), recipe_b=(1, 128)), ValueError, r"recipe_b: expected \(128, 128\) .*, got \(1, 128\)"),
]
REJECTED = [
    (dict(recipe=(128, 128, 128)), ValueError, r"recipe: expected \(1, 128, 128\) .*, got \(128, 128, 128\)"),
    (dict(recipe=(1, 128)), ValueError, r"recipe: expected \(1, 128, 128\) .*, got \(1, 128\)"),
    (dict(recipe=(1, 128, 128), recipe_a=(1, 128), recipe_b=(128, 128)), ValueError,
     "recipe: expected either recipe or recipe_a [+] recipe_b"),
    (dict(recipe_a=(1, 128)), ValueError, r"recipe_a, recipe_b: expected both or neither, got recipe_a=\(1, 128\)"),
    (dict(recipe_b=(128, 128)), ValueError, "recipe_a, recipe_b: expected both or neither"),
    (dict(recipe_a=(1, 32), recipe_b=(128, 128)), ValueError, r"recipe_a: expected \(1, 128\) .*, got \(1, 32\)"),
    (dict(compiled_dims="nkx"), ValueError, "compiled_dims: expected a string of distinct letters from 'mnk'.*'nkx'"),
    (dict(compiled_dims="nn"), ValueError, "compiled_dims: .*got 'nn'"),
    (dict(compiled_dims=None), ValueError, "compiled_dims: .*got None"),
    (dict(disable_ue8m0_cast=1), TypeError, "disable_ue8m0_cast: expected a bool, got int"),
]
CONTIGUOUS_REJECTED = [
    (dict(use_psum_layout=True), ValueError, "use_psum_layout: expected False .*not supported yet.*, got True"),
    (dict(ensure_zero_padding=True), ValueError,
     "ensure_zero_padding: expected False or None .*not supported yet.*, got True"),
    (dict(expected_m_for_psum_layout=64), ValueError, "expected_m_for_psum_layout: expected None .*, got 64"),
]


def _calls():
    """(name, call(**kw) -> out) for the three GEMMs on fresh inputs, out poisoned."""
    _, _, a, b = _normal_args()
    ca, cb, m_indices = _contiguous_args()
    ma, mb, masked_m = _masked_args()
    outs = {"normal": nan_bf16(48, 256), "contiguous": nan_bf16(m_indices.numel(), 256),
            "masked": nan_bf16(3, 64, 256)}
    return outs, {
        "normal": lambda **kw: pk.fp8_gemm_nt(a, b, outs["normal"], **kw),
        "contiguous": lambda **kw: pk.m_grouped_fp8_gemm_nt_contiguous(ca, cb, outs["contiguous"], m_indices, **kw),
        "masked": lambda **kw: pk.m_grouped_fp8_gemm_nt_masked(ma, mb, outs["masked"], masked_m, 16, **kw),
    }


@pytest.mark.parametrize("kw, exc, msg", REJECTED + CONTIGUOUS_REJECTED + GROUPED_REJECTED)
def test_unsupported_keyword_values_are_named(kw, exc, msg, seed):
    outs, calls = _calls()
    layouts = (("contiguous",) if (kw, exc, msg) in CONTIGUOUS_REJECTED else ("contiguous", "masked")
               if (kw, exc, msg) in GROUPED_REJECTED else ("normal", "contiguous", "masked"))
    for layout in layouts:
        with pytest.raises(exc, match=msg):
            calls[layout](**kw)
        assert outs[layout].isnan().all()            # rejected before anything is written


def test_accumulation_into_bf16_is_rejected_by_name(seed):
    # c (d = c + a @ b) needs a float32 d, as in DeepGEMM (float32 forms: tests/test_api_fp8.py)
    _, _, a, b = _normal_args()
    out = nan_bf16(48, 256)
    for c in (torch.zeros(48, 256, dtype=torch.bfloat16), torch.zeros(48, 256), out):
        with pytest.raises(ValueError, match=r"c: accumulation \(out = c \+ a b\^T\) needs a float32 out"):
            pk.fp8_gemm_nt(a, b, out, c=c)
        with pytest.raises(ValueError, match="c: accumulation"):
            pk.fp8_gemm_nt(a, b, out, c)             # DeepGEMM's fourth positional argument
    assert out.isnan().all()


@pytest.mark.parametrize("name", ["k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
                                  "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_fp8_gemm_tn_contiguous"])
def test_unimplemented_gemms_raise_naming_themselves(name):
    fn = getattr(pk, name)
    assert fn.__name__ == name
    with pytest.raises(NotImplementedError, match=f"{name}: .* is not supported yet"):
        fn(None, None, None)


# ------------------------------------------------------------------ a DeepGEMM-style script

def _deepgemm_style_script(deep_gemm):
    """Written in the way DeepGEMM's users call it (its current and v1 names), CPU-sized."""
    from_utils = deep_gemm.utils
    # dense: per-token A, per-block B, A scales in the MN-major TMA-aligned layout
    m, n, k = 40, 384, 512
    x, y = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    x_fp8 = from_utils.per_token_cast_to_fp8(x, use_ue8m0=False)
    x_fp8 = (x_fp8[0], deep_gemm.get_mn_major_tma_aligned_tensor(x_fp8[1]))
    y_fp8 = from_utils.per_block_cast_to_fp8(y, use_ue8m0=False)
    d = torch.empty(m, n, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(x_fp8, y_fp8, d, c=None, disable_ue8m0_cast=False, recipe=None)
    ref = x.float() @ y.float().T
    assert deep_gemm.testing.calc_diff(d, ref) < 0.001
    d_v1 = torch.empty_like(d)
    deep_gemm.gemm_fp8_fp8_bf16_nt(x_fp8, y_fp8, d_v1)
    assert torch.equal(d_v1, d)

    # contiguous: each expert's rows padded to the alignment, -1 marks padding
    num_groups, n, k = 4, 256, 384
    alignment = deep_gemm.get_mk_alignment_for_contiguous_layout()
    actual = [random.randrange(1, 100) for _ in range(num_groups)]
    aligned = [deep_gemm.align(r, alignment) for r in actual]
    m_sum = sum(aligned)
    x = torch.randn(m_sum, k, dtype=torch.bfloat16)
    y = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    m_indices = torch.empty(m_sum, dtype=torch.int32)
    start = 0
    for g, (r, ar) in enumerate(zip(actual, aligned)):
        m_indices[start:start + r] = g
        m_indices[start + r:start + ar] = -1
        start += ar
    x_fp8 = from_utils.per_token_cast_to_fp8(x, use_ue8m0=False)
    y_q = [from_utils.per_block_cast_to_fp8(y[g], use_ue8m0=False) for g in range(num_groups)]
    y_fp8 = (torch.stack([q for q, _ in y_q]), torch.stack([s for _, s in y_q]))
    d = torch.empty(m_sum, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(x_fp8, y_fp8, d, m_indices, disable_ue8m0_cast=False,
                                               use_psum_layout=False)
    ref = torch.einsum("mk,mnk->mn", x.float(), y.float()[m_indices.clamp(min=0).long()])
    valid = m_indices >= 0
    assert deep_gemm.testing.calc_diff(d[valid], ref[valid]) < 0.001

    # masked: fixed capacity per expert, masked_m valid rows
    max_m, expected_m = 64, 24
    x = torch.randn(num_groups, max_m, k, dtype=torch.bfloat16)
    masked_m = torch.tensor([random.randrange(1, max_m + 1) for _ in range(num_groups)], dtype=torch.int32)
    x_q = [from_utils.per_token_cast_to_fp8(x[g], use_ue8m0=False) for g in range(num_groups)]
    x_fp8 = (torch.stack([q for q, _ in x_q]), torch.stack([s for _, s in x_q]))
    x_fp8 = (x_fp8[0], deep_gemm.get_mn_major_tma_aligned_tensor(x_fp8[1]))
    d = torch.empty(num_groups, max_m, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(x_fp8, y_fp8, d, masked_m, expected_m)
    for g in range(num_groups):
        rows = int(masked_m[g])
        assert deep_gemm.calc_diff(d[g, :rows], x[g, :rows].float() @ y[g].float().T) < 0.001

    # the SM cap DeepGEMM users set (for communication kernels sharing the GPU)
    deep_gemm.set_num_sms(deep_gemm.get_num_sms() // 2)


def test_deepgemm_style_script_runs_unchanged(seed, sms_cap_restored, monkeypatch):
    import pykernels as deep_gemm
    chosen = []
    select = registry.Op.select

    def recording(self, problem, backend):
        b = select(self, problem, backend)
        chosen.append((self.name, b.name))
        return b
    monkeypatch.setattr(registry.Op, "select", recording)
    _deepgemm_style_script(deep_gemm)
    assert {b for _, b in chosen} == {"reference"}              # "auto" on CPU tensors
    assert {o for o, _ in chosen} == {"per_token_cast_to_fp8", "per_block_cast_to_fp8", "fp8_gemm_nt",
                                      "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"}
    assert deep_gemm.get_num_sms() == hardware.device_sms(None) // 2
