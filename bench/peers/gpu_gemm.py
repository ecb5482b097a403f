"""DeepGEMM's SM90 FP8 GEMM beside ours on a GPU: same shapes, same inputs, same timing.

Two steps, because a lent GPU machine has neither DeepGEMM's headers nor a network:

    python -m bench.peers.gpu_gemm prepare --dir .peer_ptx [--num-sms 132] [--quick]
        here: DeepGEMM's kernel compiled to PTX (bench/peers/deep_gemm.py), then by ptxas
        to an sm_90a cubin, for the configs the performance model's DeepGEMM heuristic
        ranks first on each shape, + manifest.json
    python -m bench.peers.gpu_gemm run --dir .peer_ptx --out FILE.json [--runs 20]
        on the GPU: DeepGEMM's configs and our cuda backend are timed on the same operands
        (bench/timing.py: L2 flushed, median of runs) and each output is checked against a
        bf16 product of the dequantized operands

Every timed row carries "source": "gpu". DeepGEMM's figure is its best prepared config,
which favours the peer, never us.
"""
import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from pykernels.runtime.hardware import SCALE_BLOCK
from pykernels.runtime.kernel_build import ARCH
from pykernels.runtime.tensormap import TensorMapDesc

from . import deep_gemm as D, toolchain
from .toolchain import PeerPTX

MANIFEST = "manifest.json"
CHECK_DIFF = 1e-3            # calc_diff bound against the bf16 product (DeepGEMM's own tests use 1e-3)


def shapes(quick: bool):
    """(m, n, k) of the normal GEMM: bench/shapes.py's set (DeepGEMM's reported sizes)."""
    from bench import shapes as S
    return [(s.m, s.n, s.k) for s in S.shape_set(quick, ["normal"])]


def prepare(out_dir: Path, num_sms: int, quick: bool, configs_per_shape: int) -> dict:
    """Compile DeepGEMM's kernel for each shape's top configs; write and return the manifest."""
    from pykernels.perf.gemm import DeepGemm, Problem
    out_dir.mkdir(parents=True, exist_ok=True)
    ranker = DeepGemm(max_configs=configs_per_shape)
    entries = []
    for m, n, k in shapes(quick):
        for tiles in ranker.configs(Problem("normal", 1, m, n, k), num_sms):
            compiled = D.compile_fp8_gemm(tiles.block_m, tiles.block_n, num_sms=num_sms, cluster=tiles.cluster,
                                          shape_n=n, shape_k=k)
            name = f"{tiles.name}_n{n}_k{k}_sms{num_sms}"
            (out_dir / f"{name}.ptx").write_text(compiled.ptx.ptx)
            ptxas = Path(toolchain.cuda_home()) / "bin" / "ptxas"
            subprocess.run([ptxas, f"-arch={ARCH}", "-o", out_dir / f"{name}.cubin", out_dir / f"{name}.ptx"],
                           check=True, capture_output=True)
            entries.append(dict(m=m, n=n, k=k, ptx=f"{name}.ptx", cubin=f"{name}.cubin", entry=compiled.ptx.entry,
                                package=compiled.package, config=dataclasses.asdict(compiled.config)))
            print(f"prepared {name} ({compiled.config.stages} stages)", file=sys.stderr, flush=True)
    manifest = dict(num_sms=num_sms, entries=entries)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def pack_params(ptx: str, entry: str, args: list) -> list:
    """One bytes object per kernel parameter, sized as the PTX entry declares it: tensors
    as their device address, TensorMapDesc as the driver-encoded 128-byte map, ints
    little-endian (0 for a null pointer)."""
    head = ptx[ptx.index(f".entry {entry}(") + len(entry) + 8:]
    decls = head[:head.index(")")].split(",")
    if len(decls) != len(args):
        raise ValueError(f"{entry}: the PTX declares {len(decls)} parameters, got {len(args)} arguments")
    params = []
    for decl, arg in zip(decls, args):
        bits = int(re.search(r"\.[usbf](\d+)\b", decl).group(1))
        count = re.search(r"\[(\d+)\]", decl)
        size = bits // 8 * (int(count.group(1)) if count else 1)
        if isinstance(arg, torch.Tensor):
            params.append(arg.data_ptr().to_bytes(size, "little"))
        elif isinstance(arg, TensorMapDesc):
            params.append(arg.encode_cuda())
        else:
            params.append(int(arg).to_bytes(size, "little"))
        if len(params[-1]) != size:
            raise ValueError(f"{entry}: parameter {len(params)} is {size} bytes, got {len(params[-1])}")
    return params


