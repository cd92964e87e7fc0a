"""A request as the engine takes it: validated once, where it enters, and carried in that form.

`RequestValidator.validate` is the one place a prompt (text or token ids), its sampling parameters
against this model (stop token ids in the vocabulary) and a migrated request's already-streamed
tokens are checked; an `EngineRequest` is only ever made there, so the engine, its scheduler and
its workers trust it without checking again. `SamplingParams` validates its own values when built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.block_manager import MAX_CACHE_SALT_CHARS
from engine.errors import InvalidRequestError
from engine.grammar import GrammarCompiler
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar


@dataclass(frozen=True)
class EngineRequest:
    """`resume_token_ids`: tokens another engine already generated and streamed for this request
    before it was lost (a migration); the engine continues after them without emitting them again.
    `grammar`: `params.structured` compiled for this model's vocabulary (None without it).
    `cache_salt`: the prefix cache shares blocks only between requests with the same salt (the
    router derives it from the tenant's API key, and a client may add its own)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    resume_token_ids: tuple[int, ...] = ()
    grammar: xgrammar.CompiledGrammar | None = None
    cache_salt: str = ""


@dataclass(frozen=True)
class RequestValidator:
    """What a request is checked against: this model's vocabulary and context length."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    grammars: GrammarCompiler = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grammars", GrammarCompiler(self.tokenizer, self.vocab_size))

    def validate(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 priority: int = 0, resume_token_ids: Sequence[int] | None = None,
                 cache_salt: str = "") -> EngineRequest:
        """The request in the engine's form, or InvalidRequestError saying what to change."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request id must be a non-empty string")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling parameters must be SamplingParams, got {type(params).__name__}")
        token_ids = self._prompt_tokens(prompt)
        self._check_tokens(token_ids, "token id")
        self._check_tokens(params.stop_token_ids, "stop token id")
        self._check_tokens([t for t, _ in params.logit_bias], "logit_bias token id")
        self._check_tokens(params.allowed_token_ids or (), "allowed token id")
        ending = set(self.tokenizer.eos_token_ids) | set(params.stop_token_ids)
        if params.min_tokens and params.allowed_token_ids is not None and set(params.allowed_token_ids) <= ending:
            raise InvalidRequestError("min_tokens forbids eos and stop tokens, and allowed_token_ids allows "
                                      "nothing else: no token could be generated")
        grammar = self.grammars.compile(params.structured) if params.structured is not None else None
        resumed = tuple(resume_token_ids or ())
        if resumed:
            self._check_resume(len(token_ids), params, resumed)
        if not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT_CHARS:
            raise InvalidRequestError(f"cache salt must be a string of at most {MAX_CACHE_SALT_CHARS} characters")
        return EngineRequest(request_id, token_ids, params, priority, resumed, grammar, cache_salt)

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            token_ids = tuple(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            token_ids = tuple(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids (ints)")
        if not token_ids:
            raise InvalidRequestError("prompt is empty: give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but the context holds {self.max_model_len} "
                f"(prompt + at least one generated token): shorten the prompt")
        return token_ids

    def _check_tokens(self, token_ids: Sequence[int], what: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{what} {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_resume(self, num_prompt_tokens: int, params: SamplingParams, resumed: tuple[int, ...]) -> None:
        self._check_tokens(resumed, "resumed token id")
        if len(resumed) >= params.max_tokens:
            raise InvalidRequestError(f"{len(resumed)} tokens were already generated: max_tokens "
                                      f"({params.max_tokens}) leaves nothing to resume")
        if num_prompt_tokens + len(resumed) >= self.max_model_len:
            raise InvalidRequestError(f"prompt and resumed tokens ({num_prompt_tokens} + "
                                      f"{len(resumed)}) fill the context ({self.max_model_len})")
