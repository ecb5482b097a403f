"""DeepGEMM's public interface on pykernels: `import pykernels.compat.deep_gemm as deep_gemm`.

Every public name of DeepGEMM's `deep_gemm/__init__.py` (v2.8; its `utils` names included, as
DeepGEMM re-exports them) with DeepGEMM's parameter names, order, defaults and return values
(the GEMMs write `d` and return None), and its Hopper (SM90) semantics: FP8 e4m3 operands,
float32 scales (1x128 per token for A; 128x128 per block for B, or per row with recipe
(1, 1, 128)), NT layout, bf16 `d` (float32 with accumulation d = c + a b^T).
What differs from pykernels' own API (docs/compat.md has every name):

- m_grouped_fp8_gemm_nt_contiguous zeroes the rows of `d` whose grouped_layout is -1 unless
  ensure_zero_padding=False (pykernels.m_grouped_fp8_gemm_nt_contiguous leaves them), and
  takes DeepGEMM's prefix-sum layout (use_psum_layout=True);
- scales in any layout are accepted (DeepGEMM transforms them; here one copy into a layout
  pykernels' kernels read where they cannot read them as they are);
- empty problems: m or n = 0 writes nothing, k = 0 sets `d` to `c` (0 without it), after the
  same checks as any call;
- the utils casts compute q = e4m3(x * (1 / sf)) as DeepGEMM's (pykernels' casts round
  x * (448 / amax)), ceil_to_ue8m0 turns NaN / Inf into 2^127 and calc_diff returns a 0-dim
  float64 tensor.

Valid DeepGEMM calls that pykernels does not implement (accumulation into a bf16 `d`, alpha,
FP4 operands, the NN/TN/TT layouts, K-grouped and grouped BF16 GEMMs, Mega MoE, ...) raise
NotImplementedError naming the function; invalid values raise pykernels' ValueError /
TypeError naming the argument as DeepGEMM does (`d`, `grouped_layout`: _caller_names). Each
function also takes a keyword-only `backend` ("auto", "cuda", "emu", "triton", "reference").
Arrays of any DLPack producer are accepted (runtime/arrays).
"""
import functools
import os
import re
import sys
import types

import torch

from .. import dsa as PD
from .. import gemm as PG
from .. import quant as PQ
from .. import testing as PT
from ..runtime import device_errors as DE
from ..runtime import hardware as H
from ..runtime import validate as V
from ..runtime.arrays import dlpack_io
from . import _unimplemented

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4             # DeepGEMM's casts clamp each group's amax to this before dividing by 448
UE8M0_MAX = 2.0 ** 127        # the largest UE8M0 scale: DeepGEMM's ceil_to_ue8m0 of NaN / Inf
_FP4_DTYPES = tuple(d for d in (getattr(torch, "float4_e2m1fn_x2", None), torch.int8, torch.uint8) if d is not None)


_not_implemented = functools.partial(_unimplemented.not_implemented, "deep_gemm")   # (name, what): raises
_missing = functools.partial(_unimplemented.missing, "deep_gemm", "DeepGEMM")         # (name, why): a raising stand-in


_NAMES_AN_ARGUMENT = re.compile(r"[\w.\[\], ]+: ")   # pykernels' messages: "argument: expected ..., got ..."


def _caller_names(**renames):
    """Errors name the caller's arguments: a ValueError / TypeError from pykernels naming its own
    argument (out, m_indices) is re-raised naming DeepGEMM's (d, grouped_layout), the same
    exception with its message rewritten (each whole-word occurrence of a renamed name). Python's
    own call errors ("f() got an unexpected keyword argument 'out'") name the caller's words already."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")

    def decorate(func):
        @functools.wraps(func)
        def call(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except (ValueError, TypeError) as e:
                if e.args and isinstance(e.args[0], str) and _NAMES_AN_ARGUMENT.match(e.args[0]):
                    e.args = (pattern.sub(lambda hit: renames[hit.group(1)], e.args[0]),) + e.args[1:]
                if getattr(e, "argument", None) in renames:       # KernelInputError (emu: raised in the call)
                    e.argument = renames[e.argument]
                raise
        return call
    return decorate


# ----------------------------------------------------------------------------- configuration

set_num_sms = H.set_num_sms
get_num_sms = H.get_num_sms

# DeepGEMM's tuning knobs: its JIT and heuristics read them; pykernels' kernels are compiled ahead of
# time, launched without PDL and have no atomics in their reductions, so the settings are only kept.
_settings = {"tc_util": 100, "pdl": False, "deterministic": False, "ignore_compile_dims": None,
             "block_size_multiple_of": None}


def set_tc_util(tc_util: int) -> None:
    """DeepGEMM: the approximate tensor-core utilisation its heuristics assume. Kept, no effect here."""
    _settings["tc_util"] = V.check_int("tc_util", tc_util, lo=0)


def get_tc_util() -> int:
    """The value set_tc_util kept (100 before any call)."""
    return _settings["tc_util"]


def set_pdl(enable: bool) -> None:
    """DeepGEMM: launch with Programmatic Dependent Launch. Kept, no effect: pykernels launches without PDL."""
    if not isinstance(enable, bool):
        raise TypeError(f"enable: expected a bool, got {type(enable).__name__}")
    _settings["pdl"] = enable


def get_pdl() -> bool:
    """The value set_pdl kept (False before any call)."""
    return _settings["pdl"]


def use_deterministic_algorithms(*args, **kwargs) -> None:
    """DeepGEMM: choose deterministic kernels. No effect: pykernels' GEMM and MLA reductions
    have a fixed order (no atomics), so results are deterministic anyway."""
    _settings["deterministic"] = (args, kwargs)


def set_ignore_compile_dims(*args, **kwargs) -> None:
    """DeepGEMM: dimensions its JIT does not specialise on. No effect: kernels are compiled ahead of time."""
    _settings["ignore_compile_dims"] = (args, kwargs)


def set_block_size_multiple_of(*args, **kwargs) -> None:
    """DeepGEMM: constrain its block-size choice. No effect: pykernels' tile heuristic is its own."""
    _settings["block_size_multiple_of"] = (args, kwargs)


