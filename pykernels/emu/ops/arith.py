"""Integer, bitwise, floating-point arithmetic, comparisons and moves."""
import numpy as np

from ..errors import UnsupportedInstruction
from ..machine import NP, UINT
from ..parser import type_size
from . import op, types_of

_FLOAT = ("f32", "f64")
_ROUND = ("rn", "rz", "rm", "rp")


def _ty(m, ins, idx, allowed=None):
    ts = types_of(ins)
    if not ts:
        m.fail(UnsupportedInstruction, f"{ins.full}: no type modifier", idx)
    t = ts[-1]
    if allowed and t not in allowed:
        m.fail(UnsupportedInstruction, f"{ins.full}: type .{t} not implemented", idx)
    return t


def _mode(ins):
    for r in _ROUND:
        if r in ins.mods:
            return r
    return "rn"


def _numerics():
    from .. import numerics
    return numerics


def _ftz(ins, x):
    if "ftz" in ins.mods and x.dtype == np.float32:
        sub = (x != 0) & (np.abs(x) < np.float32(1.1754944e-38))
        if sub.any():
            x = np.where(sub, np.copysign(np.float32(0), x), x).astype(np.float32)
    return x


def _sat(ins, x):
    if "sat" in ins.mods and x.dtype.kind == "f":
        x = np.where(np.isnan(x), 0, np.clip(x, 0, 1)).astype(x.dtype)
    return x


def _float_op(m, ins, idx, name, *vals):
    t = _ty(m, ins, idx)
    mode = _mode(ins)
    vals = [_ftz(ins, v) for v in vals]
    with np.errstate(all="ignore"):
        if t == "f32" and (mode != "rn" or name == "fma" or name == "div" and "approx" not in ins.mods
                           and "full" not in ins.mods):
            nm = _numerics()
            fn = {"add": nm.add_f32, "sub": nm.sub_f32, "mul": nm.mul_f32, "fma": nm.fma_f32, "div": nm.div_f32}[name]
            r = fn(*vals, mode)
        elif name == "add":
            r = vals[0] + vals[1]
        elif name == "sub":
            r = vals[0] - vals[1]
        elif name == "mul":
            r = vals[0] * vals[1]
        elif name == "fma":
            r = (vals[0].astype(np.float64) * vals[1] + vals[2]).astype(vals[0].dtype)
        elif name == "div":
            r = (vals[0].astype(np.float64) / vals[1]).astype(vals[0].dtype)
    return _sat(ins, _ftz(ins, np.asarray(r, dtype=NP[t])))


def _wide(t):
    return {"u16": "u32", "s16": "s32", "u32": "u64", "s32": "s64", "u64": "u64", "s64": "s64"}[t]


def _int_mul(a, b, t, part):
    """lo / hi / wide product of two integer arrays of type t."""
    w = type_size(t)
    signed = t.startswith("s")
    if w <= 4:
        big = (a.astype(np.int64) * b.astype(np.int64)) if signed else (a.astype(np.uint64) * b.astype(np.uint64))
        if part == "lo":
            return big.astype(NP[t])
        if part == "hi":
            return (big >> (8 * w)).astype(NP[t])
        return big.astype(NP[_wide(t)])
    # 64-bit: exact products with Python integers (rare in kernels)
    prod = [int(x) * int(y) for x, y in zip(a.tolist(), b.tolist())]
    mask = (1 << 64) - 1
    if part == "lo":
        return np.array([p & mask for p in prod], dtype=np.uint64).view(NP[t])
    return np.array([(p >> 64) & mask for p in prod], dtype=np.uint64).view(NP[t])


