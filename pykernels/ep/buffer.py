"""pykernels.ep.Buffer: DeepEP's V1 Buffer (normal mode) over one of several transports.

    buf = Buffer(group, backend="auto")        # "gloo" / "nccl" (engine), "emu", "cuda" (kernels)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    combined_x, combined_w, event = buf.combine(expert_out, handle, recv_w)

Semantics are DeepEP's (docs/ep.md, "Buffer"): combine sums the rows each token's
destination ranks send back (no weighting) and sums the top-k weights passed to it per
slot; a handle repeats a layout; num_worst_tokens fixes the output rows. Before each call
the ranks agree on its header (pykernels.ep.agreement): a rank that calls with another
shape gets a clear error on every rank; a rank that does not arrive is named on every live
rank after timeout_s seconds.

Backends:
  "gloo" / "nccl": torch.distributed collectives (pykernels.ep.engine) - any group.
  "emu" / "cuda": the hand-written intranode kernels, one process per rank
      (pykernels.ep.kernel_transport): the emulator across real processes, or one GPU per
      rank over CUDA IPC. Up to 8 ranks.
  "auto": "cuda" on Hopper GPUs with the kernels built and an NCCL group of <= 8 ranks,
      else the engine over the group's backend.
Low-latency mode (low_latency_dispatch / low_latency_combine, DeepEP's semantics and
packed per-expert receive layout) runs in pykernels.ep.low_latency; dispatch's
expert_layout="contiguous" groups the received rows per local expert for the grouped
GEMM (pykernels.ep.expert_layout).
"""
import torch
import torch.distributed as dist

from .. import __version__
from . import expert_layout as EL
from . import low_latency
from .agreement import Agreement, RankMismatchError
from .checks import (MAX_HIDDEN, MAX_TOPK, SUPPORTED_HIDDEN, check_combine_args, check_expert_alignment,
                     check_kernel_aligned, check_layout_args, check_num_experts, check_topk, check_weights,
                     check_worst_tokens, check_x)
from .config import DEFAULT_NUM_SMS, Config, EventOverlap, recommended_config
from .engine import EngineTransport
from .handle import DispatchHandle
from .kernel_transport import KernelTransport

LOCAL_BACKENDS = ("torch", "triton")
BACKENDS = ("auto", "gloo", "nccl", "emu", "cuda")
KERNEL_BACKENDS = ("emu", "cuda")
MAX_KERNEL_RANKS = 8          # the kernels' peers: one NVLink node
DEFAULT_TIMEOUT_S = 60.0

__all__ = ["Buffer", "DispatchHandle", "LOCAL_BACKENDS", "BACKENDS", "MAX_HIDDEN", "MAX_TOPK", "SUPPORTED_HIDDEN"]


def _kernels_built() -> bool:
    from ..runtime import artifacts
    try:
        kernels = artifacts.manifest()["kernels"]
    except RuntimeError:
        return False
    return "ep_intranode" in kernels


def _group_backend(group) -> str:
    return str(dist.get_backend(group))


