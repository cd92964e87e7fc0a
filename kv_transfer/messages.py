"""Messages on the peer link (the control connection between two engines), and their framing.

Frame: 4-byte big-endian length, then a JSON object whose "kind" names the message class.
Binary fields travel base64-encoded. Payload bytes of the TCP backend follow their header frame
raw, outside this framing.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Literal

from kv_transfer.errors import PeerLostError
from kv_transfer.socket_io import fill

MAX_FRAME = 64 << 20
_LEN = struct.Struct("!I")


@dataclass(frozen=True)
class Hello:
    """First frame of every connection: who is calling and what the connection is for: "control",
    or a data purpose naming the backend that serves it ("data:tcp": TCP, "data:nccl": NCCL).
    `nonce`: the caller's challenge to a target that authenticates links (kv_transfer.link_auth);
    `seal_payload`: whether the caller wants payload bytes sealed too (kv_transfer.channel)."""

    engine: str
    purpose: str
    nonce: str = ""
    seal_payload: bool = True
    kind: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Challenge:
    """An authenticating target's answer to Hello: its own nonce, its proof of the secret over both,
    and whether it wants payload bytes sealed (they are when either side wants it)."""

    nonce: str
    proof: str
    seal_payload: bool = True
    kind: ClassVar[str] = "challenge"


@dataclass(frozen=True)
class Proof:
    """The caller's proof of the secret over both nonces; the connection is then the caller's."""

    proof: str
    kind: ClassVar[str] = "proof"


@dataclass(frozen=True)
class Notify:
    """A batch towards one of the receiver's segments ended (sent by the initiator)."""

    batch_id: str
    segment: str
    tag: str
    message: bytes
    ok: bool
    error: str | None = None
    kind: ClassVar[str] = "notify"


@dataclass(frozen=True)
class XferHeader:
    """TCP and NCCL backends: the initiator asks to move `num_ranges` ranges of `segment`; the (offset, length)
    int64 pairs follow this frame as raw bytes."""

    batch_id: str
    op: Literal["read", "write"]
    segment: str
    num_ranges: int
    total_bytes: int
    tag: str
    message: bytes
    timeout_s: float  # how long the target may wait for the payload
    kind: ClassVar[str] = "xfer"


@dataclass(frozen=True)
class XferReply:
    """TCP and NCCL backends: the target's answer to a header ("accept"/"reject") or to a payload ("done").
    A rejection's `code` says why in a word the initiator maps to an error type ("grant": the
    ranges are not granted to the initiator, kv_transfer.grants)."""

    status: Literal["accept", "reject", "done"]
    error: str | None = None
    code: str = ""
    kind: ClassVar[str] = "xfer_reply"


@dataclass(frozen=True)
class GroupSetup:
    """NCCL backend, first frame of a data connection: the initiator hosts a TCPStore at
    `store_host:store_port`; the target joins the two-rank process group under `prefix` as rank 1,
    on `device` ("cpu": Gloo, "cuda:N": NCCL). Both cut payloads into `chunk_bytes` messages.
    The target answers accept | reject, then done once its side of the group is built."""

    store_host: str
    store_port: int
    prefix: str
    device: str
    chunk_bytes: int
    timeout_s: float  # how long building the group may take
    kind: ClassVar[str] = "group_setup"


Message = Hello | Challenge | Proof | Notify | XferHeader | XferReply | GroupSetup
_BY_KIND: dict[str, type] = {cls.kind: cls for cls in (Hello, Challenge, Proof, Notify, XferHeader, XferReply,
                                                        GroupSetup)}
_BYTES_FIELDS = {"message"}
_STR_FIELDS = ("engine", "purpose", "nonce", "proof", "batch_id", "segment", "tag", "code")  # checked on JSON frames


# Notify is on the data path (one per batch): a binary frame, b"N" then a fixed header and the
# variable fields, instead of JSON + base64 (~10x cheaper to build). Every other frame is JSON.
_NOTIFY_MARK = b"N"
_NOTIFY_HEADER = struct.Struct("!?HHHIi")  # ok, len(batch_id), len(segment), len(tag), len(message), len(error) or -1


