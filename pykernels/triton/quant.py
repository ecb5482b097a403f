"""Triton FP8 quantization (1x128 per-token groups, 128x128 blocks).

Bit-identical to pykernels.reference.quant: amax in float32, inv = div_rn(448, amax)
(a correctly rounded division, not Triton's default approximate one), q = rne(x * inv).
NaN and Inf as docs/numerics.md: tl.max drops NaN (compiled and interpreted), so a
group's NaN count is reduced separately and makes amax NaN; the scale of such a group
is the canonical NaN 0x7FFFFFFF.
"""
import torch
import triton
import triton.language as tl

from ..reference.constants import BLOCK, FP8_E4M3_MAX, FP8_SCALE_FLOOR
from .rounding import to_e4m3_rne
from .sm90 import run_launch, spec_of

from . import INTERPRETED
from .jit_dispatch import jit

# Software rounding is needed under the interpreter only (see rounding.py).
SOFTWARE_ROUNDING = INTERPRETED


@jit
def _scale_and_inverse(amax, has_nan, FLOOR: tl.constexpr, FMAX: tl.constexpr):
    """(sf, inv) of groups with this max |x| (float32 tensor) and NaN flag: the floor,
    NaN amax for groups with a NaN, sf = div_rn(amax, 448), inv = div_rn(448, amax)."""
    amax = tl.where(has_nan, float("nan"), tl.maximum(amax, FLOOR))
    fmax = tl.full(amax.shape, FMAX, tl.float32)
    inv = tl.math.div_rn(fmax, amax)
    canonical_nan = tl.full(amax.shape, 0x7FFFFFFF, tl.int32).to(tl.float32, bitcast=True)
    sf = tl.where(has_nan, canonical_nan, tl.math.div_rn(amax, fmax))
    return sf, inv


