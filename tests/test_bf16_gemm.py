"""bf16_gemm_nt (BF16 x BF16 -> bf16 / float32, NT) on the CPU backends (reference, triton under
the interpreter, emu: the hand-written kernel's PTX on the emulator, with its memory-ordering
checker) against a float64 product, with NaN-poisoned outputs; float32 out with c and in place;
non-finite inputs; the custom op and its fake; DeepGEMM's call form
(pykernels.compat.deep_gemm.bf16_gemm_nt); the Triton kernel's sm_90 compilation; the cuda
kernel's entries (csrc/gemm/fp8_gemm.cu kBf16: SASS, resources, shared-memory formula, every
emulator schedule).

Tolerance (float64 exact product p, |a||b|^T the sum of magnitudes s): float32 sums of exact
bf16 products err by at most k * 2^-24 * s; one rounding to bf16 adds 2^-8 |p| (to float32:
2^-24 |p|). The bound checked is twice the sum error plus the rounding, per element.
"""
import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.triton import bf16_gemm as TB
from pykernels.triton.jit_dispatch import INTERPRETED

BACKENDS = ["reference", "triton", "emu"]
NAN = float("nan")


def _operands(m, n, k, scale=1.0):
    return (torch.randn(m, k) * scale).bfloat16(), (torch.randn(n, k) * scale).bfloat16()


def _assert_matches_float64(got, a, b, c=None):
    """got against the float64 product (+ c) within the bound of the module docstring."""
    a64, b64 = a.double(), b.double()
    want = a64 @ b64.T
    sums = a64.abs() @ b64.abs().T
    if c is not None:
        want = want + c.double()
        sums = sums + c.double().abs()
    k = a.shape[1]
    rounding = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -24
    bound = 2 * (k + 1) * 2.0 ** -24 * sums + rounding * want.abs() + 1e-30
    assert not got.isnan().any(), "unwritten (NaN-poisoned) or NaN elements"
    err = (got.double() - want).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the bound"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n, k", [(1, 8, 16), (64, 128, 128), (70, 150, 208), (130, 256, 512), (65, 40, 1040)])
def test_bf16_out_against_float64(backend, m, n, k, seed):
    a, b = _operands(m, n, k)
    out = torch.full((m, n), NAN, dtype=torch.bfloat16)
    if backend == "emu" and n % 8:          # the kernel's 16-byte output rows (auto takes triton on a GPU)
        with pytest.raises(ValueError, match="n: the cuda BF16 GEMM needs N to be a multiple of 8"):
            pk.bf16_gemm_nt(a, b, out, backend=backend)
        return
    assert pk.bf16_gemm_nt(a, b, out, backend=backend) is out
    _assert_matches_float64(out, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_and_reference_round_once_alike(backend, seed):
    # one rounding of the float32 sum: the backends differ by at most one bf16 step plus what
    # two float32 summation orders can differ by (which dominates where the sum cancels)
    m, n, k = 96, 136, 320
    a, b = _operands(m, n, k)
    got = torch.full((m, n), NAN, dtype=torch.bfloat16)
    pk.bf16_gemm_nt(a, b, got, backend=backend)
    want = R.bf16_gemm_nt(a, b)
    step = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(2.0 ** -100))) - 7)
    order = 2 * k * 2.0 ** -24 * (a.double().abs() @ b.double().abs().T)
    assert ((got.double() - want.double()).abs() <= step.double() + order).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_out_with_c_and_in_place(backend, seed):
    m, n, k = 70, 136, 272
    a, b = _operands(m, n, k)
    c = torch.randn(m, n) * 10
    out = torch.full((m, n), NAN)
    assert pk.bf16_gemm_nt(a, b, out, c=c, backend=backend) is out          # out = c + a b^T
    _assert_matches_float64(out, a, b, c)
    plain = torch.full((m, n), NAN)
    pk.bf16_gemm_nt(a, b, plain, backend=backend)                         # float32 out, no c
    _assert_matches_float64(plain, a, b)
    before = out.clone()
    pk.bf16_gemm_nt(a, b, out, c=out, backend=backend)                    # out += a b^T
    _assert_matches_float64(out, a, b, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_problems(backend, seed):
    a, b = _operands(5, 24, 64)
    out = torch.full((5, 24), NAN, dtype=torch.bfloat16)
    pk.bf16_gemm_nt(a[:, :0], b[:, :0], out, backend=backend)              # K = 0: zeros
    assert torch.equal(out, torch.zeros_like(out))
    c = torch.randn(5, 24)
    out32 = torch.full((5, 24), NAN)
    pk.bf16_gemm_nt(a[:, :0], b[:, :0], out32, c=c, backend=backend)       # K = 0 with c: c
    assert torch.equal(out32, c)
    pk.bf16_gemm_nt(a[:0], b, torch.empty(0, 24, dtype=torch.bfloat16), backend=backend)
    none = torch.full((5, 0), NAN, dtype=torch.bfloat16)
    pk.bf16_gemm_nt(a, b[:0], none, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_as_the_reference(backend, seed):
    m, n, k = 40, 64, 128
    a, b = _operands(m, n, k)
    a[3, 7] = NAN                          # row 3 NaN
    a[5, 0] = float("inf")                 # row 5: +-inf or NaN (inf * 0 where b is 0)
    b[9, :] = 0
    b[11, 2] = -float("inf")
    got = torch.full((m, n), NAN, dtype=torch.bfloat16)
    pk.bf16_gemm_nt(a, b, got, backend=backend)
    want = R.bf16_gemm_nt(a, b)
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(f(got), f(want))
    assert got[3].isnan().all() and got[5, 9].isnan()
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].float(), want[fin].float(), rtol=2.0 ** -7, atol=1e-2)


