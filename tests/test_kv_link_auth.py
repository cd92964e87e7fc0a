"""Authenticated KV links (kv_transfer.link_auth): with the cluster's secret, a process that read a
segment's address from etcd but lacks the secret (or holds a wrong one) can neither open a link to
an engine nor write into its segment: refused and counted, while a member's concurrent transfer
lands byte for byte; a recorded handshake replayed on a new connection is refused too. A member
writes into a guarded segment only inside its grants (kv_transfer.grants). Units replayed inside a
connection: tests/test_kv_channel.py."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.etcd.local import running_etcd
from kv_transfer import link_auth
from kv_transfer.messages import Challenge, Hello, Proof, recv_message, send_message
from kv_transfer.peer_link import PeerLink, parse_address
from tests.support.kv_peer import initial_bytes
from tests.support.kv_peers import KVPeer

SECRET = "cluster-secret-5be1c0a9d2"
SIZE = 1 << 20
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd() -> Iterator[str]:
    with running_etcd() as endpoint:
        yield endpoint


def test_only_members_write_into_a_segment(etcd: str, tmp_path: Path) -> None:
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    target = KVPeer(etcd, "target", SIZE, seed=1, backends=["tcp"], prefix=prefix, secret=SECRET)
    member = KVPeer(etcd, "member", SIZE, seed=2, backends=["tcp"], prefix=prefix, secret=SECRET)
    outsiders = [KVPeer(etcd, "no-secret", SIZE, seed=3, backends=["tcp"], prefix=prefix),
                 KVPeer(etcd, "wrong-secret", SIZE, seed=4, backends=["tcp"], prefix=prefix,
                        secret="another-secret-0000")]
    try:
        assert member.call(cmd="open", segment=target.name)["ok"]
        want = initial_bytes(target.seed, SIZE)
        rows = [[0, 4096 * i, 4096] for i in range(8)]
        target.send(cmd="wait", tag="legit", peer=member.engine_id, timeout=30)
        member.send(cmd="submit", op="write", remote=target.name, ranges=rows, tag="legit", count=20)
        for outsider in outsiders:  # while the member's writes run
            # without a secret the caller cannot tell a refusal at open (the target closes the link
            # after its challenge goes unanswered); with a wrong one, the target's proof fails at once
            opened = outsider.call(cmd="open", segment=target.name)
            assert opened["ok"] == (outsider.name == "no-secret"), opened
            written = outsider.call(cmd="submit", op="write", remote=target.name, ranges=[[0, 0, SIZE]])
            assert not written["ok"], written
        assert member.read(timeout=60) == {"ok": True, "done": 20}
        assert target.read(timeout=30)["ok"]
        source = initial_bytes(member.seed, SIZE)
        for _, offset, length in rows:
            want[offset:offset + length] = source[:length]
        np.testing.assert_array_equal(target.contents(tmp_path), want)  # the member's bytes, no outsider's
        refused = target.call(cmd="refused")["refused"]
        # the wrong secret's holder stops at the target's proof, before sending one of its own
        assert refused["no_proof"] >= 2, refused
    finally:
        for peer in (target, member, *outsiders):
            peer.close()


def test_grants_bound_what_a_member_writes_into_a_guarded_segment(etcd: str, tmp_path: Path) -> None:
    """A member holds the secret, but a guarded segment takes its writes only inside a grant made
    to it for that tag: another member, another tag, a range leaving the grant, and any write after
    the revocation are refused (GrantRefusedError, counted) and move no byte, while the granted
    member's concurrent writes land byte for byte."""
    prefix = f"/tandem/test-{uuid.uuid4().hex[:8]}"
    target = KVPeer(etcd, "guarded", SIZE, seed=1, backends=["tcp"], prefix=prefix, secret=SECRET, guarded=True)
    member = KVPeer(etcd, "granted", SIZE, seed=2, backends=["tcp"], prefix=prefix, secret=SECRET)
    other = KVPeer(etcd, "ungranted", SIZE, seed=3, backends=["tcp"], prefix=prefix, secret=SECRET)
    try:
        granted = [[0, 65536], [262144, 65536]]
        grant = target.call(cmd="grant", peer=member.engine_id, tag="kv/r1", ranges=granted)["grant"]
        for peer in (member, other):
            assert peer.call(cmd="open", segment=target.name)["ok"]
        rows = [[0, 4096 * i, 4096] for i in range(16)] + [[0, 262144, 65536]]  # inside the grant
        target.send(cmd="wait", tag="kv/r1", peer=member.engine_id, timeout=30, count=20)
        member.send(cmd="submit", op="write", remote=target.name, ranges=rows, tag="kv/r1", count=20)
        attempts = [(other, "kv/r1", [[0, 0, 4096]]),  # while the member writes: the right tag and pages
                    (other, "kv/other", [[0, 131072, 4096]]),  # its own tag: granted nothing
                    (member, "kv/r2", [[0, 0, 4096]]),  # the member (once its writes are done), another request
                    (member, "kv/r1", [[0, 61440, 8192]]),  # straddles the grant's end
                    (member, "kv/r1", [[0, 0, 4096], [0, 500000, 4096]])]  # one range of two outside
        for peer, tag, ranges in attempts:
            if peer is member and tag == "kv/r2":
                assert member.read(timeout=60) == {"ok": True, "done": 20}
            written = peer.call(cmd="submit", op="write", remote=target.name, ranges=ranges, tag=tag)
            assert not written["ok"] and written["error"] == "GrantRefusedError", (tag, written)
        notes = target.read(timeout=30)
        assert notes["ok"] and len(notes["notifications"]) == 20, notes  # refused batches notify nothing
        want = initial_bytes(target.seed, SIZE)
        source = initial_bytes(member.seed, SIZE)
        for _, offset, length in rows:
            want[offset:offset + length] = source[:length]
        np.testing.assert_array_equal(target.contents(tmp_path), want)
        assert target.call(cmd="revoke", grant=grant)["ok"]
        late = member.call(cmd="submit", op="write", remote=target.name, ranges=rows[:1], tag="kv/r1")
        assert not late["ok"] and late["error"] == "GrantRefusedError", late
        refused = target.call(cmd="refused")["grants_refused"]
        assert refused == {"no_grant": 4, "outside_grant": 2}, refused
    finally:
        for peer in (target, member, other):
            peer.close()


