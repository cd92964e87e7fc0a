"""The child side of PeerProcess: JSON commands on stdin, one JSON reply line each on stdout."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def command_loop(handle: Callable[[dict], Awaitable[dict]], errors: tuple[type[Exception], ...]) -> None:
    """Answer commands until stdin closes; an exception in `errors` becomes {"ok": false, "error": class}."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            reply(await handle(json.loads(line)))
        except errors as e:
            reply({"ok": False, "error": type(e).__name__, "message": str(e)})
