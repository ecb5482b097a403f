"""Shared cases of the low-latency EP tests (tests/test_ep_low_latency*.py,
tests/test_ep_moe_layer.py): inputs, a loop-by-loop simulation of DeepEP's documented
low-latency semantics (rows packed per local expert in (source rank, source token, k)
order; the weighted combine), the checks of one rank's dispatch results, and the
multi-process runner."""
import os
import tempfile

import torch
import torch.multiprocessing as mp

from pykernels.quant import ceil_to_ue8m0
from pykernels.reference import quant as ref_quant

HIDDEN, TOPK, EXPERTS, MAX_TOKENS = 512, 4, 8, 16


def ll_inputs(seed, ranks, tokens=(13, 16, 0, 7), hidden=HIDDEN, topk=TOPK, num_experts=EXPERTS):
    """Every rank's (x bf16, topk_idx, topk_weights), reproducible from the seed. Expert 0
    is never chosen; ~20% of slots are -1; token 2 routes nowhere; rows vary in scale
    so the 1x128 groups get different scales."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(ranks):
        t = tokens[r % len(tokens)]
        x = torch.randn(t, hidden, generator=g) * torch.exp2(torch.randint(-4, 5, (t, hidden // 128), generator=g)
                                                              ).repeat_interleave(128, 1)
        idx = torch.rand(t, num_experts - 1, generator=g).topk(topk, dim=1).indices + 1
        idx[torch.rand(t, topk, generator=g) < 0.2] = -1
        if t > 2:
            idx[2] = -1
        xs.append(x.bfloat16())
        idxs.append(idx)
        ws.append(torch.rand(t, topk, generator=g))
    return xs, idxs, ws


def simulate_ll_dispatch(idxs, dst, num_experts):
    """Per local expert of rank dst: the (source rank, source token) of each row, in order."""
    ranks = len(idxs)
    local = num_experts // ranks
    rows = [[] for _ in range(local)]
    for le in range(local):
        for s in range(ranks):
            for t in range(idxs[s].shape[0]):
                for k in range(idxs[s].shape[1]):
                    if int(idxs[s][t, k]) == dst * local + le:
                        rows[le].append((s, t))
    return rows


def simulate_ll_combine(expert_out, idx, w):
    """out[t] = bf16(sum over valid k in order of f32(expert_out(t, k)) * w[t, k]) from 0.0."""
    out = torch.zeros(idx.shape[0], HIDDEN, dtype=torch.float32)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if int(idx[t, k]) >= 0:
                out[t] = out[t] + expert_out(t, k).float() * w[t, k]
    return out.bfloat16()


def expert_fn(x_row: torch.Tensor, e: int) -> torch.Tensor:
    """The test's stand-in for expert e: a bf16 row that depends on the expert."""
    return (x_row.float() * (e + 1) - e).bfloat16()


def spawn(worker, ranks, seed, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(ranks, os.path.join(d, "store"), seed, d) + args, nprocs=ranks, join=True)
        done = sorted(f for f in os.listdir(d) if f.endswith(".ok"))
        assert done == [f"rank{r}.ok" for r in range(ranks)]
        return sum(int(open(os.path.join(d, f)).read()) for f in done)


def check_dispatch(rank, ranks, xs, idxs, recv_x, recv_count, handle, fp8, round_scale=False, ue8m0=False):
    """Every valid row, count, source, range against the simulation; returns rows checked."""
    expect = simulate_ll_dispatch(idxs, rank, EXPERTS)
    local = EXPERTS // ranks
    assert recv_count.dtype == torch.int32 and recv_count.tolist() == [len(r) for r in expect]
    src_info, layout_range, max_tokens, hidden, num_experts = handle         # DeepEP's handle tuple
    assert src_info is handle.src_info and layout_range is handle.layout_range
    assert (max_tokens, hidden, num_experts) == (MAX_TOKENS, HIDDEN, EXPERTS)
    if fp8:
        data, scales = recv_x
        assert data.dtype == torch.float8_e4m3fn and data.shape == (local, ranks * MAX_TOKENS, HIDDEN)
        assert scales.stride(1) == 1, "scales: column-major (TMA-aligned) as DeepEP returns them"
        casts = [ref_quant.per_token_cast_to_fp8(x) for x in xs]
    else:
        assert recv_x.dtype == torch.bfloat16 and recv_x.shape == (local, ranks * MAX_TOKENS, HIDDEN)
    checked = 0
    for le, rows in enumerate(expect):
        first = {}
        for i, (s, t) in enumerate(rows):
            first.setdefault(s, i)
            assert int(handle.src_info[le, i]) == t
            if not fp8:
                assert torch.equal(recv_x[le, i].view(torch.int16), xs[s][t].view(torch.int16))
                continue
            q, sf = casts[s][0][t], casts[s][1][t]
            if round_scale:   # power-of-two scales: x / 2^k is exact, one rounding to e4m3
                sf = ceil_to_ue8m0(sf)
                q = ref_quant.to_e4m3_satfinite(xs[s][t].float() / sf.repeat_interleave(128))
                assert torch.equal(torch.exp2(torch.log2(sf).round()), sf)
            assert torch.equal(data[le, i].view(torch.uint8), q.view(torch.uint8))
            if ue8m0:
                exps = ((sf.view(torch.int32) >> 23) & 0xFF).tolist()
                words = [sum(b << (8 * j) for j, b in enumerate(exps[w:w + 4])) for w in range(0, len(exps), 4)]
                got = [int(v) & 0xFFFFFFFF for v in scales[le, i]]
                assert got == words, (got, words)
            else:
                assert torch.equal(scales[le, i], sf)
            # a real FP8 cast: within half an e4m3 ulp of x (2^-4 relative; 2^-10 * scale
            # for e4m3 subnormals)
            full = sf.repeat_interleave(128)
            err = (q.float() * full - xs[s][t].float()).abs()
            assert bool((err <= xs[s][t].float().abs() * 2 ** -4 + full * 2 ** -10).all())
            checked += 1
        for s in range(ranks):   # (first row << 32) | rows per source rank
            n = sum(1 for r in rows if r[0] == s)
            v = int(handle.layout_range[le, s])
            assert v & 0xFFFFFFFF == n and (n == 0 or v >> 32 == first[s]), (le, s, v, n)
    return checked


def expert_outputs(recv_x, recv_count, rank, ranks, fp8, poison=True):
    """The stand-in experts on the packed rows; rows past recv_count are NaN (never read)."""
    local = EXPERTS // ranks
    if fp8:
        data, scales = recv_x
        x = data.float() * scales.repeat_interleave(128, dim=2)
    else:
        x = recv_x.float()
    y = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    for le in range(local):
        n = int(recv_count[le])
        y[le, :n] = expert_fn(x[le, :n], rank * local + le)
    return y


def expected_combine(rank, xs, idxs, ws, fp8):
    def expert_out(t, k):
        x = xs[rank][t]
        if fp8:
            q, sf = ref_quant.per_token_cast_to_fp8(x[None])
            x = (q.float() * sf.repeat_interleave(128, dim=1))[0]
        return expert_fn(x, int(idxs[rank][t, k]))
    return simulate_ll_combine(expert_out, idxs[rank], ws[rank])
