"""MLA decode attention with FlashMLA's call forms (see docs/mla.md).

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      tile_scheduler_metadata, num_splits, causal=True)

q bf16 [b, s_q, h_q, 576]; k_cache bf16 [num_blocks, 64, 1, 576] (pages of 64 tokens,
the first 512 columns double as V) or the FP8 layout uint8 [num_blocks, 64, 1, 656]
made by quantize_kv_cache_fp8; block_table int32 [b, max_blocks]; cache_seqlens int32
[b]. Returns out bf16 [b, s_q, h_q, 512] and softmax_lse float32 [b, h_q, s_q].

Backends of flash_mla_with_kvcache: "reference" (PyTorch, float32), "triton" (GPU, or
interpreted on CPU), "cuda" (the hand-written sm_90a kernel, csrc/mla/decode.cu; bf16
and FP8 caches) and "emu" (the same kernel's PTX on the CPU emulator, CPU tensors); "auto"
picks "cuda" for GPU tensors and "reference" for CPU tensors. The metadata is computed on
the device by the triton backend (no host-device synchronisation); the reference
backend reads cache_seqlens on the host.
"""
import math
import numbers

import torch

from .reference import mla as RM
from .runtime import validate as V
from .runtime.backend import resolve
from .runtime.mla_ops import MLA_IMPLS

