"""Spin-waits that make no progress: a livelock is a deadlock too.

A thread spinning on a flag stays runnable, so the blocked-thread deadlock check never
sees it; without this it would run until the step limit (hours). A loop iteration is
*quiet* when the thread's backward branch is taken again at the same PC, it polled (read
memory or tested an mbarrier) at exactly the same addresses as in the previous
iteration, and nothing anywhere made progress in between: no store to shared or global
memory (by any thread or device of the launch), no atomic, no barrier or mbarrier
change, no copy landing, no exit (`Machine.progress_version`). Since memory is
unchanged such an iteration reads what the previous one read; the loop can only end by
a loop counter (a spin bound, which on the GPU would hang for a long time first) or
because another thread changes memory.

When every runnable thread sits in a loop with at least `QUIET_DEADLOCK` quiet
iterations (and no asynchronous copy is in flight), nothing can change any more: a
Deadlock naming each loop (PTX lines) and the address it polls. Loops that make progress
never count: ring protocols polling flags that other CTAs or devices write (each store
resets the count), mbarrier try_wait loops (parked, and woken by the barrier), counting
loops that poll nothing. Under the skewed schedules a leader that spins quietly yields
(`QUIET_YIELD` iterations) to the other CTAs / warpgroups, which may be the ones it
waits for.
"""
import numpy as np

QUIET_DEADLOCK = 5000       # above the EP tests' spin bound (2000), so a kernel's own time-out path runs first
QUIET_YIELD = 8
_MIX = np.uint64(0x9E3779B97F4A7C15)
GLOBAL, SHARED, MBARRIER = 1, 2, 3
_SPACE = {GLOBAL: "global address", SHARED: "shared byte", MBARRIER: "mbarrier at shared byte"}


class Progress:
    def __init__(self, m):
        T = m.T
        self.m = m
        self.sig = np.zeros(T, dtype=np.uint64)        # addresses polled in this iteration (hash)
        self.addr = np.zeros(T, dtype=np.uint64)       # the last address polled
        self.space = np.zeros(T, dtype=np.int8)
        self.loop_end = np.full(T, -1, dtype=np.int64)  # PC of the loop's backward branch
        self.loop_start = np.zeros(T, dtype=np.int64)
        self.loop_sig = np.zeros(T, dtype=np.uint64)
        self.loop_version = np.full(T, -1, dtype=np.int64)
        self.quiet = np.zeros(T, dtype=np.int64)

    def poll(self, idx, addr, space):
        """Threads idx read memory (or test an mbarrier) at addr (flat shared index for
        shared memory, which tells the CTAs apart)."""
        a = np.asarray(addr).astype(np.uint64)
        with np.errstate(over="ignore"):
            self.sig[idx] = (self.sig[idx] * _MIX) ^ (a + np.uint64(space))
        self.addr[idx] = a
        self.space[idx] = space

    def backedge(self, idx, here, dest):
        """Threads idx take the backward branch at PC `here` to `dest`. An iteration that
        polled nothing (an inner counting loop) leaves the state alone."""
        sig = self.sig[idx]
        polled = sig != 0
        if not polled.all():
            idx, sig = idx[polled], sig[polled]
            if not len(idx):
                return
        v = self.m.progress_version()
        same = (self.loop_end[idx] == here) & (self.loop_version[idx] == v) & (self.loop_sig[idx] == sig)
        self.quiet[idx] = np.where(same, self.quiet[idx] + 1, 0)
        self.loop_end[idx] = here
        self.loop_start[idx] = dest
        self.loop_version[idx] = v
        self.loop_sig[idx] = sig
        self.sig[idx] = 0

    def spinning(self, quiet):
        """Threads in a loop with at least `quiet` quiet iterations, nothing changed since."""
        m = self.m
        pc = m.pc                  # the next instruction: still inside the loop's PCs
        return ((self.quiet >= quiet) & (self.loop_version == m.progress_version())
                & (pc >= self.loop_start) & (pc <= self.loop_end))

    def livelocked(self, runnable):
        """Every runnable thread spins quietly (and nothing is in flight)."""
        if self.m.async_ops or not runnable.any():
            return False
        if not (self.quiet[runnable] >= QUIET_DEADLOCK).all():
            return False
        return bool(self.spinning(QUIET_DEADLOCK)[runnable].all())

    def report(self, runnable):
        """One line per spinning warp and loop."""
        m = self.m
        instrs = m.kernel.instrs
        lines = []
        seen = set()
        for t in np.flatnonzero(runnable):
            w, end = int(m.warp[t]), int(self.loop_end[t])
            if (w, end) in seen:
                continue
            seen.add((w, end))
            sel = np.flatnonzero(runnable & (m.warp == w) & (self.loop_end == end))
            first, last = instrs[int(self.loop_start[t])], instrs[end]
            lines.append(f"  CTA {tuple(int(v) for v in m.ctaid[t])} warp {int(m.lin[t] // 32)}: {len(sel)} threads "
                         f"spin in the loop at PTX lines {first.line}-{last.line} ({last.text}) polling "
                         f"{_SPACE.get(int(self.space[t]), 'address')} {self._where(t)}: "
                         f"{int(self.quiet[t])} iterations without a store to it or any barrier progress")
        return lines

    def _where(self, t):
        a = int(self.addr[t])
        if self.space[t] in (SHARED, MBARRIER):
            size = max(self.m.shared.size, 1)
            return f"{a % size} of CTA {tuple(int(v) for v in self.m.ctaid[t])}"
        return f"{a:#x}"
