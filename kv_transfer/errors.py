"""Typed errors of the transfer engine. Every failure a caller can see is one of these."""

from __future__ import annotations


class TransferError(Exception):
    """Base class: a transfer, a segment or the metadata store failed."""


class InvalidTransferError(TransferError, ValueError):
    """The request itself is wrong (range outside a segment, unknown segment, bad arguments)."""


class SegmentNotFoundError(TransferError, LookupError):
    """No segment of that name is published in the metadata store."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"segment {name!r} is not published in the metadata store{': ' + detail if detail else ''}")
        self.segment = name


class MetadataStoreError(TransferError):
    """The metadata store could not be reached or answered with an error."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A batch or a notification did not complete within its deadline."""


class PeerLostError(TransferError, ConnectionError):
    """The peer engine went away (connection closed or reset) before the batch completed."""


class RemoteRejectedError(TransferError):
    """The peer refused the batch (it validated the request and found it wrong)."""


class GrantRefusedError(RemoteRejectedError):
    """The peer refused the batch because its ranges are not granted to this engine for that
    request (kv_transfer.grants): no byte was moved."""


class IntegrityError(PeerLostError):
    """A unit on an authenticated link failed its integrity tag (changed, reordered or replayed);
    the connection is dropped."""


class BackendUnavailableError(TransferError):
    """No backend can reach the remote segment from here (or the one asked for is not available)."""


class HandshakeError(TransferError):
    """The two sides' KV layouts differ; no byte was moved."""
