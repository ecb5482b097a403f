"""Ranks that agree or fail loudly (pykernels.ep.agreement through Buffer), across real
processes: each case of issue 17 - hidden 256 vs 128, top-k 2 vs 3, FP8 vs bf16,
num_experts 4 vs 8, a rank whose own arguments are invalid, combine with and without
weights, combine with handles of different dispatches, different construction arguments -
ends in a clear error on every rank, at once, naming the field and each rank's value, and
the Buffer stays usable (a correct call afterwards is exact). A rank that never arrives is
named on every live rank within the timeout; that Buffer is then unusable on every rank
(including the late one, which finds out at its own call), and a new Buffer works. The same
cases run on the three transports: "gloo" (the engine), "emu" (the hand-written kernels on
the emulator in each process) and "cuda" (the kernels on GPUs; marked gpu)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from pykernels.ep import Buffer, BufferBrokenError, Config, RankMismatchError, RankTimeoutError
from pykernels.reference import ep as ref
from tests.test_ep_engine import spawn_ranks

EMU_CONFIG = Config(4, 2, 8)
# the hand-written kernels on GPUs (one per rank, or both ranks on one; skipped without a Hopper GPU)
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def _args(backend):
    return dict(config=EMU_CONFIG) if backend == "emu" else {}


def _device(rank, backend):
    """Where this rank's tensors live: its GPU for the "cuda" transport, else the CPU."""
    if backend != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _routing(g, t, k, num_experts):
    return torch.rand(t, num_experts, generator=g).topk(k, dim=1).indices


def _expect_everywhere(rank, exc, pattern, call):
    """The call raises exc matching pattern, quickly (no timeout involved)."""
    start = time.monotonic()
    with pytest.raises(exc, match=pattern):
        call()
    assert time.monotonic() - start < 10, f"rank {rank}: the error took {time.monotonic() - start:.1f} s"


