"""The PTX emulator: runs compiled sm_90a kernels (nvcc, Triton, hand-written PTX) on
CPU tensors, so hand-written kernels are tested where no GPU exists (docs/emulator.md).

Entry points: `launch(ptx, kernel, grid, block, args, shared_mem=0, cluster=(1,1,1))`,
returning per-launch Stats; `launch_many([...])` for concurrent launches on several
emulated devices; `launch_triton(compiled, grid, *args)` for Triton-compiled kernels;
and `parse(ptx)` for the module structure.

Submodules load on first use (module __getattr__), so `import pykernels.emu` is cheap
and importing a name loads only what it needs.
"""
import importlib
import sys
import types

_EXPORTS = {"Deadlock": "errors", "EmuError": "errors", "MemoryFault": "errors", "UnsupportedInstruction": "errors",
            "launch": "launch", "launch_many": "launch", "parse": "parser", "CompiledPTX": "triton_compile",
            "compile_triton": "triton_compile", "launch_triton": "triton_launch"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps the exported names when a submodule of the same name is imported: the
    import system sets `pykernels.emu.launch` to the submodule `launch.py` once it is
    loaded, which would hide the function `launch` (the module stays in sys.modules)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
