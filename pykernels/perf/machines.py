"""Machine descriptions of the Hopper parts the timing model predicts for.

Every number is a `Fact`: its value, where it comes from (SOURCES), and whether it is an
assumption (no public figure found; listed in docs/perf-model.md). Nothing here is fitted
to make a predicted kernel time come out right.
"""
import dataclasses

SOURCES = {
    "datasheet-h100": "NVIDIA H100 Tensor Core GPU datasheet (SXM column), as tabulated at "
                      "archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html and in ../shared/ANCHORS.md",
    "whitepaper-clocks": "NVIDIA H100 whitepaper figures as summarised at glennklockwood.com/garden/processors/h100: "
                         "132 SMs, 128 FP32 cores and 4 tensor cores per SM, 1.83 GHz (low precision) / 1.98 GHz; "
                         "dense FP8 1978.9, BF16 989.4, FP32 66.9 TFLOP/s",
    "h800": "H800 SXM = H100 SXM silicon with NVLink cut to 400 GB/s and FP64 cut "
            "(philisun.com 'NVIDIA H800 vs H100'; aiwiki.ai/wiki/nvidia_h800); same 132 SMs, HBM3 3.35 TB/s",
    "h200": "NVIDIA H200 SXM: 141 GB HBM3e at 4.8 TB/s, compute as H100 SXM (/work/.library/device/H200.md, "
            "vendor datasheet figures; saulelectric.com/nvidia-h200.html: 132 SMs, NVLink 900 GB/s)",
    "cuda-guide-smem": "CUDA C++ Programming Guide, shared memory (compute capability 5.x and later): 32 banks, "
                       "each 32 bits wide per clock; /work/.library/device/HOPPER.md",
    "pmc-table3": "Table 3 of PMC10448217 (Ultrasonics Sonochemistry 99, 2023): H100 global memory latency 400, "
                  "L2 latency 200, shared memory latency 20, arithmetic latency 4 clock cycles; L2 bandwidth "
                  "8986 GB/s (a full GH100 at 1755 MHz; the weakest source here)",
    "anchors-copy": "../shared/ANCHORS.md (H100 figures): 'H100 80GB HBM3: device copy ~ 3.0 TB/s (bytes read + "
                    "written)', against the datasheet's 3.35 TB/s",
    "h200-copy": "docs/results.md, H200 run 2 (source: gpu, commit 8d5587c): device copy 4231 GB/s measured by the "
                 "bench's copy peak (a copy microbenchmark, not one of the GEMM points), against the datasheet's "
                 "4.8 TB/s",
    "derived": "derived from the figures above (the formula is in the field's comment)",
    "assumption": "ASSUMPTION: no public figure found in this session; see docs/perf-model.md",
}


@dataclasses.dataclass(frozen=True)
class Fact:
    value: float
    source: str          # a key of SOURCES
    note: str = ""

    @property
    def assumption(self) -> bool:
        return self.source == "assumption"


def _f(value, source, note=""):
    return Fact(value, source, note)


# Numbers shared by the three SXM parts (same GH100 configuration: 132 SMs).
_COMMON = {
    "sms": _f(132, "whitepaper-clocks"),
    "clock_hz": _f(1.83e9, "whitepaper-clocks", "the clock the datasheet's tensor TFLOP/s are quoted at: "
                                                "1978.9e12 / (132 SMs x 8192 FLOP/clk) = 1.83 GHz"),
    "subpartitions": _f(4, "whitepaper-clocks", "4 tensor cores per SM, one per sub-partition"),
    # tensor cores: dense multiply-adds per clock per SM
    "mma_fp8_per_clk": _f(4096, "derived", "1978.9 TFLOP/s / 2 / 132 SMs / 1.83 GHz"),
    "mma_bf16_per_clk": _f(2048, "derived", "989.4 TFLOP/s / 2 / 132 SMs / 1.83 GHz"),
    "mma_tf32_per_clk": _f(1024, "derived", "494.7 TFLOP/s / 2 / 132 SMs / 1.83 GHz"),
    # CUDA-core lanes per SM (one warp instruction per sub-partition needs 32 / (lanes / 4) clocks)
    "fp32_lanes": _f(128, "whitepaper-clocks"),
    "int32_lanes": _f(64, "assumption", "16 INT32 units per sub-partition as drawn in the Hopper SM diagram"),
    "mufu_lanes": _f(16, "assumption", "ex2/lg2/rcp/rsqrt/sin/cos/tanh: 4 per sub-partition"),
    "conv_lanes": _f(64, "assumption", "cvt between 32-bit and 16/8-bit floats on the integer-rate pipe"),
    "shfl_lanes": _f(32, "assumption", "shfl/vote/redux: one warp instruction per SM per clock"),
    "registers_bytes": _f(256 * 1024, "datasheet-h100"),
    "smem_bytes": _f(228 * 1024, "datasheet-h100"),
    "smem_banks": _f(32, "cuda-guide-smem"),
    "smem_bytes_per_clk": _f(128, "cuda-guide-smem", "32 banks x 4 bytes: one 128-byte wavefront per clock"),
    "l2_bytes": _f(50 * 2**20, "datasheet-h100"),
    "l2_bytes_per_s": _f(8986e9, "pmc-table3"),
    # One SM's port to the L2 / crossbar: the L2's bandwidth split evenly over the SMs (8986e9 / 1.83e9 / 132).
    # The model's v0.1 assumed 64 B/clk. That one SM cannot draw more than its even share, even when few
    # SMs load, is an assumption (no public per-SM figure found); docs/perf-model.md gives the H200
    # evidence for it (33-38 B/clk per SM whether 17 or 132 SMs load; multicast, which halves L2 reads
    # but not what each SM receives, does not help).
    "sm_l2_bytes_per_clk": _f(8986e9 / 1.83e9 / 132, "derived", "L2 bytes per clock / SMs = 37.2"),
    # latencies, SM clocks
    "lat_alu": _f(4, "pmc-table3"),
    "lat_mufu": _f(16, "assumption"),
    "lat_shfl": _f(16, "assumption"),
    "lat_smem": _f(20, "pmc-table3"),
    "lat_l2": _f(200, "pmc-table3"),
    "lat_hbm": _f(400, "pmc-table3"),
    "lat_tma_issue": _f(16, "assumption", "TMA / bulk-copy descriptor processing before bytes move"),
    "lat_mbarrier": _f(16, "assumption", "phase completion to the woken try_wait"),
    "lat_bar": _f(16, "assumption", "named barrier / barrier.cluster release after the last arrival"),
    "lat_cluster_bar": _f(64, "assumption", "barrier.cluster across SMs"),
    "lat_wgmma": _f(32, "assumption", "pipeline latency added to a wgmma's throughput time before wait_group sees it"),
}

