"""pykernels: FP8 GEMM, MLA decode and expert-parallel kernels for NVIDIA Hopper.

Every operation has up to four backends, chosen through one registry
(pykernels.registry; docs/architecture.md): ``"cuda"`` (hand-written kernel on
the GPU), ``"emu"`` (the same compiled kernel on the CPU PTX emulator), ``"triton"``
(GPU, or Triton's interpreter on CPU tensors) and ``"reference"`` (PyTorch).
"""
__version__ = "0.1.0"


# Triton's mode is not chosen here: pykernels' Triton kernels run through the interpreter on
# CPU tensors by themselves (pykernels/triton/jit_dispatch.py), and the process's
# TRITON_INTERPRET stays the user's.

_LAZY = {
    # quantization
    "per_token_cast_to_fp8": "pykernels.quant",
    "per_block_cast_to_fp8": "pykernels.quant",
    "get_col_major_tma_aligned_tensor": "pykernels.quant",
    "get_mn_major_tma_aligned_tensor": "pykernels.quant",
    "get_tma_aligned_size": "pykernels.quant",
    "per_channel_cast_to_fp8": "pykernels.utils",
    "ceil_to_ue8m0": "pykernels.quant",
    # GEMM
    "fp8_gemm_nt": "pykernels.gemm",
    "m_grouped_fp8_gemm_nt_contiguous": "pykernels.gemm",
    "m_grouped_fp8_gemm_nt_masked": "pykernels.gemm",
    "bf16_gemm_nt": "pykernels.gemm",
    # GEMM: DeepGEMM's helpers, v1 names and the names not implemented (docs/compat.md)
    "get_mk_alignment_for_contiguous_layout": "pykernels.gemm",
    "get_m_alignment_for_contiguous_layout": "pykernels.gemm",
    "set_mk_alignment_for_contiguous_layout": "pykernels.utils",
    "gemm_fp8_fp8_bf16_nt": "pykernels.gemm",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": "pykernels.gemm",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked": "pykernels.gemm",
    "wgrad_gemm_fp8_fp8_fp32_nt": "pykernels.gemm",
    "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt": "pykernels.gemm",
    "k_grouped_fp8_gemm_nt_contiguous": "pykernels.gemm",
    "k_grouped_fp8_gemm_tn_contiguous": "pykernels.gemm",
    "ceil_div": "pykernels.utils",
    "align": "pykernels.utils",
    # SM count used by every kernel's launch geometry (DeepGEMM's set_num_sms)
    "set_num_sms": "pykernels.runtime.hardware",
    "get_num_sms": "pykernels.runtime.hardware",
    # MLA decode
    "get_mla_metadata": "pykernels.mla",
    "flash_mla_with_kvcache": "pykernels.mla",
    # DeepSeek Sparse Attention (DeepGEMM's indexer, top-k, FlashMLA's sparse MLA)
    "fp8_mqa_logits": "pykernels.dsa",
    "fp8_paged_mqa_logits": "pykernels.dsa",
    "get_paged_mqa_logits_metadata": "pykernels.dsa",
    "topk_indices": "pykernels.dsa",
    "paged_topk_indices": "pykernels.dsa",
    "flash_mla_sparse_fwd": "pykernels.dsa",
    # registry and device-side checks
    "explain": "pykernels.registry",
    "check_errors": "pykernels.runtime.device_errors",
    "KernelInputError": "pykernels.runtime.device_errors",
    # metrics
    "calc_diff": "pykernels.metrics",
    "rel_error": "pykernels.metrics",
}


# submodules reachable as attributes without an import (DeepGEMM's deep_gemm.utils / .testing)
_LAZY_MODULES = ("utils", "testing")


def __getattr__(name):
    # Lazy re-exports keep `import pykernels` cheap (no torch/triton import cost until used).
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _LAZY_MODULES:
        import importlib
        return importlib.import_module(f"pykernels.{name}")
    raise AttributeError(f"module 'pykernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_LAZY_MODULES))
