"""DeepGEMM's `deep_gemm.utils` names, on pykernels' own implementations.

`import pykernels as deep_gemm` then `deep_gemm.utils.per_token_cast_to_fp8(x, use_ue8m0=False)`
runs pykernels' quantizer; what differs from DeepGEMM is listed in docs/compat.md. Every
name here except per_channel_cast_to_fp8 and set_mk_alignment_for_contiguous_layout is a
re-export.
"""
from .gemm import CONTIGUOUS_ALIGNMENT, get_m_alignment_for_contiguous_layout, get_mk_alignment_for_contiguous_layout
from .metrics import calc_diff
from .quant import (ceil_to_ue8m0, check_cast_keywords, get_col_major_tma_aligned_tensor,
                    get_mn_major_tma_aligned_tensor, get_tma_aligned_size, per_block_cast_to_fp8, per_token_cast_to_fp8)
from .runtime import validate as V
from .runtime.arrays import dlpack_io
from .runtime.hardware import SCALE_BLOCK
from .runtime.hardware import cdiv as ceil_div
from .runtime.hardware import round_up as align

__all__ = ["align", "calc_diff", "ceil_div", "ceil_to_ue8m0", "get_col_major_tma_aligned_tensor",
           "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
           "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size", "per_block_cast_to_fp8",
           "per_channel_cast_to_fp8", "per_token_cast_to_fp8", "set_mk_alignment_for_contiguous_layout"]


@dlpack_io
def per_channel_cast_to_fp8(x, use_ue8m0: bool = False, gran_k: int = SCALE_BLOCK, *, backend: str = "auto"):
    """Quantize each 128x1 group of each column (DeepGEMM's per-channel cast): the per-token
    cast of x^T, transposed back.

    x: [m, n] float32/bfloat16/float16. Returns (q float8_e4m3fn [m, n] contiguous,
    sf float32 [ceil(m/128), n]) with the per-token cast's scale and rounding rules.
    use_ue8m0, gran_k: DeepGEMM's keywords, as in per_token_cast_to_fp8.
    """
    check_cast_keywords(use_ue8m0, gran_k)
    x = V.as_tensor("x", x)
    V.check_rank("x", x, 2)
    q_t, sf_t = per_token_cast_to_fp8(x.t().contiguous(), use_ue8m0, backend=backend)
    return q_t.t().contiguous(), sf_t.t().contiguous()


def set_mk_alignment_for_contiguous_layout(value: int) -> None:
    """DeepGEMM lets the contiguous layout's segment alignment be changed; pykernels' kernels
    are compiled for one tile height, so only CONTIGUOUS_ALIGNMENT (128) is accepted."""
    if isinstance(value, bool) or value != CONTIGUOUS_ALIGNMENT:
        raise ValueError(f"value: expected {CONTIGUOUS_ALIGNMENT} (other alignments are not supported yet), "
                         f"got {value!r}")

