"""The happens-before checker of one Machine (see docs/emulator.md, "Memory-ordering checker").

Agents are warps (accesses inside a warp are exempt) and, per warpgroup, the completion
of its wgmma operations. Each agent has a vector clock (clocks.py). Synchronisation
joins clocks: bar/barrier.sync and named barriers, barrier.cluster, mbarrier arrive ->
observed phase (with release/acquire scopes), wgmma.wait_group, cp.async and bulk
wait_group. Every shared byte remembers its last write (agent, clock, proxy, PTX site),
an in-flight asynchronous write or read, and the clock of the last read of every agent;
each access checks that what it conflicts with happened before it.
"""
import bisect

import numpy as np

from ..machine import DONE
from .clocks import Clocks
from .geometry import expand, tma_box, wgmma_operands
from .shadow import Shadow
from .violation import OrderingViolation

GENERIC, ASYNC, CP_ASYNC, ATOMIC = 1, 2, 3, 4       # kinds of the last write of a byte
_WRITE_WHAT = {GENERIC: "generic-proxy write", ASYNC: "asynchronous copy into shared memory (async proxy)",
               CP_ASYNC: "cp.async copy", ATOMIC: "atomic / strong write"}
R_GENERIC, R_WGMMA, R_BULK = 1, 2, 3                  # kinds of the last read of a byte
_READ_WHAT = {R_GENERIC: "read", R_WGMMA: "wgmma.mma_async operand read (async proxy)",
              R_BULK: "bulk / TMA store source read (async proxy)"}
_STRONG = {"volatile", "relaxed", "acquire", "release"}
# The mbarrier rows of a barrier: arrivals of the current phase from its own CTA, from
# peers with .cluster scope, from peers with .cta scope (they do not synchronise), and
# the same three accumulated over its completed phases.
_PEND = ("pl", "pc", "pw")
_DONE = ("dl", "dc", "dw")
_SEMS = {"sc", "acq_rel", "release", "acquire"}
_WIDE = {"cluster", "gpu", "sys"}                   # thread-fence scopes that reach a peer CTA


