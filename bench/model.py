"""Model rows for `python -m bench --model <part>`: predicted times of the benchmark's GEMM
shapes and MLA decode configurations from pykernels.perf (docs/perf-model.md), in the row
format of bench.baselines.measure_shape / bench.mla.measure, every row marked
"source": "model". No GPU is used and no figure here is a measurement.

    rows = model_rows("h800", quick=False, ops=("normal",)) + mla_model_rows("h800")
"""
import torch

from pykernels.perf import MODEL_VERSION
from pykernels.perf.gemm import predict

from . import mla as BM, shapes as S

IMPLS = {"pykernels-cuda": "ours", "deepgemm": "deepgemm"}


def model_rows(part: str = "h800", quick: bool = False, ops=S.OPS, impls=tuple(IMPLS)) -> list:
    """One row per shape and implementation (grouped layouts: DeepGEMM's rows use its
    normal kernel per unit, see docs/perf-model.md)."""
    rows = []
    for s in S.shape_set(quick, [o for o in ops if o in S.OPS]):
        for impl in impls:
            row = dict(op=s.op, shape=s.label(), groups=s.groups, m=s.m, n=s.n, k=s.k, impl=impl,
                       precision="fp8_block", flops=S.flops(s), bytes=S.bytes_moved(s, "fp8_block"),
                       seconds=None, seconds_min=None, seconds_max=None, source="model",
                       note=f"model ({part.upper()}, model version {MODEL_VERSION})")
            try:
                p = predict(s.m, s.n, s.k, part, IMPLS[impl], layout=s.op, groups=s.groups)
            except Exception as e:             # noqa: BLE001 - e.g. the DeepGEMM harness absent
                row["note"] += f": not predicted ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                rows.append(row)
                continue
            row.update(seconds=p.seconds, seconds_min=p.seconds, seconds_max=p.seconds,
                       note=row["note"] + f", {p.config}, L2 hit {p.l2_hit:.2f}")
            rows.append(row)
    return rows


def mla_model_rows(part: str = "h800", quick: bool = False) -> list:
    """One row per MLA decode configuration of bench/mla.py (its sequence lengths, seed 0):
    our decode kernel (FlashMLA's kernel is not in the peer harness)."""
    from pykernels.perf.mla import predict as predict_mla
    rows = []
    for cfg in (BM.QUICK if quick else BM.FULL):
        seqlens = BM.seqlens_for(cfg, torch.Generator().manual_seed(0)).tolist()
        p = predict_mla(seqlens, cfg.s_q, cfg.h_q, fp8=cfg.fp8, part=part)
        cost = p.problem.cost()
        rows.append(dict(op="mla", shape=cfg.label(), impl="pykernels-cuda", precision="bf16", flops=cost["flops"],
                         bytes=cost["bytes"], seconds=p.seconds, seconds_min=p.seconds, seconds_max=p.seconds,
                         source="model", note=f"model ({part.upper()}, model version {MODEL_VERSION}), "
                                              f"{p.grid[0]}x{p.grid[1]} CTAs, L2 hit {p.l2_hit:.2f}"))
    return rows
