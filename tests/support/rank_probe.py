"""A RankPlugin for tests of the rank's command path (engine.tp_follower): `"hold"` is answered only after the rank
has run two more steps, with the number it ran meanwhile; `"fail"` fails after one; `"threads"` is answered with the
rank's torch threads; anything else is echoed."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch


class Probe:
    kv_storage = None

    def __init__(self) -> None:
        self.steps = 0
        self._pending: list[tuple[Future[Any], int, int, bool]] = []  # (reply, steps at start, steps to run, fails)

    def attach(self, parts: Any) -> None:
        pass

    def handle(self, body: Any) -> Any:
        if body == "threads":
            return torch.get_num_threads()
        if body in ("hold", "fail"):
            reply: Future[Any] = Future()
            self._pending.append((reply, self.steps, 2 if body == "hold" else 1, body == "fail"))
            return reply
        return body

    def begin_step(self, step: Any) -> None:
        return None

    def end_step(self) -> None:
        self.steps += 1
        for entry in list(self._pending):
            reply, at, wanted, fails = entry
            if self.steps - at >= wanted:
                self._pending.remove(entry)
                if fails:
                    reply.set_exception(RuntimeError("failed on purpose"))
                else:
                    reply.set_result(self.steps - at)

    def close(self) -> None:
        pass


def start(rank: int, settings: Any) -> Probe:
    return Probe()
