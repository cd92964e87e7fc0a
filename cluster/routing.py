"""Routing policies: which decode worker serves a request, and which prefill workers (in order of
preference; later ones are retries) prefill it.

`kv_aware` prices each candidate in blocks of prefill work: blocks of the prompt its prefix cache
lacks, plus blocks it would load from its second KV tier or read from the cluster KV store at the prices it
measured (a fraction of a block's compute), times `overlap_weight`, plus the requests it already has in flight.
Decode workers that prefill themselves (role both) are priced the same way; pure decode workers by load alone.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from cluster.worker_pool import WorkerHandle

PolicyName = Literal["kv_aware", "least_loaded", "round_robin"]
POLICIES: tuple[PolicyName, ...] = ("kv_aware", "least_loaded", "round_robin")
_WORKER_ID = operator.attrgetter("record.worker_id")
_INFLIGHT = operator.attrgetter("inflight")


@dataclass(frozen=True)
class Route:
    decode: WorkerHandle
    prefill: tuple[WorkerHandle, ...]  # empty: the decode worker prefills itself
    overlap_blocks: int  # prompt blocks the first prefill worker (or the decode worker) holds


class RoutingPolicy:
    def __init__(self, name: PolicyName, overlap_weight: float = 1.0, prefill_retries: int = 1,
                 in_store: Callable[[int], bool] | None = None) -> None:
        """`in_store`: whether a block is readable in the cluster KV store (cluster.kv_store_view)."""
        if name not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {name!r}")
        self.name = name
        self.overlap_weight = overlap_weight
        self.prefill_retries = prefill_retries
        self.in_store = in_store
        self._turns = {"decode": itertools.count(), "prefill": itertools.count()}  # one per pool: fair ties
        # per pool: the last tuple of workers seen and its workers in id order (a tuple never changes)
        self._sorted: dict[str, tuple[tuple[WorkerHandle, ...], list[WorkerHandle], bool]] = {}

    def route(self, decode_pool: Sequence[WorkerHandle], prefill_pool: Sequence[WorkerHandle],
              block_hashes: list[int]) -> Route:
        """`decode_pool` must not be empty."""
        assert decode_pool
        decode = self._best(decode_pool, block_hashes, "decode", 1)[0]
        if decode.record.role == "both" or not prefill_pool:
            return Route(decode, (), decode.overlap_blocks(block_hashes))
        prefill = tuple(self._best(prefill_pool, block_hashes, "prefill", 1 + self.prefill_retries))
        return Route(decode, prefill, prefill[0].overlap_blocks(block_hashes))

    def _best(self, pool: Sequence[WorkerHandle], block_hashes: list[int], pool_name: str,
              count: int) -> list[WorkerHandle]:
        """The `count` cheapest workers, cheapest first; among equals, from this turn's worker on (in
        worker-id order: ties go round-robin). One pass over the pool (a thousand workers: no sort)."""
        workers, only_decode = self._in_id_order(pool, pool_name)
        start = next(self._turns[pool_name]) % len(workers)
        rotated = workers[start:] + workers[:start]
        if self.name == "round_robin":
            return rotated[:count]
        if self.name == "least_loaded" or only_decode:  # pure decode workers cost their load alone (cost)
            return heapq.nsmallest(count, rotated, key=_INFLIGHT)  # stable: ties keep the rotation's order
        return heapq.nsmallest(count, rotated, key=lambda w: self.cost(w, block_hashes))

    def _in_id_order(self, pool: Sequence[WorkerHandle], pool_name: str) -> tuple[list[WorkerHandle], bool]:
        """`pool` in worker-id order, and whether all its workers are pure decode ones; worked out once per
        pool object (WorkerPool hands out the same tuple until its workers change: a thousand workers are
        not sorted again on every request)."""
        last = self._sorted.get(pool_name)
        if last is not None and last[0] is pool:
            return last[1], last[2]
        workers = sorted(pool, key=_WORKER_ID)
        only_decode = all(w.record.role == "decode" for w in workers)
        if isinstance(pool, tuple):  # a list may change under the same identity: not kept
            self._sorted[pool_name] = (pool, workers, only_decode)
        return workers, only_decode

    def cost(self, worker: WorkerHandle, block_hashes: list[int]) -> float:
        if worker.record.role == "decode":
            return worker.inflight
        return self.overlap_weight * worker.prefill_work(block_hashes, self.in_store) + worker.inflight