def test_interpreter_upcasts_bf16_dots():
    # Triton's interpreter gets bf16 tl.dot wrong (docs/architecture.md): the kernel must run
    # its float32 path there, and round to bf16 in software.
    a, b = _operands(8, 16, 64)
    launch = TB.launch_args(a, b, torch.empty(8, 16, dtype=torch.bfloat16))
    assert TB.UPCAST_DOTS == TB.SOFTWARE_ROUNDING == INTERPRETED
    assert launch[3]["UPCAST"] == launch[3]["SOFT"] == INTERPRETED
    if not INTERPRETED:
        pytest.skip("compiled Triton: bf16 dots and hardware RNE casts are used")
    assert launch[3]["UPCAST"] is True and launch[3]["SOFT"] is True


def test_bad_inputs_name_the_argument():
    a, b = _operands(8, 16, 64)
    out = torch.full((8, 16), NAN, dtype=torch.bfloat16)
    cases = [
        (lambda: pk.bf16_gemm_nt(a.float(), b, out), TypeError, "a: expected dtype bfloat16, got float32"),
        (lambda: pk.bf16_gemm_nt(a, b.half(), out), TypeError, "b: expected dtype bfloat16, got float16"),
        (lambda: pk.bf16_gemm_nt(a, b, out.half()), TypeError, "out: expected dtype bfloat16 or float32"),
        (lambda: pk.bf16_gemm_nt(a[None], b, out), ValueError, "a: expected"),
        (lambda: pk.bf16_gemm_nt(a, b[:, :32], out), ValueError, "b: expected K = 64"),
        (lambda: pk.bf16_gemm_nt(a[:, :40], b[:, :40], out), ValueError, r"k: expected a multiple of 16 .*got 40"),
        (lambda: pk.bf16_gemm_nt(a.t().contiguous().t(), b, out), ValueError, "a: "),
        (lambda: pk.bf16_gemm_nt(a, b, out[:7]), ValueError, "out: expected shape"),
        (lambda: pk.bf16_gemm_nt(a, b, out, c=torch.zeros(8, 16)), ValueError, "c: accumulation .* float32 out"),
        (lambda: pk.bf16_gemm_nt(a, b, out.float(), c=torch.zeros(8, 16).bfloat16()), TypeError, "c: expected dtype"),
        (lambda: pk.bf16_gemm_nt(a, b, out.float(), c=torch.zeros(8, 8)), ValueError, "c: expected shape"),
        (lambda: pk.bf16_gemm_nt(a, b.to("meta"), out), ValueError, "b: "),
        (lambda: pk.bf16_gemm_nt(a, b, out, compiled_dims="xy"), ValueError, "compiled_dims: expected"),
        (lambda: pk.bf16_gemm_nt(a, b, out, backend="bogus"), ValueError, "backend: expected"),
    ]
    for call, kind, msg in cases:
        with pytest.raises(kind, match=msg):
            call()
    assert out.isnan().all()                                   # nothing written by a rejected call


