"""The GEMMs' device-side input checks and edge shapes, on the CPU backends.

m_indices values outside [-1, G) and masked_m values outside [0, m_max] are checked by the
kernels themselves (the cuda kernel csrc/gemm/fp8_gemm.cu run by the emulator, and the
Triton kernels under the interpreter) into the device error record
(pykernels.runtime.device_errors), raised right after the launch on CPU tensors. Each
test poisons the output with NaN: rows the docs say are never written (padding, bad
indices, a whole group with a bad masked_m, rows past masked_m) must keep their exact
poison bits; every other row must match the reference (calc_diff < 1e-3, as in
tests/test_gemm_emu.py). Also: K = 0 gives zeros in the owned rows on every backend, and
M = 0 / N = 0 launch nothing.
"""
import pytest
import torch

from pykernels import reference as R
from pykernels import triton as T
from pykernels.cuda import gemm as G
from pykernels.metrics import calc_diff
from pykernels.runtime import device_errors as D
from pykernels.runtime.executors import run_emu
from pykernels.triton import gemm as TG

from .fp8_cases import nan_bf16, quantized_weights

TOL = 1e-3
F8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def clean_record():
    """Each test starts with an empty CPU record (a failed test may leave one set)."""
    D.record_for("cpu", "test").zero_()
    yield
    D.record_for("cpu", "test").zero_()


def _contiguous(backend, a, sfa, b, sfb, idx, out):
    if backend == "emu":
        return G.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, out, "emu")
    if backend == "triton":
        return T.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, out)
    return R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, out)


def _masked(backend, a, sfa, b, sfb, masked_m, out):
    if backend == "emu":
        return G.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out, "emu", expected_m=a.shape[1])
    if backend == "triton":
        return T.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out)
    return R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, out)


def _normal(backend, a, sfa, b, sfb, out):
    if backend == "emu":
        return G.fp8_gemm_nt(a, sfa, b, sfb, out, "emu")
    if backend == "triton":
        return T.fp8_gemm_nt(a, sfa, b, sfb, out)
    return R.fp8_gemm_nt(a, sfa, b, sfb, out)


def _rows_a(rows, k):
    return R.per_token_cast_to_fp8(torch.randn(rows, k))


def _masked_a(groups, m_max, k):
    a, sfa = _rows_a(groups * m_max, k)
    return a.view(groups, m_max, k), sfa.view(groups, m_max, -1)


def _assert_untouched(out, poison, keep):
    """Rows selected by `keep` hold exactly their poison bits."""
    assert torch.equal(out[keep].view(torch.int16), poison[keep].view(torch.int16)), "a row was written"


def _assert_owned_match(out, ref, own):
    assert not out[own].isnan().any(), "an owned row was left unwritten"
    if own.any():
        assert calc_diff(out[own], ref[own]) < TOL


# ------------------------------------------------------------------------ m_indices

def _bad_indices(groups):
    """m_indices over 3 tiles of 64 rows: valid segments, -1 padding, and bad values (G,
    G + 5, -2) inside tiles that also hold valid rows of several groups."""
    idx = torch.full((150,), -1, dtype=torch.int32)
    idx[0:30] = 0
    idx[30:34] = groups                 # just past the last group
    idx[34:60] = 1
    idx[70:100] = 2
    idx[100:103] = -2
    idx[103:140] = 1
    idx[141] = groups + 5
    return idx


@pytest.mark.parametrize("backend", ["emu", "triton"])
def test_contiguous_bad_indices_recorded_and_rows_untouched(backend, seed):
    groups, n, k = 3, 128, 256
    idx = _bad_indices(groups)
    a, sfa = _rows_a(idx.numel(), k)
    b, sfb = quantized_weights(groups, n, k)
    out = nan_bf16(idx.numel(), n)
    poison = out.clone()
    with pytest.raises(D.KernelInputError, match=r"m_grouped_fp8_gemm_nt_contiguous: m_indices: expected values "
                                                 r"in \[-1, 3\) \(-1 marks padding rows\), got -?\d+ at row \d+") as e:
        _contiguous(backend, a, sfa, b, sfb, idx, out)
    value, bound, row = e.value.args_recorded
    assert bound == groups and idx[row] == value and not -1 <= value < groups      # a real bad row
    assert torch.count_nonzero(D.record_for("cpu", "test")) == 0                 # raised once, cleared
    own = (idx >= 0) & (idx < groups)
    _assert_untouched(out, poison, ~own)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
    _assert_owned_match(out, ref, own)