def _encode_notify(msg: Notify) -> bytes:
    error = None if msg.error is None else msg.error.encode()
    parts = [msg.batch_id.encode(), msg.segment.encode(), msg.tag.encode()]
    head = _NOTIFY_HEADER.pack(msg.ok, *(len(p) for p in parts), len(msg.message), -1 if error is None else len(error))
    raw = b"".join((_NOTIFY_MARK, head, *parts, msg.message, error or b""))
    return _LEN.pack(len(raw)) + raw


def _decode_notify(raw: bytes) -> Notify:
    try:
        ok, *lengths, error_len = _NOTIFY_HEADER.unpack_from(raw, 1)
    except struct.error as e:
        raise ValueError(f"malformed notify frame: {e}") from e
    pos = 1 + _NOTIFY_HEADER.size
    fields_: list[bytes] = []
    for n in (*lengths, max(error_len, 0)):
        fields_.append(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise ValueError("malformed notify frame")
    batch_id, segment, tag, message, error = fields_
    return Notify(batch_id=batch_id.decode(), segment=segment.decode(), tag=tag.decode(), message=message, ok=ok,
                  error=None if error_len < 0 else error.decode())


def encode(msg: Message) -> bytes:
    if isinstance(msg, Notify):
        return _encode_notify(msg)
    # flat: no deep copy; a field at its default is left out (the receiver fills it in), so a peer
    # one release older, which knows no newer field, still reads what it is not told about
    body: dict[str, Any] = {f.name: value for f in fields(msg)
                            if (value := getattr(msg, f.name)) != f.default or f.default is MISSING}
    for name in _BYTES_FIELDS & body.keys():
        body[name] = base64.b64encode(body[name]).decode()
    body["kind"] = msg.kind
    raw = json.dumps(body).encode()
    return _LEN.pack(len(raw)) + raw


def decode(raw: bytes) -> Message:
    if raw[:1] == _NOTIFY_MARK:
        return _decode_notify(raw)
    body = json.loads(raw)
    cls = _BY_KIND.get(body.pop("kind", None))
    if cls is None:
        raise ValueError("unknown message kind")
    names = {f.name for f in fields(cls)}
    if body.keys() - names:
        raise ValueError(f"unexpected fields {sorted(body.keys() - names)} in {cls.__name__}")
    for name in _BYTES_FIELDS & body.keys():
        body[name] = base64.b64decode(body[name])
    try:
        return cls(**body)  # type: ignore[no-any-return]
    except TypeError as e:  # a field missing: the peer's error, like any malformed frame
        raise ValueError(f"malformed {cls.__name__}: {e}") from e


def send_message(sock: socket.socket, msg: Message) -> None:
    sock.sendall(encode(msg))


def recv_message(sock: socket.socket, max_bytes: int = MAX_FRAME) -> Message:
    """Read one frame of at most `max_bytes`; raises PeerLostError on EOF or a broken connection,
    ValueError for a malformed frame."""
    return read_frame(lambda n: recv_exact(sock, n), max_bytes)


def read_frame(read_exact: Callable[[int], bytes], max_bytes: int) -> Message:
    """One frame from `read_exact` (n → exactly n bytes): its length, checked against `max_bytes`
    before the body is read, then the body."""
    (length,) = _LEN.unpack(read_exact(_LEN.size))
    if length > max_bytes:
        raise PeerLostError(f"peer sent a {length}-byte frame (limit {max_bytes}): dropping the connection")
    return parse_frame(read_exact(length))


def parse_frame(raw: bytes) -> Message:
    """A frame's body (after its length) as a message; ValueError when malformed."""
    body = decode(raw)
    wrong = [name for name in _STR_FIELDS if not isinstance(getattr(body, name, ""), str)]
    if wrong:
        raise ValueError(f"malformed {type(body).__name__}: {', '.join(wrong)} must be text")
    return body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    fill(sock, memoryview(buf))
    return bytes(buf)
