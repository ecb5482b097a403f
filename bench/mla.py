"""MLA decode benchmark: FlashMLA's published configurations, ours against torch SDPA.

Rows use the GEMM harness's format (op "mla"), so report.derive adds TFLOP/s, GB/s and
the roofline fraction (bf16 peak and measured copy bandwidth). Bytes and FLOPs come from
pykernels.mla.decode_cost over each sequence's own length.
"""
from dataclasses import dataclass

import torch

from . import timing

DEVICE = "cuda"    # a module attribute so a CPU check can point the builders elsewhere
IMPLS = ("pykernels_triton", "pykernels_cuda", "torch_sdpa")


@dataclass(frozen=True)
class Config:
    """batch sequences of about `seqlen` cached tokens (each varied by up to ±`spread`),
    s_q new tokens, h_q query heads, h_kv = 1; `fp8` selects the FP8 cache layout."""
    batch: int
    s_q: int
    h_q: int
    seqlen: int
    spread: float = 0.25
    fp8: bool = False

    def label(self) -> str:
        return f"b{self.batch}-sq{self.s_q}-h{self.h_q}-sk{self.seqlen}{'-fp8' if self.fp8 else ''}"


# FlashMLA's configurations: batch 64/128, s_k ~4096 with variation, h_q 16/128, s_q 1/2.
FULL = [Config(b, sq, h, 4096) for b in (64, 128) for sq in (1, 2) for h in (16, 128)] + \
       [Config(128, 2, 128, 4096, fp8=True), Config(128, 1, 16, 4096, fp8=True)]
QUICK = [Config(4, 1, 16, 256), Config(4, 2, 128, 256)]


def seqlens_for(cfg: Config, g: torch.Generator) -> torch.Tensor:
    """int32 [batch]: about cfg.seqlen tokens each, varied uniformly by up to +-spread."""
    lo, hi = int(cfg.seqlen * (1 - cfg.spread)), int(cfg.seqlen * (1 + cfg.spread))
    return torch.randint(max(lo, cfg.s_q), hi + 1, (cfg.batch,), generator=g, dtype=torch.int32)


def make_inputs(cfg: Config, seed: int = 0) -> dict:
    """q, a paged cache in shuffled page order, block table and per-sequence lengths."""
    from pykernels import mla
    g = torch.Generator().manual_seed(seed)
    seqlens = seqlens_for(cfg, g)
    pages = (seqlens + 63) // 64
    max_pages = int(pages.max())
    num_blocks = int(pages.sum())
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    table = torch.zeros(cfg.batch, max_pages, dtype=torch.int32)
    start = 0
    for i, p in enumerate(pages.tolist()):
        table[i, :p] = perm[start:start + p]
        start += p
    q = torch.randn(cfg.batch, cfg.s_q, cfg.h_q, 576, generator=g).to(torch.bfloat16)
    cache = torch.randn(num_blocks, 64, 1, 576, generator=g).to(torch.bfloat16)
    d = dict(q=q, cache=cache, table=table, seqlens=seqlens)
    d = {k: v.to(DEVICE) for k, v in d.items()}
    if cfg.fp8:
        d["cache_fp8"] = mla.quantize_kv_cache_fp8(d["cache"])
    return d


def cost(cfg: Config, d: dict) -> dict:
    """FLOPs and bytes summed over the sequences' own lengths."""
    from pykernels import mla
    flops = nbytes = 0
    for n in d["seqlens"].tolist():
        c = mla.decode_cost(1, cfg.s_q, cfg.h_q, n, fp8_cache=cfg.fp8)
        flops, nbytes = flops + c["flops"], nbytes + c["bytes"]
    return dict(flops=flops, bytes=nbytes)


def sdpa_gathered(q, cache, table, seqlens, causal=True):
    """The baseline: gather each sequence's pages into a padded [b, L, 576] cache, then
    torch SDPA with a length (and causal) mask. Returns out bf16 [b, s_q, h_q, 512]."""
    b, s_q, h_q, _ = q.shape
    L = table.shape[1] * 64
    kv = cache.view(-1, 576)[(table.long()[:, :, None] * 64 + torch.arange(64, device=q.device)).view(b, L)]
    pos = torch.arange(L, device=q.device)
    limit = seqlens.long()[:, None] - s_q + 1 + torch.arange(s_q, device=q.device)[None, :] if causal \
        else seqlens.long()[:, None].expand(b, s_q)
    mask = pos[None, None, :] < limit[:, :, None]                           # [b, s_q, L]
    qh = q.transpose(1, 2)                                                  # [b, h_q, s_q, 576]
    k = kv[:, None].expand(b, h_q, L, 576)
    v = kv[:, None, :, :512].expand(b, h_q, L, 512)
    o = torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None], scale=576 ** -0.5)
    return o.transpose(1, 2)


def build(impl: str, cfg: Config, d: dict):
    from pykernels import mla
    if impl == "torch_sdpa":
        if cfg.fp8:
            raise ValueError("no FP8-cache SDPA baseline")
        return lambda: sdpa_gathered(d["q"], d["cache"], d["table"], d["seqlens"])
    backend = impl.split("_")[1]
    cache = d["cache_fp8"] if cfg.fp8 else d["cache"]
    meta, splits = mla.get_mla_metadata(d["seqlens"], cfg.s_q * cfg.h_q, 1)
    return lambda: mla.flash_mla_with_kvcache(d["q"], cache, d["table"], d["seqlens"], 512, meta, splits,
                                              causal=True, backend=backend)


def wrong_output(impl: str, out, want) -> str:
    """timing.wrong_output of the attention outputs of two (out, lse) results."""
    return timing.wrong_output(impl, out[0], want[0])


def measure(quick: bool = False, runs: int = 50, n_sets: int = 2) -> list:
    """Raw rows (report.derive's input) for every configuration and implementation; ours
    are checked against the reference backend before they are timed."""
    rows = []
    for cfg in (QUICK if quick else FULL):
        sets = [make_inputs(cfg, seed=i) for i in range(n_sets)]
        c = cost(cfg, sets[0])
        want = build("pykernels_reference", cfg, sets[0])()
        for impl in IMPLS:
            row = dict(op="mla", shape=cfg.label(), impl=impl, precision="bf16", flops=c["flops"],
                       bytes=c["bytes"], seconds=None, seconds_min=None, seconds_max=None, kernel_seconds=None,
                       note="sequence lengths vary; FLOPs count every key for every row")
            rows.append(timing.measure_row(row, lambda: [build(impl, cfg, d) for d in sets],
                                           lambda out: wrong_output(impl, out, want), runs))
        sets = want = None  # the inputs freed before the cache is emptied
        torch.cuda.empty_cache()
    return rows
