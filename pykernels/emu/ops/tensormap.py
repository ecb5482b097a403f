"""Device-side tensor-map edits: `tensormap.replace.tile.<field>` on a map in shared or
global memory (fields and value encodings of the PTX ISA, layout of
hopper/tensormap.py) and `tensormap.cp_fenceproxy` (a warp copies a 128-byte map from
shared to global memory, with a release fence the emulator needs no action for: every
store is visible at once). The fences and prefetches of the tensormap proxy
(`fence.proxy.tensormap::generic`, `prefetch.tensormap`) are ordering / cache hints,
handled with the other fences and prefetches. A map edited here is read and checked
by the TMA instruction that uses it.
"""
import numpy as np

from ..errors import EmuError, MemoryFault, UnsupportedInstruction
from ..hopper.tensormap import IMAGE_BYTES, REPLACE_FIELDS, replace
from . import op
from .memory import space_of

_ALIGN = 64      # a CUtensorMap object is 64-byte aligned (driver API)


def _map_bytes(m, space, addr, t):
    words = m.load(space, np.uint64(addr) + np.arange(0, IMAGE_BYTES, 8, dtype=np.uint64), np.uint64,
                   np.full(IMAGE_BYTES // 8, t, dtype=np.int64))
    return bytearray(words.tobytes())


def _store_map(m, space, addr, raw, t):
    m.store(space, np.uint64(addr) + np.arange(0, IMAGE_BYTES, 8, dtype=np.uint64),
            np.frombuffer(bytes(raw), dtype=np.uint64), np.uint64, np.full(IMAGE_BYTES // 8, t, dtype=np.int64))


def _checked_address(m, ins, addr, t, what):
    if addr % _ALIGN:
        m.fail(MemoryFault, f"{ins.full}: {what} tensor map at {addr:#x} is not {_ALIGN}-byte aligned", np.array([t]))
    return addr


@op("tensormap")
def tensormap(m, ins, idx):
    mods = ins.mods
    if "replace" in mods:
        return _replace(m, ins, idx)
    if "cp_fenceproxy" in mods:
        return _copy_fenceproxy(m, ins, idx)
    m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator", idx)


def _replace(m, ins, idx):
    if "tile" not in ins.mods:
        m.fail(UnsupportedInstruction, f"{ins.full}: only .tile tensor maps can be edited", idx)
    field = next((f for f in REPLACE_FIELDS if f in ins.mods), None)
    if field is None:
        m.fail(UnsupportedInstruction, f"{ins.full}: unknown tensor-map field", idx)
    space = space_of(ins)
    mem, *rest = ins.operands
    wide = "b64" in ins.mods
    value = m.read(rest[-1], "b64" if wide else "b32", idx).astype(np.int64)
    ordinal = m.read(rest[0], "b32", idx).astype(np.int64) if len(rest) == 2 else None
    addrs = m.address(mem, idx, space)
    for j, t in enumerate(idx.tolist()):
        a = _checked_address(m, ins, int(addrs[j]), t, "the")
        raw = _map_bytes(m, space, a, t)
        try:
            replace(raw, field, int(value[j]) & ((1 << 64) - 1 if wide else 0xFFFFFFFF),
                    None if ordinal is None else int(ordinal[j]))
        except NotImplementedError as e:
            m.fail(UnsupportedInstruction, f"{ins.full}: {e}", idx[j:j + 1])
        except ValueError as e:
            m.fail(EmuError, f"{ins.full}: {e}", idx[j:j + 1])
        _store_map(m, space, a, raw, t)


def _copy_fenceproxy(m, ins, idx):
    """tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.<scope>.sync.aligned
    [dst], [src], 128: the warp (converged, convergence.py) copies the map once."""
    dst_op, src_op, size_op = ins.operands
    if size_op.kind != "imm" or size_op.value != IMAGE_BYTES:
        m.fail(EmuError, f"{ins.full}: the size must be {IMAGE_BYTES}", idx)
    dst = m.address(dst_op, idx, "global")
    src = m.address(src_op, idx, "shared::cta")
    for d, s in sorted({(int(a), int(b)) for a, b in zip(dst.tolist(), src.tolist())}):
        t = int(idx[(dst == d) & (src == s)][0])
        _checked_address(m, ins, d, t, "the destination")
        _store_map(m, "global", d, _map_bytes(m, "shared::cta", s, t), t)