# ----------------------------------------------------------------------------- GEMM helpers

def _fp8_operands(name: str, a, b, per_row_b: bool = False):
    """(a, b) as pairs with scales pykernels' kernels read; FP4 operands -> NotImplementedError."""
    for arg, pair in (("a", a), ("b", b)):
        if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], torch.Tensor) \
                and pair[0].dtype in _FP4_DTYPES:
            _not_implemented(name, f"{arg}: {str(pair[0].dtype).replace('torch.', '')} (FP4) operands")
    return _with_readable_scales(a, per_row=True), _with_readable_scales(b, per_row=per_row_b)


def _with_readable_scales(pair, per_row: bool):
    """DeepGEMM takes float32 scales in any layout and transforms them. pykernels' kernels read
    per-row scales (sfa; sfb of the (1, 1, 128) recipe) row-major or column-major TMA-aligned and
    128x128 block scales row-major: any other layout is copied once into one they read."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        return pair                                          # pykernels' validation names the error
    data, sf = pair
    if isinstance(sf, torch.Tensor) and sf.dtype == torch.float32 and sf.dim() in (2, 3):
        if not per_row:
            sf = sf.contiguous()
        else:
            try:
                V.check_scale_layout("sf", sf)
            except ValueError:
                sf = PQ.get_col_major_tma_aligned_tensor(sf)
    return data, sf


def _per_row_b(recipe, recipe_b) -> bool:
    """The recipe names one B scale per row (gran_n 1: DeepGEMM's (1, 1, 128), its weight-gradient recipe)."""
    return (isinstance(recipe, (tuple, list)) and len(recipe) == 3 and recipe[1] == 1) or \
        (isinstance(recipe_b, (tuple, list)) and len(recipe_b) == 2 and recipe_b[0] == 1)


def _check_grouped_recipe(name: str, recipe, recipe_b) -> None:
    """Per-row B scales are implemented for fp8_gemm_nt only."""
    if _per_row_b(recipe, recipe_b):
        _not_implemented(name, f"recipe={recipe!r}, recipe_b={recipe_b!r} (per-row B scales on a grouped GEMM)")


def _problem_size(a, b):
    """(m, n, k) of an NT problem from the data tensors, or None where they are not tensors."""
    try:
        return a[0].shape[-2], b[0].shape[-2], a[0].shape[-1]
    except (TypeError, IndexError, AttributeError):
        return None


# ----------------------------------------------------------------------------- GEMMs

@dlpack_io
@_caller_names(out="d")
def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False, alpha=None, *, backend: str = "auto") -> None:
    """d[m, n] = (c +) (a[m, k] * sfa) @ (b[n, k] * sfb)^T, written in place; returns None.

    a: (e4m3 [m, k], float32 [m, ceil(k/128)]); b: (e4m3 [n, k], float32 [ceil(n/128), ceil(k/128)],
    or [n, ceil(k/128)] with recipe (1, 1, 128)); d: bf16, or float32 [m, n]; c: None or float32
    [m, n] with a float32 d (c may be d: d += a @ b^T). Not implemented (NotImplementedError):
    accumulation into a bf16 d, alpha (SM100 in DeepGEMM too), FP4 operands.
    """
    name = "fp8_gemm_nt"
    if c is not None and isinstance(d, torch.Tensor) and d.dtype == torch.bfloat16:   # other dtypes: invalid
        _not_implemented(name, "accumulation into c with a bfloat16 d")
    if alpha is not None:
        _not_implemented(name, "alpha (DeepGEMM's SM100 output scale)")
    a, b = _fp8_operands(name, a, b, per_row_b=_per_row_b(recipe, recipe_b))
    PG.fp8_gemm_nt(a, b, d, c, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, backend=backend)
    return None


