"""The compiled kernels shipped in the package (pykernels/_kernels, built by setup.py)."""
import functools
import json
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent.parent / "_kernels"


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    """The build manifest: {"arch", "nvcc", "kernels": {name: {...}}}."""
    path = KERNEL_DIR / "manifest.json"
    if not path.exists():
        raise RuntimeError(f"pykernels: no compiled kernels at {KERNEL_DIR}; build the package "
                           "first (pip install --no-build-isolation -e .)")
    return json.loads(path.read_text())


def _entry(name: str) -> dict:
    kernels = manifest()["kernels"]
    if name not in kernels:
        raise KeyError(f"kernel module {name!r} was not built; built: {', '.join(sorted(kernels))}")
    return kernels[name]


def cubin_path(name: str) -> Path:
    return KERNEL_DIR / _entry(name)["cubin"]


def ptx_path(name: str) -> Path:
    return KERNEL_DIR / _entry(name)["ptx"]


@functools.lru_cache(maxsize=None)
def ptx_text(name: str) -> str:
    return ptx_path(name).read_text()


def resources(name: str, function: str) -> dict:
    """ptxas -v figures of one entry function: registers, barriers, shared_bytes,
    stack_bytes, spill_stores, spill_loads."""
    funcs = _entry(name)["functions"]
    if function not in funcs:
        raise KeyError(f"{name}: no entry function {function!r}; has {', '.join(funcs)}")
    return funcs[function]
