"""Ray Serve request routers for `serve --ray`'s replicas (imported only on the Ray path: it
imports Ray Serve). The gateway hands each request to a replica through a handle whose first
argument is a `Forwarded` carrying the request's routing key (`prefix_route`).

- `PrefixAffinityRouter`: an LLM request goes to the replica that holds the longest prefix of
  its prompt while that replica's queue is within `slack` of the shortest, else to the less
  loaded of its prefix's two hash-chosen replicas; a request without a key (KServe, metrics)
  to the less loaded of two random replicas (Serve's own power of two choices).
- `RoundRobinRouter`: each request to the next replica in turn (what affinity is measured
  against).
"""
from __future__ import annotations

import itertools
import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .prefix_route import AffinityTable


def _key(pending: PendingRequest | None) -> tuple[bytes, ...] | None:
    if pending is None or not pending.args:
        return None
    return getattr(pending.args[0], "key", None)


class PrefixAffinityRouter(RequestRouter):
    """Cache-affinity routing with load balancing (see the module)."""

    def initialize_state(self, slack: int = 4, capacity: int = 1 << 18, **_: Any) -> None:
        self.table: AffinityTable[ReplicaID] = AffinityTable(capacity=capacity, slack=slack)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        chain = _key(pending_request)
        if not chain:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        cache = self.replica_queue_len_cache
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: cache.get(rid) for rid in by_id}
        return [[by_id[rid] for rid in rank] for rank in self.table.rank(chain, loads)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        chain = _key(pending_request)
        if chain:
            self.table.record(chain, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Replicas scaled down or redeployed: nothing routes to them by affinity."""
        before = set(self.curr_replicas)
        super().update_replicas(replicas)
        for gone in before - set(self.curr_replicas):
            self.table.forget(gone)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn (the next after it if that one is full)."""

    def initialize_state(self, **_: Any) -> None:
        self.turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.to_full_id_str())
        first = next(self.turn) % len(ordered)
        return [[r] for r in ordered[first:] + ordered[:first]]


ROUTERS = {"prefix": PrefixAffinityRouter, "round-robin": RoundRobinRouter}
