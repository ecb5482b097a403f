"""Disassemble the shipped cubins (cuobjdump from the Triton wheel, or CUDA's own) so
tests can assert the instructions a kernel was meant to contain."""
import collections
import functools
import re
import shutil
import subprocess
from pathlib import Path

from . import artifacts

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def cuobjdump() -> Path:
    """Path of cuobjdump: Triton's bundled copy first, then the CUDA toolkit's, then PATH."""
    candidates = []
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError("cuobjdump not found (it ships in the Triton wheel under "
                            "triton/backends/nvidia/bin)")


@functools.lru_cache(maxsize=None)
def sass(module: str) -> str:
    """SASS listing of a kernel module's cubin."""
    out = subprocess.run([cuobjdump(), "-sass", artifacts.cubin_path(module)],
                         capture_output=True, text=True, check=True)
    return out.stdout


def opcodes(listing: str) -> collections.Counter:
    """Opcode (with modifiers, e.g. 'F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C') -> count."""
    return collections.Counter(m.group(2) for m in _INSTR.finditer(listing))