def test_custom_op_and_fake():
    import pykernels.ops.gemm  # noqa: F401  (defines torch.ops.pykernels.bf16_gemm_nt)
    a, b = _operands(8, 16, 64)
    utils = ("test_faketensor", "test_autograd_registration")
    for args in ((a, b, torch.zeros(8, 16, dtype=torch.bfloat16), "reference"),
                 (a, b, torch.zeros(8, 16), "triton", torch.randn(8, 16), False),
                 (a, b, torch.randn(8, 16), "reference", None, True)):
        result = torch.library.opcheck(torch.ops.pykernels.bf16_gemm_nt.default, args, test_utils=utils)
        assert result == {u: "SUCCESS" for u in utils}, result
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fa, fb = torch.empty(8, 64, dtype=torch.bfloat16), torch.empty(16, 48, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="b: expected K = 64"):
            torch.ops.pykernels.bf16_gemm_nt(fa, fb, torch.empty(8, 16, dtype=torch.bfloat16), "reference")


def test_torch_compile_fullgraph(seed):
    a, b = _operands(8, 16, 64)

    def f(a, b):
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16)
        pk.bf16_gemm_nt(a, b, out, backend="reference")
        return out.float() * 2
    got = torch.compile(f, fullgraph=True, backend="eager")(a, b)
    assert torch.equal(got, R.bf16_gemm_nt(a, b).float() * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_gemm_call_form(backend, seed):
    import pykernels.compat.deep_gemm as deep_gemm
    m, n, k = 33, 64, 176
    a, b = _operands(m, n, k)
    d = torch.full((m, n), NAN, dtype=torch.bfloat16)
    assert deep_gemm.bf16_gemm_nt(a, b, d, backend=backend) is None
    _assert_matches_float64(d, a, b)
    c = torch.randn(m, n)
    d32 = torch.full((m, n), NAN)
    assert deep_gemm.bf16_gemm_nt(a, b, d32, c, "nk", backend=backend) is None       # d = c + a b^T
    _assert_matches_float64(d32, a, b, c)
    before = d32.clone()
    deep_gemm.bf16_gemm_nt(a, b, d32, d32, backend=backend)                         # d += a b^T
    _assert_matches_float64(d32, a, b, before)
    with pytest.raises(NotImplementedError, match="deep_gemm.bf16_gemm_nt: accumulation into c with a bfloat16 d"):
        deep_gemm.bf16_gemm_nt(a, b, d, c)


# ----------------------------------------------------------------------------- sm_90 compilation

def test_sm90_specs_compile_to_wgmma_and_run_on_the_emulator(seed):
    """The GPU launches' specializations compile for sm_90a (child process, no GPU needed):
    bf16 wgmma, no local memory (spills), within the registers and shared memory of an SM.
    One launch compiled as the GPU runs it (bf16 dots, hardware rounding) runs on the PTX
    emulator: M = 65 and N = 136 ragged against the 128x128 tile, K = 208 three full 64-wide
    steps through the 3-stage pipeline and a partial one; and float32 out (out += a b^T) in
    both of its tile widths."""
    import re

    from pykernels import emu
    from pykernels.triton import sm90
    specs = TB.sm90_compile_specs()
    assert all(s.constexprs["UPCAST"] is False and s.constexprs["SOFT"] is False for s in specs)
    assert {s.constexprs["BLOCK_M"] for s in specs} == {64, 128}
    m, n, k = 65, 136, 208
    a, b = _operands(m, n, k)
    out = torch.full((m, n), NAN, dtype=torch.bfloat16)
    # float32 out: N = 136 (64-column tiles, tile_config) and N = 144 (128 columns)
    b144 = torch.cat([b, _operands(1, 8, k)[1]])
    c136, c144 = torch.randn(m, n), torch.randn(m, n + 8)
    out136, out144 = c136.clone(), c144.clone()
    emulated = [sm90.spec_of(f"emu {m}x{n}x{k} bf16 out", TB.launch_args(a, b, out, upcast=False, soft=False)),
                sm90.spec_of(f"emu {m}x{n}x{k} float32 out", TB.launch_args(a, b, out136, upcast=False, soft=False)),
                sm90.spec_of(f"emu {m}x{n + 8}x{k} float32 out",
                             TB.launch_args(a, b144, out144, upcast=False, soft=False))]
    assert [s.constexprs["BLOCK_N"] for s in emulated] == [128, 64, 128]
    compiled = sm90.compile_sm90(specs + emulated, jobs=1)
    for spec, cc in zip(specs + emulated, compiled):
        assert re.search(r"wgmma\.mma_async\.\S*\.f32\.bf16\.bf16", cc.ptx), f"{spec.label}: no bf16 wgmma"
        assert cc.stack == 0, f"{spec.label}: {cc.stack} bytes of local memory (spills) per thread"
        assert cc.regs <= 255 and cc.shared <= 227 * 1024, (spec.label, cc.regs, cc.shared)
        print(f"{spec.label}: {cc.regs} regs, {cc.shared} B shared")
    for spec, cc in zip(emulated, compiled[len(specs):]):
        stats = emu.launch_triton(cc, spec.grid, *spec.args)
        assert stats.wgmma_issued > 0
    _assert_matches_float64(out, a, b)
    _assert_matches_float64(out136, a, b, c136)
    _assert_matches_float64(out144, a, b144, c144)


# ----------------------------------------------------------------------------- the cuda kernel

def _cuda_module():
    from pykernels.cuda import bf16_gemm as CB
    return CB


SCHEDULES = ["lockstep", "cta_first", "cta_last", "wg_first", "wg_last"]


def _kernel_cases():
    try:
        configs = _cuda_module().compiled_configs() + _cuda_module().compiled_configs(True)
    except (RuntimeError, KeyError):
        return []
    return [(c, sch) for c in configs for sch in SCHEDULES]


def test_entries_compiled():
    CB = _cuda_module()
    assert {c.function for c in CB.compiled_configs() + CB.compiled_configs(True)} == {
        "pk_bf16_gemm_nt_m128n128", "pk_bf16_gemm_nt_m64n64",
        "pk_bf16_gemm_nt_m128n128_f32acc", "pk_bf16_gemm_nt_m64n64_f32acc"}


@pytest.mark.parametrize("cfg, schedule", _kernel_cases(), ids=lambda v: getattr(v, "function", v))
def test_kernel_on_the_emulator_every_schedule(cfg, schedule, seed):
    """Ragged M and N (a partial tile each way: the TMA clips), K = 208: three 64-wide stages
    and a partial one through a ring of 2 stages (the producer waits on every empty barrier),
    2 CTAs for 6 tiles (each CTA's accumulator restarts per tile); bf16 out (TMA store) or
    float32 out = c + a b^T."""
    from pykernels.runtime.executors import run_emu
    CB = _cuda_module()
    m, n, k = 2 * cfg.block_m - 24, 2 * cfg.block_n + 8, 208
    a, b = _operands(m, n, k)
    if cfg.f32acc:
        c = torch.randn(m, n)
        out = c.clone()
    else:
        c, out = None, torch.full((m, n), NAN, dtype=torch.bfloat16)
    stats = run_emu(CB.plan(a, b, out, cfg, stages=2, sms=2), schedule=schedule)
    _assert_matches_float64(out, a, b, c)
    assert stats.global_written == m * n * out.element_size()


@pytest.mark.parametrize("f32acc", [False, True])
def test_shared_memory_formula_is_the_kernels(f32acc, seed):
    # the plan's size runs, one byte less traps (the kernel's Layout::smem_bytes), at two stage counts
    import dataclasses

    from pykernels.emu.errors import EmuError
    from pykernels.runtime.executors import run_emu
    CB = _cuda_module()
    for cfg in CB.compiled_configs(f32acc):
        a, b = _operands(64, 64, 128)
        for stages in (2, cfg.max_stages()):
            out = torch.zeros(64, 64) if f32acc else torch.full((64, 64), NAN, dtype=torch.bfloat16)
            plan = CB.plan(a, b, out, cfg, stages)
            assert plan.shared_bytes == cfg.smem_bytes(stages)
            with pytest.raises(EmuError, match="trap executed"):
                run_emu(dataclasses.replace(plan, shared_bytes=plan.shared_bytes - 1))
            run_emu(plan)
            _assert_matches_float64(out, a, b)


def test_sass_and_resources():
    """Per entry: four HGMMA 64xBNx16 bf16 (one K stage), two TMA loads per stage (A, B; no
    scales), the chain kept in flight (WARPGROUP.DEPBAR 1 in the loop, 0 after it); bf16 out by
    TMA store, float32 out by 8-byte read-add-writes; no local memory, no spill."""
    import re

    from pykernels.runtime import artifacts, sass
    CB = _cuda_module()
    listing = sass.sass(CB.MODULE)
    functions = {p.split()[0]: p for p in re.split(r"\n\s*Function : ", listing)[1:]}
    for cfg in CB.compiled_configs() + CB.compiled_configs(True):
        code = functions[cfg.function]
        ops = sass.opcodes(code)
        assert len(re.findall(rf"HGMMA\.64x{cfg.block_n}x16\.F32\.BF16", code)) == 4, cfg
        assert not re.search(r"QGMMA", code)
        assert ops["UTMALDG.2D"] == 2 and "UTMALDG.3D" not in ops
        assert sorted(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[01])", code)) == ["0x0", "0x1"]
        if cfg.f32acc:
            assert "UTMASTG.2D" not in ops and ops["LDG.E.64"] == ops["STG.E.64"] == 2 * cfg.block_n // 8
        else:
            assert ops["UTMASTG.2D"] == cfg.block_n // 16
        assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
        r = artifacts.resources(CB.MODULE, cfg.function)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0


def test_plan_rejects_what_the_kernel_cannot_take():
    CB = _cuda_module()
    a, b = _operands(8, 100, 64)
    with pytest.raises(ValueError, match="n: the cuda BF16 GEMM needs N to be a multiple of 8"):
        CB.plan(a, b, torch.empty(8, 100, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend: 'emu' cannot run .*n: the cuda BF16 GEMM"):
        pk.bf16_gemm_nt(a, b, torch.empty(8, 100, dtype=torch.bfloat16), backend="emu")
    cfg = CB.compiled_configs()[0]
    with pytest.raises(ValueError, match="cfg: .* writes bf16, out is torch.float32"):
        CB.plan(a, b[:96], torch.empty(8, 96), cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1, 7168, 2048), (130, 2112, 7168), (4096, 4096, 1040)])
def test_cuda_against_float64(m, n, k, seed):
    # the same kernel on a Hopper GPU: every compiled tile (cfg forced), bf16 and float32 out
    CB = _cuda_module()
    a, b = (t.cuda() for t in _operands(m, n, k))
    for cfg in CB.compiled_configs() + CB.compiled_configs(True):
        c = torch.randn(m, n, device="cuda") if cfg.f32acc else None
        out = c.clone() if cfg.f32acc else torch.full((m, n), NAN, dtype=torch.bfloat16, device="cuda")
        CB.bf16_gemm_nt(a, b, out, "cuda", cfg)
        torch.cuda.synchronize()
        _assert_matches_float64(out.cpu(), a.cpu(), b.cpu(), None if c is None else c.cpu())
    out = torch.full((m, n), NAN, dtype=torch.bfloat16, device="cuda")
    pk.bf16_gemm_nt(a, b, out)                                  # auto: the cuda kernel
    _assert_matches_float64(out.cpu(), a.cpu(), b.cpu())
