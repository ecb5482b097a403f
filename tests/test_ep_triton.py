"""Triton local steps of EP dispatch/combine (pykernels.triton.ep) against plain-torch
computations, under Triton's interpreter on CPU; the Buffer with local_backend="triton"
across 2 gloo processes; and the Buffer's input validation.

Every comparison is exact: integer layouts and permutes with torch.equal, payloads and
combine outputs compared as raw bits (the combine adds in the reference's fixed order,
so it is bit-identical, not merely close)."""
import os

import pytest
import torch
import torch.distributed as dist

import pykernels  # noqa: F401  (chooses the Triton interpreter on CPU before triton loads)
from pykernels.ep import Buffer, DispatchHandle
from pykernels.reference import ep as ref
from pykernels.triton import ep as tep
from tests.test_ep_engine import _inputs, _worker as _engine_worker, spawn_ranks


def _routing(g, t, k, num_experts, dtype=torch.int64, empty_expert=0):
    """Random distinct top-k experts per token, never `empty_expert`, ~20% slots -1,
    token 1 (if any) routed nowhere."""
    pool = [e for e in range(num_experts) if e != empty_expert]
    scores = torch.rand(t, len(pool), generator=g)
    idx = torch.tensor(pool)[scores.topk(k, dim=1).indices]
    idx[torch.rand(t, k, generator=g) < 0.2] = -1
    if t > 1:
        idx[1] = -1
    return idx.to(dtype)


def _torch_send_layout(in_rank):
    """The torch path's order: by destination rank, token order within a rank."""
    send_idx = torch.cat([in_rank[:, r].nonzero().flatten() for r in range(in_rank.shape[1])])
    pos = torch.full(in_rank.shape, -1, dtype=torch.int32)
    start = 0
    for r in range(in_rank.shape[1]):
        tok = in_rank[:, r].nonzero().flatten()
        pos[tok, r] = torch.arange(start, start + tok.numel(), dtype=torch.int32)
        start += tok.numel()
    return send_idx, pos, in_rank.sum(0).tolist()


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 1: torch.uint8}[t.element_size()])


