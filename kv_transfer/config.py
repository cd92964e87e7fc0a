"""Configuration of a transfer engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from kv_transfer.datatypes import ALL_BACKENDS, BackendName
from kv_transfer.link_tls import LinkTls


@dataclass(frozen=True)
class TransferEngineConfig:
    """`backends` is the order of preference; empty means every backend available here, in the
    order shm (same host), nixl, nccl (CUDA to CUDA), tcp (anywhere)."""

    engine_id: str = ""  # empty: a random id
    host: str = "127.0.0.1"  # where the peer link listens and what peers are told to dial
    port: int = 0  # 0: any free port
    backends: tuple[BackendName, ...] = ()
    metadata_prefix: str = "/tandem/default"
    default_timeout_s: float = 30.0
    tcp_parallel_batches: int = 4
    nixl_backend_params: tuple[tuple[str, str], ...] = field(
        default=(("ucx_error_handling_mode", "none"),))  # UCX then uses shared memory on one host
    # the cluster's secret: peer links are authenticated both ways (kv_transfer.link_auth); None: open
    link_secret: bytes | None = field(default=None, repr=False)
    # with a secret: seal payload bytes too (kv_transfer.channel), not only frames; a connection
    # seals them when either side asks
    seal_payloads: bool = True
    # the cluster's TLS files: every peer link is mutual TLS (kv_transfer.link_tls); None: plain TCP
    link_tls: LinkTls | None = None

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in ALL_BACKENDS]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; choose from {list(ALL_BACKENDS)}")
        if self.default_timeout_s <= 0:
            raise ValueError("default_timeout_s must be positive")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.tcp_parallel_batches < 1:
            raise ValueError("tcp_parallel_batches must be >= 1")

    @property
    def preferred_backends(self) -> tuple[BackendName, ...]:
        return self.backends or ALL_BACKENDS
