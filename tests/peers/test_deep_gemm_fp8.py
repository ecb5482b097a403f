"""DeepGEMM's SM90 FP8 1D2D GEMM (from the sgl-deep-gemm wheel's headers, instantiated and
launched by bench.peers) on the emulator against pykernels.reference.fp8_gemm_nt, under
every emulator schedule, with NaN-poisoned outputs (cases.py: checks and tolerance)."""
import contextlib

import pytest
import torch

from bench.peers import deep_gemm as D

from .cases import fp8_gemm_problem, nan_out, assert_fp8_contiguous_matches_reference, assert_fp8_gemm_matches_reference, assert_fp8_masked_matches_reference
from .conftest import SCHEDULES
from .ordering_policy import multicast_unchecked


# Normal (cluster 1): 128x128 tiles, 2 persistent CTAs; 200 rows = a partial m-block, 4 K blocks.
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fp8_gemm_cluster1(schedule, deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2)
    assert_fp8_gemm_matches_reference(compiled, 200, 256, 512, schedule)


# TMA multicast of B across a cluster of 2 (rank 0 loads the B tile into both CTAs; each
# stage is released by the math warps of both). 3 m-blocks: the last pair has no partner,
# which the kernel's scheduler turns into non-multicast loads.
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fp8_gemm_cluster2_multicast_b(schedule, deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2, cluster=2)
    with multicast_unchecked():
        assert_fp8_gemm_matches_reference(compiled, 300, 384, 512, schedule)


