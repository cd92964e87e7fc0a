"""The KV connector: an engine's paged KV pool as a transfer-engine segment.

Both roles share it. The prefill side pushes pages with `KVPusher` (kv_push.py); the decode side
reserves blocks in its engine and waits on a `KVReceipt` until every layer of every block has
landed and the final note (with the first sampled token) has arrived.

Notes travel as batch notifications tagged `kv/<request id>`: one per layer batch, then a final
one sent only after every layer batch succeeded (or carrying the error that stopped them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from engine.remote_kv import NOT_NEEDED
from kv_transfer.datatypes import Notification, Ranges
from kv_transfer.errors import HandshakeError, TransferError
from kv_transfer.kv_layout import KVLayout, block_ranges
from kv_transfer.notifications import Subscription
from kv_transfer.transfer_engine import RemoteSegment, TransferEngine


def kv_tag(request_id: str) -> str:
    return f"kv/{request_id}"


def _layout_key(prefix: str, segment: str) -> str:
    return f"{prefix.rstrip('/')}/kv_layouts/{segment}"


@dataclass(frozen=True)
class KVPushNote:
    """What a batch of pushed KV pages means: layers × block indexes [block_start, block_end) of
    the request's reserved block list. `final` closes the push."""

    request_id: str
    layers: tuple[int, ...]
    block_start: int
    block_end: int
    final: bool = False
    first_token_id: int | None = None
    error: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> KVPushNote:
        body = json.loads(raw)
        body["layers"] = tuple(body["layers"])
        return cls(**body)


@dataclass(frozen=True)
class PeerKV:
    """A peer engine's KV segment after a successful handshake."""

    segment: RemoteSegment
    layout: KVLayout


