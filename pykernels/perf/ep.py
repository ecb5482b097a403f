"""Predicted time of the hand-written intranode EP kernels (csrc/ep through pykernels/cuda/ep.py)
on a named part: normal dispatch / combine (intranode.cu), the low-latency pair
(low_latency.cu) and the layout kernel (layout.cu). docs/ep.md "Model figures".

What is simulated. The real kernels run on the emulator with 8 (or R) ranks in this process
(pykernels.cuda.ep.LocalNode), one rank's launch at a time: every rank's sender CTAs first
(rings and slots large enough that no sender waits), then the receiver CTAs, which find every
item published (no wait spins). Rank 0's launches are recorded (trace.Recorder) and replayed
by the SM model (sm.Replay, one CTA per SM), each with the memory share of the real launch.
Samples (hidden size, top-k, R, FP8 or bf16 as asked; tokens routed on purpose, over
R * topk experts in normal mode, which needs topk >= R):
  normal: one channel, every token to every rank: 32 tokens (S1); 32 + 32 routed nowhere
    (S2); 16 + 16 routed nowhere (S3); and two channels of 32 tokens (S4, the sender's
    prefix count). Solved for: per CTA a fixed cost, per 32-token group of the sender's
    scan and of its prefix count, per row sent / received, per combined token (its fixed
    part and per rank it went to).
  low latency: num_experts 8 R (8 local experts), the real token count and top-k, q = 1
    and 3 rows per (expert, source rank) (other top-k slots -1): per sender warp a fixed
    cost (the top-k scan included) and a cost per row; per receiver warp likewise; the
    combine's reducing CTAs with 16 and 8 tokens each give the fixed, per empty token and
    per full (top-k all valid) token costs.
Extrapolated explicitly over a routing drawn for the real size (uniform top-k of
num_experts per token, seed 0, every rank): each CTA's time from its own counts; the kernel
ends with its busiest CTA on the busiest rank.

Remote bytes. Every EP kernel here pushes: senders store into the peers' buffers, receivers
read their own. The replay charges every access at the local memory share (an SM's port,
L2 / HBM); the link is charged apart: the bytes a rank sends to (receives from) other ranks,
counted from the routing, over the part's NVLink bandwidth per direction = its bidirectional
per-GPU figure / 2 (machines.py: H800 400 GB/s, H100 / H200 900 GB/s, both directions
together; "900 GB/s bidirectional per GPU", 18 links x 50 GB/s bidirectional; NVLINK_SOURCE).
Normal mode also charges its local traffic (input rows read once, incoming and read ring
items, outputs) at HBM as a term of its own; low latency does not (a few MB per call).

Composition (assumptions, no public figure behind them):
  normal (pipelined rings): max(sender + the receiver's last publish group, receiver + the
    sender's first publish group, link, HBM);
  low latency (counts / flags after the last row): max(sender, link) + receiver.
Not modelled: NVLink latency and protocol overhead (a link-bound figure is an upper bound),
the cost of a sys-scope release beyond a store, launch overhead, the count exchange between
the layout and dispatch kernels (an all_gather), L2 reuse beyond the formulas below.
L2 hit fractions: dispatch senders re-read inputs (normal: a row once per destination rank;
low latency: a row once per expert, the top-k ids once per expert warp): hit = 1 - unique /
requested bytes of the real routing; combine senders read each row once: 0; receivers
read ring slots that peers wrote: hit 0 (HBM latency; whether NVLink writes stay in the
receiver's L2 is not known here). `lines()` also prints the figure with every read an
L2 hit, for the size of that assumption.
"""
import dataclasses
import functools

import torch

from .. import emu
from ..cuda import ep as cep
from ..emu.memory import GlobalMemory
from ..runtime.hardware import SCALE_BLOCK, cdiv
from . import MODEL_VERSION, replay
from .machines import Part, part as get_part
from .memory import MemoryShare
from .trace import Recorder

KINDS = ("dispatch", "combine", "ll-dispatch", "ll-combine")
NVLINK_SOURCE = ("machines.py nvlink_bytes_per_s is the per-GPU bidirectional total: NVIDIA H200/H100 product page "
                 "'900 gigabytes per second (GB/s) bidirectional per GPU' (fourth-generation NVLink); NVLink 4.0: "
                 "18 links x 50 GB/s bidirectional (alpha-one-index.github.io/ai-infra-index specs); H800: 400 GB/s. "
                 "One direction carries half.")
