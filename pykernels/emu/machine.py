"""The executor: the threads of one or more CTAs run together, numpy-vectorised.

Scheduling: each thread has a PC and an epoch (incremented on every backward branch it
takes). Each step runs the instruction at the smallest (epoch, PC) among runnable
threads, for all runnable threads sitting there, across warps and CTAs (or, with the
launch's schedule "cta_first" / "cta_last" / "wg_first" / "wg_last", among the runnable
threads of the CTA or warpgroup of highest priority only). Threads of a
warp that diverge reconverge where they meet again; a thread spinning on a wait loop
raises its epoch and so lets lagging threads (producers) run first. Blocking
instructions (bar.sync, a failed mbarrier wait) park threads until they can go on; if
every live thread is parked the launch is a deadlock, reported warp by warp.
"""
import numpy as np

from .convergence import Convergence, sync_spec
from .errors import Deadlock, EmuError, MemoryFault, UnsupportedInstruction
from .ordering import checker_for
from .memory import (CLUSTER_RANK_SHIFT, LOCAL_WINDOW, PARAM_WINDOW, SHARED_WINDOW, WINDOW_SPAN,
                     SharedMemory)
from .parser import type_size
from .progress import GLOBAL, QUIET_YIELD, SHARED, Progress

NP = {"b8": np.uint8, "u8": np.uint8, "s8": np.int8, "b16": np.uint16, "u16": np.uint16,
      "s16": np.int16, "f16": np.uint16, "bf16": np.uint16, "e4m3x2": np.uint16, "e5m2x2": np.uint16,
      "b32": np.uint32, "u32": np.uint32, "s32": np.int32, "f32": np.float32, "f16x2": np.uint32,
      "bf16x2": np.uint32, "u16x2": np.uint32, "s16x2": np.uint32, "tf32": np.uint32,
      "b64": np.uint64, "u64": np.uint64, "s64": np.int64, "f64": np.float64, "pred": np.bool_}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
RUNNABLE, BLOCKED, DONE = 0, 1, 2
MAX_STEPS = 50_000_000
ASYNC_LATENCY = 2000    # scheduler steps after which a queued asynchronous copy lands
LIVELOCK_CHECK = 1024   # scheduler steps between checks for quiet spin-waits (progress.py)


def _distinct_sorted(v):
    """Distinct values of a sorted array (thread indices ascend, so their warps do): O(n),
    unlike np.unique's sort, for the per-step warp count."""
    return int(len(v) > 0) + int(np.count_nonzero(v[1:] != v[:-1]))


