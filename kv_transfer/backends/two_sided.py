"""Both ends of the two-sided transports (TCP, NCCL/Gloo). The target checks a batch header (ranges,
then the grant a guarded segment requires), accepts or refuses it, takes or gives the payload, and
delivers the batch's notification here; the initiator reads the target's replies.

Per batch, on a data connection: initiator → XferHeader + (offset, length) pairs; target →
accept | reject; WRITE: payload in, target → done; READ: payload out, initiator → done.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kv_transfer.channel import Channel
from kv_transfer.datatypes import Notification
from kv_transfer.errors import GrantRefusedError, RemoteRejectedError, TransferError
from kv_transfer.grants import GrantTable
from kv_transfer.messages import XferHeader, XferReply
from kv_transfer.notifications import NotificationInbox
from kv_transfer.segment import LocalSegment

MovePayload = Callable[[np.ndarray, np.ndarray], None]  # (offsets, lengths) in the target segment


def no_payload(offsets: np.ndarray, lengths: np.ndarray) -> None:
    """The mover to pass with a refused batch: it is never called."""
    raise AssertionError("a refused batch moves no payload")


def _check_ranges(segment: LocalSegment | None, header: XferHeader, pairs: np.ndarray) -> str | None:
    """Why the batch must be refused (None: it may run). `pairs` rows are (offset, length). The
    grants of a guarded segment are checked after this (`check_batch`). No sum here may wrap:
    int64 offsets and lengths come from the peer."""
    if segment is None:
        return f"segment {header.segment!r} is not registered here"
    if header.op not in ("read", "write"):
        return f"unknown op {header.op!r}"
    if len(pairs) == 0:
        return None if header.total_bytes == 0 else "byte count does not match the ranges"
    offsets, lengths = pairs[:, 0], pairs[:, 1]
    size = segment.length
    if (lengths <= 0).any() or (offsets < 0).any() or (lengths > size).any() or (offsets > size - lengths).any():
        return f"a range falls outside segment {header.segment!r} ({size} bytes)"
    if sum(lengths.tolist()) != header.total_bytes:  # Python ints: exact
        return "byte count does not match the ranges"
    return None


def check_batch(segment: LocalSegment | None, header: XferHeader, pairs: np.ndarray, peer: str,
                grants: GrantTable) -> tuple[str | None, str]:
    """(why the batch must be refused, the rejection's code): ranges first, then the grant that a
    guarded segment requires of `peer` (code "grant")."""
    problem = _check_ranges(segment, header, pairs)
    if problem is not None or segment is None or not segment.guarded:
        return problem, ""
    problem = grants.check(segment.name, peer, header.tag, header.op, pairs)
    return problem, "" if problem is None else "grant"


def serve_batch(channel: Channel, inbox: NotificationInbox, peer: str, header: XferHeader, pairs: np.ndarray,
                refusal: tuple[str | None, str], receive: MovePayload, send: MovePayload, transport: str) -> bool:
    """Run one batch as its target; returns False when the connection must be dropped. A batch
    that breaks off mid-payload is delivered as a failed notification, never as a success.
    `refusal` is `check_batch`'s answer (or the backend's own (problem, "")): a refused batch
    moves no byte and delivers no notification."""
    problem, code = refusal
    try:
        if problem is not None:
            channel.send(XferReply(status="reject", error=problem, code=code))
            return True
        channel.send(XferReply(status="accept"))
        channel.settimeout(header.timeout_s)
        offsets, lengths = pairs[:, 0].copy(), pairs[:, 1].copy()
        if header.op == "write":
            receive(offsets, lengths)
            channel.send(XferReply(status="done"))
        else:
            send(offsets, lengths)
            reply = channel.recv()
            if not (isinstance(reply, XferReply) and reply.status == "done"):
                raise TransferError("initiator did not confirm the read")
    except (TransferError, ValueError, OSError) as e:
        _deliver(inbox, peer, header, ok=False, error=f"{transport} {header.op} from {peer} broke off: {e}")
        return False
    _deliver(inbox, peer, header, ok=True, error=None)
    return True


def _deliver(inbox: NotificationInbox, peer: str, header: XferHeader, ok: bool, error: str | None) -> None:
    inbox.deliver(Notification(peer=peer, batch_id=header.batch_id, tag=header.tag, message=header.message,
                               ok=ok, error=error))


def expect_reply(channel: Channel, status: str, owner: str) -> None:
    """Initiator: read the target's reply; raises GrantRefusedError / RemoteRejectedError on a
    refusal, TransferError on anything but `status`."""
    reply = channel.recv()
    if not isinstance(reply, XferReply):
        raise TransferError(f"peer {owner} answered with {type(reply).__name__}")
    if reply.status == "reject":
        error = GrantRefusedError if reply.code == "grant" else RemoteRejectedError
        raise error(f"peer {owner} refused the batch: {reply.error}")
    if reply.status != status:
        raise TransferError(f"peer {owner} answered {reply.status!r}, expected {status!r}")
