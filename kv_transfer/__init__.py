"""Tandem's transfer engine: move KV-cache pages between processes and hosts.

The data plane (NIXL/UCX, NCCL, TCP, shared memory) is neither encrypted nor authenticated; the
cluster's TLS (common/tls.py) covers the control plane only. Keep it on a trusted network. Only
its etcd metadata client honours TLS and auth (common.etcd.access)."""

from kv_transfer.batch import BatchHandle, NotifySpec
from kv_transfer.config import TransferEngineConfig
from kv_transfer.datatypes import BatchStatus, Notification, Ranges, SegmentDescriptor, TransferOp, TransferRequest
from kv_transfer.errors import (
    BackendUnavailableError,
    HandshakeError,
    InvalidTransferError,
    MetadataStoreError,
    PeerLostError,
    RemoteRejectedError,
    SegmentNotFoundError,
    TransferError,
    TransferTimeoutError,
)
from kv_transfer.metadata import EtcdStore, InProcessStore, MetadataStore
from kv_transfer.transfer_engine import RemoteSegment, TransferEngine

__all__ = [
    "BackendUnavailableError", "BatchHandle", "BatchStatus", "EtcdStore", "HandshakeError", "InProcessStore",
    "InvalidTransferError", "MetadataStore", "MetadataStoreError", "Notification", "NotifySpec", "PeerLostError",
    "Ranges", "RemoteRejectedError", "RemoteSegment", "SegmentDescriptor", "SegmentNotFoundError", "TransferEngine",
    "TransferEngineConfig", "TransferError", "TransferOp", "TransferRequest", "TransferTimeoutError",
]
