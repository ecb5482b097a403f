"""How the peer tests use the emulator's memory-ordering checker (pykernels.emu.ordering).

DeepGEMM's TMA-multicast pipelines release a stage of the peer CTA with
`mbarrier.arrive.shared::cluster.b64` (default semantics: .release.cta) and the producer
waits with `mbarrier.try_wait.parity.shared::cta.b64` (.acquire.cta). By the PTX memory
model a .cta-scoped release and acquire in different CTAs do not synchronise, so the
checker reports rule e there (docs/peers.md: what this means for DeepGEMM). The
correctness runs of those kernels therefore turn the checker off with that reason, and
test_deep_gemm_ordering.py pins the report: rule e at that wait, nothing else."""
import contextlib

import pytest

try:
    from pykernels.emu import ordering
except ImportError:                      # an emulator without the checker
    ordering = None

PEER_RELEASE_WAIT = "mbarrier.try_wait.parity.shared::cta"


def multicast_unchecked():
    """Context for correctness runs of DeepGEMM's multicast kernels: checker off."""
    if ordering is None:
        return contextlib.nullcontext()
    return ordering.checking("off", reason="DeepGEMM's cross-CTA stage release is .cta-scoped (rule e); "
                                           "pinned by tests/peers/test_deep_gemm_ordering.py")


def collecting():
    """Context in which every ordering violation is collected on the launch's Stats."""
    if ordering is None:
        pytest.skip("this emulator has no memory-ordering checker (pykernels.emu.ordering)")
    return ordering.checking("collect")


def is_cta_scoped_peer_release(v) -> bool:
    """The known report: rule e, the acquire being DeepGEMM's .cta-scoped producer wait."""
    return v.rule == "e" and PEER_RELEASE_WAIT in (v.detail or "")


def violations(stats) -> list:
    return list(getattr(stats, "ordering_violations", []))