def test_a_replayed_handshake_is_refused() -> None:
    """The proof binds the target's fresh nonce: one recorded from an earlier connection fails."""
    secret = SECRET.encode()
    target = PeerLink("target", "127.0.0.1", 0, lambda *_: None, lambda *_: None, secret)
    try:
        host, port = parse_address(target.address)
        recorded: tuple[str, str] | None = None
        before = link_auth.LINK_REFUSED.labels("bad_proof")._value.get()
        for attempt in range(2):
            with socket.create_connection((host, port), timeout=5) as sock:
                nonce = "ab" * 16
                send_message(sock, Hello(engine="member", purpose="control", nonce=nonce))
                challenge = recv_message(sock)
                assert isinstance(challenge, Challenge)
                assert link_auth.verify(secret, challenge.proof, "target", nonce, challenge.nonce, "member", "control")
                if attempt == 0:  # a member's genuine handshake, recorded
                    recorded = (challenge.nonce, link_auth.proof(secret, "caller", nonce, challenge.nonce, "member",
                                                                 "control"))
                    send_message(sock, Proof(recorded[1]))
                else:  # replayed on a new connection: the target's nonce changed
                    assert recorded is not None and challenge.nonce != recorded[0]
                    send_message(sock, Proof(recorded[1]))
                    sock.settimeout(5)
                    assert sock.recv(1) == b""  # closed
        assert link_auth.LINK_REFUSED.labels("bad_proof")._value.get() == before + 1
    finally:
        target.close()


def test_a_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PeerLink("x", "127.0.0.1", 0, lambda *_: None, lambda *_: None, b"short")


def test_callers_that_stall_or_send_junk_hold_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the handshake a caller gets a few seconds and a few KiB: one that says nothing, one that
    announces a 64 MiB frame, and one whose proof is malformed are dropped and counted."""
    monkeypatch.setattr(link_auth, "HANDSHAKE_TIMEOUT_S", 0.5)
    target = PeerLink("target", "127.0.0.1", 0, lambda *_: None, lambda *_: None, SECRET.encode())
    try:
        host, port = parse_address(target.address)
        before = link_auth.LINK_REFUSED.labels("no_proof")._value.get()
        junk = [b"", (64 << 20).to_bytes(4, "big"), None]
        for frame in junk:
            with socket.create_connection((host, port), timeout=5) as sock:
                if frame is None:  # a proper Hello, then a Proof frame without its field
                    send_message(sock, Hello(engine="x", purpose="control", nonce="cd" * 16))
                    assert isinstance(recv_message(sock), Challenge)
                    raw = b'{"kind": "proof"}'
                    sock.sendall(len(raw).to_bytes(4, "big") + raw)
                else:
                    sock.sendall(frame)
                sock.settimeout(5)
                assert sock.recv(1) == b""  # closed by the target, within the handshake timeout
        assert link_auth.LINK_REFUSED.labels("no_proof")._value.get() == before + len(junk)
    finally:
        target.close()