HEAD_DIM_QK = RM.HEAD_DIM_QK
HEAD_DIM_V = RM.HEAD_DIM_V
PAGE_BLOCK_SIZE = RM.PAGE_BLOCK_SIZE
FP8_BYTES_PER_TOKEN = RM.FP8_BYTES_PER_TOKEN
H100_SMS = 132        # default SM count when cache_seqlens is not on a GPU
ROW_TILE = 64         # query rows per CTA of the planned CUDA kernel (sizes num_sm_parts)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def default_num_sm_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """SMs / (h_kv * row tiles of 64 query rows), at least 1: every (partition, KV head,
    row tile) is one CTA, so one wave fills the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS
    tiles = -(-num_q_tokens_per_head_k // ROW_TILE)
    return max(1, sms // (num_heads_k * tiles))


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_sm_parts: int = None, *, backend: str = "auto"):
    """Split-KV schedule for flash_mla_with_kvcache.

    cache_seqlens: int32 [b]; num_q_tokens_per_head_k: s_q * h_q // h_kv; num_heads_k:
    h_kv; num_sm_parts: SM partitions (default: SM count / (h_kv * ceil(rows / 64))).
    Returns (tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])
    on cache_seqlens' device. Row p of the metadata: [first_batch, first_block,
    last_batch, last_block_end, first_split, num_pieces, 0, 0]; num_splits[i] is the
    index of sequence i's first split, num_splits[b] the total (docs/mla.md).
    """
    seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    V.check_dtype("cache_seqlens", seqlens, torch.int32)
    V.check_rank("cache_seqlens", seqlens, 1)
    V.check_contiguous("cache_seqlens", seqlens)
    rows = _positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    h_kv = _positive_int("num_heads_k", num_heads_k)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(seqlens.device, rows, h_kv)
    parts = _positive_int("num_sm_parts", num_sm_parts)
    backend = resolve("get_mla_metadata", backend, seqlens.device, MLA_IMPLS["get_mla_metadata"])
    return torch.ops.pykernels.get_mla_metadata(seqlens, parts, backend)


def quantize_kv_cache_fp8(k_cache) -> torch.Tensor:
    """bf16 [num_blocks, 64, h_kv, 576] -> uint8 [num_blocks, 64, h_kv, 656]: per token
    512 e4m3 latent values, 4 float32 scales (one per 128 columns), 64 bf16 RoPE columns."""
    k_cache = V.as_tensor("k_cache", k_cache)
    V.check_dtype("k_cache", k_cache, torch.bfloat16)
    V.check_rank("k_cache", k_cache, 4)
    V.check_shape("k_cache", k_cache, (None, PAGE_BLOCK_SIZE, None, HEAD_DIM_QK))
    return RM.quantize_kv_cache_fp8(k_cache)


def _check_cache(k_cache):
    V.check_rank("k_cache", k_cache, 4)
    if k_cache.dtype == torch.bfloat16:
        d = HEAD_DIM_QK
    elif k_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        d = FP8_BYTES_PER_TOKEN
    else:
        raise TypeError(f"k_cache: expected dtype bfloat16 (or uint8 / float8_e4m3fn in the FP8 "
                        f"layout), got {str(k_cache.dtype).replace('torch.', '')}")
    if k_cache.shape[1] != PAGE_BLOCK_SIZE:
        raise ValueError(f"k_cache: expected page block size {PAGE_BLOCK_SIZE} (dim 1), "
                         f"got {k_cache.shape[1]} in shape {list(k_cache.shape)}")
    if k_cache.shape[2] != 1:
        raise ValueError(f"k_cache: expected h_kv = 1 (dim 2), got {k_cache.shape[2]} in shape {list(k_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected last dim {d} for dtype {str(k_cache.dtype).replace('torch.', '')}"
                         f", got {k_cache.shape[3]} in shape {list(k_cache.shape)}")
    V.check_contiguous("k_cache", k_cache)


def _check_values_on_host(block_table, cache_seqlens, num_blocks):
    # Only for CPU tensors (on a GPU this would be a host-device synchronisation) and not
    # while torch.compile traces (values are unknown there).
    if cache_seqlens.device.type != "cpu" or cache_seqlens.numel() == 0 or torch.compiler.is_compiling():
        return
    max_len = block_table.shape[1] * PAGE_BLOCK_SIZE
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > max_len:
        bad = lo if lo < 0 else hi
        raise ValueError(f"cache_seqlens: expected values in [0, {max_len}] (block_table holds "
                         f"{block_table.shape[1]} pages of {PAGE_BLOCK_SIZE}), got {bad}")
    nblk = (cache_seqlens.long() + PAGE_BLOCK_SIZE - 1) // PAGE_BLOCK_SIZE
    used = torch.arange(block_table.shape[1])[None, :] < nblk[:, None]
    pages = block_table[used]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= num_blocks):
        bad = int(pages.min()) if int(pages.min()) < 0 else int(pages.max())
        raise ValueError(f"block_table: expected page ids in [0, {num_blocks}) for the pages in use, got {bad}")


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata, num_splits, softmax_scale: float = None,
                           causal: bool = False, *, backend: str = "auto", out=None, softmax_lse=None):
    """MLA decode attention over a paged latent KV cache.

    q bf16 [b, s_q, h_q, 576] (unit stride in the last dim); k_cache bf16
    [num_blocks, 64, 1, 576] or FP8 uint8/float8_e4m3fn [num_blocks, 64, 1, 656]
    (contiguous); block_table int32 [b, max_blocks] (contiguous); cache_seqlens int32 [b];
    head_dim_v 512; tile_scheduler_metadata, num_splits from get_mla_metadata for these
    cache_seqlens; softmax_scale (default 576**-0.5); causal: new token i of s_q sees
    keys [0, seqlen - s_q + i]. out (bf16 [b, s_q, h_q, 512]) and softmax_lse (float32
    [b, h_q, s_q]) are written in place when given. Rows that see no key: out 0, lse +inf.
    Returns (out, softmax_lse).
    """
    q = V.as_tensor("q", q)
    k_cache = V.as_tensor("k_cache", k_cache)
    block_table = V.as_tensor("block_table", block_table)
    cache_seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    meta = V.as_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    num_splits = V.as_tensor("num_splits", num_splits)

    V.check_dtype("q", q, torch.bfloat16)
    V.check_rank("q", q, 4)
    b, s_q, h_q, d = q.shape
    if d != HEAD_DIM_QK:
        raise ValueError(f"q: expected head dim {HEAD_DIM_QK} (last dim), got {d} in shape {list(q.shape)}")
    if s_q < 1 or h_q < 1:
        raise ValueError(f"q: expected s_q >= 1 and h_q >= 1, got shape {list(q.shape)}")
    V.check_inner_contiguous("q", q)
    _check_cache(k_cache)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral) or head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {HEAD_DIM_V}, got {head_dim_v!r}")
    V.check_dtype("block_table", block_table, torch.int32)
    V.check_rank("block_table", block_table, 2)
    V.check_shape("block_table", block_table, (b, None))
    V.check_contiguous("block_table", block_table)
    V.check_dtype("cache_seqlens", cache_seqlens, torch.int32)
    V.check_shape("cache_seqlens", cache_seqlens, (b,))
    V.check_contiguous("cache_seqlens", cache_seqlens)
    V.check_dtype("tile_scheduler_metadata", meta, torch.int32)
    V.check_shape("tile_scheduler_metadata", meta, (None, RM.METADATA_SIZE))
    if meta.shape[0] < 1:
        raise ValueError("tile_scheduler_metadata: expected at least one row, got shape [0, 8]")
    V.check_contiguous("tile_scheduler_metadata", meta)
    V.check_dtype("num_splits", num_splits, torch.int32)
    V.check_shape("num_splits", num_splits, (b + 1,))
    V.check_contiguous("num_splits", num_splits)
    if softmax_scale is None:
        softmax_scale = RM.default_softmax_scale()
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: expected None or a positive finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")

    if out is None:
        out = torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=torch.bfloat16, device=q.device)
    else:
        out = V.as_tensor("out", out)
        V.check_dtype("out", out, torch.bfloat16)
        V.check_shape("out", out, (b, s_q, h_q, HEAD_DIM_V))
        V.check_inner_contiguous("out", out)
    if softmax_lse is None:
        softmax_lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    else:
        softmax_lse = V.as_tensor("softmax_lse", softmax_lse)
        V.check_dtype("softmax_lse", softmax_lse, torch.float32)
        V.check_shape("softmax_lse", softmax_lse, (b, h_q, s_q))
    dev = V.check_same_device(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                              tile_scheduler_metadata=meta, num_splits=num_splits, out=out,
                              softmax_lse=softmax_lse)
    _check_values_on_host(block_table, cache_seqlens, k_cache.shape[0])
    backend = resolve("flash_mla_with_kvcache", backend, dev, MLA_IMPLS["flash_mla_with_kvcache"])
    if backend in ("cuda", "emu"):
        from .cuda import mla as CM
        CM.check_supported(q, k_cache, head_dim_v)
    torch.ops.pykernels.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, meta, num_splits,
                                               out, softmax_lse, HEAD_DIM_V, float(softmax_scale),
                                               causal, backend)
    return out, softmax_lse


def decode_cost(batch: int, s_q: int, h_q: int, seqlen: int, fp8_cache: bool = False) -> dict:
    """Performance model of one decode call with every sequence `seqlen` tokens long.

    flops: 2 * (576 + 512) per (query row, key) - QK^T over 576 columns and P.V over
    512 - counting every key for every row (FlashMLA's convention; causal masking of the
    s_q new tokens removes a negligible triangle). bytes: the KV cache read once (576
    bf16 or 656 FP8-layout bytes per token; the s_q*h_q rows of a sequence share it),
    q read and out + lse written once; the split-KV partials are not counted.
    """
    rows = batch * s_q * h_q
    tokens = batch * seqlen
    flops = 2 * (HEAD_DIM_QK + HEAD_DIM_V) * rows * seqlen
    kv = tokens * (FP8_BYTES_PER_TOKEN if fp8_cache else 2 * HEAD_DIM_QK)
    io = rows * (2 * HEAD_DIM_QK + 2 * HEAD_DIM_V + 4)
    return dict(flops=flops, bytes=kv + io, intensity=flops / (kv + io))
