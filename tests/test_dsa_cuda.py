"""The hand-written DSA kernels (host side pykernels/cuda/dsa.py): indexer logits
(csrc/dsa/indexer_logits.cu: the paged decode form and the ragged prefill form), top-k
(csrc/dsa/topk.cu, both forms; compared with the reference bit for bit, ties and specials
included) and the sparse MLA decode (csrc/mla/decode.cu's pk_mla_sparse_decode_fp8, with the
Triton kernel's tolerances: tests/test_dsa_triton.py): what was compiled (SASS, ptxas resources), the launch plan, the same
kernel's PTX run by the emulator (backend "emu", memory-ordering checker on, every CTA
schedule) against the reference on fresh random inputs with NaN-poisoned outputs, its
limits, and a GPU run (marked `gpu`).

Tolerance (as for the Triton kernel, tests/test_dsa_triton.py): the e4m3 products are
exact in float32 and only their summation order differs (wgmma's k32 steps, then the head
reduction per thread and across the quad): |got - ref| <= 1e-5 * max|ref| + 1e-6, and -inf
exactly where the reference has it.
"""
import dataclasses
import math
import re

import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
import pykernels.mla as M
from pykernels.cuda import dsa as CD
from pykernels.reference import dsa as RD
from pykernels.runtime import artifacts, sass
from pykernels.runtime.executors import gpu_unavailable_reason, run_emu

from .test_dsa_triton import _assert_decode_matches, _assert_logits_match, _tied_logits

FP8 = torch.float8_e4m3fn
NAN = float("nan")
SCHEDULES = ("lockstep", "cta_first", "cta_last", "wg_first", "wg_last")


def _problem(b, next_n, h, lens_2d, pages=24, max_blocks=6, device="cpu"):
    """Random q, cache and windows covering: a full table, a sequence with no key (its page
    ids invalid: never read), one key, and a random length; positions past every window."""
    d, blk = CD.HEAD_DIM, CD.BLOCK_KV
    q = (torch.randn(b, next_n, h, d) * 2).to(FP8)
    cache = D.quantize_indexer_k_cache(torch.randn(pages, blk, 1, d) * 2)
    table = torch.randperm(max(pages, b * max_blocks))[:b * max_blocks].int().view(b, max_blocks) % pages
    cap = blk * max_blocks
    lens = torch.tensor([cap, 0, 1] + [int(torch.randint(next_n, cap + 1, ()))
                                       for _ in range(b - 3)], dtype=torch.int32)[:b]
    if lens_2d:
        lens = torch.stack([torch.randint(0, int(n) + 1, (next_n,)) for n in lens]).int()
    table[1] = -7
    w = torch.randn(b * next_n, h)
    width = cap + 70                                  # a page past every window
    meta = pk.get_paged_mqa_logits_metadata(lens, blk, 3, backend="reference")
    return [t.to(device) for t in (q, cache, w, lens, table, meta)] + [width]


def _ragged(m, n, h):
    """Random prefill inputs: windows covering everything, nothing, one key, and random ones."""
    q = (torch.randn(m, h, CD.HEAD_DIM) * 2).to(FP8)
    k, sf = D.indexer_k_cast_to_fp8(torch.randn(n, CD.HEAD_DIM) * 3)
    w = torch.randn(m, h)
    ks = torch.randint(0, n + 1, (m,))
    ke = ks + torch.randint(0, n + 1, (m,)) % (n + 1 - ks)
    ks[0], ke[0] = 0, n
    ks[1] = ke[1] = n // 2                                       # an empty window
    ks[2], ke[2] = n - 1, n                                      # the last key only
    return q, k, sf, w, ks.int(), ke.int()


def _emu_run(args, out, schedule="lockstep", max_ctas=None):
    q, cache, w, lens, table, _, width = args
    plan = CD.paged_logits_plan(q, cache, w, lens, table, out, width, max_ctas=max_ctas)
    return run_emu(plan, schedule=schedule)


# ------------------------------------------------------------------------ compiled code

