"""The Triton DSA kernels (pykernels/triton/dsa_*.py, backend="triton", run by Triton's
interpreter on CPU tensors) against the reference backend on fresh random inputs, outputs
NaN-poisoned first so an element left unwritten fails; and their GPU launches compiled for
sm_90a (ptxas: no spills).

Tolerances:
- indexer logits: float32 sums of the same exact e4m3 products in another order:
  |got - ref| <= 1e-5 * max|ref| + 1e-6 per row block; -inf exactly where the reference has it.
- sparse decode: the kernel rounds P * scale to bf16 for its P.V dot (as on the GPU) where the
  reference stays in float32, and both round out to bf16 (RNE; the interpreter's toward-zero
  cast is replaced by software RNE): out within 2^-7 relative + 2^-9 * max|out| elementwise
  (about one bf16 step) and calc_diff <= 1e-5; lse (float32 both) within 1e-5 relative;
  +inf and out 0 exactly where no slot is used.
- top-k (both forms): exactly the reference's indices, bit for bit (the same order and tie
  rule: docs/dsa.md), -7-poisoned outputs, logits outside the windows +inf / NaN (never read).
- sparse prefill: out and lse as the sparse decode (bf16 kv rows, P rounded to bf16 for P.V);
  max_logits within 1e-5 relative; -inf / +inf exactly where no slot is used; kv rows no used
  slot names are NaN (never read).
"""
import math
import re

import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
import pykernels.mla as M
from pykernels.reference import dsa as RD
from pykernels.triton import dsa_prefill as TP
from pykernels.triton import dsa_topk as TK

FP8 = torch.float8_e4m3fn
NAN = float("nan")
LOGITS_RTOL = 1e-5
WGMMA_E4M3 = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3")


def _assert_logits_match(got, ref):
    outside = ref == -math.inf
    assert not torch.isnan(got).any(), "logits left unwritten (NaN poison) or NaN"
    assert torch.equal(got == -math.inf, outside), "-inf where the reference has none, or missing"
    tol = LOGITS_RTOL * float(ref[~outside].abs().max()) + 1e-6 if (~outside).any() else 0.0
    err = (got[~outside] - ref[~outside]).abs()
    assert err.numel() == 0 or float(err.max()) <= tol, f"max error {float(err.max())} > {tol}"


# ----------------------------------------------------------------------------- fp8_mqa_logits

@pytest.mark.parametrize("m,n,h,d", [(6, 100, 5, 64), (3, 64, 16, 32), (4, 130, 3, 128), (2, 7, 1, 64)])
def test_fp8_mqa_logits_matches_reference(seed, m, n, h, d):
    q = (torch.randn(m, h, d) * 2).to(FP8)
    k, sf = D.indexer_k_cast_to_fp8(torch.randn(n, d) * 3)
    w = torch.randn(m, h)
    ks = torch.randint(0, n + 1, (m,))
    ke = ks + torch.randint(0, n + 1, (m,)) % (n + 1 - ks)
    ks[0], ke[0] = 0, n                                           # the whole key range
    ks[-1] = ke[-1] = ks[-1]                                      # an empty window
    ks, ke = ks.int(), ke.int()
    # any row stride: out is a column slice of a wider buffer, its other columns must stay NaN
    buf = torch.full((m, n + 9), NAN)
    out = buf[:, 4:4 + n]
    got = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="triton", out=out)
    assert got is out
    ref = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="reference")
    _assert_logits_match(out, ref)
    assert buf[:, :4].isnan().all() and buf[:, 4 + n:].isnan().all(), "wrote outside out"


# ----------------------------------------------------------------------------- fp8_paged_mqa_logits

@pytest.mark.parametrize("next_n,block_kv,lens_2d,h,d", [(1, 64, False, 4, 32), (3, 32, False, 5, 64),
                                                        (2, 16, True, 8, 128), (2, 64, True, 1, 64)])
