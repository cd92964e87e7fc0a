"""Per-API-key limits at the router (cluster.key_limits) and key names in the key file: requests in
flight and tokens per minute, the window ageing out on a fake clock, the file's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.api_keys import ApiKeys, Caller
from cluster.key_limits import KEY_REQUESTS, KeyLimit, KeyLimiter, KeyLimitExceeded, KeyLimits
from cluster.router_settings import RouterSettings

ALICE, BOB = Caller("alice", "t-a"), Caller("bob", "t-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **by_name: dict[str, int]) -> KeyLimiter:
    """Limits by key name ("_" stands for "*", every other key)."""
    return KeyLimiter(KeyLimits({name.replace("_", "*"): KeyLimit(**v) for name, v in by_name.items()}), clock)


def test_requests_in_flight_per_key() -> None:
    keys = limiter(Clock(), alice={"max_inflight": 2})
    keys.admit(ALICE, 10)
    keys.admit(ALICE, 10)
    refused_before = KEY_REQUESTS.labels("alice", "key_limit")._value.get()
    with pytest.raises(KeyLimitExceeded, match="'alice' has 2 requests in flight"):
        keys.admit(ALICE, 10)
    assert KEY_REQUESTS.labels("alice", "key_limit")._value.get() == refused_before + 1
    keys.admit(BOB, 10)  # another key, no limit
    keys.release(ALICE, "ok")
    keys.admit(ALICE, 10)


def test_tokens_per_minute_age_out() -> None:
    clock = Clock()
    keys = limiter(clock, _={"tokens_per_minute": 100})  # "*": every key
    keys.admit(ALICE, 60)
    keys.count(ALICE, 50)  # 110 in the window
    keys.release(ALICE, "ok")
    clock.now += 20
    with pytest.raises(KeyLimitExceeded) as refused:
        keys.admit(ALICE, 1)
    assert refused.value.retry_after_s == 40  # the first 60 tokens leave the window at +60 s
    keys.admit(BOB, 5)  # each key has its own window
    clock.now += 40  # the prompt's 60 aged out: 50 left
    keys.admit(ALICE, 1)


def test_the_limits_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalice tk-alice-1\n\ntk-unnamed-2\n")
    keys = ApiKeys.load(str(keys_file), "tk-inline-3")
    assert keys is not None and keys.names[1] == "alice" and keys.names[0].startswith("key-")
    alice = keys.caller("Bearer tk-alice-1")
    assert alice is not None and alice.key_name == "alice" and alice.tenant
    limits_file = tmp_path / "limits.json"
    limits_file.write_text(json.dumps({"alice": {"max_inflight": 3}, "*": {"tokens_per_minute": 500}}))
    settings = RouterSettings(etcd="127.0.0.1:1", api_keys_file=str(keys_file), api_key_limits=str(limits_file))
    limits = settings.key_limits()
    assert limits is not None and limits.of("alice").max_inflight == 3 and limits.of("zed").tokens_per_minute == 500
    for bad, words in (({"alcie": {"max_inflight": 3}}, "no API key's name"), ({"alice": {"max": 3}}, "an object"),
                       ({"alice": {"max_inflight": 0}}, ">= 1"), ([], "an object of key name")):
        limits_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            RouterSettings(etcd="127.0.0.1:1", api_keys_file=str(keys_file), api_key_limits=str(limits_file))
    with pytest.raises(ValueError, match="needs API keys"):
        RouterSettings(etcd="127.0.0.1:1", api_key_limits=str(limits_file))
    keys_file.write_text("bad name tk-x\n")
    with pytest.raises(ValueError, match="entry 1"):
        ApiKeys.load(str(keys_file), "")
    keys_file.write_text("a tk-x\nb tk-x\n")
    with pytest.raises(ValueError, match="given twice"):
        ApiKeys.load(str(keys_file), "")


def test_retry_after_waits_until_the_window_is_under_the_limit() -> None:
    clock = Clock()
    keys = limiter(clock, alice={"tokens_per_minute": 50})
    keys.admit(ALICE, 60)
    clock.now += 10
    keys.count(ALICE, 60)  # 120 in the window: the first 60 leaving still leaves 60 >= 50
    keys.release(ALICE, "ok")
    with pytest.raises(KeyLimitExceeded) as refused:
        keys.admit(ALICE, 1)
    assert refused.value.retry_after_s == 60  # both entries gone: at +70 s from the first, 10 s in now
