"""Triton versions of pykernels operations.

Side effect on import: on a machine without a CUDA device, TRITON_INTERPRET=1 is set
(unless already set) before any kernel is defined, so the kernels run on CPU tensors
through Triton's interpreter. Set TRITON_INTERPRET=0 beforehand to opt out.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from .gemm import (GEMM_REQUIREMENTS, check_gemm_shape, fp8_gemm_nt,  # noqa: E402
                   m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from .quant import per_block_cast_to_fp8, per_token_cast_to_fp8  # noqa: E402

__all__ = ["INTERPRETED", "GEMM_REQUIREMENTS", "check_gemm_shape", "fp8_gemm_nt",
           "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "per_token_cast_to_fp8", "per_block_cast_to_fp8"]
