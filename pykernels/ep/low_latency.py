"""Low-latency expert-parallel dispatch and combine (DeepEP's `low_latency_dispatch` /
`low_latency_combine`) on the engine path: torch.distributed all_to_all_single over
fixed-size buffers (gloo on CPU processes, NCCL on GPUs), and the pass-through to the
hand-written kernels' transports (backend "emu"/"cuda"), which write and read the same
packed receive layout themselves.

Semantics (docs/ep.md, "Low-latency mode"). E experts over R ranks, E_l = E / R local
experts, M = num_max_dispatch_tokens_per_rank (every rank sends at most M tokens):
- dispatch sends one row per (token, top-k slot) with an expert (no de-duplication per
  rank); the j-th (token, k) pair of a rank that names expert e, in (token, k) order, is
  that rank's slot j of e; a rank sends at most M pairs to one expert.
- receive layout, packed per local expert (DeepEP's): recv_x[le, :recv_count[le]] are
  the rows of local expert le ordered by (source rank, source token, k); rows past
  recv_count[le] are not valid (not written). That is the `masked_m = recv_count` layout
  of pykernels.gemm.m_grouped_fp8_gemm_nt_masked. handle.layout_range[le, s] =
  (first row << 32) | rows of source rank s; handle.src_info[le, i] = source token.
- use_fp8: each token is quantized once by the sender, 1x128 groups, scale
  max(amax, 1e-4) / 448 (round_scale: rounded up to a power of two, UE8M0 values);
  scales are float32 [E_l, R*M, H/128] stored column-major (stride 1 along rows, the row
  dimension padded to 4: TMA-aligned, as DeepEP and the grouped GEMMs take them);
  use_ue8m0 (needs round_scale, H % 512 == 0): the scales' exponent bytes packed four to
  an int32, [E_l, R*M, H/512], column-major likewise.
- combine: out[t] = bf16(sum over valid k, in k order, of f32(y_k) * w[t, k]) from 0.0,
  every product rounded to float32 before it is added (no FMA), one RNE rounding to
  bf16; y_k is the expert output the owner of topk_idx[t, k] returns for (t, k). Tokens
  with no valid slot give 0. The same bytes as the hand-written kernel's combine.

Engine path: each call is one all_to_all of a fixed-size message per rank pair (the
fixed buffers below: the same size whatever the routing, so it needs no count exchange
and no host read of counts), preceded by the small agreement exchange of the caller
(Buffer's header: every rank must make the same call with the same sizes). Dispatch and
combine each have two buffer sets, used in turn, so two receives of a kind may be pending
(hooks not yet called) at once, as in DeepEP; a third raises RuntimeError.
"""
import dataclasses
import numbers

import torch
import torch.distributed as dist

from ..cuda.ep import SCALE_ROW_ALIGN, UE8M0_PER_WORD   # the kernels' scale layout: one definition
from ..runtime.hardware import SCALE_BLOCK, round_up
from .checks import MAX_TOPK, check_hidden, check_num_experts, describe

SRC_BYTES = 4                 # int32 source token in each dispatch slot


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------
def dispatch_slot_bytes(hidden: int, use_fp8: bool) -> int:
    """Bytes of one dispatch slot: the row (e4m3 or bf16), float32 scales (FP8), int32 source token."""
    return (hidden + 4 * (hidden // SCALE_BLOCK) if use_fp8 else 2 * hidden) + SRC_BYTES


def message_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int,
                  use_fp8: bool, combine: bool) -> int:
    """Bytes each rank sends to each rank in one call: E_l experts x M slots, plus the
    int32 counts per expert in dispatch (16-byte aligned)."""
    local = num_experts // num_ranks
    if combine:
        return local * num_max_dispatch_tokens_per_rank * 2 * hidden
    return (local * num_max_dispatch_tokens_per_rank * dispatch_slot_bytes(hidden, use_fp8)
            + round_up(4 * local, 16))


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of this engine's fixed low-latency buffers (two sets of dispatch and combine
    send + receive buffers, sized for bf16 - the larger - as DeepEP's hint is)."""
    per_set = sum(2 * num_ranks * message_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                                False, combine) for combine in (False, True))
    return 2 * per_set


