"""Triton sparse MLA decode over the 656-byte FP8 cache (FlashMLA's
flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...); docs/dsa.md).

Grid (b * s_q, head tiles): program (r, t) serves query token r = (i, s) and heads
[t * BLOCK_M, (t + 1) * BLOCK_M), so h_q below 64 is not padded past the next tile of 16.
It walks the row's slots in tiles of BLOCK_N: a slot is used when it lies below
topk_length[i] (when given) and its index is not -1; the used slots' cache rows are
gathered (unused ones are never read), S = q . k^T over the 512 NoPE columns (four groups
of 128 with their own scales) and the 64 RoPE columns, online softmax in base 2, and
o += P . V with V = the NoPE columns (one tile: dsa_attend.attend_tile, shared with the
sparse prefill). The per-token numerics are the dense Triton decode's
(pykernels/triton/mla.py, whose load and dot helpers attend_tile uses): e4m3 -> bf16 is
exact, each group's scale multiplies S's columns after the dot and P's columns before it
(P * scale rounded to bf16 for the MMA).

At the end, with attn_sink the denominator gains exp(sink[h]) (base 2: l + 2^(sink * log2 e - m));
the lse written is that of the scores alone; a row with no used slot gets out 0 and lse +inf.
The schedule (tile_scheduler_metadata / num_splits) is not used: one program covers a
row's topk slots (no split-KV yet).
"""
import torch
import triton
import triton.language as tl

from ..reference import mla as RM
from .jit_dispatch import jit
from . import mla as TM
from .mla import LOG2E, SOFTWARE_ROUNDING, UPCAST_DOTS, _cache_views, _load_q
from . import INTERPRETED
from .dsa_attend import attend_tile, empty_state, lse_of, normalizer, store_out
from .sm90 import run_launch, spec_of

_STAGES = 2


WIDE_TILE = (64, 32, 8)      # (BLOCK_M heads, BLOCK_N slots, warps) from 64 heads, compiled


def tile_config(h_q: int, interpreted: bool = INTERPRETED):
    """(BLOCK_M heads, BLOCK_N slots, num_warps) per program. From 64 heads (compiled) 64 x 32
    with 8 warps: its dots are wgmma, and on an H200 (Triton 3.6, b 128, s_q 2, h_q 128, topk
    2048) it ran 2.5x faster than the dense decode's spill-free 32 x 32 x 8, though ptxas
    reports 16 bytes of spills per thread without attn_sink / topk_length (none with them).
    Below 64 heads, and interpreted, the dense Triton decode's tiles (pykernels/triton/mla.py)."""
    if h_q >= 64 and not interpreted:
        return WIDE_TILE
    return TM.tile_config(h_q, interpreted=interpreted)


@jit
def _sparse_decode_kernel(q_ptr, kv_ptr, kv_sf_ptr, kv_rope_ptr, idx_ptr, len_ptr, sink_ptr, out_ptr, lse_ptr,
                          stride_qb, stride_qs, stride_qh, stride_ib, stride_is,
                          stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                          S_Q, H_Q, TOPK, qk_scale,
                          HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
                          ROW: tl.constexpr, SF_ROW: tl.constexpr, SF_OFF: tl.constexpr,
                          ROPE_ROW: tl.constexpr, ROPE_OFF: tl.constexpr, GROUP: tl.constexpr):
    tl.static_assert(DV == 4 * GROUP)
    r = tl.program_id(0)
    bi = r // S_Q
    si = r % S_Q
    head = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = head < H_Q
    tn = tl.arange(0, BLOCK_N)
    q_row = q_ptr + bi * stride_qb + si * stride_qs + head * stride_qh
    q0 = _load_q(q_row, row_ok, 0 * GROUP, GROUP, UPCAST)
    q1 = _load_q(q_row, row_ok, 1 * GROUP, GROUP, UPCAST)
    q2 = _load_q(q_row, row_ok, 2 * GROUP, GROUP, UPCAST)
    q3 = _load_q(q_row, row_ok, 3 * GROUP, GROUP, UPCAST)
    q_pe = _load_q(q_row, row_ok, DV, DR, UPCAST)
    n_slots = TOPK
    if HAS_LEN:
        n_slots = tl.minimum(tl.load(len_ptr + bi), TOPK)
    idx_row = idx_ptr + bi.to(tl.int64) * stride_ib + si * stride_is
    m_i, l_i, acc0, acc1, acc2, acc3 = empty_state(BLOCK_M, GROUP)
    n_used = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, n_slots, BLOCK_N):
        slot = t0 + tn
        idx = tl.load(idx_row + slot, mask=slot < n_slots, other=-1)
        used = idx != -1
        n_used += tl.sum(used.to(tl.int32), axis=0)
        kv_row = tl.where(used, idx, 0).to(tl.int64)     # token rows in the cache
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_tile(
            q0, q1, q2, q3, q_pe, kv_ptr, kv_sf_ptr, kv_rope_ptr, kv_row, used, m_i, l_i, acc0, acc1, acc2, acc3,
            qk_scale, True, True, UPCAST, SOFT, ROW, SF_ROW, SF_OFF, ROPE_ROW, ROPE_OFF, GROUP, DR)
    seen = n_used > 0
    inv = normalizer(m_i, l_i, seen, sink_ptr, head, row_ok, HAS_SINK)
    store_out(out_ptr, bi * stride_ob + si * stride_os + head * stride_oh, row_ok, acc0, acc1, acc2, acc3, inv, SOFT,
              GROUP)
    tl.store(lse_ptr + bi * stride_lb + head * stride_lh + si * stride_ls, lse_of(m_i, l_i, seen), mask=row_ok)


