"""Records what each warp executes during an emulator launch, for the timing model.

`Recorder` is passed as `emu.launch(..., trace=recorder)`; for each Machine (a cluster or
the co-resident grid) it wraps the instruction handlers and records, per warp, the
executed instructions (PTX index) with what timing needs and the functional execution
knows: shared-memory wavefronts (bank conflicts from the emulator's counter), global
bytes, the mbarrier phase each arrival, transaction and wait belongs to, named / cluster
barrier generations, wgmma shapes and groups, cp.async and bulk-copy bytes and groups.
The replay (sm.py) then times these per-warp streams; the functional order is not used.
"""
import collections
import dataclasses

import numpy as np

from ..emu.ops import mbarrier as mb
from ..emu.parser import type_size

_TYPES = ("b8", "u8", "s8", "b16", "u16", "s16", "f16", "bf16", "b32", "u32", "s32", "f32", "b64", "u64",
          "s64", "f64", "f16x2", "bf16x2")


def access_bytes(ins) -> int:
    """Bytes one thread moves with a ld/st (vector width x type)."""
    vec = 4 if "v4" in ins.mods else 2 if "v2" in ins.mods else 8 if "v8" in ins.mods else 1
    t = next((m for m in reversed(ins.mods) if m in _TYPES), "b32")
    return vec * type_size(t)


@dataclasses.dataclass
class Copy:
    """One asynchronous bulk / TMA copy."""
    warp: int
    cta: int
    store: bool
    global_bytes: int = 0
    phases: list = dataclasses.field(default_factory=list)   # [(barrier flat, phase)] it completes tx on
    performed: bool = False


