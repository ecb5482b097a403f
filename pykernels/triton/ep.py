"""Triton kernels for the local (on-rank) steps of expert-parallel dispatch and combine.

The collective itself (all_to_all_single) stays in pykernels.ep.Buffer; these kernels do
everything around it, with the routing conventions of pykernels.reference.ep:

1. `dispatch_layout`: topk_idx [T, K] -> tokens per rank, tokens per expert (each valid
   top-k slot counts once), is_token_in_rank [T, R]. One launch, no atomics: the first
   programs each count a block of experts over all tokens, the rest each own a block of
   ranks (DeepEP's split of its layout kernel).
2. `send_layout`: is_token_in_rank -> send_idx (the send buffer's source tokens, grouped
   by destination rank, token order within a rank), send_pos [T, R] (each token's row
   in the send buffer, -1 if not sent there) and the per-rank counts. One program per
   rank: a prefix count of the ranks before it, then a running cumsum over its column.
3. `permute`: gathers each sent token into one packed row of int32 words
   (`dispatch_row_format`): payload (bf16, or e4m3 plus its float32 scales), the global
   top-k indices (int32) and the top-k weights, so one all_to_all moves everything.
4. `unpack_received`: splits received rows into recv_x (and scales), turns global
   top-k ids into this rank's local ids (-1 elsewhere, weight 0 there) and counts the
   received slots per local expert. The engine keeps DeepEP's normal-mode order (by
   source rank, then source token): there is no per-expert regrouping to undo.
5. `combine_pack` / `combine_reduce`: the expert side packs bf16 rows plus one float32
   per row, the sum of its local top-k weights added left to right from 0.0; the
   origin side accumulates, per token, row * weight_sum (rounded product, no FMA) from
   each destination rank in ascending rank order in float32, then rounds to bf16 (RNE).
   That is the reference's order, so the bytes equal the torch path's and repeat run
   to run. Only half the bytes of a float32 return path travel.

All kernels are pure copies, integer arithmetic or fixed-order float32 adds: no atomics,
no data-dependent order, so the interpreter (CPU) and the GPU give identical bytes.
`send_layout` reads the per-rank counts back to the host (the collective needs them).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..runtime.hardware import SCALE_BLOCK
from .quant import SOFTWARE_ROUNDING
from .rounding import to_bf16_rne
from .jit_dispatch import jit

SCALE_GROUP = SCALE_BLOCK  # one float32 FP8 scale per 128 columns
ROW_ALIGN_WORDS = 4        # packed rows are padded to 16 bytes


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _launch(kernel, grid, *args, **meta):
    """Every launch of this module goes through here (a test replays them through the
    sm_90 PTX on pykernels.emu)."""
    kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------------------
# 1. layout
# ----------------------------------------------------------------------------------------
@jit
def _layout_kernel(idx_ptr, stride_t, T, E, R, experts_per_rank, n_expert_blocks,
                   per_expert_ptr, per_rank_ptr, in_rank_ptr,
                   K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    # (names differ between the two roles: Triton merges same-named values across branches)
    pid = tl.program_id(0)
    if pid < n_expert_blocks:
        # experts [pid*BLOCK_E, ...): count matching top-k slots over every token
        e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        e_cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            te = t0 + tl.arange(0, BLOCK_T)
            for k in tl.static_range(K):
                ve = tl.load(idx_ptr + te.to(tl.int64) * stride_t + k, mask=te < T, other=-1)
                e_cnt += tl.sum((ve[:, None] == e[None, :]).to(tl.int32), axis=0)
        tl.store(per_expert_ptr + e, e_cnt, mask=e < E)
    else:
        # ranks [(pid-n_expert_blocks)*BLOCK_R, ...): is_token_in_rank and its column sums
        r = (pid - n_expert_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
        for t1 in range(0, T, BLOCK_T):
            tr = t1 + tl.arange(0, BLOCK_T)
            hit = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.int32)
            for j in tl.static_range(K):
                vr = tl.load(idx_ptr + tr.to(tl.int64) * stride_t + j, mask=tr < T, other=-1)
                owner = tl.where(vr >= 0, vr // experts_per_rank, -1)
                hit = tl.maximum(hit, (owner[:, None] == r[None, :]).to(tl.int32))
            tl.store(in_rank_ptr + tr.to(tl.int64)[:, None] * R + r[None, :], hit.to(tl.uint8),
                     mask=(tr < T)[:, None] & (r < R)[None, :])
            r_cnt += tl.sum(hit, axis=0)
        tl.store(per_rank_ptr + r, r_cnt, mask=r < R)


def _check_topk_idx(topk_idx, num_experts: int, num_ranks: int):
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int64, torch.int32):
        got = topk_idx.dtype if isinstance(topk_idx, torch.Tensor) else type(topk_idx).__name__
        raise TypeError(f"topk_idx: expected an int64 or int32 tensor, got {got}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx: expected shape [num_tokens, topk], got {list(topk_idx.shape)}")
    if num_ranks <= 0 or num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a positive multiple of num_ranks {num_ranks}, got {num_experts}")


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """topk_idx int64/int32 [T, K] (-1 = no expert; values are not range-checked here:
    an id outside [0, E) is simply not counted) -> (num_tokens_per_rank int32 [R],
    num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]); equal to
    pykernels.reference.ep.dispatch_layout."""
    _check_topk_idx(topk_idx, num_experts, num_ranks)
    T, K = topk_idx.shape
    dev = topk_idx.device
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=dev)
    in_rank = torch.empty(T, num_ranks, dtype=torch.bool, device=dev)
    if K == 0:
        return per_rank.zero_(), per_expert.zero_(), in_rank.zero_()
    idx = topk_idx if topk_idx.stride(1) == 1 else topk_idx.contiguous()
    block_e, block_r = min(64, _np2(num_experts)), min(64, _np2(num_ranks))
    n_eb, n_rb = triton.cdiv(num_experts, block_e), triton.cdiv(num_ranks, block_r)
    _launch(
        _layout_kernel, (n_eb + n_rb,), idx, idx.stride(0), T, num_experts, num_ranks, num_experts // num_ranks, n_eb,
        per_expert, per_rank, in_rank.view(torch.uint8),
        K=K, BLOCK_T=64, BLOCK_E=block_e, BLOCK_R=block_r)
    return per_rank, per_expert, in_rank


# ----------------------------------------------------------------------------------------
# 2. send layout (which token goes to which row of the send buffer)
# ----------------------------------------------------------------------------------------
@jit
def _send_layout_kernel(in_rank_ptr, stride_t, stride_r, T, R,
                        send_idx_ptr, send_pos_ptr, counts_ptr,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_R)
    # pass 1: tokens sent to each rank <= r -> this rank's offset and count
    col_cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t < T)[:, None] & (cols <= r)[None, :] & (cols < R)[None, :]
        f = tl.load(in_rank_ptr + t.to(tl.int64)[:, None] * stride_t + cols[None, :] * stride_r,
                    mask=m, other=0)
        col_cnt += tl.sum((f != 0).to(tl.int32), axis=0)
    offset = tl.sum(tl.where(cols < r, col_cnt, 0), axis=0)
    tl.store(counts_ptr + r, tl.sum(tl.where(cols == r, col_cnt, 0), axis=0))
    # pass 2: running exclusive cumsum over this rank's column, in token order
    carry = offset
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        f = (tl.load(in_rank_ptr + t.to(tl.int64) * stride_t + r * stride_r, mask=t < T, other=0) != 0)
        fi = f.to(tl.int32)
        pos = carry + tl.cumsum(fi, axis=0) - fi
        tl.store(send_idx_ptr + pos, t.to(tl.int64), mask=f)
        tl.store(send_pos_ptr + t.to(tl.int64) * R + r, tl.where(f, pos, -1), mask=t < T)
        carry += tl.sum(fi, axis=0)


def send_layout(is_token_in_rank: torch.Tensor):
    """is_token_in_rank bool [T, R] -> (send_idx int64 [S]: source token of each send
    row, grouped by destination rank, token order within a rank; send_pos int32 [T, R]:
    each token's send row per rank, -1 where not sent; send_counts: list of R ints).
    Reads the counts back to the host (one sync; the collective needs them anyway)."""
    if not isinstance(is_token_in_rank, torch.Tensor) or is_token_in_rank.dtype != torch.bool \
            or is_token_in_rank.dim() != 2:
        raise TypeError("is_token_in_rank: expected a bool tensor [num_tokens, num_ranks], got "
                        f"{getattr(is_token_in_rank, 'dtype', type(is_token_in_rank).__name__)} "
                        f"{list(getattr(is_token_in_rank, 'shape', []))}")
    T, R = is_token_in_rank.shape
    dev = is_token_in_rank.device
    if T == 0 or R == 0:
        return (torch.empty(0, dtype=torch.int64, device=dev),
                torch.empty(T, R, dtype=torch.int32, device=dev), [0] * R)
    send_idx = torch.empty(T * R, dtype=torch.int64, device=dev)  # upper bound, sliced below
    send_pos = torch.empty(T, R, dtype=torch.int32, device=dev)
    counts = torch.empty(R, dtype=torch.int32, device=dev)
    flags = is_token_in_rank.view(torch.uint8)
    block_r = _np2(R)
    _launch(_send_layout_kernel, (R,), flags, flags.stride(0), flags.stride(1), T, R, send_idx, send_pos,
            counts, BLOCK_T=max(16, min(256, 4096 // block_r)), BLOCK_R=block_r)
    send_counts = counts.tolist()
    return send_idx[:sum(send_counts)], send_pos, send_counts


# ----------------------------------------------------------------------------------------
# 3./4. dispatch payload: pack rows for the collective, unpack on the receiver
# ----------------------------------------------------------------------------------------
class DispatchRowFormat(NamedTuple):
    """Word (int32) offsets of one packed dispatch row. payload: bf16 H/2 words or e4m3
    H/4 words; scales: H/128 float32 words (FP8 only); topk_idx: K int32 global expert
    ids; topk_weights: K float32; then zero padding to a multiple of 4 words."""
    x_words: int
    sf_off: int
    sf_words: int
    idx_off: int
    w_off: int
    num_topk: int
    pad_off: int
    words: int


def dispatch_row_format(hidden: int, fp8: bool, num_topk: int) -> DispatchRowFormat:
    x_words = hidden // 4 if fp8 else hidden // 2
    sf_words = hidden // SCALE_GROUP if fp8 else 0
    idx_off = x_words + sf_words
    w_off = idx_off + num_topk
    pad_off = w_off + num_topk
    words = triton.cdiv(pad_off, ROW_ALIGN_WORDS) * ROW_ALIGN_WORDS
    return DispatchRowFormat(x_words, x_words, sf_words, idx_off, w_off, num_topk, pad_off, words)


@jit
def _copy_words(dst_ptr, dst_stride, dst_off, rows, src_ptr, src_stride, src_rows, row_ok, n_words,
                BLOCK_W: tl.constexpr):
    for c0 in range(0, n_words, BLOCK_W):
        c = c0 + tl.arange(0, BLOCK_W)
        m = row_ok[:, None] & (c < n_words)[None, :]
        v = tl.load(src_ptr + src_rows[:, None] * src_stride + c[None, :], mask=m)
        tl.store(dst_ptr + rows[:, None] * dst_stride + dst_off + c[None, :], v, mask=m)


@jit
def _pack_kernel(send_idx_ptr, S, out_ptr, W,
                 x_ptr, x_stride, XW, sf_ptr, sf_stride, SF_OFF, SW,
                 idx_ptr, idx_stride, w_ptr, w_stride, IDX_OFF, W_OFF, K, PAD_OFF,
                 HAS_SF: tl.constexpr, HAS_TOPK: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_SF: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = p < S
    p64 = p.to(tl.int64)
    src = tl.load(send_idx_ptr + p, mask=ok, other=0).to(tl.int64)
    _copy_words(out_ptr, W, 0, p64, x_ptr, x_stride, src, ok, XW, BLOCK_W)
    if HAS_SF:
        _copy_words(out_ptr, W, SF_OFF, p64, sf_ptr, sf_stride, src, ok, SW, BLOCK_SF)
    if HAS_TOPK:
        k = tl.arange(0, BLOCK_K)
        m = ok[:, None] & (k < K)[None, :]
        e = tl.load(idx_ptr + src[:, None] * idx_stride + k[None, :], mask=m, other=-1)
        tl.store(out_ptr + p64[:, None] * W + IDX_OFF + k[None, :], e.to(tl.int32), mask=m)
        wb = tl.load(w_ptr + src[:, None] * w_stride + k[None, :], mask=m, other=0)
        tl.store(out_ptr + p64[:, None] * W + W_OFF + k[None, :], wb, mask=m)
    c = tl.arange(0, 4)
    tl.store(out_ptr + p64[:, None] * W + PAD_OFF + c[None, :], tl.zeros([BLOCK_S, 4], dtype=tl.int32),
             mask=ok[:, None] & (c < W - PAD_OFF)[None, :])


def _words(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with unit column stride as int32 words (its row bytes must be a
    multiple of 4)."""
    if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 4:
        t = t.contiguous()
    return t.view(torch.int32)


def _split_x(x):
    if isinstance(x, tuple):
        return x[0], x[1], True
    return x, None, False


def permute(x, send_idx: torch.Tensor, topk_idx: torch.Tensor = None, topk_weights: torch.Tensor = None):
    """Gather the tokens send_idx names into packed send rows, int32 [S, W] in
    dispatch_row_format(H, fp8, K). x: bf16 [T, H] or (e4m3 [T, H], float32 [T, H/128]);
    topk_idx int64/int32 [T, K] with topk_weights float32 [T, K] (both or neither).
    Inputs are assumed validated (pykernels.ep.Buffer does that)."""
    data, scales, fp8 = _split_x(x)
    T, H = data.shape
    K = 0 if topk_idx is None else topk_idx.shape[1]
    fmt = dispatch_row_format(H, fp8, K)
    S = send_idx.numel()
    out = torch.empty(S, fmt.words, dtype=torch.int32, device=data.device)
    if S == 0:
        return out
    xw = _words(data)
    sf = _words(scales) if fp8 else xw
    idx = topk_idx if K else xw
    if K and idx.stride(1) != 1:
        idx = idx.contiguous()
    w = _words(topk_weights) if K else xw
    block_s = 16
    _launch(
        _pack_kernel, (triton.cdiv(S, block_s),), send_idx, S, out, fmt.words,
        xw, xw.stride(0), fmt.x_words, sf, sf.stride(0), fmt.sf_off, fmt.sf_words,
        idx, idx.stride(0), w, w.stride(0), fmt.idx_off, fmt.w_off, K, fmt.pad_off,
        HAS_SF=fp8, HAS_TOPK=K > 0, BLOCK_S=block_s, BLOCK_W=min(512, _np2(fmt.x_words)),
        BLOCK_SF=_np2(fmt.sf_words), BLOCK_K=_np2(K))
    return out


@jit
def _unpack_kernel(buf_ptr, N, W, x_out_ptr, XW, sf_out_ptr, SF_OFF, SW,
                   idx_out_ptr, w_out_ptr, IDX_OFF, W_OFF, K,
                   first_expert, experts_per_rank, counts_ptr, n_row_blocks,
                   HAS_SF: tl.constexpr, HAS_TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_SF: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    if pid < n_row_blocks:  # (names differ from the other role's: Triton merges them across branches)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = n < N
        n64 = n.to(tl.int64)
        # payload and scales: rows of the receive buffer -> contiguous outputs
        for c0 in range(0, XW, BLOCK_W):
            c = c0 + tl.arange(0, BLOCK_W)
            m = ok[:, None] & (c < XW)[None, :]
            tl.store(x_out_ptr + n64[:, None] * XW + c[None, :],
                     tl.load(buf_ptr + n64[:, None] * W + c[None, :], mask=m), mask=m)
        if HAS_SF:
            c = tl.arange(0, BLOCK_SF)
            m = ok[:, None] & (c < SW)[None, :]
            tl.store(sf_out_ptr + n64[:, None] * SW + c[None, :],
                     tl.load(buf_ptr + n64[:, None] * W + SF_OFF + c[None, :], mask=m), mask=m)
        if HAS_TOPK:
            k = tl.arange(0, BLOCK_K)
            m = ok[:, None] & (k < K)[None, :]
            g = tl.load(buf_ptr + n64[:, None] * W + IDX_OFF + k[None, :], mask=m, other=-1)
            local = g - first_expert
            mine = (g >= 0) & (local >= 0) & (local < experts_per_rank)
            tl.store(idx_out_ptr + n64[:, None] * K + k[None, :], tl.where(mine, local, -1).to(tl.int64), mask=m)
            wb = tl.load(buf_ptr + n64[:, None] * W + W_OFF + k[None, :], mask=m, other=0)
            tl.store(w_out_ptr + n64[:, None] * K + k[None, :], tl.where(mine, wb, 0), mask=m)  # +0.0 bits
    else:
        # received top-k slots per local expert, over every row (no atomics)
        e = (pid - n_row_blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
        for r0 in range(0, N, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            for j in range(0, K):
                ge = tl.load(buf_ptr + rows.to(tl.int64) * W + IDX_OFF + j, mask=rows < N, other=-1)
                match = (ge >= 0)[:, None] & ((ge - first_expert)[:, None] == e[None, :])
                e_cnt += tl.sum(match.to(tl.int32), axis=0)
        tl.store(counts_ptr + e, e_cnt, mask=e < experts_per_rank)


def unpack_received(packed: torch.Tensor, hidden: int, fp8: bool, num_topk: int,
                    first_expert: int = 0, experts_per_rank: int = 1):
    """Received rows int32 [N, W] (dispatch_row_format(hidden, fp8, num_topk)) ->
    (recv_x: bf16 [N, H] or (e4m3 [N, H], float32 [N, H/128]), recv_topk_idx int64
    [N, K] local expert ids (-1 where the expert is not in [first_expert,
    first_expert + experts_per_rank)), recv_topk_weights float32 [N, K] (0 there),
    num_recv_tokens_per_expert int32 [experts_per_rank] (received top-k slots per local
    expert)); the last three are None when num_topk == 0."""
    fmt = dispatch_row_format(hidden, fp8, num_topk)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != fmt.words:
        raise ValueError(f"packed: expected int32 [N, {fmt.words}], got {packed.dtype} {list(packed.shape)}")
    N, dev = packed.shape[0], packed.device
    data = torch.empty(N, hidden, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
    scales = torch.empty(N, fmt.sf_words, dtype=torch.float32, device=dev) if fp8 else None
    K = num_topk
    idx = torch.empty(N, K, dtype=torch.int64, device=dev) if K else None
    w = torch.empty(N, K, dtype=torch.float32, device=dev) if K else None
    counts = torch.zeros(experts_per_rank, dtype=torch.int32, device=dev) if K else None
    recv_x = (data, scales) if fp8 else data
    if N == 0:
        return recv_x, idx, w, counts
    block_n, block_e = 16, min(64, _np2(experts_per_rank))
    n_rows = triton.cdiv(N, block_n)
    n_e = triton.cdiv(experts_per_rank, block_e) if K else 0
    xw = data.view(torch.int32)
    _launch(
        _unpack_kernel, (n_rows + n_e,), packed, N, fmt.words, xw, fmt.x_words,
        scales.view(torch.int32) if fp8 else xw, fmt.sf_off, fmt.sf_words,
        idx if K else xw, w.view(torch.int32) if K else xw, fmt.idx_off, fmt.w_off, K,
        first_expert, experts_per_rank, counts if K else xw, n_rows,
        HAS_SF=fp8, HAS_TOPK=K > 0, BLOCK_N=block_n, BLOCK_W=min(512, _np2(fmt.x_words)),
        BLOCK_SF=_np2(fmt.sf_words), BLOCK_K=_np2(K), BLOCK_E=block_e)
    return recv_x, idx, w, counts


# ----------------------------------------------------------------------------------------
# 5. combine
# ----------------------------------------------------------------------------------------
class CombineRowFormat(NamedTuple):
    """Word offsets of one packed combine row: bf16 payload H/2 words, then (weighted)
    one float32 weight sum, then zero padding to a multiple of 4 words."""
    x_words: int
    w_off: int
    weighted: bool
    pad_off: int
    words: int


def combine_row_format(hidden: int, weighted: bool) -> CombineRowFormat:
    x_words = hidden // 2
    pad_off = x_words + (1 if weighted else 0)
    return CombineRowFormat(x_words, x_words, weighted, pad_off,
                            triton.cdiv(pad_off, ROW_ALIGN_WORDS) * ROW_ALIGN_WORDS)


@jit
def _combine_pack_kernel(x_ptr, x_stride, XW, w_ptr, w_stride, K, out_ptr, W, N, W_OFF, PAD_OFF,
                         WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = n < N
    n64 = n.to(tl.int64)
    _copy_words(out_ptr, W, 0, n64, x_ptr, x_stride, n64, ok, XW, BLOCK_W)
    if WEIGHTED:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, K):  # left to right from 0.0: the reference's order
            s = s + tl.load(w_ptr + n64 * w_stride + k, mask=ok, other=0.0)
        tl.store(out_ptr + n64 * W + W_OFF, s.to(tl.int32, bitcast=True), mask=ok)
    c = tl.arange(0, 4)
    tl.store(out_ptr + n64[:, None] * W + PAD_OFF + c[None, :], tl.zeros([BLOCK_N, 4], dtype=tl.int32),
             mask=ok[:, None] & (c < W - PAD_OFF)[None, :])


def combine_pack(x: torch.Tensor, topk_weights: torch.Tensor = None) -> torch.Tensor:
    """Expert side of combine: bf16 rows [N, H] (+ float32 [N, K] local weights) ->
    int32 [N, W] in combine_row_format(H, weighted)."""
    N, H = x.shape
    weighted = topk_weights is not None
    fmt = combine_row_format(H, weighted)
    out = torch.empty(N, fmt.words, dtype=torch.int32, device=x.device)
    if N == 0:
        return out
    xw = _words(x)
    w = topk_weights if weighted else x
    if weighted and w.stride(1) != 1:
        w = w.contiguous()
    block_n = 16
    _launch(
        _combine_pack_kernel, (triton.cdiv(N, block_n),), xw, xw.stride(0), fmt.x_words,
        w, w.stride(0), w.shape[1] if weighted else 0, out, fmt.words, N, fmt.w_off, fmt.pad_off,
        WEIGHTED=weighted, BLOCK_N=block_n, BLOCK_W=min(512, _np2(fmt.x_words)))
    return out


@jit
def _combine_reduce_kernel(back_ptr, back_w_ptr, W, W_OFF, send_pos_ptr, T, R, H, out_ptr, out_stride,
                           WEIGHTED: tl.constexpr, SOFT: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok, h_ok = t < T, h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for r in range(0, R):  # ascending destination rank: the fixed summation order
        pos = tl.load(send_pos_ptr + t.to(tl.int64) * R + r, mask=t_ok, other=-1)
        present = pos >= 0
        p64 = tl.where(present, pos, 0).to(tl.int64)
        v = tl.load(back_ptr + p64[:, None] * (2 * W) + h[None, :], mask=present[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        if WEIGHTED:
            ws = tl.load(back_w_ptr + p64 * W + W_OFF, mask=present, other=0.0)
            v = v * ws[:, None]
        acc += tl.where(present[:, None], v, 0.0)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * out_stride + h[None, :], to_bf16_rne(acc, SOFT),
             mask=t_ok[:, None] & h_ok[None, :])


def combine_reduce(back: torch.Tensor, send_pos: torch.Tensor, hidden: int, weighted: bool,
                   out: torch.Tensor = None) -> torch.Tensor:
    """Origin side of combine: returned rows int32 [S, W] (combine_row_format(hidden,
    weighted), in send-buffer order) and send_pos int32 [T, R] -> bf16 [T, H]: per token
    the float32 sum over destination ranks r = 0..R-1 of row (times its weight sum),
    rounded to bf16 once (RNE)."""
    fmt = combine_row_format(hidden, weighted)
    if back.dtype != torch.int32 or back.dim() != 2 or back.shape[1] != fmt.words:
        raise ValueError(f"back: expected int32 [S, {fmt.words}], got {back.dtype} {list(back.shape)}")
    T, R = send_pos.shape
    if out is None:
        out = torch.empty(T, hidden, dtype=torch.bfloat16, device=back.device)
    if T == 0:
        return out
    if back.shape[0] == 0:
        return out.zero_()
    pos = send_pos if send_pos.is_contiguous() else send_pos.contiguous()
    block_t, block_h = 16, min(256, _np2(hidden))
    # enable_fp_fusion=False: the product must round before the add, as in the reference
    _launch(
        _combine_reduce_kernel, (triton.cdiv(T, block_t), triton.cdiv(hidden, block_h)),
        back.view(torch.bfloat16), back.view(torch.float32), fmt.words, fmt.w_off, pos, T, R, hidden,
        out, out.stride(0), WEIGHTED=weighted, SOFT=SOFTWARE_ROUNDING, BLOCK_T=block_t, BLOCK_H=block_h,
        enable_fp_fusion=False)
    return out


__all__ = ["dispatch_layout", "send_layout", "permute", "unpack_received", "combine_pack",
           "combine_reduce", "dispatch_row_format", "combine_row_format", "DispatchRowFormat",
           "CombineRowFormat"]
