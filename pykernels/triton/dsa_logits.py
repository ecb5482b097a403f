"""Triton DSA indexer logits: fp8_mqa_logits (prefill) and fp8_paged_mqa_logits (decode).

logit[r, p] = k_scale[p] * sum_h w[r, h] * relu(q[r, h] . k[p])   (docs/dsa.md)

Each program owns one block of BLOCK_N key positions: it loads the keys' e4m3 rows and
scales once and, for each query row it serves, computes the scores of its H heads (FP8 operands,
float32 accumulation), the ReLU, the weighted head sum and the key scale, and writes the
block's logits, -inf where a position is outside the row's window (the positions past a
window are written too, as the reference writes them: the kernels always clean).
- Prefill: grid (M, cdiv(N, BLOCK_N)), one query row per program; row i sees [ks[i], ke[i]).
- Decode: grid (b, cdiv(max_context_len, BLOCK_N)); the program serves the next_n rows of
  sequence i, so each key block is read once for all of them. Position p of sequence i
  is token p % block_kv of page block_table[i, p // block_kv]; in DeepGEMM's page layout
  (block_kv e4m3 rows of D bytes, then block_kv float32 scales) that is byte
  page * block_kv * (D + 4) + (p % block_kv) * D, and float32 word
  (page * block_kv * (D + 4) + block_kv * D) / 4 + p % block_kv.
The dot is k [BLOCK_N, D] . q^T [D, HP]: keys on the MMA's M side (an e4m3 wgmma on sm_90a
for any head count), heads padded to a power of two >= 16 with zero q rows and zero
weights. The paged schedule_metadata does not change the result: the grid covers every
position.

Under the interpreter (UPCAST) the e4m3 operands are converted to float32 (exact) and
multiplied in IEEE float32: the same products as the GPU's e4m3 MMA, summed in another
order (and at full float32 precision: Hopper's FP8 wgmma accumulates less exactly; on an
H200 the logits were within 2.6e-4 of the row's largest |logit|, docs/dsa.md).
"""
import torch
import triton
import triton.language as tl

from ..reference import dsa as RD
from . import INTERPRETED
from .jit_dispatch import jit
from .sm90 import run_launch, spec_of

UPCAST_DOTS = INTERPRETED
_STAGES = 3
MIN_DOT_HEADS = 16           # the heads' side of the dot: at least 16


# Key positions per program and warps: on an H200 (Triton 3.6, V3.2's 64 heads of 128) 128 x 4
# warps was the fastest of BLOCK_N 64 / 128 / 256 x 4 / 8 warps for the paged and prefill kernels.
BLOCK_N = 128
NUM_WARPS = 4


def padded_heads(h: int) -> int:
    return max(MIN_DOT_HEADS, triton.next_power_of_2(h))


