"""DeepSeek Sparse Attention (DeepSeek-V3.2) with DeepGEMM's and FlashMLA's call forms
(docs/dsa.md). One decode step:

    meta = get_paged_mqa_logits_metadata(context_lens, 64, num_sms)
    logits = fp8_paged_mqa_logits(q_idx, index_cache, weights, context_lens, block_table, meta, max_len)
    indices = paged_topk_indices(logits, 2048, context_lens, block_table)
    out, lse = pykernels.flash_mla_with_kvcache(q, k_cache_fp8, None, None, 512, None, None,
                                                is_fp8_kvcache=True, indices=indices)

Backends: "reference" (PyTorch, float32) only so far; Triton and CUDA versions are not yet
written. Index values (windows, context lengths, block tables, indices) are checked on the
host for CPU tensors (and by the reference backend for GPU tensors).
"""
import torch

from .ops import dsa as OD
from .ops.custom import call
from .reference import dsa as RD
from .runtime import validate as V
from .runtime.arrays import dlpack_io


def _tensors(**named):
    """The arguments as torch tensors (DLPack tensors imported), None kept: the custom ops
    take torch tensors."""
    return [None if t is None else V.as_tensor(name, t) for name, t in named.items()]


@dlpack_io
def fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits: bool = True, *,
                   backend: str = "auto", out=None) -> torch.Tensor:
    """Indexer logits for prefill (DeepGEMM's fp8_mqa_logits).

    q float8_e4m3fn [M, H, D] (contiguous; D 32, 64 or 128; H 1..128); kv = (k float8_e4m3fn
    [N, D], k_scales float32 [N]); weights float32 [M, H]; cu_seqlen_ks / cu_seqlen_ke int32
    [M]: query i sees keys [ks[i], ke[i]) (0 <= ks <= ke <= N).
    Returns logits float32 [M, N] (written into out when given):
    logits[i, j] = k_scales[j] * sum_h weights[i, h] * relu(q[i, h] . k[j]) inside the window,
    -inf outside (with clean_logits=False a kernel may leave those unwritten; the reference
    writes -inf).
    """
    k, k_scales = OD.unpack_kv(kv)
    out = OD.new_logits(q, k) if out is None else out
    call(torch.ops.pykernels.fp8_mqa_logits, OD.fp8_mqa_logits_body, *_tensors(
        q=q, k=k, k_scales=k_scales, weights=weights, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke, out=out),
        clean_logits, backend)
    return out


@dlpack_io
def get_paged_mqa_logits_metadata(context_lens, block_kv: int, num_sms: int, *, backend: str = "auto"):
    """Split schedule for fp8_paged_mqa_logits: context_lens int32 [b] or [b, next_n]; block_kv
    the key cache's page size; num_sms the partitions -> int32 [num_sms + 1, 2] on
    context_lens' device (row p: the first sequence and split of partition p; docs/dsa.md)."""
    return call(torch.ops.pykernels.get_paged_mqa_logits_metadata, OD.get_paged_mqa_logits_metadata_body,
                V.as_tensor("context_lens", context_lens), block_kv, num_sms, backend)


@dlpack_io
def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_metadata,
                         max_context_len: int, clean_logits: bool = True, *, backend: str = "auto",
                         out=None) -> torch.Tensor:
    """Indexer logits for decode over a paged FP8 key cache (DeepGEMM's fp8_paged_mqa_logits).

    q float8_e4m3fn [b, next_n, H, D]; kv_cache uint8 [num_blocks, block_kv, 1, D + 4] (per
    page: block_kv rows of D e4m3 values, then block_kv float32 scales; quantize_indexer_k_cache
    makes it); weights float32 [b * next_n, H]; context_lens int32 [b] (row j of sequence i sees
    positions [0, context_lens[i] - next_n + j]) or [b, next_n] (row (i, j) sees
    [0, context_lens[i, j])); block_table int32 [b, max_blocks]; schedule_metadata from
    get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms).
    Returns logits float32 [b * next_n, max_context_len] (-inf outside each row's window).
    """
    out = OD.new_paged_logits(q, max_context_len) if out is None else out
    call(torch.ops.pykernels.fp8_paged_mqa_logits, OD.fp8_paged_mqa_logits_body, *_tensors(
        q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table,
        schedule_metadata=schedule_metadata, out=out), max_context_len, clean_logits, backend)
    return out


@dlpack_io
def topk_indices(logits, topk: int, cu_seqlen_ks, cu_seqlen_ke, *, backend: str = "auto", out=None):
    """Top-k of prefill logits: logits float32 [M, N], windows [ks, ke) int32 [M] -> int32
    [M, topk] key positions, the largest logit first (ties: lower position first), -1 in the
    slots past the window's length. Only the window is read."""
    out = OD.new_topk_out(logits, topk) if out is None else out
    logits, ks, ke = _tensors(logits=logits, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke)
    call(torch.ops.pykernels.topk_indices, OD.topk_indices_body, logits, ks, ke, topk, V.as_tensor("out", out),
         backend)
    return out


