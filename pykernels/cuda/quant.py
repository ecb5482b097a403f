"""Hand-written PTX FP8 quantization (ptx/quant_per_token.ptx, ptx/quant_per_block.ptx).

Bit-identical to pykernels.reference.quant (see docs/quant-ptx.md).
"""
import torch

from ..runtime.hardware import SCALE_BLOCK as BLOCK, cdiv as _cdiv
from ..runtime.executors import run_plan
from ..runtime.plan import LaunchPlan, ptr, u32, u64

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
WARPS_PER_CTA = 4  # per-token kernel: one warp per (row, 128-column group)


def _check_sizes(what: str, rows: int, cols: int) -> None:
    # The kernels index rows and (row, group) items with 32-bit integers.
    if rows * _cdiv(cols, BLOCK) >= 2**31 or cols >= 2**31:
        raise ValueError(f"x: {what} supports fewer than 2^31 groups and columns, got shape [{rows}, {cols}]")


def per_token_plan(x: torch.Tensor, q: torch.Tensor, sf: torch.Tensor) -> LaunchPlan:
    """x [m, k] f32/bf16/f16 (unit column stride) -> q e4m3 [m, k], sf f32 [m, ceil(k/128)]."""
    m, k = x.shape
    _check_sizes("per-token quantization", m, k)
    kb = _cdiv(k, BLOCK)
    return LaunchPlan("quant_per_token", "pk_quant_per_token",
                      grid=(max(1, _cdiv(m * kb, WARPS_PER_CTA)), 1, 1), block=(32 * WARPS_PER_CTA, 1, 1),
                      args=(ptr(x), ptr(q), ptr(sf), u32(m), u32(k), u32(kb), u64(x.stride(0)),
                            u32(_DTYPE_CODE[x.dtype])))


def per_block_plan(x: torch.Tensor, q: torch.Tensor, sf: torch.Tensor) -> LaunchPlan:
    """x [m, n] f32/bf16/f16 -> q e4m3 [m, n], sf f32 [ceil(m/128), ceil(n/128)]."""
    m, n = x.shape
    _check_sizes("per-block quantization", m, n)
    mb, nb = _cdiv(m, BLOCK), _cdiv(n, BLOCK)
    return LaunchPlan("quant_per_block", "pk_quant_per_block", grid=(mb, nb, 1), block=(256, 1, 1),
                      args=(ptr(x), ptr(q), ptr(sf), u32(m), u32(n), u32(nb), u64(x.stride(0)),
                            u32(_DTYPE_CODE[x.dtype])))


def _outputs(x, sf_shape):
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(sf_shape, dtype=torch.float32, device=x.device)
    return q, sf


def per_token_cast_to_fp8(x: torch.Tensor, executor: str = "cuda"):
    """(q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)]); executor "cuda" or "emu"."""
    m, k = x.shape
    q, sf = _outputs(x, (m, _cdiv(k, BLOCK)))
    if m and k:
        run_plan(per_token_plan(x, q, sf), executor)
    return q, sf


def per_block_cast_to_fp8(x: torch.Tensor, executor: str = "cuda"):
    """(q float8_e4m3fn [m, n], sf float32 [ceil(m/128), ceil(n/128)]); executor "cuda" or "emu"."""
    m, n = x.shape
    q, sf = _outputs(x, (_cdiv(m, BLOCK), _cdiv(n, BLOCK)))
    if m and n:
        run_plan(per_block_plan(x, q, sf), executor)
    return q, sf
