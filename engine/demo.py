"""`python -m engine.demo`: chat completions for a few prompts with the default model, timed."""

from __future__ import annotations

import argparse
import time

from engine import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    llm = LLM(args.model, quantization=args.quantization)
    loaded = time.perf_counter()
    print(f"loaded {llm.engine.model_config.name} in {loaded - started:.1f}s "
          f"on {llm.engine.parts.device} ({next(llm.engine.parts.model.parameters()).dtype})")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    elapsed = time.perf_counter() - loaded
    generated = sum(len(o.token_ids) for o in outputs)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        print(f"\n>>> {prompt}\n{out.text.strip()}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    print(f"\n{len(PROMPTS)} prompts, {generated} tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    main()
