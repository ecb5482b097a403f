"""The PTX emulator: runs compiled sm_90a kernels (nvcc, Triton, hand-written PTX) on
CPU tensors, so hand-written kernels are tested where no GPU exists (docs/emulator.md).

Entry points: `launch(ptx, kernel, grid, block, args, shared_mem=0, cluster=(1,1,1))`,
returning per-launch Stats; `launch_many([...])` for concurrent launches on several
emulated devices; `launch_triton(compiled, grid, *args)` for Triton-compiled kernels;
and `parse(ptx)` for the module structure.
"""
from .errors import Deadlock, EmuError, MemoryFault, UnsupportedInstruction  # noqa: F401
from .launch import launch, launch_many  # noqa: F401
from .parser import parse  # noqa: F401
from .triton_compile import CompiledPTX, compile_triton  # noqa: F401,E402
from .triton_launch import launch_triton  # noqa: F401,E402
