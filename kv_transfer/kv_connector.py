"""The KV connector: an engine's paged KV pool as a transfer-engine segment.

Both roles share it. The prefill side pushes pages with `KVPusher` (kv_push.py); the decode side
reserves blocks in its engine and waits on a `KVReceipt` until every layer of every block has
landed and the final note (with the first sampled token) has arrived.

Notes travel as batch notifications tagged `kv/<request id>`: one per layer batch, then a final
one sent only after every layer batch succeeded (or carrying the error that stopped them).

Tensor-parallel workers (engine.parallel) have a connector per rank, each over its rank's pool. Every prefill rank
pushes the KV heads it holds straight into the decode ranks that hold them (kv_layout.routes), tagged
`kv/<request id>/p<rank>` for prefill ranks past 0; the decode rank 0 collects every route's notes (a prefill rank
relays to it the notes of its batches into other decode ranks once they are done) and the final one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from engine.remote_kv import NOT_NEEDED
from kv_transfer.datatypes import Notification, Ranges
from kv_transfer.errors import HandshakeError, TransferError
from kv_transfer.grants import GrantKey
from kv_transfer.kv_layout import KVLayout, Route, block_ranges, head_ranges, routes
from kv_transfer.notifications import Subscription
from kv_transfer.transfer_engine import RemoteSegment, TransferEngine


def kv_tag(request_id: str, source_rank: int = 0) -> str:
    """The tag of a push's batches and notes from prefill rank `source_rank`."""
    return f"kv/{request_id}" if source_rank == 0 else f"kv/{request_id}/p{source_rank}"


