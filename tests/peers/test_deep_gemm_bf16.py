"""DeepGEMM's SM90 BF16 GEMM (NT, bf16 out) from the sgl-deep-gemm headers, launched by
bench.peers on the emulator against the float32 product rounded to bf16, with
NaN-poisoned outputs (cases.py: checks and tolerance)."""
import pytest

from bench.peers import bf16_gemm as B

from .cases import assert_bf16_gemm_matches_reference
from .ordering_policy import multicast_unchecked


# 128x128 tiles, 2 CTAs, a partial m-block; K = 320: 5 K blocks through a ring of 6.
@pytest.mark.parametrize("schedule", ["lockstep", "wg_first", "wg_last"])
def test_bf16_gemm_cluster1(schedule, deep_gemm_headers, seed):
    assert_bf16_gemm_matches_reference(B.compile_bf16_gemm(128, 128, num_sms=2), 200, 256, 320, schedule)


# B multicast across a cluster of 2 with 3 m-blocks (the odd one without a partner) and a
# 2-stage ring, one CTA running ahead of its peer.
@pytest.mark.parametrize("schedule", ["cta_first", "cta_last"])
def test_bf16_gemm_cluster2_multicast_b(schedule, deep_gemm_headers, seed):
    with multicast_unchecked():
        assert_bf16_gemm_matches_reference(B.compile_bf16_gemm(128, 128, num_sms=2, cluster=2, stages=2), 300, 256, 256, schedule)
