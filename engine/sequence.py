"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from engine.sampler import SequenceSamplingState
    from engine.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # holds blocks another engine is filling
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids, computed-token count and block table of one request.

    Invariants: `num_computed_tokens <= len(token_ids)`; `block_table` (and every table of `group_tables`)
    covers at least `num_computed_tokens` slots; `block_hashes[i]` is the chained hash of full block i of
    `token_ids` and exists only once block i's KV is computed and registered.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 sampling_state: SequenceSamplingState, priority: int = 0, arrival_time: float | None = None,
                 root_hash: int = 0) -> None:
        self.request_id = request_id
        self.root_hash = root_hash  # the parent hash of its first block (engine.block_manager.salted_root)
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.sampling_state = sampling_state
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.block_table: list[int] = []  # group 0's (engine.kv_groups): the only one but in a hybrid layout
        self.group_tables: list[list[int]] = []  # a hybrid layout's groups 1, 2, ..., as long as block_table
        self.block_hashes: list[int] = []
        # the first num_blocks_behind_window entries of every windowed group's table were given back: the window
        # has left them (engine.scheduler); a global group's table holds every block
        self.num_blocks_behind_window = 0
        self.spec_token_ids: list[int] = []  # draft tokens proposed for the next step
        # the distributions a draft model drew spec_token_ids from [k, V], for rejection sampling; None: the drafts
        # are verified greedily (n-gram drafts, or a draft model's for a plain greedy request)
        self.spec_draft_probs: torch.Tensor | None = None
        # async scheduling: a step in flight samples this sequence's next token, not appended yet; the
        # scheduler counts it as known (the token's input row is filled in once it is sampled)
        self.awaiting_token = False
        # the prompt's logprobs are asked for and not all recorded yet: its prefill computes every
        # prompt position (no prefix-cache hits) and keeps their logits
        self.needs_prompt_logits = params.prompt_logprobs is not None and len(prompt_token_ids) > 1
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None

    def drop_tables(self) -> None:
        """Empty its tables (their blocks given back or set apart by the caller)."""
        self.block_table, self.group_tables, self.num_blocks_behind_window = [], [], 0

    @property
    def tables(self) -> list[list[int]]:
        """Its block table of every group, in group order."""
        return [self.block_table, *self.group_tables]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    def ends_by_length(self, num_output_tokens: int, max_model_len: int) -> bool:
        """Whether the request ends ("length") once it has `num_output_tokens` generated tokens."""
        return (num_output_tokens >= self.params.max_tokens
                or self.num_prompt_tokens + num_output_tokens >= max_model_len)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the newest sampled one still await computing."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
