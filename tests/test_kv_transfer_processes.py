"""The transfer engine between two real OS processes, per CPU backend, with a real etcd."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.etcd.local import running_etcd
from tests.support.kv_peer import initial_bytes
from tests.support.kv_peers import KVPeer

BACKENDS = ["shm", "tcp", "nixl", "nccl"]  # nccl runs its Gloo path on CPU
SIZE = 4 << 20


def _nixl_available() -> bool:
    """False when NIXL is not installed here; a broken install raises (BackendUnavailableError)."""
    from kv_transfer.backends.nixl import NixlBackend

    return NixlBackend.is_available()


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with running_etcd() as endpoint:
        yield endpoint


@pytest.fixture(params=BACKENDS)
def pair(request: pytest.FixtureRequest, etcd: str) -> Iterator[tuple[KVPeer, KVPeer]]:
    backend = request.param
    if backend == "nixl" and not _nixl_available():
        pytest.skip("NIXL is not available here")
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    a = KVPeer(etcd, f"a-{backend}", SIZE, seed=1, backends=[backend], prefix=prefix)
    b = KVPeer(etcd, f"b-{backend}", SIZE, seed=2, backends=[backend], prefix=prefix)
    opened = a.call(cmd="open", segment=b.name)
    assert opened["ok"] and opened["backends"] == [backend], opened
    yield a, b
    a.close()
    b.close()


def random_pages(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`n` non-overlapping ranges of random lengths (1 B to 64 KiB) at random places: rows
    (offset, length), in random order."""
    slot = size // n
    lengths = rng.integers(1, min(slot, 64 << 10) + 1, n)
    offsets = np.arange(n) * slot + rng.integers(0, slot - lengths + 1)
    order = rng.permutation(n)
    return np.stack([offsets[order], lengths[order]], axis=1)


def test_out_of_range_is_refused_then_pages_move_byte_exact(pair: tuple[KVPeer, KVPeer], tmp_path: Path) -> None:
    """Out-of-range requests are refused and move nothing; then random pages written and read back
    land byte for byte (one pair of processes for both: the suite's time)."""
    a, b = pair
    for rows_ in ([[0, SIZE - 100, 200]], [[SIZE - 10, 0, 100]], [[0, -1, 10]], [[0, 0, 0]]):
        result = a.call(cmd="submit", op="write", remote=b.name, ranges=rows_)
        assert not result["ok"] and result["error"] == "InvalidTransferError", result
    np.testing.assert_array_equal(b.contents(tmp_path), initial_bytes(b.seed, SIZE))
    rng = np.random.default_rng(7)
    mem_a, mem_b = initial_bytes(a.seed, SIZE), initial_bytes(b.seed, SIZE)
    # WRITE: 48 pages of A land on 48 other places in B
    src, dst = random_pages(rng, 48, SIZE // 2), random_pages(rng, 48, SIZE)
    dst[:, 1] = src[:, 1] = np.minimum(src[:, 1], dst[:, 1])
    rows = [[int(s), int(d), int(k)] for (s, k), (d, _) in zip(src, dst, strict=True)]
    b.send(cmd="wait", tag="w1", peer=a.engine_id, timeout=20)
    assert a.call(cmd="submit", op="write", remote=b.name, ranges=rows, tag="w1", message="written")["ok"]
    note = b.read(timeout=20)
    assert note["ok"] and note["notifications"] == [{"peer": a.engine_id, "ok": True, "message": "written",
                                                      "error": None}]
    for s, d, k in rows:
        mem_b[d:d + k] = mem_a[s:s + k]
    # READ: 40 pages of B (some just written) into the upper half of A
    src, dst = random_pages(rng, 40, SIZE), random_pages(rng, 40, SIZE // 2) + np.array([SIZE // 2, 0])
    dst[:, 1] = src[:, 1] = np.minimum(src[:, 1], dst[:, 1])
    rows = [[int(d), int(s), int(k)] for (s, k), (d, _) in zip(src, dst, strict=True)]
    b.send(cmd="wait", tag="r1", peer=a.engine_id, timeout=20)
    assert a.call(cmd="submit", op="read", remote=b.name, ranges=rows, tag="r1")["ok"]
    assert b.read(timeout=20)["notifications"][0]["ok"]
    for d, s, k in rows:
        mem_a[d:d + k] = mem_b[s:s + k]
    # every byte of both segments: written pages equal, untouched bytes unchanged
    np.testing.assert_array_equal(b.contents(tmp_path), mem_b)
    np.testing.assert_array_equal(a.contents(tmp_path), mem_a)


def test_initiator_killed_mid_stream_fails_the_waiting_receiver(pair: tuple[KVPeer, KVPeer]) -> None:
    """The receiver waits for a completion that only comes after 100000 batches; the initiator dies
    while they stream. The wait must end with an error (never a hang, never a success)."""
    a, b = pair
    rows = [[0, 0, SIZE]]
    b.send(cmd="wait", tag="stream", peer=a.engine_id, timeout=60, count=100000)
    a.send(cmd="submit", op="write", remote=b.name, ranges=rows, tag="stream", count=100000)
    time.sleep(0.3)
    killed_at = a.kill()
    result = b.read(timeout=30)
    waited = time.monotonic() - killed_at
    assert not result["ok"], result
    assert result["error"] in ("PeerLostError", "TransferTimeoutError"), result
    assert 0 < len(result["notifications"]) < 100000  # it was streaming when the initiator died
    assert all(n["ok"] for n in result["notifications"][:-1])
    assert waited < 5, f"the receiver learned of the loss after {waited:.1f} s"


def test_target_killed_mid_stream_fails_the_waiting_initiator(pair: tuple[KVPeer, KVPeer]) -> None:
    a, b = pair
    a.send(cmd="submit", op="write", remote=b.name, ranges=[[0, 0, SIZE]], count=100000, timeout=10)
    time.sleep(0.3)
    killed_at = b.kill()
    result = a.read(timeout=30)
    waited = time.monotonic() - killed_at
    assert not result["ok"] and result["error"] in ("PeerLostError", "TransferTimeoutError"), result
    assert result["done"] > 0  # it was streaming when the peer died
    assert waited < 11, f"the initiator learned of the loss after {waited:.1f} s (deadline 10 s)"
    again = a.call(cmd="submit", op="write", remote=b.name, ranges=[[0, 0, 16]])
    assert not again["ok"] and again["error"] == "PeerLostError", again


def test_stopped_peer_hits_the_deadline_not_a_hang(etcd: str) -> None:
    """A peer that is alive but frozen (SIGSTOP) never answers: the batch fails at its deadline."""
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    a = KVPeer(etcd, "a-stop", SIZE, seed=1, backends=["tcp"], prefix=prefix)
    b = KVPeer(etcd, "b-stop", SIZE, seed=2, backends=["tcp"], prefix=prefix)
    try:
        assert a.call(cmd="open", segment=b.name)["ok"]
        b.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        result = a.call(cmd="submit", op="write", remote=b.name, ranges=[[0, 0, SIZE]], count=50, timeout=1.5)
        waited = time.monotonic() - started
        assert not result["ok"] and result["error"] == "TransferTimeoutError", result
        assert waited < 1.5 * 2 + 1, waited
    finally:
        b.proc.send_signal(signal.SIGCONT)
        a.close()
        b.close()
