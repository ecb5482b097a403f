"""Memory of an emulated launch: global (host buffers), shared (per CTA), param, local.

Global addresses are the real CPU addresses of the registered buffers (torch storages),
so pointers passed as kernel arguments need no translation; every access is checked
against the registered buffers and for natural alignment. Generic addresses of the
other spaces live in windows far above any user-space CPU address.
"""
import ctypes

import numpy as np

from .errors import MemoryFault

SHARED_WINDOW = 0xFE00_0000_0000_0000   # generic address of shared byte 0 of the own CTA
PARAM_WINDOW = 0xFD00_0000_0000_0000
LOCAL_WINDOW = 0xFC00_0000_0000_0000
WINDOW_SPAN = 1 << 48
CLUSTER_RANK_SHIFT = 24                 # shared::cluster address = (rank+1) << 24 | offset


class GlobalMemory:
    """Host buffers reachable by the kernel, looked up by address (sorted, bisected)."""

    def __init__(self):
        self._bufs = []          # (base, end, uint8 view)
        self._bases = np.zeros(0, dtype=np.uint64)
        self._typed = {}
        self.version = 0         # bumped by every store and atomic (progress.py watches it)
        self._extents = {}       # buffer base -> [(start, end, name)] of the tensors registered in it
        self._merged = {}        # buffer base -> (starts, ends): their union, for the checks
        self._has_extents = np.zeros(0, dtype=bool)   # per buffer index

    def register(self, base: int, nbytes: int) -> None:
        """Make [base, base+nbytes) of this process's memory accessible to the kernel."""
        if nbytes <= 0:
            return
        for b, e, _ in self._bufs:
            if b <= base and base + nbytes <= e:
                return
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))
        self._bufs.append((base, base + nbytes, arr))
        self._bufs.sort(key=lambda t: t[0])
        self._bases = np.array([b for b, _, _ in self._bufs], dtype=np.uint64)
        self._typed.clear()
        self._index_extents()

    def register_tensor(self, t, name="a tensor argument") -> None:
        """Make t's storage accessible, and check accesses to it against t's own extent:
        a kernel given a view (slice) may not reach the rest of the storage, unless
        another registered tensor covers that part. name: for the reports."""
        st = t.untyped_storage()
        self.register(st.data_ptr(), st.nbytes())
        if t.numel() == 0:
            return
        span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
        base = next(b for b, e, _ in self._bufs if b <= st.data_ptr() < e)
        ext = self._extents.setdefault(base, [])
        if (t.data_ptr(), t.data_ptr() + span, name) not in ext:
            ext.append((t.data_ptr(), t.data_ptr() + span, name))
            ext.sort()
            starts, ends = [], []
            for a, e, _ in ext:                 # the union, as disjoint sorted intervals
                if starts and a <= ends[-1]:
                    ends[-1] = max(ends[-1], e)
                else:
                    starts.append(a)
                    ends.append(e)
            self._merged[base] = (np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64))
            self._index_extents()

    def _index_extents(self):
        self._has_extents = np.array([b in self._merged for b, _, _ in self._bufs], dtype=bool)
        # all buffers' unions in one sorted list (they never cross a buffer's end)
        merged = sorted(self._merged.values(), key=lambda se: int(se[0][0]))
        self._ext_starts = np.concatenate([st for st, _ in merged]) if merged else np.zeros(0, dtype=np.uint64)
        self._ext_ends = np.concatenate([en for _, en in merged]) if merged else np.zeros(0, dtype=np.uint64)

    def _check_extents(self, addr, which, size, where):
        """Accesses inside a storage but outside every tensor registered in it."""
        chk = self._has_extents[which]
        a = addr if chk.all() else addr[chk]
        k = np.searchsorted(self._ext_starts, a, side="right").astype(np.int64) - 1
        ok = (k >= 0) & (a + np.uint64(size) <= self._ext_ends[np.maximum(k, 0)])
        if ok.all():
            return
        j = int(np.flatnonzero(chk)[np.flatnonzero(~ok)[0]])
        bad = int(addr[j])
        base, end, _ = self._bufs[int(which[j])]
        below = [x for x in self._extents[base] if x[0] <= bad]
        s0, e0, name = below[-1] if below else self._extents[base][0]
        rel = (f"{bad + size - e0} bytes past the end of" if below else f"{s0 - bad} bytes before")
        raise MemoryFault(f"{where(j)}: out-of-bounds global access of {size} bytes at {bad:#x}: {rel} "
                          f"{name} ([{s0:#x}, {e0:#x}), {e0 - s0} bytes), inside its {end - base}-byte storage "
                          "(the argument is a view or slice of it)")

    def _view(self, i: int, dtype):
        key = (i, dtype)
        v = self._typed.get(key)
        if v is None:
            b, e, arr = self._bufs[i]
            n = (e - b) // np.dtype(dtype).itemsize
            v = self._typed[key] = arr[: n * np.dtype(dtype).itemsize].view(dtype)
        return v

    def _locate(self, addr: np.ndarray, size: int, where):
        """Buffer index and byte offset of each address; raises on any stray access."""
        addr = addr.astype(np.uint64, copy=False)
        if not self._bufs:
            raise MemoryFault(f"{where()}: global access at {int(addr[0]):#x} but no buffer is registered")
        which = np.searchsorted(self._bases, addr, side="right").astype(np.int64) - 1
        bad = which < 0
        if not bad.any():
            ends = np.array([e for _, e, _ in self._bufs], dtype=np.uint64)
            bad = (addr + np.uint64(size)) > ends[which]
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise MemoryFault(f"{where(j)}: out-of-bounds global access of {size} bytes at "
                              f"{int(addr[j]):#x} (not inside any kernel argument buffer)")
        if size > 1 and (addr % np.uint64(size)).any():
            j = int(np.flatnonzero(addr % np.uint64(size))[0])
            raise MemoryFault(f"{where(j)}: misaligned {size}-byte global access at {int(addr[j]):#x}")
        if self._has_extents[which].any():
            self._check_extents(addr, which, size, where)
        return which, addr - self._bases[which]

    def check(self, addr, size, where):
        """Raise MemoryFault unless every `size`-byte access at addr is valid."""
        self._locate(np.asarray(addr, dtype=np.uint64), size, where)

    def load(self, addr, dtype, where):
        size = np.dtype(dtype).itemsize
        which, off = self._locate(addr, size, where)
        out = np.empty(len(addr), dtype=dtype)
        for i in np.unique(which):
            sel = which == i
            out[sel] = self._view(int(i), dtype)[(off[sel] // np.uint64(size)).astype(np.int64)]
        return out

    def store(self, addr, values, dtype, where):
        size = np.dtype(dtype).itemsize
        which, off = self._locate(addr, size, where)
        values = np.asarray(values).astype(dtype, copy=False)
        self.version += 1
        for i in np.unique(which):
            sel = which == i
            self._view(int(i), dtype)[(off[sel] // np.uint64(size)).astype(np.int64)] = values[sel]

    def index_of(self, addr, dtype, where):
        """[(selection, typed view, element indices)] per buffer the addresses fall in,
        for read-modify-write (atomics)."""
        size = np.dtype(dtype).itemsize
        which, off = self._locate(addr, size, where)
        el = (off // np.uint64(size)).astype(np.int64)
        self.version += 1
        return [(which == i, self._view(int(i), dtype), el) for i in np.unique(which)]


class SharedMemory:
    """Shared memory of the CTAs running together: one byte array, `size` bytes per CTA."""

    def __init__(self, num_ctas: int, size: int):
        self.size = size
        self.data = np.zeros(max(1, num_ctas * size), dtype=np.uint8)
        # Uninitialised shared memory is garbage on a GPU: fill with a pattern so kernels
        # that read before writing show it (0xFF bytes are NaN for f32/bf16/fp8 reads).
        self.data[:] = 0xFF
        self._typed = {}

    def view(self, dtype):
        v = self._typed.get(dtype)
        if v is None:
            n = len(self.data) // np.dtype(dtype).itemsize
            v = self._typed[dtype] = self.data[: n * np.dtype(dtype).itemsize].view(dtype)
        return v

    def flat_index(self, offset, cta, size: int, where):
        """Byte index in `data` of shared offsets (per thread) of CTAs `cta` (local index)."""
        offset = offset.astype(np.int64)
        bad = (offset < 0) | (offset + size > self.size)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise MemoryFault(f"{where(j)}: out-of-bounds shared access of {size} bytes at offset "
                              f"{int(offset[j])} (shared memory is {self.size} bytes per CTA)")
        if size > 1 and (offset % size).any():
            j = int(np.flatnonzero(offset % size)[0])
            raise MemoryFault(f"{where(j)}: misaligned {size}-byte shared access at offset {int(offset[j])}")
        return cta.astype(np.int64) * self.size + offset
