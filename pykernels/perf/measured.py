"""The model against the GPU: every (shape, kernel, config) a GPU run measured, predicted
by the model for the same part and config, side by side (docs/perf-model.md, "Against a GPU").

Reads the GEMM comparisons of the GPU runs (bench/results/<part>-<date>-<commit>/
deepgemm-vs-ours.json, `"source": "gpu"`); per (shape, kernel, config) the latest run's
row counts (runs ordered by their commit's place in this repository's history). A row of
our kernel measured before a later change to that config's kernel (KERNEL_CHANGES) is
kept, flagged, and left out of the error summary: the model runs today's kernel. The
`auto=` rows of a run repeat a swept config through the API and are skipped.

Predictions are cached per model version in bench/results/model-vs-gpu-v<version>.json,
so the table can show the previous version's error beside the current one.
"""
import dataclasses
import json
import pathlib
import re
import subprocess

from ..runtime.hardware import SCALE_BLOCK, cdiv
from . import MODEL_VERSION

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- perf-measured begin -->", "<!-- perf-measured end -->"
PREVIOUS_VERSION = "0.1"

# (commit, what changed, predicate on our config name): kernel changes after which an
# earlier measurement of that config no longer describes the kernel the model runs.
KERNEL_CHANGES = [
    ("e5015a6", "multicast release without the GPU-scope fence; 112/144/160-column tiles' compile-time "
                "B-scale split", lambda cfg: cfg.endswith("_mc2") or re.search(r"n(112|144|160)", cfg) is not None),
    ("ea1bc83", "BLOCK_M 64 with BLOCK_N <= 64: two accumulator sets", lambda cfg: re.fullmatch(r"m64n(32|64)", cfg)
     is not None),
]


@dataclasses.dataclass(frozen=True)
class Row:
    run: str            # results directory
    commit: str
    m: int
    n: int
    k: int
    kernel: str         # "ours" | "deepgemm"
    config: str         # as the run names it: m128n160_mc2 / m128n144c2s5
    block_m: int
    block_n: int
    cluster: int
    kernel_us: float    # CUPTI kernel time, median
    call_us: float      # CUDA events around one call
    stale: str          # "" or the later kernel change this measurement predates

    @property
    def key(self) -> str:
        return f"{self.m}x{self.n}x{self.k} {self.kernel} {self.config}"

    def port_bytes_per_clk(self, sms: int, clock_hz: float) -> float:
        """Bytes the busiest SM received and stored per clock over the measured kernel time:
        per unit, every K block's A, B (multicast: the whole B too) and A-scale tiles and
        the bf16 output tile. Overheads are in the time, so this is a lower bound of its
        port's rate (the model caps it at sm_l2_bytes_per_clk)."""
        units = cdiv(cdiv(self.m, self.block_m), self.cluster) * cdiv(self.n, self.block_n)
        slots = min(sms // self.cluster, units)
        per_k_block = (self.block_m + self.block_n) * SCALE_BLOCK + self.block_m * 4
        per_unit = cdiv(self.k, SCALE_BLOCK) * per_k_block + self.block_m * self.block_n * 2
        return cdiv(units, slots) * per_unit / (self.kernel_us * 1e-6 * clock_hz)

    @property
    def tiles_name(self) -> str:
        if self.kernel == "ours":
            return f"pk_fp8_gemm_nt_m{self.block_m}n{self.block_n}" + ("_mc2" if self.cluster == 2 else "")
        return f"deepgemm_m{self.block_m}n{self.block_n}" + ("_mc2" if self.cluster == 2 else "")


def _history_position(commit: str) -> int:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-list", "--count", commit], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return -1


def _is_before(commit: str, later: str) -> bool:
    """commit is an ancestor of later (and not later itself)."""
    if commit.startswith(later) or later.startswith(commit):
        return False
    r = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, later], capture_output=True)
    return r.returncode == 0


def _parse_config(kernel: str, config: str):
    if kernel == "ours":
        mt = re.fullmatch(r"m(\d+)n(\d+)(_mc2)?", config)
        if not mt:
            raise ValueError(f"config: expected our form m<BM>n<BN>[_mc2], got {config!r}")
        return int(mt[1]), int(mt[2]), 2 if mt[3] else 1
    mt = re.fullmatch(r"m(\d+)n(\d+)c(\d)s(\d+)", config)
    if not mt:
        raise ValueError(f"config: expected DeepGEMM's form m<BM>n<BN>c<C>s<S>, got {config!r}")
    return int(mt[1]), int(mt[2]), int(mt[3])


