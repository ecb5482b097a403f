"""Which CUDA toolkit the build uses (kernel_build.find_cuda_home) and that NVIDIA's pip
toolkit and a system toolkit compile the same kernels (docs/build.md, "Two toolchains").

"Same": with equal nvcc versions (release and build string) the SASS of every entry
function is identical instruction by instruction, operands included, and ptxas reports
identical resources; the cubin files themselves differ only in the include paths that
-lineinfo records. With different versions: the same entry functions, the same stack and
spill bytes, and registers and instruction count each within 10% (compilers of one major
version reschedule, they should not change the kernel's shape); a larger change fails and
names the figures.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pykernels.runtime import kernel_build, sass

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = Path("/usr/local/cuda")
# one small kernel through each path: CUDA C++ (nvcc) and hand-written PTX (ptxas)
SAMPLES = [("ep_layout", ROOT / "csrc/ep/layout.cu", "cu"), ("quant_per_token", ROOT / "ptx/quant_per_token.ptx", "ptx")]
TOLERANCE = 0.10
_FUNCTION = re.compile(r"Function : (\S+)")
_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def _fake_toolkit(path: Path) -> Path:
    for f in kernel_build._TOOLKIT_FILES:
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        (path / f).write_text("")
    return path


@pytest.fixture
def no_explicit_home(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)


def test_explicit_cuda_home_wins_even_over_the_pip_toolkit(monkeypatch, tmp_path):
    fake_pip = _fake_toolkit(tmp_path / "pip")
    monkeypatch.setattr(kernel_build, "pip_cuda_home", lambda: fake_pip)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "mine"))
    assert kernel_build.find_cuda_home() == (tmp_path / "mine", "CUDA_HOME")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "other"))
    assert kernel_build.find_cuda_home() == (tmp_path / "other", "CUDA_PATH")


def test_pip_toolkit_before_the_system_one(monkeypatch, tmp_path, no_explicit_home):
    fake_pip = _fake_toolkit(tmp_path / "pip")
    monkeypatch.setattr(kernel_build, "pip_cuda_home", lambda: fake_pip)
    assert kernel_build.find_cuda_home() == (fake_pip, "pip")


def test_without_pip_toolkit_the_system_then_path(monkeypatch, tmp_path, no_explicit_home):
    monkeypatch.setattr(kernel_build, "pip_cuda_home", lambda: None)
    home, how = kernel_build.find_cuda_home()
    if kernel_build.is_toolkit(SYSTEM):
        assert (home, how) == (SYSTEM, "/usr/local/cuda")
    else:  # only a toolkit reached through nvcc on PATH is left
        fake = _fake_toolkit(tmp_path / "onpath")
        monkeypatch.setenv("PATH", str(fake / "bin"))
        (fake / "bin" / "nvcc").chmod(0o755)
        assert kernel_build.find_cuda_home() == (fake, "PATH")


def _pins(lines) -> dict:
    return dict(line.strip().split("==") for line in lines if line.strip().startswith("nvidia-") and "==" in line)


def test_build_requires_and_requirements_pin_the_same_toolkit():
    import tomllib
    build = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])
    cpu = _pins((ROOT / "requirements-cpu.txt").read_text().splitlines())
    assert build == cpu and {"nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime"} <= set(cpu)


def test_pip_toolkit_is_found_in_site_packages():
    home = kernel_build.pip_cuda_home()
    if home is None:
        pytest.skip("NVIDIA's nvcc wheels are not installed here (requirements-cpu.txt installs them)")
    assert home.name == "cu13" and home.parent.name == "nvidia" and kernel_build.is_toolkit(home)
    pin = _pins((ROOT / "requirements-cpu.txt").read_text().splitlines())["nvidia-cuda-nvcc"]
    assert kernel_build.toolkit_version(home).startswith(f"V{pin} ")
    # what the README's install finds with no CUDA_HOME and no nvcc on PATH
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not (Path(d) / "nvcc").exists())
    code = "import sys; sys.path.insert(0, 'pykernels/runtime'); import kernel_build as k; print(*k.find_cuda_home())"
    found = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.split() == [str(home), "pip"]


def test_pip_toolkit_reads_nothing_of_the_system_toolkit(tmp_path):
    """As if no toolkit were installed: every file the pip nvcc opens while compiling a
    kernel lies outside /usr/local/cuda (and whatever it links to)."""
    home, strace = kernel_build.pip_cuda_home(), shutil.which("strace")
    if home is None or strace is None or not SYSTEM.exists():
        pytest.skip(f"needs the pip toolkit ({home}), strace ({strace}) and a system toolkit to avoid")
    trace = tmp_path / "trace"
    name, src, kind = SAMPLES[0]
    proc = subprocess.run([strace, "-f", "-e", "trace=file", "-o", trace, home / "bin" / "nvcc", *kernel_build.CU_FLAGS,
                           "-I", ROOT / "csrc" / "include", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
                           "-o", tmp_path / f"{name}.cubin", src], capture_output=True, text=True)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    text = trace.read_text()
    assert "cicc" in text and "ptxas" in text  # the trace saw the compile
    touched = {str(SYSTEM), str(SYSTEM.resolve())}
    assert not [line for line in text.splitlines() if any(t + "/" in line or f'"{t}"' in line for t in touched)]


def test_build_without_a_toolkit_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=rf"no CUDA toolkit at {re.escape(str(tmp_path))} \(chosen by: "
                                           r"CUDA_HOME; missing bin/nvcc"):
        kernel_build.build(ROOT, tmp_path / "out", verbose=False)


def _functions(cubin: Path) -> dict:
    """entry function -> its SASS instructions (with operands, without addresses/encodings)."""
    listing = subprocess.run([sass.cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    funcs, current = {}, None
    for line in listing.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
        elif current is not None and (m := _LINE.search(line)):
            current.append(m.group(1))
    return funcs


def differences(a: dict, b: dict, same_version: bool) -> list:
    """How two builds of one kernel differ, by the rule of the module docstring.
    a, b: {"sass": {function: [instructions]}, "resources": {function: ptxas figures}}."""
    if set(a["sass"]) != set(b["sass"]) or set(a["resources"]) != set(b["resources"]):
        return [f"entry functions {sorted(a['sass'])} vs {sorted(b['sass'])}"]
    found = []
    for fn, code in a["sass"].items():
        ra, rb = a["resources"][fn], b["resources"][fn]
        if same_version:
            if code != b["sass"][fn]:
                first = next(i for i, (x, y) in enumerate(zip(code + [None], b["sass"][fn] + [None])) if x != y)
                found.append(f"{fn}: SASS differs from instruction {first}")
            if ra != rb:
                found.append(f"{fn}: resources {ra} vs {rb}")
            continue
        for key in ("stack_bytes", "spill_stores", "spill_loads"):
            if ra[key] != rb[key]:
                found.append(f"{fn}: {key} {ra[key]} vs {rb[key]}")
        for what, x, y in (("registers", ra["registers"], rb["registers"]),
                           ("instructions", len(code), len(b["sass"][fn]))):
            if abs(x - y) > TOLERANCE * max(x, y):
                found.append(f"{fn}: {what} {x} vs {y} (over {TOLERANCE:.0%})")
    return found


def test_differences_rule_can_fail():
    base = {"sass": {"k": ["IMAD R1, R2, R3, RZ", "EXIT"]},
            "resources": {"k": {"registers": 20, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}}}
    moved = {"sass": {"k": ["IMAD R1, R2, R4, RZ", "EXIT"]}, "resources": base["resources"]}
    assert differences(base, base, True) == [] and differences(base, moved, False) == []
    assert differences(base, moved, True) == ["k: SASS differs from instruction 0"]
    spilled = {"sass": base["sass"], "resources": {"k": dict(base["resources"]["k"], spill_stores=8)}}
    assert differences(base, spilled, False) == ["k: spill_stores 0 vs 8"]


@pytest.mark.parametrize("name,src,kind", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_pip_and_system_toolkits_compile_the_same_kernel(name, src, kind, tmp_path):
    pip_home = kernel_build.pip_cuda_home()
    if pip_home is None or not kernel_build.is_toolkit(SYSTEM):
        pytest.skip(f"needs both toolkits: pip {pip_home}, system {SYSTEM} "
                    f"({'present' if kernel_build.is_toolkit(SYSTEM) else 'absent'})")
    builds, versions = [], []
    for home in (pip_home, SYSTEM):
        out = tmp_path / home.name
        out.mkdir()
        entry = kernel_build._compile(name, src, kind, ROOT, out, home)
        builds.append({"sass": _functions(out / entry["cubin"]), "resources": entry["functions"]})
        versions.append(kernel_build.toolkit_version(home))
    assert builds[0]["sass"] and all(builds[0]["sass"].values())  # something was compared
    assert differences(*builds, same_version=versions[0] == versions[1]) == [], versions
