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


def find_cuda_home() -> Path:
    """The CUDA toolkit (a folder with bin/nvcc and include/cuda.h): $CUDA_HOME, then
    /usr/local/cuda, then the folder above `nvcc` on PATH (nvcc may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in filter(None, candidates):
        if (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda.h").exists():
            return Path(c)
    return Path(candidates[0] or "/usr/local/cuda")


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
    cuda = find_cuda_home()
    if not (cuda / "bin" / "nvcc").exists():
        raise RuntimeError(f"nvcc not found under {cuda} (set CUDA_HOME): the sm_90a kernels "
                           "are compiled at install time; nvcc is needed even without a GPU")
    old = {}
    if (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text()).get("kernels", {})
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
                "kernels": dict(sorted(kernels.items()))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[2]
    build(here, here / "pykernels" / "_kernels")