@jit
def _row_logits(q_ptr, w_ptr, k, sf, H, HP: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One query row: q [H, D] e4m3 at q_ptr, weights [H] f32 at w_ptr, keys k [BLOCK_N, D]
    e4m3, their scales sf [BLOCK_N] -> logits [BLOCK_N] (float32)."""
    hs = tl.arange(0, HP)
    ds = tl.arange(0, D)
    h_ok = hs < H
    q = tl.load(q_ptr + hs[:, None] * D + ds[None, :], mask=h_ok[:, None], other=0.0)
    w = tl.load(w_ptr + hs, mask=h_ok, other=0.0)
    # S^T = k . q^T [BLOCK_N, HP]: keys on the MMA's M side (wgmma for any head count), heads
    # along its columns, so the head sum stays within each thread's row (no cross-warp reduction)
    if UPCAST:
        s = tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(k, tl.trans(q))
    s = tl.maximum(s, 0.0)
    return tl.sum(s * w[None, :], axis=1) * sf


@jit
def _mqa_logits_kernel(q_ptr, k_ptr, sf_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, N, H, stride_w, stride_o,
                       HP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.load(ks_ptr + row)
    hi = tl.load(ke_ptr + row)
    inside = (pos >= lo) & (pos < hi)
    ds = tl.arange(0, D)
    k = tl.load(k_ptr + pos.to(tl.int64)[:, None] * D + ds[None, :], mask=inside[:, None], other=0.0)
    sf = tl.load(sf_ptr + pos, mask=inside, other=0.0)
    row64 = row.to(tl.int64)
    logits = _row_logits(q_ptr + row64 * H * D, w_ptr + row64 * stride_w, k, sf, H, HP, D, UPCAST)
    tl.store(out_ptr + row64 * stride_o + pos, tl.where(inside, logits, float("-inf")), mask=pos < N)


@jit
def _paged_mqa_logits_kernel(q_ptr, kv8_ptr, kv32_ptr, w_ptr, lens_ptr, bt_ptr, out_ptr,
                             H, MAX_LEN, stride_bt, stride_w, stride_o,
                             NEXT_N: tl.constexpr, LENS_2D: tl.constexpr, BLK: tl.constexpr,
                             HP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the row ends (exclusive) of this sequence's next_n rows; the keys read are those
    # below the largest
    if LENS_2D:
        seq_end = tl.load(lens_ptr + seq * NEXT_N)
        for j in tl.static_range(1, NEXT_N):
            seq_end = tl.maximum(seq_end, tl.load(lens_ptr + seq * NEXT_N + j))
    else:
        seq_end = tl.maximum(tl.load(lens_ptr + seq), 0)
    used = pos < seq_end
    page = tl.load(bt_ptr + seq * stride_bt + pos // BLK, mask=used, other=0).to(tl.int64)
    off = pos % BLK
    page_bytes = page * (BLK * (D + 4))
    ds = tl.arange(0, D)
    k = tl.load(kv8_ptr + (page_bytes + off * D)[:, None] + ds[None, :], mask=used[:, None], other=0.0)
    sf = tl.load(kv32_ptr + (page_bytes + BLK * D) // 4 + off, mask=used, other=0.0)
    for j in tl.static_range(NEXT_N):
        row = (seq * NEXT_N + j).to(tl.int64)
        if LENS_2D:
            end = tl.load(lens_ptr + row)
        else:
            end = tl.load(lens_ptr + seq) - NEXT_N + j + 1
        logits = _row_logits(q_ptr + row * H * D, w_ptr + row * stride_w, k, sf, H, HP, D, UPCAST)
        tl.store(out_ptr + row * stride_o + pos, tl.where(pos < end, logits, float("-inf")), mask=pos < MAX_LEN)


def mqa_logits_launch_args(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, upcast=UPCAST_DOTS):
    """(kernel, grid, runtime args by name, constexprs, options) of the prefill launch, or
    None when there is nothing to write."""
    m, h, d = q.shape
    n = k.shape[0]
    if m == 0 or n == 0:
        return None
    bn, warps = BLOCK_N, NUM_WARPS
    vals = (q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, n, h, weights.stride(0), out.stride(0))
    args = dict(zip(_mqa_logits_kernel.arg_names, vals))
    cx = dict(HP=padded_heads(h), D=d, BLOCK_N=bn, UPCAST=bool(upcast))
    return _mqa_logits_kernel, (m, triton.cdiv(n, bn)), args, cx, dict(num_warps=warps, num_stages=_STAGES)


def paged_mqa_logits_launch_args(q, kv_cache, weights, context_lens, block_table, out, max_context_len,
                                 upcast=UPCAST_DOTS):
    """As mqa_logits_launch_args, for the decode launch."""
    b, next_n, h, d = q.shape
    if b == 0 or max_context_len == 0:
        return None
    bn, warps = BLOCK_N, NUM_WARPS
    raw = kv_cache.view(torch.uint8)
    vals = (q, raw.view(torch.float8_e4m3fn), raw.view(torch.float32), weights, context_lens, block_table, out,
            h, max_context_len, block_table.stride(0), weights.stride(0), out.stride(0))
    args = dict(zip(_paged_mqa_logits_kernel.arg_names, vals))
    cx = dict(NEXT_N=next_n, LENS_2D=context_lens.dim() == 2, BLK=kv_cache.shape[1], HP=padded_heads(h), D=d,
              BLOCK_N=bn, UPCAST=bool(upcast))
    grid = (b, triton.cdiv(max_context_len, bn))
    return _paged_mqa_logits_kernel, grid, args, cx, dict(num_warps=warps, num_stages=_STAGES)


def fp8_mqa_logits(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out):
    """q e4m3 [M, H, D], k e4m3 [N, D], k_scales f32 [N], weights f32 [M, H], cu_seqlen_ks /
    cu_seqlen_ke int32 [M] (validated: 0 <= ks <= ke <= N) -> out f32 [M, N] (written whole)."""
    run_launch(mqa_logits_launch_args(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out))
    return out


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int):
    """q e4m3 [b, next_n, H, D]; kv_cache uint8 [num_blocks, block_kv, 1, D + 4] (contiguous);
    weights f32 [b * next_n, H]; context_lens int32 [b] or [b, next_n]; block_table int32
    [b, max_blocks] (validated: lengths within max_context_len and the table, pages in use
    inside the cache) -> out f32 [b * next_n, max_context_len] (written whole)."""
    run_launch(paged_mqa_logits_launch_args(q, kv_cache, weights, context_lens, block_table, out,
                                            max_context_len))
    return out


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# (b, next_n, H, D, block_kv, max_context_len): DeepGEMM's decode indexer configurations
# (V3.2: 64 heads of 128, pages of 64; next_n 1 and 2), and a [b, next_n] context_lens form.
PAGED_SPEC_PROBLEMS = ((64, 1, 64, 128, 64, 8192, False), (64, 2, 64, 128, 64, 8192, False),
                       (16, 2, 32, 128, 64, 4096, True))
# (M, N, H, D): prefill chunks of V3.2's indexer
SPEC_PROBLEMS = ((4096, 8192, 64, 128), (1024, 4096, 32, 64))


def sm90_compile_specs():
    """sm90.LaunchSpecs of the GPU launches of the shapes above (meta tensors, contiguous as
    pykernels.dsa passes them)."""
    fp8, f32, i32 = torch.float8_e4m3fn, torch.float32, torch.int32
    gpu = dict(upcast=False)
    specs = []
    for m, n, h, d in SPEC_PROBLEMS:
        launch = mqa_logits_launch_args(_meta(m, h, d, dtype=fp8), _meta(n, d, dtype=fp8), _meta(n, dtype=f32),
                                        _meta(m, h, dtype=f32), _meta(m, dtype=i32), _meta(m, dtype=i32),
                                        _meta(m, n, dtype=f32), **gpu)
        specs.append(spec_of(f"fp8_mqa_logits M={m} N={n} H={h} D={d}", launch))
    for b, next_n, h, d, blk, length, lens_2d in PAGED_SPEC_PROBLEMS:
        pages = triton.cdiv(length, blk)
        lens = _meta(b, next_n, dtype=i32) if lens_2d else _meta(b, dtype=i32)
        launch = paged_mqa_logits_launch_args(
            _meta(b, next_n, h, d, dtype=fp8), _meta(b * pages, blk, 1, d + RD.INDEXER_SCALE_BYTES, dtype=torch.uint8),
            _meta(b * next_n, h, dtype=f32), lens, _meta(b, pages, dtype=i32), _meta(b * next_n, length, dtype=f32),
            length, **gpu)
        specs.append(spec_of(f"fp8_paged_mqa_logits b={b} next_n={next_n} H={h} D={d} block_kv={blk} "
                             f"len={length}{' lens[b,next_n]' if lens_2d else ''}", launch))
    return specs


__all__ = ["fp8_mqa_logits", "fp8_paged_mqa_logits", "sm90_compile_specs"]
