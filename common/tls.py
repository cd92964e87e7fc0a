"""The cluster's TLS policy, in one place.

A component is given three PEM files or none: the cluster CA, its own certificate and its key
(one certificate serves as server and as client certificate, so it must allow both uses). The
cluster is all-TLS by configuration: every component of it is started with the files (`tandem up`
passes them to every child), and a component with them speaks only TLS.

- Workers' gRPC (Worker, health, reflection) takes only mutual TLS: a caller must present a
  certificate the cluster CA signed, so only cluster members (routers, decode workers) can call.
- The router's public gRPC and OpenAI HTTP front are server-authenticated TLS only: clients check
  the router against the CA, and authenticate with API keys (cluster.api_keys), not certificates.
- A worker records `tls` in its etcd record; a router whose setting differs ignores it with a
  warning instead of failing each call at the handshake.

The workers' KV peer links take the same files and are mutual TLS too (kv_transfer.link_tls):
control connections, the TCP backend's pages, the NCCL backend's headers; shared memory, NIXL/UCX
and the NCCL payload are outside them. Workers' Prometheus
/metrics stay plaintext HTTP. etcd's client TLS
is configured apart (common.etcd.access). Files are read at start: rotating a certificate
takes a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from common.files import read_file
from common.wire import MAX_WORKER_MESSAGE_BYTES


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths of one component; every file exists and is readable."""

    ca: str
    cert: str
    key: str

    def __post_init__(self) -> None:
        read_file(self.ca, "TLS CA")
        read_file(self.cert, "TLS certificate")
        read_file(self.key, "TLS key")

    @staticmethod
    def optional(ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
        """All three (TLS on), or none (TLS off); anything between is a ValueError."""
        given = [p is not None for p in (ca, cert, key)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("TLS needs the CA, the certificate and the key together (tls_ca, tls_cert, tls_key)")
        return TlsFiles(ca, cert, key)  # type: ignore[arg-type]

    def pem_bytes(self) -> tuple[bytes, bytes, bytes]:
        return read_file(self.ca, "TLS CA"), read_file(self.cert, "TLS certificate"), read_file(self.key, "TLS key")


def server_credentials(files: TlsFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    ca, cert, key = files.pem_bytes()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca if require_client_cert else None,
                                       require_client_auth=require_client_cert)


def bind_port(server: grpc.aio.Server, address: str, tls: TlsFiles | None, require_client_cert: bool = True) -> int:
    """Bind `address` (the port bound is returned): TLS with the cluster's files when given (mutual by
    default: a member's service), plaintext otherwise."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls, require_client_cert))


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """A cluster member's client side: verifies the server against the CA, presents its own certificate."""
    ca, cert, key = files.pem_bytes()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel between two components: it takes replies as large as a worker's server takes
    requests (a long prompt's logprobs come in one message)."""
    options = [("grpc.max_receive_message_length", MAX_WORKER_MESSAGE_BYTES)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The router's HTTPS: its certificate; clients are not asked for one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return context


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """HTTPS to the router (the launcher's health poll): the server checked against the CA."""
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    return context
