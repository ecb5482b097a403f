"""Triton get_paged_mqa_logits_metadata: the paged indexer logits' split schedule on the
device (pykernels/reference/dsa.py paged_mqa_logits_schedule is the definition; docs/dsa.md).

Sequence i has ceil(len_i / (SPLIT_BLOCKS * block_kv)) splits (len_i: context_lens[i], or
the largest of its next_n rows'); partition p starts at split p * (total // P) + min(p,
total % P), written as [first sequence, first split inside it]; row P is [b, 0].

Grid: one program per BLOCK_P partitions. Each program walks the sequences in blocks of
BLOCK_B twice: once for the total, then with a running prefix sum: for its partitions it
counts the sequences whose inclusive prefix is <= the start (the first sequence past it is
that count: prefixes never decrease) and keeps the largest such prefix (the splits before that
sequence). No host read of context_lens.
"""
import torch
import triton
import triton.language as tl

from ..reference import dsa as RD
from .jit_dispatch import jit
from .sm90 import run_launch

BLOCK_P = 64
BLOCK_B = 64


@jit
def _splits(lens_ptr, first, B, split, NEXT_N: tl.constexpr, LENS_2D: tl.constexpr, BLOCK_B: tl.constexpr):
    """Splits of sequences [first, first + BLOCK_B) (0 past B), and the validity mask."""
    i = first + tl.arange(0, BLOCK_B)
    ok = i < B
    if LENS_2D:
        n = tl.zeros((BLOCK_B,), dtype=tl.int32)
        for j in tl.static_range(NEXT_N):
            n = tl.maximum(n, tl.load(lens_ptr + i * NEXT_N + j, mask=ok, other=0))
    else:
        n = tl.load(lens_ptr + i, mask=ok, other=0)
    n = tl.maximum(n, 0)
    return (n + split - 1) // split, ok


@jit
def _schedule_kernel(lens_ptr, out_ptr, B, P, split, NEXT_N: tl.constexpr, LENS_2D: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    total = 0
    for first in range(0, B, BLOCK_B):
        segs, _ = _splits(lens_ptr, first, B, split, NEXT_N, LENS_2D, BLOCK_B)
        total += tl.sum(segs)
    per = total // P
    extra = total % P
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    start = ps * per + tl.minimum(ps, extra)
    count = tl.zeros((BLOCK_P,), dtype=tl.int32)
    before = tl.zeros((BLOCK_P,), dtype=tl.int32)
    carry = 0
    for first in range(0, B, BLOCK_B):
        segs, ok = _splits(lens_ptr, first, B, split, NEXT_N, LENS_2D, BLOCK_B)
        prefix = tl.cumsum(segs, 0) + carry
        passed = (prefix[None, :] <= start[:, None]) & ok[None, :]
        count += tl.sum(passed.to(tl.int32), axis=1)
        before = tl.maximum(before, tl.max(tl.where(passed, prefix[None, :], 0), axis=1))
        carry += tl.sum(segs)
    done = (count >= B) | (ps >= P)
    seq = tl.where(done, B, count)
    inside = tl.where(done, 0, start - before)
    keep = ps <= P
    tl.store(out_ptr + 2 * ps, seq, mask=keep)
    tl.store(out_ptr + 2 * ps + 1, inside, mask=keep)


def paged_logits_schedule(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """context_lens int32 [b] or [b, next_n] (contiguous), block_kv, num_sms -> int32
    [num_sms + 1, 2] on context_lens' device."""
    meta = torch.empty((num_sms + 1, RD.METADATA_WIDTH), dtype=torch.int32, device=context_lens.device)
    b = context_lens.shape[0]
    next_n = context_lens.shape[1] if context_lens.dim() == 2 else 1
    args = dict(zip(_schedule_kernel.arg_names,
                    (context_lens, meta, b, num_sms, RD.SPLIT_BLOCKS * block_kv)))
    cx = dict(NEXT_N=next_n, LENS_2D=context_lens.dim() == 2, BLOCK_P=BLOCK_P, BLOCK_B=BLOCK_B)
    run_launch((_schedule_kernel, (triton.cdiv(num_sms + 1, BLOCK_P),), args, cx, dict(num_warps=4)))
    return meta
