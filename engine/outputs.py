"""What the engine hands back per request."""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.sequence import FinishReason


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the sampled token and the `top` most likely (token_id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step. `new_*` fields hold what this step added (for streaming);
    `token_ids`/`text` hold everything generated so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprobs | None] | None
    num_cached_tokens: int
    arrival_time: float
    first_token_time: float | None
    # one per prompt token, None for the first (nothing scores it); None unless asked for
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def after(self, earlier: list[RequestOutput]) -> RequestOutput:
        """This output carrying, in its `new_*` fields, what `earlier` outputs of the request (in order, not
        delivered) added before it, so one output stands for all of them."""
        if not earlier:
            return self
        return replace(self, new_token_ids=[t for out in earlier for t in out.new_token_ids] + self.new_token_ids,
                       new_text="".join(out.new_text for out in earlier) + self.new_text)


@dataclass(frozen=True)
class OffloadStats:
    """Counters and gauges of a tier, for metrics and benchmarks."""

    capacity_blocks: int
    used_blocks: int
    block_bytes: int
    queried_blocks: int  # blocks looked for here after the pool missed them
    loaded_blocks: int  # of those, found here and loaded into the pool
    load_seconds: float
    stored_blocks: int
    store_seconds: float
    evicted_blocks: int  # removed for room
    dropped_blocks: int  # not stored: no room (every slot was being written)
    writes_finished_on_reuse: int  # copies the engine thread finished itself because the pool reused the block


SPEC_DECISIONS = ("on", "probe", "off")  # a speculation controller's decisions (engine.spec_control)


@dataclass(frozen=True)
class SpecStats:
    """Speculative decoding with a draft model (engine.spec_control): its decisions and drafts so far."""

    steps: dict[str, int]  # decision -> steps: on (predicted to gain), probe (measuring), off (eligible, not run)
    draft_tokens_proposed: int
    draft_tokens_accepted: int
    acceptance: float  # moving average of accepted / proposed (0 before any draft)
    draft_length: int  # the k of the last step (0: off)
    predicted_gain: float  # tokens/s predicted with that k over without


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of an engine after a step (for metrics and the Status RPC)."""

    running: int
    waiting: int
    waiting_for_remote_kv: int
    free_blocks: int  # including evictable cached ones
    total_blocks: int
    kv_usage: float  # share of blocks in use
    preemptions_total: int
    computed_tokens_total: int  # tokens run through the model (prompt and generated)
    prefix_queried_blocks: int = 0  # full prompt blocks looked up in the pool's prefix cache
    prefix_hit_blocks: int = 0  # of those, found there
    offload: OffloadStats | None = None  # the second KV tier's, if the engine has one
    spec: SpecStats | None = None  # with a draft model


@dataclass(frozen=True)
class EngineStatus:
    """What a worker's Status RPC reports: the counters, and the pool's integrity (None: consistent)."""

    stats: EngineStats
    integrity_error: str | None