def _operands(m, n, k):
    import pykernels
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a8, sfa = pykernels.per_token_cast_to_fp8(x)
    b8, sfb = pykernels.per_block_cast_to_fp8(w)
    deq_a = (a8.float().view(m, -1, SCALE_BLOCK) * sfa[:, :, None]).view(m, k)
    sfb_full = sfb.repeat_interleave(SCALE_BLOCK, 0)[:n].repeat_interleave(SCALE_BLOCK, 1)[:, :k]
    ref = deq_a.bfloat16() @ (b8.float() * sfb_full).bfloat16().t()
    return a8, sfa, b8, sfb, ref


def _ours_launcher(a8, sfa_tma, b8, sfb, out):
    import pykernels
    return lambda: pykernels.fp8_gemm_nt((a8, sfa_tma), (b8, sfb), out, backend="cuda")


def _ours_plan(a8, sfa_tma, b8, sfb, out, cfg=None):
    from pykernels.cuda import gemm as G
    m, k = a8.shape
    return G.gemm_plan(a8, sfa_tma, b8, sfb, out, None, kind=G.KIND_NORMAL, m=m, n=b8.shape[0], k=k, groups=1,
                       cfg=cfg)


def _ours_config_launcher(a8, sfa_tma, b8, sfb, out, cfg):
    """One compiled tile config of ours, launched from a prepared plan (no API layer)."""
    from pykernels.runtime.executors import run_plan
    plan = _ours_plan(a8, sfa_tma, b8, sfb, out, cfg)
    return lambda: run_plan(plan, "cuda")


def _deepgemm_launcher(e: dict, ptx_dir: Path, a8, sfa, b8, sfb, out):
    from pykernels import _C
    cfg = D.Fp8GemmConfig(**e["config"])
    ptx = (ptx_dir / e["ptx"]).read_text()
    compiled = D.CompiledFp8Gemm(cfg, PeerPTX(ptx, e["entry"], "", e["ptx"]), e["package"])
    args = D.fp8_gemm_args(compiled, a8, sfa, b8, sfb, out, device=out.device)
    params = pack_params(ptx, e["entry"], args)
    image = (ptx_dir / e["cubin"]).read_bytes()
    fn = _C.get_function(_C.load_module(image, out.device.index or 0), e["entry"])
    shared = cfg.shared_bytes(e["k"])
    launch = (fn, (cfg.num_sms, 1, 1), (cfg.threads, 1, 1), (cfg.cluster, 1, 1), shared)
    return lambda: _C.launch(*launch, torch.cuda.current_stream().cuda_stream, params)


def run(ptx_dir: Path, runs: int, only=None, kernel_timing: bool = True, probe_only: bool = False,
        sweep_ours: bool = False, profile_host: bool = False) -> list:
    """Time each prepared DeepGEMM config and our cuda backend on the same operands, three
    ways: seconds (CUDA events around each call: what a caller without CUDA graphs waits),
    kernel_seconds (the kernels' device time, torch.profiler) and host_seconds (the call's
    host cost). only: shape labels "MxNxK" to keep (default all); probe_only: launch and
    check each kernel once, time nothing (for a profiler such as ncu); sweep_ours: also
    every compiled tile config of ours, launched from a prepared plan; profile_host: print
    where our API call's host time goes (cProfile of 200 calls, the top 25 by own time)."""
    import pykernels
    from bench.timing import host_seconds, time_cuda, time_kernels
    from pykernels.metrics import calc_diff
    manifest = json.loads((ptx_dir / MANIFEST).read_text())
    gpu = torch.cuda.get_device_name()
    if torch.cuda.get_device_properties(0).multi_processor_count != manifest["num_sms"]:
        print(f"note: prepared for {manifest['num_sms']} SMs, this GPU has "
              f"{torch.cuda.get_device_properties(0).multi_processor_count}", file=sys.stderr)
    rows = []
    by_shape = {}
    for e in manifest["entries"]:
        by_shape.setdefault((e["m"], e["n"], e["k"]), []).append(e)
    for (m, n, k), entries in by_shape.items():
        if only and f"{m}x{n}x{k}" not in only:
            continue
        a8, sfa, b8, sfb, ref = _operands(m, n, k)
        sfa_tma = pykernels.get_col_major_tma_aligned_tensor(sfa)
        flops = 2 * m * n * k
        from pykernels.cuda import gemm as G
        chosen = _ours_plan(a8, sfa_tma, b8, sfb, torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
        impls = [("pykernels_cuda", f"auto={chosen.function.removeprefix('pk_fp8_gemm_nt_')}", None)]
        impls += [("deepgemm", _config_name(e), e) for e in entries]
        if sweep_ours:
            impls += [("pykernels_cuda", c.function.removeprefix("pk_fp8_gemm_nt_"), c) for c in G.compiled_configs()]
        for impl, config, e in impls:
            row = dict(source="gpu", gpu=gpu, shape=f"{m}x{n}x{k}", m=m, n=n, k=k, impl=impl, config=config,
                       seconds=None, tflops=None, kernel_seconds=None, kernel_tflops=None, host_seconds=None,
                       calc_diff=None, note="")
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)  # poisoned
            try:
                if e is None:
                    fn = _ours_launcher(a8, sfa_tma, b8, sfb, out)
                elif impl == "pykernels_cuda":
                    fn = _ours_config_launcher(a8, sfa_tma, b8, sfb, out, e)
                else:
                    fn = _deepgemm_launcher(e, ptx_dir, a8, sfa, b8, sfb, out)
                fn()
                torch.cuda.synchronize()
                row["calc_diff"] = diff = float(calc_diff(out.float(), ref.float()))
                if not diff < CHECK_DIFF:
                    row["note"] = f"wrong output: calc_diff {diff:.2e} >= {CHECK_DIFF}"
                elif probe_only:
                    row["note"] = "checked, not timed (probe only)"
                else:
                    t = time_cuda([fn], runs=runs)
                    row.update(seconds=t.median, seconds_min=t.min, seconds_max=t.max,
                               tflops=flops / t.median / 1e12, host_seconds=host_seconds(fn))
                    if kernel_timing:
                        row["kernel_seconds"] = kt = time_kernels(fn, runs=runs)
                        row["kernel_tflops"] = flops / kt / 1e12 if kt else None
                    if profile_host and e is None:
                        _print_host_profile(fn, f"{m}x{n}x{k}")
            except Exception as exc:  # report, never invent a figure
                row["note"] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            rows.append(row)
            print(f"{row['shape']:>16} {impl:>14} {config:>13} " + (_timings(row) if row["seconds"] else row["note"]),
                  flush=True)
        a8 = sfa = b8 = sfb = ref = sfa_tma = None   # free this shape's operands before the next
        torch.cuda.empty_cache()
    return rows


