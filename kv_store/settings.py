"""Settings of one KV store process. Flags and TANDEM_* variables map onto these fields (common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.security import SecuritySettings
from common.settings import described


@dataclass(frozen=True)
class KVStoreSettings(SecuritySettings):
    etcd: str = field(metadata=described("etcd endpoint host:port"))
    cluster: str = field(default="default", metadata=described("cluster name: the etcd key prefix"))
    store_id: str = field(default="", metadata=described("unique id; empty: kvstore-<host>-<port>"))
    host: str = field(default="127.0.0.1", metadata=described("address to bind and to advertise"))
    grpc_port: int = field(default=0, metadata=described("KVStore service port; 0: any free port"))
    metrics_port: int = field(default=0, metadata=described("Prometheus /metrics port; 0: any free port"))
    capacity_gib: float = field(default=1.0, metadata=described(
        "memory for KV blocks (shared memory registered with the transfer engine)"))
    reserve_ttl_s: float = field(default=10.0, metadata=described(
        "a reservation not committed within this many seconds lapses and its slot is freed"))
    read_lease_s: float = field(default=5.0, metadata=described(
        "a block found by a lookup is not evicted for this many seconds (the reader's window)"))
    kv_backends: str = field(default="", metadata=described("transfer backends in order, comma separated; "
                                                            "empty: every one available"))
    lease_ttl_s: int = field(default=3, metadata=described("etcd lease of the store's record"))
    grace_s: float = field(default=5.0, metadata=described("SIGTERM: seconds in-flight calls get to finish"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.capacity_gib > 0:
            raise ValueError(f"capacity_gib must be > 0, got {self.capacity_gib}")
        if self.reserve_ttl_s <= 0 or self.read_lease_s <= 0 or self.lease_ttl_s < 2 or self.grace_s < 0:
            raise ValueError("reserve_ttl_s and read_lease_s must be > 0, lease_ttl_s >= 2 and grace_s >= 0")

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gib * (1 << 30))

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b.strip() for b in self.kv_backends.split(",") if b.strip())
