"""Mutual TLS on peer links (kv_transfer.link_tls), on real sockets through a relay that records (or
changes) what crosses the wire: scattered payloads land byte for byte both ways and never appear
in clear; callers without the cluster's certificate (plaintext, another CA's, none) are refused
and counted; a target with another CA's certificate is refused by the caller; a changed record
ends the connection; the NCCL peer watch reads a TLS connection right. The NCCL/Gloo backend over
TLS links: tests/test_kv_nccl_backend.py."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from common.pki import Pki, make_pki
from kv_transfer import link_auth
from kv_transfer.backends.pair_group import _PeerWatch
from kv_transfer.channel import Channel
from kv_transfer.errors import PeerLostError, TransferError
from kv_transfer.link_tls import LinkTls
from kv_transfer.messages import Hello, Notify, send_message
from kv_transfer.peer_link import PeerLink

SECRET = b"cluster-secret-5be1c0a9d2"


def _tls(pki: Pki, cert_from: Pki | None = None) -> LinkTls:
    """Trusts `pki`'s CA; presents `cert_from`'s certificate (`pki`'s own by default)."""
    own = cert_from or pki
    return LinkTls(str(pki.ca), str(own.cert), str(own.key))


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    folder = tmp_path_factory.mktemp("pki")
    return make_pki(folder, "cluster"), make_pki(folder, "rogue")


def _refused(reason: str) -> float:
    return link_auth.LINK_REFUSED.labels(reason)._value.get()


class Relay:
    """A TCP relay in front of `target` that records every byte from the caller, and changes the one
    at `flip_at` (a count of caller bytes) if given."""

    def __init__(self, target: str, flip_at: int | None = None) -> None:
        self._target = target
        self._flip_at = flip_at
        self.from_caller = bytearray()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                caller, _ = self._server.accept()
                host, port = self._target.rsplit(":", 1)
                target = socket.create_connection((host, int(port)))
                self._sockets += [caller, target]
                for src, dst, record in ((caller, target, True), (target, caller, False)):
                    thread = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                if record:
                    start = len(self.from_caller)
                    self.from_caller += chunk
                    if self._flip_at is not None and start <= self._flip_at < start + len(chunk):
                        changed = bytearray(chunk)
                        changed[self._flip_at - start] ^= 0x01
                        chunk = bytes(changed)
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            sock.close()


def _scattered(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ranges of `size` bytes' worth, small (a KV page) and large (past one TLS write) mixed."""
    lengths = rng.choice([1, 300, 4096, 12288, 70000, 400000], size=200)
    offsets = np.cumsum(lengths + rng.integers(0, 64, size=200)) - lengths
    keep = offsets + lengths <= size
    return offsets[keep].astype(np.int64), lengths[keep].astype(np.int64)


@contextlib.contextmanager
def _links(target_tls: LinkTls | None, caller_tls: LinkTls | None, serve: Callable[[Channel, str], None],
           secret: bytes | None = None) -> Iterator[tuple[PeerLink, PeerLink]]:
    target = PeerLink("target", "127.0.0.1", 0, lambda *_: None, lambda *_: None, secret, tls=target_tls)
    caller = PeerLink("member", "127.0.0.1", 0, lambda *_: None, lambda *_: None, secret, tls=caller_tls)
    target.set_data_handler(serve, "data:tcp")
    try:
        yield target, caller
    finally:
        caller.close()
        target.close()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["tls", "tls+secret"])
def test_payloads_cross_both_ways_encrypted(pkis: tuple[Pki, Pki], secret: bytes | None) -> None:
    cluster, _ = pkis
    rng = np.random.default_rng(7)
    size = 24 << 20
    source = rng.integers(0, 256, size=size, dtype=np.uint8)
    offsets, lengths = _scattered(rng, size)
    landed = np.zeros(size, dtype=np.uint8)
    served = threading.Event()

    def serve(channel: Channel, peer: str) -> None:
        assert peer == "member" and not channel.sealed  # TLS protects it: no tags on top
        channel.settimeout(10)
        channel.recv_ranges(memoryview(landed), offsets, lengths)
        channel.send(Notify(batch_id="b1", segment="s", tag="t", message=b"landed", ok=True))
        channel.send_ranges(memoryview(landed), offsets, lengths)  # and back
        served.set()

    opened = link_auth.LINKS_OPENED.labels("tls")._value.get()
    with _links(_tls(cluster), _tls(cluster), serve, secret) as (target, caller):
        relay = Relay(target.address)
        channel = caller.open(relay.address, "data:tcp")
        channel.settimeout(10)
        channel.send_ranges(memoryview(source), offsets, lengths)
        assert channel.recv() == Notify(batch_id="b1", segment="s", tag="t", message=b"landed", ok=True)
        back = np.zeros(size, dtype=np.uint8)
        channel.recv_ranges(memoryview(back), offsets, lengths)
        assert served.wait(10)
        channel.close()
        relay.close()
    for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        np.testing.assert_array_equal(landed[o:o + n], source[o:o + n])
        np.testing.assert_array_equal(back[o:o + n], source[o:o + n])
    assert link_auth.LINKS_OPENED.labels("tls")._value.get() == opened + 2  # one each side
    wire = bytes(relay.from_caller)
    assert len(wire) > int(lengths.sum())
    big = int(np.argmax(lengths))
    for probe in (source[offsets[big]:offsets[big] + 64].tobytes(), b"member", b"data:tcp"):
        assert probe not in wire  # the payload and the Hello alike are encrypted


@pytest.mark.parametrize("caller", ["plaintext", "no certificate", "another CA's certificate"])
def test_callers_without_the_clusters_certificate_are_refused(pkis: tuple[Pki, Pki], caller: str) -> None:
    cluster, rogue = pkis
    served = threading.Event()
    with _links(_tls(cluster), None, lambda channel, peer: served.set()) as (target, _):
        before = _refused("tls")
        host, port = target.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        if caller != "plaintext":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(cafile=str(cluster.ca))  # it trusts the target
            if caller == "another CA's certificate":
                context.load_cert_chain(str(rogue.cert), str(rogue.key))
            sock = context.wrap_socket(sock, server_hostname=host)  # TLS 1.3: the refusal comes after
        with contextlib.suppress(OSError):
            send_message(sock, Hello(engine="member", purpose="data:tcp", nonce=""))
            assert sock.recv(1) == b""  # the target closed it
        sock.close()
        for _ in range(100):
            if _refused("tls") > before:
                break
            threading.Event().wait(0.05)
        assert _refused("tls") == before + 1
        assert not served.is_set()


def test_a_target_with_another_cas_certificate_is_refused(pkis: tuple[Pki, Pki]) -> None:
    cluster, rogue = pkis
    with _links(_tls(rogue), _tls(cluster), lambda channel, peer: None) as (target, caller), \
            pytest.raises(PeerLostError, match="certificate verify failed"):
        caller.open(target.address, "data:tcp")


def test_a_changed_record_ends_the_connection(pkis: tuple[Pki, Pki], tmp_path: Path) -> None:
    cluster, _ = pkis
    size = 4 << 20
    landed = np.zeros(size, dtype=np.uint8)
    failures: list[Exception] = []
    done = threading.Event()

    def serve(channel: Channel, peer: str) -> None:
        channel.settimeout(10)
        try:
            channel.recv_ranges(memoryview(landed), np.array([0]), np.array([size]))
        except TransferError as e:
            failures.append(e)
        done.set()

    with _links(_tls(cluster), _tls(cluster), serve) as (target, caller):
        relay = Relay(target.address, flip_at=1 << 20)  # well past the handshake, inside the payload
        channel = caller.open(relay.address, "data:tcp")
        with contextlib.suppress(TransferError):
            channel.send_ranges(memoryview(np.ones(size, dtype=np.uint8)), np.array([0]), np.array([size]))
        assert done.wait(10)
        channel.close()
        relay.close()
    assert len(failures) == 1 and isinstance(failures[0], PeerLostError)
    assert "bad record mac" in str(failures[0]).lower() or "decrypt" in str(failures[0]).lower(), failures[0]


def _tls_pair(pki: Pki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Both ends of one mutual-TLS connection on loopback, as peer links make them."""
    tls = _tls(pki)
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []
    thread = threading.Thread(target=lambda: accepted.append(
        tls.server_context.wrap_socket(server.accept()[0], server_side=True)), daemon=True)
    thread.start()
    caller = tls.client_context.wrap_socket(socket.create_connection(server.getsockname(), timeout=5),
                                            server_hostname="127.0.0.1")
    thread.join(5)
    server.close()
    return caller, accepted[0]


def test_the_nccl_peer_watch_sees_a_frame_or_an_eof_beneath_tls(pkis: tuple[Pki, Pki]) -> None:
    """The watch peeks at the descriptor under TLS: a waiting frame is not a lost peer, and it is
    still whole for the reader afterwards; EOF is a lost peer."""
    caller, target = _tls_pair(pkis[0])
    watch = _PeerWatch(caller)
    assert not watch.closed(0.05) and watch._sock is caller  # nothing yet: still watching
    note = Notify(batch_id="b1", segment="s", tag="t", message=b"done", ok=True)
    Channel(target).send(note)
    assert not watch.closed(2.0) and watch._sock is None  # a frame waits: the peer is alive, the watch stops
    assert Channel(caller).recv() == note  # the peek took nothing from it
    # a frame already decrypted but not yet read (in TLS's buffer, not the socket's): alive, though
    # the peer closed right after sending it
    Channel(target).send(note)
    assert caller.recv(1)
    target.close()
    watch = _PeerWatch(caller)
    assert caller.pending() > 0 and not watch.closed(0.5) and watch._sock is None
    other_caller, other_target = _tls_pair(pkis[0])
    watch = _PeerWatch(other_caller)
    other_target.close()
    assert watch.closed(2.0)
    for sock in (caller, other_caller):
        sock.close()
