"""FP8 block-scaled GEMM ops (NT): problem, backends, custom ops.

A is e4m3 [m, k] with 1x128 scales sfa f32 [m, ceil(k/128)] (row-major, or column-major
TMA-aligned as DeepGEMM produces); B is e4m3 [n, k] with 128x128 block scales sfb f32
[ceil(n/128), ceil(k/128)]; out is bf16 [m, n]. K: a multiple of 16 (K_MULTIPLE); the
last K block may be partial. Layouts: "normal"; "contiguous" (rows of A
grouped by m_indices int32 [m], -1 = padding; B [G, n, k]); "masked" (A [G, m_max, k],
masked_m int32 [G] valid rows per group).

bf16_gemm_nt: A bf16 [m, k], B bf16 [n, k], out bf16 or float32 [m, n] (float32: c + A B^T
or out += A B^T as fp8_gemm_nt's); no scales; the same K rule (Bf16GemmProblem).
"""
import dataclasses
from typing import Optional

import torch

from .. import registry
from .. import reference as R
from ..runtime import device_errors as DE
from ..runtime import validate as V
from ..runtime.hardware import SCALE_BLOCK, TMA_ALIGNMENT_BYTES, cdiv
from . import backends as B

F8 = torch.float8_e4m3fn
# K rule, every backend alike: rows of A and B are 1-byte e4m3 elements read by TMA, whose row
# stride must be a multiple of 16 bytes. The last K block may be partial (K need not be a
# multiple of 128): the scales have ceil(K/128) columns, the tail counts as zeros.
K_MULTIPLE = TMA_ALIGNMENT_BYTES
LAYOUTS = {"fp8_gemm_nt": "normal", "m_grouped_fp8_gemm_nt_contiguous": "contiguous",
           "m_grouped_fp8_gemm_nt_masked": "masked"}


@dataclasses.dataclass(frozen=True)
class GemmProblem:
    layout: str
    a: torch.Tensor
    sfa: torch.Tensor
    b: torch.Tensor
    sfb: torch.Tensor
    out: torch.Tensor
    grouping: Optional[torch.Tensor]     # m_indices (contiguous), masked_m (masked), None
    expected_m: Optional[int]            # masked: the tile-choice hint
    m: int                               # rows (per group for masked)
    n: int
    k: int
    groups: int
    device: torch.device
    # float32 out only (normal layout): out = c + A B^T with c a separate float32 [m, n]
    # tensor, or out += A B^T (accumulate: c is out itself, DeepGEMM's weight-gradient form)
    c: Optional[torch.Tensor] = None
    accumulate: bool = False
    b_scale_rows: int = SCALE_BLOCK      # rows of B per scale: 128 (128x128 blocks) or 1 (1x128, per row)
    sfd: Optional[torch.Tensor] = None   # e4m3 out: its 1x128 scales, float32 [m, ceil(n/128)] (quantize-on-store)

    def describe(self) -> str:
        g = f", {self.groups} groups" if self.layout != "normal" else ""
        acc = " out += a b^T" if self.accumulate else " out = c + a b^T" if self.c is not None else ""
        sfb = ", 1x128 B scales" if self.b_scale_rows == 1 else ""
        return f"{self.layout} m={self.m} n={self.n} k={self.k}{g}, {self.out.dtype} out{acc}{sfb} on {self.device}"

    @property
    def f32_out(self) -> bool:
        return self.out.dtype == torch.float32

    @property
    def fp8_out(self) -> bool:
        return self.out.dtype == F8


def pair(name: str, x):
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        given = f"a {type(x).__name__} of {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
        raise TypeError(f"{name}: expected a pair ({name}, sf{name}) of e4m3 data and float32 scales, got {given}")
    return V.as_tensor(name, x[0]), V.as_tensor(f"sf{name}", x[1])


def _check_group_values(p: GemmProblem) -> None:
    """Host checks of m_indices / masked_m values (CPU tensors; on a GPU the kernels
    check them into the device error record)."""
    if p.grouping is None or p.grouping.numel() == 0:
        return
    if p.layout == "contiguous":
        bad = (p.grouping < -1) | (p.grouping >= p.groups)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(DE.describe("MIndexOutOfRange", int(p.grouping[row]), p.groups, row))
    else:
        bad = (p.grouping < 0) | (p.grouping > p.m)
        if bool(bad.any()):
            g = int(bad.nonzero()[0, 0])
            raise ValueError(DE.describe("MaskedMOutOfRange", int(p.grouping[g]), p.m, g))


