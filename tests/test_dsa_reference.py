"""DeepSeek Sparse Attention references (pykernels/reference/dsa.py) through the public API
(backend="reference"), each against an independent direct computation: Python loops in
float64 over the formulas of docs/dsa.md, the caches read byte by byte from the documented
layouts. Outputs are NaN-poisoned first, so an element left unwritten fails."""
import math
import struct

import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
import pykernels.mla as M
from pykernels.reference import dsa as RD

FP8 = torch.float8_e4m3fn
NAN = float("nan")


def _e4m3(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(FP8).float())


E4M3 = [_e4m3(v) for v in range(256)]


def _f32(raw: bytes) -> float:
    return struct.unpack("<f", raw)[0]


def _bf16(raw: bytes) -> float:
    return struct.unpack("<f", b"\x00\x00" + raw)[0]


# ----------------------------------------------------------------------------- indexer logits

def _direct_logit(q_row, w_row, k_row, scale) -> float:
    """q_row float64 [H, D], w_row [H], k_row [D]: scale * sum_h w_h * relu(q_h . k)."""
    total = 0.0
    for h in range(q_row.shape[0]):
        total += float(w_row[h]) * max(float(q_row[h] @ k_row), 0.0)
    return total * scale


def test_fp8_mqa_logits_matches_direct_sum(seed):
    m, n, h, d = 6, 37, 4, 32
    q = (torch.randn(m, h, d) * 2).to(FP8)
    k8, k_sf = D.indexer_k_cast_to_fp8(torch.randn(n, d) * 3)
    w = torch.randn(m, h)
    ks = torch.tensor([0, 5, 9, 0, 36, 20], dtype=torch.int32)
    ke = torch.tensor([37, 5, 30, 1, 37, 21], dtype=torch.int32)          # row 1: an empty window
    out = torch.full((m, n), NAN)
    got = pk.fp8_mqa_logits(q, (k8, k_sf), w, ks, ke, backend="reference", out=out)
    assert got is out
    qd, kd = q.double(), k8.double()
    for i in range(m):
        for j in range(n):
            if ks[i] <= j < ke[i]:
                want = _direct_logit(qd[i], w[i].double(), kd[j], float(k_sf[j]))
                assert math.isclose(float(got[i, j]), want, rel_tol=1e-5, abs_tol=1e-5), (i, j)
            else:
                assert got[i, j] == -math.inf, (i, j)


def test_indexer_k_cast_is_the_per_token_rule(seed):
    k = torch.randn(9, 64) * 5
    k[3] = 0                                                               # amax floored at 1e-4
    k8, sf = D.indexer_k_cast_to_fp8(k)
    amax = k.abs().amax(1).clamp(min=1e-4)
    assert torch.equal(sf, (amax.double() / 448).float())
    err = (k8.float() * sf[:, None] - k).abs()
    assert (err <= torch.maximum(k.abs() * 2 ** -4, sf[:, None] * 2 ** -10) * (1 + 1e-6)).all()


def _paged_key(cache_u8: torch.Tensor, page: int, slot: int, d: int):
    """(values float64 [d], scale) of one token, read from DeepGEMM's page layout by hand."""
    blk = cache_u8.shape[1]
    raw = cache_u8[page].reshape(-1).numpy().tobytes()
    vals = torch.tensor([E4M3[b] for b in raw[slot * d:(slot + 1) * d]], dtype=torch.float64)
    at = blk * d + 4 * slot
    return vals, _f32(raw[at:at + 4])


