"""The prefix cache under salts: blocks are shared only between requests with the same salt, and
the router derives a request's salt from its API key (the tenant) and the client's cache_salt."""

from __future__ import annotations

import pytest

from cluster.api_keys import ApiKeys
from cluster.router_core import cache_salt
from engine import LLM, SamplingParams
from engine.block_manager import ROOT_HASH, hash_blocks, salted_root
from engine.errors import InvalidRequestError

PROMPT = [(5 * i) % 300 + 3 for i in range(70)]


def cached_tokens(llm: LLM, salt: str) -> int:
    engine = llm.engine
    engine.add_request(engine.make_request(f"r{engine.num_steps}-{salt}", PROMPT,
                                           SamplingParams(temperature=0, max_tokens=1), cache_salt=salt))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.num_cached_tokens
    raise AssertionError("the request did not finish")


def test_blocks_are_shared_only_under_the_same_salt(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="float32")
    assert cached_tokens(llm, "tenant-a") == 0
    assert cached_tokens(llm, "tenant-a") == 64  # every full block but the last token's
    assert cached_tokens(llm, "tenant-b") == 0
    assert cached_tokens(llm, "") == 0
    assert cached_tokens(llm, "") == 64
    assert llm.engine.remote_kv.cached_prefix_tokens(PROMPT, "tenant-b") == 64
    assert llm.engine.remote_kv.cached_prefix_tokens(PROMPT, "tenant-c") == 0
    llm.engine.check_integrity()


def test_salted_hashes_differ_from_the_root_and_from_each_other() -> None:
    assert salted_root("") == ROOT_HASH
    roots = {salted_root(s) for s in ("a", "b", '["a", ""]', "\udc80")}
    assert len(roots) == 4 and ROOT_HASH not in roots
    assert hash_blocks(PROMPT, 16, salted_root("a"))[0] != hash_blocks(PROMPT, 16)[0]


def test_the_router_salts_by_tenant_and_client() -> None:
    keys = ApiKeys.load(None, "key-one,key-two")
    assert keys is not None
    first, second = keys.caller("Bearer key-one"), keys.caller("bearer key-two")
    assert first is not None and second is not None
    one, two = first.tenant, second.tenant
    assert one and two and one != two and first == keys.caller("Bearer key-one")
    assert "key-one" not in one + first.key_name and first.key_name != second.key_name
    assert keys.caller("Bearer nope") is None and keys.caller(None) is None
    salts = {cache_salt(one, ""), cache_salt(two, ""), cache_salt(one, "x"), cache_salt("", "x"), cache_salt("", "")}
    assert len(salts) == 5 and cache_salt("", "") == ""
    assert cache_salt("a", "b") != cache_salt('a"', "b") != cache_salt("ab", "")


def test_a_salt_must_be_a_short_string(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=16, dtype="float32")
    with pytest.raises(InvalidRequestError, match="cache salt"):
        llm.engine.make_request("x", PROMPT, cache_salt="s" * 5000)
