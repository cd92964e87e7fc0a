"""Authenticated peer links: with a cluster secret, every connection to an engine's peer link (control
and data) starts with a mutual challenge-response, so only processes that hold the secret can notify
an engine or move bytes into (or out of) its segments. Reading a segment descriptor from etcd is no
longer enough to write into a decode worker's KV pool.

    caller → Hello(engine, purpose, nonce_c)
    target → Challenge(nonce_s, HMAC(secret, "target" | nonce_c | nonce_s | engine | purpose))
    caller → Proof(HMAC(secret, "caller" | nonce_c | nonce_s | engine | purpose))

Both nonces are fresh random 128-bit values, so a recorded handshake is worthless on a new
connection (no replay), and each side proves the secret to the other. A target refuses (closes) a
connection without a valid proof and counts it in `tandem_kv_link_refused_total`. The handshake
costs one round trip per connection, and connections are kept and reused, so transfers pay nothing.

After the handshake every frame and byte string on the connection (and every payload, unless both
sides chose frames only: `--kv-link-integrity frames`) carries a tag under keys derived from both
nonces (kv_transfer.channel), so bytes changed, reordered or replayed on the path are refused too
(`bad_tag`). What a member may write into a guarded segment is limited by grants
(kv_transfer.grants).

With the cluster's TLS files the links are mutual TLS instead (kv_transfer.link_tls), and a secret,
if also set, is proved inside the TLS session.

Not covered: NIXL/UCX connects through the agent metadata published in etcd, outside these links,
so it trusts its fabric; the NCCL/Gloo payload travels in its process group, outside these links
(its headers are sealed and granted); the same-host shared-memory backend is guarded by the file
permissions of /dev/shm. Without TLS, payloads are authenticated, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from prometheus_client import Counter

NONCE_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0  # for each handshake frame, the Hello included
HANDSHAKE_MAX_FRAME = 4096  # a handshake frame is small: a larger one is refused unread
MIN_SECRET_BYTES = 16

LINK_REFUSED = Counter("tandem_kv_link_refused", "Peer-link connections refused by this engine, by reason "
                       "(no_proof: the caller did not authenticate; bad_proof: wrong secret or a replayed handshake; "
                       "bad_tag: a unit on an authenticated link failed its integrity tag; tls: the caller's TLS "
                       "handshake failed: no or a foreign certificate, plaintext, a stall or a drop)", ["reason"])
LINKS_OPENED = Counter("tandem_kv_links_opened", "Peer-link connections this engine opened or admitted, by what "
                       "protects them (tls: mutual TLS; sealed: secret, every byte tagged; frames: secret, frames "
                       "tagged; open: nothing)", ["protection"])


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def proof(secret: bytes, role: str, caller_nonce: str, target_nonce: str, engine: str, purpose: str) -> str:
    """The HMAC-SHA256 that `role` ("target" or "caller") sends for this handshake (over a JSON
    array of the fields: unambiguous whatever they hold)."""
    message = json.dumps([role, caller_nonce, target_nonce, engine, purpose]).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, got: str, role: str, caller_nonce: str, target_nonce: str, engine: str,
           purpose: str) -> bool:
    return hmac.compare_digest(got.encode(), proof(secret, role, caller_nonce, target_nonce, engine,
                                                   purpose).encode())


def check_secret(secret: bytes | None) -> None:
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the KV link secret must be at least {MIN_SECRET_BYTES} bytes")
