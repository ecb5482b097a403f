"""Triton versions of pykernels operations.

`import pykernels` sets TRITON_INTERPRET=1 (unless already set) on a machine without a
CUDA device, so these kernels run on CPU tensors through Triton's interpreter. That
must happen before triton.language is imported: import pykernels before triton.
"""
import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_interpreter_consistent():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if INTERPRETED and not isinstance(tl.standard.max, InterpretedFunction):
        raise ImportError(
            "pykernels.triton: TRITON_INTERPRET=1 but triton.language was imported before it "
            "was set, so Triton's interpreter cannot run; import pykernels (or set "
            "TRITON_INTERPRET=1) before importing triton")


_check_interpreter_consistent()

from .gemm import (GEMM_REQUIREMENTS, check_gemm_shape, fp8_gemm_nt,  # noqa: E402
                   m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from .quant import per_block_cast_to_fp8, per_token_cast_to_fp8  # noqa: E402
from . import mla  # noqa: E402
from .mla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402

__all__ = ["INTERPRETED", "GEMM_REQUIREMENTS", "check_gemm_shape", "fp8_gemm_nt",
           "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "per_token_cast_to_fp8", "per_block_cast_to_fp8",
           "mla", "get_mla_metadata", "flash_mla_with_kvcache"]

# expert-parallel local steps (used by pykernels.ep.Buffer(local_backend="triton"))
from . import ep  # noqa: E402
from .ep import combine_pack as ep_combine_pack, combine_reduce as ep_combine_reduce  # noqa: E402
from .ep import dispatch_layout as ep_dispatch_layout, permute as ep_permute  # noqa: E402
from .ep import send_layout as ep_send_layout, unpack_received as ep_unpack_received  # noqa: E402

__all__ += ["ep", "ep_dispatch_layout", "ep_send_layout", "ep_permute", "ep_unpack_received",
            "ep_combine_pack", "ep_combine_reduce"]