def _psum_to_grouped_layout(grouped_layout: torch.Tensor, m: int, groups: int) -> torch.Tensor:
    """DeepGEMM's prefix-sum layout -> one group index per row (-1 outside every group), on the
    device, without a host sync. grouped_layout int32 [G]: the (unaligned) end row of each group;
    group g starts at its predecessor's end rounded up to get_mk_alignment_for_contiguous_layout()."""
    V.check_dtype("grouped_layout", grouped_layout, torch.int32)
    V.check_shape("grouped_layout", grouped_layout, (groups,))
    _check_group_ends(grouped_layout, m)
    ends = grouped_layout.long()
    align = PG.CONTIGUOUS_ALIGNMENT
    starts = torch.cat([ends.new_zeros(1), (ends[:-1] + align - 1) // align * align])
    rows = torch.arange(m, device=grouped_layout.device)
    group = torch.searchsorted(ends, rows, right=True)            # the first group ending after the row
    inside = group < groups
    start = starts[group.clamp(max=groups - 1)]
    return torch.where(inside & (rows >= start), group, -1).to(torch.int32)


def _check_group_ends(ends: torch.Tensor, m: int) -> None:
    """The prefix-sum layout's values: non-decreasing group ends in [0, m]. As pykernels checks
    m_indices (docs/architecture.md): CPU tensors here, at once; GPU tensors into the device
    error record without a host read (raised at pykernels.check_errors())."""
    if ends.numel() == 0 or V.is_fake(ends):
        return
    previous = torch.cat([ends.new_zeros(1), ends[:-1]])          # the first end's lower bound: 0
    bad = (ends < previous) | (ends > m)
    if ends.device.type == "cpu":
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(DE.describe("GroupEndOutOfRange", int(ends[i]), m, i))
    else:
        record = DE.record_for(ends.device, "m_grouped_fp8_gemm_nt_contiguous")
        DE.record_first(record, DE.code("GroupEndOutOfRange"), bad, ends, m)


@dlpack_io
@_caller_names(out="d", m_indices="grouped_layout")
def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False, ensure_zero_padding: bool = True,
                                     expected_m_for_psum_layout=None, *, backend: str = "auto") -> None:
    """MoE prefill: d[r] = (a[r] * sfa[r]) @ (b[g] * sfb[g])^T for each row r of group g; returns None.

    a: (e4m3 [m, k], float32 [m, ceil(k/128)]); b: (e4m3 [G, n, k], float32 [G, ceil(n/128),
    ceil(k/128)]); d: bf16 [m, n]. grouped_layout: int32 [m], each row's group, -1 for padding
    rows; or with use_psum_layout=True int32 [G], the end row of each group, group g starting at
    group g-1's end rounded up to get_mk_alignment_for_contiguous_layout() (rows between groups
    are padding). ensure_zero_padding (DeepGEMM's default True): padding rows of d are zeroed;
    False leaves them as they were. expected_m_for_psum_layout: a hint (psum layout only).
    """
    name = "m_grouped_fp8_gemm_nt_contiguous"
    _check_grouped_recipe(name, recipe, recipe_b)
    if not isinstance(ensure_zero_padding, bool):
        raise TypeError(f"ensure_zero_padding: expected a bool, got {type(ensure_zero_padding).__name__}")
    if not isinstance(use_psum_layout, bool):
        raise TypeError(f"use_psum_layout: expected a bool, got {type(use_psum_layout).__name__}")
    if expected_m_for_psum_layout is not None:
        if not use_psum_layout:
            raise ValueError(f"expected_m_for_psum_layout: expected None without use_psum_layout, "
                             f"got {expected_m_for_psum_layout!r}")
        V.check_int("expected_m_for_psum_layout", expected_m_for_psum_layout, lo=0)
    a, b = _fp8_operands(name, a, b)
    grouped_layout = V.as_tensor("grouped_layout", grouped_layout)
    size = _problem_size(a, b)
    m_indices = grouped_layout
    if use_psum_layout and size is not None and b[0].dim() == 3:      # else pykernels' validation names the error
        m_indices = _psum_to_grouped_layout(grouped_layout, size[0], b[0].shape[0])
    PG.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices, recipe, recipe_a, recipe_b, compiled_dims,
                                        disable_ue8m0_cast, backend=backend)
    if ensure_zero_padding:
        d.masked_fill_((m_indices < 0).unsqueeze(-1), 0)
    return None


