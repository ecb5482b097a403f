"""Start-up cost: `import pykernels` and the first call of each op family, each in a fresh
process, with every CUDA compiler replaced by a trip-wire (so a JIT or a compile at first
call would fail the run and be counted). ``python -m bench.startup [--repeats N] [--call-repeats N] [--out PATH]``.

Per (family, backend): the first call, the second call (same inputs, warm) and their
difference, the cost of the first call beyond steady state. On a CPU machine the backends
are the reference, the Triton interpreter and the PTX emulator; on a GPU, cuda and triton.
Each row lists the compiler calls it made; on a GPU the triton backend's are expected
(Triton compiles its kernels at first call there) and are not counted as a failure.
Writes JSON under bench/results/ naming the machine and `source` ("measured on CPU" or the
GPU's name): these are not GPU figures unless it says so.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("quant", "gemm", "mla", "dsa")
# What a compile would run: nvcc and its parts, and the copies Triton would use for a GPU compile.
COMPILERS = ("nvcc", "ptxas", "cicc", "nvlink", "fatbinary", "cuobjdump", "nvdisasm")
TRITON_TOOL_VARS = {"TRITON_PTXAS_PATH": "ptxas", "TRITON_CUOBJDUMP_PATH": "cuobjdump",
                    "TRITON_NVDISASM_PATH": "nvdisasm"}
RESULTS = Path(__file__).resolve().parent / "results"


def trip_wire(folder: Path) -> dict:
    """Environment in which every compiler is a script that logs its call to
    folder/calls.log and fails; CUDA_HOME points at it and PATH starts with it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in COMPILERS:
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{folder}/calls.log"\nexit 1\n')
        script.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(folder), CUDA_PATH=str(folder),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update({var: str(bin_dir / tool) for var, tool in TRITON_TOOL_VARS.items()})
    return env


def compiler_calls(folder: Path, clear: bool = False) -> list:
    log = folder / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    if clear:
        log.unlink(missing_ok=True)
    return calls


def _inputs(family: str, device):
    """(function, args, kwargs) of one small call of the family's main op."""
    import torch
    import pykernels as pk
    from pykernels import reference as R
    if family == "quant":
        return pk.per_token_cast_to_fp8, (torch.randn(64, 512, device=device, dtype=torch.bfloat16),), {}
    if family == "gemm":
        m, n, k = 64, 256, 384
        a = R.per_token_cast_to_fp8(torch.randn(m, k, dtype=torch.bfloat16))
        b = R.per_block_cast_to_fp8(torch.randn(n, k, dtype=torch.bfloat16))
        out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
        return pk.fp8_gemm_nt, ([t.to(device) for t in a], [t.to(device) for t in b], out), {}
    if family == "mla":
        import pykernels.mla as M
        b, s_q, h_q, blocks = 2, 1, 16, 2
        lens = torch.tensor([100, 40], dtype=torch.int32, device=device)
        cache = torch.randn(b * blocks, 64, 1, 576, device=device).to(torch.bfloat16)
        table = torch.arange(b * blocks, dtype=torch.int32, device=device).view(b, blocks)
        q = torch.randn(b, s_q, h_q, 576, device=device).to(torch.bfloat16)
        meta, splits = M.get_mla_metadata(lens, s_q * h_q, 1, backend="reference")
        return M.flash_mla_with_kvcache, (q, cache, table, lens, 512, meta, splits), {"causal": True}
    if family == "dsa":
        import pykernels.dsa as D
        m, h, d, n = 16, 8, 64, 128
        q = torch.randn(m, h, d, device=device).to(torch.float8_e4m3fn)
        kv = (torch.randn(n, d, device=device).to(torch.float8_e4m3fn), torch.rand(n, device=device))
        ks = torch.zeros(m, dtype=torch.int32, device=device)
        ke = torch.arange(n - m + 1, n + 1, dtype=torch.int32, device=device)
        return D.fp8_mqa_logits, (q, kv, torch.rand(m, h, device=device), ks, ke), {}
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


_OP_OF = {"quant": "per_token_cast_to_fp8", "gemm": "fp8_gemm_nt", "mla": "flash_mla_with_kvcache",
          "dsa": "fp8_mqa_logits"}
_MODULE_OF = {"quant": "pykernels.quant", "gemm": "pykernels.gemm", "mla": "pykernels.mla", "dsa": "pykernels.dsa"}


