"""Compile every kernel source (csrc/**/*.cu and ptx/*.ptx) for sm_90a.

Standard library only: setup.py loads this file directly, before the package (and
torch) can be imported. For each source it writes into the output folder:
  <name>.cubin   machine code for sm_90a (what the GPU runs)
  <name>.ptx     PTX (what the emulator runs; for ptx/ sources, the source itself)
  <name>.log     ptxas -v output (registers, shared memory, spills per function)
and a manifest.json describing all of them. Sources whose content (and, for CUDA C++,
the shared headers) has not changed since the last build are not recompiled.
"""
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ARCH = "sm_90a"
MANIFEST = "manifest.json"
CU_FLAGS = ["-std=c++17", "-O3", "-lineinfo"]  # fast math is off unless asked for

_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


# What a folder must hold to compile the kernels: nvcc and its front end (cicc), ptxas,
# and the headers nvcc and csrc/host include (crt/ ships separately on PyPI).
_TOOLKIT_FILES = ("bin/nvcc", "bin/ptxas", "nvvm/bin/cicc", "include/cuda.h", "include/crt/host_config.h")


def is_toolkit(path) -> bool:
    return path is not None and all((Path(path) / f).exists() for f in _TOOLKIT_FILES)


def pip_cuda_home():
    """The toolkit NVIDIA's PyPI wheels (nvidia-cuda-nvcc, -crt, -runtime, nvidia-nvvm)
    unpack into site-packages/nvidia/cu13 (bin/, include/, nvvm/ as in a system toolkit),
    or None. Found through the `nvidia` namespace package of the running interpreter, so
    an isolated build finds the copy its [build-system] requires installed."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        if is_toolkit(Path(base) / "cu13"):
            return Path(base) / "cu13"
    return None


def find_cuda_home():
    """(toolkit folder, how it was chosen). Order: an explicit $CUDA_HOME / $CUDA_PATH (the
    user's choice wins, even when it holds no toolkit: the error then names it); else the
    pip toolkit when installed (pinned by this project in requirements-cpu.txt and
    pyproject's build requires, so builds are reproducible); else /usr/local/cuda; else
    the folder above `nvcc` on PATH (nvcc may be a wrapper). docs/build.md says why."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var]), var
    pip_home = pip_cuda_home()
    if pip_home is not None:
        return pip_home, "pip"
    if is_toolkit("/usr/local/cuda"):
        return Path("/usr/local/cuda"), "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc and is_toolkit(Path(nvcc).resolve().parent.parent):
        return Path(nvcc).resolve().parent.parent, "PATH"
    return Path("/usr/local/cuda"), "none found"


def toolkit_version(cuda: Path) -> str:
    """nvcc's release and build (e.g. 'V13.0.88 cuda_13.0.r13.0/compiler.36424714_0'): equal
    strings compile to the same SASS, so unchanged sources need no rebuild."""
    out = subprocess.run([cuda / "bin" / "nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release [\d.]+, (V[\d.]+)", out)
    build = re.search(r"Build (\S+)", out)
    return " ".join(m.group(1) for m in (release, build) if m)


def parse_ptxas_log(text: str) -> dict:
    """Per entry function: registers, barriers, shared bytes (static), stack, spills."""
    funcs, current = {}, None
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            current = funcs.setdefault(m.group(1), {"registers": 0, "barriers": 0, "shared_bytes": 0,
                                                    "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                           shared_bytes=int(m.group(3) or 0))
    return funcs


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def discover(root: Path):
    """(name, source, kind) for every kernel source under csrc/ (not host/) and ptx/."""
    found = []
    for src in sorted((root / "csrc").rglob("*.cu")):
        rel = src.relative_to(root / "csrc")
        if rel.parts[0] in ("host", "include"):
            continue
        found.append(("_".join(rel.with_suffix("").parts), src, "cu"))
    for src in sorted((root / "ptx").glob("*.ptx")):
        found.append((src.stem, src, "ptx"))
    return found


def _run(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(map(str, cmd))}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _compile(name, src, kind, root, out, cuda):
    cubin, ptx, log = out / f"{name}.cubin", out / f"{name}.ptx", out / f"{name}.log"
    if kind == "ptx":
        text = _run([cuda / "bin" / "ptxas", f"-arch={ARCH}", "-v", "-o", cubin, src], f"ptxas {src.name}")
        shutil.copyfile(src, ptx)
    else:
        inc = ["-I", root / "csrc" / "include"]
        gencode = f"-gencode=arch=compute_90a,code={ARCH}"
        text = _run([cuda / "bin" / "nvcc", *CU_FLAGS, *inc, gencode, "-cubin", "-Xptxas", "-v",
                     "-o", cubin, src], f"nvcc {src.name}")
        _run([cuda / "bin" / "nvcc", *CU_FLAGS, *inc, "-gencode=arch=compute_90a,code=compute_90a",
              "-ptx", "-o", ptx, src], f"nvcc -ptx {src.name}")
    log.write_text(text)
    return {"source": str(src.relative_to(root)), "kind": kind, "cubin": cubin.name,
            "ptx": ptx.name, "log": log.name, "functions": parse_ptxas_log(text)}


def build(root: Path, out: Path, jobs: int = 2, verbose: bool = True) -> dict:
    """Compile what changed; write and return the manifest."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda, how = find_cuda_home()
    if not is_toolkit(cuda):
        missing = [f for f in _TOOLKIT_FILES if not (cuda / f).exists()]
        raise RuntimeError(f"no CUDA toolkit at {cuda} (chosen by: {how}; missing {', '.join(missing)}): the "
                           "sm_90a kernels are compiled at install time, even without a GPU. Install "
                           "requirements-cpu.txt (NVIDIA's nvcc wheels) or set CUDA_HOME to a toolkit")
    version = toolkit_version(cuda)
    old = {}
    if (out / MANIFEST).exists():
        prev_manifest = json.loads((out / MANIFEST).read_text())
        if prev_manifest.get("toolkit", {}).get("version") == version:  # another nvcc: rebuild all
            old = prev_manifest.get("kernels", {})
    headers = sorted((root / "csrc" / "include").rglob("*.cuh"))
    jobs_todo, kernels = [], {}
    for name, src, kind in discover(root):
        digest = _digest([src] + (headers if kind == "cu" else []))
        prev = old.get(name)
        if prev and prev.get("sha256") == digest and (out / prev["cubin"]).exists():
            kernels[name] = prev
        else:
            jobs_todo.append((name, src, kind, digest))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_compile, n, s, k, root, out, cuda): (n, d) for n, s, k, d in jobs_todo}
        for fut in concurrent.futures.as_completed(futures):
            n, d = futures[fut]
            kernels[n] = dict(fut.result(), sha256=d)
            if verbose:
                print(f"pykernels: compiled {n} for {ARCH}", file=sys.stderr)
    manifest = {"arch": ARCH, "nvcc": str(cuda / "bin" / "nvcc"),
                "toolkit": {"home": str(cuda), "chosen_by": how, "version": version},
                "kernels": dict(sorted(kernels.items()))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[2]
    build(here, here / "pykernels" / "_kernels")
