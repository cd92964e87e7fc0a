"""The second tier's side for the cluster KV store (engine.kv_offload): blocks fetched from outside into held
slots (readable only once landed; a failed fetch's slot quarantined; a reset during a fetch drops it), and
blocks exported (pinned: not evicted, their slots not reused, even across a reset, until unpinned)."""

from __future__ import annotations

import time

from tests.test_kv_offload import BLOCK, _cached, _tier


def _fill(tier, bm, count: int, first: int = 100) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    tokens = list(range(first, first + count * BLOCK))
    ids, hashes = _cached(bm, tokens)
    bm.release(ids)
    tier.flush()
    return tokens, hashes


def test_a_fetched_block_is_readable_only_once_landed_and_a_failed_one_quarantines_its_slot() -> None:
    _, tier, _ = _tier(3)
    tier.max_quarantined = 3  # (a real tier refuses fetches once half its slots are quarantined)
    blocks = [(7001, (1, 2, 3, 4)), (7002, (5, 6, 7, 8)), (7003, (9, 9, 9, 9))]
    slots = tier.hold_for_load(blocks)
    assert len(slots) == 3 and len(set(slots)) == 3
    assert tier.match([7001], [1, 2, 3, 4], 0) == []  # held, not landed
    tier.memory.view(3, -1)[slots[0]] = 5  # what a transfer engine read writes
    tier.finish_load([7001, 7002, 7003], [True, False, False], quarantine_s=0.3)
    assert tier.match([7001], [1, 2, 3, 4], 0) == [7001]
    tier.check_integrity()
    # no slot is free: 7001, readable, is evicted for 7004; the quarantined slots stay out of use
    assert tier.hold_for_load([(7004, (0,) * 4), (7005, (0,) * 4)]) == [slots[0]]
    assert tier.stats().evicted_blocks == 1
    time.sleep(0.35)
    assert sorted(tier.hold_for_load([(7005, (0,) * 4), (7006, (0,) * 4)])) == sorted(slots[1:])  # quarantine over
    tier.check_integrity()


def test_hold_stops_at_a_block_already_here() -> None:
    _, tier, bm = _tier(4)
    _, hashes = _fill(tier, bm, 1)
    assert tier.hold_for_load([(hashes[0], tuple(range(100, 104))), (1, (0,) * 4)]) == []


def test_a_reset_during_a_fetch_drops_the_fetched_block_when_it_lands() -> None:
    _, tier, _ = _tier(2)
    [slot] = tier.hold_for_load([(42, (1, 2, 3, 4))])
    tier.clear()
    tier.check_integrity()
    assert slot not in tier.hold_for_load([(43, (0,) * 4), (44, (0,) * 4)])  # its slot stays out of use
    tier.finish_load([42], [True])
    assert tier.match([42], [1, 2, 3, 4], 0) == []
    tier.check_integrity()


def test_an_exported_block_is_pinned_until_unpinned_even_across_a_reset() -> None:
    _, tier, bm = _tier(2, num_blocks=8)
    tier.collect_exports = True
    tokens, hashes = _fill(tier, bm, 2)
    exports = tier.take_exports(8)
    assert sorted((h, t) for h, _, t in exports) == sorted((h, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]))
                                                           for i, h in enumerate(hashes))
    assert tier.take_exports(8) == []  # taken once
    _fill(tier, bm, 2, first=500)  # two more blocks freed: no room (both pinned), dropped
    assert tier.stats().dropped_blocks == 2 and tier.match(hashes, tokens, 0) == hashes
    tier.clear()  # a reset while pinned: the slots stay out of use until the exports end
    tier.check_integrity()
    assert tier.hold_for_load([(1, (0,) * 4)]) == []
    tier.unpin([(h, slot) for h, slot, _ in exports])
    tier.check_integrity()
    assert len(tier.hold_for_load([(1, (0,) * 4), (2, (0,) * 4)])) == 2


def test_a_late_unpin_never_touches_a_newer_entry_of_the_same_hash() -> None:
    _, tier, bm = _tier(2, num_blocks=8)
    tier.collect_exports = True
    tokens, hashes = _fill(tier, bm, 1)
    [(block_hash, slot, _)] = tier.take_exports(8)
    bm.reset_prefix_cache()  # a reset, as the engine makes it: the pool's and the tier's
    tier.clear()
    _fill(tier, bm, 1)  # the same block again, in the other slot (the old one is orphaned, pinned)
    again = tier.take_exports(8)
    assert again[0][1] != slot
    tier.unpin([(block_hash, slot)])  # the old pin ends: the new entry keeps its own
    _fill(tier, bm, 2, first=900)  # room for one of them only: the new entry of the hash stays (pinned)
    assert tier.match(hashes, tokens, 0) == hashes
    tier.check_integrity()



def test_fetches_are_refused_while_half_the_tier_is_quarantined() -> None:
    _, tier, _ = _tier(4)
    slots = tier.hold_for_load([(1, (0,) * 4), (2, (0,) * 4)])
    tier.finish_load([1, 2], [False, False], quarantine_s=60.0)  # a failing store's reads
    assert tier.hold_for_load([(3, (0,) * 4)]) == []  # 2 of 4 quarantined: no more fetches
    tier.check_integrity()
    assert len(slots) == 2
