"""FP8 block-scaled GEMMs (NT) with DeepGEMM's call forms.

A is e4m3 [m, k] with 1x128 scales sfa float32 [m, k/128] (row-major, or column-major
TMA-aligned as DeepGEMM produces); B is e4m3 [n, k] with 128x128 block scales sfb
float32 [ceil(n/128), k/128]; out is bf16 [m, n] = (A * sfa) @ (B * sfb)^T.
K must be a multiple of 128. Backends: "cuda" (hand-written sm_90a kernel,
csrc/gemm/fp8_gemm.cu; N a multiple of 8), "emu" (the same kernel on the PTX emulator, CPU
tensors), "triton", "reference"; "auto" takes the first that supports the call
(`pykernels.explain` says why). Validation lives in pykernels.ops.gemm, inside the
torch.ops.pykernels.* custom ops (eager calls run their bodies directly:
pykernels.ops.custom). No host-device synchronisation.
"""
import torch

from .ops import gemm as G
from .ops.custom import call
from .runtime import validate as V


def fp8_gemm_nt(a, b, out, *, backend: str = "auto"):
    """out[m, n] (bf16) = (a[m, k] * sfa) @ (b[n, k] * sfb)^T.

    a: (e4m3 [m, k], float32 [m, k/128]); b: (e4m3 [n, k], float32 [ceil(n/128), k/128]);
    out: bf16 [m, n], written in place and returned.
    """
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    out = V.as_tensor("out", out)
    call(torch.ops.pykernels.fp8_gemm_nt, G.fp8_gemm_nt_body, a, sfa, b, sfb, out, backend)
    return out


def m_grouped_fp8_gemm_nt_contiguous(a, b, out, m_indices, *, backend: str = "auto"):
    """Grouped GEMM over rows concatenated by group (MoE prefill).

    a: (e4m3 [m_sum, k], float32 [m_sum, k/128]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), k/128]); out: bf16 [m_sum, n]; m_indices: int32 [m_sum], the group
    of each row, -1 for padding rows, which are left untouched. Segments should be
    padded to 128 rows as in DeepGEMM (other layouts are correct but slower).
    """
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    out, m_indices = V.as_tensor("out", out), V.as_tensor("m_indices", m_indices)
    call(torch.ops.pykernels.m_grouped_fp8_gemm_nt_contiguous, G.m_grouped_contiguous_body,
         a, sfa, b, sfb, out, m_indices, backend)
    return out


def m_grouped_fp8_gemm_nt_masked(a, b, out, masked_m, expected_m: int, *, backend: str = "auto"):
    """Grouped GEMM with a fixed row capacity per group (MoE decode, CUDA-graph safe).

    a: (e4m3 [G, m_max, k], float32 [G, m_max, k/128]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), k/128]); out: bf16 [G, m_max, n]; masked_m: int32 [G] valid rows
    per group (read on the device); expected_m: host-side hint of the typical rows per
    group (tile choice only). Rows >= masked_m[g] are left untouched.
    """
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    out, masked_m = V.as_tensor("out", out), V.as_tensor("masked_m", masked_m)
    expected_m = V.check_int("expected_m", expected_m, lo=0)
    call(torch.ops.pykernels.m_grouped_fp8_gemm_nt_masked, G.m_grouped_masked_body,
         a, sfa, b, sfb, out, masked_m, expected_m, backend)
    return out
