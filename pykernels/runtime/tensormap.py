"""Tensor-map descriptions for TMA: one object, encoded by the CUDA driver for the GPU
(`encode_cuda`) or as the same 128-byte layout by the emulator (`emu_image`, which loads
pykernels.emu only when called: the GPU path never imports the emulator).

Shapes here are in torch order (outermost first); the driver's order (innermost first)
is produced internally (`TiledFields`). `check_tiled` holds the driver's documented
requirements for a tiled map, for both paths.
"""
import dataclasses
import functools

import torch

# CUtensorMapDataType codes
_DTYPE_CODES = {torch.uint8: 0, torch.float8_e4m3fn: 0, torch.float8_e5m2: 0, torch.int8: 0,
                torch.float16: 6, torch.float32: 7, torch.bfloat16: 9, torch.int32: 3, torch.int64: 5}
_SWIZZLE_CODES = {0: 0, 32: 1, 64: 2, 128: 3}


def check_tiled(address, dims, strides_bytes, box, elem_strides, elem_bytes, swizzle):
    """cuTensorMapEncodeTiled's requirements (CUDA driver API) on the fields of a tiled
    map, innermost dimension first; raises ValueError naming the field."""
    if address % 16:
        raise ValueError(f"tensor map: global address must be 16-byte aligned, got {address:#x}")
    _check_geometry(tuple(dims), tuple(strides_bytes), tuple(box), tuple(elem_strides), elem_bytes, swizzle)


@functools.lru_cache(maxsize=4096)     # a launch checks the same few geometries call after call
def _check_geometry(dims, strides_bytes, box, elem_strides, elem_bytes, swizzle):
    r = len(dims)
    if not 1 <= r <= 5:
        raise ValueError(f"tensor map: rank must be 1 to 5, got {r}")
    if not (len(strides_bytes) == len(box) == len(elem_strides) == r):
        raise ValueError("tensor map: dims, strides_bytes, box and elem_strides need one entry per dimension")
    if swizzle not in _SWIZZLE_CODES:
        raise ValueError(f"tensor map: swizzle must be one of {tuple(_SWIZZLE_CODES)} bytes, got {swizzle}")
    if any(not 1 <= d <= 1 << 32 for d in dims):
        raise ValueError(f"tensor map: dimensions must be in [1, 2^32], got {dims}")
    if any(s % 16 or s >= 1 << 40 for s in strides_bytes[1:]):
        raise ValueError(f"tensor map: strides must be multiples of 16 bytes below 2^40, got {strides_bytes}")
    if any(not 1 <= b <= 256 for b in box):
        raise ValueError(f"tensor map: box sizes must be 1..256, got {box}")
    if any(not 1 <= e <= 8 for e in elem_strides):
        raise ValueError(f"tensor map: element strides must be 1..8, got {elem_strides}")
    inner = box[0] * elem_bytes
    if inner % 16:
        raise ValueError(f"tensor map: the box's inner extent must be a multiple of 16 bytes, got {inner}")
    if swizzle and inner > swizzle:
        raise ValueError(f"tensor map: with a {swizzle}-byte swizzle the box's inner extent may be at most "
                         f"{swizzle} bytes, got {inner}")


@dataclasses.dataclass(frozen=True)
class TiledFields:
    """The fields of a tiled tensor map in the driver's order (innermost first)."""
    address: int
    dims: tuple            # elements
    strides_bytes: tuple   # strides_bytes[0] == elem_bytes (dimension 0 is dense)
    box: tuple
    elem_strides: tuple
    elem_bytes: int
    dtype: int             # CUtensorMapDataType
    swizzle: int
    oob_nan: bool

    def check(self):
        check_tiled(self.address, self.dims, self.strides_bytes, self.box, self.elem_strides, self.elem_bytes,
                    self.swizzle)
        return self


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

    def image(self, address=None) -> TiledFields:
        """The map's fields in the driver's order (address: override the tensor's)."""
        t = self.tensor
        eb = t.element_size()
        shape = tuple(self.shape or t.shape)
        return TiledFields(address=t.data_ptr() if address is None else address,
                           dims=tuple(int(s) for s in reversed(shape)),
                           strides_bytes=tuple(int(s) * eb for s in reversed(t.stride())),
                           box=tuple(int(b) for b in reversed(self.box)),
                           elem_strides=(1,) * t.dim(), elem_bytes=eb, dtype=_DTYPE_CODES[t.dtype],
                           swizzle=self.swizzle, oob_nan=self.oob_nan)

    def box_bytes(self) -> int:
        n = self.tensor.element_size()
        for b in self.box:
            n *= b
        return n

    def encode_cuda(self) -> bytes:
        from .. import _C
        im = self.image()
        return _C.encode_tensor_map_tiled(im.dtype, im.address, list(im.dims),
                                          list(im.strides_bytes[1:]), list(im.box), list(im.elem_strides),
                                          0, _SWIZZLE_CODES[self.swizzle], 2, int(self.oob_nan))

    def emu_image(self, gmem, name="a tensor map") -> bytes:
        """The 128-byte map for the emulator (pykernels.emu.hopper.tensormap, loaded here
        only); registers the tensor with the emulator's global memory `gmem`."""
        from ..emu.hopper.tensormap import TensorMapImage
        gmem.register_tensor(self.tensor, name)
        return TensorMapImage.from_driver(**dataclasses.asdict(self.image())).pack()
