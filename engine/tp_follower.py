"""A tensor-parallel rank other than 0: `python -m engine.tp_follower`, started by engine.parallel.leader.

It reads a FollowerStart from stdin, joins the group, builds its shard (weights and a KV pool of its KV heads;
and its shard of a self-int4 draft) and says so in the group's store, then runs every FollowerStep rank 0 sends
until its stdin closes (rank 0 ended or closed the group). It schedules and samples nothing."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from concurrent.futures import Future
from typing import Any

import torch

from common.settings import configure_logging
from engine.config import SELF_INT4_DRAFT
from engine.draft_model import load_self_int4
from engine.kv_offload import offload_capacity
from engine.kv_offload_mirror import TierMirror
from engine.loader.engine_parts import ShardRank, build_engine_parts
from engine.model_runner import ModelRunner
from engine.parallel.group import TPGroup, open_store
from engine.parallel.leader import READY_KEY, REPLY_KEY
from engine.parallel.protocol import FollowerStart, FollowerStep, RankCommand, RankServices, read_frame
from engine.parallel.shard import TPShard
from engine.platform import detect_platform

log = logging.getLogger(__name__)


def main() -> int:
    configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C at a terminal is rank 0's to act on: it ends the group
    stdin = sys.stdin.buffer
    start = read_frame(stdin)
    if not isinstance(start, FollowerStart):
        log.error("expected a FollowerStart on stdin, got %r", type(start).__name__)
        return 2
    store = open_store(start.rank, start.size, start.store_port)
    group = TPGroup(store, start.rank, start.size, detect_platform(start.config.device).device,
                    parent_pid=os.getppid())  # (rank 0 started this process)
    key = READY_KEY.format(rank=start.rank)
    services: RankServices | None = None
    try:
        if start.plugin is not None:  # (a module named by the layer above, which the engine does not import)
            services = importlib.import_module(start.plugin.module).start(start.rank, start.plugin.settings)
        shard_rank = ShardRank(TPShard(start.rank, start.size), group)
        parts = build_engine_parts(start.config, None if services is None else services.kv_storage,
                                   context_of=start.context_of, shard_rank=shard_rank)
        spec = start.config.speculative  # a self-int4 draft is split as its target: this rank's shard of it
        draft = (load_self_int4(start.config, parts, shard_rank)[1]
                 if spec is not None and spec.method == "draft" and spec.draft_model == SELF_INT4_DRAFT else None)
        if services is not None:
            services.attach(parts)
        tier = None if not start.config.kv_offload_bytes else TierMirror(
            parts.pool, offload_capacity(start.config, parts.pool), start.config.kv_offload_dir)
    except Exception as exc:  # rank 0 reports it as the engine's load error
        traceback.print_exc()
        store.set(key, f"{type(exc).__name__}: {exc}")
        return 1
    store.set(key, "ok")
    runner = parts.runner
    assert isinstance(runner, ModelRunner)
    replies = Replies(store, start.rank)
    with torch.inference_mode():
        while (message := read_frame(stdin)) is not None:
            if isinstance(message, FollowerStep | RankCommand) and message.tier_copies:
                assert tier is not None, "rank 0 copies to and from a KV offload tier only where every rank has one"
                tier.apply(message.tier_copies)  # (before a command too: it may let peers write the blocks stored)
            if isinstance(message, FollowerStep) and message.draft:  # (no KV of a draft's is pushed)
                assert draft is not None, "rank 0 drafts with a self-int4 draft only where every rank has its shard"
                draft.follow(message)
            elif isinstance(message, FollowerStep):
                observer = None if services is None else services.begin_step(message)
                runner.follow(message, observer)
                if services is not None:
                    services.end_step()
            elif isinstance(message, RankCommand):
                _command(services, message, replies)
    if services is not None:
        services.close()
    if tier is not None:
        tier.close()
    return 0


class Replies:
    """Writes commands' replies to the group's store, from the step loop or from a thread that finished one."""

    def __init__(self, store: Any, rank: int) -> None:
        self._store, self._rank = store, rank
        self._lock = threading.Lock()

    def put(self, command: RankCommand, reply: tuple[str, Any]) -> None:
        if not command.wants_reply:
            return
        try:
            encoded = json.dumps(reply)
        except (TypeError, ValueError) as exc:  # a reply JSON cannot carry fails the command, not the rank
            encoded = json.dumps(["error", f"the reply could not be sent: {exc}"])
        with self._lock:
            self._store.set(REPLY_KEY.format(seq=command.seq, rank=self._rank), encoded)


def _command(services: RankServices | None, command: RankCommand, replies: Replies) -> None:
    """Run `command`; a Future it returns is answered when done, while later steps run."""
    if services is None:
        replies.put(command, ("error", "this rank runs no services"))
        return
    try:
        value = services.handle(command.body)
    except Exception as exc:  # the command fails, the rank goes on
        replies.put(command, _failure(command, exc))
        return
    if not isinstance(value, Future):
        replies.put(command, ("ok", value))
        return

    def answer(done: Future[Any]) -> None:
        try:
            reply: tuple[str, Any] = ("ok", done.result())
        except BaseException as exc:  # (a cancelled one too: rank 0 hears of it rather than waiting it out)
            reply = _failure(command, exc)
        replies.put(command, reply)

    value.add_done_callback(answer)


def _failure(command: RankCommand, exc: BaseException) -> tuple[str, Any]:
    log.error("command %s failed", type(command.body).__name__, exc_info=exc)
    return "error", f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # no interpreter teardown: the process group's and the plugin's native threads may still run, and destroying
    # them at exit aborts the process ("terminate called without an active exception"); everything is closed
    os._exit(code)