def test_fp8_paged_mqa_logits_matches_reference(seed, next_n, block_kv, lens_2d, h, d):
    b, pages, max_blocks = 4, 20, 4
    q = (torch.randn(b, next_n, h, d) * 2).to(FP8)
    cache = D.quantize_indexer_k_cache(torch.randn(pages, block_kv, 1, d) * 2)
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    cap = block_kv * max_blocks
    lens = torch.tensor([cap, 0, 1, int(torch.randint(next_n, cap + 1, ()))], dtype=torch.int32)
    if lens_2d:
        lens = torch.stack([torch.randint(0, int(L) + 1, (next_n,)) for L in lens]).int()
        lens[1] = 0                                               # a sequence with no key at all
    table[1] = -7                                                 # its pages are never read
    w = torch.randn(b * next_n, h)
    width = cap + 5                                               # positions past every window
    meta = pk.get_paged_mqa_logits_metadata(lens, block_kv, 3, backend="reference")
    out = torch.full((b * next_n, width), NAN)
    got = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="triton", out=out)
    assert got is out
    ref = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="reference")
    _assert_logits_match(out, ref)


# ----------------------------------------------------------------------------- sparse decode

def _assert_decode_matches(out, lse, ref_out, ref_lse):
    from pykernels.metrics import calc_diff
    assert not out.isnan().any() and not lse.isnan().any(), "outputs left unwritten (NaN poison) or NaN"
    o, r = out.float(), ref_out.float()
    bound = 2 ** -7 * r.abs() + 2 ** -9 * float(r.abs().max())
    assert ((o - r).abs() <= bound).all(), f"max error {float((o - r).abs().max())}"
    assert calc_diff(o.double(), r.double()) <= 1e-5
    empty = ref_lse == math.inf
    assert torch.equal(lse == math.inf, empty), "+inf lse (no used slot) differs from the reference"
    assert torch.allclose(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h_q,with_sink,with_length", [(16, False, False), (20, True, False), (64, False, True),
                                                       (3, True, True), (128, True, True)])
def test_sparse_decode_matches_reference(seed, h_q, with_sink, with_length):
    b, s_q, topk, pages = 3, 2, 80, 5
    rows = pages * 64
    cache = M.quantize_kv_cache_fp8((torch.randn(pages, 64, 1, 576) * 2).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, rows, (b, s_q, topk), dtype=torch.int32)
    idx[0, 0, 3:70] = -1                                          # unused slots, a whole tile of them
    idx[1, 1, :] = -1                                             # a row with no used slot
    idx[2, 0, 5] = idx[2, 0, 4]                                   # a duplicate counts twice
    sink = torch.randn(h_q) * 3 if with_sink else None
    length = torch.tensor([topk, 5, 0], dtype=torch.int32) if with_length else None   # sequence 2: no slot
    used = idx != -1
    if with_length:
        idx[1, :, 5:] = 10 ** 6                                   # past topk_length: never read
        used &= torch.arange(topk)[None, None, :] < length[:, None, None]
    unused_rows = ~torch.isin(torch.arange(rows), idx[used])
    cache.view(-1, 656)[unused_rows] = 0x7F                       # rows nobody uses: NaN bytes, scales, RoPE
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    got = D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, backend="triton", out=out, softmax_lse=lse)
    assert got[0] is out and got[1] is lse
    ref_out, ref_lse = D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, backend="reference")
    _assert_decode_matches(out, lse, ref_out, ref_lse)
    assert (out[1, 1] == 0).all() and (lse[1, :, 1] == math.inf).all()


def test_sparse_decode_through_flash_mla_with_kvcache(seed):
    # FlashMLA's call form, with its sparse schedule and the default softmax scale
    b, s_q, h_q, topk = 2, 1, 16, 64
    cache = M.quantize_kv_cache_fp8(torch.randn(3, 64, 1, 576).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, 3 * 64, (b, s_q, topk), dtype=torch.int32)
    seqlens = torch.full((b,), 3 * 64, dtype=torch.int32)
    sched, splits = M.get_mla_metadata(seqlens, s_q * h_q, 1, h_q, True, topk, backend="reference")
    got = M.flash_mla_with_kvcache(q, cache, None, None, 512, sched, splits, is_fp8_kvcache=True, indices=idx,
                                   backend="triton")
    ref = M.flash_mla_with_kvcache(q, cache, None, None, 512, sched, splits, is_fp8_kvcache=True, indices=idx,
                                   backend="reference")
    _assert_decode_matches(*got, *ref)


