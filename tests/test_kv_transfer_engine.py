"""The transfer engine in one process: errors, validation on both sides, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from common.etcd.local import free_port
from kv_transfer import (
    EtcdStore,
    InProcessStore,
    InvalidTransferError,
    MetadataStoreError,
    NotifySpec,
    Ranges,
    RemoteRejectedError,
    SegmentNotFoundError,
    TransferEngine,
    TransferEngineConfig,
    TransferOp,
    TransferRequest,
)
from kv_transfer.transfer_engine import RemoteSegment


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _pair(backend: str) -> tuple[TransferEngine, TransferEngine, torch.Tensor, torch.Tensor]:
    store = InProcessStore()
    a = TransferEngine(store, TransferEngineConfig(backends=(backend,)))  # type: ignore[arg-type]
    b = TransferEngine(store, TransferEngineConfig(backends=(backend,)))  # type: ignore[arg-type]
    mem_a, mem_b = a.allocate_host_buffer(1 << 16), b.allocate_host_buffer(1 << 16)
    mem_a.copy_(torch.randint(0, 256, (1 << 16,), dtype=torch.uint8))
    await a.register_segment("a", mem_a)
    await b.register_segment("b", mem_b)
    await a.open_segment("b")
    return a, b, mem_a, mem_b


@pytest.mark.parametrize("backend", ["shm", "tcp"])
async def test_mixed_read_write_batch_notifies_and_counts(backend: str) -> None:
    a, b, mem_a, mem_b = await _pair(backend)
    before = _metric("tandem_kv_transfer_bytes_total", backend=backend, peer=b.engine_id, op="write")
    expect_b = mem_b.clone()
    expect_b[1000:1100] = mem_a[0:100]
    expect_a = mem_a.clone()
    expect_a[5000:5010] = mem_b[0:10]
    sub = b.subscribe("t", peer=a.engine_id)
    handle = a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 1000, 100),
                            TransferRequest(TransferOp.READ, 5000, "b", 0, 10)], notify=NotifySpec("t", b"m"))
    await handle.wait_async(5)
    assert torch.equal(mem_b, expect_b) and torch.equal(mem_a, expect_a)
    notes = [await sub.get_async(5), await sub.get_async(5)]
    assert {n.batch_id for n in notes} == set(handle.batch_ids) and all(n.ok and n.message == b"m" for n in notes)
    assert _metric("tandem_kv_transfer_bytes_total", backend=backend, peer=b.engine_id, op="write") == before + 100
    assert _metric("tandem_kv_transfer_seconds_count", backend=backend, peer=b.engine_id, op="read") >= 1
    await a.close()
    await b.close()


async def test_out_of_range_and_unopened_segments_are_refused_before_moving() -> None:
    a, b, _, mem_b = await _pair("tcp")
    snapshot = mem_b.clone()
    bad = [((1 << 16) - 5, 10, 0), (0, 10, (1 << 16) - 5), (0, 0, -1), (0, 0, 0)]
    for local_off, length, remote_off in bad:
        with pytest.raises(InvalidTransferError):
            a.submit("a", [TransferRequest(TransferOp.WRITE, local_off, "b", remote_off, length)])
    with pytest.raises(InvalidTransferError, match="not open"):
        a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "elsewhere", 0, 1)])
    with pytest.raises(InvalidTransferError, match="not registered"):
        a.submit("nope", [TransferRequest(TransferOp.WRITE, 0, "b", 0, 1)])
    assert torch.equal(mem_b, snapshot)
    await a.close()
    await b.close()


async def test_target_rejects_ranges_outside_its_segment_even_if_the_descriptor_lies() -> None:
    """The owner validates too: an initiator with a stale or forged descriptor gets a clear refusal."""
    a, b, _, mem_b = await _pair("tcp")
    snapshot = mem_b.clone()
    real = a._remotes["b"]
    forged = dataclasses.replace(real.descriptor, length=1 << 20)
    a._remotes["b"] = RemoteSegment(forged, real.backends)
    ranges = Ranges(np.array([0]), np.array([(1 << 16) - 8]), np.array([64]))
    handle = a.submit_ranges(TransferOp.WRITE, "a", "b", ranges)
    with pytest.raises(RemoteRejectedError, match="outside segment 'b'"):
        await handle.wait_async(5)
    assert torch.equal(mem_b, snapshot)
    ok = a.submit_ranges(TransferOp.WRITE, "a", "b", Ranges(np.array([0]), np.array([0]), np.array([8])))
    await ok.wait_async(5)  # the connection survives a refusal
    await a.close()
    await b.close()


async def test_missing_segment_and_unreachable_store_name_the_segment() -> None:
    engine = TransferEngine(InProcessStore())
    with pytest.raises(SegmentNotFoundError, match="'kv-pool-7'"):
        await engine.open_segment("kv-pool-7")
    await engine.close()
    store = EtcdStore(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    engine = TransferEngine(store)
    with pytest.raises(MetadataStoreError, match="kv-pool-7"):
        await asyncio.wait_for(engine.open_segment("kv-pool-7"), 10)
    with pytest.raises(MetadataStoreError, match="unreachable"):
        await asyncio.wait_for(engine.register_segment("mine", torch.zeros(16, dtype=torch.uint8)), 10)
    await engine.close()



async def test_an_idle_engines_deadline_watchdog_does_not_wake(monkeypatch) -> None:
    """The watchdog sleeps until the earliest deadline of a pending batch: with none pending it never
    wakes (a fleet of simulated workers holds hundreds of engines); batches still complete after."""
    import threading
    import time

    import kv_transfer.transfer_engine as module

    wakes: list[float] = []

    class Clock:  # the module's `time`: counts the watchdog's reads, one per wake-up
        @staticmethod
        def monotonic() -> float:
            if threading.current_thread().name == "kv-xfer-watchdog":
                wakes.append(time.monotonic())
            return time.monotonic()

    monkeypatch.setattr(module, "time", Clock)
    a, b, mem_a, mem_b = await _pair("tcp")
    handle = a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 0, 64)])
    await handle.wait_async(5)
    await asyncio.sleep(0.1)
    settled = len(wakes)
    await asyncio.sleep(0.5)  # 25 periods of the old 20 ms poll
    assert len(wakes) == settled, f"an idle watchdog woke {len(wakes) - settled} times in 0.5 s"
    handle = a.submit("a", [TransferRequest(TransferOp.WRITE, 64, "b", 64, 64)])
    await handle.wait_async(5)
    assert torch.equal(mem_b[:128], mem_a[:128])
    await a.close()
    await b.close()


async def test_the_watchdog_fails_a_batch_nobody_waits_on_at_its_deadline(monkeypatch) -> None:
    """A batch whose transport never finishes it fails at its deadline, by the watchdog alone (no waiter
    expires it), though the watchdog was asleep with nothing pending when it was submitted."""
    from kv_transfer.batch import BatchStatus

    a, b, _, _ = await _pair("tcp")
    await asyncio.sleep(0.1)  # the watchdog is asleep, nothing pending
    monkeypatch.setattr(a.backends["tcp"], "start", lambda batch: None)  # the transport drops it
    handle = a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 0, 64)], timeout_s=0.3)
    deadline = asyncio.get_running_loop().time() + 5
    while handle.status is BatchStatus.PENDING:
        assert asyncio.get_running_loop().time() < deadline, "the batch outlived its deadline by 4.7 s"
        await asyncio.sleep(0.02)
    assert handle.status is BatchStatus.FAILED and "deadline" in str(handle.error)
    await a.close()
    await b.close()


def test_peer_link_frames_round_trip_and_reject_garbage() -> None:
    from kv_transfer.messages import Hello, Notify, XferHeader, decode, encode

    for msg in (Notify("b-1", "kv", "kv/r", b"\x00\xff note", True), Notify("", "s", "", b"", False, "boom é"),
                Hello("e1", "data:tcp"), XferHeader("b", "write", "kv", 3, 30, "t", b"\x01", 2.5)):
        raw = encode(msg)
        assert int.from_bytes(raw[:4], "big") == len(raw) - 4
        assert decode(raw[4:]) == msg
    truncated = encode(Notify("b-1", "kv", "kv/r", b"note", True))[4:-2]
    with pytest.raises(ValueError):
        decode(truncated)
    with pytest.raises(ValueError):
        decode(b"N\x01")
    with pytest.raises(ValueError):
        decode(b'{"kind": "nope"}')


async def test_etcd_store_publishes_again_after_losing_its_lease() -> None:
    import aetcd

    from common.etcd.local import running_etcd

    with running_etcd() as endpoint:
        store = EtcdStore(endpoint, lease_ttl_s=2)
        await store.put("/t/segments/a", b"descriptor")
        host, _, port = endpoint.rpartition(":")
        async with aetcd.Client(host, int(port)) as admin:  # as if etcd had lost the lease
            await admin.revoke_lease(store.keys.lease_id)
        assert await store.get("/t/segments/a") is None
        for _ in range(50):
            if await store.get("/t/segments/a") == b"descriptor":
                break
            await asyncio.sleep(0.1)
        assert await store.get("/t/segments/a") == b"descriptor" and store.keys.grants == 2
        await store.close()
        reader = EtcdStore(endpoint)
        assert await reader.get("/t/segments/a") is None  # close revoked the lease
        await reader.close()


async def test_a_get_whose_client_a_lease_recovery_closes_fails_like_any_etcd_error(tmp_path) -> None:
    """etcd answers nothing (SIGSTOP) while a get is in flight and the lease's recovery closes the
    client under it: the get raises MetadataStoreError (its caller falls through to the next prefill
    target), not grpc.aio's CancelledError, which escaped every handler and left a decode worker's
    Generate call unanswered until its deadline."""
    import signal

    import aetcd

    from common.etcd.local import EtcdServer

    etcd = EtcdServer(str(tmp_path))
    etcd.start()
    store = EtcdStore(etcd.endpoint, lease_ttl_s=60, timeout_s=3.0)
    try:
        await store.put("/t/segments/a", b"descriptor")
        assert etcd.proc is not None
        etcd.proc.send_signal(signal.SIGSTOP)
        try:
            get = asyncio.ensure_future(store.get("/t/segments/a"))
            await asyncio.sleep(0.3)  # the get is in flight
            # what the keep-alive loop does when a refresh fails; etcd is frozen: the new client cannot connect
            with pytest.raises((aetcd.exceptions.ClientError, TimeoutError)):
                await store.keys._recover()
            with pytest.raises(MetadataStoreError, match="cancelled under us"):
                await get
        finally:
            etcd.proc.send_signal(signal.SIGCONT)
    finally:
        await store.close()
        etcd.stop()


def test_a_subscription_for_one_peer_ignores_notes_from_another() -> None:
    """A note with the awaited tag but from another engine (e.g. an abandoned attempt) is dropped."""
    from kv_transfer.datatypes import Notification
    from kv_transfer.notifications import NotificationInbox

    inbox = NotificationInbox()
    with inbox.subscribe("kv/r", peer="p2") as sub:
        inbox.deliver(Notification("p1", "b1", "kv/r", b"stale", True))
        inbox.deliver(Notification("p2", "b2", "kv/r", b"fresh", True))
        assert sub.get(1).message == b"fresh"
    assert inbox.num_dropped == 1
