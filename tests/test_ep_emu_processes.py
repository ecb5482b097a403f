"""The hand-written intranode EP kernels across real OS processes: EmuIntranode (one gloo
rank per process, buffers in shared memory mapped at one address in every process, kernels
on the PTX emulator) with 2, 3 and 4 ranks, checked against pykernels.reference.ep.

Tolerances: every comparison is exact (bytes), as in tests/test_ep_kernels_emu.py: dispatch
moves bytes, both combines add float32 products in the reference's order without FMA.
Outputs are poisoned (0xFF bytes: NaN, -1) before each kernel, so anything a kernel fails
to write differs from the reference. Each rank process builds every rank's inputs from the
seed, so it can run the reference for all of them. Sizes are tiny: the emulator is slow.
"""
import json
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pykernels.cuda import ep as cep
from pykernels.reference import ep as ref

from .test_ep_kernels_emu import (_bits, _check_dispatch, _experts, _inputs, _ll_combine_reference, _ll_expected,
                                  _routing)

H, K, CHANNELS, SLOTS, PUBLISH = 256, 4, 2, 8, 4
M = 16                        # low-latency slots per (local expert, source rank)
TOKENS = (6, 13)              # tokens per rank drawn from [6, 13): several processes emulate at once
TIMEOUT_S = 20.0              # generous: 2 shared CPU cores, several processes emulating at once
ABSENT_TIMEOUT_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, R, *args, backend="gloo"):
    """Run worker(rank, R, *args) in R processes of a `backend` group; returns each rank's
    JSON report (what the worker returned)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(worker, R, _free_port(), d, backend) + args, nprocs=R, join=True)
        return [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(R)]


def _entry(rank, worker, R, port, out_dir, backend, *args):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R)
    try:
        report = worker(rank, R, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _config(R, low_latency=True):
    E = _experts(R)
    return cep.IntranodeConfig(num_ranks=R, hidden=H, max_topk=K, num_channels=CHANNELS, num_slots=SLOTS,
                               publish_every=PUBLISH, num_experts=E if low_latency else 0,
                               max_dispatch_tokens=M if low_latency else 0)


def _expected_dispatch(xs, topk, ws, E, fp8):
    if not fp8:
        return ref.simulate_dispatch(xs, topk, ws, E)
    exp = ref.simulate_dispatch([x[0].view(torch.uint8) for x in xs], topk, ws, E)
    for e, s in zip(exp, ref.simulate_dispatch([x[1] for x in xs], topk, ws, E)):
        e["recv_x"] = (e["recv_x"], s["recv_x"])
    return exp


def _received(R, seed, fp8=False, low_latency=False):
    """Rows each rank receives by the reference (what the workers report after their own checks)."""
    xs, topk, ws, E, _ = _inputs(R, seed, fp8=fp8, token_range=TOKENS)
    if low_latency:
        return [sum(len(toks) for toks in per.values()) for per in _ll_expected(xs, topk, E, R, M)]
    return [e["recv_src"].shape[0] for e in _expected_dispatch(xs, topk, ws, E, fp8)]


def _forbid_host_reads():
    def no_read(t):
        raise AssertionError(f"host read of a {list(t.shape)} tensor on a path that must not read the device")
    cep._to_host = no_read


# ---------------------------------------------------------------------------------------
# Workers (run in the rank processes)
# ---------------------------------------------------------------------------------------
def _normal_worker(rank, R, seed, fp8, worst):
    """Dispatch (default or num_worst_tokens) and, for bf16, combine weighted and not."""
    from pykernels.ep.transport_emu import EmuIntranode
    xs, topk, ws, E, Ts = _inputs(R, seed, fp8=fp8, token_range=TOKENS)
    exp = _expected_dispatch(xs, topk, ws, E, fp8)
    t = EmuIntranode(_config(R, low_latency=False), timeout_s=TIMEOUT_S)
    try:
        W = max(Ts) * R if worst else 0
        if worst:
            _forbid_host_reads()
        res = t.dispatch(xs[rank], topk[rank], ws[rank], E, num_worst_tokens=W)
        n = exp[rank]["recv_src"].shape[0]
        if worst:
            assert int(res["num_recv_tokens"]) == n and res["handle"].num_recv == W
            data = res["recv_x"][0] if fp8 else res["recv_x"]
            assert (_bits(data[n:]) == 0xFF).all(), "a row past the received count was written"
            assert (res["recv_topk_idx"][n:] == -1).all() and (res["recv_topk_weights"][n:] == 0).all()
            cut = {k: (v[:n] if k in ("recv_topk_idx", "recv_topk_weights") else v) for k, v in res.items()}
            cut["recv_x"] = (data[:n], res["recv_x"][1][:n]) if fp8 else data[:n]
            h = res["handle"]
            cut["handle"] = cep.IntranodeHandle(h.is_token_in_rank, h.rank_offset, h.recv_src_idx[:n],
                                                h.recv_channel_offset, n, h.num_tokens)
            cut["num_recv_tokens_per_expert"] = res["num_recv_tokens_per_expert"].tolist()
            _check_dispatch([cut], [exp[rank]], 1)
        else:
            _check_dispatch([res], [exp[rank]], 1)
        if fp8:
            assert res["recv_x"][0].dtype == torch.float8_e4m3fn
            return {"received": n}
        # combine: every rank's expert output is a function of the rows it received
        ys = [(e["recv_x"].float() * (1 + d)).to(torch.bfloat16) for d, e in enumerate(exp)]
        recv_w = [e["recv_topk_weights"] for e in exp]
        want_w = ref.simulate_combine(ys, [e["recv_src"] for e in exp], Ts, recv_w)[rank]
        want = ref.simulate_combine(ys, [e["recv_src"] for e in exp], Ts)[rank]
        y = ys[rank]
        w = res["recv_topk_weights"]
        if worst:    # rows past the count: NaN poison that combine must not read
            y = torch.cat([y, torch.full((W - n, H), float("nan"), dtype=torch.bfloat16)])
        out = t.combine(y, res["handle"], w)
        assert torch.equal(_bits(out), _bits(want_w.to(torch.bfloat16)))
        out = t.combine(y, res["handle"])
        assert torch.equal(_bits(out), _bits(want.to(torch.bfloat16)))
        if worst:   # too small a bound on some rank: no trap, rows dropped, buffers stay usable
            small = max(e["recv_src"].shape[0] for e in exp) - 1
            try:
                t.dispatch(xs[rank], topk[rank], ws[rank], E, num_worst_tokens=small)
                assert n <= small, f"rank {rank} receives {n} rows > {small} but no DispatchOverflowError"
            except cep.DispatchOverflowError as e:
                rec = e.records[rank]
                assert n > small and rec["code"] == 9 and rec["needed"] == small, (n, small, rec)
                assert f"num_worst_tokens={small} is too small" in str(e)
        # the same buffers again: ring counters go on from the last call
        again = t.dispatch(xs[rank], topk[rank], ws[rank], E, num_worst_tokens=W)
        assert torch.equal(_bits(again["recv_x"][:n]), _bits(exp[rank]["recv_x"]))
        assert t.error_record() is None
        return {"received": n}
    finally:
        t.destroy()


def _low_latency_worker(rank, R, seed):
    """Low-latency dispatch (bf16, then FP8 on the same buffers) and weighted combine, no
    host read on either path."""
    from pykernels.ep.transport_emu import EmuIntranode
    xs, topk, ws, E, Ts = _inputs(R, seed, fp8=False, token_range=TOKENS)
    xq, _, _, _, _ = _inputs(R, seed, fp8=True, token_range=TOKENS)
    El = E // R
    exp = _ll_expected(xs, topk, E, R, M)[rank]
    t = EmuIntranode(_config(R), timeout_s=TIMEOUT_S)
    try:
        _forbid_host_reads()
        res = t.low_latency_dispatch(xs[rank], topk[rank])
        h = res["handle"]
        for le in range(El):
            first = 0       # rows packed per expert: source s's follow those of the sources before it
            for s in range(R):
                toks = exp[le, s]
                n = len(toks)
                assert int(h.recv_layout[le, s]) == n
                assert h.recv_src_info[le, first:first + n].tolist() == toks
                assert torch.equal(_bits(res["recv_x"][le, first:first + n]), _bits(xs[s][toks])), (le, s)
                first += n
            assert (_bits(res["recv_x"][le, first:]) == 0xFF).all()
            assert int(res["recv_count"][le]) == first
        # expert outputs: a different function of the rows per (rank, local expert); every
        # rank computes all of them to know which rows come back to its tokens
        all_exp = _ll_expected(xs, topk, E, R, M)
        y = (res["recv_x"].float() * (torch.arange(El)[:, None, None] + 2 + rank)).to(torch.bfloat16)
        out = t.low_latency_combine(y, topk[rank], ws[rank], h)
        rows = {}
        for tok in range(Ts[rank]):
            for k in range(K):
                e = int(topk[rank][tok, k])
                if e >= 0:
                    d, le = divmod(e, El)
                    j = int(h.slot_of[tok, k])
                    assert all_exp[d][le, rank][j] == tok
                    rows[(tok, k)] = (xs[rank][tok].float() * (le + 2 + d)).to(torch.bfloat16)
        assert torch.equal(_bits(out), _bits(_ll_combine_reference(rows, topk[rank], ws[rank])))
        res2 = t.low_latency_dispatch(xq[rank], topk[rank])
        for le in range(El):
            first = 0
            for s in range(R):
                toks = exp[le, s]
                n = len(toks)
                assert torch.equal(_bits(res2["recv_x"][0][le, first:first + n]), _bits(xq[s][0][toks]))
                assert torch.equal(res2["recv_x"][1][le, first:first + n], xq[s][1][toks])
                first += n
        assert res2["handle"].seq == h.seq + 1 and t.error_record() is None
        return {"received": int(res["recv_count"].sum())}
    finally:
        t.destroy()


def _absent_worker(rank, R, absent, call):
    """Rank `absent` stays alive but never makes `call`; the others must each raise a
    PeerTimeoutError naming it, within the time-out (plus the kernel's own spin bound)."""
    from pykernels.ep.transport_emu import EmuIntranode
    xs, topk, ws, E, Ts = _inputs(R, 1234, fp8=False, token_range=TOKENS)
    t = EmuIntranode(_config(R), timeout_s=ABSENT_TIMEOUT_S)
    report = {}
    try:
        if call == "combine":          # every rank dispatches; the absent one skips the combine
            res = t.dispatch(xs[rank], topk[rank], ws[rank], E)
        if rank == absent:
            # alive: stays in the group until the others are done
            dist.barrier()
            return {"absent": True}
        start = time.monotonic()
        try:
            if call == "dispatch":
                t.dispatch(xs[rank], topk[rank], ws[rank], E)
            elif call == "combine":
                t.combine(res["recv_x"], res["handle"])
            else:
                t.low_latency_dispatch(xs[rank], topk[rank])
            report["error"] = None
        except cep.PeerTimeoutError as e:
            report.update(error=str(e), peer=e.peer, record=e.record, call=e.call, rank=e.rank)
        report["seconds"] = time.monotonic() - start
        try:                                           # a broken transport says so
            t.dispatch(xs[rank], topk[rank], ws[rank], E)
        except RuntimeError as e:
            report["after"] = str(e)
        dist.barrier()
        return report
    finally:
        t.destroy()


def _lifetime_worker(rank, R):
    """The segments: gone from /dev/shm once constructed, mapped at one address in every
    process, unmapped by destroy() (idempotent) and by garbage collection."""
    import gc

    from pykernels.emu.shared_global import NAME_PREFIX
    from pykernels.ep.transport_emu import EmuIntranode

    pids = [None] * R
    dist.all_gather_object(pids, os.getpid())

    def ours():      # the group's segment files (names start with the creator's pid)
        return sorted(f for f in os.listdir("/dev/shm") if any(f.startswith(f"{NAME_PREFIX}{p}_") for p in pids))

    def mapped(address):
        with open("/proc/self/maps") as f:
            return any(int(line.split("-")[0], 16) == address for line in f)

    t = EmuIntranode(_config(R), timeout_s=TIMEOUT_S)
    seg = t.provider.segments
    addresses = [seg.address(r) for r in range(R)]
    peers = [None] * R
    dist.all_gather_object(peers, t.provider.peers)
    assert all(p == t.provider.peers for p in peers), "ranks see the buffers at different addresses"
    assert t.provider.buffer.data_ptr() == addresses[rank] and all(mapped(a) for a in addresses)
    dist.barrier()   # every rank's constructor has returned
    left_while_alive = ours()
    dist.barrier()   # every rank has listed /dev/shm before any creates the next group's files
    t.destroy()
    t.destroy()
    assert not any(mapped(a) for a in addresses)
    with pytest.raises(RuntimeError, match="destroyed"):
        t.dispatch(torch.zeros(1, H, dtype=torch.bfloat16), torch.zeros(1, K, dtype=torch.int64), None, _experts(R))
    t2 = EmuIntranode(_config(R), timeout_s=TIMEOUT_S)
    more = [t2.provider.segments.address(r) for r in range(R)]
    del t2
    gc.collect()
    return {"left_while_alive": left_while_alive, "gc_unmapped": not any(mapped(a) for a in more)}


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_dispatch_combine_bf16_across_processes(R, seed):
    reports = _spawn(_normal_worker, R, seed, False, False)
    assert [r["received"] for r in reports] == _received(R, seed)


@pytest.mark.parametrize("R", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_dispatch_fp8_across_processes(R, seed):
    reports = _spawn(_normal_worker, R, seed, True, False)
    assert [r["received"] for r in reports] == _received(R, seed, fp8=True)


@pytest.mark.parametrize("R", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_dispatch_combine_num_worst_tokens_without_host_reads(R, seed):
    reports = _spawn(_normal_worker, R, seed, False, True)
    assert [r["received"] for r in reports] == _received(R, seed)


@pytest.mark.parametrize("R", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_low_latency_across_processes(R, seed):
    reports = _spawn(_low_latency_worker, R, seed)
    assert [r["received"] for r in reports] == _received(R, seed, low_latency=True)


@pytest.mark.parametrize("R,absent,call", [(2, 1, "dispatch"), (3, 2, "low_latency_dispatch"),
                                           pytest.param(3, 0, "dispatch", marks=pytest.mark.slow),
                                           pytest.param(3, 1, "combine", marks=pytest.mark.slow)])
def test_absent_rank_is_named_on_every_live_rank(R, absent, call):
    reports = _spawn(_absent_worker, R, absent, call)
    for r, rep in enumerate(reports):
        if r == absent:
            continue
        assert rep["error"] is not None, f"rank {r} returned although rank {absent} never arrived"
        assert rep["peer"] == absent and rep["rank"] == r and rep["call"] == call, rep
        begun = 1 if call == "combine" else 0
        assert f"rank {absent} has begun {begun} calls" in rep["error"], rep["error"]
        if call == "dispatch":          # the counts exchange on the host notices first
            assert rep["record"] is None and f"rank(s) [{absent}]" in rep["error"]
        else:                           # the kernel's wait: its own record names the peer
            codes = (6,) if call == "low_latency_dispatch" else (3, 4)
            assert rep["record"]["code"] in codes and rep["record"]["peer"] == absent, rep["record"]
        # the time-out, plus at most the kernel's bounded waits (a few seconds of emulation)
        assert ABSENT_TIMEOUT_S <= rep["seconds"] < ABSENT_TIMEOUT_S + 60, rep["seconds"]
        assert "must be rebuilt" in rep["after"]


def test_segments_are_shared_at_one_address_and_released():
    reports = _spawn(_lifetime_worker, 2)
    for rep in reports:
        assert rep["left_while_alive"] == [] and rep["gc_unmapped"]


def test_bad_config_and_timeout_arguments():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        from pykernels.ep.transport_emu import EmuIntranode
        with pytest.raises(ValueError, match=r"cfg.num_ranks: expected the group size 1, got 2"):
            EmuIntranode(_config(2))
        with pytest.raises(ValueError, match=r"timeout_s: expected a positive number of seconds, got 0"):
            EmuIntranode(_config(1), timeout_s=0)
        # bad calls are refused before anything runs (and before the rank counts as arrived)
        t = EmuIntranode(_config(1))
        x = torch.zeros(3, H, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"topk_idx: expected int64 \[T, K\], got None"):
            t.dispatch(x, None, None, 4)
        with pytest.raises(ValueError, match=r"num_experts: expected a positive multiple of 1, got 0"):
            t.dispatch(x, torch.zeros(3, K, dtype=torch.int64), None, 0)
        handle = cep.IntranodeHandle(torch.zeros(3, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.int32),
                                     torch.zeros(2, dtype=torch.int32), torch.zeros(1, CHANNELS, 2, dtype=torch.int32),
                                     2, 3)
        with pytest.raises(ValueError, match=r"x: expected bf16 \[2, H\] \(the rows dispatch returned\), got "
                                             r"torch.bfloat16 \[3, 256\]"):
            t.combine(x, handle)
        with pytest.raises(ValueError, match=rf"x: at most cfg.max_dispatch_tokens={M} tokens, got {M + 1}"):
            t.low_latency_dispatch(torch.zeros(M + 1, H, dtype=torch.bfloat16), torch.zeros(M + 1, K, dtype=torch.int64))
        with pytest.raises(ValueError, match=rf"y: expected bf16 \[4, {M}, H\], got torch.bfloat16 \[4, 3, 256\]"):
            t.low_latency_combine(torch.zeros(4, 3, H, dtype=torch.bfloat16), torch.zeros(3, K, dtype=torch.int64),
                                  torch.zeros(3, K), None)
        assert t.provider.calls == 0
        t.destroy()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# CudaIntranode: the same logic over CUDA IPC (gpu-marked; not run on a CPU machine)
# ---------------------------------------------------------------------------------------
def _to_cuda(x):
    return tuple(u.cuda() for u in x) if isinstance(x, tuple) else x.cuda()


def _cuda_worker(rank, R, seed):
    """One GPU per rank (NCCL): normal and low-latency calls against the reference, then
    destroy() closes every IPC mapping it opened."""
    torch.cuda.set_device(rank)
    xs, topk, ws, E, Ts = _inputs(R, seed, fp8=False, token_range=TOKENS)
    exp = _expected_dispatch(xs, topk, ws, E, False)
    t = cep.CudaIntranode(_config(R), timeout_s=10)
    assert len(t.provider._opened) == R - 1
    res = t.dispatch(_to_cuda(xs[rank]), topk[rank].cuda(), ws[rank].cuda(), E, num_worst_tokens=max(Ts) * R)
    n = exp[rank]["recv_src"].shape[0]
    assert int(res["num_recv_tokens"]) == n
    assert torch.equal(_bits(res["recv_x"][:n].cpu()), _bits(exp[rank]["recv_x"]))
    ys = [(e["recv_x"].float() * (1 + d)).to(torch.bfloat16) for d, e in enumerate(exp)]
    y = torch.cat([ys[rank], torch.full((res["handle"].num_recv - n, H), float("nan"), dtype=torch.bfloat16)])
    out = t.combine(y.cuda(), res["handle"])
    want = ref.simulate_combine(ys, [e["recv_src"] for e in exp], Ts)[rank]
    assert torch.equal(_bits(out.cpu()), _bits(want.to(torch.bfloat16)))
    ll = t.low_latency_dispatch(_to_cuda(xs[rank]), topk[rank].cuda())
    exp_ll = _ll_expected(xs, topk, E, R, M)[rank]
    for le in range(E // R):
        first = 0                        # packed per expert: source s's rows after the earlier sources'
        for s in range(R):
            toks = exp_ll[le, s]
            got = ll["recv_x"][le, first:first + len(toks)].cpu()
            assert torch.equal(_bits(got), _bits(xs[s][toks])), (le, s)
            first += len(toks)
        assert int(ll["recv_count"][le]) == first
    torch.cuda.synchronize()
    assert t.error_record() is None
    t.destroy()
    t.destroy()
    assert t.provider._opened == [] and t.provider.buffer is None
    return {"received": n}


@pytest.mark.gpu
def test_cuda_intranode_across_gpus(seed):
    R = torch.cuda.device_count()
    if R < 2:
        pytest.skip(f"needs 2 GPUs (one per rank, NCCL), found {R}")
    R = min(R, 4)
    reports = _spawn(_cuda_worker, R, seed, backend="nccl")
    assert [r["received"] for r in reports] == _received(R, seed)


@pytest.mark.gpu
def test_cuda_intranode_captures_into_a_cuda_graph(seed):
    """One rank (its own buffer through the same code): dispatch with num_worst_tokens and
    combine captured into one CUDA graph (no host sync may happen while capturing), the
    graph replayed on new inputs against the reference; the low-latency dispatch captured
    and replayed once (its call number is a kernel argument: each replay needs a new one)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        R = 1
        cfg = cep.IntranodeConfig(num_ranks=R, hidden=H, max_topk=K, num_channels=CHANNELS, num_slots=SLOTS,
                                  publish_every=PUBLISH, num_experts=4, max_dispatch_tokens=M)
        t = cep.CudaIntranode(cfg, timeout_s=10)
        gen = torch.Generator().manual_seed(seed)
        T, E = 12, 4
        topk = _routing(gen, T, E, K, dead=3).cuda()
        x = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        W = T
        x.copy_(torch.randn(T, H, generator=gen).to(torch.bfloat16))
        warm = t.dispatch(x, topk, None, E, num_worst_tokens=W)        # loads the modules before capture
        t.combine(warm["recv_x"], warm["handle"])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            res = t.dispatch(x, topk, None, E, num_worst_tokens=W)
            out = t.combine(res["recv_x"], res["handle"])
        for _ in range(2):
            xin = torch.randn(T, H, generator=gen).to(torch.bfloat16)
            x.copy_(xin)
            g.replay()
            torch.cuda.synchronize()
            exp = ref.simulate_dispatch([xin], [topk.cpu()], [torch.ones(T, K)], E)[0]
            n = exp["recv_src"].shape[0]
            assert int(res["num_recv_tokens"]) == n
            assert torch.equal(_bits(res["recv_x"][:n].cpu()), _bits(exp["recv_x"]))
            want = ref.simulate_combine([exp["recv_x"]], [exp["recv_src"]], [T])[0]
            assert torch.equal(_bits(out.cpu()), _bits(want.to(torch.bfloat16)))
        gl = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gl):
            ll = t.low_latency_dispatch(x, topk)
        gl.replay()
        torch.cuda.synchronize()
        for (le, s), toks in _ll_expected([x.cpu()], [topk.cpu()], E, R, M)[0].items():
            assert torch.equal(_bits(ll["recv_x"][le, s * M:s * M + len(toks)].cpu()), _bits(x.cpu()[toks]))
        assert t.error_record() is None
        t.destroy()
    finally:
        dist.destroy_process_group()
