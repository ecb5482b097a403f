"""pykernels.ep.Buffer's DeepEP surface that needs no peers: Config, the static helpers,
EventOverlap, topk_idx_t, destroy's rule, the construction checks, the DeepEP methods that
are not supported (NotImplementedError naming them), and pykernels.compat.deep_ep."""
import tempfile

import pytest
import torch
import torch.distributed as dist

import pykernels
import pykernels.compat.deep_ep as deep_ep
from pykernels.ep import Buffer, Config, EventOverlap, topk_idx_t
from pykernels.ep.config import recommended_config


@pytest.fixture
def group():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        yield None
        dist.destroy_process_group()


def test_compat_module_names():
    assert set(deep_ep.__all__) == {"Buffer", "Config", "EventOverlap", "topk_idx_t", "__version__"}
    assert deep_ep.Buffer is Buffer and deep_ep.Config is Config and deep_ep.EventOverlap is EventOverlap
    assert deep_ep.topk_idx_t is torch.int64 and topk_idx_t is torch.int64
    assert deep_ep.__version__ == pykernels.__version__


def test_config_fields_checks_and_ring_geometry():
    c = Config(24, 6, 256, 16, 128)   # DeepEP's positional order
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (24, 6, 256, 16, 128)
    assert (c.num_channels, c.num_slots, c.publish_every) == (12, 256, 6)
    odd = Config(4, 9, 100)           # 100 slots -> 64 (a power of two); publishing never exceeds the ring
    assert (odd.num_channels, odd.num_slots, odd.publish_every) == (2, 64, 9)
    assert Config(4, 80, 64).publish_every == 64
    cfg = c.intranode_config(num_ranks=8, hidden=7168, max_topk=8)
    assert (cfg.num_channels, cfg.num_slots, cfg.publish_every, cfg.hidden) == (12, 256, 6, 7168)
    # the size hint is the kernels' buffer for that hidden size (any top-k up to 16)
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8) == c.intranode_config(8, 7168, 16).buffer_bytes
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(ValueError, match="num_sms: expected an even number .* got 5"):
        Config(5, 6, 256)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens: expected a positive int, got 0"):
        Config(4, 0, 256)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_recv_tokens: expected at least 2"):
        Config(4, 1, 1)


def test_static_helpers():
    old = Buffer.num_sms
    try:
        assert Buffer.get_dispatch_config(2) == Config(old, 6, 256, 16, 128) == Buffer.get_combine_config(8)
        Buffer.set_num_sms(8)
        assert Buffer.num_sms == 8 and Buffer.get_dispatch_config(4).num_sms == 8
        for bad in (7, 0, -2, 2.0, True):
            with pytest.raises(ValueError, match="new_num_sms: expected a positive even int"):
                Buffer.set_num_sms(bad)
        assert Buffer.num_sms == 8
    finally:
        Buffer.num_sms = old
    with pytest.raises(ValueError, match="num_ranks: expected a positive int, got 0"):
        recommended_config(0, 20)
    from pykernels.runtime import artifacts
    assert Buffer.is_sm90_compiled() == ("ep_intranode" in artifacts.manifest()["kernels"])
    ev = Buffer.capture()
    assert isinstance(ev, EventOverlap) and (ev.event is None) == (not torch.cuda.is_available())


def test_event_overlap_without_gpu():
    keep = (torch.zeros(1),)
    ev = EventOverlap(None, keep)
    assert ev.extra_tensors is keep
    with ev as inner:              # DeepEP's overlap idiom: nothing to wait for on the CPU
        assert inner is ev
    ev.current_stream_wait()
    assert EventOverlap.record("cpu").event is None


