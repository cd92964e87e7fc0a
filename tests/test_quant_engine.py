"""Weight-only quantized engines: int4 straight from the GGUF's Q4_1 blocks, int8 at load."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.quant_layers import Int4Linear, Int8Linear

PROMPTS = [[{"role": "user", "content": q}] for q in (
    "What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in Spanish.")]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "min_agreement"), [("int8", 0.9), ("int4", 0.75)])
def test_quantized_engine_agrees_with_float(default_model_path, method, min_agreement) -> None:
    """Next-token agreement on the float model's own greedy trajectory (teacher forcing).

    Comparing free-running greedy texts would count everything after the first fork as wrong, and a
    single near-tie decides where the fork falls (int8's first token for "Name three colors." sits
    0.1 nats from the runner-up and flips with the summation order of the C kernels). Here every
    position is judged on the same prefix, so one near-tie costs one token.
    """
    params = SamplingParams(temperature=0, max_tokens=24)
    base = LLM(str(default_model_path), num_kv_blocks=64).chat(PROMPTS, params)
    llm = LLM(str(default_model_path), num_kv_blocks=64, quantization=method)
    model = llm.engine.parts.model
    body = Int4Linear if method == "int4" else Int8Linear
    assert isinstance(model.layers[0].self_attn.qkv_proj, body)
    assert isinstance(model.lm_head, Int8Linear)  # logits stay 8-bit in both modes
    assert model.layers[0].self_attn.qkv_proj.c_kernel is not None and model.lm_head.c_kernel is not None
    prefixes = [ref.prompt_token_ids + ref.token_ids[:i] for ref in base for i in range(len(ref.token_ids))]
    expected = [t for ref in base for t in ref.token_ids]
    outs = llm.generate(prefixes, SamplingParams(temperature=0, max_tokens=1))
    same = sum(out.token_ids[0] == want for out, want in zip(outs, expected, strict=True))
    assert same / len(expected) >= min_agreement, f"{method}: {same}/{len(expected)} next tokens agree"
    # int8 still knows the capital, asked on the float answer's own words ("The capital of France is"):
    # free-running, the first word is a near-tie ('The' and 'L' 0.003 nats apart in int8 on an AMX Xeon in
    # bf16) and the answer after 'L' goes elsewhere; int4 did not know it even so on that machine
    if method == "int8":
        answer = base[0].token_ids
        paris = next((i for i, t in enumerate(answer) if llm.tokenizer.decode([t]).strip() == "Paris"), None)
        assert paris is not None, f"the float model's answer names no Paris: {base[0].text!r}"
        forced = llm.generate([base[0].prompt_token_ids + answer[:paris]], SamplingParams(temperature=0, max_tokens=1))
        assert forced[0].token_ids == [answer[paris]]
    llm.engine.check_integrity()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_moe_experts_are_quantized_and_the_router_stays_float(tiny_mixtral_dir, method: str) -> None:
    """(int4's kernel refuses a 4-row router anyway, so only int8 would quantize it here.)"""
    llm = LLM(str(tiny_mixtral_dir), num_kv_blocks=32, dtype="float32", quantization=method)
    layer = llm.engine.parts.model.layers[0]
    kind = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(layer.self_attn.qkv_proj, kind)
    for expert in layer.mlp.experts:
        assert isinstance(expert.gate_up_proj, kind) and isinstance(expert.down_proj, kind)
    assert not isinstance(layer.mlp.gate, Int4Linear | Int8Linear)  # routing is decided in float
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    llm.engine.check_integrity()
