"""The target side of the two-sided transports (TCP, NCCL/Gloo): check a batch header, accept or
refuse it, take or give the payload, and deliver the batch's notification here.

Per batch, on a data connection: initiator → XferHeader + (offset, length) pairs; target →
accept | reject; WRITE: payload in, target → done; READ: payload out, initiator → done.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np

from kv_transfer.datatypes import Notification
from kv_transfer.errors import TransferError
from kv_transfer.messages import XferHeader, XferReply, recv_message, send_message
from kv_transfer.notifications import NotificationInbox
from kv_transfer.segment import LocalSegment

MovePayload = Callable[[np.ndarray, np.ndarray], None]  # (offsets, lengths) in the target segment


def no_payload(offsets: np.ndarray, lengths: np.ndarray) -> None:
    """The mover to pass with a refused batch: it is never called."""
    raise AssertionError("a refused batch moves no payload")


def check_ranges(segment: LocalSegment | None, header: XferHeader, pairs: np.ndarray) -> str | None:
    """Why the batch must be refused (None: it may run). `pairs` rows are (offset, length)."""
    if segment is None:
        return f"segment {header.segment!r} is not registered here"
    if header.op not in ("read", "write"):
        return f"unknown op {header.op!r}"
    if len(pairs) == 0:
        return None if header.total_bytes == 0 else "byte count does not match the ranges"
    offsets, lengths = pairs[:, 0], pairs[:, 1]
    if (lengths <= 0).any() or (offsets < 0).any() or int((offsets + lengths).max()) > segment.length:
        return f"a range falls outside segment {header.segment!r} ({segment.length} bytes)"
    if int(lengths.sum()) != header.total_bytes:
        return "byte count does not match the ranges"
    return None


def serve_batch(sock: socket.socket, inbox: NotificationInbox, peer: str, header: XferHeader, pairs: np.ndarray,
                problem: str | None, receive: MovePayload, send: MovePayload, transport: str) -> bool:
    """Run one batch as its target; returns False when the connection must be dropped. A batch
    that breaks off mid-payload is delivered as a failed notification, never as a success."""
    try:
        if problem is not None:
            send_message(sock, XferReply(status="reject", error=problem))
            return True
        send_message(sock, XferReply(status="accept"))
        sock.settimeout(header.timeout_s)
        offsets, lengths = pairs[:, 0].copy(), pairs[:, 1].copy()
        if header.op == "write":
            receive(offsets, lengths)
            send_message(sock, XferReply(status="done"))
        else:
            send(offsets, lengths)
            reply = recv_message(sock)
            if not (isinstance(reply, XferReply) and reply.status == "done"):
                raise TransferError("initiator did not confirm the read")
    except (TransferError, OSError) as e:
        _deliver(inbox, peer, header, ok=False, error=f"{transport} {header.op} from {peer} broke off: {e}")
        return False
    _deliver(inbox, peer, header, ok=True, error=None)
    return True


def _deliver(inbox: NotificationInbox, peer: str, header: XferHeader, ok: bool, error: str | None) -> None:
    inbox.deliver(Notification(peer=peer, batch_id=header.batch_id, tag=header.tag, message=header.message,
                               ok=ok, error=error))
