"""The package runs without a compiler: first calls compile nothing (every CUDA compiler is a
trip-wire, bench/startup.py), and a wheel built by `pip wheel` holds _C, every cubin, PTX and
the manifest, installs into a fresh virtual environment and passes `python -m pykernels`
there with no toolkit reachable (docs/build.md)."""
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import startup
from pykernels.runtime import kernel_build

ROOT = Path(__file__).resolve().parents[1]
# what a build leaves in the tree, and results: not sources of the wheel
_NOT_SOURCE = shutil.ignore_patterns(".git", "_kernels", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     ".pytest_cache", ".ruff_cache", ".peer_ptx", "results", ".benchmarks")


def test_trip_wire_records_a_compiler_call(tmp_path):
    """Control for the checks below: a child that looks for nvcc as the build does, or for
    ptxas as Triton does before a GPU compile, is logged."""
    env = startup.trip_wire(tmp_path)
    code = ("import sys; sys.path.insert(0, 'pykernels/runtime'); import kernel_build as k\n"
            "try: k.toolkit_version(k.find_cuda_home()[0])\nexcept Exception: pass\n"
            "from triton import knobs; knobs.nvidia.ptxas")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, check=True)
    calls = startup.compiler_calls(tmp_path)
    assert calls[0] == "nvcc --version" and "ptxas --version" in calls, calls


def test_first_calls_compile_nothing(tmp_path):
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, "-m", "bench.startup", "--repeats", "1", "--families", "quant,gemm",
                           "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["compiler_calls"] == [] and all(c["compiler_calls"] == [] for c in res["first_calls"])
    backends = {c["backend"] for c in res["first_calls"]}
    assert {"reference", "triton"} <= backends and len(res["first_calls"]) >= 4, res["first_calls"]
    assert all(c["first_call_s"] > 0 and c["second_call_s"] > 0 for c in res["first_calls"])
    assert res["machine"]["source"].startswith("measured on")


def _wheel_members_expected(names) -> set:
    """Every kernel source's cubin, PTX and log, the manifest and the extension."""
    kernels = {f"pykernels/_kernels/{n}.{ext}" for n, _, _ in kernel_build.discover(ROOT) for ext in ("cubin", "ptx")}
    ext = {n for n in names if n.startswith("pykernels/_C.") and n.endswith(".so")}
    assert len(ext) == 1, f"pykernels._C in the wheel: {sorted(ext)}"
    return kernels | ext | {"pykernels/_kernels/manifest.json"}


@pytest.mark.slow
def test_wheel_installs_and_runs_without_a_compiler(tmp_path):
    # 1. build the wheel from a copy of the sources, the way `pip wheel .` does (isolated
    #    build: the nvcc wheels of [build-system] requires, no system toolkit needed)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", tmp_path / "dist"],
                           env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("pykernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = _wheel_members_expected(names) - names
        assert not missing, f"not in the wheel: {sorted(missing)}"
        manifest = json.loads(z.read("pykernels/_kernels/manifest.json"))
    assert manifest["toolkit"]["chosen_by"] == "pip", manifest["toolkit"]   # the isolated build's nvcc
    assert set(manifest["kernels"]) == {n for n, _, _ in kernel_build.discover(ROOT)}

    # 2. a fresh venv that sees this interpreter's site-packages (torch, Triton) through a
    #    .pth path entry: unlike --system-site-packages, that does not run the editable
    #    install's finder, which would import /work/main's pykernels instead of the wheel's
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True,
                   capture_output=True)

    # 3. run it with every compiler a trip-wire, from a folder with no sources
    wire = tmp_path / "wire"
    run_env = startup.trip_wire(wire)
    run_env.pop("PYTHONPATH", None)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import pykernels, pykernels.runtime.artifacts as a; "
                            "print(pykernels.__file__); print(a.cubin_path('gemm_fp8_gemm'))"],
                           env=run_env, cwd=work, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(purelib) for p in where), where  # the wheel's copy, not the tree's
    assert Path(where[1]).is_file() and Path(where[1]).read_bytes()[:4] == b"\x7fELF"
    main = subprocess.run([py, "-m", "pykernels"], env=run_env, cwd=work, capture_output=True, text=True,
                          timeout=1200)
    assert main.returncode == 0, main.stdout[-4000:] + main.stderr[-4000:]
    assert " 0 failed" in main.stdout
    assert startup.compiler_calls(wire) == []
