"""Mutual TLS on peer links: with the cluster's TLS material (the `--tls-*` files every component
is given), every peer-link connection is TLS 1.3 both ways: control connections, the TCP backend's
connections (headers and KV pages) and the NCCL backend's (headers; its payload travels in its
process group, outside). Shared memory and NIXL/UCX do not use these links. Each side takes only a
peer whose certificate the cluster CA signed. Membership is what a certificate proves here, not
an address: the caller does not match the target's certificate against the address it dialled (a
Kubernetes pod's IP is in no certificate, and every member may share one), so which member a
caller is rests on the engine id it names (kv_transfer.grants), and which member answers at an
address rests on etcd's records. TLS authenticates, encrypts and orders every byte on the link,
so the frame and payload tags of kv_transfer.channel are not added on top; a cluster secret, when
also set, still runs its challenge-response inside the TLS session (kv_transfer.link_auth).

A caller that fails the handshake (no certificate, one from another CA, plaintext, or one that
stalls or drops mid-handshake) is refused and counted in `tandem_kv_link_refused_total{reason="tls"}`;
a changed, dropped or replayed record fails TLS's own check and ends the connection. In TLS 1.3 the
caller finishes its handshake before the target has checked the caller's certificate: without a
secret, a refused caller learns it at its first read (EOF), not when it opens the link.

Targets send no session tickets: after the handshake nothing arrives unasked but a fatal alert
just before a close, so a waiting record on a data connection is the peer's frame or its end (the
NCCL backend's peer watch peeks for one; a deadline bounds what it misses).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class LinkTls:
    """PEM paths: the cluster CA, this engine's certificate (serverAuth and clientAuth) and its key."""

    ca: str
    cert: str
    key: str

    @cached_property
    def server_context(self) -> ssl.SSLContext:
        context = self._context(ssl.PROTOCOL_TLS_SERVER)
        context.num_tickets = 0  # see the module note
        return context

    @cached_property
    def client_context(self) -> ssl.SSLContext:
        context = self._context(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # see the module note: the chain is checked, not the address
        return context

    def _context(self, protocol: int) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        return context