class KVConnector:
    def __init__(self, transfer: TransferEngine, pool: KVCachePool, model: ModelConfig, segment_name: str,
                 tp_size: int = 1, tp_rank: int = 0, weights: str = "", groups: KVGroups | None = None) -> None:
        """`weights`: the engine's weights fingerprint (LoadedEngineParts.weights_fingerprint); a peer
        whose differs is refused at the handshake. `groups`: how the model's layers share the pool
        (LoadedEngineParts.kv_groups; by default a pool layer per model layer)."""
        self.transfer = transfer
        self.pool = pool
        self.segment_name = segment_name
        self.groups = groups or KVGroups.single(model.num_layers)
        if self.groups.group_size != pool.spec.num_layers:
            raise ValueError(f"a pool of {pool.spec.num_layers} layers does not hold groups of "
                             f"{self.groups.group_size} (engine.kv_groups)")
        self.layout = KVLayout.of_pool(pool, model, tp_size, tp_rank, weights, self.groups)
        self._peers: dict[str, PeerKV] = {}
        self._accepted: dict[str, bytes] = {}  # per segment, the published layout that last matched ours
        self._connecting: dict[str, asyncio.Lock] = {}

    async def publish(self) -> None:
        """Register the pool as a segment and publish its layout (call once, before peers connect)."""
        await self.transfer.register_segment(self.segment_name, self.pool.tensor, guarded=True)
        await self.transfer.store.put(_layout_key(self.transfer.config.metadata_prefix, self.segment_name),
                                      self.layout.to_json())

    async def connect(self, peer_segment: str) -> PeerKV:
        """Open a peer's KV segment and compare layouts; raises HandshakeError before any byte moves."""
        known = self._peers.get(peer_segment)
        if known is not None and self.transfer.link.is_connected(known.segment.owner):
            return known
        lock = self._connecting.setdefault(peer_segment, asyncio.Lock())
        async with lock:  # many requests from a new peer arrive at once: connect once
            known = self._peers.get(peer_segment)
            if known is not None and self.transfer.link.is_connected(known.segment.owner):
                return known
            return await self._handshake(peer_segment)

    async def _handshake(self, peer_segment: str) -> PeerKV:
        remote = await self.transfer.open_segment(peer_segment)
        peer = PeerKV(remote, await self._published_layout(peer_segment))
        self.layout.check_compatible(peer.layout)
        self._peers[peer_segment] = peer
        return peer

    async def _published_raw(self, peer_segment: str) -> bytes:
        raw = await self.transfer.store.get(_layout_key(self.transfer.config.metadata_prefix, peer_segment))
        if raw is None:
            raise HandshakeError(f"segment {peer_segment!r} publishes no KV layout: it is not a KV pool")
        return raw

    @staticmethod
    def _parsed(peer_segment: str, raw: bytes) -> KVLayout:
        try:
            return KVLayout.from_json(raw)
        except (ValueError, TypeError) as e:  # not a layout this version can read: refused like a mismatch
            raise HandshakeError(f"segment {peer_segment!r} publishes an unreadable KV layout: {e}") from e

    async def _published_layout(self, peer_segment: str) -> KVLayout:
        return self._parsed(peer_segment, await self._published_raw(peer_segment))

    async def check_peer(self, peer_segment: str) -> None:
        """Decode side, before granting a pusher any page: raise HandshakeError when the layout its KV
        segment publishes differs from ours (other weights, dtype, block size...), so a peer that skips
        its own check still cannot write foreign KV here. Read every time (one store get: a worker
        restarted under the same id may publish another layout); a layout once accepted is not parsed
        again."""
        raw = await self._published_raw(peer_segment)
        if self._accepted.get(peer_segment) != raw:
            self.layout.check_compatible(self._parsed(peer_segment, raw))
            self._accepted[peer_segment] = raw

    def ranges(self, peer: PeerKV, layers: list[int], local_blocks: list[int], remote_blocks: list[int]) -> Ranges:
        return block_ranges(self.layout, peer.layout, layers, local_blocks, remote_blocks)

    def expect(self, request_id: str, peer_engine: str, blocks: list[int]) -> KVReceipt:
        """Decode side: grant `peer_engine` the pages of `blocks` (every pool layer; none for a NOT_NEEDED entry) for
        `request_id`'s push and start collecting its notes (call before asking for the push). In a hybrid layout
        `blocks` is every group's list in turn (engine.remote_kv.RemoteKV.reserve). Closing the receipt revokes
        the grant: a late write of an abandoned attempt is refused."""
        held = [b for b in blocks if b != NOT_NEEDED]
        pages = block_ranges(self.layout, self.layout, range(self.layout.num_layers), held, held)
        tag = kv_tag(request_id)
        grant = self.transfer.grant(self.segment_name, peer_engine, tag, pages.local_offsets, pages.lengths)
        try:
            subscription = self.transfer.subscribe(tag, peer_engine)
        except BaseException:
            self.transfer.revoke(grant)
            raise
        receipt = KVReceipt(subscription, self.layout.num_layers, len(blocks),
                            on_close=lambda: self.transfer.revoke(grant))
        receipt.landed[:, [i for i, b in enumerate(blocks) if b == NOT_NEEDED]] = True  # nothing comes for them
        per_group = len(blocks) // self.groups.num_groups
        for group in range(self.groups.num_groups):  # nor for the slots of a group no layer fills
            receipt.landed[np.ix_(self.groups.padded_slots(group), range(group * per_group, (group + 1) * per_group))] \
                = True
        return receipt


class KVReceipt:
    """Tracks which (layer, block) pages of one request have landed. Complete only when the final
    note arrived and every layer of every block was covered by a successful batch."""

    def __init__(self, subscription: Subscription, num_layers: int, num_blocks: int,
                 on_close: Callable[[], None] = lambda: None) -> None:
        self._sub = subscription
        self._on_close = on_close
        self.landed = np.zeros((num_layers, num_blocks), dtype=bool)
        self.final: KVPushNote | None = None

    @property
    def complete(self) -> bool:
        return self.final is not None and bool(self.landed.all())

    def completed_layers(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.landed.all(axis=1))]

    def _absorb(self, notification: Notification) -> None:
        note = KVPushNote.decode(notification.message)
        if not notification.ok or note.error is not None:
            raise TransferError(f"KV push of {note.request_id!r} from {notification.peer} failed: "
                                f"{notification.error or note.error}")
        if note.final:
            self.final = note
        else:
            self.landed[list(note.layers), note.block_start:note.block_end] = True

    async def wait(self, timeout_s: float) -> int:
        """Until complete; returns the first sampled token. Raises TransferError (PeerLostError,
        TransferTimeoutError, or the sender's reported failure) otherwise."""
        try:
            while not self.complete:
                self._absorb(await self._sub.get_async(timeout_s))
        finally:
            self.close()
        assert self.final is not None
        if self.final.first_token_id is None:
            raise TransferError("the final KV note carries no first token")
        return self.final.first_token_id

    def close(self) -> None:
        """Idempotent: stop collecting notes and end the grant."""
        self._sub.close()
        self._on_close()
