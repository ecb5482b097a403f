"""FlashMLA's public interface on pykernels: `import pykernels.compat.flash_mla as flash_mla`.

The names of FlashMLA's `flash_mla/__init__.py` (v1.0) with its parameter names, order,
defaults, return values and semantics:

- get_mla_metadata(*args, **kwargs) -> (FlashMLASchedMeta(), None) whatever it is given, as
  FlashMLA's current form: the schedule is built by the first flash_mla_with_kvcache call that
  uses it (pykernels.mla.MlaSchedule; it is rebuilt when cache_seqlens change, where FlashMLA
  requires them unchanged);
- flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
  num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
  attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
  extra_topk_length=None) -> (out, softmax_lse): dense decode (bf16 or FP8 cache) and sparse
  decode (indices, FP8 cache); topk_length is positional here as in FlashMLA (keyword-only in
  pykernels.flash_mla_with_kvcache); the metadata pair of FlashMLA's older get_mla_metadata
  forms (pykernels.get_mla_metadata) is accepted too;
- flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None,
  indexer_topk=0) -> (out, max_logits, lse).

The FP8 cache (uint8 [num_blocks, 64, 1, 656]) is FlashMLA's layout, its scales powers of two
(quantize_kv_cache_fp8 here, FlashMLA's rule). Not implemented (NotImplementedError naming the
function): the extra KV cache of the sparse decode, indexer_topk > 0, the dense prefill
(flash_attn_varlen_*: SM100 in FlashMLA) and the fused_norm_rope_attn_rope_cast kernels.
Each function also takes a keyword-only `backend`; arrays of any DLPack producer are accepted.
"""
import functools
import sys
import types

import torch

from .. import dsa as PD
from .. import mla as PM
from ..mla_schedule import MlaSchedule
from ..runtime.arrays import dlpack_io
from . import _unimplemented

# FlashMLA's schedule object: built on first use from the call's shapes and cache_seqlens
FlashMLASchedMeta = MlaSchedule
quantize_kv_cache_fp8 = PM.quantize_kv_cache_fp8


_not_implemented = functools.partial(_unimplemented.not_implemented, "flash_mla")   # (name, what): raises
_missing = functools.partial(_unimplemented.missing, "flash_mla", "FlashMLA")         # (name, why): a raising stand-in


def get_mla_metadata(*args, **kwargs):
    """(FlashMLASchedMeta(), None): an empty schedule, built by the first flash_mla_with_kvcache
    call it is passed to. The arguments (FlashMLA's older forms) are accepted and not read."""
    return FlashMLASchedMeta(), None


@dlpack_io
def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata,
                           num_splits=None, softmax_scale: float = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices=None, attn_sink=None, extra_k_cache=None,
                           extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None, *,
                           backend: str = "auto"):
    """MLA decode over a paged latent cache -> (out bf16 [b, s_q, h_q, 512], softmax_lse float32 [b, h_q, s_q]).

    q bf16 [b, s_q, h_q, 576]; k_cache bf16 [num_blocks, 64, h_kv, 576] or the FP8 layout uint8
    [num_blocks, 64, 1, 656]; block_table int32 [b, max_blocks] and cache_seqlens int32 [b]
    (None allowed with indices); head_dim_v 512; tile_scheduler_metadata from get_mla_metadata();
    softmax_scale (default 576 ** -0.5); causal (dense only). Sparse decode: indices int32
    [b, s_q, topk] (block * 64 + offset, -1 unused) with is_fp8_kvcache=True; attn_sink float32
    [h_q] scales out by exp(lse) / (exp(lse) + exp(attn_sink)) (lse unchanged); topk_length int32
    [b]. Not implemented: extra_k_cache / extra_indices_in_kvcache / extra_topk_length, a float16 q.
    """
    for name, given in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length)):
        if given is not None:
            _not_implemented("flash_mla_with_kvcache", f"{name} (a second KV cache)")
    if isinstance(q, torch.Tensor) and q.dtype == torch.float16:
        _not_implemented("flash_mla_with_kvcache", "a float16 q (bfloat16 only)")
    return PM.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                     num_splits, softmax_scale, causal, is_fp8_kvcache, indices, attn_sink,
                                     topk_length=topk_length, backend=backend)


@dlpack_io
def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None, topk_length=None,
                         indexer_topk: int = 0, *, backend: str = "auto"):
    """Sparse MLA prefill -> (out bf16 [s_q, h_q, d_v], max_logits float32 [s_q, h_q], lse float32 [s_q, h_q]).

    q bf16 [s_q, h_q, d_qk]; kv bf16 [s_kv, 1, d_qk]; indices int32 [s_q, 1, topk] (-1 or >= s_kv:
    unused); attn_sink float32 [h_q]; topk_length int32 [s_q]. indexer_topk > 0 (the extra
    lse over the indexer's entries) is not implemented.
    """
    if indexer_topk != 0:
        _not_implemented("flash_mla_sparse_fwd", f"indexer_topk={indexer_topk!r}")
    return PD.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, backend=backend)


_PREFILL = "the dense MHA prefill (FlashMLA's SM100 kernel)"
flash_attn_varlen_func = _missing("flash_attn_varlen_func", _PREFILL)
flash_attn_varlen_qkvpacked_func = _missing("flash_attn_varlen_qkvpacked_func", _PREFILL)
flash_attn_varlen_kvpacked_func = _missing("flash_attn_varlen_kvpacked_func", _PREFILL)


def _fused_module() -> types.ModuleType:
    """flash_mla.fused_norm_rope_attn_rope_cast: FlashMLA's fused Q norm + RoPE + sparse attention
    + output cast (SM100 in FlashMLA); every function raises NotImplementedError."""
    name = f"{__name__}.fused_norm_rope_attn_rope_cast"
    module = types.ModuleType(name, _fused_module.__doc__)
    why = "the fused norm / RoPE / sparse attention / FP8 cast kernels (SM100 in FlashMLA)"
    for fn in ("prefill", "decode", "permute_q_b_proj", "permute_wv_proj"):
        setattr(module, fn, _missing(f"fused_norm_rope_attn_rope_cast.{fn}", why))
    sys.modules[name] = module
    return module


fused_norm_rope_attn_rope_cast = _fused_module()

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_mla_sparse_fwd", "fused_norm_rope_attn_rope_cast"]