# Multicast of A (two n-blocks share the A tile) with 160-column tiles that straddle two
# 128-column B-scale blocks; 4 CTAs, 3 n-blocks (an odd group) and one partial m-block.
@pytest.mark.parametrize("schedule", ["lockstep", "cta_first", "cta_last"])
def test_fp8_gemm_cluster2_multicast_a_unaligned_n(schedule, deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(128, 160, num_sms=4, cluster=2, multicast_on_a=True)
    with multicast_unchecked():
        assert_fp8_gemm_matches_reference(compiled, 130, 480, 256, schedule)


# 256-row tiles (two 128-row waves per math warpgroup pair, 3 stages), a partial m-block.
def test_fp8_gemm_block_m256(deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(256, 128, num_sms=2)
    assert compiled.config.stages == 3
    assert_fp8_gemm_matches_reference(compiled, 300, 256, 256, "wg_last")


# 64-row tiles: one math warpgroup; compiled N and K (DeepGEMM's default 'nk' constants).
def test_fp8_gemm_block_m64_compiled_nk(deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(64, 64, num_sms=2, shape_n=192, shape_k=384)
    assert compiled.config.math_threads == 128
    assert_fp8_gemm_matches_reference(compiled, 70, 192, 384, "wg_last")
    a, sfa, b, sfb = fp8_gemm_problem(70, 128, 384)
    with pytest.raises(ValueError, match="shape_n"):
        D.launch_fp8_gemm(compiled, a, sfa, b, sfb, nan_out(70, 128))


# M-grouped, contiguous (MoE prefill): groups of 130, 0, 100 rows padded to 128-row blocks.
# With B multicast the pair's blocks may hold different groups (then no multicast) and an
# all-padding block is added so that the blocks pair up.
@pytest.mark.parametrize("cluster,schedule", [(1, "lockstep"), (1, "wg_last"), (2, "cta_first")])
def test_fp8_gemm_contiguous(cluster, schedule, deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2, cluster=cluster, kind="contiguous", num_groups=3)
    with multicast_unchecked() if cluster == 2 else contextlib.nullcontext():
        assert_fp8_contiguous_matches_reference(compiled, [130, 0, 100], 256, 256, schedule, pad_blocks=cluster - 1)


# M-grouped, masked (MoE decode): m_max 256; a group of 200 rows (two blocks), an empty
# one, one of 7 rows (one block, of which one math warpgroup has no rows).
@pytest.mark.parametrize("cluster,schedule", [(1, "lockstep"), (1, "wg_first"), (2, "cta_last")])
def test_fp8_gemm_masked(cluster, schedule, deep_gemm_headers, seed):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2, cluster=cluster, kind="masked", num_groups=3)
    with multicast_unchecked() if cluster == 2 else contextlib.nullcontext():
        assert_fp8_masked_matches_reference(compiled, [200, 0, 7], 256, 256, 256, schedule)


def test_grouped_layout_is_checked(deep_gemm_headers):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2, kind="contiguous", num_groups=2)
    a, sfa, b, sfb = fp8_gemm_problem(256, 128, 128)
    b2, sfb2 = torch.stack([b, b]), torch.stack([sfb, sfb])
    mixed = torch.cat([torch.zeros(64), torch.ones(192)]).int()          # two groups in one block
    with pytest.raises(ValueError, match="grouped_layout"):
        D.launch_fp8_gemm(compiled, a, sfa, b2, sfb2, nan_out(256, 128), mixed)
    late = torch.cat([torch.full((10,), -1), torch.zeros(246)]).int()    # padding before rows
    with pytest.raises(ValueError, match="grouped_layout"):
        D.launch_fp8_gemm(compiled, a, sfa, b2, sfb2, nan_out(256, 128), late)
    with pytest.raises(ValueError, match="whole blocks"):
        D.launch_fp8_gemm(compiled, a[:200], sfa[:200], b2, sfb2, nan_out(200, 128), mixed[:200])


def test_column_major_sfa_is_read_in_place(deep_gemm_headers, seed):
    m, n, k = 130, 128, 256
    a, sfa, b, sfb = fp8_gemm_problem(m, n, k)
    m_pad = (m + 3) // 4 * 4
    col = torch.zeros(k // 128, m_pad)
    col[:, :m] = sfa.T
    col_view = col[:, :m].T                                         # strides (1, m_pad)
    assert D.sfa_tma_layout(col_view).data_ptr() == col.data_ptr()
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2)
    out_row, out_col = nan_out(m, n), nan_out(m, n)
    D.launch_fp8_gemm(compiled, a, sfa, b, sfb, out_row)
    D.launch_fp8_gemm(compiled, a, col_view, b, sfb, out_col)
    assert torch.equal(out_row, out_col)


def test_bad_inputs_name_the_argument(deep_gemm_headers):
    compiled = D.compile_fp8_gemm(128, 128, num_sms=2)
    a, sfa, b, sfb = fp8_gemm_problem(64, 128, 256)
    out = nan_out(64, 128)
    with pytest.raises(ValueError, match="sfb"):
        D.launch_fp8_gemm(compiled, a, sfa, b, sfb[:, :1], out)
    with pytest.raises(ValueError, match="out"):
        D.launch_fp8_gemm(compiled, a, sfa, b, sfb, out.float())
    b12, sfb12 = b[:12], sfb
    with pytest.raises(ValueError, match="multiple of 8"):
        D.launch_fp8_gemm(compiled, a, sfa, b12, sfb12, nan_out(64, 12))
    with pytest.raises(ValueError, match="num_sms"):
        D.compile_fp8_gemm(128, 128, num_sms=3, cluster=2)
    with pytest.raises(ValueError, match="block_n"):
        D.compile_fp8_gemm(128, 200, num_sms=2)


def test_ptx_is_cached_by_content(deep_gemm_headers):
    one = D.compile_fp8_gemm(128, 128, num_sms=2)
    again = D.compile_fp8_gemm(128, 128, num_sms=2)
    other = D.compile_fp8_gemm(128, 128, num_sms=2, cluster=2)
    assert one.ptx.path == again.ptx.path and one.ptx.key != other.ptx.key
    assert "sm90_fp8_gemm_1d2d_impl" in one.ptx.entry and one.package.startswith("sgl-deep-gemm")
