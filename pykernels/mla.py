"""MLA decode attention with FlashMLA's call forms (see docs/mla.md).

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      tile_scheduler_metadata, num_splits, causal=True)

q bf16 [b, s_q, h_q, 576]; k_cache bf16 [num_blocks, 64, h_kv, 576] (pages of 64 tokens,
the first 512 columns double as V; h_kv divides h_q, query head h reads KV head
h // (h_q / h_kv)) or the FP8 layout uint8 [num_blocks, 64, 1, 656] made by
quantize_kv_cache_fp8; block_table int32 [b, max_blocks]; cache_seqlens int32
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
from .runtime.arrays import dlpack_io

HEAD_DIM_QK = RM.HEAD_DIM_QK
HEAD_DIM_V = RM.HEAD_DIM_V
PAGE_BLOCK_SIZE = RM.PAGE_BLOCK_SIZE
FP8_BYTES_PER_TOKEN = RM.FP8_BYTES_PER_TOKEN


@dlpack_io
def get_mla_metadata(cache_seqlens=None, num_q_tokens_per_head_k: int = None, num_heads_k: int = None,
                     num_sm_parts: int = None, is_fp8_kvcache: bool = None, topk: int = None, *,
                     num_heads_q: int = None, backend: str = "auto"):
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

    FlashMLA's newer form get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, h_q,
    is_fp8_kvcache, topk): when is_fp8_kvcache or topk is given, the fourth argument is
    num_heads_q (FlashMLA's meaning; accepted, not needed) and num_sm_parts takes its default;
    with topk (the sparse decode) every sequence is scheduled as topk tokens (docs/dsa.md).
    """
    if cache_seqlens is None and num_q_tokens_per_head_k is None and num_heads_k is None:
        return MlaSchedule(), None
    seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    if is_fp8_kvcache is not None or topk is not None:
        seqlens, num_sm_parts = _flashmla_metadata_form(seqlens, num_sm_parts, is_fp8_kvcache, topk, num_heads_q)
    rows = V.check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, lo=1)
    h_kv = V.check_int("num_heads_k", num_heads_k, lo=1)
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(seqlens.device, rows, h_kv)
    parts = V.check_int("num_sm_parts", num_sm_parts, lo=1, hi=OM.MAX_SM_PARTS)
    return call(torch.ops.pykernels.get_mla_metadata, OM.get_mla_metadata_body, seqlens, parts, backend)


def _flashmla_metadata_form(seqlens, fourth, is_fp8_kvcache, topk, num_heads_q):
    """FlashMLA's (num_heads_q, is_fp8_kvcache, topk) arguments checked -> (the seqlens to
    schedule, num_sm_parts None). The fourth positional argument is num_heads_q in this form."""
    if num_heads_q is not None and fourth is not None:
        raise ValueError(f"num_heads_q: given twice (as the fourth argument, {fourth!r}, and by keyword)")
    heads = fourth if num_heads_q is None else num_heads_q
    if heads is not None:
        V.check_int("num_heads_q", heads, lo=1)
    if is_fp8_kvcache is not None and not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache: expected a bool, got {type(is_fp8_kvcache).__name__}")
    if topk is None:
        return seqlens, None
    topk = V.check_int("topk", topk, lo=1, hi=OM.MAX_SEQLEN)
    V.check_dtype("cache_seqlens", seqlens, torch.int32)
    V.check_rank("cache_seqlens", seqlens, 1)
    return torch.full_like(seqlens, topk), None


@dlpack_io
def quantize_kv_cache_fp8(k_cache) -> torch.Tensor:
    """bf16 [num_blocks, 64, h_kv, 576] -> uint8 [num_blocks, 64, h_kv, 656]: per token
    512 e4m3 latent values, 4 float32 scales (one per 128 columns), 64 bf16 RoPE columns."""
    k_cache = V.as_tensor("k_cache", k_cache)
    V.check_dtype("k_cache", k_cache, torch.bfloat16)
    V.check_rank("k_cache", k_cache, 4)
    V.check_shape("k_cache", k_cache, (None, PAGE_BLOCK_SIZE, None, HEAD_DIM_QK))
    return RM.quantize_kv_cache_fp8(k_cache)


