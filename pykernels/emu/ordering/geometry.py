"""The shared-memory bytes an asynchronous operation reads or writes, as flat indices
into the machine's shared memory (CTA * size + offset), from the same layout functions
the instruction handlers use."""
import numpy as np

from ..hopper.layouts import swizzle
from ..ops import bulk_copy, wgmma


def expand(starts, width: int):
    """Byte indices of `width`-byte elements starting at `starts` (flat int64)."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if width == 1:
        return starts
    return (starts[:, None] + np.arange(width, dtype=np.int64)).reshape(-1)


def tma_box(m, img, coord, cta, offset):
    """Bytes of the tensor-map box at `coord` placed at shared `offset` of CTA `cta`."""
    _, _, soff = bulk_copy._box(img, coord)
    shared = swizzle(offset + soff, bulk_copy._SWIZZLE_NAME[img.swizzle])
    return expand(cta * m.shared.size + shared, img.elem_bytes)


def wgmma_operands(m, rec):
    """Bytes a wgmma.mma_async reads from shared memory (A unless in registers, and B)."""
    base = rec["cta"] * m.shared.size
    parts = []
    for which, rows, kind, trans in (("desc_a", 64, rec["atype"], rec["trans_a"]),
                                     ("desc_b", rec["n"], rec["btype"], rec["trans_b"])):
        if which in rec:
            eb = wgmma._ELEM[kind]
            addr = wgmma._offsets(rec[which], rows, rec["k"], eb, "MN" if trans else "K").reshape(-1)
            addr = addr[(addr >= 0) & (addr + eb <= m.shared.size)]    # the handler reports the rest
            parts.append(expand(base + addr, eb))
    return np.unique(np.concatenate(parts))
