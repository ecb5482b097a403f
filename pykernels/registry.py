"""One registry of ops and backends (docs/architecture.md).

Each op builds one problem description (validated once, in its family module under
pykernels/ops/), and each backend is an object with `supports(problem) -> None | reason`
and `run(problem)`. The public API, the torch custom ops, `python -m pykernels` and bench/
all dispatch here. "auto" takes the first backend, in the device's order, that supports
the problem; `explain(op, *args, **kwargs)` says why the others were passed over and, for
kernel backends that describe their launch, which config they would launch and why.
"""
import dataclasses
from typing import Callable, Optional

BACKENDS = ("cuda", "emu", "triton", "reference")
# The order "auto" tries backends in, per tensor device type: the fastest first. On CPU
# the reference (PyTorch) is the fastest; the interpreter and the emulator are for testing.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op. supports(problem) -> None when it can run the
    problem here, else the reason it cannot; run(problem) computes it; describe(problem)
    (optional, kernel backends) -> the lines explain() prints about the launch it would make
    (config and why), computed by the same code the launch uses."""
    name: str
    supports: Callable[[object], Optional[str]]
    run: Callable[[object], object]
    describe: Optional[Callable[[object], list]] = None


class Op:
    """An op: its problem builder (the public call's arguments -> a validated problem)
    and its backends by name."""

    def __init__(self, name: str, build: Callable):
        self.name = name
        self.build = build
        self.backends: dict = {}

    def add(self, backend: Backend) -> None:
        if backend.name not in BACKENDS:
            raise ValueError(f"backend.name: expected one of {BACKENDS}, got {backend.name!r}")
        self.backends[backend.name] = backend

    def reasons(self, problem) -> dict:
        """backend name -> None (supported) or the reason it cannot run `problem`."""
        return {name: b.supports(problem) for name, b in self.backends.items()}

    def select(self, problem, backend: str) -> Backend:
        """The backend that runs `problem`: the one named, or for "auto" the first in the
        device's order that supports it. Raises ValueError naming `backend` otherwise."""
        if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
        if backend == "auto":
            order = AUTO_ORDER.get(problem.device.type, ())
            why = {}
            for name in order:
                if name in self.backends:
                    why[name] = self.backends[name].supports(problem)
                    if why[name] is None:
                        return self.backends[name]
            listing = "; ".join(f"{n}: {r}" for n, r in why.items()) or "none for this device"
            raise ValueError(f"backend: 'auto' found no backend for {self.name} on {problem.device} ({listing})")
        if backend not in self.backends:
            raise ValueError(f"backend: {backend!r} is not available for {self.name}; "
                             f"available: {', '.join(self.backends)}")
        reason = self.backends[backend].supports(problem)
        if reason is not None:
            raise ValueError(f"backend: {backend!r} cannot run this {self.name} call: {reason}")
        return self.backends[backend]

    def __call__(self, problem, backend: str = "auto"):
        return self.select(problem, backend).run(problem)


OPS: dict = {}


def op(name: str, build: Callable) -> Op:
    """Register (once) and return the op `name` with its problem builder."""
    if name in OPS:
        raise ValueError(f"op: {name!r} is registered already")
    OPS[name] = Op(name, build)
    return OPS[name]


def get(name: str) -> Op:
    _load_families()
    if name not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {name!r}")
    return OPS[name]


def _load_families() -> None:
    # Importing a family module registers its ops.
    from .ops import dsa, ep, gemm, mla, quant  # noqa: F401


def explain(op_name: str, *args, backend: str = "auto", **kwargs) -> str:
    """Which backend a call would take and why the others were passed over, and under each
    backend that can run it and describes its launch (Backend.describe: the FP8 / BF16
    GEMM kernels, the MLA decode and the sparse decode), the launch it would make: config,
    stages, grid and, for the GEMMs, the heuristic's modelled costs of the pick and its runners-up.

    op_name: a registered op (e.g. "fp8_gemm_nt"); args/kwargs: the public function's
    arguments (as for pykernels.<op_name>; invalid ones raise the call's error). Returns
    the text (also printed)."""
    o = get(op_name)
    problem = o.build(*args, **kwargs)
    lines = [f"{op_name}: {problem.describe()}"]
    try:
        chosen = o.select(problem, backend).name
    except ValueError as e:
        chosen, lines = None, lines + [f"  no backend: {e}"]
    for name, reason in o.reasons(problem).items():
        mark = "->" if name == chosen else "  "
        lines.append(f"{mark} {name:<10} {'supported' if reason is None else reason}")
        if reason is None and o.backends[name].describe is not None:
            lines.extend(f"     {line}" for line in o.backends[name].describe(problem))
    auto = AUTO_ORDER.get(problem.device.type, ())
    lines.append(f"   (auto tries {', '.join(auto)} on {problem.device.type} tensors)")
    text = "\n".join(lines)
    print(text)
    return text
