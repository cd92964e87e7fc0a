"""Per-API-key limits at the router: requests in flight and tokens (prompt and generated) per
minute, from a JSON file (`--api-key-limits`):

    {"team-a": {"max_inflight": 8, "tokens_per_minute": 200000}, "*": {"max_inflight": 2}}

Names are the API keys' (cluster.api_keys); "*" applies to every key the file does not name. A
request over its key's limit is refused as the router's global limit refuses one (429 /
RESOURCE_EXHAUSTED with Retry-After: for tokens, the seconds until enough of the last minute's
usage has aged out). The token window admits a request while the key's last 60 s hold fewer
tokens than its limit, then counts its prompt at once and its tokens as they stream, so one
request may overshoot and the next waits.

Metrics by key name (`anonymous` without API keys), never by key: requests by outcome, tokens by
kind, requests in flight. Runs on the router's event loop only.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from cluster.api_keys import ApiKeys, Caller
from common.files import read_file

WINDOW_S = 60.0
DEFAULT_NAME = "*"
ANONYMOUS_NAME = "anonymous"  # the key label of requests to a router without API keys

KEY_REQUESTS = Counter("tandem_router_key_requests", "Requests ended at the router, by API key name and outcome "
                       "(ok, key_limit, or the status code)", ["key", "outcome"])
KEY_TOKENS = Counter("tandem_router_key_tokens", "Prompt and generated tokens, by API key name and kind",
                     ["key", "kind"])
KEY_INFLIGHT = Gauge("tandem_router_key_inflight_requests", "Requests in flight at the router, by API key name",
                     ["key"])


@dataclass(frozen=True)
class KeyLimit:
    max_inflight: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_inflight", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class KeyLimits:
    by_name: Mapping[str, KeyLimit] = field(default_factory=dict)  # DEFAULT_NAME: every other key

    def of(self, key_name: str) -> KeyLimit:
        return self.by_name.get(key_name) or self.by_name.get(DEFAULT_NAME) or KeyLimit()

    @staticmethod
    def load(path: str, known_names: tuple[str, ...]) -> KeyLimits:
        """The limits of the file at `path`; ValueError naming what is wrong (a name that is no
        key's, most likely a typo, included)."""
        try:
            raw = json.loads(read_file(path, "API key limits file"))
        except json.JSONDecodeError as e:
            raise ValueError(f"API key limits file {path!r} is not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"API key limits file {path!r} must hold an object of key name -> limits")
        limits: dict[str, KeyLimit] = {}
        for name, entry in raw.items():
            if name != DEFAULT_NAME and name not in known_names:
                raise ValueError(f"API key limits file {path!r} names {name!r}, which is no API key's name")
            if not isinstance(entry, dict) or set(entry) - {"max_inflight", "tokens_per_minute"}:
                raise ValueError(f"API key limits of {name!r}: an object with max_inflight and/or tokens_per_minute")
            try:
                limits[name] = KeyLimit(**entry)
            except ValueError as e:
                raise ValueError(f"API key limits of {name!r}: {e}") from e
        return KeyLimits(limits)


def load_key_limits(path: str | None, keys: ApiKeys | None) -> KeyLimits | None:
    """The limits of `--api-key-limits` (None without the flag); ValueError without API keys."""
    if path is None:
        return None
    if keys is None:
        raise ValueError("api_key_limits needs API keys (api_keys_file or api_keys)")
    return KeyLimits.load(path, keys.names)


class KeyLimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class _Usage:
    inflight: int = 0
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens), oldest first
    window_tokens: int = 0


class KeyLimiter:
    """Admits, counts and releases requests per key. Invariant: a key's `inflight` is the number of
    requests admitted and not released; `window_tokens` is the sum of its window's entries."""

    def __init__(self, limits: KeyLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or KeyLimits()
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    @staticmethod
    def label(caller: Caller) -> str:
        return caller.key_name or ANONYMOUS_NAME

    def admit(self, caller: Caller, prompt_tokens: int) -> None:
        """Count the request in, or raise KeyLimitExceeded (and count the refusal)."""
        name = self.label(caller)
        limit, usage = self.limits.of(caller.key_name), self._usage.setdefault(name, _Usage())
        try:
            if limit.max_inflight is not None and usage.inflight >= limit.max_inflight:
                raise KeyLimitExceeded(f"API key {name!r} has {usage.inflight} requests in flight "
                                       f"(its limit is {limit.max_inflight}): retry later", 1)
            if limit.tokens_per_minute is not None:
                self._expire(usage)
                if usage.window_tokens >= limit.tokens_per_minute:
                    raise KeyLimitExceeded(f"API key {name!r} used {usage.window_tokens} tokens in the last "
                                           f"minute (its limit is {limit.tokens_per_minute}): retry later",
                                           self._seconds_until_under(usage, limit.tokens_per_minute))
        except KeyLimitExceeded:
            KEY_REQUESTS.labels(name, "key_limit").inc()
            raise
        usage.inflight += 1
        KEY_INFLIGHT.labels(name).inc()
        self.count(caller, prompt_tokens, "prompt")

    def count(self, caller: Caller, tokens: int, kind: str = "generated") -> None:
        if tokens <= 0:
            return
        name = self.label(caller)
        KEY_TOKENS.labels(name, kind).inc(tokens)
        if self.limits.of(caller.key_name).tokens_per_minute is not None:
            usage = self._usage.setdefault(name, _Usage())
            self._expire(usage)
            usage.window.append((self._clock(), tokens))
            usage.window_tokens += tokens

    def release(self, caller: Caller, outcome: str) -> None:
        name = self.label(caller)
        self._usage[name].inflight -= 1
        KEY_INFLIGHT.labels(name).dec()
        KEY_REQUESTS.labels(name, outcome).inc()

    def _seconds_until_under(self, usage: _Usage, limit: int) -> int:
        """Whole seconds until enough of the window has aged out to leave it under `limit`."""
        left = usage.window_tokens
        for when, tokens in usage.window:
            left -= tokens
            if left < limit:
                return max(math.ceil(when + WINDOW_S - self._clock()), 1)
        return 1

    def _expire(self, usage: _Usage) -> None:
        horizon = self._clock() - WINDOW_S
        while usage.window and usage.window[0][0] <= horizon:
            usage.window_tokens -= usage.window.popleft()[1]
