"""Triton BF16 GEMM (NT): out[m, n] = a[m, k] b[n, k]^T, bf16 operands, float32 sums.

Each program computes a BLOCK_M x BLOCK_N output tile; K advances in BLOCK_K = 64 steps
(one 128-byte row of bf16 per step, the TMA swizzle width of the CUDA kernel); K is a
multiple of 16 (the API's rule), a partial last step loads its tail as zeros (EVEN_K false).
Out: bf16 (the float32 sum rounded once, to nearest even) or float32 (out += the sum: the
caller puts c or zeros there first, ops.gemm.accumulation_base).

Under Triton's interpreter bf16 `tl.dot` returns wrong values (docs/architecture.md, Known
tool pitfalls), so with UPCAST (set exactly when interpreted) both operands are converted to
float32 (exact) and multiplied with an IEEE float32 dot: the same products and float32 sums
the GPU's bf16 dot computes, in another order. SOFT rounds float32 -> bf16 in software
(triton/rounding.py), as the interpreter's cast rounds toward zero.
M = 0 or N = 0: no launch; K = 0: zeros (float32 out: out unchanged, i.e. c).
"""
import torch
import triton.language as tl

from ..runtime.hardware import cdiv
from .gemm import load_k_step
from .jit_dispatch import INTERPRETED, jit
from .rounding import to_bf16_rne
from .sm90 import run_launch, spec_of

BLOCK_K = 64          # bf16 elements per 128-byte row segment
NUM_STAGES = 3        # software pipelining depth of the K loop (compiled path)
UPCAST_DOTS = INTERPRETED          # bf16 dots are wrong when interpreted: float32 there
SOFTWARE_ROUNDING = INTERPRETED    # the interpreter casts float32 -> bf16 toward zero


@jit
def _bf16_gemm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_bn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr, OUT_F32: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = load_k_step(a_ptr, b_ptr, rm, rn, row_ok, col_ok, kb * BLOCK_K + rk, K, stride_am, stride_bn, EVEN_K)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    ok = row_ok[:, None] & col_ok[None, :]
    dst = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if OUT_F32:
        tl.store(dst, tl.load(dst, mask=ok, other=0.0) + acc, mask=ok)
    else:
        tl.store(dst, to_bf16_rne(acc, SOFT), mask=ok)


def tile_config(m: int, n: int, f32_out: bool):
    """(BLOCK_M, BLOCK_N, num_warps): 64-row tiles for small M (decode), 128x128 with 8
    warps otherwise (the FP8 GEMM's choice, triton/gemm.py). Float32 out with N not a
    multiple of 16: 64 columns, as the scalar read-add-writes of 128 columns need 255
    registers and spill (sm_90a, Triton 3.8; docs/gemm.md)."""
    block_m, warps = (64, 4) if m <= 64 else (128, 8)
    return block_m, 64 if f32_out and n % 16 else 128, warps


def launch_args(a, b, out, upcast=UPCAST_DOTS, soft=SOFTWARE_ROUNDING):
    """The launch description (sm90.run_launch) for these operands, or None when there is
    nothing to compute; the GPU launch and sm90_compile_specs both use it."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return None
    block_m, block_n, warps = tile_config(m, n, out.dtype == torch.float32)
    grid = (cdiv(m, block_m), cdiv(n, block_n), 1)
    vals = (a, b, out, m, n, k, a.stride(0), b.stride(0), out.stride(0))
    args = dict(zip(_bf16_gemm_kernel.arg_names, vals))
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0,
                      UPCAST=bool(upcast), SOFT=bool(soft), OUT_F32=out.dtype == torch.float32)
    return _bf16_gemm_kernel, grid, args, constexprs, dict(num_warps=warps, num_stages=NUM_STAGES)


def bf16_gemm_nt(a, b, out):
    """a bf16 [m, k], b bf16 [n, k] (row strides any, K contiguous), out [m, n]: bf16
    (written), or float32 (out += a b^T). Shapes are checked by the caller (ops.gemm)."""
    run_launch(launch_args(a, b, out))
    return out


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def sm90_compile_specs():
    """sm90.LaunchSpecs of representative GPU launches (DeepGEMM's BF16 test shapes; every
    tile config; bf16 and float32 out, N a multiple of 16 and not; K a multiple of 64 and not)."""
    specs = []
    for m, n, k, out_dtype in ((4096, 7168, 7168, torch.bfloat16), (64, 7168, 2048, torch.bfloat16),
                               (128, 2112, 7168, torch.bfloat16), (4096, 4096, 7168, torch.float32),
                               (4096, 4104, 7168, torch.float32), (4096, 7168, 576 + 16, torch.bfloat16)):
        out = _meta(m, n, dtype=out_dtype)
        label = f"bf16 m={m} n={n} k={k} {str(out_dtype).replace('torch.', '')} out"
        specs.append(spec_of(label, launch_args(_meta(m, k), _meta(n, k), out, upcast=False, soft=False)))
    return specs
