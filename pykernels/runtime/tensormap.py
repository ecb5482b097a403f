"""Tensor-map descriptions for TMA: one object, encoded by the CUDA driver for the GPU
(`encode_cuda`) or as the emulator's image (`emu_image`) for the CPU.

Shapes here are in torch order (outermost first); the driver's order (innermost first)
is produced internally.
"""
import dataclasses

import torch

from ..emu.hopper.tensormap import TensorMapImage

# CUtensorMapDataType codes
_DTYPE_CODES = {torch.uint8: 0, torch.float8_e4m3fn: 0, torch.float8_e5m2: 0, torch.int8: 0,
                torch.float16: 6, torch.float32: 7, torch.bfloat16: 9, torch.int32: 3, torch.int64: 5}
_SWIZZLE_CODES = {0: 0, 32: 1, 64: 2, 128: 3}


@dataclasses.dataclass(frozen=True)
class TensorMapDesc:
    """A tiled TMA view of `tensor`: `box` elements per transfer in torch order
    (outermost first), `swizzle` in bytes (0, 32, 64, 128). Dimensions of the view are the
    tensor's own (`shape` overrides, e.g. to hide padding rows); its last dim must be
    contiguous and the other strides multiples of 16 bytes."""
    tensor: torch.Tensor
    box: tuple
    swizzle: int = 0
    shape: tuple = None
    oob_nan: bool = False

    def __post_init__(self):
        t = self.tensor
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor map: dtype {t.dtype} has no TMA data type")
        if t.dim() != len(self.box):
            raise ValueError(f"tensor map: box {self.box} needs one entry per dimension of a {t.dim()}-d tensor")
        if t.stride(-1) != 1:
            raise ValueError("tensor map: the innermost dimension must be contiguous (stride 1)")
        self.image().check()

    def image(self, address=None) -> TensorMapImage:
        t = self.tensor
        eb = t.element_size()
        shape = tuple(self.shape or t.shape)
        return TensorMapImage(address=t.data_ptr() if address is None else address,
                              dims=tuple(int(s) for s in reversed(shape)),
                              strides_bytes=tuple(int(s) * eb for s in reversed(t.stride())),
                              box=tuple(int(b) for b in reversed(self.box)),
                              elem_strides=(1,) * t.dim(), elem_bytes=eb, swizzle=self.swizzle,
                              oob_nan=self.oob_nan)

    def box_bytes(self) -> int:
        n = self.tensor.element_size()
        for b in self.box:
            n *= b
        return n

    def encode_cuda(self) -> bytes:
        from .. import _C
        im = self.image()
        return _C.encode_tensor_map_tiled(_DTYPE_CODES[self.tensor.dtype], im.address, list(im.dims),
                                          list(im.strides_bytes[1:]), list(im.box), list(im.elem_strides),
                                          0, _SWIZZLE_CODES[self.swizzle], 2, int(self.oob_nan))

    def emu_image(self, gmem) -> bytes:
        gmem.register_tensor(self.tensor)
        return self.image().pack()
