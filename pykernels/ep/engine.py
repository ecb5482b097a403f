"""The engine transport of pykernels.ep.Buffer (backend "gloo" / "nccl"): dispatch and
combine over torch.distributed collectives, for any group (PCIe-only machines, across
nodes). Payloads travel as raw bytes, so bf16 and FP8 move bit-exactly.

The local steps around the collectives (layout, send permutation, receive-side
localisation, combine reduction) run in PyTorch (`local_backend="torch"`) or as the Triton
kernels of pykernels.triton.ep (`"triton"`); both give identical bytes. Inputs are
validated by the Buffer before they get here, and every rank has agreed on the call's
header, so each collective below is entered by every rank with matching sizes; every
wait is still bounded by timeout_s (a rank that dies mid-call).

This path syncs with the host (split sizes are host lists), so it is not CUDA-graph safe.
"""
import datetime

import torch
import torch.distributed as dist

from ..reference.ep import localize_topk
from .agreement import RankTimeoutError
from .handle import DispatchHandle, send_positions


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> uint8 [rows, row_bytes] (explicit sizes: rows may be 0)."""
    t = t.contiguous()
    inner = 1
    for d in t.shape[1:]:
        inner *= d
    return t.view(torch.uint8).reshape(t.shape[0], inner * t.element_size())


def _from_bytes(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.view(like.dtype).reshape((b.shape[0],) + tuple(like.shape[1:]))


class EngineTransport:
    """One rank's side of the engine path. on_timeout(reason) marks the owning Buffer
    broken (a collective that timed out leaves the process group out of step)."""

    def __init__(self, group, rank: int, num_ranks: int, local_backend: str, timeout_s: float, on_timeout):
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        self.local_backend, self.timeout_s, self.on_timeout = local_backend, timeout_s, on_timeout
        # NCCL moves device tensors only; gloo takes CPU ones
        self.count_device = "cuda" if "nccl" in str(dist.get_backend(group)) else "cpu"

    @staticmethod
    def _triton():
        from ..triton import ep as triton_ep  # imported on first use: the torch path needs no Triton
        return triton_ep

    # -- collectives with a timeout ---------------------------------------------------------
    def _wait(self, work, what: str):
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = (f"{what}: a collective failed or did not finish within timeout_s={self.timeout_s:g} s on "
                      f"rank {self.rank} (a peer stopped during the call: {first})")
            self.on_timeout(reason)
            raise RankTimeoutError(f"{reason}. This Buffer and its process group are unusable now: make a new "
                                   f"process group and Buffer on every rank.") from e

    def _all_to_all(self, rows: torch.Tensor, send_counts, recv_counts, what):
        out = rows.new_empty((sum(recv_counts),) + tuple(rows.shape[1:]))
        self._wait(dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.group,
                                          async_op=True), what)
        return out

    def gather_rows(self, t: torch.Tensor, what) -> torch.Tensor:
        """all_gather of a small int tensor [n] -> int64 [R, n] (on the count device)."""
        mine = t.to(self.count_device, torch.int64).contiguous()
        rows = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        self._wait(dist.all_gather(rows, mine, group=self.group, async_op=True), what)
        return torch.stack(rows)

    # -- dispatch --------------------------------------------------------------------------
    def layout(self, topk_idx, num_experts):
        if self.local_backend == "triton":
            return self._triton().dispatch_layout(topk_idx, num_experts, self.num_ranks)
        from ..reference.ep import dispatch_layout
        return dispatch_layout(topk_idx, num_experts, self.num_ranks)

    def make_handle(self, is_token_in_rank, num_tokens, num_worst_tokens, what) -> DispatchHandle:
        """Exchange the counts and the source token ids of a new layout. Raises ValueError on
        every rank alike when a rank receives more than num_worst_tokens (> 0)."""
        R = self.num_ranks
        if self.local_backend == "triton":
            send_idx, send_pos, send_counts = self._triton().send_layout(is_token_in_rank)
        else:
            send_idx = torch.cat([is_token_in_rank[:, r].nonzero().flatten() for r in range(R)])
            send_counts = is_token_in_rank.sum(0).tolist()
            send_pos = None
        matrix = self.gather_rows(torch.tensor(send_counts), what).cpu()
        received = matrix.sum(0).tolist()
        if num_worst_tokens:
            over = [(r, n) for r, n in enumerate(received) if n > num_worst_tokens]
            if over:   # every rank sees the same matrix: every rank raises this, nothing moved yet
                raise ValueError(f"num_worst_tokens: {num_worst_tokens} rows are fewer than rank(s) receive: "
                                 + ", ".join(f"rank {r} receives {n}" for r, n in over)
                                 + ". Nothing was sent; the Buffer remains usable.")
        recv_counts = matrix[:, self.rank].tolist()
        src_idx = self._all_to_all(send_idx, send_counts, recv_counts, what)
        send_head = send_positions(is_token_in_rank)   # DeepEP's handle[5]: position among the rank's tokens
        if send_pos is None:                          # row in the send buffer (the Triton combine's index)
            first = torch.tensor([0] + send_counts[:-1], device=send_head.device).cumsum(0).to(torch.int32)
            send_pos = torch.where(send_head >= 0, send_head + first, send_head)
        return DispatchHandle.make(matrix, src_idx, is_token_in_rank, send_head, send_idx=send_idx, send_pos=send_pos,
                                   send_counts=send_counts, recv_counts=recv_counts, num_tokens=num_tokens,
                                   num_worst_tokens=num_worst_tokens, kind="engine", rank=self.rank)

    def dispatch(self, x, topk_idx, topk_weights, num_experts, handle: DispatchHandle, what):
        """Move the rows of x (and top-k) along handle's layout. Returns (recv_x,
        recv_topk_idx, recv_topk_weights, per-local-expert counts list or None): N rows (the
        received count), in (source rank, source token) order."""
        sc, rc, idx = handle.send_counts, handle.recv_counts, handle.send_idx
        experts_per_rank = num_experts // self.num_ranks if topk_idx is not None else None
        if topk_idx is not None and topk_weights is None:
            topk_weights = torch.ones(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
        data = x[0] if isinstance(x, tuple) else x
        if self.local_backend == "triton":
            triton_ep = self._triton()
            # one packed row per sent token: payload (+ scales) + global top-k ids + weights
            recv = self._all_to_all(triton_ep.permute(x, idx, topk_idx, topk_weights), sc, rc, what)
            num_topk = 0 if topk_idx is None else topk_idx.shape[1]
            recv_x, recv_idx, recv_w, counts = triton_ep.unpack_received(
                recv, data.shape[1], isinstance(x, tuple), num_topk,
                self.rank * (experts_per_rank or 0), experts_per_rank or 1)
            return recv_x, recv_idx, recv_w, None if counts is None else counts.tolist()

        def move(t):
            return _from_bytes(self._all_to_all(_as_bytes(t[idx]), sc, rc, what), t)

        recv_x = (move(x[0]), move(x[1])) if isinstance(x, tuple) else move(x)
        recv_idx = recv_w = counts = None
        if topk_idx is not None:
            recv_idx, recv_w = localize_topk(move(topk_idx), move(topk_weights), self.rank, experts_per_rank)
            counts = [int((recv_idx == e).sum()) for e in range(experts_per_rank)]
        return recv_x, recv_idx, recv_w, counts

    # -- combine ---------------------------------------------------------------------------
    def combine(self, x, handle: DispatchHandle, what):
        """x bf16 [N', H] (N' >= the received count; rows past it ignored) -> bf16 [T, H]: per
        source token the sum of its returned rows, float32 from 0.0 in ascending rank order,
        rounded to bf16 once (0 for a token sent nowhere)."""
        x = x[:sum(handle.recv_counts)]
        if self.local_backend == "triton":
            triton_ep = self._triton()
            back = self._all_to_all(triton_ep.combine_pack(x), handle.recv_counts, handle.send_counts, what)
            return triton_ep.combine_reduce(back, handle.send_pos, x.shape[1], False)
        back = _from_bytes(self._all_to_all(_as_bytes(x), handle.recv_counts, handle.send_counts, what), x)
        return self._reduce(back.float(), handle, x.shape[1]).to(torch.bfloat16)

    def combine_weights(self, topk_weights, handle: DispatchHandle, what):
        """float32 [N', K] -> float32 [T, K]: per source token and slot the sum of the
        weights its destination ranks return, from 0.0 in ascending rank order."""
        w = topk_weights[:sum(handle.recv_counts)].float()
        back = _from_bytes(self._all_to_all(_as_bytes(w), handle.recv_counts, handle.send_counts, what), w)
        return self._reduce(back, handle, w.shape[1])

    @staticmethod
    def _reduce(back, handle, width):
        out = torch.zeros(handle.num_tokens, width, dtype=torch.float32, device=back.device)
        start = 0
        for count in handle.send_counts:  # one rank at a time: unique indices, fixed order
            out[handle.send_idx[start:start + count]] += back[start:start + count]
            start += count
        return out
