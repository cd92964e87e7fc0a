"""How a process reaches etcd: optional client TLS (CA, client certificate and key, PEM files)
and optional user/password authentication (common.etcd.client applies them)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.files import read_file


@dataclass(frozen=True)
class EtcdAccess:
    """Client TLS and credentials for etcd; the default is plaintext without authentication.
    `ca` alone: TLS, the server verified against it; with `cert` + `key`: mutual TLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    reauth_s: float = 60.0

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("etcd client certificate and key come together")
        if self.cert is not None and self.ca is None:
            raise ValueError("an etcd client certificate needs the etcd CA too")
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd user and password come together")
        if self.reauth_s <= 0:
            raise ValueError("reauth_s must be > 0")
        for path, what in ((self.ca, "etcd CA"), (self.cert, "etcd client certificate"), (self.key, "etcd client key")):
            if path is not None:
                read_file(path, what)

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca, "etcd CA"),
            private_key=read_file(self.key, "etcd client key") if self.key else None,
            certificate_chain=read_file(self.cert, "etcd client certificate") if self.cert else None)

    def __repr__(self) -> str:  # never print the password
        return (f"EtcdAccess(ca={self.ca!r}, cert={self.cert!r}, key={self.key!r}, user={self.user!r}, "
                f"password={'<hidden>' if self.password else None})")