@jit
def _per_token_kernel(x_ptr, q_ptr, sf_ptr, m, k, stride_x, stride_q, stride_sf,
                      BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                      FLOOR: tl.constexpr, FMAX: tl.constexpr, SOFT: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    rk = g * GROUP + tl.arange(0, GROUP)
    mask = (rm[:, None] < m) & (rk[None, :] < k)
    x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    has_nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
    sf, inv = _scale_and_inverse(tl.max(tl.abs(x), axis=1), has_nan, FLOOR, FMAX)
    q = to_e4m3_rne(x * inv[:, None], SOFT)
    tl.store(q_ptr + rm[:, None] * stride_q + rk[None, :], q, mask=mask)
    tl.store(sf_ptr + rm * stride_sf + g, sf, mask=rm < m)


@jit
def _per_block_kernel(x_ptr, q_ptr, sf_ptr, m, n, stride_x, stride_q, stride_sf,
                      BLK: tl.constexpr, FLOOR: tl.constexpr, FMAX: tl.constexpr,
                      SOFT: tl.constexpr):
    bm = tl.program_id(0)
    bn = tl.program_id(1)
    rm = bm * BLK + tl.arange(0, BLK)
    rn = bn * BLK + tl.arange(0, BLK)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    x = tl.load(x_ptr + rm[:, None] * stride_x + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    has_nan = tl.sum(tl.sum((x != x).to(tl.int32), axis=1), axis=0) > 0
    sf, inv = _scale_and_inverse(tl.max(tl.max(tl.abs(x), axis=1), axis=0), has_nan, FLOOR, FMAX)
    q = to_e4m3_rne(x * inv, SOFT)
    tl.store(q_ptr + rm[:, None] * stride_q + rn[None, :], q, mask=mask)
    tl.store(sf_ptr + bm * stride_sf + bn, sf)


PER_TOKEN_ROWS = 16          # rows per per-token program (one 128-column group each)
PER_TOKEN_WARPS = 4
# The per-block program holds a whole 128x128 tile in registers. With 4 warps (128
# values per thread) ptxas needs 158-161 registers when the row stride is a multiple of
# 16 (vector loads), but 255 registers and 24-32 bytes of spills per thread when it is
# not, 288-344 bytes when the row count is not a multiple of 16 either (e.g. [130, 200]).
# With 8 warps: 79-88 registers / 218-236, no spills (Triton 3.8, sm_90a;
# tests/test_triton_sm90.py compiles both kinds of launch).
PER_BLOCK_WARPS = 8
NUM_STAGES = 3               # Triton's default (these kernels have no loop to pipeline)


def per_token_launch_args(x, q, sf, soft=SOFTWARE_ROUNDING):
    """The launch description (sm90.run_launch) of the per-token kernel, or None when empty.
    per_token_cast_to_fp8 and sm90_compile_specs both use it."""
    m, k = x.shape
    if not (m and k):
        return None
    grid = (triton.cdiv(m, PER_TOKEN_ROWS), triton.cdiv(k, BLOCK))
    args = dict(zip(_per_token_kernel.arg_names, (x, q, sf, m, k, x.stride(0), q.stride(0), sf.stride(0))))
    cx = dict(BLOCK_M=PER_TOKEN_ROWS, GROUP=BLOCK, FLOOR=FP8_SCALE_FLOOR, FMAX=FP8_E4M3_MAX, SOFT=bool(soft))
    return _per_token_kernel, grid, args, cx, dict(num_warps=PER_TOKEN_WARPS, num_stages=NUM_STAGES)


def per_block_launch_args(x, q, sf, soft=SOFTWARE_ROUNDING):
    """As per_token_launch_args, for the 128x128-block kernel."""
    m, n = x.shape
    if not (m and n):
        return None
    grid = (triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))
    args = dict(zip(_per_block_kernel.arg_names, (x, q, sf, m, n, x.stride(0), q.stride(0), sf.stride(0))))
    cx = dict(BLK=BLOCK, FLOOR=FP8_SCALE_FLOOR, FMAX=FP8_E4M3_MAX, SOFT=bool(soft))
    return _per_block_kernel, grid, args, cx, dict(num_warps=PER_BLOCK_WARPS, num_stages=NUM_STAGES)


def per_token_cast_to_fp8(x: torch.Tensor):
    """x [m, k] float32/bf16/f16 (row stride free, unit column stride) ->
    (q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)])."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(m, triton.cdiv(k, BLOCK), dtype=torch.float32, device=x.device)
    run_launch(per_token_launch_args(x, q, sf))
    return q, sf


def per_block_cast_to_fp8(x: torch.Tensor):
    """x [m, n] float32/bf16/f16 -> (q float8_e4m3fn [m, n], sf float32
    [ceil(m/128), ceil(n/128)])."""
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    sf = torch.empty(triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK), dtype=torch.float32, device=x.device)
    run_launch(per_block_launch_args(x, q, sf))
    return q, sf


def quant_launch_spec(label, per_block, x, q, sf):
    """sm90.LaunchSpec of the compiled (GPU) launch of a quantization kernel for these
    tensors (real or meta)."""
    return spec_of(label, (per_block_launch_args if per_block else per_token_launch_args)(x, q, sf, soft=False))


def sm90_compile_specs():
    """sm90.LaunchSpecs of representative GPU launches: activations (per-token) and
    weights (per-block), bf16 and float32 inputs, DeepGEMM's shapes."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        for per_block, m, k in ((False, 4096, 7168), (True, 7168, 7168)):
            kb, mb = triton.cdiv(k, BLOCK), triton.cdiv(m, BLOCK)
            x = torch.empty(m, k, dtype=dtype, device="meta")
            q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="meta")
            sf = torch.empty(mb if per_block else m, kb, dtype=torch.float32, device="meta")
            specs.append(quant_launch_spec(f"{'per_block' if per_block else 'per_token'} {name} [{m}, {k}]",
                                           per_block, x, q, sf))
    return specs
