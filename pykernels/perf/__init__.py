"""Timing model: the emulator's functional execution of a launch, replayed on a named
Hopper part (docs/perf-model.md).

    timing = perf.time_launch(ptx, kernel, grid, block, args, part="h800", active_sms=132)
    timing.cycles, timing.seconds

machines.py: the parts (every number with its source); trace.py: what the emulator run
records; sm.py: the cycle-approximate SM replay; memory.py: the SM's share of L2 / HBM;
gemm.py: whole-launch prediction of the FP8 GEMMs at real sizes.
"""
import dataclasses

from .machines import PARTS, Part, part  # noqa: F401
from .memory import MemoryShare
from .sm import Replay, Result  # noqa: F401
from .trace import Recorder

MODEL_VERSION = "0.2"


@dataclasses.dataclass
class Timing:
    part: Part
    memory: MemoryShare
    groups: list            # one sm.Result per CTA group the emulator ran (cluster / co-resident grid)
    stats: object           # the emulator's Stats

    @property
    def cycles(self) -> float:
        """Clocks of the slowest group (groups are assumed to run at once on distinct SMs)."""
        return max((g.cycles for g in self.groups), default=0.0)

    @property
    def seconds(self) -> float:
        return self.cycles / self.part.clock_hz


def replay(recorder: Recorder, the_part: Part, memory: MemoryShare) -> list:
    return [Replay(rec, the_part, memory).run() for rec in recorder.recordings]


def time_launch(ptx, kernel, grid, block, args, *, part="h800",  # noqa: F811  (the part's key; the caller's name)
                active_sms=None, l2_hit=1.0, **launch_kw) -> Timing:
    """Run the launch on the emulator and time it on `part` (a key or a Part).

    active_sms: SMs streaming memory at once on the whole GPU (default: the launch's CTAs,
    at most the part's SMs); l2_hit: fraction of bytes read that hit in L2.
    """
    from .. import emu
    p = part if isinstance(part, Part) else globals()["part"](part)
    rec = Recorder()
    stats = emu.launch(ptx, kernel, grid, block, args, trace=rec, **launch_kw)
    if active_sms is None:
        active_sms = min(p.sms, max(1, stats.ctas))
    mem = MemoryShare.of(p, active_sms, l2_hit)
    return Timing(p, mem, replay(rec, p, mem), stats)
