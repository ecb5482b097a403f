"""Backend factories shared by the op families: what each kind of backend needs to run,
as a reason string (None when it can run)."""
from typing import Callable, Optional

from ..registry import Backend


def _cuda_unavailable(device) -> Optional[str]:
    if device.type != "cuda":
        return (f"runs on GPU tensors, got {device.type} tensors "
                "(backend='emu' runs the same kernel on CPU tensors)")
    from ..runtime.executors import gpu_unavailable_reason
    return gpu_unavailable_reason() or None


def _emu_unavailable(device, module: str) -> Optional[str]:
    if device.type != "cpu":
        return f"the emulator runs on CPU tensors, got {device.type} tensors"
    from ..runtime import artifacts
    try:
        artifacts.ptx_path(module)
    except (RuntimeError, KeyError) as e:
        return f"kernel {module!r} is not built ({e})"
    return None


def _triton_unavailable(device) -> Optional[str]:
    try:
        from .. import triton
    except ImportError as e:
        return str(e)
    return triton.unavailable_reason(device)


def _limits(check: Optional[Callable], problem) -> Optional[str]:
    """A kernel's own shape/layout limits: check(problem) raises ValueError/TypeError."""
    if check is None:
        return None
    try:
        check(problem)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _no_data(device) -> Optional[str]:
    # meta tensors hold no data: a backend that runs reads values (seqlens, indices) and
    # writes outputs (torch.ops.pykernels.* on meta tensors give the outputs' shapes)
    if device.type == "meta":
        return "runs on tensors with data, got meta tensors"
    return None


def reference(run: Callable) -> Backend:
    return Backend("reference", lambda p: _no_data(p.device), run)


def triton(run: Callable, limits: Callable = None) -> Backend:
    return Backend("triton", lambda p: _no_data(p.device) or _triton_unavailable(p.device) or _limits(limits, p), run)


def kernel(name: str, module: str, run: Callable, limits: Callable = None, describe: Callable = None) -> Backend:
    """The hand-written kernel `module` on the GPU (name "cuda") or on the emulator ("emu");
    run(problem, executor); describe(problem) -> lines: the launch it would make and why
    (pykernels.explain; Backend.describe)."""
    if name == "cuda":
        def supports(p):
            return _cuda_unavailable(p.device) or _limits(limits, p)
    elif name == "emu":
        def supports(p):
            return _emu_unavailable(p.device, module) or _limits(limits, p)
    else:
        raise ValueError(f"name: expected 'cuda' or 'emu', got {name!r}")
    return Backend(name, supports, lambda p: run(p, name), describe)
