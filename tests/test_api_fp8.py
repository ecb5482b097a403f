"""Public API: DeepGEMM call forms, backend dispatch, validation errors, DLPack, custom ops."""
import numpy as np
import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.metrics import calc_diff

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_gemm_nt_backends(backend):
    x, y, a, sfa, b, sfb = normal_problem(7, 256, 256)
    out = nan_bf16(7, 256)
    ret = pk.fp8_gemm_nt((a, pk.get_col_major_tma_aligned_tensor(sfa)), (b, sfb), out, backend=backend)
    assert ret is out
    assert calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-6
    assert calc_diff(out, x.float() @ y.float().T) < 1e-3  # DeepGEMM's end-to-end tolerance


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grouped_api_backends(backend):
    m_indices = contiguous_indices([5, 0, 3])
    a, sfa = pk.per_token_cast_to_fp8(torch.randn(m_indices.numel(), 128), backend=backend)
    b, sfb = quantized_weights(3, 128, 128)
    out = nan_bf16(m_indices.numel(), 128)
    pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, m_indices, backend=backend)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, nan_bf16(*out.shape))
    assert torch.equal(out.isnan(), ref.isnan())
    assert calc_diff(torch.nan_to_num(out), torch.nan_to_num(ref)) < 1e-6

    a3, sfa3 = a[:128].view(1, 128, 128), sfa[:128].view(1, 128, 1)
    out3 = nan_bf16(1, 128, 128)
    masked_m = torch.tensor([9], dtype=torch.int32)
    pk.m_grouped_fp8_gemm_nt_masked((a3, sfa3), (b[:1], sfb[:1]), out3, masked_m, 16, backend=backend)
    assert torch.isnan(out3[0, 9:].float()).all()
    assert calc_diff(out3[0, :9], R.fp8_gemm_nt(a3[0, :9], sfa3[0, :9], b[0], sfb[0])) < 1e-6


def test_quant_backends_agree_bitwise():
    x = torch.randn(9, 256) * 30
    q1, s1 = pk.per_token_cast_to_fp8(x, backend="reference")
    q2, s2 = pk.per_token_cast_to_fp8(x, backend="triton")
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    q1, s1 = pk.per_block_cast_to_fp8(x)
    q2, s2 = pk.per_block_cast_to_fp8(x, backend="triton")
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_col_major_tma_aligned_helper():
    sf = torch.rand(7, 3)
    cm = pk.get_col_major_tma_aligned_tensor(sf)
    assert torch.equal(cm, sf) and cm.stride() == (1, 8)
    assert pk.get_col_major_tma_aligned_tensor(cm) is cm
    g = torch.rand(2, 5, 3)
    cg = pk.get_col_major_tma_aligned_tensor(g)
    assert torch.equal(cg, g) and cg.stride() == (24, 1, 8)
    with pytest.raises(TypeError, match="sf: expected dtype float32, got float16"):
        pk.get_col_major_tma_aligned_tensor(sf.half())


def test_dlpack_inputs_accepted():
    x = np.random.randn(4, 128).astype(np.float32)
    q, sf = pk.per_token_cast_to_fp8(x)
    q_ref, sf_ref = R.per_token_cast_to_fp8(torch.from_numpy(x))
    # results come back as the caller's kind of array where it holds the dtype (numpy has no e4m3)
    assert isinstance(sf, np.ndarray) and torch.is_tensor(q)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(torch.from_numpy(sf), sf_ref)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor or a DLPack-capable tensor, got list"):
        pk.per_token_cast_to_fp8([[1.0] * 128])


