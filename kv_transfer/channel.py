"""A peer-link connection after its handshake: frames, raw byte strings and scattered payloads, each
integrity-protected when the link is authenticated (kv_transfer.link_auth).

Sealed (a cluster secret is set): the handshake's two fresh nonces give the connection its own keys,
one set per direction (`SessionKeys`). Every unit sent carries a 16-byte tag over its bytes and a
sequence number that both sides count (never sent):

    frame / byte string:  bytes, then HMAC-SHA256(frame key, seq | bytes)[:16]
    payload (KV pages):   bytes, then GMAC(payload key, nonce = seq, bytes)   (AES-256-GCM, no cipher text)

A changed, dropped, reordered or replayed unit fails its tag (the sequence number moved on; a unit
recorded on another connection was made under other keys): `IntegrityError`, the connection is
dropped and counted in `tandem_kv_link_refused_total{reason="bad_tag"}`. Payload bytes land in
their pages before their tag is checked; a failed check fails the batch, so the receiver never uses
them (a decode worker's receipt fails and the request prefills elsewhere).

Payload sealing costs a GMAC pass over the bytes on each side (docs/BENCHMARKS.md measures it); a
cluster on a trusted network may seal frames only (`TransferEngineConfig.seal_payloads`). Payload
bytes are sealed when either side of a connection asks for it.

Open (no secret): the same calls, no tags: today's wire format.
"""

from __future__ import annotations

import hmac
import json
import socket
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kv_transfer import link_auth
from kv_transfer.errors import IntegrityError
from kv_transfer.messages import MAX_FRAME, Message, encode, read_frame, recv_exact
from kv_transfer.socket_io import recv_ranges, send_ranges, shutdown

TAG_BYTES = 16


@dataclass(frozen=True)
class DirectionKeys:
    frame: bytes = field(repr=False)
    payload: bytes = field(repr=False)  # an AES-256 key


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one connection: the caller seals with `caller`, the target with `target`.
    `seal_payload` False: frames and byte strings are sealed, payload bytes are not (both sides'
    choice enters the keys, so two sides that disagree fail at the first unit)."""

    caller: DirectionKeys
    target: DirectionKeys
    seal_payload: bool = True

    @classmethod
    def derive(cls, secret: bytes, caller_nonce: str, target_nonce: str, engine: str, purpose: str,
               seal_payload: bool) -> SessionKeys:
        context = ["session", caller_nonce, target_nonce, engine, purpose, seal_payload]
        session = hmac.digest(secret, json.dumps(context).encode(), "sha256")

        def key(name: str) -> bytes:
            return hmac.digest(session, name.encode(), "sha256")

        return cls(DirectionKeys(key("caller frame"), key("caller payload")),
                   DirectionKeys(key("target frame"), key("target payload")), seal_payload)


class _Sealer:
    """One direction's tags; `seq` counts the units sealed (or checked) so far."""

    def __init__(self, keys: DirectionKeys) -> None:
        self._keys = keys
        self.seq = 0

    def frame_tag(self, data: bytes) -> bytes:
        tag = hmac.digest(self._keys.frame, self.seq.to_bytes(8, "big") + data, "sha256")[:TAG_BYTES]
        self.seq += 1
        return tag

    def payload_mac(self) -> _PayloadMac:
        nonce = self.seq.to_bytes(12, "big")
        self.seq += 1
        return _PayloadMac(self._keys.payload, nonce)


class _PayloadMac:
    """GMAC over a payload fed in pieces, in order."""

    def __init__(self, key: bytes, nonce: bytes) -> None:
        self._gcm = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()

    def update(self, piece: memoryview) -> None:
        self._gcm.authenticate_additional_data(piece)

    def tag(self) -> bytes:
        self._gcm.finalize()
        return bytes(self._gcm.tag)


class Channel:
    """One connection of the peer link. Not thread-safe: one user at a time (a backend's batch, or
    the control connection's sender under its lock and its reader thread, one direction each)."""

    def __init__(self, sock: socket.socket, keys: SessionKeys | None = None, is_caller: bool = True) -> None:
        self.sock = sock
        self.sealed = keys is not None
        self.sealed_payload = keys is not None and keys.seal_payload
        self._out: _Sealer | None = None
        self._in: _Sealer | None = None
        if keys is not None:
            mine, theirs = (keys.caller, keys.target) if is_caller else (keys.target, keys.caller)
            self._out, self._in = _Sealer(mine), _Sealer(theirs)

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        if self._out is None:
            self.sock.sendall(frame)
            return
        length, body = frame[:4], frame[4:]  # two units: the length is checked before a large body is read
        self.sock.sendall(b"".join((length, self._out.frame_tag(length), body, self._out.frame_tag(body))))

    def recv(self, max_bytes: int = MAX_FRAME) -> Message:
        """One frame of at most `max_bytes`: PeerLostError on EOF, ValueError when malformed,
        IntegrityError when a tag is wrong."""
        return read_frame(self.recv_bytes, max_bytes)

    def send_bytes(self, data: bytes) -> None:
        """`data` as one unit (the receiver reads it with `recv_bytes(len(data))`)."""
        self.sock.sendall(data if self._out is None else data + self._out.frame_tag(data))

    def recv_bytes(self, n: int) -> bytes:
        data = recv_exact(self.sock, n)
        if self._in is not None:
            self._check(recv_exact(self.sock, TAG_BYTES), self._in.frame_tag(data))
        return data

    def send_ranges(self, base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> None:
        if self._out is None or not self.sealed_payload:
            send_ranges(self.sock, base, offsets, lengths)
            return
        # the tag covers the bytes as they are after the kernel took them: a source that changes
        # mid-send fails the receiver's check (the KV push never writes pages it is sending)
        mac = self._out.payload_mac()
        send_ranges(self.sock, base, offsets, lengths, on_piece=mac.update)
        self.sock.sendall(mac.tag())

    def recv_ranges(self, base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> None:
        if self._in is None or not self.sealed_payload:
            recv_ranges(self.sock, base, offsets, lengths)
            return
        mac = self._in.payload_mac()
        recv_ranges(self.sock, base, offsets, lengths, on_piece=mac.update)
        self._check(recv_exact(self.sock, TAG_BYTES), mac.tag())

    @staticmethod
    def _check(got: bytes, want: bytes) -> None:
        if not hmac.compare_digest(got, want):
            link_auth.LINK_REFUSED.labels("bad_tag").inc()
            raise IntegrityError("a unit on an authenticated KV link failed its integrity tag "
                                 "(changed, reordered or replayed): dropping the connection")

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self) -> None:
        """End both directions now, from any thread (kv_transfer.socket_io.shutdown)."""
        shutdown(self.sock)

    def close(self) -> None:
        self.sock.close()
