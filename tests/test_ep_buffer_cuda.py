"""Buffer(backend="cuda"): the hand-written kernels on GPUs, one process per rank (marked gpu:
skipped without a Hopper GPU). With two GPUs the group is NCCL; with one, both processes
share it over gloo (CUDA IPC between processes of one device). Exact against the reference:
dispatch, DeepEP's combine (rows and weights), a cached handle, num_worst_tokens."""
import os

import pytest
import torch
import torch.distributed as dist

from pykernels.ep import Buffer
from pykernels.reference import ep as ref
from tests.test_ep_buffer_semantics import _expert_outputs, _inputs
from tests.test_ep_engine import spawn_ranks


def _cuda_worker(rank, ranks, init_file, seed, done_dir):
    devices = torch.cuda.device_count()
    torch.cuda.set_device(rank % devices)
    dist.init_process_group("nccl" if devices >= ranks else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=ranks)
    try:
        dev = torch.device("cuda", rank % devices)
        xs, idxs, ws, E = _inputs(seed, ranks)
        sims = ref.simulate_dispatch(xs, idxs, ws, E)
        sim, N = sims[rank], sims[rank]["recv_x"].shape[0]
        buf = Buffer(None, backend="cuda", timeout_s=60)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            xs[rank].to(dev), topk_idx=idxs[rank].to(dev), topk_weights=ws[rank].to(dev), num_experts=E)
        assert torch.equal(recv_x.cpu(), sim["recv_x"]) and torch.equal(recv_idx.cpu(), sim["recv_topk_idx"])
        assert torch.equal(recv_w.cpu(), sim["recv_topk_weights"]) and counts == sim["num_recv_tokens_per_expert"]
        ys, wts = _expert_outputs(sims)
        out, out_w, _ = buf.combine(ys[rank].to(dev), handle, wts[rank].to(dev))
        srcs = [d["recv_src"] for d in sims]
        assert torch.equal(out.cpu(), ref.simulate_combine(ys, srcs, [x.shape[0] for x in xs])[rank].bfloat16())
        assert torch.equal(out_w.cpu(), ref.simulate_combine(wts, srcs, [x.shape[0] for x in xs])[rank])
        again = buf.dispatch(xs[rank].to(dev), handle=handle)[0]
        assert torch.equal(again.cpu(), sim["recv_x"])
        W = max(d["recv_x"].shape[0] for d in sims) + 1
        wx, widx, _, wcounts, whandle, _ = buf.dispatch(xs[rank].to(dev), topk_idx=idxs[rank].to(dev),
                                                        num_experts=E, num_worst_tokens=W)
        assert wx.shape[0] == W and wcounts == [] and torch.equal(wx[:N].cpu(), sim["recv_x"])
        assert (widx[N:] == -1).all()
        assert torch.equal(buf.combine(wx, whandle)[0].cpu(),
                           (xs[rank].float() * ref.dispatch_layout(idxs[rank], E, ranks)[2].sum(1, keepdim=True))
                           .bfloat16())
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(N))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_cuda_backend_across_processes(seed):
    assert spawn_ranks(_cuda_worker, 2, seed) > 0
