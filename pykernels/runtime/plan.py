"""Launch plans: everything a kernel launch needs, computed once in Python.

A plan names a compiled kernel (module in pykernels/_kernels + entry function), its
launch geometry and its typed arguments. The same plan runs on the GPU
(executors.run_cuda) or on the PTX emulator (executors.run_emu), so the CPU tests
exercise the very host logic the GPU runs.
"""
import dataclasses
import struct

import torch

# PTX parameter type -> struct format (little-endian, as the driver expects).
_FORMATS = {"u32": "<I", "s32": "<i", "u64": "<Q", "s64": "<q", "f32": "<f", "f64": "<d"}


@dataclasses.dataclass(frozen=True)
class Arg:
    """One kernel parameter: `ptype` is "ptr" (a tensor, passed as its data pointer),
    one of u32/s32/u64/s64/f32/f64, or "tensormap" (a TensorMapDesc)."""
    ptype: str
    value: object

    def __post_init__(self):
        if self.ptype not in _FORMATS and self.ptype not in ("ptr", "tensormap"):
            raise ValueError(f"ptype: expected ptr, tensormap or one of {sorted(_FORMATS)}, got {self.ptype!r}")


def ptr(t: torch.Tensor) -> Arg:
    return Arg("ptr", t)


def ptr_or_null(t) -> Arg:
    """A tensor's pointer, or a null pointer for None (an optional argument the kernel never
    dereferences when null)."""
    return ptr(t) if t is not None else u64(0)


def u32(v: int) -> Arg:
    if not 0 <= int(v) < 2**32:
        raise ValueError(f"u32 argument out of range: {v}")
    return Arg("u32", int(v))


def u64(v: int) -> Arg:
    if not 0 <= int(v) < 2**64:
        raise ValueError(f"u64 argument out of range: {v}")
    return Arg("u64", int(v))


def pack_scalar(arg: Arg) -> bytes:
    return struct.pack(_FORMATS[arg.ptype], arg.value)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """module: kernel module name (manifest key); function: entry name;
    grid/block/cluster: 3-tuples; shared_bytes: dynamic shared memory; args: [Arg].

    pdl: programmatic dependent launch. On the GPU the kernel may start while the previous
    kernel of the stream still runs (once that kernel's CTAs all issued
    griddepcontrol.launch_dependents or exited), overlapping its launch and prologue with
    that kernel's tail. Only for kernels that issue griddepcontrol.wait before any global
    access (the executors check the PTX); safe whatever the previous kernel is, since the
    wait waits for every prerequisite grid to complete and flush. The emulator runs
    launches one after another, so there it changes nothing."""
    module: str
    function: str
    grid: tuple
    block: tuple
    args: tuple
    shared_bytes: int = 0
    cluster: tuple = (1, 1, 1)
    pdl: bool = False

    def tensors(self):
        return [a.value for a in self.args if a.ptype == "ptr"]
