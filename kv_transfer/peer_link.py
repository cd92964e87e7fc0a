"""The peer link: one listening socket per engine, control connections between engines.

With the cluster's TLS files every connection is mutual TLS first (kv_transfer.link_tls). Every
connection then starts with a `Hello` (and, with a cluster secret, the challenge-response of
kv_transfer.link_auth, both ways, after which every unit on it is sealed, unless TLS already
protects it: kv_transfer.channel).
Control connections carry `Notify` messages and tell each side at once when the other goes away (a
SIGKILLed process's sockets are closed by the kernel, so EOF arrives immediately on one host;
across hosts, TCP keepalive bounds it). Any other purpose names a data connection, handed to the
backend registered for that purpose ("data:tcp": TCP, "data:nccl": NCCL); a connection whose
purpose nobody serves is closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from kv_transfer import link_auth
from kv_transfer.channel import Channel, SessionKeys
from kv_transfer.errors import PeerLostError, TransferError
from kv_transfer.link_tls import LinkTls
from kv_transfer.messages import MAX_FRAME, Challenge, Hello, Message, Notify, Proof, recv_message, send_message
from kv_transfer.socket_io import shutdown

log = logging.getLogger(__name__)

DataHandler = Callable[[Channel, str], None]
_CONNECT_TIMEOUT_S = 5.0


def tune_socket(sock: socket.socket, buffer_bytes: int = 4 << 20) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _handshake_timeout(timeout_s: float | None) -> float:
    """Each handshake step waits the handshake limit, or a transfer's remaining time if shorter."""
    limit = link_auth.HANDSHAKE_TIMEOUT_S
    return max(min(limit, timeout_s), 0.05) if timeout_s is not None else limit


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class PeerLink:
    def __init__(self, engine_id: str, host: str, port: int, on_notify: Callable[[str, Notify], None],
                 on_peer_lost: Callable[[str, str], None], secret: bytes | None = None,
                 seal_payloads: bool = True, tls: LinkTls | None = None) -> None:
        link_auth.check_secret(secret)
        self.engine_id = engine_id
        self._secret = secret  # None: links are not authenticated by a secret
        self._tls = tls  # None: plain TCP
        if tls is not None:  # read the files now: a bad one fails the start, not every later link
            _ = tls.server_context, tls.client_context
        self._seal_payloads = seal_payloads  # with a secret: ask for payload bytes to be sealed
        self._on_notify = on_notify
        self._on_peer_lost = on_peer_lost
        self._data_handlers: dict[str, DataHandler] = {}  # Hello purpose → backend serving it
        self._server = socket.create_server((host, port), backlog=128)
        self.address = f"{host}:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        self._outgoing: dict[str, Channel] = {}  # peer id → our control connection to it
        self._incoming: dict[str, int] = {}  # peer id → its live control connections to us
        self._send_locks: dict[str, threading.Lock] = {}
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name=f"peer-link-{engine_id}", daemon=True).start()

    def set_data_handler(self, handler: DataHandler, purpose: str) -> None:
        """Serve incoming connections whose Hello names `purpose` with `handler` (one handler each)."""
        if purpose == "control":
            raise ValueError("the control purpose is served by the peer link itself")
        self._data_handlers[purpose] = handler

    # -- outgoing -------------------------------------------------------------------------------------
    def connect(self, peer: str, address: str) -> None:
        """Open (once) our control connection to `peer`; raises PeerLostError if it is unreachable."""
        with self._lock:
            if peer in self._outgoing:
                return
        channel = self.open(address, "control")
        with self._lock:
            if peer in self._outgoing:  # lost a race with another thread: keep the first
                channel.close()
                return
            self._outgoing[peer] = channel
            self._send_locks[peer] = threading.Lock()
        threading.Thread(target=self._read_loop, args=(channel, peer), daemon=True).start()

    def open(self, address: str, purpose: str, timeout_s: float | None = None) -> Channel:
        """A new connection to the engine at `address` for `purpose` (sealed with its own keys when
        links are authenticated); `timeout_s` bounds the handshake (a transfer's remaining time: a
        frozen peer fails it when it would have anyway)."""
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S)
        except OSError as e:
            raise PeerLostError(f"cannot reach peer engine at {address}: {e}") from e
        tune_socket(sock)
        nonce = link_auth.new_nonce() if self._secret is not None else ""
        keys = None
        try:
            if self._tls is not None:
                sock.settimeout(_handshake_timeout(timeout_s))
                sock = self._tls.client_context.wrap_socket(sock, server_hostname=host)
            send_message(sock, Hello(engine=self.engine_id, purpose=purpose, nonce=nonce,
                                     seal_payload=self._seal_payloads))
            if self._secret is not None:
                keys = self._prove(sock, nonce, purpose, address, timeout_s)
        except (OSError, TransferError, ValueError) as e:
            sock.close()
            raise PeerLostError(f"cannot open a {purpose} link to {address}: {e}") from e
        sock.settimeout(None)
        if not self._track(sock):
            raise PeerLostError(f"cannot open a {purpose} link to {address}: this engine is closing")
        return self._channel(sock, keys, is_caller=True)

    def _prove(self, sock: socket.socket, nonce: str, purpose: str, address: str,
               timeout_s: float | None) -> SessionKeys:
        """The caller's half of the handshake: check the target's proof, send ours; the connection's keys."""
        assert self._secret is not None
        sock.settimeout(_handshake_timeout(timeout_s))
        challenge = recv_message(sock, link_auth.HANDSHAKE_MAX_FRAME)
        if not isinstance(challenge, Challenge) or not link_auth.verify(
                self._secret, challenge.proof, "target", nonce, challenge.nonce, self.engine_id, purpose):
            raise PeerLostError(f"the peer at {address} did not prove the cluster's KV link secret")
        send_message(sock, Proof(link_auth.proof(self._secret, "caller", nonce, challenge.nonce, self.engine_id,
                                                 purpose)))
        return SessionKeys.derive(self._secret, nonce, challenge.nonce, self.engine_id, purpose,
                                  self._seal_payloads or challenge.seal_payload is not False)

    def is_connected(self, peer: str) -> bool:
        """We hold a control connection to `peer` (we can notify it)."""
        with self._lock:
            return peer in self._outgoing

    def is_linked(self, peer: str) -> bool:
        """A control connection joins us either way: `peer`'s process was alive at its last
        message (a dead process's connections end at once with EOF)."""
        with self._lock:
            return peer in self._outgoing or self._incoming.get(peer, 0) > 0

    def send(self, peer: str, msg: Message) -> None:
        with self._lock:
            channel, lock = self._outgoing.get(peer), self._send_locks.get(peer)
        if channel is None or lock is None:
            raise PeerLostError(f"no control connection to peer {peer}")
        try:
            with lock:
                channel.send(msg)
        except OSError as e:
            self._drop(channel, peer, f"send failed: {e}")
            raise PeerLostError(f"peer {peer} is gone: {e}") from e

    # -- incoming -------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        tune_socket(sock)
        authenticating = self._secret is not None or self._tls is not None
        if not self._track(sock):  # tracked from the start: close() interrupts a handshake too
            return
        if self._tls is not None:
            secured = self._tls_accept(sock)
            if secured is None or not self._swap(sock, secured):
                return
            sock = secured
        try:
            if authenticating:  # an unauthenticated caller holds no thread or memory for long
                sock.settimeout(link_auth.HANDSHAKE_TIMEOUT_S)
            hello = recv_message(sock, link_auth.HANDSHAKE_MAX_FRAME if authenticating else MAX_FRAME)
        except (TransferError, ValueError, OSError) as e:
            if authenticating:
                link_auth.LINK_REFUSED.labels("no_proof").inc()
            log.warning("dropping a connection that did not say hello: %s", str(e)[:200])
            self._untrack_close(sock)
            return
        if not isinstance(hello, Hello):
            self._untrack_close(sock)
            return
        admitted, keys = self._admit(sock, hello)
        if not admitted:
            self._untrack_close(sock)
            return
        if authenticating:
            sock.settimeout(None)
        channel = self._channel(sock, keys, is_caller=False)
        if hello.purpose == "control":
            self._read_loop(channel, hello.engine)
            return
        handler = self._data_handlers.get(hello.purpose) if isinstance(hello.purpose, str) else None
        if handler is None:  # a data connection for a backend this engine does not run
            log.info("closing a %r connection from %s: no backend here serves it", hello.purpose, hello.engine)
            self._untrack_close(sock)
            return
        try:
            handler(channel, hello.engine)
        finally:
            self._untrack_close(sock)

    def _channel(self, sock: socket.socket, keys: SessionKeys | None, is_caller: bool) -> Channel:
        """The connection after its handshakes; TLS already protects every byte, so it adds no tags."""
        if self._tls is not None:
            keys = None
            protection = "tls"
        else:
            protection = "open" if keys is None else "sealed" if keys.seal_payload else "frames"
        link_auth.LINKS_OPENED.labels(protection).inc()
        return Channel(sock, keys, is_caller)

    def _tls_accept(self, sock: socket.socket) -> ssl.SSLSocket | None:
        """The target's TLS handshake; None (counted, the socket closed) when the caller fails it."""
        assert self._tls is not None
        try:
            sock.settimeout(link_auth.HANDSHAKE_TIMEOUT_S)
            return self._tls.server_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self._untrack_close(sock)
            if not self._closed:
                link_auth.LINK_REFUSED.labels("tls").inc()
                log.warning("refused a peer-link connection that failed mutual TLS: %s", str(e)[:200])
            return None

    def _admit(self, sock: socket.socket, hello: Hello) -> tuple[bool, SessionKeys | None]:
        """The target's half of the handshake: whether the caller is admitted (a refusal is counted),
        and the connection's keys (None without a secret)."""
        if self._secret is None:
            return True, None
        nonce = link_auth.new_nonce()
        try:
            sock.settimeout(link_auth.HANDSHAKE_TIMEOUT_S)
            send_message(sock, Challenge(nonce, link_auth.proof(self._secret, "target", hello.nonce, nonce,
                                                                hello.engine, hello.purpose), self._seal_payloads))
            answer = recv_message(sock, link_auth.HANDSHAKE_MAX_FRAME)
        except (TransferError, ValueError, OSError):
            answer = None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        if not isinstance(answer, Proof):
            reason = "no_proof"
        elif not hello.nonce or not link_auth.verify(self._secret, answer.proof, "caller", hello.nonce, nonce,
                                                     hello.engine, hello.purpose):
            reason = "bad_proof"
        else:
            return True, SessionKeys.derive(self._secret, hello.nonce, nonce, hello.engine, hello.purpose,
                                            self._seal_payloads or hello.seal_payload is not False)
        link_auth.LINK_REFUSED.labels(reason).inc()
        log.warning("refused a %r link claiming to be %r: %s", hello.purpose[:64], hello.engine[:64],
                    "it did not authenticate" if reason == "no_proof" else "wrong secret or a replayed handshake")
        return False, None

    def _read_loop(self, channel: Channel, peer: str) -> None:
        with self._lock:
            self._incoming[peer] = self._incoming.get(peer, 0) + 1
        while True:
            try:
                msg = channel.recv()
            except (TransferError, ValueError, OSError) as e:
                with self._lock:
                    self._incoming[peer] -= 1
                self._drop(channel, peer, str(e))
                return
            if isinstance(msg, Notify):
                self._on_notify(peer, msg)

    def _drop(self, channel: Channel, peer: str, reason: str) -> None:
        with self._lock:
            if self._outgoing.get(peer) is channel:
                del self._outgoing[peer]
        self._untrack_close(channel.sock)
        if not self._closed:
            self._on_peer_lost(peer, reason)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _track(self, sock: socket.socket) -> bool:
        """Track `sock` for close(); once closing, close it instead and return False."""
        with self._lock:
            if not self._closed:
                self._sockets.add(sock)
                return True
        with contextlib.suppress(OSError):
            sock.close()
        return False

    def _swap(self, raw: socket.socket, secured: socket.socket) -> bool:
        """Track the TLS socket in place of the raw one it wraps (as `_track`)."""
        with self._lock:
            self._sockets.discard(raw)
        return self._track(secured)

    def _untrack_close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for sock in sockets:
            shutdown(sock)
            sock.close()
