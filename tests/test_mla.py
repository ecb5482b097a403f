"""MLA decode (FlashMLA interface): reference, scheduler, Triton (interpreted on CPU), FP8
cache, validation, custom ops.

Tolerances:
- reference vs an independent float64 per-token computation: out within bf16 rounding
  (|out - x| <= 2^-8 |x| + 1e-6), LSE max abs error < 1e-5, same +inf rows.
- Triton vs reference (bf16 cache): per-sequence calc_diff(out) < 1e-5 (the kernel
  rounds P to bf16 for its P.V dot, as the GPU path does, and both outputs are rounded
  to bf16), LSE max abs error < 1e-4, identical +inf rows, out exactly 0 where no key
  is visible, no NaN left in the NaN-poisoned out / lse / split scratch.
- Triton with the FP8 cache vs the reference that dequantizes in float32: the same
  tolerances as the bf16 cache (the kernel applies the scales in float32 to S and P
  columns; measured up to ~5e-6 calc_diff, ~1e-6 LSE over 8 seeds).
- FP8 cache vs the bf16 cache (quantization error, reference backend): calc_diff(out)
  < 2e-3 and LSE max abs error < 0.05 on N(0, 1) data (measured <= 6.2e-4 and 1.5e-2).
"""
import math

import pytest
import torch

import pykernels.mla as M
from pykernels import reference as R
from pykernels import triton as T
from pykernels.metrics import calc_diff
from pykernels.mla_schedule import check_schedule as check_schedule_contract
from pykernels.reference import mla as RM
from pykernels.triton import mla as TM

from .mla_cases import LSE_ABS, OUT_CALC_DIFF, PAGE, check_decode, make_problem, poisoned
from .mla_cases import cdiv as _cdiv


