"""The references against first principles (float64 math, e4m3 spacing, bf16 products)."""
import pytest
import torch

from pykernels import reference as R
from pykernels.metrics import calc_diff, rel_error

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights


@pytest.mark.parametrize("m,k", [(1, 128), (7, 300), (129, 256)])
def test_per_token_roundtrip_error_within_half_e4m3_spacing(m, k):
    x = torch.randn(m, k) * 50
    q, sf = R.per_token_cast_to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
    assert sf.shape == (m, -(-k // 128))
    deq = R.dequantize_per_token(q, sf)
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of the value's binade,
    # subnormals (|q| < 2^-6) have absolute spacing 2^-9 in scaled units.
    tol = (x.abs() * 2.0 ** -4).clamp(min=0) + sf.repeat_interleave(128, 1)[:, :k] * 2.0 ** -10
    assert ((deq - x).abs() <= tol + 1e-12).all()
    # the group's largest magnitude maps to exactly +-448
    groups = x.abs().view(m, -1) if k % 128 == 0 else None
    if groups is not None:
        assert (q.float().abs().view(m, -1, 128).amax(-1) == 448).all()


def test_per_token_scale_formula_and_zero_groups():
    x = torch.randn(3, 384) * 1e5  # values far beyond +-448 before scaling
    x[1, 128:256] = 0
    q, sf = R.per_token_cast_to_fp8(x)
    amax = x.abs().view(3, 3, 128).amax(-1)
    torch.testing.assert_close(sf[0], amax[0] / 448, rtol=0, atol=0)
    assert sf[1, 1] == pytest.approx(1e-4 / 448, rel=1e-6)  # floor for an all-zero group
    assert (q[1, 128:256].float() == 0).all()
    assert torch.isfinite(q.float()).all()


@pytest.mark.parametrize("m,n", [(128, 128), (129, 300), (5, 7)])
def test_per_block_roundtrip(m, n):
    x = torch.randn(m, n) * 10
    q, sf = R.per_block_cast_to_fp8(x)
    assert sf.shape == (-(-m // 128), -(-n // 128))
    deq = R.dequantize_per_block(q, sf)
    full_sf = sf.repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]
    assert ((deq - x).abs() <= x.abs() * 2.0 ** -4 + full_sf * 2.0 ** -10 + 1e-12).all()


@pytest.mark.parametrize("k", [384, 576, 832, 16])   # DeepGEMM's tests run K = 576 and 832
def test_gemm_reference_matches_float64_dequantized_product(k, seed):
    _, _, a, sfa, b, sfb = normal_problem(65, 256, k)
    assert sfa.shape == (65, -(-k // 128)) and sfb.shape == (2, -(-k // 128))
    out = R.fp8_gemm_nt(a, sfa, b, sfb)
    ref = R.dequantize_per_token(a, sfa).double() @ R.dequantize_per_block(b, sfb).double().T
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 4e-3  # bf16 output rounding only
    out2 = nan_bf16(65, 256)
    assert R.fp8_gemm_nt(a, sfa, b, sfb, out=out2) is out2
    assert torch.equal(out2, out)


def test_end_to_end_against_bf16_product():
    # DeepGEMM's acceptance check: quantize bf16 inputs, compare with the bf16 product.
    x, y, a, sfa, b, sfb = normal_problem(128, 256, 512)
    out = R.fp8_gemm_nt(a, sfa, b, sfb)
    assert calc_diff(out, x.float() @ y.float().T) < 1e-3


def test_grouped_contiguous_skips_padding_rows_and_empty_groups():
    m_indices = contiguous_indices([100, 0, 128, 3])
    m_sum, n, k = m_indices.numel(), 256, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m_sum, k))
    b, sfb = quantized_weights(4, n, k)
    out = nan_bf16(m_sum, n)
    R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out)
    pad = m_indices == -1
    assert torch.isnan(out[pad].float()).all(), "padding rows must stay untouched"
    assert not torch.isnan(out[~pad].float()).any()
    for g in (0, 2, 3):
        rows = m_indices == g
        ref = R.fp8_gemm_nt(a[rows], sfa[rows], b[g], sfb[g])
        assert torch.equal(out[rows], ref)


@pytest.mark.parametrize("masked", [[0, 5], [64, 64], [1, 63]])
def test_grouped_masked_leaves_rows_past_masked_m(masked):
    g, m_max, n, k = 2, 64, 128, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(g * m_max, k))
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    b, sfb = quantized_weights(g, n, k)
    out = nan_bf16(g, m_max, n)
    R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, torch.tensor(masked, dtype=torch.int32), out)
    for i, rows in enumerate(masked):
        assert torch.isnan(out[i, rows:].float()).all()
        if rows:
            assert torch.equal(out[i, :rows], R.fp8_gemm_nt(a[i, :rows], sfa[i, :rows], b[i], sfb[i]))


def test_f32_out_with_c_and_per_row_b_scales(seed):
    # float32 out = c + A B^T (DeepGEMM's fp32 forms), with 1x128 B scales (recipe (1, 1, 128),
    # the weight-gradient GEMM): the float64 dequantized product within float32 rounding
    m, n, k = 33, 200, 832
    _, _, a, sfa, _, _ = normal_problem(m, n, k)
    b, sfb = R.per_token_cast_to_fp8(torch.randn(n, k))
    c = torch.randn(m, n)
    out = torch.full((m, n), float("nan"))
    assert R.fp8_gemm_nt(a, sfa, b, sfb, out, c=c, b_scale_rows=1) is out
    ref = c.double() + R.dequantize_per_token(a, sfa).double() @ R.dequantize_per_token(b, sfb).double().T
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-6
    d = c.clone()
    R.fp8_gemm_nt(a, sfa, b, sfb, d, c=d, b_scale_rows=1)         # c aliasing out: accumulated in place
    assert torch.equal(d, out)
