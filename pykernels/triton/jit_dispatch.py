"""`jit`: the decorator of every pykernels Triton kernel and device function. Its kernels
run compiled on CUDA tensors and through Triton's interpreter on CPU tensors, whatever
TRITON_INTERPRET said when triton was first imported, and without touching how the
user's own Triton kernels run.

Why not TRITON_INTERPRET: `triton.jit` picks JITFunction or InterpretedFunction when it
decorates, and triton.language's standard library (tl.max, tl.sum, ...: `@jit` functions
of triton/language/standard.py) is decorated once, at its import. Setting the variable
process-wide would depend on import order and interpret the user's kernels too.

How (Triton 3.8's interpreter, triton/runtime/interpreter.py):
- `KernelFunction` is a JITFunction (so the compiler, `triton.compile(ASTSource(...))`
  and sm90.py treat it as one) that also holds an InterpretedFunction of the same Python
  function. A launch runs the interpreted one when TRITON_INTERPRET is on or no argument
  is a CUDA tensor; a call from interpreted code (a device function) runs it too.
- Interpreted code cannot call a JITFunction. For an interpreted launch, every
  JITFunction-valued attribute of triton.language's modules and of `tl.tensor` (the
  standard library and its member forms) is replaced by an interpreted twin, cached so
  the interpreter's identity tests (`combine_fn is tl.standard._elementwise_max`) hold,
  and put back afterwards, also on error. Under TRITON_INTERPRET=1 there is nothing to
  replace.
- Triton's InterpretedFunction.__call__ leaves its patches of triton.language's builtins
  in place after a device-function call (harmless when every kernel of the process is
  interpreted); device-function calls here (the twins, our device functions) undo them,
  so kernels compiled later in the process see the original language.
The replacement is process-wide while an interpreted launch runs (as are the
interpreter's own builtin patches): interpreted launches are serialized by a lock, and a
Triton kernel compiled on another thread at that moment would see the twins.
"""
import contextlib
import functools
import importlib
import sys
import threading

import torch
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction, InterpreterError, _patch_lang
from triton.runtime.jit import JITFunction
import triton.language as tl


def _interpreted_here() -> bool:
    # pykernels' kernels are launched on CPU tensors (the interpreter) where there is no
    # CUDA device, or everywhere when the user turned Triton's interpreter on.
    return bool(knobs.runtime.interpret) or not torch.cuda.is_available()


INTERPRETED = _interpreted_here()
"""Whether pykernels' Triton kernels run through the interpreter in this process: the
kernels' numerics switches (software rounding, upcast bf16 dots) follow it."""


class _ScopedInterpretedFunction(InterpretedFunction):
    """An InterpretedFunction whose device-function calls undo their language patches."""

    def __call__(self, *args, **kwargs):
        scope = _patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except InterpreterError:
            raise
        except Exception as e:
            raise InterpreterError(repr(e)) from e
        finally:
            if scope is not None:
                scope.restore()


_state = threading.local()
_launch_lock = threading.RLock()
# keyed by id: a JITFunction's hash is its cache key, computed from its globals
_twins = {}      # id(JITFunction of triton.language) -> (it, its interpreted twin)
_members = {}    # id(JITFunction) -> (it, plain function for tl.tensor: a method binds `self`)


def _interpreting() -> bool:
    return getattr(_state, "depth", 0) > 0


def _twin(fn: JITFunction) -> _ScopedInterpretedFunction:
    if id(fn) not in _twins:
        _twins[id(fn)] = (fn, _ScopedInterpretedFunction(fn.fn))
    return _twins[id(fn)][1]


def _member(fn: JITFunction):
    if id(fn) not in _members:
        twin = _twin(fn)

        def member(self, *args, **kwargs):
            return twin(self, *args, **kwargs)
        _members[id(fn)] = (fn, member)
    return _members[id(fn)][1]


def _language_jit_functions():
    """(owner, attribute, JITFunction) for triton.language's modules and tl.tensor."""
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    for owner in modules + [tl.tensor]:
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction) and not isinstance(value, KernelFunction):
                yield owner, name, value


# Modules Triton imports lazily during a launch that read triton.language's JITFunctions at
# import (triton.experimental.gluon asserts tl.standard.cdiv is one; the launcher's argument
# mangling imports it): imported before any replacement.
_LAZY_LANGUAGE_READERS = ("triton.experimental.gluon",)


@functools.cache
def _import_lazy_language_readers():
    for name in _LAZY_LANGUAGE_READERS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


@contextlib.contextmanager
def interpreted_language():
    """Within: triton.language's JITFunctions replaced by interpreted twins (see above)."""
    _import_lazy_language_readers()
    with _launch_lock:
        replaced = []
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            for owner, name, fn in list(_language_jit_functions()):
                replaced.append((owner, name, fn))
                setattr(owner, name, _member(fn) if owner is tl.tensor else _twin(fn))
            yield
        finally:
            for owner, name, fn in reversed(replaced):
                setattr(owner, name, fn)
            _state.depth -= 1


def _on_cuda(args, kwargs) -> bool:
    return any(getattr(getattr(a, "device", None), "type", None) == "cuda"
               for a in (*args, *kwargs.values()))


class KernelFunction(JITFunction):
    """A Triton function compiled on CUDA tensors, interpreted on CPU tensors."""

    def __init__(self, fn, **options):
        super().__init__(fn, **options)
        self.interpreted = _ScopedInterpretedFunction(fn, **options)

    def run(self, *args, grid, warmup, **kwargs):
        if not knobs.runtime.interpret and _on_cuda(args, kwargs):
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        with interpreted_language():
            return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args, **kwargs):
        # Only interpreted code calls a device function (the compiler calls it in the IR):
        # one of our interpreted launches, or under TRITON_INTERPRET=1 any kernel (a user's
        # kernel may call ours). Elsewhere this is JITFunction's error.
        if not (_interpreting() or knobs.runtime.interpret):
            return super().__call__(*args, **kwargs)
        return self.interpreted(*args, **kwargs)


def jit(fn=None, **options):
    """`triton.jit` for pykernels: `@jit` or `@jit(noinline=True, ...)` (triton.jit's
    options) giving a KernelFunction."""
    if fn is None:
        return lambda f: KernelFunction(f, **options)
    return KernelFunction(fn, **options)


__all__ = ["INTERPRETED", "KernelFunction", "interpreted_language", "jit"]
