"""Peer-kernel tests skip, with the reason, where DeepGEMM's headers or nvcc are missing."""
import pytest

from bench.peers import toolchain

SCHEDULES = ("lockstep", "cta_first", "cta_last", "wg_first", "wg_last")


@pytest.fixture(scope="session")
def deep_gemm_headers():
    try:
        headers = toolchain.deep_gemm_headers()
        toolchain.nvcc_version()
    except toolchain.PeerMissing as e:
        pytest.skip(str(e))
    return headers
