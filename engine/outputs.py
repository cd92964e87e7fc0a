"""What the engine hands back per request."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampler import TokenLogprobs
from engine.sequence import FinishReason


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
