"""Whole-launch prediction of our MLA decode (csrc/mla/decode.cu, or csrc/mla/decode_narrow.cu for
at most 32 query rows per KV head: the kernel pykernels/cuda/mla.plan_decode picks) at
FlashMLA's benchmark sizes on a named part.

What is simulated: the real decode kernel on the emulator, one CTA (one partition, one row
tile of at most 64 query rows) over one sequence of `lo` and of `hi` KV blocks of 64 tokens,
each sample timed by the SM model with the memory share of the full launch. From the two:
the clocks per KV block in steady state and the fixed cost of one piece (a sequence, or a
split of one, that a CTA processes: its Q load, prologue and output writes).
Extrapolated explicitly: the schedule the metadata gives for the real sequence lengths
(pykernels.mla.get_mla_metadata, the part's SM count) assigns each partition its pieces;
a partition's CTAs take fixed x pieces + per_block x blocks; the decode ends with the
busiest. L2: the row tiles of one partition read the same KV blocks at about the same time,
so all but the first hit in L2 (hit = 1 - 1 / row tiles). The combine launch (split
sequences only) is not simulated: it is charged its HBM bytes (the partial outputs and
LSEs read, the output written) at the part's bandwidth, an explicit assumption.

Sparse decode (topk > 0; the kernel pykernels/cuda/dsa.sparse_decode_plans picks:
pk_mla_sparse_decode_fp8 for h_q a multiple of 64, the narrow pk_mla_sparse_decode_narrow_n{16,32}
for h_q <= 32 with one CTA row per query token): the same method with every sequence scheduled
as topk slots, the sample's indices spread at random over a cache of its own; L2: only the row
tiles of one query token share its rows (hit = 1 - 1 / (h_q / 64); narrow: one CTA per token,
no sharing); each slot's 656-byte row is one bulk copy (64-row kernel: 16-byte loads), timed at
the memory share like any copy (DRAM sector rounding of a scattered row, 672 bytes, is not
modelled).
"""
import dataclasses

import torch

from .. import mla as M
from ..cuda import mla as CM
from ..mla_schedule import split_scratch
from ..reference import mla as RM
from ..runtime import device_errors
from ..runtime.executors import run_emu
from ..runtime.hardware import cdiv
from . import MODEL_VERSION, replay
from .machines import Part, part as get_part
from .memory import MemoryShare
from .trace import Recorder

PAGE = RM.PAGE_BLOCK_SIZE


@dataclasses.dataclass(frozen=True)
class MlaProblem:
    """batch sequences of `seqlens` cached tokens (a list, one per sequence), s_q new tokens,
    h_q query heads, one KV head; fp8: the 656-byte FP8 cache."""
    seqlens: tuple
    s_q: int
    h_q: int
    fp8: bool = False
    topk: int = 0            # > 0: the sparse decode (FP8 cache) over topk slots per query token

    @property
    def rows(self) -> int:
        return self.s_q * self.h_q

    def label(self) -> str:
        if self.topk:
            return f"sparse-b{len(self.seqlens)}-sq{self.s_q}-h{self.h_q}-topk{self.topk}-fp8"
        mean = sum(self.seqlens) / len(self.seqlens)
        return f"b{len(self.seqlens)}-sq{self.s_q}-h{self.h_q}-sk{mean:.0f}{'-fp8' if self.fp8 else ''}"

    def cost(self) -> dict:
        if self.topk:       # FlashMLA's count; every query token gathers its own topk rows
            c = M.decode_cost(len(self.seqlens), self.s_q, self.h_q, self.topk, fp8_cache=True)
            rows_read = len(self.seqlens) * self.s_q * self.topk * RM.FP8_BYTES_PER_TOKEN
            io = c["bytes"] - len(self.seqlens) * self.topk * RM.FP8_BYTES_PER_TOKEN
            return dict(flops=c["flops"], bytes=rows_read + io)
        flops = nbytes = 0
        for n in self.seqlens:
            c = M.decode_cost(1, self.s_q, self.h_q, n, fp8_cache=self.fp8)
            flops, nbytes = flops + c["flops"], nbytes + c["bytes"]
        return dict(flops=flops, bytes=nbytes)


