"""Arrays of other DLPack producers through the public ops (pykernels/runtime/arrays.py):
NumPy on CPU (a GEMM, the MLA decode and metadata, quantization ops, an indexer op with out=)
and CuPy on a GPU. Inputs are imported without a copy; outputs the op writes into a caller's
array come back as that very array; new outputs come back as the producer's arrays viewing
the result's memory (NumPy has no bfloat16 / float8 dtype: such outputs stay torch tensors)."""
import numpy as np
import pytest
import torch

import pykernels as pk
import pykernels.compat.deep_gemm as deep_gemm
import pykernels.dsa as PD
import pykernels.mla as PM
from pykernels import reference as R
from pykernels.reference import dsa as RD
from pykernels.reference import mla as RM

from .fp8_cases import contiguous_indices, nan_bf16, normal_problem, quantized_weights
from .mla_cases import make_problem


def _is_view(array: np.ndarray) -> bool:
    """A NumPy array made by from_dlpack views the producer's memory: it owns no data."""
    return isinstance(array, np.ndarray) and not array.flags.owndata


def test_gemm_takes_numpy_scales_and_indices(seed):
    m, n, k = 45, 256, 256
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n)
    got = pk.fp8_gemm_nt((a, sfa.numpy()), (b, sfb.numpy()), out, backend="reference")
    assert got is out and torch.equal(out, R.fp8_gemm_nt(a, sfa, b, sfb))
    # the contiguous layout with NumPy scales and m_indices, through DeepGEMM's form (padding rows zeroed)
    m_indices = contiguous_indices([30, 70])
    a2, sfa2 = R.per_token_cast_to_fp8(torch.randn(m_indices.numel(), k, dtype=torch.bfloat16))
    bw, sfbw = quantized_weights(2, n, k)
    d = nan_bf16(m_indices.numel(), n)
    assert deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a2, sfa2.numpy()), (bw, sfbw.numpy()), d, m_indices.numpy(),
                                                      backend="reference") is None
    want = R.m_grouped_fp8_gemm_nt_contiguous(a2, sfa2, bw, sfbw, m_indices, nan_bf16(m_indices.numel(), n))
    pad = m_indices < 0
    assert torch.equal(d[~pad], want[~pad]) and (d[pad] == 0).all()


def test_mla_decode_writes_numpy_lse_in_place(seed):
    seqlens, s_q, h_q = [int(s) for s in torch.randint(1, 150, (2,))], 1, 16
    q, cache, table, lens = make_problem(seqlens, s_q, h_q)
    c8 = PM.quantize_kv_cache_fp8(cache)
    meta, splits = pk.get_mla_metadata(lens.numpy(), s_q * h_q, 1)
    assert _is_view(meta) and _is_view(splits) and meta.dtype == np.int32           # new outputs: NumPy views
    lse = np.full((2, h_q, s_q), np.nan, dtype=np.float32)
    out, got_lse = pk.flash_mla_with_kvcache(q, c8.numpy(), table.numpy(), lens.numpy(), 512, meta, splits,
                                             causal=True, softmax_lse=lse, backend="reference")
    assert got_lse is lse                                # written in place into the caller's array
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16          # NumPy has no bfloat16
    ref, ref_lse = RM.flash_mla_with_kvcache(q, c8, table, lens, 512, None, True)
    assert torch.equal(out, ref) and torch.equal(torch.from_numpy(lse), ref_lse)