def test_destroy_follows_deepeps_rule(group):
    buf = Buffer(group, backend="gloo")
    with pytest.raises(RuntimeError, match="destroy: this Buffer was built with explicitly_destroy=False"):
        buf.destroy()
    x = torch.randn(3, 128).bfloat16()
    assert buf.dispatch(x, topk_idx=torch.zeros(3, 1, dtype=torch.long), num_experts=2)[0].shape == (3, 128)
    owned = Buffer(group, backend="gloo", explicitly_destroy=True)
    owned.destroy()
    with pytest.raises(RuntimeError, match=r"Buffer.dispatch \(call \d+\): this Buffer was destroyed"):
        owned.dispatch(x, topk_idx=torch.zeros(3, 1, dtype=torch.long), num_experts=2)
    with pytest.raises(RuntimeError, match="get_dispatch_layout: this Buffer was destroyed"):
        owned.get_dispatch_layout(torch.zeros(3, 1, dtype=torch.long), 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(backend="mpi"), r"backend: expected one of \('auto', 'gloo', 'nccl', 'emu', 'cuda'\), got 'mpi'"),
    (dict(backend="nccl"), r"backend: 'nccl' runs over the group's own collectives, but the group's backend is "
                           r"'gloo'"),
    (dict(timeout_s=0), r"timeout_s: expected a positive number of seconds, got 0"),
    (dict(num_nvl_bytes=-1), r"num_nvl_bytes: expected an int >= 0, got -1"),
    (dict(local_backend="cuda"), r"local_backend: expected one of \('torch', 'triton'\), got 'cuda'"),
])
def test_construction_checks(group, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Buffer(group, **kwargs)
    Buffer(group, backend="gloo")      # the group still builds Buffers afterwards


@pytest.mark.parametrize("kwargs,message", [
    (dict(allow_mnnvl=True), r"Buffer: allow_mnnvl=True \(multi-node NVLink\) is not supported"),
    (dict(use_fabric=True), r"Buffer: use_fabric=True \(fabric memory handles\) is not supported"),
    (dict(enable_shrink=True), r"Buffer: enable_shrink=True \(masking ranks out\) is not supported"),
    (dict(comm=object()), r"Buffer: comm \(an mpi4py communicator\) is not supported"),
])
def test_unsupported_construction(group, kwargs, message):
    with pytest.raises(NotImplementedError, match=message):
        Buffer(group, **kwargs)
    Buffer(group, backend="gloo")


def test_backend_auto_without_gpu(group):
    buf = Buffer(group)
    assert buf.backend == ("cuda" if torch.cuda.is_available() else "gloo")
    assert buf.num_ranks == buf.group_size == 1 and buf.rank == 0


@pytest.mark.parametrize("method,args,message", [
    ("internode_dispatch", (), "Buffer.internode_dispatch: internode"),
    ("internode_combine", (), "Buffer.internode_combine: internode"),
    ("get_local_buffer_tensor", (torch.bfloat16,), "Buffer.get_local_buffer_tensor"),
    ("get_comm_stream", (), "Buffer.get_comm_stream"),
    ("low_latency_update_mask_buffer", (0,), "Buffer.low_latency_update_mask_buffer"),
    ("low_latency_query_mask_buffer", (torch.zeros(1, dtype=torch.int32),), "Buffer.low_latency_query_mask_buffer"),
    ("low_latency_clean_mask_buffer", (), "Buffer.low_latency_clean_mask_buffer"),
])
def test_unsupported_methods_name_themselves(group, method, args, message):
    buf = Buffer(group, backend="gloo")
    with pytest.raises(NotImplementedError, match=message):
        getattr(buf, method)(*args)


def test_combine_bias_not_supported(group):
    buf = Buffer(group, backend="gloo")
    x = torch.randn(3, 128).bfloat16()
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=torch.zeros(3, 1, dtype=torch.long), num_experts=2)
    with pytest.raises(NotImplementedError, match="Buffer.combine: bias is not supported yet"):
        buf.combine(recv_x, handle, bias=recv_x)
    assert torch.equal(buf.combine(recv_x, handle)[0], x)   # still usable


def test_handle_is_deepeps_tuple_and_survives_copy(group):
    import copy
    import pickle
    buf = Buffer(group, backend="gloo")
    x = torch.randn(5, 128).bfloat16()
    idx = torch.tensor([[0], [-1], [1], [0], [1]])
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=2)
    assert len(handle) == 6 and handle[0] is handle.rank_prefix_matrix and handle[5] is handle.send_head
    assert handle.rank_prefix_matrix.tolist() == [[4]] and handle.recv_src_idx.tolist() == [0, 2, 3, 4]
    for other in (copy.copy(handle), copy.deepcopy(handle), pickle.loads(pickle.dumps(handle))):
        assert other.num_tokens == 5 and other.kind == "engine" and len(other) == 6
        assert torch.equal(buf.combine(recv_x, other)[0], torch.where(idx >= 0, 1.0, 0.0).bfloat16() * x)
    with pytest.raises(AttributeError, match="DispatchHandle has no attribute 'nothing'"):
        handle.nothing


def test_kernel_backends_need_the_compiled_kernels(group, monkeypatch):
    import pykernels.ep.buffer as buffer_module
    monkeypatch.setattr(buffer_module, "_kernels_built", lambda: False)
    with pytest.raises(ValueError, match=r"backend: 'emu' runs the compiled EP kernels \(ep_intranode\), which this "
                                         r"installation does not have"):
        Buffer(group, backend="emu")
    assert not Buffer.is_sm90_compiled()
    assert Buffer(group).backend == "gloo"      # "auto" falls back to the engine