def naive(q, cache_f32, table, seqlens, causal, scale):
    """Independent float64 ground truth, one query token at a time."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        L = int(seqlens[i])
        keys = torch.cat([cache_f32[int(table[i, j]), :, 0] for j in range(_cdiv(L, PAGE))] +
                         [torch.zeros(0, 576)]).double()
        for t in range(s_q):
            n_vis = max(L - s_q + t + 1, 0) if causal else L
            if n_vis == 0:
                continue
            k = keys[:n_vis]
            s = (q[i, t].double() @ k.T) * scale            # [h_q, n_vis]
            mx = s.max(dim=1, keepdim=True).values
            e = torch.exp(s - mx)
            den = e.sum(dim=1, keepdim=True)
            out[i, t] = (e @ k[:, :512]) / den
            lse[i, :, t] = (torch.log(den) + mx)[:, 0]
    return out, lse


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("seqlens,s_q,h_q,causal,scale", [
    ([0, 1, 130, 192], 1, 16, False, None),
    ([2, 65, 200], 3, 32, True, None),
    ([64, 300], 4, 64, True, None),
    ([1, 129], 2, 128, False, 0.1),
])
def test_reference_matches_naive(seqlens, s_q, h_q, causal, scale):
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    out, lse = R.flash_mla_with_kvcache(q, cache, table, sl, 512, scale, causal)
    assert out.dtype == torch.bfloat16 and out.shape == (len(seqlens), s_q, h_q, 512)
    assert lse.dtype == torch.float32 and lse.shape == (len(seqlens), h_q, s_q)
    n_out, n_lse = naive(q, cache.float(), table, sl, causal, scale or 576 ** -0.5)
    assert torch.equal(lse.isinf(), n_lse.isinf())
    assert (lse[lse.isinf()] > 0).all(), "rows that see no key: lse = +inf"
    fin = n_lse.isfinite()
    assert (lse[fin].double() - n_lse[fin]).abs().max() < 1e-5
    assert ((out.double() - n_out).abs() <= n_out.abs() * 2 ** -8 + 1e-6).all()


# ----------------------------------------------------------------------------- scheduler

def decode_schedule(meta, num_splits, seqlens):
    """Pieces (batch, block_lo, block_hi, split_id, partition) described by the metadata."""
    pieces = []
    nblk = [_cdiv(int(L), PAGE) for L in seqlens]
    for p, (b0, k0, b1, k1, s0, n, made_first, made_last) in enumerate(meta.tolist()):
        # the tokens of the first and last sequence the row was made for (0 for an empty row)
        assert (made_first, made_last) == ((int(seqlens[b0]), int(seqlens[b1])) if n else (0, 0))
        for k in range(n):
            bi = b0 + k
            assert bi <= b1
            lo = k0 if k == 0 else 0
            hi = k1 if bi == b1 else nblk[bi]
            pieces.append((bi, lo, hi, s0 + k, p))
        if n:
            assert b0 + n - 1 == b1, "a partition's pieces are consecutive sequences"
    return pieces


def check_schedule(meta, num_splits, seqlens, parts, fixed=RM.FIXED_SPLIT_COST):
    """Every block of every sequence is covered exactly once, split ids follow num_splits,
    no partition costs more than ceil(total / parts) + fixed, and the schedule passes the
    contract the decode kernels check (pykernels.mla_schedule.check_schedule)."""
    check_schedule_contract(meta, num_splits, torch.as_tensor(seqlens, dtype=torch.int32))
    seqlens = [int(x) for x in seqlens]
    b = len(seqlens)
    ns = num_splits.tolist()
    assert meta.shape == (parts, 8) and meta.dtype == torch.int32
    assert len(ns) == b + 1 and num_splits.dtype == torch.int32 and ns[0] == 0
    pieces = decode_schedule(meta, num_splits, seqlens)
    assert sorted(p[3] for p in pieces) == list(range(ns[b])), "split ids are 0..total-1, once each"
    cost = [0] * parts
    for i, L in enumerate(seqlens):
        mine = sorted((p for p in pieces if p[0] == i), key=lambda p: p[3])
        assert len(mine) == ns[i + 1] - ns[i] >= 1, f"sequence {i}: split count"
        assert [p[3] for p in mine] == list(range(ns[i], ns[i + 1]))
        covered = []
        for _, lo, hi, _, _ in mine:
            assert lo <= hi
            covered += range(lo, hi)
        assert covered == list(range(_cdiv(L, PAGE))), f"sequence {i}: blocks not covered exactly once"
        if len(mine) > 1:
            assert all(hi > lo for _, lo, hi, _, _ in mine), "no empty piece in a split sequence"
    for _, lo, hi, _, p in pieces:
        cost[p] += hi - lo + fixed
    total = sum(_cdiv(L, PAGE) + fixed for L in seqlens)
    if b:
        assert max(cost) <= _cdiv(total, parts) + fixed, (cost, total)
    return pieces, cost


def test_schedule_invariants_random():
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        b = int(torch.randint(0, 12, (1,), generator=g))
        parts = int(torch.randint(1, 40, (1,), generator=g))
        hi = [1, 65, 700, 20000][int(torch.randint(0, 4, (1,), generator=g))]
        seqlens = torch.randint(0, hi, (b,), generator=g, dtype=torch.int32)
        meta, ns = R.get_mla_metadata(seqlens, parts)
        check_schedule(meta, ns, seqlens, parts)


def test_schedule_spreads_one_long_sequence():
    # One sequence 100x longer than the 31 others: spread over most partitions.
    seqlens = torch.tensor([64 * 400] + [256] * 31, dtype=torch.int32)
    parts = 66
    meta, ns = M.get_mla_metadata(seqlens, 128, 1, parts)
    pieces, cost = check_schedule(meta, ns, seqlens, parts)
    long_splits = int(ns[1] - ns[0])
    assert long_splits >= parts // 2, long_splits
    total = sum(_cdiv(int(L), PAGE) + RM.FIXED_SPLIT_COST for L in seqlens)
    ideal = total / parts
    assert max(cost) <= ideal + RM.FIXED_SPLIT_COST + 1
    busy = [c for c in cost if c]
    assert min(busy[:-1]) >= ideal - RM.FIXED_SPLIT_COST - 1, cost   # all but the last are full


def test_schedule_flashmla_like_batch():
    # FlashMLA's benchmark shape: batch 128, s_k ~ 4096 with variation, default parts.
    g = torch.Generator().manual_seed(0)
    seqlens = (4096 + torch.randn(128, generator=g) * 1024).clamp(1, 8192).int()
    meta, ns = M.get_mla_metadata(seqlens, 128, 1)      # h_q 128, s_q 1 -> 2 row tiles
    assert meta.shape[0] == 132 // 2
    _, cost = check_schedule(meta, ns, seqlens, 66)
    ideal = sum(_cdiv(int(L), PAGE) + RM.FIXED_SPLIT_COST for L in seqlens) / 66
    assert max(cost) / ideal < 1.05, (max(cost), ideal)           # makespan within 5% of ideal
    assert min(cost[:-1]) >= ideal - RM.FIXED_SPLIT_COST - 1, cost  # only the last one is lighter


def test_default_num_sm_parts():
    s = torch.tensor([100], dtype=torch.int32)
    assert M.get_mla_metadata(s, 16, 1)[0].shape == (132, 8)          # 1 row tile
    assert M.get_mla_metadata(s, 2 * 128, 1)[0].shape == (33, 8)      # 4 row tiles
    assert M.get_mla_metadata(s, 64 * 132 * 2, 1)[0].shape == (1, 8)  # at least one


@pytest.mark.parametrize("seqlens,parts", [
    ([300, 1, 0], 8), ([64 * 50, 64, 0, 5], 16), ([], 4), ([0, 0], 3),
    ([int(x) for x in torch.randint(0, 3000, (40,), generator=torch.Generator().manual_seed(3))], 24),
])
def test_triton_scheduler_equals_reference(seqlens, parts):
    s = torch.tensor(seqlens, dtype=torch.int32)
    meta, ns = M.get_mla_metadata(s, 64, 1, parts, backend="triton")
    r_meta, r_ns = M.get_mla_metadata(s, 64, 1, parts, backend="reference")
    assert torch.equal(meta, r_meta) and torch.equal(ns, r_ns)


# ----------------------------------------------------------------------------- Triton decode

def test_interpreter_upcasts_bf16_dots():
    # Triton's interpreter computes bf16 tl.dot wrongly (DESIGN.md): the kernel must run
    # its dots in float32 whenever it is interpreted, and round like the GPU path.
    assert TM.UPCAST_DOTS == T.INTERPRETED
    assert TM.SOFTWARE_ROUNDING == T.INTERPRETED
    if not T.INTERPRETED:
        pytest.skip("compiled Triton: bf16 tensor-core dots")


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts,split", [
    ([0, 1, 130], 1, 16, False, 12, True),
    ([63, 300, 64], 2, 32, True, 16, True),
    ([2, 257], 3, 64, True, 8, True),        # seqlen 2 < s_q: token 0 sees nothing
    ([190, 1], 4, 128, True, 10, True),
    ([100, 37], 2, 16, False, 1, False),     # one partition, several whole sequences
])
def test_triton_decode_matches_reference(seqlens, s_q, h_q, causal, parts, split, poisoned_scratch):
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    assert (ns.diff() > 1).any().item() == split, "case meant to (not) exercise the combine kernel"
    out, lse = poisoned(len(seqlens), s_q, h_q)
    ret = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal, backend="triton",
                                   out=out, softmax_lse=lse)
    assert ret[0] is out and ret[1] is lse
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=causal,
                                            backend="reference")
    check_decode(out, lse, ref, ref_lse)


def test_triton_result_independent_of_schedule():
    # Different partition counts split the sequences differently; results agree.
    q, cache, table, sl = make_problem([250, 70], 2, 16)
    outs = []
    for parts in (1, 5, 40):
        meta, ns = M.get_mla_metadata(sl, 32, 1, parts)
        outs.append(M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="triton"))
    for o, l in outs[1:]:
        assert calc_diff(o, outs[0][0]) < 1e-5 and (l - outs[0][1]).abs().max() < 1e-5


@pytest.mark.parametrize("bm,bn,fp8", [(16, 32, False), (32, 16, True), (32, 32, False)])
def test_triton_decode_gpu_tile_shapes(bm, bn, fp8, monkeypatch, poisoned_scratch):
    # The compiled (GPU) launch uses key tiles smaller than a page (BLOCK_N 32) and fewer
    # rows per program: run those shapes interpreted too.
    monkeypatch.setattr(TM, "tile_config", lambda q_rows, interpreted=None: (bm, bn, 4))
    seqlens, s_q, h_q = [160, 31, 0], 2, 32
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 12)
    assert (ns.diff() > 1).any()
    out, lse = poisoned(len(seqlens), s_q, h_q)
    M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="triton",
                             out=out, softmax_lse=lse)
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="reference")
    check_decode(out, lse, ref, ref_lse)


def _launches_of_the_triton_backend(monkeypatch, b, s_q, h_q, seqlen, fp8, causal, parts, h_kv=1):
    """The launches (kernel, grid, args, constexprs, options) the triton backend makes for
    real CPU tensors of this problem, recorded instead of run."""
    launches = []
    monkeypatch.setattr(TM, "run_launch", launches.append)
    pages = _cdiv(seqlen, PAGE)
    cache = torch.zeros(b * pages, PAGE, h_kv, 576, dtype=torch.bfloat16)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    q = torch.zeros(b, s_q, h_q, 576, dtype=torch.bfloat16)
    table = torch.arange(b * pages, dtype=torch.int32).reshape(b, pages)
    seqlens = torch.full((b,), seqlen, dtype=torch.int32)
    TM.get_mla_metadata(seqlens, parts)
    meta = torch.zeros(parts, RM.METADATA_SIZE, dtype=torch.int32)
    ns = torch.zeros(b + 1, dtype=torch.int32)
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32)
    TM.flash_mla_with_kvcache(q, cache, table, seqlens, meta, ns, out, lse, causal=causal)
    return launches


@pytest.mark.parametrize("b,s_q,h_q,seqlen,fp8,causal,h_kv", [
    (2, 1, 16, 128, False, True, 1), (3, 2, 32, 100, True, False, 1), (1, 3, 8, 64, False, True, 1),
    (2, 2, 24, 100, False, True, 8), (1, 1, 6, 64, False, False, 3)])
def test_sm90_specs_are_the_launches(monkeypatch, b, s_q, h_q, seqlen, fp8, causal, h_kv):
    # mla_launch_specs (meta tensors) gives the launcher's specialization of exactly what
    # the backend passes (recorded from real tensors): signature, alignment attributes and
    # integer-1 constexprs; only the tiles and UPCAST / SOFT differ when interpreted.
    from pykernels.triton import sm90
    parts = 5
    specs = TM.mla_launch_specs(b, s_q, h_q, seqlen, fp8, causal, num_sm_parts=parts, h_kv=h_kv)
    launches = _launches_of_the_triton_backend(monkeypatch, b, s_q, h_q, seqlen, fp8, causal, parts, h_kv)
    assert [s.kernel for s in specs] == [k.fn.__name__ for k, *_ in launches] == \
        ["_schedule_kernel", "_mla_decode_kernel", "_mla_combine_kernel"]
    for spec, (kernel, grid, args, cx, options) in zip(specs, launches):
        sig, spec_cx, attrs, runtime = sm90.specialize(kernel, args, cx)
        assert sig == spec.signature and attrs == spec.attrs, spec.label
        assert {k: v for k, v in spec_cx.items() if k not in cx} == \
            {k: v for k, v in spec.constexprs.items() if k not in cx}, spec.label
        full = tuple(grid) + (1,) * (3 - len(grid))        # (row tiles differ: interpreted tiles are larger)
        assert len(runtime) == len(spec.args) and (full[0], full[2]) == (spec.grid[0], spec.grid[2])
        assert spec.constexprs.get("UPCAST", False) is False and spec.constexprs.get("SOFT", False) is False
    decode = specs[1]
    assert ("S_Q" in decode.constexprs) == (s_q == 1)
    assert ("H_KV" in decode.constexprs) == (h_kv == 1) and decode.grid[2] == h_kv
    assert decode.constexprs["stride_ls"] == 1


def test_sm90_specs_use_meta_tensors():
    # The production specs stand for problems up to b = 128, seqlen 4352 (a 640 MB bf16
    # cache, 84 MB of split scratch) without allocating them: every tensor is a meta tensor.
    for spec in TM.sm90_compile_specs():
        assert all(a.device.type == "meta" for a in spec.args if isinstance(a, torch.Tensor)), spec.label


@pytest.fixture(scope="module")
def compiled_sm90():
    from pykernels.triton import sm90
    unique = {}
    for s in TM.sm90_compile_specs():
        unique.setdefault(s.key(), s)          # launches with equal keys share one binary
    unique = list(unique.values())
    return list(zip(unique, sm90.compile_sm90(unique, jobs=2)))


def test_kernels_compile_for_sm90(compiled_sm90):
    # The interpreter accepts code the compiler rejects (e.g. a variable whose type
    # differs between the branches of an if): compile the GPU launches of FlashMLA's
    # configurations (TM.SPEC_PROBLEMS, bf16 and FP8 caches) to sm_90a in child processes
    # (TRITON_INTERPRET=0; no GPU needed), specialized as Triton's launcher does from the
    # argument values, and check ptxas's resource use.
    decode = [(s, c) for s, c in compiled_sm90 if s.kernel == "_mla_decode_kernel"]
    assert {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps) for s, _ in decode} == \
        {(32, 32, 8), (16, 32, 4)}
    assert {s.constexprs["FP8"] for s, _ in decode} == {False, True}
    assert {"S_Q" in s.constexprs for s, _ in decode} == {False, True}     # s_q = 1 and 2
    assert {"H_KV" in s.constexprs for s, _ in decode} == {False, True}    # h_kv = 1 and > 1
    assert {s.kernel for s, _ in compiled_sm90} == {"_mla_decode_kernel", "_mla_combine_kernel", "_schedule_kernel"}
    for s, c in compiled_sm90:
        print(f"{s.label}: {c.regs} regs, {c.stack} B stack, {c.shared} B shared")
    for s, c in compiled_sm90:
        # Register spills (local memory) in any of these launches: none (docs/mla.md has
        # the measured table; 168-255 registers for the decode kernel).
        assert c.stack == 0, f"{s.label}: {c.stack} bytes of spills"
        assert c.regs <= 255
        if s.kernel == "_mla_decode_kernel":
            assert "wgmma.mma_async" in c.ptx or "mma.sync" in c.ptx, "decode dots must use tensor cores"
            assert c.shared <= 227 * 1024


# ----------------------------------------------------------------------------- FP8 cache

def test_fp8_cache_layout_and_round_trip():
    cache = torch.randn(3, PAGE, 1, 576).to(torch.bfloat16) * 3
    cache[0, 0, 0, :128] = 0                                  # an all-zero group
    c8 = M.quantize_kv_cache_fp8(cache)
    assert c8.dtype == torch.uint8 and c8.shape == (3, PAGE, 1, 656) and c8.is_contiguous()
    raw = c8.reshape(-1, 656)
    flat = cache.reshape(-1, 576).float()
    sf = raw[:, 512:528].contiguous().view(torch.float32)      # [tokens, 4]
    # FlashMLA's rule: max(amax / 448, 1e-4) rounded up to a power of two
    floor = (flat[:, :512].reshape(-1, 4, 128).abs().amax(-1).double() / 448).clamp(min=1e-4)
    assert torch.equal(sf.double(), 2.0 ** torch.ceil(torch.log2(floor)))
    assert torch.equal(raw[:, 528:].contiguous().view(torch.bfloat16), cache.reshape(-1, 576)[:, 512:])
    deq = R.dequantize_kv_cache_fp8(c8).reshape(-1, 576)
    assert torch.equal(deq[:, 512:], flat[:, 512:])           # RoPE columns kept exactly
    err = (deq[:, :512] - flat[:, :512]).abs().reshape(-1, 4, 128)
    x = flat[:, :512].reshape(-1, 4, 128).abs()
    # e4m3 RNE: half an ulp (2^-4 relative) for normals, 2^-10 * scale for subnormals
    assert (err <= torch.maximum(x * 2 ** -4, sf[:, :, None] * 2 ** -10) * (1 + 1e-6)).all()
    assert torch.equal(R.dequantize_kv_cache_fp8(c8.view(torch.float8_e4m3fn)), R.dequantize_kv_cache_fp8(c8))


@pytest.mark.parametrize("seqlens,s_q,h_q,causal,parts", [
    ([150, 0, 64], 2, 16, True, 12),
    ([1, 200], 1, 128, False, 6),
])
def test_fp8_triton_matches_reference(seqlens, s_q, h_q, causal, parts, poisoned_scratch):
    # The reference dequantizes the FP8 cache in float32; the kernel applies the scales
    # to S and P columns in float32 (never rounding a dequantized key): same tolerances
    # as the bf16 cache. The NaN-poisoned slots of the bf16 cache quantize to NaN bytes
    # and scales, which the kernel must not read either.
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    c8 = M.quantize_kv_cache_fp8(cache)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    assert (ns.diff() > 1).any()
    out, lse = poisoned(len(seqlens), s_q, h_q)
    M.flash_mla_with_kvcache(q, c8, table, sl, 512, meta, ns, causal=causal, backend="triton",
                             out=out, softmax_lse=lse)
    ref, ref_lse = M.flash_mla_with_kvcache(q, c8, table, sl, 512, meta, ns, causal=causal, backend="reference")
    check_decode(out, lse, ref, ref_lse)


def test_fp8_cache_accuracy_vs_bf16():
    # What FP8 storage costs: the reference on the FP8 cache vs on the bf16 cache.
    q, cache, table, sl = make_problem([300, 200, 77], 1, 64)
    meta, ns = M.get_mla_metadata(sl, 64, 1, 4)
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns)
    got, got_lse = M.flash_mla_with_kvcache(q, M.quantize_kv_cache_fp8(cache), table, sl, 512, meta, ns)
    assert calc_diff(got, ref) < 2e-3
    assert (got_lse - ref_lse).abs().max() < 0.05


# ----------------------------------------------------------------------------- API

def _good(seqlens=(70, 5), s_q=2, h_q=16):
    q, cache, table, sl = make_problem(list(seqlens), s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 4)
    return dict(q=q, k_cache=cache, block_table=table, cache_seqlens=sl, head_dim_v=512,
                tile_scheduler_metadata=meta, num_splits=ns)


@pytest.mark.parametrize("key,bad,exc,msg", [
    ("q", lambda a: a.float(), TypeError, "q: expected dtype bfloat16, got float32"),
    ("q", lambda a: a[..., :512], ValueError, r"q: expected head dim 576 \(last dim\), got 512"),
    ("q", lambda a: a[0], ValueError, "q: expected a 4-D tensor, got 3-D"),
    ("q", lambda a: a.transpose(0, 3).contiguous().transpose(0, 3), ValueError, "q: expected unit stride"),
    ("k_cache", lambda a: a.half(), TypeError, "k_cache: expected dtype bfloat16 .or uint8 / float8_e4m3fn"),
    ("k_cache", lambda a: a[:, :32], ValueError, r"k_cache: expected page block size 64 \(dim 1\), got 32"),
    ("k_cache", lambda a: a.expand(-1, -1, 3, -1).contiguous(), ValueError,
     r"k_cache: expected h_kv \(dim 2\) >= 1 dividing h_q = 16 .*, got 3"),
    ("k_cache", lambda a: M.quantize_kv_cache_fp8(a.expand(-1, -1, 2, -1).contiguous()), ValueError,
     r"k_cache: expected h_kv = 1 \(dim 2\) for the FP8 layout .*, got 2"),
    ("k_cache", lambda a: a[..., :512].contiguous(), ValueError, "k_cache: expected last dim 576 for dtype bfloat16, got 512"),
    ("k_cache", lambda a: M.quantize_kv_cache_fp8(a)[..., :600].contiguous(), ValueError, "k_cache: expected last dim 656 for dtype uint8"),
    ("k_cache", lambda a: a.transpose(0, 1).contiguous().transpose(0, 1), ValueError, "k_cache: expected a contiguous"),
    ("head_dim_v", lambda a: 576, ValueError, "head_dim_v: expected 512, got 576"),
    ("block_table", lambda a: a.long(), TypeError, "block_table: expected dtype int32, got int64"),
    ("block_table", lambda a: a[:1], ValueError, r"block_table: expected shape \[2, \*\], got \[1, 3\]"),
    ("block_table", lambda a: a.t().contiguous().t(), ValueError, "block_table: expected a contiguous"),
    ("block_table", lambda a: a.fill_(99), ValueError, r"block_table: expected page ids in \[0, 6\) .*for the pages in use, got 99"),
    ("cache_seqlens", lambda a: a.long(), TypeError, "cache_seqlens: expected dtype int32, got int64"),
    ("cache_seqlens", lambda a: a[:1], ValueError, r"cache_seqlens: expected shape \[2\], got \[1\]"),
    ("cache_seqlens", lambda a: a + 1000, ValueError, r"cache_seqlens: expected values in \[0, 192\]"),
    ("cache_seqlens", lambda a: a - 100, ValueError, r"cache_seqlens: expected values in \[0, \d+\] .*got -\d+ \(batch 0\)"),
    ("tile_scheduler_metadata", lambda a: a.long(), TypeError, "tile_scheduler_metadata: expected dtype int32"),
    ("tile_scheduler_metadata", lambda a: a[:, :4], ValueError, r"tile_scheduler_metadata: expected shape \[\*, 8\]"),
    ("num_splits", lambda a: a[:2], ValueError, r"num_splits: expected shape \[3\], got \[2\]"),
    ("num_splits", lambda a: a.to("meta"), ValueError, "num_splits: all tensors must be on one device"),
])
def test_validation_errors(key, bad, exc, msg):
    args = _good()
    args[key] = bad(args[key])
    with pytest.raises(exc, match=msg):
        M.flash_mla_with_kvcache(**args)


def test_validation_errors_scalars_and_buffers():
    args = _good()
    with pytest.raises(ValueError, match="softmax_scale: expected None or a positive finite float, got -1.0"):
        M.flash_mla_with_kvcache(**args, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        M.flash_mla_with_kvcache(**args, causal=1)
    with pytest.raises(TypeError, match="out: expected dtype bfloat16, got float32"):
        M.flash_mla_with_kvcache(**args, out=torch.empty(2, 2, 16, 512))
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 2, 16, 512\], got \[2, 2, 16, 576\]"):
        M.flash_mla_with_kvcache(**args, out=torch.empty(2, 2, 16, 576, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"softmax_lse: expected shape \[2, 16, 2\], got \[2, 2, 16\]"):
        M.flash_mla_with_kvcache(**args, softmax_lse=torch.empty(2, 2, 16))
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run .*: runs on GPU tensors, got cpu tensors"):
        M.flash_mla_with_kvcache(**args, backend="cuda")
    with pytest.raises(ValueError, match="backend: expected one of"):
        M.flash_mla_with_kvcache(**args, backend="cutlass")
    s = args["cache_seqlens"]
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype int32, got int64"):
        M.get_mla_metadata(s.long(), 32, 1)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k: expected an int >= 1, got 0"):
        M.get_mla_metadata(s, 0, 1)
    with pytest.raises(TypeError, match="num_heads_k: expected an int, got float 1.5"):
        M.get_mla_metadata(s, 32, 1.5)
    with pytest.raises(ValueError, match=r"num_sm_parts: expected an int in \[1, 65536\], got -2"):
        M.get_mla_metadata(s, 32, 1, -2)
    with pytest.raises(TypeError, match="k_cache: expected dtype bfloat16, got float32"):
        M.quantize_kv_cache_fp8(torch.zeros(1, 64, 1, 576))


def test_auto_backend_and_fp8_dtype_view():
    args = _good()
    out, lse = M.flash_mla_with_kvcache(**args)                  # auto -> reference on CPU
    c8 = M.quantize_kv_cache_fp8(args["k_cache"])
    o1, l1 = M.flash_mla_with_kvcache(**{**args, "k_cache": c8})
    o2, l2 = M.flash_mla_with_kvcache(**{**args, "k_cache": c8.view(torch.float8_e4m3fn)})
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert calc_diff(o1, out) < 2e-3


def test_custom_ops_opcheck():
    args = _good()
    b, s_q, h_q = 2, 2, 16
    out, lse = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16), torch.empty(b, h_q, s_q)
    checks = [
        (torch.ops.pykernels.get_mla_metadata.default, (args["cache_seqlens"], 4, "reference")),
        (torch.ops.pykernels.flash_mla_with_kvcache.default,
         (args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"], args["tile_scheduler_metadata"],
          args["num_splits"], out, lse, 512, 576 ** -0.5, True, "reference")),
    ]
    # test_aot_dispatch_dynamic would make the seqlens symbolic; the reference reads them.
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for fn, a in checks:
        result = torch.library.opcheck(fn, a, test_utils=utils)
        assert result == {u: "SUCCESS" for u in utils}, (fn, result)


def test_torch_compile_fullgraph():
    args = _good()

    def f(q, k_cache, block_table, cache_seqlens):
        meta, ns = M.get_mla_metadata(cache_seqlens, 32, 1, 4, backend="reference")
        out, lse = M.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta, ns,
                                            causal=True, backend="reference")
        return out.float() * 2, lse

    a = (args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"])
    got, got_lse = torch.compile(f, fullgraph=True, backend="aot_eager")(*a)
    ref, ref_lse = R.flash_mla_with_kvcache(*a, 512, None, True)
    assert torch.equal(got, 2 * ref.float()) and torch.equal(got_lse, ref_lse)


def test_selfcheck_mla_rows_pass():
    from pykernels import selfcheck
    rows = selfcheck.run_all(torch.device("cpu"), ["reference", "triton"],
                             {"get_mla_metadata", "flash_mla_with_kvcache"})
    assert len(rows) == 6 and all(r.verdict == "PASS" for r in rows), selfcheck.format_table(rows)


def test_empty_batch():
    q = torch.zeros(0, 1, 16, 576, dtype=torch.bfloat16)
    cache = torch.zeros(1, 64, 1, 576, dtype=torch.bfloat16)
    table, sl = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    for backend in ("reference", "triton"):
        meta, ns = M.get_mla_metadata(sl, 16, 1, 4, backend=backend)
        assert ns.tolist() == [0] and (meta[:, 5] == 0).all()
        out, lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, backend=backend)
        assert out.shape == (0, 1, 16, 512) and lse.shape == (0, 16, 1)


def test_decode_cost_model():
    c = M.decode_cost(64, 1, 128, 4096)
    assert c["flops"] == 2 * 1088 * 64 * 128 * 4096
    assert c["bytes"] == 64 * 4096 * 1152 + 64 * 128 * (1152 + 1024 + 4)
    assert M.decode_cost(64, 1, 128, 4096, fp8_cache=True)["bytes"] == 64 * 4096 * 656 + 64 * 128 * 2180


def test_torch_compile_fp8_cache_on_the_hand_written_kernel():
    # The custom op with an FP8 cache and backend "emu" (the CUDA kernel's PTX): traced
    # whole by torch.compile, the same result as the eager call and close to the reference.
    args = _good()
    c8 = M.quantize_kv_cache_fp8(args["k_cache"])

    def f(q, k_cache, block_table, cache_seqlens):
        meta, ns = M.get_mla_metadata(cache_seqlens, 32, 1, 4, backend="reference")
        return M.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta, ns,
                                        causal=True, backend="emu")

    a = (args["q"], c8, args["block_table"], args["cache_seqlens"])
    got, got_lse = torch.compile(f, fullgraph=True, backend="aot_eager")(*a)
    eager, eager_lse = f(*a)
    assert torch.equal(got, eager) and torch.equal(got_lse, eager_lse)
    ref, ref_lse = R.flash_mla_with_kvcache(*a, 512, None, True)
    fin = ref_lse.isfinite()
    assert calc_diff(got, ref) < OUT_CALC_DIFF and (got_lse[fin] - ref_lse[fin]).abs().max() < LSE_ABS