@dlpack_io
def paged_topk_indices(logits, topk: int, context_lens, block_table, *, backend: str = "auto", out=None):
    """Top-k of decode logits into the sparse decode's indices: logits float32 [b * next_n, L]
    (fp8_paged_mqa_logits' rows and windows), context_lens as there, block_table int32
    [b, max_blocks] of the 64-token MLA cache -> int32 [b, next_n, topk]:
    block_table[i, p // 64] * 64 + p % 64 for the chosen positions p (largest logit first),
    -1 in the slots past the window's length."""
    out = OD.new_paged_topk_out(logits, block_table, topk) if out is None else out
    logits, lens, table = _tensors(logits=logits, context_lens=context_lens, block_table=block_table)
    call(torch.ops.pykernels.paged_topk_indices, OD.paged_topk_indices_body, logits, lens, table, topk,
         V.as_tensor("out", out), backend)
    return out


@dlpack_io
def flash_mla_sparse_decode(q, k_cache, indices, softmax_scale: float = None, attn_sink=None, topk_length=None,
                            tile_scheduler_metadata=None, num_splits=None, head_dim_v: int = 512, *,
                            backend: str = "auto", out=None, softmax_lse=None):
    """Sparse MLA decode (what flash_mla_with_kvcache(..., indices=...) calls).

    q bf16 [b, s_q, h_q, 576]; k_cache uint8 / float8_e4m3fn [num_blocks, 64, 1, 656] (the FP8
    layout, pykernels.mla.quantize_kv_cache_fp8); indices int32 [b, s_q, topk]: token rows
    block * 64 + offset, -1 unused; attn_sink float32 [h_q] or None; topk_length int32 [b] or
    None (slots at or past it are unused); tile_scheduler_metadata / num_splits: None or
    get_mla_metadata's sparse form. Returns (out bf16 [b, s_q, h_q, 512], softmax_lse float32
    [b, h_q, s_q]); a row with no used slot gets out 0 and lse +inf.
    """
    from .ops.mla import outputs
    q, out, softmax_lse = outputs(q, out, softmax_lse)
    scale = OD.check_softmax_scale(softmax_scale)
    call(torch.ops.pykernels.flash_mla_sparse_decode, OD.flash_mla_sparse_decode_body, *_tensors(
        q=q, k_cache=k_cache, indices=indices, attn_sink=attn_sink, topk_length=topk_length,
        tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, out=out, softmax_lse=softmax_lse),
        head_dim_v, scale, backend)
    return out, softmax_lse


@dlpack_io
def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None, topk_length=None, *,
                         backend: str = "auto", out=None, max_logits=None, lse=None):
    """Sparse MLA prefill (FlashMLA's flash_mla_sparse_fwd).

    q bf16 [s_q, h_q, d_qk] (d_qk 576 or 512); kv bf16 [s_kv, 1, d_qk]; indices int32
    [s_q, 1, topk] into kv's rows (an index outside [0, s_kv) is skipped); sm_scale > 0;
    d_v 512; attn_sink float32 [h_q] or None; topk_length int32 [s_q] or None.
    Returns (out bf16 [s_q, h_q, d_v], max_logits float32 [s_q, h_q], lse float32 [s_q, h_q]);
    a row with no used index: out 0, max_logits -inf, lse +inf.
    """
    out, max_logits, lse = OD.new_sparse_prefill_outputs(q, d_v, out, max_logits, lse)
    call(torch.ops.pykernels.flash_mla_sparse_fwd, OD.flash_mla_sparse_fwd_body, *_tensors(
        q=q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length, out=out, max_logits=max_logits,
        lse=lse), sm_scale, d_v, backend)
    return out, max_logits, lse


@dlpack_io
def indexer_k_cast_to_fp8(k):
    """Indexer keys float/bf16 [N, D] -> (float8_e4m3fn [N, D], float32 [N]): one scale per key,
    max(amax, 1e-4) / 448 (the kv pair fp8_mqa_logits takes)."""
    k = V.as_tensor("k", k)
    V.check_dtype("k", k, torch.bfloat16, torch.float16, torch.float32)
    V.check_rank("k", k, 2)
    return RD.indexer_k_cast_to_fp8(k)


@dlpack_io
def quantize_indexer_k_cache(k_cache) -> torch.Tensor:
    """Indexer key cache float/bf16 [num_blocks, block_kv, 1, D] -> uint8
    [num_blocks, block_kv, 1, D + 4] in DeepGEMM's paged layout (fp8_paged_mqa_logits' kv_cache)."""
    k_cache = V.as_tensor("k_cache", k_cache)
    V.check_dtype("k_cache", k_cache, torch.bfloat16, torch.float16, torch.float32)
    V.check_rank("k_cache", k_cache, 4)
    V.check_shape("k_cache", k_cache, (None, None, 1, None))
    return RD.quantize_indexer_k_cache(k_cache)
