"""Remote KV, the engine's side: the one object through which another engine's prefill reaches this
one (the scheduler side of a KV connector, as in vLLM V1). It owns the requests that wait for remote
KV (`WAITING_FOR_REMOTE_KV`, outside the batch, holding reserved blocks) and the blocks detached from
them while a remote writer may still be writing into them.

A decode worker's remote prefill of one request, in these calls:
  `reserve` → blocks to be filled; then either `resume` (the KV landed: the request joins the batch
  with the first token the other engine sampled), or `detach` (given up: the blocks are set apart,
  still held) followed by `rereserve` (the next attempt) or `prefill_locally`; `release(key)` frees
  detached blocks once no write can come.

Invariants:
- a reserved or detached block is never free or reused while a remote writer may still write to it:
  detached blocks are freed only by `release(key)` or when their quarantine (`quarantine_s` given
  at `detach`) has passed, which `release_expired` (called by the engine's loop) enforces;
- a parked request holds its reserved blocks, or none after `detach`; aborting it frees only those.

Runs on the engine's thread only (AsyncEngine.remote_kv is the asyncio door to it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.block_manager import hash_blocks, salted_root
from engine.errors import InvalidRequestError
from engine.model_runner import SequenceResult
from engine.outputs import RequestOutput, TokenLogprobs
from engine.request import EngineRequest
from engine.sequence import Sequence as EngineSequence
from engine.sequence import SequenceStatus

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


# In the block lists `reserve` and `rereserve` return: a block this engine does not need (a windowed group's, behind
# the window of the request's next position), so none is reserved and no KV should be sent for it
NOT_NEEDED = -1


@dataclass(frozen=True)
class RemotePrefillResult:
    """What another engine's prefill of a request produced besides the KV pages: the first sampled
    token (and its logprobs if asked for), how many prompt tokens its prefix cache served, and the
    logprobs of every prompt token after the first if asked for."""

    first_token_id: int
    logprobs: TokenLogprobs | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class _Detached:
    block_ids: list[int]
    release_at: float  # monotonic: freed by then even if nobody calls release


class RemoteKV:
    def __init__(self, engine: LLMEngine, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._scheduler = engine.scheduler
        self._blocks = engine.block_manager
        self._clock = clock
        self.parked: dict[str, EngineSequence] = {}
        self.detached: dict[str, _Detached] = {}

    # -- queries ----------------------------------------------------------------------------------------
    def cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Prompt tokens this engine's prefix cache already holds under `cache_salt`, in its pool or its second
        tier (a look, not a lookup: no stats)."""
        hashes = hash_blocks(token_ids, self._blocks.block_size, salted_root(cache_salt))
        # (a windowed group need hold only the blocks within the window of the prefix's end)
        held = len(self._scheduler.cached_prefix_blocks(hashes, token_ids)[0])
        offload = self._blocks.offload
        if offload is not None and held < len(hashes):
            held += len(offload.match(hashes[held:], token_ids, held, touch=False))
        return held * self._blocks.block_size

    @property
    def num_parked(self) -> int:
        return len(self.parked)

    # -- one remote prefill -----------------------------------------------------------------------------
    def reserve(self, request: EngineRequest) -> list[int]:
        """Park `request` with fresh blocks for its prompt tokens; returns their ids in token order (block i holds
        tokens [i*block_size, (i+1)*block_size)), group after group in a hybrid layout (engine.kv_groups: n blocks
        of group 0, then n of group 1, ...), NOT_NEEDED for a windowed group's blocks behind the window of the
        prompt's end (none reserved). OutOfKVBlocksError (nothing kept) when they are not free now."""
        seq = self._engine.start_request(request)
        try:
            self._scheduler.allocate_fresh(seq)
        except BaseException:
            self._engine.forget_request(request.request_id)
            raise
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        self.parked[request.request_id] = seq
        return self._wanted(seq)

    def _wanted(self, seq: EngineSequence) -> list[int]:
        held = set(self._scheduler.held_blocks(seq))
        return [block_id if block_id in held else NOT_NEEDED for table in seq.tables for block_id in table]

    def resume(self, request_id: str, result: RemotePrefillResult) -> RequestOutput:
        """The prompt's KV is in the reserved blocks: the request joins the batch (even past
        max_num_seqs: its blocks are held) as if this engine had run its prefill."""
        seq = self._parked(request_id)
        if not seq.block_table:
            raise ValueError(f"request {request_id!r} has no reserved blocks (they were detached)")
        if not 0 <= result.first_token_id < self._engine.model_config.vocab_size:
            raise InvalidRequestError(f"first token id {result.first_token_id} is outside the vocabulary")
        if not seq.sampling_state.would_accept(result.first_token_id):  # a prefill worker without the grammar
            raise InvalidRequestError(f"first token id {result.first_token_id} violates the request's "
                                      "structured output grammar")
        wanted = seq.num_prompt_tokens - 1 if seq.needs_prompt_logits else 0
        if len(result.prompt_logprobs) != wanted or any(
                lp.token_id != t for lp, t in zip(result.prompt_logprobs, seq.prompt_token_ids[1:], strict=False)):
            raise InvalidRequestError(f"the prefill sent {len(result.prompt_logprobs)} prompt logprobs, the request "
                                      f"needs {wanted}, one for each prompt token after the first")
        del self.parked[request_id]
        item = self._scheduler.join_running(seq)
        seq.num_cached_tokens = result.num_cached_tokens
        self._engine.skip_remote_draw(seq)
        outputs = self._engine.commit((item,), {request_id: SequenceResult(
            [result.first_token_id], [result.logprobs], result.prompt_logprobs, prompt_logprobs_start=1)})
        return outputs[0]

    def detach(self, request_id: str, key: str, quarantine_s: float) -> None:
        """Set the reserved blocks of a parked request apart under `key`, still held: a remote writer
        may still be writing into them. They are freed by `release(key)`, or after `quarantine_s`."""
        seq = self._parked(request_id)
        if key in self.detached:
            raise ValueError(f"detached blocks {key!r} already exist")
        if quarantine_s <= 0:
            raise ValueError(f"quarantine_s must be > 0, got {quarantine_s}")
        self.detached[key] = _Detached(self._scheduler.held_blocks(seq), self._clock() + quarantine_s)
        seq.drop_tables()

    def rereserve(self, request_id: str) -> list[int]:
        """Fresh blocks for the next attempt of a parked request whose blocks were detached
        (OutOfKVBlocksError, the request unchanged, when they are not free now)."""
        seq = self._parked(request_id)
        if seq.block_table:
            raise ValueError(f"request {request_id!r} is not parked without blocks")
        self._scheduler.allocate_fresh(seq)
        return self._wanted(seq)

    def prefill_locally(self, request_id: str) -> None:
        """Give up on remote KV for a parked request (its blocks detached): it is prefilled here,
        ahead of every queued request."""
        seq = self._parked(request_id)
        if seq.block_table:
            raise ValueError(f"detach the blocks of {request_id!r} before prefilling it locally")
        del self.parked[request_id]
        self._scheduler.add_first(seq)

    def release(self, key: str) -> None:
        """Free the blocks detached under `key` (no-op if already released or expired)."""
        detached = self.detached.pop(key, None)
        if detached is not None:
            self._blocks.release(detached.block_ids)

    def release_expired(self) -> None:
        now = self._clock()
        for key in [k for k, d in self.detached.items() if d.release_at <= now]:
            self.release(key)

    def seconds_to_next_expiry(self) -> float | None:
        if not self.detached:
            return None
        return max(min(d.release_at for d in self.detached.values()) - self._clock(), 0.0)

    # -- the engine's bookkeeping -----------------------------------------------------------------------
    def drop(self, seq: EngineSequence) -> None:
        """An aborted parked request: free the blocks it holds (detached ones stay held)."""
        del self.parked[seq.request_id]
        self._scheduler.release_tables(seq)

    def held_block_refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        held = [self._scheduler.held_blocks(s) for s in self.parked.values()]
        for block_ids in held + [d.block_ids for d in self.detached.values()]:
            for block_id in block_ids:
                refs[block_id] = refs.get(block_id, 0) + 1
        return refs

    def _parked(self, request_id: str) -> EngineSequence:
        seq = self.parked.get(request_id)
        if seq is not None:
            return seq
        if request_id in self._engine.requests:
            raise ValueError(f"request {request_id!r} is not waiting for remote KV")
        raise InvalidRequestError(f"no request {request_id!r} is waiting for remote KV")
