"""cvt (integer, float, f16/bf16, e4m3/e5m2 pairs), cvta and mapa."""
import numpy as np
import torch

from ..errors import UnsupportedInstruction
from ..machine import NP
from ..memory import CLUSTER_RANK_SHIFT, LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW
from ..parser import type_size
from . import op, types_of

_INT_RANGE = {"u8": (0, 255), "s8": (-128, 127), "u16": (0, 65535), "s16": (-32768, 32767),
              "u32": (0, 2**32 - 1), "s32": (-2**31, 2**31 - 1), "u64": (0, 2**64 - 1), "s64": (-2**63, 2**63 - 1)}


def _numerics():
    try:
        from .. import numerics
        return numerics
    except ImportError:
        return None


def half_to_f32(raw, t):
    """f16/bf16 bits (uint16) -> float32 (exact)."""
    raw = np.asarray(raw).astype(np.uint16)
    if t == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32)


def f64_to_half(x, t, relu=False, mode="rn", satfinite=False):
    """float64 -> f16/bf16 bits, round to nearest even (other modes through numerics)."""
    x = np.asarray(x, dtype=np.float64)
    if relu:
        x = np.where(np.isnan(x), x, np.maximum(x, 0))
    nm = _numerics()
    if nm is not None and (mode != "rn" or satfinite):
        f = nm.f32_to_bf16 if t == "bf16" else nm.f32_to_f16
        return f(x.astype(np.float32), mode=mode, relu=False, satfinite=satfinite)
    if t == "f16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint16)
    # bf16: round the float64 value once, directly (no intermediate float32 rounding).
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def f32_to_fp8(x, t, relu=False):
    """cvt.rn.satfinite.{e4m3,e5m2}: RNE, finite overflow and inf saturate, NaN -> NaN."""
    nm = _numerics()
    if nm is not None and hasattr(nm, "f32_to_e4m3"):
        return (nm.f32_to_e4m3 if t == "e4m3" else nm.f32_to_e5m2)(x, relu=relu)
    x = np.asarray(x, dtype=np.float32)
    if relu:
        x = np.where(np.isnan(x), x, np.maximum(x, 0))
    lim = 448.0 if t == "e4m3" else 57344.0
    x = np.where(np.isnan(x), x, np.clip(x, -lim, lim))
    dt = torch.float8_e4m3fn if t == "e4m3" else torch.float8_e5m2
    return torch.from_numpy(np.ascontiguousarray(x)).to(dt).view(torch.uint8).numpy()


def fp8_to_f32(raw, t):
    dt = torch.float8_e4m3fn if t == "e4m3" else torch.float8_e5m2
    return torch.from_numpy(np.ascontiguousarray(raw.astype(np.uint8))).view(dt).float().numpy()


def _round_mode(ins):
    for r in ("rni", "rzi", "rmi", "rpi", "rn", "rz", "rm", "rp", "rna", "rs"):
        if r in ins.mods:
            return r
    return None


def _float_to_int(x, dt, mode):
    x = np.asarray(x, dtype=np.float64)
    f = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil, None: np.trunc}[mode]
    lo, hi = _INT_RANGE[dt]
    with np.errstate(invalid="ignore"):
        r = np.clip(f(x), lo, hi)
    r = np.where(np.isnan(x), 0, r)
    if dt == "u64":
        return np.array([int(v) for v in r], dtype=np.uint64)
    return r.astype(np.int64).astype(NP[dt])


