"""Tandem's transfer engine: move KV-cache pages between processes and hosts.

With the cluster's TLS files, peer links (control, TCP data, NCCL headers) are mutual TLS (link_tls);
with a cluster secret they are authenticated and sealed (link_auth, channel), not encrypted. Guarded
segments take two-sided writes only inside grants (grants). NIXL/UCX and shared memory are outside
those links (see link_auth). Its etcd
metadata client honours TLS and auth (common.etcd.access)."""

from kv_transfer.batch import BatchHandle, NotifySpec
from kv_transfer.config import TransferEngineConfig
from kv_transfer.datatypes import BatchStatus, Notification, Ranges, SegmentDescriptor, TransferOp, TransferRequest
from kv_transfer.errors import (
    BackendUnavailableError,
    GrantRefusedError,
    HandshakeError,
    IntegrityError,
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
    "BackendUnavailableError", "BatchHandle", "BatchStatus", "EtcdStore", "GrantRefusedError", "HandshakeError",
    "InProcessStore", "IntegrityError", "InvalidTransferError", "MetadataStore", "MetadataStoreError",
    "Notification", "NotifySpec", "PeerLostError", "Ranges", "RemoteRejectedError", "RemoteSegment",
    "SegmentDescriptor", "SegmentNotFoundError", "TransferEngine", "TransferEngineConfig", "TransferError",
    "TransferOp", "TransferRequest", "TransferTimeoutError",
]
