"""pykernels.compat.deep_gemm against DeepGEMM's documented interface (v2.8 `deep_gemm/__init__.py`,
its pybind parameter names and defaults, README): every public name present, the implemented
ones with DeepGEMM's parameters and semantics (None returned, `d` written in place, padding rows
of the contiguous layout zeroed by default, the prefix-sum layout, empty problems, scales in any
layout, the utils casts' rounding), compared with pykernels.reference on the CPU backends
(reference, triton) with poisoned outputs, and NotImplementedError naming each valid call that
pykernels does not implement. K includes DeepGEMM's 576 and 832 (a partial last K block)."""
import inspect

import pytest
import torch

import pykernels.compat.deep_gemm as deep_gemm
from pykernels import reference as R
from pykernels.metrics import calc_diff
from pykernels.reference import dsa as RD

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights

BACKENDS = ["reference", "triton"]
# bf16 output of an fp32 result: the backends may round differently by one bf16 step
BF16_RTOL, BF16_ATOL = 2.0 ** -7, 1e-2

# DeepGEMM v2.8's deep_gemm/__init__.py, with its `utils` names (re-exported there by `import *`)
DEEP_GEMM_NAMES = """
set_num_sms get_num_sms set_tc_util get_tc_util set_ignore_compile_dims set_block_size_multiple_of set_pdl get_pdl
use_deterministic_algorithms cublaslt_gemm_nt cublaslt_gemm_nn cublaslt_gemm_tn cublaslt_gemm_tt cublaslt_nvfp4_gemm_nt
batched_syrk batched_symm fp8_fp4_gemm_nt fp8_fp4_gemm_nn fp8_fp4_gemm_tn fp8_fp4_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous m_grouped_fp8_fp4_gemm_nn_contiguous m_grouped_fp8_fp4_gemm_nt_masked
fp4_gemm_nt fp8_gemm_nt fp8_gemm_nn fp8_gemm_tn fp8_gemm_tt fp8_gemm_nt_skip_head_mid m_grouped_fp4_gemm_nt_contiguous
m_grouped_fp8_gemm_nt_contiguous m_grouped_fp8_gemm_nn_contiguous m_grouped_fp4_gemm_nt_masked
m_grouped_fp8_gemm_nt_masked k_grouped_fp4_gemm_nt_contiguous k_grouped_fp8_gemm_nt_contiguous
k_grouped_fp8_gemm_tn_contiguous bf16_gemm_nt bf16_gemm_nn bf16_gemm_tn bf16_gemm_tt m_grouped_bf16_gemm_nt_contiguous
m_grouped_bf16_gemm_nn_contiguous m_grouped_bf16_gemm_nt_masked k_grouped_bf16_gemm_tn_contiguous bf16_mega_gate
get_bf16_mega_gate_config einsum fp8_einsum fp8_fp4_mqa_logits get_mqa_logits_metadata get_paged_mqa_logits_metadata
get_sparse_mqa_logits_metadata get_paged_sparse_mqa_logits_metadata fp8_fp4_sparse_mqa_logits
fp8_fp4_paged_sparse_mqa_logits fp8_fp4_paged_mqa_logits fp8_mqa_logits fp8_paged_mqa_logits mega_mhc
tf32_hc_prenorm_gemm transform_sf_into_required_layout get_block_m_for_mega_moe SymmBuffer SM90SymmBuffer
get_symm_buffer_for_mega_moe get_symm_buffer_for_sm90_mega_moe transform_weights_for_mega_moe
transform_weights_for_mega_moe_sm90 fp8_fp4_mega_moe fp8_mega_moe fp4_fp4_mega_moe bf16_mega_moe testing utils
ceil_div align ceil_to_ue8m0 pack_ue8m0_to_int unpack_ue8m0_from_int per_token_cast_to_fp8 per_channel_cast_to_fp8
per_block_cast_to_fp8 per_custom_dims_cast_to_fp8 per_token_cast_to_fp4 transpose_packed_fp4 cast_back_from_fp4
get_tma_aligned_size get_mk_alignment_for_contiguous_layout set_mk_alignment_for_contiguous_layout
get_theoretical_mk_alignment_for_contiguous_layout get_m_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout get_mn_major_tma_aligned_tensor get_mn_major_tma_aligned_packed_ue8m0_tensor
get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor
""".split()

