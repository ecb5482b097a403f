"""CUDA-event timing with L2 flushes and rotating inputs."""
import statistics
from dataclasses import dataclass

FLUSH_BYTES = 256 << 20  # larger than H100/H200 L2 (50 MiB), so each run starts cold


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the measured runs."""
    median: float
    min: float
    max: float


def summarize(seconds) -> Timing:
    """Median / min / max of a non-empty sequence of per-run seconds."""
    seconds = list(seconds)
    if not seconds:
        raise ValueError("seconds: expected at least one measurement")
    return Timing(statistics.median(seconds), min(seconds), max(seconds))


_flush_buf = None


def _flush_buffer():
    # One buffer per process: allocating 256 MiB per run would itself be timed noise.
    global _flush_buf
    import torch
    if _flush_buf is None:
        _flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return _flush_buf


def time_cuda(fns, runs: int = 50, warmup: int = 5, flush: bool = True) -> Timing:
    """Time GPU work: fns is a list of zero-argument callables, one per input set.

    Run i calls fns[i % len(fns)], so consecutive runs touch different data; with
    flush=True a 256 MiB write between runs evicts L2. Only the call itself lies
    between the two events; the host synchronises once, after all runs.
    """
    import torch
    if not fns:
        raise ValueError("fns: expected at least one callable")
    for i in range(warmup):  # compile / autotune / cuBLAS heuristics outside the timing
        fns[i % len(fns)]()
    buf = _flush_buffer() if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    torch.cuda.synchronize()
    for i in range(runs):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
