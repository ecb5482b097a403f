"""Bit-exact PTX floating-point semantics on numpy arrays.

Every function is vectorised: inputs are numpy arrays (or scalars) of any
broadcast-compatible shape and the result has the broadcast shape.  f32
operands are ``float32`` arrays; 16/8-bit formats travel as raw bits
(``uint16`` / ``uint8``).

Rounding modes for floating results are ``"rn"`` (nearest, ties to even),
``"rz"`` (toward zero), ``"rm"`` (toward -inf) and ``"rp"`` (toward +inf);
float->int conversions use ``"rni" | "rzi" | "rmi" | "rpi"``.

Strategy: an f32 operation is evaluated in float64 as an *exact* unevaluated
sum ``hi + lo`` (``hi = fl64(exact)``, ``|lo| <= ulp64(hi)/2``) using the
error-free transformations TwoSum / TwoProd, and ``hi + lo`` is then rounded
once to the target format by :func:`_round_mag`.  This avoids the double
rounding that ``np.float32(a + b)`` suffers when ``hi`` lands exactly on a
target midpoint while ``lo != 0``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "round_to_f32", "add_f32", "sub_f32", "mul_f32", "fma_f32", "div_f32",
    "rcp_f32", "rcp_rn", "sqrt_f32", "sqrt_rn",
    "f32_to_bf16", "bf16_to_f32", "f32_to_f16", "f16_to_f32",
    "f32_to_e4m3", "f32_to_e5m2", "e4m3_to_f32", "e5m2_to_f32",
    "f32_to_int", "int_to_f32", "min_f32", "max_f32",
    "ex2_approx", "lg2_approx", "rcp_approx", "sqrt_approx", "rsqrt_approx",
    "sin_approx", "cos_approx", "tanh_approx",
]

MODES = ("rn", "rz", "rm", "rp")
F32_MAX = float(np.finfo(np.float32).max)
F32_MIN_NORMAL = 2.0 ** -126
CANONICAL_NAN_F32 = np.uint32(0x7FFFFFFF)
CANONICAL_NAN_16 = 0x7FFF          # f16 and bf16 canonical NaN bits
FP8_NAN = 0x7F                     # PTX canonical NaN for e4m3 and e5m2


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"rounding mode must be one of {MODES}, got {mode!r}")


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------
# error-free transformations (float64)
# --------------------------------------------------------------------------

def _two_sum(a: np.ndarray, b: np.ndarray):
    """Knuth TwoSum: s + e == a + b exactly, s = fl64(a + b) (float64 arrays)."""
    # inf - inf legitimately yields NaN here; callers pass non-finite hi through.
    with np.errstate(invalid="ignore"):
        s = a + b
        bb = s - a
        e = (a - (s - bb)) + (b - bb)
    return s, e


def _split(a: np.ndarray):
    """Dekker split of float64 ``a`` into two 26-bit halves, a == h + l."""
    c = a * 134217729.0  # 2**27 + 1
    h = c - (c - a)
    return h, a - h


def _two_prod(a: np.ndarray, b: np.ndarray):
    """Dekker TwoProd without fma: p + e == a * b exactly (no over/underflow)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


# --------------------------------------------------------------------------
# core rounding
# --------------------------------------------------------------------------

def _round_mag(hi: np.ndarray, lo: np.ndarray, mode: str, prec: int, emin: int):
    """Round |hi + lo| onto a binary grid with ``prec`` significand bits and
    minimum normal exponent ``emin`` (unbounded above).

    hi, lo: float64 arrays, hi finite, |lo| <= ulp64(hi)/2, hi == 0 => lo == 0.
    Returns (mag float64 >= 0, neg bool): the rounded magnitude (exactly
    representable in the target format apart from overflow) and the sign.
    Directed modes are resolved with the sign, so rm/rp act on magnitude as
    "away"/"toward zero" depending on ``neg``.
    """
    neg = np.signbit(hi)
    m = np.abs(hi)
    d = np.where(neg, -lo, lo)  # lo relative to the magnitude's direction
    # If the exact value is just below m, step m down one float64 ulp so the
    # exact magnitude is m + delta with 0 <= delta < ulp64(m); then only
    # "delta > 0" (the sticky bit) is needed below.  delta == 0 after a step
    # down happens only when m is a power of two and the exact value is its
    # float64 predecessor (53 one bits), which is never a grid point or
    # midpoint of a <= 24-bit format, so "d != 0" is a valid sticky bit.
    m = np.where(d < 0, np.nextafter(m, 0.0), m)
    sticky = d != 0.0
    _, ex = np.frexp(m)                           # m = f * 2**ex, f in [0.5, 1)
    q = np.maximum(ex - 1, emin) - (prec - 1)     # exponent of the target ulp
    scaled = np.ldexp(m, -q)                      # exact: power-of-two scaling
    n = np.floor(scaled)
    r = scaled - n                                # exact fraction of an ulp
    if mode == "rn":
        odd = np.fmod(n, 2.0) == 1.0
        inc = (r > 0.5) | ((r == 0.5) & (sticky | odd))
    elif mode == "rz":
        inc = np.zeros_like(sticky)
    else:
        away = ~neg if mode == "rp" else neg
        inc = away & ((r > 0.0) | sticky)
    mag = np.ldexp(n + inc, q)
    return mag, neg