def test_every_layout_and_head_count_is_compiled():
    funcs = artifacts.manifest()["kernels"][CD.MODULE]["functions"]
    assert set(funcs) == set(CD.PAGED_FUNCTIONS.values()) | set(CD.RAGGED_FUNCTIONS.values())
    for fn in funcs:
        r = artifacts.resources(CD.MODULE, fn)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0, fn
        assert r["shared_bytes"] == 0                  # all shared memory is dynamic
        rows = 2 if fn.endswith("_x2") else 1           # query rows per wgmma
        heads = int(fn.removesuffix("_x2").rsplit("_h", 1)[1])
        # the CTAs one SM holds by shared memory at the smallest next_n the entry serves (1, or
        # 2 for the two-row entries) fit its register file too (registers allocated 8 at a time)
        regs = -(-r["registers"] // 8) * 8
        assert regs * CD.THREADS * CD.ctas_per_sm(heads, rows) <= 65536, fn


@pytest.mark.parametrize("heads", CD.HEADS)
@pytest.mark.parametrize("paged,rows", [(True, 1), (True, 2), (False, 1)])
def test_sass_has_the_intended_instructions(heads, paged, rows):
    parts = re.split(r"\n\s*Function : ", sass.sass(CD.MODULE))
    name = CD.PAGED_FUNCTIONS[heads, rows] if paged else CD.RAGGED_FUNCTIONS[heads]
    listing = next(p for p in parts[1:] if p.split()[0] == name)
    ops = sass.opcodes(listing)
    # a pair (key block, `rows` query rows) is 4 k32 steps of K (64 keys) x Q^T (rows x heads:
    # the rows' Q tiles are consecutive), both from shared memory, issued at 3 places: the
    # item's first pair, then the loop's two accumulators (the next pair's wgmma runs while
    # this one's head sum is computed)
    assert len(re.findall(rf"QGMMA\.64x{rows * heads}x32\.F32\.E4M3\.E4M3", listing)) == 3 * 4
    assert not re.search(rf"QGMMA\.64x{(3 - rows) * heads}x32", listing)
    assert ops["UTMALDG.2D"] >= 1                                   # Q tiles (and ragged key blocks, paged scales)
    assert (ops.get("UTMALDG.3D", 0) >= 1) == paged                 # pages through the 3-D map
    assert (ops.get("UTMALDG.1D", 0) >= 1) != paged                 # k_scales through the 1-D map
    assert any(op.startswith("SYNCS.PHASECHK") for op in ops)
    assert any(op.startswith("SHFL.BFLY") for op in ops)            # the quad's head reduction
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"


def test_shared_memory_plan():
    # alignment slack + 2 stages of (4 key blocks of 8 KB and their 256 bytes of scales +
    # group_rows Q tiles of heads x 128 bytes and weights rows of heads x 4, rounded to 1 KB)
    # + 6 mbarriers and a 52-byte item info per stage
    assert CD.smem_bytes(64) == 1024 + 2 * (4 * 8192 + 4 * 256 + 4 * 64 * 132) + 2 * (48 + 52)
    assert CD.smem_bytes(32, 1) == 1024 + 2 * (4 * 8192 + 4 * 256 + 32 * 132 + 896) + 2 * (48 + 52)
    assert CD.ctas_per_sm(64, 1) == 2 and CD.ctas_per_sm(64, 4) == 1


def test_plan_geometry():
    args = _problem(4, 2, 64, False)
    q, cache, w, lens, table, _, width = args
    out = torch.empty(8, width)
    plan = CD.paged_logits_plan(q, cache, w, lens, table, out, width)
    items = 4 * -(-(-(-width // CD.BLOCK_KV)) // CD.BLOCKS_PER_CTA)          # b x chunks: fewer than the SMs hold
    assert plan.grid == (items, 1, 1) and plan.block == (CD.THREADS, 1, 1)
    assert plan.function == CD.PAGED_FUNCTIONS[64, 2] and plan.shared_bytes == CD.smem_bytes(64, 2)   # even next_n
    assert CD.rows_per_wgmma(2) == CD.rows_per_wgmma(4) == 2 and CD.rows_per_wgmma(1) == CD.rows_per_wgmma(3) == 1
    assert CD.paged_logits_plan(q, cache, w, lens, table, out, width, max_ctas=3).grid == (3, 1, 1)
    q, k, sf, w, ks, ke = _ragged(9, 200, 32)
    plan = CD.ragged_logits_plan(q, k, sf, w, ks, ke, torch.empty(9, 200))
    assert plan.grid == (3, 1, 1) and plan.function == CD.RAGGED_FUNCTIONS[32]


# ------------------------------------------------------------------------ emulator

@pytest.mark.parametrize("b,next_n,h,lens_2d", [(4, 1, 64, False), (3, 2, 32, True), (4, 4, 64, True),
                                                (3, 3, 32, False)])
def test_emu_matches_reference(seed, b, next_n, h, lens_2d):
    args = _problem(b, next_n, h, lens_2d)
    q, cache, w, lens, table, meta, width = args
    # out is a column slice of a wider buffer: any row stride; its other columns stay NaN
    buf = torch.full((b * next_n, width + 11), NAN)
    out = buf[:, 3:3 + width]
    got = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="emu", out=out)
    assert got is out
    ref = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="reference")
    _assert_logits_match(out, ref)
    assert buf[:, :3].isnan().all() and buf[:, 3 + width:].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("max_ctas", [2, 5])
def test_emu_result_independent_of_schedule_and_grid(seed, schedule, max_ctas):
    # 9 pages of 3 sequences: 3 chunks each (4, 4 and 1 pages), walked by 2 or 5 persistent
    # CTAs through the two-stage ring (stages reused, barrier phases past the first)
    args = _problem(3, 2, 64, False, max_blocks=9)
    ref = pk.fp8_paged_mqa_logits(*args, backend="reference")
    out = torch.full_like(ref, NAN)
    _emu_run(args, out, schedule, max_ctas)
    _assert_logits_match(out, ref)


def test_emu_window_shorter_than_max_context_len(seed):
    # max_context_len far past the table: whole CTAs with no page clean their range to -inf
    q, cache, w, lens, table, meta, _ = _problem(3, 1, 32, False, max_blocks=2)
    width = 700
    ref = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="reference")
    out = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="emu")
    _assert_logits_match(out, ref)
    assert (out[:, 2 * CD.BLOCK_KV:] == -math.inf).all()


