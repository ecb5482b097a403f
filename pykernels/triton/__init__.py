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

__all__ = ["INTERPRETED", "GEMM_REQUIREMENTS", "check_gemm_shape", "fp8_gemm_nt",
           "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "per_token_cast_to_fp8", "per_block_cast_to_fp8"]
