"""The Triton FP8 GEMM and quantization kernels as the GPU compiles and runs them.

tests/test_triton_fp8.py runs these kernels under Triton's interpreter, which is not the
code a GPU runs (it ignores warps and stages, rounds differently, never reaches ptxas).
Here, with no GPU:
1. every representative GPU launch (sm90_compile_specs of pykernels.triton.gemm and
   .quant: DeepGEMM's shapes, both scale layouts, every layout and tile config) is
   compiled for sm_90a exactly as Triton's launcher specializes it (16-byte alignment
   and integer-1 constexprs from the argument values, pykernels.triton.sm90), in child
   processes with TRITON_INTERPRET=0; ptxas's counts must show no register spills, the
   GEMM must use wgmma on e4m3 operands fed by a cp.async pipeline, the quantization
   kernels vectorized global accesses, correctly rounded division and RNE e4m3 casts;
2. the compiled sm_90a PTX of the GEMM (normal, grouped contiguous with a tile that
   spans two groups, grouped masked with an empty group) and of both quantization
   kernels runs on the PTX emulator on small ragged shapes, outputs poisoned with NaN,
   against pykernels.reference: GEMM calc_diff < 1e-3 (it is 0 to ~1e-9 in practice),
   quantization bit-exact (values and scales), untouched rows still NaN.
Measured numbers are in docs/triton-gemm.md.
"""
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from pykernels import emu, get_col_major_tma_aligned_tensor  # noqa: E402
from pykernels import reference as R  # noqa: E402
from pykernels.metrics import calc_diff, rel_error  # noqa: E402
from pykernels.triton import gemm as G  # noqa: E402
from pykernels.triton import quant as Q  # noqa: E402
from pykernels.triton import sm90  # noqa: E402

from .fp8_cases import nan_bf16, normal_problem, quantized_weights  # noqa: E402

GEMM_CALC_DIFF = 1e-3
WGMMA_E4M3 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3")


def _nan_fp8(*shape):
    return torch.full(shape, float("nan")).to(torch.float8_e4m3fn)


def _bits(t):
    return t.view(torch.uint8)


# ----------------------------------------------------------------------------- emulator problems
# Each builder makes fresh inputs and NaN-poisoned outputs, and returns (LaunchSpec of
# the compiled launch for exactly these tensors, check(stats)).

def _gemm_normal():
    # M = 65: not a multiple of the 128-row tile; K = 384: three K blocks through the
    # 3-stage pipeline; row-major scales (as per_token_cast_to_fp8 makes them).
    _, _, a, sfa, b, sfb = normal_problem(65, 256, 384)
    out = nan_bf16(65, 256)

    def check(stats):
        ref = R.fp8_gemm_nt(a, sfa, b, sfb)
        assert not torch.isnan(out.float()).any(), "output elements left unwritten"
        assert calc_diff(out, ref) < GEMM_CALC_DIFF
        assert rel_error(out, ref) < 2e-3
        assert stats.wgmma_issued > 0
        return calc_diff(out, ref)
    return G.gemm_launch_spec("emu normal 65x256x384", G.LAYOUT_NORMAL, a, sfa, b, sfb, out, sfa), check


def _gemm_contiguous():
    # Groups 0 and 2 (1 empty), padding rows, and segments not aligned to 128 rows so the
    # first tile spans groups 0 and 2; DeepGEMM's column-major TMA-aligned scales.
    m_indices = torch.tensor([0] * 40 + [-1] * 24 + [2] * 70 + [-1] * 2, dtype=torch.int32)
    m_sum, n, k = m_indices.numel(), 256, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m_sum, k))
    sfa_col = get_col_major_tma_aligned_tensor(sfa)
    b, sfb = quantized_weights(3, n, k)
    out = nan_bf16(m_sum, n)

    def check(stats):
        ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, nan_bf16(m_sum, n))
        pad = m_indices == -1
        assert torch.isnan(out[pad].float()).all(), "padding rows (-1) must stay untouched"
        assert not torch.isnan(out[~pad].float()).any(), "rows of a group left unwritten"
        assert calc_diff(out[~pad], ref[~pad]) < GEMM_CALC_DIFF
        assert rel_error(out[~pad], ref[~pad]) < 2e-3
        assert stats.wgmma_issued > 0
        return calc_diff(out[~pad], ref[~pad])
    return G.gemm_launch_spec("emu contiguous 136x256x256", G.LAYOUT_CONTIGUOUS, a, sfa_col, b, sfb, out,
                              m_indices), check


