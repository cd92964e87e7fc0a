"""What the engine keeps per live request besides its `Sequence`: detokenized text, stop-string
holdback, logprobs, and what was already streamed.

Invariant: `emitted_tokens` / `emitted_chars` are exactly what earlier outputs carried, so each
output's `new_*` fields continue the stream where the client's copy ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, TokenLogprobs
from engine.sequence import Sequence


@dataclass
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled as the prefill's chunks run
    text: str = ""
    emitted_tokens: int = 0
    emitted_chars: int = 0
    first_token_time: float | None = None
    untexted: list[int] = field(default_factory=list)  # accounted for by add_token, not detokenized yet

    @property
    def stop_holdback(self) -> int:
        """Chars withheld from streaming while a stop string could still be forming."""
        return max((len(s) for s in self.seq.params.stop), default=1) - 1

    def __post_init__(self) -> None:
        if self.seq.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def add_prompt_logprobs(self, start: int, found: TokenIds[TokenLogprobs]) -> None:
        """Record the logprobs of prompt tokens start, start + 1, ...; those already recorded (a
        prefill recomputed after preemption) are kept. The prefix cache serves the prompt again once
        every one is recorded."""
        known = self.prompt_logprobs
        if known is None or start > len(known):
            raise ValueError(f"prompt logprobs from token {start} do not continue the recorded ones")
        known.extend(found[len(known) - start:])
        if len(known) >= self.seq.num_prompt_tokens:
            self.seq.needs_prompt_logits = False

    def on_token(self, token_id: int, logprob: TokenLogprobs | None) -> bool:
        """Account for one new token and its text; returns True when it ends the request (finish
        reason set)."""
        ended = self.add_token(token_id, logprob)
        return self.catch_up_text() or ended

    def take_tokens(self, token_ids: TokenIds[int], logprobs: TokenIds[TokenLogprobs | None],
                    texted: bool) -> tuple[list[int], bool]:
        """Account for a step's tokens in order, up to one that ends the request: (the tokens taken, whether one
        ended it). `texted`: each token's text at once (`on_token`); else text later (`add_token`)."""
        taken: list[int] = []
        account = self.on_token if texted else self.add_token
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            taken.append(token_id)
            if account(token_id, logprob):
                return taken, True
        return taken, False

    def add_token(self, token_id: int, logprob: TokenLogprobs | None) -> bool:
        """Account for one new token without its text (`catch_up_text` adds that, in token order):
        True when the token alone ends the request (an end or stop token, or the length limit)."""
        seq, params = self.seq, self.seq.params
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        seq.sampling_state.append(token_id)
        if params.logprobs is not None:
            self.logprobs.append(logprob)
        self.untexted.append(token_id)
        num_out = seq.sampling_state.num_generated
        if num_out >= params.min_tokens:
            is_eos = not params.ignore_eos and token_id in self.eos_token_ids
            if is_eos or token_id in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token_id
                return True
        if seq.ends_by_length(num_out, self.max_model_len):
            seq.finish_reason = "length"
            return True
        return False

    def catch_up_text(self) -> bool:
        """Detokenize the tokens `add_token` accounted for since the last call and search the new text for
        stop strings; True when one ends the request (text cut before it; a stop string outranks the length
        limit, an end or stop token outranks it). Invariant: tokens after one whose stop string ends the
        request are never added (the sync commit texts each token before the next, the async one has one
        untexted token per request at most)."""
        seq, params = self.seq, self.seq.params
        num_out = seq.sampling_state.num_generated - len(self.untexted)
        untexted, self.untexted = self.untexted, []
        for token_id in untexted:
            num_out += 1
            checked_from = len(self.text)
            self.text += self.detokenizer.append(token_id)
            if not params.stop or num_out < params.min_tokens or seq.stop_reason is not None:
                continue
            stop_at = find_stop(self.text, params.stop, checked_from)
            if stop_at is not None:
                seq.finish_reason = "stop"
                seq.stop_reason = next(s for s in params.stop if self.text.startswith(s, stop_at))
                self.text = self.text[:stop_at]
                return True
        return False

    def replay_streamed(self, token_ids: TokenIds[int], device: torch.device) -> None:
        """Account for tokens another engine generated (and streamed) as if this one had: sampling
        state (penalties, min/max tokens), the seeded generator's position, detokenizer and
        stop-string state. Their text counts as already emitted, exactly as far as `output` would
        have streamed it after their last token, so the next chunk starts where the client's ends."""
        seq = self.seq
        for token_id in token_ids:
            if self.on_token(token_id, None):
                raise InvalidRequestError(f"the resumed tokens already end the request "
                                          f"({seq.finish_reason}): there is nothing to resume")
            seq.token_ids.append(token_id)
            self.skip_draw(device)
        self.emitted_tokens = len(token_ids)
        self.emitted_chars = max(len(self.text) - self.stop_holdback, 0)

    def skip_draw(self, device: torch.device) -> None:
        """Advance a seeded request's generator by the one uniform a token elsewhere cost."""
        state = self.seq.sampling_state
        if state.generator is not None and not self.seq.params.is_greedy:
            torch.rand((), generator=state.generator, device=device)

    def release_held_text(self) -> None:
        """At the end, text held back for an incomplete UTF-8 character is final (unless a stop
        string already cut the text)."""
        if not isinstance(self.seq.stop_reason, str):
            self.text += self.detokenizer.flush()

    def output(self) -> RequestOutput:
        """The request's output now; what it adds since the last one is in its `new_*` fields."""
        seq = self.seq
        finished = seq.is_finished
        visible = len(self.text) if finished else max(len(self.text) - self.stop_holdback, self.emitted_chars)
        out_ids = seq.output_token_ids if seq.output_token_ids or not finished else []
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=list(out_ids),
            text=self.text[:visible], new_token_ids=out_ids[self.emitted_tokens:],
            new_text=self.text[self.emitted_chars:visible], finished=finished, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, logprobs=list(self.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens, arrival_time=seq.arrival_time,
            first_token_time=self.first_token_time,
            prompt_logprobs=self.prompt_logprobs)  # complete, so never changed again, by the first output
        self.emitted_tokens, self.emitted_chars = len(out_ids), visible
        return out
