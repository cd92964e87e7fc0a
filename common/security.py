"""Security settings every process of the cluster shares: TLS on its gRPC/HTTP links (common.tls),
how it reaches etcd (common.etcd.access), and the secret that authenticates the workers' KV links
(kv_transfer.link_auth). A base of WorkerSettings, RouterSettings and
UpSettings; its fields are keyword-only, so they sit before the subclasses' required fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from common.etcd.access import EtcdAccess
from common.settings import described, env_name
from common.tls import TlsFiles

MIN_KV_SECRET_BYTES = 16  # as kv_transfer.link_auth requires


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    tls_ca: str | None = field(default=None, metadata=described("cluster CA (PEM); with tls_cert and tls_key: "
                                                                "TLS everywhere, mutual TLS to workers"))
    tls_cert: str | None = field(default=None, metadata=described("this component's certificate (PEM), "
                                                                  "for serverAuth and clientAuth"))
    tls_key: str | None = field(default=None, metadata=described("this component's private key (PEM)"))
    etcd_ca: str | None = field(default=None, metadata=described("CA of etcd's server certificate (PEM): "
                                                                 "talk TLS to etcd"))
    etcd_cert: str | None = field(default=None, metadata=described("client certificate for etcd (PEM)"))
    etcd_key: str | None = field(default=None, metadata=described("client key for etcd (PEM)"))
    etcd_user: str | None = field(default=None, metadata=described("etcd user (with etcd_password)"))
    etcd_password: str | None = field(default=None, repr=False, metadata=described(
        "etcd password; prefer the variable to the flag (flags show in `ps`)", secret=True))
    kv_secret: str | None = field(default=None, repr=False, compare=False, metadata=described(
        "the cluster's secret (16+ characters) that the workers' KV transfer links authenticate with, both "
        "ways; unset: the links are open to anyone who reads a segment's address in etcd (tandem up makes "
        "one); prefer the variable to the flag", secret=True))
    kv_link_integrity: Literal["all", "frames"] = field(default="all", metadata=described(
        "with kv_secret, what the KV links seal: all (every frame and every KV page byte) or frames (headers, "
        "ranges, replies and notes; page bytes unsealed, for a trusted network: sealing them costs a GMAC "
        "pass on each side, docs/BENCHMARKS.md)"))

    def __post_init__(self) -> None:
        self.tls_files()
        self.etcd_access()
        if self.kv_secret is not None and len(self.kv_secret.encode()) < MIN_KV_SECRET_BYTES:
            raise ValueError(f"kv_secret must be at least {MIN_KV_SECRET_BYTES} bytes")

    def kv_link_secret(self) -> bytes | None:
        return None if self.kv_secret is None else self.kv_secret.encode()

    def tls_files(self) -> TlsFiles | None:
        return TlsFiles.optional(self.tls_ca, self.tls_cert, self.tls_key)

    def etcd_access(self) -> EtcdAccess:
        return EtcdAccess(ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key, user=self.etcd_user,
                          password=self.etcd_password)

    def security_args(self) -> list[str]:
        """Flags that hand these settings to a child process, secrets left out (see security_env)."""
        args: list[str] = []
        for f in fields(SecuritySettings):
            value = getattr(self, f.name)
            if value is not None and not f.metadata.get("secret"):
                args += [f"--{f.name.replace('_', '-')}", value]
        return args

    def security_env(self) -> dict[str, str]:
        """The secrets, as the TANDEM_* variables of a child process (argv is world-readable)."""
        return {env_name(f.name): getattr(self, f.name) for f in fields(SecuritySettings)
                if f.metadata.get("secret") and getattr(self, f.name) is not None}
