"""Per-launch counters: instructions by class (warp-level, as GPU profilers count),
global bytes read and written, shared-memory bank conflicts, wgmma and bulk copies issued."""
import collections
import dataclasses

import numpy as np

_CLASSES = {
    "memory.global": ("ld.global", "st.global", "ld.const", "atom.global", "red.global", "ld.", "st."),
    "memory.shared": ("ld.shared", "st.shared", "ldmatrix", "stmatrix", "atom.shared", "red.shared"),
    "async_copy": ("cp.", "cp.async"),
    "tensor_core": ("wgmma",),
    "sync": ("bar", "barrier", "mbarrier", "fence", "membar", "griddepcontrol"),
    "warp": ("shfl", "vote", "redux", "match", "elect", "activemask"),
    "control": ("bra", "ret", "exit", "call", "trap", "brx"),
    "convert": ("cvt", "cvta", "mapa"),
}


def classify(full: str) -> str:
    for cls in ("memory.shared", "memory.global", "async_copy", "tensor_core", "sync", "warp", "control", "convert"):
        for prefix in _CLASSES[cls]:
            if full.startswith(prefix):
                if cls == "memory.global" and prefix in ("ld.", "st.") and ".shared" in full:
                    continue
                return cls
    if any(t in full for t in (".f32", ".f16", ".bf16", ".f64", "ex2", "rcp", "sqrt", "lg2")):
        return "float"
    return "integer"


@dataclasses.dataclass
class Stats:
    instructions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    instructions_total: int = 0
    thread_instructions: int = 0
    global_read: int = 0
    global_written: int = 0
    shared_accesses: int = 0
    bank_conflicts: int = 0
    wgmma: int = 0
    bulk_copies: int = 0             # TMA / bulk copies issued (one per executing thread, PTX)
    bulk_copies_duplicate: int = 0   # of which repeat another thread's of the same warp instruction
    ctas: int = 0
    _cls: dict = dataclasses.field(default_factory=dict, repr=False)

    def count(self, ins, threads: int, warps: int) -> None:
        """One warp-level instruction per warp that had threads at this PC."""
        c = self._cls.get(ins.full)
        if c is None:
            c = self._cls[ins.full] = classify(ins.full)
        self.instructions[c] += warps
        self.instructions_total += warps
        self.thread_instructions += threads

    def count_shared(self, flat: np.ndarray, warps: np.ndarray, size: int, lanes=None) -> None:
        """Bank conflicts of one shared access: the extra wavefronts needed when distinct
        4-byte words map to the same one of 32 banks. Accesses wider than 4 bytes are
        served in phases of 128 bytes (8 threads for 16 B, 16 for 8 B), as on the GPU."""
        self.shared_accesses += len(np.unique(warps))
        per_phase = 32 * 4 // max(size, 4)
        lanes = np.arange(len(flat)) if lanes is None else np.asarray(lanes, dtype=np.int64)
        groups = warps.astype(np.int64) * 32 + (lanes % 32) // per_phase if size > 4 else warps.astype(np.int64)
        words = (flat.astype(np.int64) // 4)
        if size > 4:
            words = (words[:, None] + np.arange(size // 4)).reshape(-1)
            groups = np.repeat(groups, size // 4)
        key = np.unique(np.stack([groups, words]), axis=1)
        gb = key[0] * 32 + key[1] % 32
        banks, per_bank = np.unique(gb, return_counts=True)
        # wavefronts per phase = most distinct words in one bank; conflicts = the excess.
        worst = collections.defaultdict(int)
        for g, c in zip((banks // 32).tolist(), per_bank.tolist()):
            worst[g] = max(worst[g], c)
        self.bank_conflicts += sum(v - 1 for v in worst.values())

    @property
    def wgmma_issued(self) -> int:
        """wgmma.mma_async instructions issued (one per warpgroup)."""
        return self.wgmma

    def as_dict(self) -> dict:
        return {"instructions": dict(self.instructions), "instructions_total": self.instructions_total,
                "thread_instructions": self.thread_instructions, "global_bytes_read": self.global_read,
                "global_bytes_written": self.global_written, "shared_accesses": self.shared_accesses,
                "shared_bank_conflicts": self.bank_conflicts, "wgmma_issued": self.wgmma,
                "bulk_copies": self.bulk_copies, "bulk_copies_duplicate": self.bulk_copies_duplicate, "ctas": self.ctas}
