"""FP8 (e4m3) quantization with DeepGEMM's call forms.

Backends: "cuda" / "emu" (hand-written PTX, ptx/), "triton", "reference"; "auto" takes
the first that supports the call (reference on CPU tensors). Validation lives in
pykernels.ops.quant, inside the torch.ops.pykernels.* custom ops.
"""
import torch

from .ops import quant as _ops  # defines the torch.ops.pykernels.* quantization ops
from .ops.custom import call
from .runtime import validate as V


def per_token_cast_to_fp8(x, *, backend: str = "auto"):
    """Quantize each 1x128 group of each row.

    x: [m, k] float32/bfloat16/float16 (unit stride along k). Returns
    (q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)]) with
    sf = max(amax, 1e-4) / 448 and q = rne(x * 448 / max(amax, 1e-4)).
    """
    return call(torch.ops.pykernels.per_token_cast_to_fp8, _ops.per_token_cast_to_fp8_body, V.as_tensor("x", x),
                backend)


def per_block_cast_to_fp8(x, *, backend: str = "auto"):
    """Quantize each 128x128 block.

    x: [m, n] float32/bfloat16/float16. Returns (q float8_e4m3fn [m, n],
    sf float32 [ceil(m/128), ceil(n/128)]).
    """
    return call(torch.ops.pykernels.per_block_cast_to_fp8, _ops.per_block_cast_to_fp8_body, V.as_tensor("x", x),
                backend)


def get_col_major_tma_aligned_tensor(sf) -> torch.Tensor:
    """Same values as sf ([m, kb] or [G, m, kb] float32), stored column-major with m
    padded to a multiple of 4 (16 bytes) so TMA can load a column: strides (1, m_pad)
    or (kb*m_pad, 1, m_pad). Already-aligned inputs are returned as they are."""
    sf = V.as_tensor("sf", sf)
    V.check_dtype("sf", sf, torch.float32)
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf: expected a 2-D [m, kb] or 3-D [G, m, kb] tensor, got shape {list(sf.shape)}")
    m, kb = sf.shape[-2:]
    m_pad = (m + 3) // 4 * 4
    if sf.stride(-2) == 1 and sf.stride(-1) == m_pad and (sf.dim() == 2 or sf.stride(0) == kb * m_pad):
        return sf
    lead = sf.shape[:-2]
    buf = torch.empty(*lead, kb, m_pad, dtype=sf.dtype, device=sf.device)
    view = buf[..., :m].transpose(-1, -2)
    view.copy_(sf)
    return view