@dlpack_io
@_caller_names(out="d")
def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m: int, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False, *,
                                 backend: str = "auto") -> None:
    """MoE decode: d[g, :masked_m[g]] = (a[g] * sfa[g]) @ (b[g] * sfb[g])^T; returns None.

    a: (e4m3 [G, m_max, k], float32 [G, m_max, ceil(k/128)]); b: (e4m3 [G, n, k], float32
    [G, ceil(n/128), ceil(k/128)]); d: bf16 [G, m_max, n]; masked_m int32 [G] (read on the
    device); expected_m: the typical rows per group (tile choice). Rows >= masked_m[g] untouched.
    """
    name = "m_grouped_fp8_gemm_nt_masked"
    _check_grouped_recipe(name, recipe, recipe_b)
    a, b = _fp8_operands(name, a, b)
    PG.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe, recipe_a, recipe_b, compiled_dims,
                                    disable_ue8m0_cast, backend=backend)
    return None


# DeepGEMM's own aliases (the same function objects there): FP8 x FP4 names take FP8 operands here
fp8_fp4_gemm_nt = fp4_gemm_nt = fp8_gemm_nt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
# DeepGEMM v1's names (lhs, rhs, out, ...: the same positions)
gemm_fp8_fp8_bf16_nt = fp8_gemm_nt
m_grouped_gemm_fp8_fp8_bf16_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_gemm_fp8_fp8_bf16_nt_masked = m_grouped_fp8_gemm_nt_masked

@dlpack_io
@_caller_names(d="out")                  # fp8_gemm_nt's errors name d
def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, *, backend: str = "auto") -> None:
    """DeepGEMM v1's weight-gradient GEMM: out (float32 [m, n]) += (lhs * sfa) @ (rhs * sfb)^T with
    1x128 scales on both operands (sfb float32 [n, ceil(k/128)]); returns None."""
    fp8_gemm_nt(lhs, rhs, out, out, (1, 1, H.SCALE_BLOCK), backend=backend)


_SM100_LAYOUT = "the {} layout (SM90 DeepGEMM and pykernels take K-major A and B: transpose to the _nt form)"
fp8_gemm_nn = fp8_fp4_gemm_nn = _missing("fp8_gemm_nn", _SM100_LAYOUT.format("NN"))
fp8_gemm_tn = fp8_fp4_gemm_tn = _missing("fp8_gemm_tn", _SM100_LAYOUT.format("TN"))
fp8_gemm_tt = fp8_fp4_gemm_tt = _missing("fp8_gemm_tt", _SM100_LAYOUT.format("TT"))
m_grouped_fp8_gemm_nn_contiguous = m_grouped_fp8_fp4_gemm_nn_contiguous = _missing(
    "m_grouped_fp8_gemm_nn_contiguous", _SM100_LAYOUT.format("NN"))
fp8_gemm_nt_skip_head_mid = _missing("fp8_gemm_nt_skip_head_mid", "the GEMM writing d with per-head column gaps")
_WGRAD = "the K-grouped weight-gradient GEMM (fp32 d accumulated into c)"
k_grouped_fp8_gemm_nt_contiguous = _missing("k_grouped_fp8_gemm_nt_contiguous", _WGRAD)
k_grouped_fp8_gemm_tn_contiguous = _missing("k_grouped_fp8_gemm_tn_contiguous", _WGRAD)
k_grouped_fp4_gemm_nt_contiguous = _missing("k_grouped_fp4_gemm_nt_contiguous", _WGRAD + " with FP4 operands")
k_grouped_wgrad_gemm_fp8_fp8_fp32_nt = _missing("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", _WGRAD + " (v1)")



@dlpack_io
@_caller_names(out="d")
def bf16_gemm_nt(a, b, d, c=None, compiled_dims: str = "nk", *, backend: str = "auto") -> None:
    """d[m, n] = (c +) a[m, k] @ b[n, k]^T, written in place; returns None.

    a: bf16 [m, k]; b: bf16 [n, k]; d: bf16, or float32 [m, n]; c: None or float32 [m, n] with
    a float32 d (c may be d: d += a @ b^T). Not implemented (NotImplementedError):
    accumulation into a bf16 d. m or n = 0 writes nothing, k = 0 sets d to c (0 without it)."""
    if c is not None and isinstance(d, torch.Tensor) and d.dtype == torch.bfloat16:   # other dtypes: invalid
        _not_implemented("bf16_gemm_nt", "accumulation into c with a bfloat16 d")
    PG.bf16_gemm_nt(a, b, d, c, compiled_dims, backend=backend)
    return None