# ---------------------------------------------------------------------------------------
# kernels vs torch
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,topk,num_experts,num_ranks", [
    (0, 4, 16, 2), (1, 1, 8, 8), (130, 8, 200, 4), (70, 4, 144, 72), (33, 16, 32, 1)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_layout_matches_torch(tokens, topk, num_experts, num_ranks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx = _routing(g, tokens, topk, num_experts, dtype)
    got = tep.dispatch_layout(idx, num_experts, num_ranks)
    exp = ref.dispatch_layout(idx.long(), num_experts, num_ranks)
    for a, b, name in zip(got, exp, ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank")):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int(got[1][0]) == 0  # the expert nobody routes to
    # a strided (non-contiguous) topk_idx gives the same layout
    wide = torch.stack([idx, idx], 2)[:, :, 0]
    assert all(torch.equal(a, b) for a, b in zip(tep.dispatch_layout(wide, num_experts, num_ranks), got))


@pytest.mark.parametrize("tokens,num_ranks", [(0, 3), (600, 2), (97, 5), (40, 130)])
def test_send_layout_matches_torch(tokens, num_ranks, seed):
    g = torch.Generator().manual_seed(seed)
    in_rank = torch.rand(num_ranks, tokens, generator=g).t() < 0.3  # strided [T, R] view
    if num_ranks > 2:
        in_rank[:, 1] = False  # a rank that receives nothing
    send_idx, send_pos, counts = tep.send_layout(in_rank)
    exp_idx, exp_pos, exp_counts = _torch_send_layout(in_rank)
    assert counts == exp_counts
    assert send_idx.dtype == torch.int64 and torch.equal(send_idx, exp_idx)
    assert send_pos.dtype == torch.int32 and torch.equal(send_pos, exp_pos)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("topk", [0, 3, 8])
def test_permute_matches_torch(fp8, topk, seed):
    g = torch.Generator().manual_seed(seed)
    T, H = 45, 384
    x = torch.randn(T, H, generator=g).bfloat16()
    x[0, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, 1e-40])  # bits must survive as is
    scales = torch.rand(T, H // 128, generator=g) if fp8 else None
    data = (x.float() * 4).to(torch.float8_e4m3fn) if fp8 else x
    payload = (data, scales) if fp8 else data
    idx = _routing(g, T, topk, 32, torch.int32 if topk == 3 else torch.int64) if topk else None
    w = torch.randn(T, topk, generator=g) if topk else None
    # any gather list: repeated tokens, arbitrary order
    send_idx = torch.randint(0, T, (70,), generator=g)
    packed = tep.permute(payload, send_idx, idx, w)
    fmt = tep.dispatch_row_format(H, fp8, topk)
    assert packed.dtype == torch.int32 and packed.shape == (70, fmt.words) and fmt.words % 4 == 0
    assert torch.equal(packed[:, :fmt.x_words].contiguous().view(data.dtype).view(torch.uint8),
                       data[send_idx].view(torch.uint8))
    if fp8:
        assert torch.equal(packed[:, fmt.sf_off:fmt.sf_off + fmt.sf_words], _bits(scales[send_idx]))
    if topk:
        assert torch.equal(packed[:, fmt.idx_off:fmt.w_off], idx[send_idx].int())
        assert torch.equal(packed[:, fmt.w_off:fmt.pad_off], _bits(w[send_idx]))
    assert not packed[:, fmt.pad_off:].any()  # padding is zero: deterministic bytes on the wire
    assert tep.permute(payload, send_idx[:0], idx, w).shape == (0, fmt.words)


@pytest.mark.parametrize("fp8,topk,first_expert,experts_per_rank", [
    (False, 4, 8, 8), (True, 8, 100, 100), (False, 0, 0, 1), (True, 2, 0, 4)])
def test_unpack_received_matches_torch(fp8, topk, first_expert, experts_per_rank, seed):
    g = torch.Generator().manual_seed(seed)
    N, H = 50, 256
    x = torch.randn(N, H, generator=g).bfloat16()
    data = (x.float() * 8).to(torch.float8_e4m3fn) if fp8 else x
    scales = torch.rand(N, H // 128, generator=g)
    payload = (data, scales) if fp8 else data
    num_experts = max(first_expert + experts_per_rank, 16) * 2
    idx = _routing(g, N, topk, num_experts, empty_expert=first_expert) if topk else None
    w = torch.rand(N, topk, generator=g) if topk else None
    recv = tep.permute(payload, torch.arange(N), idx, w)  # rows as they arrive
    recv_x, recv_idx, recv_w, counts = tep.unpack_received(recv, H, fp8, topk, first_expert, experts_per_rank)
    if fp8:
        assert torch.equal(recv_x[0].view(torch.uint8), data.view(torch.uint8))
        assert torch.equal(_bits(recv_x[1]), _bits(scales))
    else:
        assert torch.equal(_bits(recv_x), _bits(x))
    if not topk:
        assert recv_idx is None and recv_w is None and counts is None
        return
    rank = first_expert // experts_per_rank
    exp_idx, exp_w = ref.localize_topk(idx, w, rank, experts_per_rank)
    assert recv_idx.dtype == torch.int64 and torch.equal(recv_idx, exp_idx)
    assert torch.equal(_bits(recv_w), _bits(exp_w))
    exp_counts = [int((exp_idx == e).sum()) for e in range(experts_per_rank)]
    assert counts.tolist() == exp_counts and exp_counts[0] == 0  # local expert 0 gets nothing


def _torch_combine(rows, weights, send_idx, counts, num_tokens):
    """The torch path: float32 rows (times the left-to-right weight sum), added rank by
    rank into zeros, then rounded to bf16."""
    rows = rows.float()
    if weights is not None:
        rows = rows * ref.weight_sum(weights)[:, None]
    out = torch.zeros(num_tokens, rows.shape[1])
    start = 0
    for c in counts:
        out[send_idx[start:start + c]] += rows[start:start + c]
        start += c
    return out.bfloat16()


@pytest.mark.parametrize("tokens,num_ranks,hidden", [(40, 4, 384), (17, 1, 128), (0, 2, 256)])
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_matches_torch_bitwise(tokens, num_ranks, hidden, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    in_rank = torch.rand(tokens, num_ranks, generator=g) < 0.6
    if tokens:
        in_rank[0] = False  # a token nobody sent: combines to zeros
    send_idx, send_pos, counts = tep.send_layout(in_rank)
    S = send_idx.numel()
    # magnitudes spread over 2^-20..2^20: float32 sums of such rows depend on the order
    rows = (torch.randn(S, hidden, generator=g) * 2.0 ** torch.randint(-20, 21, (S, 1), generator=g)).bfloat16()
    w = torch.rand(S, 5, generator=g) * (torch.rand(S, 5, generator=g) < 0.6) if weighted else None
    packed = tep.combine_pack(rows, w)
    fmt = tep.combine_row_format(hidden, weighted)
    assert packed.shape == (S, fmt.words) and not packed[:, fmt.pad_off:].any()
    if weighted:
        assert torch.equal(packed[:, fmt.w_off], _bits(ref.weight_sum(w)))
    out = tep.combine_reduce(packed, send_pos, hidden, weighted)
    exp = _torch_combine(rows, w, send_idx, counts, tokens)
    assert out.dtype == torch.bfloat16 and torch.equal(_bits(out), _bits(exp))
    if tokens:
        assert not out[0].float().any()
    # deterministic: the same inputs give the same bytes
    assert torch.equal(_bits(tep.combine_reduce(tep.combine_pack(rows, w), send_pos, hidden, weighted)), _bits(out))


def test_combine_sums_in_ascending_rank_order():
    # one token sent to 4 ranks, rows 1, 2^30, -2^30, 1: left to right in float32 gives
    # ((1 + 2^30) - 2^30) + 1 = 1 (the first 1 is absorbed); a pairwise tree gives 0
    vals = torch.tensor([1.0, 2.0 ** 30, -2.0 ** 30, 1.0])
    rows = vals[:, None].expand(4, 128).bfloat16()
    send_idx, send_pos, counts = tep.send_layout(torch.ones(1, 4, dtype=torch.bool))
    out = tep.combine_reduce(tep.combine_pack(rows), send_pos, 128, False)
    assert torch.equal(out, torch.ones(1, 128, dtype=torch.bfloat16))
    assert torch.equal(_bits(out), _bits(_torch_combine(rows, None, send_idx, counts, 1)))
    w = torch.tensor([[0.5, 0.25], [1.0, 0.0], [1.0, 0.0], [0.75, 0.0]])  # weight sums 0.75, 1, 1, 0.75
    out_w = tep.combine_reduce(tep.combine_pack(rows, w), send_pos, 128, True)
    assert torch.equal(out_w, torch.full((1, 128), 0.75, dtype=torch.bfloat16))


def test_combine_rounds_bf16_to_nearest_even():
    # sums that land exactly between two bf16 values (and just off them): the interpreter's
    # plain cast truncates, the kernel must round like torch
    rows = torch.tensor([[1.0, 1.0, -1.0, 256.0], [2 ** -8, 3 * 2 ** -8, -(2 ** -8), 1.0]]).bfloat16()
    rows = rows.repeat(1, 32)
    in_rank = torch.tensor([[True, True]])
    send_idx, send_pos, counts = tep.send_layout(in_rank)
    out = tep.combine_reduce(tep.combine_pack(rows), send_pos, 128, False)
    assert torch.equal(_bits(out), _bits(_torch_combine(rows, None, send_idx, counts, 1)))


# ---------------------------------------------------------------------------------------
# the Buffer with Triton local steps, 2 gloo processes
# ---------------------------------------------------------------------------------------
def test_buffer_triton_engine_checks(seed):
    """The engine test's own worker (every assertion of tests/test_ep_engine.py) with the
    Triton local steps."""
    assert spawn_ranks(_engine_worker, 2, seed, "triton") > 0


def _cross_worker(rank, ranks, init_file, seed, done_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    try:
        num_experts = 8 * ranks
        xs, idxs, ws = _inputs(seed, ranks, num_experts)
        g = torch.Generator().manual_seed(seed + 1)
        fp8s = [((x.float() * 2).to(torch.float8_e4m3fn), torch.rand(x.shape[0], x.shape[1] // 128, generator=g))
                for x in xs]
        sim = ref.simulate_dispatch([f[0] for f in fp8s], idxs, ws, num_experts)[rank]
        sim_sf = ref.simulate_dispatch([f[1] for f in fp8s], idxs, ws, num_experts)[rank]
        bt, bx = Buffer(None, local_backend="triton"), Buffer(None)
        # FP8 dispatch with top-k through the Triton path: every received row checked
        (rq, rs), ri, rw, counts, handle, _ = bt.dispatch(fp8s[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=num_experts)
        assert torch.equal(handle.send_pos, tep.send_layout(handle.is_token_in_rank)[1])
        assert torch.equal(rq.view(torch.uint8), sim["recv_x"].view(torch.uint8))
        assert torch.equal(rs.view(torch.int32), sim_sf["recv_x"].view(torch.int32))
        assert torch.equal(ri, sim["recv_topk_idx"]) and torch.equal(rw.view(torch.int32),
                                                                     sim["recv_topk_weights"].view(torch.int32))
        assert counts == sim["num_recv_tokens_per_expert"]
        # both backends agree bit for bit, and their handles are interchangeable
        out_t = bt.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=num_experts)
        out_x = bx.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=num_experts)
        assert torch.equal(out_t[0].view(torch.int16), out_x[0].view(torch.int16))
        assert torch.equal(out_t[1], out_x[1]) and torch.equal(out_t[2], out_x[2]) and out_t[3] == out_x[3]
        assert torch.equal(out_t[4].send_idx, out_x[4].send_idx)
        for weights in (None, out_t[2]):
            c_t = bt.combine(out_t[0], out_x[4], weights)[0]  # torch-made handle, Triton combine
            c_x = bx.combine(out_x[0], out_t[4], weights)[0]  # Triton-made handle, torch combine
            assert torch.equal(c_t.view(torch.int16), c_x.view(torch.int16))
        # cached handle, payload only (no top-k), through the Triton path
        again = bt.dispatch(xs[rank], handle=out_t[4])
        assert torch.equal(again[0].view(torch.int16), out_t[0].view(torch.int16)) and again[1] is None
        # group-size mismatch: num_experts must divide evenly over the 2 ranks
        for buf in (bt, bx):
            with pytest.raises(ValueError,
                               match=r"num_experts: expected a positive multiple of the group size 2, got 17"):
                buf.get_dispatch_layout(idxs[rank], 17)
            with pytest.raises(ValueError, match="num_experts: expected a positive multiple of the group size 2"):
                buf.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_experts=15)
        open(os.path.join(done_dir, f"rank{rank}.ok"), "w").write(str(rq.shape[0]))
    finally:
        dist.destroy_process_group()


def test_buffer_triton_matches_torch_across_processes(seed):
    assert spawn_ranks(_cross_worker, 2, seed) > 0


# ---------------------------------------------------------------------------------------
# validation (1-rank gloo group; the group-size mismatch is checked in _cross_worker)
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["torch", "triton"])
def buf(request, single_rank_group):
    return Buffer(None, local_backend=request.param)


def test_bad_x(buf):
    idx = torch.randint(0, 8, (4, 2))
    x = torch.randn(4, 256).bfloat16()
    fp8 = x.float().to(torch.float8_e4m3fn)
    cases = [
        (TypeError, r"x: expected a bfloat16 tensor or an FP8 pair, got torch.float16", x.half()),
        (TypeError, r"x: expected a bfloat16 tensor or an FP8 pair, got list", [[1.0]]),
        (TypeError, r"x: expected FP8 data of dtype float8_e4m3fn, got torch.float8_e5m2",
         (x.float().to(torch.float8_e5m2), torch.ones(4, 2))),
        (TypeError, r"x: expected a bf16 tensor or a pair \(e4m3 data, float32 scales\), got a tuple of 3",
         (fp8, torch.ones(4, 2), None)),
        (TypeError, r"x scales: expected float32 \[4, 2\], got torch.bfloat16 \[4, 2\]",
         (fp8, torch.ones(4, 2, dtype=torch.bfloat16))),
        (TypeError, r"x scales: expected float32 \[4, 2\], got NoneType", (fp8, None)),
        (ValueError, r"x scales: expected float32 \[4, 2\], got torch.float32 \[4, 1\]", (fp8, torch.ones(4, 1))),
        (ValueError, r"x scales: expected float32 \[4, 2\], got torch.float32 \[2, 4\]", (fp8, torch.ones(2, 4))),
        (ValueError, r"x: expected shape \[num_tokens, hidden\], got \[4, 256, 1\]", x[:, :, None]),
    ]
    for exc, msg, bad in cases:
        with pytest.raises(exc, match=msg):
            buf.dispatch(bad, topk_idx=idx, num_experts=8)


@pytest.mark.parametrize("hidden", [64, 200, 1000, 16384 + 128])
def test_bad_hidden(buf, hidden):
    idx = torch.randint(0, 8, (4, 2))
    msg = rf"x: hidden size {hidden} not supported: expected a multiple of 128 in \[128, 16384\]"
    with pytest.raises(ValueError, match=msg):
        buf.dispatch(torch.zeros(4, hidden, dtype=torch.bfloat16), topk_idx=idx, num_experts=8)
    with pytest.raises(ValueError, match=msg):
        buf.dispatch((torch.zeros(4, hidden, dtype=torch.float8_e4m3fn), torch.ones(4, hidden // 128)), topk_idx=idx,
                     num_experts=8)


def test_bad_topk(buf):
    x = torch.randn(4, 256).bfloat16()
    idx = torch.randint(0, 8, (4, 2))
    w = torch.rand(4, 2)
    with pytest.raises(ValueError, match=r"topk_idx: expected values in \[-1, 8\), got range \[\d, 8\]"):
        bad = idx.clone()
        bad[2, 1] = 8
        buf.dispatch(x, topk_idx=bad, topk_weights=w, num_experts=8)
    with pytest.raises(ValueError, match=r"topk_idx: expected values in \[-1, 8\), got range \[-2, \d\]"):
        bad = idx.clone()
        bad[0, 0] = -2
        buf.get_dispatch_layout(bad, 8)
    with pytest.raises(ValueError, match="topk_idx: expected 1..16 experts per token, got 17"):
        buf.dispatch(x, topk_idx=torch.zeros(4, 17, dtype=torch.long), num_experts=32)
    with pytest.raises(ValueError, match="topk_idx: expected 1..16 experts per token, got 0"):
        buf.get_dispatch_layout(torch.zeros(4, 0, dtype=torch.long), 8)
    with pytest.raises(TypeError, match="topk_idx: expected an int64 tensor, got torch.float32"):
        buf.dispatch(x, topk_idx=idx.float(), num_experts=8)
    with pytest.raises(ValueError,
                       match=r"topk_weights: expected shape \[4, 2\] \(the shape of topk_idx\), got \[4, 3\]"):
        buf.dispatch(x, topk_idx=idx, topk_weights=torch.rand(4, 3), num_experts=8)
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[4, 2\] \(the shape of topk_idx\), got \[2\]"):
        buf.dispatch(x, topk_idx=idx, topk_weights=torch.rand(2), num_experts=8)
    with pytest.raises(TypeError, match="topk_weights: expected a float32 tensor, got torch.bfloat16"):
        buf.dispatch(x, topk_idx=idx, topk_weights=w.bfloat16(), num_experts=8)
    with pytest.raises(ValueError, match="topk_weights: given without topk_idx"):
        buf.dispatch(x, topk_weights=w, num_experts=8)
    with pytest.raises(ValueError, match="num_experts: expected a positive multiple of the group size 1, got 0"):
        buf.get_dispatch_layout(idx, 0)
    with pytest.raises(TypeError, match="num_experts: expected an int, got float"):
        buf.get_dispatch_layout(idx, 8.0)
    with pytest.raises(ValueError, match="num_experts: required"):
        buf.dispatch(x, topk_idx=idx)


def test_bad_layout_args(buf):
    x = torch.randn(4, 256).bfloat16()
    idx = torch.randint(0, 8, (4, 2))
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8)
    with pytest.raises(ValueError, match=r"num_tokens_per_expert: expected a tensor \[16\] \(num_experts\), "
                                         r"got torch.int32 \[8\]"):
        buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, num_experts=16)
    with pytest.raises(ValueError, match=r"is_token_in_rank: expected shape \[4, 1\], got \[3, 1\]"):
        buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank[:3], num_tokens_per_expert=per_expert)
    with pytest.raises(TypeError, match=r"is_token_in_rank: expected a bool tensor \[4, 1\], got torch.int32"):
        buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank.int(), num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match=r"num_tokens_per_rank: expected a tensor \[1\] \(one per rank\)"):
        buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=torch.zeros(2, dtype=torch.int32), is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def test_bad_combine(buf):
    x = torch.randn(4, 256).bfloat16()
    idx = torch.randint(0, 8, (4, 2))
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=torch.rand(4, 2), num_experts=8)
    n = recv_x.shape[0]
    with pytest.raises(TypeError, match="x: expected a bfloat16 tensor, got torch.float32"):
        buf.combine(recv_x.float(), handle)
    with pytest.raises(ValueError, match=rf"x: expected shape \[{n}, hidden\]"):
        buf.combine(recv_x[1:], handle)
    with pytest.raises(TypeError, match="handle: expected a DispatchHandle from dispatch, got tuple"):
        buf.combine(recv_x, (1, 2))
    with pytest.raises(TypeError, match="topk_weights: expected a float32 tensor, got torch.float64"):
        buf.combine(recv_x, handle, recv_w.double())
    with pytest.raises(ValueError, match=rf"topk_weights: expected shape \[{n}, topk\] with 1 <= topk <= 16"):
        buf.combine(recv_x, handle, recv_w[1:])
    with pytest.raises(TypeError, match="handle: expected a DispatchHandle from an earlier dispatch, got dict"):
        buf.dispatch(x, handle={})
    assert isinstance(handle, DispatchHandle)
    # the good call still works after all of that
    out = buf.combine(recv_x, handle, recv_w)[0]
    assert out.shape == x.shape and out.dtype == torch.bfloat16


def test_bad_local_backend(single_rank_group):
    with pytest.raises(ValueError, match=r"local_backend: expected one of \('torch', 'triton'\), got 'cuda'"):
        Buffer(None, local_backend="cuda")


def test_triton_kernel_input_checks():
    with pytest.raises(TypeError, match="topk_idx: expected an int64 or int32 tensor, got torch.float32"):
        tep.dispatch_layout(torch.zeros(2, 2), 8, 2)
    with pytest.raises(ValueError, match="num_experts: expected a positive multiple of num_ranks 3, got 8"):
        tep.dispatch_layout(torch.zeros(2, 2, dtype=torch.long), 8, 3)
    with pytest.raises(TypeError, match="is_token_in_rank: expected a bool tensor"):
        tep.send_layout(torch.zeros(2, 2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# the same launches through Triton's sm_90 PTX, run by the emulator
# ---------------------------------------------------------------------------------------
_TRITON_TYPES = {torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bfloat16: "*bf16",
                 torch.float32: "*fp32"}

_COMPILE_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for spec in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module("pykernels.triton.ep"), spec["function"])
    sig = dict(spec["signature"], **{k: "constexpr" for k in spec["constexprs"]})
    c = triton.compile(ASTSource(fn, sig, spec["constexprs"]), target=GPUTarget("cuda", 90, 32),
                       options=spec["options"])
    md = c.metadata
    out.append(dict(ptx=c.asm["ptx"], name=md.name, num_warps=md.num_warps, shared=md.shared,
                    cluster_dims=(1, 1, 1), global_scratch_size=getattr(md, "global_scratch_size", 0) or 0,
                    global_scratch_align=getattr(md, "global_scratch_align", 1) or 1,
                    profile_scratch_size=getattr(md, "profile_scratch_size", 0) or 0))
print(json.dumps(out))
"""


def _same_layout_copy(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def _raw(t):
    return t.contiguous().flatten().view(torch.uint8)


def test_local_steps_compiled_for_sm90_match_interpreter(monkeypatch, seed):
    """Record every kernel launch of a full local dispatch/combine flow under the
    interpreter (state before and after), compile each kernel for sm_90 with Triton's
    NVIDIA backend (as the GPU path would; combine_reduce without FP fusion), replay each
    launch from the same state through that PTX on pykernels.emu, and require the same
    bytes in every tensor argument. This checks the GPU compilation (integer widths,
    scans, bf16 rounding, mul.rn) where no GPU exists."""
    import json
    import subprocess
    import sys

    from pykernels import emu
    if not hasattr(emu, "launch_triton"):
        pytest.skip("pykernels.emu.launch_triton is not available")
    records = []

    def record(kernel, grid, *args, **meta):
        pre = [_same_layout_copy(a) if isinstance(a, torch.Tensor) else a for a in args]
        kernel[grid](*args, **meta)
        records.append((kernel.fn.__name__, grid, pre, [a.clone() if isinstance(a, torch.Tensor) else None
                                                        for a in args], meta))
    monkeypatch.setattr(tep, "_launch", record)

    g = torch.Generator().manual_seed(seed)
    T, H, K, E, R = 70, 256, 4, 32, 4
    idx = _routing(g, T, K, E)
    x = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn), torch.rand(T, H // 128, generator=g)
    w = torch.rand(T, K, generator=g)
    _, _, in_rank = tep.dispatch_layout(idx, E, R)
    send_idx, send_pos, _ = tep.send_layout(in_rank)
    packed = tep.permute(x, send_idx, idx, w)
    _, _, recv_w, _ = tep.unpack_received(packed, H, True, K, 8, 8)
    rows = (torch.randn(send_idx.numel(), H, generator=g) * 2.0 ** torch.randint(-20, 21, (1, H), generator=g))
    tep.combine_reduce(tep.combine_pack(rows.bfloat16(), recv_w), send_pos, H, True)
    assert [r[0] for r in records] == ["_layout_kernel", "_send_layout_kernel", "_pack_kernel", "_unpack_kernel",
                                       "_combine_pack_kernel", "_combine_reduce_kernel"]

    specs = []
    for name, _, pre, _, meta in records:
        sig = {arg: (_TRITON_TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32")
               for arg, a in zip(getattr(tep, name).arg_names, pre)}
        options = {"num_warps": 4}
        if "enable_fp_fusion" in meta:
            options["enable_fp_fusion"] = meta["enable_fp_fusion"]
        specs.append(dict(function=name, signature=sig, options=options,
                          constexprs={k: v for k, v in meta.items() if k != "enable_fp_fusion"}))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], input=json.dumps(specs), capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [emu.CompiledPTX(**d) for d in json.loads(proc.stdout.strip().splitlines()[-1])]
    # the combine product is rounded before the add: ptxas may not contract it into an FMA
    assert "mul.rn.f32" in compiled[-1].ptx and "fma.rn.f32" not in compiled[-1].ptx

    for (name, grid, pre, post, _), kernel in zip(records, compiled):
        args = [_same_layout_copy(a) if isinstance(a, torch.Tensor) else a for a in pre]
        emu.launch_triton(kernel, tuple(grid), *args)
        for i, (a, want) in enumerate(zip(args, post)):
            if want is not None:
                assert torch.equal(_raw(a), _raw(want)), f"{name}: argument {i} differs on the emulator"
