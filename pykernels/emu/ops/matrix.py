"""Warp-collective matrix loads and stores between shared memory and registers:
``ldmatrix`` / ``stmatrix`` ``.sync.aligned.m8n8.{x1,x2,x4}{.trans}{.shared{::cta}}.b16``.

Semantics (PTX ISA, "ldmatrix" / "stmatrix"): the warp moves ``num`` 8x8 matrices of
16-bit elements. Each matrix row is 16 contiguous bytes in shared memory at an address
supplied by one lane: lanes 0-7 give the rows of matrix 0, 8-15 of matrix 1, 16-23 of
matrix 2, 24-31 of matrix 3 (``.x1`` uses lanes 0-7, ``.x2`` lanes 0-15; the other
lanes' addresses are ignored). Register j (.b32) of lane l holds matrix j's elements
(row l/4, columns 2*(l%4) and 2*(l%4)+1), the lower column in the low half; with
``.trans`` each matrix is transposed: (rows 2*(l%4), 2*(l%4)+1, column l/4). stmatrix
is the same map in the other direction. The map is ``hopper.layouts.ldmatrix_coords``.

Checks: every row address must be 16-byte aligned (MemoryFault naming the lane that
supplied it); without a state space the address is generic and must fall in the
shared window; the instructions are ``.aligned``, so all 32 threads of each warp must
execute them together (a warp that arrives partly -- diverged, guarded off, exited --
is an EmuError naming the instruction). Other shapes and types (m16n16, m8n16, m16n8,
.b8) are reported as unsupported.

Shared accesses go through ``machine.load/store`` one matrix at a time (one wavefront
of 8 rows x 16 bytes per warp), so bounds checks and bank-conflict statistics apply.
"""
import numpy as np

from ..errors import EmuError, MemoryFault, UnsupportedInstruction
from ..hopper.layouts import ldmatrix_coords, stmatrix_coords
from ..memory import SHARED_WINDOW, WINDOW_SPAN
from . import op

_NUMS = {"x1": 1, "x2": 2, "x4": 4}
_SPACES = ("shared", "shared::cta")
_ROW_BYTES = 16


def _form(m, ins, idx):
    """(num, trans, space) of an ldmatrix/stmatrix; the modifiers may come in any order
    (CUTLASS writes `.x4.m8n8`, the ISA `.m8n8.x4`)."""
    mods = list(ins.mods)
    known = {"sync", "aligned", "m8n8", "trans", "b16", *_NUMS, *_SPACES}
    unknown = [x for x in mods if x not in known]
    if unknown or "m8n8" not in mods or "b16" not in mods:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator "
                                       "(only .m8n8 .b16 ldmatrix/stmatrix are)", idx)
    if "sync" not in mods or "aligned" not in mods:
        m.fail(EmuError, f"{ins.full}: .sync and .aligned are mandatory", idx)
    nums = [_NUMS[x] for x in mods if x in _NUMS]
    if len(nums) != 1:
        m.fail(EmuError, f"{ins.full}: exactly one of .x1 .x2 .x4 is required", idx)
    space = "shared::cta" if any(x in _SPACES for x in mods) else ""
    return nums[0], "trans" in mods, space


def _full_warps(m, ins, idx):
    """Lane-indexed thread table [warps, 32] of the executing warps; every warp must be
    complete (the instruction is .aligned)."""
    warps, inv, counts = np.unique(m.warp[idx], return_inverse=True, return_counts=True)
    if (counts != 32).any():
        k = int(np.flatnonzero(counts != 32)[0])
        first = idx[inv == k]
        m.fail(EmuError, f"{ins.full} is .aligned: all 32 threads of a warp must execute it together, "
                         f"but only {int(counts[k])} threads of this warp do (the others diverged, are "
                         "guarded off, have exited, or the block size is not a multiple of 32)", first)
    table = np.empty((len(warps), 32), dtype=np.int64)
    table[inv, m.lane[idx].astype(np.int64)] = idx
    return table, inv


def _row_addresses(m, ins, idx, space, inv, nwarps):
    """Per-warp row addresses [warps, 32] (state-space offsets in .shared::cta)."""
    mem = next(o for o in ins.operands if o.kind == "mem")
    addr = m.address(mem, idx, space or "shared::cta").astype(np.uint64)
    table = np.empty((nwarps, 32), dtype=np.uint64)
    table[inv, m.lane[idx].astype(np.int64)] = addr
    return table