def _good():
    _, _, a, sfa, b, sfb = normal_problem(8, 128, 256)
    return a, sfa, b, sfb, torch.empty(8, 128, dtype=torch.bfloat16)


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a, sfa, b, sfb, o: (a.float(), sfa, b, sfb, o), TypeError, "a: expected dtype float8_e4m3fn, got float32"),
    (lambda a, sfa, b, sfb, o: (a, sfa.double(), b, sfb, o), TypeError, "sfa: expected dtype float32, got float64"),
    (lambda a, sfa, b, sfb, o: (a, sfa, b, sfb, o.half()), TypeError, "out: expected dtype bfloat16, got float16"),
    (lambda a, sfa, b, sfb, o: (a, sfa, b[:, :128], sfb, o), ValueError, r"b: expected K = 256"),
    (lambda a, sfa, b, sfb, o: (a[:, :200], sfa, b[:, :200], sfb, o), ValueError, "k: expected a multiple of 16 .*got 200"),
    (lambda a, sfa, b, sfb, o: (a, sfa[:, :1], b, sfb, o), ValueError, r"sfa: expected shape \[8, 2\], got \[8, 1\]"),
    (lambda a, sfa, b, sfb, o: (a, sfa, b, sfb[:, :1], o), ValueError, r"sfb: expected shape \[1, 2\], got \[1, 1\]"),
    (lambda a, sfa, b, sfb, o: (a, sfa, b, sfb, o[:4]), ValueError, r"out: expected shape \[8, 128\], got \[4, 128\]"),
    (lambda a, sfa, b, sfb, o: (a.t().contiguous().t(), sfa, b, sfb, o), ValueError, "a: expected a contiguous"),
    (lambda a, sfa, b, sfb, o: (a, torch.rand(8, 4)[:, ::2], b, sfb, o), ValueError, "sfa: expected row-major contiguous scales or column-major TMA-aligned"),
    (lambda a, sfa, b, sfb, o: (a, torch.rand(2, 10).t()[:8], b, sfb, o), ValueError, r"sfa: .* got strides \[1, 10\]"),
    (lambda a, sfa, b, sfb, o: (a, sfa, b, sfb, o.to("meta")), ValueError, "all tensors must be on one device"),
])
def test_gemm_validation_errors(mutate, exc, msg):
    a, sfa, b, sfb, out = mutate(*_good())
    with pytest.raises(exc, match=msg):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), out)


def test_gemm_call_form_and_backend_errors():
    a, sfa, b, sfb, out = _good()
    with pytest.raises(TypeError, match=r"a: expected a pair \(a, sfa\)"):
        pk.fp8_gemm_nt(a, (b, sfb), out)
    with pytest.raises(ValueError, match="backend: expected one of"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="cublas")
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run .*: runs on GPU tensors, got cpu tensors"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_f32_out_forms(backend, seed):
    # DeepGEMM's fp32 forms: d = c + a b^T (c apart from d), c = d (accumulated in place), and
    # the weight-gradient GEMM (recipe (1, 1, 128): sfb [n, ceil(k/128)]), with partial K
    m, n, k = 20, 136, 208
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    b1, sfb1 = R.per_token_cast_to_fp8(torch.randn(n, k))
    c = torch.randn(m, n)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n), c=c)
    ref1 = R.fp8_gemm_nt(a, sfa, b1, sfb1, torch.empty(m, n), c=c, b_scale_rows=1)
    d = torch.full((m, n), float("nan"))
    assert pk.fp8_gemm_nt((a, sfa), (b, sfb), d, c=c, backend=backend) is d
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-4)
    d = c.clone()
    pk.fp8_gemm_nt((a, sfa), (b, sfb), d, c=d, backend=backend)
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-4)
    d = c.clone()
    pk.fp8_gemm_nt((a, sfa), (b1, sfb1), d, c=d, recipe=(1, 1, 128), backend=backend)
    torch.testing.assert_close(d, ref1, rtol=1e-5, atol=1e-4)
    d = c.clone()
    assert pk.wgrad_gemm_fp8_fp8_fp32_nt((a, sfa), (b1, pk.get_col_major_tma_aligned_tensor(sfb1)), d,
                                         backend=backend) is d
    torch.testing.assert_close(d, ref1, rtol=1e-5, atol=1e-4)