class Checker:
    def __init__(self, m, collect: bool):
        self.m = m
        self.collect = collect
        self.found = m.L.stats.__dict__.setdefault("ordering_violations", [])
        self._seen = {v.key() for v in self.found}
        L = m.L
        self.csize = csize = int(np.prod(L.cluster))
        self.size = m.shared.size
        wpc, gpc = (m.nthreads + 31) // 32, (m.nthreads + 127) // 128
        rank = m.cluster_rank.astype(np.int64)
        self.cl = (m.cluster_base // csize).astype(np.int64)          # cluster of each thread
        self.agent = rank * wpc + m.lin // 32                       # warp agent of each thread
        self.wg_agent = csize * wpc + rank * gpc + m.lin // 128      # wgmma-completion agent
        self.K = K = csize * (wpc + gpc)
        self.clocks = Clocks(m.ncta // csize, K)
        sh = self.shadow = Shadow.get(self, K, len(m.shared.data))   # per shared byte (shadow.py)
        self.w_agent, self.w_clock, self.w_kind, self.w_site = sh.w_agent, sh.w_clock, sh.w_kind, sh.w_site
        self.pend_w, self.pend_r, self.pend_r_op = sh.pend_w, sh.pend_r, sh.pend_r_op
        self.R, self.r_site, self.r_kind = sh.R, sh.r_site, sh.r_kind
        self.rmax = np.zeros(K, dtype=np.int32)                  # latest read clock of each agent
        self.ops = {}                                            # op id -> in-flight operation
        self.op_of = {}                                          # id(handler object) -> op id
        self.next_op = 1
        self.fences = {}                                         # cluster -> agent -> (clocks, clock rows)
        self.weak = {}                                           # (cluster, agent, barrier) -> (row, site, why)
        self.weak_sites = {}                                     # barrier -> last .cta-scoped remote arrive
        self.wait_scope = np.zeros(m.T, dtype=np.int8)           # try_wait: 0 relaxed, 1 cta, 2 cluster
        self.wait_site = np.zeros(m.T, dtype=np.int64)
        # Thread fences at cluster scope or wider with relaxed mbarrier operations (the PTX
        # ISA's release / acquire patterns): a release fence snapshots its warp's clock into
        # row ("relfence", agent) and makes the thread's later relaxed arrives publish it; a
        # relaxed .cluster try_wait that succeeds collects the barrier's completed arrivals
        # into row ("acqpend", agent), which the thread's next acquire fence acquires.
        self.rel_fenced = np.zeros(m.T, dtype=bool)
        self.wait_relaxed_cluster = np.zeros(m.T, dtype=bool)
        self.acq_pending = np.zeros(m.T, dtype=bool)
        self._index = {id(ins): i for i, ins in enumerate(m.kernel.instrs)}
        self._kinds = {}

    def finished(self):
        """Every thread of the machine has exited (its state is no longer needed)."""
        return bool((self.m.state == DONE).all())

    # ------------------------------------------------------------------ reporting
    def _site(self, ins, t):
        return (self._index.get(id(ins), 0) << 32) | np.asarray(t, dtype=np.int64)

    def _describe(self, site, what):
        site = int(site)
        ins = self.m.kernel.instrs[site >> 32]
        t = site & 0xFFFFFFFF
        return {"what": what, "line": ins.line, "text": ins.text, "cta": tuple(int(v) for v in self.m.ctaid[t]),
                "thread": tuple(int(v) for v in self.m.tid[t])}

    def _report(self, rule, byte, first, second, detail=""):
        """first/second: (site, what). Raises, or records once per rule and line pair."""
        address = None if byte is None else (tuple(int(v) for v in self.m.ctaid[self._thread_of_cta(byte)]),
                                             int(byte) % self.size)
        v = OrderingViolation(self.m.kernel.name, rule, address,
                              first and self._describe(*first), second and self._describe(*second), detail)
        if not self.collect:
            raise v
        if v.key() not in self._seen:
            self._seen.add(v.key())
            self.found.append(v)

    def _thread_of_cta(self, byte):
        return (int(byte) // self.size) * self.m.nthreads

    def _op(self, obj, **info):
        """Register an in-flight operation (obj: the handler's object for it)."""
        op = self.next_op
        self.next_op += 1
        self.ops[op] = info
        if obj is not None:
            self.op_of[id(obj)] = op
        return op

    # ------------------------------------------------------------------ generic accesses
    def _kind(self, ins):
        k = self._kinds.get(id(ins))
        if k is None:
            if ins.opcode == "cp":
                k = "landing"                    # cp.async copies performed by their wait
            elif ins.opcode in ("ld", "st", "ldu") and _STRONG & set(ins.mods):
                k = "strong"
            else:
                k = "data"
            self._kinds[id(ins)] = k
        return k

    def shared_access(self, flat, size, idx, write):
        """ld/st/ldmatrix/stmatrix (and cp.async landing) of `size` bytes per thread at flat
        shared indices `flat`, by threads idx."""
        ins = self.m.instr
        kind = self._kind(ins)
        B = expand(flat, size)
        thr = idx if size == 1 else np.repeat(idx, size)
        site = self._site(ins, thr)
        if kind == "landing":
            return self._land(B, thr, site)
        if kind == "strong":
            return self._strong(B, thr, site, write, np.asarray(flat, dtype=np.int64), idx)
        if write:
            self._check_write(B, thr, site, "write")
            self._record_write(B, thr, site, GENERIC)
        else:
            self._check_read(B, thr, site)
            self._record_read(B, thr, site)

    def atomic(self, flat, size, idx):
        B = expand(flat, size)
        thr = idx if size == 1 else np.repeat(idx, size)
        site = self._site(self.m.instr, thr)
        self._check_write(B, thr, site, "atomic", atomic=True)
        self._record_write(B, thr, site, ATOMIC)

    def _own(self, cl, a):
        return self.clocks.vc[cl, a, a]

    def _hb_write(self, B, V_of):
        """Bytes whose last write did not happen before the accessor; V_of(wa) gives the
        accessor's clock entries for the writer agents wa (one per byte)."""
        wa = self.w_agent[B]
        has = wa >= 0
        if not has.any():
            return has
        return has & (V_of(np.where(has, wa, 0)) < self.w_clock[B])

    def _check_read(self, B, thr, site):
        cl, a = self.cl[thr], self.agent[thr]
        vc = self.clocks.vc
        bad = self._hb_write(B, lambda wa: vc[cl, a, wa])
        pend = self.pend_w[B] != 0
        if bad.any() or pend.any():
            j = int(np.flatnonzero(bad | pend)[0])
            self._read_violation(B[j], int(thr[j]), int(site[j]), bool(pend[j]), vc[cl[j], a[j]])

    def _read_violation(self, byte, t, site, pending, V, reader="read"):
        if pending:
            op = self.ops.get(int(self.pend_w[byte]), {})
            self._report("b", byte, (op.get("site", site), op.get("what", "asynchronous copy")), (site, reader),
                         "the copy has not completed: wait on its mbarrier phase (TMA, bulk copy) or with "
                         "cp.async.wait_group / wait_all (cp.async) before using the bytes")
            return
        kind = int(self.w_kind[byte])
        first = (int(self.w_site[byte]), _WRITE_WHAT[kind])
        if kind in (ASYNC, CP_ASYNC):
            why = ("the reader has not observed the mbarrier phase the copy completes" if kind == ASYNC else
                   "the reader is not ordered after the cp.async.wait_group (or mbarrier) that completed it")
            rule = "b"
        else:
            rule, why = "c", "no barrier / mbarrier orders the write before the read"
        rule, why = self._scope_hint(rule, why, byte, t, lambda row: row[int(self.w_agent[byte])] >= self.w_clock[byte])
        self._report(rule, byte, first, (site, reader), why)

    def _check_write(self, B, thr, site, what, atomic=False, V=None, issue=False):
        """WAW / WAR checks of a write (V: the writer's clock row when not the thread's own;
        issue: the write is an asynchronous copy being issued)."""
        cl, a = self.cl[thr], self.agent[thr]
        vc = self.clocks.vc
        if V is None:
            bad_w = self._hb_write(B, lambda wa: vc[cl, a, wa])
            # the writers' rows, once per agent (thread indices ascend, so do cluster, agent)
            change, first = self._runs(cl, a)
            Vu = vc[cl[first], a[first], :self.K]
            rows = self._unordered_readers(Vu.min(axis=0))
            Vk = Vu[:, rows][np.cumsum(change) - 1].T
        else:
            bad_w = self._hb_write(B, lambda wa: V[wa])
            rows = self._unordered_readers(V[:self.K])
            Vk = V[rows, None]
        if atomic:
            bad_w &= self.w_kind[B] != ATOMIC
        if len(rows):
            bad_r = (self.R.reshape(-1).take(rows[:, None] * self.R.shape[1] + B) > Vk).any(axis=0)
        else:
            bad_r = np.zeros(len(B), dtype=bool)
        pend_w = self.pend_w[B] != 0
        pend_r = self.pend_r[B] != 0
        bad = bad_w | bad_r | pend_w | pend_r
        if not bad.any():
            return
        j = int(np.flatnonzero(bad)[0])
        byte, t, s = B[j], int(thr[j]), int(site[j])
        if pend_w[j]:
            op = self.ops.get(int(self.pend_w[byte]), {})
            self._report("c", byte, (op.get("site", s), op.get("what", "asynchronous copy")), (s, what),
                         "overwrites bytes an asynchronous copy is still writing (not ordered after its completion)")
        if pend_r[j]:
            op = self.ops.get(int(self.pend_r_op[byte]), {})
            self._report("c", byte, (op.get("site", s), op.get("what", "asynchronous read")), (s, what),
                         "overwrites bytes an asynchronous operation still reads: wait for it first "
                         "(wgmma.wait_group, cp.async.bulk.wait_group.read) and order the writer after that wait")
        Vrow = V if V is not None else vc[cl[j], a[j]]
        if bad_w[j]:
            kind = int(self.w_kind[byte])
            rule = "b" if kind in (ASYNC, CP_ASYNC) and not issue else "c"
            why = ("the writer has not observed the completion of the asynchronous copy" if rule == "b"
                   else "no barrier / mbarrier orders the two writes (for an earlier asynchronous copy: "
                        "its completion)")
            rule, why = self._scope_hint(rule, why, byte, t,
                                         lambda row: row[int(self.w_agent[byte])] >= self.w_clock[byte])
            self._report(rule, byte, (int(self.w_site[byte]), _WRITE_WHAT[kind]), (s, what), why)
        if bad_r[j]:
            rk = int(self.r_kind[byte]) or R_GENERIC
            cols = np.flatnonzero(self.R[:, byte] > Vrow[:self.K])
            why = ("no barrier / mbarrier orders the read before the write" if rk == R_GENERIC else
                   "the writer is not ordered after the wait that retired the asynchronous read")
            rule, why = self._scope_hint("c", why, byte, t, lambda row: (self.R[:, byte] <= row[:self.K]).all())
            self._report(rule, byte, (int(self.r_site[byte]), _READ_WHAT[rk]), (s, what),
                         why + f" (unordered reader agents {cols.tolist()})")

    def _runs(self, cl, a):
        """Where the (cluster, agent) of a byte differs from the previous byte's (thread
        indices ascend, so each agent's bytes are one run): the change mask and the first
        byte of each run."""
        key = cl * self.K + a
        change = np.empty(len(key), dtype=bool)
        change[:1] = True
        np.not_equal(key[1:], key[:-1], out=change[1:])
        return change, np.flatnonzero(change)

    def _unordered_readers(self, V):
        """Reader agents with a read the clock row V (the least of the writers' rows) has
        not seen: only their rows of R need a look."""
        return np.flatnonzero(self.rmax > V)

    def _record_write(self, B, thr, site, kind):
        self.shadow.touch(B)
        cl, a = self.cl[thr], self.agent[thr]
        self.w_agent[B] = a
        self.w_clock[B] = self._own(cl, a)
        self.w_kind[B] = kind
        self.w_site[B] = site

    def _record_read(self, B, thr, site):
        self.shadow.touch(B)
        cl, a = self.cl[thr], self.agent[thr]
        own = self._own(cl, a)
        self.R.reshape(-1)[a * self.R.shape[1] + B] = own
        _, first = self._runs(cl, a)
        np.maximum.at(self.rmax, a[first], own[first])
        self.r_site[B] = site
        self.r_kind[B] = R_GENERIC

    def _land(self, B, thr, site):
        """cp.async bytes written by the wait (or mbarrier arrive) that completes them:
        a write of the issuing thread at that point of its program."""
        self.pend_w[B] = 0
        self._record_write(B, thr, site, CP_ASYNC)

    def _strong(self, B, thr, site, write, flat, idx):
        """volatile / relaxed / acquire / release ld and st: not data races among themselves;
        a store publishes the writer's clock on the location, a load acquires it
        (conservatively, as if every strong access were release / acquire)."""
        if write:
            self._check_write(B, thr, site, "strong store", atomic=True)
            self._record_write(B, thr, site, ATOMIC)
        else:
            cl, a = self.cl[thr], self.agent[thr]
            bad = self._hb_write(B, lambda wa: self.clocks.vc[cl, a, wa]) & (self.w_kind[B] != ATOMIC)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                self._read_violation(B[j], int(thr[j]), int(site[j]), False, None, "strong read")
        for loc in np.unique(flat).tolist():
            who = idx[flat == loc]
            c = int(self.cl[who[0]])
            row = self.clocks.row(("loc", loc - c * self.csize * self.size))
            if write:
                self.clocks.release(c, row, np.unique(self.agent[who]))
            else:
                self.clocks.acquire(c, np.unique(self.agent[who]), row)

    # ------------------------------------------------------------------ asynchronous operations
    def _agent_row(self, t):
        return self.clocks.vc[self.cl[t], self.agent[t]]

    def _async_write_issue(self, obj, t, B, ins, what, targets):
        """An asynchronous copy into shared bytes B issued by thread t: earlier accesses must
        happen before the issue; the bytes are in flight until the copy lands.
        targets: [(bytes, barrier flat or None)] per destination CTA."""
        site = int(self._site(ins, t))
        thr = np.full(len(B), t, dtype=np.int64)
        self._check_write(B, thr, np.full(len(B), site, dtype=np.int64), what, issue=True)
        op = self._op(obj, site=site, what=what, targets=targets)
        self.shadow.touch(B)
        self.pend_w[B] = op
        return op

    def _async_read_issue(self, obj, B, V, cl, site, what, rkind):
        """An asynchronous read (wgmma operand, TMA store / bulk source) issued with clock V
        (cluster cl): what it reads must be complete and visible to the async proxy."""
        wa = self.w_agent[B]
        pend = self.pend_w[B] != 0
        bad = self._hb_write(B, lambda w: V[w]) | pend
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            self._read_violation(B[j], site & 0xFFFFFFFF, site, bool(pend[j]), V, what)
        gen = (wa >= 0) & ((self.w_kind[B] == GENERIC) | (self.w_kind[B] == ATOMIC) | (self.w_kind[B] == CP_ASYNC))
        if gen.any():
            self._proxy_fenced(B[gen], V, cl, site, what)
        op = self._op(obj, site=site, what=what, bytes=B, rkind=rkind)
        self.shadow.touch(B)
        self.pend_r[B] += 1
        self.pend_r_op[B] = op
        return op

    def _proxy_fenced(self, B, V, cl, site, what):
        """Rule a: between each generic write and the async-proxy read there must be a
        fence.proxy.async (covering shared memory) that the write happens before and that
        happens before the read: the writer's own fence, or (fences are cumulative) one
        executed after a barrier by the thread that then issues the read."""
        covered = np.zeros(self.K, dtype=np.int32)       # per writer agent: last write clock fenced
        for a, (clocks, seen) in self.fences.get(cl, {}).items():
            i = bisect.bisect_right(clocks, int(V[a])) - 1
            if i >= 0:
                np.maximum(covered, seen[i], out=covered)
        wa = self.w_agent[B]
        bad = self.w_clock[B] > covered[np.minimum(wa, self.K - 1)]
        if bad.any():
            byte = B[int(np.flatnonzero(bad)[0])]
            self._report("a", byte, (int(self.w_site[byte]), _WRITE_WHAT[int(self.w_kind[byte])]),
                         (site, what), "no fence.proxy.async (.shared::cta, .shared::cluster or unqualified) "
                                       "is ordered after this write and before the async-proxy read")

    def async_perform(self, obj):
        """A queued TMA / bulk copy moves its bytes now (before its complete_tx)."""
        op = self.op_of.get(id(obj))
        info = self.ops.get(op) if op else None
        if not info:
            return
        for B, bar in info.get("targets") or ():
            B = B[self.pend_w[B] == op]
            self.pend_w[B] = 0
            c, key = self._mb(bar)
            rows, comp = self._mb_rows(key)
            self.w_agent[B] = comp
            self.w_clock[B] = self.clocks.vc[c, rows["dl"], comp] + 1
            self.w_kind[B] = ASYNC
            self.w_site[B] = info["site"]
        if "src_of" in info:
            # a shared -> shared bulk copy: no bulk group retires its source read; it is
            # over when the copy is, as of the issue
            self._retire_read(info, info["src_of"], info["src_clock"])
        if "bytes" not in info or "src_of" in info:
            del self.ops[op]
            del self.op_of[id(obj)]

    def tma_load(self, obj, t, img, coord, targets, off, bar_targets, bar_off):
        multicast = len(bar_targets) == len(targets) and len(targets) > 1
        parts = []
        for k, cta in enumerate(targets):
            B = tma_box(self.m, img, coord, cta, off)
            bcta = cta if multicast else bar_targets[0]
            parts.append((B, bcta * self.size + bar_off))
        B = np.concatenate([p[0] for p in parts])
        self._async_write_issue(obj, t, B, self.m.instr, "TMA load (async proxy write)", parts)

    def bulk_to_shared(self, obj, t, src_space, src, n, targets, off, bars, bar_off):
        span = np.arange(n, dtype=np.int64)
        parts = [(cta * self.size + off + span, (bars[k] if len(bars) == len(targets) else bars[0]) * self.size
                  + bar_off) for k, cta in enumerate(targets)]
        B = np.concatenate([p[0] for p in parts])
        op = self._async_write_issue(obj, t, B, self.m.instr, "bulk copy into shared memory (async proxy write)",
                                     parts)
        if src_space != "global":
            S = int(self.m.cta[t]) * self.size + src + span
            cl, a = int(self.cl[t]), int(self.agent[t])
            rop = self._async_read_issue(None, S, self._agent_row(t).copy(), cl, self.ops[op]["site"],
                                         "bulk copy source read (async proxy)", R_BULK)
            self.ops[op].update(self.ops.pop(rop), src_of=a, src_clock=int(self.clocks.vc[cl, a, a]))
            self.pend_r_op[S] = op

    def tma_store(self, obj, t, img, coord, cta, src):
        B = np.unique(tma_box(self.m, img, coord, cta, src))
        self._async_read_issue(obj, B, self._agent_row(t).copy(), int(self.cl[t]), int(self._site(self.m.instr, t)),
                               "TMA store source read (async proxy)", R_BULK)

    def bulk_to_global(self, obj, t, cta, src, n):
        B = cta * self.size + src + np.arange(n, dtype=np.int64)
        self._async_read_issue(obj, B, self._agent_row(t).copy(), int(self.cl[t]), int(self._site(self.m.instr, t)),
                               "bulk copy source read (async proxy)", R_BULK)

    def bulk_retired(self, obj, t):
        """cp.async.bulk.wait_group(.read) of thread t retired the copy: its source reads are
        done, as of this point of t's program."""
        op = self.op_of.pop(id(obj), None)
        info = self.ops.pop(op, None) if op else None
        if not info or "bytes" not in info:
            return
        cl, a = int(self.cl[t]), int(self.agent[t])
        self._retire_read(info, a, self.clocks.vc[cl, a, a])

    def _retire_read(self, info, col, clock):
        B = info["bytes"]
        self.pend_r[B] -= 1
        self.R[col, B] = clock
        self.rmax[col] = max(self.rmax[col], clock)
        self.r_site[B] = info["site"]
        self.r_kind[B] = info["rkind"]

    def cp_async_issue(self, batch):
        """cp.async: its destination bytes are in flight until a wait of the issuing thread
        performs them (they land through shared_access as writes of that thread)."""
        thr = np.repeat(batch.thr, batch.size)
        B = expand(self.m.cta[batch.thr].astype(np.int64) * self.size + batch.dst.astype(np.int64), batch.size)
        site = self._site(batch.ins, thr)
        self._check_write(B, thr, site, "cp.async copy", issue=True)
        self.shadow.touch(B)
        self.pend_w[B] = self._op(None, site=int(site[0]), what="cp.async copy")

    def wgmma_issue(self, rec):
        threads = rec["threads"]
        cl = int(self.cl[threads[0]])
        warps = np.unique(self.agent[threads])
        V = self.clocks.vc[cl, warps].max(axis=0)      # the warpgroup issues it together
        B = wgmma_operands(self.m, rec)
        if len(B):
            self._async_read_issue(rec, B, V, cl, int(self._site(rec["ins"], threads[0])),
                                   "wgmma.mma_async operand read (async proxy)", R_WGMMA)

    def wgmma_retired(self, rec, threads):
        """wgmma.wait_group retired `rec`: its operand reads are over; the waiting warps
        observe that (through the warpgroup's completion agent)."""
        op = self.op_of.pop(id(rec), None)
        info = self.ops.pop(op, None) if op else None
        cl = int(self.cl[threads[0]])
        g = int(self.wg_agent[threads[0]])
        vc = self.clocks.vc[cl]
        vc[g, g] += 1
        if info:
            self._retire_read(info, g, vc[g, g])
        warps = np.unique(self.agent[threads])
        vc[warps, g] = np.maximum(vc[warps, g], vc[g, g])

    def accumulator(self, name, idx, what):
        """Rule d: register `name` of an in-flight wgmma read or written by threads idx.
        Returns True when recorded (collect mode); raises otherwise."""
        t = int(idx[0])
        g = int(self.m.cta[t]) * 8 + int(self.m.lin[t]) // 128
        st = self.m.ext.get("wgmma", {}).get(g, {})
        pending = st.get("uncommitted", []) + [r for grp in st.get("groups", []) for r in grp]
        rec = next((r for r in pending if name in r["d"] + r.get("a_regs", [])), None)
        first = (int(self._site(rec["ins"], rec["threads"][0])), "wgmma.mma_async") if rec else None
        self._report("d", None, first, (int(self._site(self.m.instr, t)), f"{what} {name}"),
                     f"{name} belongs to a wgmma.mma_async that is still in flight: wait with wgmma.wait_group first")
        return True

    # ------------------------------------------------------------------ fences and barriers
    def fence(self, ins, idx):
        mods = ins.mods
        if "proxy" not in mods:
            self._thread_fence(mods, idx)
            return
        if not any(x.startswith("async") for x in mods) or "global" in mods:
            return
        for cl in np.unique(self.cl[idx]).tolist():
            agents = np.unique(self.agent[idx[self.cl[idx] == cl]])
            vc = self.clocks.vc[cl]
            for a in agents.tolist():
                clocks, seen = self.fences.setdefault(cl, {}).setdefault(a, ([], []))
                clocks.append(int(vc[a, a]))
                seen.append(vc[a, :self.K].copy())
            vc[agents, agents] += 1

    def _thread_fence(self, mods, idx):
        """fence{.sem}.scope (and its .sync_restrict::shared forms) at cluster scope or wider;
        .op_restrict (mbarrier_init) fences and narrower scopes are not modelled."""
        if not _WIDE & set(mods) or "mbarrier_init" in mods:
            return
        sems = _SEMS & set(mods) or {"acq_rel"}
        for cl in np.unique(self.cl[idx]).tolist():
            who = idx[self.cl[idx] == cl]
            agents = np.unique(self.agent[who])
            if sems & {"sc", "acq_rel", "acquire"}:
                pending = self.acq_pending[who]
                if pending.any():
                    got = np.unique(self.agent[who[pending]])
                    rows = [self.clocks.row(("acqpend", int(a))) for a in got.tolist()]
                    for a, r in zip(got.tolist(), rows):
                        self.clocks.acquire(cl, np.array([a]), r)
                    self.acq_pending[who] = False
            if sems & {"sc", "acq_rel", "release"}:
                rows = [self.clocks.row(("relfence", int(a))) for a in agents.tolist()]
                for a, r in zip(agents.tolist(), rows):
                    self.clocks.release(cl, r, np.array([a]))
                self.rel_fenced[who] = True

    def bar_arrive(self, cta, bid, who):
        """bar.sync / bar.arrive / barrier.sync of threads idx of CTA `cta` (machine index)."""
        self.clocks.release(int(cta) // self.csize, self.clocks.row(("bar", int(cta), int(bid))),
                            np.unique(self.agent[who]))

    def bar_complete(self, cta, bid, released):
        """The barrier instance completed; its waiting threads go on having seen every arrival."""
        key = ("bar", int(cta), int(bid))
        if len(released):
            self.clocks.acquire(int(cta) // self.csize, np.unique(self.agent[released]), self.clocks.row(key))
        self.clocks.drop(key)

    def cluster_arrive(self, base, who, release):
        if release:
            self.clocks.release(int(base) // self.csize, self.clocks.row(("cbar", "p")), np.unique(self.agent[who]))

    def cluster_complete(self, base, waiting):
        cl = int(base) // self.csize
        p, d = self.clocks.row(("cbar", "p")), self.clocks.row(("cbar", "d"))
        vc = self.clocks.vc[cl]
        np.maximum(vc[d], vc[p], out=vc[d])
        vc[p] = 0
        if len(waiting):
            self.clocks.acquire(cl, np.unique(self.agent[np.asarray(waiting)]), d)

    def cluster_wait(self, base, who, blocked):
        go = np.setdiff1d(who, np.asarray(blocked, dtype=np.int64))
        if len(go):
            self.clocks.acquire(int(base) // self.csize, np.unique(self.agent[go]), self.clocks.row(("cbar", "d")))

    # ------------------------------------------------------------------ mbarriers
    def _mb(self, flat):
        c = int(flat) // self.size // self.csize
        return c, int(flat) - c * self.csize * self.size

    def _mb_rows(self, key):
        """Rows (by part, see _PEND / _DONE) and phase column of mbarrier `key`; made
        before any clock row is indexed, as making them may grow the clock array."""
        rows = {p: self.clocks.row(("mb", key, p)) for p in _PEND + _DONE}
        return rows, self.clocks.comp(key)

    def mbar_arrive(self, ins, flat, idx, cta_scope_only=False):
        """Arrivals (release unless .relaxed) of threads idx on the barriers at `flat`."""
        mods = ins.mods if ins is not None else ()
        flat = np.asarray(flat, dtype=np.int64)
        fenced = "relaxed" in mods          # publishes what the thread's last release fence saw
        if fenced:
            keep = self.rel_fenced[idx]
            if not keep.any():
                return
            flat, idx = flat[keep], idx[keep]
        cluster_scope = "cluster" in mods and not cta_scope_only
        remote = (flat // self.size) != self.m.cta[idx]
        for f in np.unique(flat).tolist():
            for rem in (False, True):
                sel = (flat == f) & (remote == rem)
                if not sel.any():
                    continue
                c, key = self._mb(f)
                part = "pl" if not rem else ("pc" if cluster_scope else "pw")
                rows, _ = self._mb_rows(key)
                agents = np.unique(self.agent[idx[sel]])
                if fenced:
                    snaps = [self.clocks.row(("relfence", int(a))) for a in agents.tolist()]
                    vc = self.clocks.vc[c]
                    for r in snaps:
                        np.maximum(vc[rows[part]], vc[r], out=vc[rows[part]])
                else:
                    self.clocks.release(c, rows[part], agents)
                if part == "pw":
                    self.weak_sites[key] = int(self._site(ins, idx[sel][0]))

    def cp_async_mbar_arrive(self, addr, idx):
        flat = self.m.cta[idx].astype(np.int64) * self.size + np.asarray(addr, dtype=np.int64)
        self.mbar_arrive(None, flat, idx)

    def mbar_complete(self, flat):
        c, key = self._mb(flat)
        rows, comp = self._mb_rows(key)
        vc = self.clocks.vc[c]
        for p, d in zip(_PEND, _DONE):
            np.maximum(vc[rows[d]], vc[rows[p]], out=vc[rows[d]])
            vc[rows[p]] = 0
        vc[rows["dl"], comp] += 1

    def mbar_wait(self, ins, flat, idx, done):
        mods = ins.mods
        scope = 0 if "relaxed" in mods else (2 if "cluster" in mods else 1)
        self.wait_scope[idx] = scope
        self.wait_relaxed_cluster[idx] = scope == 0 and "cluster" in mods
        self.wait_site[idx] = self._site(ins, idx)
        if done.any():
            self._mbar_acquire(np.asarray(flat)[done], idx[done])

    def mbar_woken(self, flat, idx):
        self._mbar_acquire(np.full(len(idx), flat, dtype=np.int64), idx)

    def _mbar_acquire(self, flat, idx):
        for f in np.unique(flat).tolist():
            sel = (flat == f) & self.wait_relaxed_cluster[idx]
            if sel.any():                    # relaxed .cluster wait: acquired by the next acquire fence
                c, key = self._mb(f)
                who = idx[sel]
                agents = np.unique(self.agent[who]).tolist()
                rows, _ = self._mb_rows(key)
                pend = [self.clocks.row(("acqpend", int(a))) for a in agents]
                vc = self.clocks.vc[c]
                for r in pend:
                    np.maximum(vc[r], np.maximum(vc[rows["dl"]], vc[rows["dc"]]), out=vc[r])
                self.acq_pending[who] = True
            for scope in (1, 2):
                sel = (flat == f) & (self.wait_scope[idx] == scope)
                if not sel.any():
                    continue
                c, key = self._mb(f)
                who = idx[sel]
                agents = np.unique(self.agent[who])
                rows, _ = self._mb_rows(key)
                self.clocks.acquire(c, agents, rows["dl"])
                if scope == 2:
                    self.clocks.acquire(c, agents, rows["dc"])
                vc = self.clocks.vc[c]
                weak = vc[rows["dw"]].copy()
                if scope == 1:
                    np.maximum(weak, vc[rows["dc"]], out=weak)
                if weak.any():
                    why = ("this .cta-scoped acquire (add .acquire.cluster) does not synchronise with the "
                           "peer CTA's arrivals" if scope == 1 else
                           "the peer CTA arrived with a .cta-scoped release (add .release.cluster)")
                    site = int(self.wait_site[who[0]]) if scope == 1 else self.weak_sites.get(
                        key, int(self.wait_site[who[0]]))
                    for a in agents.tolist():
                        self.weak[(c, a, key)] = (np.maximum(weak, vc[a]), site, why)

    def _scope_hint(self, rule, why, byte, t, covered):
        """A race that a wider-scoped synchronisation the reader did perform would have
        ordered is reported as rule e, naming that synchronisation."""
        c, a = int(self.cl[t]), int(self.agent[t])
        for (wc, wa, _), (row, site, hint) in self.weak.items():
            if wc == c and wa == a and covered(row):
                d = self._describe(site, "")
                return "e", f"{hint}: PTX line {d['line']} ({d['text']})"
        return rule, why
