"""EP dispatch/combine over torch.distributed (Buffer backend "gloo", CPU processes)
against DeepEP's invariants and the single-process reference simulation. Comparisons are
exact (bytes): the engine moves payloads bit-for-bit and reduces in the same fixed order as
the reference. The DeepEP-specific surface (handle tuple, num_worst_tokens, layout-only
dispatch, agreement and timeouts) is in tests/test_ep_buffer_*.py."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pykernels.ep import Buffer
from pykernels.reference import ep as ref

HIDDEN, TOPK = 256, 4


def _inputs(seed, ranks, num_experts, tokens=(37, 0, 51, 12)):
    """Every rank's inputs, reproducible from the seed so each rank can simulate all."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(ranks):
        t = tokens[r % len(tokens)]
        x = torch.randn(t, HIDDEN, generator=g).bfloat16()
        x[:, 0] = r                      # rows identify their source rank ...
        x[:, 1] = torch.arange(t) % 256  # ... and token
        # experts 1.. only: expert 0 receives nothing; some tokens route nowhere (-1)
        scores = torch.rand(t, num_experts - 1, generator=g)
        idx = scores.topk(TOPK, dim=1).indices + 1
        idx[torch.rand(t, TOPK, generator=g) < 0.2] = -1
        if t > 3:
            idx[3] = -1
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand(t, TOPK, generator=g))
    return xs, idxs, ws


