"""One launch whose waits other OS processes satisfy (shared_global.py maps their memory).

`launch_many` runs every device of a node in one process: a kernel that spins on a flag
sees each store of its peers, and a round in which nothing moves anywhere is a deadlock.
Here the peers are other processes: their stores reach the shared segments but not this
emulator's progress counter (GlobalMemory.version), so a spin-wait looks quiet until it
reads the new value. The launch therefore runs in slices; when every runnable thread spins
quietly it is parked: this process sleeps (backing off to a few ms) while watching the
words the spinning threads poll, and resumes them when one changes. A park that lasts
`idle_timeout_s` ends the waiting: the kernel then runs without parking, so its own
bounded waits (a spin count, as on a GPU) run out and it reports through its error record
and trap; if it still spins after `expiry_s` more, WaitTimeout.
"""
import ctypes
import time

import numpy as np

from .errors import Deadlock, EmuError
from .launch import _prepare
from .machine import MAX_STEPS, RUNNABLE, Machine
from .memory import GlobalMemory
from .progress import GLOBAL

QUANTUM = 256          # scheduler steps between checks for a parked state
PARK_QUIET = 16        # quiet iterations of every runnable spin loop before parking
MAX_SLEEP_S = 0.005


class WaitTimeout(EmuError):
    """The launch waited for other processes longer than its time-outs allowed and the
    kernel did not end the wait itself."""


def _quiet(m: Machine, status: str) -> bool:
    if status == "spinning":
        return True
    runnable = m.state == RUNNABLE
    if m.async_ops or not runnable.any():
        return False
    return bool(m.progress.spinning(PARK_QUIET)[runnable].all())


def _polled_words(m: Machine) -> dict:
    """The aligned 8-byte words holding the global addresses the spinning threads poll,
    with their values now."""
    runnable = m.state == RUNNABLE
    sel = runnable & (m.progress.space == GLOBAL)
    words = np.unique(m.progress.addr[sel] & ~np.uint64(7))
    return {int(a): ctypes.c_uint64.from_address(int(a)).value for a in words}


def _changed(words: dict) -> bool:
    return any(ctypes.c_uint64.from_address(a).value != v for a, v in words.items())


def launch_polling(ptx, kernel, grid, block, args, shared_mem=0, cluster=(1, 1, 1), *, regions=(),
                   idle_timeout_s: float, expiry_s: float, max_steps=MAX_STEPS):
    """Run `kernel` with every CTA resident, as `launch` does, where other processes write
    the memory it waits on. regions: (address, bytes) of memory the kernel may reach
    besides its tensor arguments (the shared segments). Returns the launch's Stats.
    Raises what the kernel raises (EmuError on a trap), Deadlock when the threads spin on
    memory no other process can reach, WaitTimeout (above)."""
    gmem = GlobalMemory()
    for address, nbytes in regions:
        gmem.register(address, nbytes)
    L = _prepare(ptx, kernel, grid, block, args, shared_mem, cluster, gmem, max_steps)
    m = Machine(L, L.cta_groups(co_resident=True)[0])
    m.livelock_returns = True
    L.stats.ctas = m.ncta
    expired_at = None
    while True:
        status = m.run(budget=QUANTUM)
        if status == "done":
            return L.stats
        if expired_at is not None:
            if status == "spinning":
                gmem.version += 1        # keep stepping: the kernel's own spin bound ends the wait
            if time.monotonic() - expired_at > expiry_s:
                raise WaitTimeout(f"{kernel}: waited for other processes for {idle_timeout_s:g} s, and its own "
                                  f"bounded waits did not end within {expiry_s:g} s more:\n"
                                  + "\n".join(m.deadlock_lines(livelock=True)))
            continue
        if not _quiet(m, status):
            continue
        words = _polled_words(m)
        if not words:
            raise Deadlock(f"{kernel}: every runnable thread spins on memory no other process writes:\n"
                           + "\n".join(m.deadlock_lines(livelock=True)))
        start, sleep = time.monotonic(), 1e-4
        while not _changed(words):
            if time.monotonic() - start > idle_timeout_s:
                expired_at = time.monotonic()
                break
            time.sleep(sleep)
            sleep = min(2 * sleep, MAX_SLEEP_S)
        gmem.version += 1                # another process's stores: the spinning threads poll again
