"""MLA decode with several KV heads (h_kv > 1, FlashMLA's dense decode: its tests use h_kv 1, 2, 3
and 8 with h_q a multiple of h_kv): query head h reads KV head h // (h_q / h_kv).

- The reference against an independent float64 computation that takes each KV head's query
  head group explicitly (tolerances of tests/test_mla.py: out within bf16 rounding, LSE
  < 1e-5, same +inf rows).
- Triton (interpreted) and the CUDA kernel's PTX on the emulator against the reference, with
  NaN-poisoned out, lse and split scratch and NaN cache slots past each seqlen (in every KV
  head) and in pages not in use: per (sequence, query head) calc_diff(out) < 1e-5, LSE max
  abs error < 1e-4, identical +inf rows, out 0 where no key is visible (the tolerances of
  the h_kv = 1 tests: the same kernels per KV head).
- The schedule: FlashMLA's get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv) and the
  argument-less form, whose schedule flash_mla_with_kvcache sizes from the cache's h_kv.
Sizes are tiny (the CPU is shared): one or two pages per sequence.
"""
import pytest
import torch

import pykernels.mla as M
import pykernels.mla_schedule as MS
from pykernels import reference as R
from pykernels.cuda import mla as CM
from pykernels.metrics import calc_diff
from pykernels.runtime.device_errors import KernelInputError
from pykernels.triton import mla as TM

from .mla_cases import OUT_CALC_DIFF, check_decode, make_problem, poisoned
from .test_mla import naive


def _check(out, lse, ref, ref_lse):
    """check_decode, and calc_diff(out) within OUT_CALC_DIFF per query head too (each KV head's group)."""
    check_decode(out, lse, ref, ref_lse)
    fin = ref_lse.isfinite()
    for i in range(out.shape[0]):
        for h in range(out.shape[2]):
            if fin[i, h].any():
                assert calc_diff(out[i, :, h], ref[i, :, h]) < OUT_CALC_DIFF, f"sequence {i}, query head {h}"


@pytest.mark.parametrize("seqlens,s_q,h_q,h_kv,causal,scale", [
    ([0, 1, 130], 1, 4, 2, False, None),
    ([2, 65], 2, 9, 3, True, None),          # seqlen 2 = s_q: token 0 sees one key
    ([70], 1, 16, 8, True, 0.1),
])
def test_reference_groups_query_heads_by_kv_head(seqlens, s_q, h_q, h_kv, causal, scale):
    q, cache, table, sl = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    out, lse = R.flash_mla_with_kvcache(q, cache, table, sl, 512, scale, causal)
    g = h_q // h_kv
    for j in range(h_kv):            # KV head j serves query heads [j * g, (j + 1) * g)
        heads = slice(j * g, (j + 1) * g)
        n_out, n_lse = naive(q[:, :, heads], cache.float()[:, :, j:j + 1], table, sl, causal, scale or 576 ** -0.5)
        o, lo = out[:, :, heads], lse[:, heads]
        assert torch.equal(lo.isinf(), n_lse.isinf())
        fin = n_lse.isfinite()
        assert (lo[fin].double() - n_lse[fin]).abs().max() < 1e-5
        assert ((o.double() - n_out).abs() <= n_out.abs() * 2 ** -8 + 1e-6).all(), f"KV head {j}"


# seqlens, s_q, h_q, h_kv, causal, parts, split (some sequence in several pieces), strided out / lse, permuted q
CASES = [
    ([300, 2], 2, 4, 2, True, 6, True, False, False),
    ([130, 1, 0], 1, 9, 3, False, 3, False, True, False),
    ([150], 2, 6, 3, True, 5, True, False, True),
    ([65, 300], 1, 16, 8, True, 6, True, True, False),
]


def _problem(seqlens, s_q, h_q, h_kv, parts, split, permuted_q):
    q, cache, table, sl = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    if permuted_q:       # [b, s_q, h_q, 576] view of a [b, h_q, s_q, 576] tensor
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv, parts)
    assert (ns.diff() > 1).any().item() == split, "case meant to (not) exercise the combine kernel"
    return q, cache, table, sl, meta, ns


@pytest.mark.parametrize("backend", ["triton", "emu"])
@pytest.mark.parametrize("seqlens,s_q,h_q,h_kv,causal,parts,split,strided,permuted_q", CASES)
def test_decode_matches_reference(backend, seqlens, s_q, h_q, h_kv, causal, parts, split, strided, permuted_q,
                                  poisoned_scratch):
    q, cache, table, sl, meta, ns = _problem(seqlens, s_q, h_q, h_kv, parts, split, permuted_q)
    out, lse = poisoned(len(seqlens), s_q, h_q, strided)
    ret = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal, backend=backend,
                                   out=out, softmax_lse=lse)
    assert ret[0] is out and ret[1] is lse
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal, backend="reference")
    _check(out, lse, ref, ref_lse)


def test_kv_heads_are_not_interchangeable():
    # Swapping two KV heads of the cache moves the results between their query head groups
    # (and changes them: the heads hold different keys), on every backend.
    seqlens, s_q, h_q, h_kv = [90], 1, 4, 2
    q, cache, table, sl, meta, ns = _problem(seqlens, s_q, h_q, h_kv, 2, False, False)
    q[:, :, 2:] = q[:, :, :2]                       # both groups ask the same questions
    swapped = cache.flip(2).contiguous()
    for backend in ("reference", "triton", "emu"):
        o, lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, backend=backend)
        o2, lse2 = M.flash_mla_with_kvcache(q, swapped, table, sl, 512, meta, ns, backend=backend)
        assert torch.equal(o2[:, :, :2], o[:, :, 2:]) and torch.equal(o2[:, :, 2:], o[:, :, :2]), backend
        assert torch.equal(lse2[:, :2], lse[:, 2:]), backend
        assert calc_diff(o[:, :, :2], o[:, :, 2:]) > 0.1, backend


