"""Reference MLA decode attention (FlashMLA's interface), float32 math.

Shapes (DeepSeek-V3 multi-head latent attention, absorbed form):
- q            [b, s_q, h_q, 576] bf16: 512 latent ("NoPE") + 64 RoPE columns per head.
- k_cache      [num_blocks, 64, h_kv, 576] bf16, pages of 64 tokens; the first 512
               columns of each key are also its value (head_dim_v = 512).
- block_table  [b, max_blocks] int32: page ids of each sequence, in token order.
- cache_seqlens[b] int32: tokens in the cache of each sequence (the s_q new ones included).
- out          [b, s_q, h_q, 512] bf16; softmax_lse [b, h_q, s_q] float32.

Masking: with causal=True, new token i (0 <= i < s_q) sees keys [0, seqlen - s_q + i];
otherwise every query sees keys [0, seqlen). A query row that sees no key at all
(seqlen 0, or seqlen < s_q with causal) gets out = 0 and softmax_lse = +inf, the
FlashAttention-family convention (exp(-lse) = 0 is the row's total weight).
softmax_lse is the natural log of sum(exp(scale * q.k)) over the visible keys.

FP8 KV cache (FlashMLA's newer per-token layout): each token is 656 bytes,
    [0, 512)   512 e4m3 latent values, quantized in 4 groups of 128 columns
    [512, 528) 4 float32 scales (little-endian), one per group: value = e4m3 * scale
    [528, 656) 64 bf16 RoPE columns, stored as they are
packed as a uint8 (or float8_e4m3fn, same bytes) tensor [num_blocks, 64, h_kv, 656].
Scales follow FlashMLA's quantizer for this layout: scale = max(amax / 448, 1e-4) rounded up
to a power of two, q = e4m3_rne(x / scale) (an exact division, rounded once), so every
dequantized value e4m3 * scale is exact in bf16 too. A group holding NaN gets a NaN scale,
one holding +-Inf an Inf scale.
"""
import math

import torch

from .quant import _scale_of, to_e4m3_satfinite

HEAD_DIM_QK = 576            # latent 512 + RoPE 64
HEAD_DIM_V = 512             # the latent part doubles as V
ROPE_DIM = HEAD_DIM_QK - HEAD_DIM_V
PAGE_BLOCK_SIZE = 64         # tokens per KV-cache page
FP8_GROUP = 128              # columns per FP8 scale
FP8_NUM_SCALES = HEAD_DIM_V // FP8_GROUP
FP8_BYTES_PER_TOKEN = HEAD_DIM_V + 4 * FP8_NUM_SCALES + 2 * ROPE_DIM   # 656
METADATA_SIZE = 8            # int32 per row of tile_scheduler_metadata
# The columns of a metadata row (docs/mla.md; the kernels index them in this order).
METADATA_COLUMNS = ("first_batch", "first_block", "last_batch", "last_block_end", "first_split",
                    "num_pieces", "first_seqlen", "last_seqlen")
MAX_SEQLEN = 2**31 - 1       # cache_seqlens are int32
FIXED_SPLIT_COST = 5         # scheduler: cost of one split, in KV blocks (docs/mla.md)


def default_softmax_scale() -> float:
    return HEAD_DIM_QK ** -0.5


# ----------------------------------------------------------------------------- FP8 cache

def is_fp8_cache(k_cache: torch.Tensor) -> bool:
    return k_cache.dtype in (torch.uint8, torch.float8_e4m3fn) and k_cache.shape[-1] == FP8_BYTES_PER_TOKEN


FP8_CACHE_SCALE_FLOOR = 1e-4  # FlashMLA's quantizer floors the scale (amax / 448), not amax


