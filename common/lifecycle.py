"""How a server (a worker or the router) meets whatever runs it: when to drain, and whom to tell it
is ready. A process (`tandem worker`, `tandem router`) drains on SIGTERM / SIGINT and prints its
READY line on stdout (cluster/launcher.py reads it); a host running the server in-process (a Ray
actor, cluster/ray_backend) sets `stop` itself and takes the READY fields through `announce`."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

Announce = Callable[[list[str]], None]  # the READY fields: worker id, address, metrics port / "router", ...


def print_ready(fields: list[str]) -> None:
    print("READY", *fields, flush=True)


@dataclass
class Lifecycle:
    announce: Announce = print_ready
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set once: drain, then return from serve
    signals: bool = True  # SIGTERM / SIGINT set `stop` (only where serve runs on the main thread)

    def arm(self) -> None:
        """Called by serve on its event loop once it serves."""
        if self.signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
