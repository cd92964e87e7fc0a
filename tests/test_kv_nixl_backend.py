"""The NIXL backend in one process: two engines, WRITE and READ of scattered pages, notifications,
refusals. UCX is kept on loopback (set before the backend module imports NIXL)."""

from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_MODULES", "^ib")

import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from kv_transfer import (
    InProcessStore,
    Ranges,
    TransferEngine,
    TransferEngineConfig,
    TransferOp,
    TransferRequest,
)
from kv_transfer.backends.nixl import NixlBackend, decode_notif, encode_notif
from tests.support.engine_pair import PAGE, PAGES, Pair, check_out_of_range_refused, check_write_then_read

pytestmark = pytest.mark.skipif(not NixlBackend.is_available(), reason="NIXL is not usable here")



@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    store = InProcessStore()
    config = TransferEngineConfig(backends=("nixl",), default_timeout_s=10.0)
    a, b = TransferEngine(store, config), TransferEngine(store, config)
    src = a.allocate_host_buffer(PAGES * PAGE)
    src.copy_(torch.randint(0, 256, (PAGES * PAGE,), dtype=torch.uint8))
    dst = torch.randint(0, 256, (PAGES * PAGE,), dtype=torch.uint8)  # plain (non-shared) memory works too
    await a.register_segment("a", src)
    await b.register_segment("b", dst)
    remote = await a.open_segment("b")
    assert remote.backends == ("nixl",)
    yield Pair(a, b, src, dst)
    await a.close()
    await b.close()


async def test_write_then_read_scattered_pages_with_notifications(pair: Pair) -> None:
    check_write_then_read(pair, "nixl")


async def test_out_of_range_is_refused_before_any_byte_moves(pair: Pair) -> None:
    check_out_of_range_refused(pair)


async def test_segments_opened_in_reverse_registration_order(pair: Pair) -> None:
    """The second segment's descriptor carries newer agent metadata than the first's: opening it
    first, then the older one, must keep both reachable."""
    extra = torch.zeros(PAGE * 4, dtype=torch.uint8)
    await pair.b.register_segment("b2", extra)
    observer = TransferEngine(pair.a.store, TransferEngineConfig(backends=("nixl",)))
    try:
        local = torch.arange(PAGE * 2, dtype=torch.int64).to(torch.uint8)
        await observer.register_segment("o", local)
        await observer.open_segment("b2")
        await observer.open_segment("b")
        with observer.submit("o", [TransferRequest(TransferOp.WRITE, 0, "b2", PAGE, PAGE),
                                   TransferRequest(TransferOp.WRITE, PAGE, "b", 0, PAGE)]) as handle:
            handle.wait(10)
        assert torch.equal(extra[PAGE:2 * PAGE], local[:PAGE]) and torch.equal(pair.dst[:PAGE], local[PAGE:])
    finally:
        await observer.close()


def test_notification_encoding_round_trips() -> None:
    raw = encode_notif("id-1", "tägs", b"\x00\x01")
    assert decode_notif(raw) == ("id-1", "tägs", b"\x00\x01")
    for bad in (b"", raw[:-1], b"XXXX" + raw[4:]):
        with pytest.raises(ValueError):
            decode_notif(bad)


async def test_write_16_x_4mib_throughput() -> None:
    """Informative: 64 MiB as 16 ranges of 4 MiB, one timing printed (run with -s to see it)."""
    store = InProcessStore()
    config = TransferEngineConfig(backends=("nixl",))
    a, b = TransferEngine(store, config), TransferEngine(store, config)
    n, size = 16, 4 << 20
    try:
        src = torch.randint(0, 256, (n * size,), dtype=torch.uint8)
        dst = torch.zeros(n * size, dtype=torch.uint8)
        await a.register_segment("big-a", src)
        await b.register_segment("big-b", dst)
        await a.open_segment("big-b")
        offsets = np.arange(n) * size
        ranges = Ranges(offsets, offsets[::-1].copy(), np.full(n, size))
        with a.submit_ranges(TransferOp.WRITE, "big-a", "big-b", ranges) as warm:
            warm.wait(20)
        started = time.perf_counter()
        with a.submit_ranges(TransferOp.WRITE, "big-a", "big-b", ranges) as handle:
            handle.wait(20)
        elapsed = time.perf_counter() - started
        print(f"\nNIXL WRITE 16 x 4 MiB in one process: {n * size / elapsed / 1e9:.2f} GB/s")
        assert torch.equal(dst.view(n, size).flip(0), src.view(n, size))
    finally:
        await a.close()
        await b.close()
