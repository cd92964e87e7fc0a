"""The one interface every transport implements."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from kv_transfer.batch import Batch
from kv_transfer.config import TransferEngineConfig
from kv_transfer.datatypes import BackendName, SegmentDescriptor
from kv_transfer.errors import PeerLostError
from kv_transfer.grants import GrantTable
from kv_transfer.messages import Notify
from kv_transfer.notifications import NotificationInbox
from kv_transfer.peer_link import PeerLink
from kv_transfer.segment import LocalSegment


@dataclass(frozen=True)
class BackendContext:
    """What the engine lends its backends."""

    engine_id: str
    config: TransferEngineConfig
    link: PeerLink
    inbox: NotificationInbox
    local_segment: Callable[[str], LocalSegment | None]  # by name; None when not registered
    grants: GrantTable  # what guarded segments let each peer move


class Backend(abc.ABC):
    """A transport. `start` must return quickly; the batch completes later, from any thread,
    through `batch.complete()` / `batch.fail()`. The engine enforces deadlines on top, so a backend
    that cannot notice a dead peer still never hangs a caller."""

    name: ClassVar[BackendName]

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @classmethod
    def is_available(cls) -> bool:
        """Whether this transport can run in this process (libraries importable, devices present)."""
        return True

    def segment_endpoint(self, segment: LocalSegment) -> dict | None:
        """Register `segment` with the transport; returns what peers need (None: cannot serve it)."""
        return {}

    def forget_segment(self, segment: LocalSegment) -> None:  # noqa: B027 - optional hook
        """Undo `segment_endpoint`."""

    @abc.abstractmethod
    def can_reach(self, local: LocalSegment, remote: SegmentDescriptor) -> bool:
        """Whether this transport can move bytes between these two segments."""

    def connect(self, remote: SegmentDescriptor) -> None:  # noqa: B027 - optional hook
        """Prepare to reach `remote` (load peer metadata, map memory). May raise TransferError."""

    def disconnect(self, remote: SegmentDescriptor) -> None:  # noqa: B027 - optional hook
        """Forget `remote` (its owner went away or it was re-registered)."""

    @abc.abstractmethod
    def start(self, batch: Batch) -> None:
        """Begin moving `batch`; never blocks for the transfer itself."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop threads and free transport resources."""

    # -- helpers for one-sided transports -------------------------------------------------------------
    def notify_peer(self, batch: Batch, ok: bool, error: str | None = None) -> None:
        """Tell the segment owner the batch ended. Raises PeerLostError if it cannot be told."""
        msg = Notify(batch_id=batch.batch_id, segment=batch.remote.name, tag=batch.notify.tag,
                     message=batch.notify.message, ok=ok, error=error)
        self.ctx.link.send(batch.remote.owner, msg)

    def notify_failure(self, batch: Batch, error: str) -> None:
        """Best effort: tell the segment owner the batch failed (one-sided transports; the TCP
        target learns it from its own connection)."""
        with contextlib.suppress(PeerLostError):
            self.notify_peer(batch, ok=False, error=error)

    def finish_one_sided(self, batch: Batch) -> None:
        """After a one-sided copy: the batch is DONE only once its peer has been told."""
        try:
            self.notify_peer(batch, ok=True)
        except PeerLostError as e:
            batch.fail(e)
            return
        batch.complete()
