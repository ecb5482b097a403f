"""Reference FP8 (e4m3) quantization with 1x128 and 128x128 scaling, float32 math.

scale = max(amax, FP8_SCALE_FLOOR) / 448 and q = e4m3_rne(x * (448 / max(amax, floor))),
as DeepGEMM's tests do. Every other backend matches these bits.
"""
import torch

from .constants import BLOCK, FP8_E4M3_MAX, FP8_SCALE_FLOOR


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def _div(a, b):
    """Correctly rounded float32 division. torch computes `scalar / tensor` as a
    reciprocal times the scalar (not correctly rounded); kernels use div.rn."""
    dev = (a if torch.is_tensor(a) else b).device
    a = a if torch.is_tensor(a) else torch.tensor(a, dtype=torch.float32, device=dev)
    b = b if torch.is_tensor(b) else torch.tensor(b, dtype=torch.float32, device=dev)
    return torch.div(a.double(), b.double()).float()  # exact quotient rounded once


def per_token_cast_to_fp8(x: torch.Tensor):
    """Quantize each 1x128 group of a row.

    x: [m, k] float32/bfloat16/float16 (k need not be a multiple of 128: the last group
    is ragged). Returns (q float8_e4m3fn [m, k], sf float32 [m, ceil(k/128)]).
    """
    m, k = x.shape
    kb = _ceil_div(k, BLOCK)
    padded = torch.zeros(m, kb * BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    groups = padded.view(m, kb, BLOCK)
    amax = groups.abs().amax(dim=2).clamp(min=FP8_SCALE_FLOOR)
    inv = _div(FP8_E4M3_MAX, amax)
    q = (groups * inv[:, :, None]).view(m, kb * BLOCK)[:, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), _div(amax, FP8_E4M3_MAX).contiguous()


def per_block_cast_to_fp8(x: torch.Tensor):
    """Quantize each 128x128 block.

    x: [m, n] float32/bfloat16/float16 (ragged edges allowed). Returns
    (q float8_e4m3fn [m, n], sf float32 [ceil(m/128), ceil(n/128)]).
    """
    m, n = x.shape
    mb, nb = _ceil_div(m, BLOCK), _ceil_div(n, BLOCK)
    padded = torch.zeros(mb * BLOCK, nb * BLOCK, dtype=torch.float32, device=x.device)
    padded[:m, :n] = x.float()
    blocks = padded.view(mb, BLOCK, nb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=FP8_SCALE_FLOOR)
    inv = _div(FP8_E4M3_MAX, amax)
    q = (blocks * inv[:, None, :, None]).view(mb * BLOCK, nb * BLOCK)[:m, :n]
    return q.to(torch.float8_e4m3fn).contiguous(), _div(amax, FP8_E4M3_MAX).contiguous()


def dequantize_per_token(q: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 [m, k] from e4m3 q [m, k] and sf [m, ceil(k/128)] (any strides)."""
    k = q.shape[-1]
    return q.float() * sf.float().repeat_interleave(BLOCK, dim=-1)[..., :k]


def dequantize_per_block(q: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 [..., n, k] from e4m3 q [..., n, k] and sf [..., ceil(n/128), ceil(k/128)]."""
    n, k = q.shape[-2:]
    full = sf.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return q.float() * full[..., :n, :k]
