"""Executors of launch plans: the GPU through pykernels._C, the CPU through the emulator."""
import functools

import torch

from . import artifacts
from .plan import LaunchPlan, pack_scalar


def _C():
    from .. import _C as C  # built by setup.py
    return C


def gpu_unavailable_reason() -> str:
    """'' when the cuda backend can run here, else why not."""
    try:
        C = _C()
    except ImportError as e:
        return f"pykernels._C is not built ({e})"
    if not C.driver_available():
        return C.driver_error()
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return ""


@functools.lru_cache(maxsize=None)
def _function(module: str, function: str, device: int) -> int:
    C = _C()
    mod = C.load_module(artifacts.cubin_path(module).read_bytes(), device)
    return C.get_function(mod, function)


@functools.lru_cache(maxsize=None)
def _waiting_entries(module: str) -> frozenset:
    """Entry functions of `module` whose PTX issues griddepcontrol.wait (the file is read
    once and not kept: the GPU path needs no PTX otherwise)."""
    found = set()
    for chunk in artifacts.ptx_path(module).read_text().split(".entry ")[1:]:
        if "griddepcontrol.wait" in chunk:
            found.add(chunk[:chunk.index("(")].strip())
    return frozenset(found)


def waits_on_grid(module: str, function: str) -> bool:
    """True when the entry `function` of `module` issues griddepcontrol.wait (its PTX)."""
    return function in _waiting_entries(module)


def check_pdl(plan: LaunchPlan) -> None:
    """A plan launched with PDL must name a kernel that waits on the previous grid: one that
    does not would read (or overwrite) memory the previous kernel is still using."""
    if plan.pdl and not waits_on_grid(plan.module, plan.function):
        raise ValueError(f"{plan.function}: a plan with pdl=True needs a kernel that issues griddepcontrol.wait "
                         f"before touching global memory; {plan.module}.{plan.function} issues none")


def run_cuda(plan: LaunchPlan) -> None:
    """Launch on the current CUDA stream of the plan's tensors' device (asynchronous);
    with programmatic dependent launch when plan.pdl."""
    why = gpu_unavailable_reason()
    if why:
        raise RuntimeError(f"{plan.function}: the 'cuda' backend needs an NVIDIA GPU: {why}")
    check_pdl(plan)
    tensors = plan.tensors()
    device = tensors[0].device if tensors else torch.device("cuda", torch.cuda.current_device())
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{plan.function}: all tensors must be on {device}, got one on {t.device}")
    params = []
    for a in plan.args:
        if a.ptype == "ptr":
            params.append(a.value.data_ptr().to_bytes(8, "little"))
        elif a.ptype == "tensormap":
            params.append(a.value.encode_cuda())
        else:
            params.append(pack_scalar(a))
    fn = _function(plan.module, plan.function, device.index or 0)
    stream = torch.cuda.current_stream(device).cuda_stream
    _C().launch(fn, plan.grid, plan.block, plan.cluster, plan.shared_bytes, stream, params, plan.pdl)


def run_emu(plan: LaunchPlan, **options):
    """Run the plan's kernel (its PTX) on the CPU emulator; returns the emulator's stats.
    Launches run one after another here, so plan.pdl orders nothing (the kernels'
    griddepcontrol instructions are no-ops); it is checked as on the GPU."""
    from .. import emu
    check_pdl(plan)
    for t in plan.tensors():
        if t.device.type != "cpu":
            raise ValueError(f"{plan.function}: the 'emu' backend runs on CPU tensors, got {t.device}")
    args = [a.value for a in plan.args]
    return emu.launch(artifacts.ptx_text(plan.module), plan.function, plan.grid, plan.block, args,
                      shared_mem=plan.shared_bytes, cluster=plan.cluster, **options)


def run_plan(plan: LaunchPlan, executor: str):
    """Run `plan` on the GPU (executor "cuda", returns None) or on the CPU emulator
    ("emu", returns its stats)."""
    if executor == "cuda":
        return run_cuda(plan)
    if executor == "emu":
        return run_emu(plan)
    raise ValueError(f"executor: expected 'cuda' or 'emu', got {executor!r}")


@functools.lru_cache(maxsize=None)
def max_active_clusters(module: str, function: str, device: int, block: tuple, cluster: tuple,
                        shared_bytes: int) -> int:
    """Clusters of `function` the GPU `device` holds at once with this block, cluster
    shape and dynamic shared memory (cuOccupancyMaxActiveClusters): the largest
    persistent clustered grid whose clusters all run together."""
    return _C().max_active_clusters(_function(module, function, device), block, cluster, shared_bytes)