@pytest.mark.parametrize("m,n,h", [(9, 200, 64), (5, 64, 32), (4, 333, 32), (3, 1, 64)])
def test_emu_ragged_matches_reference(seed, m, n, h):
    q, k, sf, w, ks, ke = _ragged(m, n, h) if m > 3 else _ragged_small(m, n, h)
    buf = torch.full((m, n + 6), NAN)
    out = buf[:, 2:2 + n]
    got = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="emu", out=out)
    assert got is out
    ref = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="reference")
    _assert_logits_match(out, ref)
    assert buf[:, :2].isnan().all() and buf[:, 2 + n:].isnan().all(), "wrote outside out"


def _ragged_small(m, n, h):
    q, k, sf, w, _, _ = _ragged(3, max(n, 3), h)
    k, sf = k[:n], sf[:n]
    return q[:m], k, sf, w[:m], torch.zeros(m, dtype=torch.int32), torch.full((m,), n, dtype=torch.int32)


@pytest.mark.parametrize("schedule", SCHEDULES[1:])
def test_emu_ragged_result_independent_of_schedule(seed, schedule):
    q, k, sf, w, ks, ke = _ragged(6, 300, 64)
    ref = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="reference")
    out = torch.full_like(ref, NAN)
    run_emu(CD.ragged_logits_plan(q, k, sf, w, ks, ke, out, max_ctas=2), schedule=schedule)   # 2 items each
    _assert_logits_match(out, ref)


# ------------------------------------------------------------------------ top-k (csrc/dsa/topk.cu)

def _topk_prefill_case(m, n, k):
    """Tied logits with specials (NaN, +-0, +-inf); windows: whole row, shorter than topk,
    empty; positions outside the windows hold +inf / NaN (never read)."""
    logits = _tied_logits(m, n)
    ks = torch.randint(0, n + 1, (m,))
    ke = ks + torch.randint(0, n + 1, (m,)) % (n + 1 - ks)
    ks[0], ke[0] = 0, n
    ks[1], ke[1] = n // 3, n // 3 + min(k, n - n // 3) // 2
    ks[-1] = ke[-1] = ks[-1]
    pos = torch.arange(n)[None, :]
    outside = (pos < ks[:, None]) | (pos >= ke[:, None])
    logits[outside] = torch.where(torch.rand(int(outside.sum())) < 0.5, math.inf, NAN)
    return logits, ks.int(), ke.int()


@pytest.mark.parametrize("m,n,k", [(5, 300, 40), (3, 17, 1), (4, 1100, 100), (3, 700, 600)])
def test_emu_topk_matches_reference_exactly(seed, m, n, k):
    logits, ks, ke = _topk_prefill_case(m, n, k)
    buf = torch.full((m, k + 5), -7, dtype=torch.int32)           # poison; a row stride of k + 5
    out = buf[:, 2:2 + k]
    got = D.topk_indices(logits, k, ks, ke, backend="emu", out=out)
    assert got is out
    ref = D.topk_indices(logits, k, ks, ke, backend="reference")
    assert torch.equal(out, ref), f"rows differ: {(out != ref).any(dim=1).nonzero().flatten().tolist()}"
    assert (buf[:, :2] == -7).all() and (buf[:, 2 + k:] == -7).all(), "wrote outside out"
    assert (out[-1] == -1).all()


def test_emu_topk_ties_take_the_lowest_positions():
    n, k = 600, 70                                                # ties across chunks of 512 positions
    logits = torch.full((3, n), 0.5)
    logits[1] = torch.where(torch.rand(n) < 0.5, -0.0, 0.0)
    logits[2, :] = -1.0
    logits[2, 550:] = 0.25                                        # 50 larger ones, then ties from the start
    ks = torch.tensor([0, 13, 0], dtype=torch.int32)
    ke = torch.tensor([n, n, n], dtype=torch.int32)
    out = D.topk_indices(logits, k, ks, ke, backend="emu")
    assert torch.equal(out[0], torch.arange(k, dtype=torch.int32))
    assert torch.equal(out[1], torch.arange(13, 13 + k, dtype=torch.int32))
    assert torch.equal(out[2], torch.cat([torch.arange(550, n), torch.arange(k - 50)]).int())


