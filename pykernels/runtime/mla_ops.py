"""torch.library custom ops for MLA decode (pykernels.mla), with fake implementations.

Same pattern as runtime/ops.py: the public functions validate and resolve the backend,
then call torch.ops.pykernels.<op>, which dispatches on the backend name through
MLA_IMPLS. The hand-written kernel (csrc/mla/decode.cu, host side pykernels/cuda/mla.py)
is "cuda" (GPU) and "emu" (its PTX on the CPU emulator); the scheduler has no CUDA kernel
("reference" / "triton").
"""
import torch

from ..reference import mla as RM


def _triton():
    from .. import triton as T  # imported lazily: sets TRITON_INTERPRET on CPU machines
    return T


def _cuda():
    from ..cuda import mla as CM  # imported lazily: loads the emulator's tensor-map support
    return CM


def _reference_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, out, lse,
                      head_dim_v, softmax_scale, causal):
    # The reference ignores the schedule (it is ground truth for any schedule).
    o, l = RM.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                     softmax_scale, causal)
    out.copy_(o)
    lse.copy_(l)


def _triton_decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, out, lse,
                   head_dim_v, softmax_scale, causal):
    _triton().mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, meta, num_splits,
                                         out, lse, head_dim_v, softmax_scale, causal)


# op name -> backend -> implementation.
MLA_IMPLS = {
    "get_mla_metadata": {
        "reference": lambda seqlens, parts: RM.get_mla_metadata(seqlens, parts),
        "triton": lambda seqlens, parts: _triton().mla.get_mla_metadata(seqlens, parts),
    },
    "flash_mla_with_kvcache": {
        "reference": _reference_decode,
        "triton": _triton_decode,
        "cuda": lambda *a: _cuda().flash_mla_with_kvcache(*a, executor="cuda"),
        "emu": lambda *a: _cuda().flash_mla_with_kvcache(*a, executor="emu"),
    },
}


@torch.library.custom_op("pykernels::get_mla_metadata", mutates_args=())
def get_mla_metadata_op(cache_seqlens: torch.Tensor, num_sm_parts: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return MLA_IMPLS["get_mla_metadata"][backend](cache_seqlens, num_sm_parts)


@get_mla_metadata_op.register_fake
def _(cache_seqlens, num_sm_parts, backend):
    b = cache_seqlens.shape[0]
    return (cache_seqlens.new_empty((num_sm_parts, RM.METADATA_SIZE), dtype=torch.int32),
            cache_seqlens.new_empty((b + 1,), dtype=torch.int32))


@torch.library.custom_op("pykernels::flash_mla_with_kvcache", mutates_args=("out", "lse"))
def flash_mla_with_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                              cache_seqlens: torch.Tensor, tile_scheduler_metadata: torch.Tensor,
                              num_splits: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              head_dim_v: int, softmax_scale: float, causal: bool, backend: str) -> None:
    MLA_IMPLS["flash_mla_with_kvcache"][backend](q, k_cache, block_table, cache_seqlens,
                                                 tile_scheduler_metadata, num_splits, out, lse,
                                                 head_dim_v, softmax_scale, causal)


@flash_mla_with_kvcache_op.register_fake
def _(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
      head_dim_v, softmax_scale, causal, backend):
    return None
