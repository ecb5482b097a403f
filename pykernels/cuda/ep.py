"""Hand-written intranode expert-parallel kernels (csrc/ep/*.cu): launch plans, buffer
layout, an emulator runner with every rank in one process, and a small GPU runner.

Kernels (docs/ep.md, "Hand-written intranode kernels"):
  ep_layout       pk_ep_layout        topk_idx -> per-rank / per-expert counts, is_token_in_rank
  ep_intranode    pk_ep_dispatch      normal mode, per-(channel, rank) rings
                  pk_ep_combine       the reverse path, fp32 weighted sums in token order
  ep_low_latency  pk_ep_ll_dispatch   fixed per-(local expert, source rank) slots, received
                                      rows packed per local expert (DeepEP's layout)
                  pk_ep_ll_combine    weighted combine back into the source rank

Routing conventions are pykernels.reference.ep's: rank r holds experts [r*E/R, (r+1)*E/R);
received rows are ordered by (source rank, source token); local top-k ids, -1 elsewhere
(weight 0). Every wait in the kernels is bounded by `max_spins` polls; past it the kernel
writes an error record into a small int32 buffer (decode_error) and traps. One error is
recorded without a trap: code 9, a normal dispatch receiving more rows than its outputs
hold (num_worst_tokens too small) - the rows past the bound are dropped.

Executors: `LocalNode` holds every rank in this process and runs all ranks' kernels at
once, on the PTX emulator (CPU: pykernels.emu.launch_many, one global memory, so a rank's
buffer address works in its peers' kernels like a CUDA IPC mapping) or on one GPU with a
stream per rank; `IntranodeRank` is one rank of a process group per process, over a
provider of memory and launches: `CudaIntranode` (its GPU, buffers opened through CUDA
IPC) or pykernels.ep.transport_emu.EmuIntranode (shared memory mapped at one address in
every process, the emulator). The same plan builders serve all of them.
"""
import dataclasses
import numbers
import weakref

import torch

from ..runtime import artifacts
from ..runtime.executors import run_cuda
from ..runtime.hardware import SCALE_BLOCK, cdiv as _cdiv, round_up as _round_up
from ..runtime.plan import Arg, LaunchPlan, ptr, u32, u64
from ..runtime.plan import ptr_or_null as _opt  # optional pointers: null when None

THREADS = 256                 # every EP kernel: 8 warps
MAX_RANKS = 8                 # peers passed as 8 u64 arguments (NVLink domain of one node)
MAX_TOPK = 16
UE8M0_PER_WORD = 4            # low-latency UE8M0 scales: four exponent bytes per int32 (DeepEP's packing)
SCALE_ROW_ALIGN = 4           # low-latency scales, column-major: rows padded to 16 bytes (TMA)
CTRL_BYTES = 128              # per ring: head at +0, tail at +64
FLAG_IDLE_SENDERS = 1         # testing: a rank's sender CTAs return at once
FLAG_IDLE_RECEIVERS = 2       # testing: its receiver CTAs return at once (both: an absent rank)
DEFAULT_MAX_SPINS = 1 << 27   # polls before a wait gives up on a GPU (about a minute or two)
EMU_MAX_SPINS = 1 << 20       # on the emulator (a poll is a few scheduler steps)

ERROR_WORDS = 8               # error record: valid, rank, channel, code, peer, seen, needed, cta
WAIT_CODES = {
    1: "dispatch sender waits for a free slot (head of the ring in the receiver)",
    2: "dispatch receiver waits for an item (tail of its ring)",
    3: "combine sender waits for a free slot (head of the ring in the receiver)",
    4: "combine receiver waits for an item (tail of its ring)",
    5: "combine receiver got another token's item (protocol error)",
    6: "low-latency dispatch receiver waits for a (local expert, source rank) count",
    7: "low-latency combine receiver waits for an expert's flag",
    8: "low-latency dispatch overflows num_max_dispatch_tokens_per_rank slots",
    9: "dispatch receiver got rows past num_worst_tokens and dropped them, no trap (seen: end row, needed: the bound)",
}
CODE_RECV_OVERFLOW = 9        # the one code recorded without a trap: the kernel finishes, buffers stay usable


class DispatchOverflowError(RuntimeError):
    """A rank received more rows than num_worst_tokens (error code 9). The kernel dropped the
    rows past the bound (still consumed from the rings): the buffers stay usable."""


