"""The data currency of the transfer engine: operations, requests, descriptors, notifications."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kv_transfer.errors import InvalidTransferError

BackendName = Literal["shm", "tcp", "nixl", "nccl"]
ALL_BACKENDS: tuple[BackendName, ...] = ("shm", "nixl", "nccl", "tcp")  # auto-selection order
DeviceKind = Literal["cpu", "cuda"]


class TransferOp(enum.Enum):
    READ = "read"  # remote → local
    WRITE = "write"  # local → remote


class BatchStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferRequest:
    """Move `length` bytes between `local_offset` of a local segment and `remote_offset` of a
    remote segment, in the direction `op`."""

    op: TransferOp
    local_offset: int
    remote_segment: str
    remote_offset: int
    length: int


@dataclass(frozen=True)
class SegmentDescriptor:
    """What a peer needs to reach a registered buffer; published in the metadata store.

    `endpoints` maps a backend name to that backend's JSON-able connection info for this segment.
    """

    name: str
    owner: str  # engine id of the registering engine
    length: int
    device: DeviceKind
    device_id: int
    address: int  # base address in the owner's address space (for one-sided backends)
    control: str  # "host:port" of the owner's peer link
    endpoints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {k: getattr(self, k) for k in ("name", "owner", "length", "device", "device_id", "address", "control")}
        body["endpoints"] = {k: dict(v) for k, v in self.endpoints.items()}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SegmentDescriptor:
        body = json.loads(raw)
        return cls(**body)


@dataclass(frozen=True)
class Notification:
    """Delivered to the owner of the remote segment when a batch that named `tag` ends.

    `ok` is False when the initiator reports a failure (or the link to it broke: then `error`
    says so and `batch_id` is empty).
    """

    peer: str
    batch_id: str
    tag: str
    message: bytes
    ok: bool
    error: str | None = None


@dataclass
class Ranges:
    """Parallel int64 arrays: one row per contiguous byte range to move."""

    local_offsets: np.ndarray
    remote_offsets: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.local_offsets = np.ascontiguousarray(self.local_offsets, dtype=np.int64)
        self.remote_offsets = np.ascontiguousarray(self.remote_offsets, dtype=np.int64)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.int64)
        n = len(self.lengths)
        if len(self.local_offsets) != n or len(self.remote_offsets) != n:
            raise InvalidTransferError("local offsets, remote offsets and lengths must have the same length")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum())

    def check_within(self, local_length: int, remote_length: int, remote_name: str) -> None:
        if len(self) == 0:
            return
        if len(self) <= 8:  # the common per-layer case: Python ints beat numpy reductions here
            for lo, ro, k in zip(self.local_offsets.tolist(), self.remote_offsets.tolist(), self.lengths.tolist(),
                                 strict=True):
                if k <= 0:
                    raise InvalidTransferError("every range needs a positive length")
                if lo < 0 or lo + k > local_length:
                    raise InvalidTransferError(f"a range falls outside the local segment ({local_length} bytes)")
                if ro < 0 or ro + k > remote_length:
                    raise InvalidTransferError(
                        f"a range falls outside remote segment {remote_name!r} ({remote_length} bytes)")
            return
        if (self.lengths <= 0).any():
            raise InvalidTransferError("every range needs a positive length")
        if (self.local_offsets < 0).any() or int((self.local_offsets + self.lengths).max()) > local_length:
            raise InvalidTransferError(f"a range falls outside the local segment ({local_length} bytes)")
        if (self.remote_offsets < 0).any() or int((self.remote_offsets + self.lengths).max()) > remote_length:
            raise InvalidTransferError(
                f"a range falls outside remote segment {remote_name!r} ({remote_length} bytes)")