def _overflow(mag: np.ndarray, neg: np.ndarray, mode: str, max_finite: float):
    """Apply IEEE overflow for a bounded format: rn -> inf, rz -> max,
    rm/rp -> inf on the side they round toward, else max (float64 arrays)."""
    if mode == "rn":
        to_inf = np.ones_like(neg)
    elif mode == "rz":
        to_inf = np.zeros_like(neg)
    else:
        to_inf = ~neg if mode == "rp" else neg
    over = mag > max_finite
    return np.where(over, np.where(to_inf, np.inf, max_finite), mag)


def round_to_f32(hi, lo, mode: str = "rn") -> np.ndarray:
    """Correctly round the exact value ``hi + lo`` to float32.

    hi, lo: float64 arrays (broadcast) with hi = fl64(exact) and
    |lo| <= ulp64(hi)/2, as produced by TwoSum/TwoProd.  Handles f32
    subnormal results, overflow per mode and NaN/inf passthrough of ``hi``.
    A zero ``hi`` keeps its sign; an underflow to zero keeps the sign of hi.
    Returns a float32 array.
    """
    _check_mode(mode)
    hi, lo = np.broadcast_arrays(_f64(hi), _f64(lo))
    finite = np.isfinite(hi)
    h = np.where(finite, hi, 0.0)
    l = np.where(finite & np.isfinite(lo), lo, 0.0)
    mag, neg = _round_mag(h, l, mode, 24, -126)
    mag = _overflow(mag, neg, mode, F32_MAX)
    res = np.where(neg, -mag, mag)
    res = np.where(finite, res, hi)
    return res.astype(np.float32)


# --------------------------------------------------------------------------
# f32 arithmetic
# --------------------------------------------------------------------------

def _flush(x: np.ndarray) -> np.ndarray:
    """.ftz: replace f32 subnormals with sign-preserving zero (float32 in/out)."""
    x = np.asarray(x, dtype=np.float32)
    sub = (np.abs(x) < np.float32(F32_MIN_NORMAL)) & (x != 0)
    return np.where(sub, np.copysign(np.float32(0.0), x), x).astype(np.float32)


def _finish(res: np.ndarray, ftz: bool, sat: bool) -> np.ndarray:
    """Apply output .ftz (flush after rounding) and .sat ([0,1], NaN -> +0)."""
    if ftz:
        res = _flush(res)
    if sat:
        # -0 and NaN become +0: NaN fails both comparisons, so the
        # where() picks 0 for it.
        res = np.where(res > 0, np.minimum(res, np.float32(1.0)), np.float32(0.0))
    return np.asarray(res, dtype=np.float32)


def _add_exact(x: np.ndarray, y: np.ndarray, mode: str) -> np.ndarray:
    """Round x + y (float64 arrays, each exactly an f32 or an exact f32
    product) to f32, with IEEE signed-zero rules for exact zero sums."""
    s, e = _two_sum(x, y)
    res = round_to_f32(s, e, mode)
    if mode == "rm":
        # An exact zero sum is -0 under round-toward-minus, unless both
        # operands are +0 (numpy's RN sum already gets every other case).
        both_pos_zero = (x == 0) & (y == 0) & ~np.signbit(x) & ~np.signbit(y)
        zero = (s == 0) & ~both_pos_zero
        res = np.where(zero, np.float32(-0.0), res).astype(np.float32)
    return res


