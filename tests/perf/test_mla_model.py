"""Whole-launch MLA decode prediction (pykernels.perf.mla): the schedule's work per
partition against the metadata's own counts, the extrapolation arithmetic, and the
per-block linearity the extrapolation assumes, checked against a direct simulation."""
import pytest
import torch

from pykernels import perf
from pykernels.perf import mla as PM
from pykernels.perf.memory import MemoryShare
from pykernels.reference import mla as RM

H800 = perf.part("h800")


@pytest.mark.parametrize("batch, parts", [(5, 3), (3, 8), (16, 33), (1, 1)])
def test_partition_work_covers_every_block_once(seed, batch, parts):
    lens = torch.randint(1, 2000, (batch,), dtype=torch.int32)
    meta, _ = RM.get_mla_metadata(lens, parts)
    work = PM.partition_work(meta, lens.tolist())
    assert sum(b for _, b in work) == sum((n + 63) // 64 for n in lens.tolist())
    num_pieces = RM.METADATA_COLUMNS.index("num_pieces")
    assert [p for p, _ in work] == meta[:, num_pieces].tolist()      # the metadata's own piece counts


def test_extrapolation_arithmetic(monkeypatch):
    """Samples from a known cost (a piece 1000 clocks + 200 per KV block): the decode time is
    the busiest partition's pieces and blocks at those rates."""
    monkeypatch.setattr(PM, "_sample", lambda prob, blocks, p, mem: 1000 + 200 * blocks)
    lens = [64 * 10, 64 * 30]
    pred = PM.predict(lens, 1, 64, part=H800)
    assert pred.per_block_clk == pytest.approx(200) and pred.piece_clk == pytest.approx(1000)
    meta, _ = RM.get_mla_metadata(torch.tensor(lens, dtype=torch.int32), H800.sms)
    work = PM.partition_work(meta, lens)
    busiest = max(1000 * p + 200 * b for p, b in work)
    assert pred.decode_seconds == pytest.approx(busiest / H800.clock_hz)
    assert pred.seconds == pytest.approx(pred.decode_seconds + pred.combine_seconds)


def test_per_block_cost_is_linear_as_the_extrapolation_assumes():
    # the kernel's own time over 8 KV blocks, simulated, against the two-sample line (2, 5)
    prob = PM.MlaProblem((8 * 64,), 1, 64)
    mem = MemoryShare.of(H800, H800.sms, 0.0)
    lo, hi, direct = (PM._sample(prob, n, H800, mem) for n in (2, 5, 8))
    per_block = (hi - lo) / 3
    assert per_block > 0
    assert lo + 6 * per_block == pytest.approx(direct, rel=0.05)


def test_fp8_cache_and_more_tokens_cost_more_time():
    short = PM.predict([512] * 4, 1, 64, part=H800)
    long = PM.predict([2048] * 4, 1, 64, part=H800)
    fp8 = PM.predict([2048] * 4, 1, 64, fp8=True, part=H800)
    assert long.seconds > short.seconds and fp8.seconds > 0
    assert long.tflops == pytest.approx(long.problem.cost()["flops"] / long.seconds / 1e12)


def test_sparse_decode_prediction():
    """The sparse decode's prediction: its own kernel sampled (a gathered page costs at least
    the dense FP8 page's conversion and MMA work), the schedule of topk slots per sequence,
    L2 shared only by the row tiles of one query token, FlashMLA's flop count."""
    sparse = PM.predict([0] * 8, 2, 128, part=H800, topk=512)
    dense = PM.predict([512] * 8, 2, 128, fp8=True, part=H800)
    assert sparse.problem.topk == 512 and sparse.problem.seqlens == (512,) * 8
    assert "sparse decode kernel" in sparse.sampled and sparse.l2_hit == pytest.approx(0.5)
    assert sparse.per_block_clk >= 0.95 * dense.per_block_clk
    assert sparse.problem.cost()["flops"] == dense.problem.cost()["flops"]     # 2 (576 + 512) per row and slot
    # each query token gathers its own rows: s_q times the dense cache bytes (plus the same q / out bytes)
    io = dense.problem.cost()["bytes"] - 8 * 512 * 656
    assert sparse.problem.cost()["bytes"] == io + 2 * 8 * 512 * 656
    assert sparse.tflops == pytest.approx(sparse.problem.cost()["flops"] / sparse.seconds / 1e12)
