"""Shared-memory segments mapped at the same virtual address in every process of a group.

The emulator's global addresses are real CPU addresses (memory.py), and the expert-parallel
kernels pass each other's buffer addresses as plain pointers, as CUDA IPC mappings give
them on a GPU. For kernels emulated in separate OS processes to dereference a peer's
pointer, every process must see rank r's memory at one address: each rank creates a POSIX
shared-memory file, and every process maps every rank's file at `base + r * stride`
(mmap with MAP_FIXED_NOREPLACE, which fails instead of replacing an existing mapping).
The ranks agree on `base` through the torch.distributed group: rank 0 proposes one, every
rank tries it, and all retry with another when any rank found part of the range taken.

Once every process has mapped every file, each rank unlinks its own: the memory lives as
long as a mapping does, and nothing is left in /dev/shm even if a process is killed.
`unmap()` (also run on garbage collection) removes this process's mappings.

Linux only (MAP_FIXED_NOREPLACE: 4.17+; an older kernel that ignores the flag is caught
by the address check). Cross-process visibility relies on the CPU's coherent memory; the
emulator performs a kernel's stores in program order, which x86's total store order keeps
for the readers in other processes.
"""
import ctypes
import os
import random
import secrets
import weakref

import numpy as np

SHM_DIR = "/dev/shm"
NAME_PREFIX = "pk_shared_"
STRIDE_ALIGN = 1 << 21                       # 2 MiB between ranks' segments
BASE_RANGE = (0x1000_0000_0000, 0x4000_0000_0000)   # 16..64 TiB: far from heap, libraries and stacks
BASE_ALIGN = 1 << 30
ATTEMPTS = 16

_PROT_READ, _PROT_WRITE = 0x1, 0x2
_MAP_SHARED = 0x01
_MAP_FIXED_NOREPLACE = 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def map_fixed(fd: int, address: int, nbytes: int) -> bool:
    """Map the file `fd` at exactly `address`; False when that range is (partly) in use."""
    got = _libc.mmap(address, nbytes, _PROT_READ | _PROT_WRITE, _MAP_SHARED | _MAP_FIXED_NOREPLACE, fd, 0)
    if got is None or got == _MAP_FAILED:
        return False
    if got != address:                       # a kernel without MAP_FIXED_NOREPLACE took it as a hint
        _libc.munmap(got, nbytes)
        return False
    return True


def _unmap_all(mapped: list) -> None:
    while mapped:
        address, nbytes = mapped.pop()
        _libc.munmap(address, nbytes)


class SharedSegments:
    """One segment of `nbytes` per rank of `group`, mapped at `address(r)` in every member.

    Collective: every rank of the group constructs it with the same nbytes. Segments start
    zeroed. `view(r)` is a uint8 numpy array over rank r's segment (valid until unmap)."""

    def __init__(self, nbytes: int, group=None, rng: random.Random = None):
        import torch.distributed as dist
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected a positive size, got {nbytes}")
        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes = _round_up(nbytes, os.sysconf("SC_PAGE_SIZE"))
        self.stride = _round_up(self.nbytes, STRIDE_ALIGN)
        self._mapped = []                    # (address, nbytes) of this process's mappings
        self._finalizer = weakref.finalize(self, _unmap_all, self._mapped)
        name = f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(6)}_r{self.rank}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fds = [fd]
        try:
            os.ftruncate(fd, self.nbytes)
            names = [None] * self.num_ranks
            dist.all_gather_object(names, name, group=group)
            fds = []
            for r, n in enumerate(names):
                fds.append(fd if r == self.rank else os.open(os.path.join(SHM_DIR, n), os.O_RDWR))
            self.base = self._agree_on_base(fds, group, rng or random.Random())
        except BaseException:
            self.unmap()
            raise
        finally:
            # every rank has opened every file (the base agreement came after the opens):
            # the names are no longer needed, the mappings keep the memory alive
            os.unlink(path)
            for f in set(fds) | {fd}:
                os.close(f)

    def _agree_on_base(self, fds, group, rng) -> int:
        import torch.distributed as dist
        span = self.stride * self.num_ranks
        for _ in range(ATTEMPTS):
            proposal = [rng.randrange(BASE_RANGE[0], BASE_RANGE[1] - span, BASE_ALIGN)]
            dist.broadcast_object_list(proposal, src=dist.get_global_rank(group, 0) if group else 0, group=group)
            base = proposal[0]
            ok = True
            for r, fd in enumerate(fds):
                if not map_fixed(fd, base + r * self.stride, self.nbytes):
                    ok = False
                    break
                self._mapped.append((base + r * self.stride, self.nbytes))
            oks = [None] * self.num_ranks
            dist.all_gather_object(oks, ok, group=group)
            if all(oks):
                return base
            _unmap_all(self._mapped)
        raise RuntimeError(f"SharedSegments: no address range of {span} bytes was free in every process after "
                           f"{ATTEMPTS} proposals")

    def address(self, rank: int) -> int:
        return self.base + rank * self.stride

    def view(self, rank: int) -> np.ndarray:
        if not self._mapped:
            raise RuntimeError("SharedSegments: used after unmap()")
        return np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.address(rank)))

    @property
    def mapped(self) -> bool:
        return bool(self._mapped)

    def unmap(self) -> None:
        """Remove this process's mappings (idempotent). Views and tensors over them must not
        be used afterwards."""
        self._finalizer()