def _sample_shape(prob: MlaProblem):
    """(s_q, h_q) of one row tile: the problem's own when its rows fit one tile, else 64 rows."""
    return (prob.s_q, prob.h_q) if prob.rows <= CM.TILE_ROWS else (1, CM.TILE_ROWS)


def _sparse_rows(h_q: int) -> int:
    """Query rows of one sparse-decode CTA: one token's h_q heads (narrow kernel), else 64."""
    return h_q if CM.narrow_tile_rows(h_q) else CM.TILE_ROWS


def _sample_sparse(prob: MlaProblem, blocks: int, p: Part, mem: MemoryShare) -> float:
    """Clocks of one CTA of the sparse decode over `blocks` blocks of 64 slots of one token."""
    from ..cuda import dsa as CD
    gen = torch.Generator().manual_seed(0)
    pages = 2 * blocks
    heads = _sparse_rows(prob.h_q)
    q = torch.randn(1, 1, heads, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16)
    cache = M.quantize_kv_cache_fp8(torch.randn(pages, PAGE, 1, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16))
    indices = torch.randint(0, pages * PAGE, (1, 1, blocks * PAGE), generator=gen, dtype=torch.int32)
    meta, splits = RM.get_mla_metadata(torch.tensor([blocks * PAGE], dtype=torch.int32), 1)
    out = torch.empty(1, 1, heads, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    lse = torch.empty(1, heads, 1, dtype=torch.float32)
    record = device_errors.record_for(q.device, CD.SPARSE_OP_NAME)
    plan, _ = CD.sparse_decode_plans(q, cache, indices, None, None, meta, splits, out, lse,
                                     RM.default_softmax_scale(), record)
    rec = Recorder()
    run_emu(plan, trace=rec)
    device_errors.raise_if_set(record, CD.SPARSE_OP_NAME)
    return max(r.cycles for r in replay(rec, p, mem))


def _sample(prob: MlaProblem, blocks: int, p: Part, mem: MemoryShare) -> float:
    """Clocks of one CTA of the decode over one sequence of `blocks` KV blocks."""
    if prob.topk:
        return _sample_sparse(prob, blocks, p, mem)
    s_q, h_q = _sample_shape(prob)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s_q, h_q, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16)
    cache = torch.randn(blocks, PAGE, 1, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16)
    if prob.fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    seqlens = torch.tensor([blocks * PAGE], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    meta, splits = RM.get_mla_metadata(seqlens, 1)
    rows = s_q * h_q
    out = torch.empty(1, s_q, h_q, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    lse = torch.empty(1, h_q, s_q, dtype=torch.float32)
    oacc, lacc = split_scratch(1, 1, rows, RM.HEAD_DIM_V, q.device)
    record = device_errors.record_for(q.device, CM.OP_NAME)
    plan = CM.plan_decode(CM.q_view(q), CM.kv_view(cache), table, seqlens, meta, splits, out, lse, oacc, lacc,
                          record, s_q=s_q, h_q=h_q, scale=RM.default_softmax_scale(), causal=True,
                          num_blocks=blocks)      # the kernel the dispatch picks (narrow for <= 32 rows)
    rec = Recorder()
    run_emu(plan, trace=rec)
    device_errors.raise_if_set(record, CM.OP_NAME)
    return max(r.cycles for r in replay(rec, p, mem))


def partition_work(meta: torch.Tensor, seqlens) -> list:
    """Per partition (metadata row): (pieces, KV blocks) it processes. Row p holds
    [first_batch, first_block, last_batch, last_block_end, ...] (docs/mla.md)."""
    work = []
    for first_b, first_blk, last_b, last_end, *_ in meta.tolist():
        pieces = blocks = 0
        for i in range(first_b, last_b + 1):
            start = first_blk if i == first_b else 0
            end = last_end if i == last_b else cdiv(seqlens[i], PAGE)
            if end > start:
                pieces, blocks = pieces + 1, blocks + end - start
        work.append((pieces, blocks))
    return work


@dataclasses.dataclass
class MlaPrediction:
    part: str
    problem: MlaProblem
    grid: tuple
    l2_hit: float
    per_block_clk: float
    piece_clk: float
    busiest: tuple            # (pieces, blocks) of the busiest partition
    decode_seconds: float
    combine_seconds: float
    seconds: float
    tflops: float
    gbps: float
    sampled: str
    model_version: str = MODEL_VERSION

    def lines(self):
        return [f"model ({self.part.upper()}, model version {self.model_version}): our MLA decode "
                f"{self.problem.label()}",
                f"  grid {self.grid[0]} partitions x {self.grid[1]} row tiles, L2 hit {self.l2_hit:.2f} "
                f"(row tiles share the KV blocks)",
                f"  sampled: {self.sampled}",
                f"  per KV block {self.per_block_clk:.0f} clk, per piece {self.piece_clk:.0f} clk; the busiest "
                f"partition runs {self.busiest[0]} pieces, {self.busiest[1]} blocks",
                f"  decode {self.decode_seconds * 1e6:.1f} us + combine {self.combine_seconds * 1e6:.1f} us "
                f"(HBM bytes only) = {self.seconds * 1e6:.1f} us: {self.tflops:.0f} TFLOP/s, {self.gbps:.0f} GB/s"]


def predict(seqlens, s_q: int, h_q: int, fp8: bool = False, part="h800", lo: int = 2, hi: int = 5,
            topk: int = 0) -> MlaPrediction:
    """Predicted time of our MLA decode (causal, one KV head) for sequences of `seqlens`
    tokens (a list, or one int for every sequence with batch given by len) on `part`; with
    topk > 0 the sparse decode over the FP8 cache (seqlens only gives the batch: every
    sequence is scheduled as topk slots per query token; h_q <= 32 or a multiple of 64)."""
    if topk:
        seqlens, fp8 = [topk] * len(seqlens), True
    prob = MlaProblem(tuple(int(n) for n in seqlens), s_q, h_q, fp8, topk)
    p = part if isinstance(part, Part) else get_part(part)
    narrow_sparse = topk and CM.narrow_tile_rows(h_q)
    tiles = s_q if narrow_sparse else cdiv(prob.rows, CM.TILE_ROWS)   # narrow sparse: one CTA row per token
    parts = max(1, p.sms // tiles)
    grid = (parts, tiles)
    hit = 0.0 if narrow_sparse else 1.0 - 1.0 / (h_q // CM.TILE_ROWS if topk else tiles)
    mem = MemoryShare.of(p, min(p.sms, parts * tiles), hit)
    c_lo, c_hi = _sample(prob, lo, p, mem), _sample(prob, hi, p, mem)
    per_block = (c_hi - c_lo) / (hi - lo)
    piece = c_lo - lo * per_block
    lens = torch.tensor(prob.seqlens, dtype=torch.int32)
    meta, splits = RM.get_mla_metadata(lens, parts)
    work = partition_work(meta, prob.seqlens)
    if sum(b for _, b in work) != sum(cdiv(n, PAGE) for n in prob.seqlens):
        raise RuntimeError("the metadata's partitions do not cover every KV block once")
    busiest = max(work, key=lambda w: w[0] * piece + w[1] * per_block)
    decode = (busiest[0] * piece + busiest[1] * per_block) / p.clock_hz
    split_pieces = int(splits[-1]) - len(prob.seqlens)       # pieces beyond one per sequence
    combine_bytes = (split_pieces + len(prob.seqlens)) * prob.rows * (RM.HEAD_DIM_V * 4 + 4) if split_pieces else 0
    combine = combine_bytes / p.hbm_bytes_per_s
    seconds = decode + combine
    cost = prob.cost()
    s_q1, h_q1 = _sample_shape(prob)
    kernel = (("narrow sparse decode" if narrow_sparse else "sparse decode") if topk else
              "narrow decode" if CM.narrow_tile_rows(s_q1 * h_q1) else "decode")
    sampled = (f"the {kernel} kernel on the emulator, one CTA of "
               f"{_sparse_rows(h_q) if topk else s_q1 * h_q1} query rows over {lo} and {hi} KV blocks")
    return MlaPrediction(p.key, prob, grid, hit, per_block, piece, busiest, decode, combine, seconds,
                         cost["flops"] / seconds / 1e12, cost["bytes"] / seconds / 1e9, sampled)
