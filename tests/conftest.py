import os

import pytest

# Where there is no CUDA device the suite runs Triton through its interpreter process-wide
# (the tests' own @triton.jit kernels too, e.g. tests/test_mla_checks.py), set before
# anything imports triton: a user's choice, which pykernels leaves alone. pykernels' kernels
# need no such setting (tests/test_triton_import_order.py, in child processes); a test file
# without kernels of its own can run that way with TRITON_INTERPRET=0.
def _select_triton_mode():
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_select_triton_mode()
import pykernels  # noqa: F401,E402


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    except Exception:
        return False


HAS_GPU = _has_gpu()

# The emulator's memory-ordering checker (docs/emulator.md) is on for the whole suite.
# Tests that run a kernel broken on purpose (to show what the emulator does with it) keep
# it on but collect its reports instead of raising: node id prefix -> why.
os.environ.setdefault("PK_EMU_ORDERING", "raise")
ORDERING_COLLECT = {
    "tests/emu/test_executor.py::test_warpgroup_schedules_expose_a_missing_barrier":
        "runs a kernel without its hand-off bar.sync",
    "tests/emu/test_hopper_async.py::test_tma_destination_read_before_the_wait_is_not_yet_written":
        "reads a TMA destination before its mbarrier wait",
    "tests/emu/test_matrix_cp_async.py::test_cp_async_groups_zero_fill_and_wait_group":
        "reads cp.async destinations before their wait_group",
    "tests/emu/test_matrix_cp_async.py::test_cp_async_uncommitted_copies_wait_for_wait_all":
        "reads cp.async destinations before their wait",
    "tests/emu/test_matrix_cp_async.py::test_cp_async_bad_source_is_reported_at_its_line_unless_src_size_is_zero":
        "reads cp.async destinations before their wait",
    "tests/test_gemm_emu.py::test_multicast_protocol_holds_when_one_cta_runs_ahead":
        "runs the multicast GEMM without its remote stage releases",
}


@pytest.fixture(autouse=True)
def _ordering_reports_collected(request):
    if not any(request.node.nodeid.startswith(k) for k in ORDERING_COLLECT):
        yield
        return
    from pykernels.emu import ordering
    with ordering.checking("collect"):
        yield


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA Hopper (sm_90) GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """Fresh random inputs per run, but reproducible from the printed seed on failure."""
    import torch
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """The MLA split scratch starts as NaN: the combine must read only what the decode wrote."""
    import pykernels.mla_schedule as MS

    def nan_scratch(*args):
        return tuple(t.fill_(float("nan")) for t in real(*args))
    real = MS.split_scratch
    monkeypatch.setattr(MS, "split_scratch", nan_scratch)


@pytest.fixture
def single_rank_group():
    """A one-rank gloo default process group (the EP Buffer's validation tests), torn down after."""
    import tempfile

    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


@pytest.fixture
def single_rank_buffer(single_rank_group):
    """An ep.Buffer (backend "gloo") over single_rank_group."""
    from pykernels.ep import Buffer
    return Buffer(None, backend="gloo")
