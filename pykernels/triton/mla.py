"""Triton MLA decode (split-KV, FlashMLA's interface) and its scheduler.

Three kernels:
- `_schedule_kernel`: one program computing get_mla_metadata on the device (the same
  rule as pykernels.reference.mla.schedule, so no host-device synchronisation).
- `_mla_decode_kernel`: grid (num_sm_parts, row tiles, h_kv). Program (p, t, j) walks SM
  partition p's pieces from tile_scheduler_metadata (consecutive sequences; the first
  may start and the last may end inside a sequence) for query rows
  [t*BLOCK_M, (t+1)*BLOCK_M) of the s_q*h_q/h_kv rows that share KV head j (row r: new
  token r // (h_q/h_kv), query head j * h_q/h_kv + r % (h_q/h_kv); every KV head uses the
  same schedule). Per key
  tile (BLOCK_N tokens of one page): S = q_nope.k_nope^T + q_pe.k_pe^T, online softmax
  (base 2), acc += P.V with V = k_nope. A sequence with one split is finished in place (out, lse); a piece
  of a split sequence writes its normalised partial output and LSE to a float32
  scratch buffer at row num_splits[seq] + piece index.
- `_mla_combine_kernel`: grid (b, row tiles, h_kv); merges the splits of each sequence that
  has more than one (weights exp(lse_j - lse)); others return at once.

The 512 latent columns are processed as 4 groups of 128 with one accumulator each.
FP8 cache (layout in pykernels.reference.mla): the kernel reads three views of one
buffer: e4m3 latent bytes, the float32 scales and the bf16 RoPE columns. e4m3 -> bf16
is exact, so the latent groups enter the dots unscaled and each token's group scale is
applied in float32: to S's columns after q.k (S += dot(q_g, k8_g^T) * sf_g) and to P's
columns before P.V (acc_g += dot(bf16(P * sf_g), k8_g)). No dequantized key is ever
rounded, so the FP8 path is as accurate as the bf16 path against the float32
dequantizing reference.

Under Triton's interpreter bf16 `tl.dot` gives wrong results (DESIGN.md), so with
UPCAST_DOTS (on exactly when interpreted) every dot operand is converted to float32
after the same bf16 rounding the GPU path applies (P, or P * scale for the FP8 cache,
is rounded to bf16 with software RNE), so the interpreter models the GPU's numerics.
"""
import torch
import triton
import triton.language as tl

from .. import mla_schedule as MS
from ..reference import mla as RM
from ..runtime import device_errors
from . import INTERPRETED
from .error_record import record_error
from .rounding import to_bf16_rne
from .sm90 import run_launch, spec_of
from .jit_dispatch import jit

UPCAST_DOTS = INTERPRETED          # bf16 dots are wrong when interpreted: use f32 there
SOFTWARE_ROUNDING = INTERPRETED    # interpreter casts f32 -> bf16 toward zero
LOG2E = 1.4426950408889634
_DEFAULT_STAGES = 3                # Triton's default num_stages (CUDA), given explicitly to the specs


def tile_config(q_rows: int, interpreted: bool = INTERPRETED):
    """(BLOCK_M query rows, BLOCK_N keys, num_warps) per decode program.

    Interpreted: 64 x 64 (fewest, largest numpy steps). Compiled: 32 x 32 with 8 warps
    (16 x 32 with 4 warps when there are at most 16 rows). Not timed on a GPU yet.
    ptxas (sm_90a, Triton 3.8, specialized as launched for FlashMLA's configurations,
    see sm90_compile_specs) reports no spills for either: 32 x 32 x 8 warps uses 169-171
    registers (bf16 cache) / 241-248 (FP8 cache), 16 x 32 x 4 warps 168 / 255;
    tests/test_mla.py asserts zero spills. 64-row tiles (wgmma) spill for every BLOCK_N
    and warp count tried, with or without splitting the 512 output columns over
    programs (docs/mla.md has the table).
    """
    rows = triton.next_power_of_2(max(q_rows, 1))
    if interpreted:
        return max(16, min(64, rows)), 64, 4
    if rows <= 16:
        return 16, 32, 4
    return 32, 32, 8


# ----------------------------------------------------------------------------- scheduler

@jit
def _blocks_of(L, PAGE: tl.constexpr):
    """KV blocks of L >= 0 tokens, without L + PAGE - 1 overflowing int32 at L = 2^31 - 1."""
    return L // PAGE + (L % PAGE > 0).to(L.dtype)