def test_quantization_ops_return_numpy(seed):
    x = np.random.default_rng(int(torch.randint(0, 2**31, ()))).standard_normal((37, 300)).astype(np.float32)
    q, sf = pk.per_token_cast_to_fp8(x, backend="reference")
    want_q, want_sf = pk.per_token_cast_to_fp8(torch.from_numpy(x), backend="reference")
    assert isinstance(q, torch.Tensor) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))   # float8: torch
    assert _is_view(sf) and np.array_equal(sf, want_sf.numpy())
    # an input that already has the layout asked for comes back as the caller's own array (no copy either way)
    m, kb = 37, 3
    m_pad = pk.get_tma_aligned_size(m, 4)
    aligned = np.random.rand(kb, m_pad).astype(np.float32)[:, :m].T
    assert pk.get_mn_major_tma_aligned_tensor(aligned) is aligned
    moved = pk.get_mn_major_tma_aligned_tensor(np.ascontiguousarray(aligned))
    assert _is_view(moved) and moved.strides == (4, 4 * m_pad) and np.array_equal(moved, aligned)
    # the indexer's key cache: uint8 out, a NumPy view
    k_cache = np.random.rand(2, 64, 1, 128).astype(np.float32)
    packed = PD.quantize_indexer_k_cache(k_cache)
    assert _is_view(packed) and np.array_equal(packed, RD.quantize_indexer_k_cache(torch.from_numpy(k_cache)).numpy())


def test_indexer_logits_into_a_numpy_out(seed):
    m, heads, dim, n = 7, 4, 64, 40
    q = torch.randn(m, heads, dim).to(torch.float8_e4m3fn)
    k, k_scales = RD.indexer_k_cast_to_fp8(torch.randn(n, dim))
    weights = torch.randn(m, heads)
    ks = torch.randint(0, n // 2, (m,), dtype=torch.int32)
    ke = ks + torch.randint(0, n // 2, (m,), dtype=torch.int32)
    out = np.full((m, n), np.nan, dtype=np.float32)
    got = pk.fp8_mqa_logits(q, (k, k_scales.numpy()), weights.numpy(), ks.numpy(), ke.numpy(), out=out)
    assert got is out
    assert torch.equal(torch.from_numpy(out), RD.fp8_mqa_logits(q, k, k_scales, weights, ks, ke))
    # all-torch calls are untouched: torch in, torch out
    assert isinstance(pk.fp8_mqa_logits(q, (k, k_scales), weights, ks, ke), torch.Tensor)


def test_an_array_torch_cannot_import_names_the_argument():
    with pytest.raises(TypeError, match="x: could not import DLPack tensor of type ndarray"):
        pk.per_token_cast_to_fp8(np.array([["a"] * 128], dtype=object))


# ----------------------------------------------------------------------------- CuPy (GPU)

@pytest.mark.gpu
def test_cupy_arrays_in_and_out(seed):
    cp = pytest.importorskip("cupy", reason="cupy is not installed (pip install pykernels[cupy])")
    x = cp.random.standard_normal((64, 256), dtype=cp.float32)
    q, sf = pk.per_token_cast_to_fp8(x)
    want_q, want_sf = pk.per_token_cast_to_fp8(torch.from_dlpack(x))
    assert isinstance(sf, cp.ndarray) and bool((sf == cp.from_dlpack(want_sf)).all())
    # float8 / bfloat16 outputs: CuPy arrays where the installed CuPy holds the dtype, else torch tensors
    assert torch.equal(_torch(q).view(torch.uint8), want_q.view(torch.uint8))
    seqlens, s_q, h_q = [100, 37], 1, 16
    q_, cache, table, lens = (t.cuda() for t in make_problem(seqlens, s_q, h_q))
    lse = cp.full((2, h_q, s_q), cp.nan, dtype=cp.float32)
    meta, splits = pk.get_mla_metadata(cp.from_dlpack(lens), s_q * h_q, 1)
    assert isinstance(meta, cp.ndarray)
    out, got_lse = pk.flash_mla_with_kvcache(q_, cache, cp.from_dlpack(table), cp.from_dlpack(lens), 512, meta,
                                             splits, softmax_lse=lse)
    assert got_lse is lse and not bool(cp.isnan(lse).any())
    ref, ref_lse = RM.flash_mla_with_kvcache(q_.cpu(), cache.cpu(), table.cpu(), lens.cpu(), 512)
    assert (torch.from_dlpack(lse).cpu() - ref_lse).abs().max() < 1e-4
    assert pk.calc_diff(_torch(out).cpu(), ref) < 1e-5


def _torch(x):
    return x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
