"""Non-bulk asynchronous copies, global -> shared (sm_80 style ``cp.async``):

- ``cp.async.{ca,cg}.shared{::cta}.global{.L2::cache_hint}{.L2::64B|128B|256B}
  [dst], [src], cp-size{, src-size | , ignore-src}{, cache-policy}``: cp-size 4, 8 or 16
  (.cg: 16 only). ``src-size`` < cp-size copies that many bytes and zero-fills the rest;
  a true ``ignore-src`` predicate copies zeros (src is not read). Both addresses must be
  aligned to cp-size. Cache qualifiers and the cache-policy are hints: ignored.
- ``cp.async.commit_group``: closes the executing thread's current group (possibly empty).
- ``cp.async.wait_group N``: completes every copy of the thread's committed groups but
  the N most recent; copies not yet committed stay pending.
- ``cp.async.wait_all``: commit_group, then wait_group 0.
- ``cp.async.mbarrier.arrive{.noinc}{.shared{::cta}}.b64 [mbar]``: see `cp_async_mbarrier_arrive`.

The copies really are asynchronous here: issuing one only records it (per thread, in
``machine.ext["cp_async"]``) after checking its addresses (bounds, alignment), so a bad
address is reported at the cp.async line. The bytes are read from global memory and
written to shared memory when a wait completes the copy, so a kernel that reads the
destination before the matching wait sees the old contents (0xFF for shared memory never
written), as a missing wait would on the GPU (where it is a race). Global bytes read
(``Stats.global_read``) and the shared stores (bank conflicts, per issuing instruction)
are counted when the copies are performed. Copies never waited for are never performed.

Opcode sharing: ``cp.async.bulk*`` and ``cp.reduce.async.bulk*`` parse to the same base
opcode ``cp``. The bulk-copy module, imported after this one, owns ``HANDLERS["cp"]`` and
hands the non-bulk forms to `cp` here. Should this module be imported last instead, `cp`
hands the bulk/reduce forms to the handler registered before it; any other ``cp`` form
is reported as unsupported (never passed back, so the two cannot recurse).
"""
import numpy as np

from ..errors import EmuError, MemoryFault, UnsupportedInstruction
from ..memory import SHARED_WINDOW, WINDOW_SPAN
from . import HANDLERS, op

_HINTS = {"L2::cache_hint", "L2::64B", "L2::128B", "L2::256B"}
_MINE = {"ca", "cg", "commit_group", "wait_group", "wait_all", "mbarrier"}
_previous_cp = HANDLERS.get("cp")


class _Batch:
    """The copies one cp.async instruction issued (one per executing thread)."""
    __slots__ = ("ins", "thr", "dst", "src", "size", "nbytes", "group", "pending")

    def __init__(self, ins, thr, dst, src, size, nbytes, group):
        self.ins, self.thr, self.dst, self.src, self.size = ins, thr, dst, src, size
        self.nbytes, self.group = nbytes, group
        self.pending = np.ones(len(thr), dtype=bool)


class CpAsyncState:
    """Per launch: each thread's current (open) group number and the pending copies.

    A copy belongs to the group that was open when it was issued; commit_group moves the
    thread to the next group number, so the thread's committed groups are the numbers
    below ``open[t]`` and the N most recent are ``open[t]-N .. open[t]-1``."""

    def __init__(self, nthreads):
        self.open = np.zeros(nthreads, dtype=np.int64)
        self.batches = []

    def pending(self):
        """Number of copies issued and not yet performed (all threads)."""
        return sum(int(b.pending.sum()) for b in self.batches)


def _state(m):
    st = m.ext.get("cp_async")
    if st is None:
        st = m.ext["cp_async"] = CpAsyncState(m.T)
    return st


