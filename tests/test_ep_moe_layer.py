"""A whole MoE layer on 2 gloo ranks (processes): dispatch -> FP8 grouped GEMM with each
expert's own weights -> weighting -> combine, with no permutation between the steps,
against a single-process float64 computation of the same layer.

- normal mode: Buffer.dispatch(..., expert_layout="contiguous") gives the received rows
  grouped per local expert with m_indices (segments padded to
  get_mk_alignment_for_contiguous_layout()) and each grouped row's top-k weight;
  m_grouped_fp8_gemm_nt_contiguous; rows times their weights; combine(rows, handle).
- low-latency mode: Buffer.low_latency_dispatch(use_fp8=True) (the cast inside the
  dispatch); m_grouped_fp8_gemm_nt_masked with masked_m = recv_count; low_latency_combine.
The GEMM runs on the reference and the triton backends; the Buffer on the engine (gloo)
and on the hand-written kernels (backend "emu"). GEMM outputs start as NaN, so a
row the GEMM does not write (padding, rows past masked_m) that combine reads shows up.

Reference: y[t] = sum_k w[t, k] * (deq(x[t]) @ deq(W[e_k])^T) in float64, with deq(x)
the same 1x128 FP8 cast of x and deq(W) the 128x128 block cast of the weights.
Tolerance, per element: 2^-6 * S + 2^-16 * S, S = sum_k |w[t, k] * (deq(x[t]) @ deq(W)^T)|:
each bf16 rounding on the way costs at most half an ulp, 2^-8 of its value, and there are
at most four (the expert output; in normal mode the weighted row and the sum of a received
row's grouped rows; the final result); float32 accumulation adds far less than 2^-16.
"""
import os

import pytest
import torch
import torch.distributed as dist

from pykernels import gemm
from pykernels.ep import Buffer
from pykernels.quant import per_block_cast_to_fp8, per_token_cast_to_fp8
from tests.ep_low_latency_cases import spawn

HIDDEN, EXPERTS, TOPK, MAX_TOKENS = 256, 4, 2, 16
GEMM_BACKENDS = ("reference", "triton")


def layer_inputs(seed, ranks, tokens=(11, 14)):
    """Every rank's tokens and routing, and every expert's weights (bf16 [H, H])."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(ranks):
        t = tokens[r % len(tokens)]
        xs.append(torch.randn(t, HIDDEN, generator=g).bfloat16())
        idx = torch.rand(t, EXPERTS, generator=g).topk(TOPK, dim=1).indices
        idx[torch.rand(t, TOPK, generator=g) < 0.15] = -1
        idx[1] = -1                                  # a token that goes nowhere
        idxs.append(idx)
        ws.append(torch.rand(t, TOPK, generator=g))
    weights = [(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5).bfloat16() for _ in range(EXPERTS)]
    return xs, idxs, ws, weights


def cast_weights(weights):
    """Per expert: (e4m3 [H, H], float32 [H/128, H/128]) stacked: [E, H, H], [E, H/128, H/128]."""
    casts = [per_block_cast_to_fp8(w, backend="reference") for w in weights]
    return torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])


def reference_layer(x, idx, w, wq, wsf):
    """(out float64 [T, H], bound float64 [T, H]) of one rank's tokens (module docstring)."""
    q, sf = per_token_cast_to_fp8(x, backend="reference")
    a = q.double() * sf.double().repeat_interleave(128, 1)
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    mag = torch.zeros_like(out)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            b = wq[e].double() * wsf[e].double().repeat_interleave(128, 0).repeat_interleave(128, 1)
            y = a[t] @ b.T
            out[t] += float(w[t, k]) * y
            mag[t] += (float(w[t, k]) * y).abs()
    return out, (2 ** -6 + 2 ** -16) * mag


def _assert_layer(got, ref, bound, what):
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape, (what, got.dtype, got.shape)
    err = (got.double() - ref).abs()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite outputs (a NaN-poisoned GEMM row was read)"
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max())}, bound there {float(bound.flatten()[err.argmax()])}"


