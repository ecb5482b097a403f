"""Expert-parallel all-to-all: MoE dispatch and combine across ranks (DeepEP-style).

`Buffer` is the torch.distributed engine path (gloo on CPU processes, NCCL on GPUs).
"""
from .buffer import Buffer, DispatchHandle

__all__ = ["Buffer", "DispatchHandle"]