@pytest.mark.parametrize("next_n,block_kv,lens_2d", [(1, 64, False), (3, 32, False), (2, 64, True)])
def test_fp8_paged_mqa_logits_matches_direct_sum(seed, next_n, block_kv, lens_2d):
    b, h, d, pages, max_blocks = 3, 4, 32, 12, 4
    q = torch.randn(b, next_n, h, d).to(FP8)
    cache = D.quantize_indexer_k_cache(torch.randn(pages, block_kv, 1, d) * 2)
    assert cache.shape == (pages, block_kv, 1, d + 4) and cache.dtype == torch.uint8
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([block_kv * max_blocks, 1, block_kv + 3], dtype=torch.int32)
    if lens_2d:
        lens = torch.stack([torch.randint(0, int(L) + 1, (next_n,)) for L in lens]).int()
    ends = [[int(lens[i, j]) if lens_2d else max(0, int(lens[i]) - next_n + j + 1) for j in range(next_n)]
            for i in range(b)]
    w = torch.randn(b * next_n, h)
    width = block_kv * max_blocks + 5
    meta = pk.get_paged_mqa_logits_metadata(lens, block_kv, 7, backend="reference")
    out = torch.full((b * next_n, width), NAN)
    got = pk.fp8_paged_mqa_logits(q, cache, w, lens, table, meta, width, backend="reference", out=out)
    assert got is out
    for i in range(b):
        for j in range(next_n):
            r = i * next_n + j
            for p in range(width):
                if p < ends[i][j]:
                    kv, sf = _paged_key(cache, int(table[i, p // block_kv]), p % block_kv, d)
                    want = _direct_logit(q[i, j].double(), w[r].double(), kv, sf)
                    assert math.isclose(float(got[r, p]), want, rel_tol=1e-5, abs_tol=1e-5), (r, p)
                else:
                    assert got[r, p] == -math.inf, (r, p)


@pytest.mark.parametrize("lens,block_kv,parts", [([300, 0, 1000, 64], 64, 5), ([1, 2, 3], 32, 8), ([5000], 64, 3)])
def test_paged_logits_schedule_is_balanced_and_ordered(lens, block_kv, parts):
    # Independent of the rule's code: the partitions cover every split once, in order,
    # and no two take counts differing by more than one.
    sl = torch.tensor(lens, dtype=torch.int32)
    meta = pk.get_paged_mqa_logits_metadata(sl, block_kv, parts)
    assert meta.dtype == torch.int32 and meta.shape == (parts + 1, 2)
    split = 4 * block_kv
    segs = [-(-L // split) for L in lens]
    first = [sum(segs[:s]) + k for s, k in meta.tolist()]                # global split index of each row
    assert meta[-1].tolist() == [len(lens), 0] and first[0] == 0 and first[-1] == sum(segs)
    counts = [first[p + 1] - first[p] for p in range(parts)]
    assert min(counts) >= 0 and max(counts) - min(counts) <= 1
    for s, k in meta[:-1].tolist():
        assert 0 <= s <= len(lens) and (s == len(lens) or 0 <= k < segs[s])


# ----------------------------------------------------------------------------- top-k

def _direct_topk(values, lo, hi, k):
    """Positions of the k largest values in [lo, hi) (lower position first on ties, NaN as -inf), -1 padded."""
    key = [(-(-math.inf if math.isnan(values[p]) else values[p]), p) for p in range(lo, hi)]
    chosen = [p for _, p in sorted(key)][:k]
    return chosen + [-1] * (k - len(chosen))


def test_topk_indices_prefill(seed):
    m, n, k = 5, 40, 8
    logits = torch.randint(-4, 5, (m, n)).float()                         # many ties
    logits[0, 3] = -math.inf
    logits[2, 10] = NAN
    ks = torch.tensor([0, 10, 5, 7, 39], dtype=torch.int32)
    ke = torch.tensor([40, 14, 30, 7, 40], dtype=torch.int32)
    for i in range(m):                                                    # outside the window: never read
        logits[i, :int(ks[i])] = math.inf
        logits[i, int(ke[i]):] = NAN
    out = torch.full((m, k), -7, dtype=torch.int32)
    got = pk.topk_indices(logits, k, ks, ke, backend="reference", out=out)
    assert got is out
    for i in range(m):
        assert got[i].tolist() == _direct_topk(logits[i].tolist(), int(ks[i]), int(ke[i]), k), i


@pytest.mark.parametrize("lens_2d", [False, True])
def test_paged_topk_indices_maps_positions_through_the_block_table(seed, lens_2d):
    b, next_n, max_blocks, k = 3, 2, 3, 20
    table = torch.randperm(40)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([150, 12, 0], dtype=torch.int32)
    if lens_2d:
        lens = torch.tensor([[150, 3], [12, 12], [0, 1]], dtype=torch.int32)
    width = 200
    logits = torch.randn(b * next_n, width)
    out = torch.full((b, next_n, k), -7, dtype=torch.int32)
    got = pk.paged_topk_indices(logits, k, lens, table, backend="reference", out=out)
    assert got is out
    for i in range(b):
        for j in range(next_n):
            end = int(lens[i, j]) if lens_2d else max(0, int(lens[i]) - next_n + j + 1)
            pos = _direct_topk(logits[i * next_n + j].tolist(), 0, end, k)
            want = [-1 if p < 0 else int(table[i, p // 64]) * 64 + p % 64 for p in pos]
            assert got[i, j].tolist() == want, (i, j)


# ----------------------------------------------------------------------------- FP8 MLA cache

def _cache_row(cache_u8: torch.Tensor, row: int):
    """float64 [576] of token row `row` (block * 64 + offset), read from the 656-byte layout:
    bytes 0-511 e4m3, 512-527 four little-endian float32 scales, 528-655 64 bf16."""
    raw = cache_u8.reshape(-1, 656)[row].numpy().tobytes()
    scales = [_f32(raw[512 + 4 * g:516 + 4 * g]) for g in range(4)]
    nope = [E4M3[raw[c]] * scales[c // 128] for c in range(512)]
    rope = [_bf16(raw[528 + 2 * c:530 + 2 * c]) for c in range(64)]
    return torch.tensor(nope + rope, dtype=torch.float64)


def test_fp8_cache_dequantization_reads_flashmla_byte_order(seed):
    cache = (torch.randn(2, 64, 1, 576) * 3).bfloat16()
    c8 = M.quantize_kv_cache_fp8(cache)
    deq = RD.dequantize_kv_cache_fp8(c8).reshape(-1, 576)
    for row in (0, 63, 64, 127):
        assert torch.equal(deq[row], _cache_row(c8, row).float()), row      # e4m3 * scale: one float32 rounding
    assert torch.equal(deq[:, 512:], cache.reshape(-1, 576)[:, 512:].float())


# ----------------------------------------------------------------------------- sparse attention

def _direct_attention(q_rows, keys, scale, sink):
    """q_rows float64 [h, 576], keys list of float64 [576] -> (out [h, 512], lse [h], max [h])."""
    h = q_rows.shape[0]
    out = torch.zeros(h, 512, dtype=torch.float64)
    lse = torch.full((h,), math.inf, dtype=torch.float64)
    mx = torch.full((h,), -math.inf, dtype=torch.float64)
    if not keys:
        return out, lse, mx
    kmat = torch.stack(keys)
    for hh in range(h):
        s = [scale * float(q_rows[hh] @ kk) for kk in keys]
        top = max(s)
        total = sum(math.exp(x - top) for x in s)
        lse[hh] = top + math.log(total)
        mx[hh] = top
        denom = math.exp(lse[hh]) + (0.0 if sink is None else math.exp(float(sink[hh])))
        p = torch.tensor([math.exp(x) / denom for x in s], dtype=torch.float64)
        out[hh] = p @ kmat[:, :512]
    return out, lse, mx


@pytest.mark.parametrize("with_sink,with_length", [(False, False), (True, False), (False, True), (True, True)])
def test_sparse_decode_matches_direct_attention(seed, with_sink, with_length):
    b, s_q, h_q, topk, pages = 3, 2, 8, 12, 4
    rows = pages * 64
    c8 = M.quantize_kv_cache_fp8((torch.randn(pages, 64, 1, 576)).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(0, rows, (b, s_q, topk), dtype=torch.int32)
    idx[0, 0, 3:7] = -1                                                    # unused slots
    idx[1, 1, :] = -1                                                      # a row with no key
    idx[2, 0, 5] = idx[2, 0, 4]                                            # a duplicate counts twice
    sink = torch.randn(h_q) if with_sink else None
    length = torch.tensor([topk, 5, 0], dtype=torch.int32) if with_length else None
    if with_length:
        idx[1, :, 5:] = 10 ** 6                                            # past topk_length: never read
    scale = 0.07
    out = torch.full((b, s_q, h_q, 512), NAN, dtype=torch.bfloat16)
    lse = torch.full((b, h_q, s_q), NAN)
    got_o, got_l = M.flash_mla_with_kvcache(q, c8, None, None, 512, None, None, scale, False, True, idx, sink,
                                            topk_length=length, backend="reference", out=out, softmax_lse=lse)
    assert got_o is out and got_l is lse
    for i in range(b):
        for s in range(s_q):
            n_used = topk if length is None else int(length[i])
            keys = [_cache_row(c8, int(t)) for t in idx[i, s, :n_used].tolist() if t != -1]
            want_o, want_l, _ = _direct_attention(q[i, s].double(), keys, scale, sink)
            # bf16 output: one rounding (2^-9 relative) of the float32 result
            assert torch.allclose(got_o[i, s].double(), want_o, rtol=2 ** -8, atol=1e-5), (i, s)
            fin = torch.isfinite(want_l)
            assert torch.equal(got_l[i, :, s] == math.inf, ~fin), (i, s)
            assert torch.allclose(got_l[i, :, s][fin].double(), want_l[fin], rtol=1e-5, atol=1e-5), (i, s)
            if not keys:
                assert (got_o[i, s] == 0).all()


@pytest.mark.parametrize("d_qk", [576, 512])
def test_sparse_prefill_matches_direct_attention(seed, d_qk):
    s_q, h_q, s_kv, topk = 5, 4, 30, 9
    q = torch.randn(s_q, h_q, d_qk).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk).bfloat16()
    idx = torch.randint(-3, s_kv + 4, (s_q, 1, topk), dtype=torch.int32)  # out-of-range entries are skipped
    idx[2] = -1
    sink = torch.randn(h_q)
    length = torch.tensor([9, 4, 9, 0, 1], dtype=torch.int32)
    outs = (torch.full((s_q, h_q, 512), NAN, dtype=torch.bfloat16), torch.full((s_q, h_q), NAN),
            torch.full((s_q, h_q), NAN))
    o, mx, lse = pk.flash_mla_sparse_fwd(q, kv, idx, 0.05, 512, sink, length, backend="reference", out=outs[0],
                                         max_logits=outs[1], lse=outs[2])
    assert o is outs[0] and mx is outs[1] and lse is outs[2]
    for r in range(s_q):
        keys = [kv[t, 0].double() for t in idx[r, 0, :int(length[r])].tolist() if 0 <= t < s_kv]
        if d_qk == 512:
            keys = [torch.cat([kk, torch.zeros(64, dtype=torch.float64)]) for kk in keys]
        qr = q[r].double() if d_qk == 576 else torch.cat([q[r].double(), torch.zeros(h_q, 64, dtype=torch.float64)], 1)
        want_o, want_l, want_m = _direct_attention(qr, keys, 0.05, sink)
        assert torch.allclose(o[r].double(), want_o, rtol=2 ** -8, atol=1e-5), r
        assert torch.equal(lse[r] == math.inf, ~torch.isfinite(want_l)) and torch.equal(mx[r] == -math.inf,
                                                                                       want_m == -math.inf)
        fin = torch.isfinite(want_l)
        assert torch.allclose(lse[r][fin].double(), want_l[fin], rtol=1e-5, atol=1e-5), r
        assert torch.allclose(mx[r][fin].double(), want_m[fin], rtol=1e-5, atol=1e-5), r


def test_row_steps_do_not_change_results(seed, monkeypatch):
    # The dense references work in row steps bounded in memory; rows are independent, so a
    # tiny step gives the same bits.
    q = torch.randn(7, 4, 64).to(FP8)
    k8, sf = D.indexer_k_cast_to_fp8(torch.randn(50, 64))
    w, ks, ke = torch.randn(7, 4), torch.zeros(7, dtype=torch.int32), torch.full((7,), 50, dtype=torch.int32)
    qs, kv = torch.randn(9, 4, 576).bfloat16(), torch.randn(40, 1, 576).bfloat16()
    idx = torch.randint(-1, 40, (9, 1, 16), dtype=torch.int32)
    whole = (RD.fp8_mqa_logits(q, k8, sf, w, ks, ke), *RD.flash_mla_sparse_fwd(qs, kv, idx, 0.05))
    monkeypatch.setattr(RD, "STEP_ELEMENTS", 1)
    assert len(RD._row_steps(9, 16 * 580)) == 9
    stepped = (RD.fp8_mqa_logits(q, k8, sf, w, ks, ke), *RD.flash_mla_sparse_fwd(qs, kv, idx, 0.05))
    for a, b in zip(whole, stepped):
        assert torch.equal(a, b)


def test_sparse_decode_nan_in_a_used_row_propagates(seed):
    c8 = M.quantize_kv_cache_fp8(torch.randn(2, 64, 1, 576).bfloat16()).view(-1, 656)
    c8[70, 3] = 0x7F                                                       # an e4m3 NaN in token row 70
    q = torch.randn(2, 1, 4, 576).bfloat16()
    idx = torch.tensor([[[70, 5, -1]], [[5, 6, 7]]], dtype=torch.int32)
    out, lse = D.flash_mla_sparse_decode(q, c8.view(2, 64, 1, 656), idx, backend="reference")
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all() and lse[1].isfinite().all()


def test_sparse_decode_huge_scores_weigh_a_duplicated_maximum_once(seed):
    # At scale 1e9 the softmax is one-hot; the maximum's key listed twice must still weigh 1 in
    # all (normalised by the sum, not by exp(-lse), whose rounding step exceeds log 2 here).
    c8 = M.quantize_kv_cache_fp8(torch.randn(2, 64, 1, 576).bfloat16())
    q = torch.randn(1, 1, 4, 576).bfloat16()
    idx = torch.randperm(128, dtype=torch.int32)[:6].view(1, 1, 6)
    keys = torch.stack([_cache_row(c8, int(t)) for t in idx[0, 0].tolist()])    # [6, 576] float64
    best = (q[0, 0].double() @ keys.T).argmax(dim=-1)                          # per head
    want = torch.stack([keys[int(j), :512] for j in best])
    for h in range(4):
        dup = idx.clone()
        dup[0, 0, (int(best[h]) + 1) % 6] = idx[0, 0, best[h]]                 # head h's maximum twice
        out, lse = D.flash_mla_sparse_decode(q, c8, dup, softmax_scale=1e9, backend="reference")
        assert torch.isfinite(lse[0, h]).all()
        assert torch.allclose(out[0, 0, h].double(), want[h], rtol=2 ** -8, atol=0), h