def _print_host_profile(fn, label: str, calls: int = 200) -> None:
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host profile of {calls} API calls, {label} (own time, seconds in total):", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def _timings(row: dict) -> str:
    text = f"call {row['seconds'] * 1e6:8.1f} us {row['tflops']:7.1f} TFLOP/s  host {row['host_seconds'] * 1e6:6.1f} us"
    if row["kernel_seconds"]:
        text += f"  kernel {row['kernel_seconds'] * 1e6:8.1f} us {row['kernel_tflops']:7.1f} TFLOP/s"
    return text


def _config_name(e: dict) -> str:
    c = e["config"]
    return f"m{c['block_m']}n{c['block_n']}c{c['cluster']}s{c['stages']}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.gpu_gemm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="compile DeepGEMM's PTX for each shape (no GPU needed)")
    prep.add_argument("--dir", type=Path, required=True)
    prep.add_argument("--num-sms", type=int, default=132, help="the GPU's SM count (H200/H100 SXM: 132)")
    prep.add_argument("--quick", action="store_true")
    prep.add_argument("--configs", type=int, default=2, help="configs per shape, best-ranked first")
    go = sub.add_parser("run", help="time DeepGEMM and ours on this GPU")
    go.add_argument("--dir", type=Path, required=True)
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--runs", type=int, default=20)
    go.add_argument("--shapes", default="", help="comma-separated MxNxK labels to run (default: all prepared)")
    go.add_argument("--no-kernel-timing", action="store_true", help="skip the profiler timing")
    go.add_argument("--sweep-ours", action="store_true", help="also time every compiled tile config of ours")
    go.add_argument("--profile-host", action="store_true", help="cProfile our API call's host time per shape")
    go.add_argument("--probe-only", action="store_true",
                    help="launch and check each kernel once, time nothing (under ncu: one launch per kernel)")
    args = p.parse_args(argv)
    if args.step == "prepare":
        prepare(args.dir, args.num_sms, args.quick, args.configs)
        return 0
    if not torch.cuda.is_available():
        print("bench.peers.gpu_gemm: no CUDA GPU; nothing measured", file=sys.stderr)
        return 2
    from bench import report as R
    only = {x.strip() for x in args.shapes.split(",") if x.strip()}
    rows = run(args.dir, args.runs, only, kernel_timing=not args.no_kernel_timing, probe_only=args.probe_only,
               sweep_ours=args.sweep_ours, profile_host=args.profile_host)
    packages = sorted({e["package"] for e in json.loads((args.dir / MANIFEST).read_text())["entries"]})
    meta = dict(source="gpu", gpu=torch.cuda.get_device_name(), date=R.today(),
                git_commit=R.git_commit(Path(__file__).resolve().parents[2]), torch=torch.__version__,
                runs=args.runs, peer=packages)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if any(r["seconds"] or args.probe_only and r["calc_diff"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
