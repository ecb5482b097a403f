"""Low-latency dispatch/combine (pykernels.ep.Buffer.low_latency_*, engine path) across 2
gloo processes against a loop-by-loop simulation of DeepEP's documented semantics: rows
packed per local expert in (source rank, source token, k) order, recv_count, src_info,
layout_range, the FP8 1x128 cast by the dispatch (plain, power-of-two, UE8M0-packed), the
weighted combine. Comparisons are exact (payload bytes, the combine's float32 order).
Ranks that disagree, reject their arguments or do not arrive end in an error on every rank;
each bad argument is named."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

from pykernels.ep import Buffer
from pykernels.ep.agreement import BufferBrokenError, RankMismatchError, RankTimeoutError
from tests.ep_low_latency_cases import (EXPERTS, HIDDEN, MAX_TOKENS, check_dispatch, expected_combine,
                                        expert_outputs, ll_inputs, spawn)

TIMEOUT_S = 3


def _worker(rank, ranks, init_file, seed, done_dir, local_backend, backend="gloo"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        xs, idxs, ws = ll_inputs(seed, ranks)
        buf = Buffer(None, low_latency_mode=True, local_backend=local_backend, backend=backend)
        checked = 0
        for fp8, round_scale, ue8m0 in ((False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)):
            recv_x, count, handle, event, hook = buf.low_latency_dispatch(
                xs[rank], idxs[rank], MAX_TOKENS, EXPERTS, use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0)
            assert hook is None
            checked += check_dispatch(rank, ranks, xs, idxs, recv_x, count, handle, fp8, round_scale, ue8m0)
            if round_scale:
                continue          # the cast and its scale formats are checked; the combine below
            y = expert_outputs(recv_x, count, rank, ranks, fp8)
            out, _, hook = buf.low_latency_combine(y, idxs[rank], ws[rank], handle)
            assert hook is None and out.dtype == torch.bfloat16 and out.shape == (xs[rank].shape[0], HIDDEN)
            expect = expected_combine(rank, xs, idxs, ws, fp8)
            assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
            checked += out.shape[0]

        # the overlap form: nothing is received until the hook runs; then the same results;
        # combine into a given out, and zero_copy from the staging buffer
        recv_x, count, handle, _, hook = buf.low_latency_dispatch(xs[rank], idxs[rank], MAX_TOKENS, EXPERTS,
                                                                  use_fp8=False, return_recv_hook=True)
        assert callable(hook)
        hook()
        checked += check_dispatch(rank, ranks, xs, idxs, recv_x, count, handle, False)
        y = expert_outputs(recv_x, count, rank, ranks, False)
        out = torch.full((xs[rank].shape[0], HIDDEN), float("nan"), dtype=torch.bfloat16)
        res, _, hook = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, return_recv_hook=True, out=out)
        assert res is out
        hook()
        expect = expected_combine(rank, xs, idxs, ws, False)
        assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
        buf.get_next_low_latency_combine_buffer(handle).copy_(y)
        out, _, _ = buf.low_latency_combine(torch.empty(0), idxs[rank], ws[rank], handle, zero_copy=True)
        assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
        # two dispatches pending at once (two micro-batches), received in the other order
        pending = [buf.low_latency_dispatch(xs[rank], idxs[rank], MAX_TOKENS, EXPERTS, use_fp8=fp8,
                                            return_recv_hook=True) for fp8 in (False, True)]
        if backend == "gloo":     # the engine's two buffer sets are taken: a third is refused
            with pytest.raises(RuntimeError, match=r"at most 2 may be pending"):
                buf.low_latency_dispatch(xs[rank], idxs[rank], MAX_TOKENS, EXPERTS, return_recv_hook=True)
        for (recv_x, count, handle, _, hook), fp8 in reversed(list(zip(pending, (False, True)))):
            hook()
            checked += check_dispatch(rank, ranks, xs, idxs, recv_x, count, handle, fp8)
        with open(os.path.join(done_dir, f"rank{rank}.ok"), "w") as f:
            f.write(str(checked))
    finally:
        dist.destroy_process_group()


def test_low_latency_two_ranks(seed):
    checked = spawn(_worker, 2, seed, "torch")
    assert checked > 50, f"only {checked} rows checked"


def test_low_latency_two_ranks_triton_cast(seed):
    checked = spawn(_worker, 2, seed, "triton")
    assert checked > 50, f"only {checked} rows checked"


def test_low_latency_two_ranks_emu_kernels(seed):
    """The same checks with Buffer(backend="emu"): the hand-written kernels on the emulator in
    each of 2 processes, buffers in shared memory, the kernels writing the packed layout
    (KernelLowLatency passes it through)."""
    checked = spawn(_worker, 2, seed, "torch", "emu")
    assert checked > 50, f"only {checked} rows checked"


def _errors_worker(rank, ranks, init_file, seed, done_dir):
    """Ranks that disagree or reject their arguments: an error on every rank before any
    data moves, and the Buffer still usable (a round with a rank of no tokens); then an
    absent rank, named within timeout_s."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        xs, idxs, ws = ll_inputs(seed, ranks)
        x, idx, w = xs[rank], idxs[rank], ws[rank]
        buf = Buffer(None, low_latency_mode=True, timeout_s=TIMEOUT_S)
        with pytest.raises(RankMismatchError, match=r"num_max_dispatch_tokens_per_rank: rank 0: 16, rank 1: 17"):
            buf.low_latency_dispatch(x, idx, MAX_TOKENS + rank, EXPERTS)
        with pytest.raises(RankMismatchError, match=r"use_fp8: rank 0: True, rank 1: False"):
            buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS, use_fp8=rank == 0)
        with pytest.raises(RankMismatchError, match=r"num_experts: rank 0: 8, rank 1: 16"):
            buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS * (rank + 1))
        # rank 1 names expert 3 twice in each of its 16 tokens: 32 pairs for 16 slots
        bad = torch.full((MAX_TOKENS, 2), 3, dtype=torch.int64)
        if rank == 1:
            with pytest.raises(ValueError, match=r"topk_idx: expert 3 is named by 32 \(token, k\) pairs, more than "
                                                 r"num_max_dispatch_tokens_per_rank=16"):
                buf.low_latency_dispatch(torch.zeros(MAX_TOKENS, HIDDEN, dtype=torch.bfloat16), bad, MAX_TOKENS,
                                         EXPERTS)
        else:
            with pytest.raises(RankMismatchError, match=r"rank 1 rejected its arguments \(ValueError: topk_idx"):
                buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS)
        # still usable: a full round, exact
        recv_x, count, h1, _, _ = buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS, use_fp8=False)
        check_dispatch(rank, ranks, xs, idxs, recv_x, count, h1, False)
        y = expert_outputs(recv_x, count, rank, ranks, False)
        _, _, h2, _, _ = buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS, use_fp8=False)
        with pytest.raises(RankMismatchError, match=r"handle_from"):
            buf.low_latency_combine(y, idx, w, h1 if rank == 0 else h2)
        out, _, _ = buf.low_latency_combine(y, idx, w, h2)
        assert torch.equal(out.view(torch.int16), expected_combine(rank, xs, idxs, ws, False).view(torch.int16))
        # a rank with no tokens still takes part (and receives)
        zs, zidxs, zws = ll_inputs(seed, ranks, tokens=(5, 0))
        recv_x, count, h3, _, _ = buf.low_latency_dispatch(zs[rank], zidxs[rank], MAX_TOKENS, EXPERTS)
        check_dispatch(rank, ranks, zs, zidxs, recv_x, count, h3, True)
        y = expert_outputs(recv_x, count, rank, ranks, True)
        out, _, _ = buf.low_latency_combine(y, zidxs[rank], zws[rank], h3)
        assert out.shape == (zs[rank].shape[0], HIDDEN)
        assert torch.equal(out.view(torch.int16), expected_combine(rank, zs, zidxs, zws, True).view(torch.int16))

        # rank 1 does not come to the next call: rank 0 names it within the timeout; rank 1,
        # arriving after that, finds the Buffer broken
        store = dist.distributed_c10d._get_default_store()
        if rank == 0:
            start = time.monotonic()
            with pytest.raises(RankTimeoutError, match=r"rank\(s\) \[1\] did not arrive within timeout_s=3"):
                buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS)
            assert time.monotonic() - start < TIMEOUT_S + 10
            store.set("test/rank0_timed_out", "1")
        else:
            store.wait(["test/rank0_timed_out"], datetime.timedelta(seconds=60))
            with pytest.raises(BufferBrokenError, match=r"rank\(s\) \[1\] did not arrive"):
                buf.low_latency_dispatch(x, idx, MAX_TOKENS, EXPERTS)
        with open(os.path.join(done_dir, f"rank{rank}.ok"), "w") as f:
            f.write("1")
    finally:
        dist.destroy_process_group()


