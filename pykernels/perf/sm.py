"""Cycle-approximate replay of recorded warp streams (trace.py) on Hopper SMs.

One CTA per SM. Per SM: four sub-partition schedulers, each issuing at most one warp
instruction per clock, in order per warp, from the warp whose next instruction is ready
earliest (its source registers' results, its pipe free; ties go to the warp that issued
least recently); per-sub-partition pipes (FP32,
INT, MUFU, conversion, shuffle) with the issue interval of their lane count; one
shared-memory port (a 128-byte wavefront per clock, bank conflicts add wavefronts); one
tensor-core pipe (a warpgroup's wgmma takes 64 N K / rate clocks, or its shared-memory
operand bytes / 128 if more); bytes of TMA, bulk, cp.async and global accesses move
through two queues in series: the cluster's pooled share of L2 / HBM bandwidth and each
receiving SM's port (memory.py); bulk copies queue in issue order, ordinary global
accesses (the LSU path) only use their bandwidth. Asynchronous work runs
beside the issuing warps; mbarrier phases, named and cluster barriers, wgmma and copy
groups complete at the modelled times of what they wait for (the phase each event belongs
to comes from the functional run).
"""
import collections
import dataclasses
import heapq

from .machines import Part

_MUFU = {"ex2", "lg2", "rcp", "rsqrt", "sqrt", "sin", "cos", "tanh", "div"}
_SHFL = {"shfl", "vote", "redux", "elect", "match", "activemask"}
_CTL = {"bra", "ret", "exit", "call", "trap", "fence", "membar", "setmaxnreg", "nanosleep", "griddepcontrol",
        "pmevent", "prefetch", "prefetchu"}
_NO_DEST = {"st", "red", "bar", "barrier", "cp", "fence", "membar", "bra", "ret", "exit", "stmatrix", "prefetch",
            "prefetchu", "setmaxnreg", "trap", "griddepcontrol", "nanosleep", "wgmma", "pmevent", "call"}
_FLOAT = ("f32", "f16", "bf16", "f16x2", "bf16x2", "f64")


class ReplayDeadlock(RuntimeError):
    pass


def _regs(op, out):
    k = op.kind
    if k == "reg":
        out.append(op.value)
    elif k == "vec":
        for o in op.value:
            _regs(o, out)
    elif k == "mem" and op.value[0] is not None:
        _regs(op.value[0], out)
    return out


@dataclasses.dataclass(frozen=True)
class Static:
    pipe: str
    interval: float
    latency: float
    dsts: tuple
    srcs: tuple


def static_info(ins, part: Part) -> Static:
    """Pipe, issue interval (clocks per warp instruction on a sub-partition), result
    latency and register operands of one PTX instruction."""
    op = ins.opcode
    per_sp = lambda lanes: 32.0 / max(lanes / part.subpartitions, 1e-9)   # noqa: E731
    if op in _MUFU and ("approx" in ins.mods or op in ("ex2", "lg2", "tanh", "sin", "cos")):
        pipe, interval, lat = "mufu", per_sp(part.mufu_lanes), part.lat_mufu
    elif op in _SHFL:
        pipe, interval, lat = "shfl", per_sp(part.shfl_lanes), part.lat_shfl
    elif op in ("cvt",):
        pipe, interval, lat = "conv", per_sp(part.conv_lanes), part.lat_alu
    elif op in _CTL or op in ("mbarrier", "bar", "barrier", "cp", "wgmma", "ld", "st", "ldmatrix", "stmatrix",
                              "atom", "red", "ldu"):
        pipe, interval, lat = "ctl", 1.0, part.lat_alu
    elif any(t in ins.mods for t in _FLOAT):
        pipe, interval, lat = "fp32", per_sp(part.fp32_lanes), part.lat_alu
    else:
        pipe, interval, lat = "int", per_sp(part.int32_lanes), part.lat_alu
    ops = ins.operands
    dsts, srcs = [], []
    if ops and op not in _NO_DEST and ops[0].kind in ("reg", "vec"):
        _regs(ops[0], dsts)
        rest = ops[1:]
    else:
        rest = ops
    for o in rest:
        _regs(o, srcs)
    if ins.guard is not None:
        srcs.append(ins.guard[0])
    return Static(pipe, interval, lat, tuple(dsts), tuple(srcs))


