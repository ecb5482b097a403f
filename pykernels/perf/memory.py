"""Whole-GPU memory model seen from one SM: its share of L2 and HBM bandwidth.

`active_sms` SMs stream at once and share the L2 bandwidth and the HBM bandwidth evenly;
a fraction `l2_hit` of the bytes read is served by the L2 (the rest also crosses HBM);
written bytes all reach HBM. One SM's port (part.sm_l2_bytes_per_clk) caps its share. The
first version has no cache simulation: the caller gives the hit fraction (gemm.py derives
it from the tiles that run at once, see docs/perf-model.md).
"""
import dataclasses

from .machines import Part


@dataclasses.dataclass(frozen=True)
class MemoryShare:
    read_clk_per_byte: float
    write_clk_per_byte: float
    read_latency: float
    write_latency: float
    active_sms: int
    l2_hit: float

    @classmethod
    def of(cls, part: Part, active_sms: int, l2_hit: float = 1.0) -> "MemoryShare":
        if not 1 <= active_sms <= part.sms:
            raise ValueError(f"active_sms: expected 1..{part.sms}, got {active_sms}")
        if not 0.0 <= l2_hit <= 1.0:
            raise ValueError(f"l2_hit: expected a fraction in [0, 1], got {l2_hit}")
        port = 1.0 / part.sm_l2_bytes_per_clk
        l2 = active_sms / part.l2_bytes_per_clk()
        hbm = active_sms / part.hbm_bytes_per_clk()
        read = max(port, l2, (1.0 - l2_hit) * hbm)
        write = max(port, l2, hbm)
        lat = l2_hit * part.lat_l2 + (1.0 - l2_hit) * part.lat_hbm
        return cls(read, write, lat, part.lat_hbm, active_sms, l2_hit)
