"""The NCCL backend in one process: two engines, WRITE and READ of scattered pages, notifications,
refusals, a peer that dies or stalls mid-batch, over open, secret-sealed and mutual-TLS links. On
CPU the same code runs over Gloo (only when the config names "nccl"), which waits without the peer
watch (tests/test_kv_link_tls.py checks the watch beneath TLS); the CUDA variant needs two GPUs
(NCCL puts no two ranks on one device)."""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # read when a NCCL group is built

import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import torch

import kv_transfer.backends.nccl as nccl_module
from common.pki import make_pki
from kv_transfer import (
    BackendUnavailableError,
    InProcessStore,
    PeerLostError,
    Ranges,
    RemoteRejectedError,
    TransferEngine,
    TransferEngineConfig,
    TransferOp,
    TransferRequest,
    TransferTimeoutError,
)
from kv_transfer.backends.nccl import PURPOSE, NcclBackend
from kv_transfer.backends.pair_group import PairGroup, join_store, plan_chunks
from kv_transfer.channel import Channel
from kv_transfer.link_tls import LinkTls
from kv_transfer.messages import GroupSetup, XferHeader, XferReply
from tests.support.engine_pair import PAGE, PAGES, Pair, check_out_of_range_refused, check_write_then_read, page_ranges

pytestmark = pytest.mark.skipif(not NcclBackend.is_available(), reason="torch.distributed has neither Gloo nor NCCL")

NCCL_ONLY = TransferEngineConfig(backends=("nccl",), default_timeout_s=10.0)


async def make_pair(device: str, config: TransferEngineConfig = NCCL_ONLY) -> Pair:
    store = InProcessStore()
    a, b = TransferEngine(store, config), TransferEngine(store, config)
    src = torch.randint(0, 256, (PAGES * PAGE,), dtype=torch.uint8).to(device.replace("*", "0"))
    dst = torch.randint(0, 256, (PAGES * PAGE,), dtype=torch.uint8).to(device.replace("*", "1"))
    await a.register_segment("a", src)
    await b.register_segment("b", dst)
    remote = await a.open_segment("b")
    assert remote.backends == ("nccl",)
    return Pair(a, b, src, dst)


@pytest.fixture(params=["open", "secret", "tls"])
async def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    config = NCCL_ONLY
    if request.param == "secret":
        config = dataclasses.replace(config, link_secret=b"cluster-secret-5be1c0a9d2")
    elif request.param == "tls":
        pki = make_pki(tmp_path_factory.mktemp("pki"), "cluster")
        config = dataclasses.replace(config, link_tls=LinkTls(str(pki.ca), str(pki.cert), str(pki.key)))
    p = await make_pair("cpu", config)
    yield p
    await p.a.close()
    await p.b.close()


async def test_write_and_read_scattered_pages_with_notifications(pair: Pair) -> None:
    check_write_then_read(pair, "nccl")


async def test_out_of_range_is_refused_before_any_byte_moves(pair: Pair) -> None:
    check_out_of_range_refused(pair)


