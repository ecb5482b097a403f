"""The per-byte state of the ordering checker, reused from machine to machine.

A launch runs one Machine per cluster (or a few at once); each needs state for every
shared byte it has (the last write, in-flight asynchronous operations, each agent's
last read). Fresh arrays cost a page fault per page on first touch, which dominates
short runs, so released state goes to a pool and is cleared over the range used.
"""
import weakref

import numpy as np

_POOL = {}          # (readers, bytes) -> [Shadow]


class Shadow:
    def __init__(self, readers: int, n: int):
        self.w_agent = np.full(n, -1, dtype=np.int32)   # last writer: agent (or mbarrier column)
        self.w_clock = np.zeros(n, dtype=np.int32)      # ... its clock then
        self.w_kind = np.zeros(n, dtype=np.int8)        # ... generic / async / cp.async / atomic
        self.w_site = np.zeros(n, dtype=np.int64)       # ... PTX site (instruction << 32 | thread)
        self.pend_w = np.zeros(n, dtype=np.int32)       # in-flight asynchronous write (op id)
        self.pend_r = np.zeros(n, dtype=np.int16)       # in-flight asynchronous reads (count)
        self.pend_r_op = np.zeros(n, dtype=np.int32)    # ... the latest of them (op id)
        self.R = np.zeros((readers, n), dtype=np.int32)  # last read clock of each reader agent
        self.r_site = np.zeros(n, dtype=np.int64)       # last read: PTX site and kind
        self.r_kind = np.zeros(n, dtype=np.int8)
        self.lo, self.hi = n, 0                         # bytes touched: [lo, hi)
        self.owner = None

    def touch(self, B):
        if len(B):
            self.lo = min(self.lo, int(B.min()))
            self.hi = max(self.hi, int(B.max()) + 1)

    def _clear(self):
        s = slice(self.lo, max(self.lo, self.hi))
        self.w_agent[s] = -1
        for a in (self.w_clock, self.w_kind, self.w_site, self.pend_w, self.pend_r, self.pend_r_op, self.r_site,
                  self.r_kind):
            a[s] = 0
        self.R[:, s] = 0
        self.lo, self.hi = len(self.w_agent), 0

    @staticmethod
    def get(owner, readers: int, n: int) -> "Shadow":
        """State for `owner` (cleared). It returns to the pool through `release` (once its
        machine has finished), or when owner is collected."""
        free = _POOL.setdefault((readers, n), [])
        s = free.pop() if free else Shadow(readers, n)
        s.owner = weakref.ref(owner)
        weakref.finalize(owner, s.release, s.owner)
        return s

    def release(self, owner=None):
        """Back to the pool, once (owner: the owner's reference given by `get`, when the
        call comes from its finalizer, which may run after the state was reused)."""
        if self.owner is None or (owner is not None and owner is not self.owner):
            return
        self.owner = None
        self._clear()
        pool = _POOL.setdefault((self.R.shape[0], self.R.shape[1]), [])
        if len(pool) < 2:
            pool.append(self)
