"""The small policies of a worker's KV store client (worker_runtime.kv_store_client): which store holds a block,
which blocks the "repeated" put policy puts, what a store read costs, and when to stop asking a failing store."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

SEEN_CAPACITY = 1 << 16  # block hashes remembered for the "repeated" put policy
COST_SMOOTHING = 0.1  # weight of the newest fetch in the moving average of a store read's cost
BACKOFF_S = 5.0  # no fetches this long after one failed, unless the stores change


def _rank(store_id: str, block_hash: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{store_id}/{block_hash}".encode(), digest_size=8).digest(), "little")


def owner(store_ids: Sequence[str], block_hash: int) -> str:
    """The store a block lives in: rendezvous hashing, so a store joining or leaving moves only its share.
    Routers and workers must pass the same ids (every store listed in etcd) to agree."""
    return max(store_ids, key=lambda store_id: _rank(store_id, block_hash))


class SeenBlocks:
    """How many prompts prefilled here named each block (the last `capacity` blocks named are remembered): the
    "repeated" put policy puts only blocks named more than once."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._counts: OrderedDict[int, int] = OrderedDict()

    def note(self, block_hashes: Sequence[int]) -> None:
        for block_hash in block_hashes:
            self._counts[block_hash] = self._counts.get(block_hash, 0) + 1
            self._counts.move_to_end(block_hash)
        while len(self._counts) > self.capacity:
            self._counts.popitem(last=False)

    def repeated(self, block_hash: int) -> bool:
        return self._counts.get(block_hash, 0) > 1


class ReadCost:
    """Seconds a fetch spends per block, as a moving average over fetches: one that read blocks counts its time
    over them; one that failed counts its time over the blocks it was after (what it cost, for nothing). None
    until a fetch has read a block: a store never read from is not priced."""

    def __init__(self, smoothing: float = COST_SMOOTHING) -> None:
        self.smoothing = smoothing
        self.seconds_per_block: float | None = None
        self._read_any = False

    def read(self, seconds: float, blocks: int) -> None:
        if blocks:
            self._read_any = True
            self._add(seconds / blocks)

    def failed(self, seconds: float, blocks: int) -> None:
        if self._read_any and blocks:
            self._add(seconds / blocks)

    def _add(self, sample: float) -> None:
        last = self.seconds_per_block
        self.seconds_per_block = sample if last is None else (1 - self.smoothing) * last + self.smoothing * sample


class Backoff:
    """After a failed fetch, none for `pause_s`, unless the stores change meanwhile (a new store may answer)."""

    def __init__(self, pause_s: float = BACKOFF_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause_s, self._clock = pause_s, clock
        self._until = 0.0

    @property
    def paused(self) -> bool:
        return self._clock() < self._until

    def failed(self) -> None:
        self._until = self._clock() + self.pause_s

    def reset(self) -> None:
        self._until = 0.0