_RECIPES = dict(recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk", disable_ue8m0_cast=False)
# DeepGEMM's parameters (pybind py::arg names and defaults; no default: inspect.Parameter.empty)
E = inspect.Parameter.empty
SIGNATURES = {
    "fp8_gemm_nt": dict(a=E, b=E, d=E, c=None, **_RECIPES, alpha=None),
    "m_grouped_fp8_gemm_nt_contiguous": dict(a=E, b=E, d=E, grouped_layout=E, **_RECIPES, use_psum_layout=False,
                                             ensure_zero_padding=True, expected_m_for_psum_layout=None),
    "m_grouped_fp8_gemm_nt_masked": dict(a=E, b=E, d=E, masked_m=E, expected_m=E, **_RECIPES),
    "fp8_mqa_logits": dict(q=E, kv=E, weights=E, cu_seq_len_k_start=E, cu_seq_len_k_end=E, clean_logits=True,
                           max_seqlen_k=0),
    "fp8_fp4_mqa_logits": dict(q=E, kv=E, weights=E, cu_seq_len_k_start=E, cu_seq_len_k_end=E, clean_logits=True,
                               max_seqlen_k=0, logits_dtype=torch.float32, schedule_meta=None),
    "get_paged_mqa_logits_metadata": dict(context_lens=E, block_kv=E, num_sms=E, indices=None),
    "fp8_paged_mqa_logits": dict(q=E, kv_cache=E, weights=E, context_lens=E, block_table=E, schedule_meta=E,
                                 max_context_len=E, clean_logits=False, indices=None),
    "fp8_fp4_paged_mqa_logits": dict(q=E, kv_cache=E, weights=E, context_lens=E, block_table=E, schedule_meta=E,
                                     max_context_len=E, clean_logits=False, logits_dtype=torch.float32, indices=None),
    "transform_sf_into_required_layout": dict(sf=E, mn=E, k=E, recipe=E, num_groups=None, is_sfa=None,
                                              disable_ue8m0_cast=False, psum_layout=None),
    "per_token_cast_to_fp8": dict(x=E, use_ue8m0=E, gran_k=128, use_packed_ue8m0=False),
    "per_channel_cast_to_fp8": dict(x=E, use_ue8m0=E, gran_k=128),
    "per_block_cast_to_fp8": dict(x=E, use_ue8m0=E, gran_k=128),
    "per_custom_dims_cast_to_fp8": dict(x=E, dims=E, use_ue8m0=E),
    "get_tma_aligned_size": dict(mn=E, element_size=E),
    "set_mk_alignment_for_contiguous_layout": dict(new_value=E),
    "get_theoretical_mk_alignment_for_contiguous_layout": dict(expected_m=None),
    "ceil_div": dict(x=E, y=E),
    "align": dict(x=E, y=E),
    "calc_diff": dict(x=E, y=E),
    "wgrad_gemm_fp8_fp8_fp32_nt": dict(lhs=E, rhs=E, out=E),          # DeepGEMM v1's
    "bf16_gemm_nt": dict(a=E, b=E, d=E, c=None, compiled_dims="nk"),
}


def test_every_public_name_of_deep_gemm_is_present():
    missing = [n for n in DEEP_GEMM_NAMES if not hasattr(deep_gemm, n)]
    assert not missing
    assert set(DEEP_GEMM_NAMES) <= set(deep_gemm.__all__) and "torch" not in deep_gemm.__all__
    # DeepGEMM's aliases are one function object there: here too
    assert deep_gemm.fp8_fp4_gemm_nt is deep_gemm.fp8_gemm_nt is deep_gemm.fp4_gemm_nt
    assert deep_gemm.m_grouped_fp8_fp4_gemm_nt_contiguous is deep_gemm.m_grouped_fp8_gemm_nt_contiguous
    assert deep_gemm.m_grouped_fp8_fp4_gemm_nt_masked is deep_gemm.m_grouped_fp8_gemm_nt_masked
    assert deep_gemm.utils.per_token_cast_to_fp8 is deep_gemm.per_token_cast_to_fp8
    from pykernels.compat.deep_gemm.utils import per_block_cast_to_fp8      # the submodule imports by name
    assert per_block_cast_to_fp8 is deep_gemm.per_block_cast_to_fp8
    assert deep_gemm.testing.calc_diff is deep_gemm.calc_diff


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_parameters_are_deep_gemms(name):
    params = inspect.signature(getattr(deep_gemm, name)).parameters
    positional = {n: p.default for n, p in params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY}
    assert list(positional) == list(SIGNATURES[name])
    assert positional == SIGNATURES[name]
    assert set(params) - set(positional) <= {"backend"}          # pykernels' one addition, keyword-only


def _close(got, want):
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_RTOL, atol=BF16_ATOL, equal_nan=False)


