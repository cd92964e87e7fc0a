"""Structured-output overhead: decode tokens/s with a JSON schema against the same prompts free, in
the same run, at several concurrencies.

    python -m bench.structured_output [--model PATH] [--batch-sizes 1 8 32] [--json out.json]

The schema asks for a list of at least 40 people (name, age, city), so no constrained request can
end before max_tokens: both runs generate exactly the same number of
tokens per request (the free run ignores eos), and the difference is the grammar's cost (mask
fill, unpack and apply, matcher advance) plus the float copy of the logits it needs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench.throughput import BenchConfig, DecodeRun, EngineBench, PromptSource, _make_llm, machine_info
from engine import SamplingParams
from engine.grammar import GrammarMasker
from engine.sampler import SequenceSamplingState
from engine.structured_output import StructuredOutput

# at least 40 small objects (~19 tokens each), so no constrained request ends before max_tokens; a
# string with a large minLength would not do: xgrammar's cost of advancing inside one grows with
# its position (measured: 0.3 ms for 32 matchers at its start, 14 ms 80 tokens in)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"], "properties": {"people": {
    "type": "array", "minItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
        "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                       "city": {"enum": ["Paris", "Tokyo", "Lima"]}}}}}}


class _GrammarTimer:
    """Wall time spent in the grammar's work: filling and applying the batch's masks
    (`GrammarMasker.apply`) and advancing the matchers (`append` of a constrained sequence). Wraps
    those methods for the life of the process: a benchmark only."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original_apply, original_append = GrammarMasker.apply, SequenceSamplingState.append

        def apply(masker: GrammarMasker, *args: Any) -> None:
            started = time.perf_counter()
            original_apply(masker, *args)
            self.seconds += time.perf_counter() - started

        def append(state: SequenceSamplingState, token_id: int) -> None:
            started = time.perf_counter()
            original_append(state, token_id)
            if state.matcher is not None:
                self.seconds += time.perf_counter() - started

        GrammarMasker.apply = apply  # type: ignore[method-assign]
        SequenceSamplingState.append = append  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds = 0.0


def run(cfg: BenchConfig) -> dict[str, Any]:
    llm = _make_llm(cfg, None)
    bench = EngineBench(llm)
    source = PromptSource(llm.engine.model_config.vocab_size, cfg.seed)
    free = SamplingParams(temperature=0, max_tokens=cfg.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=cfg.max_tokens,
                                 structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    bench.drive(source.take(2, cfg.prompt_len), constrained)  # compile the grammar, warm the caches
    bench.drive(source.take(2, cfg.prompt_len), free)
    grammar_timer = _GrammarTimer()
    rows = []
    for batch in cfg.batch_sizes:
        grammar_ms: dict[str, float] = {}
        prompts = source.take(batch, cfg.prompt_len)
        runs: dict[str, DecodeRun] = {}
        # alternating free / constrained / constrained / free, each mode's faster run kept: the first
        # run at a new batch size pays one-time costs that would otherwise land on one mode
        order = (("free", free), ("json_schema", constrained), ("json_schema", constrained), ("free", free))
        for name, params in order:
            grammar_timer.reset()
            measured = bench.decode_with(prompts, params)
            grammar_ms[name] = grammar_timer.seconds * 1e3 / max(measured.decode_steps + measured.prefill_steps, 1)
            if measured.output_tokens != batch * cfg.max_tokens:
                raise RuntimeError(f"{name} at batch {batch}: {measured.output_tokens} tokens, expected "
                                   f"{batch * cfg.max_tokens} (a constrained request ended early?)")
            if name not in runs or (measured.decode_tok_s or 0) > (runs[name].decode_tok_s or 0):
                runs[name] = measured
            llm.engine.reset_prefix_cache()
        ratio = (runs["json_schema"].decode_tok_s or 0) / (runs["free"].decode_tok_s or 1)
        step_ms = runs["json_schema"].decode_s * 1e3 / max(runs["json_schema"].decode_steps, 1)
        rows.append({"batch_size": batch, "free": asdict(runs["free"]), "json_schema": asdict(runs["json_schema"]),
                     "decode_ratio": ratio, "overhead": 1 - ratio, "grammar_ms_per_step": grammar_ms["json_schema"],
                     "constrained_step_ms": step_ms})
        print(f"batch {batch:3d}: free {runs['free'].decode_tok_s:8.1f} tok/s   json_schema "
              f"{runs['json_schema'].decode_tok_s:8.1f} tok/s   overhead {100 * (1 - ratio):5.1f}%   grammar "
              f"{grammar_ms['json_schema']:.2f} ms of a {step_ms:.1f} ms step", flush=True)
    return {"machine": machine_info(), "config": {"batch_sizes": list(cfg.batch_sizes), "prompt_len": cfg.prompt_len,
            "max_tokens": cfg.max_tokens, "model": cfg.model, "schema": SCHEMA}, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len,
                      max_tokens=args.max_tokens, profile_batch=None, skip_hf=True)
    result = run(cfg)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
