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
import torch

from .mla_schedule import MlaSchedule, default_num_sm_parts  # noqa: F401  (public)
from .ops import mla as OM
from .ops.custom import call
from .reference import mla as RM
from .runtime import validate as V

HEAD_DIM_QK = RM.HEAD_DIM_QK
HEAD_DIM_V = RM.HEAD_DIM_V
PAGE_BLOCK_SIZE = RM.PAGE_BLOCK_SIZE
FP8_BYTES_PER_TOKEN = RM.FP8_BYTES_PER_TOKEN


def get_mla_metadata(cache_seqlens=None, num_q_tokens_per_head_k: int = None, num_heads_k: int = None,
                     num_sm_parts: int = None, *, backend: str = "auto"):
    """Split-KV schedule for flash_mla_with_kvcache, in FlashMLA's two forms.

    get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k[, num_sm_parts]):
    cache_seqlens int32 [b]; num_q_tokens_per_head_k: s_q * h_q // h_kv; num_heads_k:
    h_kv; num_sm_parts: SM partitions (default: SM count / (h_kv * ceil(rows / 64))).
    Returns (tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])
    on cache_seqlens' device. Row p of the metadata: [first_batch, first_block,
    last_batch, last_block_end, first_split, num_pieces, first_seqlen, last_seqlen];
    num_splits[i] is the index of sequence i's first split, num_splits[b] the total
    (docs/mla.md). The decode checks the metadata against its cache_seqlens.

    get_mla_metadata(): returns (MlaSchedule(), None); pass both to flash_mla_with_kvcache,
    which builds the metadata from its cache_seqlens on first use and rebuilds it when
    they change (one schedule per decode step, shared by the layers).
    """
    if cache_seqlens is None and num_q_tokens_per_head_k is None and num_heads_k is None:
        return MlaSchedule(), None
    seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    rows = V.check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, lo=1)
    h_kv = V.check_int("num_heads_k", num_heads_k, lo=1)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(seqlens.device, rows, h_kv)
    parts = V.check_int("num_sm_parts", num_sm_parts, lo=1, hi=OM.MAX_SM_PARTS)
    return call(torch.ops.pykernels.get_mla_metadata, OM.get_mla_metadata_body, seqlens, parts, backend)


def quantize_kv_cache_fp8(k_cache) -> torch.Tensor:
    """bf16 [num_blocks, 64, h_kv, 576] -> uint8 [num_blocks, 64, h_kv, 656]: per token
    512 e4m3 latent values, 4 float32 scales (one per 128 columns), 64 bf16 RoPE columns."""
    k_cache = V.as_tensor("k_cache", k_cache)
    V.check_dtype("k_cache", k_cache, torch.bfloat16)
    V.check_rank("k_cache", k_cache, 4)
    V.check_shape("k_cache", k_cache, (None, PAGE_BLOCK_SIZE, None, HEAD_DIM_QK))
    return RM.quantize_kv_cache_fp8(k_cache)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata, num_splits, softmax_scale: float = None,
                           causal: bool = False, *, backend: str = "auto", out=None, softmax_lse=None):
    """MLA decode attention over a paged latent KV cache.

    q bf16 [b, s_q, h_q, 576] (unit stride in the last dim); k_cache bf16
    [num_blocks, 64, 1, 576] or FP8 uint8/float8_e4m3fn [num_blocks, 64, 1, 656]
    (contiguous); block_table int32 [b, max_blocks] (contiguous); cache_seqlens int32 [b];
    head_dim_v 512; tile_scheduler_metadata, num_splits from get_mla_metadata for these
    cache_seqlens (or the (MlaSchedule, None) pair of get_mla_metadata()); softmax_scale
    (default 576**-0.5); causal: new token i of s_q sees
    keys [0, seqlen - s_q + i]. out (bf16 [b, s_q, h_q, 512]) and softmax_lse (float32
    [b, h_q, s_q]) are written in place when given. Rows that see no key: out 0, lse +inf.
    Returns (out, softmax_lse).
    """
    q, out, softmax_lse = OM.outputs(q, out, softmax_lse)
    if isinstance(tile_scheduler_metadata, MlaSchedule):
        if num_splits is not None:
            raise ValueError(f"num_splits: expected None with an MlaSchedule (get_mla_metadata() returns "
                             f"(schedule, None)), got {type(num_splits).__name__}")
        seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
        rows = q.shape[1] * q.shape[2]

        def build(lens, parts):
            return call(torch.ops.pykernels.get_mla_metadata, OM.get_mla_metadata_body, lens, parts, "auto")
        tile_scheduler_metadata, num_splits = tile_scheduler_metadata.resolve(
            seqlens, rows, 1, default_num_sm_parts(seqlens.device, rows, 1), build)
    args = [V.as_tensor(name, t) for name, t in (("k_cache", k_cache), ("block_table", block_table),
                                                  ("cache_seqlens", cache_seqlens),
                                                  ("tile_scheduler_metadata", tile_scheduler_metadata),
                                                  ("num_splits", num_splits))]
    softmax_scale = OM.check_scalars(head_dim_v, softmax_scale, causal)
    call(torch.ops.pykernels.flash_mla_with_kvcache, OM.flash_mla_with_kvcache_body, q, *args, out, softmax_lse,
         int(head_dim_v), softmax_scale, causal, backend)
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
