"""Warp convergence at `.sync` / `.aligned` warp collectives, as the hardware does it.

Since Volta the threads of a warp are scheduled independently; an instruction with a
membermask (`shfl.sync`, `vote.sync`, `redux.sync`, `match.sync`, `elect.sync`,
`bar.warp.sync`) makes each executing thread wait until every thread of its mask has
reached it (PTX ISA), and an `.aligned` warp instruction (`ldmatrix`, `stmatrix`) is
executed by the whole warp at once. The scheduler alone runs together only the threads
that happen to sit at the same (epoch, PC): a lane that lags (e.g. lane 0 still in an
inner wait loop of the previous iteration) would otherwise execute the collective on its
own, and `elect.sync` would elect a second leader.

Here a thread that reaches a collective parks until the rest of its mask has arrived;
the last arrival executes the instruction for the whole group, which then leaves
together (same epoch, so it stays converged). Exited lanes count as arrived where the
ISA says "non-exited threads" (shfl, vote, redux, match; bar.warp.sync as the hardware
treats exited lanes); for `elect.sync` and `.aligned` instructions an exited lane of the
mask is an error. Guarded-off lanes at the instruction have arrived (they executed it
with a false predicate) but get no result. A lane that never arrives leaves its peers
parked: a Deadlock naming the instruction and the missing lanes. Arrivals match by
instruction (PC); `bar.warp.sync` matches any `bar.warp.sync`, as `__syncwarp()` calls
at different places may.
"""
import dataclasses

import numpy as np

from .errors import Deadlock, EmuError

_ANY_PC = -2          # the key of bar.warp.sync arrivals (matched across PCs)
_NONE = -1


@dataclasses.dataclass(frozen=True)
class SyncSpec:
    mask_operand: object     # index of the membermask operand; None: the whole warp (.aligned)
    exits_ok: bool           # exited lanes of the mask count as arrived
    any_pc: bool = False     # arrivals at any instruction of this kind match (bar.warp.sync)


def sync_spec(ins):
    """The convergence rule of an instruction, or None (cached on the instruction)."""
    spec = ins.__dict__.get("_sync_spec", 0)
    if spec == 0:
        spec = _spec(ins)
        ins.__dict__["_sync_spec"] = spec
    return spec


def _spec(ins):
    op, mods, last = ins.opcode, ins.mods, len(ins.operands) - 1
    if op in ("shfl", "vote", "redux", "match") and "sync" in mods:
        return SyncSpec(last, exits_ok=True)
    if op == "elect":
        return SyncSpec(last, exits_ok=False)
    if op in ("bar", "barrier") and "warp" in mods:
        return SyncSpec(0, exits_ok=True, any_pc=True)
    if op in ("ldmatrix", "stmatrix") or (op == "tensormap" and "aligned" in mods):
        return SyncSpec(None, exits_ok=False)
    return None


def _lanes(bits):
    return [lane for lane in range(32) if int(bits) >> lane & 1]


