"""Programmatic dependent launch (PDL): LaunchPlan.pdl, the kernels' griddepcontrol
instructions and the plans that set the flag.

A plan with pdl=True is launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION:
its kernel may start while the previous kernel of the stream still runs, so it must issue
griddepcontrol.wait (SASS ACQBULK) before any global access. The dependents: the MLA
combines (after the decode), the split-K reduction (after the split-K GEMM) and every
GEMM entry of gemm_fp8_gemm (back-to-back GEMMs). The primaries issue
griddepcontrol.launch_dependents (SASS PREEXIT) after their last stores. The emulator runs
launches in order (the flag changes nothing there): its runs still match the reference, and
its counters see both instructions. GPU runs are marked `gpu`.
"""
import dataclasses
import re

import pytest
import torch

import pykernels.mla as M
import pykernels.mla_schedule as MS
import pykernels as pk
from pykernels import reference as R
from pykernels.cuda import bf16_gemm as CB
from pykernels.cuda import dsa as CD
from pykernels.cuda import gemm as G
from pykernels.cuda import mla as CM
from pykernels.cuda import quant as CQ
from pykernels.metrics import calc_diff
from pykernels.reference import mla as RM
from pykernels.runtime import artifacts, device_errors, sass
from pykernels.runtime.executors import check_pdl, gpu_unavailable_reason, run_cuda, run_emu, waits_on_grid

from .fp8_cases import nan_bf16, normal_problem
from .mla_cases import make_problem

MLA_PRIMARY_MODULES = (CM.MODULE, CM.NARROW_MODULE)
MULTICAST = next(c for c in G.CONFIGS if c.cluster == 2)
COMBINES = {CM.COMBINE_FUNCTION, CD.SPARSE_COMBINE_FUNCTION}


def _functions(module: str) -> list:
    return list(artifacts.manifest()["kernels"][module]["functions"])


def _dependents() -> set:
    """(module, function) of every kernel meant to be launched with PDL."""
    return ({(G.MODULE, f) for f in _functions(G.MODULE)} | {(G.REDUCE_MODULE, G.REDUCE_FUNCTION)}
            | {(CM.MODULE, f) for f in COMBINES})


def _ptx_of(module: str, function: str) -> str:
    ptx = artifacts.ptx_text(module)
    start = ptx.index(f".entry {function}(")
    end = ptx.find(".entry ", start + 1)
    return ptx[start:end if end >= 0 else len(ptx)]


# ------------------------------------------------------------------------ compiled code

def test_exactly_the_dependents_wait_on_the_previous_grid():
    waiting = {(mod, f) for mod in artifacts.manifest()["kernels"] for f in _functions(mod) if waits_on_grid(mod, f)}
    assert waiting == _dependents()


def test_primaries_trigger_their_dependents():
    # every MLA decode entry (the combine follows), every GEMM entry (the reduction or the
    # next GEMM follows), and the dependents themselves (a PDL kernel may follow them)
    primaries = [(mod, f) for mod in MLA_PRIMARY_MODULES for f in _functions(mod)] + sorted(_dependents())
    for mod, f in primaries:
        assert "griddepcontrol.launch_dependents;" in _ptx_of(mod, f), f"{f} never triggers its dependents"


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
# opcodes (before the first '.') that read or write global memory: loads, stores, atomics,
# reductions, TMA and bulk copies
_GLOBAL = {"LDG", "STG", "LD", "ST", "ATOMG", "ATOM", "RED", "REDG", "LDGSTS", "UTMALDG", "UTMASTG", "UTMAREDG",
           "UBLKCP", "UBLKRED"}


def _sass_functions(module: str) -> dict:
    parts = re.split(r"\n\s*Function : ", sass.sass(module))
    return {p.split()[0]: [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(p)]
            for p in parts[1:]}


