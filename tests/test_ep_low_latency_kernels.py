"""The low-latency adaptor of the hand-written kernels (pykernels.ep.low_latency.
KernelLowLatency, what Buffer(backend="emu"/"cuda") runs) on the real kernels: every rank
of a LocalNode on the PTX emulator, each rank's call handed to the adaptor through a
stand-in of its per-process transport. The adaptor must turn the kernels' receive layout
(source rank s's rows of an expert in a block at s*M) into the packed per-expert layout
of the engine path and DeepEP, and put the packed expert outputs back into blocks for the
kernel combine: checked exactly against the same simulation as the engine test."""
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
    the adaptor passed the payload the node ran with); combine records the blocks."""

    def __init__(self, rank, payload, result):
        self.rank, self.payload, self.result, self.blocks = rank, payload, result, None

    def low_latency_dispatch(self, x, topk_idx):
        same = (torch.equal(x[0].view(torch.uint8), self.payload[0].view(torch.uint8)) and torch.equal(x[1], self.payload[1])
                if isinstance(x, tuple) else torch.equal(x.view(torch.int16), self.payload.view(torch.int16)))
        assert same, f"rank {self.rank}: the adaptor's payload differs from the node's"
        return self.result

    def low_latency_combine(self, y, topk_idx, topk_weights, handle):
        self.blocks = (y.clone(), handle)
        return torch.zeros(topk_idx.shape[0], y.shape[-1], dtype=torch.bfloat16)


def test_kernel_adaptor_packs_and_unpacks_exactly(seed):
    xs, idxs, ws = ll_inputs(seed, RANKS, tokens=(13, 7))
    cfg = cep.IntranodeConfig(num_ranks=RANKS, hidden=HIDDEN, max_topk=TOPK, num_channels=1, num_slots=8,
                              publish_every=4, num_experts=EXPERTS, max_dispatch_tokens=MAX_TOKENS)
    node = cep.LocalNode(cfg)            # poison=True: unwritten kernel outputs are 0xFF (NaN, -1)
    checked, handles_seen = 0, []
    for fp8 in (False, True):
        payloads = [quantize(x, False, "reference") if fp8 else x for x in xs]
        results = node.low_latency_dispatch(payloads, idxs)
        stand_ins = [_RankTransport(r, payloads[r], results[r]) for r in range(RANKS)]
        adaptors = [KernelLowLatency(lambda cfg, r=r: stand_ins[r], RANKS) for r in range(RANKS)]
        ys, handles = [], []
        for r in range(RANKS):
            recv_x, count, handle, hook = adaptors[r].dispatch(xs[r], idxs[r], MAX_TOKENS, EXPERTS, use_fp8=fp8)
            assert hook is None
            checked += check_dispatch(r, RANKS, xs, idxs, recv_x, count, handle, fp8)
            y = expert_outputs(recv_x, count, r, RANKS, fp8)        # NaN past recv_count
            adaptors[r].combine(y, idxs[r], ws[r], handle)
            handles_seen.append(handle)
            ys.append(stand_ins[r].blocks[0])
            handles.append(stand_ins[r].blocks[1])
            assert handles[r] is handle.transport
        outs = node.low_latency_combine(ys, idxs, ws, handles)
        for r in range(RANKS):
            expect = expected_combine(r, xs, idxs, ws, fp8)
            assert torch.equal(outs[r].view(torch.int16), expect.view(torch.int16)), f"rank {r}, fp8={fp8}"
            checked += outs[r].shape[0]
    assert checked > 40
    # a handle from before the kernels' buffers were replaced (other sizes) is refused
    stale = dataclasses.replace(handles_seen[0], hidden=2 * HIDDEN)
    with pytest.raises(ValueError, match=r"handle: its dispatch used \(hidden, num_experts, M\) = \(1024, 8, 16\)"):
        adaptors[0].combine(ys[0], idxs[0], ws[0], stale)
