"""python -m pykernels.perf [--part h800] gemm M N K [--kernel ours|deepgemm] [--layout L --groups G]
    the predicted time of an FP8 GEMM (our kernel, or DeepGEMM's best plausible config);
    grouped layouts: G groups of M rows each
python -m pykernels.perf [--part h800] mla B SQ HQ SK [--fp8] [--topk K]
    the predicted time of our MLA decode: B sequences of SK cached tokens, SQ new tokens,
    HQ query heads, one KV head (bf16 or the FP8 cache)
python -m pykernels.perf [--part h800] dsa-logits B NEXT_N HEADS CONTEXT
    the predicted time of our paged indexer logits (B sequences of CONTEXT keys) and its share of HBM
python -m pykernels.perf [--part h800] ep {dispatch,combine,ll-dispatch,ll-combine} [TOKENS] [--hidden H]
        [--topk K] [--experts E] [--ranks R] [--bf16] [--channels C] [--recv-ctas N]
    the predicted time of our intranode EP kernel (TOKENS per rank; default DeepEP's 4096 normal,
    128 low latency) against DeepEP's published figure
python -m pykernels.perf table [--write]
    DeepGEMM's published points: DeepGEMM's kernel through the model against its published
    figure (calibration), and ours / DeepGEMM on the same model (--write: into
    docs/perf-model.md between its perf-table markers, and the ours / DeepGEMM table with each
    small-M row's share of the memory roofline into docs/gemm.md between its gemm-table markers)
python -m pykernels.perf measured [--write]
    every (shape, kernel, config) the GPU runs measured (bench/results), beside the model's
    prediction for the same part and config (--write: into docs/perf-model.md, perf-measured markers)
python -m pykernels.perf [--part h800] machine
    the machine description, every number with its source
"""
import argparse
import pathlib
import sys

from . import MODEL_VERSION
from .machines import PARTS, SOURCES, part as get_part

# DeepGEMM's published FP8 GEMM points (../shared/ANCHORS.md):
# (part, layout, groups, M rows per group, N, K, TFLOP/s, note)
PUBLISHED = [("h800", "normal", 1, 64, 2112, 7168, 206, ""), ("h800", "normal", 1, 128, 4096, 7168, 533, ""),
             ("h800", "normal", 1, 128, 7168, 16384, 645, ""), ("h800", "normal", 1, 4096, 2112, 7168, 1127, ""),
             ("h800", "normal", 1, 4096, 32768, 512, 775, ""),
             ("h800", "normal", 1, 4096, 7168, 16384, 1520, "later up to 1550"),
             ("h800", "contiguous", 4, 8192, 4096, 7168, 1346, ""),
             ("h800", "contiguous", 8, 4096, 7168, 2048, 1214, ""),
             ("h800", "masked", 1, 1024, 4096, 7168, 1233, ""), ("h800", "masked", 4, 256, 7168, 2048, 815, ""),
             ("h100", "normal", 1, 1024, 18432, 7168, 969.8, "early DeepGEMM version")]
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "perf-model.md"
BEGIN, END = "<!-- perf-table begin -->", "<!-- perf-table end -->"
GEMM_DOC = DOC.parent / "gemm.md"
GEMM_BEGIN, GEMM_END = "<!-- gemm-table begin -->", "<!-- gemm-table end -->"
SMALL_M = 128          # rows per group up to which a GEMM is bound by reading B: its roofline share is shown


def roofline_share(prediction, p) -> float:
    """The memory roofline of a small-M GEMM over its predicted time: the bytes of B (e4m3) and
    its 128 x 128 block scales (float32) read once at the part's sustained HBM rate
    (`Part.hbm_bytes_per_clk`: the datasheet rate x hbm_efficiency, what the model uses)."""
    from ..runtime.hardware import SCALE_BLOCK, cdiv
    prob = prediction.problem
    b_bytes = prob.groups * (prob.n * prob.k + 4 * cdiv(prob.n, SCALE_BLOCK) * cdiv(prob.k, SCALE_BLOCK))
    return b_bytes / (p.hbm_bytes_per_clk() * p.clock_hz) / prediction.seconds


