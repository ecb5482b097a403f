"""Memory-ordering checker of the emulator: happens-before over shared memory, the
async proxy, mbarrier phases, wgmma groups and cluster scopes (docs/emulator.md,
"Memory-ordering checker").

The emulator's memory is sequentially consistent, so ordering bugs that fail now and
then on a GPU pass there; this checker reports them instead (OrderingViolation, naming
the rule, both PTX lines, the threads and the shared address). Mode, per launch:
"raise" (the first violation raises), "collect" (violations are gathered on the
launch's Stats as `ordering_violations`, the run goes on) or "off". The default comes
from the environment variable PK_EMU_ORDERING ("off" when unset; the test suite sets
"raise"); `checking(mode, reason)` overrides it for a block of code.
"""
import contextlib
import os
import weakref

from .violation import RULES, OrderingViolation  # noqa: F401

MODES = ("raise", "collect", "off")
ENV = "PK_EMU_ORDERING"
_override = []


def mode() -> str:
    """The mode launches use now."""
    m = _override[-1] if _override else os.environ.get(ENV, "off") or "off"
    if m not in MODES:
        raise ValueError(f"{ENV}: expected one of {MODES}, got {m!r}")
    return m


@contextlib.contextmanager
def checking(m: str, reason: str = ""):
    """Launches inside the block use mode `m`. Turning the checker off must give a reason
    (e.g. a test too slow with it), so the exemption is visible where it is made."""
    if m not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {m!r}")
    if m == "off" and not reason:
        raise ValueError("checking('off') needs a reason")
    _override.append(m)
    try:
        yield
    finally:
        _override.pop()


_live = []          # weak references to the checkers of machines that may still run


def checker_for(machine):
    """The checker of a new Machine, or None when checking is off. Checkers of machines
    that have finished give their per-byte state back for reuse first."""
    global _live
    m = mode()
    if m == "off":
        return None
    from .checker import Checker
    keep = []
    for ref in _live:
        c = ref()
        if c is not None and not c.finished():
            keep.append(ref)
        elif c is not None:
            c.shadow.release()
    checker = Checker(machine, collect=m == "collect")
    _live = keep + [weakref.ref(checker)]
    return checker