class Machine:
    """Threads of `ctas` (list of (x, y, z) CTA ids, grouped by cluster) of one launch."""

    def __init__(self, launch, ctas):
        from .ops import HANDLERS
        self.handlers = HANDLERS
        self.L = launch
        self.kernel = launch.kernel
        bx, by, bz = launch.block
        self.nthreads = bx * by * bz
        self.ncta = len(ctas)
        T = self.T = self.ncta * self.nthreads
        lin = np.tile(np.arange(self.nthreads), self.ncta)
        self.cta = np.repeat(np.arange(self.ncta), self.nthreads)
        self.tid = np.stack([lin % bx, (lin // bx) % by, lin // (bx * by)], axis=1).astype(np.uint32)
        self.ctaid = np.asarray(ctas, dtype=np.uint32)[self.cta]
        self.lane = (lin % 32).astype(np.uint32)
        self.warp = self.cta * ((self.nthreads + 31) // 32) + lin // 32
        self.lin = lin
        csize = int(np.prod(launch.cluster))
        self.cluster_rank = (self.cta % csize).astype(np.uint32)
        self.cluster_base = self.cta - self.cluster_rank
        self.pc = np.zeros(T, dtype=np.int64)
        self.epoch = np.zeros(T, dtype=np.int64)
        self.state = np.zeros(T, dtype=np.int8)
        self.waiting = {}                # (warp, pc) -> description of what its parked threads wait for
        self.regs = {}
        self.rsize = {}
        for name, rtype in self.kernel.registers.items():
            self.rsize[name] = 0 if rtype == "pred" else type_size(rtype)
            self.regs[name] = np.zeros(T, dtype=np.bool_ if rtype == "pred" else UINT[type_size(rtype)])
        self.shared = SharedMemory(self.ncta, launch.shared_size)
        self.local = np.zeros((T, max(1, launch.local_size)), dtype=np.uint8)
        self.barriers = {}               # (cta, id) -> arrived thread indices
        self.state_version = 0           # bumped by anything that may unblock a waiter
        self.ext = {}                    # per-launch state of instruction families (mbarrier, wgmma ...)
        self.guard = {}                  # register -> threads that may not touch it (pending wgmma)
        self.async_ops = []              # issued asynchronous copies not yet performed (TMA, bulk)
        self.steps = 0
        self.instr = None
        # CTA priority (schedule "cta_first" / "cta_last"): rank of each thread's CTA
        # or of each thread's warpgroup (schedule "wg_first" / "wg_last", across CTAs too)
        schedule = getattr(launch, "schedule", "lockstep")
        unit = {"cta": self.cta, "wg": self.cta * ((self.nthreads + 127) // 128) + lin // 128}
        kind, _, order = schedule.partition("_")
        self.cta_rank = None if schedule == "lockstep" else (unit[kind] if order == "first" else -unit[kind])
        self.conv = Convergence(self)    # .sync / .aligned warp collectives
        self.progress = Progress(self)   # quiet spin-waits (livelocks)
        self.livelock_returns = False    # launch_many: return "spinning" instead of raising
        self.order = checker_for(self)   # memory-ordering checker (ordering/), None when off

    def progress_version(self):
        """Changes whenever anything a waiting thread may observe changes (this launch's
        state, or global memory written by any launch sharing it)."""
        return self.state_version + self.L.gmem.version

    # ---------------------------------------------------------------- locations
    def where(self, idx=None):
        """Formatter for error messages: kernel, PTX line, CTA and thread of idx[j]."""
        ins = self.instr

        def fmt(j=0):
            loc = f"{self.kernel.name}, PTX line {ins.line if ins else '?'} ({ins.text if ins else ''})"
            if idx is not None and len(idx):
                t = int(idx[min(j, len(idx) - 1)])
                loc += f", CTA {tuple(int(v) for v in self.ctaid[t])}, thread {tuple(int(v) for v in self.tid[t])}"
            return loc
        return fmt

    def fail(self, cls, msg, idx=None):
        raise cls(f"{self.where(idx)()}: {msg}")

    # ---------------------------------------------------------------- operands
    def read(self, op, t, idx):
        """Values of operand `op` read as PTX type `t` for threads idx (numpy array)."""
        k = op.kind
        n = len(idx)
        if k == "reg":
            if self.guard and op.value in self.guard:
                self._check_guard(op.value, idx, "reads")
            raw = self.regs[op.value][idx]
            if raw.dtype == np.bool_:
                v = raw if t == "pred" else raw.astype(NP[t])
            else:
                w = type_size(t) if t != "pred" else 0
                if t == "pred":
                    v = raw != 0
                else:
                    if raw.dtype.itemsize != w:
                        raw = raw.astype(UINT[w])
                    v = raw.view(NP[t])
            return ~v if op.neg else v
        if k == "imm":
            if t == "pred":
                return np.full(n, bool(op.value))
            if t in ("f32", "f64"):
                return np.full(n, float(op.value), dtype=NP[t])
            w = type_size(t)
            return np.full(n, op.value & ((1 << (8 * w)) - 1), dtype=UINT[w]).view(NP[t])
        if k == "fimm":
            bits, width = op.value
            f = np.array([bits], dtype=UINT[width // 8]).view(np.float32 if width == 32 else np.float64)
            if t in ("f32", "f64"):
                return np.full(n, f[0], dtype=NP[t])
            w = type_size(t)
            if w * 8 == width:
                return np.full(n, bits, dtype=UINT[w]).view(NP[t])
            return np.full(n, f[0]).astype(np.float32 if w == 4 else np.float64).view(NP[t])
        if k == "special":
            return self._special(op.value, idx).astype(NP[t] if t != "pred" else np.uint32)
        if k == "sym":
            return np.full(n, self.symbol_address(op.value, idx), dtype=np.uint64).astype(NP[t])
        if k == "vec":
            return [self.read(o, t, idx) for o in op.value]
        self.fail(EmuError, f"cannot read operand {op!r} as .{t}", idx)

    def write(self, op, value, t, idx):
        if op.kind == "sink":
            return
        if op.kind != "reg":
            self.fail(EmuError, f"destination {op!r} is not a register", idx)
        if self.guard and op.value in self.guard:
            self._check_guard(op.value, idx, "writes")
        reg = self.regs[op.value]
        if reg.dtype == np.bool_:
            reg[idx] = np.asarray(value).astype(np.bool_)
            return
        W = reg.dtype.itemsize
        v = np.asarray(value)
        if v.dtype == np.bool_:
            v = v.astype(UINT[W])
        elif v.dtype != NP[t]:
            v = v.astype(NP[t])
        if v.dtype.itemsize != W:
            if t.startswith("s"):
                v = v.astype(SINT[W]).view(UINT[W])
            else:
                v = v.view(UINT[v.dtype.itemsize]).astype(UINT[W])
        else:
            v = v.view(UINT[W])
        reg[idx] = v

    def _guard_true(self, ins, idx):
        """bool per thread of idx: the instruction's guard predicate holds."""
        g = self.regs[ins.guard[0]][idx]
        g = g.astype(bool) if g.dtype != np.bool_ else g
        return ~g if ins.guard[1] else g

    def _check_guard(self, name, idx, what):
        hit = self.guard[name][idx]
        if hit.any():
            if self.order and self.order.accumulator(name, idx[hit], what):
                return
            self.fail(EmuError, f"{what} {name}, a register of a wgmma.mma_async that is still in flight: "
                                "wait with wgmma.wait_group first", idx[hit])

    def _special(self, name, idx):
        axis = {"x": 0, "y": 1, "z": 2}
        base, _, comp = name[1:].partition(".")
        L = self.L
        if base == "tid":
            return self.tid[idx, axis[comp]]
        if base == "ntid":
            return np.full(len(idx), L.block[axis[comp]])
        if base == "ctaid":
            return self.ctaid[idx, axis[comp]]
        if base == "nctaid":
            return np.full(len(idx), L.grid[axis[comp]])
        if base == "laneid":
            return self.lane[idx]
        if base == "warpid":
            return (self.lin[idx] // 32)
        if base == "nwarpid":
            return np.full(len(idx), (self.nthreads + 31) // 32)
        if base == "cluster_ctarank":
            return self.cluster_rank[idx]
        if base == "cluster_nctarank":
            return np.full(len(idx), int(np.prod(L.cluster)))
        if base == "cluster_ctaid":
            c = self.ctaid[idx, axis[comp]]
            return c % L.cluster[axis[comp]]
        if base == "cluster_nctaid":
            return np.full(len(idx), L.cluster[axis[comp]])
        if base == "clusterid":
            return self.ctaid[idx, axis[comp]] // L.cluster[axis[comp]]
        if base == "nclusterid":
            return np.full(len(idx), L.grid[axis[comp]] // L.cluster[axis[comp]])
        if base == "is_explicit_cluster":
            return np.full(len(idx), int(np.prod(L.cluster)) > 1)
        if base.startswith("lanemask_"):
            lane = self.lane[idx].astype(np.uint64)
            one = np.uint64(1) << lane
            full = np.uint64(0xFFFFFFFF)
            below, upto = one - np.uint64(1), (one << np.uint64(1)) - np.uint64(1)
            r = {"lanemask_eq": one, "lanemask_lt": below, "lanemask_le": upto,
                 "lanemask_gt": full & ~upto, "lanemask_ge": full & ~below}[base]
            return r & full
        if base in ("smid", "gridid"):
            return np.zeros(len(idx), dtype=np.uint32)
        if base == "nsmid":
            return np.full(len(idx), 132)
        if base in ("clock", "clock64", "globaltimer"):
            return np.full(len(idx), self.L.stats.instructions_total)
        if base in ("dynamic_smem_size",):
            return np.full(len(idx), L.dynamic_shared)
        if base in ("total_smem_size",):
            return np.full(len(idx), L.shared_size)
        self.fail(UnsupportedInstruction, f"special register {name} is not supported", idx)

    def symbol_address(self, name, idx=None):
        """Address a symbol stands for: shared variables and kernel parameters give their
        address in their own space (cvta makes them generic), globals their global one."""
        L = self.L
        if name in L.shared_vars:
            return L.shared_vars[name]
        if name in L.param_offsets:
            return L.param_offsets[name]
        if name in L.global_vars:
            return L.global_vars[name]
        self.fail(EmuError, f"unknown symbol {name!r}", idx)

    # ---------------------------------------------------------------- memory
    def address(self, op, idx, space):
        """Per-thread address of memory operand op ([reg+off], [sym+off], [imm])."""
        base, off = op.value
        if base is None:
            return np.full(len(idx), off, dtype=np.uint64)
        if base.kind == "sym":
            name = base.value
            if space == "param" and name in self.L.param_offsets:
                return np.full(len(idx), self.L.param_offsets[name] + off, dtype=np.uint64)
            if space.startswith("shared") and name in self.L.shared_vars:
                return np.full(len(idx), self.L.shared_vars[name] + off, dtype=np.uint64)
            a = self.symbol_address(name, idx)
            if space == "" and name in self.L.shared_vars:
                a += SHARED_WINDOW
            return np.full(len(idx), a + off, dtype=np.uint64)
        t = "u64" if self.rsize.get(base.value, 8) == 8 else "u32"
        a = self.read(base, t, idx).astype(np.uint64)
        return a + np.uint64(off & 0xFFFFFFFFFFFFFFFF)

    def _shared_index(self, addr, idx, size, cluster):
        addr = addr.astype(np.int64)
        cta = self.cta[idx]
        if cluster:
            rank = addr >> CLUSTER_RANK_SHIFT
            remote = rank > 0
            if remote.any():
                csize = int(np.prod(self.L.cluster))
                if (rank[remote] - 1 >= csize).any():
                    self.fail(MemoryFault, "shared::cluster address names a CTA outside the cluster", idx)
                cta = np.where(remote, self.cluster_base[idx] + rank - 1, cta)
                addr = addr & ((1 << CLUSTER_RANK_SHIFT) - 1)
        return self.shared.flat_index(addr, cta, size, self.where(idx))

    def load(self, space, addr, dtype, idx, span=None):
        """Typed load for threads idx from `space` ('' = generic). span: bytes of the whole
        (vector) access for the bank-conflict model (None: this element; 0: not counted)."""
        size = np.dtype(dtype).itemsize
        st = self.L.stats
        if space in ("global", "const"):
            st.global_read += size * len(idx)
            self.progress.poll(idx, addr, GLOBAL)
            return self.L.gmem.load(addr, dtype, self.where(idx))
        if space.startswith("shared"):
            flat = self._shared_index(addr, idx, size, space == "shared::cluster")
            if self.order:
                self.order.shared_access(flat, size, idx, False)
            if span != 0:
                st.count_shared(flat, self.warp[idx], span or size, self.lane[idx])
            self.progress.poll(idx, flat, SHARED)
            return self.shared.view(dtype)[flat // size]
        if space == "param":
            return self._param_load(addr, dtype, idx)
        if space == "local":
            return self._local(addr, dtype, idx)
        if space == "":
            return self._generic(addr, idx, lambda sp, a, sel: self.load(sp, a, dtype, idx[sel], span), dtype)
        self.fail(UnsupportedInstruction, f"loads from .{space} are not supported", idx)

    def store(self, space, addr, values, dtype, idx, span=None):
        size = np.dtype(dtype).itemsize
        values = np.asarray(values)
        if values.dtype != dtype:
            reinterpret = values.dtype.itemsize == np.dtype(dtype).itemsize and values.dtype != np.bool_
            values = values.view(dtype) if reinterpret else values.astype(dtype)
        self.state_version += 1
        st = self.L.stats
        if space == "global":
            st.global_written += size * len(idx)
            return self.L.gmem.store(addr, values, dtype, self.where(idx))
        if space.startswith("shared"):
            flat = self._shared_index(addr, idx, size, space == "shared::cluster")
            if self.order:
                self.order.shared_access(flat, size, idx, True)
            if span != 0:
                st.count_shared(flat, self.warp[idx], span or size, self.lane[idx])
            self.shared.view(dtype)[flat // size] = values
            return
        if space == "local":
            return self._local(addr, dtype, idx, values)
        if space == "":
            return self._generic(addr, idx, lambda sp, a, sel: self.store(sp, a, values[sel], dtype, idx[sel], span),
                                 dtype)
        self.fail(UnsupportedInstruction, f"stores to .{space} are not supported", idx)

    def _generic(self, addr, idx, fn, dtype):
        addr = addr.astype(np.uint64)
        spaces = np.full(len(addr), 0)
        for code, win in ((1, SHARED_WINDOW), (2, PARAM_WINDOW), (3, LOCAL_WINDOW)):
            spaces[(addr >= np.uint64(win)) & (addr < np.uint64(win + WINDOW_SPAN))] = code
        out = None
        for code in np.unique(spaces):
            sel = spaces == code
            sp = ["global", "shared::cta", "param", "local"][code]
            win = [0, SHARED_WINDOW, PARAM_WINDOW, LOCAL_WINDOW][code]
            r = fn(sp, addr[sel] - np.uint64(win), sel)
            if r is not None:
                if out is None:
                    out = np.empty(len(addr), dtype=r.dtype)
                out[sel] = r
        return out

    def _param_load(self, offset, dtype, idx):
        size = np.dtype(dtype).itemsize
        buf = self.L.param_buffer
        off = offset.astype(np.int64)
        if (off < 0).any() or (off + size > len(buf)).any():
            self.fail(MemoryFault, f"param access outside the {len(buf)}-byte parameter buffer", idx)
        byts = buf[off[:, None] + np.arange(size)]
        return np.ascontiguousarray(byts).view(dtype).reshape(-1)

    def _local(self, offset, dtype, idx, values=None):
        size = np.dtype(dtype).itemsize
        off = offset.astype(np.int64)
        if (off < 0).any() or (off + size > self.local.shape[1]).any():
            self.fail(MemoryFault, "local memory access out of bounds", idx)
        cols = off[:, None] + np.arange(size)
        if values is None:
            return np.ascontiguousarray(self.local[idx[:, None], cols]).view(dtype).reshape(-1)
        self.local[idx[:, None], cols] = np.ascontiguousarray(values).view(np.uint8).reshape(-1, size)

    # ---------------------------------------------------------------- scheduling
    def _wait_keys(self, idx):
        return np.unique(self.warp[idx] * (1 << 24) + self.pc[idx]).tolist()

    def block(self, idx, why):
        """Park threads idx (at their current PC) until unblocked; `why` is reported if
        they never are."""
        self.state[idx] = BLOCKED
        for k in self._wait_keys(idx):
            self.waiting[k] = why

    def unblock(self, idx):
        self.state[idx] = RUNNABLE
        for k in self._wait_keys(idx):
            self.waiting.pop(k, None)

    def run(self, budget=None):
        """Run to completion (returns "done"), or for `budget` more steps (then returns
        "budget" if threads are left). Raises Deadlock when every live thread is blocked."""
        instrs = self.kernel.instrs
        stats = self.L.stats
        handlers = self.handlers
        end = None if budget is None else self.steps + budget
        while True:
            runnable = self.state == RUNNABLE
            if self.async_ops and (not runnable.any() or self.steps - self.async_ops[0].issued > ASYNC_LATENCY
                                   or self._lead_blocked(runnable)):
                self.complete_async()
                continue
            if not runnable.any():
                if (self.state == DONE).all():
                    return "done"
                if self._wake_pollers():
                    continue
                self._deadlock()
            if self.steps % LIVELOCK_CHECK == 0 and self.progress.livelocked(runnable):
                if self._wake_pollers():
                    continue
                if self.livelock_returns:
                    return "spinning"
                self._deadlock(livelock=True)
            if self.cta_rank is not None:
                # only the highest-priority CTA with runnable threads moves; a leader that
                # spins without progress yields (it waits for one of the others)
                lead = runnable & ~self.progress.spinning(QUIET_YIELD)
                lead = lead if lead.any() else runnable
                runnable = runnable & (self.cta_rank == self.cta_rank[lead].min())
            key = self.epoch * (1 << 24) + self.pc
            kmin = key[runnable].min()
            idx = np.flatnonzero(runnable & (key == kmin))
            pc = int(self.pc[idx[0]])
            if pc >= len(instrs):
                self.state[idx] = DONE   # fell off the end: like ret
                continue
            ins = self.instr = instrs[pc]
            self.pc[idx] = pc + 1
            h = handlers.get(ins.opcode)
            if h is None:
                self.fail(UnsupportedInstruction, f"instruction {ins.full} is not implemented by the emulator", idx)
            spec = sync_spec(ins)
            if spec is not None:
                # a warp collective runs once every lane of its mask is here (convergence.py)
                off = None if ins.guard is None else ~self._guard_true(ins, idx)
                idx = self.conv.arrive(ins, spec, idx, pc, off)
            active = idx if ins.guard is None else idx[self._guard_true(ins, idx)]
            stats.count(ins, len(active), _distinct_sorted(self.warp[active]))
            if len(active) or ins.opcode in ("bar", "barrier"):
                try:
                    h(self, ins, active)
                except (StopIteration, KeyError, IndexError) as e:
                    # a form of the instruction its handler does not know (a missing modifier
                    # or operand): reported as unsupported, with its place
                    self.fail(UnsupportedInstruction, f"{ins.full} (this form, with operands {ins.operands}) is not "
                                                      f"supported by the emulator ({type(e).__name__}: {e})", active)
            self.steps += 1
            if self.steps > self.L.max_steps:
                self.fail(EmuError, f"more than {self.L.max_steps} steps: the kernel does not terminate", idx)
            if end is not None and self.steps >= end:
                if self.livelock_returns and self.progress.livelocked(self.state == RUNNABLE):
                    return "spinning"
                return "budget"

    def _lead_blocked(self, runnable):
        """Skewed schedules: the leading live CTA cannot move. Its copies land before
        another CTA runs (any time after issue is legal), so the leader gets as far
        ahead as its synchronisation allows."""
        if self.cta_rank is None:
            return False
        live = self.state != DONE
        lead = self.cta_rank[live].min()
        return not (runnable & (self.cta_rank == lead)).any()

    def issue_async(self, op):
        """Queue an asynchronous copy (an object with .issued and .perform()); it is
        performed when the threads have nothing else to do, after ASYNC_LATENCY steps, or
        when a wait on it needs it - never at issue, so a missing wait shows."""
        op.issued = self.steps
        self.async_ops.append(op)

    def complete_async(self, upto=None):
        """Perform queued copies in issue order (all, or up to and including `upto`)."""
        while self.async_ops:
            op = self.async_ops.pop(0)
            op.perform(self)
            if op is upto:
                return

    def _wake_pollers(self):
        """Parked try_wait threads get `false` once nothing else can run, unless nothing
        changed since they parked (then it is a deadlock)."""
        pollers = self.ext.get("pollers")
        if not pollers:
            return False
        woke = False
        for key, (idx, version, on_fail) in list(pollers.items()):
            if version != self.state_version:
                del pollers[key]
                on_fail(idx)
                self.unblock(idx)
                woke = True
        return woke

    def deadlock_lines(self, livelock=False):
        """One line per warp and PC of the live threads (what each waits for); with
        livelock, the spinning loops instead of the runnable threads."""
        runnable = self.state == RUNNABLE
        lines = self.progress.report(runnable) if livelock else []
        parked = (self.state == BLOCKED) if livelock else (self.state != DONE)
        keys = self.warp * (1 << 24) + self.pc
        for k in np.unique(keys[parked]):
            sel = np.flatnonzero(parked & (keys == k))
            t = sel[0]
            pc = int(self.pc[t]) - 1
            ins = self.kernel.instrs[pc] if 0 <= pc < len(self.kernel.instrs) else None
            lanes = "" if len(sel) == 32 else f" (lanes {self.lane[sel].tolist()})"
            lines.append(f"  CTA {tuple(int(v) for v in self.ctaid[t])} warp {int(self.lin[t] // 32)}: "
                         f"{len(sel)} threads{lanes} at PTX line {ins.line if ins else '?'} "
                         f"({ins.text if ins else 'start'}): {self.waiting.get(int(k), 'blocked')}")
        return lines

    def _deadlock(self, livelock=False):
        what = ("every runnable thread spins in a loop that makes no progress (livelock)" if livelock
                else "every live thread is blocked")
        raise Deadlock(f"{self.kernel.name}: deadlock: {what}\n" + "\n".join(self.deadlock_lines(livelock)))