# ---------------------------------------------------------------------------------------
# Handle
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class LowLatencyHandle:
    """One rank's record of a low-latency dispatch (DeepEP's handle fields first).

    src_info int32 [E_l, R*M]: source token of each packed received row;
    layout_range int64 [E_l, R]: (first packed row << 32) | rows, per (local expert,
    source rank); num_max_dispatch_tokens_per_rank, hidden, num_experts: the call's sizes;
    slot_of int32 [T, K]: this rank's slot of each (token, k) at its expert (-1: none);
    block_of int64 [E_l, R*M]: the (source rank * M + slot) of each packed row (packed
    rows past recv_count map to the unused blocks: a permutation of R*M); engine path
    only (None with the kernel transports, whose combine reads the packed rows itself);
    num_tokens: T; seq: the call number (the same on every rank);
    transport: the kernel transport's own handle (backend "emu"/"cuda"), else None.
    As a sequence it is DeepEP's handle tuple (its first five fields)."""
    src_info: torch.Tensor
    layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    slot_of: torch.Tensor
    block_of: torch.Tensor
    num_tokens: int
    seq: int
    transport: object = None

    DEEPEP_FIELDS = ("src_info", "layout_range", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts")

    def __iter__(self):      # unpacks as DeepEP's 5-tuple handle
        return iter(getattr(self, f) for f in self.DEEPEP_FIELDS)

    def __len__(self):
        return len(self.DEEPEP_FIELDS)

    def __getitem__(self, i):
        return getattr(self, self.DEEPEP_FIELDS[i])


# ---------------------------------------------------------------------------------------
# Argument checks and the call headers every rank must agree on
# ---------------------------------------------------------------------------------------
def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")


def check_dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, num_ranks: int, use_fp8,
                        round_scale, use_ue8m0, cumulative_local_expert_recv_stats=None,
                        dispatch_wait_recv_cost_stats=None, sync: bool = True) -> dict:
    """Validate one low_latency_dispatch; returns its header (the fields every rank must
    share). sync=False (the GPU kernels) skips the two host reads: the topk_idx range
    becomes a device assert, the per-expert slot bound is the kernel's (error code 8)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise TypeError(f"x: expected a bfloat16 tensor [num_tokens, hidden] (the dispatch casts to FP8 itself), "
                        f"got {describe(x)}")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [num_tokens, hidden], got {list(x.shape)}")
    check_hidden("x", x.shape[1])
    _positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    M = num_max_dispatch_tokens_per_rank
    if x.shape[0] > M:
        raise ValueError(f"x: expected at most num_max_dispatch_tokens_per_rank={M} tokens, got {x.shape[0]}")
    for name, v in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0)):
        _flag(name, v)
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("use_ue8m0: expected False unless use_fp8=True and round_scale=True (UE8M0 holds "
                         "power-of-two scales only)")
    if use_ue8m0 and x.shape[1] % (SCALE_BLOCK * UE8M0_PER_WORD):
        raise ValueError(f"x: use_ue8m0 packs {UE8M0_PER_WORD} scales per int32, so hidden must be a multiple of "
                         f"{SCALE_BLOCK * UE8M0_PER_WORD}, got {x.shape[1]}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2:
        raise TypeError(f"topk_idx: expected an int64 tensor [num_tokens, topk], got {describe(topk_idx)}")
    if topk_idx.shape[0] != x.shape[0] or not 1 <= topk_idx.shape[1] <= MAX_TOPK:
        raise ValueError(f"topk_idx: expected [{x.shape[0]}, K] with 1 <= K <= {MAX_TOPK}, got "
                         f"{list(topk_idx.shape)}")
    if topk_idx.device != x.device:
        raise ValueError(f"topk_idx: expected device {x.device} (that of x), got {topk_idx.device}")
    check_num_experts(num_experts, num_ranks)
    local = num_experts // num_ranks
    stats = cumulative_local_expert_recv_stats
    if stats is not None and (not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32
                              or tuple(stats.shape) != (local,) or stats.device != x.device):
        raise ValueError(f"cumulative_local_expert_recv_stats: expected an int32 tensor [{local}] (local experts) "
                         f"on {x.device}, got {describe(stats)}")
    if dispatch_wait_recv_cost_stats is not None:
        raise ValueError("dispatch_wait_recv_cost_stats: expected None (wait-time statistics are not collected)")
    if topk_idx.numel():
        if sync:
            lo, hi = (int(v) for v in torch.aminmax(topk_idx))
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"topk_idx: expected values in [-1, {num_experts}), got range [{lo}, {hi}]")
            _, pairs = expert_slots(topk_idx, num_experts)
            if int(pairs.max()) > M:
                e = int(pairs.argmax())
                raise ValueError(f"topk_idx: expert {e} is named by {int(pairs[e])} (token, k) pairs, more than "
                                 f"num_max_dispatch_tokens_per_rank={M} receive slots (a token naming an expert "
                                 f"twice takes two)")
        else:
            ok = ((topk_idx >= -1) & (topk_idx < num_experts)).all()
            torch._assert_async(ok, f"topk_idx: expected values in [-1, {num_experts})")
    return dict(kind="low_latency_dispatch", hidden=int(x.shape[1]), num_experts=int(num_experts),
                num_max_dispatch_tokens_per_rank=int(M), use_fp8=use_fp8, round_scale=round_scale,
                use_ue8m0=use_ue8m0, device=x.device.type)


def check_combine_args(x, topk_idx, topk_weights, handle, num_ranks: int, use_logfmt=False, zero_copy=False,
                       out=None, combine_wait_recv_cost_stats=None) -> dict:
    """Validate one low_latency_combine (x is ignored with zero_copy); returns its header."""
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle: expected the LowLatencyHandle of a low_latency_dispatch, got "
                        f"{type(handle).__name__}")
    for name, v in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy)):
        _flag(name, v)
    if use_logfmt:
        raise ValueError("use_logfmt: expected False (the LogFMT combine format is not supported)")
    if combine_wait_recv_cost_stats is not None:
        raise ValueError("combine_wait_recv_cost_stats: expected None (wait-time statistics are not collected)")
    M, H = handle.num_max_dispatch_tokens_per_rank, handle.hidden
    want = (handle.num_experts // num_ranks, num_ranks * M, H)
    if not zero_copy:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
            raise TypeError(f"x: expected bfloat16 {list(want)} (the expert outputs in dispatch's layout), got "
                            f"{describe(x)}")
        if tuple(x.shape) != want:
            raise ValueError(f"x: expected shape {list(want)} (local experts, num_ranks * "
                             f"num_max_dispatch_tokens_per_rank, hidden) as dispatch returned, got {list(x.shape)}")
    T = handle.num_tokens
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2:
        raise TypeError(f"topk_idx: expected an int64 tensor [{T}, K] (the dispatched one), got {describe(topk_idx)}")
    if tuple(topk_idx.shape) != tuple(handle.slot_of.shape):
        raise ValueError(f"topk_idx: expected shape {list(handle.slot_of.shape)} (the dispatched one), got "
                         f"{list(topk_idx.shape)}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights: expected a float32 tensor {list(topk_idx.shape)}, got {describe(topk_weights)}")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(f"topk_weights: expected shape {list(topk_idx.shape)} (that of topk_idx), got "
                         f"{list(topk_weights.shape)}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.bfloat16
                            or tuple(out.shape) != (T, H)):
        raise ValueError(f"out: expected a bfloat16 tensor [{T}, {H}], got {describe(out)}")
    return dict(kind="low_latency_combine", hidden=int(H), num_experts=int(handle.num_experts),
                num_max_dispatch_tokens_per_rank=int(M), handle_from=int(handle.seq),
                device=handle.slot_of.device.type)


# ---------------------------------------------------------------------------------------
# Local steps (device ops only: no host read)
# ---------------------------------------------------------------------------------------
def expert_slots(topk_idx: torch.Tensor, num_experts: int):
    """topk_idx int64 [T, K] -> (slot_of int32 [T, K]: rank of (t, k) among the pairs that
    name the same expert, in (t, k) order, -1 where topk_idx is -1; pairs int64 [E]:
    the pairs per expert)."""
    flat = topk_idx.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))   # -1 sorts last
    sorted_key, perm = torch.sort(key, stable=True)
    first = torch.searchsorted(sorted_key, sorted_key)                      # first index of each key
    slot = torch.empty_like(flat)
    slot[perm] = torch.arange(flat.numel(), device=flat.device) - first
    slot = torch.where(flat >= 0, slot, torch.full_like(slot, -1))
    pairs = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    return slot.view(topk_idx.shape).to(torch.int32), pairs


def pack_order(counts: torch.Tensor, max_tokens: int):
    """counts int [E_l, R] rows per (local expert, source rank) -> (block_of int64
    [E_l, R*M]: for each packed row the block position s*M + j it comes from, valid rows
    first in (s, j) order; layout_range int64 [E_l, R]: (first packed row << 32) | rows;
    recv_count int32 [E_l])."""
    counts = counts.to(torch.int64)
    E_l, R = counts.shape
    j = torch.arange(max_tokens, device=counts.device)
    invalid = (j[None, None, :] >= counts[:, :, None]).reshape(E_l, R * max_tokens)
    block_of = torch.sort(invalid.to(torch.int8), dim=1, stable=True).indices
    first = torch.cumsum(counts, 1) - counts
    return block_of, (first << 32) | counts, counts.sum(1).to(torch.int32)


def quantize(x: torch.Tensor, round_scale: bool, quant_backend: str):
    """bf16 [T, H] -> (e4m3 [T, H], float32 [T, H/128]): 1x128 groups, scale max(amax,
    1e-4)/448, round_scale: up to a power of two (pykernels.quant.per_token_cast_to_fp8)."""
    from ..quant import per_token_cast_to_fp8
    if not x.shape[0]:
        return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty(0, x.shape[1] // SCALE_BLOCK, dtype=torch.float32, device=x.device))
    return per_token_cast_to_fp8(x, use_ue8m0=round_scale, backend=quant_backend)


def column_major(shape, dtype, device) -> torch.Tensor:
    """An uninitialised [G, m, c] tensor stored column-major per group, m padded to 4."""
    G, m, c = shape
    buf = torch.empty(G, c, round_up(m, SCALE_ROW_ALIGN), dtype=dtype, device=device)
    return buf[:, :, :m].transpose(1, 2)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two scales [..., n] (n a multiple of 4) -> int32 [..., n/4]: the
    exponent byte of scale 4i + b in byte b (little-endian) of word i."""
    exp = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    exp = exp.reshape(*scales.shape[:-1], -1, UE8M0_PER_WORD)
    word = exp[..., 0] | (exp[..., 1] << 8) | (exp[..., 2] << 16) | (exp[..., 3] << 24)
    return word.to(torch.int32)


