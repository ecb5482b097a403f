"""Ranks that agree or fail loudly: a small record per rank exchanged through the process
group's key-value store before anything else moves.

At construction every rank of a Buffer publishes its configuration; before each dispatch
or combine it publishes the call's header (kind, hidden, top-k, dtype, num_experts, ...).
Each rank then reads every rank's record and compares them itself, so every rank reaches
the same decision: on a mismatch all of them raise RankMismatchError naming the field and
each rank's value, before any payload moves (the Buffer stays usable: the call counter
advanced on every rank alike).

Why the store and not a collective: a collective that one rank never joins cannot tell the
others who is missing, and gloo aborts on mismatched sizes. Here each rank waits for the
others' keys with `timeout_s`; on timeout it checks which keys exist and names the ranks
that did not arrive (RankTimeoutError). The calls are then out of step, so the Buffer is
marked broken on that rank and leaves an abort key: a late rank that arrives afterwards
finds it and raises too. A broken Buffer raises at every later call: make a new one on
every rank.

Keys: pykernels/ep/<group ranks>/<buffer number>/<call number>/<rank> (the buffer number
from a per-rank counter in the store); each rank deletes its own key of call k - 2 at
call k (by then every rank has read it).
"""
import datetime
import json

import torch.distributed as dist


class RankMismatchError(ValueError):
    """The ranks of a Buffer disagree on a field (of the configuration or of one call).
    Raised on every rank before any payload moved; the Buffer remains usable."""


class RankTimeoutError(TimeoutError):
    """A rank did not reach a Buffer call (or construction) within timeout_s. Raised on
    every live rank, naming the absent ranks; the Buffer is unusable afterwards."""


class BufferBrokenError(RuntimeError):
    """A call on a Buffer that an earlier timeout (here or on a peer) left out of step."""


def _group_ranks(group) -> tuple:
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


class Agreement:
    """One Buffer's exchange of per-rank records. `what` names the Buffer in messages."""

    def __init__(self, group, rank: int, num_ranks: int, timeout_s: float):
        self.rank, self.num_ranks, self.timeout_s = rank, num_ranks, float(timeout_s)
        group_name = "-".join(map(str, _group_ranks(group)))
        self.store = dist.distributed_c10d._get_default_store()
        # every rank numbers the Buffers of a group in construction order (a collective, like
        # DeepEP's), counted in the store (a new process group starts again from 1) before
        # anything can fail, so a failed construction keeps step
        number = self.store.add(f"pykernels/ep/{group_name}/buffers/{rank}", 1)
        self.prefix = f"pykernels/ep/{group_name}/{number}"
        self.seq = 0
        self.broken = None      # the reason, once a timeout left the calls out of step

    def _key(self, seq, rank):
        return f"{self.prefix}/{seq}/{rank}"

    @property
    def _abort_key(self):
        return f"{self.prefix}/abort"

    def abort(self, reason: str):
        """Mark this Buffer unusable here and for every peer (a timeout inside a transport)."""
        self.broken = reason
        try:
            self.store.set(self._abort_key, reason)
        except Exception:    # the store itself is gone: this rank's mark is all there is
            pass

    def check_abort(self):
        if self.broken is None and self.store.check([self._abort_key]):
            self.broken = self.store.get(self._abort_key).decode()
        if self.broken is not None:
            raise BufferBrokenError(f"this Buffer is unusable: {self.broken}. Make a new Buffer on every rank "
                                    f"(and, after a timeout inside a collective, a new process group).")

    def exchange(self, what: str, record: dict) -> list:
        """Publish this rank's record for the next step, wait for every rank's, return them
        (a list indexed by rank). RankTimeoutError names the ranks that did not arrive."""
        self.check_abort()
        seq = self.seq
        self.seq += 1
        self.store.set(self._key(seq, self.rank), json.dumps(record))
        keys = [self._key(seq, r) for r in range(self.num_ranks)]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:   # the store raises RuntimeError / DistStoreError on timeout
            absent = [r for r, k in enumerate(keys) if not self.store.check([k])]
            if not absent:       # arrived just now: a real store failure, not a timeout
                raise
            reason = (f"{what}: rank(s) {absent} did not arrive within timeout_s={self.timeout_s:g} s "
                      f"(seen by rank {self.rank})")
            self.abort(reason)
            raise RankTimeoutError(f"{reason}. No data moved. This Buffer is now unusable on every rank (the "
                                   f"ranks' calls are out of step): make a new Buffer on every rank.") from e
        try:
            values = self.store.multi_get(keys)       # one round trip on a TCPStore
        except (AttributeError, NotImplementedError, RuntimeError):
            values = [self.store.get(k) for k in keys]
        records = [json.loads(v) for v in values]
        self.check_abort()      # a peer may have given up on this step while we waited
        if seq >= 2:
            try:
                self.store.delete_key(self._key(seq - 2, self.rank))
            except Exception:    # a store without delete: the keys just stay
                pass
        return records
