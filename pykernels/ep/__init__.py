"""Expert-parallel all-to-all: MoE dispatch and combine across ranks (DeepEP-style).

`Buffer` is the torch.distributed engine path (gloo on CPU processes, NCCL on GPUs).
Its local steps run in PyTorch or, with `Buffer(..., local_backend="triton")`, as the
Triton kernels of pykernels.triton.ep. See docs/ep.md.

The hand-written intranode kernels (csrc/ep, NVLink through CUDA IPC ring buffers, and the
low-latency mode) are reached through `pykernels.ep.intranode` (= pykernels.cuda.ep):
`IntranodeConfig`, `LocalNode` (every rank in this process: the emulator on CPU, or one
GPU with a stream per rank), `CudaIntranode` (one rank of a process group on its GPU),
`decode_error`. Loaded on first use.
"""
import importlib

from .buffer import LOCAL_BACKENDS, MAX_HIDDEN, MAX_TOPK, SUPPORTED_HIDDEN, Buffer, DispatchHandle

_INTRANODE = ("IntranodeConfig", "LocalNode", "CudaIntranode", "decode_error")

__all__ = ["Buffer", "DispatchHandle", "LOCAL_BACKENDS", "MAX_HIDDEN", "MAX_TOPK", "SUPPORTED_HIDDEN",
           "intranode", *_INTRANODE]


def __getattr__(name):
    if name == "intranode":
        return importlib.import_module("pykernels.cuda.ep")
    if name in _INTRANODE:
        return getattr(importlib.import_module("pykernels.cuda.ep"), name)
    raise AttributeError(f"module 'pykernels.ep' has no attribute {name!r}")
