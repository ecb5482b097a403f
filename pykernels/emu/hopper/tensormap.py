"""The 128-byte tensor map (CUtensorMap) of a tiled TMA view, laid out as the CUDA driver
lays it out, as far as the public record establishes the fields.

The CUDA documentation calls the object opaque. The placement used here is the 512-bit
tiled descriptor NVIDIA published in TensorRT-LLM (cpp/kernels/fmha_v2/src/fmha/hopper/
tma_types.h, `cudaTmaDescTiled`, and the `set_tensor_*` helpers that fill it), whose first
field is the global address; the later public record agrees with it: CUTLASS and Triton
work around a Blackwell driver bug by clearing bit 85 (bit 21 of the second 64-bit word,
NVIDIA 595.71.05 release notes; triton-lang/triton#9235, #10442), a bit outside every field
below, so the address survives it. Fields (little-endian; dimension 0 innermost):

  bytes 0-7    global address
  bytes 8-11   bit 0 im2col, bits 1-3 format version (1), bits 4-6 rank - 1,
               bits 7-10 data type (CUtensorMapDataType), 11-12 interleave, 13-14 swizzle
               (0 none, 1 32 B, 2 64 B, 3 128 B), 15 out-of-bound NaN fill, 16 f32->tf32,
               17-18 L2 promotion
  bytes 12-27  global byte strides of dimensions 1-4, shifted right by 4, low 32 bits
  bytes 28-31  their bits 32-35, 4 bits per dimension
  bytes 32-51  global dimensions - 1 (u32 each)
  bytes 52-55  element strides - 1 (3 bits per dimension); box size 0 - 1 in bits 24-31
  bytes 56-59  box sizes 1-4 - 1 (8 bits each)
  bytes 60-127 not described publicly: zero here, ignored when read

`tensormap.replace` (PTX ISA) edits these fields in place (`replace`).
"""
import dataclasses
import struct

IMAGE_BYTES = 128
SWIZZLES = (0, 32, 64, 128)
# data-type codes in the map (PTX ISA tensormap.replace .elemtype table, TensorRT-LLM's
# cudaTmaDescFormat): u8 u16 u32 s32 u64 s64 f16 f32 f32.ftz f64 bf16 tf32 tf32.ftz
ELEM_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 4, 9: 8, 10: 2, 11: 4, 12: 4}
# the driver API's CUtensorMapDataType orders them differently (f64 8, bf16 9, f32.ftz 10)
_FROM_DRIVER = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 9, 9: 10, 10: 8, 11: 11, 12: 12}
_DTYPE_OF_SIZE = {1: 0, 2: 1, 4: 2, 8: 4}        # a raw data type of that element size
_VERSION = 1
_COMMON, _STRIDE_LO, _STRIDE_HI, _DIMS, _ESTRIDE_BOX0, _BOX = 8, 12, 28, 32, 52, 56
# (shift, width) of the bit fields in bytes 8-11
_BITS = {"im2col": (0, 1), "version": (1, 3), "rank": (4, 3), "elemtype": (7, 4), "interleave_layout": (11, 2),
         "swizzle_mode": (13, 2), "fill_mode": (15, 1), "tf32": (16, 1), "l2_promotion": (17, 2)}


def _get_bits(word, name):
    shift, width = _BITS[name]
    return (word >> shift) & ((1 << width) - 1)


def _set_bits(word, name, value):
    shift, width = _BITS[name]
    mask = ((1 << width) - 1) << shift
    return (word & ~mask) | ((int(value) << shift) & mask)


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
    dtype: int = None      # data-type code of the map (ELEM_BYTES; None: a raw type of elem_bytes)
    interleave: int = 0
    l2_promotion: int = 0

    @classmethod
    def from_driver(cls, dtype, **fields):
        """From cuTensorMapEncodeTiled's arguments (dtype: a CUtensorMapDataType)."""
        return cls(dtype=_FROM_DRIVER[dtype], **fields)

    @property
    def rank(self):
        return len(self.dims)

    def check(self):
        """The driver's documented requirements (runtime/tensormap.check_tiled)."""
        from ...runtime.tensormap import check_tiled
        check_tiled(self.address, self.dims, self.strides_bytes, self.box, self.elem_strides, self.elem_bytes,
                    self.swizzle)
        if self.interleave:
            raise ValueError("tensor map: interleaved layouts are not supported by the emulator")
        return self

    def describe(self):
        return (f"tensor map (global address {self.address:#x}, dims {self.dims}, byte strides {self.strides_bytes}, "
                f"box {self.box}, element strides {self.elem_strides}, {self.elem_bytes}-byte elements, "
                f"swizzle {self.swizzle or 'none'}, out-of-bound fill {'NaN' if self.oob_nan else 'zero'})")

    def pack(self) -> bytes:
        """The 128-byte image (layout above)."""
        self.check()
        r = self.rank
        code = _DTYPE_OF_SIZE[self.elem_bytes] if self.dtype is None else self.dtype
        if ELEM_BYTES.get(code) != self.elem_bytes:
            raise ValueError(f"tensor map: data type {code} does not have {self.elem_bytes}-byte elements")
        word = 0
        for name, v in (("version", _VERSION), ("rank", r - 1), ("elemtype", code),
                        ("interleave_layout", self.interleave), ("swizzle_mode", SWIZZLES.index(self.swizzle)),
                        ("fill_mode", int(self.oob_nan)), ("l2_promotion", self.l2_promotion)):
            word = _set_bits(word, name, v)
        raw = bytearray(IMAGE_BYTES)
        struct.pack_into("<QI", raw, 0, self.address, word)
        for d in range(1, r):
            _put_stride(raw, d, self.strides_bytes[d])
        for d in range(r):
            _put_field(raw, "global_dim", d, self.dims[d])
            _put_field(raw, "box_dim", d, self.box[d])
            _put_field(raw, "element_stride", d, self.elem_strides[d])
        return bytes(raw)

    @classmethod
    def unpack(cls, raw: bytes) -> "TensorMapImage":
        raw = bytes(raw)
        if len(raw) < IMAGE_BYTES:
            raise ValueError(f"a tensor map is {IMAGE_BYTES} bytes, got {len(raw)}")
        address, word = struct.unpack_from("<QI", raw, 0)
        if _get_bits(word, "version") != _VERSION or _get_bits(word, "im2col"):
            raise ValueError(f"not a tiled tensor map (format word {word:#010x}: version "
                             f"{_get_bits(word, 'version')}, im2col {_get_bits(word, 'im2col')}); an uninitialised "
                             "map, or one the emulator does not know")
        r = _get_bits(word, "rank") + 1
        code = _get_bits(word, "elemtype")
        if code not in ELEM_BYTES:
            raise ValueError(f"tensor map data type {code} is not supported by the emulator")
        eb = ELEM_BYTES[code]
        strides = (eb,) + tuple(_get_stride(raw, d) for d in range(1, r))
        return cls(address, tuple(_get_field(raw, "global_dim", d) for d in range(r)), strides,
                   tuple(_get_field(raw, "box_dim", d) for d in range(r)),
                   tuple(_get_field(raw, "element_stride", d) for d in range(r)), eb,
                   SWIZZLES[_get_bits(word, "swizzle_mode")], bool(_get_bits(word, "fill_mode")), code,
                   _get_bits(word, "interleave_layout"), _get_bits(word, "l2_promotion"))


