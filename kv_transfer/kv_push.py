"""Prefill side: push each layer's freshly written pages to the decode engine's reserved blocks
while the next layer computes (an `engine.kv_hooks.KVStepHook`). A rank of a tensor-parallel prefill group
pushes the KV heads it holds to the decode ranks that hold them (kv_connector.RoutedPeer)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from engine.kv_hooks import LayerReady
from engine.outputs import RequestOutput
from engine.remote_kv import NOT_NEEDED
from engine.scheduler import SchedulerOutput
from kv_transfer.batch import BatchHandle, NotifySpec
from kv_transfer.datatypes import Ranges, TransferOp
from kv_transfer.errors import TransferError
from kv_transfer.kv_connector import KVConnector, KVPushNote, PeerKV, RoutedPeer, kv_tag
from kv_transfer.kv_layout import routes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushItem:
    """A sequence's part of a step, as the pusher sees it: its block tables (one per layer group) and the tokens
    whose KV the step writes, [start, end_token)."""

    request_id: str
    tables: Sequence[Sequence[int]]
    start: int
    end_token: int


@dataclass
class _Target:
    request_id: str
    peer: RoutedPeer
    remote_blocks: list[int]
    timeout_s: float
    next_block: int = 0  # blocks before this were pushed complete (the last partial one is re-pushed)
    error: str | None = None
    error_sent: bool = False  # a rank past 0 (which sends no final note) told the decode side of its error
    # this step's blocks, per group with any (engine.kv_groups): (group, start, end in remote_blocks, local ids,
    # remote ids)
    step_blocks: list[tuple[int, int, int, list[int], list[int]]] = field(default_factory=list)
    # this step's batches, each with its note when the decode group's rank 0 gets it only relayed
    handles: list[tuple[BatchHandle, KVPushNote | None]] = field(default_factory=list)
    bytes_to_rank: Counter[int] = field(default_factory=Counter)  # pushed, by the decode rank they went to


DEFAULT_MIN_BATCH_BYTES = 4 << 20


def should_flush(layer: int, num_layers: int, pending_bytes: int, min_batch_bytes: int) -> bool:
    """Layers are pushed in groups of at least `min_batch_bytes` (every batch costs a notification
    and a few hundred µs of overhead), and always at the last layer."""
    return layer == num_layers - 1 or pending_bytes >= min_batch_bytes


class KVPusher:
    """Attach with `engine.set_kv_hook(pusher)`; call `expect` before adding each request to push.

    As layers finish, their pages go out in groups of at least `min_batch_bytes` (0: one batch
    per layer): a WRITE per request per group, whose note names the layers and blocks it carries. In a
    hybrid layout (engine.kv_groups) a request's remote blocks are every group's in turn, and a batch's
    layers are pool layers (slots) of one group: a WRITE per request per group per layer group.
    """

    def __init__(self, connector: KVConnector, block_size: int,
                 min_batch_bytes: int = DEFAULT_MIN_BATCH_BYTES) -> None:
        self.connector = connector
        self.block_size = block_size
        self.min_batch_bytes = min_batch_bytes
        self._targets: dict[str, _Target] = {}
        self._active: list[_Target] = []
        self._pending_layers: list[int] = []
        self._pending_bytes = 0
        self._group_layer_bytes: list[int] = []  # per group: bytes of one of its layers' pages across the targets
        self.bytes_submitted = 0  # every page's bytes handed to the transfer engine, ever
        self._ended: dict[str, Counter[int]] = {}  # pushes ended by their first token, until forgotten: their bytes
        self._lock = threading.Lock()
        # batches whose layers' writes were still queued on the device: submitted by `_waiter` once they land
        self._waiter: ThreadPoolExecutor | None = None
        self._waiting: list[Future[None]] = []

    @property
    def source_rank(self) -> int:
        return self.connector.layout.tp_rank

    def expect(self, request_id: str, peer: PeerKV | RoutedPeer, remote_blocks: list[int],
               timeout_s: float = 30.0) -> None:
        """Push `request_id`'s KV into `remote_blocks` of `peer` (a single-rank peer, or this rank's routes into a
        tensor-parallel decode group: KVConnector.connect_routes)."""
        if isinstance(peer, PeerKV):  # a single-rank peer: every head this rank holds goes to its one pool
            found = routes(self.connector.layout, peer.layout)
            if any(route.dest != 0 for route in found):
                raise ValueError("a tensor-parallel decode group is reached through KVConnector.connect_routes")
            peer = RoutedPeer(peer, tuple((i, route, peer) for i, route in enumerate(found)
                                          if route.source == self.source_rank))
        routed = peer
        with self._lock:
            self._targets[request_id] = _Target(request_id, routed, list(remote_blocks), timeout_s)

    def forget(self, request_id: str) -> Counter[int]:
        """Stop pushing `request_id`; returns the bytes pushed for it, by the decode rank they went to."""
        with self._lock:
            target = self._targets.pop(request_id, None)
            ended = self._ended.pop(request_id, Counter())
        return ended if target is None else target.bytes_to_rank

    # -- KVStepHook -----------------------------------------------------------------------------------
    def begin_step(self, plan: SchedulerOutput) -> bool:
        return self.begin_items([PushItem(item.seq.request_id, item.seq.tables, item.start,
                                          item.start + item.num_tokens - len(item.draft_token_ids))
                                 for item in plan.scheduled])

    def begin_items(self, items: list[PushItem]) -> bool:
        """`begin_step` of a step given as its sequences' parts (a tensor-parallel rank past 0 sees no plan)."""
        self._active = []
        groups = self.connector.groups
        with self._lock:
            for item in items:
                target = self._targets.get(item.request_id)
                if target is None or target.error is not None:
                    continue
                target.step_blocks = []
                per_group = len(target.remote_blocks) // groups.num_groups
                end_token = item.end_token
                start = min(target.next_block, item.start // self.block_size)
                end = min(-(-end_token // self.block_size), per_group)
                if end <= start:
                    continue
                target.next_block = end_token // self.block_size
                for group, table in enumerate(item.tables):
                    first = group * per_group
                    # blocks the decode side does not need (a windowed group's behind the window there) are not sent
                    pairs = [(local, remote) for local, remote in zip(
                        table[start:end], target.remote_blocks[first + start:first + end], strict=True)
                        if remote != NOT_NEEDED]
                    if pairs:
                        target.step_blocks.append((group, first + start, first + end, [p[0] for p in pairs],
                                                   [p[1] for p in pairs]))
                if target.step_blocks:
                    self._active.append(target)
        self._pending_layers, self._pending_bytes = [], 0
        self._group_layer_bytes = [0] * groups.num_groups
        for target in self._active:
            for group, _, _, local, _ in target.step_blocks:
                self._group_layer_bytes[group] += len(local) * self.connector.layout.block_bytes
        return bool(self._active)

    def layer_written(self, layer: int, ready: LayerReady | None = None) -> None:
        """Model layer `layer`'s pages are written (`ready`: queued on the device, landed once it says so): pushed with
        the layers pending before it once they add up. With `ready` the push waits for the device on a thread of its
        own, so the engine's thread goes on queueing the forward (its device work lands in order: the last layer's
        `ready` covers the layers before it)."""
        groups = self.connector.groups
        self._pending_layers.append(layer)
        self._pending_bytes += self._group_layer_bytes[groups.placement[layer][0]]
        if not should_flush(layer, len(groups.placement), self._pending_bytes, self.min_batch_bytes):
            return
        slots = groups.layers_by_group(self._pending_layers)
        self._pending_layers, self._pending_bytes = [], 0
        if ready is None:
            self._submit_layers(slots)
            return
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="tandem-kv-push")  # (one: batches keep order)
        self._waiting.append(self._waiter.submit(self._submit_when_ready, ready, slots))

    def _submit_when_ready(self, ready: LayerReady, slots: dict[int, list[int]]) -> None:
        ready.synchronize()
        self._submit_layers(slots)

    def _submit_layers(self, slots: dict[int, list[int]]) -> None:
        """Submit the pages of `slots` (pool layers by layer group) of every active target."""
        for target in self._active:
            for group, start, end, local, remote in target.step_blocks:
                if group not in slots:
                    continue
                for index, route, dest in target.peer.dests:
                    note = KVPushNote(target.request_id, tuple(slots[group]), start, end, route=index)
                    try:
                        ranges = self.connector.route_ranges(dest, route, slots[group], local, remote)
                        handle = self._submit(target, dest, ranges, note)
                        target.handles.append((handle, note if route.dest != 0 else None))
                        self.bytes_submitted += ranges.total_bytes
                        target.bytes_to_rank[route.dest] += ranges.total_bytes
                    except TransferError as e:
                        target.error = target.error or str(e)

    def wait_for_save(self, plan: SchedulerOutput | None = None) -> None:
        waiting, self._waiting = self._waiting, []
        for submitted in waiting:  # every batch submitted first (the device work they waited on has landed)
            submitted.result()
        for target in self._active:
            relays: list[BatchHandle] = []
            for handle, relayed in target.handles:
                try:
                    handle.wait()
                    if relayed is not None:  # landed in another decode rank: its rank 0 learns it from us
                        relays.append(self._submit(target, target.peer.first, self._no_ranges(), relayed))
                except TransferError as e:
                    target.error = target.error or str(e)
                finally:
                    handle.release()
            for handle in relays:
                try:
                    handle.wait()
                except TransferError as e:
                    target.error = target.error or str(e)
                finally:
                    handle.release()
            target.handles.clear()
            target.step_blocks = []
            if target.error is not None and self.source_rank != 0 and not target.error_sent:
                target.error_sent = True  # (rank 0's final note carries its own error)
                self._send_note(target, KVPushNote(target.request_id, (), 0, 0, error=target.error))
        self._active = []

    def step_committed(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not (out.token_ids or out.finished):
                continue
            with self._lock:  # (one section: a `forget` between a look-up and a pop would leave `_ended` behind)
                target = self._targets.pop(out.request_id, None)
                if target is not None:
                    self._ended[out.request_id] = target.bytes_to_rank
            if target is None:
                continue
            first = out.token_ids[0] if out.token_ids else None
            error = target.error if first is not None else (target.error or "the prefill ended without a token")
            total = len(target.remote_blocks)
            note = KVPushNote(target.request_id, tuple(range(self.connector.layout.num_layers)), 0, total,
                              final=True, first_token_id=first, error=error)
            self._send_note(target, note)

    def _send_note(self, target: _Target, note: KVPushNote) -> None:
        """A note alone to the decode group's rank 0."""
        try:
            with self._submit(target, target.peer.first, self._no_ranges(), note) as handle:
                handle.wait()
        except TransferError as e:
            log.warning("could not deliver a KV note of %s: %s", note.request_id, e)

    @staticmethod
    def _no_ranges() -> Ranges:
        return Ranges(np.empty(0), np.empty(0), np.empty(0))

    def _submit(self, target: _Target, dest: PeerKV, ranges: Ranges, note: KVPushNote) -> BatchHandle:
        return self.connector.transfer.submit_ranges(
            TransferOp.WRITE, self.connector.segment_name, dest.segment.name, ranges,
            notify=NotifySpec(kv_tag(target.request_id, self.source_rank), note.encode()),
            timeout_s=target.timeout_s)
