"""Compile a peer project's CUDA templates to sm_90a PTX for the emulator, cached by content.

The peer's headers come from an installed wheel (`sgl-deep-gemm` ships DeepGEMM's kernels
and the CUTLASS/CuTe headers under deep_gemm/include). The wheel is found without
importing it: importing deep_gemm loads a CUDA extension this machine cannot run.
"""
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import tempfile

from pykernels.runtime import kernel_build

DEEP_GEMM_DIST = "sgl-deep-gemm"
INSTALL_HINT = "pip install --no-deps -r requirements-peers.txt"
NVCC_FLAGS = ("-std=c++20", "-gencode=arch=compute_90a,code=compute_90a", "-ptx", "-O3",
              "--expt-relaxed-constexpr", "--expt-extended-lambda")


class PeerMissing(RuntimeError):
    """The peer's headers or nvcc are not on this machine (tests skip with this message)."""


@dataclasses.dataclass(frozen=True)
class PeerHeaders:
    include: str      # the folder to put on the include path
    dist: str         # distribution name
    version: str
    record_hash: str  # sha256 of the wheel's RECORD: changes whenever any shipped file does


@functools.lru_cache(maxsize=None)
def deep_gemm_headers() -> PeerHeaders:
    """DeepGEMM's include folder in the installed `sgl-deep-gemm` wheel; PeerMissing if absent."""
    spec = importlib.util.find_spec("deep_gemm")
    try:
        dist = importlib.metadata.distribution(DEEP_GEMM_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if spec is None or dist is None or not spec.submodule_search_locations:
        raise PeerMissing(f"DeepGEMM's headers are not installed ({DEEP_GEMM_DIST}): {INSTALL_HINT}")
    include = os.path.join(list(spec.submodule_search_locations)[0], "include")
    impl = os.path.join(include, "deep_gemm", "impls", "sm90_fp8_gemm_1d2d.cuh")
    if not os.path.isfile(impl):
        raise PeerMissing(f"{DEEP_GEMM_DIST} {dist.version} has no {impl}: expected the wheel with "
                          "deep_gemm/include (SM90 kernel headers)")
    record = dist.read_text("RECORD") or ""
    return PeerHeaders(include, DEEP_GEMM_DIST, dist.version, hashlib.sha256(record.encode()).hexdigest())


def cuda_home() -> str:
    """The toolkit our own kernels build with (kernel_build.find_cuda_home: $CUDA_HOME, the
    pinned pip nvcc, /usr/local/cuda, PATH), so peers and ours compile with the same nvcc."""
    return str(kernel_build.find_cuda_home()[0])


def nvcc() -> str:
    path = os.path.join(cuda_home(), "bin", "nvcc")
    if not os.access(path, os.X_OK):
        raise PeerMissing(f"nvcc not found at {path} (kernel_build.find_cuda_home; set CUDA_HOME)")
    return path


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def cache_dir() -> str:
    """PTX cache outside the repository: $PK_PEER_CACHE or ~/.cache/pykernels/peers."""
    d = os.environ.get("PK_PEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pykernels", "peers")
    os.makedirs(d, exist_ok=True)
    return d


@dataclasses.dataclass(frozen=True)
class PeerPTX:
    """One compiled instantiation: the PTX module text and its single kernel entry."""
    ptx: str
    entry: str
    key: str          # content hash (source, flags, headers, nvcc)
    path: str         # cached .ptx file


def compile_to_ptx(source: str, headers: PeerHeaders) -> PeerPTX:
    """nvcc `source` (a .cu text that #includes the peer's headers and instantiates exactly
    one kernel) to compute_90a PTX; reuses the cached PTX when the same source, flags,
    wheel contents and nvcc were compiled before."""
    flags = list(NVCC_FLAGS) + [f"-I{headers.include}", f"-I{os.path.join(cuda_home(), 'include')}"]
    key = hashlib.sha256("\n".join([source, *NVCC_FLAGS, headers.version, headers.record_hash,
                                    nvcc_version()]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{key}.ptx")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(prefix="pk_peer_") as tmp:
            cu, out = os.path.join(tmp, "peer.cu"), os.path.join(tmp, "peer.ptx")
            with open(cu, "w") as f:
                f.write(source)
            proc = subprocess.run([nvcc(), *flags, cu, "-o", out], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on a peer instantiation:\n{source}\n{proc.stderr[-4000:]}")
            staged = f"{path}.{os.getpid()}.tmp"
            _copy(out, staged)
            os.replace(staged, path)         # atomic: concurrent compiles of one key are harmless
    with open(path) as f:
        ptx = f.read()
    entries = re.findall(r"^\s*(?:\.visible\s+)?\.entry\s+(\w+)\s*\(", ptx, flags=re.M)
    if len(entries) != 1:
        raise RuntimeError(f"{path}: expected one kernel entry, found {entries}")
    return PeerPTX(ptx, entries[0], key, path)


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
