"""Prompt logprobs (the engine's, behind `echo` + `logprobs`): every prompt token after the first
scored by the logits before it, equal to transformers fp32 on the same weights, whatever the
chunking, the prefix cache, preemption or the batch around it."""

from __future__ import annotations

import functools

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError
from tests.support.hf_reference import load_hf_model

PROMPTS = [[(11 * i + j * j) % 480 + 3 for j in range(n)] for i, n in enumerate((2, 17, 40, 90, 150))]


@functools.cache
@torch.inference_mode()
def hf_prompt_logprobs(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """[len(prompt) - 1, V]: row i is the log-softmax that scores prompt token i + 1."""
    logits = load_hf_model(path)(torch.tensor([list(prompt)])).logits[0, :-1]
    return logits.float().log_softmax(dim=-1)


def assert_matches_hf(path: str, prompt: list[int], found: list, top: int) -> None:
    want = hf_prompt_logprobs(path, tuple(prompt))
    assert found[0] is None and len(found) == len(prompt)
    for i, lp in enumerate(found[1:]):
        assert lp.token_id == prompt[i + 1]
        assert lp.logprob == pytest.approx(float(want[i, prompt[i + 1]]), abs=2e-4), f"position {i + 1}"
        values, ids = want[i].topk(top)
        assert [t for t, _ in lp.top] == ids.tolist() or top == 0
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=2e-4)


CONFIGS = {
    "one_step": {},
    "chunked": {"max_num_batched_tokens": 24},  # every long prompt is prefilled in several chunks
    "preemption": {"num_kv_blocks": 12, "max_num_batched_tokens": 24, "max_model_len": 190},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logprobs_match_transformers(tiny_llama_dir, name) -> None:
    path = str(tiny_llama_dir)
    llm = LLM(path, **{"num_kv_blocks": 64, "dtype": "float32", **CONFIGS[name]})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    for out, prompt in zip(outputs, PROMPTS, strict=True):
        assert_matches_hf(path, prompt, out.prompt_logprobs, 3)
    if name == "preemption":
        assert llm.engine.scheduler.num_preemptions_total > 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("fixture", ["tiny_gemma2_dir", "tiny_mistral_window_dir"])
def test_prompt_logprobs_of_capped_and_windowed_models(fixture, request) -> None:
    """Gemma 2's capped logits (a cap never changes a greedy token, only the logprobs) and a
    windowed model's, chunked prefill across windows."""
    path = str(request.getfixturevalue(fixture))
    llm = LLM(path, num_kv_blocks=64, dtype="float32", max_num_batched_tokens=24)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    for out, prompt in zip(llm.generate(PROMPTS, params), PROMPTS, strict=True):
        assert_matches_hf(path, prompt, out.prompt_logprobs, 3)
    llm.engine.check_integrity()


def test_a_cached_prompt_is_computed_again_for_its_logprobs(tiny_llama_dir) -> None:
    path = str(tiny_llama_dir)
    llm = LLM(path, num_kv_blocks=64, dtype="float32")
    prompt = PROMPTS[3]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert plain.prompt_logprobs is None
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert again.num_cached_tokens > 0  # the prefix cache holds the prompt ...
    scored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                   prompt_logprobs=0))[0]
    assert scored.num_cached_tokens == 0  # ... but a request for its logprobs computes it all
    assert_matches_hf(path, prompt, scored.prompt_logprobs, 0)
    assert scored.token_ids == plain.token_ids
    assert all(lp.top == () for lp in scored.prompt_logprobs[1:])


def test_prompt_logprobs_beside_other_requests_and_a_one_token_prompt(tiny_llama_dir) -> None:
    path = str(tiny_llama_dir)
    llm = LLM(path, num_kv_blocks=64, dtype="float32", max_num_batched_tokens=64)
    engine = llm.engine
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    engine.add_request(engine.make_request("a", PROMPTS[2], plain))
    engine.step()  # "a" is decoding when the scored ones arrive
    engine.add_request(engine.make_request("b", PROMPTS[4], scored))
    engine.add_request(engine.make_request("c", [42], scored))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["a"].prompt_logprobs is None
    assert finals["c"].prompt_logprobs == [None]
    assert_matches_hf(path, PROMPTS[4], finals["b"].prompt_logprobs, 1)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_are_refused(value) -> None:
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