@pytest.mark.parametrize("next_n,lens_2d,schedule", [(1, False, "lockstep"), (2, True, "cta_last"),
                                                     (3, False, "wg_first")])
def test_emu_paged_topk_matches_reference_exactly(seed, next_n, lens_2d, schedule):
    b, pages, max_blocks, k = 3, 12, 3, 70
    cap = max_blocks * CD.BLOCK_KV
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([cap, int(torch.randint(next_n, cap, ())), 0], dtype=torch.int32)
    if lens_2d:
        lens = torch.stack([torch.randint(0, int(n) + 1, (next_n,)) for n in lens]).int()
        lens[0, 0] = 30
    table[2] = -9                                                 # no key: its pages are never read
    logits = _tied_logits(b * next_n, cap + 5)
    ends = RD.paged_row_windows(lens, next_n)
    logits[torch.arange(cap + 5)[None, :] >= ends[:, None]] = math.inf
    ref = D.paged_topk_indices(logits, k, lens, table, backend="reference")
    out = torch.full((b, next_n, k), -7, dtype=torch.int32)
    run_emu(CD.topk_plan(logits, out, k, context_lens=lens, block_table=table), schedule=schedule)
    assert torch.equal(out, ref)


def test_topk_kernel_limit_is_an_error():
    logits = torch.randn(2, 10)
    win = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([10, 10], dtype=torch.int32)
    k = CD.MAX_TOPK + 1
    with pytest.raises(ValueError, match=rf"backend: 'emu' cannot run .*topk: .*at most {CD.MAX_TOPK}, got {k}"):
        D.topk_indices(logits, k, *win, backend="emu")


# ------------------------------------------------------------------------ sparse decode (csrc/mla/decode.cu)

def _sparse_case(b, s_q, h_q, topk, pages, with_sink, with_length):
    """A sparse decode problem: unused slots (a whole 64-slot block of them, a row with none
    used), a duplicate index, topk_length with a sequence of no slot; cache rows no slot uses
    hold NaN bytes (never read)."""
    rows = pages * 64
    cache = M.quantize_kv_cache_fp8((torch.randn(pages, 64, 1, 576) * 2).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, rows, (b, s_q, topk), dtype=torch.int32)
    idx[0, 0, 3:70] = -1
    idx[1, s_q - 1, :] = -1
    idx[b - 1, 0, 5] = idx[b - 1, 0, 4]
    sink = torch.randn(h_q) * 3 if with_sink else None
    length = torch.tensor([topk, 5, 0][:b], dtype=torch.int32) if with_length else None
    used = idx != -1
    if with_length:
        idx[1, :, 5:] = 10 ** 6                                   # past topk_length: never read
        used &= torch.arange(topk)[None, None, :] < length[:, None, None]
    cache.view(-1, 656)[~torch.isin(torch.arange(rows), idx[used])] = 0x7F
    return q, cache, idx, sink, length


@pytest.mark.parametrize("b,s_q,h_q,topk,parts,with_sink,with_length",
                         [(3, 2, 64, 80, 3, True, True), (2, 1, 128, 64, None, False, False),
                          (2, 2, 64, 150, "flashmla", True, False)])
def test_emu_sparse_decode_matches_reference(seed, b, s_q, h_q, topk, parts, with_sink, with_length):
    q, cache, idx, sink, length = _sparse_case(b, s_q, h_q, topk, 5, with_sink, with_length)
    sched = splits = None                                          # None: the kernel makes its own schedule
    if parts == "flashmla":                                        # FlashMLA's sparse form (topk per sequence)
        seqlens = torch.full((b,), 5 * 64, dtype=torch.int32)
        sched, splits = M.get_mla_metadata(seqlens, s_q * h_q, 1, h_q, True, topk, backend="reference")
    elif parts is not None:                                        # few partitions: sequences split
        sched, splits = M.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), s_q * h_q, 1, parts,
                                           backend="reference")
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    got = D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, sched, splits, backend="emu", out=out,
                                    softmax_lse=lse)
    assert got[0] is out and got[1] is lse
    ref_out, ref_lse = D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, backend="reference")
    _assert_decode_matches(out, lse, ref_out, ref_lse)
    assert (out[1, s_q - 1] == 0).all() and (lse[1, :, s_q - 1] == math.inf).all()


@pytest.mark.parametrize("schedule", ["wg_first", "wg_last", "cta_last"])
def test_emu_sparse_decode_when_one_warpgroup_runs_ahead(seed, schedule, monkeypatch):
    q, cache, idx, sink, length = _sparse_case(2, 1, 64, 130, 4, True, False)
    sched, splits = M.get_mla_metadata(torch.full((2,), 130, dtype=torch.int32), 64, 1, 2, backend="reference")
    monkeypatch.setattr(CD, "run_plan", lambda plan, executor: run_emu(plan, schedule=schedule))
    out, lse = D.flash_mla_sparse_decode(q, cache, idx, None, sink, None, sched, splits, backend="emu")
    _assert_decode_matches(out, lse, *D.flash_mla_sparse_decode(q, cache, idx, None, sink, None, backend="reference"))


