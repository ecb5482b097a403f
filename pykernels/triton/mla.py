"""Triton MLA decode (split-KV, FlashMLA's interface) and its scheduler.

Three kernels:
- `_schedule_kernel`: one program computing get_mla_metadata on the device (the same
  rule as pykernels.reference.mla.schedule, so no host-device synchronisation).
- `_mla_decode_kernel`: grid (num_sm_parts, row tiles). Program (p, t) walks SM
  partition p's pieces from tile_scheduler_metadata (consecutive sequences; the first
  may start and the last may end inside a sequence) for query rows
  [t*BLOCK_M, (t+1)*BLOCK_M) of the s_q*h_q rows that share the one KV head. Per key
  tile (BLOCK_N tokens of one page): S = q_nope.k_nope^T + q_pe.k_pe^T, online softmax
  (base 2), acc += P.V with V = k_nope. A sequence with one split is finished in place (out, lse); a piece
  of a split sequence writes its normalised partial output and LSE to a float32
  scratch buffer at row num_splits[seq] + piece index.
- `_mla_combine_kernel`: grid (b, row tiles); merges the splits of each sequence that
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

from ..reference import mla as RM
from . import INTERPRETED
from .rounding import to_bf16_rne
from .sm90 import run_launch, spec_of

UPCAST_DOTS = INTERPRETED          # bf16 dots are wrong when interpreted: use f32 there
SOFTWARE_ROUNDING = INTERPRETED    # interpreter casts f32 -> bf16 toward zero
LOG2E = 1.4426950408889634
_SCRATCH_FILL = None               # tests set NaN to prove the combine reads only written rows
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

@triton.jit
def _schedule_kernel(seqlens_ptr, meta_ptr, nsplits_ptr, B, P,
                     FIXED: tl.constexpr, PAGE: tl.constexpr, BLOCK_B: tl.constexpr):
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        ok = offs < B
        L = tl.maximum(tl.load(seqlens_ptr + offs, mask=ok, other=0), 0)
        total += tl.sum(tl.where(ok, (L + PAGE - 1) // PAGE + FIXED, 0), axis=0)
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
            L = tl.maximum(tl.load(seqlens_ptr + cur_b), 0)
            nblk = (L + PAGE - 1) // PAGE
            rest = nblk - cur_blk
            take_all = left >= rest + FIXED
            can_split = left > FIXED
            take = tl.where(take_all, rest, left - FIXED)
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
        row = meta_ptr + p * 8
        tl.store(row + 0, first_b)
        tl.store(row + 1, first_blk)
        tl.store(row + 2, last_b)
        tl.store(row + 3, last_end)
        tl.store(row + 4, first_split)
        tl.store(row + 5, pieces)
        tl.store(row + 6, 0)
        tl.store(row + 7, 0)
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
    """Device-side schedule: (metadata int32 [num_sm_parts, 8], num_splits int32 [b+1])."""
    b = cache_seqlens.shape[0]
    meta = torch.empty(num_sm_parts, RM.METADATA_SIZE, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    run_launch(schedule_launch_args(cache_seqlens, meta, num_splits))
    return meta, num_splits


# ----------------------------------------------------------------------------- decode

@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_q(q_row, row_ok, col0, WIDTH: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, WIDTH] query columns [col0, col0 + WIDTH) of the rows at q_row."""
    cols = col0 + tl.arange(0, WIDTH)
    x = tl.load(q_row[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
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


@triton.jit
def _qk(q_g, k_g, sf, FP8: tl.constexpr, UPCAST: tl.constexpr):
    s = _dot(q_g, tl.trans(k_g), UPCAST)
    if FP8:
        s = s * sf[None, :]
    return s


@triton.jit
def _pv(acc, alpha, p, p_bf16, k_g, sf, FP8: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr):
    if FP8:
        pg = to_bf16_rne(p * sf[None, :], SOFT)   # the token's scale folded into P
    else:
        pg = p_bf16
    if UPCAST:
        pg = pg.to(tl.float32)
    return acc * alpha[:, None] + _dot(pg, k_g, UPCAST)


@triton.jit
def _store_rows(base, rows_off, row_ok, col0, x, WIDTH: tl.constexpr):
    cols = col0 + tl.arange(0, WIDTH)
    tl.store(base + rows_off[:, None] + cols[None, :], x, mask=row_ok[:, None])


@triton.jit
def _mla_decode_kernel(q_ptr, kv_ptr, kv_sf_ptr, kv_rope_ptr, bt_ptr, seqlens_ptr, meta_ptr, nsplits_ptr,
                       out_ptr, lse_ptr, oacc_ptr, lacc_ptr,
                       stride_qb, stride_qs, stride_qh, stride_bt,
                       stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                       S_Q, H_Q, QR, qk_scale,
                       CAUSAL: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       DV: tl.constexpr, DR: tl.constexpr,
                       ROW: tl.constexpr, SF_ROW: tl.constexpr, SF_OFF: tl.constexpr,
                       ROPE_ROW: tl.constexpr, ROPE_OFF: tl.constexpr, GROUP: tl.constexpr):
    # The 512 latent columns are handled as 4 groups of 128 (the FP8 scale groups), each
    # with its own accumulator: o = [acc0 | acc1 | acc2 | acc3].
    tl.static_assert(DV == 4 * GROUP)
    tl.static_assert(PAGE % BLOCK_N == 0)
    SUB: tl.constexpr = PAGE // BLOCK_N        # key tiles per page
    part = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < QR
    tok = rows // H_Q
    head = rows % H_Q
    dr = tl.arange(0, DR)
    tn = tl.arange(0, BLOCK_N)
    meta = meta_ptr + part * 8
    first_b = tl.load(meta + 0)
    first_blk = tl.load(meta + 1)
    last_b = tl.load(meta + 2)
    last_end = tl.load(meta + 3)
    first_split = tl.load(meta + 4)
    pieces = tl.load(meta + 5)
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
            kv_row = page * PAGE + (j % SUB) * BLOCK_N + tn   # token rows in the cache
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
            acc_off = (sid * QR + rows) * DV
            _store_rows(oacc_ptr, acc_off, row_ok, 0 * GROUP, acc0 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 1 * GROUP, acc1 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 2 * GROUP, acc2 * inv_l[:, None], GROUP)
            _store_rows(oacc_ptr, acc_off, row_ok, 3 * GROUP, acc3 * inv_l[:, None], GROUP)
            tl.store(lacc_ptr + sid * QR + rows, tl.where(seen, lse2, float("-inf")), mask=row_ok)


@triton.jit
def _mla_combine_kernel(nsplits_ptr, oacc_ptr, lacc_ptr, out_ptr, lse_ptr,
                        stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                        H_Q, QR, SOFT: tl.constexpr, BLOCK_R: tl.constexpr, DV: tl.constexpr):
    bi = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < QR
    tok = rows // H_Q
    head = rows % H_Q
    s0 = tl.load(nsplits_ptr + bi)
    n = tl.load(nsplits_ptr + bi + 1) - s0
    if n > 1:
        dn = tl.arange(0, DV)
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        for j in range(n):
            lj = tl.load(lacc_ptr + (s0 + j).to(tl.int64) * QR + rows, mask=row_ok, other=float("-inf"))
            m = tl.maximum(m, lj)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_R, DV), dtype=tl.float32)
        for j in range(n):
            sid = (s0 + j).to(tl.int64)
            w = tl.exp2(tl.load(lacc_ptr + sid * QR + rows, mask=row_ok, other=float("-inf")) - m_use)
            oj = tl.load(oacc_ptr + (sid * QR + rows)[:, None] * DV + dn[None, :],
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


def split_scratch(b: int, num_sm_parts: int, q_rows: int, head_dim_v: int, device):
    """(oacc float32 [b + P, q_rows, head_dim_v], lacc float32 [b + P, q_rows]): the split
    pieces' partial outputs and base-2 LSEs (pieces <= b + P - 1 by construction)."""
    max_splits = b + num_sm_parts
    fill = torch.empty if _SCRATCH_FILL is None else (
        lambda *s, **kw: torch.full(s, _SCRATCH_FILL, **kw))
    return (fill(max_splits, q_rows, head_dim_v, dtype=torch.float32, device=device),
            fill(max_splits, q_rows, dtype=torch.float32, device=device))


def decode_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
                       oacc, lacc, softmax_scale=None, causal=False, upcast=UPCAST_DOTS, soft=SOFTWARE_ROUNDING,
                       interpreted=INTERPRETED):
    """(kernel, grid, runtime args by name, constexprs, options) of the decode launch, or
    None when b = 0. flash_mla_with_kvcache and sm90_compile_specs both use it, so the
    specs compile exactly what the GPU runs."""
    b, s_q, h_q, _ = q.shape
    if b == 0:
        return None
    qr = s_q * h_q
    scale = RM.default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    kv, kv_sf, kv_rope, fp8 = _cache_views(k_cache)
    bm, bn, warps = tile_config(qr, interpreted=interpreted)
    grid = (tile_scheduler_metadata.shape[0], triton.cdiv(qr, bm))
    vals = (q, kv, kv_sf, kv_rope, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
            out, lse, oacc, lacc,
            q.stride(0), q.stride(1), q.stride(2), block_table.stride(0),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            s_q, h_q, qr, scale * LOG2E)
    args = dict(zip(_mla_decode_kernel.arg_names, vals))
    cx = _decode_constexprs(fp8, causal, bm, bn, upcast, soft)
    return _mla_decode_kernel, grid, args, cx, dict(num_warps=warps, num_stages=2)


