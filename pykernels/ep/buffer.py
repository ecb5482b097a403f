"""Expert-parallel dispatch/combine over torch.distributed (DeepEP's V1 interface shape).

This is the engine path: any backend with all_to_all_single (gloo on CPU processes,
NCCL on GPUs, across nodes). Payloads travel as bytes, so bf16 and fp8 move bit-exactly
on every backend. Routing conventions are in pykernels.reference.ep.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..reference.ep import dispatch_layout, localize_topk

SUPPORTED_HIDDEN_MULTIPLE = 128   # FP8 scales cover 128 columns
MAX_HIDDEN = 16384
MAX_TOPK = 16


@dataclass
class DispatchHandle:
    """Everything needed to repeat a dispatch layout or to combine back.

    send_idx int64 [S]: the source tokens sent, grouped by destination rank;
    send_counts / recv_counts: rows sent to / received from each rank;
    recv_src_idx int64 [N]: token index at its source of each received row;
    num_tokens: tokens on this rank before dispatch."""
    send_idx: torch.Tensor
    send_counts: list
    recv_counts: list
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_tokens: int


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> uint8 [rows, row_bytes] (explicit sizes: rows may be 0)."""
    t = t.contiguous()
    row = t.element_size() * (t.numel() // t.shape[0] if t.shape[0] else _inner_numel(t))
    return t.view(torch.uint8).reshape(t.shape[0], row)


def _inner_numel(t: torch.Tensor) -> int:
    n = 1
    for d in t.shape[1:]:
        n *= d
    return n


def _from_bytes(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.view(like.dtype).reshape((b.shape[0],) + tuple(like.shape[1:]))


class Buffer:
    """Communication buffer for one process group.

    group: a torch.distributed ProcessGroup (None = the default group). The byte-size
    arguments of DeepEP's Buffer are accepted for interface compatibility; this engine
    path allocates per call.
    """

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("Buffer: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.low_latency_mode = low_latency_mode

    # -- validation ---------------------------------------------------------------------
    def _check_topk(self, topk_idx, num_experts, num_tokens=None):
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64:
            got = topk_idx.dtype if isinstance(topk_idx, torch.Tensor) else type(topk_idx).__name__
            raise TypeError(f"topk_idx: expected an int64 tensor, got {got}")
        if topk_idx.dim() != 2:
            raise ValueError(f"topk_idx: expected shape [num_tokens, topk], got {list(topk_idx.shape)}")
        if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
            raise ValueError(f"topk_idx: expected 1..{MAX_TOPK} experts per token, got {topk_idx.shape[1]}")
        if num_tokens is not None and topk_idx.shape[0] != num_tokens:
            raise ValueError(f"topk_idx: expected {num_tokens} rows (one per token of x), got {topk_idx.shape[0]}")
        if num_experts <= 0 or num_experts % self.num_ranks:
            raise ValueError(f"num_experts: expected a positive multiple of the group size "
                             f"{self.num_ranks}, got {num_experts}")
        if topk_idx.numel():
            lo, hi = int(topk_idx.min()), int(topk_idx.max())
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"topk_idx: expected values in [-1, {num_experts}), got range [{lo}, {hi}]")

    @staticmethod
    def _check_x(x):
        """x: bf16 [T, H] or (e4m3 [T, H], float32 scales [T, H/128])."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise TypeError("x: expected a bf16 tensor or a pair (e4m3 data, float32 scales)")
            data, scales = x
            if data.dtype != torch.float8_e4m3fn:
                raise TypeError(f"x: expected FP8 data of dtype float8_e4m3fn, got {data.dtype}")
            if scales.dtype != torch.float32 or scales.shape != (data.shape[0], data.shape[1] // 128):
                raise ValueError(f"x scales: expected float32 [{data.shape[0]}, {data.shape[1] // 128}], "
                                 f"got {scales.dtype} {list(scales.shape)}")
        else:
            data = x
            if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
                raise TypeError(f"x: expected a bfloat16 tensor or an FP8 pair, got "
                                f"{getattr(x, 'dtype', type(x).__name__)}")
        if data.dim() != 2:
            raise ValueError(f"x: expected shape [num_tokens, hidden], got {list(data.shape)}")
        h = data.shape[1]
        if h % SUPPORTED_HIDDEN_MULTIPLE or not 0 < h <= MAX_HIDDEN:
            raise ValueError(f"x: hidden size {h} not supported: expected a multiple of "
                             f"{SUPPORTED_HIDDEN_MULTIPLE} in [128, {MAX_HIDDEN}]")
        return data

    # -- layout ---------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], None (no RDMA ranks
        in this engine), num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R],
        None (no event))."""
        self._check_topk(topk_idx, num_experts)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.num_ranks)
        return per_rank, None, per_expert, in_rank, None

    def _all_to_all(self, rows: torch.Tensor, send_counts, recv_counts):
        out = rows.new_empty((sum(recv_counts),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def _exchange_counts(self, send_counts):
        send = torch.tensor(send_counts, dtype=torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    # -- dispatch / combine ---------------------------------------------------------------
    def dispatch(self, x, topk_idx=None, topk_weights=None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 handle: DispatchHandle = None, num_experts: int = None):
        """Send each token to every rank holding one of its experts.

        x: bf16 [T, H] or (e4m3 [T, H], float32 [T, H/128]); topk_idx int64 [T, K];
        topk_weights float32 [T, K]; num_experts (or num_tokens_per_expert's length).
        With `handle`, repeats that layout (topk arguments optional).
        Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, None): recv_x like x with N rows ordered by (source rank, source token);
        recv_topk_idx int64 [N, K] local expert ids (-1 elsewhere); weights float32 [N, K].
        """
        data = self._check_x(x)
        if handle is None:
            if topk_idx is None:
                raise ValueError("topk_idx: required unless a handle from an earlier dispatch is given")
            if num_experts is None:
                if num_tokens_per_expert is None:
                    raise ValueError("num_experts: required (or pass num_tokens_per_expert from get_dispatch_layout)")
                num_experts = num_tokens_per_expert.numel()
            self._check_topk(topk_idx, num_experts, data.shape[0])
            if is_token_in_rank is None:
                _, _, _, is_token_in_rank, _ = self.get_dispatch_layout(topk_idx, num_experts)
            send_idx = torch.cat([is_token_in_rank[:, r].nonzero().flatten() for r in range(self.num_ranks)])
            send_counts = is_token_in_rank.sum(0).tolist()
            recv_counts = self._exchange_counts(send_counts)
            src_idx = self._all_to_all(send_idx, send_counts, recv_counts)
            handle = DispatchHandle(send_idx, send_counts, recv_counts, src_idx, is_token_in_rank, data.shape[0])
        elif handle.num_tokens != data.shape[0]:
            raise ValueError(f"x: the handle was made for {handle.num_tokens} tokens, got {data.shape[0]}")
        sc, rc, idx = handle.send_counts, handle.recv_counts, handle.send_idx

        def move(t):
            return _from_bytes(self._all_to_all(_as_bytes(t[idx]), sc, rc), t)

        recv_x = (move(x[0]), move(x[1])) if isinstance(x, tuple) else move(x)
        recv_idx = recv_w = counts = None
        if topk_idx is not None:
            experts_per_rank = num_experts // self.num_ranks if num_experts else None
            if experts_per_rank is None:
                raise ValueError("num_experts: required to translate top-k indices with a cached handle")
            weights = topk_weights if topk_weights is not None else torch.ones(topk_idx.shape, dtype=torch.float32)
            recv_idx, recv_w = localize_topk(move(topk_idx), move(weights.float()), self.rank, experts_per_rank)
            counts = [int((recv_idx == e).sum()) for e in range(experts_per_rank)]
        return recv_x, recv_idx, recv_w, counts, handle, None

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights=None):
        """Send received rows back and reduce per source token.

        x: bf16 [N, H] (rows as dispatch returned them); topk_weights float32 [N, K]
        (local weights from dispatch) scales each row by their sum when given.
        Returns (combined bf16 [T, H], combined_topk_weights or None, None); sums are in
        float32, added in destination-rank order (deterministic).
        """
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
            raise TypeError(f"x: expected a bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[0] != sum(handle.recv_counts):
            raise ValueError(f"x: expected shape [{sum(handle.recv_counts)}, hidden] (the rows dispatch "
                             f"returned), got {list(x.shape)}")
        rows = x.float()
        if topk_weights is not None:
            rows = rows * topk_weights.float().sum(1, keepdim=True)
        back = self._all_to_all(_as_bytes(rows), handle.recv_counts, handle.send_counts)
        back = _from_bytes(back, rows)
        out = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for count in handle.send_counts:  # one rank at a time: unique indices, fixed order
            sel = handle.send_idx[start:start + count]
            out[sel] += back[start:start + count]
            start += count
        return out.to(torch.bfloat16), None, None
