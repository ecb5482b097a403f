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


def _check_written_leaves(op, args) -> None:
    """An output the op writes in place may not be a leaf that requires grad (autograd
    forbids it): the error names the output, where torch's own does not."""
    schema = getattr(getattr(op, "default", None), "_schema", None)    # None: a plain callable
    for arg, value in zip(schema.arguments if schema is not None else (), args):
        written = arg.alias_info is not None and arg.alias_info.is_write
        if written and isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
            raise ValueError(f"{arg.name}: expected a tensor that does not require grad (the op writes it in "
                             f"place, which autograd forbids for a leaf), got a leaf with requires_grad=True")


def call(op, body, *args):
    """op(*args) when traced, else body(*args): body is the function `op` was made from."""
    if torch.compiler.is_compiling() or not _plain(args):
        if not torch.compiler.is_compiling():
            _check_written_leaves(op, args)
        return op(*args)
    return body(*args)
