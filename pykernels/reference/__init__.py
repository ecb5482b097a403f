"""Pure-PyTorch ground truth for every pykernels operation (float32 math)."""
from .constants import BLOCK, FP8_E4M3_MAX, FP8_SCALE_FLOOR
from .gemm import bf16_gemm_nt, fp8_gemm_nt, m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from . import mla
from .mla import dequantize_kv_cache_fp8, flash_mla_with_kvcache, get_mla_metadata, quantize_kv_cache_fp8
from .quant import dequantize_per_block, dequantize_per_token, per_block_cast_to_fp8, per_token_cast_to_fp8

__all__ = [
    "BLOCK", "FP8_E4M3_MAX", "FP8_SCALE_FLOOR",
    "per_token_cast_to_fp8", "per_block_cast_to_fp8", "dequantize_per_token", "dequantize_per_block",
    "fp8_gemm_nt", "bf16_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "mla", "flash_mla_with_kvcache", "get_mla_metadata", "quantize_kv_cache_fp8", "dequantize_kv_cache_fp8",
]