@op("cvt")
def cvt(m, ins, idx):
    ts = types_of(ins)
    dst_t, src_t = ts[-2], ts[-1]
    mode = _round_mode(ins)
    relu = "relu" in ins.mods
    sat = "sat" in ins.mods
    d = ins.operands[0]
    # packed pairs from two f32 sources: the first source goes to the upper half
    if dst_t in ("e4m3x2", "e5m2x2", "bf16x2", "f16x2") and src_t == "f32":
        hi, lo = (m.read(o, "f32", idx) for o in ins.operands[1:3])
        if dst_t in ("e4m3x2", "e5m2x2"):
            base = dst_t[:-2]
            r = (f32_to_fp8(hi, base, relu).astype(np.uint16) << 8) | f32_to_fp8(lo, base, relu).astype(np.uint16)
            m.write(d, r, "b16", idx)
        else:
            base = dst_t[:-2]
            h = f64_to_half(hi.astype(np.float64), base, relu, mode or "rn", "satfinite" in ins.mods)
            l_ = f64_to_half(lo.astype(np.float64), base, relu, mode or "rn", "satfinite" in ins.mods)
            m.write(d, (h.astype(np.uint32) << 16) | l_.astype(np.uint32), "b32", idx)
        return
    if src_t in ("e4m3x2", "e5m2x2") and dst_t in ("f16x2", "bf16x2"):
        raw = m.read(ins.operands[1], "b16", idx)
        base = src_t[:-2]
        lo = fp8_to_f32(raw & 0xFF, base)
        hi = fp8_to_f32(raw >> 8, base)
        tb = dst_t[:-2]
        r = (f64_to_half(hi, tb, relu).astype(np.uint32) << 16) | f64_to_half(lo, tb, relu).astype(np.uint32)
        m.write(d, r, "b32", idx)
        return
    src = m.read(ins.operands[1], src_t, idx)
    if src_t in ("f16", "bf16"):
        val = half_to_f32(src, src_t)
    elif src_t in ("f32", "f64"):
        val = src
        if "ftz" in ins.mods and src_t == "f32":
            subnormal = (val != 0) & (np.abs(val) < np.float32(1.1754944e-38))
            val = np.where(subnormal, np.copysign(0, val), val).astype(np.float32)
    else:
        val = src
    if dst_t in ("f16", "bf16"):
        r = f64_to_half(np.asarray(val, dtype=np.float64), dst_t, relu, mode or "rn", "satfinite" in ins.mods)
        m.write(d, r, "b16", idx)
        return
    if dst_t in ("f32", "f64"):
        if src_t in ("f32", "f64", "f16", "bf16"):
            with np.errstate(all="ignore"):
                if mode in ("rni", "rzi", "rmi", "rpi"):   # round to integral value in float
                    val = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil}[mode](val)
                r = np.asarray(val).astype(NP[dst_t])
        else:                                             # integer -> float
            if type_size(src_t) == 8 or (dst_t == "f32" and type_size(src_t) == 4):
                nm = _numerics()
                if nm is not None and hasattr(nm, "int_to_f32") and dst_t == "f32":
                    r = nm.int_to_f32(val, mode or "rn")
                else:
                    r = np.array([float(int(v)) for v in val], dtype=np.float64).astype(NP[dst_t]) \
                        if type_size(src_t) == 8 else val.astype(np.float64).astype(NP[dst_t])
            else:
                r = val.astype(NP[dst_t])
        if sat:
            r = np.where(np.isnan(r), 0, np.clip(r, 0, 1)).astype(NP[dst_t])
        m.write(d, r, dst_t, idx)
        return
    # integer destination
    if src_t in ("f32", "f64", "f16", "bf16"):
        m.write(d, _float_to_int(val, dst_t, mode), dst_t, idx)
        return
    if sat:
        lo, hi = _INT_RANGE[dst_t]
        v = np.clip(val.astype(np.float64) if type_size(src_t) == 8 else val.astype(np.int64), lo, hi)
        m.write(d, v.astype(NP[dst_t]), dst_t, idx)
        return
    # integer -> integer: truncate, or extend by the source type's signedness
    m.write(d, val.astype(NP[dst_t]), dst_t, idx)


@op("cvta")
def cvta(m, ins, idx):
    to = "to" in ins.mods
    space = next((s for s in ("shared", "global", "param", "local", "const") if s in ins.mods), None)
    t = types_of(ins)[-1]
    a = m.read(ins.operands[1], t, idx).astype(np.uint64)
    win = {"shared": SHARED_WINDOW, "param": PARAM_WINDOW, "local": LOCAL_WINDOW}.get(space, 0)
    r = (a - np.uint64(win)) if to else (a + np.uint64(win))
    m.write(ins.operands[0], r.astype(NP[t]), t, idx)


@op("mapa")
def mapa(m, ins, idx):
    t = types_of(ins)[-1]
    a = m.read(ins.operands[1], t, idx).astype(np.uint64)
    rank = m.read(ins.operands[2], "u32", idx).astype(np.uint64)
    if "shared" not in ".".join(ins.mods):
        m.fail(UnsupportedInstruction, f"{ins.full}: only mapa.shared::cluster is implemented", idx)
    off = a & np.uint64((1 << CLUSTER_RANK_SHIFT) - 1)
    m.write(ins.operands[0], (off | ((rank + np.uint64(1)) << np.uint64(CLUSTER_RANK_SHIFT))).astype(NP[t]), t, idx)