def _good_round(buf, rank, ranks, seed, backend):
    """A correct dispatch + combine after the errors: exact against the reference."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(5, 128, generator=g).bfloat16() for _ in range(ranks)]
    idxs = [_routing(g, 5, 2, 4 * ranks) for _ in range(ranks)]
    ws = [torch.rand(5, 2, generator=g) for _ in range(ranks)]
    sims = ref.simulate_dispatch(xs, idxs, ws, 4 * ranks)
    dev = _device(rank, backend)
    recv_x, recv_idx, _, _, handle, _ = buf.dispatch(xs[rank].to(dev), topk_idx=idxs[rank].to(dev),
                                                     topk_weights=ws[rank].to(dev), num_experts=4 * ranks,
                                                     **_args(backend))
    assert torch.equal(recv_x.cpu(), sims[rank]["recv_x"]) and torch.equal(recv_idx.cpu(), sims[rank]["recv_topk_idx"])
    out = buf.combine(recv_x, handle)[0]
    exp = ref.simulate_combine([d["recv_x"] for d in sims], [d["recv_src"] for d in sims], [5] * ranks)[rank]
    assert torch.equal(out.cpu(), exp.bfloat16())
    return recv_x.shape[0]


def _mismatch_worker(rank, ranks, init_file, seed, done_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        g = torch.Generator().manual_seed(seed + rank)
        dev = _device(rank, backend)
        buf = Buffer(None, backend=backend, timeout_s=30)
        other = rank == 1
        x256, x128 = torch.randn(6, 256).bfloat16().to(dev), torch.randn(6, 128).bfloat16().to(dev)
        idx2, idx3 = _routing(g, 6, 2, 8).to(dev), _routing(g, 6, 3, 8).to(dev)
        args = _args(backend)
        # hidden 256 vs 128
        _expect_everywhere(rank, RankMismatchError, r"Buffer.dispatch \(call 1\): the ranks disagree \(hidden: "
                           r"rank 0: 256, rank 1: 128\)\. Nothing was sent; every rank raised this error and the "
                           r"Buffer remains usable",
                           lambda: buf.dispatch(x128 if other else x256, topk_idx=idx2, num_experts=8, **args))
        # top-k 2 vs 3
        _expect_everywhere(rank, RankMismatchError, r"the ranks disagree \(topk: rank 0: 2, rank 1: 3\)",
                           lambda: buf.dispatch(x256, topk_idx=idx3 if other else idx2, num_experts=8, **args))
        # FP8 vs bf16
        fp8 = (x256.float().to(torch.float8_e4m3fn), torch.rand(6, 2, device=dev))
        _expect_everywhere(rank, RankMismatchError,
                           r"the ranks disagree \(dtype: rank 0: 'bf16', rank 1: 'fp8 e4m3 \+ f32 scales'\)",
                           lambda: buf.dispatch(fp8 if other else x256, topk_idx=idx2, num_experts=8, **args))
        # num_experts 4 vs 8 (ids valid for both)
        idx4 = _routing(g, 6, 2, 4).to(dev)
        _expect_everywhere(rank, RankMismatchError, r"the ranks disagree \(num_experts: rank 0: 4, rank 1: 8\)",
                           lambda: buf.dispatch(x256, topk_idx=idx4, num_experts=8 if other else 4, **args))
        # the kernels' ring geometry (their Config) on the kernel backends
        if backend == "emu":
            _expect_everywhere(rank, RankMismatchError, r"\(config: rank 0: \[4, 2, 8\], rank 1: \[6, 2, 8\]\)",
                               lambda: buf.dispatch(x256, topk_idx=idx2, num_experts=8,
                                                    config=Config(6, 2, 8) if other else EMU_CONFIG))
        # a rank whose own arguments are invalid: its own error there, named on the others
        if other:
            _expect_everywhere(rank, ValueError, r"x: hidden size 200 not supported",
                               lambda: buf.dispatch(torch.zeros(6, 200, dtype=torch.bfloat16, device=dev), topk_idx=idx2,
                                                    num_experts=8, **args))
        else:
            _expect_everywhere(rank, RankMismatchError, r"rank 1 rejected its arguments \(ValueError: x: hidden "
                               r"size 200 not supported",
                               lambda: buf.dispatch(x256, topk_idx=idx2, num_experts=8, **args))
        # combine: weights on one rank only; handles of different dispatches
        recv_x, _, recv_w, _, h1, _ = buf.dispatch(x256, topk_idx=idx2, topk_weights=torch.rand(6, 2, device=dev),
                                                   num_experts=8, **args)
        recv_x2, _, _, _, h2, _ = buf.dispatch(x256, topk_idx=idx2, num_experts=8, **args)
        _expect_everywhere(rank, RankMismatchError, r"Buffer.combine \(call \d+\): the ranks disagree \(topk: "
                           r"rank 0: 0, rank 1: 2\)",
                           lambda: buf.combine(recv_x, h1, recv_w if other else None))
        _expect_everywhere(rank, RankMismatchError, r"the ranks disagree \(handle_from: rank 0: \d+, rank 1: \d+\)",
                           lambda: buf.combine(recv_x2 if other else recv_x, h2 if other else h1))
        # still usable: a correct round is exact
        received = _good_round(buf, rank, ranks, seed, backend)
        # construction: different buffer sizes / local steps name the field; the next Buffer works
        _expect_everywhere(rank, RankMismatchError, r"Buffer\(\.\.\.\) construction: the ranks disagree "
                           r"\(num_nvl_bytes: rank 0: 1048576, rank 1: 2097152\)",
                           lambda: Buffer(None, 2 << 20 if other else 1 << 20, backend=backend, timeout_s=30))
        _expect_everywhere(rank, RankMismatchError, r"\(local_backend: rank 0: 'torch', rank 1: 'triton'\)",
                           lambda: Buffer(None, backend=backend, local_backend="triton" if other else "torch"))
        # a rank's invalid construction argument (even the timeout): its own error, named on the others
        if other:
            _expect_everywhere(rank, ValueError, r"timeout_s: expected a positive number of seconds, got 0",
                               lambda: Buffer(None, backend=backend, timeout_s=0))
        else:
            _expect_everywhere(rank, RankMismatchError, r"Buffer\(\.\.\.\) construction: rank 1 rejected its "
                               r"arguments \(ValueError: timeout_s: expected a positive number of seconds, got 0\)",
                               lambda: Buffer(None, backend=backend, timeout_s=30))
        _good_round(Buffer(None, backend=backend, timeout_s=30), rank, ranks, seed + 7, backend)
        # the per-call headers can be switched off (on every rank alike: the mode itself is agreed)
        _expect_everywhere(rank, RankMismatchError, r"\(agree_calls: rank 0: True, rank 1: False\)",
                           lambda: Buffer(None, backend=backend, agree_calls=not other))
        fast = Buffer(None, backend=backend, timeout_s=30, agree_calls=False)
        _good_round(fast, rank, ranks, seed + 8, backend)
        assert fast._agreement.seq == 1        # only the construction went through the store
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(received))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", "emu", CUDA])
def test_disagreeing_ranks_fail_on_every_rank(backend, seed):
    assert spawn_ranks(_mismatch_worker, 2, seed, backend) > 0


TIMEOUT_S = 2.0
SLACK_S = 8.0     # the store polls; a loaded machine


def _mark(done_dir, name):
    open(os.path.join(done_dir, name), "w").close()


def _wait_for(done_dir, names, limit=120):
    start = time.monotonic()
    while not all(os.path.exists(os.path.join(done_dir, n)) for n in names):
        assert time.monotonic() - start < limit, f"waited {limit} s for {names}"
        time.sleep(0.05)


def _timed(call):
    start = time.monotonic()
    call()
    return time.monotonic() - start


def _absent_worker(rank, ranks, init_file, seed, done_dir, backend):
    """The last rank is alive but absent: first from a construction, then from a dispatch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        late = ranks - 1
        live = [f"gave_up{r}" for r in range(late)]
        pattern = rf"rank\(s\) \[{late}\] did not arrive within timeout_s=2 s"
        # 1. absent from a construction
        if rank != late:
            with pytest.raises(RankTimeoutError, match=r"Buffer\(\.\.\.\) construction: " + pattern +
                               r".*This Buffer is now unusable on every rank"):
                took = _timed(lambda: Buffer(None, backend=backend, timeout_s=TIMEOUT_S))
            _mark(done_dir, f"gave_up{rank}")
        else:
            _wait_for(done_dir, live)
            with pytest.raises(BufferBrokenError, match="this Buffer is unusable: .*" + pattern):
                Buffer(None, backend=backend, timeout_s=TIMEOUT_S)
        dist.barrier()
        # 2. absent from a dispatch (the Buffer was built by every rank)
        buf = Buffer(None, backend=backend, timeout_s=TIMEOUT_S)
        dev = _device(rank, backend)
        x = torch.randn(4, 128).bfloat16().to(dev)
        idx = torch.randint(0, 2 * ranks, (4, 2)).to(dev)
        if rank != late:
            start = time.monotonic()
            with pytest.raises(RankTimeoutError, match=r"Buffer.dispatch \(call 1\): " + pattern):
                buf.dispatch(x, topk_idx=idx, num_experts=2 * ranks, **_args(backend))
            took = time.monotonic() - start
            assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
            # the Buffer says so at every later call, at once
            with pytest.raises(BufferBrokenError, match="Make a new Buffer on every rank"):
                buf.dispatch(x, topk_idx=idx, num_experts=2 * ranks)
            _mark(done_dir, f"gave_up_dispatch{rank}")
        else:
            _wait_for(done_dir, [f"gave_up_dispatch{r}" for r in range(late)])
            assert _timed(lambda: pytest.raises(BufferBrokenError, buf.dispatch, x, topk_idx=idx,
                                                num_experts=2 * ranks)) < SLACK_S
        # 3. a new Buffer on every rank works
        received = _good_round(Buffer(None, backend=backend, timeout_s=30), rank, ranks, seed, backend)
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(received))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ranks,backend", [(2, "gloo"), (3, "gloo"), (2, "emu"),
                                           pytest.param(2, "cuda", marks=pytest.mark.gpu)])