def test_sparse_decode_nan_in_a_used_row_propagates(seed):
    cache = M.quantize_kv_cache_fp8(torch.randn(2, 64, 1, 576).bfloat16()).view(-1, 656)
    cache[70, 3] = 0x7F                                            # an e4m3 NaN in token row 70
    q = torch.randn(2, 1, 4, 576).bfloat16()
    idx = torch.tensor([[[70, 5, -1]], [[5, 6, 7]]], dtype=torch.int32)
    out, lse = D.flash_mla_sparse_decode(q, cache.view(2, 64, 1, 656), idx, backend="triton")
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all() and lse[1].isfinite().all()


# ----------------------------------------------------------------------------- top-k

SPECIALS = (NAN, -math.inf, math.inf, -0.0, 0.0, -3.4e38, 3.4e38, 1e-45, -1e-45)


def _tied_logits(rows, n):
    """Fresh random logits on a coarse grid (many ties) with special values sprinkled in
    (NaN ranks as -inf, -0.0 ties with +0.0, denormals, the float32 extremes)."""
    x = torch.randint(-8, 8, (rows, n)).float() / 4
    pick = torch.rand(rows, n) < 0.2
    x[pick] = torch.tensor(SPECIALS)[torch.randint(0, len(SPECIALS), (int(pick.sum()),))]
    return x


@pytest.mark.parametrize("m,n,k", [(6, 300, 40), (4, 50, 64), (3, 17, 1), (5, 1000, 100)])
def test_topk_indices_matches_reference(seed, m, n, k):
    logits = _tied_logits(m, n)
    ks = torch.randint(0, n + 1, (m,))
    ke = ks + torch.randint(0, n + 1, (m,)) % (n + 1 - ks)
    ks[0], ke[0] = 0, n                                           # the whole row
    ks[1], ke[1] = n // 3, n // 3 + min(k, n - n // 3) // 2       # shorter than topk: -1 slots
    ks[-1] = ke[-1] = ks[-1]                                      # an empty window: all -1
    ks, ke = ks.int(), ke.int()
    pos = torch.arange(n)[None, :]
    outside = (pos < ks[:, None]) | (pos >= ke[:, None])
    logits[outside] = torch.where(torch.rand(int(outside.sum())) < 0.5, math.inf, NAN)   # never read
    buf = torch.full((m, k + 7), -7, dtype=torch.int32)           # poison; out has a row stride of k + 7
    out = buf[:, 3:3 + k]
    got = D.topk_indices(logits, k, ks, ke, backend="triton", out=out)
    assert got is out
    ref = D.topk_indices(logits, k, ks, ke, backend="reference")
    assert torch.equal(out, ref), f"rows differ: {(out != ref).any(dim=1).nonzero().flatten().tolist()}"
    assert (buf[:, :3] == -7).all() and (buf[:, 3 + k:] == -7).all(), "wrote outside out"
    assert (out[1, (ke[1] - ks[1]):] == -1).all() and (out[-1] == -1).all()


def test_topk_all_ties_take_the_lowest_positions(seed):
    # an independent check of the tie rule: equal logits come out in position order (-0.0
    # equal to +0.0, NaN to -inf)
    n, k = 200, 48
    logits = torch.full((5, n), float(torch.randn(())))
    logits[3] = torch.where(torch.rand(n) < 0.5, -0.0, 0.0)
    logits[4] = torch.where(torch.rand(n) < 0.5, NAN, -math.inf)
    ks = torch.tensor([0, 17, 190, 0, 0], dtype=torch.int32)
    ke = torch.tensor([n, 150, n, n, n], dtype=torch.int32)
    out = D.topk_indices(logits, k, ks, ke, backend="triton")
    assert torch.equal(out[0], torch.arange(k, dtype=torch.int32))
    assert torch.equal(out[1], torch.arange(17, 17 + k, dtype=torch.int32))
    assert torch.equal(out[2], torch.cat([torch.arange(190, n), torch.full((k - 10,), -1)]).int())
    assert torch.equal(out[3], torch.arange(k, dtype=torch.int32))
    assert torch.equal(out[4], torch.arange(k, dtype=torch.int32))


