"""Vector clocks of the agents of each cluster and of its synchronisation objects.

Shared memory is only reachable inside a cluster, so every cluster of a machine has its
own clock space: rows are the agents (warps, then each warpgroup's wgmma completions)
followed by synchronisation objects (barrier instances, mbarrier phases); columns are
the agents' own counters followed by one counter per mbarrier (its completed phases,
which stamp the bytes asynchronous copies write). All clusters share the layout, so
the clocks are one int32 array [clusters, rows, columns] that grows on demand.
"""
import numpy as np


class Clocks:
    def __init__(self, clusters: int, agents: int):
        self.agents = agents
        self.vc = np.zeros((clusters, agents + 16, agents + 16), dtype=np.int32)
        a = np.arange(agents)
        self.vc[:, a, a] = 1                      # every agent starts in its epoch 1
        self.rows = {}                            # sync-object key -> row
        self.free = []
        self.next_row = agents
        self.comps = {}                           # mbarrier key -> column
        self.next_comp = agents

    def _grow(self, rows=0, cols=0):
        c, r, k = self.vc.shape
        nr, nk = max(r, rows), max(k, cols)
        if (nr, nk) != (r, k):
            vc = np.zeros((c, max(nr, 2 * r if nr > r else r), max(nk, 2 * k if nk > k else k)), dtype=np.int32)
            vc[:, :r, :k] = self.vc
            self.vc = vc

    def row(self, key) -> int:
        """Row of a synchronisation object (created zero: it has seen nothing)."""
        r = self.rows.get(key)
        if r is None:
            if self.free:
                r = self.free.pop()
            else:
                r = self.next_row
                self.next_row += 1
                self._grow(rows=self.next_row)
            self.rows[key] = r
        return r

    def drop(self, key):
        r = self.rows.pop(key, None)
        if r is not None:
            self.vc[:, r] = 0
            self.free.append(r)

    def comp(self, key) -> int:
        """Column counting the completed phases of mbarrier `key`."""
        c = self.comps.get(key)
        if c is None:
            c = self.comps[key] = self.next_comp
            self.next_comp += 1
            self._grow(cols=self.next_comp)
        return c

    def release(self, cl, row, agents):
        """Agents (array, one cluster) publish what they have seen into `row`, then start
        a new epoch (their later accesses are not covered by this release)."""
        vc = self.vc[cl]
        np.maximum(vc[row], vc[agents].max(axis=0), out=vc[row])
        vc[agents, agents] += 1

    def acquire(self, cl, agents, row):
        vc = self.vc[cl]
        vc[agents] = np.maximum(vc[agents], vc[row])
