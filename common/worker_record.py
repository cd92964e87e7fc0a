"""A worker's record in etcd: `/tandem/<cluster>/workers/<role>/<id>` under a lease of a few
seconds, kept alive, and written again after losing it (etcd restarted, or a pause longer than the
TTL). A clean stop revokes the lease, so the key vanishes at once; a killed worker's key vanishes
when its lease expires. Workers write records; routers read them (cluster.discovery)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from common.etcd.access import EtcdAccess
from common.etcd.lease import LeasedKeys

WorkerRole = Literal["prefill", "decode", "both"]
ROLES: tuple[WorkerRole, ...] = ("prefill", "decode", "both")


@dataclass(frozen=True)
class WorkerRecord:
    """What the router needs to know about a worker (the value of its etcd key)."""

    worker_id: str
    role: WorkerRole
    address: str  # gRPC host:port of its Worker service
    model: str
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int = 0  # 0: unknown
    transfer: dict[str, str] = field(default_factory=dict)  # e.g. {"engine_id": ..., "segment": ...}
    tls: bool = False  # its Worker service takes only mutual-TLS calls (common.tls)
    tensor_parallel_size: int = 1  # the worker is a tensor-parallel group of this many ranks (devices)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"worker id {self.worker_id!r} must be non-empty and contain no '/'")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerRecord:
        return cls(**json.loads(raw))


def workers_prefix(cluster: str) -> str:
    return f"/tandem/{cluster}/workers/"


def worker_key(cluster: str, record: WorkerRecord) -> str:
    return f"{workers_prefix(cluster)}{record.role}/{record.worker_id}"


class WorkerRegistration:
    """Keeps one worker's record in etcd for as long as the worker runs."""

    def __init__(self, endpoint: str, cluster: str, record: WorkerRecord, ttl_s: int = 3,
                 timeout_s: float = 2.0, access: EtcdAccess | None = None) -> None:
        self.record = record
        self.key = worker_key(cluster, record)
        self._keys = LeasedKeys(endpoint, ttl_s, timeout_s, access)

    async def start(self) -> None:
        """Register (raises if etcd is unreachable); the lease is then kept alive in the background,
        and the record written again whenever the lease was lost."""
        await self._keys.put(self.key, self.record.to_json())

    @property
    def registrations(self) -> int:
        """How many leases the record was written under (1 + recoveries)."""
        return self._keys.grants

    @property
    def lease_id(self) -> int | None:
        return self._keys.lease_id

    async def stop(self) -> None:
        """Revoke the lease (the key vanishes now) and close the client."""
        await self._keys.close()
