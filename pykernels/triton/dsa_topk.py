"""Triton top-k selection over the indexer logits (docs/dsa.md "Top-k"): both forms,
prefill (windows [ks, ke)) and paged decode (windows [0, end), positions mapped to cache
rows block_table[i, p // 64] * 64 + p % 64).

One program per logits row, in three steps over the row's window [lo, hi), n = min(topk,
hi - lo) entries taken:
1. Threshold: each logit gets an order-preserving integer key in [0, 2^32) (NaN ranks as
   -inf, -0.0 as +0.0: the reference's float sort treats them so). A bitwise binary search,
   most significant bit first, finds T, the largest key with at least n keys >= T: the
   n-th largest key. One pass over the window per bit.
2. Compaction: in position order, every key > T is taken, and keys == T while fewer than
   n - count(key > T) of them were taken: ties go to the lower position first. Positions are
   written compacted (in position order) into the row's out slots.
3. Order: the n taken positions are read back, each as the 63-bit composite
   (key << 31) | (2^31 - 1 - position), sorted descending (tl.sort, BLOCK_K = next power
   of two >= topk entries), decoded, mapped (paged form) and written, -1 in slots n..topk.
The result is exactly the reference's (largest first, ties by lower position), so the
tests compare bit for bit. Positions outside the window are never read.
"""
import torch
import triton
import triton.language as tl

from ..reference import dsa as RD
from ..reference import mla as RM
from . import INTERPRETED
from .jit_dispatch import jit
from .sm90 import run_launch, spec_of

MAX_TOPK = 8192            # the sort holds next_pow2(topk) int64 keys in one program
_WARPS = 4               # ptxas (sm_90a): 8 warps keep an 8-byte stack frame in the paged form, 4 none
_STAGES = 2


def check_limits(topk: int) -> None:
    """ValueError when topk is beyond what this kernel handles."""
    if topk > MAX_TOPK:
        raise ValueError(f"topk: the Triton top-k sorts in one program, expected at most {MAX_TOPK}, got {topk}")


def block_n(width: int, interpreted: bool = INTERPRETED) -> int:
    """Logits per step of the passes over a row: 1024 compiled; interpreted, the row's width
    rounded up to a power of two (fewest numpy steps), 16 to 1024."""
    if interpreted:
        return max(16, min(1024, triton.next_power_of_2(max(width, 1))))
    return 1024


@jit
def _order_key(x):
    """float32 -> int64 in [0, 2^32), ordered as the floats (NaN as -inf, -0.0 as +0.0)."""
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)      # negatives: magnitude bits flipped
    return signed.to(tl.int64) + 2147483647 + 1


@jit
def _count_ge(row, lo, hi, cand, BLOCK_N: tl.constexpr):
    """Number of keys >= cand in the window [lo, hi) of the row (counted per lane, one
    reduction at the end: no block-wide reduction per step)."""
    cnt = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        key = _order_key(tl.load(row + pos, mask=ok, other=0.0))
        cnt += (ok & (key >= cand)).to(tl.int32)
    return tl.sum(cnt, axis=0)


