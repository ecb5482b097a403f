"""Shared cases of the peer tests: random FP8 operands (quantized by pykernels.reference),
and runs of each DeepGEMM kernel on the emulator checked against a reference with
NaN-poisoned outputs. Each run returns the emulator's Stats.

Tolerances (calc_diff): GEMMs 1e-5 against the float32 reference rounded to bf16 (the
emulator's wgmma sums are exact: ~1e-10 observed for FP8, ~1e-12 for BF16; a wrong scale
factor or a lost K block gives > 1e-2 with these inputs); MQA logits 1e-9 (float32 logits
against a float64 reference: ~1e-15 observed)."""
import torch

from bench.peers import bf16_gemm as B
from bench.peers import deep_gemm as D
from bench.peers import mqa_logits as M
from pykernels import reference as R
from pykernels.metrics import calc_diff

GEMM_TOL = 1e-5
LOGITS_TOL = 1e-9


def spread(rows, cols, row_block):
    """randn [rows, cols] times 2^e, e uniform in [-4, 4] per (row_block x 128) block, so
    every scale factor differs and using a wrong one shows far above the tolerance."""
    e = torch.randint(-4, 5, (-(-rows // row_block), -(-cols // 128))).float()
    f = torch.exp2(e).repeat_interleave(row_block, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return (torch.randn(rows, cols) * f).to(torch.bfloat16)


def fp8_gemm_problem(m, n, k):
    """a e4m3 [m, k] with 1x128 scales sfa [m, k/128]; b e4m3 [n, k] with 128x128 scales."""
    a, sfa = R.per_token_cast_to_fp8(spread(m, k, 1))
    b, sfb = R.per_block_cast_to_fp8(spread(n, k, 128))
    return a, sfa, b, sfb


def nan_out(m, n):
    return torch.full((m, n), float("nan"), dtype=torch.bfloat16)


def assert_fp8_gemm_matches_reference(compiled, m, n, k, schedule):
    """Launch DeepGEMM's FP8 GEMM on the emulator and assert it matches the reference (every
    element written once, calc_diff < GEMM_TOL, the expected wgmma count); returns its Stats."""
    a, sfa, b, sfb = fp8_gemm_problem(m, n, k)
    out = nan_out(m, n)
    stats = D.launch_fp8_gemm(compiled, a, sfa, b, sfb, out, schedule=schedule)
    assert not out.isnan().any(), "output elements left unwritten"
    diff = calc_diff(out, R.fp8_gemm_nt(a, sfa, b, sfb))
    assert diff < GEMM_TOL, f"calc_diff {diff}"
    cfg = compiled.config
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert stats.global_written == m * n * 2                      # each output element once
    assert stats.wgmma == tiles * (k // 128) * 4 * (cfg.block_m // 64)   # k32 steps x 64-row slabs
    return stats


def _grouped_weights(groups, n, k):
    pairs = [R.per_block_cast_to_fp8(spread(n, k, 128)) for _ in range(groups)]
    return torch.stack([q for q, _ in pairs]), torch.stack([sf for _, sf in pairs])


def contiguous_indices(group_rows, block_m, pad_blocks=0):
    """m_indices: each group's rows padded with -1 to whole blocks of block_m (an empty
    group gets none), then pad_blocks blocks of padding only."""
    idx = []
    for g, rows in enumerate(group_rows):
        idx += [g] * rows + [-1] * (-rows % block_m)
    return torch.tensor(idx + [-1] * (pad_blocks * block_m), dtype=torch.int32)


def assert_fp8_contiguous_matches_reference(compiled, group_rows, n, k, schedule, pad_blocks=0):
    """DeepGEMM's contiguous layout writes every row, padding rows too: owned rows are
    compared with the reference, and no row may stay NaN."""
    b, sfb = _grouped_weights(len(group_rows), n, k)
    idx = contiguous_indices(group_rows, compiled.config.block_m, pad_blocks)
    m = idx.numel()
    a, sfa = R.per_token_cast_to_fp8(spread(m, k, 1))
    out = nan_out(m, n)
    stats = D.launch_fp8_gemm(compiled, a, sfa, b, sfb, out, idx, schedule=schedule)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_out(m, n))
    own = idx >= 0
    assert not out.isnan().any(), "rows left unwritten"
    diff = calc_diff(out[own], ref[own])
    assert diff < GEMM_TOL, f"calc_diff {diff}"
    assert stats.global_written == m * n * 2
    return stats


def assert_fp8_masked_matches_reference(compiled, masked, m_max, n, k, schedule):
    """Rows below masked_m[g] against the reference; DeepGEMM stores whole blocks of
    block_m rows, so rows from round_up(masked_m, block_m) on must stay NaN."""
    groups, bm = len(masked), compiled.config.block_m
    b, sfb = _grouped_weights(groups, n, k)
    a, sfa = R.per_token_cast_to_fp8(spread(groups * m_max, k, 1))
    a, sfa = a.view(groups, m_max, k), sfa.view(groups, m_max, -1)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    out = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16)
    stats = D.launch_fp8_gemm(compiled, a, sfa, b, sfb, out, masked_m, schedule=schedule)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, torch.full_like(out, float("nan")))
    rows = torch.arange(m_max)[None, :]
    own = rows < masked_m[:, None]
    stored = rows < (masked_m[:, None] + bm - 1) // bm * bm
    assert not out[own].isnan().any(), "owned rows left unwritten"
    assert out[~stored].isnan().all(), "rows past the last stored block were written"
    if own.any():
        diff = calc_diff(out[own], ref[own])
        assert diff < GEMM_TOL, f"calc_diff {diff}"
    assert stats.global_written == int(stored.sum()) * n * 2
    return stats


def assert_bf16_gemm_matches_reference(compiled, m, n, k, schedule):
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    stats = B.launch_bf16_gemm(compiled, a, b, out, schedule=schedule)
    assert not out.isnan().any(), "output elements left unwritten"
    diff = calc_diff(out, (a.float() @ b.float().T).bfloat16())
    assert diff < GEMM_TOL, f"calc_diff {diff}"
    cfg = compiled.config
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert stats.global_written == m * n * 2
    assert stats.wgmma == tiles * (-(-k // B.BLOCK_K)) * (B.BLOCK_K // 16) * (cfg.block_m // 64)
    return stats


def reference_logits(q, kv, kv_scales, weights, ks, ke, width):
    """Compressed float32 logits [seq_len, width]; NaN outside each row's window."""
    scores = torch.einsum("ihd,jd->ijh", q.double(), kv.double()) * kv_scales.double()[None, :, None]
    full = (scores.relu() * weights.double()[:, None, :]).sum(-1)
    out = torch.full((q.shape[0], width), float("nan"), dtype=torch.float64)
    for i in range(q.shape[0]):
        out[i, :ke[i] - ks[i]] = full[i, ks[i]:ke[i]]
    return out


def prefill_windows(seq_lens, extra_kv=0):
    """Causal windows of sequences packed one after another: query t of a sequence that
    starts at key s sees keys [s, s + t + 1 + extra_kv) (extra_kv: cached prefix keys)."""
    ks, ke, start = [], [], 0
    for n in seq_lens:
        ks += [start] * n
        ke += [start + t + 1 + extra_kv for t in range(n)]
        start += n + extra_kv
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32), start


def assert_mqa_logits_match_reference(compiled, ks, ke, seq_len_kv, schedule):
    cfg = compiled.config
    seq_len = ks.numel()
    q = torch.randn(seq_len, cfg.num_heads, cfg.head_dim).to(torch.float8_e4m3fn)
    kv = torch.randn(seq_len_kv, cfg.head_dim).to(torch.float8_e4m3fn)
    kv_scales = torch.rand(seq_len_kv) + 0.25
    weights = torch.randn(seq_len, cfg.num_heads)
    width = int((ke - ks).max()) + 5                                  # spare columns stay NaN
    logits = torch.full((M.logits_rows(compiled, seq_len), width), float("nan"))
    stats = M.launch_mqa_logits(compiled, q, kv, kv_scales, weights, ks, ke, logits, schedule=schedule)
    ref = reference_logits(q.float(), kv.float(), kv_scales, weights, ks, ke, width)
    got = logits[:seq_len]
    inside = ~ref.isnan()
    assert not got[inside].isnan().any(), "in-window logits left unwritten"
    assert got[~inside].isnan().all(), "logits written outside the windows"
    diff = calc_diff(got[inside], ref[inside])
    assert diff < LOGITS_TOL, f"calc_diff {diff}"
    return stats
