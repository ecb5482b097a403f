"""DeepGEMM's SM90 BF16 GEMM (NT, bf16 out) from the sgl-deep-gemm headers, launched by
bench.peers on the emulator against the float32 product rounded to bf16, with
NaN-poisoned outputs.

Tolerance: calc_diff < 1e-5 (the emulator's wgmma sums are exact; the remaining difference
is float32 accumulation order against torch's: ~1e-12 observed; an unrounded comparison
would show bf16's own ~1e-6)."""
import pytest
import torch

from bench.peers import bf16_gemm as B
from pykernels.metrics import calc_diff

TOL = 1e-5


def _run(compiled, m, n, k, schedule):
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    stats = B.launch_bf16_gemm(compiled, a, b, out, schedule=schedule)
    assert not out.isnan().any(), "output elements left unwritten"
    diff = calc_diff(out, (a.float() @ b.float().T).bfloat16())
    assert diff < TOL, f"calc_diff {diff}"
    cfg = compiled.config
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert stats.global_written == m * n * 2
    assert stats.wgmma == tiles * (-(-k // B.BLOCK_K)) * (B.BLOCK_K // 16) * (cfg.math_threads // 128)


# 128x128 tiles, 2 CTAs, a partial m-block; K = 320: 5 K blocks through a ring of 6.
@pytest.mark.parametrize("schedule", ["lockstep", "wg_first", "wg_last"])
def test_bf16_gemm_cluster1(schedule, deep_gemm_headers, seed):
    _run(B.compile_bf16_gemm(128, 128, num_sms=2), 200, 256, 320, schedule)


# B multicast across a cluster of 2 with 3 m-blocks (the odd one without a partner) and a
# 2-stage ring, one CTA running ahead of its peer.
@pytest.mark.parametrize("schedule", ["cta_first", "cta_last"])
def test_bf16_gemm_cluster2_multicast_b(schedule, deep_gemm_headers, seed):
    _run(B.compile_bf16_gemm(128, 128, num_sms=2, cluster=2, stages=2), 300, 256, 256, schedule)
