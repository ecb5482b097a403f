"""Round-to-nearest-even float32 -> bf16 / e4m3 that is also right under the interpreter.

Triton's interpreter (3.8) rounds float32 -> bfloat16 toward zero and float32 ->
float8e4nv wrongly when rounding carries into the next binade (127.6 -> 64.0); the
compiled GPU path rounds to nearest even. With SOFTWARE=True (set whenever the
interpreter runs) the value is first rounded to the target grid with integer/float32
arithmetic, so the final cast only sees exactly representable values.
"""
import triton
import triton.language as tl


@triton.jit
def to_bf16_rne(x, SOFTWARE: tl.constexpr):
    if SOFTWARE:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        keep = x != x  # NaN stays NaN (its payload may not survive the add)
        y = tl.where(keep, x, rounded.to(tl.float32, bitcast=True))
        return y.to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def to_e4m3_rne(x, SOFTWARE: tl.constexpr):
    """x must already lie within [-448, 448] (as scaled quantization values do)."""
    if SOFTWARE:
        bits = x.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) - 127
        exp = tl.maximum(exp, -6)  # e4m3 subnormals share the 2^-9 spacing of binade -6
        # spacing of e4m3 values in this binade is 2^(exp-3); adding 1.5*2^23 of that
        # spacing makes the float32 add round at exactly that granularity (RNE).
        magic = ((exp - 3 + 127 + 23) << 23).to(tl.float32, bitcast=True) * 1.5
        mag = tl.abs(x)
        r = (mag + magic) - magic
        y = tl.where(x < 0, -r, r)
        return y.to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv)