@op("add", "sub", "mul", "mad", "fma", "div", "rem", "min", "max", "abs", "neg", "mul24", "mad24", "sad")
def arith(m, ins, idx):
    t = _ty(m, ins, idx)
    name = ins.opcode
    srcs = [m.read(o, t, idx) for o in ins.operands[1:]]
    if t in ("f16", "bf16", "f16x2", "bf16x2"):
        return _half_arith(m, ins, idx, t, name, srcs)
    is_float = t in _FLOAT
    if name in ("min", "max"):
        a, b = srcs
        if is_float:
            r = _minmax_float(a, b, name, "NaN" in ins.mods)
        else:
            r = np.minimum(a, b) if name == "min" else np.maximum(a, b)
    elif name == "abs":
        r = np.abs(srcs[0]) if is_float else np.abs(srcs[0]).astype(NP[t])
        if is_float:
            r = _ftz(ins, r)
    elif name == "neg":
        r = _ftz(ins, -srcs[0]) if is_float else (-srcs[0].astype(np.int64)).astype(NP[t])
    elif is_float:
        if name == "mad":
            name = "fma"
        r = _float_op(m, ins, idx, name, *srcs)
    elif name in ("add", "sub"):
        if "sat" in ins.mods and t == "s32":
            wide = srcs[0].astype(np.int64) + (srcs[1] if name == "add" else -srcs[1].astype(np.int64))
            r = np.clip(wide, -2**31, 2**31 - 1).astype(np.int32)
        else:
            with np.errstate(over="ignore"):
                r = (srcs[0] + srcs[1]) if name == "add" else (srcs[0] - srcs[1])
            if "cc" in ins.mods or "c" in ins.mods:
                m.fail(UnsupportedInstruction, f"{ins.full}: carry chains are not implemented", idx)
    elif name in ("mul", "mad", "mul24", "mad24"):
        part = "hi" if "hi" in ins.mods else ("wide" if "wide" in ins.mods else "lo")
        r = _int_mul(srcs[0], srcs[1], t, part)
        if name in ("mad", "mad24"):
            add_t = _wide(t) if part == "wide" else t
            c = m.read(ins.operands[3], add_t, idx)
            with np.errstate(over="ignore"):
                r = (r + c).astype(NP[add_t])
        if part == "wide":
            m.write(ins.operands[0], r, _wide(t), idx)
            return
    elif name in ("div", "rem"):
        a, b = srcs
        if (b == 0).any():
            # PTX: division by zero gives an unspecified value; make it visible.
            b = np.where(b == 0, 1, b).astype(b.dtype)
            r = np.full(len(a), -1).astype(NP[t])
        else:
            if t.startswith("s"):
                q = np.array([_cdiv(int(x), int(y)) for x, y in zip(a.tolist(), b.tolist())], dtype=np.int64)
                r = (q if name == "div" else a.astype(np.int64) - q * b.astype(np.int64)).astype(NP[t])
            else:
                r = (a // b) if name == "div" else (a % b)
    elif name == "sad":
        a, b, c = srcs
        r = (np.abs(a.astype(np.int64) - b.astype(np.int64)) + c).astype(NP[t])
    else:
        m.fail(UnsupportedInstruction, f"{ins.full} not implemented", idx)
    m.write(ins.operands[0], r, t, idx)


def _cdiv(x, y):
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y >= 0) else -q


def _minmax_float(a, b, name, propagate_nan):
    """PTX min/max: a NaN input yields the other input (both NaN: canonical NaN); -0 < +0."""
    if propagate_nan:
        r = np.minimum(a, b) if name == "min" else np.maximum(a, b)
    else:
        r = np.fmin(a, b) if name == "min" else np.fmax(a, b)
    zero = (a == 0) & (b == 0)
    if zero.any():
        neg = np.signbit(a) | np.signbit(b) if name == "min" else np.signbit(a) & np.signbit(b)
        r = np.where(zero, np.where(neg, -0.0, 0.0).astype(a.dtype), r)
    return r.astype(a.dtype)


def _half_arith(m, ins, idx, t, name, srcs):
    from . import convert as C
    lanes = 2 if t.endswith("x2") else 1
    base = t[:-2] if lanes == 2 else t
    outs = []
    for lane in range(lanes):
        vals = []
        for s in srcs:
            raw = (s >> (16 * lane)) & 0xFFFF if lanes == 2 else s
            vals.append(C.half_to_f32(raw.astype(np.uint16), base))
        with np.errstate(all="ignore"):
            if name == "fma" or name == "mad":
                r = vals[0].astype(np.float64) * vals[1] + vals[2]
            elif name == "add":
                r = vals[0].astype(np.float64) + vals[1]
            elif name == "sub":
                r = vals[0].astype(np.float64) - vals[1]
            elif name == "mul":
                r = vals[0].astype(np.float64) * vals[1]
            elif name in ("min", "max"):
                r = _minmax_float(vals[0], vals[1], name, "NaN" in ins.mods)
            elif name == "neg":
                r = -vals[0]
            elif name == "abs":
                r = np.abs(vals[0])
            else:
                m.fail(UnsupportedInstruction, f"{ins.full} not implemented", idx)
        # f32 products of halves are exact; one rounding from f64 to the half type is the
        # correctly rounded result except in rare double-rounding cases of fma/add.
        outs.append(C.f64_to_half(np.asarray(r, dtype=np.float64), base, "relu" in ins.mods))
    r = outs[0].astype(np.uint32) | (outs[1].astype(np.uint32) << 16) if lanes == 2 else outs[0]
    m.write(ins.operands[0], r, t, idx)