def problem(layout: str, a, sfa, b, sfb, out, grouping=None, expected_m=None, *, c=None, accumulate=False,
            b_scale_rows=SCALE_BLOCK, sfd=None, values=True) -> GemmProblem:
    """Validate one GEMM call (every error names the argument, what was expected and what
    was given). values: also check m_indices / masked_m values on CPU tensors. Normal
    layout only: out float32 (else bf16), c (float32 [m, n], out = c + a b^T), accumulate
    (out += a b^T), b_scale_rows 1 (sfb float32 [n, ceil(k/128)], DeepGEMM's recipe (1, 1, 128)),
    out e4m3 with sfd (float32 [m, ceil(n/128)] row-major: its 1x128 scales, quantize-on-store)."""
    a, sfa, b, sfb, out = (V.as_tensor(n, t) for n, t in
                           (("a", a), ("sfa", sfa), ("b", b), ("sfb", sfb), ("out", out)))
    for name, t, dt in (("a", a, F8), ("b", b, F8), ("sfa", sfa, torch.float32), ("sfb", sfb, torch.float32)):
        V.check_dtype(name, t, dt)
    if layout == "normal" and out.dtype in (torch.float32, F8):
        pass                                              # float32: the weight-gradient forms; e4m3: + sfd
    else:
        V.check_dtype("out", out, torch.bfloat16)
    if c is not None or accumulate:
        if out.dtype != torch.float32:
            raise ValueError(f"c: accumulation (out = c + a b^T) needs a float32 out, got out {out.dtype}")
    if (out.dtype == F8) != (sfd is not None):
        raise ValueError(f"sfd: an e4m3 out comes with its float32 scales sfd [m, ceil(n/128)] (out given as a "
                         f"pair (out, sfd)) and only then; got out {out.dtype} and sfd "
                         f"{'None' if sfd is None else 'given'}")
    if b_scale_rows not in (1, SCALE_BLOCK) or (b_scale_rows == 1 and layout != "normal"):
        raise ValueError(f"recipe: B scales per {SCALE_BLOCK} rows (or per row for fp8_gemm_nt), "
                         f"got {b_scale_rows} rows on the {layout} layout")
    grouped_a, grouped_b = layout == "masked", layout != "normal"
    V.check_rank("a", a, 3 if grouped_a else 2)
    V.check_rank("b", b, 3 if grouped_b else 2)
    m, k = a.shape[-2:]
    n = b.shape[-2]
    if b.shape[-1] != k:
        raise ValueError(f"b: expected K = {k} (a's last dim) in shape {list(b.shape)}, got {b.shape[-1]}")
    if k % K_MULTIPLE:
        raise ValueError(f"k: expected a multiple of {K_MULTIPLE} (rows of e4m3 A and B are read by TMA, whose "
                         f"row stride must be a multiple of {TMA_ALIGNMENT_BYTES} bytes), got {k}")
    groups = b.shape[0] if grouped_b else 1
    if grouped_a and a.shape[0] != groups:
        raise ValueError(f"b: expected {a.shape[0]} groups (a's first dim) in shape {list(b.shape)}, got {groups}")
    for name, t in (("a", a), ("b", b), ("out", out)):
        V.check_contiguous(name, t)
    V.check_shape("sfa", sfa, tuple(a.shape[:-2]) + (m, cdiv(k, SCALE_BLOCK)))
    V.check_shape("sfb", sfb, tuple(b.shape[:-2]) + (cdiv(n, b_scale_rows), cdiv(k, SCALE_BLOCK)))
    V.check_scale_layout("sfa", sfa)
    if b_scale_rows == 1:
        V.check_scale_layout("sfb", sfb)                  # per-row scales: like sfa
    else:
        V.check_contiguous("sfb", sfb)
    V.check_shape("out", out, tuple(a.shape[:-2]) + (m, n))
    if c is not None:
        c = V.as_tensor("c", c)
        V.check_dtype("c", c, torch.float32)
        V.check_shape("c", c, (m, n))
    if sfd is not None:
        sfd = V.as_tensor("sfd", sfd)
        V.check_dtype("sfd", sfd, torch.float32)
        V.check_shape("sfd", sfd, (m, cdiv(n, SCALE_BLOCK)))
        V.check_contiguous("sfd", sfd)
    if layout == "contiguous":
        grouping = V.as_tensor("m_indices", grouping)
        V.check_dtype("m_indices", grouping, torch.int32)
        V.check_shape("m_indices", grouping, (m,))
        V.check_contiguous("m_indices", grouping)
    elif layout == "masked":
        grouping = V.as_tensor("masked_m", grouping)
        V.check_dtype("masked_m", grouping, torch.int32)
        V.check_shape("masked_m", grouping, (groups,))
        V.check_contiguous("masked_m", grouping)
        expected_m = V.check_int("expected_m", expected_m, lo=0)
    inputs = dict(a=a, sfa=sfa, b=b, sfb=sfb)
    if grouping is not None:
        inputs["m_indices" if layout == "contiguous" else "masked_m"] = grouping
    if c is not None:
        inputs["c"] = c
    dev = V.check_same_device(**inputs, out=out, **({} if sfd is None else {"sfd": sfd}))
    p = GemmProblem(layout, a, sfa, b, sfb, out, grouping, expected_m, m, n, k, groups, dev, c, bool(accumulate),
                    b_scale_rows, sfd)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, **inputs)
        if sfd is not None:
            V.check_no_overlap("sfd", sfd, **inputs, out=out)
        if values and dev.type == "cpu":
            _check_group_values(p)
    return p