def sparse_decode_launch_args(q, k_cache, indices, attn_sink, topk_length, out, lse, softmax_scale,
                              upcast=UPCAST_DOTS, soft=SOFTWARE_ROUNDING, interpreted=INTERPRETED):
    """(kernel, grid, runtime args by name, constexprs, options) of the launch, or None when
    b * s_q = 0. flash_mla_sparse_decode and sm90_compile_specs both use it."""
    b, s_q, h_q, _ = q.shape
    if b * s_q == 0:
        return None
    kv, kv_sf, kv_rope, fp8 = _cache_views(k_cache)
    assert fp8, "the sparse decode reads the 656-byte FP8 cache"
    bm, bn, warps = tile_config(h_q, interpreted=interpreted)
    vals = (q, kv, kv_sf, kv_rope, indices, q if topk_length is None else topk_length,
            q if attn_sink is None else attn_sink, out, lse,
            q.stride(0), q.stride(1), q.stride(2), indices.stride(0), indices.stride(1),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            s_q, h_q, indices.shape[2], float(softmax_scale) * LOG2E)
    args = dict(zip(_sparse_decode_kernel.arg_names, vals))
    cx = dict(HAS_LEN=topk_length is not None, HAS_SINK=attn_sink is not None, UPCAST=bool(upcast), SOFT=bool(soft),
              BLOCK_M=bm, BLOCK_N=bn, DV=RM.HEAD_DIM_V, DR=RM.ROPE_DIM, ROW=RM.FP8_BYTES_PER_TOKEN,
              SF_ROW=RM.FP8_BYTES_PER_TOKEN // 4, SF_OFF=RM.HEAD_DIM_V // 4, ROPE_ROW=RM.FP8_BYTES_PER_TOKEN // 2,
              ROPE_OFF=(RM.HEAD_DIM_V + 4 * RM.FP8_NUM_SCALES) // 2, GROUP=RM.FP8_GROUP)
    grid = (b * s_q, triton.cdiv(h_q, bm))
    return _sparse_decode_kernel, grid, args, cx, dict(num_warps=warps, num_stages=_STAGES)


def flash_mla_sparse_decode(q, k_cache, indices, attn_sink, topk_length, out, lse, softmax_scale: float):
    """q bf16 [b, s_q, h_q, 576] (unit last stride); k_cache FP8 [num_blocks, 64, 1, 656]
    (contiguous); indices int32 [b, s_q, topk] (validated: -1 or a cache row in every used
    slot); attn_sink f32 [h_q] or None; topk_length int32 [b] or None (in [0, topk]) ->
    out bf16 [b, s_q, h_q, 512], lse f32 [b, h_q, s_q] (written whole)."""
    run_launch(sparse_decode_launch_args(q, k_cache, indices, attn_sink, topk_length, out, lse, softmax_scale))
    return out, lse


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# (b, s_q, h_q, topk, attn_sink and topk_length?): FlashMLA's sparse decode benchmark
# configuration (b 128, h_q 128, s_q 2, topk 2048), h_q 64 with s_q 1, h_q 16 with s_q 4.
SPEC_PROBLEMS = ((128, 2, 128, 2048, False), (128, 1, 64, 2048, True), (32, 4, 16, 2048, True))


def sm90_compile_specs(problems=SPEC_PROBLEMS):
    """sm90.LaunchSpecs of the GPU launches of the problems above (meta tensors shaped as
    pykernels.dsa passes them; the cache holds 64 pages per sequence)."""
    specs = []
    for b, s_q, h_q, topk, extras in problems:
        cache = _meta(b * 64, RM.PAGE_BLOCK_SIZE, 1, RM.FP8_BYTES_PER_TOKEN, dtype=torch.uint8)
        sink = _meta(h_q, dtype=torch.float32) if extras else None
        length = _meta(b, dtype=torch.int32) if extras else None
        launch = sparse_decode_launch_args(
            _meta(b, s_q, h_q, RM.HEAD_DIM_QK, dtype=torch.bfloat16), cache, _meta(b, s_q, topk, dtype=torch.int32),
            sink, length, _meta(b, s_q, h_q, RM.HEAD_DIM_V, dtype=torch.bfloat16),
            _meta(b, h_q, s_q, dtype=torch.float32), RM.default_softmax_scale(), upcast=False, soft=False,
            interpreted=False)
        specs.append(spec_of(f"flash_mla_sparse_decode b={b} s_q={s_q} h_q={h_q} topk={topk}"
                             f"{' sink+topk_length' if extras else ''}", launch))
    return specs


__all__ = ["flash_mla_sparse_decode", "sm90_compile_specs", "sparse_decode_launch_args"]