def spawn_ranks(worker, ranks, seed, *args):
    """Run worker(rank, ranks, init_file, seed, done_dir, *args) in `ranks` gloo processes;
    each must write done_dir/rank<r>.ok holding an int once all its checks held. Returns
    the sum of those ints."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(ranks, os.path.join(d, "store"), seed, d) + args, nprocs=ranks, join=True)
        done = sorted(f for f in os.listdir(d) if f.endswith(".ok"))
        assert done == [f"rank{r}.ok" for r in range(ranks)]
        return sum(int(open(os.path.join(d, f)).read()) for f in done)


def _worker(rank, ranks, init_file, seed, done_dir, local_backend="torch"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        num_experts = 8 * ranks
        xs, idxs, ws = _inputs(seed, ranks, num_experts)
        sim = ref.simulate_dispatch(xs, idxs, ws, num_experts)[rank]
        buf = Buffer(None, backend="gloo", local_backend=local_backend)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], num_experts)
        exp_rank, exp_expert, exp_in = ref.dispatch_layout(idxs[rank], num_experts, ranks)
        assert torch.equal(per_rank, exp_rank) and torch.equal(per_expert, exp_expert) and torch.equal(in_rank, exp_in)

        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            xs[rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idxs[rank], topk_weights=ws[rank])
        assert torch.equal(recv_x.view(torch.int16), sim["recv_x"].view(torch.int16))
        assert torch.equal(recv_idx, sim["recv_topk_idx"]) and torch.equal(recv_w, sim["recv_topk_weights"])
        assert counts == sim["num_recv_tokens_per_expert"]
        # received counts equal the all-reduced layout counts
        total_rank, total_expert = per_rank.clone(), per_expert.clone()
        dist.all_reduce(total_rank)
        dist.all_reduce(total_expert)
        assert recv_x.shape[0] == int(total_rank[rank])
        e0 = rank * 8
        assert counts == total_expert[e0:e0 + 8].tolist()
        # rows carry their source: column 0 is the source rank, column 1 the token
        src = torch.repeat_interleave(torch.arange(ranks), torch.tensor(handle.recv_counts))
        assert torch.equal(recv_x[:, 0].float(), src.float())

        # combine of unmodified rows (DeepEP: a sum without weights): x times the number of
        # destination ranks, and no weights back without topk_weights
        combined, none_w, _ = buf.combine(recv_x, handle)
        times = in_rank.sum(1, keepdim=True).float()
        assert torch.equal(combined, (xs[rank].float() * times).bfloat16()) and none_w is None
        # with the received weights: the same rows, and each slot's weight back from the one
        # rank holding its expert (0 for -1 slots and tokens sent nowhere)
        combined_w, back_w, _ = buf.combine(recv_x, handle, recv_w)
        sims = ref.simulate_dispatch(xs, idxs, ws, num_experts)
        exp = ref.simulate_combine([d["recv_x"] for d in sims], [d["recv_src"] for d in sims], [x.shape[0] for x in xs])
        assert torch.equal(combined_w, exp[rank].bfloat16()) and torch.equal(combined_w, combined)
        assert torch.equal(back_w, torch.where(idxs[rank] >= 0, ws[rank], torch.zeros_like(ws[rank])))

        # a cached handle repeats the layout for new data; FP8 payloads move bit-exactly
        fp8 = (torch.randn(xs[rank].shape) * 3).to(torch.float8_e4m3fn)
        scales = torch.rand(xs[rank].shape[0], HIDDEN // 128)
        (rq, rs), *_ = buf.dispatch((fp8, scales), handle=handle)
        sim8 = ref.simulate_dispatch([(torch.randn(x.shape) * 3).to(torch.float8_e4m3fn) if i != rank else fp8
                                      for i, x in enumerate(xs)], idxs, ws, num_experts)
        mine = handle.recv_counts
        start = sum(mine[:rank])
        # rows this rank sent to itself are known locally: check them and the scales' shape
        assert torch.equal(rq[start:start + mine[rank]].view(torch.uint8),
                           sim8[rank]["recv_x"][start:start + mine[rank]].view(torch.uint8))
        assert rs.shape == (recv_x.shape[0], HIDDEN // 128)

        # the same inputs give identical bytes over repeated runs
        for _ in range(3):
            again = buf.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=num_experts)
            assert torch.equal(again[0].view(torch.int16), recv_x.view(torch.int16))
            again_c = buf.combine(again[0], again[4], again[2])
            assert torch.equal(again_c[0].view(torch.int16), combined_w.view(torch.int16))
            assert torch.equal(again_c[1].view(torch.int32), back_w.view(torch.int32))
        # reached only when every check above held: the parent asserts these markers
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(recv_x.shape[0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ranks", [2, 4])
def test_dispatch_combine_across_processes(ranks, seed):
    received = spawn_ranks(_worker, ranks, seed)
    assert received > 0  # tokens actually crossed ranks


def test_bad_inputs(single_rank_buffer):
    buf = single_rank_buffer
    x = torch.randn(4, 256).bfloat16()
    idx = torch.randint(0, 8, (4, 2))
    with pytest.raises(TypeError, match="x: expected a bfloat16 tensor or an FP8 pair, got torch.float32"):
        buf.dispatch(x.float(), topk_idx=idx, num_experts=8)
    with pytest.raises(ValueError, match="x: hidden size 200 not supported"):
        buf.dispatch(torch.randn(4, 200).bfloat16(), topk_idx=idx, num_experts=8)
    with pytest.raises(ValueError, match=r"topk_idx: expected values in \[-1, 8\), got range"):
        buf.dispatch(x, topk_idx=idx + 8, num_experts=8)
    with pytest.raises(ValueError, match="topk_idx: expected 4 rows"):
        buf.dispatch(x, topk_idx=idx[:3], num_experts=8)
    with pytest.raises(TypeError, match="topk_idx: expected an int64 tensor, got torch.int32"):
        buf.get_dispatch_layout(idx.int(), 8)
    with pytest.raises(ValueError, match="topk_idx: expected 1..16 experts per token, got 17"):
        buf.get_dispatch_layout(torch.zeros(4, 17, dtype=torch.long), 32)
    with pytest.raises(TypeError, match="x: expected FP8 data of dtype float8_e4m3fn"):
        buf.dispatch((x, torch.ones(4, 2)), topk_idx=idx, num_experts=8)
    with pytest.raises(ValueError, match=r"x scales: expected float32 \[4, 2\]"):
        buf.dispatch((x.float().to(torch.float8_e4m3fn), torch.ones(4, 3)), topk_idx=idx, num_experts=8)
    _, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=8)
    with pytest.raises(ValueError, match=r"x: expected shape \[\d+, hidden\]"):
        buf.combine(torch.randn(1, 256).bfloat16(), handle)
    with pytest.raises(ValueError, match="x: the handle was made for 4 tokens, got 2"):
        buf.dispatch(x[:2], handle=handle)


def test_buffer_on_subgroup(single_rank_group):
    buf = Buffer(dist.new_group([0]), backend="gloo")
    assert buf.num_ranks == 1 and buf.rank == 0


def test_buffer_requires_initialized_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        Buffer(None)