@pytest.mark.parametrize("module", [G.MODULE, G.REDUCE_MODULE, CM.MODULE])
def test_sass_waits_before_the_first_global_access(module):
    # ACQBULK (griddepcontrol.wait), unpredicated, lies before every global load, store,
    # atomic and TMA of the function in address order: the setup before it (barrier init,
    # parameter reads) touches no global memory
    functions = _sass_functions(module)
    dependents = sorted(f for mod, f in _dependents() if mod == module)
    assert dependents and set(dependents) <= set(functions)
    for f in dependents:
        ins = functions[f]
        waits = [(addr, pred) for addr, pred, op in ins if op == "ACQBULK"]
        assert len(waits) == 1 and waits[0][1] is None, f"{f}: expected one unpredicated ACQBULK, got {waits}"
        first_global = min(addr for addr, _, op in ins if op.split(".")[0] in _GLOBAL)
        assert waits[0][0] < first_global, f"{f}: a global access at {first_global:#x} before the wait"
        assert any(op == "PREEXIT" for _, _, op in ins), f"{f}: no launch_dependents"
    # the reduction is straight-line code: its trigger follows its last store
    if module == G.REDUCE_MODULE:
        ins = functions[G.REDUCE_FUNCTION]
        last_store = max(addr for addr, _, op in ins if op.startswith("STG"))
        assert [addr for addr, _, op in ins if op == "PREEXIT"][0] > last_store


def test_primary_sass_triggers():
    for module in MLA_PRIMARY_MODULES:
        for f, ins in _sass_functions(module).items():
            assert any(op == "PREEXIT" for _, _, op in ins), f"{f}: no PREEXIT"


# ------------------------------------------------------------------------ plans

def _mla_plans():
    seqlens, s_q, h_q = (70, 130), 2, 64
    q, cache, table, sl = make_problem(list(seqlens), s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, 4)
    b, rows = len(seqlens), s_q * h_q
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16)
    lse = torch.empty(b, h_q, s_q)
    oacc, lacc = MS.split_scratch(b, meta.shape[0], rows, 512, q.device)
    record = torch.zeros(8, dtype=torch.int32)
    common = (table, sl, meta, ns, out, lse, oacc, lacc, record)
    decode = CM.plan_decode(CM.q_view(q), CM.kv_view(cache, 0), *common, s_q=s_q, h_q=h_q, scale=0.1, causal=True,
                            num_blocks=cache.shape[0])
    narrow = CM.narrow_decode_plan(CM.q_view(q[:, :, :16]), CM.kv_view(cache, 0), table, sl, meta, ns,
                                   out[:, :, :16], lse[:, :16], oacc, lacc, record, s_q=s_q, h_q=16, scale=0.1,
                                   causal=True, num_blocks=cache.shape[0])
    combine = CM.combine_plan(ns, oacc, lacc, out, lse, h_q=h_q)
    return decode, narrow, combine


def _sparse_plans():
    blocks, pages = 2, 4
    q = torch.randn(1, 1, 64, RM.HEAD_DIM_QK).to(torch.bfloat16)
    cache = M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, RM.HEAD_DIM_QK).to(torch.bfloat16))
    indices = torch.randint(0, pages * 64, (1, 1, blocks * 64), dtype=torch.int32)
    meta, splits = RM.get_mla_metadata(torch.tensor([blocks * 64], dtype=torch.int32), 1)
    out = torch.empty(1, 1, 64, RM.HEAD_DIM_V, dtype=torch.bfloat16)
    lse = torch.empty(1, 64, 1)
    return CD.sparse_decode_plans(q, cache, indices, None, None, meta, splits, out, lse, 0.1,
                                  torch.zeros(8, dtype=torch.int32))


