"""python -m pykernels.perf [--part h800] gemm M N K [--kernel ours|deepgemm]
    the predicted time of an FP8 GEMM (our kernel, or DeepGEMM's best plausible config)
python -m pykernels.perf table [--write]
    DeepGEMM's published points: DeepGEMM's kernel through the model against its published
    figure (calibration), and ours / DeepGEMM on the same model (--write: into
    docs/perf-model.md, between its perf-table markers)
python -m pykernels.perf [--part h800] machine
    the machine description, every number with its source
"""
import argparse
import pathlib
import sys

from . import MODEL_VERSION
from .machines import PARTS, SOURCES, part as get_part

# Published normal-layout FP8 GEMM points (../shared/ANCHORS.md): (part, M, N, K, TFLOP/s, note)
PUBLISHED = [("h800", 64, 2112, 7168, 206, ""), ("h800", 128, 4096, 7168, 533, ""),
             ("h800", 128, 7168, 16384, 645, ""), ("h800", 4096, 2112, 7168, 1127, ""),
             ("h800", 4096, 32768, 512, 775, ""), ("h800", 4096, 7168, 16384, 1520, "later up to 1550"),
             ("h100", 1024, 18432, 7168, 969.8, "early DeepGEMM version")]
# Published grouped points the model does not cover yet (contiguous / masked layouts)
NOT_YET = [("h800", "contiguous 4 x 8192 rows", 4096, 7168, 1346), ("h800", "contiguous 8 x 4096 rows", 7168, 2048, 1214),
           ("h800", "masked 1 x 1024 rows", 4096, 7168, 1233), ("h800", "masked 4 x 256 rows", 7168, 2048, 815)]
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "perf-model.md"
BEGIN, END = "<!-- perf-table begin -->", "<!-- perf-table end -->"


def tables(log=print) -> str:
    from .gemm import predict
    cal = ["| part | M | N | K | DeepGEMM config (best predicted) | L2 hit | published TFLOP/s | "
           f"model v{MODEL_VERSION} TFLOP/s | error |", "|---|---|---|---|---|---|---|---|---|"]
    ratio = ["| part | M | N | K | our config | ours, model TFLOP/s | DeepGEMM, model TFLOP/s | ours / DeepGEMM |",
             "|---|---|---|---|---|---|---|---|"]
    for part_key, m, n, k, published, note in PUBLISHED:
        ours = predict(m, n, k, part_key, "ours")
        try:
            dg = predict(m, n, k, part_key, "deepgemm")
        except Exception as e:                    # noqa: BLE001 - the peer harness may be absent
            log(f"DeepGEMM not run for {m}x{n}x{k}: {type(e).__name__}: {e}")
            dg = None
        pub = f"{published}" + (f" ({note})" if note else "")
        if dg is not None:
            err = (dg.tflops - published) / published
            cal.append(f"| {part_key.upper()} | {m} | {n} | {k} | {dg.config} | {dg.l2_hit:.2f} | {pub} | "
                       f"{dg.tflops:.0f} | {err:+.0%} |")
        else:
            cal.append(f"| {part_key.upper()} | {m} | {n} | {k} | (harness absent) | | {pub} | | |")
        ratio.append(f"| {part_key.upper()} | {m} | {n} | {k} | {ours.config} | {ours.tflops:.0f} | "
                     f"{dg.tflops:.0f} | {ours.tflops / dg.tflops:.2f} |" if dg is not None else
                     f"| {part_key.upper()} | {m} | {n} | {k} | {ours.config} | {ours.tflops:.0f} | | |")
        log(cal[-1])
        log(ratio[-1])
    for part_key, what, n, k, published in NOT_YET:
        cal.append(f"| {part_key.upper()} | {what} | {n} | {k} | grouped layouts not modelled yet | | {published} | | |")
    return ("Calibration: DeepGEMM's SM90 FP8 1D2D kernel (sgl-deep-gemm headers, bench/peers) through the model, "
            "against its published figure. Every point, good or bad; no constant was tuned to these.\n\n"
            + "\n".join(cal)
            + "\n\nOurs / DeepGEMM, both on the same model (labelled: model, model version "
            + MODEL_VERSION + "):\n\n" + "\n".join(ratio))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pykernels.perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="h800", choices=PARTS)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gemm")
    g.add_argument("m", type=int)
    g.add_argument("n", type=int)
    g.add_argument("k", type=int)
    g.add_argument("--kernel", default="ours", choices=("ours", "deepgemm"))
    t = sub.add_parser("table")
    t.add_argument("--write", action="store_true", help=f"replace the tables in docs/{DOC.name}")
    sub.add_parser("machine")
    a = ap.parse_args(argv)
    if a.cmd == "gemm":
        from .gemm import predict
        print("\n".join(predict(a.m, a.n, a.k, a.part, a.kernel).lines()))
    elif a.cmd == "table":
        text = tables()
        if a.write:
            doc = DOC.read_text()
            head, found, rest = doc.partition(BEGIN)
            if not found:
                raise SystemExit(f"{DOC}: no {BEGIN} marker")
            _, _, tail = rest.partition(END)
            DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
            print(f"wrote {DOC}")
    else:
        p = get_part(a.part)
        for name, fact in p.facts.items():
            flag = "ASSUMPTION " if fact.assumption else ""
            print(f"{name:22s} {fact.value!s:>14}  {flag}[{fact.source}] {fact.note}")
        print()
        for key, text in SOURCES.items():
            print(f"[{key}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
