"""Triton FP8 quantization (1x128 per-token groups, 128x128 blocks).

Bit-identical to pykernels.reference.quant: amax in float32, inv = div_rn(448, amax)
(a correctly rounded division, not Triton's default approximate one), q = rne(x * inv).
"""
import torch
import triton
import triton.language as tl

from ..reference.constants import BLOCK, FP8_E4M3_MAX, FP8_SCALE_FLOOR
from .rounding import to_e4m3_rne

from . import INTERPRETED

# Software rounding is needed under the interpreter only (see rounding.py).
SOFTWARE_ROUNDING = INTERPRETED


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, sf_ptr, m, k, stride_x, stride_q, stride_sf,
                      BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                      FLOOR: tl.constexpr, FMAX: tl.constexpr, SOFT: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    rk = g * GROUP + tl.arange(0, GROUP)
    mask = (rm[:, None] < m) & (rk[None, :] < k)
    x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR)
    inv = tl.math.div_rn(tl.full(amax.shape, FMAX, tl.float32), amax)
    q = to_e4m3_rne(x * inv[:, None], SOFT)
    tl.store(q_ptr + rm[:, None] * stride_q + rk[None, :], q, mask=mask)
    tl.store(sf_ptr + rm * stride_sf + g, tl.math.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32)), mask=rm < m)


@triton.jit
def _per_block_kernel(x_ptr, q_ptr, sf_ptr, m, n, stride_x, stride_q, stride_sf,
                      BLK: tl.constexpr, FLOOR: tl.constexpr, FMAX: tl.constexpr,
                      SOFT: tl.constexpr):
    bm = tl.program_id(0)
    bn = tl.program_id(1)
    rm = bm * BLK + tl.arange(0, BLK)
    rn = bn * BLK + tl.arange(0, BLK)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    x = tl.load(x_ptr + rm[:, None] * stride_x + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), FLOOR)
    inv = tl.math.div_rn(FMAX, amax)
    q = to_e4m3_rne(x * inv, SOFT)
    tl.store(q_ptr + rm[:, None] * stride_q + rn[None, :], q, mask=mask)
    tl.store(sf_ptr + bm * stride_sf + bn, tl.math.div_rn(amax, FMAX))


def per_token_cast_to_fp8(x: torch.Tensor):
    """x [m, k] float32/bf16/f16 (row stride free, unit column stride) ->
    (q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)])."""
    m, k = x.shape
    kb = triton.cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    if m and k:
        block_m = 16
        _per_token_kernel[(triton.cdiv(m, block_m), kb)](
            x, q, sf, m, k, x.stride(0), q.stride(0), sf.stride(0),
            BLOCK_M=block_m, GROUP=BLOCK, FLOOR=FP8_SCALE_FLOOR, FMAX=FP8_E4M3_MAX,
            SOFT=SOFTWARE_ROUNDING)
    return q, sf


def per_block_cast_to_fp8(x: torch.Tensor):
    """x [m, n] float32/bf16/f16 -> (q float8_e4m3fn [m, n], sf float32
    [ceil(m/128), ceil(n/128)])."""
    m, n = x.shape
    mb, nb = triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(mb, nb, dtype=torch.float32, device=x.device)
    if m and n:
        _per_block_kernel[(mb, nb)](x, q, sf, m, n, x.stride(0), q.stride(0), sf.stride(0),
                                    BLK=BLOCK, FLOOR=FP8_SCALE_FLOOR, FMAX=FP8_E4M3_MAX,
            SOFT=SOFTWARE_ROUNDING)
    return q, sf
