"""Whole-launch prediction of the hand-written sparse MLA prefill (flash_mla_sparse_fwd:
csrc/mla/decode.cu's pk_mla_sparse_prefill_bf16 through pykernels/cuda/dsa.py) on a named part.

What is simulated: the real kernel on the emulator, one CTA (64 heads of one query token) over
`lo` and over `hi` blocks of 64 slots whose indices are spread at random over kv, each sample
timed by the SM model with the memory share of the full launch (as pykernels/perf/mla.py does
for the sparse decode). From the two: the clocks per block in steady state and the fixed cost
of one token (its Q load, prologue and output writes). Extrapolated explicitly: the launch's
schedule (cuda/dsa.sparse_prefill_schedule: P = min(s_q, SMs / (h_q / 64)) partitions of whole
tokens, h_q / 64 CTAs each); the launch ends with the busiest partition, ceil(s_q / P) tokens
of ceil(topk / 64) blocks. L2: only the head tiles of one query token are assumed to share its
rows (hit = 1 - 1 / (h_q / 64)), the sparse decode's assumption; the rows different query
tokens share (in a prefill most of them) are charged to HBM again, so the figure is a
conservative one. FLOPs: FlashMLA's count, 2 (576 + 512) per (query row, slot).

    python -m pykernels.perf.dsa_prefill [--part h800] S_Q H_Q TOPK
"""
import argparse
import dataclasses

import torch

from ..cuda import dsa as CD
from ..reference import mla as RM
from ..runtime import device_errors
from ..runtime.executors import run_emu
from ..runtime.hardware import cdiv
from . import MODEL_VERSION, replay
from .machines import PARTS, Part, part as get_part
from .memory import MemoryShare
from .trace import Recorder

TILE_ROWS = 64          # query rows (heads of one token) per CTA
PAGE = RM.PAGE_BLOCK_SIZE


def _sample(blocks: int, p: Part, mem: MemoryShare) -> float:
    """Clocks of one CTA over one token's `blocks` blocks of 64 used slots."""
    gen = torch.Generator().manual_seed(0)
    s_kv = 2 * blocks * PAGE
    q = torch.randn(1, TILE_ROWS, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16)
    kv = torch.randn(s_kv, 1, RM.HEAD_DIM_QK, generator=gen).to(torch.bfloat16)
    indices = torch.randint(0, s_kv, (1, 1, blocks * PAGE), generator=gen, dtype=torch.int32)
    out = torch.empty(1, TILE_ROWS, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    mx, lse = torch.empty(1, TILE_ROWS), torch.empty(1, TILE_ROWS)
    record = device_errors.record_for(q.device, CD.SPARSE_PREFILL_OP_NAME)
    plan = CD.sparse_prefill_plan(q, kv, indices, None, None, out, mx, lse, RM.default_softmax_scale(), record,
                                  parts=1)
    rec = Recorder()
    run_emu(plan, trace=rec)
    device_errors.raise_if_set(record, CD.SPARSE_PREFILL_OP_NAME)
    return max(r.cycles for r in replay(rec, p, mem))


@dataclasses.dataclass
class PrefillPrediction:
    part: str
    s_q: int
    h_q: int
    topk: int
    grid: tuple
    l2_hit: float
    per_block_clk: float
    token_clk: float
    busiest_tokens: int
    seconds: float
    tflops: float
    model_version: str = MODEL_VERSION

    def lines(self):
        return [f"model ({self.part.upper()}, model version {self.model_version}): our sparse prefill "
                f"s_q{self.s_q}-h{self.h_q}-topk{self.topk}",
                f"  grid {self.grid[0]} partitions x {self.grid[1]} head tiles, L2 hit {self.l2_hit:.2f} "
                f"(head tiles share a token's rows)",
                f"  per block of 64 slots {self.per_block_clk:.0f} clk, per token {self.token_clk:.0f} clk; the "
                f"busiest partition runs {self.busiest_tokens} tokens",
                f"  {self.seconds * 1e6:.1f} us: {self.tflops:.0f} TFLOP/s"]


def predict(s_q: int, h_q: int, topk: int, part="h800", lo: int = 2, hi: int = 5) -> PrefillPrediction:
    """Predicted time of the sparse prefill of s_q query tokens x h_q heads (a multiple of 64)
    over topk slots each on `part`."""
    if h_q % TILE_ROWS:
        raise ValueError(f"h_q: the sparse prefill kernel needs a multiple of {TILE_ROWS}, got {h_q}")
    p = part if isinstance(part, Part) else get_part(part)
    tiles = h_q // TILE_ROWS
    parts = max(1, min(s_q, p.sms // tiles))
    hit = 1.0 - 1.0 / tiles
    mem = MemoryShare.of(p, min(p.sms, parts * tiles), hit)
    c_lo, c_hi = _sample(lo, p, mem), _sample(hi, p, mem)
    per_block = (c_hi - c_lo) / (hi - lo)
    token = c_lo - lo * per_block
    busiest = cdiv(s_q, parts)
    seconds = busiest * (token + cdiv(topk, PAGE) * per_block) / p.clock_hz
    flops = 2 * (RM.HEAD_DIM_QK + RM.HEAD_DIM_V) * s_q * h_q * topk
    return PrefillPrediction(p.key, s_q, h_q, topk, (parts, tiles), hit, per_block, token, busiest, seconds,
                             flops / seconds / 1e12)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pykernels.perf.dsa_prefill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="h800", choices=PARTS)
    for name in ("s_q", "h_q", "topk"):
        ap.add_argument(name, type=int)
    a = ap.parse_args(argv)
    print("\n".join(predict(a.s_q, a.h_q, a.topk, a.part).lines()))


if __name__ == "__main__":
    main()