@pytest.mark.parametrize("next_n,lens_2d", [(1, False), (2, False), (3, True)])
def test_paged_topk_indices_matches_reference(seed, next_n, lens_2d):
    b, pages, max_blocks, k = 3, 12, 3, 70
    cap = max_blocks * 64
    width = cap + 5
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([cap, int(torch.randint(next_n, cap, ())), 0], dtype=torch.int32)
    if lens_2d:
        lens = torch.stack([torch.randint(0, int(L) + 1, (next_n,)) for L in lens]).int()
        lens[0, 0] = 30                                           # shorter than topk: -1 slots
    table[2] = -9                                                 # no key: its pages are never read
    logits = _tied_logits(b * next_n, width)
    ends = RD.paged_row_windows(lens, next_n)
    logits[torch.arange(width)[None, :] >= ends[:, None]] = math.inf    # outside the windows: never read
    buf = torch.full((b, next_n + 1, k + 3), -7, dtype=torch.int32)   # poison; out: any strides but the last
    out = buf[:, 1:, 2:2 + k]
    got = D.paged_topk_indices(logits, k, lens, table, backend="triton", out=out)
    assert got is out
    ref = D.paged_topk_indices(logits, k, lens, table, backend="reference")
    assert torch.equal(out, ref)
    assert (out[2] == -1).all()
    assert (buf[:, 0] == -7).all() and (buf[..., :2] == -7).all() and (buf[..., 2 + k:] == -7).all()


def test_topk_triton_limit_is_an_error():
    logits = torch.randn(2, 10)
    win = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([10, 10], dtype=torch.int32)
    k = TK.MAX_TOPK + 1
    with pytest.raises(ValueError, match=rf"backend: 'triton' cannot run .*topk: .*at most {TK.MAX_TOPK}, got {k}"):
        D.topk_indices(logits, k, *win, backend="triton")


# ----------------------------------------------------------------------------- sparse prefill

def test_sparse_prefill_dots_are_float32_when_interpreted():
    # bf16 tl.dot is wrong under the interpreter (../shared/DESIGN.md): the launch must upcast
    q = torch.zeros(1, 16, 576, dtype=torch.bfloat16)
    mx = torch.zeros(1, 16)
    launch = TP.sparse_prefill_launch_args(q, torch.zeros(4, 1, 576, dtype=torch.bfloat16),
                                           torch.zeros(1, 1, 4, dtype=torch.int32), None, None,
                                           torch.zeros(1, 16, 512, dtype=torch.bfloat16), mx, mx.clone(), 0.1)
    assert launch[3]["UPCAST"] and launch[3]["SOFT"]


@pytest.mark.parametrize("d_qk,h_q,with_sink,with_length", [(576, 16, False, False), (576, 20, True, False),
                                                            (512, 8, True, True), (576, 64, False, True),
                                                            (576, 3, True, True)])
