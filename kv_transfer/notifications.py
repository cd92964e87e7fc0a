"""Where notifications for this engine's segments land, sorted by tag, until someone waits on them."""

from __future__ import annotations

import threading
from collections import OrderedDict

from kv_transfer.datatypes import Notification
from kv_transfer.errors import PeerLostError
from kv_transfer.waitable import WaitableQueue

_MAX_UNCLAIMED_TAGS = 4096  # notifications nobody subscribed to are dropped oldest-first past this


class Subscription:
    """Notifications carrying one tag. If bound to a peer, losing that peer fails the waits."""

    def __init__(self, inbox: NotificationInbox, tag: str, peer: str | None) -> None:
        self.tag = tag
        self.peer = peer
        self.queue: WaitableQueue[Notification] = WaitableQueue()
        self._inbox = inbox

    def get(self, timeout: float) -> Notification:
        return self.queue.get(timeout, f"notification {self.tag!r}")

    async def get_async(self, timeout: float) -> Notification:
        return await self.queue.get_async(timeout, f"notification {self.tag!r}")

    def close(self) -> None:
        self._inbox.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NotificationInbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, Subscription] = {}
        self._unclaimed: OrderedDict[str, list[Notification]] = OrderedDict()
        self.num_dropped = 0

    def subscribe(self, tag: str, peer: str | None = None) -> Subscription:
        sub = Subscription(self, tag, peer)
        with self._lock:
            if tag in self._subs:
                raise ValueError(f"tag {tag!r} already has a subscriber")
            self._subs[tag] = sub
            early = self._unclaimed.pop(tag, [])
        for n in early:
            if peer is not None and n.peer != peer:  # not the sender it waits for, as in `deliver`
                self.num_dropped += 1
                continue
            sub.queue.put(n)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if self._subs.get(sub.tag) is sub:
                del self._subs[sub.tag]

    def deliver(self, notification: Notification) -> None:
        with self._lock:
            sub = self._subs.get(notification.tag)
            if sub is None:
                self._unclaimed.setdefault(notification.tag, []).append(notification)
                self._unclaimed.move_to_end(notification.tag)
                while len(self._unclaimed) > _MAX_UNCLAIMED_TAGS:
                    self._unclaimed.popitem(last=False)
                    self.num_dropped += 1
                return
            if sub.peer is not None and notification.peer != sub.peer:  # not the sender it waits for
                self.num_dropped += 1
                return
        sub.queue.put(notification)

    def peer_lost(self, peer: str, reason: str) -> None:
        with self._lock:
            subs = [s for s in self._subs.values() if s.peer == peer]
        for sub in subs:
            sub.queue.fail(PeerLostError(f"peer {peer} went away while {sub.tag!r} was awaited: {reason}"))
