"""mbarrier: init, arrive (count, expect_tx, drop, noComplete), expect_tx, complete_tx,
test_wait / try_wait (phase parity or state token), inval, pending_count.

A barrier's state lives beside shared memory, keyed by its flat shared-memory index
(so shared::cluster addresses of another CTA reach that CTA's barrier): the expected
arrival count, the pending arrivals and transaction bytes of the current phase, and the
phase number. A phase completes when both pending counts reach zero; then the phase
number advances and the arrival count is re-armed.

try_wait that fails parks its threads. They resume with `true` as soon as the phase
they wait for completes, or with `false` when nothing else can run and something
changed since they parked (the kernel's retry loop then runs, as after a hardware
time-out). If nothing changed, every thread is blocked: a deadlock, reported.
"""
import itertools

import numpy as np

from ..errors import EmuError, UnsupportedInstruction
from ..memory import SHARED_WINDOW, WINDOW_SPAN
from ..progress import MBARRIER
from . import op

_keys = itertools.count()
MAX_COUNT = (1 << 20) - 1


def _barriers(m):
    return m.ext.setdefault("mbarrier", {})


def shared_flat(m, mem_addr, idx, space, what):
    """Flat shared index of barrier / shared addresses (per thread) in any addressing form."""
    addr = mem_addr.astype(np.uint64)
    if space == "":
        inside = (addr >= np.uint64(SHARED_WINDOW)) & (addr < np.uint64(SHARED_WINDOW + WINDOW_SPAN))
        if not inside.all():
            m.fail(EmuError, f"{what}: generic address {int(addr[~inside][0]):#x} is not in shared memory", idx)
        addr = addr - np.uint64(SHARED_WINDOW)
        space = "shared::cta"
    return m._shared_index(addr, idx, 8, space == "shared::cluster")


def _space(ins):
    if "shared::cluster" in ins.mods:
        return "shared::cluster"
    if "shared::cta" in ins.mods or "shared" in ins.mods:
        return "shared::cta"
    return ""


def _mem(ins):
    return next(o for o in ins.operands if o.kind == "mem")


def _get(m, flat, idx):
    b = _barriers(m).get(int(flat))
    if b is None:
        m.fail(EmuError, f"mbarrier at shared offset {int(flat) % max(m.shared.size, 1)} is used before "
                         "mbarrier.init (or after mbarrier.inval)", idx)
    return b


def _token(phase, pending):
    """The opaque state an arrive returns: the phase it belongs to (low 32 bits) and the
    arrivals still pending in that phase right after it (mbarrier.pending_count)."""
    return (int(pending) << 32) | (int(phase) & 0xFFFFFFFF)


def arrive(m, flat, count, tx=0, idx=None, drop=False, no_complete=False):
    """Arrive `count` times (and add `tx` expected bytes) on barrier `flat`; returns the
    state token (`_token`) of the arrival."""
    b = _get(m, flat, idx)
    phase = b["phase"]
    b["tx"] += tx
    if drop:
        b["count"] -= count
    b["pending"] -= count
    if b["pending"] < 0:
        m.fail(EmuError, f"mbarrier: {-b['pending']} more arrivals than the {b['count']} expected in phase "
                         f"{phase}", idx)
    if no_complete and b["pending"] == 0 and b["tx"] == 0:
        m.fail(EmuError, "mbarrier.arrive.noComplete completed the phase (the ISA makes that undefined)", idx)
    token = _token(phase, b["pending"])
    _maybe_complete(m, flat, b)
    return token


def expect_tx(m, flat, nbytes, idx=None):
    _get(m, flat, idx)["tx"] += int(nbytes)


def complete_tx(m, flat, nbytes, idx=None):
    """Called by asynchronous copies (TMA, bulk copies) when their bytes have landed."""
    b = _get(m, flat, idx)
    b["tx"] -= int(nbytes)
    _maybe_complete(m, flat, b)


def _maybe_complete(m, flat, b):
    m.state_version += 1
    if b["pending"] != 0 or b["tx"] != 0:
        return
    b["phase"] += 1
    b["pending"] = b["count"]
    b["tx"] = 0
    if m.order:
        m.order.mbar_complete(flat)
    still = []
    for w in b["waiters"]:
        key, wait_idx, target, by_parity, dst = w
        if _done(b, target, by_parity):
            m.ext.get("pollers", {}).pop(key, None)
            m.write(dst, np.ones(len(wait_idx), dtype=bool), "pred", wait_idx)
            if m.order:
                m.order.mbar_woken(flat, wait_idx)
            m.unblock(wait_idx)
        else:
            still.append(w)
    b["waiters"] = still


def _done(b, target, by_parity):
    """Has the awaited phase completed? parity: the phase with that parity (the one before
    the current phase when the parities differ); state: the phase a token recorded."""
    if by_parity:
        return (b["phase"] & 1) != (target & 1)
    return b["phase"] > target