def combine_launch_args(num_splits, oacc, lacc, out, lse, soft=SOFTWARE_ROUNDING, interpreted=INTERPRETED):
    """As decode_launch_args, for the combine launch (grid (b, row tiles))."""
    b, s_q, h_q, _ = out.shape
    if b == 0:
        return None
    qr = s_q * h_q
    br = combine_rows(qr, interpreted)
    vals = (num_splits, oacc, lacc, out, lse,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2), h_q, qr)
    args = dict(zip(_mla_combine_kernel.arg_names, vals))
    cx = dict(SOFT=bool(soft), BLOCK_R=br, DV=oacc.shape[-1])
    return _mla_combine_kernel, (b, triton.cdiv(qr, br)), args, cx, dict(num_warps=4, num_stages=_DEFAULT_STAGES)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                           out, lse, head_dim_v=RM.HEAD_DIM_V, softmax_scale=None, causal=False):
    """Split-KV MLA decode into out bf16 [b, s_q, h_q, 512] and lse f32 [b, h_q, s_q].

    Inputs as validated by pykernels.mla.flash_mla_with_kvcache (h_kv = 1, page 64,
    contiguous cache, q with unit stride in its last dimension).
    """
    b, s_q, h_q, _ = q.shape
    if b == 0:
        return out, lse
    oacc, lacc = split_scratch(b, tile_scheduler_metadata.shape[0], s_q * h_q, head_dim_v, q.device)
    run_launch(decode_launch_args(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                            out, lse, oacc, lacc, softmax_scale, causal))
    run_launch(combine_launch_args(num_splits, oacc, lacc, out, lse))
    return out, lse


