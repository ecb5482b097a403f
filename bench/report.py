"""Turn raw measurements into derived figures, a table, a JSON file and a roofline plot."""
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

_PEAK_KEY = {"bf16": "bf16_tflops", "fp8_tensor": "fp8_tflops", "fp8_block": "fp8_tflops"}
_REFS = {"ratio_to_cublas_bf16": "cublas_bf16", "ratio_to_cublas_fp8": "cublaslt_fp8_tensor",
         "ratio_to_triton": "pykernels_triton", "ratio_to_sdpa": "torch_sdpa"}


def roofline_tflops(ai: float, peak_tflops: float, bw_gbps: float) -> float:
    """Attainable TFLOP/s at arithmetic intensity ai (FLOP/byte): min(compute, bw * ai)."""
    return min(peak_tflops, bw_gbps * ai / 1e3)


def derive(raw: list, peaks: dict) -> list:
    """Add tflops, gbps, ai, roofline_fraction and speed ratios to each raw row.

    A ratio is reference_seconds / impl_seconds on the same shape: > 1 means faster
    than the reference. Figures stay None for rows that were not measured.
    """
    by_key = {(r["op"], r["shape"], r["impl"]): r for r in raw}
    rows = []
    for r in raw:
        r = dict(r, ai=r["flops"] / r["bytes"])
        t = r["seconds"]
        r["tflops"] = r["flops"] / t / 1e12 if t else None
        r["gbps"] = r["bytes"] / t / 1e9 if t else None
        roof = roofline_tflops(r["ai"], peaks[_PEAK_KEY[r["precision"]]], peaks["bw_gbps"])
        r["roofline_fraction"] = r["tflops"] / roof if t else None
        r["bandwidth_fraction"] = r["gbps"] / peaks["bw_gbps"] if t else None
        for key, ref_impl in _REFS.items():
            ref = by_key.get((r["op"], r["shape"], ref_impl), {}).get("seconds")
            r[key] = ref / t if (t and ref) else None
        rows.append(r)
    return rows


_COLS = [("op", "{}"), ("shape", "{}"), ("impl", "{}"), ("seconds", "{:.1f}"), ("kernel_seconds", "{:.1f}"),
         ("tflops", "{:.1f}"),
         ("gbps", "{:.0f}"), ("roofline_fraction", "{:.2f}"), ("ratio_to_cublas_bf16", "{:.2f}"),
         ("ratio_to_cublas_fp8", "{:.2f}"), ("ratio_to_triton", "{:.2f}"), ("ratio_to_sdpa", "{:.2f}"),
         ("bandwidth_fraction", "{:.2f}"), ("note", "{}")]
_HEAD = {"seconds": "us", "kernel_seconds": "kern_us", "roofline_fraction": "roof", "ratio_to_cublas_bf16": "x_bf16",
         "ratio_to_cublas_fp8": "x_fp8", "ratio_to_triton": "x_triton", "ratio_to_sdpa": "x_sdpa",
         "bandwidth_fraction": "bw"}


def format_table(rows: list) -> str:
    """Fixed-width text table; time in microseconds, '-' where nothing was measured."""
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None or v == "":
            return "-"
        return fmt.format(v * 1e6 if key in ("seconds", "kernel_seconds") else v)
    body = [[cell(r, k, f) for k, f in _COLS] for r in rows]
    head = [_HEAD.get(k, k) for k, _ in _COLS]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    return "\n".join(lines)


def slug(name: str) -> str:
    """File-name-safe lower-case form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit(repo=".") -> str:
    """$PK_GIT_COMMIT when set (a copy of the tree without .git, as on a lent GPU machine:
    bench/gpu_session.sh), else HEAD's commit hash, or 'unknown' outside a git checkout."""
    if os.environ.get("PK_GIT_COMMIT"):
        return os.environ["PK_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path, meta: dict, peaks: dict, rows: list) -> Path:
    """Write {**meta, 'peaks', 'results'} to path (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, peaks=peaks, results=rows), indent=2) + "\n")
    return path


def plot_roofline(path, peaks: dict, rows: list, title: str = "") -> Path:
    """Log-log roofline PNG: the FP8 and BF16 roofs and one point per measured row."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    measured = [r for r in rows if r.get("tflops")]
    ais = [r["ai"] for r in measured] or [1.0]
    x = np.logspace(np.log10(min(ais) / 4), np.log10(max(ais) * 4), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key, label, style in (("fp8_tflops", "FP8 roof", "-"), ("bf16_tflops", "BF16 roof", "--")):
        ax.plot(x, [roofline_tflops(a, peaks[key], peaks["bw_gbps"]) for a in x], style, color="k", label=label)
    for impl in sorted({r["impl"] for r in measured}):
        pts = [r for r in measured if r["impl"] == impl]
        ax.scatter([r["ai"] for r in pts], [r["tflops"] for r in pts], label=impl, s=22)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="TFLOP/s",
           title=title or "roofline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def today() -> str:
    """Local date as YYYY-MM-DD (the results file name's date)."""
    return datetime.date.today().isoformat()
