"""pytest-benchmark entry points for one mid-size shape (GPU only).

Run explicitly: ``python -m pytest bench/test_microbench.py --benchmark-only``
(pytest.ini's testpaths does not include bench/, so the CPU suite never collects it).
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")


def _hopper() -> bool:
    # Same rule as tests/conftest.py, which does not apply outside tests/.
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _hopper(), reason="needs an NVIDIA Hopper (sm_90) GPU; none on this machine")]

M, N, K = 4096, 7168, 7168


def _synced(fn):
    # pytest-benchmark times on the host; wait for the kernel so the time is the GPU's.
    def run():
        r = fn()
        torch.cuda.synchronize()
        return r
    return run


@pytest.fixture(scope="module")
def operands():
    import pykernels
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    return x, w, pykernels.per_token_cast_to_fp8(x), pykernels.per_block_cast_to_fp8(w)


def test_fp8_gemm_nt_triton(benchmark, operands):
    import pykernels
    _, _, a, b = operands
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    benchmark(_synced(lambda: pykernels.fp8_gemm_nt(a, b, out, backend="triton")))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("cast", ["per_token_cast_to_fp8", "per_block_cast_to_fp8"])
def test_cast_triton(benchmark, operands, cast):
    import pykernels
    x = operands[0]
    q, sf = benchmark(_synced(lambda: getattr(pykernels, cast)(x, backend="triton")))
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn and torch.isfinite(sf).all()

