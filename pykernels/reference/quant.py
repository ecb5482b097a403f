"""Reference FP8 (e4m3) quantization with 1x128 and 128x128 scaling, float32 math.

scale = max(amax, FP8_SCALE_FLOOR) / 448 and q = e4m3_rne(x * (448 / max(amax, floor))),
as DeepGEMM's tests do. Every other backend matches these bits, NaN and Inf included
(docs/numerics.md): a group holding a NaN gets amax = NaN, so scale = canonical NaN
0x7FFFFFFF and every q = 0x7F; a group holding +-Inf (and no NaN) gets scale = +Inf,
q = +-0 for its finite elements (x * 0) and 0x7F for the infinite ones (Inf * 0).
The cast is PTX's cvt.rn.satfinite.e4m3: RNE, saturating at +-448, NaN -> 0x7F.
"""
import torch

from ..runtime.hardware import cdiv as _ceil_div
from .constants import BLOCK, FP8_E4M3_MAX, FP8_SCALE_FLOOR

E4M3_NAN_BITS = 0x7F              # the NaN the GPU's cvt writes, whatever the input's sign
F32_CANONICAL_NAN_BITS = 0x7FFFFFFF  # the NaN Hopper's float32 arithmetic returns


def _div(a, b):
    """Correctly rounded float32 division. torch computes `scalar / tensor` as a
    reciprocal times the scalar (not correctly rounded); kernels use div.rn."""
    dev = (a if torch.is_tensor(a) else b).device
    a = a if torch.is_tensor(a) else torch.tensor(a, dtype=torch.float32, device=dev)
    b = b if torch.is_tensor(b) else torch.tensor(b, dtype=torch.float32, device=dev)
    return torch.div(a.double(), b.double()).float()  # exact quotient rounded once


def to_e4m3_satfinite(y: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn as PTX cvt.rn.satfinite.e4m3x2.f32: round to nearest even,
    |y| > 448 and +-Inf saturate to +-448, every NaN becomes 0x7F. (torch's own cast turns
    values past 464 into NaN and keeps a NaN's sign bit, which depends on how the CPU made
    the NaN: x86 gives Inf * 0 a negative one.)"""
    q = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(torch.isnan(y), torch.full_like(q, E4M3_NAN_BITS), q)
    return q.view(torch.float8_e4m3fn)


def _group_amax(groups: torch.Tensor, dims) -> torch.Tensor:
    """max(max |x|, floor) over `dims`, NaN when the group holds a NaN (stated, not left to
    how torch's amax and clamp treat NaN)."""
    amax = groups.abs().amax(dim=dims).clamp(min=FP8_SCALE_FLOOR)
    return torch.where(torch.isnan(groups).any(dim=dims), torch.full_like(amax, float("nan")), amax)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 correctly rounded; a NaN amax gives the canonical NaN 0x7FFFFFFF."""
    sf = _div(amax, FP8_E4M3_MAX)
    nan = torch.tensor(F32_CANONICAL_NAN_BITS, dtype=torch.int32, device=sf.device).view(torch.float32)
    return torch.where(torch.isnan(amax), nan, sf).contiguous()


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
    amax = _group_amax(groups, 2)
    inv = _div(FP8_E4M3_MAX, amax)
    q = to_e4m3_satfinite((groups * inv[:, :, None]).view(m, kb * BLOCK)[:, :k])
    return q.contiguous(), _scale_of(amax)


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
    amax = _group_amax(blocks, (1, 3))
    inv = _div(FP8_E4M3_MAX, amax)
    q = to_e4m3_satfinite((blocks * inv[:, None, :, None]).view(mb * BLOCK, nb * BLOCK)[:m, :n])
    return q.contiguous(), _scale_of(amax)


def dequantize_per_token(q: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 [m, k] from e4m3 q [m, k] and sf [m, ceil(k/128)] (any strides)."""
    k = q.shape[-1]
    return q.float() * sf.float().repeat_interleave(BLOCK, dim=-1)[..., :k]


def dequantize_per_block(q: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """float32 [..., n, k] from e4m3 q [..., n, k] and sf [..., ceil(n/128), ceil(k/128)]."""
    n, k = q.shape[-2:]
    full = sf.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return q.float() * full[..., :n, :k]
