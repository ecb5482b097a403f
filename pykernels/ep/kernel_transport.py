"""Buffer backends "emu" and "cuda": the hand-written intranode kernels (csrc/ep), one
process per rank, through the per-process transports pykernels.ep.transport_emu.
EmuIntranode (the kernels' PTX on the emulator, buffers in shared memory that every rank's
emulator maps) and pykernels.cuda.ep.CudaIntranode (a GPU per rank, CUDA IPC buffers).

Sizes: the transport is made at the Buffer's first dispatch, from that call's hidden size
and Config (ring geometry: pykernels.ep.config), with max_topk = 16 so any top-k fits. A
later call with a larger hidden size (the same on every rank: the call header is agreed
first) replaces it on every rank alike; handles of the old one are then refused.

Routing without top-k (layout-only dispatch, or a cached handle): the kernels route by
top-k ids, so each token gets K = R synthetic slots, slot r = r when the token goes to rank
r (else -1), over R "experts" (one per rank): the same ranks, rows and order.
"""
import torch

from .checks import MAX_TOPK
from .handle import DispatchHandle, send_positions


def transport_class(backend: str):
    if backend == "emu":
        from .transport_emu import EmuIntranode
        return EmuIntranode
    from ..cuda.ep import CudaIntranode
    return CudaIntranode


def rank_slots(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """int64 [T, R]: slot r = r where the token goes to rank r, else -1 (R one-per-rank experts)."""
    R = is_token_in_rank.shape[1]
    ranks = torch.arange(R, dtype=torch.int64, device=is_token_in_rank.device).expand_as(is_token_in_rank)
    return torch.where(is_token_in_rank, ranks, torch.full_like(ranks, -1))


class KernelTransport:
    """One rank's side of the kernel path; `transport` is made on first use. gather_rows:
    the engine's small all_gather with a timeout (for the handle's count matrix);
    on_timeout(reason): called when the transport gives up waiting for a peer (its
    PeerTimeoutError then propagates: the kernels' state is unknown, the Buffer unusable)."""

    def __init__(self, backend: str, group, rank: int, num_ranks: int, timeout_s: float, gather_rows,
                 on_timeout=None):
        self.backend, self.group, self.rank, self.num_ranks = backend, group, rank, num_ranks
        self.timeout_s, self.gather_rows, self.on_timeout = timeout_s, gather_rows, on_timeout
        self.transport = None
        self.cfg = None
        self.generation = 0

    def ensure(self, hidden: int, config):
        """Make (or, for a larger hidden size, remake) the transport. Collective: every rank
        calls it at the same call with the same arguments (agreed in the header)."""
        if self.transport is not None and hidden <= self.cfg.hidden:
            return
        self.destroy()
        self.cfg = config.intranode_config(self.num_ranks, hidden, MAX_TOPK)
        self.transport = transport_class(self.backend)(self.cfg, self.group, timeout_s=self.timeout_s)
        self.generation += 1

    def destroy(self):
        if self.transport is not None:
            t, self.transport = self.transport, None
            t.destroy()

    # -- dispatch / combine ------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, num_experts, is_token_in_rank, num_worst_tokens, what):
        """Returns (recv_x, recv_topk_idx or None, recv_topk_weights or None, DispatchHandle,
        the transport's result dict). Without topk_idx, routes by is_token_in_rank.

        The handle's count matrix comes from one all_gather of the per-rank counts. On the CPU
        (emu) it is gathered first, so a num_worst_tokens below some rank's count raises
        ValueError on every rank before the kernels run. On a GPU it is gathered after the
        kernels from their device-side layout, with no host read (with num_worst_tokens the
        call reads nothing back): a too small num_worst_tokens is then the kernel's code 9
        record (pykernels.cuda.ep), as without a Buffer."""
        from ..reference.ep import dispatch_layout
        synthetic = topk_idx is None
        if synthetic:
            topk_idx, topk_weights, num_experts = rank_slots(is_token_in_rank), None, self.num_ranks
        on_cpu = topk_idx.device.type == "cpu"
        if on_cpu:
            in_rank = dispatch_layout(topk_idx, num_experts, self.num_ranks)[2] if is_token_in_rank is None \
                else is_token_in_rank
            matrix = self.gather_rows(in_rank.sum(0), what).cpu()
            if num_worst_tokens:
                received = matrix.sum(0).tolist()
                over = [(r, n) for r, n in enumerate(received) if n > num_worst_tokens]
                if over:   # the same matrix on every rank: every rank raises this, nothing moved yet
                    raise ValueError(f"num_worst_tokens: {num_worst_tokens} rows are fewer than rank(s) receive: "
                                     + ", ".join(f"rank {r} receives {n}" for r, n in over)
                                     + ". Nothing was sent; the Buffer remains usable.")
        res = self._call(self.transport.dispatch, x, topk_idx, topk_weights, num_experts,
                         num_worst_tokens=num_worst_tokens)
        ih = res["handle"]
        in_rank = ih.is_token_in_rank
        if not on_cpu:
            matrix = self.gather_rows(in_rank.sum(0), what)
        C = self.cfg.num_channels
        T = in_rank.shape[0]
        # sender side: tokens to each rank in the channels before c (channel c: tokens [c*ceil(T/C), ...))
        per = -(-T // C) if T else 0
        bounds = (torch.arange(C, device=in_rank.device) * per).clamp(max=T)
        before = torch.cat([torch.zeros(1, in_rank.shape[1], dtype=torch.int64, device=in_rank.device),
                            torch.cumsum(in_rank.to(torch.int64), 0)])[bounds].T.to(torch.int32)
        recv_prefix = (ih.recv_channel_offset[..., 0] - ih.rank_offset[:, None]).to(torch.int32)
        handle = DispatchHandle.make(matrix, ih.recv_src_idx, ih.is_token_in_rank, send_positions(in_rank), before,
                                     recv_prefix, kind=self.backend, rank=self.rank, num_tokens=T,
                                     num_recv=ih.num_recv, num_worst_tokens=num_worst_tokens, intranode=ih,
                                     generation=self.generation, num_recv_tokens=res.get("num_recv_tokens"))
        if synthetic:
            return res["recv_x"], None, None, handle, res
        return res["recv_x"], res["recv_topk_idx"], res["recv_topk_weights"], handle, res

    def combine(self, x, handle: DispatchHandle):
        """bf16 [T, H]: the plain sum of each token's returned rows (weights None: the kernel's
        weight factor is 1.0, an exact product), float32 in ascending rank order, bf16 once."""
        if handle.generation != self.generation:
            raise ValueError("handle: made by this Buffer's transport before it was remade for a larger hidden "
                             "size; dispatch again to get a current handle")
        out = self._call(self.transport.combine, x, handle.intranode, None)
        return out[0] if isinstance(out, tuple) else out

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TimeoutError as e:      # pykernels.cuda.ep.PeerTimeoutError: a peer stopped mid-call
            if self.on_timeout is not None:
                self.on_timeout(f"{self.backend} transport: {e}")
            raise