def weighted_reduce(rows: torch.Tensor, topk_idx: torch.Tensor, slot_of: torch.Tensor, topk_weights: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """rows bf16 [E, M, H] (row (e, j): the expert output of this rank's slot j of e) ->
    out bf16 [T, H] = bf16(sum over valid k in order of f32(row) * w[t, k]) from 0.0."""
    T, K = topk_idx.shape
    acc = torch.zeros(T, rows.shape[-1], dtype=torch.float32, device=rows.device)
    for k in range(K):
        e = topk_idx[:, k]
        valid = (e >= 0)[:, None]
        picked = rows[e.clamp(min=0), slot_of[:, k].clamp(min=0).long()].float()
        acc = torch.where(valid, acc + picked * topk_weights[:, k, None], acc)   # product rounded, then added
    out.copy_(acc)
    return out


class _CombineStaging:
    """zero_copy combine: the caller fills next_combine_buffer(handle) instead of passing x
    (DeepEP's get_next_low_latency_combine_buffer; here a persistent tensor the next
    combine reads)."""

    def next_combine_buffer(self, handle: "LowLatencyHandle") -> torch.Tensor:
        """bf16 [E_l, R*M, H] on the handle's device."""
        E_l = handle.num_experts // self.num_ranks
        shape = (E_l, self.num_ranks * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        key = (shape, handle.slot_of.device)
        if key not in self._next_combine:
            self._next_combine[key] = torch.empty(shape, dtype=torch.bfloat16, device=handle.slot_of.device)
        return self._next_combine[key]


# ---------------------------------------------------------------------------------------
# Engine path
# ---------------------------------------------------------------------------------------
class LowLatencyEngine(_CombineStaging):
    """Low-latency dispatch/combine of one rank over all_to_all_single with fixed buffers.

    group / rank / num_ranks: the process group; device: where the buffers live ("cuda"
    for NCCL, "cpu" for gloo); quant_backend: pykernels.quant backend of the FP8 cast
    ("auto", "reference", "triton"); wait(work, what): waits for an async collective
    (the caller's timeout), default work.wait()."""

    NUM_SETS = 2

    def __init__(self, group, rank: int, num_ranks: int, device, quant_backend: str = "reference", wait=None):
        self.group, self.rank, self.num_ranks, self.device = group, rank, num_ranks, torch.device(device)
        self.quant_backend = quant_backend
        self.wait = wait or (lambda work, what: work.wait())
        self.seq = 0
        self._calls = {"dispatch": 0, "combine": 0}
        self._buffers = {}                 # (kind, set, bytes) -> (send, recv) uint8 [R, bytes]
        self._pending = set()              # (kind, set): a receive whose hook has not run yet
        self._next_combine = {}            # zero_copy staging (_CombineStaging)

    def _pair(self, kind: str, nbytes: int, what: str):
        """The next buffer set of this kind (sets alternate per kind: a dispatch whose hook
        is pending and the next dispatch use different ones)."""
        self._calls[kind] += 1
        key = (kind, self._calls[kind] % self.NUM_SETS)
        if key in self._pending:
            raise RuntimeError(f"{what}: the receive of the low-latency {kind} before the previous one is still "
                               f"pending (its hook was not called); at most {self.NUM_SETS} may be pending")
        if (key, nbytes) not in self._buffers:
            self._buffers[(key, nbytes)] = tuple(
                torch.zeros(self.num_ranks, nbytes, dtype=torch.uint8, device=self.device) for _ in range(2))
        return (key,) + self._buffers[(key, nbytes)]

    def clean(self):
        """Drops the fixed buffers (reallocated zeroed by the next call)."""
        self._buffers.clear()
        self._pending.clear()
        self._next_combine.clear()

    destroy = clean

    def _exchange(self, key, send, recv, what: str, return_recv_hook: bool, finish):
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        self._pending.add(key)

        done = []

        def hook():
            if done:
                return                      # already received
            self.wait(work, what)
            finish()
            self._pending.discard(key)
            done.append(True)
        if return_recv_hook:
            return hook
        hook()
        return None

    # -- dispatch ----------------------------------------------------------------------
    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, use_fp8: bool = True,
                 round_scale: bool = False, use_ue8m0: bool = False, return_recv_hook: bool = False, stats=None):
        """x bf16 [T, H] (T <= M), topk_idx int64 [T, K] in [-1, E) (check_dispatch_args);
        stats: cumulative_local_expert_recv_stats (int32 [E_l], recv_count added).
        Returns (recv_x, recv_count, handle, hook): recv_x bf16 [E_l, R*M, H], or (e4m3
        [E_l, R*M, H], scales) with FP8; recv_count int32 [E_l]. With return_recv_hook
        the outputs are complete only after hook() returns."""
        R, M, E = self.num_ranks, num_max_dispatch_tokens_per_rank, num_experts
        E_l, (T, H), dev = E // R, x.shape, x.device
        self.seq = self.seq % 0xFFFFFFFF + 1
        slot_of, pairs = expert_slots(topk_idx, E)      # pairs <= M: check_dispatch_args
        if use_fp8:
            data, scales = quantize(x, round_scale, self.quant_backend)
            parts = [data.view(torch.uint8), scales.view(torch.uint8)]
        else:
            parts = [x.contiguous().view(torch.uint8)]
        nbytes = message_bytes(M, H, R, E, use_fp8, combine=False)
        slot_bytes = dispatch_slot_bytes(H, use_fp8)
        data_bytes = E_l * M * slot_bytes
        key, send, recv = self._pair("dispatch", nbytes, "low_latency_dispatch")

        # rows of every valid (t, k) into slot (e, j); counts per expert after the slots
        t_of, k_of = (topk_idx >= 0).nonzero(as_tuple=True)
        e_of = topk_idx[t_of, k_of]
        tokens = torch.arange(T, dtype=torch.int32, device=dev)[:, None].view(torch.uint8)
        rows = torch.cat(parts + [tokens], 1)[t_of]
        slots = send[:, :data_bytes].view(R, E_l, M, slot_bytes)
        slots[e_of // E_l, e_of % E_l, slot_of[t_of, k_of].long()] = rows
        send[:, data_bytes:data_bytes + 4 * E_l].view(torch.int32).copy_(pairs.view(R, E_l))

        recv_x = torch.empty(E_l, R * M, H, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        scale_cols = H // SCALE_BLOCK
        recv_scales = None
        if use_fp8:
            if use_ue8m0:
                recv_scales = column_major((E_l, R * M, scale_cols // UE8M0_PER_WORD), torch.int32, dev)
            else:
                recv_scales = column_major((E_l, R * M, scale_cols), torch.float32, dev)
        src_info = torch.empty(E_l, R * M, dtype=torch.int32, device=dev)
        layout_range = torch.empty(E_l, R, dtype=torch.int64, device=dev)
        block_of = torch.empty(E_l, R * M, dtype=torch.int64, device=dev)
        recv_count = torch.empty(E_l, dtype=torch.int32, device=dev)

        def finish():
            counts = recv[:, data_bytes:data_bytes + 4 * E_l].view(torch.int32).t()        # [E_l, R]
            order, ranges, total = pack_order(counts, M)
            blocks = recv[:, :data_bytes].view(R, E_l, M, slot_bytes).transpose(0, 1).reshape(E_l, R * M, slot_bytes)
            packed = torch.gather(blocks, 1, order[:, :, None].expand(-1, -1, slot_bytes))
            payload = H if use_fp8 else 2 * H
            recv_x.view(torch.uint8).view(E_l, R * M, payload).copy_(packed[..., :payload])
            if use_fp8:
                sf = packed[..., payload:payload + 4 * scale_cols].contiguous().view(torch.float32)
                recv_scales.copy_(pack_ue8m0(sf) if use_ue8m0 else sf)
            src_info.copy_(packed[..., slot_bytes - SRC_BYTES:].contiguous().view(torch.int32).squeeze(-1))
            layout_range.copy_(ranges)
            block_of.copy_(order)
            recv_count.copy_(total)
            if stats is not None:
                stats.add_(total)

        hook = self._exchange(key, send, recv, "low_latency_dispatch", return_recv_hook, finish)
        handle = LowLatencyHandle(src_info, layout_range, M, H, E, slot_of, block_of, T, self.seq)
        return ((recv_x, recv_scales) if use_fp8 else recv_x), recv_count, handle, hook

    # -- combine -----------------------------------------------------------------------
    def combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, zero_copy: bool = False,
                return_recv_hook: bool = False, out=None):
        """x bf16 [E_l, R*M, H] (the expert outputs in dispatch's packed layout; rows past
        recv_count are not read), topk_idx int64 [T, K] and topk_weights float32 [T, K]
        (this rank's, as dispatched). Returns (combined bf16 [T, H], hook)."""
        if zero_copy:
            x = self.next_combine_buffer(handle)
        R, M, E, H = self.num_ranks, handle.num_max_dispatch_tokens_per_rank, handle.num_experts, handle.hidden
        E_l = E // R
        self.seq = self.seq % 0xFFFFFFFF + 1
        key, send, recv = self._pair("combine", message_bytes(M, H, R, E, False, combine=True), "low_latency_combine")
        # packed rows back to their (source rank, slot) blocks: [E_l, R*M] -> [R, E_l, M]
        blocks = torch.empty(E_l, R * M, H, dtype=torch.bfloat16, device=x.device)
        blocks.scatter_(1, handle.block_of[:, :, None].expand(-1, -1, H), x)
        send.view(R, E_l, M, 2 * H).copy_(blocks.view(E_l, R, M, H).transpose(0, 1).view(torch.uint8))
        if out is None:
            out = torch.empty(handle.num_tokens, H, dtype=torch.bfloat16, device=x.device)

        def finish():
            weighted_reduce(recv.view(torch.bfloat16).view(E, M, H), topk_idx, handle.slot_of, topk_weights, out)

        hook = self._exchange(key, send, recv, "low_latency_combine", return_recv_hook, finish)
        return out, hook


# ---------------------------------------------------------------------------------------
# Kernel transports (backend "emu" / "cuda"): the same packed layout around them
# ---------------------------------------------------------------------------------------
class KernelLowLatency(_CombineStaging):
    """Low-latency calls through a per-process kernel transport (EmuIntranode,
    CudaIntranode: `low_latency_dispatch(x, topk_idx, use_ue8m0)` -> dict(recv_x,
    recv_count, handle), `low_latency_combine(y, topk_idx, topk_weights, handle)` -> bf16
    [T, H]). The kernels write the packed per-expert layout (scales column-major, UE8M0
    words when asked) and combine reads it, so this is a pass-through: the FP8 cast before
    the kernel, the handle's layout_range from the kernel's per-rank counts ([E_l, R]).

    make_transport(cfg: IntranodeConfig) -> transport: called (on every rank alike: the
    call headers are agreed first) when a call needs another (hidden, E, M) than the
    current transport's low-latency region; the old transport is destroyed."""

    def __init__(self, make_transport, num_ranks: int, quant_backend: str = "reference"):
        self.make_transport, self.num_ranks, self.quant_backend = make_transport, num_ranks, quant_backend
        self.transport, self.sizes = None, None
        self._next_combine = {}

    def ensure(self, hidden: int, num_experts: int, max_tokens: int):
        from ..cuda.ep import IntranodeConfig
        if self.sizes == (hidden, num_experts, max_tokens):
            return
        self.destroy()
        cfg = IntranodeConfig(num_ranks=self.num_ranks, hidden=hidden, max_topk=MAX_TOPK, num_channels=1,
                              num_slots=2, publish_every=1, num_experts=num_experts, max_dispatch_tokens=max_tokens)
        self.transport, self.sizes = self.make_transport(cfg), (hidden, num_experts, max_tokens)

    def destroy(self):
        if self.transport is not None:
            t, self.transport, self.sizes = self.transport, None, None
            if hasattr(t, "destroy"):
                t.destroy()

    clean = destroy       # the next call makes a new transport (on every rank: calls are agreed)

    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, use_fp8: bool = True,
                 round_scale: bool = False, use_ue8m0: bool = False, return_recv_hook: bool = False, stats=None):
        M, (T, H) = num_max_dispatch_tokens_per_rank, x.shape
        self.ensure(H, num_experts, M)
        payload = quantize(x, round_scale, self.quant_backend) if use_fp8 else x
        res = self.transport.low_latency_dispatch(payload, topk_idx, use_ue8m0=use_ue8m0)
        th, count = res["handle"], res["recv_count"]
        if stats is not None:
            stats.add_(count)
        rows = th.recv_layout.to(torch.int64)
        ranges = ((torch.cumsum(rows, 1) - rows) << 32) | rows       # (first packed row << 32) | rows
        handle = LowLatencyHandle(th.recv_src_info, ranges, M, H, num_experts, th.slot_of, None, T, th.seq,
                                  transport=th)
        return res["recv_x"], count, handle, (lambda: None) if return_recv_hook else None

    def combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, zero_copy: bool = False,
                return_recv_hook: bool = False, out=None):
        if self.sizes != (handle.hidden, handle.num_experts, handle.num_max_dispatch_tokens_per_rank):
            raise ValueError(f"handle: its dispatch used (hidden, num_experts, M) = ({handle.hidden}, "
                             f"{handle.num_experts}, {handle.num_max_dispatch_tokens_per_rank}); a later dispatch "
                             f"replaced the kernels' buffers with {self.sizes}")
        if zero_copy:
            x = self.next_combine_buffer(handle)
        res = self.transport.low_latency_combine(x, topk_idx, topk_weights, handle.transport)
        if out is not None:
            out.copy_(res)
            res = out
        return res, (lambda: None) if return_recv_hook else None