def tables(log=print) -> tuple:
    """(docs/perf-model.md's calibration and ratio tables, docs/gemm.md's ratio table)."""
    from .gemm import predict
    cal = ["| part | problem | DeepGEMM config (best predicted) | L2 hit | published TFLOP/s | "
           f"model v{MODEL_VERSION} TFLOP/s | error |", "|---|---|---|---|---|---|---|"]
    ratio = ["| part | problem | our config | ours, model TFLOP/s | DeepGEMM, model TFLOP/s | ours / DeepGEMM |",
             "|---|---|---|---|---|---|"]
    hbm = {key: get_part(key).hbm_bytes_per_clk() * get_part(key).clock_hz / 1e12 for key in PARTS}
    gemm = [f"| part | problem | our config | ours, model v{MODEL_VERSION} TFLOP/s | DeepGEMM, model TFLOP/s | "
            "ours / DeepGEMM | share of the memory roofline (M <= 128) |", "|---|---|---|---|---|---|---|"]
    for part_key, layout, groups, m, n, k, published, note in PUBLISHED:
        ours = predict(m, n, k, part_key, "ours", layout=layout, groups=groups)
        what = ours.problem.label()
        try:
            dg = predict(m, n, k, part_key, "deepgemm", layout=layout, groups=groups)
        except Exception as e:                    # noqa: BLE001 - the peer harness may be absent
            log(f"DeepGEMM not run for {what}: {type(e).__name__}: {e}")
            dg = None
        pub = f"{published}" + (f" ({note})" if note else "")
        if dg is not None:
            err = (dg.tflops - published) / published
            approx = " (normal kernel per unit)" if layout != "normal" else ""
            cal.append(f"| {part_key.upper()} | {what} | {dg.config}{approx} | {dg.l2_hit:.2f} | {pub} | "
                       f"{dg.tflops:.0f} | {err:+.0%} |")
        else:
            cal.append(f"| {part_key.upper()} | {what} | (harness absent) | | {pub} | | |")
        ratio.append(f"| {part_key.upper()} | {what} | {ours.config} | {ours.tflops:.0f} | "
                     f"{dg.tflops:.0f} | {ours.tflops / dg.tflops:.2f} |" if dg is not None else
                     f"| {part_key.upper()} | {what} | {ours.config} | {ours.tflops:.0f} | | |")
        share = (f"{roofline_share(ours, get_part(part_key)):.0%} (B at {hbm[part_key]:.2f} TB/s)"
                 if m <= SMALL_M else "")
        gemm.append(f"{ratio[-1]} {share} |")
        log(cal[-1])
        log(gemm[-1])
    perf = ("Calibration: DeepGEMM's SM90 FP8 1D2D kernel (sgl-deep-gemm headers, bench/peers) through the model, "
            "against its published figure. Every point, good or bad; no constant was tuned to these. Grouped "
            "rows: the peer harness has only DeepGEMM's normal kernel, so its per-unit cost stands in for the "
            "grouped kernel's, with the grouped schedule and reuse (an approximation).\n\n"
            + "\n".join(cal)
            + "\n\nOurs / DeepGEMM, both on the same model (labelled: model, model version "
            + MODEL_VERSION + "):\n\n" + "\n".join(ratio))
    return perf, ("Generated by `python -m pykernels.perf table --write` (model version " + MODEL_VERSION
                  + "; both kernels on the same model, not measured; the roofline share: the bytes of B and its "
                  "scales at the part's sustained HBM rate, the model's, over our predicted time):\n\n"
                  + "\n".join(gemm))


def write_between(doc: pathlib.Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers begin and end in doc by text."""
    content = doc.read_text()
    head, found, rest = content.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise SystemExit(f"{doc}: no {begin} ... {end} markers")
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    print(f"wrote {doc}")


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
    g.add_argument("--layout", default="normal", choices=("normal", "contiguous", "masked"))
    g.add_argument("--groups", type=int, default=1, help="grouped layouts: groups (M is rows per group)")
    d = sub.add_parser("mla")
    for name in ("b", "sq", "hq", "sk"):
        d.add_argument(name, type=int)
    d.add_argument("--fp8", action="store_true", help="the 656-byte FP8 cache")
    d.add_argument("--topk", type=int, default=0, help="the sparse decode over topk slots (FP8 cache; SK unused)")
    x = sub.add_parser("dsa-logits", help="the paged indexer logits (fp8_paged_mqa_logits)")
    for name in ("b", "next_n", "heads", "context"):
        x.add_argument(name, type=int)
    e = sub.add_parser("ep", help="our intranode EP kernels (csrc/ep)")
    e.add_argument("kind", choices=("dispatch", "combine", "ll-dispatch", "ll-combine"))
    e.add_argument("tokens", type=int, nargs="?", help="tokens per rank (default 4096 normal, 128 low latency)")
    e.add_argument("--hidden", type=int, default=7168)
    e.add_argument("--topk", type=int, default=8)
    e.add_argument("--experts", type=int, default=256)
    e.add_argument("--ranks", type=int, default=8)
    e.add_argument("--bf16", action="store_true", help="bf16 dispatch payload (default FP8; combine is bf16)")
    e.add_argument("--channels", type=int, default=10, help="normal mode: channels (2 SMs each)")
    e.add_argument("--recv-ctas", type=int, default=16, help="low-latency combine: reducing CTAs")
    t = sub.add_parser("table")
    t.add_argument("--write", action="store_true", help=f"replace the tables in docs/{DOC.name}")
    ms = sub.add_parser("measured")
    ms.add_argument("--write", action="store_true", help=f"replace the measured table in docs/{DOC.name}")
    sub.add_parser("machine")
    a = ap.parse_args(argv)
    if a.cmd == "gemm":
        from .gemm import predict
        print("\n".join(predict(a.m, a.n, a.k, a.part, a.kernel, layout=a.layout, groups=a.groups).lines()))
    elif a.cmd == "mla":
        from .mla import predict as predict_mla
        print("\n".join(predict_mla([a.sk] * a.b, a.sq, a.hq, fp8=a.fp8, part=a.part, topk=a.topk).lines()))
    elif a.cmd == "dsa-logits":
        from .dsa import predict_paged_logits
        print("\n".join(predict_paged_logits(a.b, a.next_n, a.heads, a.context, a.part).lines(get_part(a.part))))
    elif a.cmd == "ep":
        from .ep import predict as predict_ep
        tokens = a.tokens or (128 if a.kind.startswith("ll") else 4096)
        print("\n".join(predict_ep(a.kind, tokens, a.hidden, a.topk, a.experts, a.ranks, not a.bf16, a.part,
                                   channels=a.channels, recv_ctas=a.recv_ctas).lines()))
    elif a.cmd == "table":
        perf, gemm = tables()
        if a.write:
            write_between(DOC, BEGIN, END, perf)
            write_between(GEMM_DOC, GEMM_BEGIN, GEMM_END, gemm)
    elif a.cmd == "measured":
        from .measured import report
        print(report(write=a.write))
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