def _worker(rank, ranks, init_file, seed, done_dir, backend="gloo", gemm_backends=GEMM_BACKENDS):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        xs, idxs, ws, weights = layer_inputs(seed, ranks)
        wq, wsf = cast_weights(weights)
        local = EXPERTS // ranks
        mine = slice(rank * local, (rank + 1) * local)
        b = (wq[mine].contiguous(), wsf[mine].contiguous())
        ref, bound = reference_layer(xs[rank], idxs[rank], ws[rank], wq, wsf)
        buf = Buffer(None, low_latency_mode=True, backend=backend)
        x_fp8 = per_token_cast_to_fp8(xs[rank], backend="reference")
        checked = 0
        for gemm_backend in gemm_backends:
            # normal mode, contiguous layout
            recv_x, m_indices, recv_w, counts, handle, _ = buf.dispatch(
                x_fp8, topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=EXPERTS, expert_layout="contiguous")
            align = gemm.get_mk_alignment_for_contiguous_layout()
            rows = recv_x[0].shape[0]
            assert m_indices.dtype == torch.int32 and m_indices.shape == (rows,) and rows % align == 0
            # segments: expert e's pairs, then -1 padding up to the alignment
            pairs = [sum(int((i == rank * local + e).sum()) for i in idxs) for e in range(local)]
            assert counts == [-(-p // align) * align for p in pairs] and sum(counts) == rows
            expect = torch.cat([torch.tensor([e] * p + [-1] * (c - p), dtype=torch.int32)
                                for e, (p, c) in enumerate(zip(pairs, counts))])
            assert torch.equal(m_indices, expect)
            out = torch.full((rows, HIDDEN), float("nan"), dtype=torch.bfloat16)
            gemm.m_grouped_fp8_gemm_nt_contiguous(recv_x, b, out, m_indices, backend=gemm_backend)
            weighted = (out.float() * recv_w[:, None]).bfloat16()     # padding rows stay NaN (NaN * 0)
            combined, _, _ = buf.combine(weighted, handle)
            _assert_layer(combined, ref, bound, f"normal/contiguous, {gemm_backend} GEMM, {backend}")

            # low-latency mode, masked layout
            recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], MAX_TOKENS, EXPERTS,
                                                                        use_fp8=True)
            out = torch.full((local, ranks * MAX_TOKENS, HIDDEN), float("nan"), dtype=torch.bfloat16)
            gemm.m_grouped_fp8_gemm_nt_masked(recv_x, b, out, recv_count, MAX_TOKENS, backend=gemm_backend)
            combined, _, _ = buf.low_latency_combine(out, idxs[rank], ws[rank], handle)
            _assert_layer(combined, ref, bound, f"low-latency/masked, {gemm_backend} GEMM, {backend}")
            checked += 2 * combined.shape[0]
        with open(os.path.join(done_dir, f"rank{rank}.ok"), "w") as f:
            f.write(str(checked))
    finally:
        dist.destroy_process_group()


def test_moe_layer_two_ranks(seed):
    checked = spawn(_worker, 2, seed)
    assert checked == 2 * len(GEMM_BACKENDS) * (11 + 14)


def test_moe_layer_two_ranks_emu_kernels(seed):
    """The layer on Buffer(backend="emu"): the hand-written ring and low-latency kernels on
    the emulator in each process (reference GEMM only: the GEMM backends are covered above)."""
    checked = spawn(_worker, 2, seed, "emu", ("reference",))
    assert checked == 2 * (11 + 14)


def test_expert_layout_rows_and_combine(single_rank_buffer, seed):
    """The contiguous layout on one rank, every row checked: segments of (row, k) pairs in
    row order padded with zero rows to expert_alignment, an expert nobody chose has no
    segment, a token routed nowhere has no row; combine sums each token's grouped rows."""
    buf = single_rank_buffer
    g = torch.Generator().manual_seed(seed)
    T, K, E, align = 9, 3, 4, 4
    x = torch.randn(T, HIDDEN, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])   # expert 3: never
    idx[torch.rand(T, K, generator=g) < 0.25] = -1
    idx[4] = -1
    w = torch.rand(T, K, generator=g)
    grouped, m_indices, row_w, counts, handle, _ = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=align, expert_layout="contiguous")
    rows, expect_w, expect_m = [], [], []
    for e in range(E):
        pairs = [(t, k) for t in range(T) for k in range(K) if int(idx[t, k]) == e]
        seg = -(-len(pairs) // align) * align
        assert counts[e] == seg
        rows += [x[t] for t, _ in pairs] + [torch.zeros(HIDDEN, dtype=torch.bfloat16)] * (seg - len(pairs))
        expect_w += [float(w[t, k]) for t, k in pairs] + [0.0] * (seg - len(pairs))
        expect_m += [e] * len(pairs) + [-1] * (seg - len(pairs))
    assert counts[3] == 0 and sum(counts) == grouped.shape[0]
    assert torch.equal(grouped.view(torch.int16), torch.stack(rows).view(torch.int16))
    assert torch.equal(m_indices, torch.tensor(expect_m, dtype=torch.int32))
    assert torch.equal(row_w, torch.tensor(expect_w))
    # combine: per token the float32 sum of its rows in k order, bf16 once; padding is NaN
    y = (grouped.float() * 2 - 1).bfloat16()
    y[m_indices < 0] = float("nan")
    out, weights, _ = buf.combine(y, handle)
    expect = torch.zeros(T, HIDDEN)
    for t in range(T):
        for k in range(K):
            if int(idx[t, k]) >= 0:
                expect[t] = expect[t] + (x[t].float() * 2 - 1).bfloat16().float()
    assert weights is None
    assert torch.equal(out.view(torch.int16), expect.bfloat16().view(torch.int16))

    bad = [
        (ValueError, r"expert_layout: expected one of \(None, 'contiguous'\), got 'masked'",
         lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, expert_layout="masked")),
        (ValueError, r"expert_layout: needs topk_idx and no cached handle",
         lambda: buf.dispatch(x, handle, expert_layout="contiguous")),
        (ValueError, r"expert_layout: not supported with num_worst_tokens=32",
         lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=32, expert_layout="contiguous")),
        (ValueError, r"x: expected shape \[%d, hidden\] \(the grouped rows dispatch returned\)" % y.shape[0],
         lambda: buf.combine(y[:-1], handle)),
        (TypeError, r"x: expected bfloat16 \[%d, hidden\]" % y.shape[0], lambda: buf.combine(y.float(), handle)),
        (ValueError, r"topk_weights: expected None with an expert_layout handle",
         lambda: buf.combine(y, handle, torch.zeros(T, K))),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
