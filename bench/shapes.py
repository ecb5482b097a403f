"""Benchmark shape sets and the FLOP / byte counts derived from them."""
from dataclasses import dataclass

from pykernels.runtime.hardware import SCALE_BLOCK as _BLOCK, cdiv as _cdiv

OPS = ("normal", "contiguous", "masked")


@dataclass(frozen=True)
class Shape:
    """One GEMM problem: `groups` independent [m, k] x [n, k]^T products.

    For "normal" groups is 1; for grouped ops m is the rows per group and every
    group has its own B, as in DeepGEMM's MoE layouts.
    """
    op: str
    groups: int
    m: int
    n: int
    k: int

    def label(self) -> str:
        """Short text form, e.g. '128x4096x7168' or '4x8192x4096x7168' (GxMxNxK)."""
        mnk = f"{self.m}x{self.n}x{self.k}"
        return mnk if self.op == "normal" else f"{self.groups}x{mnk}"


def _normal(*mnk):
    return [Shape("normal", 1, m, n, k) for m, n, k in mnk]


def _grouped(op, *gmnk):
    return [Shape(op, g, m, n, k) for g, m, n, k in gmnk]


# DeepSeek-V3-like sizes, the ones DeepGEMM reports, so figures can be compared.
FULL = {
    "normal": _normal((64, 2112, 7168), (128, 4096, 7168), (128, 7168, 16384),
                      (4096, 2112, 7168), (4096, 32768, 512), (4096, 7168, 16384)),
    "contiguous": _grouped("contiguous", (4, 8192, 4096, 7168), (8, 4096, 7168, 2048)),
    "masked": _grouped("masked", (1, 1024, 4096, 7168), (4, 256, 7168, 2048)),
}

# Seconds, not minutes: for checking the harness end to end on a GPU.
QUICK = {
    "normal": _normal((128, 256, 512), (256, 512, 1024)),
    "contiguous": _grouped("contiguous", (2, 128, 256, 512)),
    "masked": _grouped("masked", (2, 64, 256, 512)),
}


def shape_set(quick: bool = False, ops=OPS):
    """Shapes of the chosen set for the listed ops, in op order."""
    table = QUICK if quick else FULL
    return [s for op in ops for s in table[op]]


def flops(s: Shape) -> int:
    """Multiply-adds counted as 2 FLOPs: 2*M*N*K summed over groups."""
    return 2 * s.groups * s.m * s.n * s.k


def bytes_moved(s: Shape, precision: str = "fp8_block") -> int:
    """Minimal DRAM traffic: read A and B once, write out (bf16) once.

    precision: "fp8_block" (e4m3 + f32 1x128 / 128x128 scales, our kernels),
    "fp8_tensor" (e4m3 + one f32 scale per operand and group), "bf16" (no scales).
    """
    rows, kb = s.groups * s.m, _cdiv(s.k, _BLOCK)
    elem = 2 if precision == "bf16" else 1
    ab = elem * (rows * s.k + s.groups * s.n * s.k)
    if precision == "fp8_block":
        scales = 4 * (rows * kb + s.groups * _cdiv(s.n, _BLOCK) * kb)
    elif precision == "fp8_tensor":
        scales = 4 * 2 * s.groups
    elif precision == "bf16":
        scales = 0
    else:
        raise ValueError(f"precision: expected fp8_block, fp8_tensor or bf16, got {precision!r}")
    return ab + scales + 2 * rows * s.n