_BF16 = "the other BF16 GEMMs (bf16_gemm_nt is implemented)"
bf16_gemm_nn = _missing("bf16_gemm_nn", _BF16)
bf16_gemm_tn = _missing("bf16_gemm_tn", _BF16)
bf16_gemm_tt = _missing("bf16_gemm_tt", _BF16)
m_grouped_bf16_gemm_nt_contiguous = _missing("m_grouped_bf16_gemm_nt_contiguous", _BF16)
m_grouped_bf16_gemm_nn_contiguous = _missing("m_grouped_bf16_gemm_nn_contiguous", _BF16)
m_grouped_bf16_gemm_nt_masked = _missing("m_grouped_bf16_gemm_nt_masked", _BF16)
k_grouped_bf16_gemm_tn_contiguous = _missing("k_grouped_bf16_gemm_tn_contiguous", _BF16)
_CUBLASLT = "DeepGEMM's cuBLASLt wrappers"
cublaslt_gemm_nt = _missing("cublaslt_gemm_nt", _CUBLASLT)
cublaslt_gemm_nn = _missing("cublaslt_gemm_nn", _CUBLASLT)
cublaslt_gemm_tn = _missing("cublaslt_gemm_tn", _CUBLASLT)
cublaslt_gemm_tt = _missing("cublaslt_gemm_tt", _CUBLASLT)
cublaslt_nvfp4_gemm_nt = _missing("cublaslt_nvfp4_gemm_nt", _CUBLASLT)
batched_syrk = _missing("batched_syrk", _CUBLASLT)
batched_symm = _missing("batched_symm", _CUBLASLT)
einsum = _missing("einsum", "the BF16 einsum kernels")
fp8_einsum = _missing("fp8_einsum", "the FP8 einsum kernels")
bf16_mega_gate = _missing("bf16_mega_gate", "the fused MoE gate")
get_bf16_mega_gate_config = _missing("get_bf16_mega_gate_config", "the fused MoE gate")
mega_mhc = _missing("mega_mhc", "the hyper-connection kernels")
tf32_hc_prenorm_gemm = _missing("tf32_hc_prenorm_gemm", "the hyper-connection kernels")
_MEGA = "Mega MoE (dispatch, expert GEMMs and combine fused over symmetric memory)"
get_block_m_for_mega_moe = _missing("get_block_m_for_mega_moe", _MEGA)
get_symm_buffer_for_mega_moe = _missing("get_symm_buffer_for_mega_moe", _MEGA)
get_symm_buffer_for_sm90_mega_moe = _missing("get_symm_buffer_for_sm90_mega_moe", _MEGA)
transform_weights_for_mega_moe = _missing("transform_weights_for_mega_moe", _MEGA)
transform_weights_for_mega_moe_sm90 = _missing("transform_weights_for_mega_moe_sm90", _MEGA)
fp8_fp4_mega_moe = _missing("fp8_fp4_mega_moe", _MEGA)
fp8_mega_moe = _missing("fp8_mega_moe", _MEGA)
fp4_fp4_mega_moe = _missing("fp4_fp4_mega_moe", _MEGA)
bf16_mega_moe = _missing("bf16_mega_moe", _MEGA)


class SymmBuffer:
    """DeepGEMM's Mega MoE symmetric buffer: not implemented (constructing one raises)."""

    def __init__(self, *args, **kwargs):
        _not_implemented(type(self).__name__, _MEGA)


class SM90SymmBuffer(SymmBuffer):
    """DeepGEMM's SM90 Mega MoE symmetric buffer: not implemented (constructing one raises)."""


# ----------------------------------------------------------------------------- indexer (DeepSeek V3.2)

@dlpack_io
def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits: bool = True,
                   max_seqlen_k: int = 0, *, backend: str = "auto") -> torch.Tensor:
    """Indexer logits float32 [M, N]: q e4m3 [M, H, D]; kv (e4m3 [N, D], float32 [N]); weights
    float32 [M, H]; query i sees keys [cu_seq_len_k_start[i], cu_seq_len_k_end[i]) (-inf elsewhere).
    max_seqlen_k != 0 (DeepGEMM's compacted logits) is not implemented."""
    if max_seqlen_k != 0:
        _not_implemented("fp8_mqa_logits", f"max_seqlen_k={max_seqlen_k!r} (logits compacted to a window)")
    return PD.fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, backend=backend)


def _fp8_query(name: str, q, logits_dtype):
    """The FP8 query of an fp8_fp4_* call: q = (data, None) with float32 logits."""
    if not (isinstance(q, (tuple, list)) and len(q) == 2):
        raise TypeError(f"q: expected a pair (q, q_sf or None), got {type(q).__name__}")
    if q[1] is not None:
        _not_implemented(name, "q scales (FP4 / MX-scaled queries)")
    if logits_dtype != torch.float32:
        _not_implemented(name, f"logits_dtype={logits_dtype} (float32 logits only)")
    return q[0]


