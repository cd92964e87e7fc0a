"""Per-request sampling parameters (vLLM semantics). Importable without torch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20
_PENALTY_RANGE = 2.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each logit_bias value: [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token and when to stop.

    temperature 0 means greedy. top_k -1 or 0, top_p 1 and min_p 0 disable those filters.
    `logprobs=n` returns the chosen token's logprob plus the n most likely tokens (n may be 0);
    `prompt_logprobs=n` does the same for every prompt token after the first (what each position's
    logits gave the next prompt token), computed in the prefill, which then reads no prefix cache.
    `stop` strings and `stop_token_ids` end the sequence; `min_tokens` forbids eos and stop
    tokens until that many tokens were generated.
    `logit_bias` adds a value in [-100, 100] to a token's logit (pairs of token id and bias, or a
    mapping); `allowed_token_ids`, when given, forbids every other token; `structured` constrains
    the output to a schema, regex, choice or grammar (the grammar decides where it ends, so it
    cannot be combined with `ignore_eos`, `min_tokens` or `allowed_token_ids`). These edit the
    logits before sampling; logprobs still come from the raw logits.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self._normalize_sequences()
        self._check_floats()
        self._check_ints()
        self._check_logit_edits()

    @classmethod
    def greedy(cls, max_tokens: int = 16, **kwargs: Any) -> SamplingParams:
        """Greedy decoding (argmax) with the other fields as given."""
        return cls(temperature=0.0, max_tokens=max_tokens, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def edits_logits(self) -> bool:
        """Whether the sampled token may differ from the raw logits' argmax at temperature 0
        (besides penalties and min_tokens)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or self.structured is not None

    def _check_logit_edits(self) -> None:
        pairs: Any = self.logit_bias
        if pairs is None:
            pairs = ()
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        if not isinstance(pairs, Iterable) or isinstance(pairs, (str, bytes)):
            raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {pairs!r}")
        bias: dict[int, float] = {}
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2 or not _is_int(pair[0]) or pair[0] < 0:
                raise InvalidRequestError(f"logit_bias keys must be non-negative token ids, got {pair!r}")
            value = _as_float("logit_bias value", pair[1])
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {value} for token {pair[0]}")
            bias[int(pair[0])] = value
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        allowed: Any = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, Iterable) or isinstance(allowed, (str, bytes)):
                raise InvalidRequestError(f"allowed_token_ids must be a list of token ids, got {allowed!r}")
            allowed = tuple(allowed)
            if not allowed or not all(_is_int(t) and t >= 0 for t in allowed):
                raise InvalidRequestError("allowed_token_ids must be a non-empty list of non-negative token ids")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted({int(t) for t in allowed})))
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise InvalidRequestError("structured must be a StructuredOutput")
            clash = [name for name, on in (("ignore_eos", self.ignore_eos), ("min_tokens", self.min_tokens > 0),
                                           ("allowed_token_ids", allowed is not None)) if on]
            if clash:
                raise InvalidRequestError(f"structured output decides where the output ends: it cannot be "
                                          f"combined with {', '.join(clash)}")

    def _normalize_sequences(self) -> None:
        stop: Any = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, Iterable):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str):
                raise InvalidRequestError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise InvalidRequestError("stop must not contain empty strings; remove them")
        object.__setattr__(self, "stop", stop)

        ids: Any = self.stop_token_ids
        if ids is None:
            ids = ()
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
            raise InvalidRequestError(f"stop_token_ids must be a list of integers, got {ids!r}")
        ids = tuple(ids)
        for i in ids:
            if not _is_int(i) or i < 0:
                raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {i!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    def _check_floats(self) -> None:
        temperature = _as_float("temperature", self.temperature)
        if temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        top_p = _as_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
        min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")
        repetition = _as_float("repetition_penalty", self.repetition_penalty)
        if repetition <= 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0 (1 disables it), got {repetition}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -_PENALTY_RANGE <= value <= _PENALTY_RANGE:
                raise InvalidRequestError(f"{name} must be in [-2, 2] (0 disables it), got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "min_p", min_p)
        object.__setattr__(self, "repetition_penalty", repetition)

    def _check_ints(self) -> None:
        for name in ("max_tokens", "min_tokens", "top_k"):
            if not _is_int(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be an integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be >= 1, or -1 or 0 to disable it, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean, got {getattr(self, name)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(name: str, value: object) -> float:
    """The value as a finite float, or InvalidRequestError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
    return result
