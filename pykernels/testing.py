"""DeepGEMM's `deep_gemm.testing` names that its GEMM tests use, for `import pykernels as
deep_gemm` (docs/compat.md). Its benchmark helpers (bench, bench_kineto) are not here."""
from .metrics import calc_diff

__all__ = ["calc_diff", "count_bytes", "get_arch_major"]


def _tensors(items):
    for t in items:
        if isinstance(t, (tuple, list)):
            yield from _tensors(t)
        elif t is not None:
            yield t


def count_bytes(*tensors) -> int:
    """Bytes held by the given tensors (nested tuples and lists opened, None skipped)."""
    return sum(t.numel() * t.element_size() for t in _tensors(tensors))


def get_arch_major() -> int:
    """9: pykernels implements DeepGEMM's Hopper (SM90) semantics on every device and
    backend, so DeepGEMM's tests take their SM90 paths (float32 scales, no UE8M0)."""
    return 9
