"""wgmma: fence, mma_async (m64nNk16 f16/bf16, m64nNk32 e4m3/e5m2, m64nNk8 tf32; f32 or
f16 accumulators; A from shared memory or registers), commit_group, wait_group.

Warpgroup-collective (.sync.aligned): the 128 threads of a warpgroup run each of these
together; a warp that arrives early waits for the other three.

Asynchrony is modelled: mma_async only records the operation (descriptors, register
names, scale-d); it runs when a wait_group retires its group — reading shared memory
and the accumulators then, as the hardware may. So a kernel that overwrites an
operand's shared memory before the wait computes a wrong result, as it could on the
GPU; and reading or writing an accumulator (or A) register between mma_async and the
wait_group that covers it is reported as the bug it is.

Arithmetic: products of the operand values are exact in float64, the K-sum of one
instruction is added to the accumulator in float64 and rounded to the accumulator type
once per instruction. Hopper's reduced-precision fp8 accumulation inside the tensor
core is not modelled (tests compare with tolerances that cover it).
"""
import functools

import numpy as np
import torch

from ..errors import EmuError, MemoryFault, UnsupportedInstruction
from ..hopper import layouts
from . import op

_ELEM = {"e4m3": 1, "e5m2": 1, "bf16": 2, "f16": 2, "tf32": 4}
_K = {1: 32, 2: 16, 4: 8}


@functools.lru_cache(maxsize=None)
def _lut(kind):
    codes = torch.arange(256, dtype=torch.uint8)
    dt = torch.float8_e4m3fn if kind == "e4m3" else torch.float8_e5m2
    return codes.view(dt).double().numpy()


def _values(raw, kind):
    """Operand bits (uint8 / uint16 / uint32 arrays) -> float64 values."""
    if kind in ("e4m3", "e5m2"):
        return _lut(kind)[raw]
    if kind == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if kind == "f16":
        return raw.view(np.float16).astype(np.float64)
    return (raw & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)    # tf32


@functools.lru_cache(maxsize=4096)
def _offsets(desc, rows, k, eb, major):
    a = layouts.operand_byte_offsets(desc, rows, k, eb, major)
    a.setflags(write=False)
    return a


def _state(m, g):
    st = m.ext.setdefault("wgmma", {})
    return st.setdefault(g, {"uncommitted": [], "groups": [], "guarded": set()})


def whole_warpgroups(m, ins, idx):
    """Warpgroups (thread index arrays in warpgroup order) complete at this instruction;
    threads of a partial warpgroup wait here for the rest."""
    arrivals = m.ext.setdefault("wg_arrivals", {})
    pc = int(m.pc[idx[0]]) - 1
    gid = m.cta[idx] * 8 + m.lin[idx] // 128
    ready = []
    for g in np.unique(gid):
        who = idx[gid == g]
        prev = arrivals.pop((int(g), pc), None)
        if prev is not None:
            m.unblock(prev)
            who = np.concatenate([prev, who])
        if len(who) == 128:
            ready.append((int(g), who[np.argsort(m.lin[who])]))
        else:
            if len(who) > 128:
                m.fail(EmuError, f"{ins.opcode}: more than 128 threads of one warpgroup", idx)
            arrivals[(int(g), pc)] = who
            m.block(who, f"{ins.full}: waits for the other warps of its warpgroup "
                         f"({len(who)} of 128 threads here)")
    return ready


def _uniform(m, vals, name, idx):
    if (vals != vals[0]).any():
        m.fail(EmuError, f"wgmma: {name} differs between the threads of the warpgroup", idx)
    return int(vals[0])


def _reg_names(m, operand, idx):
    ops = operand.value if operand.kind == "vec" else [operand]
    if any(o.kind != "reg" for o in ops):
        m.fail(EmuError, "wgmma: fragments must be registers", idx)
    return [o.value for o in ops]


@op("wgmma")
def wgmma(m, ins, idx):
    kind = ins.mods[0]
    groups = whole_warpgroups(m, ins, idx)
    for g, threads in groups:
        if kind == "fence":
            continue
        if kind == "mma_async":
            _issue(m, ins, g, threads)
        elif kind == "commit_group":
            st = _state(m, g)
            st["groups"].append(st["uncommitted"])
            st["uncommitted"] = []
        elif kind == "wait_group":
            n = ins.operands[0].value
            st = _state(m, g)
            while len(st["groups"]) > n:
                for rec in st["groups"].pop(0):
                    _execute(m, rec)
                    if m.order:
                        m.order.wgmma_retired(rec, threads)
            _reguard(m, g, st, threads)
        else:
            m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator", threads)


