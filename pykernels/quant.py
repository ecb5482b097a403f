"""FP8 (e4m3) quantization with DeepGEMM's call forms.

Backends: "cuda" / "emu" (hand-written PTX, ptx/), "triton", "reference"; "auto" takes
the first that supports the call (reference on CPU tensors). Validation lives in
pykernels.ops.quant, inside the torch.ops.pykernels.* custom ops.
"""
import torch

from .ops import quant as _ops  # defines the torch.ops.pykernels.* quantization ops
from .ops.custom import call
from .reference.quant import to_e4m3_satfinite
from .runtime import validate as V
from .runtime.arrays import dlpack_io
from .runtime.hardware import SCALE_BLOCK, TMA_ALIGNMENT_BYTES, tma_aligned_size


def check_cast_keywords(use_ue8m0, gran_k, use_packed_ue8m0=False) -> None:
    """DeepGEMM's cast keywords, accepted where they mean float32 scales per 128 elements."""
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f"use_ue8m0: expected a bool, got {type(use_ue8m0).__name__}")
    if isinstance(gran_k, bool) or gran_k != SCALE_BLOCK:
        raise ValueError(f"gran_k: expected {SCALE_BLOCK} (the only scale granularity implemented), got {gran_k!r}")
    if use_packed_ue8m0 is not False:
        raise ValueError(f"use_packed_ue8m0: expected False (scales packed four to an int32 are not supported "
                         f"yet; use_ue8m0=True gives the same powers of two as float32), got {use_packed_ue8m0!r}")


@dlpack_io
def ceil_to_ue8m0(sf) -> torch.Tensor:
    """|sf| (float32) rounded up to a power of two, the value a UE8M0 scale (an 8-bit
    exponent) holds: 2^ceil(log2 |sf|) with the exponent in [-126, 127] (0 gives 2^-126),
    as DeepGEMM rounds its scales. NaN and +-Inf stay as they are (docs/numerics.md)."""
    sf = V.as_tensor("sf", sf)
    V.check_dtype("sf", sf, torch.float32)
    mant, exp = torch.frexp(sf.abs())               # |sf| = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)    # an exact power of two stays
    exp = torch.where(mant == 0, -126, exp).clamp(-126, 127)
    return torch.where(torch.isfinite(sf), torch.ldexp(torch.ones_like(sf), exp), sf)


def _with_ue8m0_scales(x: torch.Tensor, sf: torch.Tensor, rows_per_scale: int):
    """(q, sf) of DeepGEMM's use_ue8m0 casts from the float32 scales of the same groups:
    sf rounded up to powers of two, q = e4m3(x / sf) (the division is exact: one rounding)."""
    sf = ceil_to_ue8m0(sf)
    m, k = x.shape
    full = sf.repeat_interleave(rows_per_scale, dim=0)[:m].repeat_interleave(SCALE_BLOCK, dim=1)[:, :k]
    return to_e4m3_satfinite(x.float() / full).contiguous(), sf


@dlpack_io
def per_token_cast_to_fp8(x, use_ue8m0: bool = False, gran_k: int = SCALE_BLOCK, use_packed_ue8m0: bool = False, *,
                          backend: str = "auto"):
    """Quantize each 1x128 group of each row.

    x: [m, k] float32/bfloat16/float16 (unit stride along k). Returns
    (q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)]) with
    sf = max(amax, 1e-4) / 448 and q = rne(x * 448 / max(amax, 1e-4)).
    use_ue8m0=True: sf rounded up to a power of two (ceil_to_ue8m0) and q = rne(x / sf),
    as DeepGEMM's cast with that keyword. gran_k (128 only), use_packed_ue8m0 (False only):
    DeepGEMM's other keywords.
    """
    check_cast_keywords(use_ue8m0, gran_k, use_packed_ue8m0)
    x = V.as_tensor("x", x)
    q, sf = call(torch.ops.pykernels.per_token_cast_to_fp8, _ops.per_token_cast_to_fp8_body, x, backend)
    return _with_ue8m0_scales(x, sf, 1) if use_ue8m0 else (q, sf)


@dlpack_io
def per_block_cast_to_fp8(x, use_ue8m0: bool = False, gran_k: int = SCALE_BLOCK, *, backend: str = "auto"):
    """Quantize each 128x128 block.

    x: [m, n] float32/bfloat16/float16. Returns (q float8_e4m3fn [m, n],
    sf float32 [ceil(m/128), ceil(n/128)]). use_ue8m0, gran_k: DeepGEMM's keywords, as in
    per_token_cast_to_fp8.
    """
    check_cast_keywords(use_ue8m0, gran_k)
    x = V.as_tensor("x", x)
    q, sf = call(torch.ops.pykernels.per_block_cast_to_fp8, _ops.per_block_cast_to_fp8_body, x, backend)
    return _with_ue8m0_scales(x, sf, SCALE_BLOCK) if use_ue8m0 else (q, sf)


def get_tma_aligned_size(mn: int, element_size: int) -> int:
    """mn rounded up to a multiple of 16 / element_size: the padded row count of a
    column-major (MN-major) scale tensor whose columns TMA loads (DeepGEMM's helper).
    mn: int >= 0; element_size: bytes per element, 1, 2, 4, 8 or 16."""
    mn = V.check_int("mn", mn, lo=0)
    element_size = V.check_int("element_size", element_size, lo=1)
    if TMA_ALIGNMENT_BYTES % element_size:
        raise ValueError(f"element_size: expected a divisor of {TMA_ALIGNMENT_BYTES} bytes, got {element_size}")
    return tma_aligned_size(mn, element_size)


@dlpack_io
def get_col_major_tma_aligned_tensor(sf) -> torch.Tensor:
    """Same values as sf ([m, kb] or [G, m, kb] float32), stored column-major with m
    padded to a multiple of 4 (16 bytes) so TMA can load a column: strides (1, m_pad)
    or (kb*m_pad, 1, m_pad). Already-aligned inputs are returned as they are.
    DeepGEMM's current name for it: get_mn_major_tma_aligned_tensor."""
    sf = V.as_tensor("sf", sf)
    V.check_dtype("sf", sf, torch.float32)
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf: expected a 2-D [m, kb] or 3-D [G, m, kb] tensor, got shape {list(sf.shape)}")
    m, kb = sf.shape[-2:]
    m_pad = tma_aligned_size(m, sf.element_size())
    if sf.stride(-2) == 1 and sf.stride(-1) == m_pad and (sf.dim() == 2 or sf.stride(0) == kb * m_pad):
        return sf
    lead = sf.shape[:-2]
    buf = torch.empty(*lead, kb, m_pad, dtype=sf.dtype, device=sf.device)
    view = buf[..., :m].transpose(-1, -2)
    view.copy_(sf)
    return view


get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor   # DeepGEMM v2's name, same semantics
