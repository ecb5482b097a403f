"""CUDA-event timing with L2 flushes and rotating inputs; a row of ours is timed only after its
output matched the reference backend's (measure_row)."""
import statistics
from dataclasses import dataclass

FLUSH_BYTES = 256 << 20  # larger than H100/H200 L2 (50 MiB), so each run starts cold
CHECK_DIFF = 1e-5        # calc_diff of ours against the reference backend before any timing (selfcheck's bound)


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


def time_kernels(fn, runs: int = 20, warmup: int = 3, flush: bool = True) -> float:
    """Mean device time per call of the kernels `fn` launches (CUPTI, through
    torch.profiler), host overhead and launch gaps excluded: the figure DeepGEMM's and
    FlashMLA's own benchmarks report. The L2-flush kernel between calls is not counted."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    buf = _flush_buffer() if flush else None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            if buf is not None:
                buf.zero_()
            fn()
        torch.cuda.synchronize()
    flush_names = _flush_kernel_names() if flush else set()
    total_us = sum(_device_us(e) for e in prof.key_averages()
                   if _device_us(e) > 0 and e.key not in flush_names)
    return total_us / runs / 1e6


_flush_names = None


def _flush_kernel_names() -> set:
    """The kernel(s) torch launches for the flush (profiled once, alone)."""
    global _flush_names
    import torch
    from torch.profiler import ProfilerActivity, profile
    if _flush_names is None:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _flush_buffer().zero_()
            torch.cuda.synchronize()
        _flush_names = {e.key for e in prof.key_averages() if _device_us(e) > 0}
    return _flush_names


def _device_us(event) -> float:
    # self time on the device (torch >= 2.4 names it device_*, older cuda_*)
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def host_seconds(fn, calls: int = 50) -> float:
    """Host time per call (enqueue only, no synchronisation inside the loop): the
    Python + launch overhead a call costs before the GPU can start it."""
    import time

    import torch
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls


def timed_fields(fns, runs: int) -> dict:
    """The timing fields of a benchmark row: seconds (median, CUDA events around each call,
    host overhead included), seconds_min/max, and kernel_seconds (device time only)."""
    t = time_cuda(fns, runs=runs)
    return dict(seconds=t.median, seconds_min=t.min, seconds_max=t.max,
                kernel_seconds=time_kernels(fns[0], runs=runs))


def wrong_output(impl: str, out, want) -> str:
    """'' when ours matches the reference backend's output `want` (a tensor) and no input error
    was recorded, else why the row must not be timed. Baselines are not checked."""
    if not impl.startswith("pykernels_"):
        return ""
    from pykernels import check_errors
    from pykernels.metrics import calc_diff
    check_errors()
    diff = calc_diff(out.float(), want.float())
    return "" if diff < CHECK_DIFF else f"wrong output: calc_diff {diff:.2e} >= {CHECK_DIFF} against the reference"


def measure_row(row: dict, make_fns, check, runs: int, unsupported=()) -> dict:
    """Fill `row`'s timing fields, or its note: make_fns() builds one zero-argument callable per
    input set; check(the first one's output) says why the row must not be timed ('' when it may,
    wrong_output); a failure while building or probing (a missing backend raises there) becomes
    the note, the message alone for the `unsupported` exception types. Returns row."""
    import torch
    try:
        fns = make_fns()
        wrong = check(fns[0]())  # probe outside the timing
        torch.cuda.synchronize()
    except Exception as e:  # report, never invent a figure
        msg = " ".join(str(e).split())  # one line, so the table stays readable
        row["note"] = msg[:200] if isinstance(e, unsupported) else f"failed: {type(e).__name__}: {msg[:160]}"
        return row
    if wrong:
        row["note"] = wrong
    else:
        row.update(timed_fields(fns, runs))
    return row