def test_absent_rank_is_named_on_every_live_rank(ranks, backend, seed):
    assert spawn_ranks(_absent_worker, ranks, seed, backend) > 0


def _dying_worker(rank, ranks, init_file, seed, done_dir):
    """Rank 1 agrees on the call, then its process ends before the payload moves."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    buf = Buffer(None, backend="gloo", timeout_s=TIMEOUT_S)
    x, idx = torch.randn(4, 128).bfloat16(), torch.randint(0, 4, (4, 2))
    if rank == 1:
        from pykernels.ep.engine import EngineTransport
        EngineTransport.make_handle = lambda *a, **k: os._exit(0)
        buf.dispatch(x, topk_idx=idx, num_experts=4)
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"Buffer.dispatch \(call 1\): a collective failed or did not finish "
                                               r"within timeout_s=2 s on rank 0 .*make a new process group and Buffer"):
        buf.dispatch(x, topk_idx=idx, num_experts=4)
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    with pytest.raises(BufferBrokenError, match="a collective failed or did not finish"):
        buf.dispatch(x, topk_idx=idx, num_experts=4)
    open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write("1")
    os._exit(0)   # the group lost a member: no collective teardown


def test_rank_dying_inside_a_call_is_a_timeout_not_a_hang(seed):
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dying_worker, args=(2, os.path.join(d, "store"), seed, d), nprocs=2, join=True)
        assert sorted(f for f in os.listdir(d) if f.endswith(".ok")) == ["rank0.ok"]
