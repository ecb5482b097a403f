"""Command line: ``python -m bench [--quick] [--ops ...] [--out-dir DIR] [--runs N] [--model PART]``."""
import argparse
import sys
from pathlib import Path

from . import shapes as S

_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ALL_OPS = S.OPS + ("mla", "ep")  # the GEMM layouts, MLA decode (bench/mla.py), EP (bench/ep.py)


def parse_args(argv=None):
    """Parse the command line; --ops is a comma-separated subset of normal,contiguous,masked."""
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Time pykernels' FP8 GEMMs and MLA decode against cuBLAS / SDPA baselines on this GPU."))
    p.add_argument("--quick", action="store_true", help="small shapes, to check the harness quickly")
    p.add_argument("--ops", default=",".join(ALL_OPS),
                   help="comma-separated ops to run (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=_DEFAULT_OUT,
                   help="where JSON and PNG go (default: bench/results)")
    p.add_argument("--runs", type=int, default=50,
                   help="timed runs per implementation and shape (default: %(default)s)")
    p.add_argument("--model", metavar="PART", default=None,
                   help="predict on the performance model of PART (h800, h100, h200) instead of measuring: "
                        "no GPU needed; every row says source=model (GEMM layouts and MLA decode)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in ALL_OPS]
    if bad or not ops:
        p.error(f"--ops: unknown {bad or 'empty list'}; choose from {','.join(ALL_OPS)}")
    if args.runs < 1:
        p.error("--runs: expected a positive integer")
    args.ops = ops
    return args


def main(argv=None) -> int:
    """Measure peaks, then every shape; print the table, write JSON and the roofline PNG."""
    args = parse_args(argv)
    if args.model:
        return predict(args)
    import torch
    if not torch.cuda.is_available():
        # Exit before any figure: numbers from a CPU run would be meaningless.
        print("bench: no CUDA GPU available; nothing measured", file=sys.stderr)
        return 2
    import triton

    from . import baselines, peaks as P, report as R

    gpu = torch.cuda.get_device_name()
    peaks = P.measure_peaks()
    print(f"{gpu}: copy {peaks['bw_gbps']:.0f} GB/s, bf16 {peaks['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 {peaks['fp8_tflops']:.0f} TFLOP/s", flush=True)
    raw = []
    for s in S.shape_set(args.quick, [o for o in args.ops if o in S.OPS]):
        raw += baselines.measure_shape(s, runs=args.runs)
        print(f"  measured {s.op} {s.label()}", file=sys.stderr, flush=True)
    if "mla" in args.ops:
        from . import mla
        raw += mla.measure(args.quick, runs=args.runs)
    ep_rows = []
    if "ep" in args.ops:
        from . import ep
        ep_rows = ep.measure(args.quick)
        for r in ep_rows:
            print(f"  ep {r['shape']} {r.get('step', '')}: "
                  + (f"{r['seconds'] * 1e6:.0f} us, {r['gbps_per_rank']:.1f} GB/s per rank" if r["seconds"]
                     else r["note"]), flush=True)
    rows = R.derive(raw, peaks)
    print(R.format_table(rows))
    date = R.today()
    meta = dict(gpu=gpu, date=date, git_commit=R.git_commit(Path(__file__).resolve().parent.parent),
                torch=torch.__version__, triton=triton.__version__, quick=args.quick, runs=args.runs)
    stem = args.out_dir / f"{R.slug(gpu)}-{date}{'-quick' if args.quick else ''}"
    print(f"wrote {R.write_json(stem.with_suffix('.json'), meta, peaks, rows + ep_rows)}")
    print(f"wrote {R.plot_roofline(stem.with_suffix('.png'), peaks, rows, title=f'{gpu} ({date})')}")
    return 0


def predict(args) -> int:
    """The GEMM shapes of ours and DeepGEMM's kernel on the performance model of one part
    (pykernels.perf); the same JSON as a GPU run, marked "source": "model"."""
    from pykernels.perf import MODEL_VERSION, part

    from . import model, report as R
    p = part(args.model)
    peaks = dict(source="model", bw_gbps=p.hbm_bytes_per_s / 1e9,
                 fp8_tflops=2 * p.mma_fp8_per_clk * p.sms * p.clock_hz / 1e12,
                 bf16_tflops=2 * p.mma_bf16_per_clk * p.sms * p.clock_hz / 1e12)
    skipped = [o for o in args.ops if o not in S.OPS + ("mla",)]
    if skipped:
        print(f"bench: the model predicts the GEMM layouts and MLA decode; not modelled: {','.join(skipped)}",
              file=sys.stderr)
    raw = model.model_rows(args.model, args.quick, args.ops)
    if "mla" in args.ops:
        raw += model.mla_model_rows(args.model, args.quick)
    rows = R.derive(raw, peaks)
    print(R.format_table(rows))
    date = R.today()
    meta = dict(source="model", part=p.name, model_version=MODEL_VERSION, date=date, quick=args.quick,
                git_commit=R.git_commit(Path(__file__).resolve().parent.parent))
    stem = args.out_dir / f"model-{args.model.lower()}-{date}{'-quick' if args.quick else ''}"
    print(f"wrote {R.write_json(stem.with_suffix('.json'), meta, peaks, rows)}")
    title = f"{p.name}, model version {MODEL_VERSION} (predicted, not measured)"
    print(f"wrote {R.plot_roofline(stem.with_suffix('.png'), peaks, rows, title=title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
