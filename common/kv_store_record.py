"""A KV store's record in etcd: `/tandem/<cluster>/kvstores/<id>` under a lease, kept alive by the store
(kv_store.server) and read by workers (worker_runtime.kv_store_client), which shard blocks over the
stores they find there. A killed store's record vanishes when its lease expires."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_BLOCKS_PER_CALL = 4096  # blocks in one Lookup, Reserve, Commit or Verify (a 64k-token prompt in 16-token blocks)


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


def records_from_listing(listed: Iterable[Any]) -> dict[str, KVStoreRecord]:
    """The stores' records by id from an etcd listing of `kv_stores_prefix` (key-values with `.key`, `.value`);
    an unreadable record is skipped (and logged), not the listing."""
    records = {}
    for kv in listed:
        try:
            record = KVStoreRecord.from_json(kv.value)
        except (ValueError, TypeError) as e:
            log.warning("ignoring an unreadable KV store record %s: %s", kv.key, e)
            continue
        records[record.store_id] = record
    return records


def kv_stores_prefix(cluster: str) -> str:
    return f"/tandem/{cluster}/kvstores/"


def kv_store_key(cluster: str, store_id: str) -> str:
    return f"{kv_stores_prefix(cluster)}{store_id}"
