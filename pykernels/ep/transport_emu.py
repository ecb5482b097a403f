"""EmuIntranode: one rank per OS process on a machine without a GPU, running the
hand-written intranode kernels (csrc/ep) on the PTX emulator.

Each rank's buffer is a POSIX shared-memory segment that every process of the group maps
at the same address (pykernels.emu.shared_global), so the peer pointers a rank passes to
its kernels are valid in every process, as CUDA IPC mappings are on a GPU: the buffer
exchange at construction, the ring protocol and the low-latency slots run across real
processes as they will between GPUs. The kernel logic is pykernels.cuda.ep.IntranodeRank's,
shared with CudaIntranode; this file is the provider (memory + launcher).

Past the kernels' buffer each segment holds a small mailbox that only the host touches:
word 0 counts the calls this rank has begun (who has arrived), then two rows of R words
(by call parity) carrying a dispatch's num_tokens_per_rank as (call << 32 | count). The
CUDA provider exchanges those counts with an all_gather on the group; here they go through
the segments, so a rank that never arrives ends in a PeerTimeoutError naming it instead of a
collective that blocks.

Time-outs (docs/ep.md, "Per-process transports"): a wait with no progress from other
processes for timeout_s ends; in a kernel, the kernel then runs until its own spin bound
(max_spins polls) writes its error record (which names the rank waited for) and traps.
Every live rank raises PeerTimeoutError; the transport must then be rebuilt.
"""
import time

import numpy as np
import torch

from ..cuda.ep import (DEFAULT_TIMEOUT_S, ERROR_WORDS, IntranodeConfig, IntranodeRank, PeerTimeoutError,
                       decode_error)
from ..runtime import artifacts
from ..runtime.hardware import round_up

# The kernels' bound on a wait's polls. Reached after the time-out (seconds of emulation:
# the error comes that much after timeout_s), or earlier when a wait spins through a long
# phase of its own process's work (polls count while other warps of the rank run): raise
# it for large problems.
EMU_PROCESS_MAX_SPINS = 2048
EXPIRY_S = 120.0               # after the time-out: how long the kernel may take to end its waits itself
CODE_NOT_A_WAIT = (5, 8, 9)    # error codes that are not a wait running out (ep.py WAIT_CODES)


def _mailbox_offset(cfg: IntranodeConfig) -> int:
    return round_up(cfg.buffer_bytes, 128)


