"""A DeepEP-style intranode script run through `import pykernels.compat.deep_ep as deep_ep`
on 2 gloo processes, written from DeepEP's documented interface (names, argument forms,
return values), not from its test code: positional Buffer arguments with
explicitly_destroy, capture() as previous_event, keyword dispatch / combine with config and
async_finish, the handle's rank_prefix_matrix to split the received rows by source, FP8
and bf16 payloads with and without top-k, a cached dispatch, num_worst_tokens, destroy().

x rows are the source rank's number (DeepEP's check idiom), so every received row shows
where it came from; combine of the received rows gives x times the number of ranks the
token went to, and combine of the received top-k weights gives back the weights."""
import os

import pytest
import torch
import torch.distributed as dist

import pykernels.compat.deep_ep as deep_ep
from tests.test_ep_engine import spawn_ranks

T, H, K = 12, 256, 3


def _fp8_rowwise(x):
    """e4m3 data and float32 [T, H/128] scales (amax / 448 per 1x128 group)."""
    g = x.float().view(x.shape[0], -1, 128)
    sf = (g.abs().amax(-1) / 448.0).clamp(min=1e-4)
    return (g / sf[..., None]).to(torch.float8_e4m3fn).view(x.shape), sf


def _script_worker(rank, ranks, init_file, seed, done_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        group = dist.new_group(list(range(ranks)))
        num_experts = 4 * ranks
        g = torch.Generator().manual_seed(seed + rank)
        x = torch.ones(T, H, dtype=torch.bfloat16) * rank
        scores = torch.rand(T, num_experts, generator=g)
        topk_idx = scores.topk(K, dim=1).indices.to(deep_ep.topk_idx_t)
        topk_idx[torch.rand(T, K, generator=g) < 0.25] = -1
        topk_weights = torch.rand(T, K, generator=g)
        buffer = deep_ep.Buffer(group, int(1e8), 0, False, 1, explicitly_destroy=True, backend=backend)
        config = deep_ep.Config(deep_ep.Buffer.num_sms if backend != "emu" else 4, 4, 8)

        per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
            topk_idx, num_experts, previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
        event.current_stream_wait()
        assert per_rdma is None
        # received counts equal the all-reduced layout counts
        total_rank, total_expert = per_rank.clone(), per_expert.clone()
        dist.all_reduce(total_rank, group=group)
        dist.all_reduce(total_expert, group=group)
        epr = num_experts // ranks

        checked = 0
        for fp8 in (False, True):
            for with_topk in (False, True):
                current = _fp8_rowwise(x) if fp8 else x
                args = {"x": current, "num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank,
                        "num_tokens_per_expert": per_expert, "config": config, "async_finish": True}
                if with_topk:
                    args.update({"topk_idx": topk_idx, "topk_weights": topk_weights})
                recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(**args)
                event.current_stream_wait()
                data = recv_x[0].float() * recv_x[1].repeat_interleave(128, 1) if fp8 else recv_x.float()
                rank_prefix_matrix = handle[0]
                assert data.shape[0] == int(total_rank[rank]) == int(rank_prefix_matrix[-1, rank])
                assert counts == total_expert[rank * epr:(rank + 1) * epr].tolist()
                start = 0
                for src in range(ranks):        # rows of each source rank carry its number
                    end = int(rank_prefix_matrix[src, rank])
                    assert torch.equal(data[start:end], torch.full_like(data[start:end], src))
                    start = end
                if with_topk:
                    mine = recv_topk_idx >= 0
                    assert ((recv_topk_idx >= -1) & (recv_topk_idx < epr)).all()
                    assert not recv_topk_weights[~mine].any()
                # combine of the received rows and weights
                combine_x = recv_x if not fp8 else data.bfloat16()
                combined_x, combined_w, event = buffer.combine(
                    x=combine_x, handle=handle, topk_weights=recv_topk_weights if with_topk else None,
                    config=config, async_finish=True)
                event.current_stream_wait()
                times = in_rank.sum(1, keepdim=True)
                assert torch.equal(combined_x, (x.float() * times).bfloat16())
                if with_topk:
                    assert torch.equal(combined_w, torch.where(topk_idx >= 0, topk_weights,
                                                               torch.zeros_like(topk_weights)))
                else:
                    assert combined_w is None
                # a cached dispatch repeats the layout
                again, *rest, _ = buffer.dispatch(x=current, handle=handle, config=config)
                assert rest == [None, None, None, None]
                assert torch.equal((again[0] if fp8 else again).view(torch.uint8),
                                   (recv_x[0] if fp8 else recv_x).view(torch.uint8))
                checked += 1

        # num_worst_tokens: no counts list, the outputs have num_worst_tokens rows
        worst = T * ranks
        recv_x, recv_topk_idx, _, counts, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst, config=config)
        n = int(total_rank[rank])
        assert counts == [] and recv_x.shape[0] == worst and (recv_topk_idx[n:] == -1).all()
        buffer.destroy()
        with pytest.raises(RuntimeError, match="this Buffer was destroyed"):
            buffer.combine(recv_x, handle)
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(checked))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", "emu"])
def test_deepep_style_script_through_compat(backend, seed):
    assert spawn_ranks(_script_worker, 2, seed, backend) == 2 * 4
