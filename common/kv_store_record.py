"""A KV store's record in etcd: `/tandem/<cluster>/kvstores/<id>` under a lease, kept alive by the store
(kv_store.server) and read by workers (worker_runtime.kv_store_client), which shard blocks over the
stores they find there. A killed store's record vanishes when its lease expires."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KVStoreRecord:
    store_id: str
    address: str  # gRPC host:port of its KVStore service
    segment: str  # its transfer segment (the blocks' bytes)
    engine_id: str  # its transfer engine
    capacity_bytes: int
    tls: bool = False  # its KVStore service takes only mutual-TLS calls (common.tls)

    def __post_init__(self) -> None:
        if not self.store_id or "/" in self.store_id:
            raise ValueError(f"store id {self.store_id!r} must be non-empty and contain no '/'")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> KVStoreRecord:
        return cls(**json.loads(raw))


def kv_stores_prefix(cluster: str) -> str:
    return f"/tandem/{cluster}/kvstores/"


def kv_store_key(cluster: str, store_id: str) -> str:
    return f"{kv_stores_prefix(cluster)}{store_id}"