class EmuSharedMemory:
    """Provider of EmuIntranode (IntranodeRank's interface): the segments, the error record,
    the emulator runs, the counts through the mailboxes."""
    poison = True                  # outputs start as 0xFF bytes: what a kernel fails to write shows
    synchronous = True
    default_recv_ctas = 1          # the emulator is slow: one reducing CTA

    def __init__(self, cfg: IntranodeConfig, group, timeout_s: float, max_spins: int):
        import torch.distributed as dist
        from ..emu.shared_global import SharedSegments
        self.rank, R = dist.get_rank(group), dist.get_world_size(group)
        if R != cfg.num_ranks:
            raise ValueError(f"cfg.num_ranks: expected the group size {R}, got {cfg.num_ranks}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.cfg, self.timeout_s, self.max_spins = cfg, float(timeout_s), max_spins
        self.device = torch.device("cpu")
        self._mailbox = _mailbox_offset(cfg)
        self.segments = SharedSegments(self._mailbox + 8 * (1 + 2 * R), group)
        self.peers = [self.segments.address(r) for r in range(R)]
        own = self.segments.view(self.rank)
        self.buffer = torch.from_numpy(own[:cfg.buffer_bytes])
        self.error = torch.zeros(ERROR_WORDS, dtype=torch.int32)
        self.calls, self.call = 0, None
        self.broken = None             # why the transport must be rebuilt

    # -- the mailbox --------------------------------------------------------------------
    def _words(self, rank: int) -> np.ndarray:
        return self.segments.view(rank)[self._mailbox:].view(np.int64)[:1 + 2 * self.cfg.num_ranks]

    def calls_begun(self) -> list:
        """Calls each rank has begun (the arrival board)."""
        return [int(self._words(r)[0]) for r in range(self.cfg.num_ranks)]

    def _absent(self) -> str:
        late = [(r, n) for r, n in enumerate(self.calls_begun()) if n < self.calls]
        if not late:
            return "every rank has begun this call"
        return "; ".join(f"rank {r} has begun {n} calls, not this one" for r, n in late)

    def arrive(self, call: str):
        if self.buffer is None:
            raise RuntimeError(f"{call}: the transport was destroyed")
        if self.broken:
            raise RuntimeError(f"{call}: the transport must be rebuilt (destroy() it and construct a new one on "
                               f"every rank) after: {self.broken}")
        self.calls += 1
        self.call = call
        self._words(self.rank)[0] = self.calls

    def gather_counts(self, per_rank: torch.Tensor) -> torch.Tensor:
        R, seq = self.cfg.num_ranks, self.calls
        row = 1 + (seq % 2) * R
        self._words(self.rank)[row:row + R] = (seq << 32) | per_rank.to(torch.int64).numpy()
        out = torch.empty(R, R, dtype=torch.int32)
        waiting = set(range(R))
        sleep, start = 1e-4, time.monotonic()
        while waiting:
            for r in sorted(waiting):
                words = self._words(r)[row:row + R].copy()
                if ((words >> 32) == seq).all():
                    out[r] = torch.from_numpy((words & 0xFFFFFFFF).astype(np.int32))
                    waiting.discard(r)
            if not waiting:
                break
            if time.monotonic() - start > self.timeout_s:
                peer = min(waiting)
                self.broken = (f"rank {self.rank}: {self.call} (call {seq}) timed out waiting "
                               f"{self.timeout_s:g} s for the num_tokens_per_rank of rank(s) {sorted(waiting)}")
                raise PeerTimeoutError(f"{self.broken} ({self._absent()}). The transport must be rebuilt.",
                                       self.rank, peer, self.call)
            time.sleep(sleep)
            sleep = min(2 * sleep, 0.005)
        return out

    # -- kernels ------------------------------------------------------------------------
    def run(self, plan):
        from ..emu import EmuError
        from ..emu.cross_process import WaitTimeout, launch_polling
        regions = [(a, self.cfg.buffer_bytes) for a in self.peers]
        start = time.monotonic()
        try:
            return launch_polling(artifacts.ptx_text(plan.module), plan.function, plan.grid, plan.block,
                                  [a.value for a in plan.args], plan.shared_bytes, plan.cluster, regions=regions,
                                  idle_timeout_s=self.timeout_s, expiry_s=max(self.timeout_s, EXPIRY_S))
        except EmuError as e:
            rec = decode_error(self.error)
            where = f"rank {self.rank}: {self.call} (call {self.calls}, kernel {plan.function})"
            if isinstance(e, WaitTimeout) or (rec is not None and rec["code"] not in CODE_NOT_A_WAIT):
                peer = rec["peer"] if rec else None
                whom = f"rank {peer}: {rec['what']}" if rec else "another rank (no error record)"
                self.broken = f"{where} timed out after {time.monotonic() - start:.1f} s waiting for {whom}"
                raise PeerTimeoutError(f"{self.broken} ({self._absent()}); error record {rec}. The transport must "
                                       f"be rebuilt.", self.rank, peer, self.call, rec) from e
            self.broken = f"{where} failed: {type(e).__name__}"
            note = f"\nerror record of rank {self.rank}: {rec}" if rec else ""
            raise type(e)(f"{e}{note}\n({self._absent()})") from e

    def destroy(self):
        self.buffer = None
        self.segments.unmap()


class EmuIntranode(IntranodeRank):
    """One rank of a torch.distributed group (gloo) per OS process, the kernels on the
    emulator, the buffers in shared memory mapped at one address in every process
    (IntranodeRank over EmuSharedMemory; the interface of CudaIntranode).

    cfg.num_ranks must equal the group size. timeout_s: how long a wait may go without
    progress from the other ranks before every live rank raises PeerTimeoutError naming
    the rank it waited for. max_spins: the kernels' own bound on a wait's polls, reached
    only after the time-out (default EMU_PROCESS_MAX_SPINS). Outputs are filled with 0xFF
    bytes before each kernel (what it does not write reads as NaN / -1). destroy()
    unmaps the segments (also on garbage collection); nothing is left in /dev/shm."""

    def __init__(self, cfg: IntranodeConfig, group=None, max_spins: int = EMU_PROCESS_MAX_SPINS,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(cfg, EmuSharedMemory(cfg, group, timeout_s, max_spins))
