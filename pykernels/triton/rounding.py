"""Round-to-nearest-even float32 -> bf16 / e4m3 that is also right under the interpreter.

Triton's interpreter (3.8) rounds float32 -> bfloat16 toward zero and float32 ->
float8e4nv wrongly when rounding carries into the next binade (127.6 -> 64.0); the
compiled GPU path rounds to nearest even. With SOFTWARE=True (set whenever the
interpreter runs) the value is first rounded to the target grid with integer/float32
arithmetic, so the final cast only sees exactly representable values.
"""
import triton.language as tl

from .jit_dispatch import jit


@jit
def to_bf16_rne(x, SOFTWARE: tl.constexpr):
    if SOFTWARE:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        keep = x != x  # NaN stays NaN (its payload may not survive the add)
        y = tl.where(keep, x, rounded.to(tl.float32, bitcast=True))
        return y.to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


@jit
def to_e4m3_rne(x, SOFTWARE: tl.constexpr):
    """float32 -> float8e4nv as the GPU's cvt.rn.satfinite.e4m3x2.f32: RNE, |x| > 448 and
    +-Inf saturate to +-448, NaN -> 0x7F (any sign), the sign of zero kept."""
    if SOFTWARE:
        bits = x.to(tl.int32, bitcast=True)
        mag = tl.minimum(tl.abs(x), 448.0)  # saturate first: (448, 464] rounds to 448 anyway
        exp = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exp = tl.maximum(exp, -6)  # e4m3 subnormals share the 2^-9 spacing of binade -6
        # spacing of e4m3 values in this binade is 2^(exp-3); adding 1.5*2^23 of that
        # spacing makes the float32 add round at exactly that granularity (RNE).
        magic = ((exp - 3 + 127 + 23) << 23).to(tl.float32, bitcast=True) * 1.5
        r = (mag + magic) - magic
        y = tl.where(bits < 0, -r, r)  # the sign bit, so -0 stays -0
        q = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        # NaN: the interpreter's cast (and the magic add) would give a finite byte.
        q = tl.where(x != x, 0x7F, q).to(tl.uint8)
        return q.to(tl.float8e4nv, bitcast=True)
    else:
        return x.to(tl.float8e4nv)