@jit
def _schedule_kernel(seqlens_ptr, meta_ptr, nsplits_ptr, B, P,
                     FIXED: tl.constexpr, PAGE: tl.constexpr, BLOCK_B: tl.constexpr):
    # Costs in int64: b sequences of up to 2^25 blocks each overflow int32 in the total.
    total = tl.zeros((), dtype=tl.int64)
    for start in range(0, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        ok = offs < B
        L = tl.maximum(tl.load(seqlens_ptr + offs, mask=ok, other=0), 0)
        total += tl.sum(tl.where(ok, _blocks_of(L, PAGE).to(tl.int64) + FIXED, 0), axis=0)
    cap = tl.where(B > 0, (total + P - 1) // P + FIXED, 0)
    cur_b = tl.zeros((), dtype=tl.int32)
    cur_blk = tl.zeros((), dtype=tl.int32)
    split = tl.zeros((), dtype=tl.int32)
    for p in range(P):
        left = cap
        first_b = cur_b
        first_blk = cur_blk
        first_split = split
        last_b = cur_b
        last_end = cur_blk
        pieces = tl.zeros((), dtype=tl.int32)
        go = (cur_b < B) & (left > 0)
        while go:
            nblk = _blocks_of(tl.maximum(tl.load(seqlens_ptr + cur_b), 0), PAGE)
            rest = nblk - cur_blk
            take_all = left >= rest + FIXED
            can_split = left > FIXED
            take = tl.where(take_all, rest, (left - FIXED).to(tl.int32))   # < rest when splitting
            takes = take_all | can_split
            if takes:
                if cur_blk == 0:
                    tl.store(nsplits_ptr + cur_b, split)
                split += 1
                pieces += 1
                last_b = cur_b
                last_end = cur_blk + take
                left -= take + FIXED
                cur_blk += take
                done = cur_blk == nblk
                cur_b = tl.where(done, cur_b + 1, cur_b)
                cur_blk = tl.where(done, 0, cur_blk)
            go = takes & (cur_b < B) & (left > 0)
        # the tokens of the first and last sequence this row was made for (the decode
        # kernels compare them with the seqlens they are called with)
        busy = pieces > 0
        first_len = tl.load(seqlens_ptr + first_b, mask=busy, other=0)
        last_len = tl.load(seqlens_ptr + last_b, mask=busy, other=0)
        row = meta_ptr + p * 8
        tl.store(row + 0, first_b)
        tl.store(row + 1, first_blk)
        tl.store(row + 2, last_b)
        tl.store(row + 3, last_end)
        tl.store(row + 4, first_split)
        tl.store(row + 5, pieces)
        tl.store(row + 6, first_len)
        tl.store(row + 7, last_len)
    tl.store(nsplits_ptr + B, split)


def schedule_launch_args(cache_seqlens, meta, num_splits):
    """(kernel, grid, runtime args by name, constexprs, options) of the scheduler launch
    writing meta [num_sm_parts, 8] and num_splits [b + 1]. get_mla_metadata and
    sm90_compile_specs both use it."""
    args = dict(zip(_schedule_kernel.arg_names, (cache_seqlens, meta, num_splits, cache_seqlens.shape[0],
                                                 meta.shape[0])))
    cx = dict(FIXED=RM.FIXED_SPLIT_COST, PAGE=RM.PAGE_BLOCK_SIZE, BLOCK_B=128)
    return _schedule_kernel, (1,), args, cx, dict(num_warps=1, num_stages=_DEFAULT_STAGES)


def get_mla_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int):
    """Device-side schedule: (metadata int32 [num_sm_parts, 8], num_splits int32 [b+1]) for
    cache_seqlens int32 [b]. num_sm_parts < 1 raises ValueError; so do negative seqlens of
    CPU tensors (a free host read). On a GPU a negative length is scheduled as 0 tokens
    and recorded as it is (first_seqlen / last_seqlen), which the decode kernels then
    report (SeqlenOutOfRange)."""
    if cache_seqlens.device.type == "cpu":
        RM.check_schedule_inputs(cache_seqlens.tolist(), num_sm_parts)
    else:
        RM.check_schedule_inputs((), num_sm_parts)
    b = cache_seqlens.shape[0]
    meta = torch.empty(num_sm_parts, RM.METADATA_SIZE, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    run_launch(schedule_launch_args(cache_seqlens, meta, num_splits))
    return meta, num_splits


# ----------------------------------------------------------------------------- decode

@jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@jit
def _load_q(q_row, row_ok, col0, WIDTH: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, WIDTH] query columns [col0, col0 + WIDTH) of the rows at q_row."""
    cols = col0 + tl.arange(0, WIDTH)
    x = tl.load(q_row[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@jit
def _load_k_group(kv_ptr, kv_sf_ptr, kv_row, tok_ok, g, FP8: tl.constexpr, UPCAST: tl.constexpr,
                  ROW: tl.constexpr, SF_ROW: tl.constexpr, SF_OFF: tl.constexpr, GROUP: tl.constexpr):
    """Latent columns [g*GROUP, (g+1)*GROUP) of a page's tokens, as a dot operand, and
    the tokens' scale for that group (FP8; 1 otherwise). e4m3 -> bf16 is exact, so the
    scale is applied to S columns / P columns in float32, never rounded into K."""
    cols = g * GROUP + tl.arange(0, GROUP)
    k = tl.load(kv_ptr + kv_row[:, None] * ROW + cols[None, :], mask=tok_ok[:, None], other=0.0)
    if FP8:
        sf = tl.load(kv_sf_ptr + kv_row * SF_ROW + SF_OFF + g, mask=tok_ok, other=0.0)
        # The select is a no-op (masked tokens already load as 0) but it keeps the
        # compiler from sinking the e4m3 -> bf16 conversion into both dots' operand
        # layouts (two bf16 copies of the tile live in registers: spills, and loads that
        # are not pipelined): the tile is converted once and staged in shared memory.
        if UPCAST:   # interpreted: it reads the e4m3 NaN bytes 0x7F / 0xFF as +-480 (Triton 3.8)
            nan = (k.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
        k = tl.where(tok_ok[:, None], k.to(tl.bfloat16), 0.0)
        if UPCAST:
            k = k.to(tl.float32)           # exact: the interpreter runs the same conversion
            k = tl.where(nan, float("nan"), k)
    else:
        sf = tl.where(tok_ok, 1.0, 0.0)
        if UPCAST:
            k = k.to(tl.float32)
    return k, sf


@jit
def _qk(q_g, k_g, sf, FP8: tl.constexpr, UPCAST: tl.constexpr):
    s = _dot(q_g, tl.trans(k_g), UPCAST)
    if FP8:
        s = s * sf[None, :]
    return s


@jit
def _pv(acc, alpha, p, p_bf16, k_g, sf, FP8: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr):
    if FP8:
        pg = to_bf16_rne(p * sf[None, :], SOFT)   # the token's scale folded into P
    else:
        pg = p_bf16
    if UPCAST:
        pg = pg.to(tl.float32)
    return acc * alpha[:, None] + _dot(pg, k_g, UPCAST)


@jit
def _store_rows(base, rows_off, row_ok, col0, x, WIDTH: tl.constexpr):
    cols = col0 + tl.arange(0, WIDTH)
    tl.store(base + rows_off[:, None] + cols[None, :], x, mask=row_ok[:, None])


# ----------------------------------------------------------------------------- input checks
# The decode kernel checks its partition's metadata row, the seqlens, num_splits and the
# page ids it will read (docs/mla.md "Checks"; the same rules as
# pykernels.mla_schedule.check_schedule). A program that finds bad input records the first
# error (pykernels.runtime.device_errors; codes as in csrc/include/pk/error_record.cuh) and
# does none of its work, so it never reads or writes out of bounds.
ERR_BLOCK_TABLE = device_errors.code("BlockTableOutOfRange")
ERR_SEQLEN = device_errors.code("SeqlenOutOfRange")
ERR_STALE = device_errors.code("MetadataStale")
ERR_META_RANGE = device_errors.code("MetadataOutOfRange")
ERR_NUM_SPLITS = device_errors.code("NumSplitsMismatch")
ERR_META_MISMATCH = device_errors.code("MetadataMismatch")
OP_NAME = "flash_mla_with_kvcache"
_PAGE_CHECK = 64                   # page ids checked per step


@jit
def _fail(c, a0, a1, a2, bad, code: tl.constexpr, x0, x1, x2):
    """The first failed check: (code, x0, x1, x2) when bad and no error is held yet."""
    take = bad & (c == 0)
    return tl.where(take, code, c), tl.where(take, x0, a0), tl.where(take, x1, a1), tl.where(take, x2, a2)


@jit
def _bad_len(L, max_len):
    return (L < 0) | (L.to(tl.int64) > max_len)


@jit(noinline=True)       # its own register allocation: FP8 decode 240 instead of 254 registers
def _check_partition(fb, fblk, lb, lend, fs, n, made_first, made_last, part, meta_ptr, seqlens_ptr, nsplits_ptr,
                     bt_ptr, stride_bt, P, B, NUM_BLOCKS, MAX_BLOCKS,
                     PAGE: tl.constexpr, CHK: tl.constexpr, E_TABLE: tl.constexpr, E_LEN: tl.constexpr,
                     E_STALE: tl.constexpr, E_RANGE: tl.constexpr, E_SPLITS: tl.constexpr, E_MISMATCH: tl.constexpr):
    """(code, a0, a1, a2) of the first failed check of partition `part` (row fb .. made_last
    of the metadata), code 0 when its work may run."""
    c = tl.zeros((), dtype=tl.int32)
    a0 = tl.zeros((), dtype=tl.int32)
    a1 = tl.zeros((), dtype=tl.int32)
    a2 = tl.zeros((), dtype=tl.int32)
    e = part * 8                                     # the row's first entry in the flat table
    max_len64 = (tl.zeros((), dtype=tl.int64) + MAX_BLOCKS) * PAGE    # (MAX_BLOCKS may be a constexpr 1)
    max_len = tl.minimum(max_len64, 2147483647).to(tl.int32)
    max_splits = B + P
    busy = n != 0
    # the row's own entries: batch indices first (they index seqlens below)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, (n < 0) | (n > B), E_RANGE, n, B + 1, e + 5)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, busy & ((fb < 0) | (fb >= B)), E_RANGE, fb, B, e + 0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, busy & (n > B - fb), E_RANGE, n, B - fb + 1, e + 5)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, busy & (lb != fb + n - 1), E_MISMATCH, lb, fb + n - 1, e + 2)
    row_ok = busy & (c == 0)
    L_first = tl.load(seqlens_ptr + fb, mask=row_ok, other=0)
    L_last = tl.load(seqlens_ptr + lb, mask=row_ok, other=0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & _bad_len(L_first, max_len64), E_LEN, L_first, max_len, fb)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & _bad_len(L_last, max_len64), E_LEN, L_last, max_len, lb)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & (made_first != L_first), E_STALE, L_first, made_first, fb)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & (made_last != L_last), E_STALE, L_last, made_last, lb)
    nb_first = _blocks_of(tl.maximum(L_first, 0), PAGE)
    nb_last = _blocks_of(tl.maximum(L_last, 0), PAGE)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & ((lend < 0) | (lend > nb_last)), E_RANGE, lend, nb_last + 1, e + 3)
    first_hi = tl.where(n > 1, tl.maximum(nb_first, 1), tl.minimum(tl.maximum(nb_first, 1), lend + 1))
    c, a0, a1, a2 = _fail(c, a0, a1, a2, row_ok & ((fblk < 0) | (fblk >= first_hi)), E_RANGE, fblk, first_hi, e + 1)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, busy & ((fs < 0) | (fs > max_splits - n)), E_RANGE, fs,
                          max_splits - n + 1, e + 4)
    # continuity: this row starts where the previous one ended (row 0: batch 0, block 0, split 0)
    has_prev = part > 0
    prev = meta_ptr + (part - 1) * 8
    p_fb = tl.load(prev + 0, mask=has_prev, other=0)
    p_fblk = tl.load(prev + 1, mask=has_prev, other=0)
    p_lb = tl.load(prev + 2, mask=has_prev, other=0)
    p_lend = tl.load(prev + 3, mask=has_prev, other=0)
    p_fs = tl.load(prev + 4, mask=has_prev, other=0)
    p_n = tl.load(prev + 5, mask=has_prev, other=0)
    p_made = tl.load(prev + 7, mask=has_prev, other=0)
    p_busy = has_prev & (p_n != 0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, p_busy & ((p_lb < 0) | (p_lb >= B)), E_RANGE, p_lb, B, e - 8 + 2)
    p_idx_ok = p_busy & (c == 0)
    p_L = tl.load(seqlens_ptr + p_lb, mask=p_idx_ok, other=0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, p_idx_ok & _bad_len(p_L, max_len64), E_LEN, p_L, max_len, p_lb)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, p_idx_ok & (p_made != p_L), E_STALE, p_L, p_made, p_lb)
    p_cont = p_lend < _blocks_of(tl.maximum(p_L, 0), PAGE)      # its last sequence goes on here
    want_b = tl.where(p_busy, tl.where(p_cont, p_lb, p_lb + 1), p_fb)
    want_blk = tl.where(p_busy, tl.where(p_cont, p_lend, 0), p_fblk)
    want_s = tl.where(p_busy, p_fs + p_n, p_fs)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, fb != want_b, E_MISMATCH, fb, want_b, e + 0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, fblk != want_blk, E_MISMATCH, fblk, want_blk, e + 1)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, fs != want_s, E_MISMATCH, fs, want_s, e + 4)
    # the last row ends after the last block of batch B - 1, with num_splits[B] splits
    is_last = part == P - 1
    c, a0, a1, a2 = _fail(c, a0, a1, a2, is_last & busy & (lb != B - 1), E_MISMATCH, lb, B - 1, e + 2)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, is_last & busy & (lend != nb_last), E_MISMATCH, lend, nb_last, e + 3)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, is_last & (n == 0) & (fb != B), E_MISMATCH, fb, B, e + 0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, is_last & (n == 0) & (fblk != 0), E_MISMATCH, fblk, 0, e + 1)
    ns_total = tl.load(nsplits_ptr + B, mask=is_last, other=0)
    c, a0, a1, a2 = _fail(c, a0, a1, a2, is_last & (ns_total != fs + n), E_SPLITS, ns_total, fs + n, B)
    # each piece: its sequence's length, num_splits at its ends, the page ids it reads
    for k in range(tl.where(c == 0, n, 0)):
        bi = fb + k
        L = tl.load(seqlens_ptr + bi)
        c, a0, a1, a2 = _fail(c, a0, a1, a2, _bad_len(L, max_len64), E_LEN, L, max_len, bi)
        nb = _blocks_of(tl.maximum(L, 0), PAGE)
        lo = tl.where(k == 0, fblk, 0)
        hi = tl.where(bi == lb, lend, nb)
        sid = fs + k
        ns_lo = tl.load(nsplits_ptr + bi)
        ns_hi = tl.load(nsplits_ptr + bi + 1)
        c, a0, a1, a2 = _fail(c, a0, a1, a2, (lo == 0) & (ns_lo != sid), E_SPLITS, ns_lo, sid, bi)
        c, a0, a1, a2 = _fail(c, a0, a1, a2, (hi == nb) & (ns_hi != sid + 1), E_SPLITS, ns_hi, sid + 1, bi + 1)
        hi_chk = tl.where(c == 0, hi, lo)            # page ids only within a checked range
        for start in range(lo, hi_chk, CHK):
            blk = start + tl.arange(0, CHK)
            in_use = blk < hi_chk
            page = tl.load(bt_ptr + bi * stride_bt + blk, mask=in_use, other=0)
            bad = in_use & ((page < 0) | (page >= NUM_BLOCKS))
            first = tl.min(tl.where(bad, blk, 2147483647), axis=0)
            bad_page = tl.sum(tl.where(blk == first, page, 0), axis=0)
            c, a0, a1, a2 = _fail(c, a0, a1, a2, first != 2147483647, E_TABLE, bad_page, NUM_BLOCKS, bi)
    return c, a0, a1, a2


@jit
def _mla_decode_kernel(q_ptr, kv_ptr, kv_sf_ptr, kv_rope_ptr, bt_ptr, seqlens_ptr, meta_ptr, nsplits_ptr,
                       out_ptr, lse_ptr, oacc_ptr, lacc_ptr, err_ptr,
                       stride_qb, stride_qs, stride_qh, stride_bt,
                       stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                       S_Q, HEADS_PER_KV, H_KV, QR, qk_scale, P, B, NUM_BLOCKS, MAX_BLOCKS,
                       CAUSAL: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       DV: tl.constexpr, DR: tl.constexpr,
                       ROW: tl.constexpr, SF_ROW: tl.constexpr, SF_OFF: tl.constexpr,
                       ROPE_ROW: tl.constexpr, ROPE_OFF: tl.constexpr, GROUP: tl.constexpr,
                       CHK: tl.constexpr, E_TABLE: tl.constexpr, E_LEN: tl.constexpr, E_STALE: tl.constexpr,
                       E_RANGE: tl.constexpr, E_SPLITS: tl.constexpr, E_MISMATCH: tl.constexpr):
    # The 512 latent columns are handled as 4 groups of 128 (the FP8 scale groups), each
    # with its own accumulator: o = [acc0 | acc1 | acc2 | acc3].
    tl.static_assert(DV == 4 * GROUP)
    tl.static_assert(PAGE % BLOCK_N == 0)
    SUB: tl.constexpr = PAGE // BLOCK_N        # key tiles per page
    part = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)   # of the QR = s_q * HEADS_PER_KV rows
    kvh = tl.program_id(2)                 # the KV head; its query heads: [kvh, kvh + 1) * HEADS_PER_KV
    row_ok = rows < QR
    tok = rows // HEADS_PER_KV
    head = kvh * HEADS_PER_KV + rows % HEADS_PER_KV
    srow = kvh * QR + rows                 # row of the split scratch [b + P, H_KV * QR, DV]
    kv_ptr += kvh * ROW                    # KV head kvh's column of the cache: token rows H_KV rows apart
    kv_sf_ptr += kvh * SF_ROW
    kv_rope_ptr += kvh * ROPE_ROW
    dr = tl.arange(0, DR)
    tn = tl.arange(0, BLOCK_N)
    meta = meta_ptr + part * 8
    first_b = tl.load(meta + 0)
    first_blk = tl.load(meta + 1)
    last_b = tl.load(meta + 2)
    last_end = tl.load(meta + 3)
    first_split = tl.load(meta + 4)
    pieces = tl.load(meta + 5)
    err, e0, e1, e2 = _check_partition(first_b, first_blk, last_b, last_end, first_split, pieces,
                                       tl.load(meta + 6), tl.load(meta + 7), part, meta_ptr, seqlens_ptr,
                                       nsplits_ptr, bt_ptr, stride_bt, P, B, NUM_BLOCKS, MAX_BLOCKS, PAGE, CHK,
                                       E_TABLE, E_LEN, E_STALE, E_RANGE, E_SPLITS, E_MISMATCH)
    if err != 0:
        record_error(err_ptr, err, e0, e1, e2)
    pieces = tl.where(err == 0, pieces, 0)               # bad input: none of the work
    # A barrier between the checks and the decode loop keeps the compiler from mixing the
    # two: without it ptxas reports 204 instead of 171 registers (bf16, 32 x 32 x 8, causal).
    tl.debug_barrier()
    for k in range(pieces):
        bi = first_b + k
        seqlen = tl.maximum(tl.load(seqlens_ptr + bi), 0)
        nblk = (seqlen + PAGE - 1) // PAGE
        blk_lo = tl.where(k == 0, first_blk, 0)
        blk_hi = tl.where(bi == last_b, last_end, nblk)
        q_row = q_ptr + bi * stride_qb + tok * stride_qs + head * stride_qh
        q0 = _load_q(q_row, row_ok, 0 * GROUP, GROUP, UPCAST)
        q1 = _load_q(q_row, row_ok, 1 * GROUP, GROUP, UPCAST)
        q2 = _load_q(q_row, row_ok, 2 * GROUP, GROUP, UPCAST)
        q3 = _load_q(q_row, row_ok, 3 * GROUP, GROUP, UPCAST)
        q_pe = _load_q(q_row, row_ok, DV, DR, UPCAST)
        if CAUSAL:
            limit = seqlen - S_Q + tok          # last visible key of each row
        else:
            limit = tl.zeros((BLOCK_M,), dtype=tl.int32) + (seqlen - 1)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc0 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
        j_hi = tl.minimum(blk_hi * SUB, (seqlen + BLOCK_N - 1) // BLOCK_N)
        for j in range(blk_lo * SUB, j_hi):             # key tiles of BLOCK_N tokens
            page = tl.load(bt_ptr + bi * stride_bt + j // SUB).to(tl.int64)
            pos = j * BLOCK_N + tn
            tok_ok = pos < seqlen
            kv_row = (page * PAGE + (j % SUB) * BLOCK_N + tn) * H_KV        # (token, KV head kvh) rows
            k0, sf0 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, tok_ok, 0, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
            k1, sf1 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, tok_ok, 1, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
            k2, sf2 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, tok_ok, 2, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
            k3, sf3 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, tok_ok, 3, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
            if FP8:
                k_pe = tl.load(kv_rope_ptr + kv_row[:, None] * ROPE_ROW + ROPE_OFF + dr[None, :],
                               mask=tok_ok[:, None], other=0.0)
            else:
                k_pe = tl.load(kv_ptr + kv_row[:, None] * ROW + DV + dr[None, :], mask=tok_ok[:, None], other=0.0)
            if UPCAST:
                k_pe = k_pe.to(tl.float32)
            s = _dot(q_pe, tl.trans(k_pe), UPCAST)
            s += _qk(q0, k0, sf0, FP8, UPCAST)
            s += _qk(q1, k1, sf1, FP8, UPCAST)
            s += _qk(q2, k2, sf2, FP8, UPCAST)
            s += _qk(q3, k3, sf3, FP8, UPCAST)
            s = s * qk_scale                   # base-2 logits
            visible = (pos[None, :] <= limit[:, None]) & tok_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing seen yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p_bf16 = to_bf16_rne(p, SOFT)      # P enters its dot in bf16, as on the GPU
            acc0 = _pv(acc0, alpha, p, p_bf16, k0, sf0, FP8, UPCAST, SOFT)
            acc1 = _pv(acc1, alpha, p, p_bf16, k1, sf1, FP8, UPCAST, SOFT)
            acc2 = _pv(acc2, alpha, p, p_bf16, k2, sf2, FP8, UPCAST, SOFT)
            acc3 = _pv(acc3, alpha, p, p_bf16, k3, sf3, FP8, UPCAST, SOFT)
            m_i = m_new
        seen = l_i > 0.0
        inv_l = 1.0 / tl.where(seen, l_i, 1.0)
        lse2 = m_i + tl.log2(tl.where(seen, l_i, 1.0))
        n_split = tl.load(nsplits_ptr + bi + 1) - tl.load(nsplits_ptr + bi)
        if n_split == 1:
            o_off = bi * stride_ob + tok * stride_os + head * stride_oh
            _store_rows(out_ptr, o_off, row_ok, 0 * GROUP, to_bf16_rne(acc0 * inv_l[:, None], SOFT), GROUP)
            _store_rows(out_ptr, o_off, row_ok, 1 * GROUP, to_bf16_rne(acc1 * inv_l[:, None], SOFT), GROUP)
            _store_rows(out_ptr, o_off, row_ok, 2 * GROUP, to_bf16_rne(acc2 * inv_l[:, None], SOFT), GROUP)
            _store_rows(out_ptr, o_off, row_ok, 3 * GROUP, to_bf16_rne(acc3 * inv_l[:, None], SOFT), GROUP)
            lse = tl.where(seen, lse2 * 0.6931471805599453, float("inf"))  # ln 2: base-2 -> natural
            tl.store(lse_ptr + bi * stride_lb + head * stride_lh + tok * stride_ls, lse, mask=row_ok)
        else:
            sid = (first_split + k).to(tl.int64)
            acc_off = (sid * (H_KV * QR) + srow) * DV
            _store_rows(oacc_ptr, acc_off, row_ok, 0 * GROUP, acc0 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 1 * GROUP, acc1 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 2 * GROUP, acc2 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 3 * GROUP, acc3 * inv_l[:, None], GROUP)
            tl.store(lacc_ptr + sid * (H_KV * QR) + srow, tl.where(seen, lse2, float("-inf")), mask=row_ok)


@jit
def _mla_combine_kernel(nsplits_ptr, oacc_ptr, lacc_ptr, out_ptr, lse_ptr,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                        HEADS_PER_KV, H_KV, QR, MAX_SPLITS, SOFT: tl.constexpr, BLOCK_R: tl.constexpr,
                        DV: tl.constexpr):
    bi = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)   # grid and rows as in the decode kernel
    kvh = tl.program_id(2)
    row_ok = rows < QR
    tok = rows // HEADS_PER_KV
    head = kvh * HEADS_PER_KV + rows % HEADS_PER_KV
    srow = kvh * QR + rows
    SR = H_KV * QR                         # scratch rows per split
    s0 = tl.load(nsplits_ptr + bi)
    n = tl.load(nsplits_ptr + bi + 1) - s0
    # Scratch rows outside [0, MAX_SPLITS) are never read. Such num_splits fail the decode
    # kernel's checks (every entry is compared with the metadata there): the error is
    # recorded already.
    if (n > 1) & (s0 >= 0) & (s0 <= MAX_SPLITS - n):
        dn = tl.arange(0, DV)
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        for j in range(n):
            lj = tl.load(lacc_ptr + (s0 + j).to(tl.int64) * SR + srow, mask=row_ok, other=float("-inf"))
            m = tl.maximum(m, lj)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_R, DV), dtype=tl.float32)
        for j in range(n):
            sid = (s0 + j).to(tl.int64)
            w = tl.exp2(tl.load(lacc_ptr + sid * SR + srow, mask=row_ok, other=float("-inf")) - m_use)
            oj = tl.load(oacc_ptr + (sid * SR + srow)[:, None] * DV + dn[None, :],
                         mask=row_ok[:, None] & (w > 0.0)[:, None], other=0.0)
            total += w
            acc += w[:, None] * oj
        seen = total > 0.0
        o = acc / tl.where(seen, total, 1.0)[:, None]
        lse = tl.where(seen, (m_use + tl.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453, float("inf"))
        o_ptr = out_ptr + bi * stride_ob + tok * stride_os + head * stride_oh
        tl.store(o_ptr[:, None] + dn[None, :], to_bf16_rne(o, SOFT), mask=row_ok[:, None])
        tl.store(lse_ptr + bi * stride_lb + head * stride_lh + tok * stride_ls, lse, mask=row_ok)


def _cache_views(k_cache):
    """(latent view, float32 scale view, bf16 RoPE view, FP8?) of the KV cache."""
    if RM.is_fp8_cache(k_cache):
        raw = k_cache.view(torch.uint8)
        return raw.view(torch.float8_e4m3fn), raw.view(torch.float32), raw.view(torch.bfloat16), True
    return k_cache, k_cache, k_cache, False


def decode_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
                       oacc, lacc, record, softmax_scale=None, causal=False, upcast=UPCAST_DOTS,
                       soft=SOFTWARE_ROUNDING, interpreted=INTERPRETED):
    """(kernel, grid, runtime args by name, constexprs, options) of the decode launch, or
    None when b = 0. record: the int32 [RECORD_WORDS] device error record the input
    checks write to. flash_mla_with_kvcache and sm90_compile_specs both use it, so the
    specs compile exactly what the GPU runs."""
    b, s_q, h_q, _ = q.shape
    if b == 0:
        return None
    h_kv = k_cache.shape[2]
    qr = s_q * (h_q // h_kv)               # query rows per KV head
    scale = RM.default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    kv, kv_sf, kv_rope, fp8 = _cache_views(k_cache)
    bm, bn, warps = tile_config(qr, interpreted=interpreted)
    grid = (tile_scheduler_metadata.shape[0], triton.cdiv(qr, bm), h_kv)
    vals = (q, kv, kv_sf, kv_rope, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
            out, lse, oacc, lacc, record,
            q.stride(0), q.stride(1), q.stride(2), block_table.stride(0),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            s_q, h_q // h_kv, h_kv, qr, scale * LOG2E, tile_scheduler_metadata.shape[0], b, k_cache.shape[0],
            block_table.shape[1])
    args = dict(zip(_mla_decode_kernel.arg_names, vals))
    cx = _decode_constexprs(fp8, causal, bm, bn, upcast, soft)
    return _mla_decode_kernel, grid, args, cx, dict(num_warps=warps, num_stages=2)


def combine_launch_args(num_splits, oacc, lacc, out, lse, h_kv=1, soft=SOFTWARE_ROUNDING, interpreted=INTERPRETED):
    """As decode_launch_args, for the combine launch (grid (b, row tiles, h_kv))."""
    b, s_q, h_q, _ = out.shape
    if b == 0:
        return None
    qr = s_q * (h_q // h_kv)
    br = combine_rows(qr, interpreted)
    vals = (num_splits, oacc, lacc, out, lse,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            h_q // h_kv, h_kv, qr, oacc.shape[0])
    args = dict(zip(_mla_combine_kernel.arg_names, vals))
    cx = dict(SOFT=bool(soft), BLOCK_R=br, DV=oacc.shape[-1])
    return (_mla_combine_kernel, (b, triton.cdiv(qr, br), h_kv), args, cx,
            dict(num_warps=4, num_stages=_DEFAULT_STAGES))


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                           out, lse, head_dim_v=RM.HEAD_DIM_V, softmax_scale=None, causal=False):
    """Split-KV MLA decode into out bf16 [b, s_q, h_q, 512] and lse f32 [b, h_q, s_q].

    Inputs as validated by pykernels.mla.flash_mla_with_kvcache (k_cache [num_blocks, 64,
    h_kv, 576 | 656] contiguous with h_kv dividing h_q, q with unit stride in its last
    dimension). The KV head is the grid's third dimension: programs of KV head j read its
    cache column and query heads [j, j + 1) * h_q / h_kv, and share the schedule. Values the kernel checks
    itself (docs/mla.md "Checks": the metadata against cache_seqlens, num_splits, page ids
    and seqlens against the cache and the block table) go to the device error record
    (pykernels.runtime.device_errors): raised here at once for CPU tensors (the
    interpreter), at the next check_errors() on a GPU (no host read here).
    """
    if tile_scheduler_metadata.shape[0] < 1:
        raise ValueError(f"tile_scheduler_metadata: expected at least one row, got shape "
                         f"{list(tile_scheduler_metadata.shape)}")
    b, s_q, h_q, _ = q.shape
    if b == 0:
        return out, lse
    record = device_errors.record_for(q.device, OP_NAME)
    # scratch rows: KV head j's s_q * h_q / h_kv rows at [j, j + 1) * s_q * h_q / h_kv
    oacc, lacc = MS.split_scratch(b, tile_scheduler_metadata.shape[0], s_q * h_q, head_dim_v, q.device)
    run_launch(decode_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                  out, lse, oacc, lacc, record, softmax_scale, causal))
    if q.device.type == "cpu":
        device_errors.raise_if_set(record, OP_NAME)
    run_launch(combine_launch_args(num_splits, oacc, lacc, out, lse, h_kv=k_cache.shape[2]))
    return out, lse


def combine_rows(q_rows: int, interpreted: bool = INTERPRETED) -> int:
    """Query rows per combine program."""
    return min(64, triton.next_power_of_2(q_rows)) if interpreted else 16


def _decode_constexprs(fp8, causal, bm, bn, upcast, soft):
    return dict(CAUSAL=bool(causal), FP8=bool(fp8), UPCAST=bool(upcast), SOFT=bool(soft),
                BLOCK_M=bm, BLOCK_N=bn, PAGE=RM.PAGE_BLOCK_SIZE, DV=RM.HEAD_DIM_V, DR=RM.ROPE_DIM,
                CHK=_PAGE_CHECK, E_TABLE=ERR_BLOCK_TABLE, E_LEN=ERR_SEQLEN, E_STALE=ERR_STALE,
                E_RANGE=ERR_META_RANGE, E_SPLITS=ERR_NUM_SPLITS, E_MISMATCH=ERR_META_MISMATCH,
                ROW=RM.FP8_BYTES_PER_TOKEN if fp8 else RM.HEAD_DIM_QK,
                SF_ROW=RM.FP8_BYTES_PER_TOKEN // 4, SF_OFF=RM.HEAD_DIM_V // 4,
                ROPE_ROW=RM.FP8_BYTES_PER_TOKEN // 2,
                ROPE_OFF=(RM.HEAD_DIM_V + 4 * RM.FP8_NUM_SCALES) // 2, GROUP=RM.FP8_GROUP)


# ----------------------------------------------------------------------------- sm_90 specs

# (b, s_q, h_q, seqlen, causal): FlashMLA's decode configurations (its README's call
# form is causal=True), each compiled with the bf16 and the FP8 cache. s_q = 1 makes S_Q
# and the LSE strides the constexpr 1; h_q = 16 with s_q = 1 is the only <= 16-row
# tile; seqlen 4352 gives a block table of 68 pages (its row stride not a multiple of
# 16, as FlashMLA's variable-length tests pad to 256 tokens); causal=False is the default.
SPEC_PROBLEMS = ((64, 1, 16, 4096, True), (128, 2, 16, 4096, True), (128, 1, 128, 4096, True),
                 (64, 2, 128, 4096, True), (128, 1, 16, 4352, True), (128, 2, 128, 4352, False))
# (b, s_q, h_q, seqlen, causal, h_kv): several KV heads (FlashMLA's dense tests use h_kv 2, 3
# and 8), bf16 cache only (the FP8 cache has one KV head); H_KV then is a runtime argument.
SPEC_PROBLEMS_HKV = ((64, 2, 128, 4096, True, 8), (64, 1, 6, 4096, True, 3))


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def mla_launch_specs(b, s_q, h_q, seqlen, fp8, causal=True, num_sm_parts=None, h_kv=1):
    """sm90.LaunchSpecs (scheduler, decode, combine) of the compiled (GPU) launches for one
    problem, from meta tensors of the shapes pykernels.mla passes (contiguous q, cache,
    block table, out, lse; nothing is allocated): the launcher's specialization of
    exactly the arguments get_mla_metadata / flash_mla_with_kvcache pass."""
    qr = s_q * h_q
    parts = num_sm_parts or MS.default_num_sm_parts(torch.device("meta"), qr // h_kv, h_kv)
    pages = triton.cdiv(seqlen, RM.PAGE_BLOCK_SIZE)
    cache = (_meta(b * pages, RM.PAGE_BLOCK_SIZE, h_kv, RM.FP8_BYTES_PER_TOKEN, dtype=torch.uint8) if fp8 else
             _meta(b * pages, RM.PAGE_BLOCK_SIZE, h_kv, RM.HEAD_DIM_QK, dtype=torch.bfloat16))
    q = _meta(b, s_q, h_q, RM.HEAD_DIM_QK, dtype=torch.bfloat16)
    table = _meta(b, pages, dtype=torch.int32)
    seqlens = _meta(b, dtype=torch.int32)
    meta = _meta(parts, RM.METADATA_SIZE, dtype=torch.int32)
    nsplits = _meta(b + 1, dtype=torch.int32)
    out = _meta(b, s_q, h_q, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    lse = _meta(b, h_q, s_q, dtype=torch.float32)
    oacc, lacc = MS.split_scratch(b, parts, qr, RM.HEAD_DIM_V, torch.device("meta"))
    record = _meta(device_errors.RECORD_WORDS, dtype=torch.int32)
    gpu = dict(soft=False, interpreted=False)
    label = (f"b={b} s_q={s_q} h_q={h_q}{f' h_kv={h_kv}' if h_kv > 1 else ''} seqlen={seqlen} "
             f"{'fp8' if fp8 else 'bf16'}{' causal' if causal else ''}")
    launches = (("schedule", schedule_launch_args(seqlens, meta, nsplits)),
                ("decode", decode_launch_args(q, cache, table, seqlens, meta, nsplits, out, lse, oacc, lacc, record,
                                              causal=causal, upcast=False, **gpu)),
                ("combine", combine_launch_args(nsplits, oacc, lacc, out, lse, h_kv=h_kv, **gpu)))
    return [spec_of(f"{name} {label}", launch) for name, launch in launches]


def sm90_compile_specs(problems=SPEC_PROBLEMS, problems_hkv=SPEC_PROBLEMS_HKV):
    """sm90.LaunchSpecs of representative GPU launches (mla_launch_specs of each
    (b, s_q, h_q, seqlen, causal) in problems, bf16 and FP8 caches, and of each
    (b, s_q, h_q, seqlen, causal, h_kv) in problems_hkv, bf16 cache): the signatures,
    constexprs, warps, stages and alignment attributes Triton's launcher compiles for them,
    so a CPU machine compiles the very kernels the GPU runs (tests/test_mla.py checks
    ptxas's registers and spills). Launches with the same specialization share a key."""
    return ([s for b, s_q, h_q, seqlen, causal in problems for fp8 in (False, True)
             for s in mla_launch_specs(b, s_q, h_q, seqlen, fp8, causal)] +
            [s for b, s_q, h_q, seqlen, causal, h_kv in problems_hkv
             for s in mla_launch_specs(b, s_q, h_q, seqlen, False, causal, h_kv=h_kv)])


__all__ = ["UPCAST_DOTS", "tile_config", "sm90_compile_specs", "mla_launch_specs", "get_mla_metadata",
           "flash_mla_with_kvcache"]
