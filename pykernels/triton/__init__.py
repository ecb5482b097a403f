"""Triton versions of pykernels operations.

Every kernel is decorated with `pykernels.triton.jit` (jit_dispatch.py): compiled on CUDA tensors,
run by Triton's interpreter on CPU tensors, whether or not triton was imported first and
without setting TRITON_INTERPRET, so the user's own Triton kernels run as they would.
"""
from typing import Optional

from .jit_dispatch import INTERPRETED, jit


def unavailable_reason(device) -> Optional[str]:
    """Why pykernels' Triton kernels cannot run on tensors of `device` (None: they can)."""
    if device.type == "cpu" and not INTERPRETED:
        return ("Triton runs CPU tensors through its interpreter, which pykernels uses only on a machine "
                "without a CUDA device or under TRITON_INTERPRET=1 (this process has a CUDA device)")
    return None


from .gemm import (GEMM_REQUIREMENTS, check_gemm_shape, fp8_gemm_nt,  # noqa: E402
                   m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from .bf16_gemm import bf16_gemm_nt  # noqa: E402
from .quant import per_block_cast_to_fp8, per_token_cast_to_fp8  # noqa: E402
from . import mla  # noqa: E402
from .mla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402

__all__ = ["INTERPRETED", "jit", "unavailable_reason", "GEMM_REQUIREMENTS", "check_gemm_shape", "fp8_gemm_nt",
           "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "bf16_gemm_nt",
           "per_token_cast_to_fp8", "per_block_cast_to_fp8",
           "mla", "get_mla_metadata", "flash_mla_with_kvcache"]

# expert-parallel local steps (used by pykernels.ep.Buffer(local_backend="triton"))
from . import ep  # noqa: E402
from .ep import combine_pack as ep_combine_pack, combine_reduce as ep_combine_reduce  # noqa: E402
from .ep import dispatch_layout as ep_dispatch_layout, permute as ep_permute  # noqa: E402
from .ep import send_layout as ep_send_layout, unpack_received as ep_unpack_received  # noqa: E402

__all__ += ["ep", "ep_dispatch_layout", "ep_send_layout", "ep_permute", "ep_unpack_received",
            "ep_combine_pack", "ep_combine_reduce"]