def _u32(raw, off):
    return struct.unpack_from("<I", raw, off)[0]


def _put_stride(raw, d, stride):
    if stride % 16 or not 0 <= stride < 1 << 40:
        raise ValueError(f"tensor map: global stride {stride} of dimension {d} must be a multiple of 16 below 2^40")
    v = stride >> 4
    struct.pack_into("<I", raw, _STRIDE_LO + 4 * (d - 1), v & 0xFFFFFFFF)
    hi = _u32(raw, _STRIDE_HI) & ~(0xF << 4 * (d - 1))
    struct.pack_into("<I", raw, _STRIDE_HI, hi | ((v >> 32) & 0xF) << 4 * (d - 1))


def _get_stride(raw, d):
    hi = (_u32(raw, _STRIDE_HI) >> 4 * (d - 1)) & 0xF
    return ((hi << 32) | _u32(raw, _STRIDE_LO + 4 * (d - 1))) << 4


def _field_place(name, d):
    """(byte offset, shift, width) of dimension d's global_dim / box_dim / element_stride."""
    if name == "global_dim":
        return _DIMS + 4 * d, 0, 32
    if name == "element_stride":
        return _ESTRIDE_BOX0, 3 * d, 3
    return (_ESTRIDE_BOX0, 24, 8) if d == 0 else (_BOX, 8 * (d - 1), 8)


def _put_field(raw, name, d, value):
    off, shift, width = _field_place(name, d)
    v = int(value) - 1                               # stored minus one
    if not 0 <= v < 1 << width:
        raise ValueError(f"tensor map: {name} {value} of dimension {d} outside [1, {1 << width}]")
    mask = ((1 << width) - 1) << shift
    struct.pack_into("<I", raw, off, (_u32(raw, off) & ~mask & 0xFFFFFFFF) | (v << shift))


def _get_field(raw, name, d):
    off, shift, width = _field_place(name, d)
    return ((_u32(raw, off) >> shift) & ((1 << width) - 1)) + 1


REPLACE_FIELDS = ("global_address", "rank", "box_dim", "global_dim", "global_stride", "element_stride", "elemtype",
                  "interleave_layout", "swizzle_mode", "swizzle_atomicity", "fill_mode")


def replace(raw: bytearray, field: str, value: int, ordinal: int = None):
    """tensormap.replace.tile.<field> on the image bytes `raw` (in place). Values as the
    PTX ISA gives them: rank - 1, dimension sizes, byte strides of dimension ordinal + 1
    (global_stride's ordinal counts the strided dimensions), data-type and mode codes."""
    if field == "global_address":
        struct.pack_into("<Q", raw, 0, int(value) & (1 << 64) - 1)
    elif field == "global_stride":
        if not 0 <= ordinal <= 3:
            raise ValueError(f"tensormap.replace.global_stride: ordinal {ordinal} outside 0..3")
        _put_stride(raw, ordinal + 1, int(value))
    elif field in ("box_dim", "global_dim", "element_stride"):
        if not 0 <= ordinal <= 4:
            raise ValueError(f"tensormap.replace.{field}: ordinal {ordinal} outside 0..4")
        _put_field(raw, field, ordinal, value)
    elif field in ("rank", "elemtype", "interleave_layout", "swizzle_mode", "fill_mode"):
        limit = {"rank": 5, "elemtype": 13, "interleave_layout": 3, "swizzle_mode": 4, "fill_mode": 2}[field]
        if not 0 <= int(value) < limit:
            raise ValueError(f"tensormap.replace.{field}: value {value} outside 0..{limit - 1} (sm_90a)")
        struct.pack_into("<I", raw, _COMMON, _set_bits(_u32(raw, _COMMON), field, value))
    else:
        raise NotImplementedError(f"tensormap.replace.{field} (not a field of the sm_90 tiled layout)")
    # an edited map is a tiled map of this format (a zero-filled buffer may start one, PTX ISA)
    word = _set_bits(_set_bits(_u32(raw, _COMMON), "version", _VERSION), "im2col", 0)
    struct.pack_into("<I", raw, _COMMON, word)
