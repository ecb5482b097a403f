"""Triton sparse MLA prefill (FlashMLA's flash_mla_sparse_fwd; docs/dsa.md).

Grid (s_q, head tiles): program (i, t) serves query token i and heads [t * BLOCK_M,
(t + 1) * BLOCK_M) over the token's topk slots in tiles of BLOCK_N. A slot is used when its
index lies in [0, s_kv) and (with topk_length) the slot is below topk_length[i]: FlashMLA's
rule, so other indices are skipped, never read. The used slots' bf16 kv rows are gathered
and folded into the online softmax by dsa_attend.attend_tile (the sparse decode's step):
S = q . k^T over d_qk columns (512 latent + 64 RoPE for 576; the 512 alone for 512), P
rounded to bf16 for P . V with V = the 512 latent columns, float32 accumulation.

Outputs: out bf16 (RNE), max_logits = the largest sm_scale * q . k (-inf for a row with no
used slot), lse of the scores alone (+inf for such a row); with attn_sink the
denominator gains exp(sink[h]). A NaN in a used row propagates to out, lse and
max_logits as in the reference.
"""
import torch
import triton
import triton.language as tl

from ..reference import mla as RM
from . import INTERPRETED
from .dsa_attend import LN2, attend_tile, empty_state, lse_of, normalizer, store_out
from .dsa_decode import tile_config
from .jit_dispatch import jit
from .mla import LOG2E, SOFTWARE_ROUNDING, UPCAST_DOTS, _load_q
from .sm90 import run_launch, spec_of

_STAGES = 2


@jit
def _sparse_prefill_kernel(q_ptr, kv_ptr, idx_ptr, len_ptr, sink_ptr, out_ptr, max_ptr, lse_ptr,
                           stride_qs, stride_qh, stride_kv, stride_is, stride_os, stride_oh,
                           stride_ms, stride_mh, stride_ls, stride_lh, H_Q, S_KV, TOPK, qk_scale,
                           ROPE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_SINK: tl.constexpr,
                           UPCAST: tl.constexpr, SOFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DR: tl.constexpr, GROUP: tl.constexpr):
    i = tl.program_id(0)
    head = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = head < H_Q
    tn = tl.arange(0, BLOCK_N)
    q_row = q_ptr + i.to(tl.int64) * stride_qs + head * stride_qh
    q0 = _load_q(q_row, row_ok, 0 * GROUP, GROUP, UPCAST)
    q1 = _load_q(q_row, row_ok, 1 * GROUP, GROUP, UPCAST)
    q2 = _load_q(q_row, row_ok, 2 * GROUP, GROUP, UPCAST)
    q3 = _load_q(q_row, row_ok, 3 * GROUP, GROUP, UPCAST)
    q_pe = q0
    if ROPE:
        q_pe = _load_q(q_row, row_ok, 4 * GROUP, DR, UPCAST)
    n_slots = TOPK
    if HAS_LEN:
        n_slots = tl.minimum(tl.load(len_ptr + i), TOPK)
    idx_row = idx_ptr + i.to(tl.int64) * stride_is
    m_i, l_i, acc0, acc1, acc2, acc3 = empty_state(BLOCK_M, GROUP)
    n_used = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, n_slots, BLOCK_N):
        slot = t0 + tn
        idx = tl.load(idx_row + slot, mask=slot < n_slots, other=-1)
        used = (idx >= 0) & (idx < S_KV)
        n_used += tl.sum(used.to(tl.int32), axis=0)
        kv_row = tl.where(used, idx, 0).to(tl.int64) * stride_kv      # element offsets of the rows
        m_i, l_i, acc0, acc1, acc2, acc3 = attend_tile(
            q0, q1, q2, q3, q_pe, kv_ptr, kv_ptr, kv_ptr, kv_row, used, m_i, l_i, acc0, acc1, acc2, acc3,
            qk_scale, False, ROPE, UPCAST, SOFT, 1, 1, 0, 1, 0, GROUP, DR)
    seen = n_used > 0
    inv = normalizer(m_i, l_i, seen, sink_ptr, head, row_ok, HAS_SINK)
    store_out(out_ptr, i.to(tl.int64) * stride_os + head * stride_oh, row_ok, acc0, acc1, acc2, acc3, inv, SOFT,
              GROUP)
    tl.store(lse_ptr + i * stride_ls + head * stride_lh, lse_of(m_i, l_i, seen), mask=row_ok)
    # a NaN score makes l_i NaN; the maximum (max.f32 drops NaN) would not show it: propagate it
    mx = tl.where(l_i != l_i, l_i, tl.where(seen, m_i * LN2, float("-inf")))
    tl.store(max_ptr + i * stride_ms + head * stride_mh, mx, mask=row_ok)


