"""NaN, +-Inf and extreme finite inputs: one behaviour on every CPU-runnable backend
(docs/numerics.md).

Quantization: the reference's bits exactly (q bytes and scale bits, NaN payloads
included) from "triton" (interpreter) and "emu" (the PTX kernels on the emulator), with
poisoned outputs. GEMM and MLA decode: the same non-finite pattern as the reference (each
element NaN / +Inf / -Inf / finite alike) and the finite elements within the tolerance of
the op's own tests.
"""
import numpy as np
import pytest
import torch

from pykernels import reference as R
from pykernels.cuda import quant as cq
from pykernels.emu.numerics import f32_to_e4m3
from pykernels.reference.constants import BLOCK
from pykernels.reference.quant import E4M3_NAN_BITS, F32_CANONICAL_NAN_BITS, to_e4m3_satfinite
from pykernels.runtime.executors import run_emu
from pykernels.triton import quant as tq
from pykernels.triton.sm90 import run_launch

# Inf * 0 in the interpreted kernels is the intended NaN, not a mistake to warn about.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
QUANT_OPS = ("per_token", "per_block")
HUGE = {torch.float32: 3e38, torch.bfloat16: torch.finfo(torch.bfloat16).max,
        torch.float16: torch.finfo(torch.float16).max}
SUBNORMAL = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 6e-8}


# ----------------------------------------------------------------------------- quantization

def _quantize(backend, op, x):
    """(q, sf) of `op` on `backend`, outputs poisoned (NaN bytes / NaN scales) first. The
    backends' lower layers are called directly: one place to change if the API moves."""
    m, n = x.shape
    sf_shape = (-(-m // BLOCK) if op == "per_block" else m, -(-n // BLOCK))
    if backend == "reference":
        return getattr(R, f"{op}_cast_to_fp8")(x)
    q = torch.full(x.shape, 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    sf = torch.full(sf_shape, 12345.0)  # finite poison: a NaN poison could pass a NaN check
    if backend == "emu":
        run_emu(getattr(cq, f"{op}_plan")(x, q, sf))
    elif backend == "triton":
        run_launch(getattr(tq, f"{op}_launch_args")(x, q, sf))
    else:
        raise ValueError(f"backend: expected 'reference', 'triton' or 'emu', got {backend!r}")
    return q, sf


def _groups(op, shape):
    """(row slice, column slice) of every scaling group of a [m, n] tensor, in order."""
    m, n = shape
    rows = [slice(r, r + 1) for r in range(m)] if op == "per_token" else \
        [slice(i, min(i + BLOCK, m)) for i in range(0, m, BLOCK)]
    cols = [slice(j, min(j + BLOCK, n)) for j in range(0, n, BLOCK)]
    return [(r, c) for r in rows for c in cols]


def _special_input(op, dtype):
    """x [m, n] of `dtype`, random, with one kind of special value per group. Returns
    (x, kinds) where kinds[i] names what group i holds."""
    shape = (5, 300) if op == "per_token" else (260, 520)   # ragged last groups
    x = (torch.randn(shape) * 5).to(dtype)
    groups = _groups(op, shape)
    kinds = ["nan", "-nan", "+inf", "-inf", "inf+nan", "huge", "tiny", "subnormal", "zeros", "signed zeros"]
    assert len(groups) >= len(kinds)
    kinds += ["plain"] * (len(groups) - len(kinds))
    kinds[-1] = "nan"  # also in a ragged corner group
    for (r, c), kind in zip(groups, kinds):
        g = x[r, c]
        i, j = torch.randint(g.shape[0], ()).item(), torch.randint(g.shape[1], ()).item()
        if kind in ("nan", "inf+nan"):
            g[i, j] = NAN
        if kind == "-nan":
            g[i, j] = -NAN
        if kind in ("+inf", "inf+nan"):
            g[(i + 1) % g.shape[0], (j + 1) % g.shape[1]] = INF
        if kind == "-inf":
            g[i, j] = -INF
        if kind == "huge":
            g[i, j] = -HUGE[dtype]
        if kind == "tiny":      # amax below the floor: the floor scale, |q| < 448
            g.copy_((torch.rand(g.shape) - 0.5) * 1.5e-4)
        if kind == "subnormal":
            g.copy_(torch.randint(-3, 4, g.shape) * SUBNORMAL[dtype])
        if kind == "zeros":
            g.zero_()
        if kind == "signed zeros":
            g.copy_(torch.where(torch.rand(g.shape) < 0.5, -0.0, 0.0))
            g[i, j] = 1.0
    return x, groups, kinds


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int32)


def test_reference_cast_is_ptx_satfinite(seed):
    # The reference's cast against the emulator's model of cvt.rn.satfinite.e4m3x2.f32
    # (written from the PTX ISA, separately): RNE, saturation, NaN -> 0x7F.
    y = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-4, 4, (4096,)).float(),
                   torch.tensor([448.0, 449.0, 464.0, 464.1, 480.0, 1e30, INF, NAN, 0.0, 2.0 ** -10, 2.0 ** -9.5])])
    y = torch.cat([y, -y])
    ours = to_e4m3_satfinite(y).view(torch.uint8).numpy()
    assert np.array_equal(ours, f32_to_e4m3(y.numpy()))


@pytest.mark.parametrize("op", QUANT_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_quantization_follows_the_stated_rules(op, dtype, seed):
    # The rules of docs/numerics.md, checked on the reference itself.
    x, groups, kinds = _special_input(op, dtype)
    q, sf = _quantize("reference", op, x)
    qb, sfb = _bits(q), _bits(sf).view(sf.shape[0], -1)
    ncol = sf.shape[1]
    for gi, ((r, c), kind) in enumerate(zip(groups, kinds)):
        s, g = sfb.flatten()[gi].item(), x[r, c].float()
        if torch.isnan(g).any():
            assert s == F32_CANONICAL_NAN_BITS and (qb[r, c] == E4M3_NAN_BITS).all(), (kind, gi, ncol)
        elif torch.isinf(g).any():
            assert sf.flatten()[gi].item() == INF
            expected = torch.where(torch.signbit(g), 0x80, 0x00).to(torch.uint8)
            expected[torch.isinf(g)] = E4M3_NAN_BITS
            assert torch.equal(qb[r, c], expected), kind
        else:
            assert torch.isfinite(sf.flatten()[gi]) and sf.flatten()[gi] > 0, kind
            assert not torch.isnan(q[r, c].float()).any(), kind
            assert torch.equal(torch.signbit(q[r, c].float()), torch.signbit(g)), kind
            if kind == "huge":
                assert q[r, c].float().abs().max().item() == 448.0


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("op", QUANT_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_non_finite_bits_match_reference(backend, op, dtype, seed):
    x, _, _ = _special_input(op, dtype)
    q, sf = _quantize(backend, op, x)
    rq, rsf = _quantize("reference", op, x)
    assert torch.equal(_bits(q), _bits(rq))
    assert torch.equal(_bits(sf), _bits(rsf))