def _gemm_masked():
    # m_max = 64: the 64x128, 4-warp tile config; group 1 is empty (masked_m = 0).
    g, m_max, n, k = 2, 64, 128, 256
    a, sfa = R.per_token_cast_to_fp8(torch.randn(g * m_max, k))
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    b, sfb = quantized_weights(g, n, k)
    masked_m = torch.tensor([33, 0], dtype=torch.int32)
    out = nan_bf16(g, m_max, n)

    def check(stats):
        ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(g, m_max, n))
        assert torch.isnan(out[0, 33:].float()).all() and torch.isnan(out[1].float()).all(), \
            "rows past masked_m must stay untouched"
        assert not torch.isnan(out[0, :33].float()).any()
        assert calc_diff(out[0, :33], ref[0, :33]) < GEMM_CALC_DIFF
        assert rel_error(out[0, :33], ref[0, :33]) < 2e-3
        assert stats.wgmma_issued > 0
        return calc_diff(out[0, :33], ref[0, :33])
    return G.gemm_launch_spec("emu masked 2x64x128x256", G.LAYOUT_MASKED, a, sfa, b, sfb, out, masked_m), check


def _quant(per_block, m, k, dtype, scale):
    x = (torch.randn(m, k) * scale).to(dtype)
    x[0, :min(k, 128)] = 0                       # an all-zero group: the scale floor
    q = _nan_fp8(m, k)
    sf = torch.full((triton.cdiv(m, 128) if per_block else m, triton.cdiv(k, 128)), float("nan"))

    def check(stats):
        q_ref, sf_ref = (R.per_block_cast_to_fp8 if per_block else R.per_token_cast_to_fp8)(x)
        assert torch.equal(_bits(q), _bits(q_ref)), f"{int((_bits(q) != _bits(q_ref)).sum())} e4m3 values differ"
        assert torch.equal(sf, sf_ref)
        return 0.0
    name = f"emu {'per_block' if per_block else 'per_token'} {str(dtype)[6:]} [{m}, {k}]"
    return Q.quant_launch_spec(name, per_block, x, q, sf), check


EMU_PROBLEMS = {
    "gemm_normal": _gemm_normal,
    "gemm_contiguous": _gemm_contiguous,
    "gemm_masked": _gemm_masked,
    # row strides 384 (a multiple of 16) and 200 (not: scalar loads, masked columns)
    "per_token_bf16": lambda: _quant(False, 65, 384, torch.bfloat16, 300.0),
    "per_token_f32_ragged": lambda: _quant(False, 33, 200, torch.float32, 300.0),
    # values far beyond +-448 before scaling; 130 x 200 is the shape that spilled with 4 warps
    "per_block_f32_ragged": lambda: _quant(True, 130, 200, torch.float32, 1000.0),
}


