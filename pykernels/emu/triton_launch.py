"""Run a Triton-compiled kernel (sm_90a PTX) on the emulator with its GPU-style arguments."""
import numpy as np
import torch

from .launch import _dim3, launch, parse_cached


def launch_triton(compiled, grid, *args, **options):
    """compiled: a triton CompiledKernel (or emu.triton_compile.CompiledPTX); grid: 1-3
    sizes; args: the runtime arguments a GPU launch takes (CPU tensors, ints, floats),
    constexprs excluded. The emulator appends Triton's hidden trailing parameters (global
    and profile scratch pointers). Returns the launch Stats."""
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    kernel = parse_cached(ptx).kernel(md.name)
    grid = _dim3(grid, "grid")
    hidden = len(kernel.params) - len(args)
    if hidden < 0:
        raise ValueError(f"args: {md.name} takes {len(kernel.params)} parameters including Triton's "
                         f"hidden ones, got {len(args)} arguments")
    keep = []
    extra = []
    for size_attr in ("global_scratch_size", "profile_scratch_size")[:hidden]:
        size = int(getattr(md, size_attr, 0) or 0)
        if size:
            buf = torch.zeros(size * int(np.prod(grid)), dtype=torch.uint8)
            keep.append(buf)
            extra.append(buf)
        else:
            extra.append(0)
    cluster = tuple(getattr(md, "cluster_dims", (1, 1, 1)) or (1, 1, 1))
    return launch(ptx, md.name, grid, (32 * md.num_warps, 1, 1), list(args) + extra,
                  shared_mem=md.shared, cluster=cluster, **options)
