"""Triton FP8 quantization and GEMMs against the references (interpreted on CPU).

Tolerances: quantization is bit-exact (same RNE rounding and correctly rounded
division); GEMMs accumulate in fp32 in a different order than the reference, so the
bf16 outputs may differ by one bf16 ulp on a few elements: calc_diff < 1e-6 and
relative Frobenius error < 2e-3 against the reference, and NaN-poisoned rows that the
layout says are untouched must stay NaN.
"""
import pytest
import torch

from pykernels import reference as R  # noqa: E402
from pykernels import triton as T  # noqa: E402
from pykernels.metrics import calc_diff, rel_error  # noqa: E402

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights  # noqa: E402

GEMM_CALC_DIFF = 1e-6
GEMM_REL = 2e-3


def _bits(t):
    return t.view(torch.uint8)


def _assert_gemm_close(out, ref):
    assert not torch.isnan(out.float()).any(), "kernel left output elements unwritten"
    assert calc_diff(out, ref) < GEMM_CALC_DIFF
    assert rel_error(out, ref) < GEMM_REL


def test_interpreter_uses_software_rounding():
    # The interpreter mis-rounds f32->bf16 and f32->e4m3 casts; the kernels must switch
    # to software RNE whenever they are interpreted (see pykernels/triton/rounding.py).
    from pykernels.triton.quant import SOFTWARE_ROUNDING
    assert SOFTWARE_ROUNDING == T.INTERPRETED
    if not T.INTERPRETED:
        pytest.skip("compiled Triton: hardware RNE casts are used")
    # the values the interpreter's own cast gets wrong: rounding up into the next binade
    x = torch.tensor([[127.6, -126.5, 31.5, 84.00001] + [1.0] * 124], dtype=torch.float32) * (448 / 127.6)
    q, _ = T.per_token_cast_to_fp8(x)
    assert torch.equal(_bits(q), _bits(R.per_token_cast_to_fp8(x)[0]))


@pytest.mark.parametrize("m,k,dtype", [(1, 128, torch.bfloat16), (7, 384, torch.float32),
                                       (129, 256, torch.bfloat16), (3, 200, torch.float16)])
def test_per_token_cast_bit_exact(m, k, dtype):
    x = (torch.randn(m, k) * 300).to(dtype)
    x[0, :128] = 0  # an all-zero group
    q, sf = T.per_token_cast_to_fp8(x)
    q_ref, sf_ref = R.per_token_cast_to_fp8(x)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(sf, sf_ref)


@pytest.mark.parametrize("m,n", [(128, 256), (129, 130), (1, 128)])
def test_per_block_cast_bit_exact(m, n):
    x = torch.randn(m, n, dtype=torch.bfloat16) * 1000  # far beyond +-448 before scaling
    q, sf = T.per_block_cast_to_fp8(x)
    q_ref, sf_ref = R.per_block_cast_to_fp8(x)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(sf, sf_ref)


@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (7, 256, 512), (129, 128, 256), (64, 320, 128), (0, 128, 128)])
def test_fp8_gemm_nt(m, n, k):
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n)
    T.fp8_gemm_nt(a, sfa, b, sfb, out)
    if m:
        _assert_gemm_close(out, R.fp8_gemm_nt(a, sfa, b, sfb))


def test_fp8_gemm_nt_column_major_scales():
    # DeepGEMM passes sfa column-major and TMA-aligned; the kernel reads it by strides.
    _, _, a, sfa, b, sfb = normal_problem(7, 128, 256)
    col = torch.empty(sfa.shape[1], 8).T[:7]  # [7, 2] view with stride (1, 8)
    col.copy_(sfa)
    out = T.fp8_gemm_nt(a, col, b, sfb)
    _assert_gemm_close(out, R.fp8_gemm_nt(a, sfa, b, sfb))


def test_grouped_contiguous_with_empty_group_and_padding():
    m_indices = contiguous_indices([7, 0, 129])
    m_sum, n, k = m_indices.numel(), 128, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m_sum, k))
    b, sfb = quantized_weights(3, n, k)
    out = nan_bf16(m_sum, n)
    T.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, nan_bf16(m_sum, n))
    pad = m_indices == -1
    assert torch.isnan(out[pad].float()).all(), "padding rows (-1) must stay untouched"
    _assert_gemm_close(out[~pad], ref[~pad])


def test_grouped_contiguous_misaligned_segments():
    # Segments not aligned to the tile: a tile spans several groups; still correct.
    m_indices = torch.tensor([0] * 5 + [-1] * 3 + [1] * 9 + [0] * 2, dtype=torch.int32)
    n, k = 128, 128
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m_indices.numel(), k))
    b, sfb = quantized_weights(2, n, k)
    out = nan_bf16(m_indices.numel(), n)
    T.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, nan_bf16(*out.shape))
    pad = m_indices == -1
    assert torch.isnan(out[pad].float()).all()
    _assert_gemm_close(out[~pad], ref[~pad])


