"""Arrays of other libraries (any DLPack producer: NumPy, CuPy, JAX, ...) through the public ops.

`dlpack_io` wraps a public function once, at its definition: arguments that are not torch
tensors but export `__dlpack__` (also inside tuples and lists, e.g. DeepGEMM's (a, sfa)
pairs) are imported zero-copy with torch.from_dlpack (validate.as_tensor); the function runs
on torch tensors; the tensors it returns go back as arrays of the library of the first such
argument, again without a copy:

- a returned tensor that is one of the imported arguments (an output written in place, e.g.
  `out=` or `softmax_lse=`, or an input returned as it is) comes back as the caller's own
  object;
- any other returned tensor is exported with that library's `from_dlpack`; a tensor the
  library cannot hold (NumPy has no bfloat16 or float8 dtype) stays a torch tensor.

Calls whose array arguments are all torch tensors skip all of this (one scan of the arguments).
"""
import functools
import inspect
import sys

import torch

from . import validate as V

# What a library raises when from_dlpack meets a dtype or device it cannot hold
_EXPORT_ERRORS = (BufferError, RuntimeError, TypeError, ValueError)


# Per argument type: True for a foreign array type, False for a torch tensor or a non-array,
# None for a container to look into. A dict lookup per argument keeps the all-torch call cheap
# (a failed hasattr costs a raised exception: microseconds per call).
_KIND = {tuple: None, list: None, dict: None}
_TENSOR, _UNKNOWN = torch.Tensor, object()


def _kind(t: type):
    kind = _KIND.get(t, _UNKNOWN)
    if kind is _UNKNOWN:
        kind = _KIND[t] = not issubclass(t, torch.Tensor) and hasattr(t, "__dlpack__")
    return kind


def _is_foreign(x) -> bool:
    return _kind(type(x)) is True


def _has_foreign(values) -> bool:
    for v in values:
        t = type(v)
        if t is _TENSOR:
            continue
        kind = _KIND.get(t, _UNKNOWN)
        if kind is _UNKNOWN:
            kind = _kind(t)
        if kind is True:
            return True
        if kind is None and _has_foreign(v.values() if t is dict else v):
            return True
    return False


def _import(name: str, x, imported: list):
    """x with every foreign array in it replaced by a torch tensor; (array, tensor) pairs
    appended to `imported`."""
    if isinstance(x, torch.Tensor) or x is None:
        return x
    if isinstance(x, tuple):
        return tuple(_import(f"{name}[{i}]", e, imported) for i, e in enumerate(x))
    if isinstance(x, list):
        return [_import(f"{name}[{i}]", e, imported) for i, e in enumerate(x)]
    if isinstance(x, dict):
        return {k: _import(str(k), e, imported) for k, e in x.items()}
    if _is_foreign(x):
        t = V.as_tensor(name, x)
        imported.append((x, t))
        return t
    return x


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _library_of(array):
    """The top-level module of an array's type (numpy for numpy.ndarray, cupy for cupy.ndarray)."""
    return sys.modules.get(type(array).__module__.split(".")[0])


def _export(x, imported: list, library):
    if isinstance(x, torch.Tensor):
        for array, t in imported:
            if t is x or _same_view(t, x):
                return array
        from_dlpack = getattr(library, "from_dlpack", None)
        if from_dlpack is None:
            return x
        try:
            return from_dlpack(x)
        except _EXPORT_ERRORS:          # e.g. NumPy and bfloat16 / float8: stays a torch tensor
            return x
    if isinstance(x, tuple):
        return tuple(_export(e, imported, library) for e in x)
    if isinstance(x, list):
        return [_export(e, imported, library) for e in x]
    return x


def dlpack_io(fn):
    """Let `fn` (a public op taking and returning torch tensors) take and return the arrays of
    any DLPack producer, without copies (module docstring)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (_has_foreign(args) or _has_foreign(kwargs.values())):
            return fn(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)          # the function's own error for a wrong call
        imported = []
        for name, value in bound.arguments.items():
            bound.arguments[name] = _import(name, value, imported)
        result = fn(*bound.args, **bound.kwargs)
        return _export(result, imported, _library_of(imported[0][0]))
    return wrapper