# ---------------------------------------------------------------------------------------
# Configuration and buffer layout
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IntranodeConfig:
    """Sizes fixed for the lifetime of a buffer.

    num_ranks: ranks of the node (1..8); hidden: the largest hidden size (multiple of 128);
    max_topk: the largest top-k (<= 16); num_channels: normal-mode channels (each one
    sender CTA and one receiver CTA per rank: 2 * num_channels CTAs); num_slots: slots per
    ring (a power of two); publish_every: items between counter publications (<= num_slots);
    num_experts, max_dispatch_tokens: the low-latency region (0 = none).
    """
    num_ranks: int
    hidden: int
    max_topk: int = 8
    num_channels: int = 8
    num_slots: int = 128
    publish_every: int = 8
    num_experts: int = 0
    max_dispatch_tokens: int = 0

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name}: expected {want}, got {getattr(self, name)}")
        if not 1 <= self.num_ranks <= MAX_RANKS:
            bad("num_ranks", f"1..{MAX_RANKS}")
        if self.hidden <= 0 or self.hidden % SCALE_BLOCK:
            bad("hidden", f"a positive multiple of {SCALE_BLOCK}")
        if not 1 <= self.max_topk <= MAX_TOPK:
            bad("max_topk", f"1..{MAX_TOPK}")
        if self.num_channels < 1:
            bad("num_channels", "at least 1")
        if self.num_slots < 2 or self.num_slots & (self.num_slots - 1):
            bad("num_slots", "a power of two >= 2")
        if not 1 <= self.publish_every <= self.num_slots:
            bad("publish_every", f"1..num_slots ({self.num_slots})")
        if self.num_experts < 0 or self.num_experts % self.num_ranks:
            bad("num_experts", f"a multiple of num_ranks ({self.num_ranks})")
        if self.max_dispatch_tokens < 0 or (self.num_experts > 0) != (self.max_dispatch_tokens > 0):
            bad("max_dispatch_tokens", "positive exactly when num_experts is")

    # -- slot sizes ----------------------------------------------------------------------
    @property
    def dispatch_slot_bytes(self) -> int:
        """bf16 row (or e4m3 row + f32 scales, smaller), K int32 ids, K f32 weights, int32 source."""
        h = self.hidden
        return _round_up(2 * h + 4 * (h // SCALE_BLOCK) + 8 * self.max_topk + 4, 16)

    @property
    def combine_slot_bytes(self) -> int:
        """bf16 row, f32 weight sum, int32 source token."""
        return _round_up(2 * self.hidden + 8, 16)

    @property
    def ll_dispatch_slot_bytes(self) -> int:
        h = self.hidden
        return _round_up(2 * h + 4 * (h // SCALE_BLOCK) + 4, 16)

    @property
    def ll_combine_slot_bytes(self) -> int:
        return 2 * self.hidden

    def layout(self) -> dict:
        """Byte offsets of the regions of one rank's buffer (the same on every rank)."""
        R, C, S = self.num_ranks, self.num_channels, self.num_slots
        rings = C * R
        off = {}
        cur = 0
        off["dispatch"] = cur
        cur += _round_up(rings * CTRL_BYTES + rings * S * self.dispatch_slot_bytes, 128)
        off["combine"] = cur
        cur += _round_up(rings * CTRL_BYTES + rings * S * self.combine_slot_bytes, 128)
        E, M = self.num_experts, self.max_dispatch_tokens
        if E:
            off["ll_counts"] = cur
            cur += _round_up(8 * E, 128)              # uint64 [E_local][R] (E_local * R = E)
            off["ll_flags"] = cur
            cur += _round_up(4 * E, 128)              # uint32 [E]
            off["ll_dispatch"] = cur
            cur += _round_up(E * M * self.ll_dispatch_slot_bytes, 128)   # [E_local][R][M] slots
            off["ll_combine"] = cur
            cur += _round_up(E * M * self.ll_combine_slot_bytes, 128)    # [E][M] rows
        off["total"] = cur
        return off

    @property
    def buffer_bytes(self) -> int:
        return self.layout()["total"]


def nvlink_bytes_per_token(hidden: int, num_topk: int, fp8: bool = False) -> dict:
    """Bytes one (token, destination rank) pair moves over NVLink in each direction
    (payload plus metadata of the ring items; docs/ep.md performance model)."""
    payload = hidden + 4 * (hidden // SCALE_BLOCK) if fp8 else 2 * hidden
    return {"dispatch": payload + 8 * num_topk + 4, "combine": 2 * hidden + 8}


# ---------------------------------------------------------------------------------------
# Error records
# ---------------------------------------------------------------------------------------
def decode_error(err: torch.Tensor):
    """The error record of a rank (int32 [8]) as a dict, or None when no wait timed out."""
    v = [int(x) for x in err.cpu().view(torch.int32).tolist()]
    if v[0] == 0:
        return None
    return {"rank": v[1], "channel": v[2], "code": v[3], "what": WAIT_CODES.get(v[3], "unknown"),
            "peer": v[4], "seen": v[5] & 0xFFFFFFFF, "needed": v[6] & 0xFFFFFFFF, "cta": v[7]}


def _err_arg(err: torch.Tensor, device: torch.device) -> Arg:
    # Emulator / same device: a pointer argument. GPU with a pinned host record: its
    # address (device-accessible under unified addressing), not a device tensor.
    return ptr(err) if err.device == device else u64(err.data_ptr())


def _peer_args(peers) -> list:
    if len(peers) > MAX_RANKS:
        raise ValueError(f"peers: at most {MAX_RANKS} ranks, got {len(peers)}")
    return [u64(p) for p in list(peers) + [0] * (MAX_RANKS - len(peers))]


def _payload(x):
    """(data as uint8 [T, row bytes], scales float32 [T, H/128] or None, hidden, is_fp8)."""
    if isinstance(x, tuple):
        data, scales = x
        return data.contiguous().view(torch.uint8), scales.contiguous(), data.shape[1], True
    return x.contiguous().view(torch.uint8), None, x.shape[1], False


# ---------------------------------------------------------------------------------------
# Launch plans
# ---------------------------------------------------------------------------------------
def layout_plan(topk_idx, num_experts, num_ranks, num_tokens_per_rank, num_tokens_per_expert,
                is_token_in_rank) -> LaunchPlan:
    """topk_idx int64 [T, K]; the two counters int32, zero on entry; is_token_in_rank bool [T, R]."""
    T, K = topk_idx.shape
    return LaunchPlan("ep_layout", "pk_ep_layout", grid=(max(1, _cdiv(T, THREADS)), 1, 1), block=(THREADS, 1, 1),
                      shared_bytes=4 * (num_experts + num_ranks),
                      args=(ptr(topk_idx), ptr(num_tokens_per_rank), ptr(num_tokens_per_expert),
                            ptr(is_token_in_rank.view(torch.uint8)), u32(T), u32(K), u32(num_experts),
                            u32(num_ranks)))


def dispatch_plan(cfg: IntranodeConfig, rank: int, buffer, peers, x, topk_idx, topk_weights, is_token_in_rank,
                  rank_offset, out: dict, err, experts_per_rank: int, max_spins=DEFAULT_MAX_SPINS,
                  flags=0) -> LaunchPlan:
    """x bf16 [T, H] or (e4m3 [T, H], f32 [T, H/128]); topk_idx int64 [T, K] / topk_weights
    f32 [T, K] or None (K = 0); is_token_in_rank bool [T, R]; rank_offset int32 [R] (first
    received row of each source). out: recv_x (uint8 [N, row bytes]), recv_scales,
    recv_topk_idx int64 [N, K], recv_topk_weights f32 [N, K], recv_src_idx int32 [N],
    recv_channel_offset int32 [R, C, 2]. N (the rows of the outputs) is the kernel's bound
    on the rows it writes: past it the receiver drops the rows (consumes them from the
    ring), records code 9 and finishes without a trap; recv_channel_offset then holds the
    rows written."""
    data, scales, hidden, fp8 = _payload(x)
    K = 0 if topk_idx is None else topk_idx.shape[1]
    layout = cfg.layout()
    return LaunchPlan(
        "ep_intranode", "pk_ep_dispatch", grid=(2 * cfg.num_channels, 1, 1), block=(THREADS, 1, 1),
        args=(ptr(buffer), *_peer_args(peers), ptr(data), _opt(scales), _opt(topk_idx), _opt(topk_weights),
              ptr(is_token_in_rank.view(torch.uint8)), ptr(rank_offset), ptr(out["recv_x"]),
              _opt(out.get("recv_scales")), _opt(out.get("recv_topk_idx")), _opt(out.get("recv_topk_weights")),
              ptr(out["recv_src_idx"]), ptr(out["recv_channel_offset"]), _err_arg(err, buffer.device),
              u32(rank), u32(cfg.num_ranks), u32(data.shape[0]), u32(data.shape[1]),
              u32(hidden // SCALE_BLOCK if fp8 else 0), u32(K), u32(experts_per_rank), u32(cfg.num_channels),
              u32(cfg.num_slots), u32(cfg.dispatch_slot_bytes), u64(layout["dispatch"]), u32(cfg.publish_every),
              u32(out["recv_x"].shape[0]), u32(max_spins), u32(flags)))


def combine_plan(cfg: IntranodeConfig, rank: int, buffer, peers, x, topk_weights, handle, out, err,
                 max_spins=DEFAULT_MAX_SPINS, flags=0) -> LaunchPlan:
    """x bf16 [N, H] (rows as dispatch delivered them); topk_weights f32 [N, K] or None;
    handle: this rank's IntranodeHandle; out bf16 [T, H]."""
    K = 0 if topk_weights is None else topk_weights.shape[1]
    layout = cfg.layout()
    return LaunchPlan(
        "ep_intranode", "pk_ep_combine", grid=(2 * cfg.num_channels, 1, 1), block=(THREADS, 1, 1),
        args=(ptr(buffer), *_peer_args(peers), ptr(x.contiguous().view(torch.uint8)), _opt(topk_weights),
              ptr(handle.recv_src_idx), ptr(handle.recv_channel_offset),
              ptr(handle.is_token_in_rank.view(torch.uint8)), ptr(out.view(torch.uint8)),
              _err_arg(err, buffer.device), u32(rank), u32(cfg.num_ranks), u32(handle.num_tokens),
              u32(x.shape[1]), u32(K), u32(cfg.num_channels), u32(cfg.num_slots), u32(cfg.combine_slot_bytes),
              u64(layout["combine"]), u32(cfg.publish_every), u32(max_spins), u32(flags)))


def _ll_ctas(senders: int, receivers: int):
    warps = THREADS // 32
    return _cdiv(senders, warps), _cdiv(receivers, warps)


def ll_dispatch_plan(cfg: IntranodeConfig, rank: int, buffer, peers, x, topk_idx, out: dict, err, seq: int,
                     max_spins=DEFAULT_MAX_SPINS, flags=0) -> LaunchPlan:
    """out (_alloc_ll_out): recv_x uint8 [E_local, R*M, row bytes] (rows packed per local
    expert), recv_scales (FP8: float32 [E_local, R*M, H/128], or int32 UE8M0 words
    [E_local, R*M, H/512], column-major per expert), recv_src_info int32 [E_local, R*M],
    recv_layout int32 [E_local, R], recv_count int32 [E_local], slot_of int32 [T, K]."""
    data, scales, hidden, fp8 = _payload(x)
    E, R = cfg.num_experts, cfg.num_ranks
    send, recv = _ll_ctas(E, E // R)
    layout = cfg.layout()
    recv_scales = out.get("recv_scales")
    ue8m0 = recv_scales is not None and recv_scales.dtype == torch.int32
    scale_stride = recv_scales.stride(2) if recv_scales is not None else 0
    return LaunchPlan(
        "ep_low_latency", "pk_ep_ll_dispatch", grid=(send + recv, 1, 1), block=(THREADS, 1, 1),
        args=(ptr(buffer), *_peer_args(peers), ptr(data), _opt(scales), ptr(topk_idx), ptr(out["recv_x"]),
              _opt(out.get("recv_scales")), ptr(out["recv_src_info"]), ptr(out["recv_layout"]),
              ptr(out["recv_count"]), ptr(out["slot_of"]), _err_arg(err, buffer.device), u32(rank), u32(R),
              u32(data.shape[0]), u32(data.shape[1]), u32(hidden // SCALE_BLOCK if fp8 else 0),
              u32(topk_idx.shape[1]), u32(E), u32(cfg.max_dispatch_tokens), u32(seq),
              u32(cfg.ll_dispatch_slot_bytes), u64(layout["ll_counts"]), u64(layout["ll_dispatch"]),
              u32(scale_stride), u32(ue8m0), u32(send), u32(max_spins), u32(flags)))


def ll_combine_plan(cfg: IntranodeConfig, rank: int, buffer, peers, y, topk_idx, topk_weights, handle, out, err,
                    num_recv_ctas: int = 1, max_spins=DEFAULT_MAX_SPINS, flags=0) -> LaunchPlan:
    """y bf16 [E_local, R*M, H] (dispatch's packed layout); topk_idx int64 [T, K],
    topk_weights f32 [T, K] (this rank's); handle: this rank's LowLatencyHandle; out bf16 [T, H]."""
    E, R = cfg.num_experts, cfg.num_ranks
    send, _ = _ll_ctas(E // R, 0)
    layout = cfg.layout()
    return LaunchPlan(
        "ep_low_latency", "pk_ep_ll_combine", grid=(send + max(1, num_recv_ctas), 1, 1), block=(THREADS, 1, 1),
        args=(ptr(buffer), *_peer_args(peers), ptr(y.contiguous().view(torch.uint8)), ptr(handle.recv_layout),
              ptr(topk_idx), ptr(topk_weights), ptr(handle.slot_of), ptr(out.view(torch.uint8)),
              _err_arg(err, buffer.device), u32(rank), u32(R), u32(topk_idx.shape[0]), u32(y.shape[-1]),
              u32(topk_idx.shape[1]), u32(E), u32(cfg.max_dispatch_tokens), u32(handle.seq),
              u32(cfg.ll_combine_slot_bytes), u64(layout["ll_flags"]), u64(layout["ll_combine"]), u32(send),
              u32(max_spins), u32(flags)))


# ---------------------------------------------------------------------------------------
# Handles and validation shared by the runners
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class IntranodeHandle:
    """One rank's record of a normal-mode dispatch, for combine (and a cached layout).

    is_token_in_rank bool [T, R]; rank_offset int32 [R]: first received row from each
    source; recv_src_idx int32 [N]: source token of each received row;
    recv_channel_offset int32 [R, C, 2]: (first row, rows) per (source rank, channel).
    num_recv: N, the rows of the dispatch outputs - the received tokens, or
    num_worst_tokens when that was given (then the received count is known on the device
    only); num_tokens: T; num_recv_tokens: the received tokens, int32 0-dim on the device
    (both modes); num_worst_tokens: 0, or the worst-case row count the outputs were
    allocated with (num_recv == num_worst_tokens, rows past num_recv_tokens not written)."""
    is_token_in_rank: torch.Tensor
    rank_offset: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_channel_offset: torch.Tensor
    num_recv: int
    num_tokens: int
    num_recv_tokens: torch.Tensor = None
    num_worst_tokens: int = 0


@dataclasses.dataclass
class LowLatencyHandle:
    """One rank's record of a low-latency dispatch: recv_src_info int32 [E_local, R*M]
    (source token of each received row, packed like the rows), recv_layout int32
    [E_local, R] (rows per source rank: source s's rows of expert le start at
    sum(recv_layout[le, :s])), slot_of int32 [T, K] (slot of each (token, k) at its
    expert), seq (call number)."""
    recv_src_info: torch.Tensor
    recv_layout: torch.Tensor
    slot_of: torch.Tensor
    seq: int
    num_tokens: int


def _to_host(t: torch.Tensor) -> list:
    """A device -> host read (a synchronisation on a GPU). The dispatch path reads the
    device only through here (topk_idx range check, received-token count, per-expert
    counts), so that a test can forbid it on the num_worst_tokens path."""
    return t.tolist()


def _check_worst_tokens(num_worst_tokens):
    """An int in [0, 2^31) (rows are int32 in the handle); what the host knows of the
    counts without reading them is checked where a handle carries an exact count."""
    if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, numbers.Integral) \
            or not 0 <= num_worst_tokens < 2 ** 31:
        raise ValueError(f"num_worst_tokens: expected an int in [0, 2^31) (0: size the outputs with a host read "
                         f"of the counts), got {num_worst_tokens!r}")


def _check_topk_range(topk_idx, num_experts, sync: bool):
    """Ids in [-1, num_experts): a host read (ValueError), or with sync=False a device-side
    assert (torch._assert_async: no synchronisation on a GPU; on the CPU it raises
    RuntimeError at once)."""
    if not topk_idx.numel():
        return
    if sync:
        lo, hi = _to_host(torch.stack(torch.aminmax(topk_idx)))
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx: expected values in [-1, {num_experts})")
    else:
        ok = ((topk_idx >= -1) & (topk_idx < num_experts)).all()
        torch._assert_async(ok, f"topk_idx: expected values in [-1, {num_experts})")


def _check_inputs(cfg: IntranodeConfig, x, topk_idx, topk_weights, num_experts, sync: bool = True):
    data = x[0] if isinstance(x, tuple) else x
    if isinstance(x, tuple):
        if data.dtype != torch.float8_e4m3fn or x[1].dtype != torch.float32:
            raise TypeError(f"x: expected (float8_e4m3fn [T, H], float32 [T, H/128]), got "
                            f"({data.dtype}, {x[1].dtype})")
        if tuple(x[1].shape) != (data.shape[0], data.shape[1] // SCALE_BLOCK):
            raise ValueError(f"x scales: expected [{data.shape[0]}, {data.shape[1] // SCALE_BLOCK}], "
                             f"got {list(x[1].shape)}")
    elif data.dtype != torch.bfloat16:
        raise TypeError(f"x: expected a bfloat16 tensor or an FP8 pair, got {data.dtype}")
    if data.dim() != 2 or data.shape[1] % SCALE_BLOCK or data.shape[1] > cfg.hidden:
        raise ValueError(f"x: expected [T, H] with H a multiple of {SCALE_BLOCK} and <= {cfg.hidden} "
                         f"(the buffer's hidden size), got {list(data.shape)}")
    if topk_idx is not None:
        if topk_idx.dtype != torch.int64 or tuple(topk_idx.shape[:1]) != (data.shape[0],) or topk_idx.dim() != 2:
            raise ValueError(f"topk_idx: expected int64 [{data.shape[0]}, K], got {topk_idx.dtype} "
                             f"{list(topk_idx.shape)}")
        if not 1 <= topk_idx.shape[1] <= cfg.max_topk:
            raise ValueError(f"topk_idx: expected 1..{cfg.max_topk} (the buffer's max_topk) experts per token, "
                             f"got {topk_idx.shape[1]}")
        if num_experts is None or num_experts <= 0 or num_experts % cfg.num_ranks:
            raise ValueError(f"num_experts: expected a positive multiple of {cfg.num_ranks}, got {num_experts}")
        _check_topk_range(topk_idx, num_experts, sync)
        if topk_weights is not None and (topk_weights.dtype != torch.float32
                                         or topk_weights.shape != topk_idx.shape):
            raise ValueError(f"topk_weights: expected float32 {list(topk_idx.shape)}, got "
                             f"{topk_weights.dtype} {list(topk_weights.shape)}")


def _row_bytes(x) -> int:
    data = x[0] if isinstance(x, tuple) else x
    return data.shape[1] * data.element_size()


def _maker(device, poison):
    def make(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=device)
        if poison:
            t.view(torch.uint8).fill_(0xFF)   # NaN / -1 wherever a kernel fails to write
        return t
    return make


def _alloc_dispatch_out(cfg, x, num_recv, K, device, poison):
    data = x[0] if isinstance(x, tuple) else x
    H = data.shape[1]
    make = _maker(device, poison)
    out = {"recv_x": make((num_recv, _row_bytes(x)), torch.uint8),
           "recv_src_idx": make((num_recv,), torch.int32),
           "recv_channel_offset": make((cfg.num_ranks, cfg.num_channels, 2), torch.int32)}
    if isinstance(x, tuple):
        out["recv_scales"] = make((num_recv, H // SCALE_BLOCK), torch.float32)
    if K:
        out["recv_topk_idx"] = make((num_recv, K), torch.int64)
        out["recv_topk_weights"] = make((num_recv, K), torch.float32)
    return out


def _dispatch_result(x, out, K, experts_per_rank, handle):
    """num_recv_tokens_per_expert: a host list (one read), or with num_worst_tokens an
    int32 [E_local] device tensor counted over the first num_recv_tokens rows only (the
    padding rows' top-k ids are set to -1 and their weights to 0 first)."""
    data = x[0] if isinstance(x, tuple) else x
    recv_x = out["recv_x"].view(data.dtype).view(-1, data.shape[1])
    if isinstance(x, tuple):
        recv_x = (recv_x, out["recv_scales"])
    idx = out.get("recv_topk_idx")
    counts = None
    if idx is not None:
        if handle.num_worst_tokens:
            # padding rows (past the count) get top-k ids -1 and weights 0, as DeepEP pads
            # them: consumers (expert GEMMs, counts) skip them without knowing the count.
            # Device ops only (no host read).
            pad = (torch.arange(idx.shape[0], device=idx.device) >= handle.num_recv_tokens)[:, None]
            idx.masked_fill_(pad, -1)
            w = out.get("recv_topk_weights")
            if w is not None:
                w.masked_fill_(pad, 0.0)
            ids = (idx + 1).flatten()
            counts = torch.zeros(experts_per_rank + 1, dtype=torch.int64, device=idx.device) \
                .scatter_add_(0, ids, torch.ones_like(ids))[1:].to(torch.int32)
        else:
            counts = _to_host(torch.stack([(idx == e).sum() for e in range(experts_per_rank)]))  # one host read
    return {"recv_x": recv_x, "recv_topk_idx": idx, "recv_topk_weights": out.get("recv_topk_weights"),
            "num_recv_tokens_per_expert": counts, "num_recv_tokens": handle.num_recv_tokens, "handle": handle}


def _recv_rows(num_recv_tokens, num_worst_tokens) -> int:
    """Rows of the dispatch outputs: num_worst_tokens (no host read), else the received
    count read back to the host."""
    if num_worst_tokens:
        return int(num_worst_tokens)
    return int(_to_host(num_recv_tokens))


def _check_ue8m0(x, use_ue8m0):
    if not use_ue8m0:
        return
    if not isinstance(x, tuple) or x[0].shape[1] % (SCALE_BLOCK * UE8M0_PER_WORD):
        raise ValueError(f"use_ue8m0: needs an FP8 payload with hidden a multiple of "
                         f"{SCALE_BLOCK * UE8M0_PER_WORD}, got "
                         f"{'bf16' if not isinstance(x, tuple) else f'hidden {x[0].shape[1]}'}")


def _alloc_ll_out(cfg, x, num_tokens, K, device, poison, use_ue8m0=False):
    """The dispatch outputs; FP8 scales column-major per expert, rows padded to
    SCALE_ROW_ALIGN (TMA-aligned, as DeepEP and the grouped GEMMs take them)."""
    data = x[0] if isinstance(x, tuple) else x
    H = data.shape[1]
    El, R, M = cfg.num_experts // cfg.num_ranks, cfg.num_ranks, cfg.max_dispatch_tokens
    make = _maker(device, poison)
    out = {"recv_x": make((El, R * M, _row_bytes(x)), torch.uint8),
           "recv_src_info": make((El, R * M), torch.int32),
           "recv_layout": make((El, R), torch.int32), "recv_count": make((El,), torch.int32),
           "slot_of": torch.full((num_tokens, K), -1, dtype=torch.int32, device=device)}
    if isinstance(x, tuple):
        cols, dtype = (H // SCALE_BLOCK // UE8M0_PER_WORD, torch.int32) if use_ue8m0 else \
            (H // SCALE_BLOCK, torch.float32)
        out["recv_scales"] = make((El, cols, _round_up(R * M, SCALE_ROW_ALIGN)), dtype)[:, :, :R * M].transpose(1, 2)
    return out


def _ll_result(x, out, seq, num_tokens):
    data = x[0] if isinstance(x, tuple) else x
    recv_x = out["recv_x"].view(data.dtype).view(out["recv_x"].shape[0], out["recv_x"].shape[1], data.shape[1])
    if isinstance(x, tuple):
        recv_x = (recv_x, out["recv_scales"])
    handle = LowLatencyHandle(out["recv_src_info"], out["recv_layout"], out["slot_of"], seq, num_tokens)
    return {"recv_x": recv_x, "recv_count": out["recv_count"], "handle": handle}


# ---------------------------------------------------------------------------------------
# Every rank in this process: the emulator, or one GPU with a stream per rank
# ---------------------------------------------------------------------------------------
def _launch(plan: LaunchPlan) -> dict:
    return dict(ptx=artifacts.ptx_text(plan.module), kernel=plan.function, grid=plan.grid, block=plan.block,
                args=[a.value for a in plan.args], shared_mem=plan.shared_bytes, cluster=plan.cluster)


def _reuse_handle(h: IntranodeHandle, num_worst_tokens: int, rank: int) -> IntranodeHandle:
    """A copy of a cached handle for a repeated dispatch, with rows for num_worst_tokens."""
    if not num_worst_tokens:
        return dataclasses.replace(h)          # its rows: exact, or its own worst case
    if not h.num_worst_tokens and num_worst_tokens < h.num_recv:   # an exact count, known here
        raise ValueError(f"num_worst_tokens: rank {rank} receives {h.num_recv} tokens (its handle's count), "
                         f"more than num_worst_tokens={num_worst_tokens}")
    total = h.num_recv_tokens
    if total is None:
        total = torch.tensor(h.num_recv, dtype=torch.int32, device=h.rank_offset.device)
    return dataclasses.replace(h, num_recv=num_worst_tokens, num_recv_tokens=total,
                               num_worst_tokens=num_worst_tokens)


class LocalNode:
    """A node of `cfg.num_ranks` ranks, all in this process.

    device "cpu": the emulator. Every call builds one launch plan per rank and runs them
    concurrently with pykernels.emu.launch_many (one global memory: each rank's kernel gets
    the addresses of all buffers, as CUDA IPC mappings would give them).
    device "cuda": every rank's kernel on its own stream of the current GPU (the plans'
    peer addresses are plain device pointers); a check of the kernels on one GPU, not a
    test of NVLink.

    Each rank has its buffer (zeroed once, here) and an error record. Buffers persist
    across calls like a DeepEP Buffer's (ring counters go on from call to call). Lists are
    indexed by rank. max_spins bounds every wait (polls); stall_ranks: ranks whose kernels
    return at once, as if they never arrived (to test the timeouts); flags: raw per-rank
    kernel flags (FLAG_IDLE_SENDERS, FLAG_IDLE_RECEIVERS). poison: fill outputs with 0xFF
    bytes (NaN, -1) so that whatever a kernel fails to write shows up.
    """

    def __init__(self, cfg: IntranodeConfig, device="cpu", max_spins: int = None, poison: bool = True):
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        emulated = self.device.type == "cpu"
        self.max_spins = max_spins if max_spins is not None else (EMU_MAX_SPINS if emulated else DEFAULT_MAX_SPINS)
        self.poison = poison
        self.buffers = [torch.zeros(cfg.buffer_bytes, dtype=torch.uint8, device=self.device)
                        for _ in range(cfg.num_ranks)]
        self.errors = [torch.zeros(ERROR_WORDS, dtype=torch.int32, pin_memory=not emulated)
                       for _ in range(cfg.num_ranks)]
        self.seq = 0
        self.last_stats = None
        self._streams = []                 # one per rank (GPU), made once: reusable under graph capture

    @property
    def peers(self):
        return [b.data_ptr() for b in self.buffers]

    def error_records(self):
        return [decode_error(e) for e in self.errors]

    def _flags(self, stall_ranks, flags=None):
        stall = set(stall_ranks or ())
        flags = list(flags) if flags is not None else [0] * self.cfg.num_ranks
        return [f | (FLAG_IDLE_SENDERS | FLAG_IDLE_RECEIVERS if r in stall else 0) for r, f in enumerate(flags)]

    def _run(self, plans, quantum=512):
        if self.device.type == "cuda":
            while len(self._streams) < len(plans):
                self._streams.append(torch.cuda.Stream(self.device))
            streams = self._streams[:len(plans)]
            for st in streams:
                st.wait_stream(torch.cuda.current_stream(self.device))
            for st, plan in zip(streams, plans):
                for t in plan.tensors():      # allocated on the current stream, used on st
                    t.record_stream(st)
                with torch.cuda.stream(st):
                    run_cuda(plan)
            for st in streams:
                torch.cuda.current_stream(self.device).wait_stream(st)
            return None
        from .. import emu
        try:
            self.last_stats = emu.launch_many([_launch(p) for p in plans], quantum=quantum)
        except emu.EmuError as e:
            records = [f"  rank {r}: {rec}" for r, rec in enumerate(self.error_records()) if rec]
            if records:
                raise type(e)(f"{e}\nerror records:\n" + "\n".join(records)) from e
            raise
        return self.last_stats

    def get_dispatch_layout(self, topk_idxs, num_experts):
        """Per rank: (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R]) from the layout kernel."""
        R, dev = self.cfg.num_ranks, self.device
        outs, plans = [], []
        for topk in topk_idxs:
            per_rank = torch.zeros(R, dtype=torch.int32, device=dev)
            per_expert = torch.zeros(num_experts, dtype=torch.int32, device=dev)
            in_rank = _maker(dev, self.poison)((topk.shape[0], R), torch.bool)
            outs.append((per_rank, per_expert, in_rank))
            plans.append(layout_plan(topk.contiguous(), num_experts, R, per_rank, per_expert, in_rank))
        self._run(plans)
        return outs

    def dispatch(self, xs, topk_idxs=None, topk_weights=None, num_experts=None, handles=None, stall_ranks=None,
                 flags=None, num_worst_tokens: int = 0):
        """Per rank: dict(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
        num_recv_tokens, handle). xs[r]: bf16 [T_r, H] or (e4m3 [T_r, H], f32 [T_r, H/128]).
        With `handles` (from an earlier dispatch), repeats that layout; top-k arguments
        optional then.

        num_worst_tokens > 0: no device -> host read (CUDA-graph safe on a GPU). Every rank's
        outputs get num_worst_tokens rows; the first num_recv_tokens (an int32 0-dim device
        tensor, also handle.num_recv_tokens) are the received rows; past them recv_topk_idx
        is -1 and recv_topk_weights 0 (DeepEP's padding), recv_x and the source index are
        not written (poison here). num_recv_tokens_per_expert is then an int32 [E_local] device tensor;
        the topk_idx range check becomes a device-side assert. A rank receiving more than
        num_worst_tokens tokens records error code 9 without a trap: the kernel writes no
        row past the bound (it drops those rows, still consuming them from the rings), and
        on the emulator DispatchOverflowError is raised after the launch; the buffers stay
        usable (a later dispatch with a large enough num_worst_tokens is correct). Its
        outputs hold the first num_worst_tokens rows; its handles are not fit for combine.
        T * num_ranks (T: the most tokens of any rank) is always enough. With handles from
        an exact dispatch, a num_worst_tokens below their count is a ValueError; with
        handles from a worst-case dispatch and num_worst_tokens=0, their row count is kept."""
        cfg, R, dev = self.cfg, self.cfg.num_ranks, self.device
        _check_worst_tokens(num_worst_tokens)
        topk_idxs = topk_idxs or [None] * R
        topk_weights = topk_weights or [None] * R
        for r in range(R):
            _check_inputs(cfg, xs[r], topk_idxs[r], topk_weights[r], num_experts, sync=not num_worst_tokens)
        if handles is None:
            if topk_idxs[0] is None:
                raise ValueError("topk_idxs: required unless handles from an earlier dispatch are given")
            layouts = self.get_dispatch_layout([t.contiguous() for t in topk_idxs], num_experts)
            counts = torch.stack([per_rank for per_rank, _, _ in layouts])          # [src, dst]
            handles = []
            for d in range(R):
                recv = counts[:, d].to(torch.int64)
                offset = (torch.cumsum(recv, 0) - recv).to(torch.int32)
                total = recv.sum().to(torch.int32)
                T = (xs[d][0] if isinstance(xs[d], tuple) else xs[d]).shape[0]
                handles.append(IntranodeHandle(layouts[d][2], offset, None, None,
                                               _recv_rows(total, num_worst_tokens), T, total,
                                               num_worst_tokens))
        else:
            handles = [_reuse_handle(h, num_worst_tokens, r) for r, h in enumerate(handles)]
        epr = (num_experts // R) if num_experts else 1
        plans, outs = [], []
        flags = self._flags(stall_ranks, flags)
        for r in range(R):
            topk, w = topk_idxs[r], topk_weights[r]
            if topk is not None and w is None:
                w = torch.ones(topk.shape, dtype=torch.float32, device=dev)
            K = 0 if topk is None else topk.shape[1]
            out = _alloc_dispatch_out(cfg, xs[r], handles[r].num_recv, K, dev, self.poison)
            h = handles[r]
            h.recv_src_idx, h.recv_channel_offset = out["recv_src_idx"], out["recv_channel_offset"]
            outs.append(out)
            plans.append(dispatch_plan(cfg, r, self.buffers[r], self.peers, xs[r],
                                       None if topk is None else topk.contiguous(),
                                       None if w is None else w.contiguous(), h.is_token_in_rank, h.rank_offset,
                                       out, self.errors[r], epr, self.max_spins, flags[r]))
        if self.device.type == "cpu":
            for e in self.errors:          # re-arm a record left by an earlier overflow
                rec = decode_error(e)
                if rec and rec["code"] == CODE_RECV_OVERFLOW:
                    e.zero_()
        self._run(plans)
        results = [_dispatch_result(xs[r], outs[r], 0 if topk_idxs[r] is None else topk_idxs[r].shape[1], epr,
                                    handles[r]) for r in range(R)]
        if self.device.type == "cpu":
            self._raise_overflow(handles, results)
        return results

    def combine(self, xs, handles, topk_weights=None, stall_ranks=None, flags=None):
        """Per rank: bf16 [T_r, H], the rows of xs (bf16 [N_r, H], as dispatch delivered them)
        sent back and summed per source token in rank order (f32, each row scaled by the sum
        of its top-k weights when given)."""
        R, dev = self.cfg.num_ranks, self.device
        topk_weights = topk_weights or [None] * R
        flags = self._flags(stall_ranks, flags)
        plans, outs = [], []
        for r in range(R):
            x = xs[r]
            if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != handles[r].num_recv:
                raise ValueError(f"xs[{r}]: expected bf16 [{handles[r].num_recv}, H], got {x.dtype} {list(x.shape)}")
            out = _maker(dev, self.poison)((handles[r].num_tokens, x.shape[1]), torch.bfloat16)
            outs.append(out)
            w = topk_weights[r]
            if w is not None and (w.dtype != torch.float32 or w.dim() != 2 or w.shape[0] != x.shape[0]):
                raise ValueError(f"topk_weights[{r}]: expected float32 [{x.shape[0]}, k] (the received tokens' "
                                 f"weights, as dispatch returned them), got {w.dtype} {list(w.shape)}")
            plans.append(combine_plan(self.cfg, r, self.buffers[r], self.peers, x.contiguous(),
                                      None if w is None else w.contiguous(), handles[r], out, self.errors[r],
                                      self.max_spins, flags[r]))
        self._run(plans)
        return outs

    def _next_seq(self):
        self.seq = self.seq % 0xFFFFFFFF + 1    # never 0 (the buffer's initial value)
        return self.seq

    def low_latency_dispatch(self, xs, topk_idxs, stall_ranks=None, flags=None, use_ue8m0=False):
        """Per rank: dict(recv_x [E_local, R*M, H] (or an FP8 pair with scales
        [E_local, R*M, H/128] float32, column-major per expert; use_ue8m0: int32
        [E_local, R*M, H/512], the exponent bytes of power-of-two scales packed four to a
        word), recv_count int32 [E_local], handle). Rows packed per local expert:
        recv_x[le, :recv_count[le]] in (source rank, source token, k) order (source s's
        rows from sum(handle.recv_layout[le, :s])); rows past recv_count are not written."""
        cfg, R, dev = self.cfg, self.cfg.num_ranks, self.device
        if not cfg.num_experts:
            raise ValueError("low_latency_dispatch: the buffer has no low-latency region (num_experts=0)")
        for r in range(R):
            _check_inputs(cfg, xs[r], topk_idxs[r], None, cfg.num_experts)
            _check_ue8m0(xs[r], use_ue8m0)
            T = topk_idxs[r].shape[0]
            if T > cfg.max_dispatch_tokens:
                raise ValueError(f"xs[{r}]: at most max_dispatch_tokens={cfg.max_dispatch_tokens} tokens, got {T}")
        seq = self._next_seq()
        flags = self._flags(stall_ranks, flags)
        plans, outs = [], []
        for r in range(R):
            T, K = topk_idxs[r].shape
            out = _alloc_ll_out(cfg, xs[r], T, K, dev, self.poison, use_ue8m0)
            outs.append(out)
            plans.append(ll_dispatch_plan(cfg, r, self.buffers[r], self.peers, xs[r], topk_idxs[r].contiguous(), out,
                                          self.errors[r], seq, self.max_spins, flags[r]))
        self._run(plans)
        return [_ll_result(xs[r], outs[r], seq, topk_idxs[r].shape[0]) for r in range(R)]

    def low_latency_combine(self, ys, topk_idxs, topk_weights, handles, num_recv_ctas=1, stall_ranks=None,
                            flags=None):
        """Per rank: bf16 [T_r, H] = sum over valid k, in order, of w[t, k] * (expert output of
        (t, k)), in f32 from 0.0. ys[r]: bf16 [E_local, R*M, H] (rows as low_latency_dispatch
        delivered them, packed per expert; rows past recv_count are not read)."""
        cfg, R, dev = self.cfg, self.cfg.num_ranks, self.device
        flags = self._flags(stall_ranks, flags)
        plans, outs = [], []
        for r in range(R):
            T = topk_idxs[r].shape[0]
            out = _maker(dev, self.poison)((T, ys[r].shape[-1]), torch.bfloat16)
            outs.append(out)
            plans.append(ll_combine_plan(cfg, r, self.buffers[r], self.peers, ys[r], topk_idxs[r].contiguous(),
                                         topk_weights[r].contiguous(), handles[r], out, self.errors[r],
                                         num_recv_ctas, self.max_spins, flags[r]))
        self._run(plans)
        return outs

    def _raise_overflow(self, handles, results):
        """Code 9 records (the emulator: read after the launch, no device sync involved).
        The exception carries the truncated results (`.results`) and records (`.records`)."""
        over = [(r, rec) for r, rec in enumerate(self.error_records()) if rec and rec["code"] == CODE_RECV_OVERFLOW]
        if not over:
            return
        lines = [f"  rank {r}: receives {int(handles[r].num_recv_tokens)} rows, the outputs hold "
                 f"{rec['needed']} (first overflow: channel {rec['channel']}, source rank {rec['peer']}, "
                 f"needs rows up to {rec['seen']}); record {rec}" for r, rec in over]
        e = DispatchOverflowError(
            f"dispatch: num_worst_tokens={handles[over[0][0]].num_recv} is too small (error code 9); rows past it "
            f"were dropped, the buffers stay usable - dispatch again with a larger num_worst_tokens "
            f"(T_max * num_ranks always suffices):\n" + "\n".join(lines))
        e.results, e.records = results, dict(over)
        raise e


# ---------------------------------------------------------------------------------------
# One rank per process: one logic over two providers (memory + launcher)
# ---------------------------------------------------------------------------------------
DEFAULT_TIMEOUT_S = 30.0
GPU_POLLS_PER_SECOND = 1 << 21   # estimate (not measured) of a wait's sys-scope polls per second on a GPU


class PeerTimeoutError(TimeoutError):
    """A wait for another rank ran out of time. rank: this rank; peer: the rank it waited
    for (None when unknown); call: the transport call; record: the kernel's error record
    (decode_error) or None when the wait was on the host. The transport must be rebuilt."""

    def __init__(self, message, rank, peer, call, record=None):
        super().__init__(message)
        self.rank, self.peer, self.call, self.record = rank, peer, call, record


class IntranodeRank:
    """This rank's side of a node whose ranks are the processes of a torch.distributed
    group, over a provider of memory and launches (CudaIntranode: CUDA IPC buffers and the
    current stream; pykernels.ep.transport_emu.EmuIntranode: shared memory and the
    emulator). Every rank must make the same calls in the same order; the low-latency
    calls alternate dispatch, combine.

    The provider has: rank, device, buffer (uint8 [cfg.buffer_bytes], this rank's), peers
    (every rank's buffer address as the kernels take it), error (int32 [8] record), max_spins,
    poison (fill outputs with 0xFF bytes), synchronous (run() returns once the kernel has
    finished: records are readable at once), default_recv_ctas; and arrive(call) (a call
    starts), run(plan) (launch this rank's kernel), gather_counts(per_rank int32 [R]) ->
    int32 [R, R] (row s: rank s's per-rank counts), destroy()."""

    def __init__(self, cfg: IntranodeConfig, provider):
        self.cfg, self.provider = cfg, provider
        self.rank, self.device = provider.rank, provider.device
        self.seq = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def error_record(self):
        """The kernel's error record (decode_error), None when no wait timed out. On a GPU
        read it after a synchronisation."""
        return decode_error(self.provider.error)

    def destroy(self):
        """Release the buffers (idempotent; also on garbage collection)."""
        self.provider.destroy()

    def _alloc(self, shape, dtype):
        return _maker(self.device, self.provider.poison)(shape, dtype)

    def dispatch(self, x, topk_idx, topk_weights, num_experts, num_worst_tokens: int = 0):
        """x bf16 [T, H] or (float8_e4m3fn [T, H], float32 [T, H/128]); topk_idx int64 [T, K]
        (-1: none); topk_weights float32 [T, K] or None (ones). Returns dict(recv_x,
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, num_recv_tokens,
        handle) as LocalNode.dispatch describes it, for this rank.

        The per-rank counts go to every rank through the provider (CUDA: an all_gather on
        the group; emu: the shared segments). Reads the received count back to the host
        (one sync) to size the outputs, unless num_worst_tokens > 0: then no host read at
        all (CUDA-graph safe on a GPU) and the topk_idx range check is a device-side assert.
        A rank receiving more than num_worst_tokens rows drops the rest without a trap and
        records code 9: a synchronous provider (emu) raises DispatchOverflowError after the
        kernel; on a GPU read error_record() after a synchronisation (zero provider.error
        to re-arm it). The buffers stay usable; such a handle is not fit for combine."""
        p, cfg, R = self.provider, self.cfg, self.cfg.num_ranks
        _check_worst_tokens(num_worst_tokens)
        if topk_idx is None:
            raise ValueError("topk_idx: expected int64 [T, K], got None")
        _check_inputs(cfg, x, topk_idx, topk_weights, num_experts, sync=not num_worst_tokens)
        p.arrive("dispatch")
        T = topk_idx.shape[0]
        per_rank = torch.zeros(R, dtype=torch.int32, device=self.device)
        per_expert = torch.zeros(num_experts, dtype=torch.int32, device=self.device)
        in_rank = self._alloc((T, R), torch.bool)
        p.run(layout_plan(topk_idx.contiguous(), num_experts, R, per_rank, per_expert, in_rank))
        recv = p.gather_counts(per_rank)[:, self.rank].to(torch.int64)
        offset = (torch.cumsum(recv, 0) - recv).to(torch.int32)
        total = recv.sum().to(torch.int32)
        num_recv = _recv_rows(total, num_worst_tokens)
        if topk_weights is None:
            topk_weights = torch.ones(topk_idx.shape, dtype=torch.float32, device=self.device)
        out = _alloc_dispatch_out(cfg, x, num_recv, topk_idx.shape[1], self.device, p.poison)
        handle = IntranodeHandle(in_rank, offset, out["recv_src_idx"], out["recv_channel_offset"], num_recv, T,
                                 total, num_worst_tokens)
        epr = num_experts // R
        if p.synchronous:
            rec = decode_error(p.error)
            if rec and rec["code"] == CODE_RECV_OVERFLOW:     # re-arm a record left by an earlier overflow
                p.error.zero_()
        p.run(dispatch_plan(cfg, self.rank, p.buffer, p.peers, x, topk_idx.contiguous(), topk_weights.contiguous(),
                            in_rank, offset, out, p.error, epr, p.max_spins))
        result = _dispatch_result(x, out, topk_idx.shape[1], epr, handle)
        if p.synchronous:
            rec = decode_error(p.error)
            if rec and rec["code"] == CODE_RECV_OVERFLOW:
                e = DispatchOverflowError(
                    f"dispatch: num_worst_tokens={num_worst_tokens} is too small (error code 9): rank {self.rank} "
                    f"receives {int(total)} rows; rows past the bound were dropped, the buffers stay usable - "
                    f"dispatch again with a larger num_worst_tokens (T_max * num_ranks always suffices); record {rec}")
                e.results, e.records = [result], {self.rank: rec}
                raise e
        return result

    def combine(self, x, handle: IntranodeHandle, topk_weights=None):
        """x bf16 [N, H]: the rows as dispatch delivered them (N = handle.num_recv);
        topk_weights float32 [N, K] or None. Returns bf16 [T, H]: each token's rows summed
        in rank order in float32 (each scaled by the sum of its top-k weights when given)."""
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != handle.num_recv:
            raise ValueError(f"x: expected bf16 [{handle.num_recv}, H] (the rows dispatch returned), got {x.dtype} "
                             f"{list(x.shape)}")
        if topk_weights is not None and (topk_weights.dtype != torch.float32 or topk_weights.dim() != 2
                                         or topk_weights.shape[0] != x.shape[0]):
            raise ValueError(f"topk_weights: expected float32 [{x.shape[0]}, k] (the received tokens' weights, as "
                             f"dispatch returned them), got {topk_weights.dtype} {list(topk_weights.shape)}")
        p = self.provider
        p.arrive("combine")
        out = self._alloc((handle.num_tokens, x.shape[1]), torch.bfloat16)
        p.run(combine_plan(self.cfg, self.rank, p.buffer, p.peers, x.contiguous(),
                           None if topk_weights is None else topk_weights.contiguous(), handle, out, p.error,
                           p.max_spins))
        return out

    def low_latency_dispatch(self, x, topk_idx, use_ue8m0: bool = False):
        """x bf16 [T, H] or an FP8 pair, T <= cfg.max_dispatch_tokens; topk_idx int64 [T, K].
        Returns dict(recv_x [E_local, R*M, H] (or an FP8 pair with scales [E_local, R*M,
        H/128] float32 column-major per expert; use_ue8m0: int32 [E_local, R*M, H/512]
        packed exponent bytes), recv_count int32 [E_local], handle: LowLatencyHandle).
        Rows packed per local expert: recv_x[le, :recv_count[le]] in (source rank, source
        token, k) order (source s's rows from sum(handle.recv_layout[le, :s])). No host
        read (the topk_idx range check is a device-side assert)."""
        p, cfg = self.provider, self.cfg
        if not cfg.num_experts:
            raise ValueError("low_latency_dispatch: the buffer has no low-latency region (cfg.num_experts=0)")
        _check_inputs(cfg, x, topk_idx, None, cfg.num_experts, sync=False)
        _check_ue8m0(x, use_ue8m0)
        T, K = topk_idx.shape
        if T > cfg.max_dispatch_tokens:
            raise ValueError(f"x: at most cfg.max_dispatch_tokens={cfg.max_dispatch_tokens} tokens, got {T}")
        p.arrive("low_latency_dispatch")
        self.seq = self.seq % 0xFFFFFFFF + 1         # never 0 (the buffer's initial value)
        out = _alloc_ll_out(cfg, x, T, K, self.device, p.poison, use_ue8m0)
        p.run(ll_dispatch_plan(cfg, self.rank, p.buffer, p.peers, x, topk_idx.contiguous(), out, p.error, self.seq,
                               p.max_spins))
        return _ll_result(x, out, self.seq, T)

    def low_latency_combine(self, y, topk_idx, topk_weights, handle: LowLatencyHandle, num_recv_ctas: int = None):
        """y bf16 [E_local, R*M, H] (packed, as low_latency_dispatch delivered them); topk_idx int64
        [T, K], topk_weights float32 [T, K] (this rank's, as given to the dispatch). Returns
        bf16 [T, H] = sum over valid k, in order, of w[t, k] * (expert output of (t, k)),
        in float32 from 0.0. num_recv_ctas: CTAs that reduce (None: the provider's choice)."""
        p, cfg = self.provider, self.cfg
        if not cfg.num_experts:
            raise ValueError("low_latency_combine: the buffer has no low-latency region (cfg.num_experts=0)")
        El, R, M = cfg.num_experts // cfg.num_ranks, cfg.num_ranks, cfg.max_dispatch_tokens
        if y.dtype != torch.bfloat16 or y.dim() != 3 or tuple(y.shape[:2]) != (El, R * M):
            raise ValueError(f"y: expected bf16 [{El}, {R * M}, H], got {y.dtype} {list(y.shape)}")
        if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_idx.shape:
            raise ValueError(f"topk_weights: expected float32 {list(topk_idx.shape)}, got {topk_weights.dtype} "
                             f"{list(topk_weights.shape)}")
        p.arrive("low_latency_combine")
        out = self._alloc((topk_idx.shape[0], y.shape[-1]), torch.bfloat16)
        p.run(ll_combine_plan(cfg, self.rank, p.buffer, p.peers, y, topk_idx.contiguous(), topk_weights.contiguous(),
                              handle, out, p.error, num_recv_ctas or p.default_recv_ctas, p.max_spins))
        return out


def _close_ipc(device_index: int, opened: list) -> None:
    """Close the peers' IPC mappings (after this device's work is done). Best effort on
    garbage collection at exit, when CUDA may already be gone."""
    if not opened:
        return
    from .. import _C
    try:
        torch.cuda.synchronize(device_index)
    except Exception:
        pass
    while opened:
        _C.ipc_close_handle(opened.pop())


class CudaIpcMemory:
    """Provider of CudaIntranode: a zeroed buffer on this GPU, the peers' buffers opened
    through CUDA IPC (handles exchanged with all_gather_object over `group`), a pinned host
    error record (readable after a trap), kernels on the current stream, the counts
    exchanged with all_gather on the group (device-side with NCCL: no host sync)."""
    poison = False
    synchronous = False
    default_recv_ctas = 16

    def __init__(self, cfg: IntranodeConfig, group, max_spins: int):
        import torch.distributed as dist
        from .. import _C
        self.group, self.max_spins = group, max_spins
        self.rank, R = dist.get_rank(group), dist.get_world_size(group)
        if R != cfg.num_ranks:
            raise ValueError(f"cfg.num_ranks: expected the group size {R}, got {cfg.num_ranks}")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.buffer = torch.zeros(cfg.buffer_bytes, dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)       # zeroed before any peer can learn its address
        # the caching allocator may place the tensor inside a larger allocation: IPC maps
        # the allocation, so each peer adds the tensor's offset in it
        offset = self.buffer.untyped_storage()._share_cuda_()[3]
        mine = (_C.ipc_get_handle(self.buffer.data_ptr() - offset), offset)
        handles = [None] * R
        dist.all_gather_object(handles, mine, group=group)
        self._opened = []                          # the peers' allocation bases, to close
        self._closer = weakref.finalize(self, _close_ipc, self.device.index, self._opened)
        self.peers = []
        for r, (h, off) in enumerate(handles):
            if r == self.rank:
                self.peers.append(self.buffer.data_ptr())
            else:
                self._opened.append(_C.ipc_open_handle(h, self.device.index))
                self.peers.append(self._opened[-1] + off)
        self.error = torch.zeros(ERROR_WORDS, dtype=torch.int32, pin_memory=True)

    def arrive(self, call):
        if self.buffer is None:
            raise RuntimeError(f"{call}: the transport was destroyed")

    def run(self, plan):
        run_cuda(plan)

    def gather_counts(self, per_rank):
        import torch.distributed as dist
        if per_rank.shape[0] == 1:
            return per_rank[None]
        counts = [torch.empty_like(per_rank) for _ in range(per_rank.shape[0])]
        dist.all_gather(counts, per_rank, group=self.group)
        return torch.stack(counts)

    def destroy(self):
        """Waits for this device, then (with a group) for every rank, so that no peer's
        kernel still uses the buffers; closes the IPC mappings and frees the buffer."""
        import torch.distributed as dist
        if self.buffer is None:
            return
        torch.cuda.synchronize(self.device)
        if dist.is_initialized() and len(self.peers) > 1:
            dist.barrier(group=self.group)
        self._closer()
        self.buffer = None


class CudaIntranode(IntranodeRank):
    """One rank of a process group on its GPU (IntranodeRank over CudaIpcMemory). A wait
    gives up after max_spins polls (default: timeout_s at an estimated
    GPU_POLLS_PER_SECOND), writes its error record and traps: the CUDA context is lost,
    error_record() names the rank waited for; rebuild the process's CUDA state. destroy()
    synchronises, waits for every rank (a barrier on the group), closes the IPC mappings."""

    def __init__(self, cfg: IntranodeConfig, group=None, max_spins: int = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if max_spins is None:
            max_spins = min(0xFFFFFFFF, max(1, int(timeout_s * GPU_POLLS_PER_SECOND)))
        super().__init__(cfg, CudaIpcMemory(cfg, group, max_spins))
