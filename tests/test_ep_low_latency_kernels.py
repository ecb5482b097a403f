"""The low-latency pass-through to the hand-written kernels (pykernels.ep.low_latency.
KernelLowLatency, what Buffer(backend="emu"/"cuda") runs) on the real kernels: every rank
of a LocalNode on the PTX emulator, each rank's call handed to KernelLowLatency through a
stand-in of its per-process transport. The kernels write the packed per-expert layout of
the engine path and DeepEP (scales column-major, UE8M0 words when asked) and their
combine reads the packed expert outputs as given: checked exactly against the same
simulation as the engine test, outputs poisoned (rows past recv_count NaN in y)."""
import dataclasses

import pytest
import torch

from pykernels.cuda import ep as cep
from pykernels.ep.low_latency import KernelLowLatency, quantize
from tests.ep_low_latency_cases import (EXPERTS, HIDDEN, MAX_TOKENS, TOPK, check_dispatch, expected_combine,
                                       expert_outputs, ll_inputs)

RANKS = 2


class _RankTransport:
    """Rank r's view of one LocalNode call: dispatch returns that rank's result (checking
    KernelLowLatency passed the payload and scale format the node ran with); combine
    records what it was given."""

    def __init__(self, rank, payload, use_ue8m0, result):
        self.rank, self.payload, self.use_ue8m0, self.result, self.given = rank, payload, use_ue8m0, result, None

    def low_latency_dispatch(self, x, topk_idx, use_ue8m0=False):
        same = (torch.equal(x[0].view(torch.uint8), self.payload[0].view(torch.uint8)) and torch.equal(x[1], self.payload[1])
                if isinstance(x, tuple) else torch.equal(x.view(torch.int16), self.payload.view(torch.int16)))
        assert same, f"rank {self.rank}: the payload differs from the node's"
        assert use_ue8m0 == self.use_ue8m0
        return self.result

    def low_latency_combine(self, y, topk_idx, topk_weights, handle):
        self.given = (y.clone(), handle)
        return torch.zeros(topk_idx.shape[0], y.shape[-1], dtype=torch.bfloat16)


@pytest.mark.parametrize("fp8, round_scale, ue8m0", [(False, False, False), (True, False, False),
                                                      (True, True, True)])
def test_kernels_write_and_read_the_packed_layout_exactly(fp8, round_scale, ue8m0, seed):
    xs, idxs, ws = ll_inputs(seed, RANKS, tokens=(13, 7))
    cfg = cep.IntranodeConfig(num_ranks=RANKS, hidden=HIDDEN, max_topk=TOPK, num_channels=1, num_slots=8,
                              publish_every=4, num_experts=EXPERTS, max_dispatch_tokens=MAX_TOKENS)
    node = cep.LocalNode(cfg)            # poison=True: unwritten kernel outputs are 0xFF (NaN, -1)
    payloads = [quantize(x, round_scale, "reference") if fp8 else x for x in xs]
    results = node.low_latency_dispatch(payloads, idxs, use_ue8m0=ue8m0)
    stand_ins = [_RankTransport(r, payloads[r], ue8m0, results[r]) for r in range(RANKS)]
    layers = [KernelLowLatency(lambda cfg, r=r: stand_ins[r], RANKS) for r in range(RANKS)]
    checked, ys, handles = 0, [], []
    for r in range(RANKS):
        stats = torch.zeros(EXPERTS // RANKS, dtype=torch.int32)
        recv_x, count, handle, hook = layers[r].dispatch(xs[r], idxs[r], MAX_TOKENS, EXPERTS, use_fp8=fp8,
                                                         round_scale=round_scale, use_ue8m0=ue8m0, stats=stats)
        assert hook is None and torch.equal(stats, count)
        # what the kernel wrote is what the caller gets: no copy in between
        for got, wrote in zip(recv_x if fp8 else (recv_x,), results[r]["recv_x"] if fp8 else (results[r]["recv_x"],)):
            assert got is wrote
        check_dispatch(r, RANKS, xs, idxs, recv_x, count, handle, fp8, round_scale, ue8m0)
        checked += int(count.sum())
        if ue8m0:
            continue    # the combine does not depend on the scale format: covered by the other cases
        y = expert_outputs(recv_x, count, r, RANKS, fp8)        # NaN past recv_count
        layers[r].combine(y, idxs[r], ws[r], handle)
        assert stand_ins[r].given[1] is handle.transport and torch.equal(stand_ins[r].given[0].view(torch.int16),
                                                                         y.view(torch.int16))
        ys.append(y)
        handles.append(handle)
    assert checked > 20      # rows compared
    if ue8m0:
        return
    outs = node.low_latency_combine(ys, idxs, ws, [h.transport for h in handles])
    for r in range(RANKS):
        expect = expected_combine(r, xs, idxs, ws, fp8)
        assert torch.equal(outs[r].view(torch.int16), expect.view(torch.int16)), f"rank {r}, fp8={fp8}"
    # a handle from before the kernels' buffers were replaced (other sizes) is refused
    stale = dataclasses.replace(handles[0], hidden=2 * HIDDEN)
    with pytest.raises(ValueError, match=r"handle: its dispatch used \(hidden, num_experts, M\) = \(1024, 8, 16\)"):
        layers[0].combine(ys[0], idxs[0], ws[0], stale)
