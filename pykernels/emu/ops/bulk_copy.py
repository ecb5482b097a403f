"""The Tensor Memory Accelerator and bulk copies: cp.async.bulk.tensor (1D-5D tile mode,
loads with mbarrier complete_tx and optional cluster multicast, stores with bulk
groups), cp.async.bulk (global<->shared, shared::cta->shared::cluster),
cp.async.bulk.commit_group / wait_group{.read}, and the bulk prefetches (no-ops).

Copies are asynchronous: an issued copy is queued on the machine and lands later (see
Machine.issue_async), so a consumer that does not wait on the mbarrier, or a thread that
reuses a store's shared buffer before wait_group.read, sees what it would risk seeing
on the GPU. Tensor maps are read from wherever the kernel points (the parameter space
for __grid_constant__ maps, or global memory) in the emulator's image format
(hopper/tensormap.py).
"""
import numpy as np

from ..errors import EmuError, MemoryFault, UnsupportedInstruction
from ..hopper.layouts import swizzle
from ..hopper.tensormap import IMAGE_BYTES, TensorMapImage
from ..memory import CLUSTER_RANK_SHIFT
from . import mbarrier as mb
from . import op

_SWIZZLE_NAME = {0: "none", 32: "32B", 64: "64B", 128: "128B"}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_NAN_BITS = {2: 0x7FFF, 4: 0x7FFFFFFF}
_LOCAL = (1 << CLUSTER_RANK_SHIFT) - 1


class _Copy:
    """One queued asynchronous copy; `action(machine)` moves the bytes."""

    def __init__(self, action, what):
        self.action, self.what, self.done, self.issued = action, what, False, 0

    def perform(self, m):
        if not self.done:
            self.done = True
            if m.order:
                m.order.async_perform(self)
            self.action(m)