def test_contiguous_bad_indices_multicast(seed):
    # TMA multicast pairs: each CTA checks its own m-block; a pass for a group present only
    # in the peer's m-block loads B for the peer and writes nothing
    groups, n, k = 3, 256, 128
    idx = torch.cat([torch.full((100,), 0), torch.full((28,), 7), torch.full((60,), 2), torch.full((40,), -1),
                     torch.full((50,), 1)]).int()
    a, sfa = _rows_a(idx.numel(), k)
    b, sfb = quantized_weights(groups, n, k)
    out = nan_bf16(idx.numel(), n)
    poison = out.clone()
    plan = G.gemm_plan(a, sfa, b.reshape(-1, k), sfb, out, idx, kind=G.KIND_CONTIGUOUS, m=idx.numel(), n=n, k=k,
                       groups=groups, cfg=G.Config(128, 128, cluster=2), sms=2)
    run_emu(plan)
    record = G.arg(plan, "record")
    assert record[0] == D.code("MIndexOutOfRange") and record[1] == 7 and record[2] == groups
    assert 100 <= record[3] < 128
    with pytest.raises(D.KernelInputError, match="m_indices: expected values in \\[-1, 3\\)"):
        D.raise_if_set(record, "m_grouped_fp8_gemm_nt_contiguous")
    own = (idx >= 0) & (idx < groups)
    _assert_untouched(out, poison, ~own)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
    _assert_owned_match(out, ref, own)


@pytest.mark.parametrize("backend", ["emu", "triton"])
def test_contiguous_valid_indices_record_nothing(backend, seed):
    # G - 1 and -1 are the edges of the valid range
    groups, n, k = 2, 128, 128
    idx = torch.tensor([1] * 9 + [-1] * 4 + [0] * 20, dtype=torch.int32)
    a, sfa = _rows_a(idx.numel(), k)
    b, sfb = quantized_weights(groups, n, k)
    out = nan_bf16(idx.numel(), n)
    _contiguous(backend, a, sfa, b, sfb, idx, out)
    assert torch.count_nonzero(D.record_for("cpu", "test")) == 0
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
    _assert_untouched(out, nan_bf16(idx.numel(), n), idx < 0)
    _assert_owned_match(out, ref, idx >= 0)


# ------------------------------------------------------------------------ masked_m

@pytest.mark.parametrize("backend", ["emu", "triton"])
def test_masked_bad_values_recorded_and_groups_untouched(backend, seed):
    groups, m_max, n, k = 4, 70, 128, 128
    a, sfa = _masked_a(groups, m_max, k)
    b, sfb = quantized_weights(groups, n, k)
    masked_m = torch.tensor([m_max + 1, 33, -1, m_max], dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    poison = out.clone()
    with pytest.raises(D.KernelInputError, match=r"m_grouped_fp8_gemm_nt_masked: masked_m: expected values in "
                                                 r"\[0, 70\] \(a's rows per group\), got -?\d+ for group [02]") as e:
        _masked(backend, a, sfa, b, sfb, masked_m, out)
    value, bound, group = e.value.args_recorded
    assert bound == m_max and masked_m[group] == value
    rows = torch.arange(m_max)[None, :]
    own = (rows < masked_m[:, None]) & torch.tensor([False, True, False, True])[:, None]
    _assert_untouched(out, poison, ~own)                 # groups 0 and 2 whole, group 1 past row 33
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    _assert_owned_match(out, ref, own)


def test_masked_bad_values_multicast(seed):
    groups, m_max, n, k = 3, 200, 128, 128
    a, sfa = _masked_a(groups, m_max, k)
    b, sfb = quantized_weights(groups, n, k)
    masked_m = torch.tensor([150, 1000, 7], dtype=torch.int32)
    out = nan_bf16(groups, m_max, n)
    poison = out.clone()
    plan = G.gemm_plan(a.reshape(-1, k), sfa, b.reshape(-1, k), sfb, out, masked_m, kind=G.KIND_MASKED, m=m_max,
                       n=n, k=k, groups=groups, cfg=G.Config(128, 128, cluster=2), sms=4)
    run_emu(plan)
    assert G.arg(plan, "record").tolist()[:4] == [D.code("MaskedMOutOfRange"), 1000, m_max, 1]
    G.arg(plan, "record").zero_()
    own = (torch.arange(m_max)[None, :] < masked_m[:, None]) & torch.tensor([True, False, True])[:, None]
    _assert_untouched(out, poison, ~own)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m, nan_bf16(groups, m_max, n))
    _assert_owned_match(out, ref, own)