def combine_rows(q_rows: int, interpreted: bool = INTERPRETED) -> int:
    """Query rows per combine program."""
    return min(64, triton.next_power_of_2(q_rows)) if interpreted else 16


def _decode_constexprs(fp8, causal, bm, bn, upcast, soft):
    return dict(CAUSAL=bool(causal), FP8=bool(fp8), UPCAST=bool(upcast), SOFT=bool(soft),
                BLOCK_M=bm, BLOCK_N=bn, PAGE=RM.PAGE_BLOCK_SIZE, DV=RM.HEAD_DIM_V, DR=RM.ROPE_DIM,
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


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def mla_launch_specs(b, s_q, h_q, seqlen, fp8, causal=True, num_sm_parts=None):
    """sm90.LaunchSpecs (scheduler, decode, combine) of the compiled (GPU) launches for one
    problem, from meta tensors of the shapes pykernels.mla passes (contiguous q, cache,
    block table, out, lse; nothing is allocated): the launcher's specialization of
    exactly the arguments get_mla_metadata / flash_mla_with_kvcache pass."""
    from ..mla import default_num_sm_parts
    qr = s_q * h_q
    parts = num_sm_parts or default_num_sm_parts(torch.device("meta"), qr, 1)
    pages = triton.cdiv(seqlen, RM.PAGE_BLOCK_SIZE)
    cache = (_meta(b * pages, RM.PAGE_BLOCK_SIZE, 1, RM.FP8_BYTES_PER_TOKEN, dtype=torch.uint8) if fp8 else
             _meta(b * pages, RM.PAGE_BLOCK_SIZE, 1, RM.HEAD_DIM_QK, dtype=torch.bfloat16))
    q = _meta(b, s_q, h_q, RM.HEAD_DIM_QK, dtype=torch.bfloat16)
    table = _meta(b, pages, dtype=torch.int32)
    seqlens = _meta(b, dtype=torch.int32)
    meta = _meta(parts, RM.METADATA_SIZE, dtype=torch.int32)
    nsplits = _meta(b + 1, dtype=torch.int32)
    out = _meta(b, s_q, h_q, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    lse = _meta(b, h_q, s_q, dtype=torch.float32)
    oacc, lacc = split_scratch(b, parts, qr, RM.HEAD_DIM_V, torch.device("meta"))
    gpu = dict(soft=False, interpreted=False)
    label = f"b={b} s_q={s_q} h_q={h_q} seqlen={seqlen} {'fp8' if fp8 else 'bf16'}{' causal' if causal else ''}"
    launches = (("schedule", schedule_launch_args(seqlens, meta, nsplits)),
                ("decode", decode_launch_args(q, cache, table, seqlens, meta, nsplits, out, lse, oacc, lacc,
                                              causal=causal, upcast=False, **gpu)),
                ("combine", combine_launch_args(nsplits, oacc, lacc, out, lse, **gpu)))
    return [spec_of(f"{name} {label}", launch) for name, launch in launches]


def sm90_compile_specs(problems=SPEC_PROBLEMS):
    """sm90.LaunchSpecs of representative GPU launches (mla_launch_specs of each
    (b, s_q, h_q, seqlen, causal) in problems, bf16 and FP8 caches): the signatures, constexprs,
    warps, stages and alignment attributes Triton's launcher compiles for them, so a
    CPU machine compiles the very kernels the GPU runs (tests/test_mla.py checks
    ptxas's registers and spills). Launches with the same specialization share a key."""
    return [s for b, s_q, h_q, seqlen, causal in problems for fp8 in (False, True)
            for s in mla_launch_specs(b, s_q, h_q, seqlen, fp8, causal)]


__all__ = ["UPCAST_DOTS", "tile_config", "sm90_compile_specs", "mla_launch_specs", "get_mla_metadata",
           "flash_mla_with_kvcache"]