def add_f32(a, b, mode: str = "rn", ftz: bool = False, sat: bool = False):
    """PTX ``add{.rnd}{.ftz}{.sat}.f32``: float32 arrays -> float32 array."""
    _check_mode(mode)
    if ftz:
        a, b = _flush(a), _flush(b)
    res = _add_exact(_f64(np.asarray(a, np.float32)), _f64(np.asarray(b, np.float32)), mode)
    return _finish(res, ftz, sat)


def sub_f32(a, b, mode: str = "rn", ftz: bool = False, sat: bool = False):
    """PTX ``sub{.rnd}{.ftz}{.sat}.f32`` = a + (-b): float32 -> float32."""
    return add_f32(a, -np.asarray(b, np.float32), mode, ftz, sat)


def mul_f32(a, b, mode: str = "rn", ftz: bool = False, sat: bool = False):
    """PTX ``mul{.rnd}{.ftz}{.sat}.f32``: float32 arrays -> float32 array.

    The 48-bit product of two f32 values is exact in float64 (exponents stay
    well inside float64 range), so lo = 0.
    """
    _check_mode(mode)
    if ftz:
        a, b = _flush(a), _flush(b)
    with np.errstate(invalid="ignore"):  # 0 * inf -> NaN is the IEEE answer
        p = _f64(np.asarray(a, np.float32)) * _f64(np.asarray(b, np.float32))
    return _finish(round_to_f32(p, 0.0, mode), ftz, sat)


def fma_f32(a, b, c, mode: str = "rn", ftz: bool = False, sat: bool = False):
    """PTX ``fma.rnd{.ftz}{.sat}.f32``: a*b+c with a single rounding.

    float32 arrays -> float32 array.  a*b is exact in float64, and TwoSum
    makes the addition exact as hi + lo before the final rounding.
    """
    _check_mode(mode)
    if ftz:
        a, b, c = _flush(a), _flush(b), _flush(c)
    with np.errstate(invalid="ignore"):
        p = _f64(np.asarray(a, np.float32)) * _f64(np.asarray(b, np.float32))
    res = _add_exact(p, _f64(np.asarray(c, np.float32)), mode)
    return _finish(res, ftz, sat)


def div_f32(a, b, mode: str = "rn", ftz: bool = False, sat: bool = False):
    """PTX ``div.rnd{.ftz}{.sat}.f32`` (IEEE, correctly rounded).

    float32 arrays -> float32 array.  q = fl64(a/b); the sign of the exact
    residual a - q*b (TwoProd, all in float64, no fma needed) tells on which
    side of q the true quotient lies; lo = residual / b carries that sign
    with |lo| < ulp64(q)/2, which is all :func:`round_to_f32` needs.
    (For f32 operands an inexact f64 quotient can never sit on an f32 grid
    point or midpoint, so the residual only matters in principle; it is kept
    so the rounding is provably exact rather than relying on that argument.)
    """
    _check_mode(mode)
    if ftz:
        a, b = _flush(a), _flush(b)
    a64 = _f64(np.asarray(a, np.float32))
    b64 = _f64(np.asarray(b, np.float32))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = a64 / b64
        p, e = _two_prod(q, b64)
        r = (a64 - p) - e           # a - p is exact (Sterbenz); one rounding keeps sign
        lo = r / b64
    ok = np.isfinite(q) & (q != 0) & np.isfinite(b64) & np.isfinite(lo)
    lo = np.where(ok, lo, 0.0)
    return _finish(round_to_f32(q, lo, mode), ftz, sat)


def rcp_f32(x, mode: str = "rn", ftz: bool = False):
    """PTX ``rcp.rnd{.ftz}.f32``: correctly rounded 1/x (float32 -> float32)."""
    return div_f32(np.ones_like(np.asarray(x, np.float32)), x, mode, ftz)


def rcp_rn(x, ftz: bool = False):
    """``rcp.rn.f32``: correctly rounded reciprocal, float32 -> float32."""
    return rcp_f32(x, "rn", ftz)