def child(family: str | None, backend: str | None) -> dict:
    """Run in a fresh process: time `import pykernels` (lazy: it loads no family and not
    torch), then torch, and when asked the family's module and two calls of its op."""
    import importlib
    t0 = time.perf_counter()
    import pykernels  # noqa: F401
    t1 = time.perf_counter()
    import torch
    result = {"import_s": t1 - t0, "torch_import_s": time.perf_counter() - t1}
    if family:
        t = time.perf_counter()
        importlib.import_module(_MODULE_OF[family])
        result["family_import_s"] = time.perf_counter() - t
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        fn, args, kwargs = _inputs(family, device)
        times = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(*args, **kwargs, backend=backend)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        result.update(first_call_s=times[0], second_call_s=times[1], first_call_extra_s=times[0] - times[1])
    return result


def _spawn(env, *argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.startup", "--child", *argv], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"bench.startup child {argv} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def backends_here() -> list:
    import torch
    from pykernels import selfcheck
    return selfcheck.available_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"host": platform.node(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": gpu, "source": f"measured on GPU {gpu}" if gpu else "measured on CPU (no GPU): not GPU figures"}


def _median_row(runs: list) -> dict:
    """Each timing of the runs' dicts: its median (the machine may be shared: noisy)."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def measure(families=FAMILIES, backends=None, repeats: int = 3, call_repeats: int = 1) -> dict:
    """Import time (median of `repeats` fresh processes) and first calls (median of
    `call_repeats` fresh processes per family and backend), under the trip-wire."""
    from pykernels import registry
    backends = backends or backends_here()
    with tempfile.TemporaryDirectory(prefix="pk_tripwire_") as tmp:
        env = trip_wire(Path(tmp))
        imports = [_spawn(env) for _ in range(repeats)]
        import_calls = compiler_calls(Path(tmp), clear=True)
        calls = []
        for family in families:
            for backend in backends:
                if backend not in registry.get(_OP_OF[family]).backends:
                    continue
                runs = [_spawn(env, family, backend) for _ in range(call_repeats)]
                calls.append({"family": family, "op": _OP_OF[family], "backend": backend, **_median_row(runs),
                              "runs": runs, "compiler_calls": compiler_calls(Path(tmp), clear=True)})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "import_s": {"median": statistics.median(r["import_s"] for r in imports),
                         "runs": [r["import_s"] for r in imports]},
            "torch_import_s": {"median": statistics.median(r["torch_import_s"] for r in imports),
                               "runs": [r["torch_import_s"] for r in imports]},
            "first_calls": calls, "compiler_calls": import_calls + [c for row in calls for c in row["compiler_calls"]
                                                                    if not _jit_by_design(row)]}


def _jit_by_design(row: dict) -> bool:
    """Triton compiles its kernels at first call on a GPU (its interpreter on CPU does not):
    recorded in the row, not counted against pykernels' own kernels."""
    return row["backend"] == "triton" and _machine_has_gpu()


def _machine_has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def format_table(res: dict) -> str:
    runs = len(res["import_s"]["runs"])
    lines = [f"import pykernels: {res['import_s']['median'] * 1e3:.1f} ms, then import torch: "
             f"{res['torch_import_s']['median']:.2f} s (medians of {runs} processes)",
             f"{'family':<7}{'op':<25}{'backend':<11}{'module s':>9}{'first s':>9}{'second s':>10}{'extra s':>9}"]
    for c in res["first_calls"]:
        lines.append(f"{c['family']:<7}{c['op']:<25}{c['backend']:<11}{c['family_import_s']:>9.3f}"
                     f"{c['first_call_s']:>9.3f}{c['second_call_s']:>10.3f}{c['first_call_extra_s']:>9.3f}")
    lines.append(f"compiler invocations outside Triton's GPU JIT: {len(res['compiler_calls'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes timing the import (default 3)")
    p.add_argument("--call-repeats", type=int, default=1,
                   help="fresh processes per family and backend timing the calls; medians (default 1)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of %(default)s")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/startup-<cpu or GPU name>-<date>.json)")
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(*(args.child or [None, None]))))
        return 0
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}; choose from {','.join(FAMILIES)}")
    res = measure(families, repeats=args.repeats, call_repeats=args.call_repeats)
    print(format_table(res))
    where = (res["machine"]["gpu"] or "cpu").lower().replace(" ", "-")
    out = args.out or RESULTS / f"startup-{where}-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if res["compiler_calls"] else 0


if __name__ == "__main__":
    sys.exit(main())
