"""The KV store's index alone (kv_store.index): reservations, commits, leases, eviction, lapses, namespaces,
verification, events."""

from __future__ import annotations

import pytest

from kv_store.index import EVENT_LOG_LENGTH, NamespaceError, StoreIndex

NS = "ns-a"
BLOCK = 100


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _index(blocks: int = 4, clock: Clock | None = None) -> StoreIndex:
    return StoreIndex(blocks * BLOCK, reserve_ttl_s=10.0, read_lease_s=5.0, clock=clock or Clock())


def _put(index: StoreIndex, hashes: list[int], tag: str) -> list[tuple[int, int]]:
    reserved = index.reserve(NS, BLOCK, [(h, (h, h)) for h in hashes], tag)
    index.commit(tag, [(h, True, h * 7) for h, _ in reserved])
    return reserved


def test_a_block_is_readable_only_once_committed_and_only_when_its_checksum_matched() -> None:
    index = _index()
    reserved = index.reserve(NS, BLOCK, [(1, (1,)), (2, (2,))], "w1")
    assert [h for h, _ in reserved] == [1, 2] and len({o for _, o in reserved}) == 2
    assert index.lookup(NS, [1, 2]) == []  # reserved, not written yet
    assert index.commit("w1", [(1, True, 11), (2, False, 22)]) == (1, 1)
    hits = index.lookup(NS, [1, 2])
    assert [(h.block_hash, h.checksum, h.token_ids) for h in hits] == [(1, 11, (1,))]
    s = index.stats()
    assert (s.readable_blocks, s.reserved_blocks, s.committed, s.rejected) == (1, 0, 1, 1)
    index.check_integrity()


def test_puts_of_one_hash_race_safely_the_second_is_left_out() -> None:
    index = _index()
    first = index.reserve(NS, BLOCK, [(5, (5,))], "worker-a")
    second = index.reserve(NS, BLOCK, [(5, (5,)), (6, (6,))], "worker-b")
    assert [h for h, _ in first] == [5] and [h for h, _ in second] == [6]
    assert index.commit("worker-b", [(5, True, 1)]) == (0, 1)  # not b's reservation: refused, a's untouched
    assert index.commit("worker-a", [(5, True, 1)]) == (1, 0)
    assert index.reserve(NS, BLOCK, [(5, (5,))], "worker-c") == []  # held now: a put again is a no-op
    index.check_integrity()


def test_a_lapsed_reservation_frees_its_slot_after_a_quarantine_and_its_late_commit_is_rejected() -> None:
    clock = Clock()
    index = _index(blocks=1, clock=clock)
    index.reserve(NS, BLOCK, [(1, (1,))], "dead-worker")
    assert index.reserve(NS, BLOCK, [(2, (2,))], "w2") == []  # the only slot is reserved
    clock.now = 11.0
    assert index.expire() == 1
    assert index.stats().reserved_blocks == 0 and index.stats().lapsed == 1
    assert index.commit("dead-worker", [(1, True, 1)]) == (0, 1)
    index.check_integrity()
    # a write the dead worker's transfer engine accepted may still land: the slot waits out another TTL
    assert index.reserve(NS, BLOCK, [(2, (2,))], "w2") == []
    clock.now = 21.5
    assert [h for h, _ in index.reserve(NS, BLOCK, [(2, (2,))], "w2")] == [2]
    index.check_integrity()


def test_a_block_a_reader_found_corrupt_is_dropped_only_if_the_stores_own_bytes_fail_too() -> None:
    index = _index()
    _put(index, [1, 2], "w")
    offsets = {h.block_hash: h.offset for h in index.lookup(NS, [1, 2])}
    corrupt = {offsets[2]}
    assert index.drop_unless(NS, [1, 2, 3], lambda offset, checksum: offset not in corrupt) == 1
    assert [h.block_hash for h in index.lookup(NS, [1, 2])] == [1]
    assert index.stats().dropped == 1
    version, _ = index.snapshot()
    assert index.changes_since(version - 1) == (version, [], [2])
    index.check_integrity()


def test_eviction_takes_the_least_recently_used_block_but_never_one_under_a_read_lease() -> None:
    clock = Clock()
    index = _index(blocks=2, clock=clock)
    _put(index, [1, 2], "w")
    index.lookup(NS, [1])  # 1 leased until 5.0, and most recently used
    assert [h for h, _ in _put(index, [3], "w3")] == [3]  # evicts 2 (unleased)
    assert [h.block_hash for h in index.lookup(NS, [1, 2, 3])] == [1, 3]  # now both leased
    assert _put(index, [4], "w4") == []  # nothing evictable: no room, nothing overwritten
    clock.now = 6.0
    assert [h for h, _ in _put(index, [4], "w5")] == [4]
    assert index.stats().evicted == 2
    index.check_integrity()


def test_one_namespace_per_store() -> None:
    index = _index()
    assert index.lookup(NS, [1]) == []  # no namespace yet: nothing held
    _put(index, [1], "w")
    with pytest.raises(NamespaceError, match="one store per model"):
        index.reserve("ns-b", BLOCK, [(1, (1,))], "x")
    with pytest.raises(NamespaceError):
        index.reserve(NS, BLOCK * 2, [(1, (1,))], "x")
    assert index.lookup("ns-b", [1]) == []
    with pytest.raises(NamespaceError):
        StoreIndex(BLOCK).bind(NS, BLOCK + 1)  # a block bigger than the store


def test_events_follow_the_readable_set_and_a_reader_too_far_behind_gets_a_snapshot() -> None:
    clock = Clock()
    index = _index(blocks=2, clock=clock)
    version, readable = index.snapshot()
    assert readable == []
    _put(index, [1, 2], "w")
    version, stored, removed = index.changes_since(version) or (0, [], [])
    assert (sorted(stored), removed) == ([1, 2], [])
    _put(index, [3], "w3")  # evicts 1
    assert index.changes_since(version) == (version + 2, [3], [1])
    assert index.changes_since(version + 2) == (version + 2, [], [])
    assert sorted(index.snapshot()[1]) == [2, 3]
    for h in range(10, 10 + 2 * EVENT_LOG_LENGTH + 1):  # past the log's length: the first changes are gone
        index._changed(h, readable=True)
    assert index.changes_since(version) is None