# ------------------------------------------------------------------ GEMMs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [256, 576, 832])          # DeepGEMM's K = 576 and 832: a partial last K block
def test_fp8_gemm_nt_writes_d_and_returns_none(backend, k, seed):
    m, n = int(torch.randint(1, 200, ())), 128 * int(torch.randint(1, 3, ()))
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    d = nan_bf16(m, n)
    assert deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, backend=backend) is None
    _close(d, R.fp8_gemm_nt(a, sfa, b, sfb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [256, 576])
def test_fp8_gemm_nt_accumulates_into_a_float32_d(backend, k, seed):
    m, n = int(torch.randint(1, 150, ())), 128
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    c = torch.randn(m, n) * 10
    d = torch.full((m, n), float("nan"))
    assert deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, c, backend=backend) is None      # d = c + a b^T
    want = R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n), c)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-3)
    # the weight-gradient form: c is d, per-row B scales (recipe (1, 1, 128)); and DeepGEMM v1's name for it
    b_row, sfb_row = R.per_token_cast_to_fp8(torch.randn(n, k, dtype=torch.bfloat16))
    before = d.clone()
    deep_gemm.fp8_gemm_nt((a, sfa), (b_row, sfb_row), d, d, recipe=(1, 1, 128), backend=backend)
    want = R.fp8_gemm_nt(a, sfa, b_row, sfb_row, torch.empty(m, n), before, b_scale_rows=1)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-3)
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt((a, sfa), (b_row, sfb_row), d, backend=backend)
    torch.testing.assert_close(d, R.fp8_gemm_nt(a, sfa, b_row, sfb_row, torch.empty(m, n), want, b_scale_rows=1),
                               rtol=1e-5, atol=1e-3)


def test_fp8_gemm_nt_takes_scales_in_any_layout(seed):
    m, n, k = 37, 256, 384
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    want = R.fp8_gemm_nt(a, sfa, b, sfb)
    # column-major without the TMA padding (stride 37): DeepGEMM transforms such scales, so do we
    odd_sfa = sfa.t().contiguous().t()
    d = nan_bf16(m, n)
    deep_gemm.fp8_gemm_nt((a, odd_sfa), (b, sfb), d, backend="reference")
    assert torch.equal(d, want)


def test_empty_problems_follow_deep_gemm(seed):
    # m = 0 or n = 0: nothing written; k = 0: d = 0 (an empty sum)
    d = nan_bf16(0, 128)
    deep_gemm.fp8_gemm_nt((torch.empty(0, 128, dtype=torch.float8_e4m3fn), torch.empty(0, 1)),
                          (torch.empty(128, 128, dtype=torch.float8_e4m3fn), torch.empty(1, 1)), d)
    d = nan_bf16(5, 128)
    deep_gemm.fp8_gemm_nt((torch.empty(5, 0, dtype=torch.float8_e4m3fn), torch.empty(5, 0)),
                          (torch.empty(128, 0, dtype=torch.float8_e4m3fn), torch.empty(1, 0)), d)
    assert torch.equal(d, torch.zeros(5, 128, dtype=torch.bfloat16))
    c = torch.randn(5, 128)                                   # k = 0 with c: d = c
    d = torch.full((5, 128), float("nan"))
    deep_gemm.fp8_gemm_nt((torch.empty(5, 0, dtype=torch.float8_e4m3fn), torch.empty(5, 0)),
                          (torch.empty(128, 0, dtype=torch.float8_e4m3fn), torch.empty(1, 0)), d, c)
    assert torch.equal(d, c)


def _contiguous_problem(groups, n, k):
    rows = [int(r) for r in torch.randint(0, 200, (groups,))]
    m_indices = contiguous_indices(rows)
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m_indices.numel(), k, dtype=torch.bfloat16))
    b, sfb = quantized_weights(groups, n, k)
    return a, sfa, b, sfb, m_indices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [256, 576])