class Convergence:
    """Per-launch arrival state: which collective each parked thread waits at, with
    which mask. Threads index the machine's thread vector."""

    def __init__(self, m):
        self.m = m
        self.key = np.full(m.T, _NONE, dtype=np.int64)
        self.mask = np.zeros(m.T, dtype=np.uint32)
        self.why = {}                                   # key -> instruction, for reports
        wpc = (m.nthreads + 31) // 32
        nwarps = m.ncta * wpc
        table = np.full((nwarps, 32), -1, dtype=np.int64)
        table[m.warp, m.lane.astype(np.int64)] = np.arange(m.T)
        self.table = table                              # [warp, lane] -> thread (-1: no such lane)
        self.full = self._pack(table >= 0)              # lanes that exist, per warp

    @staticmethod
    def _pack(bits):
        """bool [k, 32] -> uint32 [k] (bit i = lane i)."""
        return np.packbits(bits, axis=1, bitorder="little").view(np.uint32).reshape(-1)

    def arrive(self, ins, spec, idx, pc, guard_off=None):
        """Threads idx reach collective `ins` (at PC pc). Returns the threads that execute
        it now (sorted): every group whose mask is complete, earlier arrivals included;
        the others park. guard_off (bool per thread of idx): its predicate is false; such
        a thread outside its own mask takes no part and passes on at once."""
        m = self.m
        key = _ANY_PC if spec.any_pc else pc
        if spec.mask_operand is None:
            masks = self.full[m.warp[idx]]
        else:
            masks = m.read(ins.operands[spec.mask_operand], "b32", idx).astype(np.uint32)
        own = np.uint32(1) << m.lane[idx].astype(np.uint32)
        if guard_off is not None:
            bystander = guard_off & ((masks & own) == 0)
            if bystander.any():
                keep = ~bystander
                joined = self.arrive(ins, spec, idx[keep], pc) if keep.any() else idx[:0]
                return np.sort(np.concatenate([joined, idx[bystander]]))
        if ((masks & own) == 0).any():
            j = int(np.flatnonzero((masks & own) == 0)[0])
            m.fail(EmuError, f"{ins.full}: the executing thread (lane {int(m.lane[idx[j]])}) is not in its "
                             f"membermask {int(masks[j]):#010x} (undefined in the PTX ISA)", idx[j:j + 1])
        earlier = np.flatnonzero(self.key == key)
        if len(earlier):
            earlier = earlier[np.isin(m.warp[earlier], m.warp[idx])]
        group = np.concatenate([idx, earlier]) if len(earlier) else idx
        gmask = np.concatenate([masks, self.mask[earlier]]) if len(earlier) else masks
        warps, inv = np.unique(m.warp[group], return_inverse=True)
        here = np.zeros((len(warps), 32), dtype=bool)
        here[inv, m.lane[group].astype(np.int64)] = True
        arrived = self._pack(here)[inv]
        tab = self.table[warps]
        gone = self._pack((tab < 0) | (m.state[np.maximum(tab, 0)] == 2))[inv]     # 2: DONE
        missing = gmask & ~arrived
        if not spec.exits_ok and (missing & gone).any():
            j = int(np.flatnonzero(missing & gone)[0])
            m.fail(Deadlock, f"{ins.full} waits for every thread of its membermask {int(gmask[j]):#010x}, but "
                             f"lanes {_lanes(missing[j] & gone[j])} have exited (or do not exist): they never "
                             "arrive", group[j:j + 1])
        ready = (missing & ~gone) == 0
        if ready.any() and not (gmask[ready] == gmask[ready][0]).all():
            self._check_masks(ins, group, gmask, inv, ready)
        if len(earlier):
            back = ready[len(idx):]
            if back.any():
                self._release(earlier[back])
        wait = ~ready[:len(idx)]
        if wait.any():
            self._park(ins, idx[wait], masks[wait], key, (missing & ~gone)[:len(idx)][wait])
        go = np.sort(group[ready])
        if len(go):
            # the group leaves together: one epoch, so the scheduler keeps it converged
            w = m.warp[go]
            top = np.zeros(int(w.max()) + 1, dtype=np.int64)
            np.maximum.at(top, w, m.epoch[go])
            m.epoch[go] = top[w]
        return go

    def _check_masks(self, ins, group, gmask, inv, ready):
        """Threads released together must agree on the mask (PTX: 'the same membermask')."""
        m = self.m
        for j in np.flatnonzero(ready):
            peers = (inv == inv[j]) & ((gmask[j] >> m.lane[group].astype(np.uint32)) & 1).astype(bool)
            bad = peers & (gmask != gmask[j])
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                m.fail(EmuError, f"{ins.full}: lane {int(m.lane[group[j]])} uses membermask {int(gmask[j]):#010x}, "
                                 f"lane {int(m.lane[group[k]])} of that mask {int(gmask[k]):#010x} (the ISA requires "
                                 "the same membermask)", group[j:j + 1])

    def _park(self, ins, who, masks, key, missing):
        m = self.m
        self.key[who] = key
        self.mask[who] = masks
        for w in np.unique(m.warp[who]):
            sel = m.warp[who] == w
            lanes = _lanes(np.bitwise_or.reduce(missing[sel]))
            m.block(who[sel], f"{ins.full} (PTX line {ins.line}) waits for lanes {lanes} of its membermask "
                              f"{int(masks[sel][0]):#010x} to arrive")

    def _release(self, who):
        self.key[who] = _NONE
        self.m.unblock(who)

    def on_exit(self, idx):
        """Lanes of idx exited: their parked peers arrive again (rewound to the
        collective), so a group now complete runs and a missing exited lane is reported."""
        m = self.m
        parked = np.flatnonzero((self.key != _NONE) & np.isin(m.warp, np.unique(m.warp[idx])))
        if len(parked):
            self._release(parked)
            m.pc[parked] -= 1
