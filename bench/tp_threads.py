"""What a tensor-parallel group on one CPU gains from giving each rank its share of the cores and from exchanging
the ranks' parts through shared memory, in one run:

    python -m bench.tp_threads [--out FILE.json] [--layers 8] [--prompts 8] [--prompt-tokens 512] [--new-tokens 64]

Engines on the same random Llama (bench.tp_kv_push's checkpoint: hidden 512, 8 heads, 4 KV heads) and the same
prompts, `dtype=auto`: one rank with torch's default threads (the anchor); then two ranks as they ran before this
work: each with every core (torch's default) and Gloo over 127.0.0.1; two ranks with their share of the cores
(`engine.parallel.group.threads_per_rank`) and Gloo; and two ranks with their share and shared memory (the default
now: `engine.parallel.shm_collectives`). Reported per engine: prompt tokens/s of a prefill-only pass (one token
each) and generated tokens/s of a decode pass (short prompts, `--new-tokens` each), the median of three timed
passes after a warm-up. On a CPU of few cores two ranks cannot beat one: what this measures is what the ranks'
threads and exchanges cost, not a TP speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.throughput import machine_info
from bench.tp_kv_push import add_model_arguments, model_description, random_prompts, write_checkpoint
from engine import LLM, SamplingParams

REPEATS = 3


def timed(work: Callable[[], int]) -> float:
    """Tokens per second of `work` (which returns the tokens it handled): the median of REPEATS passes."""
    rates = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        tokens = work()
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


@dataclass(frozen=True)
class Engine:
    name: str
    tensor_parallel_size: int
    num_threads: int | None  # None: the engine's default
    shared_memory: bool


def run(model: pathlib.Path, engine: Engine, prompts: list[list[int]], short: list[list[int]],
        new_tokens: int) -> dict[str, Any]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # (each engine starts from torch's default)
    llm = LLM(str(model), tensor_parallel_size=engine.tensor_parallel_size, num_threads=engine.num_threads,
              tensor_parallel_shared_memory=engine.shared_memory, max_num_batched_tokens=4096, num_kv_blocks=1024,
              enable_prefix_caching=False)  # (every pass computes its prompts)
    try:
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        many = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

        def prefill() -> int:
            llm.generate(prompts, one)
            return sum(len(p) for p in prompts)

        def decode() -> int:
            return sum(len(o.token_ids) for o in llm.generate(short, many))

        prefill()
        decode()  # warm-up
        leader = llm.engine.parts.tp_leader
        return {"engine": engine.name, "tensor_parallel_size": engine.tensor_parallel_size,
                "num_threads": engine.num_threads, "threads_per_rank": torch.get_num_threads(),
                "shared_memory": leader is not None and leader.group.shm is not None,
                "dtype": str(llm.engine.parts.pool.compute_dtype),
                "prefill_tokens_per_s": timed(prefill), "decode_tokens_per_s": timed(decode)}
    finally:
        llm.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = random_prompts(rng, args.prompts, args.prompt_tokens)
    short = random_prompts(rng, args.prompts, 16)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(pathlib.Path(tmp), args.layers)
        engines = (Engine("TP=1", 1, None, True), Engine("TP=2, every core, Gloo", 2, cores, False),
                   Engine("TP=2, its share, Gloo", 2, None, False),
                   Engine("TP=2, its share, shared memory", 2, None, True))
        results = [run(model, engine, prompts, short, args.new_tokens) for engine in engines]
    report = {"bench": "tp_threads", "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
              "model": model_description(args.layers),
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "results": results}
    anchor = results[0]
    print(f"{'engine':<34} {'threads/rank':>12} {'prefill tok/s':>14} {'x TP=1':>7} {'decode tok/s':>13} {'x TP=1':>7}")
    for r in results:
        print(f"{r['engine']:<34} {r['threads_per_rank']:>12} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['prefill_tokens_per_s'] / anchor['prefill_tokens_per_s']:>7.2f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['decode_tokens_per_s'] / anchor['decode_tokens_per_s']:>7.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
