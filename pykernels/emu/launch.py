"""Launch a PTX kernel on the emulator: argument packing, memory set-up, CTA grouping."""
import functools
import itertools
import struct

import numpy as np
import torch

from .errors import Deadlock, EmuError
from .machine import MAX_STEPS, Machine
from .memory import GlobalMemory
from .parser import parse
from .stats import Stats

_PACK = {"u8": "<B", "s8": "<b", "b8": "<B", "u16": "<H", "s16": "<h", "b16": "<H", "u32": "<I",
         "s32": "<i", "b32": "<I", "u64": "<Q", "s64": "<q", "b64": "<Q", "f32": "<f", "f64": "<d"}


@functools.lru_cache(maxsize=32)
def parse_cached(ptx: str):
    return parse(ptx)


def _dim3(v, name):
    v = tuple(v) if isinstance(v, (tuple, list)) else (int(v),)
    v = v + (1,) * (3 - len(v))
    if len(v) != 3 or any(int(x) < 1 for x in v):
        raise ValueError(f"{name}: expected 1 to 3 positive sizes, got {v}")
    return tuple(int(x) for x in v)


class Launch:
    """Everything shared by the CTAs of one launch."""

    def __init__(self, module, kernel, grid, block, cluster, args, shared_mem, gmem, max_steps):
        self.module, self.kernel = module, kernel
        self.grid, self.block, self.cluster = grid, block, cluster
        self.gmem = gmem
        self.stats = Stats()
        self.max_steps = max_steps
        self.schedule = "lockstep"        # see launch(); set by _prepare
        self.dynamic_shared = int(shared_mem)
        self.param_offsets = {p.name: p.offset for p in kernel.params}
        self.param_buffer = self._pack(args)
        # shared layout: static variables (module and kernel scope), then dynamic
        off, self.shared_vars = 0, {}
        svars = [v for v in module.variables + kernel.locals if v.space == "shared"]
        for v in [v for v in svars if not v.extern]:
            off = (off + v.align - 1) // v.align * v.align
            self.shared_vars[v.name] = off
            off += v.size
        if self.dynamic_shared or any(v.extern for v in svars):
            off = (off + 1023) // 1024 * 1024   # dynamic shared starts 1024-aligned (TMA swizzles)
        for v in [v for v in svars if v.extern]:
            self.shared_vars[v.name] = off
        self.shared_size = off + self.dynamic_shared
        if self.shared_size > 227 * 1024:
            raise EmuError(f"{kernel.name}: {self.shared_size} bytes of shared memory per CTA exceed "
                           "Hopper's 227 KB")
        self.local_size = sum(v.size for v in kernel.locals if v.space == "local")
        self.global_vars, self._keep = {}, []
        for v in module.variables:
            if v.space in ("global", "const"):
                buf = np.zeros(max(v.size, 1), dtype=np.uint8)
                buf[: len(v.init)] = np.frombuffer(v.init, dtype=np.uint8)
                self._keep.append(buf)
                gmem.register(buf.ctypes.data, buf.nbytes)
                self.global_vars[v.name] = buf.ctypes.data

    def _pack(self, args):
        params = self.kernel.params
        if len(args) != len(params):
            raise ValueError(f"args: kernel {self.kernel.name} takes {len(params)} parameters "
                             f"({', '.join(p.name for p in params)}), got {len(args)}")
        buf = bytearray(self.kernel.param_bytes)
        for p, a in zip(params, args):
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise ValueError(f"args: parameter {p.name}: the emulator takes CPU tensors, got {a.device}")
                if p.size != 8:
                    raise ValueError(f"args: parameter {p.name} is .{p.ptype}, not a 64-bit pointer")
                self.gmem.register_tensor(a, f"argument {p.name}")
                raw = struct.pack("<Q", a.data_ptr())
            elif hasattr(a, "emu_image"):                    # tensor maps
                raw = a.emu_image(self.gmem, f"tensor map {p.name}")
                if len(raw) != p.size:
                    raise ValueError(f"args: parameter {p.name} holds {p.size} bytes, the tensor map {len(raw)}")
            elif isinstance(a, (bytes, bytearray)):
                raw = bytes(a)
                if len(raw) != p.size:
                    raise ValueError(f"args: parameter {p.name} holds {p.size} bytes, got {len(raw)}")
            elif isinstance(a, (bool, int, np.integer)):
                if p.ptype.startswith("f"):
                    raw = struct.pack(_PACK[p.ptype], float(a))
                else:
                    bits = 8 * p.size
                    v = int(a)
                    if not -(1 << (bits - 1)) <= v < (1 << bits):
                        raise ValueError(f"args: parameter {p.name} (.{p.ptype}) cannot hold {v}")
                    raw = (v & ((1 << bits) - 1)).to_bytes(p.size, "little")
            elif isinstance(a, (float, np.floating)):
                if not p.ptype.startswith("f"):
                    raise ValueError(f"args: parameter {p.name} is .{p.ptype}, got a float {a}")
                raw = struct.pack(_PACK[p.ptype], float(a))
            else:
                raise TypeError(f"args: parameter {p.name}: unsupported argument type {type(a).__name__}")
            buf[p.offset:p.offset + p.size] = raw
        return np.frombuffer(bytes(buf), dtype=np.uint8).copy() if buf else np.zeros(1, dtype=np.uint8)

    def cta_groups(self, co_resident: bool):
        """CTAs run together: a cluster at a time, or the whole grid when asked."""
        gx, gy, gz = self.grid
        cx, cy, cz = self.cluster
        if gx % cx or gy % cy or gz % cz:
            raise ValueError(f"grid {self.grid} is not a multiple of the cluster {self.cluster}")
        groups = []
        for kz, ky, kx in itertools.product(range(gz // cz), range(gy // cy), range(gx // cx)):
            groups.append([(kx * cx + x, ky * cy + y, kz * cz + z)
                           for z, y, x in itertools.product(range(cz), range(cy), range(cx))])
        if co_resident:
            return [[c for g in groups for c in g]]
        return groups


SCHEDULES = ("lockstep", "cta_first", "cta_last", "wg_first", "wg_last")


def _prepare(ptx, kernel, grid, block, args, shared_mem, cluster, gmem, max_steps, schedule="lockstep"):
    module = parse_cached(ptx) if isinstance(ptx, str) else ptx
    k = module.kernel(kernel)
    grid, block, cluster = _dim3(grid, "grid"), _dim3(block, "block"), _dim3(cluster, "cluster")
    if np.prod(block) > 1024:
        raise ValueError(f"block: at most 1024 threads per CTA, got {block}")
    if np.prod(cluster) > 16:
        raise ValueError(f"cluster: at most 16 CTAs, got {cluster}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    L = Launch(module, k, grid, block, cluster, list(args), shared_mem, gmem, max_steps)
    L.schedule = schedule
    return L


def launch(ptx, kernel, grid, block, args, shared_mem=0, cluster=(1, 1, 1), *, co_resident=False,
           gmem=None, max_steps=MAX_STEPS, schedule="lockstep", trace=None):
    """Run `kernel` of the PTX module text `ptx` over CPU tensors; returns Stats.

    grid, block, cluster: 1-3 sizes; args: CPU tensors (passed as pointers), Python
    ints/floats (typed by the kernel's parameter list), tensor maps or raw bytes.
    co_resident=True keeps every CTA of the grid resident at once (persistent kernels,
    CTAs that wait on each other); otherwise CTAs run a cluster at a time.
    schedule: how the resident CTAs interleave. "lockstep" (default) runs the smallest
    (epoch, PC) across all of them, so the CTAs of a cluster advance together;
    "cta_first" / "cta_last" let the lowest / highest CTA (in the group's order) run
    whenever it can and the others only while it is blocked: one CTA races ahead of its
    peers as far as its synchronisation allows, which exposes cross-CTA races (a
    multicast into a peer's stage that the peer has not released) that lockstep hides.
    "wg_first" / "wg_last" do the same per warpgroup (128 threads), so one warpgroup of a
    CTA runs ahead of the others: races between producer and math warpgroups, or between
    math warpgroups sharing shared-memory tiles.
    trace: an observer with `attach(machine)`, called for each Machine before it runs
    (pykernels.perf records the executed instruction stream through it for its timing model).
    """
    L = _prepare(ptx, kernel, grid, block, args, shared_mem, cluster, gmem or GlobalMemory(), max_steps,
                 schedule)
    for ctas in L.cta_groups(co_resident):
        machine = Machine(L, ctas)
        if trace is not None:
            trace.attach(machine)
        machine.run()
        L.stats.ctas += len(ctas)
    return L.stats


def launch_many(launches, *, quantum=512, max_steps=MAX_STEPS):
    """Run several launches at the same time, as kernels on several devices would run.

    launches: list of dicts with the keyword arguments of `launch` (ptx, kernel, grid,
    block, args, and optionally shared_mem, cluster). Every CTA of every launch is
    resident; the launches advance `quantum` scheduler steps in turn, so a kernel that
    spins on a flag another device writes sees it. All launches share one global memory
    (real CPU addresses), so a pointer to another launch's tensor works as a CUDA IPC
    mapping does. Returns one Stats per launch.
    """
    gmem = GlobalMemory()
    runs = []
    for spec in launches:
        spec = dict(spec)
        L = _prepare(spec.pop("ptx"), spec.pop("kernel"), spec.pop("grid"), spec.pop("block"), spec.pop("args"),
                     spec.pop("shared_mem", 0), spec.pop("cluster", (1, 1, 1)), gmem, max_steps)
        if spec:
            raise ValueError(f"launches: unknown keys {sorted(spec)}")
        runs.append((L, Machine(L, L.cta_groups(co_resident=True)[0])))
        L.stats.ctas = runs[-1][1].ncta
    for _, machine in runs:
        machine.livelock_returns = True    # a spinning launch may wait for another one
    live = list(runs)
    while live:
        status = [(L, machine, machine.run(budget=quantum)) for L, machine in live]
        live = [(L, machine) for L, machine, st in status if st != "done"]
        if all(st == "spinning" for _, _, st in status):      # none moved on (or finished) this round
            lines = [f"launch {runs.index((L, m))} ({L.kernel.name}):\n" + "\n".join(m.deadlock_lines(livelock=True))
                     for L, m in live]
            raise Deadlock("launch_many: deadlock: every runnable thread of every launch spins in a loop that "
                           "makes no progress (livelock)\n" + "\n".join(lines))
    return [L.stats for L, _ in runs]
