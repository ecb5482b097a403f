"""FP8 block-scaled GEMMs (NT) with DeepGEMM's call forms.

A is e4m3 [m, k] with 1x128 scales sfa float32 [m, ceil(k/128)] (row-major, or column-major
TMA-aligned as DeepGEMM produces); B is e4m3 [n, k] with 128x128 block scales sfb
float32 [ceil(n/128), ceil(k/128)]; out is bf16 [m, n] = (A * sfa) @ (B * sfb)^T.
K must be a multiple of 16 (A and B rows are read by TMA: 16-byte row strides); the last
128-wide K block may be partial (DeepGEMM's K = 576, 832). Backends: "cuda" (hand-written sm_90a kernel,
csrc/gemm/fp8_gemm.cu; N a multiple of 8), "emu" (the same kernel on the PTX emulator, CPU
tensors), "triton", "reference"; "auto" takes the first that supports the call
(`pykernels.explain` says why). Validation lives in pykernels.ops.gemm, inside the
torch.ops.pykernels.* custom ops (eager calls run their bodies directly:
pykernels.ops.custom). No host-device synchronisation.

fp8_gemm_nt also writes float32 out, with DeepGEMM's accumulation d = c + A B^T (c may be d
itself: the weight-gradient form, wgrad_gemm_fp8_fp8_fp32_nt) and its recipe (1, 1, 128)
(1x128 B scales; with a bf16 out on triton and reference only).
DeepGEMM's keywords (c, recipe, recipe_a/b, compiled_dims, disable_ue8m0_cast, and for the
contiguous layout use_psum_layout, ensure_zero_padding, expected_m_for_psum_layout) are
accepted where their values mean what these functions compute, else a ValueError names
them (ops.gemm.check_deepgemm_keywords); its v1 names are aliases (docs/compat.md).

bf16_gemm_nt: the BF16 GEMM (NT) on the same call form, without scales (docs/gemm.md).
"""
import torch

from .ops import gemm as G
from .ops.custom import call
from .runtime import validate as V
from .runtime.arrays import dlpack_io

# Rows per segment of the contiguous layout that keep every tile in one group: the largest
# BLOCK_M of the compiled kernel (cuda/gemm.py configs; a test checks), DeepGEMM's value too.
CONTIGUOUS_ALIGNMENT = 128


@dlpack_io
def fp8_gemm_nt(a, b, out, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False, *, backend: str = "auto"):
    """out[m, n] = (a[m, k] * sfa) @ (b[n, k] * sfb)^T (+ c).

    a: (e4m3 [m, k], float32 [m, ceil(k/128)]); b: (e4m3 [n, k], float32 [ceil(n/128), ceil(k/128)]);
    out: bf16 or float32 [m, n], written in place and returned; or a pair (e4m3 [m, n],
    float32 [m, ceil(n/128)] row-major): quantize-on-store, the float32 result quantized as
    per_token_cast_to_fp8 does (1x128 scales), the pair returned (the next GEMM's A operand;
    no c). c: None, or float32 [m, n]
    with a float32 out: out = c + a b^T; c may be out itself (out += a b^T, the
    weight-gradient form). recipe: (1, 128, 128) (default), or (1, 1, 128): sfb float32
    [n, ceil(k/128)], one scale per row of b and 128 of K (also recipe_a (1, 128) + recipe_b
    (1, 128); the cuda kernel takes it with a float32 out only). compiled_dims,
    disable_ue8m0_cast: DeepGEMM's keywords (no effect here).
    """
    b_scale_rows = G.check_deepgemm_keywords(recipe=recipe, recipe_a=recipe_a, recipe_b=recipe_b,
                                             compiled_dims=compiled_dims, disable_ue8m0_cast=disable_ue8m0_cast,
                                             per_row_b=True)
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    sfd = None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"out: expected a tensor or a pair (out, sfd), got {len(out)} items")
        out, sfd = V.as_tensor("out", out[0]), V.as_tensor("sfd", out[1])
    out = V.as_tensor("out", out)
    c = None if c is None else V.as_tensor("c", c)
    # c = out: accumulate in place (the custom op's inputs may not alias its mutated out)
    accumulate = c is not None and _same_view(c, out)
    call(torch.ops.pykernels.fp8_gemm_nt, G.fp8_gemm_nt_body, a, sfa, b, sfb, out, backend,
         None if accumulate else c, accumulate, b_scale_rows, sfd)
    return out if sfd is None else (out, sfd)


@dlpack_io
def bf16_gemm_nt(a, b, out, c=None, compiled_dims: str = "nk", *, backend: str = "auto"):
    """out[m, n] = a[m, k] @ b[n, k]^T (+ c): BF16 operands, float32 sums, one rounding to out.

    a: bf16 [m, k]; b: bf16 [n, k] (contiguous, K a multiple of 16); out: bf16 or float32
    [m, n], written in place and returned. c: None, or float32 [m, n] with a float32 out:
    out = c + a b^T; c may be out itself (out += a b^T). compiled_dims: DeepGEMM's keyword
    (no effect here). Backends as fp8_gemm_nt's ("cuda": N a multiple of 8; docs/gemm.md).
    """
    G.check_deepgemm_keywords(compiled_dims=compiled_dims)
    a, b, out = V.as_tensor("a", a), V.as_tensor("b", b), V.as_tensor("out", out)
    c = None if c is None else V.as_tensor("c", c)
    accumulate = c is not None and _same_view(c, out)   # in place: a custom op's inputs may not alias out
    call(torch.ops.pykernels.bf16_gemm_nt, G.bf16_gemm_nt_body, a, b, out, backend,
         None if accumulate else c, accumulate)
    return out


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.device == y.device and x.data_ptr() == y.data_ptr() and x.dtype == y.dtype
            and x.shape == y.shape and x.stride() == y.stride())