@dlpack_io
def fp8_fp4_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits: bool = True,
                       max_seqlen_k: int = 0, logits_dtype=torch.float32, schedule_meta=None, *,
                       backend: str = "auto") -> torch.Tensor:
    """fp8_mqa_logits with q given as (q, None): FP8 queries and float32 logits only."""
    query = _fp8_query("fp8_fp4_mqa_logits", q, logits_dtype)
    if schedule_meta is not None:
        _not_implemented("fp8_fp4_mqa_logits", "schedule_meta (DeepGEMM's SM100 schedule)")
    return fp8_mqa_logits(query, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k,
                          backend=backend)


@dlpack_io
def get_paged_mqa_logits_metadata(context_lens, block_kv: int, num_sms: int, indices=None, *,
                                  backend: str = "auto") -> torch.Tensor:
    """Split schedule for fp8_paged_mqa_logits: int32 [num_sms + 1, 2] on context_lens' device."""
    if indices is not None:
        _not_implemented("get_paged_mqa_logits_metadata", "indices")
    return PD.get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms, backend=backend)


@dlpack_io
def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
                         clean_logits: bool = False, indices=None, *, backend: str = "auto") -> torch.Tensor:
    """Indexer logits float32 [b * next_n, max_context_len] over the paged FP8 key cache uint8
    [num_blocks, block_kv, 1, D + 4] (pykernels.dsa.fp8_paged_mqa_logits). With clean_logits=False
    DeepGEMM leaves positions outside each row's window unspecified; here they may hold -inf."""
    if indices is not None:
        _not_implemented("fp8_paged_mqa_logits", "indices")
    return PD.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                                   clean_logits, backend=backend)


@dlpack_io
def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len: int,
                             clean_logits: bool = False, logits_dtype=torch.float32, indices=None, *,
                             backend: str = "auto") -> torch.Tensor:
    """fp8_paged_mqa_logits with q given as (q, None): FP8 queries and float32 logits only."""
    query = _fp8_query("fp8_fp4_paged_mqa_logits", q, logits_dtype)
    return fp8_paged_mqa_logits(query, kv_cache, weights, context_lens, block_table, schedule_meta,
                                max_context_len, clean_logits, indices, backend=backend)


_SM100_INDEXER = "DeepGEMM's SM100 indexer schedule and sparse indexer"
get_mqa_logits_metadata = _missing("get_mqa_logits_metadata", _SM100_INDEXER)
get_sparse_mqa_logits_metadata = _missing("get_sparse_mqa_logits_metadata", _SM100_INDEXER)
get_paged_sparse_mqa_logits_metadata = _missing("get_paged_sparse_mqa_logits_metadata", _SM100_INDEXER)
fp8_fp4_sparse_mqa_logits = _missing("fp8_fp4_sparse_mqa_logits", _SM100_INDEXER)
fp8_fp4_paged_sparse_mqa_logits = _missing("fp8_fp4_paged_sparse_mqa_logits", _SM100_INDEXER)


# ----------------------------------------------------------------------------- layout helpers

get_tma_aligned_size = PQ.get_tma_aligned_size
get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor = PQ.get_col_major_tma_aligned_tensor
get_mk_alignment_for_contiguous_layout = PG.get_mk_alignment_for_contiguous_layout
get_m_alignment_for_contiguous_layout = get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    """DeepGEMM lets the contiguous layout's segment alignment change; pykernels' kernels are
    compiled for 128-row tiles, so other values are not implemented."""
    if isinstance(new_value, bool) or new_value != PG.CONTIGUOUS_ALIGNMENT:
        _not_implemented("set_mk_alignment_for_contiguous_layout",
                         f"new_value={new_value!r} (only {PG.CONTIGUOUS_ALIGNMENT})")


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m=None) -> int:
    """128: the tile height pykernels' kernels are compiled for (any segmentation is correct here;
    aligned ones compute each tile once)."""
    return PG.CONTIGUOUS_ALIGNMENT


@dlpack_io
def transform_sf_into_required_layout(sf, mn: int, k: int, recipe, num_groups=None, is_sfa=None,
                                      disable_ue8m0_cast: bool = False, psum_layout=None) -> torch.Tensor:
    """float32 scales in the layout pykernels' SM90 GEMMs read: per-token (gran_mn 1) scales
    column-major TMA-aligned (get_mn_major_tma_aligned_tensor), 128x128 block scales unchanged.
    Packed UE8M0 (SM100) and prefix-sum layouts are not implemented."""
    name = "transform_sf_into_required_layout"
    if psum_layout is not None:
        _not_implemented(name, "psum_layout")
    sf = V.as_tensor("sf", sf)
    if sf.dtype != torch.float32:
        _not_implemented(name, f"sf of dtype {str(sf.dtype).replace('torch.', '')} (packed UE8M0 scales)")
    recipe = tuple(recipe)
    if len(recipe) == 3:
        gran_mn = recipe[0] if (is_sfa is None or is_sfa) else recipe[1]
        gran_k = recipe[2]
    elif len(recipe) == 2:
        gran_mn, gran_k = recipe
    else:
        raise ValueError(f"recipe: expected (gran_m, gran_n, gran_k) or (gran_mn, gran_k), got {recipe!r}")
    if gran_k != H.SCALE_BLOCK or gran_mn not in (1, H.SCALE_BLOCK):
        _not_implemented(name, f"recipe {recipe!r} (1x128 and 128x128 float32 scales only)")
    return PQ.get_col_major_tma_aligned_tensor(sf) if gran_mn == 1 else sf