def test_emu_sparse_decode_nan_in_a_used_row_propagates():
    cache = M.quantize_kv_cache_fp8(torch.randn(2, 64, 1, 576).bfloat16()).view(-1, 656)
    cache[70, 3] = 0x7F                                            # an e4m3 NaN in token row 70
    q = torch.randn(2, 1, 64, 576).bfloat16()
    idx = torch.tensor([[[70, 5, -1]], [[5, 6, 7]]], dtype=torch.int32)
    out, lse = D.flash_mla_sparse_decode(q, cache.view(2, 64, 1, 656), idx, backend="emu")
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all() and lse[1].isfinite().all()


def test_sparse_decode_kernel_limits():
    # h_q <= 32 runs the narrow kernel (tests/test_dsa_sparse_narrow.py), multiples of 64 the 64-row one
    q, cache, idx, _, _ = _sparse_case(2, 1, 48, 64, 2, False, False)
    text = pk.explain("flash_mla_sparse_decode", q, cache, idx, backend="auto")
    assert "q: the cuda/emu sparse decode kernels need h_q at most 32 or a multiple of 64" in text
    assert "got h_q 48" in text


def test_auto_on_cpu_and_explain_give_the_kernel_limits():
    args = _problem(3, 1, 16, False)                  # 16 heads: not an instantiation
    text = pk.explain("fp8_paged_mqa_logits", *args, backend="auto")
    assert "supports [32, 64] heads, got 16" in text
    q, k, sf, w, ks, ke = _ragged(4, 64, 64)
    with pytest.raises(ValueError, match=r"q: the cuda/emu indexer-logits kernel needs head dim 128, got 64"):
        pk.fp8_mqa_logits(q[..., :64].contiguous(), (k[:, :64].contiguous(), sf), w, ks, ke, backend="emu")
    args5 = _problem(3, 5, 32, False)
    with pytest.raises(ValueError, match=r"next_n <= 4, got 5"):
        pk.fp8_paged_mqa_logits(*args5, backend="emu")
    # k_scales is read through a tensor map: its data pointer must be 16-byte aligned
    sf_odd = torch.empty(sf.numel() + 1)[1:].copy_(sf)
    with pytest.raises(ValueError, match=r"k_scales: the cuda/emu indexer-logits kernel reads it with TMA, which "
                                         r"needs a 16-byte aligned data pointer"):
        pk.fp8_mqa_logits(q, (k, sf_odd), w, ks, ke, backend="emu")


