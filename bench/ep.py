"""Expert-parallel benchmark: DeepEP's configurations on the hand-written intranode kernels.

All ranks run in this process on the one GPU (pykernels.cuda.ep.LocalNode(device="cuda"):
a stream per rank, peers' buffers addressed directly). So this measures the kernels'
protocol and HBM traffic, not NVLink: every "remote" write lands in the same GPU's
memory. The torch.distributed engine path (pykernels.ep.Buffer) needs one process per
GPU with NCCL, which a one-GPU machine cannot host, so it has no row here.

GB/s per rank = bytes that rank sends (payload + scales + top-k ids and weights) / time.
"""
from dataclasses import dataclass

import torch

from .timing import time_cuda

DEVICE = "cuda"     # a module attribute so a CPU check can point the builders at the emulator


@dataclass(frozen=True)
class Config:
    mode: str           # "normal" (FP8 dispatch, bf16 combine) or "low_latency"
    ranks: int
    tokens: int         # per rank
    hidden: int = 7168
    topk: int = 8
    experts: int = 256

    def label(self) -> str:
        return f"{self.mode}-r{self.ranks}-t{self.tokens}-h{self.hidden}-top{self.topk}of{self.experts}"


FULL = [Config("normal", 8, 4096), Config("low_latency", 8, 128)]
QUICK = [Config("normal", 2, 256), Config("low_latency", 2, 64)]


def node(cfg: Config, channels: int = 8):
    from pykernels.cuda import ep as cep
    icfg = cep.IntranodeConfig(num_ranks=cfg.ranks, hidden=cfg.hidden, max_topk=cfg.topk, num_channels=channels,
                               num_experts=cfg.experts if cfg.mode == "low_latency" else 0,
                               max_dispatch_tokens=cfg.tokens if cfg.mode == "low_latency" else 0)
    return cep.LocalNode(icfg, device=DEVICE, poison=False)


def make_inputs(cfg: Config, seed: int = 0) -> dict:
    """Per rank: FP8 x (normal) or bf16 x (low latency), top-k experts without repeats, weights."""
    g = torch.Generator().manual_seed(seed)
    T, H, K, E = cfg.tokens, cfg.hidden, cfg.topk, cfg.experts
    topk = [torch.rand(T, E, generator=g).topk(K, dim=1).indices for _ in range(cfg.ranks)]
    weights = [torch.rand(T, K, generator=g) for _ in range(cfg.ranks)]
    xs = [torch.randn(T, H, generator=g).to(torch.bfloat16) for _ in range(cfg.ranks)]
    if cfg.mode == "normal":
        xs = [((x.float() / 8).to(torch.float8_e4m3fn), torch.rand(T, H // 128, generator=g) + 0.5) for x in xs]
    dev = lambda t: tuple(u.to(DEVICE) for u in t) if isinstance(t, tuple) else t.to(DEVICE)  # noqa: E731
    return dict(xs=[dev(x) for x in xs], topk=[t.to(DEVICE) for t in topk], weights=[w.to(DEVICE) for w in weights])


def sent_bytes(cfg: Config, d: dict, step: str) -> int:
    """Bytes rank 0 sends in one call: per (token, destination rank) pair in normal mode,
    per (token, expert) pair in low-latency mode."""
    H, K = cfg.hidden, cfg.topk
    topk = d["topk"][0].cpu()
    if cfg.mode == "normal":
        epr = cfg.experts // cfg.ranks
        copies = int(sum(len(set((row // epr).tolist())) for row in topk))
        row = H + 4 * (H // 128) + 12 * K if step == "dispatch" else 2 * H + 4
    else:
        copies = int((topk >= 0).sum())
        row = 2 * H if step == "dispatch" else 2 * H
    return copies * row


def steps(cfg: Config, n: "object", d: dict) -> dict:
    """Zero-argument callables for the dispatch and the combine of one input set."""
    E = cfg.experts
    if cfg.mode == "normal":
        first = n.dispatch(d["xs"], d["topk"], d["weights"], E)
        handles = [r["handle"] for r in first]
        recv_w = [r["recv_topk_weights"] for r in first]
        # the experts' bf16 outputs stand in for the received rows (FP8 dispatch, bf16 combine)
        ys = [(r["recv_x"][0].float() * r["recv_x"][1].repeat_interleave(128, dim=1)).to(torch.bfloat16)
              for r in first]
        return {"dispatch": lambda: n.dispatch(d["xs"], d["topk"], d["weights"], E),
                "combine": lambda: n.combine(ys, handles, recv_w)}
    first = n.low_latency_dispatch(d["xs"], d["topk"])
    handles = [r["handle"] for r in first]
    ys = [r["recv_x"] for r in first]

    def round_trip():  # the low-latency buffers are reused only by alternating calls
        res = n.low_latency_dispatch(d["xs"], d["topk"])
        n.low_latency_combine([r["recv_x"] for r in res], d["topk"], d["weights"], [r["handle"] for r in res])
    return {"dispatch+combine": round_trip,
            "_check": lambda: n.low_latency_combine(ys, d["topk"], d["weights"], handles)}


def measure(quick: bool = False, runs: int = 20) -> list:
    """Rows: op "ep", one per (config, step), seconds per call and GB/s per rank."""
    rows = []
    for cfg in (QUICK if quick else FULL):
        d = make_inputs(cfg)
        try:
            n = node(cfg)
            fns = steps(cfg, n, d)
            fns.pop("_check", lambda: None)()
            torch.cuda.synchronize()
        except Exception as e:  # report, never invent a figure
            rows.append(dict(op="ep", shape=cfg.label(), impl="pykernels_cuda", seconds=None,
                             note=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"))
            continue
        for step, fn in fns.items():
            t = time_cuda([fn], runs=runs, flush=False)
            nbytes = (sent_bytes(cfg, d, "dispatch") + sent_bytes(cfg, d, "combine")) if "+" in step \
                else sent_bytes(cfg, d, step)
            rows.append(dict(op="ep", shape=cfg.label(), impl="pykernels_cuda", step=step, seconds=t.median,
                             seconds_min=t.min, seconds_max=t.max, bytes_per_rank=nbytes,
                             gbps_per_rank=nbytes / t.median / 1e9,
                             note="all ranks on one GPU: HBM traffic, not NVLink; includes the host work "
                                  "of each call (plans, count read-back)"))
    return rows
