"""Hopper (sm_90a) data layouts used by the PTX emulator, as pure numpy index maps.

Nothing here knows about the executor: every function maps *positions* (thread,
register, row, column, byte address) to other positions, returned as int64
numpy arrays, so the emulator can gather/scatter with fancy indexing.

Sources of truth: the PTX ISA (wgmma "Register fragments" figures, "Matrix
Descriptor" and "Shared Memory Matrix Layout"/"Strides" sections, ldmatrix /
stmatrix fragment figures).  tests/emu/test_hopper_layouts.py cross-checks the
wgmma and descriptor parts against CuTe's SM90 GMMA traits compiled on the host.

Conventions
-----------
* Warpgroup thread ``t`` in 0..127, warp ``w = t // 32``, lane ``l = t % 32``.
* Accumulator tile D is 64 x N (row = M index, col = N index).
* Shared-memory operands are described as (mn, k) element grids; "K-major"
  means consecutive K elements are contiguous in memory ("MN-major": consecutive
  M/N elements are contiguous).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "wgmma_d_coords",
    "wgmma_d_coords_f16",
    "wgmma_a_reg_coords",
    "decode_desc",
    "encode_desc",
    "SWIZZLE_MODES",
    "LAYOUT_TYPE_TO_SWIZZLE",
    "SWIZZLE_TO_LAYOUT_TYPE",
    "swizzle",
    "swizzle_atom_bytes",
    "operand_byte_offsets",
    "ldmatrix_coords",
    "stmatrix_coords",
]


# ---------------------------------------------------------------------------
# wgmma register fragments
# ---------------------------------------------------------------------------

def wgmma_d_coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Accumulator (D/C) fragment of ``wgmma.mma_async.m64nNk*`` with 32-bit accumulators.

    Args:
        n: the instruction's N, a multiple of 8 in [8, 256].

    Returns:
        ``(rows, cols)``: int64 arrays of shape ``[128, n // 2]``; entry ``[t, i]``
        is the (m, n) position in the 64 x n tile held by register ``d_i`` of
        warpgroup thread ``t``.

    Each warp owns 16 rows; within a warp the pattern is the mma.m16n8 C
    fragment repeated every 8 columns (4 registers per 8-column block):
    row = 16*w + l//4 + 8*((i>>1)&1), col = 8*(i>>2) + 2*(l%4) + (i&1).
    """
    if n % 8 or not 8 <= n <= 256:
        raise ValueError(f"wgmma N must be a multiple of 8 in [8, 256], got {n}")
    t = np.arange(128, dtype=np.int64)[:, None]
    i = np.arange(n // 2, dtype=np.int64)[None, :]
    w, l = t // 32, t % 32
    rows = 16 * w + l // 4 + 8 * ((i >> 1) & 1)
    cols = 8 * (i >> 2) + 2 * (l % 4) + (i & 1)
    rows, cols = np.broadcast_arrays(rows, cols)
    return rows.copy(), cols.copy()


def wgmma_d_coords_f16(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Accumulator fragment for ``.f16`` accumulators (two f16 packed per .b32 register).

    Returns:
        ``(rows, cols)``: int64 arrays of shape ``[128, n // 4, 2]``; ``[t, r, h]``
        is the (m, n) of half ``h`` (0 = low 16 bits) of 32-bit register ``d_r``.

    The element layout is the same as for f32 accumulators; element ``2r + h``
    of the f32 numbering goes into register ``r`` (low half first), i.e. each
    register holds the two column-adjacent elements (col, col+1) of one row.
    """
    rows, cols = wgmma_d_coords(n)
    return rows.reshape(128, n // 4, 2), cols.reshape(128, n // 4, 2)


def wgmma_a_reg_coords(elem_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A operand fragment when A is in registers (``wgmma ... {a0..a3}, descB``).

    Args:
        elem_bits: 16 (f16/bf16, instruction K = 16) or 8 (e4m3/e5m2, K = 32).

    Returns:
        ``(rows, cols)``: int64 arrays of shape ``[128, 8]`` (16-bit) or
        ``[128, 16]`` (8-bit). Element ``e`` of thread ``t`` lives in .b32
        register ``e // (32 // elem_bits)`` at sub-position
        ``e % (32 // elem_bits)`` (lowest bits first); the value is its (m, k)
        in the 64 x K tile.

    Both follow the same scheme: a register holds ``p = 32 // elem_bits``
    K-consecutive elements; registers cycle (row g, row g+8, row g with
    K + 4p, row g+8 with K + 4p), with g = 16*w + l//4 and K base p*(l%4).
    """
    if elem_bits not in (8, 16):
        raise ValueError(f"elem_bits must be 8 or 16, got {elem_bits}")
    p = 32 // elem_bits  # elements per .b32 register
    t = np.arange(128, dtype=np.int64)[:, None]
    e = np.arange(4 * p, dtype=np.int64)[None, :]
    w, l = t // 32, t % 32
    reg, sub = e // p, e % p
    rows = 16 * w + l // 4 + 8 * (reg & 1)
    cols = p * (l % 4) + sub + 4 * p * (reg >> 1)
    rows, cols = np.broadcast_arrays(rows, cols)
    return rows.copy(), cols.copy()


# ---------------------------------------------------------------------------
# Shared-memory matrix descriptor
# ---------------------------------------------------------------------------

# Descriptor "layout type" field (bits 62-63) -> swizzle mode name.
LAYOUT_TYPE_TO_SWIZZLE = {0: "none", 1: "128B", 2: "64B", 3: "32B"}
SWIZZLE_TO_LAYOUT_TYPE = {v: k for k, v in LAYOUT_TYPE_TO_SWIZZLE.items()}
# Swizzle mode -> number of XOR-ed bits B (CuTe Swizzle<B, 4, 3>).
SWIZZLE_MODES = {"none": 0, "32B": 1, "64B": 2, "128B": 3}

_MASK14 = (1 << 14) - 1


def decode_desc(d: int) -> dict:
    """Decode a 64-bit wgmma shared-memory matrix descriptor.

    Returns a dict with byte quantities (the encoded fields drop the 4 LSBs):
        start_address (bits 0-13, <<4), leading_byte_offset (bits 16-29, <<4),
        stride_byte_offset (bits 32-45, <<4), base_offset (bits 49-51, raw),
        layout_type (bits 62-63, raw) and swizzle ("none"/"128B"/"64B"/"32B").
    """
    d = int(d) & ((1 << 64) - 1)
    lt = (d >> 62) & 3
    return {
        "start_address": (d & _MASK14) << 4,
        "leading_byte_offset": ((d >> 16) & _MASK14) << 4,
        "stride_byte_offset": ((d >> 32) & _MASK14) << 4,
        "base_offset": (d >> 49) & 7,
        "layout_type": lt,
        "swizzle": LAYOUT_TYPE_TO_SWIZZLE[lt],
    }


def encode_desc(start_address: int, leading_byte_offset: int, stride_byte_offset: int,
                base_offset: int = 0, swizzle: str | int = "none", **_ignored) -> int:
    """Inverse of :func:`decode_desc`; byte quantities must be multiples of 16.

    ``swizzle`` is a mode name or the raw layout-type value (0..3). Extra keys
    (e.g. ``layout_type`` from a decoded dict) are ignored so that
    ``encode_desc(**decode_desc(d)) == d`` for every valid descriptor.
    """
    lt = SWIZZLE_TO_LAYOUT_TYPE[swizzle] if isinstance(swizzle, str) else int(swizzle)
    for name, v in (("start_address", start_address), ("leading_byte_offset", leading_byte_offset),
                    ("stride_byte_offset", stride_byte_offset)):
        if v % 16 or not 0 <= v >> 4 <= _MASK14:
            raise ValueError(f"{name}={v} must be a multiple of 16 below 2**18")
    if not 0 <= base_offset <= 7 or not 0 <= lt <= 3:
        raise ValueError("base_offset must be in 0..7 and layout type in 0..3")
    return ((start_address >> 4) | ((leading_byte_offset >> 4) << 16)
            | ((stride_byte_offset >> 4) << 32) | (base_offset << 49) | (lt << 62))


# ---------------------------------------------------------------------------
# Swizzle
# ---------------------------------------------------------------------------

def swizzle(addr, mode: str):
    """Hopper shared-memory swizzle of byte addresses (TMA / wgmma / CuTe Swizzle<B,4,3>).

    Args:
        addr: int or int array of byte addresses.
        mode: "none", "32B", "64B" or "128B" (B = 0, 1, 2, 3).

    Returns:
        same shape: ``addr ^ ((addr >> 3) & (((1 << B) - 1) << 4))``, i.e. the
        16-byte-chunk index bits [4, 4+B) are XOR-ed with the row bits [7, 7+B).
        It is an involution (bits [7, 7+B) are unchanged).
    """
    b = SWIZZLE_MODES[mode]
    a = np.asarray(addr, dtype=np.int64)
    out = a ^ ((a >> 3) & (((1 << b) - 1) << 4))
    return int(out) if np.ndim(addr) == 0 and not isinstance(addr, np.ndarray) else out


def swizzle_atom_bytes(mode: str) -> int:
    """Row width of the swizzle atom in bytes: 16 (none: one core-matrix row), 32, 64, 128."""
    return 16 << SWIZZLE_MODES[mode]


# ---------------------------------------------------------------------------
# wgmma shared-memory operand addressing
# ---------------------------------------------------------------------------

def operand_byte_offsets(desc: int, rows: int, k_elems: int, elem_bytes: int,
                         major: str = "K") -> np.ndarray:
    """Shared-memory byte address of every element of a wgmma A or B operand.

    Args:
        desc: 64-bit matrix descriptor (start, LBO, SBO, layout type).
        rows: M extent (64 for A) or N extent (B).
        k_elems: K extent in elements (one instruction: 32 bytes' worth).
        elem_bytes: 1 (e4m3/e5m2/s8), 2 (f16/bf16), 4 (tf32).
        major: "K" (K contiguous) or "MN" (M/N contiguous, "transposed").

    Returns:
        int64 array ``[rows, k_elems]`` of absolute (swizzled) byte addresses.

    Canonical layouts, with W = swizzle atom width / 16 (1 for no swizzle),
    r = row, mb = r*elem_bytes, kb = k*elem_bytes (bytes), before swizzling:

    * K-major, no swizzle: 8x16B core matrices; (r%8)*16 + (kb%16)
      + (r//8)*SBO + (kb//16)*LBO.
    * K-major, swizzled: atom = 8 rows x 16W bytes; (r%8)*16W + kb + (r//8)*SBO.
      LBO is not used, so K must fit in the atom (kb < 16W); kernels step K
      inside a wider atom by advancing the start address by 32 bytes.
    * MN-major, no swizzle: core matrix = 8 K-rows x 16B of MN; (mb%16)
      + (k%8)*16 + (mb//16)*SBO + (k//8)*LBO.
    * MN-major, swizzled: atom = 8 K-rows x 16W bytes of MN; (mb%16W)
      + (k%8)*16W + (mb//16W)*LBO + (k//8)*SBO.

    The swizzle is then applied to the full address (start + offset): the
    pattern is a function of absolute address bits [4, 10), which is what makes
    "start + 32 B inside a 128B atom" work.  base_offset is ignored: it only
    matters when an atom is not aligned to its repeat (8 rows x 16W bytes), a
    case this model expresses by the absolute-address swizzle instead.
    """
    f = decode_desc(desc)
    mode = f["swizzle"]
    lbo, sbo = f["leading_byte_offset"], f["stride_byte_offset"]
    eb = int(elem_bytes)
    r = np.arange(rows, dtype=np.int64)[:, None]
    k = np.arange(k_elems, dtype=np.int64)[None, :]
    atom = swizzle_atom_bytes(mode)
    if major == "K":
        kb = k * eb
        if mode == "none":
            off = (r % 8) * 16 + (r // 8) * sbo + kb % 16 + (kb // 16) * lbo
        else:
            if k_elems * eb > atom:
                raise ValueError(f"K extent {k_elems * eb} B exceeds the {mode} swizzle atom "
                                 f"({atom} B); LBO is unused for swizzled K-major layouts")
            off = (r % 8) * atom + (r // 8) * sbo + kb
    elif major == "MN":
        mb = r * eb
        if mode == "none":
            off = mb % 16 + (mb // 16) * sbo + (k % 8) * 16 + (k // 8) * lbo
        else:
            off = mb % atom + (mb // atom) * lbo + (k % 8) * atom + (k // 8) * sbo
    else:
        raise ValueError(f"major must be 'K' or 'MN', got {major!r}")
    return swizzle(f["start_address"] + off, mode)


# ---------------------------------------------------------------------------
# ldmatrix / stmatrix (m8n8, b16)
# ---------------------------------------------------------------------------

def ldmatrix_coords(num: int, trans: bool = False) -> dict:
    """Fragment map of ``ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16``.

    Each of the ``num`` 8x8 b16 matrices is stored as 8 rows of 16 contiguous
    bytes; row ``r`` of matrix ``j`` is read from the address held by lane
    ``8*j + r`` (lanes beyond 8*num supply ignored addresses).

    Returns a dict:
        ``addr_lane``: int64 ``[num, 8]``, the lane giving the address of
            (matrix j, stored row r).
        ``mat``, ``row``, ``col``: int64 ``[32, num, 2]``; for lane ``l``,
            destination register ``j`` (one .b32 per matrix) and half ``h``
            (0 = low 16 bits), the stored element (matrix, row, b16 column
            within the 16-byte row) it receives.

    Without .trans lane l gets row l//4, columns 2*(l%4)+h; with .trans it gets
    the transposed element: stored row 2*(l%4)+h, column l//4.
    """
    if num not in (1, 2, 4):
        raise ValueError(f"num must be 1, 2 or 4, got {num}")
    addr_lane = (8 * np.arange(num, dtype=np.int64)[:, None]
                 + np.arange(8, dtype=np.int64)[None, :])
    l = np.arange(32, dtype=np.int64)[:, None, None]
    j = np.arange(num, dtype=np.int64)[None, :, None]
    h = np.arange(2, dtype=np.int64)[None, None, :]
    shape = (32, num, 2)
    g, c = l // 4, 2 * (l % 4) + h
    row, col = (c, g) if trans else (g, c)
    return {
        "addr_lane": addr_lane,
        "mat": np.broadcast_to(j, shape).copy(),
        "row": np.broadcast_to(row, shape).copy(),
        "col": np.broadcast_to(col, shape).copy(),
    }


def stmatrix_coords(num: int, trans: bool = False) -> dict:
    """Fragment map of ``stmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16``.

    Same map as :func:`ldmatrix_coords`, with the direction reversed: lane
    ``8*j + r`` supplies the address where stored row r of matrix j is written,
    and source register j half h of lane l is written to (mat, row, col).
    """
    return ldmatrix_coords(num, trans)
