"""The hand-written intranode EP kernels (csrc/ep/*.cu) with 2 and 4 ranks running at the
same time on the PTX emulator (pykernels.cuda.ep.LocalNode -> pykernels.emu.launch_many),
checked against pykernels.reference.ep; timeouts with their error records; SASS and
resources of the sm_90a build.

Tolerances: every comparison is exact. Dispatch moves bytes; combine (both modes) adds
float32 products in the reference's order with no FMA (the SASS test shows no FFMA), so
its bf16 outputs are bit-identical to the reference's.
Outputs are poisoned (0xFF bytes: NaN, -1) before each launch, so anything a kernel fails
to write differs from the reference.
"""
import pytest
import torch

from pykernels import emu
from pykernels.cuda import ep as cep
from pykernels.metrics import calc_diff
from pykernels.reference import ep as ref
from pykernels.runtime import artifacts, sass

H, K, CHANNELS, SLOTS, PUBLISH = 256, 4, 2, 8, 4
STALL_SPINS = 2000          # polls before a wait gives up in the timeout tests


def _experts(R):
    return 4 * R             # 8 for 2 ranks, 16 for 4


def _routing(gen, T, E, K, dead):
    """Top-k of E experts per token, expert `dead` never chosen, ~15% of slots -1, and the
    first token routed nowhere."""
    alive = torch.tensor([e for e in range(E) if e != dead])
    idx = torch.stack([alive[torch.randperm(len(alive), generator=gen)[:K]] for _ in range(T)]) if T else \
        torch.zeros(0, K, dtype=torch.int64)
    idx[torch.rand(T, K, generator=gen) < 0.15] = -1
    if T:
        idx[0] = -1
    return idx