@pytest.mark.parametrize("masked", [[0, 64], [64, 64], [1, 0], [33, 17]])
def test_grouped_masked(masked):
    g, m_max, n, k = 2, 64, 256, 128
    a, sfa = R.per_token_cast_to_fp8(torch.randn(g * m_max, k))
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    b, sfb = quantized_weights(g, n, k)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = nan_bf16(g, m_max, n)
    T.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(g, m_max, n))
    for i, rows in enumerate(masked):
        assert torch.isnan(out[i, rows:].float()).all(), "rows past masked_m must stay untouched"
        if rows:
            _assert_gemm_close(out[i, :rows], ref[i, :rows])


@pytest.mark.parametrize("layout,k", [("normal", 16), ("normal", 576), ("contiguous", 832), ("masked", 208)])
def test_partial_last_k_block(layout, k, seed):
    # K not a multiple of 128 (DeepGEMM's tests run 576 and 832): the last K block's tail
    # loads as zeros (masked loads, EVEN_K false)
    n = 192
    if layout == "normal":
        _, _, a, sfa, b, sfb = normal_problem(70, n, k)
        out = T.fp8_gemm_nt(a, sfa, b, sfb, nan_bf16(70, n))
        _assert_gemm_close(out, R.fp8_gemm_nt(a, sfa, b, sfb))
        return
    if layout == "contiguous":
        idx = contiguous_indices([30, 0, 70], pad_to=64)
        a, sfa = R.per_token_cast_to_fp8(torch.randn(idx.numel(), k))
        b, sfb = quantized_weights(3, n, k)
        out = T.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
        own = idx >= 0
    else:
        g, m_max = 2, 40
        a, sfa = R.per_token_cast_to_fp8(torch.randn(g * m_max, k))
        a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
        b, sfb = quantized_weights(g, n, k)
        masked_m = torch.tensor([40, 9], dtype=torch.int32)
        out = T.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(g, m_max, n))
        ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(g, m_max, n))
        own = torch.arange(m_max)[None, :] < masked_m[:, None]
    assert torch.isnan(out[~own].float()).all(), "rows the layout does not own must stay untouched"
    _assert_gemm_close(out[own], ref[own])


def test_f32_out_accumulates_and_per_row_b_scales(seed):
    # float32 out: out += the product (ops.gemm.accumulation_base puts c or zeros there
    # first); sfb per row of B (recipe (1, 1, 128), b_scale_rows 1) with a partial K block.
    # An element left unwritten keeps c (NaN here for the plain case): off by its product.
    m, n, k = 70, 192, 336
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    b1, sfb1 = R.per_token_cast_to_fp8(torch.randn(n, k))
    c = torch.randn(m, n)
    for bb, sf, rows in ((b, sfb, 128), (b1, sfb1, 1)):
        ref = R.fp8_gemm_nt(a, sfa, bb, sf, torch.empty(m, n), c=c, b_scale_rows=rows)
        out = T.fp8_gemm_nt(a, sfa, bb, sf, c.clone(), b_scale_rows=rows)
        assert ((out - ref).abs() <= 1e-5 * ref.abs() + 1e-4).all()
    # the per-row scales are each row's own: against the float64 dequantized product
    deq = R.dequantize_per_token(a, sfa).double() @ R.dequantize_per_token(b1, sfb1).double().T
    assert rel_error(out - c, deq) < 1e-5


def test_fp8_out_quantizes_on_store(seed):
    # e4m3 out with 1x128 scales (OUT_FP8): bit for bit per_token_cast_to_fp8 of the same
    # kernel's float32 result (same sums), partial last n-block and K block; a NaN in a row
    # of A makes that row's groups NaN (scale 0x7FFFFFFF, q 0x7F); poisoned outputs
    m, n, k = 70, 300, 336
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    a.view(torch.uint8)[5, 7] = 0x7F
    f32 = T.fp8_gemm_nt(a, sfa, b, sfb, torch.zeros(m, n))
    q_ref, sf_ref = R.per_token_cast_to_fp8(f32)
    q = torch.full((m, n), 0x55, dtype=torch.uint8).view(torch.float8_e4m3fn)
    sf = torch.full((m, 3), float("nan"))
    T.fp8_gemm_nt(a, sfa, b, sfb, q, sfd=sf)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(sf.view(torch.int32), sf_ref.view(torch.int32))
    assert (_bits(q)[5] == 0x7F).all() and (sf[5].view(torch.int32) == 0x7FFFFFFF).all()


def test_check_gemm_shape_errors():
    with pytest.raises(ValueError, match="k: expected a multiple of 16, got 100"):
        T.check_gemm_shape(4, 128, 100)
    T.check_gemm_shape(4, 128, 208)        # a partial last K block
    with pytest.raises(ValueError, match="n: expected >= 0, got -1"):
        T.check_gemm_shape(4, -1, 128)
    T.check_gemm_shape(0, 0, 0)            # empty problems are valid (tests/test_gemm_checks.py)
