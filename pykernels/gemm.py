"""FP8 block-scaled GEMMs (NT) with DeepGEMM's call forms.

A is e4m3 [m, k] with 1x128 scales sfa float32 [m, k/128] (row-major, or column-major
TMA-aligned as DeepGEMM produces); B is e4m3 [n, k] with 128x128 block scales sfb
float32 [ceil(n/128), k/128]; out is bf16 [m, n] = (A * sfa) @ (B * sfb)^T.
K must be a multiple of 128. Backends: "cuda" (hand-written sm_90a kernel,
csrc/gemm/fp8_gemm.cu; N a multiple of 8), "emu" (the same kernel on the PTX emulator, CPU
tensors), "triton", "reference". "auto": cuda on GPU tensors (triton for shapes the cuda
kernel does not take), reference on CPU tensors. No host-device synchronisation on any path.
"""
import torch

from .runtime import validate as V
from .runtime.backend import resolve
from .runtime.ops import IMPLS

_F8 = torch.float8_e4m3fn


def _kb(k: int) -> int:
    return (k + 127) // 128


def _resolve(op: str, backend: str, dev: torch.device, n: int) -> str:
    """resolve(), except that "auto" leaves the cuda kernel for N it does not support."""
    if backend == "auto" and dev.type == "cuda" and n % 8:
        backend = "triton"
    return resolve(op, backend, dev, IMPLS[op])


def _operands(a, b, out, grouped_a: bool, grouped_b: bool):
    """Validate (a, sfa), (b, sfb), out; return tensors and (m, n, k)."""
    if not (isinstance(a, (tuple, list)) and len(a) == 2):
        raise TypeError("a: expected a pair (a, sfa) of e4m3 data and float32 scales")
    if not (isinstance(b, (tuple, list)) and len(b) == 2):
        raise TypeError("b: expected a pair (b, sfb) of e4m3 data and float32 scales")
    a_t, sfa = V.as_tensor("a", a[0]), V.as_tensor("sfa", a[1])
    b_t, sfb = V.as_tensor("b", b[0]), V.as_tensor("sfb", b[1])
    out = V.as_tensor("out", out)
    V.check_dtype("a", a_t, _F8)
    V.check_dtype("b", b_t, _F8)
    V.check_dtype("sfa", sfa, torch.float32)
    V.check_dtype("sfb", sfb, torch.float32)
    V.check_dtype("out", out, torch.bfloat16)
    V.check_rank("a", a_t, 3 if grouped_a else 2)
    V.check_rank("b", b_t, 3 if grouped_b else 2)
    m, k = a_t.shape[-2:]
    n = b_t.shape[-2]
    if b_t.shape[-1] != k:
        raise ValueError(f"b: expected K = {k} (a's last dim) in shape {list(b_t.shape)}, got {b_t.shape[-1]}")
    V.check_multiple("k", k, 128)
    for name, t in (("a", a_t), ("b", b_t), ("out", out)):
        V.check_contiguous(name, t)
    lead_a = tuple(a_t.shape[:-2])
    lead_b = tuple(b_t.shape[:-2])
    V.check_shape("sfa", sfa, lead_a + (m, _kb(k)))
    V.check_shape("sfb", sfb, lead_b + (_kb(n), _kb(k)))
    V.check_scale_layout("sfa", sfa)
    V.check_contiguous("sfb", sfb)
    V.check_shape("out", out, lead_a + (m, n))
    return a_t, sfa, b_t, sfb, out, (m, n, k)


def fp8_gemm_nt(a, b, out, *, backend: str = "auto"):
    """out[m, n] (bf16) = (a[m, k] * sfa) @ (b[n, k] * sfb)^T.

    a: (e4m3 [m, k], float32 [m, k/128]); b: (e4m3 [n, k], float32 [ceil(n/128), k/128]);
    out: bf16 [m, n], written in place and returned.
    """
    a_t, sfa, b_t, sfb, out, (_, n, _) = _operands(a, b, out, False, False)
    dev = V.check_same_device(a=a_t, sfa=sfa, b=b_t, sfb=sfb, out=out)
    backend = _resolve("fp8_gemm_nt", backend, dev, n)
    torch.ops.pykernels.fp8_gemm_nt(a_t, sfa, b_t, sfb, out, backend)
    return out


def m_grouped_fp8_gemm_nt_contiguous(a, b, out, m_indices, *, backend: str = "auto"):
    """Grouped GEMM over rows concatenated by group (MoE prefill).

    a: (e4m3 [m_sum, k], float32 [m_sum, k/128]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), k/128]); out: bf16 [m_sum, n]; m_indices: int32 [m_sum], the group
    of each row, -1 for padding rows, which are left untouched. Segments should be
    padded to 128 rows as in DeepGEMM (other layouts are correct but slower).
    """
    a_t, sfa, b_t, sfb, out, (m, n, _) = _operands(a, b, out, False, True)
    m_indices = V.as_tensor("m_indices", m_indices)
    V.check_dtype("m_indices", m_indices, torch.int32)
    V.check_shape("m_indices", m_indices, (m,))
    V.check_contiguous("m_indices", m_indices)
    dev = V.check_same_device(a=a_t, sfa=sfa, b=b_t, sfb=sfb, out=out, m_indices=m_indices)
    backend = _resolve("m_grouped_fp8_gemm_nt_contiguous", backend, dev, n)
    torch.ops.pykernels.m_grouped_fp8_gemm_nt_contiguous(a_t, sfa, b_t, sfb, out, m_indices, backend)
    return out


def m_grouped_fp8_gemm_nt_masked(a, b, out, masked_m, expected_m: int, *, backend: str = "auto"):
    """Grouped GEMM with a fixed row capacity per group (MoE decode, CUDA-graph safe).

    a: (e4m3 [G, m_max, k], float32 [G, m_max, k/128]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), k/128]); out: bf16 [G, m_max, n]; masked_m: int32 [G] valid rows
    per group (read on the device); expected_m: host-side hint of the typical rows per
    group (tile choice only). Rows >= masked_m[g] are left untouched.
    """
    a_t, sfa, b_t, sfb, out, (m_max, n, _) = _operands(a, b, out, True, True)
    groups = a_t.shape[0]
    if b_t.shape[0] != groups:
        raise ValueError(f"b: expected {groups} groups (a's first dim), got shape {list(b_t.shape)}")
    masked_m = V.as_tensor("masked_m", masked_m)
    V.check_dtype("masked_m", masked_m, torch.int32)
    V.check_shape("masked_m", masked_m, (groups,))
    if not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected a non-negative int, got {expected_m!r}")
    dev = V.check_same_device(a=a_t, sfa=sfa, b=b_t, sfb=sfb, out=out, masked_m=masked_m)
    backend = _resolve("m_grouped_fp8_gemm_nt_masked", backend, dev, n)
    torch.ops.pykernels.m_grouped_fp8_gemm_nt_masked(a_t, sfa, b_t, sfb, out, masked_m, expected_m, backend)
    return out