class Recording:
    """The per-warp event streams of one Machine."""

    def __init__(self, m):
        self.m = m
        self.nwarps = int(m.warp.max()) + 1 if m.T else 0
        self.warps_per_cta = (m.nthreads + 31) // 32
        self.ncta = m.ncta
        self.cluster_size = int(np.prod(m.L.cluster))
        self.smem_size = m.shared.size                     # flat barrier index // smem_size = its CTA
        self.events = [[] for _ in range(self.nwarps)]
        self.copies = []
        self._copy_of = {}
        self._bar_gen = collections.defaultdict(int)      # (cta, id) -> generation
        self._bar_open = set()
        self._warp_cluster = {}
        self.kernel = m.kernel
        self._pcs = {id(x): i for i, x in enumerate(m.kernel.instrs)}

    # ---------------------------------------------------------------- wrapping
    def wrap(self, opcode, handler):
        rec = self

        def run(m, ins, idx):
            pre = rec._pre(m, ins, idx)
            st = m.L.stats
            before = (st.shared_accesses, st.bank_conflicts, st.global_read, st.global_written)
            handler(m, ins, idx)
            rec._post(m, ins, idx, pre, before)
        return run

    def _split(self, idx):
        """(warp, thread indices) pairs of idx (sorted thread indices)."""
        if not len(idx):
            return []
        w = self.m.warp[idx]
        cuts = np.flatnonzero(w[1:] != w[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        return [(int(w[a]), s) for a, s in zip(starts.tolist(), np.split(idx, cuts))]

    def _pre(self, m, ins, idx):
        op = ins.opcode
        if op == "mbarrier" and ins.mods[0] != "pending_count" and len(idx):
            space = mb._space(ins)
            flat = mb.shared_flat(m, m.address(mb._mem(ins), idx, space), idx, space, "trace")
            bars = m.ext.get("mbarrier", {})
            phase = np.array([bars[f]["phase"] if f in bars else 0 for f in flat.tolist()], dtype=np.int64)
            target = None
            if ins.mods[0] in ("try_wait", "test_wait"):
                target = m.read(ins.operands[2], "u32" if "parity" in ins.mods else "u64", idx).astype(np.int64)
            return flat, phase, target
        if op in ("bar", "barrier") and "cluster" in ins.mods:
            st = m.ext.get("cluster_bar", {})
            base = m.cluster_base[idx]
            phase = np.array([st.get(int(b), {"phase": 0})["phase"] for b in base.tolist()], dtype=np.int64)
            done = np.array([st.get(int(b), {"done": {}})["done"].get(int(t), -1)
                             for b, t in zip(base.tolist(), idx.tolist())], dtype=np.int64)
            return base, phase, done
        if op in ("bar", "barrier") and "warp" not in ins.mods and len(idx):
            bid = m.read(ins.operands[0], "u32", idx) if ins.operands else np.zeros(len(idx), dtype=np.uint32)
            keys = list(zip(m.cta[idx].tolist(), bid.tolist()))
            for key in set(keys):
                if key in self._bar_open and key not in m.barriers:
                    self._bar_gen[key] += 1                 # completed when threads exited
                    self._bar_open.discard(key)
            return [(c, b, self._bar_gen[(c, b)]) for c, b in keys]
        if op == "cp" and "bulk" in ins.mods and "commit_group" not in ins.mods and "wait_group" not in ins.mods:
            return {id(o) for o in m.async_ops}
        return None

    def _post(self, m, ins, idx, pre, before):
        op, mods = ins.opcode, ins.mods
        pc = self._pc(ins)
        groups = self._split(idx)
        st = m.L.stats
        if not groups:
            return
        if op == "mbarrier" and pre is not None:
            flat, phase, target = pre
            kind = mods[0]
            for w, sel in groups:
                j = np.searchsorted(idx, sel)
                if kind in ("arrive", "arrive_drop"):
                    cnt = collections.Counter(zip(flat[j].tolist(), phase[j].tolist()))
                    self.events[w].append((pc, "A", sorted((f, p, n) for (f, p), n in cnt.items())))
                elif kind in ("try_wait", "test_wait"):
                    if "parity" in mods:
                        # the phase awaited: the current one if its parity matches, else the one before
                        ks = [p if (p & 1) == (t & 1) else p - 1 for p, t in zip(phase[j].tolist(), target[j].tolist())]
                    else:
                        ks = (target[j] & 0xFFFFFFFF).tolist()
                    self.events[w].append((pc, "W", sorted(set(zip(flat[j].tolist(), ks)))))
                else:
                    self.events[w].append((pc, "x", None))
            return
        if op in ("bar", "barrier") and "cluster" in mods:
            base, phase, done = pre
            for w, sel in groups:
                j = np.searchsorted(idx, sel)
                b = int(base[j[0]])
                if "arrive" in mods or "wait" not in mods:
                    self.events[w].append((pc, "CA", (b, int(phase[j[0]]))))
                if "wait" in mods:
                    arrived = int(done[j[0]]) if "arrive" not in mods else int(phase[j[0]])
                    self.events[w].append((pc, "CW", (b, arrived)))
            return
        if op in ("bar", "barrier") and "warp" not in mods:
            sync = "arrive" not in mods
            for w, sel in groups:
                j = np.searchsorted(idx, sel)
                c, b, g = pre[j[0]]
                self.events[w].append((pc, "B", ((c, b, g), sync)))
            for c, b, g in set(pre):
                if (c, b) in m.barriers:
                    self._bar_open.add((c, b))
                else:
                    self._bar_gen[(c, b)] += 1
                    self._bar_open.discard((c, b))
            return
        if op == "wgmma":
            kind = mods[0]
            if kind == "mma_async":
                shape = next(x for x in mods if x.startswith("m64n"))
                n = int(shape[4:shape.index("k")])
                k = int(shape[shape.index("k") + 1:])
                dtype = mods[-1]
                a_regs = ins.operands[1].kind == "vec"
                for w, _ in groups:
                    self.events[w].append((pc, "M", (n, k, dtype, a_regs)))
            elif kind == "commit_group":
                for w, _ in groups:
                    self.events[w].append((pc, "MC", None))
            elif kind == "wait_group":
                n = int(ins.operands[0].value)
                for w, _ in groups:
                    self.events[w].append((pc, "MW", n))
            else:
                for w, _ in groups:
                    self.events[w].append((pc, "x", None))
            return
        if op == "cp" and "bulk" in mods:
            if "commit_group" in mods:
                for w, _ in groups:
                    self.events[w].append((pc, "BC", None))
            elif "wait_group" in mods:
                for w, _ in groups:
                    self.events[w].append((pc, "BW", int(ins.operands[0].value)))
            elif "prefetch" in mods:
                for w, _ in groups:
                    self.events[w].append((pc, "x", None))
            else:
                new = [o for o in m.async_ops if id(o) not in pre]
                by_warp = collections.defaultdict(list)
                for o in new:
                    # the issuing thread: the op's position among idx is its order of issue
                    by_warp[groups[0][0] if len(groups) == 1 else None].append(o)
                if None in by_warp:                          # several warps issued: attribute in order
                    order = [w for w, sel in groups for _ in range(len(sel))]
                    by_warp = collections.defaultdict(list)
                    for w, o in zip(order, new):
                        by_warp[w].append(o)
                spaces = [x for x in mods if x in ("global", "shared", "shared::cta", "shared::cluster")]
                store = bool(spaces) and spaces[0] == "global"
                for w, _ in groups:
                    ids = [self._register_copy(o, w, store) for o in by_warp.get(w, [])]
                    self.events[w].append((pc, "T", ids))
            return
        if op == "cp" and "async" in mods:
            if "commit_group" in mods:
                for w, _ in groups:
                    self.events[w].append((pc, "CC", None))
            elif "wait_group" in mods or "wait_all" in mods:
                n = int(ins.operands[0].value) if "wait_group" in mods else 0
                for w, _ in groups:
                    self.events[w].append((pc, "CWG", n))
            elif "mbarrier" in mods:
                for w, _ in groups:
                    self.events[w].append((pc, "x", None))
            else:
                size = int(ins.operands[2].value) if ins.operands[2].kind == "imm" else 16
                for w, sel in groups:
                    self.events[w].append((pc, "CP", size * len(sel)))
            return
        d_sh, d_bc = st.shared_accesses - before[0], st.bank_conflicts - before[1]
        d_gl = (st.global_read - before[2]) + (st.global_written - before[3])
        if d_sh:
            per = access_bytes(ins)
            if op in ("ldmatrix", "stmatrix"):
                x = next((int(t[1:]) for t in mods if t in ("x1", "x2", "x4")), 1)
                per = 4 * x                       # x matrices of 8 rows x 16 bytes per warp
            extra = d_bc / len(groups)
            for w, sel in groups:
                waves = max(1.0, len(sel) * per / 128.0) + extra
                self.events[w].append((pc, "s", waves))
            return
        if d_gl and op in ("ld", "st", "atom", "red", "ldu"):
            for w, sel in groups:
                self.events[w].append((pc, "g", d_gl / len(groups)))
            return
        for w, _ in groups:
            self.events[w].append((pc, "x", None))

    # ---------------------------------------------------------------- copies
    def _register_copy(self, o, warp, store):
        c = Copy(warp=warp, cta=warp // self.warps_per_cta, store=store)
        cid = len(self.copies)
        self.copies.append(c)
        orig = o.perform

        def perform(m, _orig=orig, _c=c):
            if _c.performed:
                return _orig(m)
            bars = m.ext.get("mbarrier", {})
            snap = {f: (b["phase"], b["tx"]) for f, b in bars.items()}
            st = m.L.stats
            g0 = st.global_read + st.global_written
            _orig(m)
            _c.performed = True
            _c.global_bytes = st.global_read + st.global_written - g0
            for f, (ph, tx) in snap.items():
                b = bars.get(f)
                if b is not None and (b["phase"] != ph or b["tx"] != tx):
                    _c.phases.append((f, ph))
        o.perform = perform
        return cid

    def _pc(self, ins):
        return self._pcs[id(ins)]


class Recorder:
    """The `trace=` observer of emu.launch: one Recording per Machine."""

    def __init__(self):
        self.recordings = []

    def attach(self, machine):
        rec = Recording(machine)
        self.recordings.append(rec)
        machine.handlers = {op: rec.wrap(op, h) for op, h in machine.handlers.items()}
