"""Draft-model speculation against plain decoding, same engine weights, same prompts, same run.

    python -m bench.throughput --speculative self-int4 [--batch-sizes 1 2 4 8 32 64] [--json out.json]

For each concurrency and each of greedy and temperature 0.8, the same chat prompts run to `max_tokens`
output tokens (ignore_eos) on an engine without speculation (the anchor) and on one with the draft model
and the adaptive switch; the two alternate, `repeats` times with fresh prompts each time, so that the
machine's drift touches both (on a noisy VM one run of a row varies by +-10%): a row reports each arm's
median. Output tokens/s is counted from the first request's arrival to the last token (prefill
included); the speculative arm also gives its acceptance (kept / proposed drafts) and how many steps
speculated. The controller is not reset between rows: it keeps learning, as a server's would.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.throughput import EngineBench
from engine import LLM, SamplingParams, SpeculativeConfig
from engine.outputs import SpecStats

QUESTIONS = (
    "Explain how a hash map works.", "Write a short story about a lighthouse keeper.",
    "What causes the seasons on Earth?", "Describe the water cycle step by step.",
    "Write a Python function that checks whether a number is prime.", "Summarize the plot of Romeo and Juliet.",
    "Give five tips for writing clear emails.", "How does a bicycle stay upright?",
    "Explain recursion to a ten-year-old.", "What are the main differences between TCP and UDP?",
    "Write a poem about the sea at night.", "List the planets of the solar system with one fact each.",
    "How do vaccines train the immune system?", "Describe how to bake a loaf of bread.",
    "What is the difference between weather and climate?", "Explain what a database index is for.",
)


@dataclass(frozen=True)
class SpecRow:
    batch_size: int
    temperature: float
    plain_tok_s: float  # median of the repeats
    spec_tok_s: float
    speedup: float  # of the medians
    plain_runs: tuple[float, ...]
    spec_runs: tuple[float, ...]
    acceptance: float  # accepted / proposed drafts in this row (0 when none proposed)
    drafts_proposed: int
    steps_on: int
    steps_probe: int
    steps_off: int


def chat_prompts(llm: LLM, count: int, offset: int) -> list[list[int]]:
    """`count` distinct chat prompts (a question and a request number)."""
    tok = llm.tokenizer
    texts = [f"{QUESTIONS[(offset + i) % len(QUESTIONS)]} (request {offset + i})" for i in range(count)]
    return [list(tok.apply_chat_template([{"role": "user", "content": text}])) for text in texts]


def _tok_s(bench: EngineBench, prompts: Sequence[list[int]], params: SamplingParams) -> float:
    start, trace = bench.drive(prompts, params)
    return trace.output_tokens / (trace.step_ends[-1] - start)


def _spec_delta(before: SpecStats, after: SpecStats) -> dict[str, Any]:
    proposed = after.draft_tokens_proposed - before.draft_tokens_proposed
    accepted = after.draft_tokens_accepted - before.draft_tokens_accepted
    return {"acceptance": accepted / proposed if proposed else 0.0, "drafts_proposed": proposed,
            **{f"steps_{k}": after.steps[k] - before.steps[k] for k in ("on", "probe", "off")}}


def run_speculative(model: str | None, draft: str, batch_sizes: Sequence[int], max_tokens: int, num_draft_tokens: int,
                    seed: int, num_threads: int | None, repeats: int = 3) -> dict[str, Any]:
    common: dict[str, Any] = {"seed": seed, "num_threads": num_threads, "max_num_seqs": max(128, *batch_sizes)}
    plain = LLM(model, **common)
    spec = LLM(model, **common, speculative=SpeculativeConfig(method="draft", draft_model=draft,
                                                              num_draft_tokens=num_draft_tokens, adaptive=True))
    benches = {"plain": EngineBench(plain), "spec": EngineBench(spec)}
    warm = chat_prompts(plain, 2, 1000)
    for bench in benches.values():
        bench.drive(warm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    rows: list[SpecRow] = []
    offset = 0
    for temperature in (0.0, 0.8):
        for b in batch_sizes:
            # unseeded (a seeded request decodes plainly: one draw per token); the engines' own seed is fixed
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
            plain_runs, spec_runs = [], []
            before = spec.engine.stats().spec
            for _ in range(repeats):
                prompts = chat_prompts(plain, b, offset)
                offset += b
                plain_runs.append(_tok_s(benches["plain"], prompts, params))
                spec_runs.append(_tok_s(benches["spec"], prompts, params))
            after = spec.engine.stats().spec
            assert before is not None and after is not None
            plain_tok_s, spec_tok_s = statistics.median(plain_runs), statistics.median(spec_runs)
            rows.append(SpecRow(b, temperature, plain_tok_s, spec_tok_s, spec_tok_s / plain_tok_s,
                                tuple(plain_runs), tuple(spec_runs), **_spec_delta(before, after)))
            print(f"  temp {temperature} batch {b:3d}: plain {plain_tok_s:7.1f} tok/s, speculative "
                  f"{spec_tok_s:7.1f} ({spec_tok_s / plain_tok_s:.2f}x), acceptance {rows[-1].acceptance:.2f}, "
                  f"steps on/probe/off {rows[-1].steps_on}/{rows[-1].steps_probe}/{rows[-1].steps_off}",
                  flush=True)
    spec.engine.check_integrity()
    return {"draft": draft, "num_draft_tokens": num_draft_tokens, "max_tokens": max_tokens, "repeats": repeats,
            "rows": [asdict(r) for r in rows], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def format_speculative(result: dict[str, Any]) -> str:
    lines = [f"draft {result['draft']}, up to {result['num_draft_tokens']} drafts, {result['max_tokens']} tokens each, "
             f"median of {result['repeats']} alternating runs",
             "temp  batch  plain tok/s  spec tok/s  speedup  acceptance  steps on/probe/off"]
    for r in result["rows"]:
        lines.append(f"{r['temperature']:4.1f}  {r['batch_size']:5d}  {r['plain_tok_s']:11.1f}  {r['spec_tok_s']:10.1f}"
                     f"  {r['speedup']:6.2f}x  {r['acceptance']:10.2f}  {r['steps_on']}/{r['steps_probe']}/"
                     f"{r['steps_off']}")
    return "\n".join(lines)
