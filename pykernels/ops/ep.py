"""Expert-parallel intranode dispatch + weighted combine over all ranks of one node, run
in one process (the main job's EP op): problem, backends.

xs: per rank bf16 [tokens_r, hidden]; topk_idx: per rank int64 [tokens_r, k] (-1 =
empty slot); topk_weights: per rank float32 [tokens_r, k]. Result: per rank a dict with
recv_x, recv_topk_idx, recv_topk_weights (what the rank received) and combined (bf16
[tokens_r, hidden], the weighted sum of its tokens' expert outputs, here the received rows).
The process-group transports are pykernels.ep.Buffer's.
"""
import dataclasses

import torch

from .. import registry
from ..reference import ep as RE
from . import backends as B


@dataclasses.dataclass(frozen=True)
class DispatchCombineProblem:
    xs: tuple
    topk_idx: tuple
    topk_weights: tuple
    num_experts: int
    device: torch.device

    def describe(self) -> str:
        return (f"{len(self.xs)} ranks, tokens {[int(x.shape[0]) for x in self.xs]}, "
                f"hidden {self.xs[0].shape[1]}, top-{self.topk_idx[0].shape[1]} of {self.num_experts} on {self.device}")


def problem(xs, topk_idx, topk_weights, num_experts: int) -> DispatchCombineProblem:
    if not (len(xs) == len(topk_idx) == len(topk_weights)) or len(xs) < 1:
        raise ValueError(f"xs, topk_idx, topk_weights: expected one entry per rank each, got "
                         f"{len(xs)}, {len(topk_idx)}, {len(topk_weights)}")
    devices = {t.device for t in (*xs, *topk_idx, *topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"xs, topk_idx, topk_weights: expected one device, got {sorted(map(str, devices))}")
    return DispatchCombineProblem(tuple(xs), tuple(topk_idx), tuple(topk_weights), int(num_experts),
                                  devices.pop())


def _reference(p):
    exp = RE.simulate_dispatch(list(p.xs), list(p.topk_idx), list(p.topk_weights), p.num_experts)
    combined = RE.simulate_combine([e["recv_x"] for e in exp], [e["recv_src"] for e in exp],
                                   [int(x.shape[0]) for x in p.xs], [e["recv_topk_weights"] for e in exp])
    return [dict(recv_x=e["recv_x"], recv_topk_idx=e["recv_topk_idx"], recv_topk_weights=e["recv_topk_weights"],
                 combined=c.to(torch.bfloat16)) for e, c in zip(exp, combined)]


def _kernel(p, executor):
    from ..cuda import ep as CE
    cfg = CE.IntranodeConfig(num_ranks=len(p.xs), hidden=int(p.xs[0].shape[1]), max_topk=int(p.topk_idx[0].shape[1]),
                             num_channels=2, num_slots=8, publish_every=4, num_experts=0, max_dispatch_tokens=0)
    node = CE.LocalNode(cfg, device=p.device)
    recv = node.dispatch(list(p.xs), list(p.topk_idx), list(p.topk_weights), p.num_experts)
    combined = node.combine([r["recv_x"] for r in recv], [r["handle"] for r in recv],
                            [r["recv_topk_weights"] for r in recv])
    return [dict(r, combined=c) for r, c in zip(recv, combined)]


DISPATCH_COMBINE = registry.op("ep_dispatch_combine", problem)
for _name, _module in (("cuda", "ep_intranode"), ("emu", "ep_intranode")):
    DISPATCH_COMBINE.add(B.kernel(_name, _module, _kernel))
DISPATCH_COMBINE.add(registry.Backend(
    "triton", lambda p: "runs across a process group: pykernels.ep.Buffer(group, local_backend='triton')",
    lambda p: None))
DISPATCH_COMBINE.add(B.reference(_reference))
