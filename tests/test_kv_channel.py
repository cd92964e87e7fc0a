"""Sealed peer-link connections (kv_transfer.channel) and grants (kv_transfer.grants), on real
sockets: a unit recorded off the wire and replayed, reordered, changed or moved to another connection
is refused and counted; a payload scattered over many ranges lands and verifies whatever pieces the
kernel cuts it into; grants cover exactly their ranges."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kv_transfer import link_auth
from kv_transfer.backends.two_sided import check_batch
from kv_transfer.channel import Channel, SessionKeys, _PayloadMac
from kv_transfer.errors import IntegrityError
from kv_transfer.grants import GRANT_REFUSED, GrantTable, merged_intervals
from kv_transfer.messages import Hello, Notify, XferHeader, XferReply, encode, parse_frame
from kv_transfer.peer_link import PeerLink
from kv_transfer.segment import LocalSegment

SECRET = b"cluster-secret-5be1c0a9d2"


def _keys(caller_nonce: str = "aa" * 16) -> SessionKeys:
    return SessionKeys.derive(SECRET, caller_nonce, "bb" * 16, "member", "data:tcp", True)


def _bad_tags() -> float:
    return link_auth.LINK_REFUSED.labels("bad_tag")._value.get()


@pytest.fixture
def wire() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _drain(sock: socket.socket) -> bytes:
    """Everything sent so far (the sender wrote it whole before this is called)."""
    sock.settimeout(0.2)
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except TimeoutError:
        pass
    sock.settimeout(5)
    return b"".join(chunks)


def _receiver(raw: bytes, keys: SessionKeys) -> tuple[Channel, socket.socket]:
    """A target-side channel whose wire delivers `raw`."""
    inject, far = socket.socketpair()
    far.settimeout(5)
    threading.Thread(target=inject.sendall, args=(raw,), daemon=True).start()  # more than a socket buffer holds
    return Channel(far, keys, is_caller=False), inject


def _note(i: int) -> Notify:
    return Notify(batch_id=f"b{i}", segment="s", tag="kv/r", message=b"m", ok=True)


def test_recorded_units_replayed_reordered_changed_or_moved_are_refused(wire) -> None:
    a, b = wire
    sender = Channel(a, _keys(), is_caller=True)
    sender.send(_note(1))
    first = _drain(b)
    sender.send(_note(2))
    second = _drain(b)
    assert first != second and len(first) == len(second)

    receiver, inject = _receiver(first + second, _keys())
    assert receiver.recv() == _note(1) and receiver.recv() == _note(2)  # as sent: accepted
    before = _bad_tags()
    inject.sendall(first)  # a recorded frame replayed on the same connection
    with pytest.raises(IntegrityError):
        receiver.recv()
    assert _bad_tags() == before + 1

    for wire_bytes, keys in ((second + first, _keys()),  # reordered
                             (first, _keys(caller_nonce="cc" * 16)),  # moved to another connection's keys
                             (first[:-20] + bytes([first[-20] ^ 1]) + first[-19:], _keys())):  # one bit changed
        receiver, inject = _receiver(wire_bytes, keys)
        with pytest.raises(IntegrityError):
            receiver.recv()
        inject.close()
    assert _bad_tags() == before + 4


def test_a_scattered_payload_lands_and_verifies_and_a_changed_byte_fails(wire) -> None:
    a, b = wire
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    offsets = np.arange(0, 8 << 20, 4096 * 3, dtype=np.int64)  # 683 ranges of 4 KiB, with gaps
    lengths = np.full(len(offsets), 4096, dtype=np.int64)
    sender = Channel(a, _keys(), is_caller=True)

    sent = threading.Thread(target=sender.send_ranges, args=(memoryview(source.data), offsets, lengths))
    sent.start()
    raw = b""
    want = int(lengths.sum()) + 16
    while len(raw) < want:
        raw += b.recv(1 << 16)
    sent.join()

    for flip in (None, len(raw) // 2):
        wire_bytes = raw if flip is None else raw[:flip] + bytes([raw[flip] ^ 0x80]) + raw[flip + 1:]
        receiver, inject = _receiver(wire_bytes, _keys())
        target = np.zeros_like(source)
        if flip is None:
            receiver.recv_ranges(memoryview(target.data), offsets, lengths)
            for o in offsets[:50]:
                assert np.array_equal(target[o:o + 4096], source[o:o + 4096])
        else:
            with pytest.raises(IntegrityError):
                receiver.recv_ranges(memoryview(target.data), offsets, lengths)
        inject.close()


def test_the_payload_tag_does_not_depend_on_how_it_is_cut() -> None:
    data = memoryview(os.urandom(100_003))
    whole = _PayloadMac(b"k" * 32, b"n" * 12)
    whole.update(data)
    pieces = _PayloadMac(b"k" * 32, b"n" * 12)
    for start, end in ((0, 1), (1, 17), (17, 4096), (4096, 50_001), (50_001, 100_003)):
        pieces.update(data[start:end])
    assert whole.tag() == pieces.tag()


def test_an_open_channel_keeps_the_plain_wire_format(wire) -> None:
    a, b = wire
    Channel(a).send(XferReply(status="accept"))
    assert _drain(b) == encode(XferReply(status="accept"))


def test_grants_cover_exactly_their_ranges() -> None:
    starts, ends = merged_intervals([100, 0, 50, 300, 20], [50, 50, 50, 10, 5])
    assert starts.tolist() == [0, 300] and ends.tolist() == [150, 310]  # touching ranges join
    table = GrantTable()
    keys = table.grant("pool", "prefill-1", "kv/r1", [0, 300], [150, 10])
    pairs = np.array([[0, 150], [300, 10], [10, 20]])
    assert table.check("pool", "prefill-1", "kv/r1", "write", pairs) is None
    before = {r: GRANT_REFUSED.labels(r)._value.get() for r in ("no_grant", "outside_grant")}
    for peer, tag, op, rows in (("prefill-2", "kv/r1", "write", pairs),  # another member
                                ("prefill-1", "kv/r2", "write", pairs),  # another request
                                ("prefill-1", "kv/r1", "read", pairs)):  # another op
        assert "holds no" in (table.check("pool", peer, tag, op, rows) or "")
    for rows in ([[140, 20]], [[150, 1]], [[299, 2]], [[305, 10]], [[1000, 1]]):  # leave a grant
        assert "outside" in (table.check("pool", "prefill-1", "kv/r1", "write", np.array(rows)) or "")
    assert GRANT_REFUSED.labels("no_grant")._value.get() == before["no_grant"] + 3
    assert GRANT_REFUSED.labels("outside_grant")._value.get() == before["outside_grant"] + 5
    table.revoke(keys)
    assert len(table) == 0 and table.check("pool", "prefill-1", "kv/r1", "write", pairs) is not None


def test_payload_bytes_are_sealed_when_either_side_asks_and_a_disagreement_fails(wire) -> None:
    seen: dict[tuple[bool, bool], bool] = {}
    for caller_seals, target_seals in ((False, False), (True, False), (False, True), (True, True)):
        target = PeerLink("target", "127.0.0.1", 0, lambda *_: None, lambda *_: None, SECRET, target_seals)
        caller = PeerLink("member", "127.0.0.1", 0, lambda *_: None, lambda *_: None, SECRET, caller_seals)
        served = threading.Event()

        def serve(channel: Channel, peer: str, key=(caller_seals, target_seals), served=served) -> None:
            seen[key] = channel.sealed_payload
            assert channel.recv() == _note(0)  # both sides derived the same keys
            served.set()

        target.set_data_handler(serve, "data:tcp")
        try:
            channel = caller.open(target.address, "data:tcp")
            channel.send(_note(0))
            assert served.wait(5) and channel.sealed_payload == seen[(caller_seals, target_seals)]
            channel.close()
        finally:
            caller.close()
            target.close()
    assert seen == {(False, False): False, (True, False): True, (False, True): True, (True, True): True}
    # keys derived under different choices (a flag changed on the wire) do not agree on one unit
    a, b = wire
    Channel(a, SessionKeys.derive(SECRET, "aa" * 16, "bb" * 16, "member", "data:tcp", False)).send(_note(1))
    receiver = Channel(b, _keys(), is_caller=False)
    with pytest.raises(IntegrityError):
        receiver.recv()


def test_ranges_whose_end_would_wrap_are_refused_and_an_empty_grant_covers_nothing() -> None:
    """int64 offsets and lengths come from the peer: no check may form a sum that wraps."""
    segment = LocalSegment("pool", torch.zeros(1 << 16, dtype=torch.uint8), None, guarded=True)
    table = GrantTable()
    table.grant("pool", "p", "kv/r", [0], [4096])
    table.grant("pool", "p", "kv/empty", [], [])
    huge = 2**63 - 8
    for pairs in ([[0, 4096], [huge, 16]], [[huge, huge]], [[4096, 2**63 - 1]]):
        rows = np.array(pairs, dtype=np.int64)
        header = XferHeader(batch_id="b", op="write", segment="pool", num_ranges=len(rows), total_bytes=4112,
                            tag="kv/r", message=b"", timeout_s=1.0)
        problem, _ = check_batch(segment, header, rows, "p", table)
        assert problem is not None and "outside" in problem, pairs
        assert not table._grants["pool", "p", "kv/r", "write"].covers(rows[:, 0], rows[:, 1]), pairs
    one = np.array([[0, 16]], dtype=np.int64)
    assert "outside" in (table.check("pool", "p", "kv/empty", "write", one) or "")
    # a message's fields at their defaults stay off the wire: a peer one release older reads it
    assert b"seal_payload" not in encode(Hello(engine="e", purpose="control"))
    assert parse_frame(encode(Hello(engine="e", purpose="control", seal_payload=False))[4:]).seal_payload is False
