"""Control flow, CTA barriers, warp-collective operations, fences and hints."""
import numpy as np

from ..errors import EmuError, UnsupportedInstruction
from ..machine import DONE
from . import op, types_of


@op("bra")
def bra(m, ins, idx):
    target = ins.operands[0].value
    if target not in m.kernel.labels:
        m.fail(EmuError, f"branch to unknown label {target}", idx)
    dest = m.kernel.labels[target]
    here = int(m.pc[idx[0]]) - 1
    m.pc[idx] = dest
    if dest <= here:
        m.epoch[idx] += 1   # a loop iteration: lets lagging threads catch up first
        m.progress.backedge(idx, here, dest)


@op("ret", "exit")
def ret(m, ins, idx):
    m.state[idx] = DONE
    m.state_version += 1
    _release_barriers(m)
    m.conv.on_exit(idx)


@op("trap", "brkpt")
def trap(m, ins, idx):
    m.fail(EmuError, f"{ins.opcode} executed", idx)


def _release_barriers(m):
    """Exited threads no longer count as expected at a CTA or cluster barrier."""
    for key in list(m.barriers):
        _try_complete(m, key)
    for base, s in m.ext.get("cluster_bar", {}).items():
        _try_complete_cluster(m, base, s)


def _expected(m, cta, count):
    if count is not None:
        return count
    alive = (m.cta == cta) & (m.state != DONE)
    # barriers count whole warps
    warps = np.unique(m.warp[alive])
    return len(warps) * 32 if len(warps) else 0


def _arrived_warps(m, arrived):
    """Warps whose every live thread has arrived: a warp arrives as a whole (the ISA
    counts warps), but lanes that diverged reach the barrier at different times."""
    if not arrived:
        return 0
    got = np.zeros(m.T, dtype=bool)
    got[np.fromiter(arrived, dtype=np.int64)] = True
    n = 0
    for w in np.unique(m.warp[got]):
        members = m.warp == w
        n += bool(np.all(got[members] | (m.state[members] == DONE)))
    return n


def _try_complete(m, key):
    arrived, count, blocked = m.barriers[key]
    cta = key[0]
    need = _expected(m, cta, count)
    warps_arrived = _arrived_warps(m, arrived) * 32
    if warps_arrived > need and count is not None:
        raise EmuError(f"{m.kernel.name}: barrier {key[1]} of CTA {cta}: {warps_arrived} threads arrived "
                       f"but the instruction says {count} (thread-count mismatch)")
    if need and warps_arrived >= need:
        release = np.array(sorted(blocked), dtype=np.int64)
        del m.barriers[key]
        if m.order:
            m.order.bar_complete(key[0], key[1], release)
        if len(release):
            m.unblock(release)
            # Threads leaving a barrier together run together again (their loop counts,
            # hence epochs, may differ): one scheduler step for all of them.
            m.epoch[release] = m.epoch[release].max()
        m.state_version += 1


@op("bar", "barrier")
def bar(m, ins, idx):
    mods = ins.mods
    if "warp" in mods:          # bar.warp.sync: the machine converged its mask (convergence.py)
        return
    if "cluster" in mods:
        return cluster_barrier(m, ins, idx)
    if not len(idx):
        return
    arrive = "arrive" in mods
    if "red" in mods:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented", idx)
    bid = m.read(ins.operands[0], "u32", idx) if ins.operands else np.zeros(len(idx), dtype=np.uint32)
    cnt = m.read(ins.operands[1], "u32", idx) if len(ins.operands) > 1 else None
    for cta in np.unique(m.cta[idx]):
        sel = m.cta[idx] == cta
        for b in np.unique(bid[sel]):
            s2 = sel & (bid == b)
            key = (int(cta), int(b))
            count = int(cnt[s2][0]) if cnt is not None else None
            if count is not None and count % 32:
                m.fail(EmuError, f"barrier thread count {count} is not a multiple of 32", idx)
            entry = m.barriers.setdefault(key, (set(), count, set()))
            if entry[1] != count:
                m.fail(EmuError, f"barrier {b}: thread counts differ between arrivals ({entry[1]} vs {count})", idx)
            who = idx[s2]
            entry[0].update(who.tolist())
            if m.order:
                m.order.bar_arrive(cta, b, who)
            if not arrive:
                entry[2].update(who.tolist())
                m.block(who, f"bar.sync {b} (CTA barrier, {count or 'all'} threads)")
            _try_complete(m, key)


