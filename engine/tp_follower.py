"""A tensor-parallel rank other than 0: `python -m engine.tp_follower`, started by engine.parallel.leader.

It reads a FollowerStart from stdin, joins the group, builds its shard (weights and a KV pool of its KV heads)
and says so in the group's store, then runs every FollowerStep rank 0 sends until its stdin closes (rank 0
ended or closed the group). It schedules and samples nothing."""

from __future__ import annotations

import logging
import sys
import traceback

import torch

from engine.loader.engine_parts import ShardRank, build_engine_parts
from engine.model_runner import ModelRunner
from engine.parallel.group import TPGroup, open_store
from engine.parallel.leader import READY_KEY
from engine.parallel.protocol import FollowerStart, FollowerStep, read_frame
from engine.parallel.shard import TPShard
from engine.platform import detect_platform

log = logging.getLogger(__name__)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tp-rank %(process)d %(levelname)s %(message)s")
    stdin = sys.stdin.buffer
    start = read_frame(stdin)
    if not isinstance(start, FollowerStart):
        log.error("expected a FollowerStart on stdin, got %r", type(start).__name__)
        return 2
    store = open_store(start.rank, start.size, start.store_port)
    group = TPGroup(store, start.rank, start.size, detect_platform(start.config.device).device)
    key = READY_KEY.format(rank=start.rank)
    try:
        parts = build_engine_parts(start.config, context_of=start.context_of,
                                   shard_rank=ShardRank(TPShard(start.rank, start.size), group))
    except Exception as exc:  # rank 0 reports it as the engine's load error
        traceback.print_exc()
        store.set(key, f"{type(exc).__name__}: {exc}")
        return 1
    store.set(key, "ok")
    runner = parts.runner
    assert isinstance(runner, ModelRunner)
    with torch.inference_mode():
        while (step := read_frame(stdin)) is not None:
            assert isinstance(step, FollowerStep)
            runner.follow(step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