# DeepEP's published figures (README, ../shared/ANCHORS.md), H800. Normal: 4096 tokens, H 7168,
# top-8, FP8 dispatch / bf16 combine, EP8, "~160 GB/s NVLink maximum"; GB/s as its tests count
# them (the bytes of the received rows, every source rank and itself included, per call).
# Low latency: 128 tokens, H 7168, top-8, FP8 dispatch, EP8, over RDMA ("low-latency kernels
# with pure RDMA", CX7 400 Gb/s), not NVLink.
PUBLISHED = {"dispatch": "153 GB/s (NVLink)", "combine": "158 GB/s (NVLink)",
             "ll-dispatch": "77 us (RDMA)", "ll-combine": "114 us (RDMA)"}
PUBLISHED_US = {"ll-dispatch": 77.0, "ll-combine": 114.0}
PUBLISHED_GBPS = {"dispatch": 153.0, "combine": 158.0}
SAMPLE_TOKENS = 32              # normal samples: one 32-token group per channel
LL_ROWS = (1, 3)                # low-latency samples: rows per (expert, source rank)
LL_SAMPLE_LOCAL_EXPERTS = 8     # one sender and one receiver CTA (8 warps) per rank
ROUTING_SEED = 0


@dataclasses.dataclass(frozen=True)
class EpProblem:
    """One EP call: `tokens` per rank of `hidden` (a multiple of 128), `topk` of
    `num_experts` experts, `ranks` ranks (<= 8), FP8 (e4m3 rows + f32 scales per 128) or bf16
    dispatch payload (combine is bf16). channels / publish_every: normal-mode rings (the
    Buffer's default Config: 20 SMs = 10 channels, 6); recv_ctas: low-latency combine's
    reducing CTAs (CudaIpcMemory's default)."""
    kind: str
    tokens: int
    hidden: int = 7168
    topk: int = 8
    num_experts: int = 256
    ranks: int = 8
    fp8: bool = True
    channels: int = 10
    publish_every: int = 6
    recv_ctas: int = 16

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.hidden <= 0 or self.hidden % SCALE_BLOCK:
            raise ValueError(f"hidden: expected a positive multiple of {SCALE_BLOCK}, got {self.hidden}")
        if not 2 <= self.ranks <= cep.MAX_RANKS:
            raise ValueError(f"ranks: expected 2..{cep.MAX_RANKS}, got {self.ranks}")
        if self.num_experts <= 0 or self.num_experts % self.ranks:
            raise ValueError(f"num_experts: expected a positive multiple of ranks ({self.ranks}), "
                             f"got {self.num_experts}")
        if not 1 <= self.topk <= min(cep.MAX_TOPK, self.num_experts):
            raise ValueError(f"topk: expected 1..{min(cep.MAX_TOPK, self.num_experts)}, got {self.topk}")
        for name in ("tokens", "channels", "publish_every", "recv_ctas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")

    @property
    def payload_bytes(self) -> int:
        """Bytes of one dispatched row (FP8: e4m3 row + f32 scales)."""
        h = self.hidden
        return h + 4 * (h // SCALE_BLOCK) if self.fp8 and self.kind != "combine" and self.kind != "ll-combine" \
            else 2 * h

    def label(self) -> str:
        dtype = "fp8" if self.fp8 and self.kind in ("dispatch", "ll-dispatch") else "bf16"
        return (f"{self.kind} T{self.tokens} H{self.hidden} top-{self.topk} of {self.num_experts}, EP{self.ranks}, "
                f"{dtype}")


# ---------------------------------------------------------------------------------------
# Routing of the real size
# ---------------------------------------------------------------------------------------
def uniform_routing(tokens: int, num_experts: int, topk: int, ranks: int, seed: int = ROUTING_SEED) -> list:
    """Per rank: int64 [tokens, topk], distinct experts per token drawn uniformly."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :topk] for _ in range(ranks)]


def in_rank(topk_idx: torch.Tensor, num_experts: int, ranks: int) -> torch.Tensor:
    """bool [T, R]: the token has an expert on rank r."""
    out = torch.zeros(topk_idx.shape[0], ranks, dtype=torch.bool)
    valid = topk_idx >= 0
    rows = torch.arange(topk_idx.shape[0])[:, None].expand_as(topk_idx)
    out[rows[valid], (topk_idx[valid] // (num_experts // ranks))] = True
    return out


def channel_bounds(tokens: int, channels: int, c: int):
    """Tokens [begin, end) of channel c (the kernels' channel_range)."""
    per = cdiv(tokens, channels)
    begin = min(c * per, tokens)
    return begin, min(begin + per, tokens)


# ---------------------------------------------------------------------------------------
# Sampling on the emulator
# ---------------------------------------------------------------------------------------
class _SampledNode(cep.LocalNode):
    """LocalNode whose launches run one rank at a time (every rank's buffer mapped in each
    launch's global memory, as launch_many maps them), recording rank 0's. `only`: the
    ranks whose launches run (None: every rank); `repeat_seq`: the next low-latency call
    reuses the last call number (a receiver-only call after a sender-only one)."""

    def __init__(self, cfg):
        super().__init__(cfg, device="cpu", poison=False)
        self.only = None
        self.repeat_seq = False
        self.recorded = {}

    def _next_seq(self):
        if self.repeat_seq:
            return self.seq
        return super()._next_seq()

    def _run(self, plans, quantum=512):
        for r, plan in enumerate(plans):
            if self.only is not None and r not in self.only:
                continue
            gmem = GlobalMemory()
            for b in self.buffers:
                gmem.register_tensor(b, "a rank's buffer")
            rec = Recorder() if r == 0 else None
            emu.launch(**cep._launch(plan), gmem=gmem, trace=rec)
            if rec is not None:
                self.recorded[plan.function] = rec
        bad = [(r, e) for r, e in enumerate(self.error_records()) if e]
        if bad:
            raise RuntimeError(f"EP model sample: a kernel recorded an error: {bad}")


def _payload(gen, tokens, hidden, fp8):
    x = torch.randn(tokens, hidden, generator=gen)
    if fp8:
        return x.to(torch.float8_e4m3fn), torch.rand(tokens, hidden // SCALE_BLOCK, generator=gen) + 0.5
    return x.to(torch.bfloat16)


def _all_ranks_routing(routed: int, idle: int, topk: int, num_experts: int, ranks: int) -> torch.Tensor:
    """`routed` tokens that each have an expert on every rank (slot k -> rank k mod R), then
    `idle` tokens routed nowhere."""
    per = num_experts // ranks
    rows = [[(k % ranks) * per + (t + k // ranks) % per for k in range(topk)] for t in range(routed)]
    idx = torch.tensor(rows, dtype=torch.int64).view(routed, topk)
    return torch.cat([idx, torch.full((idle, topk), -1, dtype=torch.int64)])


@functools.lru_cache(maxsize=8)
def _normal_samples(hidden: int, topk: int, ranks: int, fp8: bool, publish_every: int) -> dict:
    """Recordings of rank 0: {sample: {function: Recording}} (see the module docstring)."""
    if topk < ranks:
        raise ValueError(f"topk: the normal-mode samples route every token to every rank: needs topk >= ranks "
                         f"({ranks}), got {topk}")
    num_experts = ranks * max(1, topk)
    n = SAMPLE_TOKENS
    plans = {"S1": (1, n, 0), "S2": (1, n, n), "S3": (1, n // 2, n // 2), "S4": (2, 2 * n, 0)}
    out = {}
    for name, (channels, routed, idle) in plans.items():
        T = routed + idle
        slots = 1 << (T + 2).bit_length()           # no sender ever waits for a slot
        cfg = cep.IntranodeConfig(num_ranks=ranks, hidden=hidden, max_topk=topk, num_channels=channels,
                                  num_slots=slots, publish_every=min(publish_every, slots))
        node = _SampledNode(cfg)
        gen = torch.Generator().manual_seed(1)
        xs = [_payload(gen, T, hidden, fp8) for _ in range(ranks)]
        topk_idx = [_all_ranks_routing(routed, idle, topk, num_experts, ranks) for _ in range(ranks)]
        w = [torch.rand(T, topk, generator=gen) for _ in range(ranks)]
        sent = node.dispatch(xs, topk_idx, w, num_experts, flags=[cep.FLAG_IDLE_RECEIVERS] * ranks)
        rec = {"dispatch_send": node.recorded["pk_ep_dispatch"]}
        if name != "S4":
            got = node.dispatch(xs, topk_idx, w, num_experts, handles=[r["handle"] for r in sent],
                                flags=[cep.FLAG_IDLE_SENDERS] * ranks)
            rec["dispatch_recv"] = node.recorded["pk_ep_dispatch"]
            handles = [r["handle"] for r in got]
            ys = [torch.randn(h.num_recv, hidden, generator=gen).to(torch.bfloat16) for h in handles]
            ws = [r["recv_topk_weights"] for r in got]
            node.combine(ys, handles, ws, flags=[cep.FLAG_IDLE_RECEIVERS] * ranks)
            rec["combine_send"] = node.recorded["pk_ep_combine"]
            node.only = {0}
            node.combine(ys, handles, ws, flags=[cep.FLAG_IDLE_SENDERS] * ranks)
            rec["combine_recv"] = node.recorded["pk_ep_combine"]
            _check_received(got[0], xs, routed, ranks)
        out[name] = rec
    return out


def _check_received(result, xs, routed, ranks):
    """Rank 0 received every source's routed rows, in (source, token) order."""
    want = torch.cat([(x[0] if isinstance(x, tuple) else x)[:routed].reshape(routed, -1).view(torch.uint8)
                      for x in xs])
    got = result["recv_x"][0] if isinstance(result["recv_x"], tuple) else result["recv_x"]
    if not torch.equal(got.reshape(want.shape[0], -1).view(torch.uint8), want):
        raise RuntimeError("EP model sample: the dispatch receiver's rows differ from the sources' rows")


def _ll_sample_routing(tokens, topk, num_experts, rows):
    """`rows` (token, slot) pairs per expert, slots filled in order (distinct experts per
    token while num_experts >= topk), the rest -1."""
    idx = torch.full((tokens * topk,), -1, dtype=torch.int64)
    pairs = torch.arange(rows * num_experts)
    idx[pairs] = pairs % num_experts
    return idx.view(tokens, topk)


@functools.lru_cache(maxsize=8)
def _ll_samples(tokens: int, hidden: int, topk: int, ranks: int, fp8: bool) -> dict:
    """Recordings of rank 0 per rows q: {q: {function role: Recording}}."""
    E = ranks * LL_SAMPLE_LOCAL_EXPERTS
    if max(LL_ROWS) * E > tokens * topk:
        raise ValueError(f"tokens: the low-latency samples need tokens * topk >= {max(LL_ROWS) * E}, "
                         f"got {tokens} * {topk}")
    out = {}
    for q in LL_ROWS:
        cfg = cep.IntranodeConfig(num_ranks=ranks, hidden=hidden, max_topk=topk, num_channels=1, num_slots=2,
                                  publish_every=1, num_experts=E, max_dispatch_tokens=tokens)
        node = _SampledNode(cfg)
        gen = torch.Generator().manual_seed(2)
        xs = [_payload(gen, tokens, hidden, fp8) for _ in range(ranks)]
        topk_idx = [_ll_sample_routing(tokens, topk, E, q) for _ in range(ranks)]
        w = [torch.rand(tokens, topk, generator=gen) for _ in range(ranks)]
        sent = node.low_latency_dispatch(xs, topk_idx, flags=[cep.FLAG_IDLE_RECEIVERS] * ranks)
        rec = {"dispatch_send": node.recorded["pk_ep_ll_dispatch"]}
        node.repeat_seq = True
        got = node.low_latency_dispatch(xs, topk_idx, flags=[cep.FLAG_IDLE_SENDERS] * ranks)
        node.repeat_seq = False
        rec["dispatch_recv"] = node.recorded["pk_ep_ll_dispatch"]
        counts = got[0]["recv_count"]
        if not torch.equal(counts, torch.full_like(counts, q * ranks)):
            raise RuntimeError(f"EP model sample: low-latency receiver counts {counts.tolist()}, expected "
                               f"{q * ranks} each")
        handles = [cep.LowLatencyHandle(g["handle"].recv_src_info, g["handle"].recv_layout, s["handle"].slot_of,
                                        s["handle"].seq, tokens) for s, g in zip(sent, got)]
        ys = [torch.randn(LL_SAMPLE_LOCAL_EXPERTS, ranks * tokens, hidden, generator=gen).to(torch.bfloat16)
              for _ in range(ranks)]
        node.low_latency_combine(ys, topk_idx, w, handles, flags=[cep.FLAG_IDLE_RECEIVERS] * ranks)
        rec["combine_send"] = node.recorded["pk_ep_ll_combine"]
        if q == LL_ROWS[0]:
            node.only = {0}
            for ctas in (8, 16):     # tokens t = cta + i * ctas: 16 and 8 per CTA
                node.low_latency_combine(ys, topk_idx, w, handles, num_recv_ctas=ctas,
                                         flags=[cep.FLAG_IDLE_SENDERS] * ranks)
                rec[f"combine_recv{ctas}"] = node.recorded["pk_ep_ll_combine"]
        out[q] = rec
    return out


@functools.lru_cache(maxsize=8)
def _layout_sample(topk: int, num_experts: int, ranks: int):
    """Rank 0's layout kernel over one CTA (256 tokens) of the uniform routing."""
    cfg = cep.IntranodeConfig(num_ranks=ranks, hidden=SCALE_BLOCK, max_topk=topk, num_channels=1, num_slots=2,
                              publish_every=1)
    node = _SampledNode(cfg)
    node.only = {0}
    idx = uniform_routing(cep.THREADS, num_experts, topk, 1)[0]
    node.get_dispatch_layout([idx], num_experts)
    return _merge_split_arrivals(node.recorded["pk_ep_layout"])


def _merge_split_arrivals(rec):
    """A warp that the emulator runs as two thread groups after a divergent loop (the layout
    kernel's zeroing loop) records its bar.sync once per group; on the GPU the warp arrives
    once. Keep the first event per (warp, barrier generation)."""
    for r in rec.recordings:
        for w, events in enumerate(r.events):
            seen = set()
            keep = []
            for ev in events:
                if ev[1] == "B":
                    if ev[2][0] in seen:
                        continue
                    seen.add(ev[2][0])
                keep.append(ev)
            r.events[w] = keep
    return rec


def _cta_cycles(rec, p: Part, mem: MemoryShare) -> list:
    """Clocks of each CTA of a recording (one Machine per CTA: the launch was not co-resident)."""
    return [c for r in replay(rec, p, mem) for c in r.cta_cycles]


# ---------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpPrediction:
    part: str
    problem: EpProblem
    seconds: float
    terms: dict                  # name -> seconds (the composition's terms)
    bound: str                   # the term that decides
    costs: dict                  # per-unit clocks from the samples
    received_bytes: int          # DeepEP's count: rows (and FP8 scales) received by the busiest rank
    remote_bytes: int            # busiest rank, busiest direction, over NVLink
    link_bytes_per_s: float
    sampled: str
    all_l2_seconds: float = None  # the same with every local read an L2 hit
    layout_seconds: float = None  # the layout kernel (normal dispatch; not in `seconds`)
    model_version: str = MODEL_VERSION

    @property
    def gbps(self) -> float:
        """DeepEP's bandwidth figure: received row bytes / time."""
        return self.received_bytes / self.seconds / 1e9

    @property
    def link_fraction(self) -> float:
        """gbps over the part's NVLink bandwidth per direction (the issue's target: >= 0.8)."""
        return self.received_bytes / self.seconds / self.link_bytes_per_s

    def lines(self):
        pr = self.problem
        out = [f"model ({self.part.upper()}, model version {self.model_version}): our {pr.label()}",
               f"  sampled: {self.sampled}",
               "  per-unit clocks: " + ", ".join(f"{k} {v:.0f}" for k, v in self.costs.items()),
               "  terms: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in self.terms.items())
               + f"; bound: {self.bound}",
               f"  NVLink per direction {self.link_bytes_per_s / 1e9:.0f} GB/s (machines.py bidirectional / 2); "
               f"busiest rank moves {self.remote_bytes / 1e6:.2f} MB one way"]
        tail = f"  {self.seconds * 1e6:.1f} us"
        if pr.kind in ("dispatch", "combine"):
            tail += (f": {self.gbps:.0f} GB/s in DeepEP's count ({self.received_bytes / 1e6:.1f} MB of received "
                     f"rows, its own included) = {100 * self.link_fraction:.0f}% of the link per direction; the "
                     f"link itself busy {100 * self.remote_bytes / self.seconds / self.link_bytes_per_s:.0f}%")
        if self.all_l2_seconds is not None:
            tail += f"; every local read an L2 hit: {self.all_l2_seconds * 1e6:.1f} us"
        out.append(tail)
        if self.layout_seconds is not None:
            out.append(f"  layout kernel (not included, as DeepEP's get_dispatch_layout): "
                       f"{self.layout_seconds * 1e6:.1f} us")
        if pr.kind in PUBLISHED:
            config = "4096 tokens" if pr.kind in ("dispatch", "combine") else "128 tokens"
            out.append(f"  DeepEP published (H800, {config}, H 7168, top-8, EP8; its README, "
                       f"../shared/ANCHORS.md): {PUBLISHED[pr.kind]}")
        return out


def link_bytes_per_s(p: Part) -> float:
    """NVLink bandwidth one direction of one GPU (NVLINK_SOURCE)."""
    return p.nvlink_bytes_per_s / 2


def rank_traffic(rows: torch.Tensor, item_bytes: int):
    """rows int [R, R]: rows rank s sends to rank d (the diagonal stays in the rank's own
    memory). Returns (bytes the busiest rank moves over NVLink in its busier direction,
    rows the busiest receiver gets, its own included). Dispatch's rows come back in combine:
    the same matrix transposed, the same busiest direction."""
    remote = rows.clone()
    remote.fill_diagonal_(0)
    return int(max(remote.sum(1).max(), remote.sum(0).max())) * item_bytes, int(rows.sum(0).max())


def _mem(p, active, hit, all_l2):
    return MemoryShare.of(p, min(p.sms, max(1, active)), 1.0 if all_l2 else hit)


def _normal_costs(pr: EpProblem, p: Part, send_hit: float, all_l2: bool) -> dict:
    """Per-unit clocks of the normal kernels (the module docstring's solve)."""
    s = _normal_samples(pr.hidden, pr.topk, pr.ranks, pr.fp8, pr.publish_every)
    n = SAMPLE_TOKENS
    active = 2 * pr.channels
    send, recv = _mem(p, active, send_hit, all_l2), _mem(p, active, 0.0, all_l2)
    comb_send = _mem(p, active, 0.0, all_l2)
    c = {}
    if pr.kind == "dispatch":
        s1, s2, s3 = (max(_cta_cycles(s[k]["dispatch_send"], p, send)) for k in ("S1", "S2", "S3"))
        s4 = _cta_cycles(s["S4"]["dispatch_send"], p, send)     # CTA 0 (channel 0), CTA 2 (channel 1)
        c["prefix_group"] = s4[2] - s4[0]
        c["scan_group"] = s2 - s1 - c["prefix_group"]
        c["send_row"] = (s1 - s3) / (n // 2)
        c["send_fixed"] = s1 - c["prefix_group"] - c["scan_group"] - n * c["send_row"]
        r1, r3 = (max(_cta_cycles(s[k]["dispatch_recv"], p, recv)) for k in ("S1", "S3"))
        c["recv_row"] = (r1 - r3) / (n // 2)
        c["recv_fixed"] = r1 - n * c["recv_row"]
    else:
        s1, s3 = (max(_cta_cycles(s[k]["combine_send"], p, comb_send)) for k in ("S1", "S3"))
        c["send_row"] = (s1 - s3) / (n // 2)
        c["send_fixed"] = s1 - n * c["send_row"]
        r1, r2, r3 = (max(_cta_cycles(s[k]["combine_recv"], p, recv)) for k in ("S1", "S2", "S3"))
        c["token"] = (r2 - r1) / n                       # a token routed nowhere (zeros written)
        c["token_rank"] = (r1 - r3) / (n // 2 * pr.ranks)  # per rank the token went to
        c["recv_fixed"] = r1 - n * (c["token"] + pr.ranks * c["token_rank"])
    return c


def _normal(pr: EpProblem, p: Part, all_l2: bool = False):
    R, C, T = pr.ranks, pr.channels, pr.tokens
    routing = uniform_routing(T, pr.num_experts, pr.topk, R)
    inr = [in_rank(idx, pr.num_experts, R) for idx in routing]           # [s][t, d]
    # N[s, c, d]: tokens of rank s's channel c going to rank d
    N = torch.zeros(R, C, R, dtype=torch.int64)
    groups = torch.zeros(C, dtype=torch.int64)
    prefix = torch.zeros(C, dtype=torch.int64)
    for c in range(C):
        b, e = channel_bounds(T, C, c)
        groups[c], prefix[c] = cdiv(e - b, 32), cdiv(e, 32)
        for s in range(R):
            N[s, c] = inr[s][b:e].sum(0)
    requested = sum(int(x.sum()) for x in inr)
    unique = sum(int(x.any(1).sum()) for x in inr)
    send_hit = 1.0 - unique / requested if requested else 0.0
    cost = _normal_costs(pr, p, send_hit, all_l2)
    per_dir = link_bytes_per_s(p)
    clk = p.clock_hz
    if pr.kind == "dispatch":
        item = pr.payload_bytes + 8 * pr.topk + 4
        # sender CTA (s, c): its busiest warp; receiver CTA (d, c): its busiest source warp
        send = max(cost["send_fixed"] + cost["prefix_group"] * prefix[c] + cost["scan_group"] * groups[c]
                   + cost["send_row"] * N[s, c].max() for s in range(R) for c in range(C))
        recv = max(cost["recv_fixed"] + cost["recv_row"] * N[:, c, d].max() for d in range(R) for c in range(C))
        first_send, last_recv = pr.publish_every * cost["send_row"], pr.publish_every * cost["recv_row"]
        rows_in = N.sum(1)                                                # [s, d]
        local_per_rank = [int(inr[s].any(1).sum()) * pr.payload_bytes + 2 * int(rows_in[:, s].sum()) * item
                          for s in range(R)]                            # x once, ring in + out, outputs
    else:
        item = 2 * pr.hidden + 8
        send = max(cost["send_fixed"] + cost["send_row"] * N[:, c, d].max() for d in range(R) for c in range(C))
        recv = 0.0
        for s in range(R):
            for c in range(C):
                b, e = channel_bounds(T, C, c)
                m = inr[s][b:e].sum(1)
                recv = max(recv, cost["recv_fixed"] + cost["token"] * (e - b) + cost["token_rank"] * int(m.sum()))
        first_send, last_recv = pr.publish_every * cost["send_row"], pr.publish_every * cost["token"]
        rows_in = N.sum(1).T                                              # combine goes back: [d, s]
        local_per_rank = [2 * int(rows_in[:, s].sum()) * item + T * 2 * pr.hidden for s in range(R)]
    # DeepEP's count: the payload bytes of the rows dispatch delivers to the busiest rank
    # (recv_x and scales; combine: the same rows sent back, bf16)
    remote_bytes, received_rows = rank_traffic(N.sum(1), item)
    received = received_rows * (pr.payload_bytes if pr.kind == "dispatch" else 2 * pr.hidden)
    terms = {"sender": float(send + last_recv) / clk, "receiver": float(recv + first_send) / clk,
             "link": remote_bytes / per_dir, "hbm": max(local_per_rank) / p.hbm_bytes_per_s}
    sampled = (f"rank 0 of {R} on the emulator, one channel: {SAMPLE_TOKENS} tokens to every rank, +{SAMPLE_TOKENS} "
               f"routed nowhere, {SAMPLE_TOKENS // 2} + {SAMPLE_TOKENS // 2}, two channels; senders then receivers; "
               f"replayed with {2 * C} SMs active, sender L2 hit "
               + (f"{send_hit:.2f} (rows re-read per destination)" if pr.kind == "dispatch" else "0")
               + ", receiver 0")
    return terms, cost, received, remote_bytes, sampled


def _ll_costs(pr: EpProblem, p: Part, send_hit: float, active: int, all_l2: bool) -> dict:
    s = _ll_samples(pr.tokens, pr.hidden, pr.topk, pr.ranks, pr.fp8)
    lo, hi = LL_ROWS
    send, recv = _mem(p, active, send_hit, all_l2), _mem(p, active, 0.0, all_l2)
    c = {}
    role = "dispatch" if pr.kind == "ll-dispatch" else "combine"
    a, b = (max(_cta_cycles(s[q][f"{role}_send"], p, send)) for q in (lo, hi))
    rows_per_q = 1 if role == "dispatch" else pr.ranks        # dispatch: a warp per expert gets q rows
    c["send_row"] = (b - a) / ((hi - lo) * rows_per_q)
    c["send_fixed"] = a - lo * rows_per_q * c["send_row"]
    if role == "dispatch":
        a, b = (max(_cta_cycles(s[q]["dispatch_recv"], p, recv)) for q in (lo, hi))
        c["recv_row"] = (b - a) / ((hi - lo) * pr.ranks)
        c["recv_fixed"] = a - lo * pr.ranks * c["recv_row"]
    else:
        # q = 1: the first E_s / topk tokens carry every slot (full), the rest none (empty);
        # reducing CTA j takes tokens j, j + ctas, ...: each CTA of both runs is one equation
        # fixed + empty tokens x e + full tokens x F, solved by least squares
        full = LL_SAMPLE_LOCAL_EXPERTS * pr.ranks * lo // pr.topk
        eqs, obs = [], []
        for ctas in (8, 16):
            for j, cyc in enumerate(_cta_cycles(s[lo][f"combine_recv{ctas}"], p, recv)):
                mine = range(j, pr.tokens, ctas)
                n_full = len([t for t in mine if t < full])
                eqs.append([1.0, len(mine) - n_full, n_full])
                obs.append(cyc)
        sol = torch.linalg.lstsq(torch.tensor(eqs, dtype=torch.float64),
                                 torch.tensor(obs, dtype=torch.float64)[:, None]).solution.flatten().tolist()
        c["recv_fixed"], c["token_empty"], c["token_full"] = sol
    return c


def _ll(pr: EpProblem, p: Part, all_l2: bool = False):
    R, T, K, E = pr.ranks, pr.tokens, pr.topk, pr.num_experts
    El = E // R
    routing = uniform_routing(T, E, K, R)
    rows = torch.stack([torch.bincount(idx[idx >= 0].flatten(), minlength=E) for idx in routing])   # [s, e]
    warps = cep.THREADS // 32
    clk = p.clock_hz
    if pr.kind == "ll-dispatch":
        active = cdiv(E, warps) + cdiv(El, warps)
        # requested: every expert warp reads all top-k ids, each (token, k) reads its row
        req = E * T * K * 8 + T * K * pr.payload_bytes
        hit = 1.0 - (T * K * 8 + T * pr.payload_bytes) / req
        cost = _ll_costs(pr, p, hit, active, all_l2)
        send = max(cost["send_fixed"] + cost["send_row"] * int(rows[s, e0:e0 + warps].max())
                   for s in range(R) for e0 in range(0, E, warps))
        per_le = rows.sum(0).view(R, El)                                    # [d, le]: rows expert le of d gets
        recv = max(cost["recv_fixed"] + cost["recv_row"] * int(per_le[d, l0:l0 + warps].max())
                   for d in range(R) for l0 in range(0, El, warps))
        item = pr.payload_bytes + 4
    else:
        active = cdiv(El, warps) + pr.recv_ctas
        cost = _ll_costs(pr, p, 0.0, active, all_l2)
        per_le = rows.sum(0).view(R, El)
        send = max(cost["send_fixed"] + cost["send_row"] * int(per_le[d, l0:l0 + warps].max())
                   for d in range(R) for l0 in range(0, El, warps))
        tokens = cdiv(T, pr.recv_ctas)
        recv = cost["recv_fixed"] + tokens * cost["token_full"]
        item = 2 * pr.hidden
    remote_bytes, received_rows = rank_traffic(rows.view(R, R, El).sum(2), item)   # [s, d] rows s sends to d
    terms = {"sender": float(send) / clk, "link": remote_bytes / link_bytes_per_s(p), "receiver": float(recv) / clk}
    received = received_rows * item
    sampled = (f"rank 0 of {R} on the emulator, {LL_SAMPLE_LOCAL_EXPERTS * R} experts, {T} tokens, top-{K}, "
               f"{' and '.join(map(str, LL_ROWS))} rows per (expert, source); senders then receivers; "
               f"replayed with {active} SMs active")
    return terms, cost, received, remote_bytes, sampled


def layout_seconds(pr: EpProblem, p: Part) -> float:
    """The layout kernel: one sampled CTA (256 tokens, HBM latency) per wave of CTAs."""
    ctas = cdiv(pr.tokens, cep.THREADS)
    one = max(_cta_cycles(_layout_sample(pr.topk, pr.num_experts, pr.ranks), p,
                          MemoryShare.of(p, min(p.sms, ctas), 0.0)))
    return cdiv(ctas, p.sms) * one / p.clock_hz


def predict(kind: str, tokens: int, hidden: int = 7168, topk: int = 8, num_experts: int = 256, ranks: int = 8,
            fp8: bool = True, part="h800", channels: int = 10, publish_every: int = 6,
            recv_ctas: int = 16) -> EpPrediction:
    """Predicted time of one call of our intranode kernel `kind` (KINDS) on `part`:
    `tokens` per rank, bf16 or FP8 dispatch payload of `hidden`, top-`topk` of
    `num_experts` experts, `ranks` ranks."""
    pr = EpProblem(kind, tokens, hidden, topk, num_experts, ranks, fp8, channels, publish_every, recv_ctas)
    p = part if isinstance(part, Part) else get_part(part)
    normal = kind in ("dispatch", "combine")
    run = _normal if normal else _ll
    terms, cost, received, remote, sampled = run(pr, p)
    l2_terms = run(pr, p, all_l2=True)[0]
    if normal:
        seconds, l2_seconds = max(terms.values()), max(l2_terms.values())
        bound = max(terms, key=terms.get)
    else:
        seconds = max(terms["sender"], terms["link"]) + terms["receiver"]
        l2_seconds = max(l2_terms["sender"], l2_terms["link"]) + l2_terms["receiver"]
        bound = ("link" if terms["link"] > terms["sender"] else "sender") + " + receiver"
    layout = layout_seconds(pr, p) if kind == "dispatch" else None
    return EpPrediction(p.key, pr, seconds, terms, bound, cost, received, remote, link_bytes_per_s(p), sampled,
                        l2_seconds, layout)