def test_low_latency_ranks_disagree_or_are_absent(seed):
    assert spawn(_errors_worker, 2, seed) == 2


@pytest.fixture
def single_rank_buffer(single_rank_group):
    return Buffer(None, backend="gloo", low_latency_mode=True)


def test_low_latency_bad_inputs(single_rank_buffer):
    buf = single_rank_buffer
    x = torch.randn(4, 256).bfloat16()
    idx = torch.randint(0, 8, (4, 2))
    w = torch.rand(4, 2)
    cases = [
        (TypeError, r"x: expected a bfloat16 tensor \[num_tokens, hidden\] .*got torch.float32 \[4, 256\]",
         lambda: buf.low_latency_dispatch(x.float(), idx, 16, 8)),
        (ValueError, r"x: hidden size 200 not supported",
         lambda: buf.low_latency_dispatch(torch.randn(4, 200).bfloat16(), idx, 16, 8)),
        (ValueError, r"x: expected at most num_max_dispatch_tokens_per_rank=3 tokens, got 4",
         lambda: buf.low_latency_dispatch(x, idx, 3, 8)),
        (ValueError, r"num_max_dispatch_tokens_per_rank: expected a positive int, got 0",
         lambda: buf.low_latency_dispatch(x, idx, 0, 8)),
        (TypeError, r"topk_idx: expected an int64 tensor \[num_tokens, topk\], got torch.int32 \[4, 2\]",
         lambda: buf.low_latency_dispatch(x, idx.int(), 16, 8)),
        (ValueError, r"topk_idx: expected \[4, K\] with 1 <= K <= 16, got \[3, 2\]",
         lambda: buf.low_latency_dispatch(x, idx[:3], 16, 8)),
        (ValueError, r"topk_idx: expected values in \[-1, 8\), got range \[\d+, \d+\]",
         lambda: buf.low_latency_dispatch(x, idx + 8, 16, 8)),
        (ValueError, r"use_ue8m0: expected False unless use_fp8=True and round_scale=True",
         lambda: buf.low_latency_dispatch(x, idx, 16, 8, use_ue8m0=True)),
        (ValueError, r"x: use_ue8m0 packs 4 scales per int32, so hidden must be a multiple of 512, got 256",
         lambda: buf.low_latency_dispatch(x, idx, 16, 8, round_scale=True, use_ue8m0=True)),
        (TypeError, r"use_fp8: expected a bool, got int",
         lambda: buf.low_latency_dispatch(x, idx, 16, 8, use_fp8=1)),
        (ValueError, r"cumulative_local_expert_recv_stats: expected an int32 tensor \[8\]",
         lambda: buf.low_latency_dispatch(x, idx, 16, 8, torch.zeros(8, dtype=torch.int64))),
        (ValueError, r"dispatch_wait_recv_cost_stats: expected None",
         lambda: buf.low_latency_dispatch(x, idx, 16, 8, None, torch.zeros(1, 1, dtype=torch.int64))),
        (TypeError, r"handle: expected the LowLatencyHandle of a low_latency_dispatch, got tuple",
         lambda: buf.low_latency_combine(x, idx, w, (1, 2))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    stats = torch.zeros(8, dtype=torch.int32)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, 16, 8, stats)
    assert torch.equal(stats, count) and int(count.sum()) == 8     # 4 tokens x 2 slots, one rank
    y = torch.zeros(8, 16, 256, dtype=torch.bfloat16)
    combine_cases = [
        (TypeError, r"x: expected bfloat16 \[8, 16, 256\]", lambda: buf.low_latency_combine(y.float(), idx, w, handle)),
        (ValueError, r"x: expected shape \[8, 16, 256\] .*got \[8, 15, 256\]",
         lambda: buf.low_latency_combine(y[:, :15], idx, w, handle)),
        (ValueError, r"topk_idx: expected shape \[4, 2\] \(the dispatched one\), got \[4, 1\]",
         lambda: buf.low_latency_combine(y, idx[:, :1], w, handle)),
        (TypeError, r"topk_weights: expected a float32 tensor \[4, 2\], got torch.float64",
         lambda: buf.low_latency_combine(y, idx, w.double(), handle)),
        (ValueError, r"out: expected a bfloat16 tensor \[4, 256\], got torch.bfloat16 \[4, 128\]",
         lambda: buf.low_latency_combine(y, idx, w, handle, out=torch.empty(4, 128, dtype=torch.bfloat16))),
        (ValueError, r"use_logfmt: expected False", lambda: buf.low_latency_combine(y, idx, w, handle, True)),
    ]
    for exc, match, call in combine_cases:
        with pytest.raises(exc, match=match):
            call()
    out, _, _ = buf.low_latency_combine(y, idx, w, handle)         # the Buffer is still usable
    assert out.shape == (4, 256) and not bool(out.float().abs().sum())
    assert Buffer.get_low_latency_rdma_size_hint(16, 256, 1, 8) == 2 * 2 * (8 * 16 * (2 * 256 + 4) + 32
                                                                             + 8 * 16 * 2 * 256)
    buf.clean_low_latency_buffer(16, 256, 8)
    recv_x, count2, _, _, _ = buf.low_latency_dispatch(x, idx, 16, 8, use_fp8=False)
    assert torch.equal(count2, count)