def test_emu_rejects_other_page_sizes():
    d = CD.HEAD_DIM
    q = torch.randn(1, 1, 32, d).to(FP8)
    cache = D.quantize_indexer_k_cache(torch.randn(4, 32, 1, d))
    lens = torch.tensor([40], dtype=torch.int32)
    table = torch.arange(4, dtype=torch.int32)[None]
    meta = pk.get_paged_mqa_logits_metadata(lens, 32, 2, backend="reference")
    with pytest.raises(ValueError, match=r"kv_cache: the cuda/emu indexer-logits kernel needs pages of 64 keys"):
        pk.fp8_paged_mqa_logits(q, cache, torch.randn(1, 32), lens, table, meta, 64, backend="emu")


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("next_n,h,lens_2d", [(1, 64, False), (2, 64, True), (4, 32, False)])
def test_cuda_matches_reference(seed, next_n, h, lens_2d):
    assert not gpu_unavailable_reason()
    args = _problem(6, next_n, h, lens_2d, pages=64, max_blocks=10, device="cuda")
    ref = pk.fp8_paged_mqa_logits(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args],
                                  backend="reference")
    out = torch.full(ref.shape, NAN, device="cuda")
    pk.fp8_paged_mqa_logits(*args, backend="cuda", out=out)
    _assert_logits_match(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("h_q,with_sink", [(64, True), (128, False)])
def test_cuda_sparse_decode_matches_reference(seed, h_q, with_sink):
    assert not gpu_unavailable_reason()
    q, cache, idx, sink, length = _sparse_case(3, 2, h_q, 2048, 64, with_sink, True)
    ref = D.flash_mla_sparse_decode(q, cache, idx, None, sink, length, backend="reference")
    got = D.flash_mla_sparse_decode(*(None if t is None else t.cuda() for t in (q, cache, idx)), None,
                                    *(None if t is None else t.cuda() for t in (sink, length)), backend="cuda")
    _assert_decode_matches(got[0].cpu(), got[1].cpu(), *ref)


@pytest.mark.gpu
def test_cuda_topk_matches_reference_exactly(seed):
    assert not gpu_unavailable_reason()
    logits, ks, ke = _topk_prefill_case(64, 8192, 2048)
    ref = D.topk_indices(logits, 2048, ks, ke, backend="reference")
    out = D.topk_indices(logits.cuda(), 2048, ks.cuda(), ke.cuda(), backend="cuda")
    assert torch.equal(out.cpu(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,h", [(37, 1000, 64), (16, 4096, 32)])
def test_cuda_ragged_matches_reference(seed, m, n, h):
    assert not gpu_unavailable_reason()
    args = _ragged(m, n, h)
    ref = pk.fp8_mqa_logits(args[0], (args[1], args[2]), *args[3:], backend="reference")
    q, k, sf, w, ks, ke = (t.cuda() for t in args)
    out = pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend="cuda")
    _assert_logits_match(out.cpu(), ref)


# ------------------------------------------------------------------------ device input checks
# Index and length values are checked by the kernels into the device error record (no host
# read on the GPU): the emulator raises the recorded error right after the launch, naming the
# op, the argument, the bound and the bad value; the bad row (or the item of a bad page) is
# written empty (-inf / -1) and every other row as the reference. The kernels are called
# through pykernels.cuda.dsa: the public API checks CPU tensors on the host first, with the
# same words (checked here on the reference and Triton backends).

def _raises_recorded(call, op, code_name, a0, a1, a2):
    """call() raises the KernelInputError of `code_name` with arguments (a0, a1, a2), its
    message the host check's words after the op's name; the record is cleared."""
    from pykernels.runtime import device_errors as DE
    with pytest.raises(DE.KernelInputError) as info:
        call()
    err = info.value
    assert err.code == DE.code(code_name) and err.args_recorded == (a0, a1, a2), str(err)
    assert str(err).startswith(f"{op}: {DE.describe(code_name, a0, a1, a2)} [found by the kernel"), str(err)
    assert DE.record_for(torch.device("cpu"), op).eq(0).all(), "record not cleared"
    return DE.describe(code_name, a0, a1, a2)


def _host_raises(call, message):
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError) as info:
            call(backend)
        assert str(info.value) == message, (backend, str(info.value))


def _bad_paged(case):
    """A small paged problem (3 sequences of up to 2 pages, 32 heads) and one bad value:
    (inputs, the bad sequence, code, a0, a1, a2)."""
    b, pages, max_blocks = 3, 8, 2
    cap = max_blocks * CD.BLOCK_KV
    q, cache, w, lens, table, _, _ = _problem(b, 2 if case == "lens-2d-negative" else 1, 32,
                                              case == "lens-2d-negative", pages=pages, max_blocks=max_blocks)
    lens = lens.clone()
    if lens.dim() == 1:
        lens[:] = torch.tensor([cap, 70, 100], dtype=torch.int32)
    else:
        lens[:] = torch.tensor([[cap, cap], [60, 70], [99, 100]], dtype=torch.int32)
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    width = cap + 30
    if case == "lens-past-table":
        lens[2] = cap + 1
        return (q, cache, w, lens, table, width), 2, "ContextLensOutOfRange", cap + 1, cap, 2
    if case == "lens-past-max-context-len":
        width = 90
        lens[0], lens[2] = 91, 80
        return (q, cache, w, lens, table, width), 0, "ContextLensOutOfRange", 91, 90, 0
    if case == "lens-2d-negative":
        lens[1, 1] = -3
        return (q, cache, w, lens, table, width), 1, "ContextLensOutOfRange", -3, cap, 3
    if case == "page-past-cache":
        table[0, 1] = pages + 5
        return (q, cache, w, lens, table, width), 0, "BlockTableOutOfRange", pages + 5, pages, 0
    assert case == "page-negative"
    table[2, 0] = -1
    return (q, cache, w, lens, table, width), 2, "BlockTableOutOfRange", -1, pages, 2


@pytest.mark.parametrize("case", ["lens-past-table", "lens-past-max-context-len", "lens-2d-negative",
                                  "page-past-cache", "page-negative"])
def test_emu_paged_logits_record_bad_values(seed, case):
    (q, cache, w, lens, table, width), bad_seq, code_name, a0, a1, a2 = _bad_paged(case)
    next_n = q.shape[1]
    out = torch.full((q.shape[0] * next_n, width), NAN)
    message = _raises_recorded(lambda: CD.fp8_paged_mqa_logits(q, cache, w, lens, table, out, width, "emu"),
                               CD.PAGED_OP_NAME, code_name, a0, a1, a2)
    rows = slice(bad_seq * next_n, (bad_seq + 1) * next_n)
    if code_name == "ContextLensOutOfRange":
        assert (out[rows] == -math.inf).all(), "a row with a bad length is written empty"
    else:   # a bad page empties its item (4 pages): here the whole sequence
        assert (out[rows] == -math.inf).all()
    good = torch.ones(q.shape[0], dtype=torch.bool)
    good[bad_seq] = False
    fixed_lens = lens.clone()
    fixed_lens[bad_seq] = 0
    ref = RD.fp8_paged_mqa_logits(q, cache, w, fixed_lens, table.clamp(0, cache.shape[0] - 1), width)
    keep = good.repeat_interleave(next_n)
    _assert_logits_match(out[keep], ref[keep])
    meta = RD.get_paged_mqa_logits_metadata(lens.clamp(min=0), CD.BLOCK_KV, 2)
    _host_raises(lambda be: pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend=be), message)