@dataclasses.dataclass
class Result:
    cycles: float                    # end of the last CTA of the group
    cta_cycles: list                 # end of each CTA
    tensor_busy: list                # clocks each SM's tensor pipe was busy
    mem_busy: list                   # clocks each SM's own memory port moved bytes
    instructions: int


class Replay:
    """Times one Recording (the CTAs of one Machine): one SM each, or with ctas_per_sm > 1
    consecutive CTAs resident together on one SM, sharing its schedulers, pipes, shared
    memory, tensor cores and memory port (kernels that rely on occupancy; clusters of 1)."""

    def __init__(self, rec, part: Part, mem, log: list = None, ctas_per_sm: int = 1):
        if ctas_per_sm > 1 and rec.cluster_size > 1:
            raise ValueError("ctas_per_sm: several CTAs per SM are modelled for clusters of one CTA only")
        self.rec, self.part, self.mem = rec, part, mem
        self.ctas_per_sm = ctas_per_sm
        self.log = log                 # optional: (time, what, key) of completions, for inspection
        self.watch = None              # with log: also log each instruction this warp issues
        self.instrs = rec.kernel.instrs
        self._static = {}

    def _info(self, pc):
        s = self._static.get(pc)
        if s is None:
            s = self._static[pc] = static_info(self.instrs[pc], self.part)
        return s

    def run(self) -> Result:
        rec, part, mem = self.rec, self.part, self.mem
        W = rec.nwarps
        wpc = rec.warps_per_cta
        ncta = rec.ncta
        events = rec.events
        pos = [0] * W
        t_ready = [0.0] * W
        end = [0.0] * W
        regs = [dict() for _ in range(W)]
        per_sm = self.ctas_per_sm
        nsm = (ncta + per_sm - 1) // per_sm                # SM of CTA c: c // per_sm
        sp_free = collections.defaultdict(float)          # (SM, sub-partition) -> next issue slot
        pipe_free = collections.defaultdict(float)        # (SM, sub-partition, pipe)
        smem_free = [0.0] * nsm
        port_free = [0.0] * nsm                           # each SM's own port
        csize = rec.cluster_size
        share_free = [0.0] * max(1, (nsm + csize - 1) // csize)   # a cluster's (or SM's) pooled share of L2 / HBM
        tensor_free = [0.0] * nsm
        tensor_busy = [0.0] * nsm
        mem_busy = [0.0] * nsm
        store_done = [0.0] * ncta
        # synchronisation: contributors expected per key, from the whole recording
        need = collections.Counter()
        for w in range(W):
            for pc, kind, data in events[w]:
                if kind == "A":
                    for f, p, _ in data:
                        need[("mb", f, p)] += 1
                elif kind == "B":
                    need[("bar",) + data[0]] += 1
                elif kind == "CA":
                    need[("cl",) + data] += 1
        for c in rec.copies:
            if not c.store:
                for f, p in c.phases:
                    need[("mb", f, p)] += 1
        got = collections.Counter()
        tmax = {}
        done = {}                                         # key -> completion time
        waiters = collections.defaultdict(list)           # key -> warps
        latency = {"mb": part.lat_mbarrier, "bar": part.lat_bar, "cl": part.lat_cluster_bar}
        # wgmma: per warpgroup op index -> (ready, warps issued), completion
        wg_ready, wg_count, wg_done = {}, collections.Counter(), {}
        wg_warps = collections.Counter()
        for w in range(W):
            if any(k == "M" for _, k, _ in events[w]):
                wg_warps[(w // wpc, (w % wpc) // 4)] += 1
        m_count = [0] * W
        m_groups = [[] for _ in range(W)]
        bulk_open = [[] for _ in range(W)]
        bulk_groups = [[] for _ in range(W)]
        cp_open = [[] for _ in range(W)]
        cp_groups = [[] for _ in range(W)]
        blocked = {}                                      # warp -> callable giving a time or None
        heap = [(0.0, -1.0, w) for w in range(W) if events[w]]
        last = [-1.0] * W                                 # last issue: ties go to the least recent (round robin)
        heapq.heapify(heap)
        n_instr = 0

        def wake(key):
            for w in waiters.pop(key, []):
                cond = blocked.get(w)
                if cond is None:
                    continue
                t = cond()
                if t is not None:
                    del blocked[w]
                    t_ready[w] = max(t_ready[w], t)
                    heapq.heappush(heap, (t_ready[w], last[w], w))

        def contribute(key, t):
            got[key] += 1
            tmax[key] = max(tmax.get(key, 0.0), t)
            if got[key] == need[key]:
                done[key] = tmax[key] + latency[key[0]]
                if self.log is not None:
                    self.log.append((done[key], "complete", key))
                wake(key)

        def wait_keys(w, keys, t_issue, completed=done):
            """Block warp w until every key has its completion time in `completed` (done, or
            wg_done for wgmma groups); returns True if it can go on now."""
            def cond():
                if all(k in completed for k in keys):
                    return max([t_issue] + [completed[k] for k in keys])
                return None
            t = cond()
            if t is not None:
                t_ready[w] = max(t_ready[w], t)
                return True
            blocked[w] = cond
            for k in keys:
                if k not in completed:
                    waiters[k].append(w)
            return False

        def wgmma_wait(w, n, t_issue):
            bounds = m_groups[w]
            upto = bounds[-1 - n] if len(bounds) > n else 0
            g = (w // wpc, (w % wpc) // 4)
            return wait_keys(w, [("wg", g, i) for i in range(upto)], t_issue, wg_done)

        def load_copy(cta, t, nbytes, dests=None):
            """Bytes read from L2 once (the cluster's share), received by each of dests."""
            cl = cta // per_sm // csize
            start = max(t, share_free[cl])
            share_free[cl] = start + nbytes * mem.share_read_clk_per_byte / csize
            fin = share_free[cl]
            for d in sorted({c // per_sm for c in dests or (cta,)}):
                s0 = max(start, port_free[d])
                port_free[d] = s0 + nbytes * mem.port_clk_per_byte
                mem_busy[d] += nbytes * mem.port_clk_per_byte
                fin = max(fin, port_free[d])
            return fin + mem.read_latency

        while heap:
            t, _, w = heapq.heappop(heap)
            if w in blocked or pos[w] >= len(events[w]):
                continue
            pc, kind, data = events[w][pos[w]]
            info = self._info(pc)
            cta, sp = w // wpc, (w % wpc) % part.subpartitions
            sm = cta // per_sm
            rdy = t_ready[w]
            r = regs[w]
            for s in info.srcs:
                v = r.get(s)
                if v is not None and v > rdy:
                    rdy = v
            issue = max(rdy, sp_free[(sm, sp)], pipe_free[(sm, sp, info.pipe)])
            if issue > t:
                heapq.heappush(heap, (issue, last[w], w))
                continue
            # issue now
            n_instr += 1
            last[w] = issue
            if self.log is not None and w == self.watch:
                self.log.append((issue, "issue", (pc, kind)))
            sp_free[(sm, sp)] = issue + 1
            pipe_free[(sm, sp, info.pipe)] = issue + info.interval
            pos[w] += 1
            t_ready[w] = issue + 1
            res = issue + info.latency
            go = True
            if kind == "s":
                start = max(issue, smem_free[sm])
                smem_free[sm] = start + data
                res = start + data + part.lat_smem
            elif kind == "g":
                # LSU accesses take their own path (L1, not the TMA queue): they do not wait
                # behind queued bulk copies, but their bytes use the port's bandwidth
                cl = sm // csize
                share_free[cl] = max(share_free[cl], issue) + data * mem.share_read_clk_per_byte / csize
                port_free[sm] = max(port_free[sm], issue) + data * mem.port_clk_per_byte
                mem_busy[sm] += data * mem.port_clk_per_byte
                res = issue + data * mem.read_clk_per_byte + mem.read_latency
            elif kind == "A":
                for f, p, _ in data:
                    contribute(("mb", f, p), issue)
            elif kind == "W":
                keys = [("mb", f, k) for f, k in data if k >= 0]
                go = wait_keys(w, keys, issue + 1)
                res = None
            elif kind == "B":
                key, sync = data
                contribute(("bar",) + key, issue)
                if sync:
                    go = wait_keys(w, [("bar",) + key], issue + 1)
            elif kind == "CA":
                contribute(("cl",) + data, issue)
            elif kind == "CW":
                go = wait_keys(w, [("cl",) + data], issue + 1)
            elif kind == "T":
                for cid in data:
                    c = rec.copies[cid]
                    t0 = issue + part.lat_tma_issue
                    if c.store:
                        cl = sm // csize
                        start = max(t0, port_free[sm])
                        port_free[sm] = start + c.global_bytes * mem.port_clk_per_byte
                        mem_busy[sm] += c.global_bytes * mem.port_clk_per_byte
                        share_free[cl] = (max(share_free[cl], start)
                                          + c.global_bytes * mem.share_write_clk_per_byte / csize)
                        fin = max(port_free[sm], share_free[cl]) + mem.write_latency
                        store_done[cta] = max(store_done[cta], fin)
                        bulk_open[w].append(port_free[sm])       # .read completes once the bytes left
                    else:
                        dests = sorted({f // rec.smem_size for f, _ in c.phases}) or [cta]
                        fin = load_copy(cta, t0, c.global_bytes, dests)
                        if self.log is not None:
                            self.log.append((t0, "copy", (cid, cta, c.global_bytes, fin)))
                        for f, p in c.phases:
                            contribute(("mb", f, p), fin)
                        bulk_open[w].append(fin)
            elif kind == "BC":
                bulk_groups[w].append(bulk_open[w])
                bulk_open[w] = []
            elif kind == "BW":
                older = bulk_groups[w][:max(0, len(bulk_groups[w]) - data)]
                ts = [x for g in older for x in g]
                if ts:
                    t_ready[w] = max(t_ready[w], max(ts))
            elif kind == "CP":
                cp_open[w].append(load_copy(cta, issue, data))
            elif kind == "CC":
                cp_groups[w].append(cp_open[w])
                cp_open[w] = []
            elif kind == "CWG":
                older = cp_groups[w][:max(0, len(cp_groups[w]) - data)] + ([cp_open[w]] if data == 0 else [])
                ts = [x for g in older for x in g]
                if ts:
                    t_ready[w] = max(t_ready[w], max(ts))
            elif kind == "M":
                n, k, dtype, a_regs = data
                g = (cta, (w % wpc) // 4)
                i = m_count[w]
                m_count[w] += 1
                key = ("wg", g, i)
                wg_ready[key] = max(wg_ready.get(key, 0.0), issue)
                wg_count[key] += 1
                if wg_count[key] == wg_warps[g]:
                    elem = 1 if dtype in ("e4m3", "e5m2") else 2 if dtype in ("bf16", "f16") else 4
                    macs = 64 * n * k
                    smem = n * k * elem + (0 if a_regs else 64 * k * elem)
                    dur = max(macs / part.mma_per_clk(dtype), smem / part.smem_bytes_per_clk)
                    start = max(wg_ready[key], tensor_free[sm])
                    tensor_free[sm] = start + dur
                    tensor_busy[sm] += dur
                    wg_done[key] = start + dur + part.lat_wgmma
                    if self.log is not None:
                        self.log.append((start, "wgmma", key))
                    wake(key)
                res = None
            elif kind == "MC":
                m_groups[w].append(m_count[w])
            elif kind == "MW":
                go = wgmma_wait(w, data, issue + 1)
            if res is not None:
                for d in info.dsts:
                    r[d] = res
                end[w] = max(end[w], res)
            end[w] = max(end[w], issue + 1)
            if go and pos[w] < len(events[w]):
                heapq.heappush(heap, (t_ready[w], last[w], w))
        if blocked:
            lines = []
            for w, _ in sorted(blocked.items())[:8]:
                pc = events[w][pos[w] - 1][0]
                lines.append(f"  warp {w}: PTX line {self.instrs[pc].line} ({self.instrs[pc].text})")
            raise ReplayDeadlock(f"{rec.kernel.name}: the timing replay cannot complete a wait the functional "
                                 "run completed (a model bug):\n" + "\n".join(lines))
        for w in range(W):
            end[w] = max(end[w], t_ready[w])
        cta_end = [max([end[w] for w in range(c * wpc, min(W, (c + 1) * wpc))] + [store_done[c]])
                   for c in range(ncta)]
        return Result(cycles=max(cta_end) if cta_end else 0.0, cta_cycles=cta_end, tensor_busy=tensor_busy,
                      mem_busy=mem_busy, instructions=n_instr)