@pytest.mark.parametrize("backend", ["emu", "triton", "reference"])
def test_masked_m_non_contiguous(backend, seed):
    # masked_m as a strided view (every other element of a larger tensor)
    groups, m_max, n, k = 3, 40, 128, 128
    a, sfa = _masked_a(groups, m_max, k)
    b, sfb = quantized_weights(groups, n, k)
    storage = torch.tensor([40, 99, 0, 99, 17, 99], dtype=torch.int32)
    masked_m = storage[::2]
    assert masked_m.stride() == (2,)
    out = nan_bf16(groups, m_max, n)
    _masked(backend, a, sfa, b, sfb, masked_m, out)
    own = torch.arange(m_max)[None, :] < masked_m[:, None]
    _assert_untouched(out, nan_bf16(groups, m_max, n), ~own)
    ref = R.m_grouped_fp8_gemm_nt_masked(a, sfa, b, sfb, masked_m.contiguous(), nan_bf16(groups, m_max, n))
    _assert_owned_match(out, ref, own)


# ------------------------------------------------------------------------ K = 0, M = 0, N = 0

@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
def test_k_zero_gives_zeros_in_owned_rows(backend):
    n = 128
    out = nan_bf16(6, n)
    _normal(backend, torch.empty(6, 0, dtype=F8), torch.empty(6, 0), torch.empty(n, 0, dtype=F8),
            torch.empty(1, 0), out)
    assert (out == 0).all()
    b, sfb = torch.empty(2, n, 0, dtype=F8), torch.empty(2, 1, 0)
    idx = torch.tensor([0, -1, 1, 1, -1], dtype=torch.int32)
    out = nan_bf16(5, n)
    _contiguous(backend, torch.empty(5, 0, dtype=F8), torch.empty(5, 0), b, sfb, idx, out)
    assert (out[idx >= 0] == 0).all()
    _assert_untouched(out, nan_bf16(5, n), idx < 0)
    masked_m = torch.tensor([2, 0], dtype=torch.int32)
    out = nan_bf16(2, 5, n)
    _masked(backend, torch.empty(2, 5, 0, dtype=F8), torch.empty(2, 5, 0), b, sfb, masked_m, out)
    own = torch.arange(5)[None, :] < masked_m[:, None]
    assert (out[own] == 0).all()
    _assert_untouched(out, nan_bf16(2, 5, n), ~own)


@pytest.mark.parametrize("backend", ["triton", "emu"])
def test_k_zero_still_checks_the_group_values(backend):
    n = 128
    b, sfb = torch.empty(2, n, 0, dtype=F8), torch.empty(2, 1, 0)
    idx = torch.tensor([0, 5, 1, -1], dtype=torch.int32)
    out = nan_bf16(4, n)
    with pytest.raises(D.KernelInputError, match="m_indices: expected values in \\[-1, 2\\).*got 5 at row 1"):
        _contiguous(backend, torch.empty(4, 0, dtype=F8), torch.empty(4, 0), b, sfb, idx, out)
    assert (out[[0, 2]] == 0).all()
    _assert_untouched(out, nan_bf16(4, n), torch.tensor([False, True, False, True]))
    masked_m = torch.tensor([6, 2], dtype=torch.int32)
    out = nan_bf16(2, 5, n)
    with pytest.raises(D.KernelInputError, match="masked_m: expected values in \\[0, 5\\].*got 6 for group 0"):
        _masked(backend, torch.empty(2, 5, 0, dtype=F8), torch.empty(2, 5, 0), b, sfb, masked_m, out)
    assert (out[1, :2] == 0).all()
    _assert_untouched(out, nan_bf16(2, 5, n), (torch.arange(5)[None, :] >= torch.tensor([0, 2])[:, None]))