def cluster_barrier(m, ins, idx):
    """barrier.cluster.arrive / wait (and .sync when both are meant). A phase completes
    when every thread of the cluster that has not exited has arrived."""
    st = m.ext.setdefault("cluster_bar", {})
    wait = "wait" in ins.mods
    arrive = "arrive" in ins.mods or not wait
    csize = int(np.prod(m.L.cluster))
    for base in np.unique(m.cluster_base[idx]):
        who = idx[m.cluster_base[idx] == base]
        s = st.setdefault(int(base), {"phase": 0, "arrived": set(), "done": {}, "waiters": {}})
        if arrive:
            s["arrived"].update(who.tolist())
            for t in who.tolist():
                s["done"][t] = s["phase"]
            if m.order:
                m.order.cluster_arrive(base, who, "relaxed" not in ins.mods)
            _try_complete_cluster(m, int(base), s)
        if wait:
            pending = [t for t in who.tolist() if s["done"].get(t, -1) >= s["phase"]]
            if m.order:
                m.order.cluster_wait(base, who, pending)
            if pending:
                s["waiters"].update({t: s["phase"] for t in pending})
                m.block(np.array(pending, dtype=np.int64), f"barrier.cluster.wait ({csize} CTAs)")


def _try_complete_cluster(m, base, s):
    members = np.flatnonzero((m.cluster_base == base) & (m.state != DONE))
    if not s["arrived"] and not s["waiters"]:
        return
    if set(members.tolist()) <= s["arrived"]:
        s["phase"] += 1
        s["arrived"] = set()
        waiting = list(s["waiters"])
        if m.order:
            m.order.cluster_complete(base, waiting)
        s["waiters"] = {}
        if waiting:
            m.unblock(np.array(waiting, dtype=np.int64))
        m.state_version += 1


@op("membar", "fence", "nanosleep", "griddepcontrol", "pmevent")
def nop_ordering(m, ins, idx):
    # The emulator executes memory operations in program order and makes each visible at
    # once, which satisfies every ordering these instructions request; the ordering
    # checker records proxy fences.
    if m.order:
        m.order.fence(ins, idx)


@op("setmaxnreg")
def setmaxnreg(m, ins, idx):
    n = ins.operands[0].value
    if n % 8 or not 24 <= n <= 256:
        m.fail(EmuError, f"setmaxnreg: register count {n} must be a multiple of 8 in [24, 256]", idx)
    m.ext.setdefault("setmaxnreg", []).append((ins.full, n))


@op("activemask")
def activemask(m, ins, idx):
    r = np.zeros(len(idx), dtype=np.uint32)
    for w in np.unique(m.warp[idx]):
        sel = m.warp[idx] == w
        r[sel] = np.bitwise_or.reduce((np.uint32(1) << m.lane[idx[sel]]).astype(np.uint32))
    m.write(ins.operands[0], r, "b32", idx)


def _warp_groups(m, idx):
    for w in np.unique(m.warp[idx]):
        yield idx[m.warp[idx] == w]


@op("shfl")
def shfl(m, ins, idx):
    mode = next(x for x in ("up", "down", "bfly", "idx") if x in ins.mods)
    dst = ins.operands[0]
    dsts = dst.value if dst.kind == "vec" else [dst]
    a_op, b_op, c_op = ins.operands[1:4]
    b = m.read(b_op, "u32", idx).astype(np.int64)
    c = m.read(c_op, "u32", idx).astype(np.int64)
    lane = m.lane[idx].astype(np.int64)
    clamp = c & 0x1F
    seg = (c >> 8) & 0x1F
    max_lane = (lane & seg) | (clamp & ~seg)
    min_lane = lane & seg
    if mode == "up":
        j = lane - b
        ok = j >= max_lane
    elif mode == "down":
        j = lane + b
        ok = j <= max_lane
    elif mode == "bfly":
        j = lane ^ b
        ok = j <= max_lane
    else:
        j = min_lane | (b & 0x1F & ~seg)
        ok = j <= max_lane
    j = np.where(ok, j, lane)
    src = idx - lane + j                      # thread index of the source lane
    active = np.zeros(m.T, dtype=bool)
    active[idx] = True
    if not active[src].all():
        m.fail(EmuError, "shfl.sync reads a lane that is not executing this shfl (undefined result)", idx)
    vals = m.read(a_op, "b32", src)
    m.write(dsts[0], vals, "b32", idx)
    if len(dsts) > 1:
        m.write(dsts[1], ok, "pred", idx)


