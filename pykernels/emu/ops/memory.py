"""ld / st / atom / red / prefetch over the global, shared, param, local and generic spaces."""
import numpy as np

from ..errors import MemoryFault, UnsupportedInstruction
from ..machine import NP
from ..memory import SHARED_WINDOW, WINDOW_SPAN
from ..parser import type_size
from . import op, types_of

_SPACES = ("shared::cluster", "shared::cta", "shared", "global", "param", "local", "const")
_MEM_NP = dict(NP, f16=np.uint16, bf16=np.uint16)


def space_of(ins):
    for s in _SPACES:
        if s in ins.mods:
            return "shared::cta" if s == "shared" else s
    for mod in ins.mods:
        if mod.startswith("param"):
            return "param"
    return ""


def _vec(ins):
    for v in ("v2", "v4", "v8"):
        if v in ins.mods:
            return int(v[1])
    return 1


def _mem_operand(ins):
    return next(o for o in ins.operands if o.kind == "mem")


@op("ld", "ldu")
def ld(m, ins, idx):
    t = types_of(ins)[-1]
    space = space_of(ins)
    addr = m.address(_mem_operand(ins), idx, space)
    dt = _MEM_NP[t]
    size = type_size(t)
    dst = ins.operands[0]
    dsts = dst.value if dst.kind == "vec" else [dst]
    if len(dsts) != _vec(ins):
        m.fail(UnsupportedInstruction, f"{ins.full}: {len(dsts)} destinations for .v{_vec(ins)}", idx)
    if len(dsts) > 1 and (addr % np.uint64(size * len(dsts))).any():
        m.fail(MemoryFault, f"misaligned {size * len(dsts)}-byte vector access", idx)
    span = size * len(dsts)     # a vector access is one access for the bank model
    for k, d in enumerate(dsts):
        v = m.load(space, addr + np.uint64(k * size), dt, idx, span if k == 0 else 0)
        if d.kind != "sink":
            m.write(d, v, t, idx)


@op("st")
def st(m, ins, idx):
    t = types_of(ins)[-1]
    space = space_of(ins)
    addr = m.address(ins.operands[0], idx, space)
    src = ins.operands[1]
    srcs = src.value if src.kind == "vec" else [src]
    size = type_size(t)
    if len(srcs) > 1 and (addr % np.uint64(size * len(srcs))).any():
        m.fail(MemoryFault, f"misaligned {size * len(srcs)}-byte vector access", idx)
    for k, s in enumerate(srcs):
        m.store(space, addr + np.uint64(k * size), m.read(s, t, idx), _MEM_NP[t], idx,
                size * len(srcs) if k == 0 else 0)


@op("prefetch", "prefetchu", "applypriority", "discard", "createpolicy")
def prefetch(m, ins, idx):
    if ins.opcode == "createpolicy":
        m.write(ins.operands[0], np.zeros(len(idx), dtype=np.uint64), "b64", idx)
    # cache hints: no architectural effect


_ATOM_OPS = ("add", "min", "max", "inc", "dec", "and", "or", "xor", "exch", "cas")


@op("atom", "red")
def atom(m, ins, idx):
    t = types_of(ins)[-1]
    kind = next((o for o in ins.mods if o in _ATOM_OPS), None)
    if kind is None or t in ("f16", "bf16", "f16x2", "bf16x2") or "v2" in ins.mods or "v4" in ins.mods:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented", idx)
    space = space_of(ins)
    operands = ins.operands if ins.opcode == "atom" else [None] + ins.operands
    addr = m.address(operands[1], idx, space)
    if space == "":
        in_shared = (addr >= np.uint64(SHARED_WINDOW)) & (addr < np.uint64(SHARED_WINDOW + WINDOW_SPAN))
        if in_shared.all():
            space, addr = "shared::cta", addr - np.uint64(SHARED_WINDOW)
        elif in_shared.any():
            m.fail(UnsupportedInstruction, f"{ins.full}: generic atomics mixing shared and global", idx)
        else:
            space = "global"
    b = m.read(operands[2], t, idx)
    c = m.read(operands[3], t, idx) if kind == "cas" else None
    dt = NP[t]
    size = np.dtype(dt).itemsize
    if space == "global":
        parts = m.L.gmem.index_of(addr, dt, m.where(idx))
        view_of = np.empty(len(idx), dtype=np.int64)       # which part each thread's address is in
        for p, (sel, _, _) in enumerate(parts):
            view_of[sel] = p
        views = [v for _, v, _ in parts]
        el = parts[0][2]
        m.L.stats.global_read += size * len(idx)
        m.L.stats.global_written += size * len(idx)
    elif space.startswith("shared"):
        flat = m._shared_index(addr, idx, size, space == "shared::cluster")
        if m.order:
            m.order.atomic(flat, size, idx)
        views, el = [m.shared.view(dt)], flat // size
        view_of = np.zeros(len(idx), dtype=np.int64)
    else:
        m.fail(UnsupportedInstruction, f"{ins.full}: atomics on .{space}", idx)
    m.state_version += 1
    old = np.empty(len(idx), dtype=dt)
    # Sequential in thread order: one valid serialisation of the concurrent atomics.
    with np.errstate(over="ignore"):
        for j in range(len(idx)):
            e = el[j]
            view = views[view_of[j]]
            cur = view[e]
            old[j] = cur
            v = b[j]
            if kind == "add":
                new = cur + v
            elif kind == "min":
                new = min(cur, v) if dt != np.float32 else np.fmin(cur, v)
            elif kind == "max":
                new = max(cur, v) if dt != np.float32 else np.fmax(cur, v)
            elif kind == "inc":
                new = 0 if cur >= v else cur + 1
            elif kind == "dec":
                new = v if (cur == 0 or cur > v) else cur - 1
            elif kind == "and":
                new = cur & v
            elif kind == "or":
                new = cur | v
            elif kind == "xor":
                new = cur ^ v
            elif kind == "exch":
                new = v
            else:
                new = c[j] if cur == v else cur
            view[e] = new
    if ins.opcode == "atom":
        m.write(ins.operands[0], old, t, idx)