@op("cp")
def cp(m, ins, idx):
    mods = ins.mods
    if len(mods) >= 2 and mods[0] == "async" and mods[1] in _MINE:
        kind = mods[1]
        if kind in ("ca", "cg"):
            return _issue(m, ins, idx)
        if kind == "commit_group":
            _state(m).open[idx] += 1
            return
        if kind == "wait_group":
            n = ins.operands[0] if ins.operands else None
            if n is None or n.kind != "imm" or n.value < 0:
                m.fail(EmuError, f"{ins.full}: the operand must be a non-negative integer constant", idx)
            return _wait(m, idx, int(n.value))
        if kind == "wait_all":
            _state(m).open[idx] += 1
            return _wait(m, idx, 0)
        return cp_async_mbarrier_arrive(m, ins, idx)
    if _previous_cp is not None and ("bulk" in mods or "reduce" in mods):
        return _previous_cp(m, ins, idx)
    m.fail(UnsupportedInstruction, f"instruction {ins.full} is not implemented by the emulator", idx)


def _is_pred(m, o):
    return o.kind == "reg" and m.regs[o.value].dtype == np.bool_


def _issue(m, ins, idx):
    mods = ins.mods
    rest = set(mods[2:])
    spaces = rest & {"shared", "shared::cta"}
    if "global" not in rest or len(spaces) != 1 or rest - _HINTS - spaces - {"global"}:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator (cp.async copies "
                                       "global -> shared::cta)", idx)
    ops = list(ins.operands)
    if len(ops) < 3 or ops[0].kind != "mem" or ops[1].kind != "mem" or ops[2].kind != "imm":
        m.fail(EmuError, f"{ins.full}: expected [dst], [src], cp-size{{, src-size|ignore-src}}"
                         "{, cache-policy}", idx)
    size = int(ops[2].value)
    if size not in (4, 8, 16) or (mods[1] == "cg" and size != 16):
        m.fail(EmuError, f"{ins.full}: cp-size {size} (must be 4, 8 or 16; 16 for .cg)", idx)
    extra = ops[3:]
    if "L2::cache_hint" in rest:
        if not extra:
            m.fail(EmuError, f"{ins.full}: .L2::cache_hint needs a cache-policy operand", idx)
        extra = extra[:-1]                      # the cache policy: a hint
    if len(extra) > 1:
        m.fail(EmuError, f"{ins.full}: too many operands", idx)
    n = len(idx)
    nbytes = np.full(n, size, dtype=np.int64)
    if extra:
        o = extra[0]
        if _is_pred(m, o):                      # ignore-src
            nbytes[m.read(o, "pred", idx)] = 0
        else:                                   # src-size
            nbytes = m.read(o, "u32", idx).astype(np.int64)
            if (nbytes > size).any():
                j = int(np.flatnonzero(nbytes > size)[0])
                m.fail(EmuError, f"cp.async: src-size {int(nbytes[j])} exceeds cp-size {size} (undefined "
                                 "behaviour)", idx[j:j + 1])
    dst = m.address(ops[0], idx, "shared::cta")
    src = m.address(ops[1], idx, "global")
    # Check now, so a bad address is reported at this line: dst bounds and alignment
    # (flat_index checks both for cp-size), src alignment and the bytes really read.
    m._shared_index(dst, idx, size, False)
    reads = nbytes > 0
    mis = reads & ((src % np.uint64(size)) != 0)
    if mis.any():
        j = int(np.flatnonzero(mis)[0])
        m.fail(MemoryFault, f"cp.async: misaligned {size}-byte global source address {int(src[j]):#x}",
               idx[j:j + 1])
    if reads.any():
        rows, cols = np.nonzero(np.arange(size)[None, :] < nbytes[:, None])
        m.L.gmem.load(src[rows] + cols.astype(np.uint64), np.uint8, m.where(idx[rows]))
    st = _state(m)
    st.batches.append(_Batch(ins, idx.copy(), dst, src, size, nbytes, st.open[idx].copy()))
    if m.order:
        m.order.cp_async_issue(st.batches[-1])


