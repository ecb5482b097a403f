"""DeepEP's small public types for pykernels.ep.Buffer: Config, EventOverlap, topk_idx_t.

Config has DeepEP's five fields. The engine backends ("gloo"/"nccl") accept and ignore it
(torch.distributed chooses its own chunking); the hand-written kernels ("emu"/"cuda") take
their ring geometry from the Config of the Buffer's first dispatch (docs/ep.md, "Buffer
on the hand-written kernels"):
  num_channels = num_sms // 2 (one sender and one receiver CTA per channel),
  num_slots    = the largest power of two <= num_max_nvl_chunked_recv_tokens,
  publish_every = min(num_max_nvl_chunked_send_tokens, num_slots).
The RDMA fields are kept for DeepEP code; nothing here uses them (no internode path).
"""
import dataclasses
import numbers

import torch

topk_idx_t = torch.int64   # DeepEP's dtype of top-k expert ids (its default build)

DEFAULT_NUM_SMS = 20       # DeepEP's Buffer.num_sms default: 10 channels


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepEP's performance config: Config(num_sms, num_max_nvl_chunked_send_tokens,
    num_max_nvl_chunked_recv_tokens, num_max_rdma_chunked_send_tokens=16,
    num_max_rdma_chunked_recv_tokens=128). num_sms must be even (a sender and a receiver
    SM per channel)."""
    num_sms: int = DEFAULT_NUM_SMS
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 16
    num_max_rdma_chunked_recv_tokens: int = 128

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _positive_int(f.name, getattr(self, f.name))
        if self.num_sms % 2:
            raise ValueError(f"num_sms: expected an even number (one sender and one receiver SM per channel), "
                             f"got {self.num_sms}")
        if self.num_max_nvl_chunked_recv_tokens < 2:
            raise ValueError(f"num_max_nvl_chunked_recv_tokens: expected at least 2 (ring slots), "
                             f"got {self.num_max_nvl_chunked_recv_tokens}")

    # -- what the hand-written kernels take from it ----------------------------------------
    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    @property
    def num_slots(self) -> int:
        return 1 << (self.num_max_nvl_chunked_recv_tokens.bit_length() - 1)

    @property
    def publish_every(self) -> int:
        return min(self.num_max_nvl_chunked_send_tokens, self.num_slots)

    def intranode_config(self, num_ranks: int, hidden: int, max_topk: int, num_experts: int = 0,
                         max_dispatch_tokens: int = 0):
        """The pykernels.cuda.ep.IntranodeConfig of these rings for a hidden size."""
        from ..cuda.ep import IntranodeConfig
        return IntranodeConfig(num_ranks=num_ranks, hidden=hidden, max_topk=max_topk,
                               num_channels=self.num_channels, num_slots=self.num_slots,
                               publish_every=self.publish_every, num_experts=num_experts,
                               max_dispatch_tokens=max_dispatch_tokens)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of one rank's normal-mode rings for rows of hidden_bytes bytes (bf16:
        2 * hidden) on num_ranks ranks (pykernels' layout, not DeepEP's)."""
        from ..cuda.ep import MAX_TOPK
        from ..runtime.hardware import SCALE_BLOCK, round_up
        hidden = round_up(max(hidden_bytes // 2, 1), SCALE_BLOCK)
        return self.intranode_config(num_ranks, hidden, MAX_TOPK).buffer_bytes

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: pykernels has no RDMA buffer (internode is not supported)."""
        return 0


def recommended_config(num_ranks: int, num_sms: int) -> Config:
    """The Config Buffer.get_dispatch_config / get_combine_config return: num_sms SMs,
    chunks of 6 tokens, 256 ring slots (DeepEP's intranode values); any group size."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, numbers.Integral) or num_ranks < 1:
        raise ValueError(f"num_ranks: expected a positive int, got {num_ranks!r}")
    return Config(num_sms, 6, 256, 16, 128)


class EventOverlap:
    """DeepEP's EventOverlap: an event after an EP call, for overlapping communication with
    computation. pykernels runs every EP call on the current stream and finishes it before
    returning on the CPU backends, so on CPU tensors the event is None and waiting is a no-op;
    on a GPU it is a torch.cuda.Event recorded on the current stream after the call.
    `extra_tensors` keeps tensors alive until the event is waited for (DeepEP's meaning)."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    @staticmethod
    def record(device) -> "EventOverlap":
        """An event on the current stream of `device` (None on CPU)."""
        if torch.device(device).type != "cuda":
            return EventOverlap()
        ev = torch.cuda.Event()
        ev.record()
        return EventOverlap(ev)

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event (nothing to wait for on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False