async def test_random_lengths_across_chunk_boundaries(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3000 bytes: ranges split over chunks, and chunks packing several ranges (staged)."""
    monkeypatch.setattr(nccl_module, "CHUNK_BYTES", 3000)  # read when the channel builds its group
    rng = np.random.default_rng(5)
    size, n, longest = PAGES * PAGE, 24, 5000
    expected_dst, expected_src = pair.dst.clone(), pair.src.clone()
    for op in (TransferOp.WRITE, TransferOp.READ):
        slot = size // n
        lengths = rng.integers(1, longest + 1, n)
        local = rng.permutation(np.arange(n) * slot) + rng.integers(0, slot - longest, n)
        remote = rng.permutation(np.arange(n) * slot) + rng.integers(0, slot - longest, n)
        with pair.a.submit_ranges(op, "a", "b", Ranges(local, remote, lengths)) as handle:
            handle.wait(10)
        for lo, ro, k in zip(local.tolist(), remote.tolist(), lengths.tolist(), strict=True):
            if op is TransferOp.WRITE:
                expected_dst[ro:ro + k] = expected_src[lo:lo + k]
            else:
                expected_src[lo:lo + k] = expected_dst[ro:ro + k]
    assert torch.equal(pair.dst, expected_dst) and torch.equal(pair.src, expected_src)


def test_chunk_plan_covers_the_stream_in_order() -> None:
    plan = plan_chunks(np.array([100, 0, 50]), np.array([7, 3, 5]), 4)
    pieces = [list(zip(*(a.tolist() for a in plan.chunk(k)), strict=True)) for k in range(len(plan))]
    assert pieces == [[(100, 4)], [(104, 3), (0, 1)], [(1, 2), (50, 2)], [(52, 3)]]


async def test_concurrent_batches_in_both_directions(pair: Pair) -> None:
    """Both engines initiate at once (one channel each way), several batches queued per channel."""
    await pair.b.register_segment("b-src", pair.dst)
    await pair.a.open_segment("b")
    await pair.b.open_segment("a")
    src_a, dst_b = pair.src.clone(), pair.dst.clone()
    handles = []
    for i in range(4):  # a writes pages 0..15 of a into b's pages 32..47; b writes its 16..31 into a's 48..63
        handles.append(pair.a.submit_ranges(TransferOp.WRITE, "a", "b", page_ranges(
            np.arange(4 * i, 4 * i + 4), np.arange(32 + 4 * i, 36 + 4 * i))))
        handles.append(pair.b.submit_ranges(TransferOp.WRITE, "b-src", "a", page_ranges(
            np.arange(16 + 4 * i, 20 + 4 * i), np.arange(48 + 4 * i, 52 + 4 * i))))
    for handle in handles:
        handle.wait(10)
        handle.release()
    assert torch.equal(pair.dst.view(PAGES, PAGE)[32:48], src_a.view(PAGES, PAGE)[:16])
    assert torch.equal(pair.src.view(PAGES, PAGE)[48:], dst_b.view(PAGES, PAGE)[16:32])


async def test_cpu_pairs_use_gloo_only_when_asked_for() -> None:
    store = InProcessStore()
    a, b = TransferEngine(store), TransferEngine(store)  # every backend, nccl included
    try:
        await a.register_segment("a", torch.zeros(PAGE, dtype=torch.uint8))
        await b.register_segment("b", torch.zeros(PAGE, dtype=torch.uint8))
        remote = await a.open_segment("b")
        assert "nccl" in remote.backends and remote.descriptor.endpoints["nccl"] == {"device": "cpu"}
        with a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 0, PAGE)]) as handle:
            handle.wait(10)
            assert handle.backends != ["nccl"]
        with pytest.raises(BackendUnavailableError):
            a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 0, PAGE)], backend="nccl")
    finally:
        await a.close()
        await b.close()


async def test_refused_batch_leaves_the_channel_usable(pair: Pair) -> None:
    await pair.b.register_segment("b2", torch.zeros(PAGE, dtype=torch.uint8))
    await pair.a.open_segment("b2")
    await pair.b.unregister_segment("b2")  # a still holds its descriptor
    with pytest.raises(RemoteRejectedError):
        pair.a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b2", 0, PAGE)]).wait(10)
    check_write_then_read(pair, "nccl")


ScriptedTarget = Callable[[Channel, PairGroup], None]


def script_first_connection(engine: TransferEngine, script: ScriptedTarget) -> None:
    """`engine` serves its next NCCL connection with `script` (after a real group setup and an
    accepted header), later ones normally."""
    real = engine.backends["nccl"]._serve  # type: ignore[attr-defined]
    used = threading.Event()

    def serve(channel: Channel, peer: str) -> None:
        if used.is_set():
            real(channel, peer)
            return
        used.set()
        setup = channel.recv()
        assert isinstance(setup, GroupSetup)
        channel.send(XferReply(status="accept"))
        store = join_store(setup.store_host, setup.store_port, setup.timeout_s)
        group = PairGroup.build(store, 1, torch.device(setup.device), "127.0.0.1", setup.prefix, setup.timeout_s,
                                setup.chunk_bytes)
        channel.send(XferReply(status="done"))
        header = channel.recv()
        assert isinstance(header, XferHeader)
        channel.recv_bytes(16 * header.num_ranges)
        channel.send(XferReply(status="accept"))
        script(channel, group)

    engine.link.set_data_handler(serve, PURPOSE)


async def test_peer_dying_mid_read_fails_fast_then_the_channel_rebuilds(pair: Pair) -> None:
    def die(channel: Channel, group: PairGroup) -> None:
        group.close()  # its sockets close, as a killed process's would
        channel.close()

    script_first_connection(pair.b, die)
    started = time.monotonic()
    handle = pair.a.submit_ranges(TransferOp.READ, "a", "b", page_ranges(np.arange(8), np.arange(8)), timeout_s=10)
    with pytest.raises(PeerLostError):
        handle.wait(10)
    assert time.monotonic() - started < 3
    check_write_then_read(pair, "nccl")


async def test_stalled_peer_fails_at_the_deadline_then_the_channel_rebuilds(pair: Pair) -> None:
    release = threading.Event()

    def stall(channel: Channel, group: PairGroup) -> None:
        release.wait(10)
        group.close()

    script_first_connection(pair.b, stall)
    started = time.monotonic()
    handle = pair.a.submit_ranges(TransferOp.READ, "a", "b", page_ranges(np.arange(8), np.arange(8)), timeout_s=1.0)
    with pytest.raises(TransferTimeoutError):
        handle.wait(10)
    assert time.monotonic() - started < 2
    release.set()
    check_write_then_read(pair, "nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
async def test_cuda_to_cuda_write_and_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nccl_module, "CHUNK_BYTES", 3 * PAGE)  # chunks of several pages: staged
    p = await make_pair("cuda:*")
    try:
        check_write_then_read(p, "nccl")
    finally:
        await p.a.close()
        await p.b.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_segments_on_one_gpu_are_not_reachable_through_nccl() -> None:
    store = InProcessStore()
    a, b = TransferEngine(store, NCCL_ONLY), TransferEngine(store, NCCL_ONLY)
    try:
        await a.register_segment("a", torch.zeros(PAGE, dtype=torch.uint8, device="cuda:0"))
        await b.register_segment("b", torch.zeros(PAGE, dtype=torch.uint8, device="cuda:0"))
        await a.open_segment("b")
        with pytest.raises(BackendUnavailableError):
            a.submit("a", [TransferRequest(TransferOp.WRITE, 0, "b", 0, PAGE)])
    finally:
        await a.close()
        await b.close()