_HBM_EFF = ("sustained / datasheet HBM bandwidth of a device copy (reads and writes mixed: refresh, read-write "
            "turnaround); applied to every byte that reaches HBM")

_PARTS = {
    "h100": dict(_COMMON, name=_f("H100 SXM", "datasheet-h100"),
                 hbm_bytes_per_s=_f(3.35e12, "datasheet-h100"), nvlink_bytes_per_s=_f(900e9, "datasheet-h100"),
                 hbm_efficiency=_f(3.0e12 / 3.35e12, "anchors-copy", _HBM_EFF)),
    "h800": dict(_COMMON, name=_f("H800 SXM", "h800"),
                 hbm_bytes_per_s=_f(3.35e12, "h800"), nvlink_bytes_per_s=_f(400e9, "h800"),
                 hbm_efficiency=_f(3.0e12 / 3.35e12, "anchors-copy", _HBM_EFF + "; the H100's HBM3")),
    "h200": dict(_COMMON, name=_f("H200 SXM", "h200"),
                 hbm_bytes_per_s=_f(4.8e12, "h200"), nvlink_bytes_per_s=_f(900e9, "h200"),
                 hbm_efficiency=_f(4231e9 / 4.8e12, "h200-copy", _HBM_EFF)),
}


class Part:
    """A named Hopper part: `part.sms`, `part.clock_hz` ... are plain numbers; `part.facts`
    keeps each number's source."""

    def __init__(self, key: str, overrides: dict = None):
        if key not in _PARTS:
            raise ValueError(f"part: expected one of {sorted(_PARTS)}, got {key!r}")
        self.key = key
        self.facts = dict(_PARTS[key])
        for name, value in (overrides or {}).items():
            if name not in self.facts:
                raise ValueError(f"overrides: {name!r} is not a field of the machine description")
            self.facts[name] = Fact(value, "assumption", "overridden by the caller")
        for name, fact in self.facts.items():
            setattr(self, name, fact.value)

    # derived rates, per SM clock
    def l2_bytes_per_clk(self) -> float:
        return self.l2_bytes_per_s / self.clock_hz

    def hbm_bytes_per_clk(self) -> float:
        """Sustained HBM bytes per SM clock (the datasheet rate x hbm_efficiency)."""
        return self.hbm_bytes_per_s * self.hbm_efficiency / self.clock_hz

    def mma_per_clk(self, dtype: str) -> int:
        if dtype in ("e4m3", "e5m2"):
            return self.mma_fp8_per_clk
        if dtype in ("bf16", "f16"):
            return self.mma_bf16_per_clk
        if dtype == "tf32":
            return self.mma_tf32_per_clk
        raise ValueError(f"dtype: no tensor-core rate for {dtype!r}")

    def assumptions(self):
        return {k: f for k, f in self.facts.items() if f.assumption}

    def __repr__(self):
        return f"Part({self.key}: {self.name})"


def part(key: str, **overrides) -> Part:
    """The machine description of `key` ('h800', 'h100', 'h200')."""
    return Part(key.lower(), overrides)


PARTS = tuple(_PARTS)
