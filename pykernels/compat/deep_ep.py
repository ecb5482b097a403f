"""DeepEP's public interface on pykernels: `import pykernels.compat.deep_ep as deep_ep`.

The names of DeepEP's `deep_ep/__init__.py` (V1: Buffer, Config, EventOverlap,
topk_idx_t) with DeepEP's call forms and semantics; they are pykernels.ep's own objects
(one implementation, docs/ep.md), so `deep_ep.Buffer is pykernels.ep.Buffer`.

What differs from DeepEP (docs/compat.md, "DeepEP", lists every Buffer method):
- Buffer takes pykernels' keyword-only `backend` ("auto", "gloo", "nccl", "emu", "cuda"),
  `timeout_s` and `local_backend`; "auto" runs the hand-written NVLink kernels on Hopper
  GPUs and torch.distributed's collectives elsewhere (CPU processes with gloo, PCIe-only
  machines, across nodes).
- the ranks compare their configuration and each call's shapes before data moves, and
  every wait has a timeout: a mismatch or an absent rank is a Python exception on every
  rank (RankMismatchError, RankTimeoutError) where DeepEP's kernels would misroute or trap;
- num_nvl_bytes / num_rdma_bytes are compared across ranks but do not size anything: the
  buffers are sized from the first call's shapes;
- the handle is DeepEP's six-tuple (handle[0] is rank_prefix_matrix), but handle[5]
  (send_head) holds each token's position among the tokens sent to a rank, not a ring
  slot, and the engine backends have one channel (handle[1], handle[2]: zeros [R, 1]);
- dispatch's keyword-only `num_experts` may replace num_tokens_per_expert, and the layout
  arguments are optional with topk_idx (DeepEP requires them);
- EventOverlap.current_stream_wait is a no-op without an event (DeepEP asserts one).
Missing (NotImplementedError naming the function): internode (RDMA) dispatch/combine,
combine's `bias`, get_local_buffer_tensor, get_comm_stream, the rank masks of
enable_shrink, mpi4py `comm`, multi-node NVLink (allow_mnnvl, use_fabric).
"""
from .. import __version__
from ..ep import Buffer, Config, EventOverlap, topk_idx_t

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t", "__version__"]
