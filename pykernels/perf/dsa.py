"""Whole-launch prediction of the hand-written paged indexer logits (csrc/dsa/indexer_logits.cu
through pykernels/cuda/dsa.py) on a named part: the issue's memory-bound target (>= 85% of HBM
bandwidth on the FP8 keys).

What is simulated: the real kernel on the emulator, one SM's worth of its persistent CTAs
(as many as the SM's shared memory holds) resident together, each walking `n` work items (a
sequence's next_n rows x 4 pages of 64 keys) through its two-stage TMA ring, replayed by the
SM model with those CTAs sharing one SM (sm.Replay ctas_per_sm) and the memory share of every
SM streaming at once. Two samples (n = 2 and 4) give the clocks per round (every CTA of the SM
finishing one more item) in steady state and the fixed cost (first loads, last item's tail).
Extrapolated explicitly: the launch's items (b x ceil(context / 256)) over SMs x CTAs per SM,
rounds = ceil(items / (SMs x CTAs per SM)). L2: the keys are read once (from HBM); each item
re-reads its sequence's Q tiles, found in L2 but for the first: hit = Q bytes / (Q + key
bytes) of one item. Sequences whose context fills their pages (the -inf writes past windows
are not sampled).
"""
import dataclasses

import torch

from .. import emu
from ..cuda import dsa as CD
from ..reference import dsa as RD
from ..runtime import artifacts
from ..runtime.hardware import cdiv
from . import MODEL_VERSION
from .machines import Part, part as get_part
from .memory import MemoryShare
from .sm import Replay
from .trace import Recorder

@dataclasses.dataclass
class LogitsPrediction:
    part: str
    b: int
    next_n: int
    heads: int
    context: int
    ctas_per_sm: int
    rounds: int
    round_clk: float
    fixed_clk: float
    l2_hit: float
    seconds: float
    key_bytes: int
    model_version: str = MODEL_VERSION

    @property
    def key_gbps(self) -> float:
        return self.key_bytes / self.seconds / 1e9

    def hbm_fraction(self, p: Part) -> float:
        return self.key_bytes / self.seconds / p.hbm_bytes_per_s

    def lines(self, p: Part):
        return [f"model ({self.part.upper()}, model version {self.model_version}): our paged indexer logits "
                f"b{self.b} next_n{self.next_n} {self.heads} heads x 128, context {self.context}",
                f"  {self.ctas_per_sm} persistent CTAs per SM sampled together: {self.round_clk:.0f} clk per round "
                f"of items, {self.fixed_clk:.0f} fixed; {self.rounds} rounds; L2 hit {self.l2_hit:.2f} (Q tiles)",
                f"  {self.seconds * 1e6:.1f} us: {self.key_gbps:.0f} GB/s of FP8 keys = "
                f"{100 * self.hbm_fraction(p):.0f}% of HBM ({p.hbm_bytes_per_s / 1e12:.2f} TB/s)"]


def _sample(p: Part, next_n: int, heads: int, ctas: int, items: int, mem: MemoryShare) -> float:
    """Clocks of `ctas` persistent CTAs on one SM, each walking `items` items (sequences of 4
    full pages)."""
    gen = torch.Generator().manual_seed(0)
    b = ctas * items
    pages = CD.BLOCKS_PER_CTA
    length = pages * CD.BLOCK_KV
    q = (torch.randn(b, next_n, heads, CD.HEAD_DIM, generator=gen) * 2).to(torch.float8_e4m3fn)
    cache = RD.quantize_indexer_k_cache(torch.randn(b * pages, CD.BLOCK_KV, 1, CD.HEAD_DIM, generator=gen))
    table = torch.arange(b * pages, dtype=torch.int32).view(b, pages)
    lens = torch.full((b,), length, dtype=torch.int32)     # the last row sees every key (<= the table's keys)
    w = torch.randn(b * next_n, heads, generator=gen)
    out = torch.empty(b * next_n, length)
    plan = CD.paged_logits_plan(q, cache, w, lens, table, out, length, max_ctas=ctas)
    rec = Recorder()
    emu.launch(artifacts.ptx_text(plan.module), plan.function, plan.grid, plan.block, [a.value for a in plan.args],
               shared_mem=plan.shared_bytes, co_resident=True, trace=rec)
    (recording,) = rec.recordings
    return Replay(recording, p, mem, ctas_per_sm=ctas).run().cycles


def predict_paged_logits(b: int, next_n: int, heads: int, context: int, part="h800", lo: int = 2,
                         hi: int = 4) -> LogitsPrediction:
    """Predicted time of fp8_paged_mqa_logits on `part` for b sequences of `context` keys
    (pages of 64), next_n query rows each, `heads` indexer heads of 128 (32 or 64)."""
    p = part if isinstance(part, Part) else get_part(part)
    k = CD.ctas_per_sm(heads, next_n)
    q_bytes = next_n * heads * CD.HEAD_DIM
    key_block = CD.BLOCKS_PER_CTA * CD.BLOCK_KV * CD.HEAD_DIM
    hit = q_bytes / (q_bytes + key_block)
    mem = MemoryShare.of(p, p.sms, hit)
    c_lo, c_hi = (_sample(p, next_n, heads, k, n, mem) for n in (lo, hi))
    per_round = (c_hi - c_lo) / (hi - lo)
    fixed = c_lo - lo * per_round
    items = b * cdiv(cdiv(context, CD.BLOCK_KV), CD.BLOCKS_PER_CTA)
    rounds = cdiv(items, p.sms * k)
    seconds = (fixed + rounds * per_round) / p.clock_hz
    key_bytes = b * context * (CD.HEAD_DIM + RD.INDEXER_SCALE_BYTES)
    return LogitsPrediction(p.key, b, next_n, heads, context, k, rounds, per_round, fixed, hit, seconds, key_bytes)