@dlpack_io
def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata, num_splits, softmax_scale: float = None,
                           causal: bool = False, is_fp8_kvcache: bool = False, indices=None, attn_sink=None, *,
                           topk_length=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                           extra_topk_length=None, backend: str = "auto", out=None, softmax_lse=None):
    """MLA decode attention over a paged latent KV cache.

    q bf16 [b, s_q, h_q, 576] (unit stride in the last dim); k_cache bf16
    [num_blocks, 64, h_kv, 576] (h_kv divides h_q; query head h reads KV head
    h // (h_q / h_kv), FlashMLA's grouping) or FP8 uint8/float8_e4m3fn [num_blocks, 64, 1, 656]
    (one KV head, as FlashMLA's FP8 cache; contiguous); block_table int32 [b, max_blocks]
    (contiguous); cache_seqlens int32 [b];
    head_dim_v 512; tile_scheduler_metadata, num_splits from get_mla_metadata for these
    cache_seqlens (or the (MlaSchedule, None) pair of get_mla_metadata()); softmax_scale
    (default 576**-0.5); causal: new token i of s_q sees
    keys [0, seqlen - s_q + i]. out (bf16 [b, s_q, h_q, 512]) and softmax_lse (float32
    [b, h_q, s_q]) are written in place when given. Rows that see no key: out 0, lse +inf.
    Returns (out, softmax_lse).

    Sparse decode (DeepSeek-V3.2, FlashMLA's form; docs/dsa.md): with indices int32
    [b, s_q, topk] (cache token rows block * 64 + offset, -1 unused), is_fp8_kvcache=True
    and an FP8 k_cache, causal False; block_table / cache_seqlens are not read (None
    allowed); attn_sink float32 [h_q] (added to the softmax denominator) and topk_length
    int32 [b] optional; the schedule: None, get_mla_metadata(), or get_mla_metadata's
    sparse form. extra_k_cache / extra_indices_in_kvcache / extra_topk_length are not
    supported yet. is_fp8_kvcache=True without indices asks the dense path to check that
    k_cache is the FP8 layout.
    """
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"is_fp8_kvcache: expected a bool, got {type(is_fp8_kvcache).__name__}")
    for name, given in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length)):
        if given is not None:
            raise ValueError(f"{name}: expected None (a second KV cache is not supported yet), got "
                             f"{type(given).__name__}")
    if indices is not None or attn_sink is not None or topk_length is not None:
        return _sparse_decode(q, k_cache, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal,
                              is_fp8_kvcache, indices, attn_sink, topk_length, backend, out, softmax_lse)
    if is_fp8_kvcache and not RM.is_fp8_cache(V.as_tensor("k_cache", k_cache)):
        raise ValueError(f"k_cache: expected the FP8 layout (uint8 / float8_e4m3fn [num_blocks, 64, 1, "
                         f"{FP8_BYTES_PER_TOKEN}]) with is_fp8_kvcache=True, got "
                         f"{str(V.as_tensor('k_cache', k_cache).dtype).replace('torch.', '')} "
                         f"{list(V.as_tensor('k_cache', k_cache).shape)}")
    q, out, softmax_lse = OM.outputs(q, out, softmax_lse)
    if isinstance(tile_scheduler_metadata, MlaSchedule):
        if num_splits is not None:
            raise ValueError(f"num_splits: expected None with an MlaSchedule (get_mla_metadata() returns "
                             f"(schedule, None)), got {type(num_splits).__name__}")
        seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
        h_kv = _heads_k(V.as_tensor("k_cache", k_cache))
        rows = max(q.shape[1] * q.shape[2] // h_kv, 1)     # query rows per KV head

        def build(lens, parts):
            return call(torch.ops.pykernels.get_mla_metadata, OM.get_mla_metadata_body, lens, parts, "auto")
        tile_scheduler_metadata, num_splits = tile_scheduler_metadata.resolve(
            seqlens, rows, h_kv, default_num_sm_parts(seqlens.device, rows, h_kv), build)
    args = [V.as_tensor(name, t) for name, t in (("k_cache", k_cache), ("block_table", block_table),
                                                  ("cache_seqlens", cache_seqlens),
                                                  ("tile_scheduler_metadata", tile_scheduler_metadata),
                                                  ("num_splits", num_splits))]
    softmax_scale = OM.check_scalars(head_dim_v, softmax_scale, causal)
    call(torch.ops.pykernels.flash_mla_with_kvcache, OM.flash_mla_with_kvcache_body, q, *args, out, softmax_lse,
         int(head_dim_v), softmax_scale, causal, backend)
    return out, softmax_lse


def _heads_k(k_cache) -> int:
    """h_kv of a cache for sizing the schedule (1 where the shape is invalid: the decode's
    validation then names the error)."""
    return max(int(k_cache.shape[2]), 1) if k_cache.dim() == 4 else 1


def _sparse_decode(q, k_cache, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale, causal,
                   is_fp8_kvcache, indices, attn_sink, topk_length, backend, out, softmax_lse):
    """flash_mla_with_kvcache's sparse form -> pykernels.dsa.flash_mla_sparse_decode."""
    from . import dsa
    if indices is None:
        raise ValueError("indices: expected int32 [b, s_q, topk] with attn_sink / topk_length (the sparse decode), "
                         "got None")
    if not is_fp8_kvcache:
        raise ValueError("is_fp8_kvcache: expected True with indices (the sparse decode reads the FP8 cache), "
                         "got False")
    if causal is not False:
        raise ValueError(f"causal: expected False with indices (the indices choose the keys), got {causal!r}")
    if isinstance(tile_scheduler_metadata, MlaSchedule):
        if num_splits is not None:
            raise ValueError(f"num_splits: expected None with an MlaSchedule (get_mla_metadata() returns "
                             f"(schedule, None)), got {type(num_splits).__name__}")
        tile_scheduler_metadata = None      # the sparse reference takes no schedule; its kernels will build theirs
    return dsa.flash_mla_sparse_decode(q, k_cache, indices, softmax_scale, attn_sink, topk_length,
                                       tile_scheduler_metadata, num_splits, head_dim_v, backend=backend, out=out,
                                       softmax_lse=softmax_lse)


def decode_cost(batch: int, s_q: int, h_q: int, seqlen: int, fp8_cache: bool = False, h_kv: int = 1) -> dict:
    """Performance model of one decode call with every sequence `seqlen` tokens long.

    flops: 2 * (576 + 512) per (query row, key) - QK^T over 576 columns and P.V over
    512 - counting every key for every row (FlashMLA's convention; causal masking of the
    s_q new tokens removes a negligible triangle). bytes: the KV cache read once (576
    bf16 or 656 FP8-layout bytes per token and KV head; the s_q*h_q / h_kv rows of a KV
    head share it),
    q read and out + lse written once; the split-KV partials are not counted.
    """
    rows = batch * s_q * h_q
    tokens = batch * seqlen
    flops = 2 * (HEAD_DIM_QK + HEAD_DIM_V) * rows * seqlen
    kv = tokens * h_kv * (FP8_BYTES_PER_TOKEN if fp8_cache else 2 * HEAD_DIM_QK)
    io = rows * (2 * HEAD_DIM_QK + 2 * HEAD_DIM_V + 4)
    return dict(flops=flops, bytes=kv + io, intensity=flops / (kv + io))
