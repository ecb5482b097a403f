"""Our intranode EP kernels on the timing model (pykernels/perf/ep.py): the byte counts and
the extrapolation by hand, a copy bound by the link bandwidth, and the sampled kernels'
per-row cost against the read latency of their batched copy loop."""
import pytest
import torch

from pykernels.perf import ep as PE
from pykernels.perf.machines import part

H800 = part("h800")
SMALL = dict(hidden=256, topk=4, num_experts=8, ranks=2, fp8=False)   # the emulator samples: seconds


def _rows_by_hand(routing, num_experts, ranks):
    """rows[s, d]: tokens of rank s with at least one expert on rank d (a loop, not the model's code)."""
    per = num_experts // ranks
    rows = torch.zeros(ranks, ranks, dtype=torch.int64)
    for s, idx in enumerate(routing):
        for t in range(idx.shape[0]):
            for d in {int(e) // per for e in idx[t] if e >= 0}:
                rows[s, d] += 1
    return rows


def test_rank_traffic_by_hand():
    # every token of 4 ranks to every rank: each rank sends T rows to each of 3 peers
    T, item = 10, 100
    assert PE.rank_traffic(torch.full((4, 4), T), item) == (3 * T * item, 4 * T)
    # everything to rank 0: its incoming direction is the busiest, 3 peers x T rows
    rows = torch.zeros(4, 4, dtype=torch.int64)
    rows[:, 0] = T
    assert PE.rank_traffic(rows, item) == (3 * T * item, 4 * T)
    assert PE.rank_traffic(torch.eye(3, dtype=torch.int64) * 7, item) == (0, 7)     # nothing leaves a rank


def test_uniform_routing_has_distinct_experts():
    routing = PE.uniform_routing(64, 16, 4, 3)
    assert len(routing) == 3
    for idx in routing:
        assert idx.shape == (64, 4) and idx.min() >= 0 and idx.max() < 16
        assert all(len(set(row.tolist())) == 4 for row in idx)


def test_link_per_direction_is_half_the_bidirectional_figure():
    assert PE.link_bytes_per_s(H800) == pytest.approx(200e9)
    assert PE.link_bytes_per_s(part("h100")) == pytest.approx(450e9)


def _zero_costs(monkeypatch):
    """Every sampled SM cost 0: what is left is the link and HBM (no emulator run)."""
    normal = ("prefix_group", "scan_group", "send_row", "send_fixed", "recv_row", "recv_fixed", "token",
              "token_rank")
    monkeypatch.setattr(PE, "_normal_costs", lambda *a, **k: dict.fromkeys(normal, 0.0))
    ll = ("send_row", "send_fixed", "recv_row", "recv_fixed", "token_empty", "token_full")
    monkeypatch.setattr(PE, "_ll_costs", lambda *a, **k: dict.fromkeys(ll, 0.0))
    monkeypatch.setattr(PE, "layout_seconds", lambda pr, p: 0.0)


@pytest.mark.parametrize("fp8", [False, True])
def test_dispatch_bound_by_the_link_by_hand(monkeypatch, fp8):
    _zero_costs(monkeypatch)
    T, H, K, E, R = 512, 1024, 8, 64, 8
    pred = PE.predict("combine" if fp8 else "dispatch", T, H, K, E, R, fp8=fp8, part=H800)
    rows = _rows_by_hand(PE.uniform_routing(T, E, K, R), E, R)
    item = 2 * H + 8 if fp8 else 2 * H + 8 * K + 4            # combine slot / bf16 dispatch slot
    remote = rows.clone().fill_diagonal_(0)
    one_way = max(int(remote.sum(0).max()), int(remote.sum(1).max())) * item
    assert pred.bound == "link"
    assert pred.seconds == pytest.approx(one_way / 200e9)
    assert pred.received_bytes == int(rows.sum(0).max()) * 2 * H
    assert pred.gbps == pytest.approx(pred.received_bytes / pred.seconds / 1e9)


def test_low_latency_dispatch_bound_by_the_link_by_hand(monkeypatch):
    _zero_costs(monkeypatch)
    T, H, K, E, R = 128, 7168, 8, 256, 8
    pred = PE.predict("ll-dispatch", T, H, K, E, R, fp8=True, part=H800)
    # one row per (token, k) to the expert's rank: FP8 row + scales + source index
    remote = torch.zeros(R, R, dtype=torch.int64)
    for s, idx in enumerate(PE.uniform_routing(T, E, K, R)):
        for e in idx.flatten().tolist():
            remote[s, e // (E // R)] += 0 if e // (E // R) == s else 1
    one_way = max(int(remote.sum(0).max()), int(remote.sum(1).max())) * (H + 4 * H // 128 + 4)
    assert pred.terms["link"] == pytest.approx(one_way / 200e9)
    assert pred.seconds == pytest.approx(one_way / 200e9)      # SM costs 0: the link, then nothing


def test_extrapolation_by_hand(monkeypatch):
    # known per-unit costs: the busiest sender CTA by hand from the channel counts
    costs = dict(prefix_group=300.0, scan_group=200.0, send_row=5000.0, send_fixed=900.0, recv_row=1.0,
                 recv_fixed=0.0)
    monkeypatch.setattr(PE, "_normal_costs", lambda *a, **k: dict(costs))
    monkeypatch.setattr(PE, "layout_seconds", lambda pr, p: 0.0)
    T, E, K, R, C = 1000, 32, 4, 4, 3
    p = part("h800", nvlink_bytes_per_s=1e15, hbm_bytes_per_s=1e15)     # neither binds
    pred = PE.predict("dispatch", T, 256, K, E, R, fp8=False, part=p, channels=C, publish_every=6)
    routing = PE.uniform_routing(T, E, K, R)
    per_c = -(-T // C)
    best = 0.0
    for s in range(R):
        inr = PE.in_rank(routing[s], E, R)
        for c in range(C):
            b, e = c * per_c, min((c + 1) * per_c, T)
            n_max = int(inr[b:e].sum(0).max())
            best = max(best, 900 + 300 * -(-e // 32) + 200 * -(-(e - b) // 32) + 5000 * n_max)
    # the sender, then the receiver's last publish group (6 rows at 1 clock)
    assert pred.terms["sender"] == pytest.approx((best + 6 * 1.0) / p.clock_hz)
    assert pred.bound == "sender"


def test_bad_problem_names_the_argument():
    with pytest.raises(ValueError, match="kind"):
        PE.EpProblem("alltoall", 8)
    with pytest.raises(ValueError, match="hidden"):
        PE.EpProblem("dispatch", 8, hidden=100)
    with pytest.raises(ValueError, match="num_experts"):
        PE.EpProblem("dispatch", 8, num_experts=12, ranks=8)
    with pytest.raises(ValueError, match="ranks"):
        PE.EpProblem("dispatch", 8, ranks=9)


def test_sampled_copy_pays_one_read_latency_per_batch():
    # the copies load 8 16-byte chunks per lane (4096 bytes a warp) before storing them
    # (ep_common.cuh kCopyBatch): a bf16 row of 512 or 4096 bytes is one read round, 4608
    # bytes two. Within a batch more bytes cost less than a read latency; the next batch
    # costs one read latency, its bytes at the SM's port and the batch's predicated
    # address arithmetic (at most 32 ALU latencies)
    costs = {}
    for hidden in (256, 2048, 2304):
        pr = PE.EpProblem("dispatch", 64, hidden=hidden, topk=4, num_experts=8, ranks=2, fp8=False, channels=2)
        for all_l2 in (False, True):
            costs[hidden, all_l2] = PE._normal_costs(pr, H800, 0.0, all_l2)
    for all_l2, latency in ((False, H800.lat_hbm), (True, H800.lat_l2)):
        for role in ("recv_row", "send_row"):
            same_batch = costs[2048, all_l2][role] - costs[256, all_l2][role]
            next_batch = costs[2304, all_l2][role] - costs[2048, all_l2][role]
            assert 0 < same_batch < latency, (role, all_l2, same_batch)
            floor = latency + 512 / H800.sm_l2_bytes_per_clk
            assert floor <= next_batch <= floor + 32 * H800.lat_alu, (role, all_l2, next_batch)


def test_small_predictions_run_every_kernel():
    # the emulator samples of all four kernels at a small size: every term positive, the
    # kernel ends no earlier than its link, the low-latency pair serialises sender and receiver
    for kind in PE.KINDS:
        tokens = 32 if kind.startswith("ll") else 64
        pred = PE.predict(kind, tokens, channels=2, recv_ctas=2, part=H800, **SMALL)
        assert all(v > 0 for v in pred.terms.values()), pred.terms
        assert pred.seconds >= pred.terms["link"]
        assert pred.all_l2_seconds <= pred.seconds
        if kind.startswith("ll"):
            assert pred.seconds == pytest.approx(max(pred.terms["sender"], pred.terms["link"])
                                                 + pred.terms["receiver"])
        assert any("model (H800" in line for line in pred.lines())
