"""A tiny DeepSeek-V3 (transformers' own model definition) on pykernels against its eager run.

The model, the substitutions and every bound with its reason are in examples/deepseek_tiny.py
(the docstring); the modules in examples/deepseek_pykernels.py. Each test draws the model's
weights and prompts from the `seed` fixture. The substituted runs NaN-fill every output
buffer and the paged cache first (Kernels(poison=True)), so an unwritten row shows.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the example needs transformers (requirements-cpu.txt, extra 'examples')")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import deepseek_pykernels as DP  # noqa: E402
import deepseek_tiny as DT  # noqa: E402


def _assert_checks(checks: dict):
    failed = {name: rules for name, (_, rules) in checks.items() if rules}
    summary = {name: [f"{d:.1e}" for d in res["per_step"]] for name, (res, _) in checks.items()}
    assert not failed, f"{failed}; calc_diff per step: {summary}"


def test_one_rank_reference_and_triton_match_eager(seed):
    # prompt 63 + 2 decode steps: the second step's token is the first of a sequence's second page
    runs = DT.run_one_rank(["reference", "triton"], prompt_len=63, steps=2, seed=seed % 2**16)
    checks = DT.one_rank_checks(runs, ["reference", "triton"])
    assert set(checks) == {"attention only (reference) vs eager", "experts only (reference) vs eager",
                           "reference vs eager", "triton vs eager", "triton vs reference"}
    _assert_checks(checks)
    assert all(torch.isfinite(run.logits).all() for run in runs.values())


@pytest.mark.slow
def test_expert_parallel_over_two_gloo_ranks(seed):
    ranks = DT.run_ranks(2, "reference", prompt_len=63, steps=2, seed=seed % 2**16)
    for rank, run in enumerate(ranks):
        # each rank holds half of the experts: EP equal to the one-rank run means the tokens
        # routed to the other half went there and came back
        assert run["remote_pairs"] > 0, f"rank {rank}: no token routed to the other rank's experts"
        _assert_checks({f"rank {rank}: {name}": c for name, c in DT.ep_checks(run).items()})


@pytest.mark.slow
def test_one_moe_layer_on_the_emulator(seed):
    # the hand-written kernels (PTX on the CPU emulator): one MoE layer, 4 experts, 3 tokens + 1 step
    runs = DT.run_one_rank(["reference", "emu"], layers=1, experts=4, batch=1, prompt_len=3, steps=1,
                           seed=seed % 2**16, isolate=False)
    _assert_checks(DT.one_rank_checks(runs, ["reference", "emu"]))


def test_contiguous_rows_segments_each_expert_aligned(seed):
    experts = torch.randint(0, 5, (300,))
    experts[experts == 3] = 2                            # an expert without rows gets no segment
    pos, m_indices = DP.contiguous_rows(experts, 5, 128)
    assert pos.unique().numel() == pos.numel()
    assert torch.equal(m_indices[pos].long(), experts)
    counts = torch.bincount(experts, minlength=5)
    assert m_indices.numel() == int(((counts + 127) // 128 * 128).sum())
    segments = m_indices.view(-1, 128)                   # each 128-row block: one expert and padding
    for block in segments:
        valid = block[block >= 0]
        assert valid.numel() and (valid == valid[0]).all()
    assert (m_indices == -1).sum() == m_indices.numel() - experts.numel()


def test_paged_cache_writes_the_rows_the_block_table_names(seed):
    config = DT.tiny_config(layers=1)
    kernels = DP.Kernels("reference", poison=True)
    cache = DP.PagedLatentCache(config, batch=2, max_tokens=130, kernels=kernels, seed=seed % 2**16)
    latent = torch.randn(2, 1, 70, 512, dtype=torch.bfloat16)
    rope = torch.randn(2, 1, 70, 64, dtype=torch.bfloat16)
    cache.update(latent, rope, 0)
    for i in range(2):
        for t in (0, 63, 64, 69):
            page = cache.block_table[i, t // 64]
            row = cache.latent[0][page, t % 64, 0]
            assert torch.equal(row, torch.cat([latent[i, 0, t], rope[i, 0, t]]))
        assert cache.latent[0][cache.block_table[i, 1], 6:].isnan().all()   # rows past the tokens: not written
    assert torch.equal(cache.seqlens(0), torch.tensor([70, 70], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceed"):
        cache.update(latent, rope, 0)