def rank_name(name: str, rank: int) -> str:
    """A tensor-parallel rank's transfer engine id or KV segment name, from rank 0's."""
    return name if rank == 0 else f"{name}.r{rank}"


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
    route: int = 0  # between tensor-parallel groups: the index in kv_layout.routes of the heads these pages hold

    def encode(self) -> bytes:
        body = asdict(self)
        if not self.route:  # (as notes were before routes: a single-rank peer of an older build reads them)
            del body["route"]
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, raw: bytes) -> KVPushNote:
        body = json.loads(raw)
        body["layers"] = tuple(body["layers"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


@dataclass(frozen=True)
class PeerKV:
    """A peer engine's KV segment after a successful handshake."""

    segment: RemoteSegment
    layout: KVLayout


@dataclass(frozen=True)
class RoutedPeer:
    """Prefill side: where this rank's share of a request's KV goes. `first`: the decode group's rank 0 (which
    collects the notes); `dests`: per route index this rank sends (kv_layout.routes), the route and the decode
    rank's segment."""

    first: PeerKV
    dests: tuple[tuple[int, Route, PeerKV], ...]


class KVConnector:
    def __init__(self, transfer: TransferEngine, pool: KVCachePool, model: ModelConfig, segment_name: str,
                 tp_size: int = 1, tp_rank: int = 0, weights: str = "", groups: KVGroups | None = None,
                 group_heads: tuple[tuple[int, int], ...] = ()) -> None:
        """`weights`: the engine's weights fingerprint (LoadedEngineParts.weights_fingerprint); a peer
        whose differs is refused at the handshake. `groups`: how the model's layers share the pool
        (LoadedEngineParts.kv_groups; by default a pool layer per model layer). A rank of a tensor-parallel
        group: `model` is the whole model's config, `group_heads` every rank's KV heads (engine.parallel.shard)."""
        self.transfer = transfer
        self.pool = pool
        self.segment_name = segment_name
        self.groups = groups or KVGroups.single(model.num_layers)
        if self.groups.group_size != pool.spec.num_layers:
            raise ValueError(f"a pool of {pool.spec.num_layers} layers does not hold groups of "
                             f"{self.groups.group_size} (engine.kv_groups)")
        self.layout = KVLayout.of_pool(pool, model, tp_size, tp_rank, weights, self.groups, group_heads)
        # decode rank 0 of a group: has the other ranks grant their pages to a push's senders
        # (worker_runtime.tp_kv_rank); (request id, [(source rank, its engine, its tag)], blocks, routes) -> what
        # ends the grants
        self.rank_grants: Callable[[str, list[tuple[int, str, str]], list[int], tuple[Route, ...]],
                                   Awaitable[Callable[[], object]]] | None = None
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

    async def connect_routes(self, decode_segment: str) -> RoutedPeer:
        """Prefill side: the decode group's rank 0 (its segment `decode_segment`) and the decode ranks this rank
        sends to, each handshaken."""
        first = await self.connect(decode_segment)
        dests = tuple([(index, route, await self.connect(rank_name(decode_segment, route.dest)))
                       for index, route in enumerate(routes(self.layout, first.layout))
                       if route.source == self.layout.tp_rank])
        return RoutedPeer(first, dests)

    def route_ranges(self, dest: PeerKV, route: Route, layers: list[int], local_blocks: list[int],
                     remote_blocks: list[int]) -> Ranges:
        return head_ranges(self.layout, dest.layout, route.first_head, route.num_heads, layers, local_blocks,
                           remote_blocks)

    async def check_peer(self, peer_segment: str) -> KVLayout:
        """Decode side, before granting a pusher any page: raise HandshakeError when the layout its KV
        segment publishes differs from ours (other weights, dtype, block size...), so a peer that skips
        its own check still cannot write foreign KV here. Read every time (one store get: a worker
        restarted under the same id may publish another layout); a layout once accepted is not parsed
        again."""
        raw = await self._published_raw(peer_segment)
        layout = self._parsed(peer_segment, raw)
        if self._accepted.get(peer_segment) != raw:
            self.layout.check_compatible(layout)
            self._accepted[peer_segment] = raw
        return layout

    def grant_blocks(self, peer_engine: str, tag: str, blocks: list[int]) -> list[GrantKey]:
        """Let `peer_engine` write every pool layer of `blocks` (none of a NOT_NEEDED entry) in batches tagged `tag`."""
        held = [b for b in blocks if b != NOT_NEEDED]
        pages = block_ranges(self.layout, self.layout, range(self.layout.num_layers), held, held)
        return self.transfer.grant(self.segment_name, peer_engine, tag, pages.local_offsets, pages.lengths)

    def expect(self, request_id: str, peer_engine: str, blocks: list[int],
               peer_layout: KVLayout | None = None, ranks_granted: Callable[[], object] | None = None) -> KVReceipt:
        """Decode side: grant `peer_engine` the pages of `blocks` (every pool layer; none for a NOT_NEEDED entry) for
        `request_id`'s push and start collecting its notes (call before asking for the push). In a hybrid layout
        `blocks` is every group's list in turn (engine.remote_kv.RemoteKV.reserve). Closing the receipt revokes
        the grant: a late write of an abandoned attempt is refused. Between tensor-parallel groups (`peer_layout`:
        the prefill group's rank 0's, `check_peer`) every sender writing this rank is granted it, the other ranks'
        grants are made (`expect_routes`) and ended by `ranks_granted`, and the receipt waits for every route."""
        found = routes(peer_layout or self.layout, self.layout)  # (no layout given: a peer laid out as we are)
        if ranks_granted is None and any(route.dest != 0 for route in found):
            raise HandshakeError("the prefill group routes KV into ranks of ours that were not granted it")
        senders = sorted({route.source for route in found})
        grants: list[GrantKey] = []
        subscriptions: list[Subscription] = []

        def close() -> None:
            self.transfer.revoke(grants)
            if ranks_granted is not None:
                ranks_granted()

        try:
            for source in senders:
                engine, tag = rank_name(peer_engine, source), kv_tag(request_id, source)
                if any(route.source == source and route.dest == 0 for route in found):
                    grants += self.grant_blocks(engine, tag, blocks)
                subscriptions.append(self.transfer.subscribe(tag, engine))
        except BaseException:
            for sub in subscriptions:
                sub.close()
            close()
            raise
        receipt = KVReceipt(subscriptions, self.layout.num_layers, len(blocks), len(found), on_close=close)
        receipt.landed[:, :, [i for i, b in enumerate(blocks) if b == NOT_NEEDED]] = True  # nothing comes for them
        per_group = len(blocks) // self.groups.num_groups
        for group in range(self.groups.num_groups):  # nor for the slots of a group no layer fills
            receipt.landed[np.ix_(range(len(found)), self.groups.padded_slots(group),
                                  range(group * per_group, (group + 1) * per_group))] = True
        return receipt

    async def expect_routes(self, request_id: str, peer_engine: str, blocks: list[int],
                            peer_layout: KVLayout) -> KVReceipt:
        """`expect` from a prefill group whatever the degrees: where its routes write our other ranks, those ranks
        grant their pages first (`rank_grants`, worker_runtime.tp_kv_rank)."""
        found = routes(peer_layout, self.layout)
        ended: Callable[[], object] | None = None
        if any(route.dest != 0 for route in found):
            if self.rank_grants is None:
                raise HandshakeError("the prefill group routes KV into ranks of ours that no one grants")
            senders = [(s, rank_name(peer_engine, s), kv_tag(request_id, s)) for s in sorted({r.source for r in found})]
            ended = await self.rank_grants(request_id, senders, blocks, found)
        try:
            return self.expect(request_id, peer_engine, blocks, peer_layout, ended)
        except BaseException:
            if ended is not None:
                ended()
            raise


class KVReceipt:
    """Tracks which (route, layer, block) pages of one request have landed (one route but between tensor-parallel
    groups: kv_layout.routes). Complete only when the final note arrived and every route's every layer of every
    block was covered by a successful batch. Notes come through one subscription per sending rank."""

    def __init__(self, subscriptions: list[Subscription], num_layers: int, num_blocks: int, num_routes: int = 1,
                 on_close: Callable[[], object] = lambda: None) -> None:
        self._subs = subscriptions
        self._on_close = on_close
        self._waits: dict[int, asyncio.Task[Notification]] = {}  # per subscription, its get in flight
        self.landed = np.zeros((num_routes, num_layers, num_blocks), dtype=bool)
        self.final: KVPushNote | None = None
        self._closed = False

    @property
    def complete(self) -> bool:
        return self.final is not None and bool(self.landed.all())

    def completed_layers(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.landed.all(axis=(0, 2)))]

    def _absorb(self, notification: Notification) -> None:
        note = KVPushNote.decode(notification.message)
        if not notification.ok or note.error is not None:
            raise TransferError(f"KV push of {note.request_id!r} from {notification.peer} failed: "
                                f"{notification.error or note.error}")
        if note.final:
            self.final = note
            return
        if not 0 <= note.route < self.landed.shape[0]:
            raise TransferError(f"a KV note of {note.request_id!r} from {notification.peer} names route {note.route}, "
                                f"of {self.landed.shape[0]}")
        self.landed[note.route, list(note.layers), note.block_start:note.block_end] = True

    async def _next(self, timeout_s: float) -> Notification:
        """The next note from any sender (a sender lost or late raises)."""
        for i, sub in enumerate(self._subs):
            if i not in self._waits:
                self._waits[i] = asyncio.ensure_future(sub.get_async(timeout_s))
        done, _ = await asyncio.wait(self._waits.values(), return_when=asyncio.FIRST_COMPLETED)
        index = next(i for i, task in self._waits.items() if task in done)
        return self._waits.pop(index).result()

    async def wait(self, timeout_s: float) -> int:
        """Until complete; returns the first sampled token. Raises TransferError (PeerLostError,
        TransferTimeoutError, or the sender's reported failure) otherwise."""
        try:
            while not self.complete:
                self._absorb(await self._next(timeout_s))
        finally:
            self.close()
        assert self.final is not None
        if self.final.first_token_id is None:
            raise TransferError("the final KV note carries no first token")
        return self.final.first_token_id

    def close(self) -> None:
        """Idempotent: stop collecting notes and end the grants."""
        for task in self._waits.values():
            task.cancel()
        self._waits.clear()
        for sub in self._subs:
            sub.close()
        if not self._closed:
            self._closed = True
            self._on_close()
