"""Grants: which byte ranges of a guarded segment a peer may move, for which request.

A segment registered with `guarded=True` (a decode worker's KV pool) accepts a two-sided batch
(TCP, NCCL) only when every range lies inside a grant that its owner made to that peer engine under
the batch's notification tag, for that op. The decode side grants the blocks it reserved for one
request to the prefill engine it asked (kv_transfer.kv_connector) and revokes the grant when it
stops waiting. So a member's write into pages reserved for another request or another engine
(a stale block list, a late write of an abandoned attempt, a bug, a process that reads etcd and
holds the secret but is not the engine asked) is refused: no byte moves, the initiator gets
`GrantRefusedError`, and it is counted in `tandem_kv_grant_refused_total{reason}`.

What grants do not stop: the peer's engine id is the one its Hello names, proven only by the one
cluster secret that every member holds, so a member that impersonates the engine asked passes
them; and one-sided transports (shared memory, NIXL/RDMA) write without the target's CPU and cannot
check grants (`--kv-backends tcp` keeps a pool's writes two-sided). Per-engine credentials would close
the first (not done).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter

GRANT_REFUSED = Counter("tandem_kv_grant_refused", "Batches a guarded segment refused, by reason (no_grant: the "
                        "peer holds no grant for that request and op; outside_grant: a range leaves its grant)",
                        ["reason"])

GrantKey = tuple[str, str, str, str]  # (segment, peer engine, tag, op)


@dataclass(frozen=True)
class Grant:
    """Sorted, disjoint byte intervals [starts[i], ends[i]) of one segment."""

    key: GrantKey
    starts: np.ndarray = field(repr=False)
    ends: np.ndarray = field(repr=False)

    def covers(self, offsets: np.ndarray, lengths: np.ndarray) -> bool:
        """Every (offset, length > 0) lies inside one interval (no sum that could wrap is formed)."""
        if not len(offsets):
            return True
        if not len(self.starts):
            return False
        index = np.searchsorted(self.starts, offsets, side="right") - 1
        inside = index >= 0
        safe = np.where(inside, index, 0)
        return bool((inside & (lengths > 0) & (offsets <= self.ends[safe] - lengths)).all())


def merged_intervals(offsets: Iterable[int] | np.ndarray, lengths: Iterable[int] | np.ndarray) -> tuple[np.ndarray,
                                                                                                        np.ndarray]:
    """(starts, ends) of the union of the ranges, sorted and disjoint (touching ranges joined)."""
    starts = np.asarray(offsets, dtype=np.int64)
    ends = starts + np.asarray(lengths, dtype=np.int64)
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new_run = np.concatenate(([True], starts[1:] > reach[:-1]))
    run_starts = starts[new_run]
    run_ends = reach[np.concatenate((np.flatnonzero(new_run)[1:] - 1, [len(starts) - 1]))]
    return run_starts, run_ends


class GrantTable:
    """The grants of one transfer engine; thread-safe (backends check from their own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[GrantKey, Grant] = {}

    def grant(self, segment: str, peer: str, tag: str, offsets: Iterable[int] | np.ndarray,
              lengths: Iterable[int] | np.ndarray, ops: tuple[str, ...] = ("write",)) -> list[GrantKey]:
        """Let `peer` move the ranges under `tag` (replacing an earlier grant of the same key)."""
        starts, ends = merged_intervals(offsets, lengths)
        keys = [(segment, peer, tag, op) for op in ops]
        with self._lock:
            for key in keys:
                self._grants[key] = Grant(key, starts, ends)
        return keys

    def revoke(self, keys: Iterable[GrantKey]) -> None:
        with self._lock:
            for key in keys:
                self._grants.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._grants)

    def check(self, segment: str, peer: str, tag: str, op: str, pairs: np.ndarray) -> str | None:
        """Why a batch of (offset, length) rows must be refused, or None. Counts refusals."""
        with self._lock:
            grant = self._grants.get((segment, peer, tag, op))
        if grant is None:
            GRANT_REFUSED.labels("no_grant").inc()
            return f"{peer!r} holds no {op} grant on segment {segment!r} for {tag!r}"
        if not grant.covers(pairs[:, 0], pairs[:, 1]):
            GRANT_REFUSED.labels("outside_grant").inc()
            return f"a range falls outside the {op} grant of {peer!r} on segment {segment!r} for {tag!r}"
        return None