@pytest.mark.parametrize("case", ["ks-negative", "ks-past-keys", "ke-before-ks", "ke-past-keys"])
def test_emu_ragged_logits_record_bad_windows(seed, case):
    m, n = 6, 150
    q, k, sf, w, ks, ke = _ragged(m, n, 32)
    row = 4
    ks[row], ke[row] = 20, 90
    code_name, a0 = {"ks-negative": ("WindowStartOutOfRange", -2), "ks-past-keys": ("WindowStartOutOfRange", n + 1),
                     "ke-before-ks": ("WindowEndOutOfRange", 19), "ke-past-keys": ("WindowEndOutOfRange", n + 3)}[case]
    (ks if code_name == "WindowStartOutOfRange" else ke)[row] = a0
    out = torch.full((m, n), NAN)
    message = _raises_recorded(lambda: CD.fp8_mqa_logits(q, k, sf, w, ks, ke, out, "emu"), CD.RAGGED_OP_NAME,
                               code_name, a0, n, row)
    assert (out[row] == -math.inf).all(), "the bad row is written empty"
    good = torch.arange(m) != row
    ref = RD.fp8_mqa_logits(q[good], k, sf, w[good], ks[good], ke[good])
    _assert_logits_match(out[good], ref)
    _host_raises(lambda be: pk.fp8_mqa_logits(q, (k, sf), w, ks, ke, backend=be), message)


@pytest.mark.parametrize("case", ["ks-negative", "ke-before-ks", "ke-past-columns"])
def test_emu_topk_records_bad_windows(seed, case):
    m, n, k = 4, 90, 20
    logits, ks, ke = _topk_prefill_case(m, n, k)
    row = 1
    ks[row], ke[row] = 10, 50
    code_name, a0 = {"ks-negative": ("WindowStartOutOfRange", -1), "ke-before-ks": ("WindowEndOutOfRange", 9),
                     "ke-past-columns": ("WindowEndOutOfRange", n + 1)}[case]
    (ks if code_name == "WindowStartOutOfRange" else ke)[row] = a0
    out = torch.full((m, k), -7, dtype=torch.int32)
    message = _raises_recorded(lambda: CD.topk_indices(logits, ks, ke, k, out, "emu"), CD.TOPK_OP_NAME,
                               code_name, a0, n, row)
    assert (out[row] == -1).all(), "the bad row is written empty"
    good = torch.arange(m) != row
    assert torch.equal(out[good], RD.topk_indices(logits[good], ks[good], ke[good], k))
    _host_raises(lambda be: D.topk_indices(logits, k, ks, ke, backend=be), message)


@pytest.mark.parametrize("case", ["lens-past-table", "lens-negative", "page-past-int32-rows", "page-negative"])
def test_emu_paged_topk_records_bad_values(seed, case):
    b, next_n, max_blocks, k = 3, 2, 2, 30
    cap = max_blocks * CD.BLOCK_KV
    table = torch.randperm(8)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([cap, 70, 100], dtype=torch.int32)
    logits = _tied_logits(b * next_n, cap + 5)
    seq = 2
    if case == "lens-past-table":
        lens[seq] = cap + 1
        expected = ("ContextLensOutOfRange", cap + 1, cap, seq)
    elif case == "lens-negative":
        lens[seq] = -4
        expected = ("ContextLensOutOfRange", -4, cap, seq)
    else:
        bad = CD.TOPK_PAGE_LIMIT if case == "page-past-int32-rows" else -3
        table[seq, 1] = bad
        expected = ("BlockTableOutOfRange", bad, CD.TOPK_PAGE_LIMIT, seq)
    out = torch.full((b, next_n, k), -7, dtype=torch.int32)
    message = _raises_recorded(lambda: CD.paged_topk_indices(logits, lens, table, k, out, "emu"),
                               CD.PAGED_TOPK_OP_NAME, *expected)
    assert (out[seq] == -1).all(), "the bad sequence's rows are written empty"
    ref = RD.paged_topk_indices(logits[:seq * next_n], lens[:seq], table[:seq], k)
    assert torch.equal(out[:seq], ref)
    _host_raises(lambda be: D.paged_topk_indices(logits, k, lens, table, backend=be), message)


def test_emu_logits_schedule_records_a_negative_length():
    lens = torch.tensor([[300, 5], [7, -2], [0, 64]], dtype=torch.int32)
    message = _raises_recorded(lambda: CD.paged_logits_schedule(lens, CD.BLOCK_KV, 4, "emu"), CD.SCHEDULE_OP_NAME,
                               "ContextLensOutOfRange", -2, 2**31 - 1, 3)
    _host_raises(lambda be: pk.get_paged_mqa_logits_metadata(lens, CD.BLOCK_KV, 4, backend=be), message)


