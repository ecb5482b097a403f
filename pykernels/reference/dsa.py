"""Reference DeepSeek Sparse Attention (DSA, DeepSeek-V3.2), float32 math (docs/dsa.md).

One decode step: the indexer scores every cached token for each query, the top-k tokens are
kept, and MLA attends only to them over the FP8 KV cache.

Indexer (DeepGEMM's fp8_mqa_logits / fp8_paged_mqa_logits):
    logit[i, j] = k_scale[j] * sum_h w[i, h] * relu(q[i, h] . k[j])
q and k are e4m3 (q unscaled: its scale lives in w), the dot is exact in float32 terms,
the per-key scale multiplies the head reduction (DeepGEMM's kernels apply it there: for
the positive scales a quantizer makes this equals sum_h w * relu(q . k * scale)).
Positions outside a query's window get -inf.

- Prefill: q [M, H, D], k [N, D] with k_scales [N]; query i sees keys [ks[i], ke[i]).
- Decode: q [b, next_n, H, D] over a paged key cache uint8 [num_blocks, block_kv, 1, D + 4]
  in DeepGEMM's layout: per page, block_kv * D e4m3 bytes (token t's D values at t * D),
  then block_kv float32 scales. Query row i * next_n + j sees positions
  [0, context_lens[i] - next_n + j] (context_lens [b]) or [0, context_lens[i, j])
  (context_lens [b, next_n]).

Top-k: per row, the k positions with the largest logits among the row's window (ties: the
lower position first), in descending order, -1 in the slots past the window's length;
the paged form maps position p of sequence i to block_table[i, p // 64] * 64 + p % 64,
the index the sparse decode reads.

Sparse MLA decode (FlashMLA's flash_mla_with_kvcache(..., indices=...)): q bf16
[b, s_q, h_q, 576]; the 656-byte FP8 cache of reference.mla; indices int32 [b, s_q, topk]
into the cache's flat token rows (block * 64 + offset), -1 for an unused slot; slots at or
past topk_length[i] (when given) are unused too, whatever they hold. With attn_sink [h_q]
the softmax denominator gains exp(attn_sink[h]): out = sum_t exp(s_t - L) v_t with
L = log(exp(lse) + exp(sink)); the returned lse is that of the scores alone. A row with no
used slot gets out 0 and lse +inf (sink or not), FlashMLA's convention.

Sparse prefill (flash_mla_sparse_fwd): q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] bf16,
indices [s_q, 1, topk] into kv's rows; an index outside [0, s_kv) or a slot at or past
topk_length[i] is skipped (FlashMLA's rule). Returns out bf16 [s_q, h_q, d_v], max_logits
float32 [s_q, h_q] (the largest scaled score, -inf for a row with none) and lse float32
[s_q, h_q] (+inf for such a row).
"""
import math

import torch

from .mla import (HEAD_DIM_QK, HEAD_DIM_V, PAGE_BLOCK_SIZE, dequantize_kv_cache_fp8, default_softmax_scale,
                  softmax_weights)
from .quant import FP8_E4M3_MAX, FP8_SCALE_FLOOR, _div, to_e4m3_satfinite

INDEXER_SCALE_BYTES = 4        # one float32 scale per key in the paged indexer cache
METADATA_WIDTH = 2             # schedule_metadata rows: (first query row, first split)
SPLIT_BLOCKS = 4               # paged-logits schedule: pages per split (DeepGEMM: 256 tokens of 64)
STEP_ELEMENTS = 1 << 24        # float32 temporaries per step of the dense references (64 MiB)


