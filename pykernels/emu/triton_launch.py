"""Run a Triton-compiled kernel (sm_90a PTX) on the emulator with its GPU-style arguments."""
import numpy as np
import torch

from .hopper.tensormap import TensorMapImage
from .launch import _dim3, launch, parse_cached

_SWIZZLE_BYTES = {0: 0, 1: 32, 2: 64, 3: 128}    # CUtensorMapSwizzle codes


def _is_descriptor(a):
    return all(hasattr(a, f) for f in ("base", "shape", "strides", "block_shape"))


class _DescriptorImage:
    """A TensorDescriptor encoded as Triton's launcher would, in the emulator's format."""

    def __init__(self, desc, meta):
        self.desc, self.meta = desc, meta

    def emu_image(self, gmem, name="a tensor descriptor"):
        d, meta = self.desc, self.meta
        if meta.get("is_im2col") or meta.get("fp4_padded"):
            raise ValueError("args: im2col and fp4-padded tensor descriptors are not supported by the emulator")
        base = d.base
        gmem.register_tensor(base, name)
        eb = int(meta["elem_size"])
        return TensorMapImage(address=base.data_ptr(), dims=tuple(int(s) for s in reversed(d.shape)),
                              strides_bytes=tuple(int(s) * eb for s in reversed(d.strides)),
                              box=tuple(int(b) for b in reversed(meta["block_size"])),
                              elem_strides=(1,) * len(d.shape), elem_bytes=eb,
                              swizzle=_SWIZZLE_BYTES[int(meta["swizzle"])],
                              oob_nan=getattr(d, "padding", "zero") == "nan").pack()


def _expand(args, metas):
    """TensorDescriptor -> (tensor map, *shape, *strides), as Triton's CUDA launcher does."""
    out, metas = [], list(metas or [])
    for a in args:
        if _is_descriptor(a):
            if not metas:
                raise ValueError("args: a TensorDescriptor argument but the compiled kernel has no "
                                 "tensor-descriptor metadata")
            out += [_DescriptorImage(a, metas.pop(0)), *[int(s) for s in a.shape], *[int(s) for s in a.strides]]
        else:
            out.append(a)
    return out


def launch_triton(compiled, grid, *args, **options):
    """compiled: a triton CompiledKernel (or emu.triton_compile.CompiledPTX); grid: 1-3
    sizes; args: the runtime arguments a GPU launch takes (CPU tensors, ints, floats,
    triton.tools.tensor_descriptor.TensorDescriptor), constexprs excluded. The emulator
    expands descriptors as Triton's launcher does and appends Triton's hidden trailing
    parameters (global and profile scratch pointers). Returns the launch Stats."""
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    kernel = parse_cached(ptx).kernel(md.name)
    grid = _dim3(grid, "grid")
    args = _expand(args, getattr(md, "tensordesc_meta", None))
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