@op("and", "or", "xor", "not", "cnot", "shl", "shr", "popc", "clz", "brev", "bfe", "bfi", "prmt", "lop3",
    "bfind", "fns", "shf")
def bits(m, ins, idx):
    t = _ty(m, ins, idx)
    name = ins.opcode
    if t == "pred":
        srcs = [m.read(o, "pred", idx) for o in ins.operands[1:]]
        r = {"and": lambda: srcs[0] & srcs[1], "or": lambda: srcs[0] | srcs[1],
             "xor": lambda: srcs[0] ^ srcs[1], "not": lambda: ~srcs[0]}[name]()
        m.write(ins.operands[0], r, "pred", idx)
        return
    w = type_size(t)
    ut = {1: "b8", 2: "b16", 4: "b32", 8: "b64"}[w]
    U = UINT[w]
    bitsn = 8 * w
    if name in ("and", "or", "xor"):
        a, b = (m.read(o, ut, idx) for o in ins.operands[1:3])
        r = a & b if name == "and" else (a | b if name == "or" else a ^ b)
    elif name == "not":
        r = ~m.read(ins.operands[1], ut, idx)
    elif name == "cnot":
        r = (m.read(ins.operands[1], ut, idx) == 0).astype(U)
    elif name in ("shl", "shr"):
        a = m.read(ins.operands[1], t, idx)
        s = np.minimum(m.read(ins.operands[2], "u32", idx).astype(np.uint64), bitsn)
        if name == "shl":
            r = np.where(s >= bitsn, 0, a.view(U).astype(np.uint64) << np.minimum(s, bitsn - 1)).astype(U)
        elif t.startswith("s"):
            r = (a.astype(np.int64) >> np.minimum(s, 63).astype(np.int64)).astype(NP[t])
        else:
            r = np.where(s >= bitsn, 0, a.view(U).astype(np.uint64) >> np.minimum(s, bitsn - 1)).astype(U)
    elif name == "shf":
        a = m.read(ins.operands[1], "b32", idx).astype(np.uint64)
        b = m.read(ins.operands[2], "b32", idx).astype(np.uint64)
        c = m.read(ins.operands[3], "u32", idx).astype(np.uint64)
        n = np.minimum(c, 32) if "clamp" in ins.mods else c & np.uint64(31)
        val = (b << np.uint64(32)) | a
        r = ((val << n) >> np.uint64(32)) if "l" in ins.mods else (val >> n)
        r = (r & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    elif name == "popc":
        a = m.read(ins.operands[1], ut, idx)
        r = np.array([bin(int(x)).count("1") for x in a], dtype=np.uint32)
    elif name == "clz":
        a = m.read(ins.operands[1], ut, idx)
        r = np.array([bitsn - int(x).bit_length() for x in a], dtype=np.uint32)
    elif name == "bfind":
        a = m.read(ins.operands[1], t, idx)
        vals = [int(x) if not t.startswith("s") or int(x) >= 0 else ~int(x) for x in a]
        r = np.array([(v.bit_length() - 1) if v else 0xFFFFFFFF for v in vals], dtype=np.uint32)
        if "shiftamt" in ins.mods:
            r = np.where(r == 0xFFFFFFFF, r, bitsn - 1 - r).astype(np.uint32)
    elif name == "brev":
        a = m.read(ins.operands[1], ut, idx)
        r = np.array([int(format(int(x), f"0{bitsn}b")[::-1], 2) for x in a], dtype=U)
    elif name == "bfe":
        a = m.read(ins.operands[1], t, idx)
        pos = m.read(ins.operands[2], "u32", idx).astype(np.int64) & 0xFF
        ln = m.read(ins.operands[3], "u32", idx).astype(np.int64) & 0xFF
        out = []
        for x, p, L_ in zip(a.tolist(), pos.tolist(), ln.tolist()):
            x &= (1 << bitsn) - 1
            field = (x >> min(p, bitsn - 1)) & ((1 << L_) - 1) if p < bitsn else 0
            if t.startswith("s"):
                sbit = (x >> min(p + L_ - 1, bitsn - 1)) & 1 if L_ else 0
                if sbit:
                    field |= ((1 << bitsn) - 1) & ~((1 << L_) - 1)
            out.append(field)
        r = np.array(out, dtype=np.uint64).astype(U)
    elif name == "bfi":
        f = m.read(ins.operands[1], ut, idx).astype(np.uint64)
        b = m.read(ins.operands[2], ut, idx).astype(np.uint64)
        pos = m.read(ins.operands[3], "u32", idx).astype(np.uint64) & np.uint64(0xFF)
        ln = m.read(ins.operands[4], "u32", idx).astype(np.uint64) & np.uint64(0xFF)
        mask = ((np.uint64(1) << np.minimum(ln, 63)) - np.uint64(1)) << np.minimum(pos, 63)
        r = ((b & ~mask) | ((f << np.minimum(pos, 63)) & mask)).astype(U)
    elif name == "prmt":
        a = m.read(ins.operands[1], "b32", idx).astype(np.uint64)
        b = m.read(ins.operands[2], "b32", idx).astype(np.uint64)
        c = m.read(ins.operands[3], "b32", idx).astype(np.uint64)
        if any(mm in ins.mods for mm in ("f4e", "b4e", "rc8", "ecl", "ecr", "rc16")):
            m.fail(UnsupportedInstruction, f"{ins.full}: prmt modes are not implemented", idx)
        src = (b << np.uint64(32)) | a
        r = np.zeros(len(idx), dtype=np.uint64)
        for k in range(4):
            sel = (c >> np.uint64(4 * k)) & np.uint64(0xF)
            byte = (src >> ((sel & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
            sign = np.where((byte & np.uint64(0x80)) != 0, np.uint64(0xFF), np.uint64(0))
            byte = np.where((sel & np.uint64(8)) != 0, sign, byte)
            r |= byte << np.uint64(8 * k)
        r = r.astype(np.uint32)
    elif name == "lop3":
        a, b, c = (m.read(o, "b32", idx) for o in ins.operands[1:4])
        lut = ins.operands[4].value
        r = np.zeros(len(idx), dtype=np.uint32)
        for i in range(8):
            if lut >> i & 1:
                r |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    else:
        m.fail(UnsupportedInstruction, f"{ins.full} not implemented", idx)
    out_t = "u32" if name in ("popc", "clz", "bfind") else ("b32" if name == "shf" else ut)
    if r.dtype.kind == "i":
        r = r.view(UINT[r.dtype.itemsize])
    m.write(ins.operands[0], r, out_t, idx)


_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
        "ge": np.greater_equal, "lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal}


def compare(a, b, cmp, is_float):
    if not is_float:
        return _CMP[cmp](a, b)
    nan = np.isnan(a) | np.isnan(b)
    if cmp == "num":
        return ~nan
    if cmp == "nan":
        return nan
    if cmp.endswith("u") and cmp[:-1] in _CMP:
        return _CMP[cmp[:-1]](a, b) | nan
    return _CMP[cmp](a, b) & ~nan


@op("setp", "set")
def setp(m, ins, idx):
    t = _ty(m, ins, idx)
    cmp = ins.mods[0]
    combine = ins.mods[1] if len(ins.mods) > 1 and ins.mods[1] in ("and", "or", "xor") else None
    a, b = (m.read(o, t, idx) for o in ins.operands[1:3])
    if t in ("f16", "bf16"):
        from . import convert as C
        a, b = C.half_to_f32(a, t), C.half_to_f32(b, t)
    with np.errstate(invalid="ignore"):
        r = compare(a, b, cmp, t in _FLOAT + ("f16", "bf16"))
    dst = ins.operands[0]
    if combine:
        c = m.read(ins.operands[3], "pred", idx)
        f = {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[combine]
        r_p, r_q = f(r, c), f(~r, c)
    else:
        r_p, r_q = r, ~r
    if ins.opcode == "set":
        dt = ins.mods[-2] if len(ins.mods) > 2 else "u32"
        if dt == "f32":
            val = np.where(r_p, np.float32(1.0), np.float32(0.0))
        else:
            val = np.where(r_p, 0xFFFFFFFF, 0).astype(np.uint32)
        m.write(dst, val, "f32" if dt == "f32" else "u32", idx)
        return
    if dst.kind == "vec":
        m.write(dst.value[0], r_p, "pred", idx)
        m.write(dst.value[1], r_q, "pred", idx)
    else:
        m.write(dst, r_p, "pred", idx)


@op("selp", "slct")
def selp(m, ins, idx):
    t = _ty(m, ins, idx)
    a, b = (m.read(o, t, idx) for o in ins.operands[1:3])
    if ins.opcode == "selp":
        c = m.read(ins.operands[3], "pred", idx)
    else:
        ct = types_of(ins)[-1]
        c = m.read(ins.operands[3], ct, idx) >= 0
    m.write(ins.operands[0], np.where(c, a, b), t, idx)


@op("mov")
def mov(m, ins, idx):
    t = _ty(m, ins, idx)
    dst, src = ins.operands[0], ins.operands[1]
    w = type_size(t) if t != "pred" else 0
    if src.kind == "vec":        # pack: first element in the low bits
        parts = src.value
        pw = w // len(parts)
        r = np.zeros(len(idx), dtype=np.uint64)
        for k, p in enumerate(parts):
            r |= m.read(p, {1: "b8", 2: "b16", 4: "b32"}[pw], idx).astype(np.uint64) << np.uint64(8 * pw * k)
        m.write(dst, r.astype(UINT[w]), {2: "b16", 4: "b32", 8: "b64"}[w], idx)
        return
    if dst.kind == "vec":        # unpack
        parts = dst.value
        pw = w // len(parts)
        v = m.read(src, {2: "b16", 4: "b32", 8: "b64"}[w], idx).astype(np.uint64)
        for k, p in enumerate(parts):
            m.write(p, ((v >> np.uint64(8 * pw * k)) & np.uint64((1 << (8 * pw)) - 1)).astype(UINT[pw]),
                    {1: "b8", 2: "b16", 4: "b32"}[pw], idx)
        return
    m.write(dst, m.read(src, t, idx), t, idx)


_TRANSC = {"ex2": "ex2_approx", "lg2": "lg2_approx", "sin": "sin_approx", "cos": "cos_approx",
           "tanh": "tanh_approx", "rsqrt": "rsqrt_approx"}


@op("ex2", "lg2", "sin", "cos", "tanh", "rcp", "sqrt", "rsqrt")
def transcendental(m, ins, idx):
    t = _ty(m, ins, idx)
    x = _ftz(ins, m.read(ins.operands[1], t, idx))
    if t in ("f16", "bf16", "f16x2", "bf16x2"):
        m.fail(UnsupportedInstruction, f"{ins.full}: half-precision transcendentals are not implemented", idx)
    xd = x.astype(np.float64)
    with np.errstate(all="ignore"):
        f = {"ex2": np.exp2, "lg2": np.log2, "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
             "rcp": lambda v: 1.0 / v, "sqrt": np.sqrt, "rsqrt": lambda v: 1.0 / np.sqrt(v)}[ins.opcode]
        r = f(xd)
    # approx forms: the hardware is within a few ulp; the emulator rounds the exact value
    # (documented in docs/emulator.md). rn forms: f64 then one rounding is correct here.
    m.write(ins.operands[0], _ftz(ins, r.astype(NP[t])), t, idx)


@op("copysign")
def copysign(m, ins, idx):
    t = _ty(m, ins, idx)
    a, b = (m.read(o, t, idx) for o in ins.operands[1:3])
    m.write(ins.operands[0], np.copysign(b, a), t, idx)


@op("testp")
def testp(m, ins, idx):
    t = _ty(m, ins, idx)
    x = m.read(ins.operands[1], t, idx)
    kind = ins.mods[0]
    r = {"finite": np.isfinite(x), "infinite": np.isinf(x), "number": ~np.isnan(x), "notanumber": np.isnan(x),
         "normal": np.isfinite(x) & (np.abs(x) >= np.finfo(x.dtype).tiny),
         "subnormal": (x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny)}[kind]
    m.write(ins.operands[0], r, "pred", idx)