def _issue(m, ins, g, threads):
    shape = next(x for x in ins.mods if x.startswith("m64n"))
    n = int(shape[4:shape.index("k")])
    k = int(shape[shape.index("k") + 1:])
    dtype, atype, btype = ins.mods[-3:]
    if dtype not in ("f32", "f16") or atype not in _ELEM or btype not in _ELEM:
        m.fail(UnsupportedInstruction, f"{ins.full}: only f32/f16 accumulators with f16/bf16/tf32/e4m3/e5m2 "
                                       "operands are implemented", threads)
    eb = _ELEM[atype]
    if _K[eb] != k or n % 8 or not 8 <= n <= 256:
        m.fail(EmuError, f"{ins.full}: invalid shape for .{atype}", threads)
    ops = ins.operands
    d_regs = _reg_names(m, ops[0], threads)
    want = n // 2 if dtype == "f32" else n // 4
    if len(d_regs) != want:
        m.fail(EmuError, f"{ins.full}: {len(d_regs)} accumulator registers, the shape needs {want}", threads)
    a_in_regs = ops[1].kind == "vec"
    rest = ops[3:]
    nimm = len(rest) - 1
    expect = (2 if eb == 1 else (3 if a_in_regs else 4))
    if nimm != expect:
        m.fail(EmuError, f"{ins.full}: expected {expect} immediates after scale-d, got {nimm}", threads)
    scale_d = m.read(rest[0], "pred", threads) if rest[0].kind == "reg" else np.full(128, bool(rest[0].value))
    imms = [o.value for o in rest[1:]]
    for v in imms[:2]:
        if v not in (1, -1):
            m.fail(EmuError, f"{ins.full}: imm-scale must be 1 or -1, got {v}", threads)
    trans_a = (imms[2] if not a_in_regs and eb == 2 else 0)
    trans_b = (imms[-1] if eb == 2 else 0)
    if eb != 2 and (len(imms) > 2):
        m.fail(EmuError, f"{ins.full}: transpose immediates exist only for f16/bf16", threads)
    rec = {"ins": ins, "threads": threads, "cta": int(m.cta[threads[0]]), "n": n, "k": k, "dtype": dtype,
           "atype": atype, "btype": btype, "d": d_regs, "neg_a": imms[0] == -1, "neg_b": imms[1] == -1,
           "trans_a": bool(trans_a), "trans_b": bool(trans_b),
           "scale_d": _uniform(m, scale_d.astype(np.int64), "scale-d", threads),
           "desc_b": _uniform(m, m.read(ops[2], "u64", threads), "the B descriptor", threads)}
    if a_in_regs:
        rec["a_regs"] = _reg_names(m, ops[1], threads)
        if len(rec["a_regs"]) != 4:
            m.fail(EmuError, f"{ins.full}: A in registers takes 4 registers", threads)
    else:
        rec["desc_a"] = _uniform(m, m.read(ops[1], "u64", threads), "the A descriptor", threads)
    st = _state(m, g)
    st["uncommitted"].append(rec)
    if m.order:
        m.order.wgmma_issue(rec)
    m.L.stats.wgmma += 1
    _reguard(m, g, st, threads)


def _reguard(m, g, st, threads):
    """Accumulator and A registers of pending operations may not be touched."""
    pending = st["uncommitted"] + [r for grp in st["groups"] for r in grp]
    names = {r for rec in pending for r in rec["d"] + rec.get("a_regs", [])}
    for r in st["guarded"] - names:
        mask = m.guard.get(r)
        if mask is not None:
            mask[threads] = False
            if not mask.any():
                del m.guard[r]
    for r in names:
        mask = m.guard.setdefault(r, np.zeros(m.T, dtype=bool))
        mask[threads] = True
    st["guarded"] = names


def _smem_operand(m, rec, desc, rows, kind, trans):
    eb = _ELEM[kind]
    addr = _offsets(desc, rows, rec["k"], eb, "MN" if trans else "K")
    size = m.shared.size
    if (addr < 0).any() or (addr + eb > size).any():
        m.fail(MemoryFault, f"wgmma operand descriptor {desc:#x} reaches outside the {size}-byte shared memory "
                            f"(CTA {rec['cta']})", rec["threads"])
    flat = addr + rec["cta"] * size
    if eb == 1:
        raw = m.shared.data[flat]
    else:
        raw = m.shared.view(np.uint16 if eb == 2 else np.uint32)[flat // eb]
    return _values(raw, kind)


def _execute(m, rec):
    threads, n = rec["threads"], rec["n"]
    if "a_regs" in rec:
        eb = _ELEM[rec["atype"]]
        words = np.stack([m.regs[r][threads] for r in rec["a_regs"]], axis=1).astype(np.uint32)
        sub = words.view(np.uint8 if eb == 1 else np.uint16).reshape(128, -1)
        rows, cols = layouts.wgmma_a_reg_coords(8 * eb)
        a = np.zeros((64, rec["k"]))
        a[rows, cols] = _values(sub, rec["atype"])
    else:
        a = _smem_operand(m, rec, rec["desc_a"], 64, rec["atype"], rec["trans_a"])
    b = _smem_operand(m, rec, rec["desc_b"], n, rec["btype"], rec["trans_b"])
    if rec["neg_a"]:
        a = -a
    if rec["neg_b"]:
        b = -b
    with np.errstate(invalid="ignore", over="ignore"):
        prod = a @ b.T
    regs = rec["d"]
    raw = np.stack([m.regs[r][threads] for r in regs], axis=1)
    if rec["dtype"] == "f32":
        rows, cols = layouts.wgmma_d_coords(n)
        acc = raw.view(np.float32).astype(np.float64)
    else:
        rows, cols = layouts.wgmma_d_coords_f16(n)
        acc = raw.astype(np.uint32).view(np.uint16).reshape(128, -1, 2).view(np.float16).astype(np.float64)
    if rec["scale_d"]:
        with np.errstate(invalid="ignore", over="ignore"):
            out = acc + prod[rows, cols]
    else:
        out = prod[rows, cols]
    if rec["dtype"] == "f32":
        new = out.astype(np.float32).view(np.uint32)
    else:
        new = out.astype(np.float16).view(np.uint16).reshape(128, -1, 2)
        new = new[..., 0].astype(np.uint32) | (new[..., 1].astype(np.uint32) << 16)
    for j, r in enumerate(regs):
        m.regs[r][threads] = new[:, j]
