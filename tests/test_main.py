"""The main job (`python -m pykernels`): its table, its exit status, its --help."""
import subprocess
import sys

import torch

from pykernels import selfcheck
from pykernels.runtime import ops


def test_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "pykernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in ("--ops", "--backends", "--device", "--no-bench", "--bench-args"):
        assert opt in out.stdout


def test_main_job_runs_and_passes_on_cpu():
    out = subprocess.run([sys.executable, "-m", "pykernels", "--ops", "per_token_cast_to_fp8,fp8_gemm_nt",
                          "--backends", "reference,triton"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith(("per_token", "fp8_gemm_nt"))]
    assert len(lines) == 4 and all("PASS" in l for l in lines), out.stdout


def test_a_wrong_backend_is_reported_as_fail(monkeypatch):
    # A backend returning wrong numbers must turn into FAIL, not PASS.
    def broken(a, sfa, b, sfb, out):
        out.copy_(torch.randn_like(out, dtype=torch.float32))
        return out
    monkeypatch.setitem(ops.IMPLS["fp8_gemm_nt"], "triton", broken)
    rows = selfcheck.run_all(torch.device("cpu"), ["triton"], {"fp8_gemm_nt"})
    assert [r.verdict for r in rows] == ["FAIL"]


def test_an_exception_is_reported_as_error(monkeypatch):
    def boom(x):
        raise RuntimeError("kernel exploded")
    monkeypatch.setitem(ops.IMPLS["per_token_cast_to_fp8"], "triton", boom)
    rows = selfcheck.run_all(torch.device("cpu"), ["triton"], {"per_token_cast_to_fp8"})
    assert rows[0].verdict == "ERROR" and "kernel exploded" in rows[0].error
    assert "ERROR" in selfcheck.format_table(rows)