def test_flashmla_schedule_forms():
    seqlens, s_q, h_q, h_kv = [100, 7], 2, 8, 2
    q, cache, table, sl = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, *M.get_mla_metadata(sl, 8, h_kv),
                                            causal=True, backend="reference")
    # FlashMLA's positional form: the default partition count is per (KV head, 64-row tile)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
    assert meta.shape[0] == MS.default_num_sm_parts(sl.device, s_q * h_q // h_kv, h_kv)
    assert MS.default_num_sm_parts(sl.device, 8, 8) == MS.default_num_sm_parts(sl.device, 8, 1) // 8
    out, lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="triton")
    _check(out, lse, ref, ref_lse)
    # the argument-less form: flash_mla_with_kvcache sizes the schedule from the cache's h_kv
    sched, none = M.get_mla_metadata()
    built = []
    real = MS.MlaSchedule.resolve

    def spy(self, seqlens_, rows, heads_k, parts, build):
        built.append((rows, heads_k, parts))
        return real(self, seqlens_, rows, heads_k, parts, build)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MS.MlaSchedule, "resolve", spy)
        out2, lse2 = M.flash_mla_with_kvcache(q, cache, table, sl, 512, sched, none, causal=True, backend="triton")
    assert built == [(s_q * h_q // h_kv, h_kv, meta.shape[0])] and sched.builds == 1
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
def test_bad_head_counts(backend):
    q, cache, table, sl = make_problem([70], 1, 16, h_kv=1)
    meta, ns = M.get_mla_metadata(sl, 16, 1, 2)
    with pytest.raises(ValueError, match=r"k_cache: expected h_kv \(dim 2\) >= 1 dividing h_q = 16 .*got 3"):
        M.flash_mla_with_kvcache(q, cache.expand(-1, -1, 3, -1).contiguous(), table, sl, 512, meta, ns,
                                 backend=backend)
    fp8 = M.quantize_kv_cache_fp8(cache.expand(-1, -1, 2, -1).contiguous())
    assert fp8.shape == (cache.shape[0], 64, 2, 656)
    with pytest.raises(ValueError, match=r"k_cache: expected h_kv = 1 \(dim 2\) for the FP8 layout .*got 2"):
        M.flash_mla_with_kvcache(q, fp8, table, sl, 512, meta, ns, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "emu"])
def test_kernel_checks_with_several_kv_heads(backend):
    # The kernels' own input checks (GPU tensors skip the host checks) run for every KV head
    # (a Triton program per head, a CUDA launch per head): a stale schedule and a page id
    # past the cache are recorded and raised, nothing out of bounds is read.
    seqlens, s_q, h_q, h_kv = [100, 7], 1, 4, 2
    q, cache, table, sl = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    meta, ns = M.get_mla_metadata(torch.tensor([100, 70], dtype=torch.int32), s_q * h_q // h_kv, h_kv, 3)
    bad_table = table.clone()
    bad_table[0, 1] = cache.shape[0]
    good_meta, good_ns = M.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv, 3)
    for args, pattern in (((table, sl, meta, ns), "tile_scheduler_metadata: .*was made for"),
                          ((bad_table, sl, good_meta, good_ns), "block_table")):
        out, lse = poisoned(len(seqlens), s_q, h_q, False)
        with pytest.raises(KernelInputError, match=pattern):
            if backend == "emu":
                CM.flash_mla_with_kvcache(q, cache, *args, out, lse, 512, None, True, executor="emu")
            else:
                TM.flash_mla_with_kvcache(q, cache, *args, out, lse, 512, None, True)


def test_custom_op_opcheck_with_several_kv_heads():
    q, cache, table, sl = make_problem([70, 5], 2, 6, h_kv=3)
    meta, ns = M.get_mla_metadata(sl, 4, 3, 4)
    out, lse = torch.empty(2, 2, 6, 512, dtype=torch.bfloat16), torch.empty(2, 6, 2)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    result = torch.library.opcheck(torch.ops.pykernels.flash_mla_with_kvcache.default,
                                   (q, cache, table, sl, meta, ns, out, lse, 512, 576 ** -0.5, True, "reference"),
                                   test_utils=utils)
    assert result == {u: "SUCCESS" for u in utils}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("seqlens,s_q,h_q,h_kv,causal,parts,split,strided,permuted_q", CASES)
def test_gpu_decode_matches_reference(backend, seqlens, s_q, h_q, h_kv, causal, parts, split, strided, permuted_q,
                                      poisoned_scratch):
    from pykernels.runtime.executors import gpu_unavailable_reason
    assert gpu_unavailable_reason() == ""
    q, cache, table, sl, meta, ns = _problem(seqlens, s_q, h_q, h_kv, parts, split, permuted_q)
    out, lse = poisoned(len(seqlens), s_q, h_q, strided)
    dev = [t.cuda() for t in (q, cache, table, sl, meta, ns, out, lse)]
    M.flash_mla_with_kvcache(*dev[:4], 512, dev[4], dev[5], causal=causal, backend=backend,
                             out=dev[6], softmax_lse=dev[7])
    torch.cuda.synchronize()
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal, backend="reference")
    _check(dev[6].cpu(), dev[7].cpu(), ref, ref_lse)