def _mask_groups(m, ins, idx):
    """Threads of idx that execute a .sync collective together: one group per warp and
    membermask (the last operand); the result covers the threads of the mask only."""
    mask = m.read(ins.operands[-1], "b32", idx).astype(np.int64) if "sync" in ins.mods else 0
    key = m.warp[idx].astype(np.int64) * (1 << 32) + mask
    for k in np.unique(key):
        yield np.flatnonzero(key == k)


@op("vote")
def vote(m, ins, idx):
    mode = next(x for x in ("all", "any", "uni", "ballot") if x in ins.mods)
    p_op = ins.operands[1]
    p = m.read(p_op, "pred", idx)
    out = np.zeros(len(idx), dtype=np.uint32 if mode == "ballot" else np.bool_)
    for sel in _mask_groups(m, ins, idx):
        pv = p[sel]
        if mode == "ballot":
            out[sel] = np.bitwise_or.reduce(np.where(pv, np.uint32(1) << m.lane[idx[sel]], 0).astype(np.uint32))
        elif mode == "all":
            out[sel] = pv.all()
        elif mode == "any":
            out[sel] = pv.any()
        else:
            out[sel] = pv.all() or not pv.any()
    m.write(ins.operands[0], out, "b32" if mode == "ballot" else "pred", idx)


@op("redux")
def redux(m, ins, idx):
    kind = next(x for x in ("add", "min", "max", "and", "or", "xor") if x in ins.mods)
    t = types_of(ins)[-1]
    v = m.read(ins.operands[1], t, idx)
    out = np.empty(len(idx), dtype=v.dtype)
    for sel in _mask_groups(m, ins, idx):
        x = v[sel]
        with np.errstate(over="ignore"):
            r = {"add": lambda: x.sum(dtype=x.dtype), "min": x.min, "max": x.max,
                 "and": lambda: np.bitwise_and.reduce(x), "or": lambda: np.bitwise_or.reduce(x),
                 "xor": lambda: np.bitwise_xor.reduce(x)}[kind]()
        out[sel] = r
    m.write(ins.operands[0], out, t, idx)


@op("match")
def match(m, ins, idx):
    """match.any.sync: each thread gets the mask of the threads of its group holding the
    same value; match.all.sync: every thread gets the group's mask if all values agree,
    else 0 (and the predicate says which)."""
    dst = ins.operands[0]
    dsts = dst.value if dst.kind == "vec" else [dst]
    v = m.read(ins.operands[1], "b64" if "b64" in ins.mods else "b32", idx)
    out = np.zeros(len(idx), dtype=np.uint32)
    same = np.zeros(len(idx), dtype=bool)
    for sel in _mask_groups(m, ins, idx):
        vals, bits = v[sel], np.uint32(1) << m.lane[idx[sel]].astype(np.uint32)
        if "all" in ins.mods:
            agree = bool((vals == vals[0]).all())
            out[sel] = np.bitwise_or.reduce(bits) if agree else 0
            same[sel] = agree
        else:
            for i, x in zip(sel, vals):
                out[i] = np.bitwise_or.reduce(bits[vals == x])
    m.write(dsts[0], out, "b32", idx)
    if len(dsts) > 1:
        m.write(dsts[1], same, "pred", idx)


@op("elect")
def elect(m, ins, idx):
    dst = ins.operands[0]
    dsts = dst.value if dst.kind == "vec" else [dst]
    leader = np.zeros(len(idx), dtype=np.uint32)
    is_leader = np.zeros(len(idx), dtype=bool)
    for sel in _mask_groups(m, ins, idx):
        # the lowest predicated-on lane of the mask (idx holds the guard-true threads only)
        lanes = m.lane[idx[sel]]
        ld = int(lanes.min())
        leader[sel] = ld
        is_leader[sel] = lanes == ld
    if dsts[0].kind != "sink":
        m.write(dsts[0], leader, "b32", idx)
    if len(dsts) > 1:
        m.write(dsts[1], is_leader, "pred", idx)