def test_contiguous_zeroes_padding_rows_by_default(backend, k, seed):
    a, sfa, b, sfb, m_indices = _contiguous_problem(3, 128, k)
    if not bool((m_indices < 0).any()):                    # a padding row is what this test is about
        m_indices[-1] = -1
    want = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, nan_bf16(*a.shape[:1], 128))
    d = nan_bf16(a.shape[0], 128)
    assert deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices, backend=backend) is None
    pad = m_indices < 0
    assert torch.equal(d[pad], torch.zeros_like(d[pad]))
    _close(d[~pad], want[~pad])
    # ensure_zero_padding=False: padding rows keep what they held
    d = nan_bf16(a.shape[0], 128)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices, ensure_zero_padding=False,
                                               backend=backend)
    assert d[pad].isnan().all()
    _close(d[~pad], want[~pad])


def test_contiguous_prefix_sum_layout(seed):
    groups, n, k = 3, 128, 256
    sizes = torch.randint(0, 200, (groups,))
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    # DeepGEMM's prefix-sum layout: group g's rows [align(end[g-1]), end[g]); the rows between are padding
    ends, start, m_indices = [], 0, []
    for g, size in enumerate(sizes.tolist()):
        m_indices += [-1] * (start - len(m_indices)) + [g] * size
        ends.append(start + size)
        start = -(-(start + size) // align) * align
    m = len(m_indices) + 5                                     # trailing rows past the last group: padding too
    m_indices = torch.tensor(m_indices + [-1] * 5, dtype=torch.int32)
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m, k, dtype=torch.bfloat16))
    b, sfb = quantized_weights(groups, n, k)
    want = nan_bf16(m, n)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), want, m_indices, backend="reference")
    d = nan_bf16(m, n)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, torch.tensor(ends, dtype=torch.int32),
                                               use_psum_layout=True, expected_m_for_psum_layout=64,
                                               backend="reference")
    assert torch.equal(d, want) and not d.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_writes_only_valid_rows(backend, seed):
    groups, m_max, n, k = 3, 64, 128, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(groups * m_max, k, dtype=torch.bfloat16))
    a, sfa = a.view(groups, m_max, k), sfa.view(groups, m_max, -1)
    b, sfb = quantized_weights(groups, n, k)
    masked_m = torch.randint(0, m_max + 1, (groups,), dtype=torch.int32)
    d = nan_bf16(groups, m_max, n)
    assert deep_gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, 32, backend=backend) is None
    want = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    for g in range(groups):
        valid = int(masked_m[g])
        _close(d[g, :valid], want[g, :valid])
        assert d[g, valid:].isnan().all()


# ------------------------------------------------------------------ what is not implemented

def _gemm_args():
    _, _, a, sfa, b, sfb = normal_problem(8, 128, 128)
    return (a, sfa), (b, sfb), nan_bf16(8, 128)


@pytest.mark.parametrize("call, name", [
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, c=d.float()), "fp8_gemm_nt: accumulation into c with a bfloat16 d"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, alpha=2.0), "fp8_gemm_nt: alpha"),
    (lambda a, b, d: deep_gemm.m_grouped_fp8_gemm_nt_masked((a[0][None], a[1][None]), (b[0][None], b[1][None]), d[None],
                                                           torch.ones(1, dtype=torch.int32), 8, recipe=(1, 1, 128)),
     "m_grouped_fp8_gemm_nt_masked: recipe=.*per-row B scales on a grouped GEMM"),
    (lambda a, b, d: deep_gemm.fp4_gemm_nt((a[0].view(torch.int8), a[1]), b, d), "fp8_gemm_nt: a: int8 .FP4."),
    (lambda a, b, d: deep_gemm.fp8_gemm_nn(a, b, d), "fp8_gemm_nn: the NN layout"),
    (lambda a, b, d: deep_gemm.fp8_gemm_tt(a, b, d), "fp8_gemm_tt: the TT layout"),
    (lambda a, b, d: deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [128], None), "k_grouped_fp8_gemm_tn"),
    (lambda a, b, d: deep_gemm.bf16_gemm_nn(a[0], b[0], d), "bf16_gemm_nn: the other BF16 GEMMs"),
    (lambda a, b, d: deep_gemm.SM90SymmBuffer(), "SM90SymmBuffer: Mega MoE"),
    (lambda a, b, d: deep_gemm.set_mk_alignment_for_contiguous_layout(256), "set_mk_alignment_for_contiguous_layout"),
    (lambda a, b, d: deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(a[1]), "get_mn_major_tma_aligned_packed_ue8m0_tensor: UE8M0"),
    (lambda a, b, d: deep_gemm.per_token_cast_to_fp4(d, True), "per_token_cast_to_fp4: FP4"),
    (lambda a, b, d: deep_gemm.testing.bench(print), "bench: DeepGEMM's benchmark helpers"),
    (lambda a, b, d: deep_gemm.fp8_mqa_logits(a[0], b, d, a[1], a[1], True, 16), "fp8_mqa_logits: max_seqlen_k=16"),
    (lambda a, b, d: deep_gemm.fp8_fp4_mqa_logits((a[0], a[1]), b, d, a[1], a[1]), "fp8_fp4_mqa_logits: q scales"),
])
def test_valid_deep_gemm_calls_not_implemented_name_the_function(call, name, seed):
    with pytest.raises(NotImplementedError, match=f"deep_gemm.{name}.*not implemented by pykernels"):
        call(*_gemm_args())


