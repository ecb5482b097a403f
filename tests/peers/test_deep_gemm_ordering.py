"""DeepGEMM's kernels under the emulator's memory-ordering checker (collect mode), results
checked as in the other peer tests.

Without multicast (FP8 and BF16 GEMM in clusters of 1, MQA logits) the checker finds
nothing. With TMA multicast it reports rule e, and only that: the producer's acquire of
a stage released by the peer CTA is .cta-scoped (ordering_policy.py; docs/peers.md)."""
import pytest

from bench.peers import bf16_gemm as B
from bench.peers import deep_gemm as D
from bench.peers import mqa_logits as M

from .cases import prefill_windows, assert_bf16_gemm_matches_reference, assert_fp8_gemm_matches_reference, assert_mqa_logits_match_reference
from .ordering_policy import collecting, is_cta_scoped_peer_release, violations


def _fp8_cluster1(schedule):
    return assert_fp8_gemm_matches_reference(D.compile_fp8_gemm(128, 128, num_sms=2), 200, 256, 256, schedule)


def _bf16_cluster1(schedule):
    return assert_bf16_gemm_matches_reference(B.compile_bf16_gemm(128, 128, num_sms=2), 200, 256, 192, schedule)


def _mqa_logits(schedule):
    ks, ke, seq_len_kv = prefill_windows([5, 6], extra_kv=120)
    return assert_mqa_logits_match_reference(M.compile_mqa_logits(16, 128, block_q=4, block_kv=128, num_sms=2), ks, ke,
                          seq_len_kv + (-seq_len_kv) % 4, schedule)


@pytest.mark.parametrize("schedule", ["lockstep", "wg_last"])
@pytest.mark.parametrize("kernel", [_fp8_cluster1, _bf16_cluster1, _mqa_logits],
                         ids=["fp8_gemm", "bf16_gemm", "mqa_logits"])
def test_no_violation_without_multicast(kernel, schedule, deep_gemm_headers, seed):
    with collecting():
        stats = kernel(schedule)
    assert violations(stats) == [], "\n".join(map(str, violations(stats)))


def _assert_only_cta_scoped_peer_releases(stats, reported: bool):
    """Every report is the multicast's .cta-scoped peer release; `reported`: and one is made
    (a schedule that lets one CTA run ahead exposes it; lockstep may not)."""
    found = violations(stats)
    if reported:
        assert any(is_cta_scoped_peer_release(v) for v in found), "the .cta-scoped peer release was not reported"
    other = [v for v in found if not is_cta_scoped_peer_release(v)]
    assert other == [], "\n".join(map(str, other))


def test_bf16_multicast_reports_only_the_cta_scoped_peer_release(deep_gemm_headers, seed):
    with collecting():
        stats = assert_bf16_gemm_matches_reference(B.compile_bf16_gemm(128, 128, num_sms=2, cluster=2, stages=2), 300, 256, 256,
                              "cta_last")
    _assert_only_cta_scoped_peer_releases(stats, reported=True)


def test_fp8_multicast_reports_only_the_cta_scoped_peer_release(deep_gemm_headers, seed):
    with collecting():
        stats = assert_fp8_gemm_matches_reference(D.compile_fp8_gemm(128, 128, num_sms=2, cluster=2), 300, 256, 256, "lockstep")
    _assert_only_cta_scoped_peer_releases(stats, reported=False)