def measured_rows(part_name: str = "NVIDIA H200") -> list:
    """The latest GPU measurement of every (shape, kernel, config) of the GEMM comparisons."""
    runs = []
    for path in sorted(RESULTS.glob("*/deepgemm-vs-ours.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        if meta.get("source") != "gpu" or meta.get("gpu") != part_name:
            continue
        runs.append((_history_position(meta["git_commit"]), path.parent.name, meta["git_commit"][:7], data["rows"]))
    runs.sort()
    latest = {}
    for _, run, commit, rows in runs:
        for r in rows:
            if r.get("source") != "gpu" or r["config"].startswith("auto=") or not r.get("kernel_seconds"):
                continue
            kernel = "ours" if r["impl"] == "pykernels_cuda" else "deepgemm" if r["impl"] == "deepgemm" else None
            if kernel is None:
                continue
            bm, bn, c = _parse_config(kernel, r["config"])
            stale = ""
            if kernel == "ours":
                for change, what, hits in KERNEL_CHANGES:
                    if hits(r["config"]) and _is_before(commit, change):
                        stale = f"measured at {commit}, before {change} ({what})"
                        break
            row = Row(run, commit, r["m"], r["n"], r["k"], kernel, r["config"], bm, bn, c,
                      r["kernel_seconds"] * 1e6, r["seconds"] * 1e6, stale)
            latest[row.key] = row
    return sorted(latest.values(), key=lambda x: (x.m * x.n * x.k, x.m, x.kernel != "ours", x.block_m, x.block_n,
                                                  x.cluster))


def _cache_path(version: str) -> pathlib.Path:
    return RESULTS / f"model-vs-gpu-v{version}.json"


def predict_rows(rows, part="h200", log=print) -> dict:
    """Model time (us) of every row for this model version; cached in RESULTS."""
    from . import gemm as PG
    from .machines import part as get_part
    path = _cache_path(MODEL_VERSION)
    cache = json.loads(path.read_text()) if path.exists() else {}
    preds = cache.get("predictions", {})
    p = get_part(part)
    kernels = {}
    for r in rows:
        if r.key in preds:
            continue
        if r.kernel not in kernels:
            kernels[r.kernel] = PG.Ours() if r.kernel == "ours" else PG.DeepGemm()
        try:
            pr = PG.predict_config(kernels[r.kernel], PG.Tiles(r.kernel, r.block_m, r.block_n, r.cluster, r.tiles_name),
                                   PG.Problem("normal", 1, r.m, r.n, r.k), p)
            preds[r.key] = {"us": pr.seconds * 1e6, "per_kb_clk": pr.per_kb_clk, "l2_hit": pr.l2_hit}
        except Exception as e:                        # noqa: BLE001 - the peer harness may be absent
            log(f"{r.key}: not predicted: {type(e).__name__}: {e}")
            continue
        log(f"{r.key}: model {preds[r.key]['us']:.1f} us, measured {r.kernel_us:.1f} us")
        path.write_text(json.dumps({"source": "model", "model_version": MODEL_VERSION, "part": part,
                                    "predictions": preds}, indent=1) + "\n")
    return preds


def table(rows, preds: dict, previous: dict = None, part="h200") -> str:
    from .machines import part as get_part
    p = get_part(part)
    prev_head = f" | v{PREVIOUS_VERSION} model / measured" if previous is not None else ""
    lines = [f"| problem | kernel | config | measured kernel us (call) | run | measured B/clk per SM | "
             f"model v{MODEL_VERSION} us | model / measured{prev_head} |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if previous is not None else "")]
    ratios, prev_ratios = [], []
    for r in rows:
        pr = preds.get(r.key)
        model = f"{pr['us']:.1f}" if pr else "not run"
        ratio = pr["us"] / r.kernel_us if pr else None
        prv = previous.get(r.key) if previous is not None else None
        prev_ratio = prv["us"] / r.kernel_us if prv else None
        flag = " (stale)" if r.stale else ""
        cell = f"{ratio:.2f}{flag}" if ratio is not None else ""
        pcell = (f" | {prev_ratio:.2f}" if prev_ratio is not None else " | ") if previous is not None else ""
        port = r.port_bytes_per_clk(p.sms, p.clock_hz)
        lines.append(f"| {r.m}x{r.n}x{r.k} | {'ours' if r.kernel == 'ours' else 'DeepGEMM'} | {r.config} | "
                     f"{r.kernel_us:.1f} ({r.call_us:.1f}) | {r.commit} | {port:.1f} | {model} | {cell}{pcell} |")
        if not r.stale and ratio is not None:
            ratios.append(ratio)
            if prev_ratio is not None:
                prev_ratios.append(prev_ratio)
    stale = sorted({r.stale for r in rows if r.stale})
    out = ["Source: gpu (H200, docs/results.md) against model (H200), one row per (shape, kernel, config) at "
           "its latest measurement; measured = CUPTI kernel time (CUDA events around the call in brackets). "
           "Measured B/clk per SM: what the busiest SM received and stored per clock at "
           f"{p.clock_hz / 1e9:.2f} GHz over the kernel time (every K block's A, B, A-scale tiles and the bf16 "
           f"output tile; a lower bound of its port's rate, which model v{MODEL_VERSION} caps at "
           f"{p.sm_l2_bytes_per_clk:.1f}). Regenerated by `python -m pykernels.perf measured --write`.",
           "", *lines, ""]
    if ratios:
        out.append(f"Summary over {len(ratios)} current rows: model / measured {_summary(ratios)}"
                   + (f"; v{PREVIOUS_VERSION} on the same rows: {_summary(prev_ratios)}" if prev_ratios else "")
                   + ".")
    for s in stale:
        out.append(f"(stale): {s}; kept for the record, out of the summary.")
    return "\n".join(out)


def _summary(ratios) -> str:
    import statistics
    within = sum(1 for x in ratios if abs(x - 1) <= 0.15)
    mean_abs = statistics.fmean(abs(x - 1) for x in ratios)
    return (f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}, "
            f"{within} of {len(ratios)} within 15%, mean |error| {mean_abs:.0%}")


def report(write: bool = False, doc: pathlib.Path = None, log=print) -> str:
    rows = measured_rows()
    preds = predict_rows(rows, log=log)
    prev_path = _cache_path(PREVIOUS_VERSION)
    previous = None
    if PREVIOUS_VERSION != MODEL_VERSION and prev_path.exists():
        previous = json.loads(prev_path.read_text())["predictions"]
    text = table(rows, preds, previous)
    if write:
        doc = doc or ROOT / "docs" / "perf-model.md"
        body = doc.read_text()
        head, found, rest = body.partition(BEGIN)
        if not found:
            raise SystemExit(f"{doc}: no {BEGIN} marker")
        _, _, tail = rest.partition(END)
        doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        log(f"wrote {doc}")
    return text