_UE8M0_PACKED = "UE8M0 scales packed four to an int32 (SM100's format)"
get_mn_major_tma_aligned_packed_ue8m0_tensor = _missing("get_mn_major_tma_aligned_packed_ue8m0_tensor", _UE8M0_PACKED)
get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor = _missing(
    "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor", _UE8M0_PACKED)


# ----------------------------------------------------------------------------- utils (casts)

def ceil_div(x: int, y: int) -> int:
    """ceil(x / y) for ints."""
    return H.cdiv(x, y)


def align(x: int, y: int) -> int:
    """x rounded up to a multiple of y."""
    return H.round_up(x, y)


@dlpack_io
def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """|x| (float32) rounded up to a power of two with the exponent in [-126, 127]; 0 gives 2^-126
    and NaN / Inf give 2^127, as DeepGEMM's (pykernels.ceil_to_ue8m0 keeps NaN / Inf)."""
    x = x.abs().float()
    return torch.where(torch.isfinite(x), PQ.ceil_to_ue8m0(x), torch.full_like(x, UE8M0_MAX))


def _scales(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def _check_gran_k(gran_k) -> int:
    return V.check_int("gran_k", gran_k, lo=1)


@dlpack_io
def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """float32 powers of two [..., 4j] -> int32 [..., j]: the exponent bytes, four to an int."""
    V.check_dtype("x", x, torch.float32)
    if x.shape[-1] % 4:
        raise ValueError(f"x: expected a last dimension that is a multiple of 4, got {list(x.shape)}")
    bits = x.contiguous().view(torch.int32)
    if bool((bits & 0x7FFFFF).any()):
        raise ValueError("x: expected powers of two (UE8M0 values), got a value with mantissa bits")
    return (bits >> 23).to(torch.uint8).view(torch.int32)


@dlpack_io
def unpack_ue8m0_from_int(packed_sf: torch.Tensor) -> torch.Tensor:
    """int32 [..., j] of packed exponent bytes -> float32 powers of two [..., 4j]."""
    V.check_dtype("packed_sf", packed_sf, torch.int32)
    return (packed_sf.contiguous().view(torch.uint8).to(torch.int32) << 23).view(torch.float32)


def _cast_groups(x: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """e4m3(x * (1 / sf)): DeepGEMM's quantisation of each group (x and sf broadcast)."""
    return (x.float() * sf.reciprocal()).to(torch.float8_e4m3fn)


@dlpack_io
def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, use_packed_ue8m0: bool = False):
    """Each 1 x gran_k group of each row: x [m, n] -> (q float8_e4m3fn [m, n], sf float32
    [m, ceil(n/gran_k)], or int32 [m, ceil(n/gran_k)/4] with use_packed_ue8m0=True).
    sf = max(amax, 1e-4) / 448 (rounded up to a power of two with use_ue8m0); q = e4m3(x * (1/sf))."""
    V.check_rank("x", x, 2)
    gran_k = _check_gran_k(gran_k)
    m, n = x.shape
    padded = torch.zeros(m, align(n, gran_k), dtype=torch.float32, device=x.device)
    padded[:, :n] = x
    groups = padded.view(m, -1, gran_k)
    sf = _scales(groups.abs().amax(dim=2), use_ue8m0)
    q = _cast_groups(groups, sf.unsqueeze(2)).view(m, -1)[:, :n].contiguous()
    return q, pack_ue8m0_to_int(sf) if use_packed_ue8m0 else sf


@dlpack_io
def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128):
    """Each gran_k x 1 group of each column: x [m, n] (m a multiple of gran_k) -> (q [m, n],
    sf float32 [m / gran_k, n])."""
    V.check_rank("x", x, 2)
    gran_k = _check_gran_k(gran_k)
    m, n = x.shape
    V.check_multiple("x.shape[0]", m, gran_k)
    groups = x.float().view(-1, gran_k, n)
    sf = _scales(groups.abs().amax(dim=1), use_ue8m0)
    return _cast_groups(groups, sf.unsqueeze(1)).view(m, n), sf


