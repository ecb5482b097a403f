"""Triton FP8 block-scaled GEMM (NT): normal, grouped contiguous, grouped masked.

One kernel body serves the three layouts (LAYOUT constexpr). Each program computes a
BLOCK_M x BLOCK_N output tile; K advances in 128-wide blocks so each step has one A
scale per row and one B scale per 128 columns of N (K a multiple of 16; a partial last
block loads its tail as zeros, EVEN_K constexpr false): two-level accumulation,
acc += dot_fp32(a_fp8, b_fp8^T) * (sa[:, None] * sb[None, :]): the scales multiply first,
as in the CUDA kernel, so a huge scale cannot overflow a partial sum whose scaled value
is finite (non-finite inputs: docs/numerics.md).

Device checks (no host read: CUDA-graph safe): m_indices values outside [-1, G) and
masked_m values outside [0, m_max] are recorded in the device error record
(pykernels.runtime.device_errors) and their rows / group are left untouched; on CPU
tensors (the interpreter) the record is raised right after the launch.
K = 0 writes zeros to the owned rows (the checks still run); M = 0, N = 0 or G = 0:
nothing to do, no launch.
"""
import torch
import triton.language as tl

from ..runtime import device_errors
from ..runtime.hardware import SCALE_BLOCK, TMA_ALIGNMENT_BYTES, cdiv, round_up
from ..reference.constants import FP8_E4M3_MAX, FP8_SCALE_FLOOR
from .error_record import record_error
from .quant import SOFTWARE_ROUNDING, _scale_and_inverse
from .rounding import to_bf16_rne, to_e4m3_rne
from .sm90 import run_launch, spec_of
from .jit_dispatch import jit

K_MULTIPLE = TMA_ALIGNMENT_BYTES   # the API's K rule (ops/gemm.py), the same on every backend
GEMM_REQUIREMENTS = f"K a multiple of {K_MULTIPLE} (0: zeros; the last K block may be partial); M, N >= 0 (any)"
LAYOUT_NORMAL, LAYOUT_CONTIGUOUS, LAYOUT_MASKED = 0, 1, 2
NUM_STAGES = 3  # software pipelining depth of the K loop (compiled path)
# the device checks' codes, as constants of the kernels
ERR_M_INDEX = tl.constexpr(device_errors.code("MIndexOutOfRange"))
ERR_MASKED_M = tl.constexpr(device_errors.code("MaskedMOutOfRange"))
FP8_FLOOR, FP8_MAX = tl.constexpr(FP8_SCALE_FLOOR), tl.constexpr(FP8_E4M3_MAX)   # quantize-on-store (quant.py's)
OPS = {LAYOUT_NORMAL: "fp8_gemm_nt", LAYOUT_CONTIGUOUS: "m_grouped_fp8_gemm_nt_contiguous",
       LAYOUT_MASKED: "m_grouped_fp8_gemm_nt_masked"}


def check_gemm_shape(m: int, n: int, k: int) -> None:
    """Raise ValueError if the Triton GEMM cannot take this problem shape."""
    if k < 0 or k % K_MULTIPLE:
        raise ValueError(f"k: expected a multiple of {K_MULTIPLE}, got {k} ({GEMM_REQUIREMENTS})")
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    if m < 0:
        raise ValueError(f"m: expected >= 0, got {m}")