def _check_rows(m, ins, addrs, threads, space):
    """addrs/threads: [k] row addresses and the lanes that gave them. Returns shared::cta
    offsets after the generic-window and 16-byte alignment checks."""
    if space == "":
        inside = (addrs >= np.uint64(SHARED_WINDOW)) & (addrs < np.uint64(SHARED_WINDOW + WINDOW_SPAN))
        if not inside.all():
            j = int(np.flatnonzero(~inside)[0])
            m.fail(MemoryFault, f"{ins.opcode}: generic row address {int(addrs[j]):#x} is not in shared "
                                "memory (the ISA leaves that undefined)", threads[j:j + 1])
        addrs = addrs - np.uint64(SHARED_WINDOW)
    bad = (addrs % np.uint64(_ROW_BYTES)) != 0
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        m.fail(MemoryFault, f"{ins.opcode}: misaligned row address {int(addrs[j]):#x}: each 16-byte row of "
                            "an 8x8 .b16 matrix must be 16-byte aligned", threads[j:j + 1])
    return addrs


def _regs(m, ins, k, num, idx):
    r = ins.operands[k]
    regs = r.value if r.kind == "vec" else [r]
    if len(regs) != num:
        m.fail(EmuError, f"{ins.full}: {len(regs)} registers given, .x{num} takes {num}", idx)
    return regs


def _matrix_words(m, offs, threads):
    """Load rows: offs/threads [warps, 8] -> uint32 words [warps, 8 rows, 4]."""
    a = (offs[:, :, None] + np.arange(0, _ROW_BYTES, 4, dtype=np.uint64)).reshape(-1)
    t = np.repeat(threads.reshape(-1), 4)
    return m.load("shared::cta", a, np.uint32, t).reshape(offs.shape[0], 8, 4)


@op("ldmatrix")
def ldmatrix(m, ins, idx):
    num, trans, space = _form(m, ins, idx)
    dsts = _regs(m, ins, 0, num, idx)
    table, inv = _full_warps(m, ins, idx)
    addr = _row_addresses(m, ins, idx, space, inv, len(table))
    c = ldmatrix_coords(num, trans)
    nw = len(table)
    mats = np.empty((nw, num, 8, 8), dtype=np.uint16)     # [warp, matrix, stored row, column]
    for j in range(num):
        lanes = c["addr_lane"][j]
        thr = table[:, lanes]
        offs = _check_rows(m, ins, addr[:, lanes].reshape(-1), thr.reshape(-1), space).reshape(nw, 8)
        mats[:, j] = _matrix_words(m, offs, thr).view(np.uint16).reshape(nw, 8, 8)
    # value [warp, lane, reg, half] = mats[warp, mat, row, col]
    halves = mats[:, c["mat"], c["row"], c["col"]]          # [warps, 32, num, 2]
    words = halves[..., 0].astype(np.uint32) | (halves[..., 1].astype(np.uint32) << np.uint32(16))
    lane = m.lane[idx].astype(np.int64)
    for j, d in enumerate(dsts):
        m.write(d, words[inv, lane, j], "b32", idx)


@op("stmatrix")
def stmatrix(m, ins, idx):
    num, trans, space = _form(m, ins, idx)
    srcs = _regs(m, ins, 1, num, idx)
    table, inv = _full_warps(m, ins, idx)
    addr = _row_addresses(m, ins, idx, space, inv, len(table))
    c = stmatrix_coords(num, trans)
    nw = len(table)
    lane = m.lane[idx].astype(np.int64)
    regs = np.empty((nw, 32, num), dtype=np.uint32)
    for j, s in enumerate(srcs):
        regs[inv, lane, j] = m.read(s, "b32", idx)
    halves = np.stack([regs & np.uint32(0xFFFF), regs >> np.uint32(16)], axis=-1).astype(np.uint16)
    mats = np.empty((nw, num, 8, 8), dtype=np.uint16)
    mats[:, c["mat"], c["row"], c["col"]] = halves           # every element written exactly once
    for j in range(num):
        lanes = c["addr_lane"][j]
        thr = table[:, lanes]
        offs = _check_rows(m, ins, addr[:, lanes].reshape(-1), thr.reshape(-1), space).reshape(nw, 8)
        a = (offs[:, :, None] + np.arange(0, _ROW_BYTES, 4, dtype=np.uint64)).reshape(-1)
        t = np.repeat(thr.reshape(-1), 4)
        words = np.ascontiguousarray(mats[:, j]).view(np.uint32).reshape(-1)
        m.store("shared::cta", a, words, np.uint32, t)
