"""Expert-parallel all-to-all: MoE dispatch and combine across ranks (DeepEP-style).

`Buffer` is the torch.distributed engine path (gloo on CPU processes, NCCL on GPUs).
Its local steps run in PyTorch or, with `Buffer(..., local_backend="triton")`, as the
Triton kernels of pykernels.triton.ep. See docs/ep.md.
"""
from .buffer import LOCAL_BACKENDS, MAX_HIDDEN, MAX_TOPK, SUPPORTED_HIDDEN, Buffer, DispatchHandle

__all__ = ["Buffer", "DispatchHandle", "LOCAL_BACKENDS", "MAX_HIDDEN", "MAX_TOPK", "SUPPORTED_HIDDEN"]