def _gemm_plans():
    m, n, k = 64, 256, 1024
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    normal = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1)
    splits, cfg = 2, G.SPLITK_CONFIGS[0]
    ws = torch.empty(splits * m, n)
    first = G.gemm_plan(a, sfa, b, sfb, ws, None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1, cfg=cfg,
                        splits=splits)
    reduce = G.reduce_plan(ws, nan_bf16(m, n), m, n, splits)
    x, y = torch.randn(m, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
    bf16 = CB.plan(x, y, nan_bf16(m, n))
    multicast = G.gemm_plan(a, sfa, b, sfb, nan_bf16(m, n), None, kind=G.KIND_NORMAL, m=m, n=n, k=k, groups=1,
                            cfg=MULTICAST)
    return normal, first, reduce, bf16, multicast


def test_plans_set_pdl_on_exactly_the_dependent_launches(seed):
    decode, narrow, combine = _mla_plans()
    sparse_decode, sparse_combine = _sparse_plans()
    normal, split_k, reduce, bf16, multicast = _gemm_plans()
    x = torch.randn(4, 256).to(torch.bfloat16)
    quant = CQ.per_token_plan(x, torch.empty(4, 256, dtype=torch.float8_e4m3fn), torch.empty(4, 2))
    dependents = [combine, sparse_combine, normal, split_k, reduce, bf16, multicast]
    others = [decode, narrow, sparse_decode, quant]
    assert [p.pdl for p in dependents] == [True] * len(dependents)
    assert [p.pdl for p in others] == [False] * len(others)
    assert sparse_combine.function == CD.SPARSE_COMBINE_FUNCTION and combine.function == CM.COMBINE_FUNCTION
    assert multicast.cluster == (2, 1, 1)   # launched with both attributes: the cluster and PDL
    for p in dependents:
        assert waits_on_grid(p.module, p.function) and (p.module, p.function) in _dependents()
        check_pdl(p)   # the executors' check passes


def test_pdl_plan_of_a_kernel_that_does_not_wait_is_refused(seed):
    decode, _, _ = _mla_plans()
    bad = dataclasses.replace(decode, pdl=True)
    with pytest.raises(ValueError, match=r"pk_mla_decode_bf16: a plan with pdl=True needs a kernel that issues "
                                         r"griddepcontrol.wait"):
        check_pdl(bad)
    with pytest.raises(ValueError, match="pdl=True"):
        run_emu(bad)   # refused before the emulator runs anything


# ------------------------------------------------------------------------ emulator runs

def test_emu_split_k_reduction_counts_the_grid_dependency_instructions(seed):
    # the reduction as launched after the split-K GEMM (pdl=True): the in-order float32 sum of
    # the slices rounded once (NaN-poisoned out: every element written); its only sync-class
    # instructions are one griddepcontrol.wait and one launch_dependents per warp
    m, n, splits = 24, 64, 3
    ws = torch.randn(splits * m, n)
    out = nan_bf16(m, n)
    plan = G.reduce_plan(ws, out, m, n, splits, sms=2)
    assert plan.pdl
    stats = run_emu(plan)
    s = ws.view(splits, m, n)
    assert torch.equal(out, (s[0] + s[1] + s[2]).to(torch.bfloat16))
    warps = plan.grid[0] * plan.block[0] // 32
    assert stats.instructions["sync"] == 2 * warps


def test_emu_decode_then_combine_with_pdl(seed, monkeypatch):
    # a decode whose sequences are split over partitions, then the combine (pdl=True), from
    # NaN-poisoned out, lse and split scratch: the result matches the float32 reference; the
    # combine's sync-class instructions are one wait per warp and one trigger per warp that
    # merged a row (warps of unsplit sequences return right after the wait)
    real = MS.split_scratch
    monkeypatch.setattr(MS, "split_scratch", lambda *a: tuple(t.fill_(float("nan")) for t in real(*a)))
    seqlens, s_q, h_q, parts = [260, 40], 1, 64, 4
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts)
    n_splits = ns.diff()
    assert (n_splits > 1).any() and (n_splits == 1).any(), "meant to have split and unsplit sequences"
    out = torch.full((len(seqlens), s_q, h_q, 512), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((len(seqlens), h_q, s_q), float("nan"))
    decode_stats, combine_stats = CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None,
                                                            True, executor="emu")
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="reference")
    assert not out.isnan().any() and not lse.isnan().any()
    assert (lse - ref_lse).abs().max() < 1e-4
    for i in range(len(seqlens)):
        assert calc_diff(out[i], ref[i]) < 1e-5, f"sequence {i}"
    rows = s_q * h_q
    warps = len(seqlens) * -(-rows // CM.COMBINE_ROWS) * 4
    merged = int((n_splits > 1).sum()) * rows
    assert combine_stats.instructions["sync"] == warps + merged
    assert decode_stats.ctas == meta.shape[0] * -(-rows // 64)


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_cuda_decode_then_combine_with_pdl(seed):
    # the same chain on the GPU: decode, then the combine launched with PDL, back to back on
    # one stream from NaN-poisoned outputs
    assert gpu_unavailable_reason() == ""
    seqlens, s_q, h_q, parts = [150, 70, 300], 2, 64, 7
    q, cache, table, sl = make_problem(seqlens, s_q, h_q)
    meta, ns = M.get_mla_metadata(sl, s_q * h_q, 1, parts, backend="reference")
    assert (ns.diff() > 1).any()
    out = torch.full((len(seqlens), s_q, h_q, 512), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((len(seqlens), h_q, s_q), float("nan"))
    dev = [t.cuda() for t in (q, cache, table, sl, meta, ns, out, lse)]
    M.flash_mla_with_kvcache(*dev[:4], 512, dev[4], dev[5], causal=True, backend="cuda", out=dev[6],
                             softmax_lse=dev[7])
    torch.cuda.synchronize()
    device_errors.check_errors()
    ref, ref_lse = M.flash_mla_with_kvcache(q, cache, table, sl, 512, meta, ns, causal=True, backend="reference")
    o, lse_gpu = dev[6].cpu(), dev[7].cpu()
    assert not o.isnan().any() and not lse_gpu.isnan().any()
    assert (lse_gpu - ref_lse).abs().max() < 1e-4
    for i in range(len(seqlens)):
        assert calc_diff(o[i], ref[i]) < 1e-5, f"sequence {i}"


@pytest.mark.gpu
def test_cuda_back_to_back_gemms_with_pdl(seed):
    # launches that read what the launch just before wrote, with no synchronisation between:
    # three float32 accumulations d += A B^T into one d (each GEMM's first read of d must wait
    # for the previous GEMM), the split-K pair the heuristic picks for 64 x 2112 x 7168 on
    # 132 SMs (the reduction reads the first pass's workspace), and a multicast GEMM (the
    # cluster and PDL attributes together); tolerance 1e-3 as the other GPU GEMM tests
    assert gpu_unavailable_reason() == ""
    m, n, k = 1024, 2048, 1024
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m, k))
    b1, sfb1 = R.per_token_cast_to_fp8(torch.randn(n, k))
    c = torch.randn(m, n)
    d = c.cuda()
    for _ in range(3):
        pk.wgrad_gemm_fp8_fp8_fp32_nt((a.cuda(), sfa.cuda()), (b1.cuda(), sfb1.cuda()), d, backend="cuda")
    product = R.fp8_gemm_nt(a, sfa, b1, sfb1, torch.empty(m, n), b_scale_rows=1)
    assert calc_diff(d.cpu(), c + 3 * product) < 1e-3
    m, n, k = 64, 2112, 7168
    _, _, a, sfa, b, sfb = normal_problem(m, n, k)
    out = nan_bf16(m, n).cuda()
    pk.fp8_gemm_nt((a.cuda(), sfa.cuda()), (b.cuda(), sfb.cuda()), out, backend="cuda")
    mc = nan_bf16(m, n).cuda()
    run_cuda(G.gemm_plan(a.cuda(), sfa.cuda(), b.cuda(), sfb.cuda(), mc, None, kind=G.KIND_NORMAL, m=m, n=n, k=k,
                         groups=1, cfg=MULTICAST))
    torch.cuda.synchronize()
    device_errors.check_errors()
    ref = R.fp8_gemm_nt(a, sfa, b, sfb)
    assert not out.isnan().any() and calc_diff(out.cpu(), ref) < 1e-3
    assert not mc.isnan().any() and calc_diff(mc.cpu(), ref) < 1e-3
