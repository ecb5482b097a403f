"""Expert-parallel all-to-all: MoE dispatch and combine across ranks, DeepEP's V1 Buffer.

`Buffer(group, ..., backend=...)` (pykernels.ep.buffer) runs over the group's collectives
("gloo"/"nccl", pykernels.ep.engine) or over the hand-written intranode kernels ("emu"
across real processes on CPU, "cuda" with a GPU per rank; pykernels.ep.kernel_transport).
The ranks agree on every call before data moves, and every wait has a timeout
(pykernels.ep.agreement). See docs/ep.md.

The kernels' executors are also reachable directly through `pykernels.ep.intranode`
(= pykernels.cuda.ep): `IntranodeConfig`, `LocalNode` (every rank in this process),
`CudaIntranode`, `decode_error`. Loaded on first use.
"""
import importlib

from .agreement import BufferBrokenError, RankMismatchError, RankTimeoutError
from .buffer import BACKENDS, DEFAULT_TIMEOUT_S, LOCAL_BACKENDS, Buffer
from .checks import MAX_HIDDEN, MAX_TOPK, SUPPORTED_HIDDEN
from .config import Config, EventOverlap, topk_idx_t
from .handle import DispatchHandle

_INTRANODE = ("IntranodeConfig", "LocalNode", "CudaIntranode", "IntranodeRank", "PeerTimeoutError", "decode_error")
_TRANSPORTS = {"EmuIntranode": "pykernels.ep.transport_emu"}   # one rank per process, emulated

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "topk_idx_t", "RankMismatchError",
           "RankTimeoutError", "BufferBrokenError", "BACKENDS", "DEFAULT_TIMEOUT_S", "LOCAL_BACKENDS", "MAX_HIDDEN",
           "MAX_TOPK", "SUPPORTED_HIDDEN", "intranode", *_INTRANODE, *_TRANSPORTS]


def __getattr__(name):
    if name == "intranode":
        return importlib.import_module("pykernels.cuda.ep")
    if name in _INTRANODE:
        return getattr(importlib.import_module("pykernels.cuda.ep"), name)
    if name in _TRANSPORTS:
        return getattr(importlib.import_module(_TRANSPORTS[name]), name)
    raise AttributeError(f"module 'pykernels.ep' has no attribute {name!r}")