@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
def test_empty_problems_launch_nothing(backend, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("an empty problem launched a kernel")
    monkeypatch.setattr(G, "_run", no_launch)
    monkeypatch.setattr(TG, "run_launch", no_launch)
    k = 128
    for m, n in ((0, 128), (5, 0), (0, 0)):
        a, sfa = _rows_a(m, k)
        b, sfb = torch.zeros(n, k, dtype=F8), torch.ones((n + 127) // 128, 1)
        out = nan_bf16(m, n)
        assert _normal(backend, a, sfa, b, sfb, out).shape == (m, n)
        out = nan_bf16(m, n)
        _contiguous(backend, a, sfa, b[None], sfb[None], torch.zeros(m, dtype=torch.int32), out)
        assert out.shape == (m, n)
        out = nan_bf16(2, m, n)
        _masked(backend, a[None].expand(2, m, k), sfa[None].expand(2, m, 1), b[None].expand(2, n, k),
                sfb[None].expand(2, *sfb.shape), torch.zeros(2, dtype=torch.int32), out)
    # no group at all
    out = nan_bf16(4, 128)
    _contiguous(backend, *_rows_a(4, k), torch.zeros(0, 128, k, dtype=F8), torch.ones(0, 1, 1),
                torch.full((4,), -1, dtype=torch.int32), out)
    _assert_untouched(out, nan_bf16(4, 128), torch.ones(4, dtype=torch.bool))


def test_triton_launch_args_none_for_empty_grids():
    a, sfa = _rows_a(8, 128)
    record = D.record_for("cpu", "test")
    for rows, n, groups in ((0, 128, 1), (8, 0, 1), (8, 128, 0)):
        b = torch.zeros(n, 128, dtype=F8)
        assert TG.launch_args(TG.LAYOUT_NORMAL, a, sfa, b, torch.ones(1, 1), nan_bf16(8, n), sfa, record,
                              rows, groups) is None


# ------------------------------------------------------------------------ the GPU path reads no record

def test_cuda_executor_never_reads_the_record(monkeypatch):
    # on the GPU the record is left for check_errors(): reading it would synchronise
    launched = []
    monkeypatch.setattr(G, "run_plan", lambda plan, executor: launched.append(executor))

    def no_read(*args):
        raise AssertionError("the record was read after a GPU launch")
    monkeypatch.setattr(D, "raise_if_set", no_read)
    groups, n, k = 2, 128, 128
    idx = torch.tensor([0, 9, 1], dtype=torch.int32)
    a, sfa = _rows_a(3, k)
    b, sfb = quantized_weights(groups, n, k)
    G.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(3, n), "cuda")
    assert launched == ["cuda"]


# ------------------------------------------------------------------------ on a GPU

@pytest.mark.gpu
def test_cuda_records_without_a_host_read_and_inside_a_cuda_graph(seed):
    # the call returns without raising (no synchronisation); check_errors() raises later
    dev = torch.device("cuda", torch.cuda.current_device())
    D.record_for(dev, "test").zero_()
    groups, n, k = 3, 256, 256
    idx = _bad_indices(groups)
    a, sfa = _rows_a(idx.numel(), k)
    b, sfb = quantized_weights(groups, n, k)
    out = nan_bf16(idx.numel(), n).to(dev)
    G.m_grouped_fp8_gemm_nt_contiguous(a.to(dev), sfa.to(dev), b.to(dev), sfb.to(dev), idx.to(dev), out, "cuda")
    with pytest.raises(D.KernelInputError, match="m_grouped_fp8_gemm_nt_contiguous: m_indices: expected values"):
        D.check_errors(dev)
    own = (idx >= 0) & (idx < groups)
    _assert_untouched(out.cpu(), nan_bf16(idx.numel(), n), ~own)
    ref = R.m_grouped_fp8_gemm_nt_contiguous(a, sfa, b, sfb, idx, nan_bf16(idx.numel(), n))
    _assert_owned_match(out.cpu(), ref, own)

    # masked, captured in a CUDA graph with valid values, replayed after masked_m turned bad
    m_max = 96
    a3, sfa3 = _masked_a(groups, m_max, k)
    args = [t.to(dev) for t in (a3, sfa3, b, sfb)]
    masked_m = torch.tensor([96, 40, 5], dtype=torch.int32, device=dev)
    out3 = nan_bf16(groups, m_max, n).to(dev)
    G.m_grouped_fp8_gemm_nt_masked(*args, masked_m, out3, "cuda", expected_m=64)      # warm-up (module load)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G.m_grouped_fp8_gemm_nt_masked(*args, masked_m, out3, "cuda", expected_m=64)
    masked_m.copy_(torch.tensor([96, 97, 5], dtype=torch.int32))
    out3.fill_(float("nan"))
    graph.replay()
    with pytest.raises(D.KernelInputError, match="masked_m: expected values in \\[0, 96\\].*got 97 for group 1"):
        D.check_errors(dev)
    bad = masked_m.cpu()
    own3 = (torch.arange(m_max)[None, :] < bad[:, None]) & torch.tensor([True, False, True])[:, None]
    _assert_untouched(out3.cpu(), nan_bf16(groups, m_max, n), ~own3)
    ref3 = R.m_grouped_fp8_gemm_nt_masked(a3, sfa3, b, sfb, bad, nan_bf16(groups, m_max, n))
    _assert_owned_match(out3.cpu(), ref3, own3)
