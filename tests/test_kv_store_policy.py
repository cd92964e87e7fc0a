"""The KV store client's small policies (worker_runtime.kv_store_policy) and its way of waiting on calls to
several stores (worker_runtime.kv_store_client._all)."""

from __future__ import annotations

import asyncio

import pytest

from worker_runtime.kv_store_client import _all
from worker_runtime.kv_store_policy import Backoff, ReadCost, SeenBlocks, owner


def test_rendezvous_sharding_moves_only_the_leaving_stores_share() -> None:
    stores = ["s1", "s2", "s3"]
    placed = {h: owner(stores, h) for h in range(3000)}
    share = {s: sum(o == s for o in placed.values()) for s in stores}
    assert all(800 < n < 1200 for n in share.values()), share
    after = {h: owner(["s1", "s3"], h) for h in range(3000)}
    moved = [h for h in placed if placed[h] != after[h]]
    assert moved and all(placed[h] == "s2" for h in moved)


def test_the_repeated_put_policy_counts_prompts_and_forgets_the_oldest_blocks() -> None:
    seen = SeenBlocks(capacity=3)
    seen.note([1, 2])
    assert not seen.repeated(1)
    seen.note([1])
    assert seen.repeated(1) and not seen.repeated(2)
    seen.note([3, 4])  # 2 is the oldest: forgotten
    seen.note([2])
    assert not seen.repeated(2) and seen.repeated(1) is False  # 1 went when 2 came back: capacity 3


def test_the_read_cost_averages_fetches_and_counts_a_failure_only_once_reads_were_priced() -> None:
    cost = ReadCost(smoothing=0.5)
    cost.failed(2.0, 10)
    assert cost.seconds_per_block is None  # a store never read from is not priced
    cost.read(0.01, 10)
    assert cost.seconds_per_block == pytest.approx(0.001)
    cost.failed(1.0, 10)  # a timeout: 0.1 s a block for nothing
    assert cost.seconds_per_block == pytest.approx(0.0505)
    for _ in range(20):  # the store recovers: the price comes back down
        cost.read(0.01, 10)
    assert cost.seconds_per_block == pytest.approx(0.001, rel=1e-3)


def test_a_failed_fetch_pauses_fetches_until_the_pause_ends_or_the_stores_change() -> None:
    now = [0.0]
    backoff = Backoff(pause_s=5.0, clock=lambda: now[0])
    assert not backoff.paused
    backoff.failed()
    now[0] = 4.9
    assert backoff.paused
    now[0] = 5.0
    assert not backoff.paused
    backoff.failed()
    backoff.reset()
    assert not backoff.paused


async def test_all_waits_for_every_call_and_turns_a_closed_channels_cancellation_into_an_error() -> None:
    finished = []

    async def slow() -> int:
        await asyncio.sleep(0.05)
        finished.append("slow")
        return 1

    async def fails() -> int:
        raise OSError("store down")

    async def cancelled() -> int:  # what a call gets when its channel is closed under it
        raise asyncio.CancelledError

    with pytest.raises(OSError, match="store down"):
        await _all([slow(), fails()])
    assert finished == ["slow"]  # the failure was raised only once the other call had ended
    with pytest.raises(ConnectionError, match="went away"):
        await _all([cancelled(), slow()])
    assert await _all([slow(), slow()]) == [1, 1]
