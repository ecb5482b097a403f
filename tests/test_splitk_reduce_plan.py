"""Split-K's second pass (csrc/gemm/splitk_reduce.cu) under the block sizes reduce_plan picks:
half-size blocks when the chunks fit one pass over more SMs (each SM's port caps what its CTA
reads), full blocks otherwise; the result is the ordered float32 sum of the slices rounded once
to bf16, whatever the block size."""
import pytest
import torch

from pykernels.cuda import gemm as G
from pykernels.runtime.executors import run_emu

from .fp8_cases import nan_bf16


@pytest.mark.parametrize("m,n,sms,threads,grid", [
    (64, 2112, 132, G.REDUCE_THREADS // 2, 132),        # 16896 chunks: one per thread on every SM
    (128, 4096, 132, G.REDUCE_THREADS, 132),            # 65536: full blocks, grid-stride
    (16, 64, 2, G.REDUCE_THREADS // 2, 1),              # 128 chunks, the emulator case below
    (16, 256, 2, G.REDUCE_THREADS, 2),
])
def test_block_size_spreads_the_chunks(m, n, sms, threads, grid):
    plan = G.reduce_plan(torch.empty(2 * m, n), torch.empty(m, n, dtype=torch.bfloat16), m, n, 2, sms=sms)
    assert plan.block == (threads, 1, 1) and plan.grid == (grid, 1, 1)


@pytest.mark.parametrize("m,n,splits", [(16, 64, 2), (16, 256, 3)])
def test_reduction_is_the_ordered_sum_at_either_block_size(m, n, splits, seed):
    workspace = torch.randn(splits * m, n)
    out = nan_bf16(m, n)
    run_emu(G.reduce_plan(workspace, out, m, n, splits, sms=2), schedule="cta_last")
    slices = workspace.view(splits, m, n)
    total = slices[0].clone()
    for s in range(1, splits):
        total = total + slices[s]
    assert torch.equal(out, total.to(torch.bfloat16))