@op("mbarrier")
def mbarrier(m, ins, idx):
    mods = ins.mods
    kind = mods[0]
    if kind == "pending_count":
        # mbarrier.pending_count.b64 count, state: no barrier operand, only the token
        state = m.read(ins.operands[1], "b64", idx).astype(np.uint64)
        m.write(ins.operands[0], (state >> np.uint64(32)).astype(np.uint32), "u32", idx)
        return
    space = _space(ins)
    flat = shared_flat(m, m.address(_mem(ins), idx, space), idx, space, f"mbarrier.{kind}")
    if (flat % 8).any():
        m.fail(EmuError, "mbarrier object is not 8-byte aligned", idx)
    ops = ins.operands
    if kind == "init":
        count = m.read(ops[1], "u32", idx)
        for f, c in zip(flat.tolist(), count.tolist()):
            if not 1 <= c <= MAX_COUNT:
                m.fail(EmuError, f"mbarrier.init count {c} outside [1, {MAX_COUNT}]", idx)
            _barriers(m)[f] = {"count": c, "pending": c, "tx": 0, "phase": 0, "waiters": []}
        m.state_version += 1
        return
    if kind == "inval":
        for f in flat.tolist():
            _barriers(m).pop(f, None)
        return
    if kind in ("arrive", "arrive_drop"):
        has_tx = "expect_tx" in mods
        rest = ops[2:]
        tx = m.read(rest[0], "u32", idx) if has_tx else np.zeros(len(idx), dtype=np.uint32)
        count = m.read(rest[1 if has_tx else 0], "u32", idx) if len(rest) > int(has_tx) \
            else np.ones(len(idx), dtype=np.uint32)
        tokens = np.zeros(len(idx), dtype=np.uint64)
        if m.order:
            m.order.mbar_arrive(ins, flat, idx)
        for j, f in enumerate(flat.tolist()):
            tokens[j] = arrive(m, f, int(count[j]), int(tx[j]), idx[j:j + 1], drop=kind == "arrive_drop",
                               no_complete="noComplete" in mods)
        if ops[0].kind not in ("sink", "mem"):
            m.write(ops[0], tokens, "b64", idx)
        return
    if kind in ("expect_tx", "complete_tx"):
        n = m.read(ops[1], "u32", idx)
        for j, f in enumerate(flat.tolist()):
            (expect_tx if kind == "expect_tx" else complete_tx)(m, f, int(n[j]), idx[j:j + 1])
        return
    if kind in ("test_wait", "try_wait"):
        by_parity = "parity" in mods
        m.progress.poll(idx, flat, MBARRIER)
        target = m.read(ops[2], "u32" if by_parity else "u64", idx).astype(np.int64)
        if not by_parity:
            target &= 0xFFFFFFFF                   # the phase of a state token
        done = np.array([_done(_get(m, f, idx), int(t), by_parity) for f, t in zip(flat.tolist(), target.tolist())],
                        dtype=bool)
        m.write(ops[0], done, "pred", idx)
        if m.order:
            m.order.mbar_wait(ins, flat, idx, done)
        if kind == "try_wait" and not done.all():
            _park(m, ins, idx[~done], flat[~done], target[~done], by_parity)
        return
    m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator", idx)


def _park(m, ins, idx, flat, target, by_parity):
    dst = ins.operands[0]
    pollers = m.ext.setdefault("pollers", {})
    for f, t in {(int(f), int(t)) for f, t in zip(flat.tolist(), target.tolist())}:
        sel = (flat == f) & (target == t)
        wait_idx = idx[sel]
        key = next(_keys)
        b = _get(m, f, wait_idx)
        b["waiters"].append((key, wait_idx, t, by_parity, dst))

        def on_fail(i, key=key, b=b):
            b["waiters"] = [w for w in b["waiters"] if w[0] != key]
            m.write(dst, np.zeros(len(i), dtype=bool), "pred", i)

        pollers[key] = (wait_idx, m.state_version, on_fail)
        what = "parity" if by_parity else "phase of token"
        m.block(wait_idx, f"mbarrier.try_wait at shared offset {f % max(m.shared.size, 1)}: waits for the "
                          f"{what} {t} to complete (barrier phase {b['phase']}, "
                          f"{b['pending']} arrivals and {b['tx']} tx bytes pending)")


def cp_async_arrive(m, addr, idx, count=1, noinc=False, pending=None):
    """cp.async.mbarrier.arrive{.noinc}: the arrive fires once the thread's earlier
    cp.async copies have landed; the emulator lands them now (`pending()`), which is one
    of the orders the hardware allows. Without .noinc the ISA first raises the pending
    count by one, so the net effect on the count is nil: only the copies complete."""
    if pending is not None:
        pending()
    if m.order:
        m.order.cp_async_mbar_arrive(addr, idx)
    if not noinc:
        return
    flat = m._shared_index(addr.astype(np.uint64), idx, 8, False)
    for j, f in enumerate(flat.tolist()):
        arrive(m, f, count, 0, idx[j:j + 1])
