"""torch.ops.pykernels.* custom ops whose eager calls skip the op dispatcher.

A torch.library custom op spends ~100 us of host time per call in its Python dispatch
layers (autograd, ADInplaceOrView, the dynamo guard): more than a decode-sized kernel
runs (bench/results/h200-2026-12-04-8d5587c: 300 us per GEMM call through the op, 45 us
from a prepared plan). The public functions therefore call `call(op, body, *args)`:
plain tensors in eager mode run the op's body itself (the same validation, registry and
backend as the op), anything traced (torch.compile, fake or functional tensors, autograd)
goes through the registered op, so graphs hold it.
"""
import torch


def _plain(args) -> bool:
    return all(type(a) is torch.Tensor and not a.requires_grad for a in args if isinstance(a, torch.Tensor))


def call(op, body, *args):
    """op(*args) when traced, else body(*args): body is the function `op` was made from."""
    if torch.compiler.is_compiling() or not _plain(args):
        return op(*args)
    return body(*args)
