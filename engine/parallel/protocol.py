"""What rank 0 tells the other ranks, over each one's stdin: length-prefixed pickles (the ranks are this
engine's own processes, started by it; nothing else writes to their stdin)."""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, replace
from typing import IO, Any, Protocol

from engine.config import EngineConfig
from engine.kv_hooks import KVStorageAllocator, LayerObserver
from engine.kv_offload_mirror import TierCopy

_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class RankPlugin:
    """What a layer above the engine runs on every rank past 0 beside its shard (the KV transfer of a worker,
    which engine.parallel may not import): `module`'s `start(rank, settings)` gives the rank's RankServices."""

    module: str
    settings: Any  # picklable


@dataclass(frozen=True)
class FollowerStart:
    config: EngineConfig
    rank: int
    size: int
    store_port: int  # rank 0's rendezvous store on 127.0.0.1
    context_of: int | None  # as engine.loader.engine_parts.build_engine_parts takes it
    plugin: RankPlugin | None = None


@dataclass(frozen=True)
class RankCommand:
    """A message for every rank's RankServices (engine.parallel.leader.TPLeader.command), between steps."""

    seq: int
    body: Any
    wants_reply: bool
    tier_copies: tuple[TierCopy, ...] = ()  # as FollowerStep's, made before the command


class StepFollowers(Protocol):
    """Rank 0's view of the other ranks, for its runner (engine.parallel.leader.TPLeader)."""

    def send(self, step: FollowerStep) -> None:
        """Hand them the step rank 0 is about to run."""

    def abandon(self, why: str) -> None:
        """Rank 0 will not finish the step they were sent: end the group."""


class RankServices(Protocol):
    """A RankPlugin's services on one rank: the memory of its KV pool, and what it does around each step."""

    kv_storage: KVStorageAllocator | None

    def attach(self, parts: Any) -> None:
        """The rank's engine parts (engine.loader.engine_parts.LoadedEngineParts) are built."""

    def handle(self, body: Any) -> Any:
        """A RankCommand's body; returns the reply (JSON-able), or a concurrent.futures.Future of it (the rank
        answers once it is done, and runs later steps meanwhile), or raises (rank 0 raises it again)."""

    def begin_step(self, step: FollowerStep) -> LayerObserver | None:
        """Before the step's forward: what to call as each layer's KV is written, if anything."""

    def end_step(self) -> None:
        """After the step's forward."""

    def close(self) -> None:
        """The rank ends (rank 0 closed the group or is gone)."""


@dataclass(frozen=True)
class FollowerStep:
    """One forward, as rank 0 runs it (engine.model_runner.ModelRunner.follow runs it on another rank): the
    step's tokens and spans, then the lm_head calls rank 0 makes on its hidden states, in its order."""

    input_ids: tuple[int, ...]
    request_ids: tuple[str, ...]  # per sequence
    spans: tuple[tuple[tuple[int, ...], int, int], ...]  # (block table, start, num_tokens) per sequence
    group_tables: tuple[tuple[tuple[int, ...], ...], ...]  # a hybrid layout's tables of groups 1, 2, ... per span
    logits_indices: tuple[int, ...] | None  # rows sampled from (one lm_head call), None: no sampling this step
    prompt_indices: tuple[int, ...]  # rows scoring prompt tokens, in runs of `prompt_counts` (chunked calls each)
    prompt_counts: tuple[int, ...]
    draft: bool = False  # a self-int4 draft's forward (engine.draft_model), over the same pool: not the target's
    # copies between the pool and the KV offload tier rank 0 decided since its last message, to make first, in order
    tier_copies: tuple[TierCopy, ...] = ()


@dataclass(frozen=True)
class DraftFollowers:
    """The same ranks, following the forwards of a self-int4 draft sharded as its target (FollowerStep.draft)."""

    ranks: StepFollowers

    def send(self, step: FollowerStep) -> None:
        self.ranks.send(replace(step, draft=True))

    def abandon(self, why: str) -> None:
        self.ranks.abandon(why)


def encode_frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def write_frame(stream: IO[bytes], message: Any | bytes) -> None:
    """Write `message`, or a frame `encode_frame` made."""
    stream.write(message if isinstance(message, bytes) else encode_frame(message))
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