F8 = torch.float8_e4m3fn


def _pair(*shape):
    """Random e4m3 data [..., rows, k] and float32 scales [..., ceil(rows/128), ceil(k/128)] (rows of 1
    with shape[-2] given as (rows, 1))."""
    *lead, rows, k = shape
    rows, per = rows if isinstance(rows, tuple) else (rows, 128)
    return (torch.randn(*lead, rows, k) * 4).to(F8), torch.rand(*lead, -(-rows // per), -(-k // 128)) + 0.5


def _call(func, a_shape, b_shape, d, *args, **kw):
    """(call, d): deep_gemm.<func>(a, b, d, *args, **kw) on random operands of these shapes."""
    a = _pair(*a_shape[:-2], (a_shape[-2], 1), a_shape[-1])              # 1x128 A scales
    b = _pair(*b_shape)
    return lambda: getattr(deep_gemm, func)(a, b, d, *args, **kw), d


def _normal(m, n, k, d, *args, **kw):
    return _call("fp8_gemm_nt", (m, k), (n, k), d, *args, **kw)


def _contiguous(m, d, grouped_layout, **kw):
    return _call("m_grouped_fp8_gemm_nt_contiguous", (m, 128), (3, 128, 128), d, grouped_layout, **kw)


def _psum(ends, m=300):
    return _contiguous(m, nan_bf16(m, 128), torch.tensor(ends, dtype=torch.int32), use_psum_layout=True,
                       backend="reference")


def _bf16(m, n, k, d):
    a, b = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
    return lambda: deep_gemm.bf16_gemm_nt(a, b, d), d


def _nan(*shape):
    return torch.full(shape, float("nan"))


def _int_d(*shape):
    return torch.full(shape, -7, dtype=torch.int32)


_ZERO8 = torch.zeros(8, dtype=torch.int32)

# Bad calls of the compat forms: (id, () -> (call, d), exception, message). Errors name DeepGEMM's
# arguments (d, grouped_layout: compat's _caller_names; wgrad's out), empty problems (k or m = 0)
# are validated as any other call (no early return), and nothing is written into d.
BAD_CALLS = [
    ("recipe", lambda: _normal(8, 128, 128, nan_bf16(8, 128), recipe=(1, 64, 128)), ValueError, "^recipe: expected"),
    ("ensure_zero_padding-None", lambda: _contiguous(8, nan_bf16(8, 128), _ZERO8, ensure_zero_padding=None),
     TypeError, "^ensure_zero_padding: expected a bool"),
    ("expected_m_for_psum_layout-without-psum",
     lambda: _contiguous(8, nan_bf16(8, 128), _ZERO8, expected_m_for_psum_layout=8),
     ValueError, "^expected_m_for_psum_layout: expected None without use_psum_layout"),
    ("d-shape", lambda: _normal(8, 128, 128, nan_bf16(8, 64)), ValueError, r"^d: expected shape \[8, 128\]"),
    ("d-int32", lambda: _normal(8, 128, 128, _int_d(8, 128)), TypeError, "^d: expected dtype bfloat16"),
    ("k0-c-list", lambda: _normal(5, 128, 0, _nan(5, 128), [[1.0]]), TypeError, "^c: expected a torch.Tensor"),
    ("k0-c-shape", lambda: _normal(5, 128, 0, _nan(5, 128), torch.randn(5, 64)),
     ValueError, r"^c: expected shape \[5, 128\], got \[5, 64\]"),
    ("k0-d-int32", lambda: _normal(5, 128, 0, _int_d(5, 128)), TypeError, "^d: expected dtype bfloat16"),
    ("k0-d-int32-with-c", lambda: _normal(5, 128, 0, _int_d(5, 128), torch.randn(5, 128)),
     TypeError, "^d: expected dtype bfloat16"),
    ("m0-d-int32", lambda: _normal(0, 128, 128, _int_d(3, 3)), TypeError, "^d: expected dtype bfloat16"),
    ("m0-d-shape", lambda: _normal(0, 128, 128, nan_bf16(3, 128)), ValueError, r"^d: expected shape \[0, 128\]"),
    ("bf16_gemm_nt-d-shape", lambda: _bf16(4, 8, 32, nan_bf16(4, 9)), ValueError, r"^d: expected shape \[4, 8\]"),
    ("masked-d-shape", lambda: _call("m_grouped_fp8_gemm_nt_masked", (1, 8, 128), (1, 128, 128), nan_bf16(1, 8, 64),
                                     torch.ones(1, dtype=torch.int32), 8),
     ValueError, r"^d: expected shape \[1, 8, 128\]"),
    ("contiguous-grouped_layout-shape", lambda: _contiguous(8, nan_bf16(8, 128), torch.zeros(3, dtype=torch.int32)),
     ValueError, r"^grouped_layout: expected shape \[8\], got \[3\]"),
    ("contiguous-grouped_layout-value",
     lambda: _contiguous(8, nan_bf16(8, 128), torch.tensor([0] * 7 + [3], dtype=torch.int32)),
     ValueError, r"^grouped_layout: expected values in \[-1, 3\) .*got 3 at row 7"),
    ("contiguous-m0-d-dtype", lambda: _contiguous(0, torch.zeros(0, 128), torch.zeros(0, dtype=torch.int32)),
     TypeError, "^d: expected dtype bfloat16"),
    ("psum-decreasing", lambda: _psum([100, 90, 250]),
     ValueError, r"^grouped_layout: expected non-decreasing group end rows in \[0, 300\] .*got 90 at index 1"),
    ("psum-negative", lambda: _psum([-3, 130, 250]), ValueError, r"^grouped_layout: expected non-decreasing .*got -3 at index 0"),
    ("psum-past-m", lambda: _psum([100, 200, 301]),
     ValueError, r"^grouped_layout: expected non-decreasing group end rows in \[0, 300\] .*got 301 at index 2"),
    ("psum-m0-past-m", lambda: _psum([0, 0, 1], m=0),
     ValueError, r"^grouped_layout: expected non-decreasing group end rows in \[0, 0\] .*got 1 at index 2"),
    ("keyword-out", lambda: _normal(8, 128, 128, nan_bf16(8, 128), out=None), TypeError,
     "unexpected keyword argument 'out'"),                   # Python's own error: the caller's word kept
    ("wgrad-out-shape", lambda: _call("wgrad_gemm_fp8_fp8_fp32_nt", (8, 128), ((128, 1), 128), _nan(8, 64)),
     ValueError, r"^out: expected shape \[8, 128\]"),
]


@pytest.mark.parametrize("make, exc, msg", [row[1:] for row in BAD_CALLS], ids=[row[0] for row in BAD_CALLS])
def test_bad_calls_raise_naming_deep_gemms_argument(make, exc, msg, seed):
    call, d = make()
    before = d.clone()
    with pytest.raises(exc, match=msg):
        call()
    assert torch.equal(d.isnan(), before.isnan()) and torch.equal(d.nan_to_num(), before.nan_to_num())  # unwritten


@pytest.mark.gpu
def test_prefix_sum_layout_values_on_the_gpu_go_to_the_error_record(seed):
    # no host read in the call: the bad end is recorded on the device, raised at check_errors()
    import pykernels
    from pykernels.runtime.device_errors import KernelInputError
    a, b = _pair((300, 1), 128), _pair(3, 128, 128)
    a, b = tuple(t.cuda() for t in a), tuple(t.cuda() for t in b)
    d = nan_bf16(300, 128).cuda()
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, torch.tensor([100, 90, 250], dtype=torch.int32).cuda(),
                                               use_psum_layout=True)
    with pytest.raises(KernelInputError, match=r"grouped_layout: expected non-decreasing .*got 90 at index 1"):
        pykernels.check_errors()


# ------------------------------------------------------------------ indexer

def test_fp8_mqa_logits_against_the_reference(seed):
    m, heads, dim, n = 9, 4, 64, 50
    q = torch.randn(m, heads, dim).to(torch.float8_e4m3fn)
    k, k_scales = RD.indexer_k_cast_to_fp8(torch.randn(n, dim))
    weights = torch.randn(m, heads)
    ks = torch.randint(0, n // 2, (m,), dtype=torch.int32)
    ke = (ks + torch.randint(0, n // 2, (m,), dtype=torch.int32)).clamp(max=n)
    want = RD.fp8_mqa_logits(q, k, k_scales, weights, ks, ke)
    got = deep_gemm.fp8_mqa_logits(q, (k, k_scales), weights, ks, ke)
    assert torch.equal(got, want)
    assert torch.equal(deep_gemm.fp8_fp4_mqa_logits((q, None), (k, k_scales), weights, ks, ke), want)


# ------------------------------------------------------------------ layout helpers and settings

def test_transform_sf_into_required_layout(seed):
    m, kb = 37, 3
    sfa = torch.rand(m, kb)
    got = deep_gemm.transform_sf_into_required_layout(sfa, m, 128 * kb, (1, 128, 128), is_sfa=True)
    assert torch.equal(got, sfa) and got.stride() == (1, deep_gemm.get_tma_aligned_size(m, 4))
    sfb = torch.rand(2, kb)
    assert deep_gemm.transform_sf_into_required_layout(sfb, 256, 128 * kb, (1, 128, 128), is_sfa=False) is sfb
    with pytest.raises(NotImplementedError, match="transform_sf_into_required_layout: recipe"):
        deep_gemm.transform_sf_into_required_layout(sfa, m, 128 * kb, (1, 32), is_sfa=True)


def test_settings_round_trip():
    saved = deep_gemm.get_tc_util(), deep_gemm.get_pdl()
    try:
        deep_gemm.set_tc_util(77)
        deep_gemm.set_pdl(True)
        assert deep_gemm.get_tc_util() == 77 and deep_gemm.get_pdl() is True
    finally:
        deep_gemm.set_tc_util(saved[0])
        deep_gemm.set_pdl(saved[1])
    assert deep_gemm.get_theoretical_mk_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_k_alignment_for_contiguous_layout() == deep_gemm.get_mk_alignment_for_contiguous_layout() == 128


# ------------------------------------------------------------------ utils casts

def _expand(sf, rows, cols, shape):
    return sf.repeat_interleave(rows, 0)[:shape[0]].repeat_interleave(cols, 1)[:, :shape[1]]


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("gran_k", [128, 64])
def test_casts_follow_deep_gemms_definition(use_ue8m0, gran_k, seed):
    m, n = gran_k * int(torch.randint(1, 4, ())), int(torch.randint(1, 400, ()))
    x = torch.randn(m, n, dtype=torch.bfloat16) * torch.rand(m, 1, dtype=torch.bfloat16) * 50
    for cast, rows, cols in ((deep_gemm.per_token_cast_to_fp8, 1, gran_k),
                             (deep_gemm.per_block_cast_to_fp8, gran_k, gran_k),
                             (deep_gemm.per_channel_cast_to_fp8, gran_k, 1)):
        q, sf = cast(x, use_ue8m0, gran_k)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
        # the scale of each group: max(amax, 1e-4) / 448, rounded up to a power of two with use_ue8m0
        full_sf = _expand(sf, rows, cols, x.shape)     # each element's scale
        groups_amax = torch.zeros_like(sf)
        for i in range(sf.shape[0]):
            for j in range(sf.shape[1]):
                blk = x[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
                groups_amax[i, j] = blk.abs().float().max()
        want_sf = groups_amax.clamp(min=1e-4) / 448
        if use_ue8m0:
            want_sf = torch.exp2(torch.ceil(torch.log2(want_sf.double()))).float()
        assert torch.equal(sf, want_sf)
        # q = e4m3(x * (1 / sf)): one float32 multiply by the reciprocal, then one rounding
        assert torch.equal(q.view(torch.uint8), (x.float() * (1 / full_sf)).to(torch.float8_e4m3fn).view(torch.uint8))


def test_packed_ue8m0_scales_round_trip(seed):
    x = torch.randn(5, 128 * 8)
    q, packed = deep_gemm.per_token_cast_to_fp8(x, True, use_packed_ue8m0=True)
    _, sf = deep_gemm.per_token_cast_to_fp8(x, True)
    assert packed.dtype == torch.int32 and packed.shape == (5, 2)
    assert torch.equal(deep_gemm.unpack_ue8m0_from_int(packed), sf)
    with pytest.raises(ValueError, match="x: expected powers of two"):
        deep_gemm.pack_ue8m0_to_int(torch.full((1, 4), 3.0))


def test_ceil_to_ue8m0_and_calc_diff_are_deep_gemms(seed):
    sf = torch.cat([torch.rand(100) * 10.0 ** torch.randint(-20, 20, (100,)),
                    torch.tensor([0.0, 1e-45, float("inf"), float("nan"), -0.75])])
    got = deep_gemm.ceil_to_ue8m0(sf)
    finite = torch.isfinite(sf)
    want = torch.exp2(torch.ceil(torch.log2(sf.abs().double()))).clamp(2.0 ** -126, 2.0 ** 127).float()
    assert torch.equal(got[finite], want[finite])
    assert (got[~finite] == 2.0 ** 127).all()                 # DeepGEMM clamps NaN / Inf to the largest UE8M0
    x, y = torch.randn(300), torch.randn(300)
    diff = deep_gemm.calc_diff(x, y)
    assert isinstance(diff, torch.Tensor) and diff.dtype == torch.float64 and diff.dim() == 0
    assert abs(float(diff) - calc_diff(x, y)) < 1e-12
    assert deep_gemm.calc_diff(torch.zeros(3), torch.zeros(3)).isnan()
    with pytest.raises(ValueError, match=r"x.shape\[0\]: expected a multiple of 128"):
        deep_gemm.per_channel_cast_to_fp8(torch.randn(100, 4), False)


# ------------------------------------------------------------------ a DeepGEMM user's flow, one import changed

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deep_gemm_users_flow(backend, seed):
    """The README's flow: cast bf16 data with the utils, scales MN-major TMA-aligned, the GEMMs,
    calc_diff against the bf16 product below DeepGEMM's tests' 1e-3."""
    m, n, k, groups = 96, 256, 576, 2
    x, y = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(groups, n, k, dtype=torch.bfloat16)
    a, sfa = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False)
    sfa = deep_gemm.get_mn_major_tma_aligned_tensor(sfa)
    b = [deep_gemm.per_block_cast_to_fp8(y[g], use_ue8m0=False) for g in range(groups)]
    d = nan_bf16(m, n)
    deep_gemm.fp8_gemm_nt((a, sfa), b[0], d, backend=backend)
    assert float(deep_gemm.calc_diff(d, x.float() @ y[0].float().T)) < 1e-3
    # contiguous: two groups of 48 rows, each padded to the alignment; padding rows come back 0
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    m_indices = contiguous_indices([48, 48], pad_to=align)
    rows = torch.cat([x[:48], torch.zeros(align - 48, k, dtype=torch.bfloat16), x[48:],
                      torch.zeros(align - 48, k, dtype=torch.bfloat16)])
    a2, sfa2 = deep_gemm.per_token_cast_to_fp8(rows, False)
    b2 = (torch.stack([b[g][0] for g in range(groups)]), torch.stack([b[g][1] for g in range(groups)]))
    d2 = nan_bf16(rows.shape[0], n)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a2, sfa2), b2, d2, m_indices, backend=backend)
    want = torch.where((m_indices >= 0)[:, None],
                       torch.einsum("rk,rnk->rn", rows.float(), y[m_indices.clamp(min=0).long()].float()), 0)
    assert float(deep_gemm.calc_diff(d2, want)) < 1e-3 and (d2[m_indices < 0] == 0).all()