def _bad_sparse_decode(case, h_q):
    """A sparse decode problem (_sparse_case: b 3, s_q 2, topk 80, 3 pages, attn_sink,
    topk_length [80, 5, 0]) with one bad value: (inputs, the indices and topk_length the
    kernel's skipping amounts to, (code, a0, a1, a2) of the recorded error)."""
    b, s_q, topk, pages = 3, 2, 80, 3
    q, cache, idx, sink, length = _sparse_case(b, s_q, h_q, topk, pages, True, True)
    fixed_idx, fixed_length = idx.clone(), length.clone()
    if case in ("index-past-cache", "index-minus-two"):         # a used slot of batch 0, token 1, slot 70
        idx[0, 1, 70] = pages * 64 + 7 if case == "index-past-cache" else -2
        fixed_idx[0, 1, 70] = -1                                   # skipped: as an unused slot
        expected = ("SparseIndexOutOfRange", int(idx[0, 1, 70]), pages * 64, (0 * s_q + 1) * topk + 70)
    elif case == "length-negative":
        length[1] = -3
        fixed_length[1] = 0                                        # clamped to [0, topk]
        expected = ("TopkLengthOutOfRange", -3, topk, 1)
    else:
        assert case == "length-past-topk"
        length[0] = topk + 5
        fixed_length[0] = topk
        expected = ("TopkLengthOutOfRange", topk + 5, topk, 0)
    return (q, cache, idx, sink, length), (fixed_idx, fixed_length), expected


def check_bad_sparse_decode(case, h_q):
    """The emulated kernel records the bad value as its KernelInputError, skips the bad work
    (the NaN-poisoned outputs equal the reference's over the fixed inputs) and the host checks
    of CPU tensors (reference, Triton) raise the same words."""
    (q, cache, idx, sink, length), (fixed_idx, fixed_length), expected = _bad_sparse_decode(case, h_q)
    b, s_q = q.shape[:2]
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    message = _raises_recorded(lambda: CD.sparse_decode(q, cache, idx, sink, length, None, None, out, lse, 512, 0.07,
                                                        "emu"), CD.SPARSE_OP_NAME, *expected)
    _assert_decode_matches(out, lse, *D.flash_mla_sparse_decode(q, cache, fixed_idx, 0.07, sink, fixed_length,
                                                                backend="reference"))
    _host_raises(lambda be: D.flash_mla_sparse_decode(q, cache, idx, 0.07, sink, length, backend=be), message)


@pytest.mark.parametrize("case", ["index-past-cache", "length-negative"])
def test_emu_sparse_decode_records_bad_values(seed, case):
    check_bad_sparse_decode(case, 64)


def test_sparse_decode_kernel_backend_reads_no_value_on_the_host(seed, monkeypatch):
    # the GPU path: a problem on a GPU device goes to the kernel unread (the emulator runs it here)
    from pykernels.ops import dsa as OPS
    (q, cache, idx, sink, length), _, expected = _bad_sparse_decode("index-minus-two", 64)
    p = OPS.sparse_decode_problem(q, cache, torch.zeros_like(idx), sink, None, None, None,
                                  torch.empty(3, 2, 64, 512, dtype=torch.bfloat16), torch.empty(3, 64, 2), 512, 0.07)
    p = dataclasses.replace(p, indices=idx, topk_length=length, device=torch.device("cuda", 0))

    def no_host_read(*args):
        raise AssertionError("the kernel backend read the values on the host")
    monkeypatch.setattr(OPS, "_check_sparse_decode_values", no_host_read)
    monkeypatch.setattr(OPS, "check_schedule", no_host_read)
    _raises_recorded(lambda: OPS._sparse_decode_kernel(p, "emu"), CD.SPARSE_OP_NAME, *expected)


def test_emu_sparse_decode_records_a_stale_schedule(seed):
    # made for other lengths than topk per sequence: the kernel's schedule checks (no host read)
    q, cache, idx, sink, length = _sparse_case(2, 1, 64, 80, 3, False, False)
    sched, splits = M.get_mla_metadata(torch.full((2,), 80 + 64, dtype=torch.int32), 64, 1, 1, backend="reference")
    out, lse = torch.full((2, 1, 64, 512), NAN, dtype=torch.bfloat16), torch.full((2, 64, 1), NAN)
    _raises_recorded(lambda: CD.sparse_decode(q, cache, idx, None, None, sched, splits, out, lse, 512, 0.07, "emu"),
                     CD.SPARSE_OP_NAME, "MetadataStale", 80, 144, 0)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata: row 0 was made for other cache_seqlens"):
        D.flash_mla_sparse_decode(q, cache, idx, 0.07, None, None, sched, splits, backend="reference")
