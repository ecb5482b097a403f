"""Reference FP8 block-scaled GEMMs (NT layout), float32 math, bf16 output (fp8_gemm_nt:
also float32 output, c + A B^T, and 1x128 B scales); the BF16 GEMM bf16_gemm_nt (float32
sums, bf16 or float32 output).

out = sum over K blocks kb of (sfa[:, kb] x sfb[n-block, kb]) * (a_kb @ b_kb^T): a carries
1x128 scales (per row, per 128 of K) and b 128x128 block scales; each K block's partial
product of the e4m3 values is scaled once, as the kernels promote their accumulators
(docs/numerics.md: an Inf scale gives +-Inf there, not the NaN that scaling elements
of both signs before summing would give). Grouped forms leave rows they do not own untouched.
The semantics every backend follows: K = 0 gives zeros in the owned rows; M = 0 or N = 0
is nothing to do; a row whose m_indices value is outside [0, G), and a whole group whose
masked_m is outside [0, m_max], are not written (the kernels also record such values in
the device error record, pykernels.runtime.device_errors; the public API checks them
here on the host).
"""
import torch

from .constants import BLOCK
from .quant import per_token_cast_to_fp8


def _mm(a, sfa, b, sfb, b_scale_rows=BLOCK):
    """float32 [m, n] from e4m3 a [m, k], sfa [m, kb], b [n, k], sfb [ceil(n/b_scale_rows), kb]
    (b_scale_rows 128: 128x128 block scales; 1: one scale per row of b and K block)."""
    n, k = b.shape
    qa, qb = a.float(), b.float()
    out = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(sfa.shape[-1]):
        cols = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
        partial = qa[:, cols] @ qb[:, cols].T                       # exact e4m3 products, float32 sums
        scale = sfa[:, kb, None] * sfb[:, kb].repeat_interleave(b_scale_rows)[None, :n]
        out += scale * partial
    return out


def _store(res, out, c):
    """The float32 product res, or c + res (c float32 [m, n], may be out itself), rounded once
    to out's dtype and written to out (returned); out None: returned as a new bf16 tensor."""
    if c is not None:
        res = c.float() + res
    res = res.to(torch.bfloat16 if out is None else out.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


def fp8_gemm_nt(a, sfa, b, sfb, out=None, c=None, b_scale_rows=BLOCK, sfd=None):
    """a e4m3 [m, k], sfa f32 [m, ceil(k/128)], b e4m3 [n, k], sfb f32 [ceil(n/128),
    ceil(k/128)] (b_scale_rows 1: [n, ceil(k/128)], 1x128 B scales) -> [m, n] in out's
    dtype (bf16 when out is None): the product, or c + the product (c float32 [m, n], may
    be out itself: the weight-gradient form out += a b^T) rounded once to out's dtype.
    out e4m3 (quantize-on-store): out, sfd f32 [m, ceil(n/128)] = per_token_cast_to_fp8 of
    the float32 product (its 1x128 scales, the next GEMM's A operand as it is)."""
    res = _mm(a, sfa, b, sfb, b_scale_rows)
    if out is not None and out.dtype == torch.float8_e4m3fn:
        q, sf = per_token_cast_to_fp8(res)
        out.copy_(q)
        sfd.copy_(sf)
        return out, sfd
    return _store(res, out, c)


def bf16_gemm_nt(a, b, out=None, c=None):
    """a bf16 [m, k], b bf16 [n, k] -> [m, n] in out's dtype (bf16 when out is None): the
    product a b^T summed in float32 (bf16 products are exact in float32), or c + the product
    (c float32 [m, n], may be out itself: out += a b^T), rounded once to out's dtype.
    K = 0: zeros (c with c)."""
    return _store(a.float() @ b.float().T, out, c)


def m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, m_indices, out):
    """Grouped GEMM over rows concatenated by group (MoE prefill).

    a e4m3 [m_sum, k], sfa f32 [m_sum, ceil(k/128)], b e4m3 [G, n, k], sfb f32
    [G, ceil(n/128), ceil(k/128)], m_indices int32 [m_sum] (group of each row, -1 =
    padding), out bf16 [m_sum, n]: rows whose index is outside [0, G) are not written.
    """
    idx = m_indices.long()
    for g in range(b.shape[0]):
        rows = (idx == g).nonzero().flatten()
        if rows.numel():
            out[rows] = _mm(a[rows], sfa[rows], b[g], sfb[g]).to(out.dtype)
    return out


def m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out):
    """Grouped GEMM with a fixed row capacity per group (MoE decode).

    a e4m3 [G, m_max, k], sfa f32 [G, m_max, ceil(k/128)], b e4m3 [G, n, k], sfb f32
    [G, ceil(n/128), ceil(k/128)], masked_m int32 [G], out bf16 [G, m_max, n]: rows
    >= masked_m[g] are not written, nor any row of a group whose masked_m is outside [0, m_max].
    """
    m_max = a.shape[1]
    for g in range(b.shape[0]):
        rows = int(masked_m[g])
        if 0 < rows <= m_max:
            out[g, :rows] = _mm(a[g, :rows], sfa[g, :rows], b[g], sfb[g]).to(out.dtype)
    return out
