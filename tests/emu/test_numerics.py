"""Tests for pykernels.emu.numerics against independent oracles.

Oracles: exact rational arithmetic (fractions.Fraction) with a neighbour
search over float32 values, full tables of representable values for the
narrow formats, torch's casts / bit views, and Python's int rounding.
Random inputs come from the ``seed`` fixture (printed, reproducible).
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pykernels.emu import numerics as nx

MODES = ["rn", "rz", "rm", "rp"]
F32_MAX = float(np.finfo(np.float32).max)
TWO128 = Fraction(2) ** 128


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def bits32(x):
    return np.asarray(x, np.float32).view(np.uint32)


def assert_same_f32(got, want):
    """Bit-exact comparison (distinguishes -0/+0; any NaN equals any NaN)."""
    got = np.asarray(got, np.float32).ravel()
    want = np.asarray(want, np.float32).ravel()
    both_nan = np.isnan(got) & np.isnan(want)
    bad = (bits32(got) != bits32(want)) & ~both_nan
    if bad.any():
        i = np.flatnonzero(bad)[:5]
        raise AssertionError(f"{bad.sum()} mismatches, e.g. idx {i}: got {got[i]!r} want {want[i]!r}")


# ---------------------------------------------------------------- oracles

def _val(f):
    """Exact value of a float32 scalar, with +-inf standing for +-2**128."""
    f = float(f)
    if math.isinf(f):
        return TWO128 if f > 0 else -TWO128
    return Fraction(f)


def oracle_round(v: Fraction, mode: str, zero_neg: bool = False) -> np.float32:
    """Correctly round exact v to float32 by searching the f32 neighbours."""
    if v == 0:
        return np.float32(-0.0 if zero_neg else 0.0)
    if abs(v) >= TWO128:
        pos = v > 0
        inf_side = {"rn": True, "rz": False, "rp": pos, "rm": not pos}[mode]
        mag = np.float32(np.inf) if inf_side else np.float32(F32_MAX)
        return mag if pos else -mag
    with np.errstate(over="ignore"):
        c = np.float32(float(v))
    inf = np.float32(np.inf)
    while _val(c) > v:
        c = np.nextafter(c, -inf)
    while _val(np.nextafter(c, inf)) <= v:
        c = np.nextafter(c, inf)
    lo = c
    hi = lo if _val(lo) == v else np.nextafter(lo, inf)
    if mode == "rm":
        r = lo
    elif mode == "rp":
        r = hi
    elif mode == "rz":
        r = lo if v > 0 else hi
    else:
        dl, dh = v - _val(lo), _val(hi) - v
        if dl != dh:
            r = lo if dl < dh else hi
        else:
            r = lo if int(bits32(lo)) % 2 == 0 else hi
    if r == 0:
        r = np.float32(-0.0) if v < 0 else np.float32(0.0)
    return np.float32(r)


def oracle_sum_zero_neg(sx: bool, sy: bool, mode: str) -> bool:
    """IEEE sign of an exact zero sum of operands with sign bits sx, sy."""
    return sx if sx == sy else mode == "rm"


def random_f32(rng, n):
    """Mixed float32 samples: random bit patterns (all exponents, subnormals),
    short significands over a modest exponent range (to hit exact ties and
    cancellations), and plain normals near 1."""
    k = n // 4
    raw = rng.integers(0, 2 ** 32, size=k, dtype=np.uint64).astype(np.uint32).view(np.float32)
    raw = np.where(np.isfinite(raw), raw, np.float32(1.0))
    short = (rng.integers(1, 2 ** 5, size=k) * 2.0 ** rng.integers(-40, 40, size=k))
    short *= rng.choice([-1.0, 1.0], size=k)
    sub = rng.integers(0, 2 ** 23, size=k, dtype=np.uint32) | (rng.integers(0, 2, size=k, dtype=np.uint32) << 31)
    sub = sub.view(np.float32)
    near = rng.standard_normal(n - 3 * k)
    x = np.concatenate([raw, short.astype(np.float32), sub, near.astype(np.float32)])
    return rng.permutation(x).astype(np.float32)


# ---------------------------------------------------------------- round_to_f32

def test_round_to_f32_random_pairs(rng):
    n = 1500
    # hi spans subnormal, normal and overflow range of f32.
    hi = rng.uniform(1, 2, n) * 2.0 ** rng.integers(-160, 135, n) * rng.choice([-1, 1], n)
    # A third of hi sit exactly on f32 grid points or midpoints.
    with np.errstate(over="ignore"):
        f = hi[: n // 3].astype(np.float32)
    up = np.nextafter(f, np.float32(np.inf)).astype(np.float64)
    hi[: n // 3] = np.where(rng.random(n // 3) < 0.5, f.astype(np.float64), (f.astype(np.float64) + up) / 2)
    hi = hi[np.isfinite(hi)]
    ulp = np.spacing(np.abs(hi))
    lo = np.where(rng.random(hi.size) < 0.3, 0.0, rng.uniform(-0.5, 0.5, hi.size) * ulp)
    lo[hi == 0] = 0.0  # precondition: an exact zero hi has no tail
    for mode in MODES:
        got = nx.round_to_f32(hi, lo, mode)
        want = [oracle_round(Fraction(h) + Fraction(l), mode, bool(np.signbit(h))) for h, l in zip(hi, lo)]
        assert_same_f32(got, want)


def test_round_to_f32_midpoint_double_rounding():
    # hi exactly on the midpoint between 1 and 1+2**-23: lo decides.
    hi = np.array([1 + 2.0 ** -24] * 3 + [-(1 + 2.0 ** -24)] * 3)
    lo = np.array([0.0, 2.0 ** -80, -2.0 ** -80] * 2)
    want = np.float32([1.0, 1 + 2.0 ** -23, 1.0, -1.0, -1.0, -(1 + 2.0 ** -23)])
    assert_same_f32(nx.round_to_f32(hi, lo, "rn"), want)
    # Just below a power of two with a negative lo: rz must step down a binade.
    assert_same_f32(nx.round_to_f32(np.array([2.0]), np.array([-2.0 ** -80]), "rz"),
                    np.float32([2 - 2.0 ** -23]))


def test_round_to_f32_specials_and_overflow():
    hi = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0])
    got = nx.round_to_f32(hi, np.zeros(5), "rz")
    assert_same_f32(got, np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0]))
    big = np.array([2.0 ** 130, -2.0 ** 130])
    inf, mx = np.inf, F32_MAX
    table = {"rn": [inf, -inf], "rz": [mx, -mx], "rm": [mx, -inf], "rp": [inf, -mx]}
    for mode, want in table.items():
        assert_same_f32(nx.round_to_f32(big, np.zeros(2), mode), np.float32(want))
    # Largest f32 subnormal and the smallest one, plus underflow to signed 0.
    sub = np.array([(1 - 2.0 ** -23) * 2.0 ** -126, 2.0 ** -149, 2.0 ** -151, -2.0 ** -151])
    assert_same_f32(nx.round_to_f32(sub, np.zeros(4), "rn"),
                    np.float32([(1 - 2.0 ** -23) * 2.0 ** -126, 2.0 ** -149, 0.0, -0.0]))
    assert_same_f32(nx.round_to_f32(sub[2:], np.zeros(2), "rp"), np.float32([2.0 ** -149, -0.0]))


# ---------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("mode", MODES)
def test_add_mul_fma_exact(rng, mode):
    n = 1200
    a, b, c = random_f32(rng, n), random_f32(rng, n), random_f32(rng, n)
    # Make some c cancel a*b nearly or exactly.
    k = n // 6
    with np.errstate(over="ignore"):
        c[:k] = -(a[:k].astype(np.float64) * b[:k]).astype(np.float32)
    c[~np.isfinite(c)] = 1.0
    b[k:2 * k] = -a[k:2 * k]
    got_add = nx.add_f32(a, b, mode)
    got_sub = nx.sub_f32(a, c, mode)
    got_mul = nx.mul_f32(a, b, mode)
    got_fma = nx.fma_f32(a, b, c, mode)
    want_add, want_sub, want_mul, want_fma = [], [], [], []
    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist()):
        fx, fy, fz = Fraction(x), Fraction(y), Fraction(z)
        sx, sy, sz = (math.copysign(1, t) < 0 for t in (x, y, z))
        want_add.append(oracle_round(fx + fy, mode, oracle_sum_zero_neg(sx, sy, mode)))
        want_sub.append(oracle_round(fx - fz, mode, oracle_sum_zero_neg(sx, not sz, mode)))
        want_mul.append(oracle_round(fx * fy, mode, sx != sy))
        want_fma.append(oracle_round(fx * fy + fz, mode, oracle_sum_zero_neg(sx != sy, sz, mode)))
    assert_same_f32(got_add, want_add)
    assert_same_f32(got_sub, want_sub)
    assert_same_f32(got_mul, want_mul)
    assert_same_f32(got_fma, want_fma)


@pytest.mark.parametrize("mode", MODES)
def test_div_exact(rng, mode):
    n = 1200
    a, b = random_f32(rng, n), random_f32(rng, n)
    # Power-of-two divisors produce exact subnormal midpoints.
    k = n // 5
    b[:k] = np.float32(2.0) ** rng.integers(-10, 30, k).astype(np.float32)
    a[:k] = (rng.integers(1, 2 ** 24, k) * 2.0 ** -149).astype(np.float32)
    b[b == 0] = np.float32(3.0)
    got = nx.div_f32(a, b, mode)
    want = [oracle_round(Fraction(x) / Fraction(y), mode,
                         (math.copysign(1, x) < 0) != (math.copysign(1, y) < 0))
            for x, y in zip(a.tolist(), b.tolist())]
    assert_same_f32(got, want)
    rcp = nx.rcp_f32(b, mode)
    assert_same_f32(rcp, [oracle_round(1 / Fraction(y), mode) for y in b.tolist()])


def test_two_prod_is_exact(rng):
    # The residual helper used by div/sqrt must return the exact product.
    a = rng.uniform(-1, 1, 500) * 2.0 ** rng.integers(-300, 300, 500)
    b = rng.uniform(-1, 1, 500) * 2.0 ** rng.integers(-300, 300, 500)
    p, e = nx._two_prod(a, b)
    for x, y, pp, ee in zip(a, b, p, e):
        assert Fraction(pp) + Fraction(ee) == Fraction(x) * Fraction(y)


def test_div_specials():
    a = np.float32([1, -1, 0, 0, np.inf, 1, np.nan, -0.0])
    b = np.float32([0, 0, 0, 5, np.inf, np.inf, 1, 2])
    want = np.float32([np.inf, -np.inf, np.nan, 0, np.nan, 0, np.nan, -0.0])
    assert_same_f32(nx.div_f32(a, b), want)


@pytest.mark.parametrize("mode", MODES)
def test_sqrt_exact(rng, mode):
    x = np.abs(random_f32(rng, 1200))
    got = nx.sqrt_f32(x, mode)
    want = []
    inf = np.float32(np.inf)
    for v in x.tolist():
        fv = Fraction(v)
        c = np.float32(math.sqrt(v))
        while _val(c) ** 2 > fv:
            c = np.nextafter(c, -inf)
        while _val(np.nextafter(c, inf)) ** 2 <= fv:
            c = np.nextafter(c, inf)
        lo = c
        hi = lo if _val(lo) ** 2 == fv else np.nextafter(lo, inf)
        if mode in ("rz", "rm"):
            r = lo
        elif mode == "rp":
            r = hi
        else:  # midpoint squared vs x (a tie is impossible for sqrt)
            r = lo if ((_val(lo) + _val(hi)) / 2) ** 2 > fv else hi
        want.append(r)
    assert_same_f32(got, want)
    assert_same_f32(nx.sqrt_rn(np.float32([-0.0, -1, np.inf, 4])), np.float32([-0.0, np.nan, np.inf, 2]))


def test_add_signed_zero_rules():
    a, b = np.float32([3, 0, -0.0, -0.0]), np.float32([-3, -0.0, -0.0, 0])
    assert_same_f32(nx.add_f32(a, b, "rn"), np.float32([0, 0, -0.0, 0]))
    assert_same_f32(nx.add_f32(a, b, "rm"), np.float32([-0.0, -0.0, -0.0, -0.0]))
    assert_same_f32(nx.fma_f32(np.float32([2]), np.float32([3]), np.float32([-6]), "rm"), np.float32([-0.0]))


def test_ftz_and_sat():
    tiny = np.float32(2.0 ** -130)
    assert_same_f32(nx.add_f32(np.float32([tiny, -tiny]), np.float32([0, 0])), np.float32([tiny, -tiny]))
    assert_same_f32(nx.add_f32(np.float32([tiny, -tiny]), np.float32([0, -0.0]), ftz=True), np.float32([0, -0.0]))
    # Normal inputs whose product is subnormal are flushed on output.
    s = np.float32(2.0 ** -70)
    assert_same_f32(nx.mul_f32(np.float32([s, -s]), np.float32([s, s]), ftz=True), np.float32([0, -0.0]))
    assert_same_f32(nx.mul_f32(np.float32([s]), np.float32([s])), np.float32([2.0 ** -140]))
    # ftz input flush changes an fma result.
    assert_same_f32(nx.fma_f32(np.float32([2.0 ** 100]), np.float32([tiny]), np.float32([0]), ftz=True),
                    np.float32([0]))
    a = np.float32([0.7, -1, np.inf, 0.25, -0.0])
    b = np.float32([0.7, 0.5, -np.inf, 0.25, -0.0])
    assert_same_f32(nx.add_f32(a, b, sat=True), np.float32([1, 0, 0, 0.5, 0]))


# ---------------------------------------------------------------- conversions

def _grid_oracle(x, table, next_above_max, mode, satfinite, inf_idx, sign_bit):
    """Round |x| onto a sorted table of positive finite values whose index is
    the bit pattern; beyond the max the virtual next value is
    next_above_max (index inf_idx, or saturate).  Returns sign|index bits."""
    ax = np.abs(x.astype(np.float64))
    neg = np.signbit(x)
    ext = np.append(table, next_above_max)
    maxidx = table.size - 1
    # At or beyond the virtual next value: between max and "infinity".
    big = ax >= next_above_max
    i = np.where(big, maxidx, np.searchsorted(ext, ax, side="right") - 1)
    exact = ext[i] == ax
    j = np.where(exact, i, i + 1)
    if mode == "rn":
        dl, dh = ax - ext[i], ext[j] - ax
        idx = np.where(dl < dh, i, np.where(dh < dl, j, np.where(i % 2 == 0, i, j)))
        idx = np.where(big, j, idx)
    elif mode == "rz":
        idx = i
    else:
        away = ~neg if mode == "rp" else neg
        idx = np.where(away, j, i)
    idx = np.minimum(idx, maxidx) if satfinite else np.where(idx > maxidx, inf_idx, idx)
    return idx | np.where(neg, sign_bit, 0)


F16_TABLE = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
BF16_TABLE = (np.arange(0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def _in_range_samples(rng, n, lo_exp, hi_exp):
    x = rng.uniform(1, 2, n) * 2.0 ** rng.integers(lo_exp, hi_exp, n) * rng.choice([-1, 1], n)
    return x.astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("satfinite", [False, True])
def test_f16_bf16_all_modes(rng, mode, satfinite):
    x = np.concatenate([random_f32(rng, 4000), _in_range_samples(rng, 2000, -27, 18)])
    got = nx.f32_to_f16(x, mode, satfinite=satfinite)
    want = _grid_oracle(x, F16_TABLE, 65536.0, mode, satfinite, 0x7C00, 0x8000)
    np.testing.assert_array_equal(got, want.astype(np.uint16))
    got = nx.f32_to_bf16(x, mode, satfinite=satfinite)
    want = _grid_oracle(x, BF16_TABLE, 2.0 ** 128, mode, satfinite, 0x7F80, 0x8000)
    np.testing.assert_array_equal(got, want.astype(np.uint16))


def test_f16_bf16_rn_vs_torch(rng):
    x = np.concatenate([_in_range_samples(rng, 4000, -26, 16), random_f32(rng, 2000)])
    x = x[np.abs(x) < 65504]
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(nx.f32_to_f16(x), t.to(torch.float16).view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(nx.f32_to_bf16(x), t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_f16_bf16_specials():
    x = np.float32([np.nan, np.inf, -np.inf, 1e6, -1e6, -0.0, -3.0, 2.0 ** -25, 3 * 2.0 ** -25])
    np.testing.assert_array_equal(nx.f32_to_f16(x),
                                  np.uint16([0x7FFF, 0x7C00, 0xFC00, 0x7C00, 0xFC00, 0x8000, 0xC200, 0, 2]))
    np.testing.assert_array_equal(nx.f32_to_f16(x, satfinite=True)[:5], np.uint16([0x7FFF, 0x7BFF, 0xFBFF, 0x7BFF, 0xFBFF]))
    np.testing.assert_array_equal(nx.f32_to_f16(x, relu=True)[[0, 2, 5, 6]], np.uint16([0x7FFF, 0, 0, 0]))
    np.testing.assert_array_equal(nx.f32_to_bf16(np.float32([np.nan, F32_MAX, -np.inf]), satfinite=True),
                                  np.uint16([0x7FFF, 0x7F7F, 0xFF7F]))
    np.testing.assert_array_equal(nx.f32_to_bf16(np.float32([F32_MAX]), "rz"), np.uint16([0x7F7F]))


def test_f16_bf16_decode_exhaustive():
    b = np.arange(2 ** 16, dtype=np.uint16)
    tb = torch.from_numpy(b.view(np.int16))
    assert_same_f32(nx.f16_to_f32(b), tb.view(torch.float16).float().numpy())
    assert_same_f32(nx.bf16_to_f32(b), tb.view(torch.bfloat16).float().numpy())


def _fp8_table(dtype, n):
    return torch.arange(n, dtype=torch.uint8).view(dtype).double().numpy()


E4M3_TABLE = _fp8_table(torch.float8_e4m3fn, 0x7F)   # 0..448
E5M2_TABLE = _fp8_table(torch.float8_e5m2, 0x7C)     # 0..57344


def test_fp8_rn_vs_torch_in_range(rng):
    x = np.concatenate([_in_range_samples(rng, 3000, -12, 9), random_f32(rng, 2000)])
    t = torch.from_numpy(x)
    m = np.abs(x) <= 448
    np.testing.assert_array_equal(nx.f32_to_e4m3(x[m]), t[torch.from_numpy(m)].to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    m = np.abs(x) <= 57344
    np.testing.assert_array_equal(nx.f32_to_e5m2(x[m]), t[torch.from_numpy(m)].to(torch.float8_e5m2).view(torch.uint8).numpy())


def test_fp8_saturating_grid_oracle(rng):
    x = np.concatenate([random_f32(rng, 4000), _in_range_samples(rng, 2000, -20, 20)])
    np.testing.assert_array_equal(nx.f32_to_e4m3(x), _grid_oracle(x, E4M3_TABLE, 480.0, "rn", True, None, 0x80).astype(np.uint8))
    got = nx.f32_to_e5m2(x)
    want = _grid_oracle(x, E5M2_TABLE, 65536.0, "rn", True, 0x7C, 0x80)
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_fp8_edge_cases():
    x = np.float32([448, 464, 480, 1e30, np.inf, -np.inf, -500, np.nan, 2.0 ** -9, 2.0 ** -10,
                    3 * 2.0 ** -10, -0.0, 0.0, 2.0 ** -6, 240, 2.0 ** -10 * 1.0001])
    want = [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F, 0x01, 0x00,
            0x02, 0x80, 0x00, 0x08, 0x77, 0x01]
    np.testing.assert_array_equal(nx.f32_to_e4m3(x), np.uint8(want))
    x = np.float32([57344, 61440, 65536, np.inf, -np.inf, np.nan, 2.0 ** -16, 2.0 ** -17, -0.0, 1.0])
    want = [0x7B, 0x7B, 0x7B, 0x7B, 0xFB, 0x7F, 0x01, 0x00, 0x80, 0x3C]
    np.testing.assert_array_equal(nx.f32_to_e5m2(x), np.uint8(want))
    # .relu: negatives and -0 become +0, NaN stays NaN.
    np.testing.assert_array_equal(nx.f32_to_e4m3(np.float32([-3, -0.0, np.nan, 3]), relu=True), np.uint8([0, 0, 0x7F, 0x44]))


def test_fp8_decode_exhaustive():
    b = np.arange(256, dtype=np.uint8)
    tb = torch.from_numpy(b)
    assert_same_f32(nx.e4m3_to_f32(b), tb.view(torch.float8_e4m3fn).float().numpy())
    assert_same_f32(nx.e5m2_to_f32(b), tb.view(torch.float8_e5m2).float().numpy())
    # Hand-checked anchors (independent of torch).
    e4 = nx.e4m3_to_f32(np.uint8([0x01, 0x07, 0x08, 0x7E, 0xFE, 0x7F, 0xFF, 0x80, 0x38]))
    assert_same_f32(e4, np.float32([2.0 ** -9, 7 * 2.0 ** -9, 2.0 ** -6, 448, -448, np.nan, np.nan, -0.0, 1.0]))
    e5 = nx.e5m2_to_f32(np.uint8([0x01, 0x7B, 0x7C, 0xFC, 0x7D, 0x3C]))
    assert_same_f32(e5, np.float32([2.0 ** -16, 57344, np.inf, -np.inf, np.nan, 1.0]))
    # Round trip every finite pattern.
    fin = b[np.isfinite(nx.e4m3_to_f32(b))]
    np.testing.assert_array_equal(nx.f32_to_e4m3(nx.e4m3_to_f32(fin)), fin)
    fin = b[np.isfinite(nx.e5m2_to_f32(b))]
    np.testing.assert_array_equal(nx.f32_to_e5m2(nx.e5m2_to_f32(fin)), fin)


INT_RANGES = {"s8": (-2 ** 7, 2 ** 7 - 1), "u8": (0, 255), "s16": (-2 ** 15, 2 ** 15 - 1),
              "u16": (0, 2 ** 16 - 1), "s32": (-2 ** 31, 2 ** 31 - 1), "u32": (0, 2 ** 32 - 1),
              "s64": (-2 ** 63, 2 ** 63 - 1), "u64": (0, 2 ** 64 - 1)}
PY_ROUND = {"rni": round, "rzi": math.trunc, "rmi": math.floor, "rpi": math.ceil}


@pytest.mark.parametrize("dst", list(INT_RANGES))
def test_f32_to_int(rng, dst):
    lo, hi = INT_RANGES[dst]
    edges = [np.nan, np.inf, -np.inf, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.0 ** 31, 2.0 ** 63,
             2.0 ** 64, -2.0 ** 63, 4294967040.0, float(hi), float(lo), float(hi) + 1, float(lo) - 1]
    x = np.concatenate([np.float32(edges), random_f32(rng, 800),
                        (rng.uniform(-1.2, 1.2, 400) * max(hi, 1)).astype(np.float32),
                        (rng.integers(-8, 8, 200) / 2).astype(np.float32)])
    for mode, fn in PY_ROUND.items():
        got = nx.f32_to_int(x, dst, mode)
        assert got.dtype == np.dtype(dst.replace("s", "int").replace("u", "uint"))
        want = [0 if math.isnan(v) else (hi if v > 0 else lo) if math.isinf(v) else min(max(fn(v), lo), hi)
                for v in x.tolist()]
        assert [int(g) for g in got] == want


@pytest.mark.parametrize("mode", MODES)
def test_int_to_f32(rng, mode):
    s = rng.integers(-2 ** 63, 2 ** 63 - 1, 600, dtype=np.int64, endpoint=True)
    s = np.concatenate([s >> rng.integers(0, 63, 600), s,
                        np.int64([2 ** 24 + 1, 2 ** 24 + 3, -(2 ** 24 + 1), 2 ** 53 + 1, 2 ** 63 - 1, -2 ** 63, 0, -1,
                                  (2 ** 24 + 1) << 30])])
    assert_same_f32(nx.int_to_f32(s, mode), [oracle_round(Fraction(int(v)), mode) for v in s])
    u = rng.integers(0, 2 ** 64 - 1, 600, dtype=np.uint64, endpoint=True)
    u = np.concatenate([u, np.uint64([2 ** 64 - 1, 2 ** 63 + 2 ** 39, 2 ** 63 + 2 ** 39 + 1])])
    assert_same_f32(nx.int_to_f32(u, mode), [oracle_round(Fraction(int(v)), mode) for v in u])
    assert_same_f32(nx.int_to_f32(np.int32([16777217, -16777217]), mode),
                    [oracle_round(Fraction(16777217), mode), oracle_round(Fraction(-16777217), mode)])


# ---------------------------------------------------------------- min / max

def test_min_max_specials():
    nan = np.float32(np.nan)
    a = np.float32([nan, 1, nan, -0.0, 0.0, -2, 3])
    b = np.float32([2, nan, nan, 0.0, -0.0, 5, -np.inf])
    assert_same_f32(nx.min_f32(a, b), np.float32([2, 1, nan, -0.0, -0.0, -2, -np.inf]))
    assert_same_f32(nx.max_f32(a, b), np.float32([2, 1, nan, 0.0, 0.0, 5, 3]))
    assert bits32(nx.min_f32(a, b))[2] == 0x7FFFFFFF
    assert bits32(nx.max_f32(np.float32([-np.nan]), np.float32([-np.nan])))[0] == 0x7FFFFFFF
    got = nx.min_f32(a, b, nan=True)
    assert (bits32(got)[:3] == 0x7FFFFFFF).all()
    assert_same_f32(got[3:], np.float32([-0.0, -0.0, -2, -np.inf]))
    assert_same_f32(nx.max_f32(a, b, nan=True)[3:], np.float32([0.0, 0.0, 5, 3]))


def signed_zero_order(t):
    return (t, math.copysign(1, t))  # -0 sorts before +0


def test_min_max_random(rng):
    a, b = random_f32(rng, 2000), random_f32(rng, 2000)
    a[::7] = np.nan
    b[::5] = -b[::5]
    want_min, want_max = [], []
    for x, y in zip(a.tolist(), b.tolist()):
        if math.isnan(x):
            want_min.append(y)
            want_max.append(y)
            continue
        want_min.append(min(x, y, key=signed_zero_order))
        want_max.append(max(x, y, key=signed_zero_order))
    assert_same_f32(nx.min_f32(a, b), want_min)
    assert_same_f32(nx.max_f32(a, b), want_max)


# ---------------------------------------------------------------- approx

def test_approx_functions(rng):
    x = rng.uniform(-20, 20, 2000).astype(np.float32)
    p = np.abs(x) + np.float32(1e-3)

    def close(got, fn, xs):
        # Oracle: Python's math (libm, float64) per element; the emulator
        # must be within one f32 ulp of it.
        want = np.array([fn(float(v)) for v in xs])
        assert got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= np.spacing(np.abs(want.astype(np.float32))).astype(np.float64))

    close(nx.ex2_approx(x), lambda v: 2.0 ** v, x)
    close(nx.lg2_approx(p), math.log2, p)
    close(nx.rcp_approx(x), lambda v: 1.0 / v, x)
    close(nx.sqrt_approx(p), math.sqrt, p)
    close(nx.rsqrt_approx(p), lambda v: 1.0 / math.sqrt(v), p)
    close(nx.sin_approx(x), math.sin, x)
    close(nx.cos_approx(x), math.cos, x)
    close(nx.tanh_approx(x), math.tanh, x)
    assert_same_f32(nx.ex2_approx(np.float32([3, -1, -np.inf, np.inf, 200])), np.float32([8, 0.5, 0, np.inf, np.inf]))
    assert_same_f32(nx.lg2_approx(np.float32([8, 0, -1, np.inf])), np.float32([3, -np.inf, np.nan, np.inf]))
    assert_same_f32(nx.rcp_approx(np.float32([4, 0, -0.0])), np.float32([0.25, np.inf, -np.inf]))
    assert_same_f32(nx.rsqrt_approx(np.float32([4, 0, -1])), np.float32([0.5, np.inf, np.nan]))
    assert_same_f32(nx.sin_approx(np.float32([0, -0.0])), np.float32([0, -0.0]))
    assert_same_f32(nx.tanh_approx(np.float32([np.inf, -np.inf, 0])), np.float32([1, -1, 0]))
    assert_same_f32(nx.ex2_approx(np.float32([-130])), np.float32([2.0 ** -130]))
    assert_same_f32(nx.ex2_approx(np.float32([-130]), ftz=True), np.float32([0]))
    assert_same_f32(nx.rcp_rn(np.float32([3, 0.1])), np.float32([1, 1]) / np.float32([3, 0.1]))