def _inputs(R, seed, tokens=None, fp8=False, token_range=(24, 49)):
    """Each rank's tokens (bf16, or e4m3 with float32 scales per 128), routing and weights:
    (xs, topk, weights, E, Ts); Ts: `tokens`, or drawn from [token_range) per rank."""
    gen = torch.Generator().manual_seed(seed)
    E = _experts(R)
    Ts = tokens or [int(torch.randint(*token_range, (1,), generator=gen)) for _ in range(R)]
    topk = [_routing(gen, T, E, K, dead=E - 3) for T in Ts]
    weights = [torch.rand(T, K, generator=gen) for T in Ts]
    if fp8:
        xs = [((torch.randn(T, H, generator=gen) * 8).to(torch.float8_e4m3fn),
               torch.rand(T, H // 128, generator=gen) + 0.5) for T in Ts]
    else:
        xs = [(torch.randn(T, H, generator=gen) * 4).to(torch.bfloat16) for T in Ts]
    return xs, topk, weights, E, Ts


def _node(R, E=0, M=0, **kw):
    cfg = cep.IntranodeConfig(num_ranks=R, hidden=H, max_topk=K, num_channels=CHANNELS, num_slots=SLOTS,
                              publish_every=PUBLISH, num_experts=E, max_dispatch_tokens=M)
    return cep.LocalNode(cfg, **kw)


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _check_dispatch(res, exp, R):
    for r in range(R):
        got, want = res[r], exp[r]
        if isinstance(got["recv_x"], tuple):
            assert torch.equal(_bits(got["recv_x"][0]), _bits(want["recv_x"][0])), r
            assert torch.equal(_bits(got["recv_x"][1]), _bits(want["recv_x"][1])), r
        else:
            assert torch.equal(_bits(got["recv_x"]), _bits(want["recv_x"])), r
        assert torch.equal(got["recv_topk_idx"], want["recv_topk_idx"]), r
        assert torch.equal(_bits(got["recv_topk_weights"]), _bits(want["recv_topk_weights"])), r
        assert got["num_recv_tokens_per_expert"] == want["num_recv_tokens_per_expert"], r
        h = got["handle"]
        assert torch.equal(h.recv_src_idx.long(), want["recv_src"][:, 1]), r
        # per (source, channel): first row and count tile the received rows in order
        rows = h.recv_channel_offset.view(-1, 2)
        assert int(rows[0, 0]) == 0 and int(rows[:, 1].sum()) == h.num_recv
        assert torch.equal(rows[1:, 0], (rows[:-1, 0] + rows[:-1, 1]))


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [2, 4])
def test_layout_kernel_matches_reference(R, seed):
    _, topk, _, E, _ = _inputs(R, seed)
    node = _node(R)
    for r, (per_rank, per_expert, in_rank) in enumerate(node.get_dispatch_layout(topk, E)):
        want = ref.dispatch_layout(topk[r], E, R)
        assert torch.equal(per_rank, want[0]) and torch.equal(per_expert, want[1]), r
        assert torch.equal(in_rank, want[2]), r
        assert int(per_expert[E - 3]) == 0   # the expert nobody routes to


# ---------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [2, 4])
def test_dispatch_combine_bf16_exact(R, seed):
    xs, topk, ws, E, Ts = _inputs(R, seed)
    node = _node(R)
    res = node.dispatch(xs, topk, ws, E)
    exp = ref.simulate_dispatch(xs, topk, ws, E)
    _check_dispatch(res, exp, R)
    srcs = [e["recv_src"] for e in exp]
    # combine, weighted by the local top-k weights, and unweighted: bit-exact
    ys = [(r_["recv_x"].float() * (1 + d)).to(torch.bfloat16) for d, r_ in enumerate(res)]
    recv_w = [r_["recv_topk_weights"] for r_ in res]
    handles = [r_["handle"] for r_ in res]
    out = node.combine(ys, handles, recv_w)
    want = ref.simulate_combine(ys, srcs, Ts, recv_w)
    for r in range(R):
        assert torch.equal(_bits(out[r]), _bits(want[r].to(torch.bfloat16))), r
        assert calc_diff(out[r].double(), want[r].double()) < 1e-5
    with pytest.raises(ValueError, match=r"topk_weights\[0\]: expected float32 \[\d+, k\]"):
        node.combine(ys, handles, [w[:1] for w in ws])   # not one weight row per received token
    out = node.combine(ys, handles)
    want = ref.simulate_combine(ys, srcs, Ts)
    for r in range(R):
        assert torch.equal(_bits(out[r]), _bits(want[r].to(torch.bfloat16))), r
        assert not out[r][0].any()                   # token 0 went nowhere: zeros
    # the same buffers again (ring counters go on from the last call), cached layout, no top-k
    again = node.dispatch(xs, handles=handles)
    for r in range(R):
        assert torch.equal(_bits(again[r]["recv_x"]), _bits(res[r]["recv_x"])), r
        assert again[r]["recv_topk_idx"] is None


@pytest.mark.parametrize("R", [2, 4])
def test_dispatch_fp8_exact(R, seed):
    xs, topk, ws, E, _ = _inputs(R, seed, fp8=True)
    node = _node(R)
    res = node.dispatch(xs, topk, ws, E)
    data = ref.simulate_dispatch([x[0].view(torch.uint8) for x in xs], topk, ws, E)
    scales = ref.simulate_dispatch([x[1] for x in xs], topk, ws, E)
    for d in data:
        d["recv_x"] = (d["recv_x"], None)
    for d, s in zip(data, scales):
        d["recv_x"] = (d["recv_x"][0], s["recv_x"])
    _check_dispatch(res, data, R)
    assert res[0]["recv_x"][0].dtype == torch.float8_e4m3fn


def test_rank_without_tokens_and_empty_channel(seed):
    xs, topk, ws, E, Ts = _inputs(2, seed, tokens=[0, 3])   # 3 tokens over 2 channels
    node = _node(2)
    res = node.dispatch(xs, topk, ws, E)
    exp = ref.simulate_dispatch(xs, topk, ws, E)
    _check_dispatch(res, exp, 2)
    out = node.combine([r_["recv_x"] for r_ in res], [r_["handle"] for r_ in res])
    want = ref.simulate_combine([r_["recv_x"] for r_ in res], [e["recv_src"] for e in exp], Ts)
    assert out[0].shape == (0, H) and torch.equal(_bits(out[1]), _bits(want[1].to(torch.bfloat16)))


# ---------------------------------------------------------------------------------------
# Normal mode with num_worst_tokens: outputs sized up front, no device -> host read
# ---------------------------------------------------------------------------------------
def _forbid_host_reads(monkeypatch):
    """Make every device -> host read of the dispatch path (cep._to_host) fail."""
    def no_read(t):
        raise AssertionError(f"host read of a {list(t.shape)} tensor on the num_worst_tokens path")
    monkeypatch.setattr(cep, "_to_host", no_read)


def _count_host_reads(monkeypatch):
    calls = []
    real = cep._to_host
    monkeypatch.setattr(cep, "_to_host", lambda t: calls.append(list(t.shape)) or real(t))
    return calls


def _rows(t, n):
    return _bits(t[:n]), _bits(t[n:])


def _check_worst_dispatch(res, base, exp, W, fp8):
    """First n rows equal the default path's and the reference's; rows n..W: top-k ids -1 and
    weights 0 (DeepEP's padding), received x / scales / source index still poison."""
    for r, (got, want) in enumerate(zip(res, exp)):
        n = base[r]["handle"].num_recv
        total = got["num_recv_tokens"]
        assert isinstance(total, torch.Tensor) and total.dim() == 0 and total.dtype == torch.int32, r
        assert int(total) == n == want["recv_src"].shape[0], (r, int(total), n)
        h = got["handle"]
        assert h.num_recv == W and h.num_worst_tokens == W and h.num_recv_tokens is total
        parts = [(got["recv_x"][0], want["recv_x"][0]), (got["recv_x"][1], want["recv_x"][1])] if fp8 else \
            [(got["recv_x"], want["recv_x"])]
        parts += [(got["recv_topk_idx"], want["recv_topk_idx"]), (got["recv_topk_weights"], want["recv_topk_weights"]),
                  (h.recv_src_idx, want["recv_src"][:, 1].to(torch.int32))]
        for j, (g, w) in enumerate(parts):
            assert g.shape[0] == W, (r, list(g.shape))
            head, tail = _rows(g, n)
            assert torch.equal(head, _bits(w)), r
            if g is got["recv_topk_idx"]:
                assert (g[n:] == -1).all(), f"rank {r}: padding rows' top-k ids must be -1"
            elif g is got["recv_topk_weights"]:
                assert (g[n:] == 0).all() and not g[n:].signbit().any(), f"rank {r}: padding weights must be +0"
            else:
                assert (tail == 0xFF).all(), f"rank {r}: a row past num_recv_tokens={n} was written"
        assert torch.equal(_bits(got["recv_x"][0] if fp8 else got["recv_x"])[:n],
                           _bits(base[r]["recv_x"][0] if fp8 else base[r]["recv_x"]))
        assert torch.equal(h.recv_channel_offset, base[r]["handle"].recv_channel_offset), r
        per_expert = got["num_recv_tokens_per_expert"]
        assert isinstance(per_expert, torch.Tensor) and per_expert.dtype == torch.int32
        assert per_expert.tolist() == want["num_recv_tokens_per_expert"] == base[r]["num_recv_tokens_per_expert"]


@pytest.mark.parametrize("R,fp8", [(2, False), (4, False), (2, True)])
def test_dispatch_num_worst_tokens_matches_default_and_reference(R, fp8, seed, monkeypatch):
    xs, topk, ws, E, Ts = _inputs(R, seed, fp8=fp8)
    node = _node(R)
    reads = _count_host_reads(monkeypatch)
    base = node.dispatch(xs, topk, ws, E)                         # default: sized by host reads
    assert reads, "the default path no longer reads through cep._to_host: the check below proves nothing"
    assert all(int(b["num_recv_tokens"]) == b["handle"].num_recv for b in base)
    plain = [x[0].view(torch.uint8) for x in xs] if fp8 else xs
    exp = ref.simulate_dispatch(plain, topk, ws, E)
    if fp8:
        for e, s in zip(exp, ref.simulate_dispatch([x[1] for x in xs], topk, ws, E)):
            e["recv_x"] = (e["recv_x"], s["recv_x"])
    counts = [b["handle"].num_recv for b in base]
    print(f"received per rank {counts}, tokens per rank {Ts}")
    _forbid_host_reads(monkeypatch)
    # the worst case (every token of every rank), then tight: the largest actual count
    for W in (max(Ts) * R, max(counts)):
        res = node.dispatch(xs, topk, ws, E, num_worst_tokens=W)   # same buffers: rings go on
        _check_worst_dispatch(res, base, exp, W, fp8)
        if fp8:
            continue
        # combine from the worst-case handle: rows past the count are NaN poison, so any
        # read of them would show; no host count needed either
        ys = [(r_["recv_x"].float() * (1 + d)).to(torch.bfloat16) for d, r_ in enumerate(res)]
        recv_w = [r_["recv_topk_weights"] for r_ in res]
        assert all(y[n:].isnan().all() for y, n in zip(ys, counts))
        out = node.combine(ys, [r_["handle"] for r_ in res], recv_w)
        want = ref.simulate_combine([y[:n] for y, n in zip(ys, counts)], [e["recv_src"] for e in exp], Ts,
                                    [w[:n] for w, n in zip(recv_w, counts)])
        for r in range(R):
            assert torch.equal(_bits(out[r]), _bits(want[r].to(torch.bfloat16))), (W, r)
    # a cached layout (the worst-case handles), no top-k: still no host read
    again = node.dispatch(xs, handles=[r_["handle"] for r_ in res])
    for r in range(R):
        assert again[r]["handle"].num_recv == max(counts)
        data = again[r]["recv_x"][0] if fp8 else again[r]["recv_x"]
        head, tail = _rows(data, counts[r])
        assert torch.equal(head, _bits(exp[r]["recv_x"][0] if fp8 else exp[r]["recv_x"])) and (tail == 0xFF).all()


def _guarded_outputs(monkeypatch, guard=3):
    """Dispatch outputs as the first rows of poisoned tensors `guard` rows longer: the
    kernel gets the short views (its bound), the guard rows show any write past them."""
    made = []
    real = cep._alloc_dispatch_out

    def alloc(cfg, x, num_recv, K, device, poison):
        full = real(cfg, x, num_recv + guard, K, device, poison)
        made.append((num_recv, full))
        return {k: (v if k == "recv_channel_offset" else v[:num_recv]) for k, v in full.items()}
    monkeypatch.setattr(cep, "_alloc_dispatch_out", alloc)
    return made


@pytest.mark.parametrize("R", [2, 4])
def test_num_worst_tokens_too_small_is_reported(R, seed, monkeypatch):
    """Too small a W: no trap; the receiver drops the rows past W (consuming them from the
    rings), records code 9, and LocalNode raises after the launch. The buffers stay usable."""
    xs, topk, ws, E, Ts = _inputs(R, seed)
    exp = ref.simulate_dispatch(xs, topk, ws, E)
    counts = [e["recv_x"].shape[0] for e in exp]
    W = max(counts) - 1
    over = {r for r, n in enumerate(counts) if n > W}
    print(f"received per rank {counts}, num_worst_tokens={W}")
    node = _node(R)
    made = _guarded_outputs(monkeypatch)
    _forbid_host_reads(monkeypatch)
    r0 = min(over)
    with pytest.raises(cep.DispatchOverflowError,
                       match=rf"num_worst_tokens={W} is too small(.|\n)*rank {r0}: receives {counts[r0]} rows") as ei:
        node.dispatch(xs, topk, ws, E, num_worst_tokens=W)
    assert not isinstance(ei.value, emu.EmuError)              # the kernel finished: no trap
    found = [(r, rec) for r, rec in enumerate(node.error_records()) if rec]
    assert {r for r, _ in found} == over and ei.value.records == dict(found)
    for r, rec in found:        # only a rank that receives too much reports, and what it needs
        assert rec["rank"] == r and rec["code"] == 9 and rec["what"] == cep.WAIT_CODES[9]
        assert 0 <= rec["peer"] < R and 0 <= rec["channel"] < CHANNELS and rec["cta"] == 2 * rec["channel"] + 1
        assert W < rec["seen"] <= counts[r] and rec["needed"] == W
    # nothing written past the W rows of any rank (no silent corruption)
    for rows, full in made:
        assert rows == W
        for k, v in full.items():
            if k != "recv_channel_offset":
                assert (_bits(v[W:]) == 0xFF).all(), k
    # the rows below W are the reference's first rows; the channel offsets count rows written
    for r, (got, want) in enumerate(zip(ei.value.results, exp)):
        n = min(counts[r], W)
        assert int(got["num_recv_tokens"]) == counts[r]
        assert torch.equal(_bits(got["recv_x"][:n]), _bits(want["recv_x"][:n])), r
        assert torch.equal(got["handle"].recv_src_idx[:n], want["recv_src"][:n, 1].to(torch.int32)), r
        assert torch.equal(got["recv_topk_idx"][:n], want["recv_topk_idx"][:n]), r
        assert int(got["handle"].recv_channel_offset[:, :, 1].sum()) == n, r

    # the same buffers afterwards: a sufficient W (tight), then the default path, then a
    # combine - rings, heads and records are all in step
    monkeypatch.undo()
    W = max(counts)
    made = _guarded_outputs(monkeypatch)
    res = node.dispatch(xs, topk, ws, E, num_worst_tokens=W)
    assert all(rec is None for rec in node.error_records())
    for r, (got, want) in enumerate(zip(res, exp)):
        n = counts[r]
        assert int(got["num_recv_tokens"]) == n
        assert torch.equal(_bits(got["recv_x"][:n]), _bits(want["recv_x"])), r
        assert torch.equal(got["recv_topk_idx"][:n], want["recv_topk_idx"]), r
        assert torch.equal(_bits(got["recv_topk_weights"][:n]), _bits(want["recv_topk_weights"])), r
        assert torch.equal(got["handle"].recv_src_idx[:n], want["recv_src"][:, 1].to(torch.int32)), r
        assert (_bits(got["recv_x"][n:]) == 0xFF).all(), r
    for rows, full in made:
        assert (_bits(full["recv_x"][W:]) == 0xFF).all()
    monkeypatch.undo()
    base = node.dispatch(xs, topk, ws, E)
    _check_dispatch(base, exp, R)
    out = node.combine([b["recv_x"] for b in base], [b["handle"] for b in base])
    want = ref.simulate_combine([b["recv_x"] for b in base], [e["recv_src"] for e in exp], Ts)
    for r in range(R):
        assert torch.equal(_bits(out[r]), _bits(want[r].to(torch.bfloat16))), r


def test_num_worst_tokens_validation(seed, monkeypatch):
    xs, topk, ws, E, Ts = _inputs(2, seed)
    node = _node(2)
    for bad in (-1, 2.0, True, 2 ** 31):
        with pytest.raises(ValueError, match=r"num_worst_tokens: expected an int in \[0, 2\^31\)"):
            node.dispatch(xs, topk, ws, E, num_worst_tokens=bad)
    res = node.dispatch(xs, topk, ws, E)
    handles = [r_["handle"] for r_ in res]
    n = max(h.num_recv for h in handles)
    r_big = max(range(2), key=lambda r: handles[r].num_recv)
    _forbid_host_reads(monkeypatch)
    # exact counts known on the host (handles of a default dispatch): checked before launch
    with pytest.raises(ValueError, match=rf"num_worst_tokens: rank {r_big} receives {n} tokens.*"
                                         rf"num_worst_tokens={n - 1}"):
        node.dispatch(xs, handles=handles, num_worst_tokens=n - 1)
    again = node.dispatch(xs, handles=handles, num_worst_tokens=n)     # enough: no host read
    for r in range(2):
        head, tail = _rows(again[r]["recv_x"], handles[r].num_recv)
        assert torch.equal(head, _bits(res[r]["recv_x"])) and (tail == 0xFF).all()
        assert int(again[r]["num_recv_tokens"]) == handles[r].num_recv
    # the topk_idx range check is a device-side assert on this path (RuntimeError on the CPU)
    bad = [t.clone() for t in topk]
    bad[1][-1, 0] = E
    with pytest.raises(RuntimeError, match=r"topk_idx: expected values in \[-1, %d\)" % E):
        node.dispatch(xs, bad, ws, E, num_worst_tokens=n)


# ---------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------
def _ll_expected(xs, topk, E, R, M):
    """Per destination rank, per (local expert, source rank): the source tokens in order."""
    El = E // R
    out = []
    for d in range(R):
        per = {}
        for le in range(El):
            for s in range(R):
                hits = (topk[s] == d * El + le).nonzero().tolist()   # (token, k) in order
                per[le, s] = [t for t, _ in hits]
        out.append(per)
    return out


def _ll_combine_reference(ys_rows, topk, weights):
    """out[t] = sum over valid k in order of f32(row(t, k)) * w[t, k], f32 from 0.0, bf16."""
    T = topk.shape[0]
    out = torch.zeros(T, H)
    for t in range(T):
        for k in range(topk.shape[1]):
            if int(topk[t, k]) >= 0:
                out[t] = out[t] + ys_rows[(t, k)].float() * weights[t, k]
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("R", [2, 4])
def test_low_latency_dispatch_combine_exact(R, seed):
    xs, topk, ws, E, Ts = _inputs(R, seed)
    M = 48
    El = E // R
    node = _node(R, E, M)
    res = node.low_latency_dispatch(xs, topk)
    exp = _ll_expected(xs, topk, E, R, M)
    for d in range(R):
        h = res[d]["handle"]
        for le in range(El):
            first = 0       # packed: source s's rows follow those of the sources before it
            for s in range(R):
                toks = exp[d][le, s]
                n = len(toks)
                assert int(h.recv_layout[le, s]) == n
                assert h.recv_src_info[le, first:first + n].tolist() == toks
                rows = res[d]["recv_x"][le, first:first + n]
                assert torch.equal(_bits(rows), _bits(xs[s][toks])), (d, le, s)
                first += n
            assert int(res[d]["recv_count"][le]) == first
            # rows past the count are not written (still poison)
            assert (_bits(res[d]["recv_x"][le, first:]) == 0xFF).all()
            assert (h.recv_src_info[le, first:] == -1).all()
        if d == (E - 3) // El:
            assert int(res[d]["recv_count"][(E - 3) % El]) == 0     # the expert nobody routes to
    # expert outputs: a different function of each row per expert, NaN past recv_count
    # (combine must not read them); combine weighted
    ys = [(r_["recv_x"].float() * (torch.arange(El)[:, None, None] + 2)).to(torch.bfloat16) for r_ in res]
    for d in range(R):
        for le in range(El):
            ys[d][le, int(res[d]["recv_count"][le]):] = float("nan")
    out = node.low_latency_combine(ys, topk, ws, [r_["handle"] for r_ in res])
    for s in range(R):
        rows = {}
        for t in range(Ts[s]):
            for k in range(K):
                e = int(topk[s][t, k])
                if e >= 0:
                    d, le = divmod(e, El)
                    j = int(res[s]["handle"].slot_of[t, k])
                    assert exp[d][le, s][j] == t
                    first = sum(len(exp[d][le, q]) for q in range(s))
                    rows[(t, k)] = ys[d][le, first + j]
        assert torch.equal(_bits(out[s]), _bits(_ll_combine_reference(rows, topk[s], ws[s]))), s
    # a second round on the same buffers (next seq), FP8 payload; scales column-major per
    # expert (rows padded to 4), then UE8M0 words (power-of-two scales, hidden 256: 2 scales,
    # so a made-up 512-column payload)
    xq, _, _, _, _ = _inputs(R, seed, tokens=Ts, fp8=True)
    res2 = node.low_latency_dispatch(xq, topk)
    for d in range(R):
        sf = res2[d]["recv_x"][1]
        assert sf.stride() == (H // 128 * ((R * M + 3) // 4 * 4), 1, (R * M + 3) // 4 * 4)
        for le in range(El):
            toks = [t_ for s in range(R) for t_ in exp[d][le, s]]
            srcs = [s for s in range(R) for _ in exp[d][le, s]]
            n = len(toks)
            want_x = torch.stack([xq[s][0][t_] for s, t_ in zip(srcs, toks)]) if n else xq[0][0][:0]
            want_sf = torch.stack([xq[s][1][t_] for s, t_ in zip(srcs, toks)]) if n else xq[0][1][:0]
            assert torch.equal(_bits(res2[d]["recv_x"][0][le, :n]), _bits(want_x))
            assert torch.equal(sf[le, :n], want_sf)
            assert torch.isnan(sf[le, n:]).all()
    assert res2[0]["handle"].seq == res[0]["handle"].seq + 1


def test_low_latency_ue8m0_scales_packed_by_the_kernel(seed):
    """use_ue8m0: the receiver packs the exponent bytes of 4 scales per int32 (byte b of
    word i: scale 4i + b), column-major per expert, rows packed."""
    R, M, H4 = 2, 24, 512
    gen = torch.Generator().manual_seed(seed)
    E = _experts(R)
    El = E // R
    Ts = [11, 6]
    topk = [_routing(gen, T, E, K, dead=E - 3) for T in Ts]
    xs = [((torch.randn(T, H4, generator=gen) * 8).to(torch.float8_e4m3fn),
           torch.exp2(torch.randint(-20, 20, (T, H4 // 128), generator=gen).float())) for T in Ts]
    cfg = cep.IntranodeConfig(num_ranks=R, hidden=H4, max_topk=K, num_channels=CHANNELS, num_slots=SLOTS,
                              publish_every=PUBLISH, num_experts=E, max_dispatch_tokens=M)
    node = cep.LocalNode(cfg)
    res = node.low_latency_dispatch(xs, topk, use_ue8m0=True)
    exp = _ll_expected(xs, topk, E, R, M)
    checked = 0
    for d in range(R):
        words = res[d]["recv_x"][1]
        assert words.dtype == torch.int32 and words.shape == (El, R * M, 1) and words.stride(1) == 1
        for le in range(El):
            rows = [(s, t_) for s in range(R) for t_ in exp[d][le, s]]
            for i, (s, t_) in enumerate(rows):
                e8 = ((xs[s][1][t_].view(torch.int32) >> 23) & 0xFF).tolist()
                assert int(words[le, i, 0]) & 0xFFFFFFFF == sum(b << (8 * j) for j, b in enumerate(e8))
                assert torch.equal(_bits(res[d]["recv_x"][0][le, i]), _bits(xs[s][0][t_]))
                checked += 1
            assert (words[le, len(rows):] == -1).all()
    assert checked > 10
    with pytest.raises(ValueError, match="use_ue8m0"):
        node.low_latency_dispatch([x[0].bfloat16() for x in xs], topk, use_ue8m0=True)


# ---------------------------------------------------------------------------------------
# Timeouts: error records, trap, EmuError
# ---------------------------------------------------------------------------------------
def _records(node, stalled):
    recs = node.error_records()
    assert recs[stalled] is None                       # the absent rank waits for nothing
    found = [(r, rec) for r, rec in enumerate(recs) if rec]
    assert found, "no error record written"
    for r, rec in found:
        assert rec["rank"] == r and rec["peer"] == stalled
    return found


@pytest.mark.parametrize("R", [2, 4])
def test_stalled_rank_dispatch_times_out_with_record(R, seed):
    xs, topk, ws, E, _ = _inputs(R, seed)
    node = _node(R, max_spins=STALL_SPINS)
    node.get_dispatch_layout(topk, E)                  # no waits: cannot time out
    stalled = R - 1
    with pytest.raises(emu.EmuError, match=r"pk_ep_dispatch.*trap(.|\n)*error records"):
        node.dispatch(xs, topk, ws, E, stall_ranks=[stalled])
    for r, rec in _records(node, stalled):
        assert rec["code"] in (1, 2) and 0 <= rec["channel"] < CHANNELS
        if rec["code"] == 2:    # waited for the header item of an empty ring: tail 0, needs 1
            assert (rec["seen"], rec["needed"]) == (0, 1) and rec["cta"] == 2 * rec["channel"] + 1
        else:                   # a sender waiting for a free slot: the ring is full
            assert rec["seen"] == 0 and rec["needed"] == 1 and rec["cta"] == 2 * rec["channel"]


def test_stalled_rank_combine_times_out_with_record(seed):
    xs, topk, ws, E, _ = _inputs(2, seed)
    node = _node(2)
    res = node.dispatch(xs, topk, ws, E)
    node.max_spins = STALL_SPINS
    with pytest.raises(emu.EmuError, match="pk_ep_combine.*trap"):
        node.combine([r_["recv_x"] for r_ in res], [r_["handle"] for r_ in res], stall_ranks=[0])
    for r, rec in _records(node, 0):
        assert rec["code"] in (3, 4) and rec["what"] == cep.WAIT_CODES[rec["code"]]


def test_stalled_rank_low_latency_times_out_with_record(seed):
    R = 2
    xs, topk, ws, E, _ = _inputs(R, seed)
    node = _node(R, E, 48, max_spins=STALL_SPINS)
    with pytest.raises(emu.EmuError, match="pk_ep_ll_dispatch.*trap"):
        node.low_latency_dispatch(xs, topk, stall_ranks=[1])
    (r, rec), = _records(node, 1)
    assert rec["code"] == 6 and 0 <= rec["channel"] < E // R          # channel = local expert
    assert (rec["seen"], rec["needed"]) == (0, 1)                     # seq word: none yet, call 1
    # combine: a fresh node, dispatch fine, then rank 1 absent from the combine
    node = _node(R, E, 48)
    res = node.low_latency_dispatch(xs, topk)
    node.max_spins = STALL_SPINS
    with pytest.raises(emu.EmuError, match="pk_ep_ll_combine.*trap"):
        node.low_latency_combine([r_["recv_x"] for r_ in res], topk, ws, [r_["handle"] for r_ in res],
                                 stall_ranks=[1])
    (r, rec), = _records(node, 1)
    assert rec["code"] == 7 and E // R <= rec["channel"] < E                # an expert of rank 1
    assert (rec["seen"], rec["needed"]) == (0, 1)


def test_combine_detects_a_foreign_item(seed):
    xs, topk, ws, E, _ = _inputs(2, seed)
    node = _node(2)
    res = node.dispatch(xs, topk, ws, E)
    handles = [r_["handle"] for r_ in res]
    handles[1].recv_src_idx[0] += 1                    # rank 1 sends row 0 back as another token
    with pytest.raises(emu.EmuError, match="trap"):
        node.combine([r_["recv_x"] for r_ in res], handles)
    rec = node.error_records()[0]
    assert rec["code"] == 5 and rec["peer"] == 1 and rec["seen"] == rec["needed"] + 1


def test_low_latency_overflow_is_reported(seed):
    R, E, M = 2, 8, 4
    topk = torch.tensor([[1, 1, -1, -1]] * 3)          # expert 1 twice per token: 6 rows > M
    xs = [torch.randn(3, H).to(torch.bfloat16) for _ in range(R)]
    node = _node(R, E, M)
    with pytest.raises(emu.EmuError, match="trap"):
        node.low_latency_dispatch(xs, [topk, topk])
    # both ranks overflow; the emulator ends every rank at the first trap, so the other
    # rank's record may be cut short between its stores (claimed, code not yet written: 0)
    recs = [rec for rec in node.error_records() if rec and rec["code"] != 0]
    assert recs and all(r["code"] == 8 and r["channel"] == 1 and (r["seen"], r["needed"]) == (M, M) for r in recs)


# ---------------------------------------------------------------------------------------
# Host logic: configuration, buffer sizing, plans, error decoding
# ---------------------------------------------------------------------------------------
def test_config_and_buffer_layout():
    cfg = cep.IntranodeConfig(num_ranks=8, hidden=7168, max_topk=8, num_channels=10, num_slots=128,
                              num_experts=256, max_dispatch_tokens=128)
    lay = cfg.layout()
    assert cfg.dispatch_slot_bytes == 2 * 7168 + 4 * 56 + 8 * 8 + 4 + 12        # rounded to 16
    assert cfg.combine_slot_bytes == 2 * 7168 + 16
    assert lay["combine"] - lay["dispatch"] >= 10 * 8 * (128 + 128 * cfg.dispatch_slot_bytes)
    assert all(v % 128 == 0 for v in lay.values())
    assert lay["total"] == cfg.buffer_bytes
    per = cep.nvlink_bytes_per_token(7168, 8, fp8=True)
    assert per == {"dispatch": 7168 + 224 + 68, "combine": 2 * 7168 + 8}
    for kw, name in [(dict(num_ranks=9), "num_ranks"), (dict(hidden=100), "hidden"),
                     (dict(num_slots=12), "num_slots"), (dict(publish_every=300), "publish_every"),
                     (dict(num_experts=6), "num_experts"), (dict(num_experts=8), "max_dispatch_tokens")]:
        args = dict(num_ranks=4, hidden=256)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            cep.IntranodeConfig(**args)


def test_plans_geometry_and_peer_arguments():
    R = 4
    node = _node(R, 16, 8)
    xs, topk, ws, E, _ = _inputs(R, 0, tokens=[5] * R)
    h = cep.IntranodeHandle(torch.zeros(5, R, dtype=torch.bool), torch.zeros(R, dtype=torch.int32),
                            torch.zeros(0, dtype=torch.int32), torch.zeros(R, CHANNELS, 2, dtype=torch.int32), 0, 5)
    out = cep._alloc_dispatch_out(node.cfg, xs[0], 0, K, "cpu", True)
    p = cep.dispatch_plan(node.cfg, 1, node.buffers[1], node.peers, xs[0], topk[0], ws[0], h.is_token_in_rank,
                          h.rank_offset, out, node.errors[1], 4)
    assert p.grid == (2 * CHANNELS, 1, 1) and p.block == (256, 1, 1)
    peers = [a.value for a in p.args[1:9]]
    assert peers == node.peers + [0] * (8 - R)
    p = cep.ll_dispatch_plan(node.cfg, 0, node.buffers[0], node.peers, xs[0], topk[0],
                             cep._alloc_ll_out(node.cfg, xs[0], 5, K, "cpu", True), node.errors[0], seq=3)
    assert p.grid == (2 + 1, 1, 1)           # 16 experts / 8 warps senders + 4 local experts / 8 receivers


def test_public_names():
    import pykernels.ep as pep
    assert pep.intranode is cep and pep.LocalNode is cep.LocalNode and pep.IntranodeConfig is cep.IntranodeConfig


def test_decode_error():
    err = torch.tensor([1, 3, 2, 4, 1, -1, 7, 5], dtype=torch.int32)
    rec = cep.decode_error(err)
    assert rec == {"rank": 3, "channel": 2, "code": 4, "what": cep.WAIT_CODES[4], "peer": 1,
                   "seen": 0xFFFFFFFF, "needed": 7, "cta": 5}
    assert cep.decode_error(torch.zeros(8, dtype=torch.int32)) is None


# ---------------------------------------------------------------------------------------
# The sm_90a build: instructions and resources
# ---------------------------------------------------------------------------------------
EP_FUNCTIONS = {"ep_layout": ["pk_ep_layout"], "ep_intranode": ["pk_ep_dispatch", "pk_ep_combine"],
                "ep_low_latency": ["pk_ep_ll_dispatch", "pk_ep_ll_combine"]}


@pytest.mark.parametrize("module", sorted(EP_FUNCTIONS))
def test_ep_resources(module):
    for fn in EP_FUNCTIONS[module]:
        r = artifacts.resources(module, fn)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0, (fn, r)
        assert r["registers"] <= 168, (fn, r)             # 256 threads per CTA fit several times
        assert r["shared_bytes"] == 0                      # layout uses dynamic shared only


@pytest.mark.parametrize("module", ["ep_intranode", "ep_low_latency"])
def test_ep_sass_has_the_memory_order_instructions(module):
    ops = sass.opcodes(sass.sass(module))
    has = lambda prefix: any(op.startswith(prefix) for op in ops)  # noqa: E731
    assert not has(("LDL", "STL")), "local memory used"
    assert ops["LDG.E.STRONG.SYS"] > 0                  # ld.acquire.sys / ld.relaxed.sys
    assert ops["CCTL.IVALL"] > 0                        # the acquire's L1 invalidation
    assert ops["MEMBAR.ALL.SYS"] > 0 and ops["STG.E.STRONG.SYS"] > 0   # st.release.sys
    assert ops["MEMBAR.SC.SYS"] > 0                     # fence.sc.sys before trap
    assert ops["ATOMG.E.CAS.STRONG.SYS"] > 0 and ops["BPT.TRAP"] > 0   # error record, trap
    assert ops["LDG.E.NA.128.CONSTANT"] > 0             # ld.global.nc.L1::no_allocate.v4 (inputs)
    assert ops["STG.E.NA.128"] > 0 and ops["LDG.E.NA.128"] > 0        # ring / slot payload
    assert ops["F2FP.BF16.F32.PACK_AB"] > 0 and ops["FMUL"] > 0 and ops["FADD"] > 0
    assert not has("FFMA"), "a fused multiply-add would change the combine's rounding"
    if module == "ep_intranode":
        assert has("BAR.SYNC")                          # combine receiver: one barrier per token
    else:
        assert ops["LDG.E.64.STRONG.SYS"] > 0 and ops["STG.E.64.STRONG.SYS"] > 0   # (seq, count)
        assert has("VOTE.ALL")


def test_layout_sass():
    ops = sass.opcodes(sass.sass("ep_layout"))
    assert any(op.startswith("ATOMS") for op in ops)                 # shared-memory counters
    assert ops["REDG.E.ADD.S32.STRONG.GPU"] > 0                        # one red per CTA and counter
    assert ops["LDG.E.NA.64.CONSTANT"] > 0
    assert not any(op.startswith(("LDL", "STL")) for op in ops)


# ---------------------------------------------------------------------------------------
# GPU: every rank on one device, a stream each (the same plans; no NVLink involved)
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_local_node_matches_reference(fp8, seed):
    R, Hg, Kg, E, T = 4, 2048, 8, 32, 300
    gen = torch.Generator().manual_seed(seed)
    topk = [_routing(gen, T, E, Kg, dead=5) for _ in range(R)]
    ws = [torch.rand(T, Kg, generator=gen) for _ in range(R)]
    if fp8:
        xs = [((torch.randn(T, Hg, generator=gen) * 8).to(torch.float8_e4m3fn),
               torch.rand(T, Hg // 128, generator=gen)) for _ in range(R)]
    else:
        xs = [torch.randn(T, Hg, generator=gen).to(torch.bfloat16) for _ in range(R)]
    cfg = cep.IntranodeConfig(num_ranks=R, hidden=Hg, max_topk=Kg, num_channels=4, num_slots=32,
                              num_experts=E, max_dispatch_tokens=T)
    node = cep.LocalNode(cfg, device="cuda")
    dev = lambda t: tuple(u.cuda() for u in t) if isinstance(t, tuple) else t.cuda()  # noqa: E731
    res = node.dispatch([dev(x) for x in xs], [t.cuda() for t in topk], [w.cuda() for w in ws], E)
    torch.cuda.synchronize()
    assert all(rec is None for rec in node.error_records())
    plain = [x[0].view(torch.uint8) for x in xs] if fp8 else xs
    exp = ref.simulate_dispatch(plain, topk, ws, E)
    for r in range(R):
        got = res[r]["recv_x"][0].view(torch.uint8) if fp8 else res[r]["recv_x"]
        assert torch.equal(_bits(got.cpu()), _bits(exp[r]["recv_x"]))
        assert torch.equal(res[r]["recv_topk_idx"].cpu(), exp[r]["recv_topk_idx"])
    if not fp8:
        recv_w = [r_["recv_topk_weights"] for r_ in res]
        out = node.combine([r_["recv_x"] for r_ in res], [r_["handle"] for r_ in res], recv_w)
        want = ref.simulate_combine([e["recv_x"] for e in exp], [e["recv_src"] for e in exp], [T] * R,
                                    [w.cpu() for w in recv_w])
        for r in range(R):
            assert torch.equal(_bits(out[r].cpu()), _bits(want[r].to(torch.bfloat16)))
    # num_worst_tokens: worst-case rows, the count on the device, then combine from that handle
    W = T * R
    xw = [dev(x) for x in xs]
    res_w = node.dispatch(xw, [t.cuda() for t in topk], [w.cuda() for w in ws], E, num_worst_tokens=W)
    torch.cuda.synchronize()
    assert all(rec is None for rec in node.error_records())
    for r in range(R):
        n = exp[r]["recv_src"].shape[0]
        assert res_w[r]["num_recv_tokens"].is_cuda and int(res_w[r]["num_recv_tokens"]) == n
        got = res_w[r]["recv_x"][0].view(torch.uint8) if fp8 else res_w[r]["recv_x"]
        assert got.shape[0] == W and torch.equal(_bits(got[:n].cpu()), _bits(exp[r]["recv_x"]))
        assert (_bits(got[n:].cpu()) == 0xFF).all()
    if not fp8:
        # rows past each count are NaN poison: combine must not read them
        out = node.combine([r_["recv_x"] for r_ in res_w], [r_["handle"] for r_ in res_w])
        want = ref.simulate_combine([e["recv_x"] for e in exp], [e["recv_src"] for e in exp], [T] * R)
        for r in range(R):
            assert torch.equal(_bits(out[r].cpu()), _bits(want[r].to(torch.bfloat16)))
