"""What rank 0 tells the other ranks, over each one's stdin: length-prefixed pickles (the ranks are this
engine's own processes, started by it; nothing else writes to their stdin)."""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import IO, Any

from engine.config import EngineConfig

_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class FollowerStart:
    config: EngineConfig
    rank: int
    size: int
    store_port: int  # rank 0's rendezvous store on 127.0.0.1
    context_of: int | None  # as engine.loader.engine_parts.build_engine_parts takes it


@dataclass(frozen=True)
class FollowerStep:
    """One forward, as rank 0 runs it (engine.model_runner.ModelRunner.follow runs it on another rank): the
    step's tokens and spans, then the lm_head calls rank 0 makes on its hidden states, in its order."""

    input_ids: tuple[int, ...]
    spans: tuple[tuple[tuple[int, ...], int, int], ...]  # (block table, start, num_tokens) per sequence
    group_tables: tuple[tuple[tuple[int, ...], ...], ...]  # a hybrid layout's tables of groups 1, 2, ... per span
    logits_indices: tuple[int, ...] | None  # rows sampled from (one lm_head call), None: no sampling this step
    prompt_indices: tuple[int, ...]  # rows scoring prompt tokens, in runs of `prompt_counts` (chunked calls each)
    prompt_counts: tuple[int, ...]


def write_frame(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next message, or None once the writer has closed the stream (rank 0 ended)."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        return None
    return pickle.loads(data)