def sparse_prefill_launch_args(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale,
                               upcast=UPCAST_DOTS, soft=SOFTWARE_ROUNDING, interpreted=INTERPRETED):
    """(kernel, grid, runtime args by name, constexprs, options) of the launch, or None when
    s_q = 0. flash_mla_sparse_fwd and sm90_compile_specs both use it."""
    s_q, h_q, d_qk = q.shape
    if s_q == 0:
        return None
    bm, bn, warps = tile_config(h_q, interpreted=interpreted)
    vals = (q, kv, indices, q if topk_length is None else topk_length, q if attn_sink is None else attn_sink,
            out, max_logits, lse, q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0),
            out.stride(1), max_logits.stride(0), max_logits.stride(1), lse.stride(0), lse.stride(1),
            h_q, kv.shape[0], indices.shape[2], float(sm_scale) * LOG2E)
    args = dict(zip(_sparse_prefill_kernel.arg_names, vals))
    cx = dict(ROPE=d_qk > RM.HEAD_DIM_V, HAS_LEN=topk_length is not None, HAS_SINK=attn_sink is not None,
              UPCAST=bool(upcast), SOFT=bool(soft), BLOCK_M=bm, BLOCK_N=bn, DR=RM.ROPE_DIM, GROUP=RM.FP8_GROUP)
    return _sparse_prefill_kernel, (s_q, triton.cdiv(h_q, bm)), args, cx, dict(num_warps=warps, num_stages=_STAGES)


def flash_mla_sparse_fwd(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale: float):
    """q bf16 [s_q, h_q, d_qk] (d_qk 576 or 512, unit last stride); kv bf16 [s_kv, 1, d_qk]
    (unit last stride); indices int32 [s_q, 1, topk] (any value: outside [0, s_kv) is
    skipped); attn_sink f32 [h_q] or None; topk_length int32 [s_q] or None (in [0, topk]) ->
    out bf16 [s_q, h_q, 512], max_logits / lse f32 [s_q, h_q] (written whole)."""
    run_launch(sparse_prefill_launch_args(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale))
    return out, max_logits, lse


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# (s_q, h_q, d_qk, s_kv, topk, attn_sink and topk_length?): V3.2's prefill shape (128 heads,
# d_qk 576, topk 2048), a 64-head MODEL1-style one (d_qk 512) with sink and lengths, and 16
# heads (the dense decode's 16 x 32 tile).
SPEC_PROBLEMS = ((4096, 128, 576, 8192, 2048, False), (4096, 64, 512, 8192, 2048, True),
                 (4096, 16, 576, 8192, 2048, True))


def sm90_compile_specs(problems=SPEC_PROBLEMS):
    """sm90.LaunchSpecs of the GPU launches above (meta tensors shaped as pykernels.dsa passes them)."""
    specs = []
    for s_q, h_q, d_qk, s_kv, topk, extras in problems:
        launch = sparse_prefill_launch_args(
            _meta(s_q, h_q, d_qk, dtype=torch.bfloat16), _meta(s_kv, 1, d_qk, dtype=torch.bfloat16),
            _meta(s_q, 1, topk, dtype=torch.int32), _meta(h_q, dtype=torch.float32) if extras else None,
            _meta(s_q, dtype=torch.int32) if extras else None, _meta(s_q, h_q, RM.HEAD_DIM_V, dtype=torch.bfloat16),
            _meta(s_q, h_q, dtype=torch.float32), _meta(s_q, h_q, dtype=torch.float32), 0.1, upcast=False,
            soft=False, interpreted=False)
        specs.append(spec_of(f"flash_mla_sparse_fwd s_q={s_q} h_q={h_q} d_qk={d_qk} topk={topk}"
                             f"{' sink+topk_length' if extras else ''}", launch))
    return specs


__all__ = ["flash_mla_sparse_fwd", "sparse_prefill_launch_args", "sm90_compile_specs"]
