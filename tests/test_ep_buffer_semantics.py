"""pykernels.ep.Buffer with DeepEP's documented semantics, across 2 and 3 real processes
(gloo), on the engine ("gloo", torch and Triton local steps) and on the hand-written
kernels run by the emulator in each process ("emu"), against pykernels.reference.ep.

Checked from DeepEP's documented interface: get_dispatch_layout's outputs; dispatch's
six results and the handle as DeepEP's six-tuple ([0] rank_prefix_matrix, [3]
recv_src_idx, [4] is_token_in_rank, [5] send_head); combine = a plain sum of the rows
each destination returns, and combined_topk_weights = the sum of the weights passed to
combine; a cached handle (payload only); num_worst_tokens (fixed rows, -1 / 0 padding,
empty counts list); layout-only dispatch (no top-k); expert_alignment; async_finish's
event. Every comparison is exact (bit patterns)."""
import os

import pytest
import torch
import torch.distributed as dist

from pykernels.ep import Buffer, Config, DispatchHandle, EventOverlap
from pykernels.reference import ep as ref
from tests.test_ep_engine import spawn_ranks

HIDDEN, TOPK = 256, 3
TOKENS = (9, 0, 7)            # rank 1 sends nothing (and a 3-rank group has 3 sizes)
EMU_CONFIG = Config(4, 2, 8)  # 2 channels, 8 ring slots: rings wrap, senders block (emulator-sized)


def _inputs(seed, ranks):
    """Every rank's inputs, reproducible from the seed so each rank can simulate all ranks:
    expert 0 is never chosen, ~20% of slots are -1, token 2 is routed nowhere."""
    num_experts = 4 * ranks
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(ranks):
        t = TOKENS[r % len(TOKENS)]
        xs.append(torch.randn(t, HIDDEN, generator=g).bfloat16())
        idx = torch.rand(t, num_experts - 1, generator=g).topk(TOPK, dim=1).indices + 1
        idx[torch.rand(t, TOPK, generator=g) < 0.2] = -1
        if t > 2:
            idx[2] = -1
        idxs.append(idx)
        ws.append(torch.rand(t, TOPK, generator=g))
    return xs, idxs, ws, num_experts


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _expert_outputs(sims):
    """Per destination rank: rows and weights that depend on the rank (a misrouted row or
    weight shows), all computable by every rank."""
    ys = [(d["recv_x"].float() * (r + 1) + 0.5).bfloat16() for r, d in enumerate(sims)]
    wts = [d["recv_topk_weights"] * (r + 2) + 0.25 for r, d in enumerate(sims)]   # no 0 left: a plain sum
    return ys, wts


