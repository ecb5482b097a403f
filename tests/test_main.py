"""The main job (`python -m pykernels`): its table, its exit status, its --help."""
import subprocess
import sys

import torch

from pykernels import registry, selfcheck


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


def _replace_run(monkeypatch, op, name, run):
    o = registry.get(op)
    monkeypatch.setitem(o.backends, name, registry.Backend(name, o.backends[name].supports, run))


def test_a_wrong_backend_is_reported_as_fail(monkeypatch):
    # A backend returning wrong numbers must turn into FAIL, not PASS.
    def broken(p):
        p.out.copy_(torch.randn_like(p.out, dtype=torch.float32))
    _replace_run(monkeypatch, "fp8_gemm_nt", "triton", broken)
    rows = selfcheck.run_all(torch.device("cpu"), ["triton"], {"fp8_gemm_nt"})
    assert [r.verdict for r in rows] == ["FAIL"]


def test_an_exception_is_reported_as_error(monkeypatch):
    def boom(p):
        raise RuntimeError("kernel exploded")
    _replace_run(monkeypatch, "per_token_cast_to_fp8", "triton", boom)
    rows = selfcheck.run_all(torch.device("cpu"), ["triton"], {"per_token_cast_to_fp8"})
    assert rows[0].verdict == "ERROR" and "kernel exploded" in rows[0].error
    assert "ERROR" in selfcheck.format_table(rows)


def test_ep_rows_on_cpu(monkeypatch):
    # the EP row runs both ranks' intranode kernels on the emulator against the reference;
    # triton needs a process group (n/a in one process); a broken combine turns into FAIL
    rows = selfcheck.run_all(torch.device("cpu"), ["reference", "emu", "triton"], {"ep_dispatch_combine"})
    assert [(r.backend, r.verdict) for r in rows] == [("reference", "PASS"), ("emu", "PASS"), ("triton", "n/a here")]
    assert "bit-exact" in rows[1].error and "process group" in rows[2].error
    from pykernels.cuda import ep as cep
    real = cep.LocalNode.combine

    def off_by_one(self, *a, **k):
        return [o + 1 for o in real(self, *a, **k)]
    monkeypatch.setattr(cep.LocalNode, "combine", off_by_one)
    assert [r.verdict for r in selfcheck.run_all(torch.device("cpu"), ["emu"], {"ep_dispatch_combine"})] == ["FAIL"]