def test_sparse_prefill_matches_reference(seed, d_qk, h_q, with_sink, with_length):
    s_q, s_kv, topk = 4, 90, 80
    q = torch.randn(s_q, h_q + 1, d_qk).bfloat16()[:, 1:]                # strided q and kv rows
    kv = torch.randn(s_kv, 2, d_qk).bfloat16()[:, 1:]
    idx = torch.randint(-3, s_kv + 3, (s_q, 1, topk), dtype=torch.int32)  # outside [0, s_kv): skipped
    idx[0, 0, 3:70] = -1                                          # a whole tile of unused slots
    idx[1, 0, :] = s_kv                                           # a token with no used slot
    idx[2, 0, 5] = idx[2, 0, 4] = 7                               # a duplicate counts twice
    sink = torch.randn(h_q) * 3 if with_sink else None
    length = torch.tensor([topk, 5, 60, 0], dtype=torch.int32) if with_length else None   # token 3: no slot
    used = (idx[:, 0] >= 0) & (idx[:, 0] < s_kv)
    if with_length:
        used &= torch.arange(topk)[None, :] < length[:, None]
    kv[~torch.isin(torch.arange(s_kv), idx[:, 0][used])] = NAN    # rows nobody uses: never read
    out = torch.full((s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    mx = torch.full((h_q, s_q), NAN).t()                          # any strides for max_logits / lse
    lse = torch.full((s_q, h_q), NAN)
    got = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="triton", out=out, max_logits=mx,
                                 lse=lse)
    assert got[0] is out and got[1] is mx and got[2] is lse
    ref_out, ref_mx, ref_lse = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="reference")
    _assert_decode_matches(out, lse, ref_out, ref_lse)
    none = ref_mx == -math.inf
    assert torch.equal(mx == -math.inf, none) and torch.equal(none, ref_lse == math.inf)
    assert torch.allclose(mx[~none], ref_mx[~none], rtol=1e-5, atol=1e-5)
    assert (out[1] == 0).all() and none[1].all()


def check_sparse_prefill_nan_in_a_used_row_propagates(backend, h_q):
    """A NaN in a key row that query 0 attends makes query 0's out, max_logits and lse NaN, as
    the reference's; one in a row named only by a skipped slot (past topk_length) changes nothing."""
    q = torch.randn(3, h_q, 576).bfloat16()
    kv = torch.randn(10, 1, 576).bfloat16()
    kv[3, 0, 7] = NAN                                             # token row 3: used by query 0 only
    kv[8, 0, 100] = NAN                                           # row 8: named by a skipped slot only
    idx = torch.tensor([[[3, 5, -1]], [[5, 6, 8]], [[8, 8, 8]]], dtype=torch.int32)
    length = torch.tensor([3, 2, 0], dtype=torch.int32)
    got = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, topk_length=length, backend=backend)
    ref = D.flash_mla_sparse_fwd(q, kv, idx, 0.05, topk_length=length, backend="reference")
    for g, want in zip(got, ref):
        assert torch.equal(g.isnan(), want.isnan())
    assert all(t[0].isnan().all() and t[1].isfinite().all() for t in got)


def test_sparse_prefill_nan_in_a_used_row_propagates(seed):
    check_sparse_prefill_nan_in_a_used_row_propagates("triton", 4)


# ----------------------------------------------------------------------------- sm_90a compilation

@pytest.fixture(scope="module")
def compiled():
    """The GPU launches of the representative shapes (sm90_compile_specs: the launcher's
    specialization, UPCAST off), compiled for sm_90a in a child process."""
    from pykernels.triton import dsa_decode, dsa_logits, sm90
    specs = (dsa_logits.sm90_compile_specs() + dsa_decode.sm90_compile_specs() + TK.sm90_compile_specs()
             + TP.sm90_compile_specs())
    return list(zip(specs, sm90.compile_sm90(specs, jobs=1)))


def test_gpu_launches_compile_for_sm90(compiled):
    for spec, c in compiled:
        print(f"{spec.label}: {c.regs} regs, {c.stack} B stack, {c.shared} B shared")
        # The wide sparse-decode tile (64 heads) keeps 16 bytes of spills in one variant: the
        # measured trade-off of dsa_decode.tile_config. Everything else: none.
        wide = spec.kernel == "_sparse_decode_kernel" and spec.constexprs["BLOCK_M"] == 64
        assert c.stack <= (16 if wide else 0), f"{spec.label}: {c.stack} bytes of local memory (spills) per thread"
        assert c.regs <= 255 and c.shared <= 227 * 1024
        if "logits" in spec.kernel:
            # the q.k dot stays in FP8: keys on the M side make it an e4m3 wgmma for any head count
            assert WGMMA_E4M3.search(c.ptx), f"{spec.label}: no e4m3 wgmma"