def fp8_cache_scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales of the FP8 cache from group amaxes: max(amax / 448, 1e-4) rounded up to
    a power of two (exactly: frexp, not a rounded log2); NaN and Inf stay."""
    sf = _scale_of(amax).clamp(min=FP8_CACHE_SCALE_FLOOR)
    mant, exp = torch.frexp(sf)                       # sf = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)      # a power of two stays
    return torch.where(torch.isfinite(sf), torch.ldexp(torch.ones_like(sf), exp), sf)


def quantize_kv_cache_fp8(k_cache: torch.Tensor) -> torch.Tensor:
    """bf16 [num_blocks, 64, h_kv, 576] -> uint8 [num_blocks, 64, h_kv, 656] (layout above)."""
    lead = k_cache.shape[:-1]
    flat = k_cache.reshape(-1, HEAD_DIM_QK)
    groups = flat[:, :HEAD_DIM_V].float().reshape(-1, FP8_NUM_SCALES, FP8_GROUP)
    sf = fp8_cache_scales(groups.abs().amax(dim=2))   # amax propagates NaN
    q8 = to_e4m3_satfinite((groups / sf[:, :, None]).reshape(-1, HEAD_DIM_V))
    rope = flat[:, HEAD_DIM_V:].to(torch.bfloat16).contiguous()
    packed = torch.cat([q8.view(torch.uint8), sf.contiguous().view(torch.uint8), rope.view(torch.uint8)], dim=1)
    return packed.reshape(*lead, FP8_BYTES_PER_TOKEN).contiguous()


def dequantize_kv_cache_fp8(k_cache_fp8: torch.Tensor) -> torch.Tensor:
    """uint8/float8_e4m3fn [..., 656] -> float32 [..., 576]: e4m3 * scale, RoPE as stored."""
    lead = k_cache_fp8.shape[:-1]
    raw = k_cache_fp8.reshape(-1, FP8_BYTES_PER_TOKEN).view(torch.uint8)
    q8 = raw[:, :HEAD_DIM_V].contiguous().view(torch.float8_e4m3fn).float()
    sf = raw[:, HEAD_DIM_V:HEAD_DIM_V + 4 * FP8_NUM_SCALES].contiguous().view(torch.float32)
    rope = raw[:, HEAD_DIM_V + 4 * FP8_NUM_SCALES:].contiguous().view(torch.bfloat16).float()
    latent = (q8.view(-1, FP8_NUM_SCALES, FP8_GROUP) * sf[:, :, None]).view(-1, HEAD_DIM_V)
    return torch.cat([latent, rope], dim=1).reshape(*lead, HEAD_DIM_QK)


# ----------------------------------------------------------------------------- attention

def _gather(cache_f32: torch.Tensor, block_table_row, seqlen: int) -> torch.Tensor:
    """[seqlen, h_kv, 576] float32 keys of one sequence, read through its page table."""
    nblk = -(-seqlen // PAGE_BLOCK_SIZE)
    pages = cache_f32[block_table_row[:nblk].long()]           # [nblk, 64, h_kv, 576]
    return pages.reshape(nblk * PAGE_BLOCK_SIZE, *cache_f32.shape[2:])[:seqlen]


def softmax_weights(scores, empty, sink=None):
    """exp(scores - max) / its row sum (+ exp(sink - max)): 0 on empty rows. Normalised by the
    sum, not by exp(-lse): at |scores| ~ 1e8 and beyond lse's rounding step exceeds log(2), and
    a maximum held twice would weigh 2 (docs/numerics.md)."""
    m = scores.amax(dim=-1, keepdim=True) if scores.shape[-1] else torch.zeros_like(scores[..., :1])
    m = torch.where(empty[..., None], torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    total = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink[..., None] - m)
    return torch.where(empty[..., None], torch.zeros_like(scores), e / total)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v=HEAD_DIM_V,
                           softmax_scale=None, causal=False):
    """-> (out bf16 [b, s_q, h_q, head_dim_v], softmax_lse float32 [b, h_q, s_q]).

    k_cache may be bf16 [.., 576] or the FP8 layout [.., 656] (dequantized first).
    h_q must be a multiple of h_kv (head h uses KV head h // (h_q // h_kv)).
    """
    b, s_q, h_q, d = q.shape
    scale = default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    cache = dequantize_kv_cache_fp8(k_cache) if is_fp8_cache(k_cache) else k_cache.float()
    h_kv = cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    seqlens = cache_seqlens.tolist()
    for i in range(b):
        L = int(seqlens[i])
        if L <= 0:
            continue
        kv = _gather(cache, block_table[i], L)                   # [L, h_kv, 576]
        kv = kv.repeat_interleave(group, dim=1).transpose(0, 1)  # [h_q, L, 576]
        qi = q[i].float().transpose(0, 1)                        # [h_q, s_q, 576]
        scores = scale * (qi @ kv.transpose(1, 2))               # [h_q, s_q, L]
        if causal:
            last = L - s_q + torch.arange(s_q, device=q.device)  # last visible key per token
            visible = torch.arange(L, device=q.device)[None, :] <= last[:, None]
            scores = scores.masked_fill(~visible[None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)                # [h_q, s_q]; -inf when empty
        # A row with no visible key gives 0; a row whose scores hold NaN / +inf gives NaN in
        # every column, as the kernels' online softmax does (docs/numerics.md).
        empty = row_lse == -math.inf
        p = softmax_weights(scores, empty)
        o = p @ kv[..., :head_dim_v]                             # [h_q, s_q, dv]
        out[i] = o.transpose(0, 1)
        lse[i] = torch.where(torch.isfinite(row_lse), row_lse, torch.full_like(row_lse, math.inf))
    return out.to(torch.bfloat16), lse


# ----------------------------------------------------------------------------- scheduler

def num_blocks_of(seqlen: int) -> int:
    return -(-max(int(seqlen), 0) // PAGE_BLOCK_SIZE)


def check_schedule_inputs(seqlens, num_sm_parts) -> list:
    """seqlens as a list of ints after checking what the schedule can represent: every
    length in [0, 2^31 - 1] (int32 tokens; its block count then fits int32 too) and
    num_sm_parts >= 1. Raises ValueError naming the argument."""
    if isinstance(num_sm_parts, bool) or not isinstance(num_sm_parts, int) or num_sm_parts < 1:
        raise ValueError(f"num_sm_parts: expected an int >= 1, got {num_sm_parts!r}")
    seqlens = [int(L) for L in seqlens]
    for i, L in enumerate(seqlens):
        if not 0 <= L <= MAX_SEQLEN:
            raise ValueError(f"cache_seqlens: expected values in [0, {MAX_SEQLEN}], got {L} (batch {i})")
    return seqlens


def schedule(seqlens, num_sm_parts: int, fixed_cost: int = FIXED_SPLIT_COST):
    """The split-KV schedule as plain Python lists (see docs/mla.md for the rule).

    Returns (rows, num_splits): rows[p] = [first_batch, first_block, last_batch,
    last_block_end, first_split, num_pieces, first_seqlen, last_seqlen] for SM partition
    p (METADATA_COLUMNS; the two seqlens are the tokens of first_batch and last_batch this
    schedule was made for, which the decode kernels compare with the seqlens they are
    called with), num_splits the [b + 1] prefix counts of splits (pieces) per sequence.
    An empty row is [b, 0, b, 0, total splits, 0, 0, 0]: it starts where the work ends.

    Cost of a piece = its KV blocks + fixed_cost; total = sum over sequences of
    (blocks + fixed_cost); each partition's capacity is ceil(total / P) + fixed_cost.
    Partitions are filled in order, sequences taken in order; a sequence that does not
    fit in what is left is split there (at least one block taken), its remainder opens
    the next partition. Every partition then consumes >= ceil(total / P) of the
    original cost, so P partitions always suffice and none exceeds the capacity.
    Raises ValueError for a length outside [0, 2^31 - 1] or num_sm_parts < 1.
    """
    seqlens = check_schedule_inputs(seqlens, num_sm_parts)
    nblks = [num_blocks_of(L) for L in seqlens]
    b = len(nblks)
    total = sum(n + fixed_cost for n in nblks)
    cap = -(-total // num_sm_parts) + fixed_cost if b else 0
    rows, num_splits = [], [0] * (b + 1)
    cur_b = cur_blk = split = 0
    for _ in range(num_sm_parts):
        left = cap
        row = [cur_b, cur_blk, cur_b, cur_blk, split, 0, 0, 0]
        while cur_b < b and left > 0:
            rest = nblks[cur_b] - cur_blk
            if left >= rest + fixed_cost:
                take = rest
            elif left > fixed_cost:
                take = left - fixed_cost
            else:
                break
            if cur_blk == 0:
                num_splits[cur_b] = split
            split += 1
            row[5] += 1
            row[2], row[3] = cur_b, cur_blk + take
            left -= take + fixed_cost
            cur_blk += take
            if cur_blk == nblks[cur_b]:
                cur_b, cur_blk = cur_b + 1, 0
        if row[5]:
            row[6], row[7] = seqlens[row[0]], seqlens[row[2]]
        rows.append(row)
    assert cur_b == b, "scheduler left work unassigned (capacity rule broken)"
    num_splits[b] = split
    return rows, num_splits


def get_mla_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int, fixed_cost: int = FIXED_SPLIT_COST):
    """(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1]) on
    cache_seqlens' device (computed on the host: this reads cache_seqlens)."""
    rows, num_splits = schedule(cache_seqlens.tolist(), num_sm_parts, fixed_cost)
    dev = cache_seqlens.device
    meta = torch.tensor(rows, dtype=torch.int32, device=dev).reshape(num_sm_parts, METADATA_SIZE)
    return meta, torch.tensor(num_splits, dtype=torch.int32, device=dev)