@pytest.fixture(scope="module")
def compiled():
    """Everything compiled once, in two child processes: production specs and the
    emulator problems' launches."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    production = G.sm90_compile_specs() + Q.sm90_compile_specs()
    problems = {name: build() for name, build in EMU_PROBLEMS.items()}
    specs = production + [spec for spec, _ in problems.values()]
    results = sm90.compile_sm90(specs, jobs=2)
    by_spec = list(zip(specs, results))
    return dict(production=by_spec[:len(production)], emu=dict(zip(problems, by_spec[len(production):])),
                checks={name: check for name, (_, check) in problems.items()})


# ----------------------------------------------------------------------------- specialization

def test_specialization_matches_triton_launcher():
    # sm90.specialize mirrors Triton's launcher (native_specialize_impl, Triton 3.6-3.8):
    # check it value by value against Triton's own function where it exists.
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    buf = torch.empty(64, dtype=torch.uint8)
    values = [0, 1, 2, 15, 16, 56, 7168, -16, 2 ** 31 - 16, 2 ** 31, 3.5, True,
              buf[:16], buf[1:17], buf[16:].view(torch.float32), torch.empty(4, dtype=torch.float8_e4m3fn),
              torch.empty(4, dtype=torch.bfloat16), torch.empty(4, dtype=torch.int32)]

    class Fn:
        arg_names = [f"x{i}" for i in range(len(values))]
    sig, cx, attrs, runtime = sm90.specialize(Fn, dict(zip(Fn.arg_names, values)), {})
    for i, v in enumerate(values):
        ty, key = native_specialize_impl(BaseBackend, v, False, True, True)
        name = Fn.arg_names[i]
        if ty == "constexpr":
            assert cx.get(name) == v and name not in sig, (v, ty)
        else:
            assert sig[name] == ty, (v, sig[name], ty)
            assert ((i,) in attrs) == ("D" in (key or "")), (v, key)
    assert len(runtime) == len(values) - len(cx)


def test_specs_are_the_gpu_launches():
    # The specs come from the launch code itself (launch_args), with SOFT off.
    specs = {s.label: s for s in G.sm90_compile_specs()}
    s = specs["normal m=4096 n=7168 k=7168 sfa=col"]
    assert (s.num_warps, s.num_stages, s.grid) == (8, G.NUM_STAGES, (32, 56, 1))
    assert s.constexprs == dict(LAYOUT=0, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SOFT=False, EVEN_K=True,
                                SB_ROWS=128, OUT_F32=False, OUT_FP8=False,        # bf16 out, 128x128 B scales
                                stride_sfa_m=1, stride_sfb_k=1, G=1)   # integer-1 arguments become constexprs
    names = G._fp8_gemm_kernel.arg_names
    aligned = {names[i[0]] for i in s.attrs}
    assert {"a_ptr", "sfa_ptr", "b_ptr", "sfb_ptr", "out_ptr", "M", "N", "K", "stride_am",
            "stride_sfa_k", "stride_bn", "stride_om"} <= aligned
    assert "stride_sfb_n" not in aligned      # 56 K blocks: not a multiple of 16
    assert specs["normal m=64 n=7168 k=7168 sfa=col"].constexprs["BLOCK_M"] == 64
    assert specs["normal m=1 n=7168 k=7168 sfa=col"].constexprs["M"] == 1
    for s in Q.sm90_compile_specs():
        assert s.constexprs["SOFT"] is False


# ----------------------------------------------------------------------------- compiled code

def test_production_specs_compile_without_spills(compiled):
    rows = []
    for spec, c in compiled["production"] + [v for v in compiled["emu"].values()]:
        rows.append(f"{spec.label}: {c.regs} regs, {c.stack} B stack, {c.shared} B shared")
        assert c.stack == 0, f"{spec.label}: {c.stack} bytes of local memory (spills) per thread"
        assert c.regs <= 255
        assert c.shared <= 227 * 1024
    print("\n".join(rows))


def test_gemm_uses_wgmma_and_cp_async_pipeline(compiled):
    for spec, c in compiled["production"] + [compiled["emu"][n] for n in ("gemm_normal", "gemm_contiguous",
                                                                           "gemm_masked")]:
        if spec.kernel != "_fp8_gemm_kernel":
            continue
        ptx = c.ptx
        assert WGMMA_E4M3.search(ptx), f"{spec.label}: no wgmma.mma_async on e4m3 operands"
        assert "wgmma.wait_group" in ptx
        # Operand tiles reach shared memory by 16-byte cp.async (no TMA in this kernel),
        # and num_stages - 1 groups are issued before the loop waits on the first.
        assert re.search(r"cp\.async\.cg\.shared\.global\S* \[[^\]]+\], \[[^\]]+\], (0x10|16)\b", ptx), \
            f"{spec.label}: operand loads are not 16-byte cp.async"
        assert len(re.findall(r"cp\.async\.commit_group", ptx)) >= spec.num_stages - 1
        # the loop waits with loads still in flight (pipelined), not for all of them
        waits = [int(w) for w in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
        assert waits and max(waits) >= 1, f"{spec.label}: cp.async not pipelined ({waits})"
        assert "cp.async.bulk" not in ptx          # documented: no TMA (pointer loads)
        # Scales are loaded per row and once per tile (B: one per 128 columns), not per
        # column: 3 loads per thread per K block (+16 group ids for contiguous), where a
        # per-column B scale load gave 34 and 42 more registers.
        # 1x128 B scales (the weight-gradient spec) are per column by definition, and its
        # float32 out is read back (accumulated): 34 in the compiled code
        limit = 40 if spec.constexprs.get("SB_ROWS") == 1 else 20
        assert len(re.findall(r"ld\.global", ptx)) <= limit, f"{spec.label}: too many global loads"


def test_quant_kernels_compiled_code(compiled):
    for spec, c in compiled["production"]:
        if spec.kernel not in ("_per_token_kernel", "_per_block_kernel"):
            continue
        ptx = c.ptx
        # aligned production shapes: 16-byte vector loads and stores
        assert re.search(r"ld\.global\S*\.v4", ptx), f"{spec.label}: loads not vectorized"
        assert re.search(r"st\.global\S*\.v4", ptx), f"{spec.label}: stores not vectorized"
        # 448 / amax and amax / 448 correctly rounded (bit-exactness depends on it)
        assert len(re.findall(r"div\.rn\.f32", ptx)) == 2, f"{spec.label}: division not div.rn"
        assert "div.approx" not in ptx and "div.full" not in ptx
        assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx), f"{spec.label}: no RNE e4m3 conversion"


# ----------------------------------------------------------------------------- emulator

@pytest.mark.parametrize("name", list(EMU_PROBLEMS))
def test_compiled_ptx_on_emulator(compiled, name):
    spec, c = compiled["emu"][name]
    stats = emu.launch_triton(c, spec.grid, *spec.args)
    diff = compiled["checks"][name](stats)
    print(f"{spec.label}: calc_diff {diff:.3g}, {c.regs} regs")
