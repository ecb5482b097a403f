"""Whole-GPU memory model seen from one SM: its share of L2 and HBM bandwidth.

`active_sms` SMs stream at once and share the L2 bandwidth and the sustained HBM bandwidth
(part.hbm_bytes_per_clk: the datasheet rate x hbm_efficiency) evenly; a fraction `l2_hit`
of the bytes read is served by the L2 (the rest also crosses HBM); written bytes all reach
HBM. The SMs of a cluster pool their shares (a multicast copy is read from L2 once for all
of them); each SM's own port (part.sm_l2_bytes_per_clk, the L2 bandwidth's even share per
SM, so it binds however few SMs load) carries the bytes it receives (a multicast copy:
every destination) and stores. The
first version has no cache simulation: the caller gives the hit fraction (gemm.py derives
it from the tiles that run at once, see docs/perf-model.md).
"""
import dataclasses

from .machines import Part


@dataclasses.dataclass(frozen=True)
class MemoryShare:
    share_read_clk_per_byte: float      # one SM's share of the GPU: L2 and (misses) HBM bandwidth
    share_write_clk_per_byte: float
    port_clk_per_byte: float            # the SM's own port (ingress of what it receives, egress of stores)
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
        lat = l2_hit * part.lat_l2 + (1.0 - l2_hit) * part.lat_hbm
        return cls(max(l2, (1.0 - l2_hit) * hbm), max(l2, hbm), port, lat, part.lat_hbm, active_sms, l2_hit)

    @property
    def read_clk_per_byte(self) -> float:
        """Steady-state clocks per byte one SM reads alone (share and port in series)."""
        return max(self.share_read_clk_per_byte, self.port_clk_per_byte)
