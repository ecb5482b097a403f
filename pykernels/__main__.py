"""`python -m pykernels`: check every op through every backend available here against
the reference on small shapes; with a GPU, then run the benchmarks (bench/)."""
import argparse
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pykernels",
        description="Run each pykernels op through each backend available on this machine "
                    "(reference, Triton - interpreted on CPU -, the PTX emulator on CPU, the "
                    "hand-written CUDA kernels on a GPU) on small shapes, compare with the "
                    "PyTorch reference and print a table. On a GPU it then runs the benchmark "
                    "harness (bench/). Exit status 1 if any check fails.")
    p.add_argument("--ops", help="comma-separated op names to check (default: all)")
    p.add_argument("--backends", help="comma-separated backends (default: all available here)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the inputs live (auto: cuda when a GPU is present)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default 0)")
    p.add_argument("--no-bench", action="store_true", help="on a GPU, skip the benchmarks")
    p.add_argument("--bench-args", default="--quick",
                   help="arguments passed to `python -m bench` on a GPU (default: --quick)")
    args = p.parse_args(argv)

    import torch
    from . import selfcheck
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and gpu) else
                          (args.device if args.device != "auto" else "cpu"))
    torch.manual_seed(args.seed)
    print(f"pykernels: checking on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU: Triton interpreted'})")
    rows = selfcheck.run_all(device, args.backends.split(",") if args.backends else None,
                             set(args.ops.split(",")) if args.ops else None)
    print(selfcheck.format_table(rows))
    failed = [r for r in rows if r.verdict in ("FAIL", "ERROR")]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed, not implemented yet or n/a here; "
          f"{len(failed)} failed")
    status = 1 if failed else 0
    if gpu and not args.no_bench:
        root = Path(__file__).resolve().parent.parent
        if (root / "bench" / "__main__.py").exists():
            status |= subprocess.call([sys.executable, "-m", "bench", *args.bench_args.split()], cwd=root)
        else:
            print("pykernels: bench/ is not beside the installed package; run it from a source checkout")
    elif not gpu:
        print("pykernels: no CUDA GPU here, so no benchmarks (timings on a GPU only)")
    return status


if __name__ == "__main__":
    sys.exit(main())
