"""The engine's greedy output in fp32 equals transformers fp32, token for token, in every configuration.
(fp32 on both sides: bf16 rounding flips near-ties, differently on different CPUs.)"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams, SpeculativeConfig
from tests.conftest import PHI3_ORIGINAL_CONTEXT
from tests.support.hf_reference import hf_greedy
from tests.support.prompts import varied_prompts

MAX_NEW = 16

# The default model in the configurations that change what a step computes most; without chunked
# prefill or without the prefix cache, TINY_CONFIGS checks every architecture (the suite's time).
CONFIGS = {
    "default": {},
    "speculative": {"speculative": SpeculativeConfig(num_draft_tokens=4, max_running_seqs=64)},
    # 80 blocks of 16 tokens hold the longest request (1024 tokens) but not all 16 at once, and a
    # 96-token budget chunks every long prompt: sequences are preempted and recomputed.
    "preemption": {"num_kv_blocks": 80, "max_num_batched_tokens": 96, "max_model_len": 1100},
}


@pytest.fixture(scope="module")
def default_llm_reference(default_model_path):
    llm = LLM(str(default_model_path))
    prompts = varied_prompts(llm.tokenizer)
    eos = llm.tokenizer.eos_token_ids
    expected = [hf_greedy(str(default_model_path), p, MAX_NEW, eos) for p in prompts]
    return prompts, expected


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_model_matches_transformers(name, default_model_path, default_llm_reference) -> None:
    prompts, expected = default_llm_reference
    llm = LLM(str(default_model_path), dtype="float32", **CONFIGS[name])
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for i, (out, want) in enumerate(zip(outputs, expected, strict=True)):
        assert out.token_ids == want, f"{name}: prompt {i} ({len(prompts[i])} tokens) diverged"
    if name == "preemption":
        assert llm.engine.scheduler.running == [] and llm.engine.scheduler.num_preemptions_total > 0
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


TINY_CONFIGS = {
    "default": {"max_num_batched_tokens": 32},
    "no_chunked_prefill": {"enable_chunked_prefill": False, "max_model_len": 200},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "speculative": {"speculative": SpeculativeConfig(num_draft_tokens=3, max_running_seqs=64)},
    "preemption": {"num_kv_blocks": 12, "max_num_batched_tokens": 24, "max_model_len": 190},
}


# A model whose every layer has a window gives back the blocks behind it as it goes (engine.scheduler): its
# preemption test needs a smaller pool (one that still holds the window and two steps' chunks)
WINDOWED_PREEMPTION_BLOCKS = 6


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_mixtral_dir",
                                     "tiny_qwen3_moe_dir", "tiny_llama3_scaled_dir", "tiny_mistral_window_dir",
                                     "tiny_qwen2_window_dir", "tiny_gemma2_dir", "tiny_gemma3_dir"])
def test_tiny_checkpoints_match_transformers(fixture, name, request) -> None:
    config = TINY_CONFIGS[name]
    if name == "preemption" and fixture == "tiny_mistral_window_dir":
        config = {**config, "num_kv_blocks": WINDOWED_PREEMPTION_BLOCKS}
    llm = _check_tiny(str(request.getfixturevalue(fixture)), config)
    if name == "preemption":
        assert llm.engine.scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("fixture", ["tiny_mistral_window_dir", "tiny_qwen2_window_dir", "tiny_gemma2_dir",
                                     "tiny_gemma3_dir"])
def test_sliding_windows_on_the_torch_attention_backend(fixture, request) -> None:
    """The C kernel serves the test above; the torch backend (CUDA without flash, fp16/fp8 caches)
    masks windows and caps scores its own way."""
    _check_tiny(str(request.getfixturevalue(fixture)), {"attention_backend": "torch", **TINY_CONFIGS["default"]})


# Phi-3's LongRoPE set is fixed by the context: short within PHI3_ORIGINAL_CONTEXT (prompts and answers stay
# inside it), long beyond (prompts longer than it, where transformers picks the long set for every token too)
# (limits, prompt lengths)
PHI3_MODES = {"short": ({"max_model_len": PHI3_ORIGINAL_CONTEXT}, (1, 3, 16, 17, 30, 40, 50, 52)),
              "long": ({"max_model_len": 512}, (65, 70, 90, 130, 150, 200, 250, 300))}
PHI3_CONFIGS = {**{name: TINY_CONFIGS[name] for name in ("default", "no_prefix_cache", "speculative")},
                "no_chunked_prefill": {"enable_chunked_prefill": False},
                "preemption": {"max_num_batched_tokens": 24, "num_kv_blocks": WINDOWED_PREEMPTION_BLOCKS},
                "torch_attention": {"attention_backend": "torch", "max_num_batched_tokens": 32}}


@pytest.mark.parametrize("name", list(PHI3_CONFIGS))
@pytest.mark.parametrize("mode", list(PHI3_MODES))
def test_phi3_matches_transformers(tiny_phi3_dir, mode, name) -> None:
    """Phi-3 (fused checkpoint tensors, LongRoPE in both sets with its attention factor, partial rotary,
    a window in every layer) in every engine configuration, prompts of 1 to 300 tokens together."""
    limits, lengths = PHI3_MODES[mode]
    config = {**limits, **PHI3_CONFIGS[name]}
    llm = _check_tiny(str(tiny_phi3_dir), config, lengths)
    assert llm.engine.model_config.rope_scaling.use_long == (mode == "long")
    if name == "preemption":
        assert llm.engine.scheduler.num_preemptions_total > 0


def _check_tiny(path: str, config: dict, lengths: tuple[int, ...] = (1, 3, 16, 17, 40, 90, 150, 177)) -> LLM:
    llm = LLM(path, **{"num_kv_blocks": 64, "dtype": "float32", **config})
    # Repetitive prompts give the n-gram drafter something to propose.
    prompts = [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.token_ids == hf_greedy(path, prompt, 12, eos_ids=())
    llm.engine.check_integrity()
    return llm


def test_speculative_drafts_are_accepted_and_switch_off_under_load(tiny_llama_dir) -> None:
    spec = SpeculativeConfig(num_draft_tokens=4, max_running_seqs=2)
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, speculative=spec, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    repetitive = [[5, 6, 7, 8] * 10]
    out = llm.generate(repetitive, params)[0]
    engine = llm.engine
    assert engine.num_draft_tokens_proposed > 0 and engine.num_draft_tokens_accepted > 0
    assert out.token_ids == hf_greedy(str(tiny_llama_dir), repetitive[0], 24, eos_ids=())
    before = engine.num_draft_tokens_proposed
    llm.generate(repetitive * 3, params)  # three running sequences > max_running_seqs: no drafts
    assert engine.num_draft_tokens_proposed == before