def sqrt_f32(x, mode: str = "rn", ftz: bool = False):
    """PTX ``sqrt.rnd{.ftz}.f32``: correctly rounded sqrt, float32 -> float32.

    s = fl64(sqrt(x)); the sign of the exact residual x - s*s (TwoProd)
    places the true root relative to s.  sqrt(-0) = -0, negatives -> NaN.
    """
    _check_mode(mode)
    x = np.asarray(x, np.float32)
    if ftz:
        x = _flush(x)
    x64 = _f64(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(x64)
        p, e = _two_prod(s, s)
        r = (x64 - p) - e
        lo = r / (2.0 * s)
    ok = np.isfinite(s) & (s != 0) & np.isfinite(lo)
    lo = np.where(ok, lo, 0.0)
    res = round_to_f32(s, lo, mode)
    return _finish(res, ftz, False)


def sqrt_rn(x, ftz: bool = False):
    """``sqrt.rn.f32``: correctly rounded square root, float32 -> float32."""
    return sqrt_f32(x, "rn", ftz)


# --------------------------------------------------------------------------
# conversions (cvt)
# --------------------------------------------------------------------------

def _encode(mag: np.ndarray, prec: int, emin: int) -> np.ndarray:
    """Bits (int64, no sign) of a finite magnitude exactly representable in a
    format with ``prec`` significand bits (implicit one included), minimum
    normal exponent ``emin`` and bias ``1 - emin``."""
    _, ex = np.frexp(mag)
    # frexp(0) reports exponent 0; zero must encode with the minimum exponent.
    e = np.where(mag == 0, emin, np.maximum(ex - 1, emin))
    sig = np.ldexp(mag, -(e - (prec - 1))).astype(np.int64)   # < 2**prec
    # For normals sig carries the implicit bit, which lands as +1 in the
    # biased exponent field; subnormals (e == emin, sig < 2**(prec-1)) get 0.
    return ((e - emin).astype(np.int64) << (prec - 1)) + sig


def _decode(bits: np.ndarray, prec: int, emin: int) -> np.ndarray:
    """Inverse of :func:`_encode` for finite bit patterns (no sign): float64."""
    bits = np.asarray(bits, np.int64)
    field = bits >> (prec - 1)
    frac = bits & ((1 << (prec - 1)) - 1)
    sig = np.where(field > 0, frac + (1 << (prec - 1)), frac)
    e = np.maximum(field + emin - 1, emin)
    return np.ldexp(sig.astype(np.float64), e - (prec - 1))


def _cvt_small(x, mode, relu, satfinite, prec, emin, max_finite, inf_bits,
               nan_bits, total_bits):
    """Shared f32 -> narrow float conversion returning sign|magnitude bits.

    inf_bits None means the format has no infinity (always saturates).
    """
    _check_mode(mode)
    x64 = _f64(np.asarray(x, np.float32))
    nan = np.isnan(x64)
    inf = np.isinf(x64)
    h = np.where(nan | inf, 0.0, x64)
    mag, neg = _round_mag(h, np.zeros_like(h), mode, prec, emin)
    if satfinite or inf_bits is None:
        # .satfinite: anything beyond MAX_NORM (including inf) -> +-MAX_NORM.
        mag = np.minimum(mag, max_finite)
        mag = np.where(inf, max_finite, mag)
    else:
        mag = _overflow(mag, neg, mode, max_finite)
        mag = np.where(inf, np.inf, mag)
    neg = np.signbit(x64)
    finite = np.isfinite(mag)
    body = _encode(np.where(finite, mag, 0.0), prec, emin)
    if inf_bits is not None:
        body = np.where(finite, body, inf_bits)
    out = body | np.where(neg, 1 << (total_bits - 1), 0)
    if relu:
        # .relu clamps negative results (and -0) to +0.
        out = np.where(neg, 0, out)
    out = np.where(nan, nan_bits, out)
    return out


def f32_to_bf16(x, mode: str = "rn", relu: bool = False, satfinite: bool = False):
    """PTX ``cvt.rnd{.relu}{.satfinite}.bf16.f32``: float32 -> uint16 bits.

    NaN -> canonical 0x7FFF.  Without .satfinite overflow follows IEEE rules
    for the mode; with it, +-inf and overflow give +-MAX (0x7F7F).
    """
    out = _cvt_small(x, mode, relu, satfinite, 8, -126,
                     (2.0 - 2.0 ** -7) * 2.0 ** 127, 0x7F80, CANONICAL_NAN_16, 16)
    return out.astype(np.uint16)


def bf16_to_f32(bits) -> np.ndarray:
    """bf16 bits (uint16) -> float32 (exact: bf16 is the top half of f32)."""
    b = np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)
    return b.view(np.float32)