@jit
def _topk_kernel(logits_ptr, lo_ptr, hi_ptr, table_ptr, out_ptr, stride_l, stride_bt, stride_os, stride_or, TOPK,
                 NEXT_N,
                 LO: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    row = logits_ptr + r.to(tl.int64) * stride_l
    seq = r // NEXT_N                       # out row r is [seq, r % NEXT_N] (prefill: NEXT_N 1)
    out_row = out_ptr + seq.to(tl.int64) * stride_os + (r % NEXT_N) * stride_or
    hi = tl.load(hi_ptr + r)
    lo = tl.zeros((), dtype=tl.int32)
    if LO:
        lo = tl.load(lo_ptr + r)
    n = tl.minimum(hi - lo, TOPK)
    # 1. the n-th largest key (n = 0 leaves T at the top: nothing is taken below)
    thr = tl.zeros((), dtype=tl.int64)
    for i in range(32):
        cand = thr | (tl.full((), 1, dtype=tl.int64) << (31 - i))
        thr = tl.where(_count_ge(row, lo, hi, cand, BLOCK_N) >= n, cand, thr)
    ties = n - _count_ge(row, lo, hi, thr + 1, BLOCK_N)
    # 2. the taken positions, compacted in position order into the out slots
    taken = tl.zeros((), dtype=tl.int32)
    tied = tl.zeros((), dtype=tl.int32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        key = _order_key(tl.load(row + pos, mask=ok, other=0.0))
        eq = (ok & (key == thr)).to(tl.int32)
        take = (ok & (key > thr)) | ((eq != 0) & (tied + tl.cumsum(eq, axis=0) - eq < ties))
        take32 = take.to(tl.int32)
        tl.store(out_row + taken + tl.cumsum(take32, axis=0) - take32, pos, mask=take)
        taken += tl.sum(take32, axis=0)
        tied += tl.sum(eq, axis=0)
    tl.debug_barrier()          # the compacted slots, written by other threads, are read next
    # 3. largest first, ties by position: sort the composite keys
    slot = tl.arange(0, BLOCK_K)
    got = slot < n
    pos = tl.load(out_row + slot, mask=got, other=0)
    key = _order_key(tl.load(row + pos, mask=got, other=0.0))
    comp = tl.where(got, (key << 31) | (2147483647 - pos.to(tl.int64)), -1)
    comp = tl.sort(comp, descending=True)
    pos = (2147483647 - (comp & 2147483647)).to(tl.int32)
    if PAGED:
        page = tl.load(table_ptr + seq.to(tl.int64) * stride_bt + pos // PAGE, mask=got, other=0)
        pos = page * PAGE + pos % PAGE
    # (every thread's read of its slots precedes the sort, which all threads' values feed)
    tl.store(out_row + slot, tl.where(got, pos, -1), mask=slot < TOPK)


def topk_launch_args(logits, lo, hi, topk, out, block_table=None, next_n=1, interpreted=INTERPRETED):
    """(kernel, grid, runtime args by name, constexprs, options), or None for no rows. lo / hi
    int32 [rows]: each row's window (lo None: 0); block_table given: the paged form, out
    rows r = (r // next_n, r % next_n) of [b, next_n, topk] (any strides but the last)."""
    rows, width = logits.shape
    if rows == 0:
        return None
    paged = block_table is not None
    stride_os, stride_or = (out.stride(0), out.stride(1)) if out.dim() == 3 else (out.stride(0), 0)
    vals = (logits, hi if lo is None else lo, hi, block_table if paged else hi, out, logits.stride(0),
            block_table.stride(0) if paged else 0, stride_os, stride_or, topk, next_n)
    args = dict(zip(_topk_kernel.arg_names, vals))
    cx = dict(LO=lo is not None, PAGED=paged, PAGE=RM.PAGE_BLOCK_SIZE, BLOCK_N=block_n(width, interpreted),
              BLOCK_K=triton.next_power_of_2(topk))
    return _topk_kernel, (rows,), args, cx, dict(num_warps=_WARPS, num_stages=_STAGES)


def topk_indices(logits, cu_seqlen_ks, cu_seqlen_ke, topk: int, out):
    """logits float32 [M, N] (unit last stride); windows int32 [M] (validated: 0 <= ks <= ke
    <= N) -> out int32 [M, topk] (unit last stride): key positions, largest logit first,
    -1 past the window's length."""
    run_launch(topk_launch_args(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out))
    return out


def paged_topk_indices(logits, context_lens, block_table, topk: int, out):
    """logits float32 [b * next_n, L]; context_lens int32 [b] or [b, next_n]; block_table
    int32 [b, max_blocks] (validated: windows within L and the table's pages) -> out int32
    [b, next_n, topk] (unit last stride): cache rows block_table[i, p // 64] * 64 + p % 64 of the
    taken positions p, -1 in unused slots."""
    b = block_table.shape[0]
    next_n = logits.shape[0] // b
    ends = RD.paged_row_windows(context_lens, next_n).int()       # computed on the device: no sync
    run_launch(topk_launch_args(logits, None, ends, topk, out, block_table, next_n))
    return out


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# (rows, logits width, topk, paged?): V3.2's decode (b 64, next_n 1 over 8192 positions,
# topk 2048, block table of 128 pages) and a prefill chunk (2048 queries over 8192 keys).
SPEC_PROBLEMS = ((64, 8192, 2048, True), (2048, 8192, 2048, False))


def sm90_compile_specs(problems=SPEC_PROBLEMS):
    """sm90.LaunchSpecs of the GPU launches above (meta tensors shaped as pykernels.dsa passes them)."""
    specs = []
    for rows, width, topk, paged in problems:
        logits = _meta(rows, width, dtype=torch.float32)
        ends = _meta(rows, dtype=torch.int32)
        if paged:
            table = _meta(rows, triton.cdiv(width, RM.PAGE_BLOCK_SIZE), dtype=torch.int32)
            launch = topk_launch_args(logits, None, ends, topk, _meta(rows, 1, topk, dtype=torch.int32), table, 1,
                                      interpreted=False)
        else:
            launch = topk_launch_args(logits, ends, ends, topk, _meta(rows, topk, dtype=torch.int32),
                                      interpreted=False)
        specs.append(spec_of(f"{'paged_' if paged else ''}topk_indices rows={rows} N={width} topk={topk}", launch))
    return specs


__all__ = ["MAX_TOPK", "check_limits", "paged_topk_indices", "topk_indices", "topk_launch_args",
           "sm90_compile_specs"]
