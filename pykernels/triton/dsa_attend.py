"""The attention steps the Triton sparse decode (dsa_decode.py) and sparse prefill
(dsa_prefill.py) share: one tile of gathered key rows folded into an online softmax, and
the final normalisation with the optional attn_sink.

The latent columns are four groups of GROUP (128) with one accumulator each (o = [acc0 |
acc1 | acc2 | acc3]); the loads and dots are pykernels/triton/mla.py's (FP8 cache: e4m3 ->
bf16 exact, each group's scale applied to S's columns after q.k and to P's columns before
P.V; bf16 rows: P rounded to bf16 for P.V, as on the GPU). Logits are in base 2 (qk_scale
includes log2 e); m_i / l_i are the running maximum and sum per query row.
"""
import triton.language as tl

from .jit_dispatch import jit
from .mla import LOG2E, _dot, _load_k_group, _pv, _qk, _store_rows
from .rounding import to_bf16_rne

LN2 = tl.constexpr(0.6931471805599453)      # constexpr: compiled kernels read no float globals
_LOG2E = tl.constexpr(LOG2E)


@jit
def empty_state(BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """The online softmax's start for a tile of BLOCK_M rows: running max -inf, row sum 0, the
    four 128-column output groups 0 (what attend_tile carries from slot tile to slot tile)."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
    return m_i, l_i, acc0, acc1, acc2, acc3


@jit
def attend_tile(q0, q1, q2, q3, q_pe, kv_ptr, kv_sf_ptr, kv_rope_ptr, kv_row, used, m_i, l_i, acc0, acc1, acc2, acc3,
                qk_scale, FP8: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr, SOFT: tl.constexpr,
                ROW: tl.constexpr, SF_ROW: tl.constexpr, SF_OFF: tl.constexpr, ROPE_ROW: tl.constexpr,
                ROPE_OFF: tl.constexpr, GROUP: tl.constexpr, DR: tl.constexpr):
    """Fold the key rows kv_row [BLOCK_N] (only those with `used` are read and attended) into
    (m_i, l_i [BLOCK_M], acc0..acc3 [BLOCK_M, GROUP]); returns the new state.

    q0..q3 [BLOCK_M, GROUP] / q_pe [BLOCK_M, DR]: the query's latent groups and RoPE
    columns (q_pe unused without ROPE). FP8: kv_row are token rows of the 656-byte cache
    (three views: e4m3 bytes of ROW per row, float32 scales SF_ROW per row from SF_OFF, bf16
    RoPE ROPE_ROW per row from ROPE_OFF); otherwise element offsets of bf16 rows (ROW 1),
    RoPE at columns 4 * GROUP .. + DR."""
    k0, sf0 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, used, 0, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
    k1, sf1 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, used, 1, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
    k2, sf2 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, used, 2, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
    k3, sf3 = _load_k_group(kv_ptr, kv_sf_ptr, kv_row, used, 3, FP8, UPCAST, ROW, SF_ROW, SF_OFF, GROUP)
    if ROPE:
        dr = tl.arange(0, DR)
        if FP8:
            k_pe = tl.load(kv_rope_ptr + kv_row[:, None] * ROPE_ROW + ROPE_OFF + dr[None, :], mask=used[:, None],
                           other=0.0)
        else:
            k_pe = tl.load(kv_ptr + kv_row[:, None] * ROW + 4 * GROUP + dr[None, :], mask=used[:, None], other=0.0)
        if UPCAST:
            k_pe = k_pe.to(tl.float32)
        s = _dot(q_pe, tl.trans(k_pe), UPCAST)
        s += _qk(q0, k0, sf0, FP8, UPCAST)
    else:
        s = _qk(q0, k0, sf0, FP8, UPCAST)
    s += _qk(q1, k1, sf1, FP8, UPCAST)
    s += _qk(q2, k2, sf2, FP8, UPCAST)
    s += _qk(q3, k3, sf3, FP8, UPCAST)
    s = tl.where(used[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # nothing used yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        p_bf16 = p                      # unused: _pv rounds P * scale per group
    else:
        p_bf16 = to_bf16_rne(p, SOFT)   # P enters its dot in bf16, as on the GPU
    acc0 = _pv(acc0, alpha, p, p_bf16, k0, sf0, FP8, UPCAST, SOFT)
    acc1 = _pv(acc1, alpha, p, p_bf16, k1, sf1, FP8, UPCAST, SOFT)
    acc2 = _pv(acc2, alpha, p, p_bf16, k2, sf2, FP8, UPCAST, SOFT)
    acc3 = _pv(acc3, alpha, p, p_bf16, k3, sf3, FP8, UPCAST, SOFT)
    return m_new, l_i, acc0, acc1, acc2, acc3


@jit
def normalizer(m_i, l_i, seen, sink_ptr, head, row_ok, HAS_SINK: tl.constexpr):
    """1 / the softmax denominator [BLOCK_M] of the final state, 0 for rows with nothing
    seen; with attn_sink the denominator gains exp(sink[head])."""
    denom = l_i
    if HAS_SINK:
        sink2 = tl.load(sink_ptr + head, mask=row_ok, other=0.0) * _LOG2E
        denom += tl.exp2(sink2 - tl.where(seen, m_i, 0.0))
    return tl.where(seen, 1.0 / tl.where(seen, denom, 1.0), 0.0)


@jit
def lse_of(m_i, l_i, seen):
    """The lse (natural log) of the scores alone [BLOCK_M], +inf for rows with nothing seen.
    (Computed after the output is stored: earlier, ptxas spills in the 16-head decode.)"""
    return tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))


@jit
def store_out(out_ptr, o_off, row_ok, acc0, acc1, acc2, acc3, inv, SOFT: tl.constexpr, GROUP: tl.constexpr):
    """out[row, :4 * GROUP] = bf16(acc * inv) (RNE) for the rows at offsets o_off."""
    _store_rows(out_ptr, o_off, row_ok, 0 * GROUP, to_bf16_rne(acc0 * inv[:, None], SOFT), GROUP)
    _store_rows(out_ptr, o_off, row_ok, 1 * GROUP, to_bf16_rne(acc1 * inv[:, None], SOFT), GROUP)
    _store_rows(out_ptr, o_off, row_ok, 2 * GROUP, to_bf16_rne(acc2 * inv[:, None], SOFT), GROUP)
    _store_rows(out_ptr, o_off, row_ok, 3 * GROUP, to_bf16_rne(acc3 * inv[:, None], SOFT), GROUP)


__all__ = ["attend_tile", "normalizer", "lse_of", "store_out", "LN2"]