def f32_to_f16(x, mode: str = "rn", relu: bool = False, satfinite: bool = False):
    """PTX ``cvt.rnd{.relu}{.satfinite}.f16.f32``: float32 -> uint16 bits.

    NaN -> canonical 0x7FFF; subnormal f16 results supported (2**-24 min).
    """
    out = _cvt_small(x, mode, relu, satfinite, 11, -14, 65504.0, 0x7C00,
                     CANONICAL_NAN_16, 16)
    return out.astype(np.uint16)


def f16_to_f32(bits) -> np.ndarray:
    """f16 bits (uint16) -> float32 (exact widening)."""
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def f32_to_e4m3(x, relu: bool = False) -> np.ndarray:
    """PTX ``cvt.rn.satfinite{.relu}.e4m3x2.f32`` per element: float32 -> uint8.

    RNE; |x| > 448 (and inf) saturate to +-448 (0x7E/0xFE); NaN -> 0x7F;
    min subnormal 2**-9.
    """
    out = _cvt_small(x, "rn", relu, True, 4, -6, 448.0, None, FP8_NAN, 8)
    return out.astype(np.uint8)


def f32_to_e5m2(x, relu: bool = False) -> np.ndarray:
    """PTX ``cvt.rn.satfinite{.relu}.e5m2x2.f32`` per element: float32 -> uint8.

    RNE; |x| > 57344 (and inf) saturate to +-57344 (0x7B/0xFB); NaN -> 0x7F;
    min subnormal 2**-16.
    """
    out = _cvt_small(x, "rn", relu, True, 3, -14, 57344.0, 0x7C, FP8_NAN, 8)
    return out.astype(np.uint8)


def e4m3_to_f32(bits) -> np.ndarray:
    """e4m3 bits (uint8) -> float32, exact.  No infinities; 0x7F/0xFF are NaN."""
    b = np.asarray(bits, np.uint8).astype(np.int64)
    mag = _decode(b & 0x7F, 4, -6)
    val = np.where(b & 0x80, -mag, mag)
    val = np.where((b & 0x7F) == 0x7F, np.nan, val)
    return val.astype(np.float32)


def e5m2_to_f32(bits) -> np.ndarray:
    """e5m2 bits (uint8) -> float32, exact.  e5m2 is the top byte of an f16
    (same exponent width and bias), so inf/NaN come out naturally."""
    b = np.asarray(bits, np.uint8).astype(np.uint16) << np.uint16(8)
    return f16_to_f32(b)


_INT_RANGES = {
    "s8": (np.int8, -2 ** 7, 2 ** 7 - 1), "u8": (np.uint8, 0, 2 ** 8 - 1),
    "s16": (np.int16, -2 ** 15, 2 ** 15 - 1), "u16": (np.uint16, 0, 2 ** 16 - 1),
    "s32": (np.int32, -2 ** 31, 2 ** 31 - 1), "u32": (np.uint32, 0, 2 ** 32 - 1),
    "s64": (np.int64, -2 ** 63, 2 ** 63 - 1), "u64": (np.uint64, 0, 2 ** 64 - 1),
}
_INT_ROUND = {"rni": np.rint, "rzi": np.trunc, "rmi": np.floor, "rpi": np.ceil}


def f32_to_int(x, dst: str = "s32", mode: str = "rzi", sat: bool = True,
               ftz: bool = False) -> np.ndarray:
    """PTX ``cvt.irnd{.sat}.dst.f32``: float32 -> integer array of ``dst`` type.

    Float-to-int conversions always saturate in PTX (``sat`` is accepted for
    symmetry and ignored); NaN -> 0.  Rounding is done in float64, which is
    exact for f32 inputs, and np.rint is round-half-even.
    """
    dtype, lo, hi = _INT_RANGES[dst]
    x = np.asarray(x, np.float32)
    if ftz:
        x = _flush(x)
    v = _INT_ROUND[mode](_f64(x))
    # Bounds compared in float64: lo and hi + 1 are powers of two (or 0) and
    # hence exact, so "v >= hi + 1" is the exact overflow test even for u64.
    over = v >= float(hi + 1)
    under = v <= float(lo)
    nan = np.isnan(v)
    safe = np.where(over | under | nan, 0.0, v)
    out = safe.astype(dtype)
    out = np.where(over, dtype(hi), out)
    out = np.where(under, dtype(lo), out)
    out = np.where(nan, dtype(0), out)
    return out.astype(dtype)