def _misaligned(t):
    """A contiguous copy of t one element past an aligned allocation."""
    return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("call,error,message", [
    (lambda b, x, idx, w: b.dispatch(x, topk_idx=idx.to("meta"), num_experts=4),
     ValueError, r"topk_idx: expected device cpu \(that of x\), got meta"),
    (lambda b, x, idx, w: b.dispatch(x, topk_idx=idx, topk_weights=w.to("meta"), num_experts=4),
     ValueError, r"topk_weights: expected device cpu \(that of x\), got meta"),
    (lambda b, x, idx, w: b.dispatch(x, is_token_in_rank=torch.ones(6, 1, dtype=torch.bool, device="meta"),
                                     num_experts=4),
     ValueError, r"is_token_in_rank: expected device cpu \(that of x\), got meta"),
    (lambda b, x, idx, w: b.dispatch(x, topk_idx=idx, num_experts=2**40),
     ValueError, r"num_experts: expected at most 2147483647 \(the per-expert counts are int32\), got 1099511627776"),
    (lambda b, x, idx, w: b.combine(*b.dispatch(x, topk_idx=idx, num_experts=4)[0:5:4], w.to("meta")),
     ValueError, r"topk_weights: expected device cpu \(that of x\), got meta"),
])
def test_dispatch_and_combine_argument_devices_and_ranges(group, call, error, message):
    # each was an error deep in the engine (Tensor.item() on meta, a device mismatch inside
    # torch, a 4 TiB allocation): now the argument's own check, before any exchange
    buf = Buffer(group, backend="gloo")
    x, idx, w = torch.randn(6, 256).bfloat16(), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    with pytest.raises(error, match=message):
        call(buf, x, idx, w)
    assert buf.dispatch(x, topk_idx=idx, num_experts=4)[0].shape == (6, 256)   # still usable


@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_backends_reject_a_misaligned_x(group, fp8):
    # the EP kernels load x's rows with 16-byte vectors: a contiguous view at a storage offset
    # faulted in the emulator (a misaligned-address abort on a GPU) and broke the transport
    from pykernels.ep import buffer as buffer_module
    if not buffer_module._kernels_built():
        pytest.skip("the EP kernels are not built")
    buf = Buffer(group, backend="emu")
    x, idx = torch.randn(6, 256).bfloat16(), torch.randint(0, 4, (6, 2))
    if fp8:
        bad, name = (x.float().to(torch.float8_e4m3fn), _misaligned(torch.ones(6, 2))), "x scales"
    else:
        bad, name = _misaligned(x), "x"
    with pytest.raises(ValueError, match=rf"{name}: expected a 16-byte aligned data pointer \(the 'emu' EP kernels "
                                         r"load rows with 16-byte vectors\), got 0x[0-9a-f]+ \(storage offset 1"):
        buf.dispatch(bad, topk_idx=idx, num_experts=4)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=4)     # the transport still works
    with pytest.raises(ValueError, match=r"x: expected a 16-byte aligned data pointer"):
        buf.combine(_misaligned(recv_x), handle)
    assert torch.equal(buf.combine(recv_x, handle)[0], buf.combine(recv_x.clone(), handle)[0])


def test_low_latency_kernels_reject_a_misaligned_x(group):
    # the same 16-byte vector loads in the low-latency dispatch and combine (x only: out is
    # written from the kernel's own buffer, at any alignment)
    from pykernels.ep import buffer as buffer_module
    if not buffer_module._kernels_built():
        pytest.skip("the EP kernels are not built")
    buf = Buffer(group, backend="emu", low_latency_mode=True, num_qps_per_rank=1)
    x, idx, w = torch.randn(6, 256).bfloat16(), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    aligned = r"expected a 16-byte aligned data pointer \(the 'emu' EP kernels load rows with 16-byte vectors\)"
    with pytest.raises(ValueError, match="x: " + aligned):
        buf.low_latency_dispatch(_misaligned(x), idx, 8, 4, use_fp8=False)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
    with pytest.raises(ValueError, match="x: " + aligned):
        buf.low_latency_combine(_misaligned(recv_x), idx, w, handle)
    want = buf.low_latency_combine(recv_x, idx, w, handle)[0]
    out = _misaligned(torch.zeros(6, 256).bfloat16())
    buf.low_latency_combine(recv_x, idx, w, handle, out=out)
    assert torch.equal(out, want)