def test_f32_out_errors():
    a, sfa, b, sfb, out = _good()
    c = torch.zeros(8, 128)
    with pytest.raises(ValueError, match="c: accumulation .* needs a float32 out, got out torch.bfloat16"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), out, c=c)
    with pytest.raises(ValueError, match=r"c: expected shape \[8, 128\], got \[8, 64\]"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), c.clone(), c=c[:, :64])
    with pytest.raises(TypeError, match="c: expected dtype float32, got bfloat16"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), c.clone(), c=out)
    big = torch.zeros(9, 128)
    with pytest.raises(ValueError, match="out: expected memory of its own, got a tensor overlapping c"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), big[1:], c=big[:8])
    with pytest.raises(ValueError, match=r"recipe: expected \(1, 128, 128\) .* or \(1, 1, 128\)"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), c, recipe=(1, 128, 1))
    with pytest.raises(ValueError, match=r"sfb: expected shape \[128, 2\], got \[1, 2\]"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), c, recipe=(1, 1, 128))
    b1, sfb1 = R.per_token_cast_to_fp8(torch.randn(128, 256))
    with pytest.raises(ValueError, match="backend: 'emu' cannot run .*recipe: the cuda FP8 GEMM takes 1x128 B "
                                         "scales .* with a float32 out only"):
        pk.fp8_gemm_nt((a, sfa), (b1, sfb1), out, recipe=(1, 1, 128), backend="emu")
    with pytest.raises(ValueError, match=r"recipe: expected \(1, 128, 128\)"):
        pk.m_grouped_fp8_gemm_nt_masked((a[None], sfa[None]), (b1[None], sfb1[None]), out[None],
                                        torch.ones(1, dtype=torch.int32), 8, recipe=(1, 1, 128))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_out_pair(backend, seed):
    # quantize-on-store: out given as (e4m3 [m, n], float32 [m, ceil(n/128)]) comes back as
    # the next GEMM's A operand; within the FP8 bound of the float32 product
    m, n, k = 24, 256, 208
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    ref = R.fp8_gemm_nt(a, sfa, b, sfb, torch.empty(m, n))
    d = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    sfd = torch.full((m, 2), float("nan"))
    got = pk.fp8_gemm_nt((a, sfa), (b, sfb), (d, sfd), backend=backend)
    assert got[0] is d and got[1] is sfd and not sfd.isnan().any()
    assert calc_diff(R.dequantize_per_token(d, sfd), ref) < 1e-3
    # and feeds the next GEMM as it is
    b2, sfb2 = R.per_block_cast_to_fp8(torch.randn(128, n))
    nxt = pk.fp8_gemm_nt((d, sfd), (b2, sfb2), torch.empty(m, 128, dtype=torch.bfloat16), backend=backend)
    assert calc_diff(nxt, R.dequantize_per_token(d, sfd) @ R.dequantize_per_block(b2, sfb2).T) < 1e-3


def test_fp8_out_errors():
    a, sfa, b, sfb, out = _good()
    d, sfd = torch.empty(8, 128, dtype=torch.float8_e4m3fn), torch.empty(8, 1)
    with pytest.raises(ValueError, match="sfd: an e4m3 out comes with its float32 scales"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), d)
    with pytest.raises(ValueError, match="sfd: an e4m3 out comes with its float32 scales"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), (out, sfd))
    with pytest.raises(ValueError, match=r"sfd: expected shape \[8, 1\], got \[8, 2\]"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), (d, torch.empty(8, 2)))
    with pytest.raises(ValueError, match="c: accumulation .* needs a float32 out"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), (d, sfd), c=torch.zeros(8, 128))
    with pytest.raises(TypeError, match=r"out: expected a tensor or a pair \(out, sfd\), got 3 items"):
        pk.fp8_gemm_nt((a, sfa), (b, sfb), (d, sfd, sfd))


