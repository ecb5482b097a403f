"""The emulator's 128-byte tensor-map image (what a CUtensorMap parameter holds on the CPU).

NVIDIA does not document the bytes of a CUtensorMap, so the emulator defines its own
image with the same contents cuTensorMapEncodeTiled takes; the TMA instructions read it
from the kernel parameter (or from global memory, wherever the kernel keeps it).

Layout (little-endian): magic b"PKTM" | u8 rank | u8 elem_bytes | u8 swizzle bytes
(0/32/64/128) | u8 oob_nan | u64 address @8 | u64 dims[5] @16 | u64 strides_bytes[5] @56
(dimension 0 is dense: its stride is elem_bytes) | u32 box[5] @96 | u8 elem_strides[5]
@116. Dimension 0 is the innermost (contiguous) one, as in the CUDA driver API.
"""
import dataclasses
import struct

MAGIC = b"PKTM"
IMAGE_BYTES = 128
SWIZZLES = (0, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class TensorMapImage:
    address: int
    dims: tuple            # elements, innermost first
    strides_bytes: tuple   # per dimension, innermost first (strides_bytes[0] == elem_bytes)
    box: tuple             # elements per dimension of one TMA transfer
    elem_strides: tuple
    elem_bytes: int
    swizzle: int = 0       # bytes of the swizzle span (0 = none)
    oob_nan: bool = False  # out-of-bound elements read as NaN instead of 0

    @property
    def rank(self):
        return len(self.dims)

    def check(self):
        r = self.rank
        if not 1 <= r <= 5:
            raise ValueError(f"tensor map: rank must be 1 to 5, got {r}")
        if not (len(self.strides_bytes) == len(self.box) == len(self.elem_strides) == r):
            raise ValueError("tensor map: dims, strides_bytes, box and elem_strides need one entry per dimension")
        if self.swizzle not in SWIZZLES:
            raise ValueError(f"tensor map: swizzle must be one of {SWIZZLES} bytes, got {self.swizzle}")
        if self.address % 16:
            raise ValueError(f"tensor map: global address must be 16-byte aligned, got {self.address:#x}")
        if any(s % 16 for s in self.strides_bytes[1:]):
            raise ValueError(f"tensor map: strides must be multiples of 16 bytes, got {self.strides_bytes}")
        if any(not 1 <= b <= 256 for b in self.box):
            raise ValueError(f"tensor map: box sizes must be 1..256, got {self.box}")
        inner = self.box[0] * self.elem_bytes
        if inner % 16:
            raise ValueError(f"tensor map: the box's inner extent must be a multiple of 16 bytes, got {inner}")
        if self.swizzle and inner > self.swizzle:
            raise ValueError(f"tensor map: with a {self.swizzle}-byte swizzle the box's inner extent may be at most "
                             f"{self.swizzle} bytes, got {inner}")
        return self

    def pack(self) -> bytes:
        self.check()
        pad = lambda v, n: tuple(v) + (0,) * (n - len(v))  # noqa: E731
        raw = (MAGIC + struct.pack("<BBBB", self.rank, self.elem_bytes, self.swizzle, int(self.oob_nan))
               + struct.pack("<Q", self.address) + struct.pack("<5Q", *pad(self.dims, 5))
               + struct.pack("<5Q", *pad(self.strides_bytes, 5)) + struct.pack("<5I", *pad(self.box, 5))
               + struct.pack("<5B", *pad(self.elem_strides, 5)))
        return raw + bytes(IMAGE_BYTES - len(raw))

    @classmethod
    def unpack(cls, raw: bytes) -> "TensorMapImage":
        raw = bytes(raw)
        if len(raw) < IMAGE_BYTES or raw[:4] != MAGIC:
            raise ValueError("not a pykernels emulator tensor map (a CUtensorMap encoded by the CUDA driver "
                             "cannot be read by the emulator)")
        rank, eb, sw, nan = struct.unpack_from("<BBBB", raw, 4)
        (addr,) = struct.unpack_from("<Q", raw, 8)
        dims = struct.unpack_from("<5Q", raw, 16)[:rank]
        strides = struct.unpack_from("<5Q", raw, 56)[:rank]
        box = struct.unpack_from("<5I", raw, 96)[:rank]
        es = struct.unpack_from("<5B", raw, 116)[:rank]
        return cls(addr, dims, strides, box, es, eb, sw, bool(nan))