def int_to_f32(x, mode: str = "rn") -> np.ndarray:
    """PTX ``cvt.rnd.f32.{s,u}{8..64}``: integer array -> float32, correctly
    rounded.  x = a*2**32 + b with both parts exact in float64; TwoSum turns
    that into the exact hi + lo pair for the single rounding."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError("int_to_f32 expects an integer array")
    if x.dtype.kind == "u":
        x = x.astype(np.uint64)
        a = (x >> np.uint64(32)).astype(np.float64)
        b = (x & np.uint64(0xFFFFFFFF)).astype(np.float64)
    else:
        x = x.astype(np.int64)
        a = (x >> 32).astype(np.float64)          # arithmetic shift, floor
        b = (x & 0xFFFFFFFF).astype(np.float64)   # non-negative low word
    hi, lo = _two_sum(a * 4294967296.0, b)
    return round_to_f32(hi, lo, mode)


# --------------------------------------------------------------------------
# min / max
# --------------------------------------------------------------------------

def _minmax(a, b, want_max: bool, nan: bool) -> np.ndarray:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    a, b = np.broadcast_arrays(a, b)
    # Order with -0 < +0: compare values, break the zero tie by sign bit.
    a_less = (a < b) | ((a == b) & np.signbit(a) & ~np.signbit(b))
    pick_a = ~a_less if want_max else a_less
    res = np.where(pick_a, a, b)
    na, nb = np.isnan(a), np.isnan(b)
    qnan = np.array(CANONICAL_NAN_F32).view(np.float32)
    if nan:
        res = np.where(na | nb, qnan, res)
    else:
        res = np.where(na, b, np.where(nb, a, res))
        res = np.where(na & nb, qnan, res)
    return np.asarray(res, np.float32)


def min_f32(a, b, nan: bool = False) -> np.ndarray:
    """PTX ``min{.NaN}.f32``: float32 -> float32.  One NaN input returns the
    other operand; two NaNs (or any NaN with ``nan=True``) give canonical
    NaN 0x7FFFFFFF; -0 is treated as less than +0."""
    return _minmax(a, b, False, nan)


def max_f32(a, b, nan: bool = False) -> np.ndarray:
    """PTX ``max{.NaN}.f32``: see :func:`min_f32`; +0 is greater than -0."""
    return _minmax(a, b, True, nan)


# --------------------------------------------------------------------------
# .approx transcendental functions
# --------------------------------------------------------------------------

def _approx(fn, x, ftz: bool) -> np.ndarray:
    """Evaluate fn in float64 and round once to f32.  Real hardware's
    .approx results are within a few ulp (documented per instruction in the
    PTX ISA); this emulator is more exact, so tests against hardware must
    use a tolerance."""
    x = np.asarray(x, np.float32)
    if ftz:
        x = _flush(x)
    with np.errstate(all="ignore"):
        res = fn(_f64(x)).astype(np.float32)
    return _flush(res) if ftz else res


def ex2_approx(x, ftz: bool = False):
    """``ex2.approx.f32``: 2**x, float32 -> float32 (see :func:`_approx`)."""
    return _approx(np.exp2, x, ftz)


def lg2_approx(x, ftz: bool = False):
    """``lg2.approx.f32``: log2(x); log2(0) = -inf, x < 0 -> NaN."""
    return _approx(np.log2, x, ftz)


def rcp_approx(x, ftz: bool = False):
    """``rcp.approx.f32``: 1/x; 1/+-0 = +-inf."""
    return _approx(lambda v: 1.0 / v, x, ftz)


def sqrt_approx(x, ftz: bool = False):
    """``sqrt.approx.f32``: sqrt(x); x < 0 -> NaN, sqrt(-0) = -0."""
    return _approx(np.sqrt, x, ftz)


def rsqrt_approx(x, ftz: bool = False):
    """``rsqrt.approx.f32``: 1/sqrt(x); rsqrt(+-0) = +-inf."""
    return _approx(lambda v: 1.0 / np.sqrt(v), x, ftz)


def sin_approx(x, ftz: bool = False):
    """``sin.approx.f32``: sin(x) (hardware error grows with |x|)."""
    return _approx(np.sin, x, ftz)


def cos_approx(x, ftz: bool = False):
    """``cos.approx.f32``: cos(x)."""
    return _approx(np.cos, x, ftz)


def tanh_approx(x):
    """``tanh.approx.f32``: tanh(x) (hardware max rel. error ~2**-11)."""
    return _approx(np.tanh, x, False)