@dlpack_io
def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128):
    """Each gran_k x gran_k block: x [m, n] -> (q [m, n], sf float32 [ceil(m/gran_k), ceil(n/gran_k)])."""
    V.check_rank("x", x, 2)
    gran_k = _check_gran_k(gran_k)
    m, n = x.shape
    padded = torch.zeros(align(m, gran_k), align(n, gran_k), dtype=torch.float32, device=x.device)
    padded[:m, :n] = x
    blocks = padded.view(padded.shape[0] // gran_k, gran_k, padded.shape[1] // gran_k, gran_k)
    sf = _scales(blocks.abs().amax(dim=(1, 3)), use_ue8m0)
    q = _cast_groups(blocks, sf[:, None, :, None]).view_as(padded)[:m, :n].contiguous()
    return q, sf


@dlpack_io
def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims, use_ue8m0: bool):
    """One scale per index of the dimensions `dims` (amax over all others): -> (q like x,
    sf float32 of x's sizes along dims)."""
    keep = set(dims)
    reduced = tuple(i for i in range(x.dim()) if i not in keep)
    sf = _scales(x.abs().float().amax(dim=reduced, keepdim=True), use_ue8m0)
    return _cast_groups(x, sf), sf.squeeze()


_FP4 = "FP4 (e2m1) data"
per_token_cast_to_fp4 = _missing("per_token_cast_to_fp4", _FP4)
transpose_packed_fp4 = _missing("transpose_packed_fp4", _FP4)
cast_back_from_fp4 = _missing("cast_back_from_fp4", _FP4)


# ----------------------------------------------------------------------------- testing

@dlpack_io
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's similarity metric as a 0-dim float64 tensor on x's device:
    1 - 2 * sum(x * y) / sum(x * x + y * y) (NaN for two all-zero inputs, as DeepGEMM's;
    pykernels.calc_diff returns a float, 0 there)."""
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum() / (x * x + y * y).sum()


count_bytes = PT.count_bytes


def get_arch_major() -> int:
    """9 (pykernels.testing.get_arch_major): DeepGEMM's tests then take their SM90 paths."""
    return PT.get_arch_major()


def test_filter(condition):
    """Run the decorated test only when condition() holds (else print that it was filtered)."""
    def decorate(func):
        def run(*args, **kwargs):
            if condition():
                return func(*args, **kwargs)
            print(f"{func.__name__}: filtered by {condition}")
        run.__name__, run.__doc__ = func.__name__, func.__doc__
        return run
    return decorate


test_filter.__test__ = False       # not a pytest test


def ignore_env(name: str, condition):
    """Run the decorated function with environment variable `name` removed while condition() holds."""
    def decorate(func):
        def run(*args, **kwargs):
            saved = os.environ.pop(name, None) if condition() else None
            try:
                return func(*args, **kwargs)
            finally:
                if saved is not None:
                    os.environ[name] = saved
        run.__name__, run.__doc__ = func.__name__, func.__doc__
        return run
    return decorate


_BENCH = "DeepGEMM's benchmark helpers (bench/ has this project's benchmarks)"
bench = _missing("bench", _BENCH)
bench_kineto = _missing("bench_kineto", _BENCH)


def _namespace(name: str, names) -> types.ModuleType:
    """A submodule `pykernels.compat.deep_gemm.<name>` holding some of this module's names, also
    importable by its dotted name (`from pykernels.compat.deep_gemm.utils import ...`)."""
    module = types.ModuleType(f"{__name__}.{name}", f"DeepGEMM's deep_gemm.{name} names (see {__name__}).")
    for n in names:
        setattr(module, n, globals()[n])
    module.__all__ = list(names)
    sys.modules[module.__name__] = module
    return module


utils = _namespace("utils", [
    "align", "ceil_div", "ceil_to_ue8m0", "pack_ue8m0_to_int", "unpack_ue8m0_from_int", "per_token_cast_to_fp8",
    "per_channel_cast_to_fp8", "per_block_cast_to_fp8", "per_custom_dims_cast_to_fp8", "per_token_cast_to_fp4",
    "transpose_packed_fp4", "cast_back_from_fp4", "get_tma_aligned_size", "get_mk_alignment_for_contiguous_layout",
    "set_mk_alignment_for_contiguous_layout", "get_theoretical_mk_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_k_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor", "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor"])
testing = _namespace("testing", ["bench", "bench_kineto", "calc_diff", "count_bytes", "get_arch_major", "ignore_env",
                                 "test_filter"])

# `from pykernels.compat.deep_gemm import *`: DeepGEMM's names (and its v1 ones), not this module's imports
_OWN = {"dlpack_io", "E4M3_MAX", "AMAX_FLOOR", "UE8M0_MAX"}
__all__ = sorted(n for n, v in globals().items() if n in ("utils", "testing") or (
    not n.startswith("_") and n not in _OWN and not isinstance(v, types.ModuleType)))