def _read_bytes(m, addr, n, t):
    """n bytes at generic address addr, read as thread t (tensor maps)."""
    words = m.load("", np.uint64(addr) + np.arange(0, n, 8, dtype=np.uint64), np.uint64,
                   np.full(n // 8, t, dtype=np.int64))
    return words.tobytes()


def _tensor_map(m, operand, t):
    base = operand.value[0]
    if base.kind == "sym" and base.value in m.L.param_offsets:
        off = m.L.param_offsets[base.value]
        raw = m.L.param_buffer[off:off + IMAGE_BYTES].tobytes()
    else:
        addr = int(m.read(base, "u64", np.array([t]))[0])
        if addr % 64:
            m.fail(MemoryFault, f"tensor map at {addr:#x} is not 64-byte aligned", np.array([t]))
        raw = _read_bytes(m, addr, IMAGE_BYTES, t)
    try:
        img = TensorMapImage.unpack(raw)
    except ValueError as e:
        m.fail(EmuError, str(e), np.array([t]))
    try:
        return img.check()          # a map edited on the device is checked only here
    except ValueError as e:
        m.fail(EmuError, f"{e}: {img.describe()}", np.array([t]))


def _check_box(m, img, coord, t, what):
    """At issue: every in-bound element of the box must lie in the kernel's memory (a bad
    global address or extent in the map is reported here, with the map's fields)."""
    addr, valid, _ = _box(img, coord)
    if valid.any():
        here = m.where(np.array([t]))
        m.L.gmem.check(addr[valid].astype(np.uint64), img.elem_bytes,
                       lambda j=0: f"{here()}: TMA {what} of the box at {tuple(int(c) for c in coord)} "
                                   f"through the {img.describe()}")


def _count_issued(m, ins, idx, keys):
    """Statistics: one copy per executing thread (the PTX ISA makes cp.async.bulk a
    per-thread instruction: every thread that executes it issues its own copy, as the
    hardware does); `bulk_copies_duplicate` counts copies that repeat another thread's
    of the same warp instruction (same operands): usually a missing elect / lane guard."""
    st = m.L.stats
    st.bulk_copies += len(idx)
    pairs = {(int(m.warp[t]), k) for t, k in zip(idx.tolist(), keys)}
    st.bulk_copies_duplicate += len(idx) - len(pairs)


def _coords(m, operand, idx, rank):
    coords = operand.value[1]
    if len(coords) != rank:
        m.fail(EmuError, f"{len(coords)} coordinates for a {rank}-d tensor map", idx)
    return np.stack([m.read(c, "s32", idx).astype(np.int64) for c in coords], axis=1)


def _box(img, coord):
    """Global byte addresses, in-bounds mask and shared byte offsets (before swizzle) of
    every element of the box at `coord` (innermost first), in shared-memory order."""
    if any(s != 1 for s in img.elem_strides):
        raise UnsupportedInstruction("tensor maps with element strides other than 1 are not implemented")
    grids = np.meshgrid(*[np.arange(b, dtype=np.int64) + c for b, c in zip(reversed(img.box), reversed(coord))],
                        indexing="ij")          # outermost first, so C order = shared order
    valid = np.ones(grids[0].shape, dtype=bool)
    addr = np.full(grids[0].shape, img.address, dtype=np.int64)
    for g, dim, stride in zip(grids, reversed(img.dims), reversed(img.strides_bytes)):
        valid &= (g >= 0) & (g < dim)
        addr += g * stride
    n = valid.size
    return addr.reshape(-1), valid.reshape(-1), np.arange(n, dtype=np.int64) * img.elem_bytes


def _smem_targets(m, dst, t, mask):
    """(flat base of each destination CTA, CTA-relative offset) for a shared::cluster
    destination address, over the CTAs of a multicast mask (or the addressed CTA)."""
    me = int(m.cta[t])
    base = int(m.cluster_base[t])
    rank, off = dst >> CLUSTER_RANK_SHIFT, dst & _LOCAL
    if mask is None:
        cta = me if rank == 0 else base + rank - 1
        targets = [cta]
    else:
        csize = int(np.prod(m.L.cluster))
        if mask >> csize:
            m.fail(EmuError, f"multicast mask {mask:#x} names CTAs outside the cluster of {csize}", np.array([t]))
        targets = [base + r for r in range(csize) if mask >> r & 1]
    return targets, off


def _write_shared(m, cta, offsets, raw, eb, t):
    size = m.shared.size
    if (offsets < 0).any() or (offsets + eb > size).any():
        m.fail(MemoryFault, f"bulk copy writes outside the {size}-byte shared memory", np.array([t]))
    m.shared.view(_UINT[eb])[(cta * size + offsets) // eb] = raw


def _read_shared(m, cta, offsets, eb, t):
    size = m.shared.size
    if (offsets < 0).any() or (offsets + eb > size).any():
        m.fail(MemoryFault, f"bulk copy reads outside the {size}-byte shared memory", np.array([t]))
    return m.shared.view(_UINT[eb])[(cta * size + offsets) // eb]


def _tensor_load(m, ins, idx):
    img_ops = ins.operands
    dsts = m.address(img_ops[0], idx, "shared::cluster").astype(np.int64)
    bars = m.address(img_ops[2], idx, "shared::cluster").astype(np.int64)
    multicast = "multicast::cluster" in ins.mods
    masks = m.read(img_ops[3], "u16", idx).astype(np.int64) if multicast else None
    keys = []
    for j, t in enumerate(idx.tolist()):
        img = _tensor_map(m, img_ops[1], t)
        coord = _coords(m, img_ops[1], idx[j:j + 1], img.rank)[0]
        _check_box(m, img, coord, t, "load")
        keys.append((img, tuple(coord.tolist()), int(dsts[j])))
        if dsts[j] % 128:
            m.fail(MemoryFault, f"TMA destination {int(dsts[j]):#x} is not 128-byte aligned", idx[j:j + 1])
        targets, off = _smem_targets(m, int(dsts[j]), t, None if masks is None else int(masks[j]))
        bar_targets, bar_off = _smem_targets(m, int(bars[j]), t, None if masks is None else int(masks[j]))
        if masks is None:
            bar_targets = bar_targets[:1]
        copy = _Copy(_make_tensor_load(img, coord, targets, off, bar_targets, bar_off, t),
                     f"TMA load (line {ins.line})")
        if m.order:
            m.order.tma_load(copy, t, img, coord, targets, off, bar_targets, bar_off)
        m.issue_async(copy)
    _count_issued(m, ins, idx, keys)


def _make_tensor_load(img, coord, targets, off, bar_targets, bar_off, t):
    def action(m):
        eb = img.elem_bytes
        addr, valid, soff = _box(img, coord)
        raw = np.zeros(len(addr), dtype=_UINT[eb])
        if img.oob_nan and eb in _NAN_BITS:
            raw[:] = _NAN_BITS[eb]
        if valid.any():
            raw[valid] = m.L.gmem.load(addr[valid].astype(np.uint64), _UINT[eb], m.where(np.array([t])))
            m.L.stats.global_read += int(valid.sum()) * eb
        shared_off = swizzle(off + soff, _SWIZZLE_NAME[img.swizzle])
        for cta in targets:
            _write_shared(m, cta, shared_off, raw, eb, t)
        m.state_version += 1
        for cta in bar_targets:
            mb.complete_tx(m, cta * m.shared.size + bar_off, len(raw) * eb, np.array([t]))
    return action


def _tensor_store(m, ins, idx):
    srcs = m.address(ins.operands[1], idx, "shared::cta").astype(np.int64)
    keys = []
    for j, t in enumerate(idx.tolist()):
        img = _tensor_map(m, ins.operands[0], t)
        coord = _coords(m, ins.operands[0], idx[j:j + 1], img.rank)[0]
        _check_box(m, img, coord, t, "store")
        keys.append((img, tuple(coord.tolist()), int(srcs[j])))
        if srcs[j] % 128:
            m.fail(MemoryFault, f"TMA source {int(srcs[j]):#x} is not 128-byte aligned", idx[j:j + 1])
        copy = _Copy(_make_tensor_store(img, coord, int(m.cta[t]), int(srcs[j]), t), f"TMA store (line {ins.line})")
        if m.order:
            m.order.tma_store(copy, t, img, coord, int(m.cta[t]), int(srcs[j]))
        _bulk_op(m, t, copy)
    _count_issued(m, ins, idx, keys)


def _make_tensor_store(img, coord, cta, src, t):
    def action(m):
        eb = img.elem_bytes
        addr, valid, soff = _box(img, coord)
        raw = _read_shared(m, cta, swizzle(src + soff, _SWIZZLE_NAME[img.swizzle]), eb, t)
        if valid.any():
            m.L.gmem.store(addr[valid].astype(np.uint64), raw[valid], _UINT[eb], m.where(np.array([t])))
            m.L.stats.global_written += int(valid.sum()) * eb
        m.state_version += 1
    return action


def _bulk_op(m, t, copy):
    """Queue a copy tracked by the issuing thread's bulk async-groups."""
    groups = m.ext.setdefault("bulk_groups", {}).setdefault(t, {"open": [], "committed": []})
    groups["open"].append(copy)
    m.issue_async(copy)


def _plain_bulk(m, ins, idx):
    """cp.async.bulk without a tensor map: `size` bytes, 16-byte aligned."""
    ops = ins.operands
    spaces = [s for s in ins.mods if s in ("global", "shared::cta", "shared::cluster", "shared")]
    dst_space, src_space = spaces[0], spaces[1]
    dst = m.address(ops[0], idx, dst_space).astype(np.int64)
    src = m.address(ops[1], idx, src_space).astype(np.int64)
    size = m.read(ops[2], "u32", idx).astype(np.int64)
    if ((dst % 16) | (src % 16) | (size % 16)).any():
        m.fail(MemoryFault, f"{ins.full}: addresses and size must be multiples of 16 bytes", idx)
    for j, t in enumerate(idx.tolist()):
        n = int(size[j])
        if dst_space == "global":
            copy = _Copy(_make_to_global(int(dst[j]), int(m.cta[t]), int(src[j]), n, t), ins.full)
            if m.order:
                m.order.bulk_to_global(copy, t, int(m.cta[t]), int(src[j]), n)
            _bulk_op(m, t, copy)
            continue
        multicast = "multicast::cluster" in ins.mods
        mask = int(m.read(ops[4], "u16", idx[j:j + 1])[0]) if multicast else None
        targets, off = _smem_targets(m, int(dst[j]), t, mask)
        bars, bar_off = _smem_targets(m, int(m.address(ops[3], idx[j:j + 1], "shared::cluster")[0]), t, mask)
        copy = _Copy(_make_to_shared(src_space, int(src[j]), n, targets, off, bars, bar_off, t), ins.full)
        if m.order:
            m.order.bulk_to_shared(copy, t, src_space, int(src[j]), n, targets, off, bars, bar_off)
        m.issue_async(copy)
    _count_issued(m, ins, idx, list(zip(dst.tolist(), src.tolist(), size.tolist())))


def _make_to_global(dst, cta, src, n, t):
    def action(m):
        raw = _read_shared(m, cta, src + np.arange(n, dtype=np.int64), 1, t)
        m.L.gmem.store((dst + np.arange(n, dtype=np.int64)).astype(np.uint64), raw, np.uint8, m.where(np.array([t])))
        m.L.stats.global_written += n
        m.state_version += 1
    return action


def _make_to_shared(src_space, src, n, targets, off, bars, bar_off, t):
    def action(m):
        span = np.arange(n, dtype=np.int64)
        if src_space == "global":
            raw = m.L.gmem.load((src + span).astype(np.uint64), np.uint8, m.where(np.array([t])))
            m.L.stats.global_read += n
        else:
            raw = _read_shared(m, int(m.cta[t]), src + span, 1, t)
        for cta in targets:
            _write_shared(m, cta, off + span, raw, 1, t)
        m.state_version += 1
        for cta in bars:
            mb.complete_tx(m, cta * m.shared.size + bar_off, n, np.array([t]))
    return action


def _groups(m, ins, idx):
    table = m.ext.setdefault("bulk_groups", {})
    if "commit_group" in ins.mods:
        for t in idx.tolist():
            g = table.setdefault(t, {"open": [], "committed": []})
            g["committed"].append(g["open"])
            g["open"] = []
        return
    n = ins.operands[0].value
    for t in idx.tolist():
        g = table.get(t)
        if not g:
            continue
        while len(g["committed"]) > n:
            for copy in g["committed"].pop(0):
                if not copy.done:
                    m.complete_async(upto=copy)
                if m.order:
                    m.order.bulk_retired(copy, t)


@op("cp")
def cp(m, ins, idx):
    mods = ins.mods
    if "reduce" in mods:
        m.fail(UnsupportedInstruction, f"{ins.full} is not implemented by the emulator", idx)
    if "bulk" not in mods:
        from .cp_async import cp as cp_async   # non-bulk cp.async (per-thread groups)
        return cp_async(m, ins, idx)
    if "prefetch" in mods:
        if "tensor" in mods:        # cp.async.bulk.prefetch.tensor: only the map is checked (an L2 hint)
            for t in idx.tolist():
                _tensor_map(m, ins.operands[0], t)
        return
    if "commit_group" in mods or "wait_group" in mods:
        return _groups(m, ins, idx)
    if "tensor" in mods:
        if "tile" not in mods and any(x.startswith("im2col") for x in mods):
            m.fail(UnsupportedInstruction, f"{ins.full}: im2col mode is not implemented", idx)
        load = mods.index("global") > next(i for i, x in enumerate(mods) if x.startswith("shared"))
        return (_tensor_load if load else _tensor_store)(m, ins, idx)
    return _plain_bulk(m, ins, idx)
