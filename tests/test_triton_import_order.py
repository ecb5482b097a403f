"""pykernels' Triton kernels run (interpreted on CPU tensors) whatever the import order,
without setting TRITON_INTERPRET and without changing how the user's own Triton kernels
run (pykernels/triton/jit_dispatch.py).

Each case is a child process with a clean environment (no TRITON_INTERPRET unless the
case sets it), as the suite's own process runs under TRITON_INTERPRET=1 (conftest.py).
Workload per child: the triton backend of fp8_gemm_nt, per_token_cast_to_fp8 and an MLA
decode (split schedule, so the combine kernel runs too) on small CPU problems, into
NaN-poisoned outputs, against the reference backend, then a launch that fails inside a
device function. Tolerances: the casts bit-exact; the GEMM calc_diff < 1e-6 (fp32
accumulation order; tests/test_triton_fp8.py); MLA calc_diff of out < 1e-5 and LSE max
abs error < 1e-4 (tests/test_mla.py); no NaN left anywhere. Without TRITON_INTERPRET,
every attribute of triton.language's modules and patched classes is the same object
after the workload as before it.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEMM_CALC_DIFF = 1e-6
MLA_CALC_DIFF = 1e-5
MLA_LSE_ABS = 1e-4

# The workload and its measurements, added to the child's `res` (printed as one JSON line:
# what the parent asserts).
_WORKLOAD = textwrap.dedent("""
    import json, os, sys
    import torch
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    import pykernels
    import pykernels.mla as M
    from pykernels.metrics import calc_diff
    from tests.fp8_cases import nan_bf16, normal_problem
    from tests.mla_cases import make_problem

    torch.manual_seed(int(sys.argv[1]))
    res["env"] = os.environ.get("TRITON_INTERPRET")


    def language_state():
        # every attribute of triton.language's modules and of the classes the interpreter patches
        owners = [m for n, m in sorted(sys.modules.items())
                  if m is not None and (n == "triton.language" or n.startswith("triton.language."))]
        owners += [tl.tensor, tl.dtype, tl.core.tensor_descriptor_base]
        return {(getattr(o, "__name__", ""), k): v for o in owners for k, v in list(vars(o).items())}


    before = language_state()

    x = torch.randn(33, 384) * 100
    q, sf = pykernels.per_token_cast_to_fp8(x, backend="triton")
    q_ref, sf_ref = pykernels.per_token_cast_to_fp8(x, backend="reference")
    res["cast_bits_equal"] = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    res["cast_scales_equal"] = torch.equal(sf, sf_ref)

    _, _, a, sfa, b, sfb = normal_problem(7, 256, 384)
    out = pykernels.fp8_gemm_nt((a, sfa), (b, sfb), nan_bf16(7, 256), backend="triton")
    ref = pykernels.fp8_gemm_nt((a, sfa), (b, sfb), nan_bf16(7, 256), backend="reference")
    res["gemm_nan"] = bool(torch.isnan(out.float()).any())
    res["gemm_calc_diff"] = float(calc_diff(out, ref))

    seqlens, s_q, h_q = [63, 300, 64], 2, 32
    qm, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 16)
    res["mla_split"] = bool((ns.diff() > 1).any())
    o = torch.full((3, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((3, h_q, s_q), float("nan"))
    M.flash_mla_with_kvcache(qm, cache, table, sl, 512, meta, ns, causal=True, backend="triton",
                             out=o, softmax_lse=lse)
    o_ref, lse_ref = M.flash_mla_with_kvcache(qm, cache, table, sl, 512, meta, ns, causal=True,
                                              backend="reference")
    res["mla_nan"] = bool(torch.isnan(o.float()).any() or torch.isnan(lse).any())
    res["mla_calc_diff"] = max(float(calc_diff(o[i], o_ref[i])) for i in range(3))
    res["mla_lse_abs"] = float((lse - lse_ref).abs().max())

    # a launch failing inside a device function (after tl.max ran): the language is put back
    from pykernels.triton import quant as TQ
    kernel, grid, args, cx, opts = TQ.per_token_launch_args(x, torch.empty_like(q), torch.empty_like(sf))
    try:
        kernel[grid](*args.values(), **dict(cx, FLOOR="not a number"), **opts)
        res["bad_launch_raised"] = False
    except Exception as e:
        res["bad_launch_raised"] = "cannot convert not a number" in str(e)

    import pykernels.triton as T
    res["triton_interpreted"] = T.INTERPRETED
    after = language_state()
    res["language_changed"] = sorted(f"{o}.{k}" for (o, k), v in before.items() if after.get((o, k)) is not v)
    res["max_is_jit_function"] = type(tl.standard.max) is JITFunction
    res["env_after"] = os.environ.get("TRITON_INTERPRET")
""")


def _child(tmp_path, source: str, seed: int, **env) -> dict:
    """Run `source` (a script printing one JSON line last) in a child process whose
    environment has no TRITON_INTERPRET except as given in `env`."""
    script = tmp_path / "child.py"
    script.write_text(source)
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    clean.update(env, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(script), str(seed)], cwd=ROOT, env=clean,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _assert_workload_matches_reference(res):
    assert res["cast_bits_equal"] and res["cast_scales_equal"]
    assert not res["gemm_nan"], "GEMM left output elements unwritten"
    assert res["gemm_calc_diff"] < GEMM_CALC_DIFF
    assert res["mla_split"], "case meant to exercise the combine kernel"
    assert not res["mla_nan"], "MLA decode left out / lse elements unwritten"
    assert res["mla_calc_diff"] < MLA_CALC_DIFF
    assert res["mla_lse_abs"] < MLA_LSE_ABS
    assert res["triton_interpreted"]
    assert res["bad_launch_raised"]


def test_triton_imported_before_pykernels(tmp_path, seed):
    # FlashMLA's tests import triton first: triton.language is then uninterpreted (tl.max a
    # JITFunction), and pykernels' kernels must still run interpreted on CPU tensors.
    src = ("import triton\nimport triton.language as tl\nfrom triton.runtime.jit import JITFunction\n"
           "assert type(tl.standard.max) is JITFunction\nres = {}\n" + _WORKLOAD + "print(json.dumps(res))\n")
    res = _child(tmp_path, src, seed)
    _assert_workload_matches_reference(res)
    assert res["env"] is None and res["env_after"] is None
    assert res["language_changed"] == [] and res["max_is_jit_function"]


_USER_KERNEL = textwrap.dedent("""
    import json, os, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction


    @triton.jit
    def user_row_max(x_ptr, out_ptr, N: tl.constexpr):
        row = tl.program_id(0)
        tl.store(out_ptr + row, tl.max(tl.load(x_ptr + row * N + tl.arange(0, N)), axis=0))


    def compiles_for_sm90():
        # the user's kernel as the compiler sees the language now (PTX for sm_90a, no GPU needed)
        src = ASTSource(user_row_max, {"x_ptr": "*fp32", "out_ptr": "*fp32", "N": "constexpr"}, {"N": 64})
        return ".entry user_row_max" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
""")


def test_import_leaves_user_triton_kernels_alone(tmp_path, seed):
    # Importing pykernels and running its Triton kernels on CPU tensors neither sets
    # TRITON_INTERPRET nor turns the user's @triton.jit kernel into an interpreted one, and
    # afterwards the language compiles the user's kernel (tl.max included) as before.
    src = _USER_KERNEL + textwrap.dedent("""
        import pykernels
        import pykernels.triton
        res = dict(env_after_import="TRITON_INTERPRET" in os.environ,
                   user_is_compiled=type(user_row_max) is JITFunction)
        """) + _WORKLOAD + textwrap.dedent("""
        res["user_compiles_after_run"] = compiles_for_sm90()

        @triton.jit
        def user_later(x_ptr):
            tl.store(x_ptr, tl.sum(tl.load(x_ptr + tl.arange(0, 16)), axis=0))
        res["user_later_is_compiled"] = type(user_later) is JITFunction
        print(json.dumps(res))
        """)
    res = _child(tmp_path, src, seed)
    _assert_workload_matches_reference(res)
    assert not res["env_after_import"] and res["env_after"] is None
    assert res["user_is_compiled"] and res["user_later_is_compiled"]
    assert res["language_changed"] == [] and res["user_compiles_after_run"]


def test_user_interpreter_choice_still_works(tmp_path, seed):
    # TRITON_INTERPRET=1 chosen by the user: every Triton kernel is interpreted (Triton's
    # own standard library too), pykernels' kernels run as before, the setting stays.
    src = ("import triton\nimport triton.language as tl\nfrom triton.runtime.interpreter import InterpretedFunction\n"
           "assert isinstance(tl.standard.max, InterpretedFunction)\nres = {}\n" + _WORKLOAD + "print(json.dumps(res))\n")
    res = _child(tmp_path, src, seed, TRITON_INTERPRET="1")
    _assert_workload_matches_reference(res)
    assert res["env"] == "1" and res["env_after"] == "1"
    assert not res["max_is_jit_function"]