@dlpack_io
def m_grouped_fp8_gemm_nt_contiguous(a, b, out, m_indices, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False, ensure_zero_padding=None,
                                     expected_m_for_psum_layout=None, *, backend: str = "auto"):
    """Grouped GEMM over rows concatenated by group (MoE prefill).

    a: (e4m3 [m_sum, k], float32 [m_sum, ceil(k/128)]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), ceil(k/128)]); out: bf16 [m_sum, n]; m_indices: int32 [m_sum], the group
    of each row, -1 for padding rows, which are left untouched (DeepGEMM's current
    version zeroes them: ensure_zero_padding=True is not supported yet). Segments should
    be padded to get_mk_alignment_for_contiguous_layout() rows as in DeepGEMM (other
    layouts are correct but slower). recipe .. expected_m_for_psum_layout: DeepGEMM's keywords.
    """
    G.check_deepgemm_keywords(recipe=recipe, recipe_a=recipe_a, recipe_b=recipe_b, compiled_dims=compiled_dims,
                              disable_ue8m0_cast=disable_ue8m0_cast, use_psum_layout=use_psum_layout,
                              ensure_zero_padding=ensure_zero_padding,
                              expected_m_for_psum_layout=expected_m_for_psum_layout)
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    out, m_indices = V.as_tensor("out", out), V.as_tensor("m_indices", m_indices)
    call(torch.ops.pykernels.m_grouped_fp8_gemm_nt_contiguous, G.m_grouped_contiguous_body,
         a, sfa, b, sfb, out, m_indices, backend)
    return out


@dlpack_io
def m_grouped_fp8_gemm_nt_masked(a, b, out, masked_m, expected_m: int, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False, *,
                                 backend: str = "auto"):
    """Grouped GEMM with a fixed row capacity per group (MoE decode, CUDA-graph safe).

    a: (e4m3 [G, m_max, k], float32 [G, m_max, ceil(k/128)]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), ceil(k/128)]); out: bf16 [G, m_max, n]; masked_m: int32 [G] valid rows
    per group (read on the device); expected_m: host-side hint of the typical rows per
    group (tile choice only). Rows >= masked_m[g] are left untouched. recipe ..
    disable_ue8m0_cast: DeepGEMM's keywords.
    """
    G.check_deepgemm_keywords(recipe=recipe, recipe_a=recipe_a, recipe_b=recipe_b, compiled_dims=compiled_dims,
                              disable_ue8m0_cast=disable_ue8m0_cast)
    (a, sfa), (b, sfb) = G.pair("a", a), G.pair("b", b)
    out, masked_m = V.as_tensor("out", out), V.as_tensor("masked_m", masked_m)
    expected_m = V.check_int("expected_m", expected_m, lo=0)
    call(torch.ops.pykernels.m_grouped_fp8_gemm_nt_masked, G.m_grouped_masked_body,
         a, sfa, b, sfb, out, masked_m, expected_m, backend)
    return out


def get_mk_alignment_for_contiguous_layout() -> int:
    """The row multiple to pad each group's segment of the contiguous layout to (DeepGEMM's
    helper): CONTIGUOUS_ALIGNMENT = 128. Any segmentation is correct here; aligned ones
    compute each tile once (docs/gemm.md)."""
    return CONTIGUOUS_ALIGNMENT


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout   # DeepGEMM v1's name

# DeepGEMM v1's names (lhs, rhs, out, ...: the same positional arguments)
gemm_fp8_fp8_bf16_nt = fp8_gemm_nt
m_grouped_gemm_fp8_fp8_bf16_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_gemm_fp8_fp8_bf16_nt_masked = m_grouped_fp8_gemm_nt_masked


def _not_supported(name: str, what: str):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"{name}: {what} is not supported yet (docs/compat.md)")
    missing.__name__ = missing.__qualname__ = name
    missing.__doc__ = f"DeepGEMM's {name}: {what}; not supported yet, raises NotImplementedError."
    return missing


@dlpack_io
def wgrad_gemm_fp8_fp8_fp32_nt(a, b, out, *, backend: str = "auto"):
    """Weight-gradient GEMM (DeepGEMM's): out[m, n] += (a[m, k] * sfa) @ (b[n, k] * sfb)^T.

    a: (e4m3 [m, k], float32 [m, ceil(k/128)]); b: (e4m3 [n, k], float32 [n, ceil(k/128)])
    (1x128 scales on both, recipe (1, 1, 128)); out: float32 [m, n], accumulated in place
    and returned: fp8_gemm_nt(a, b, out, c=out, recipe=(1, 1, 128)), on every backend."""
    return fp8_gemm_nt(a, b, out, c=out, recipe=G.RECIPE_PER_ROW_B, backend=backend)


# DeepGEMM's K-grouped weight-gradient GEMMs: not implemented here
k_grouped_wgrad_gemm_fp8_fp8_fp32_nt = _not_supported("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
                                                      "the K-grouped fp32 weight-gradient GEMM")
k_grouped_fp8_gemm_nt_contiguous = _not_supported("k_grouped_fp8_gemm_nt_contiguous", "the K-grouped GEMM")
k_grouped_fp8_gemm_tn_contiguous = _not_supported("k_grouped_fp8_gemm_tn_contiguous", "the K-grouped GEMM")