def public_problem(op: str):
    """The problem builder for the public call form: (a, sfa) and (b, sfb) pairs."""
    layout = LAYOUTS[op]

    def build(a, b, out, *rest, **kw):
        return problem(layout, *pair("a", a), *pair("b", b), out, *rest, **kw)
    return build


@dataclasses.dataclass(frozen=True)
class Bf16GemmProblem:
    """bf16_gemm_nt: out[m, n] = (c +) a b^T, a bf16 [m, k], b bf16 [n, k], out bf16 or float32."""
    a: torch.Tensor
    b: torch.Tensor
    out: torch.Tensor
    m: int
    n: int
    k: int
    device: torch.device
    c: Optional[torch.Tensor] = None     # float32 out only: out = c + a b^T (c apart from out)
    accumulate: bool = False             # float32 out only: out += a b^T

    def describe(self) -> str:
        acc = " out += a b^T" if self.accumulate else " out = c + a b^T" if self.c is not None else ""
        return f"bf16 m={self.m} n={self.n} k={self.k}, {self.out.dtype} out{acc} on {self.device}"

    @property
    def f32_out(self) -> bool:
        return self.out.dtype == torch.float32


def bf16_problem(a, b, out, *, c=None, accumulate=False) -> Bf16GemmProblem:
    """Validate one bf16_gemm_nt call (every error names the argument, what was expected and
    what was given): a bf16 [m, k], b bf16 [n, k], out bf16 or float32 [m, n], all contiguous;
    K a multiple of 16 (K_MULTIPLE, as fp8_gemm_nt: the kernels' K step); c float32 [m, n]
    (out = c + a b^T) or accumulate (out += a b^T) with a float32 out only."""
    a, b, out = (V.as_tensor(n, t) for n, t in (("a", a), ("b", b), ("out", out)))
    V.check_dtype("a", a, torch.bfloat16)
    V.check_dtype("b", b, torch.bfloat16)
    V.check_dtype("out", out, torch.bfloat16, torch.float32)
    if (c is not None or accumulate) and out.dtype != torch.float32:
        raise ValueError(f"c: accumulation (out = c + a b^T) needs a float32 out, got out {out.dtype}")
    V.check_rank("a", a, 2)
    V.check_rank("b", b, 2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b: expected K = {k} (a's last dim) in shape {list(b.shape)}, got {b.shape[1]}")
    if k % K_MULTIPLE:
        raise ValueError(f"k: expected a multiple of {K_MULTIPLE} (the K step of the kernels, as for "
                         f"fp8_gemm_nt), got {k}")
    for name, t in (("a", a), ("b", b), ("out", out)):
        V.check_contiguous(name, t)
    V.check_shape("out", out, (m, n))
    inputs = dict(a=a, b=b)
    if c is not None:
        c = V.as_tensor("c", c)
        V.check_dtype("c", c, torch.float32)
        V.check_shape("c", c, (m, n))
        inputs["c"] = c
    dev = V.check_same_device(**inputs, out=out)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, **inputs)
    return Bf16GemmProblem(a, b, out, m, n, k, dev, c, bool(accumulate))


# --- DeepGEMM's keyword arguments ----------------------------------------------------------
# Its current fp8_gemm_nt / m_grouped_* functions take these. The public functions accept
# each where its value means what these ops compute (none changes the problem, so none
# reaches the custom op) and raise a ValueError naming it otherwise (docs/compat.md).

RECIPE = (1, SCALE_BLOCK, SCALE_BLOCK)          # scale granularity (A rows, B rows, K): 1x128 A, 128x128 B
RECIPE_A, RECIPE_B = RECIPE[0::2], RECIPE[1:]   # the same per operand: (rows, K)
RECIPE_PER_ROW_B = (1, 1, SCALE_BLOCK)          # 1x128 A and B (DeepGEMM's weight-gradient recipe): fp8_gemm_nt only


def _fixed(name: str, value, want, what: str) -> None:
    given = tuple(value) if isinstance(value, (tuple, list)) else value
    if given != want:
        raise ValueError(f"{name}: expected {want!r} ({what}), got {value!r}")


def _b_scale_rows(name: str, given, want_128, want_1, per_row_b: bool) -> int:
    """Rows of B per scale that a recipe value names (128, or 1 where per_row_b)."""
    t = tuple(given) if isinstance(given, (tuple, list)) else given
    if per_row_b and t == want_1:
        return 1
    also = f" or {want_1!r} (1x128 B scales)" if per_row_b else ""
    _fixed(name, given, want_128, f"1x128 A scales, 128x128 B scales{also}")
    return SCALE_BLOCK


def check_deepgemm_keywords(*, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                            disable_ue8m0_cast: bool = False, use_psum_layout: bool = False,
                            ensure_zero_padding=None, expected_m_for_psum_layout=None, per_row_b: bool = False) -> int:
    """Accept DeepGEMM's keywords where their values mean what pykernels computes; returns the
    rows of B per scale the recipe names: 128, or 1 for recipe (1, 1, 128) / recipe_b (1, 128)
    where per_row_b (fp8_gemm_nt). c: for the functions without accumulation (must be None)."""
    if c is not None:
        raise ValueError(f"c: expected None (accumulation, d = c + a @ b, is fp8_gemm_nt's only), "
                         f"got a {type(c).__name__}")
    rows = SCALE_BLOCK
    if recipe is not None:
        if recipe_a is not None or recipe_b is not None:
            raise ValueError(f"recipe: expected either recipe or recipe_a + recipe_b, got recipe={recipe!r}, "
                             f"recipe_a={recipe_a!r}, recipe_b={recipe_b!r}")
        rows = _b_scale_rows("recipe", recipe, RECIPE, RECIPE_PER_ROW_B, per_row_b)
    if (recipe_a is None) != (recipe_b is None):
        raise ValueError(f"recipe_a, recipe_b: expected both or neither, got recipe_a={recipe_a!r}, "
                         f"recipe_b={recipe_b!r}")
    if recipe_a is not None:
        _fixed("recipe_a", recipe_a, RECIPE_A, "1x128 A scales, the only A recipe implemented")
        rows = _b_scale_rows("recipe_b", recipe_b, RECIPE_B, RECIPE_PER_ROW_B[1:], per_row_b)
    if not (isinstance(compiled_dims, str) and set(compiled_dims) <= set("mnk")
            and len(set(compiled_dims)) == len(compiled_dims)):
        raise ValueError(f"compiled_dims: expected a string of distinct letters from 'mnk' (DeepGEMM's JIT "
                         f"specialisation; no effect here: kernels are compiled ahead of time), got {compiled_dims!r}")
    if not isinstance(disable_ue8m0_cast, bool):   # float32 scales are never cast to UE8M0 on Hopper
        raise TypeError(f"disable_ue8m0_cast: expected a bool, got {type(disable_ue8m0_cast).__name__}")
    _fixed("use_psum_layout", use_psum_layout, False,
           "m_indices holds each row's group; the prefix-sum layout is not supported yet")
    _fixed("expected_m_for_psum_layout", expected_m_for_psum_layout, None, "used with use_psum_layout only")
    if ensure_zero_padding not in (None, False):
        raise ValueError(f"ensure_zero_padding: expected False or None (rows whose m_indices is -1 are left "
                         f"untouched; zeroing them is not supported yet), got {ensure_zero_padding!r}")
    return rows


# --- backends ---------------------------------------------------------------------------

def _reference(p: GemmProblem):
    if p.device.type != "cpu":
        _check_group_values(p)           # ground truth may read values on the host
    if p.layout == "normal":
        c = p.out if p.accumulate else p.c
        R.fp8_gemm_nt(p.a, p.sfa, p.b, p.sfb, p.out, c=c, b_scale_rows=p.b_scale_rows, sfd=p.sfd)
    elif p.layout == "contiguous":
        R.m_grouped_fp8_gemm_nt_contiguous(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out)
    else:
        R.m_grouped_fp8_gemm_nt_masked(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out)


def accumulation_base(p: GemmProblem) -> None:
    """Float32 out: the kernels (Triton, cuda) add their product to out, so out first holds
    c (copied when c is a separate tensor), stays as it is (accumulate), or is zeroed."""
    if not p.f32_out or p.accumulate:
        return
    if p.c is not None:
        p.out.copy_(p.c)
    else:
        p.out.zero_()


def _triton(p: GemmProblem):
    from .. import triton as T
    if p.layout == "normal":
        accumulation_base(p)
        T.fp8_gemm_nt(p.a, p.sfa, p.b, p.sfb, p.out, b_scale_rows=p.b_scale_rows, sfd=p.sfd)
    elif p.layout == "contiguous":
        T.m_grouped_fp8_gemm_nt_contiguous(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out)
    else:
        T.m_grouped_fp8_gemm_nt_masked(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out)


def _triton_limits(p: GemmProblem):
    from .. import triton as T
    T.check_gemm_shape(p.m, p.n, p.k)


def _kernel(p: GemmProblem, executor: str):
    from ..cuda import gemm as CG
    if p.layout == "normal":
        accumulation_base(p)
        CG.fp8_gemm_nt(p.a, p.sfa, p.b, p.sfb, p.out, executor, b_scale_rows=p.b_scale_rows, sfd=p.sfd)
    elif p.layout == "contiguous":
        CG.m_grouped_fp8_gemm_nt_contiguous(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out, executor)
    else:
        CG.m_grouped_fp8_gemm_nt_masked(p.a, p.sfa, p.b, p.sfb, p.grouping, p.out, executor,
                                        expected_m=p.expected_m)


def _kernel_limits(p: GemmProblem):
    from ..cuda import gemm as CG
    rows = p.a.shape[0] * (p.a.shape[1] if p.layout == "masked" else 1)
    CG.check_shapes(p.m, p.n, p.k, rows, p.groups)
    if p.b_scale_rows != SCALE_BLOCK and not p.f32_out:
        raise ValueError("recipe: the cuda FP8 GEMM takes 1x128 B scales (recipe (1, 1, 128)) with a float32 "
                         "out only (DeepGEMM's weight-gradient form); bf16 out runs on triton and reference")


def _kernel_choice(p: GemmProblem) -> list:
    from ..cuda import gemm_explain
    return gemm_explain.fp8_gemm_choice(p)


def _register(op: str):
    o = registry.op(op, public_problem(op))
    for name in ("cuda", "emu"):
        o.add(B.kernel(name, "gemm_fp8_gemm", _kernel, _kernel_limits, _kernel_choice))
    o.add(B.triton(_triton, _triton_limits))
    o.add(B.reference(_reference))
    return o


NORMAL = _register("fp8_gemm_nt")
CONTIGUOUS = _register("m_grouped_fp8_gemm_nt_contiguous")
MASKED = _register("m_grouped_fp8_gemm_nt_masked")


def _bf16_reference(p: Bf16GemmProblem):
    R.bf16_gemm_nt(p.a, p.b, p.out, c=p.out if p.accumulate else p.c)


def _bf16_triton(p: Bf16GemmProblem):
    from .. import triton as T
    accumulation_base(p)
    T.bf16_gemm_nt(p.a, p.b, p.out)


def _bf16_triton_limits(p: Bf16GemmProblem):
    from .. import triton as T
    T.check_gemm_shape(p.m, p.n, p.k)


def _bf16_kernel(p: Bf16GemmProblem, executor: str):
    from ..cuda import bf16_gemm as CB
    accumulation_base(p)
    CB.bf16_gemm_nt(p.a, p.b, p.out, executor)


def _bf16_kernel_limits(p: Bf16GemmProblem):
    from ..cuda import bf16_gemm as CB
    CB.check_shapes(p.m, p.n, p.k)


def _bf16_kernel_choice(p: Bf16GemmProblem) -> list:
    from ..cuda import gemm_explain
    return gemm_explain.bf16_gemm_choice(p)


BF16 = registry.op("bf16_gemm_nt", bf16_problem)
for _name in ("cuda", "emu"):
    BF16.add(B.kernel(_name, "gemm_fp8_gemm", _bf16_kernel, _bf16_kernel_limits, _bf16_kernel_choice))
BF16.add(B.triton(_bf16_triton, _bf16_triton_limits))
BF16.add(B.reference(_bf16_reference))


# --- custom ops: the same validation as the Python API ----------------------------------

def fp8_gemm_nt_body(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                     out: torch.Tensor, backend: str, c: Optional[torch.Tensor] = None, accumulate: bool = False,
                     b_scale_rows: int = SCALE_BLOCK, sfd: Optional[torch.Tensor] = None) -> None:
    """c: a float32 [m, n] tensor apart from out (out = c + a b^T); accumulate: out += a b^T
    (the public function passes c = out this way: a custom op's inputs may not alias);
    sfd: the 1x128 scales of an e4m3 out (quantize-on-store)."""
    NORMAL(problem("normal", a, sfa, b, sfb, out, c=c, accumulate=accumulate, b_scale_rows=b_scale_rows, sfd=sfd),
           backend)


fp8_gemm_nt_op = torch.library.custom_op("pykernels::fp8_gemm_nt", mutates_args=("out", "sfd"))(fp8_gemm_nt_body)


@fp8_gemm_nt_op.register_fake
def _(a, sfa, b, sfb, out, backend, c=None, accumulate=False, b_scale_rows=SCALE_BLOCK, sfd=None):
    problem("normal", a, sfa, b, sfb, out, c=c, accumulate=accumulate, b_scale_rows=b_scale_rows, sfd=sfd)


def m_grouped_contiguous_body(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                              out: torch.Tensor, m_indices: torch.Tensor, backend: str) -> None:
    CONTIGUOUS(problem("contiguous", a, sfa, b, sfb, out, m_indices), backend)


m_grouped_contiguous_op = torch.library.custom_op("pykernels::m_grouped_fp8_gemm_nt_contiguous",
                                                  mutates_args=("out",))(m_grouped_contiguous_body)


@m_grouped_contiguous_op.register_fake
def _(a, sfa, b, sfb, out, m_indices, backend):
    problem("contiguous", a, sfa, b, sfb, out, m_indices)


def m_grouped_masked_body(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                          out: torch.Tensor, masked_m: torch.Tensor, expected_m: int, backend: str) -> None:
    MASKED(problem("masked", a, sfa, b, sfb, out, masked_m, expected_m), backend)


m_grouped_masked_op = torch.library.custom_op("pykernels::m_grouped_fp8_gemm_nt_masked",
                                              mutates_args=("out",))(m_grouped_masked_body)


@m_grouped_masked_op.register_fake
def _(a, sfa, b, sfb, out, masked_m, expected_m, backend):
    problem("masked", a, sfa, b, sfb, out, masked_m, expected_m)


def bf16_gemm_nt_body(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, backend: str,
                      c: Optional[torch.Tensor] = None, accumulate: bool = False) -> None:
    """c: a float32 [m, n] tensor apart from out (out = c + a b^T); accumulate: out += a b^T."""
    BF16(bf16_problem(a, b, out, c=c, accumulate=accumulate), backend)


bf16_gemm_nt_op = torch.library.custom_op("pykernels::bf16_gemm_nt", mutates_args=("out",))(bf16_gemm_nt_body)


@bf16_gemm_nt_op.register_fake
def _(a, b, out, backend, c=None, accumulate=False):
    bf16_problem(a, b, out, c=c, accumulate=accumulate)