def test_grouped_validation_errors():
    b, sfb = quantized_weights(2, 128, 128)
    a, sfa = R.per_token_cast_to_fp8(torch.randn(128, 128))
    out = torch.empty(128, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="m_indices: expected dtype int32, got int64"):
        pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, torch.zeros(128, dtype=torch.long))
    with pytest.raises(ValueError, match=r"m_indices: expected shape \[128\], got \[64\]"):
        pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="b: expected a 3-D tensor"):
        pk.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b[0], sfb[0]), out, torch.zeros(128, dtype=torch.int32))
    a3, sfa3, out3 = a.view(2, 64, 128), sfa.view(2, 64, 1), out.view(2, 64, 128)
    with pytest.raises(ValueError, match=r"masked_m: expected shape \[2\], got \[3\]"):
        pk.m_grouped_fp8_gemm_nt_masked((a3, sfa3), (b, sfb), out3, torch.zeros(3, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="b: expected 2 groups"):
        pk.m_grouped_fp8_gemm_nt_masked((a3, sfa3), (b[:1], sfb[:1]), out3, torch.zeros(2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="expected_m: expected an int >= 0, got -1"):
        pk.m_grouped_fp8_gemm_nt_masked((a3, sfa3), (b, sfb), out3, torch.zeros(2, dtype=torch.int32), -1)


def test_quant_validation_errors():
    with pytest.raises(ValueError, match="x: expected a 2-D tensor, got 3-D"):
        pk.per_token_cast_to_fp8(torch.randn(2, 2, 128))
    with pytest.raises(TypeError, match="x: expected dtype float32 or bfloat16 or float16, got int32"):
        pk.per_block_cast_to_fp8(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="x: expected unit stride in the last dimension"):
        pk.per_token_cast_to_fp8(torch.randn(128, 4).t())
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run .*: runs on GPU tensors, got cpu tensors"):
        pk.per_token_cast_to_fp8(torch.randn(4, 128), backend="cuda")


def test_custom_ops_opcheck():
    import pykernels.ops.quant  # noqa: F401  (defines torch.ops.pykernels.*)
    import pykernels.ops.gemm  # noqa: F401
    x = torch.randn(4, 256)
    # test_schema compares fp8 outputs with an op torch lacks for fp8 on CPU: not run.
    utils = ("test_faketensor", "test_autograd_registration")
    a, sfa, b, sfb, out = _good()
    checks = [(torch.ops.pykernels.per_token_cast_to_fp8.default, (x, "reference")),
              (torch.ops.pykernels.per_block_cast_to_fp8.default, (x, "reference")),
              (torch.ops.pykernels.fp8_gemm_nt.default, (a, sfa, b, sfb, out, "reference")),
              (torch.ops.pykernels.fp8_gemm_nt.default,             # float32 out = c + a b^T
               (a, sfa, b, sfb, torch.zeros(8, 128), "reference", torch.randn(8, 128), False, 128)),
              (torch.ops.pykernels.fp8_gemm_nt.default,             # e4m3 out + its scales (quantize-on-store)
               (a, sfa, b, sfb, torch.zeros(8, 128, dtype=torch.float8_e4m3fn), "reference", None, False, 128,
                torch.zeros(8, 1)))]
    for fn, args in checks:
        result = torch.library.opcheck(fn, args, test_utils=utils)
        assert result == {u: "SUCCESS" for u in utils}, (fn, result)


def test_torch_compile_fullgraph():
    x, y, a, sfa, b, sfb = normal_problem(8, 128, 256)

    def f(x, b, sfb):
        q, s = pk.per_token_cast_to_fp8(x, backend="reference")
        out = torch.empty(x.shape[0], b.shape[0], dtype=torch.bfloat16)
        pk.fp8_gemm_nt((q, s), (b, sfb), out, backend="reference")
        return out.float() * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, b, sfb)
    assert calc_diff(got, 2 * R.fp8_gemm_nt(a, sfa, b, sfb).float()) < 1e-9


@pytest.mark.parametrize("backend", ["emu", "triton"])
def test_torch_compile_fullgraph_kernel_backends(backend):
    # the hand-written kernel (its PTX on the emulator) and the Triton one, quantization
    # and all three GEMM layouts traced whole: the same bytes as the eager calls
    x, y, a, sfa, b, sfb = normal_problem(65, 128, 256)
    idx = torch.tensor([0] * 30 + [-1] * 5 + [1] * 30, dtype=torch.int32)
    b2, sfb2 = torch.stack([b, b]), torch.stack([sfb, sfb])
    masked = torch.tensor([65, 7], dtype=torch.int32)

    def f(x, b, sfb, b2, sfb2, idx, masked):
        q, s = pk.per_token_cast_to_fp8(x, backend=backend)
        out = torch.full((x.shape[0], b.shape[0]), float("nan"), dtype=torch.bfloat16)
        pk.fp8_gemm_nt((q, s), (b, sfb), out, backend=backend)
        grouped = torch.full((x.shape[0], b.shape[0]), float("nan"), dtype=torch.bfloat16)
        pk.m_grouped_fp8_gemm_nt_contiguous((q, s), (b2, sfb2), grouped, idx, backend=backend)
        q3, s3 = torch.stack([q, q]), torch.stack([s, s])
        out3 = torch.full((2, x.shape[0], b.shape[0]), float("nan"), dtype=torch.bfloat16)
        pk.m_grouped_fp8_gemm_nt_masked((q3, s3), (b2, sfb2), out3, masked, 32, backend=backend)
        return out, grouped, out3

    args = (x, b, sfb, b2, sfb2, idx, masked)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    eager = f(*args)
    for g, e in zip(got, eager):
        assert torch.equal(g.isnan(), e.isnan()) and torch.equal(g.nan_to_num(), e.nan_to_num())
    assert calc_diff(got[0], R.fp8_gemm_nt(a, sfa, b, sfb)) < 1e-3