def _semantics_worker(rank, ranks, init_file, seed, done_dir, backend, local_backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        xs, idxs, ws, E = _inputs(seed, ranks)
        sims = ref.simulate_dispatch(xs, idxs, ws, E)
        sim = sims[rank]
        T, N = xs[rank].shape[0], sim["recv_x"].shape[0]
        config = EMU_CONFIG if backend == "emu" else None
        buf = Buffer(None, backend=backend, local_backend=local_backend, timeout_s=60)

        # layout: local, DeepEP's five results
        per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(idxs[rank], E)
        exp_rank, exp_expert, exp_in = ref.dispatch_layout(idxs[rank], E, ranks)
        assert per_rdma is None and isinstance(event, EventOverlap)
        assert torch.equal(per_rank, exp_rank) and torch.equal(per_expert, exp_expert) and torch.equal(in_rank, exp_in)

        # dispatch with the layout (DeepEP's keyword form)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            xs[rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idxs[rank], topk_weights=ws[rank], config=config)
        assert torch.equal(_bits(recv_x), _bits(sim["recv_x"]))
        assert torch.equal(recv_idx, sim["recv_topk_idx"]) and torch.equal(_bits(recv_w), _bits(sim["recv_topk_weights"]))
        assert counts == sim["num_recv_tokens_per_expert"]

        # the handle as DeepEP's tuple
        assert isinstance(handle, DispatchHandle) and isinstance(handle, tuple) and len(handle) == 6
        rank_prefix_matrix, channel_prefix, recv_channel_prefix, recv_src_idx, h_in_rank, send_head = handle
        all_counts = torch.stack([ref.dispatch_layout(i, E, ranks)[0] for i in idxs]).to(torch.int64)
        assert rank_prefix_matrix.dtype == torch.int32
        assert torch.equal(rank_prefix_matrix, torch.cumsum(all_counts, 0).to(torch.int32))
        assert int(rank_prefix_matrix[-1, rank]) == N
        assert torch.equal(recv_src_idx, sim["recv_src"][:, 1].to(torch.int32)) and torch.equal(h_in_rank, in_rank)
        exp_head = torch.full((T, ranks), -1, dtype=torch.int32)
        for r in range(ranks):
            tok = in_rank[:, r].nonzero().flatten()
            exp_head[tok, r] = torch.arange(tok.numel(), dtype=torch.int32)
        assert torch.equal(send_head, exp_head)
        assert channel_prefix.shape[0] == ranks and recv_channel_prefix.shape[0] == ranks
        assert not channel_prefix[:, 0].any() and not recv_channel_prefix[:, 0].any()   # channel 0 starts at 0

        # combine: DeepEP's plain sum of the returned rows, and of the weights passed to it
        ys, wts = _expert_outputs(sims)
        combined, combined_w, _ = buf.combine(ys[rank], handle, wts[rank])
        srcs = [d["recv_src"] for d in sims]
        exp_x = ref.simulate_combine(ys, srcs, [x.shape[0] for x in xs])[rank].bfloat16()
        exp_w = ref.simulate_combine(wts, srcs, [x.shape[0] for x in xs])[rank]
        assert torch.equal(_bits(combined), _bits(exp_x)) and torch.equal(_bits(combined_w), _bits(exp_w))
        assert not combined[2:3].any() if T > 2 else True          # a token sent nowhere combines to 0
        # DeepEP's invariants: unmodified rows come back times the ranks they went to;
        # unmodified received weights give back the original weights (0 on -1 slots)
        same, back_w, _ = buf.combine(recv_x, handle, recv_w)
        assert torch.equal(same, (xs[rank].float() * in_rank.sum(1, keepdim=True)).bfloat16())
        assert torch.equal(back_w, torch.where(idxs[rank] >= 0, ws[rank], torch.zeros_like(ws[rank])))
        assert buf.combine(recv_x, handle)[1] is None

        # a cached handle repeats the layout for a new payload (FP8 here); top-k not allowed
        g = torch.Generator().manual_seed(seed + 1)
        fp8s = [((torch.randn(x.shape, generator=g) * 3).to(torch.float8_e4m3fn),
                 torch.rand(x.shape[0], HIDDEN // 128, generator=g)) for x in xs]
        (rq, rs), r_idx, r_w, r_counts, r_handle, _ = buf.dispatch(fp8s[rank], handle=handle)
        assert (r_idx, r_w, r_counts, r_handle) == (None, None, None, None)
        assert torch.equal(_bits(rq), _bits(ref.simulate_dispatch([f[0] for f in fp8s], idxs, ws, E)[rank]["recv_x"]))
        assert torch.equal(_bits(rs), _bits(ref.simulate_dispatch([f[1] for f in fp8s], idxs, ws, E)[rank]["recv_x"]))
        with pytest.raises(ValueError, match="topk_idx, topk_weights: expected None with a cached handle"):
            buf.dispatch(xs[rank], handle=handle, topk_idx=idxs[rank])

        # num_worst_tokens: W rows; padding rows have top-k -1 and weight 0; counts list empty
        received = [d["recv_x"].shape[0] for d in sims]
        W = max(received) + 2
        wx, widx, ww, wcounts, whandle, _ = buf.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank],
                                                         num_experts=E, num_worst_tokens=W, config=config)
        assert wx.shape[0] == widx.shape[0] == ww.shape[0] == W and wcounts == [] and whandle.num_recv == W
        assert torch.equal(_bits(wx[:N]), _bits(sim["recv_x"])) and torch.equal(widx[:N], sim["recv_topk_idx"])
        assert torch.equal(ww[:N], sim["recv_topk_weights"])
        assert (widx[N:] == -1).all() and not ww[N:].any()
        poisoned = wx.clone()
        poisoned[N:] = float("nan")     # combine must not read the padding rows
        assert torch.equal(buf.combine(poisoned, whandle)[0], same)
        # too few rows for some rank: the same ValueError on every rank, nothing sent
        if max(received) > 0:
            short = max(received) - 1
            over = ", ".join(f"rank {r} receives {n}" for r, n in enumerate(received) if n > short)
            with pytest.raises(ValueError, match=f"num_worst_tokens: {short} rows are fewer than rank\\(s\\) receive: "
                                                 f"{over}. Nothing was sent; the Buffer remains usable"):
                buf.dispatch(xs[rank], topk_idx=idxs[rank], num_experts=E, num_worst_tokens=short)

        # layout-only dispatch: rows by is_token_in_rank, counts from num_tokens_per_expert
        lx, lidx, lw, lcounts, lhandle, _ = buf.dispatch(xs[rank], num_tokens_per_rank=per_rank,
                                                         is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                         expert_alignment=4)
        assert lidx is None and lw is None and torch.equal(_bits(lx), _bits(sim["recv_x"]))
        assert lcounts == [-(-c // 4) * 4 for c in sim["num_recv_tokens_per_expert"]]
        assert torch.equal(buf.combine(lx, lhandle)[0], same)

        # async_finish: an event (no GPU here: nothing to wait for)
        *_, event = buf.dispatch(xs[rank], handle=handle, async_finish=True)
        with event:
            pass
        assert isinstance(event, EventOverlap) and event.event is None
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(N))
    finally:
        dist.destroy_process_group()


# the Triton local steps on 2 ranks only (their interpreter is slow)
@pytest.mark.parametrize("ranks,backend,local_backend", [(2, "gloo", "torch"), (3, "gloo", "torch"),
                                                         (2, "gloo", "triton"), (2, "emu", "torch"),
                                                         (3, "emu", "torch")])
def test_deepep_semantics_across_processes(ranks, backend, local_backend, seed):
    assert spawn_ranks(_semantics_worker, ranks, seed, backend, local_backend) > 0