def _row_steps(rows: int, per_row: int):
    """Slices of `rows` holding about STEP_ELEMENTS temporaries each (per_row per row)."""
    step = max(1, STEP_ELEMENTS // max(1, per_row))
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


# ----------------------------------------------------------------------------- FP8 keys

def indexer_k_cast_to_fp8(k: torch.Tensor):
    """k float [n, D] -> (e4m3 [n, D], float32 [n]): one scale per key, max(amax, 1e-4) / 448
    (the project's per-token rule, DeepGEMM's test quantizer)."""
    x = k.float()
    amax = x.abs().amax(dim=1).clamp(min=FP8_SCALE_FLOOR) if x.shape[1] else torch.full(
        (x.shape[0],), FP8_SCALE_FLOOR, device=x.device)
    inv = _div(FP8_E4M3_MAX, amax)
    return to_e4m3_satfinite(x * inv[:, None]), _div(amax, FP8_E4M3_MAX)


def quantize_indexer_k_cache(k_cache: torch.Tensor) -> torch.Tensor:
    """float [num_blocks, block_kv, 1, D] -> uint8 [num_blocks, block_kv, 1, D + 4] in
    DeepGEMM's paged layout (per page: the block_kv e4m3 rows, then block_kv float32 scales)."""
    nb, blk, _, d = k_cache.shape
    q8, sf = indexer_k_cast_to_fp8(k_cache.reshape(nb * blk, d))
    packed = torch.cat([q8.view(torch.uint8).reshape(nb, blk * d), sf.view(torch.uint8).reshape(nb, blk * 4)], 1)
    return packed.reshape(nb, blk, 1, d + INDEXER_SCALE_BYTES).contiguous()


def split_indexer_k_cache(kv_cache: torch.Tensor):
    """uint8 [num_blocks, block_kv, 1, D + 4] -> (e4m3 values float32 [num_blocks, block_kv, D],
    scales float32 [num_blocks, block_kv])."""
    nb, blk, _, width = kv_cache.shape
    d = width - INDEXER_SCALE_BYTES
    raw = kv_cache.reshape(nb, blk * width)
    vals = raw[:, :blk * d].contiguous().view(torch.float8_e4m3fn).float().reshape(nb, blk, d)
    return vals, raw[:, blk * d:].contiguous().view(torch.float32)


# ----------------------------------------------------------------------------- logits

def _head_reduce(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, k_scales: torch.Tensor) -> torch.Tensor:
    """q float32 [m, H, D], k [n, D], w [m, H], k_scales [n] -> [m, n]."""
    scores = torch.einsum("mhd,nd->mhn", q, k).relu()
    return (scores * w[:, :, None]).sum(dim=1) * k_scales[None, :]


def _windowed(logits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(logits.shape[1], device=logits.device)[None, :]
    keep = (pos >= lo[:, None].long()) & (pos < hi[:, None].long())
    return torch.where(keep, logits, torch.full_like(logits, -math.inf))


def fp8_mqa_logits(q, k_fp8, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke) -> torch.Tensor:
    """q e4m3 [M, H, D], k_fp8 e4m3 [N, D], k_scales float32 [N], weights float32 [M, H],
    cu_seqlen_ks / cu_seqlen_ke int32 [M] -> logits float32 [M, N] (-inf outside [ks, ke))."""
    m, n = q.shape[0], k_fp8.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=q.device)
    k = k_fp8.float()
    for rows in _row_steps(m, q.shape[1] * n):
        out[rows] = _head_reduce(q[rows].float(), k, weights[rows].float(), k_scales.float())
    return _windowed(out, cu_seqlen_ks, cu_seqlen_ke)


def paged_row_windows(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """int64 [b * next_n]: the end (exclusive) of each query row's window of positions."""
    lens = context_lens.long()
    if lens.dim() == 2:
        return lens.reshape(-1)
    j = torch.arange(next_n, device=lens.device)
    return (lens[:, None] - next_n + j[None, :] + 1).clamp(min=0).reshape(-1)


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len: int) -> torch.Tensor:
    """q e4m3 [b, next_n, H, D]; kv_cache uint8 [num_blocks, block_kv, 1, D + 4]; weights
    float32 [b * next_n, H]; context_lens int32 [b] or [b, next_n]; block_table int32
    [b, max_blocks] -> logits float32 [b * next_n, max_context_len] (-inf outside each row's
    window). The schedule does not change the result: the reference takes none."""
    b, next_n = q.shape[:2]
    vals, scales = split_indexer_k_cache(kv_cache)
    blk = vals.shape[1]
    ends = paged_row_windows(context_lens, next_n)
    out = torch.full((b * next_n, max_context_len), -math.inf, dtype=torch.float32, device=q.device)
    for i in range(b):
        rows = slice(i * next_n, (i + 1) * next_n)
        length = int(ends[rows].max()) if next_n else 0
        if length <= 0:
            continue
        pages = block_table[i, :-(-length // blk)].long()
        k = vals[pages].reshape(-1, vals.shape[2])[:length]
        sf = scales[pages].reshape(-1)[:length]
        out[rows, :length] = _head_reduce(q[i].float(), k, weights[rows].float(), sf)
    zero = torch.zeros_like(ends)
    return _windowed(out, zero, ends)


def paged_mqa_logits_schedule(row_lens, block_kv: int, num_sms: int) -> list:
    """The split schedule as [[first_row, first_split] for each of num_sms + 1 partitions].

    Sequence i has ceil(len_i / (SPLIT_BLOCKS * block_kv)) splits; the total is dealt out
    evenly in order (partition p starts at split p * (total // P) + min(p, total % P));
    row num_sms is [b, 0], the end. len_i is context_lens[i] ([b]) or its row maximum
    ([b, next_n])."""
    split = SPLIT_BLOCKS * block_kv
    segs = [-(-int(n) // split) for n in row_lens]
    total = sum(segs)
    per, extra = divmod(total, num_sms)
    rows, seq, before = [], 0, 0
    for p in range(num_sms):
        start = p * per + min(p, extra)
        while seq < len(segs) and before + segs[seq] <= start:
            before += segs[seq]
            seq += 1
        rows.append([seq, start - before] if seq < len(segs) else [len(segs), 0])
    rows.append([len(segs), 0])
    return rows


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """int32 [num_sms + 1, 2] on context_lens' device (read on the host)."""
    lens = context_lens.long()
    row_lens = (lens.amax(dim=1) if lens.dim() == 2 else lens).tolist()
    rows = paged_mqa_logits_schedule(row_lens, block_kv, num_sms)
    return torch.tensor(rows, dtype=torch.int32, device=context_lens.device).reshape(num_sms + 1, METADATA_WIDTH)


# ----------------------------------------------------------------------------- top-k

def select_topk(logits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, topk: int) -> torch.Tensor:
    """logits float32 [R, N]; row r's window [lo[r], hi[r]) -> int32 [R, topk] positions, largest
    logit first (ties, -inf and NaN logits: lower position first; NaN ranks as -inf), -1 past
    the window's length. Values outside the window are never read (they may be anything)."""
    r, n = logits.shape
    out = torch.full((r, topk), -1, dtype=torch.int32, device=logits.device)
    if n == 0 or r == 0:
        return out
    pos = torch.arange(n, device=logits.device)[None, :]
    inside = (pos >= lo[:, None].long()) & (pos < hi[:, None].long())
    key = logits.float()
    key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
    order = _lexsort_desc(inside.float(), key)[:, :topk]
    used = torch.arange(order.shape[1], device=logits.device)[None, :] < inside.sum(dim=1)[:, None]
    out[:, :order.shape[1]] = torch.where(used, order, torch.full_like(order, -1)).int()
    return out


def _lexsort_desc(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """[R, N] each: indices sorting each row by primary descending, then secondary descending,
    then position ascending (two stable sorts, least significant first)."""
    idx = torch.sort(secondary, dim=1, descending=True, stable=True).indices
    primary = torch.gather(primary, 1, idx)
    return torch.gather(idx, 1, torch.sort(primary, dim=1, descending=True, stable=True).indices)


def topk_indices(logits, cu_seqlen_ks, cu_seqlen_ke, topk: int) -> torch.Tensor:
    """Prefill: logits float32 [M, N] with windows [ks, ke) -> int32 [M, topk] key positions."""
    return select_topk(logits, cu_seqlen_ks, cu_seqlen_ke, topk)


def paged_topk_indices(logits, context_lens, block_table, topk: int) -> torch.Tensor:
    """Decode: logits float32 [b * next_n, L] (rows' windows as fp8_paged_mqa_logits),
    block_table int32 [b, max_blocks] -> int32 [b, next_n, topk] cache indices
    block_table[i, p // 64] * 64 + p % 64, -1 for unused slots."""
    b = block_table.shape[0]
    next_n = logits.shape[0] // b if b else 0
    ends = paged_row_windows(context_lens, next_n)
    pos = select_topk(logits, torch.zeros_like(ends), ends, topk).long().reshape(b, next_n, topk)
    used = pos >= 0
    p = pos.clamp(min=0)
    pages = torch.gather(block_table.long(), 1, (p // PAGE_BLOCK_SIZE).reshape(b, -1)).reshape(p.shape)
    idx = pages * PAGE_BLOCK_SIZE + p % PAGE_BLOCK_SIZE
    return torch.where(used, idx, torch.full_like(idx, -1)).int()


# ----------------------------------------------------------------------------- sparse attention

def _attend(q, kv, valid, scale: float, attn_sink, d_v: int):
    """q float32 [R, h, d]; kv float32 [R, T, d] (rows gathered per query row); valid bool [R, T].
    Returns (out float32 [R, h, d_v], lse [R, h] of the scores alone (+inf when no slot is
    used), max_logits [R, h] (-inf when none))."""
    kv = torch.where(valid[..., None], kv, torch.zeros_like(kv))      # unused slots' bytes never count
    scores = scale * torch.einsum("rhd,rtd->rht", q, kv)
    scores = scores.masked_fill(~valid[:, None, :], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    max_logits = scores.amax(dim=-1) if scores.shape[-1] else torch.full_like(lse, -math.inf)
    empty = lse == -math.inf
    p = softmax_weights(scores, empty, None if attn_sink is None else attn_sink.float()[None, :].expand_as(lse))
    out = p @ kv[..., :d_v]
    lse = torch.where(empty, torch.full_like(lse, math.inf), lse)
    return out, lse, max_logits


def flash_mla_sparse_decode(q, k_cache, indices, softmax_scale=None, attn_sink=None, topk_length=None,
                            head_dim_v: int = HEAD_DIM_V):
    """q bf16 [b, s_q, h_q, 576]; k_cache FP8 [num_blocks, 64, 1, 656]; indices int32
    [b, s_q, topk]; attn_sink float32 [h_q] or None; topk_length int32 [b] or None ->
    (out bf16 [b, s_q, h_q, head_dim_v], lse float32 [b, h_q, s_q])."""
    b, s_q, h_q, _ = q.shape
    topk = indices.shape[2]
    scale = default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    rows = dequantize_kv_cache_fp8(k_cache).reshape(-1, HEAD_DIM_QK)
    idx = indices.long()
    valid = idx != -1
    if topk_length is not None:
        valid &= torch.arange(topk, device=q.device)[None, None, :] < topk_length.long()[:, None, None]
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, s_q, h_q, dtype=torch.float32, device=q.device)
    for i in range(b):
        kv = rows[torch.where(valid[i], idx[i], torch.zeros_like(idx[i]))]          # [s_q, topk, 576]
        o, l, _ = _attend(q[i].float(), kv, valid[i], scale, attn_sink, head_dim_v)
        out[i], lse[i] = o, l
    return out.to(torch.bfloat16), lse.transpose(1, 2).contiguous()


def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = HEAD_DIM_V, attn_sink=None, topk_length=None):
    """q bf16 [s_q, h_q, d_qk]; kv bf16 [s_kv, 1, d_qk]; indices int32 [s_q, 1, topk] ->
    (out bf16 [s_q, h_q, d_v], max_logits float32 [s_q, h_q], lse float32 [s_q, h_q])."""
    s_q, h_q, d_qk = q.shape
    s_kv, topk = kv.shape[0], indices.shape[2]
    idx = indices[:, 0].long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(topk, device=q.device)[None, :] < topk_length.long()[:, None]
    flat = kv[:, 0].float()
    if s_kv == 0:                  # every slot invalid; gather from one zero row instead of none
        flat = flat.new_zeros(1, d_qk)
    out = torch.empty(s_q, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    for rows in _row_steps(s_q, topk * (d_qk + h_q)):
        sel = flat[torch.where(valid[rows], idx[rows], torch.zeros_like(idx[rows]))]   # [rows, topk, d_qk]
        out[rows], lse[rows], max_logits[rows] = _attend(q[rows].float(), sel, valid[rows], float(sm_scale),
                                                         attn_sink, d_v)
    return out.to(torch.bfloat16), max_logits, lse
