"""Peak rates measured on the device in use (roofline ceilings; never hard-coded)."""
from .timing import time_cuda

_N = 8192  # large enough that cuBLAS reaches its plateau on Hopper


def copy_bandwidth_gbps(nbytes: int = 1 << 30, runs: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting the read and the write."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda([lambda: dst.copy_(src)], runs=runs, flush=False)  # 2 GiB touched: L2 irrelevant
    return 2 * nbytes / t.median / 1e9


def bf16_tflops(n: int = _N, runs: int = 20) -> float:
    """torch.matmul bf16 rate (cuBLAS) on an n^3 problem, TFLOP/s."""
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda([lambda: torch.matmul(a, b)], runs=runs)
    return 2 * n ** 3 / t.median / 1e12


def fp8_tflops(n: int = _N, runs: int = 20) -> float:
    """torch._scaled_mm e4m3 per-tensor rate (cuBLASLt) on an n^3 problem, TFLOP/s."""
    import torch
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # cuBLASLt wants B column-major
    one = torch.ones((), device="cuda")
    t = time_cuda([lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)], runs=runs)
    return 2 * n ** 3 / t.median / 1e12


def measure_peaks() -> dict:
    """All three ceilings: {'bw_gbps', 'bf16_tflops', 'fp8_tflops'}."""
    return {"bw_gbps": copy_bandwidth_gbps(), "bf16_tflops": bf16_tflops(), "fp8_tflops": fp8_tflops()}