def _perform(m, b, sel):
    """Perform the copies sel (bool mask over batch b): read global now, write shared."""
    if not sel.any():
        return
    saved = m.instr
    m.instr = b.ins                             # errors and stats name the issuing cp.async
    try:
        thr, n, size = b.thr[sel], b.nbytes[sel], b.size
        data = np.zeros((len(thr), size), dtype=np.uint8)
        rows, cols = np.nonzero(np.arange(size)[None, :] < n[:, None])
        if len(rows):
            data[rows, cols] = m.load("global", b.src[sel][rows] + cols.astype(np.uint64), np.uint8, thr[rows])
        words = size // 4
        addr = (b.dst[sel][:, None] + np.arange(0, size, 4, dtype=np.uint64)).reshape(-1)
        m.store("shared::cta", addr, data.view(np.uint32).reshape(-1), np.uint32, np.repeat(thr, words))
    finally:
        m.instr = saved
    b.pending &= ~sel


def _prune(st):
    st.batches = [b for b in st.batches if b.pending.any()]


def _wait(m, idx, n):
    """Complete, for threads idx, every pending copy of a committed group older than the
    n most recent ones."""
    st = _state(m)
    waiting = np.zeros(m.T, dtype=bool)
    waiting[idx] = True
    for b in st.batches:
        sel = b.pending & waiting[b.thr] & (b.group < st.open[b.thr] - n)
        _perform(m, b, sel)
    _prune(st)


def cp_async_mbarrier_arrive(m, ins, idx):
    """``cp.async.mbarrier.arrive{.noinc}{.shared{::cta}}.b64 [mbar]``.

    The ISA: an arrive-on operation on the mbarrier is triggered once every cp.async the
    executing thread issued before this instruction has completed; without ``.noinc`` the
    barrier's pending count is first incremented by one, so the net count is unchanged.

    mbarrier state belongs to the mbarrier module: its ``cp_async_arrive`` is called as
    ``cp_async_arrive(m, addr, idx, count=1, noinc=bool, pending=callable)`` with ``addr`` the
    per-thread ``.shared::cta`` offsets of the barrier (generic addresses already
    translated) and ``pending(threads=None)`` a callable that performs, now, the copies
    this arrive tracks (those issued before it by the arriving threads, or by the given
    subset, and not completed yet); it is idempotent and must run no later than
    the moment the arrive takes effect.
    """
    from .mbarrier import cp_async_arrive
    mods = set(ins.mods[2:])
    if mods - {"arrive", "noinc", "shared", "shared::cta", "b64"} or "arrive" not in mods:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator", idx)
    mem = next((o for o in ins.operands if o.kind == "mem"), None)
    if mem is None:
        m.fail(EmuError, f"{ins.full}: expected [mbar]", idx)
    space = "shared::cta" if mods & {"shared", "shared::cta"} else ""
    addr = m.address(mem, idx, space or "shared::cta")
    if space == "":
        inside = (addr >= np.uint64(SHARED_WINDOW)) & (addr < np.uint64(SHARED_WINDOW + WINDOW_SPAN))
        if not inside.all():
            j = int(np.flatnonzero(~inside)[0])
            m.fail(MemoryFault, f"{ins.full}: generic address {int(addr[j]):#x} is not in shared memory",
                   idx[j:j + 1])
        addr = addr - np.uint64(SHARED_WINDOW)
    st = _state(m)
    arriving = np.zeros(m.T, dtype=bool)
    arriving[idx] = True
    tracked = [(b, b.pending & arriving[b.thr]) for b in st.batches]
    tracked = [(b, t) for b, t in tracked if t.any()]

    def pending(threads=None):
        subset = None
        if threads is not None:
            subset = np.zeros(m.T, dtype=bool)
            subset[np.asarray(threads, dtype=np.int64)] = True
        for b, t in tracked:
            sel = t & b.pending
            if subset is not None:
                sel &= subset[b.thr]
            _perform(m, b, sel)
        _prune(st)

    cp_async_arrive(m, addr, idx, count=1, noinc="noinc" in mods, pending=pending)