def _resolve_backend(backend: str, group, num_ranks: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    gb = _group_backend(group)
    if backend == "auto":
        gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
        if gpu and _kernels_built() and "nccl" in gb and num_ranks <= MAX_KERNEL_RANKS:
            return "cuda"
        return "nccl" if "nccl" in gb else "gloo"
    if backend in ("gloo", "nccl") and backend not in gb:
        raise ValueError(f"backend: {backend!r} runs over the group's own collectives, but the group's backend "
                         f"is {gb!r}")
    if backend in KERNEL_BACKENDS and num_ranks > MAX_KERNEL_RANKS:
        raise ValueError(f"backend: {backend!r} (the intranode kernels) serves up to {MAX_KERNEL_RANKS} ranks, "
                         f"the group has {num_ranks}; use the engine (\"gloo\" / \"nccl\")")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ValueError("backend: 'cuda' needs a GPU; none is visible (use 'emu' or the engine)")
    if backend in KERNEL_BACKENDS and not _kernels_built():
        raise ValueError(f"backend: {backend!r} runs the compiled EP kernels (ep_intranode), which this installation "
                         f"does not have (build the package; or use the engine, \"gloo\" / \"nccl\")")
    return backend


def _align(counts, alignment):
    return [-(-c // alignment) * alignment for c in counts]


class Buffer:
    """DeepEP's V1 Buffer for one process group (normal mode; module docstring).

    group: a torch.distributed ProcessGroup (None = the default group).
    num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, allow_nvlink_for_low_latency_mode,
    allow_mnnvl: DeepEP's sizes and switches, compared across ranks at construction.
    Nothing is sized by them: the transports size their buffers from the first call's
    shapes (docs/ep.md).
    explicitly_destroy: DeepEP's meaning: resources are released by destroy() (which must
    then be called), else on garbage collection.
    backend: see the module docstring. timeout_s: seconds any rank waits for its peers at
    construction and at every call. local_backend: "torch" or "triton" for the engine's
    local steps (identical bytes). agree_calls=False skips the per-call header exchange
    (one store round trip per call; the construction is always agreed): a rank calling
    with other shapes then fails inside the transport or times out instead of the clear
    error on every rank.
    """

    num_sms: int = DEFAULT_NUM_SMS

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None, *, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                 local_backend: str = "torch", agree_calls: bool = True):
        if not dist.is_initialized():
            raise RuntimeError("Buffer: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = self.group_size = dist.get_world_size(group)
        error = None
        try:
            self.timeout_s = self._check_timeout(timeout_s)
        except ValueError as e:   # reported to the peers below, waiting the default time
            error, self.timeout_s = e, DEFAULT_TIMEOUT_S
        self._agreement = Agreement(group, self.rank, self.num_ranks, self.timeout_s)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.local_backend = local_backend
        self.agree_calls = bool(agree_calls)
        self._destroyed = False
        self._kernels = None
        self._low_latency = None      # made at the first low-latency call
        self.backend = None
        try:
            self._check_construction(num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, allow_mnnvl, use_fabric,
                                     enable_shrink, comm, local_backend)
            self.backend = _resolve_backend(backend, group, self.num_ranks)
        except (TypeError, ValueError, NotImplementedError) as e:
            error = error or e
        record = dict(backend=self.backend, local_backend=local_backend, num_nvl_bytes=num_nvl_bytes,
                      num_rdma_bytes=num_rdma_bytes, low_latency_mode=bool(low_latency_mode),
                      num_qps_per_rank=num_qps_per_rank,
                      allow_nvlink_for_low_latency_mode=bool(allow_nvlink_for_low_latency_mode),
                      pykernels_version=__version__, agree_calls=self.agree_calls)
        self._agree("Buffer(...) construction", record, error, always=True)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend in ("cuda", "nccl") \
            else torch.device("cpu")
        self._engine = EngineTransport(group, self.rank, self.num_ranks, local_backend, self.timeout_s,
                                       self._mark_broken)
        if self.backend in KERNEL_BACKENDS:
            self._kernels = KernelTransport(self.backend, group, self.rank, self.num_ranks, self.timeout_s,
                                            self._engine.gather_rows, self._mark_broken)

    # -- construction helpers ----------------------------------------------------------------
    @staticmethod
    def _check_timeout(timeout_s):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        return float(timeout_s)

    @staticmethod
    def _check_construction(num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, allow_mnnvl, use_fabric, enable_shrink,
                            comm, local_backend):
        if local_backend not in LOCAL_BACKENDS:
            raise ValueError(f"local_backend: expected one of {LOCAL_BACKENDS}, got {local_backend!r}")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes),
                        ("num_qps_per_rank", num_qps_per_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name, v, what in (("allow_mnnvl", allow_mnnvl, "multi-node NVLink"),
                              ("use_fabric", use_fabric, "fabric memory handles"),
                              ("enable_shrink", enable_shrink, "masking ranks out")):
            if v:
                raise NotImplementedError(f"Buffer: {name}={v!r} ({what}) is not supported; pass False")
        if comm is not None:
            raise NotImplementedError("Buffer: comm (an mpi4py communicator) is not supported; pass a "
                                      "torch.distributed group")

    def _mark_broken(self, reason: str):
        self._agreement.abort(reason)

    def _agree(self, what: str, record: dict, error: Exception = None, always: bool = False):
        """Exchange this step's record (or this rank's argument error) with every rank, then
        raise on every rank alike: the own error where it was found, RankMismatchError
        naming the rank and its error elsewhere, RankMismatchError for differing fields.
        With agree_calls=False only the construction (always=True) is exchanged."""
        if not (always or self.agree_calls):
            self._agreement.check_abort()
            if error is not None:
                raise error
            return
        if error is not None:
            record = {"rejected": f"{type(error).__name__}: {error}"}
        records = self._agreement.exchange(what, record)
        if error is not None:
            raise error
        rejected = [(r, rec["rejected"]) for r, rec in enumerate(records) if "rejected" in rec]
        if rejected:
            raise RankMismatchError(f"{what}: " + "; ".join(f"rank {r} rejected its arguments ({msg})"
                                                            for r, msg in rejected)
                                    + ". Nothing was sent; every rank raised and the Buffer remains usable.")
        fields = list(dict.fromkeys(k for rec in records for k in rec))
        differing = [k for k in fields if any(rec.get(k) != records[0].get(k) for rec in records)]
        if differing:
            lines = "; ".join(f"{k}: " + ", ".join(f"rank {i}: {rec.get(k)!r}" for i, rec in enumerate(records))
                              for k in differing)
            raise RankMismatchError(f"{what}: the ranks disagree ({lines}). Nothing was sent; every rank raised "
                                    f"this error and the Buffer remains usable.")

    def _check_usable(self, what):
        if self._destroyed:
            raise RuntimeError(f"{what}: this Buffer was destroyed")

    # -- DeepEP's static helpers -------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """The SMs of the normal-mode kernels (even: a sender and a receiver per channel);
        the default Config of later Buffers' first dispatch takes num_sms // 2 channels."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"new_num_sms: expected a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when the sm_90a intranode kernels are built in this installation."""
        return _kernels_built()

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (None-event on a machine without a GPU)."""
        return EventOverlap.record("cuda" if torch.cuda.is_available() else "cpu")

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return recommended_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return recommended_config(num_ranks, Buffer.num_sms)

    # -- layout ------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], None (no RDMA ranks),
        num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R], EventOverlap). Local to
        this rank (no communication). Reads topk_idx's min/max back to the host (range check)."""
        self._check_usable("get_dispatch_layout")
        check_topk(topk_idx, num_experts, self.num_ranks)
        if previous_event is not None:
            previous_event.current_stream_wait()
        per_rank, per_expert, in_rank = self._engine.layout(topk_idx, num_experts)
        return per_rank, None, per_expert, in_rank, self._event(async_finish, topk_idx.device)

    @staticmethod
    def _event(async_finish, device):
        return EventOverlap.record(device) if async_finish else EventOverlap()

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, x, handle: DispatchHandle = None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Config = None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False, *, num_experts: int = None,
                 expert_layout: str = None):
        """Send each token to every rank holding one of its experts (DeepEP's dispatch).

        x: bf16 [T, H] or (float8_e4m3fn [T, H], float32 [T, H/128]). Routing, one of:
          - handle from an earlier dispatch: repeats its layout (topk_idx and topk_weights
            must be None); returns (recv_x, None, None, None, None, event);
          - topk_idx int64 [T, K] (+ topk_weights float32 [T, K]), with
            num_tokens_per_expert [E] or num_experts= (pykernels' keyword) for E; the
            layout arguments from get_dispatch_layout are optional (computed when absent);
          - layout only: is_token_in_rank bool [T, R] without topk_idx (recv_topk_idx and
            recv_topk_weights None; the counts come from num_tokens_per_expert when given).
        num_worst_tokens W > 0: every output has W rows; rows past the received count have
        recv_topk_idx -1 and weight 0 (recv_x there: zeros on the engine, unwritten on the
        kernels); the counts list is [] (DeepEP's convention). The ranks must agree on W.
        Returns (recv_x, recv_topk_idx int64 [N, K] local ids (-1: another rank's expert),
        recv_topk_weights float32 [N, K] (0 there), num_recv_tokens_per_expert_list (per local
        expert, rounded up to expert_alignment), handle, EventOverlap); rows ordered by
        (source rank, source token).
        expert_layout="contiguous" (pykernels; needs topk_idx, no handle, no num_worst_tokens):
        the rows grouped per local expert for pykernels.gemm.m_grouped_fp8_gemm_nt_contiguous
        (pykernels.ep.expert_layout): returns (recv_x with m_sum rows, one per (received row,
        local top-k slot), each expert's segment padded to expert_alignment - or to
        get_mk_alignment_for_contiguous_layout() when that is 1 - with zero rows; m_indices
        int32 [m_sum] (-1 on padding rows); weights float32 [m_sum] (each row's top-k weight,
        0 on padding); the segment sizes; handle; EventOverlap). combine takes the grouped
        expert outputs (weighted by the caller) back with that handle.
        """
        what = f"Buffer.dispatch (call {self._agreement.seq})"
        self._check_usable(what)
        error = None
        try:
            plan = self._dispatch_plan(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                       num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                       num_worst_tokens, config, num_experts)
            EL.check_expert_layout(expert_layout, topk_idx, handle, num_worst_tokens)
            plan["header"]["expert_layout"] = expert_layout
        except (TypeError, ValueError, NotImplementedError) as e:
            error, plan = e, None
        self._agree(what, None if plan is None else plan["header"], error)
        if previous_event is not None:
            previous_event.current_stream_wait()
        out = self._run_dispatch(x, plan, what)
        if expert_layout is not None:
            out = self._group_by_expert(out, plan)
        return (*out, self._event(async_finish, plan["device"]))

    def _group_by_expert(self, out, plan):
        """dispatch's results -> the contiguous expert layout (pykernels.ep.expert_layout)."""
        recv_x, recv_idx, recv_w, _, handle = out
        grouped, layout = EL.to_expert_layout(recv_x, recv_idx, recv_w, plan["num_experts"] // self.num_ranks,
                                              EL.segment_alignment(plan["expert_alignment"]))
        handle.expert_layout = layout
        return grouped, layout.m_indices, layout.weights, layout.num_rows_per_expert, handle

    def _dispatch_plan(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                       num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                       num_experts):
        """Validate one dispatch and build its header (what every rank must agree on)."""
        data = check_x(x)
        check_worst_tokens(num_worst_tokens)
        check_expert_alignment(expert_alignment)
        if num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank: expected None (intranode: no RDMA ranks)")
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config: expected a pykernels.ep.Config, got {type(config).__name__}")
        if topk_weights is not None and topk_idx is None:
            raise ValueError("topk_weights: given without topk_idx")
        if num_tokens_per_expert is not None:
            if not isinstance(num_tokens_per_expert, torch.Tensor):
                raise TypeError(f"num_tokens_per_expert: expected a tensor, got {type(num_tokens_per_expert).__name__}")
            if num_experts is None:
                num_experts = num_tokens_per_expert.numel()
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle: expected a DispatchHandle from an earlier dispatch, got "
                                f"{type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx, topk_weights: expected None with a cached handle (it repeats the layout "
                                 "only, as DeepEP's does)")
            if handle.num_tokens != data.shape[0]:
                raise ValueError(f"x: the handle was made for {handle.num_tokens} tokens, got {data.shape[0]}")
            self._check_handle_kind(handle)
            kind = "dispatch with a cached handle"
        elif topk_idx is not None:
            if num_experts is None:
                raise ValueError("num_experts: required (or pass num_tokens_per_expert from get_dispatch_layout)")
            # on a GPU with num_worst_tokens nothing is read back: the kernels assert the range on the device
            check_topk(topk_idx, num_experts, self.num_ranks, data.shape[0],
                       range_check=not (num_worst_tokens and self.backend == "cuda"), device=data.device)
            if topk_weights is not None:
                check_weights(topk_weights, topk_idx.shape, device=data.device)
            kind = "dispatch"
        elif is_token_in_rank is not None:
            if num_experts is not None:
                check_num_experts(num_experts, self.num_ranks)
            kind = "dispatch without top-k"
        else:
            raise ValueError("topk_idx: required unless is_token_in_rank (layout-only dispatch) or a handle from an "
                             "earlier dispatch is given")
        if handle is None:
            check_layout_args(data.shape[0], self.num_ranks, num_experts, num_tokens_per_rank, is_token_in_rank,
                              num_tokens_per_expert, data.device)
        self._check_kernel_aligned("x", data)
        if isinstance(x, tuple):
            self._check_kernel_aligned("x scales", x[1])
        header = dict(kind=kind, hidden=int(data.shape[1]), dtype="fp8 e4m3 + f32 scales" if isinstance(x, tuple)
                      else "bf16", topk=0 if topk_idx is None else int(topk_idx.shape[1]),
                      weights=topk_weights is not None, num_experts=num_experts or 0,
                      num_worst_tokens=int(num_worst_tokens), device=data.device.type)
        if handle is not None:
            header["handle_from"] = handle.made_at
        if kind == "dispatch without top-k":   # the counts then come from a collective over these
            header["num_tokens_per_expert"] = num_tokens_per_expert is not None
        config = config or self.get_dispatch_config(self.num_ranks)
        if self._kernels is not None:          # the kernels' rings are laid out from it (first dispatch)
            header["config"] = [config.num_sms, config.num_max_nvl_chunked_send_tokens,
                                config.num_max_nvl_chunked_recv_tokens]
        return dict(header=header, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights,
                    num_experts=num_experts, is_token_in_rank=is_token_in_rank,
                    num_tokens_per_expert=num_tokens_per_expert, expert_alignment=int(expert_alignment),
                    num_worst_tokens=int(num_worst_tokens),
                    config=config, device=data.device)

    def _check_kernel_aligned(self, name: str, t: torch.Tensor):
        """On the kernel transports (emu / cuda): check_kernel_aligned; the engine reads any layout."""
        if self._kernels is not None:
            check_kernel_aligned(name, t, self.backend)

    def _check_handle_kind(self, handle):
        if handle.kind != ("engine" if self._kernels is None else self.backend):
            raise ValueError(f"handle: made by a Buffer on backend {handle.kind!r}, this one runs "
                             f"{self.backend!r}")
        if handle.rank != self.rank:
            raise ValueError(f"handle: made on rank {handle.rank}, this is rank {self.rank}")

    def _run_dispatch(self, x, plan, what):
        handle, topk_idx, W = plan["handle"], plan["topk_idx"], plan["num_worst_tokens"]
        data = x[0] if isinstance(x, tuple) else x
        if self._kernels is not None:
            return self._run_kernel_dispatch(x, plan, what)
        if handle is None:
            in_rank = plan["is_token_in_rank"]
            if in_rank is None:
                _, _, in_rank = self._engine.layout(topk_idx, plan["num_experts"])
            handle = self._engine.make_handle(in_rank, data.shape[0], W, what)
            handle.made_at = self._agreement.seq - 1
            handle.num_recv = W or sum(handle.recv_counts)
            recv_x, recv_idx, recv_w, counts = self._engine.dispatch(x, topk_idx, plan["topk_weights"],
                                                                     plan["num_experts"], handle, what)
        else:
            recv_x, _, _, _ = self._engine.dispatch(x, None, None, None, handle, what)
            return self._pad(recv_x, W or handle.num_recv), None, None, None, None
        if topk_idx is None:
            counts = self._local_expert_sums(plan, what)
        counts = self._expert_counts(counts, plan)
        recv_x, recv_idx, recv_w = self._pad(recv_x, handle.num_recv), self._pad(recv_idx, handle.num_recv, -1), \
            self._pad(recv_w, handle.num_recv, 0)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    def _pad(t, rows, value=0):
        """t with `rows` rows: the received ones, then `value` (num_worst_tokens padding)."""
        if t is None:
            return None
        if isinstance(t, tuple):
            return tuple(Buffer._pad(p, rows, value) for p in t)
        if t.shape[0] == rows:
            return t
        out = torch.full((rows,) + tuple(t.shape[1:]), value, dtype=t.dtype, device=t.device) if value \
            else torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        out[:t.shape[0]] = t
        return out

    @staticmethod
    def _expert_counts(counts, plan):
        """DeepEP's num_recv_tokens_per_expert_list: [] with num_worst_tokens, else the counts
        per local expert rounded up to expert_alignment (None when unknown)."""
        if plan["num_worst_tokens"]:
            return []
        return None if counts is None else _align(counts, plan["expert_alignment"])

    def _local_expert_sums(self, plan, what):
        """Without top-k (DeepEP's meaning): the sum over ranks of their num_tokens_per_expert
        for this rank's experts; None when not given (agreed in the header, so every rank
        enters the all_gather or none does)."""
        per_expert = plan["num_tokens_per_expert"]
        if per_expert is None:
            return None
        epr = per_expert.numel() // self.num_ranks
        rows = self._engine.gather_rows(per_expert, what)
        return rows[:, self.rank * epr:(self.rank + 1) * epr].sum(0).tolist()

    def _run_kernel_dispatch(self, x, plan, what):
        handle, W, data = plan["handle"], plan["num_worst_tokens"], x[0] if isinstance(x, tuple) else x
        k = self._kernels
        k.ensure(int(data.shape[1]), plan["config"])
        in_rank = handle.is_token_in_rank if handle is not None else plan["is_token_in_rank"]
        topk_idx = plan["topk_idx"]
        if W == 0 and handle is not None and handle.num_worst_tokens:
            W = handle.num_worst_tokens   # a worst-case handle keeps its rows
        recv_x, recv_idx, recv_w, new_handle, _ = k.dispatch(x, topk_idx, plan["topk_weights"], plan["num_experts"],
                                                            in_rank if topk_idx is None else None, W, what)
        if handle is not None:
            return recv_x, None, None, None, None
        new_handle.made_at = self._agreement.seq - 1
        counts = None
        if topk_idx is None:
            counts = self._local_expert_sums(plan, what)
        elif not W:
            epr = plan["num_experts"] // self.num_ranks
            counts = [int(c) for c in torch.stack([(recv_idx == e).sum() for e in range(epr)]).tolist()] \
                if epr else []
        counts = self._expert_counts(counts, plan)
        return recv_x, recv_idx, recv_w, counts, new_handle

    # -- combine -----------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights=None, bias=None, config: Config = None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send the received rows back and reduce them per source token (DeepEP's combine:
        addition without weights).

        x: bf16 [N, H], N = the rows dispatch returned (with num_worst_tokens, rows past the
        received count are ignored); handle: that dispatch's. topk_weights float32 [N, K]
        (optional): summed per slot the same way.
        Returns (combined_x bf16 [T, H]: per token of this rank, the float32 sum of the rows
        its destination ranks return, added from 0.0 in ascending rank order and rounded to
        bf16 once (0 for a token sent nowhere); combined_topk_weights float32 [T, K] (the
        same sum of the weights; None without topk_weights); EventOverlap).
        With the handle of an expert_layout dispatch, x is bf16 [m_sum, H] in that layout
        (padding rows not read) and topk_weights must be None: each received row is first
        the float32 sum of its grouped rows (k order), rounded to bf16.
        """
        what = f"Buffer.combine (call {self._agreement.seq})"
        self._check_usable(what)
        error = None
        try:
            layout = getattr(handle, "expert_layout", None) if isinstance(handle, DispatchHandle) else None
            if layout is not None:
                x = EL.from_expert_layout(x, layout, topk_weights)
            check_combine_args(x, handle, topk_weights, DispatchHandle)
            self._check_handle_kind(handle)
            self._check_kernel_aligned("x", x)
            if bias is not None:
                raise NotImplementedError("Buffer.combine: bias is not supported yet (pass bias=None)")
            header = dict(kind="combine", hidden=int(x.shape[1]), dtype="bf16",
                          topk=0 if topk_weights is None else int(topk_weights.shape[1]), handle_from=handle.made_at,
                          device=x.device.type)
        except (TypeError, ValueError, NotImplementedError) as e:
            error, header = e, None
        self._agree(what, header, error)
        if previous_event is not None:
            previous_event.current_stream_wait()
        if self._kernels is None:
            out = self._engine.combine(x, handle, what)
            weights = None if topk_weights is None else self._engine.combine_weights(topk_weights, handle, what)
        else:
            out = self._kernels.combine(x, handle)
            weights = None
            if topk_weights is not None:
                # the kernels' ring slots carry no top-k weights: they go back through the group
                layout = self._engine.make_handle(handle.is_token_in_rank, handle.num_tokens, 0, what)
                weights = self._engine.combine_weights(topk_weights, layout, what)
        return out, weights, self._event(async_finish, x.device)

    # -- lifetime ----------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the transport's buffers (IPC mappings, shared memory). DeepEP's rule: only
        for a Buffer built with explicitly_destroy=True; every later call raises."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy: this Buffer was built with explicitly_destroy=False (its resources are "
                               "released on garbage collection); pass explicitly_destroy=True to call destroy()")
        self._release()

    def _release(self):
        if not self._destroyed:
            self._destroyed = True
            if self._kernels is not None:
                self._kernels.destroy()
            if self._low_latency is not None:
                self._low_latency.destroy()

    # -- low-latency mode (pykernels.ep.low_latency; docs/ep.md, "Low-latency mode") ------------
    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of one rank's fixed low-latency buffers on the engine path (two sets of
        dispatch and combine send/receive buffers, bf16); the kernels' region is
        IntranodeConfig.layout()'s. Buffers are allocated at the first call, not from
        num_rdma_bytes."""
        return low_latency.rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP's clean: here the low-latency buffers are dropped and the next low-latency
        call (on every rank) makes zeroed ones. Never required: normal and low-latency calls
        use separate buffers, and the low-latency words carry a call number, not a reset."""
        self._check_usable("clean_low_latency_buffer")
        for name, v in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden),
                        ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self._low_latency is not None:
            self._low_latency.clean()

    def _low_latency_impl(self):
        if self._low_latency is None:
            quant = "triton" if self.local_backend == "triton" else "auto"   # reference on CPU, the kernel on GPU
            if self._kernels is None:
                self._low_latency = low_latency.LowLatencyEngine(self.group, self.rank, self.num_ranks, self.device,
                                                                 quant, self._engine._wait)
            else:
                from .kernel_transport import transport_class
                make = transport_class(self.backend)
                self._low_latency = low_latency.KernelLowLatency(
                    lambda cfg: make(cfg, self.group, timeout_s=self.timeout_s), self.num_ranks, quant)
        return self._low_latency

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """DeepEP's low-latency dispatch: one row per (token, top-k slot), into fixed
        buffers sized by M = num_max_dispatch_tokens_per_rank (the same on every rank).

        x bf16 [T, H], T <= M; topk_idx int64 [T, K] in [-1, E). use_fp8: cast each 1x128
        group (scale max(amax, 1e-4)/448; round_scale: a power of two; use_ue8m0: those
        scales' exponents packed four per int32). cumulative_local_expert_recv_stats: int32
        [E_l], recv_count added. Returns (recv_x: bf16 [E_l, R*M, H] or (e4m3 [E_l, R*M, H],
        float32 [E_l, R*M, H/128] column-major | int32 [E_l, R*M, H/512]), recv_count int32
        [E_l], handle, EventOverlap, hook): expert le's rows are recv_x[le, :recv_count[le]],
        packed in (source rank, source token, k) order - the masked layout of
        pykernels.gemm.m_grouped_fp8_gemm_nt_masked with masked_m = recv_count. With
        return_recv_hook the receive completes when hook() is called (else hook is None).
        """
        what = f"Buffer.low_latency_dispatch (call {self._agreement.seq})"
        self._check_usable(what)
        error = header = None
        try:
            header = low_latency.check_dispatch_args(
                x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.num_ranks, use_fp8, round_scale,
                use_ue8m0, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                sync=self.backend != "cuda")
            self._check_kernel_aligned("x", x)
        except (TypeError, ValueError) as e:
            error = e
        self._agree(what, header, error)
        recv_x, count, handle, hook = self._low_latency_impl().dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0,
            return_recv_hook, cumulative_local_expert_recv_stats)
        return recv_x, count, handle, self._event(async_finish, x.device), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        """DeepEP's low-latency combine, weighted: out[t] = bf16(sum over valid k in order
        of f32(expert output of (t, k)) * topk_weights[t, k]) from 0.0, products rounded to
        float32 (no FMA); 0 for a token with no valid slot.

        x bf16 [E_l, R*M, H]: the expert outputs in dispatch's packed layout (rows past
        recv_count are not read); topk_idx, topk_weights float32: this rank's [T, K], as
        dispatched; handle: that dispatch's. zero_copy: read
        get_next_low_latency_combine_buffer(handle) instead of x. out: bf16 [T, H] to write.
        Returns (combined bf16 [T, H], EventOverlap, hook (return_recv_hook) or None).
        """
        what = f"Buffer.low_latency_combine (call {self._agreement.seq})"
        self._check_usable(what)
        error = header = None
        try:
            header = low_latency.check_combine_args(x, topk_idx, topk_weights, handle, self.num_ranks, use_logfmt,
                                                    zero_copy, out, combine_wait_recv_cost_stats)
            if not zero_copy:
                self._check_kernel_aligned("x", x)
        except (TypeError, ValueError) as e:
            error = e
        self._agree(what, header, error)
        combined, hook = self._low_latency_impl().combine(x, topk_idx, topk_weights, handle, zero_copy,
                                                          return_recv_hook, out)
        return combined, self._event(async_finish, combined.device), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """bf16 [E_l, R*M, H]: fill it with the expert outputs, then low_latency_combine(...,
        zero_copy=True) reads it (DeepEP's; here a persistent tensor, not the wire buffer)."""
        if not isinstance(handle, low_latency.LowLatencyHandle):
            raise TypeError(f"handle: expected the LowLatencyHandle of a low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        return self._low_latency_impl().next_combine_buffer(handle)

    # -- not supported here ------------------------------------------------------------------

    def internode_dispatch(self, *args, **kwargs):
        raise NotImplementedError("Buffer.internode_dispatch: internode (RDMA) dispatch is not supported; the "
                                  "engine backends (\"gloo\"/\"nccl\") work across nodes through dispatch()")

    def internode_combine(self, *args, **kwargs):
        raise NotImplementedError("Buffer.internode_combine: internode (RDMA) combine is not supported; the "
                                  "engine backends (\"gloo\"/\"nccl\") work across nodes through combine()")

    def get_local_buffer_tensor(self, *args, **kwargs):
        raise NotImplementedError("Buffer.get_local_buffer_tensor: the raw communication buffer is not exposed")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        raise NotImplementedError("Buffer.low_latency_update_mask_buffer: masking ranks (DeepEP's enable_shrink) is "
                                  "not supported")

    def low_latency_query_mask_buffer(self, mask_status):
        raise NotImplementedError("Buffer.low_latency_query_mask_buffer: masking ranks (DeepEP's enable_shrink) is "
                                  "not supported")

    def low_latency_clean_mask_buffer(self):
        raise NotImplementedError("Buffer.low_latency_clean_mask_buffer: masking ranks (DeepEP's enable_shrink) is "
                                  "not supported")

    def get_comm_stream(self):
        raise NotImplementedError("Buffer.get_comm_stream: pykernels runs every EP call on the current stream "
                                  "(there is no separate communication stream)")