@jit
def _has_e4m3_nan(x):
    """Per row of an e4m3 tile: does it hold a NaN byte (0x7F / 0xFF)?"""
    return tl.max(((x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F).to(tl.int32), axis=1) > 0


@jit
def load_k_step(a_base, b_base, rm, rn, row_ok, col_ok, ks, K, stride_am, stride_bn, EVEN_K: tl.constexpr):
    """One K step's tiles of A [BLOCK_M, BLOCK_K] and B [BLOCK_N, BLOCK_K] (rows rm / rn, K
    contiguous) at columns ks: rows past M / N, and columns past K unless EVEN_K, load as 0."""
    if EVEN_K:
        a_ok = row_ok[:, None]
        b_ok = col_ok[:, None]
    else:
        a_ok = row_ok[:, None] & (ks < K)[None, :]
        b_ok = col_ok[:, None] & (ks < K)[None, :]
    a = tl.load(a_base + rm[:, None] * stride_am + ks[None, :], mask=a_ok, other=0.0)
    b = tl.load(b_base + rn[:, None] * stride_bn + ks[None, :], mask=b_ok, other=0.0)
    return a, b


@jit
def _tile(a_base, sfa_base, b_base, sfb_base, rm, rn, row_ok, N, K,
          stride_am, stride_sfa_m, stride_sfa_k, stride_bn, stride_sfb_n, stride_sfb_k,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SOFT: tl.constexpr,
          EVEN_K: tl.constexpr, SB_ROWS: tl.constexpr):
    rk = tl.arange(0, BLOCK_K)
    col_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The interpreter's dot reads e4m3 NaN bytes as +-480 (Triton 3.8); a NaN in a row of
    # A (column of B) makes that whole output row (column) NaN, as wgmma and the reference
    # do. SOFT is set exactly when interpreted.
    nan_rows = tl.zeros((BLOCK_M,), dtype=tl.int1)
    nan_cols = tl.zeros((BLOCK_N,), dtype=tl.int1)
    # K blocks of 128; the last one may be partial (EVEN_K false): its tail loads as zeros
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = load_k_step(a_base, b_base, rm, rn, row_ok, col_ok, kb * BLOCK_K + rk, K, stride_am, stride_bn,
                           EVEN_K)
        if SOFT:
            nan_rows = nan_rows | _has_e4m3_nan(a)
            nan_cols = nan_cols | _has_e4m3_nan(b)
        sa = tl.load(sfa_base + rm * stride_sfa_m + kb * stride_sfa_k, mask=row_ok, other=0.0)
        if SB_ROWS == 1:
            # 1x128 B scales (recipe (1, 1, 128)): one per column of the tile and K block
            sb = tl.load(sfb_base + rn * stride_sfb_n + kb * stride_sfb_k, mask=col_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        elif BLOCK_N == BLOCK_K:
            # The tile's columns share one B scale per K block (tiles start at multiples
            # of 128): one scalar load, not one per column (32 predicated loads of the
            # same address per thread and K block in the compiled 128x128 tile).
            sb = tl.load(sfb_base + tl.program_id(1) * stride_sfb_n + kb * stride_sfb_k)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
        else:
            sb = tl.load(sfb_base + (rn // BLOCK_K) * stride_sfb_n + kb * stride_sfb_k, mask=col_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
    if SOFT:
        acc = tl.where(nan_rows[:, None] | nan_cols[None, :], float("nan"), acc)
    return acc


@jit
def _fp8_gemm_kernel(a_ptr, sfa_ptr, b_ptr, sfb_ptr, out_ptr, idx_ptr, record_ptr, sfd_ptr, M, N, K, G,
                     stride_idx, stride_ag, stride_am, stride_sfa_g, stride_sfa_m, stride_sfa_k,
                     stride_bg, stride_bn, stride_sfb_g, stride_sfb_n, stride_sfb_k,
                     stride_og, stride_om, stride_sfd,
                     LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SOFT: tl.constexpr, EVEN_K: tl.constexpr, SB_ROWS: tl.constexpr,
                     OUT_F32: tl.constexpr, OUT_FP8: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = rm < M
    col_ok = rn < N
    if LAYOUT == 1:
        # Grouped contiguous: rows carry their group id; -1 rows are padding. A tile
        # normally holds one group (segments aligned to 128); loop over the groups it
        # spans so misaligned segments stay correct, just slower. Indices outside
        # [-1, G) are recorded (the first n-block's program) and their rows skipped.
        gids = tl.load(idx_ptr + rm * stride_idx, mask=in_m, other=-1)
        valid = (gids >= 0) & (gids < G)
        bad = in_m & ((gids < -1) | (gids >= G))
        if (tl.program_id(1) == 0) & (tl.max(bad.to(tl.int32), axis=0) > 0):
            row = tl.min(tl.where(bad, rm, M), axis=0)
            record_error(record_ptr, ERR_M_INDEX, tl.sum(tl.where(rm == row, gids, 0), axis=0), G, row)
        g_lo = tl.min(tl.where(valid, gids, 2147483647), axis=0)
        g_hi = tl.max(tl.where(valid, gids, -1), axis=0)
        for g in range(g_lo, g_hi + 1):
            row_ok = gids == g
            acc = _tile(a_ptr, sfa_ptr, b_ptr + g * stride_bg, sfb_ptr + g * stride_sfb_g,
                        rm, rn, row_ok, N, K, stride_am, stride_sfa_m, stride_sfa_k,
                        stride_bn, stride_sfb_n, stride_sfb_k, BLOCK_M, BLOCK_N, BLOCK_K, SOFT, EVEN_K, SB_ROWS)
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], to_bf16_rne(acc, SOFT),
                     mask=row_ok[:, None] & col_ok[None, :])
    else:
        g = tl.program_id(2)
        if LAYOUT == 2:
            # Grouped masked: only the first masked_m[g] rows of group g are computed; a
            # value outside [0, M] is recorded (the group's first program) and the group skipped.
            rows = tl.load(idx_ptr + g * stride_idx)
            bad = (rows < 0) | (rows > M)
            if bad & (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                record_error(record_ptr, ERR_MASKED_M, rows, M, g)
            row_ok = in_m & (rm < tl.where(bad, 0, rows))
        else:
            row_ok = in_m
        n_valid = tl.sum(row_ok.to(tl.int32), axis=0)
        k_eff = tl.where(n_valid > 0, K, 0)  # empty tiles skip the K loop entirely
        acc = _tile(a_ptr + g * stride_ag, sfa_ptr + g * stride_sfa_g, b_ptr + g * stride_bg,
                    sfb_ptr + g * stride_sfb_g, rm, rn, row_ok, N, k_eff,
                    stride_am, stride_sfa_m, stride_sfa_k, stride_bn, stride_sfb_n, stride_sfb_k,
                    BLOCK_M, BLOCK_N, BLOCK_K, SOFT, EVEN_K, SB_ROWS)
        dst = out_ptr + g * stride_og + rm[:, None] * stride_om + rn[None, :]
        if OUT_F32:
            # float32 out (normal layout): out += the tile (out holds c, or zeros, already)
            ok = row_ok[:, None] & col_ok[None, :]
            tl.store(dst, tl.load(dst, mask=ok, other=0.0) + acc, mask=ok)
        elif OUT_FP8:
            # e4m3 out with 1x128 scales (normal layout, BLOCK_N = 128: one group per row of
            # the tile), quantized as per_token_cast_to_fp8 quantizes the float32 result
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.where(col_ok[None, :], acc, 0.0)
            has_nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
            sf, inv = _scale_and_inverse(tl.max(tl.abs(x), axis=1), has_nan, FP8_FLOOR, FP8_MAX)
            tl.store(dst, to_e4m3_rne(x * inv[:, None], SOFT), mask=ok)
            tl.store(sfd_ptr + rm * stride_sfd + tl.program_id(1), sf, mask=row_ok)
        else:
            tl.store(dst, to_bf16_rne(acc, SOFT), mask=row_ok[:, None] & col_ok[None, :])


def tile_config(m: int, n: int):
    """(BLOCK_M, BLOCK_N, num_warps): 64-row tiles for small M (decode) so fewer rows are
    wasted; 128x128 with 8 warps otherwise. Compiled for sm_90a (Triton 3.8, as launched:
    sm90_compile_specs) both use wgmma with a 3-stage cp.async pipeline and 193-240
    registers without spills (docs/triton-gemm.md; tests/test_triton_sm90.py)."""
    if m <= 64:
        return 64, 128, 4
    return 128, 128, 8


def launch_args(layout, a, sfa, b, sfb, out, idx, record, rows, groups, soft=SOFTWARE_ROUNDING,
                b_scale_rows=SCALE_BLOCK, sfd=None):
    """The launch description (sm90.run_launch) of the kernel for these operands, or None
    when there is nothing to compute (no row, column or group). idx: m_indices / masked_m
    (any stride; normal: unused); record: the int32 device error record. The GPU launch
    (_launch) and sm90_compile_specs both use it, so the specs compile exactly what the
    GPU runs."""
    n, k = b.shape[-2], b.shape[-1]
    if rows == 0 or groups == 0 or n == 0:
        return None
    block_m, block_n, warps = tile_config(rows, n)
    grid = (cdiv(rows, block_m), cdiv(n, block_n), groups if layout == LAYOUT_MASKED else 1)
    g3 = a.dim() == 3
    fp8_out = out.dtype == torch.float8_e4m3fn
    vals = (a, sfa, b, sfb, out, idx, record, sfd if fp8_out else record, rows, n, k, b.shape[0] if b.dim() == 3 else 1,
            idx.stride(0) if layout != LAYOUT_NORMAL else 0,
            a.stride(0) if g3 else 0, a.stride(-2), sfa.stride(0) if g3 else 0, sfa.stride(-2), sfa.stride(-1),
            b.stride(0) if b.dim() == 3 else 0, b.stride(-2),
            sfb.stride(0) if sfb.dim() == 3 else 0, sfb.stride(-2), sfb.stride(-1),
            out.stride(0) if g3 else 0, out.stride(-2), sfd.stride(0) if fp8_out else 0)
    args = dict(zip(_fp8_gemm_kernel.arg_names, vals))
    assert not fp8_out or block_n == SCALE_BLOCK, "e4m3 out: one 128-column scale group per tile"
    constexprs = dict(LAYOUT=layout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=SCALE_BLOCK, SOFT=bool(soft),
                      EVEN_K=k % SCALE_BLOCK == 0, SB_ROWS=b_scale_rows, OUT_F32=out.dtype == torch.float32,
                      OUT_FP8=fp8_out)
    return _fp8_gemm_kernel, grid, args, constexprs, dict(num_warps=warps, num_stages=NUM_STAGES)


def _launch(layout, a, sfa, b, sfb, out, idx, rows, groups, b_scale_rows=SCALE_BLOCK, sfd=None):
    """Launch (nothing to launch: return); on CPU tensors raise a recorded input error."""
    launch = launch_args(layout, a, sfa, b, sfb, out, idx, device_errors.record_for(out.device, OPS[layout]),
                         rows, groups, b_scale_rows=b_scale_rows, sfd=sfd)
    if launch is None:
        return out
    run_launch(launch)
    if out.device.type == "cpu":
        device_errors.raise_if_set(launch[2]["record_ptr"], OPS[layout])
    return out


def _meta(shape, dtype, strides=None):
    if strides is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


def _scales(lead, m, kb, col_major):
    """sfa f32 [*lead, m, kb]: row-major, or DeepGEMM's column-major TMA-aligned layout
    (pykernels.get_col_major_tma_aligned_tensor: strides (kb*m_pad,) 1, m_pad)."""
    if not col_major:
        return _meta(lead + (m, kb), torch.float32)
    m_pad = round_up(m, 4)
    return _meta(lead + (m, kb), torch.float32, ((kb * m_pad,) if lead else ()) + (1, m_pad))


def gemm_launch_spec(label, layout, a, sfa, b, sfb, out, idx, b_scale_rows=SCALE_BLOCK, sfd=None):
    """sm90.LaunchSpec of the compiled (GPU) launch for these operands (real or meta
    tensors): the launcher's specialization of exactly the arguments _launch passes."""
    rows, groups = (a.shape[1], a.shape[0]) if layout == LAYOUT_MASKED else (a.shape[0], 1)
    record = (_meta((device_errors.RECORD_WORDS,), torch.int32) if out.device.type == "meta"
              else device_errors.record_for(out.device, OPS[layout]))
    return spec_of(label, launch_args(layout, a, sfa, b, sfb, out, idx, record, rows, groups, soft=False,
                                      b_scale_rows=b_scale_rows, sfd=sfd))


def sm90_compile_specs():
    """sm90.LaunchSpecs of representative GPU launches (DeepGEMM's test shapes; scales
    row-major and DeepGEMM's column-major TMA-aligned; both tile configs): the
    signatures, constexprs, warps, stages and alignment attributes Triton's launcher
    compiles for them. Launches with the same specialization share a spec's binary."""
    f8, bf = torch.float8_e4m3fn, torch.bfloat16
    specs = []
    # N = 2100 (not a multiple of 8): the shapes backend="auto" sends to Triton on a GPU.
    for m, n, k, col in ((128, 2112, 7168, False), (4096, 7168, 7168, False), (4096, 7168, 7168, True),
                         (4096, 2100, 7168, True), (64, 7168, 7168, True), (1, 7168, 7168, True)):
        kb = k // SCALE_BLOCK
        sfa = _scales((), m, kb, col)
        specs.append(gemm_launch_spec(f"normal m={m} n={n} k={k} sfa={'col' if col else 'row'}", LAYOUT_NORMAL,
                                      _meta((m, k), f8), sfa, _meta((n, k), f8),
                                      _meta((cdiv(n, SCALE_BLOCK), kb), torch.float32), _meta((m, n), bf), sfa))
    # the other outputs and scales of fp8_gemm_nt (docs/gemm.md): K not a multiple of 128,
    # float32 out (+ c) with 1x128 B scales (the weight-gradient GEMM), e4m3 out + its scales
    m, n, k = 4096, 7168, 576
    kb = cdiv(k, SCALE_BLOCK)
    sfa = _scales((), m, kb, True)
    specs.append(gemm_launch_spec(f"normal m={m} n={n} k={k} sfa=col", LAYOUT_NORMAL, _meta((m, k), f8), sfa,
                                  _meta((n, k), f8), _meta((cdiv(n, SCALE_BLOCK), kb), torch.float32),
                                  _meta((m, n), bf), sfa))
    specs.append(gemm_launch_spec(f"wgrad m={m} n={n} k={k} float32 out, 1x128 B scales", LAYOUT_NORMAL,
                                  _meta((m, k), f8), sfa, _meta((n, k), f8), _scales((), n, kb, True),
                                  _meta((m, n), torch.float32), sfa, b_scale_rows=1))
    specs.append(gemm_launch_spec(f"normal m={m} n={n} k={k} e4m3 out", LAYOUT_NORMAL, _meta((m, k), f8), sfa,
                                  _meta((n, k), f8), _meta((cdiv(n, SCALE_BLOCK), kb), torch.float32),
                                  _meta((m, n), f8), sfa, sfd=_meta((m, cdiv(n, SCALE_BLOCK)), torch.float32)))
    for g, m_sum, n, k in ((4, 4 * 1024, 4096, 7168), (4, 4 * 1024, 7168, 2048)):
        kb = k // SCALE_BLOCK
        specs.append(gemm_launch_spec(f"contiguous G={g} m_sum={m_sum} n={n} k={k} sfa=col", LAYOUT_CONTIGUOUS,
                                      _meta((m_sum, k), f8), _scales((), m_sum, kb, True), _meta((g, n, k), f8),
                                      _meta((g, cdiv(n, SCALE_BLOCK), kb), torch.float32), _meta((m_sum, n), bf),
                                      _meta((m_sum,), torch.int32)))
    for g, m_max, n, k in ((4, 256, 4096, 7168), (4, 256, 7168, 2048), (16, 64, 7168, 2048)):
        kb = k // SCALE_BLOCK
        specs.append(gemm_launch_spec(f"masked G={g} m_max={m_max} n={n} k={k} sfa=col", LAYOUT_MASKED,
                                      _meta((g, m_max, k), f8), _scales((g,), m_max, kb, True),
                                      _meta((g, n, k), f8), _meta((g, cdiv(n, SCALE_BLOCK), kb), torch.float32),
                                      _meta((g, m_max, n), bf), _meta((g,), torch.int32)))
    return specs


def fp8_gemm_nt(a, sfa, b, sfb, out=None, b_scale_rows=SCALE_BLOCK, sfd=None):
    """a e4m3 [m, k], sfa f32 [m, ceil(k/128)] (any strides), b e4m3 [n, k], sfb f32
    [ceil(n/128), ceil(k/128)] (b_scale_rows 1: [n, ceil(k/128)], any strides) -> out [m, n]:
    bf16 (written; allocated when None), float32 (out += the product: the caller puts c
    or zeros there first, ops.gemm.accumulation_base), or e4m3 with its 1x128 scales in sfd
    f32 [m, ceil(n/128)] (row stride any): per_token_cast_to_fp8 of the float32 product."""
    m, k = a.shape
    n = b.shape[0]
    check_gemm_shape(m, n, k)
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    return _launch(LAYOUT_NORMAL, a, sfa, b, sfb, out, sfa, m, 1, b_scale_rows, sfd)


def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out):
    """a e4m3 [m_sum, k], sfa f32 [m_sum, ceil(k/128)], b e4m3 [G, n, k], sfb f32
    [G, ceil(n/128), ceil(k/128)], m_indices int32 [m_sum] (any stride; -1 = padding row),
    out bf16 [m_sum, n]. Rows whose index is outside [0, G) are not written; values
    outside [-1, G) are recorded (device_errors; raised at once on CPU tensors)."""
    check_gemm_shape(a.shape[0], b.shape[1], a.shape[1])
    if b.shape[0] == 0:
        return out
    return _launch(LAYOUT_CONTIGUOUS, a, sfa, b, sfb, out, m_indices, a.shape[0], 1)


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out):
    """a e4m3 [G, m_max, k], sfa f32 [G, m_max, ceil(k/128)], b e4m3 [G, n, k], sfb f32
    [G, ceil(n/128), ceil(k/128)], masked_m int32 [G] (any stride; read on the device: no host
    sync), out bf16 [G, m_max, n]; rows >= masked_m[g] are not written. A value outside
    [0, m_max] is recorded (device_errors; raised at once on CPU tensors) and its group
    left unwritten."""
    check_gemm_shape(a.shape[1], b.shape[1], a.shape[2])
    return _launch(LAYOUT_MASKED, a, sfa, b, sfb, out, masked_m, a.shape[1], a.shape[0])
