"""Weight-only quantized engines: int4 straight from the GGUF's Q4_1 blocks, int8 at load."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.quant import Int4Linear, Int8Linear

PROMPTS = [[{"role": "user", "content": q}] for q in (
    "What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in Spanish.")]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "min_agreement"), [("int8", 0.5), ("int4", 0.3)])
def test_quantized_engine_agrees_with_float(default_model_path, method, min_agreement) -> None:
    params = SamplingParams(temperature=0, max_tokens=24)
    base = LLM(str(default_model_path), num_kv_blocks=64).chat(PROMPTS, params)
    llm = LLM(str(default_model_path), num_kv_blocks=64, quantization=method)
    model = llm.engine.parts.model
    body = Int4Linear if method == "int4" else Int8Linear
    assert isinstance(model.layers[0].self_attn.qkv_proj, body)
    assert isinstance(model.lm_head, Int8Linear)  # logits stay 8-bit in both modes
    outs = llm.chat(PROMPTS, params)
    same = total = 0
    for out, ref in zip(outs, base, strict=True):
        total += len(ref.token_ids)
        for a, b in zip(out.token_ids, ref.token_ids, strict=False):
            if a != b:
                break  # count the agreeing prefix: after a fork, the texts differ by construction
            same += 1
    assert same / total >= min_agreement, f"{method}: {same}/{total} greedy tokens agree"
    # int8 still knows the capital. int4 did on an AMD EPYC (AVX512-BF16), but not on an Intel Xeon with
    # AMX ("L'Étoile, la Marseillaise, ..."): bf16 rounding differs between the two and Q4 sits on a near-tie
    if method == "int8":
        assert "Paris" in outs[0].text, outs[0].text
    llm.engine.check_integrity()
