"""Measure a simulation profile (engine.simulated) on this machine's real engine.

    python -m bench.sim_profile [--model PATH] [--output profile.json]

Times the model runner's part of single engine steps (the forward and sampling; the simulated engine runs
the real scheduler itself): a prefill step of N new prompt tokens for each N of `--prefill-tokens`, in
prompts of `--prefill-prompt` tokens, and one of a single prompt of the largest N (the cost of attention); a
decode step of B rows (contexts of `--context` tokens) for each B of `--decode-batches`, median of
`--repeats` steps, every row decoding throughout; and the cost of context, from batch-8 decode steps at two
context lengths. Prompts are random token ids, so the prefix cache serves none of them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from bench.throughput import FIRST_ORDINARY_ID, machine_info
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.loader.weight_cache import config_to_json


class StepTimer:
    def __init__(self, engine: LLMEngine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.vocab = engine.model_config.vocab_size
        self.count = 0
        self.executed: list[float] = []  # seconds of each runner.execute call
        run = engine.runner.execute

        def timed(plan):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return run(plan)
            finally:
                self.executed.append(time.perf_counter() - started)

        engine.runner.execute = timed  # type: ignore[method-assign]

    def _prompt(self, length: int) -> list[int]:
        return [self.rng.randrange(FIRST_ORDINARY_ID, self.vocab) for _ in range(length)]

    def _add(self, length: int, max_tokens: int) -> str:
        self.count += 1
        request = self.engine.make_request(f"p{self.count}", self._prompt(length),
                                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        self.engine.add_request(request)
        return request.request_id

    def _step(self) -> float:
        """The runner's seconds in one engine step."""
        self.executed.clear()
        self.engine.step()
        return sum(self.executed)

    def prefill(self, tokens: int, repeats: int, prompt: int | None = None) -> float:
        """Median seconds of the model on one step of `tokens` new prompt tokens: prompts of `prompt` tokens
        (the last one shorter), or one prompt (None)."""
        times = []
        for _ in range(repeats):
            size = prompt or tokens
            for start in range(0, tokens, size):
                self._add(min(size, tokens - start), 1)
            times.append(self._step())
            assert not self.engine.has_unfinished_requests(), f"{tokens} prompt tokens took more than one step"
        return statistics.median(times)

    def decode(self, batch: int, context: int, repeats: int) -> float:
        """Median seconds of the model on a decode step of `batch` rows, each attending to about `context`
        tokens; none ends meanwhile (aborted after)."""
        ids = [self._add(context, 10**6) for _ in range(batch)]
        while self.engine.scheduler.waiting or any(s.in_prefill for s in self.engine.scheduler.running):
            self.engine.step()
        assert len(self.engine.scheduler.running) == batch, "the KV pool holds fewer rows than the batch"
        times = [self._step() for _ in range(repeats)]
        for request_id in ids:
            self.engine.abort_request(request_id)
        return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--name", default="", help="the profile's name (default: the model's)")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 2048])
    p.add_argument("--prefill-prompt", type=int, default=64,
                   help="the prefill curve's prompts are this long (packed into one step); one prompt of the "
                        "largest --prefill-tokens against as many packed ones gives the cost of attention")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--long-context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (as the workers' --num-threads)")
    p.add_argument("--output", default="-")
    args = p.parse_args(argv)
    longest, prompt = max(args.prefill_tokens), args.prefill_prompt
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=max(*args.decode_batches, 8, -(-longest // prompt)),
                                    max_num_batched_tokens=longest, num_kv_blocks=4096, num_threads=args.num_threads))
    timer = StepTimer(engine)
    timer.prefill(64, 2)  # warm-up
    prefill = [[n, timer.prefill(n, args.repeats, prompt)] for n in args.prefill_tokens]
    packed = dict((n, t) for n, t in prefill)[longest]
    single = timer.prefill(longest, args.repeats)
    # pairs: a prompt of L tokens has L(L+1)/2; the packed step, about `longest` (prompt + 1) / 2
    extra_pairs = longest * (longest + 1) / 2 - longest * (prompt + 1) / 2
    attention_s_per_pair = max(single - packed, 0.0) / extra_pairs if extra_pairs > 0 else 0.0
    decode = [[b, timer.decode(b, args.context, args.repeats)] for b in args.decode_batches]
    short, long = timer.decode(8, args.context, args.repeats), timer.decode(8, args.long_context, args.repeats)
    context_s_per_token = max(long - short, 0.0) / (8 * (args.long_context - args.context))
    info = machine_info()
    config = json.loads(config_to_json(engine.model_config))
    profile = {
        "name": args.name or engine.model_config.name, "tokenizer": args.model,
        "source": (f"measured: {info['cpu_model']} ({', '.join(info['cpu_features'])}), {info['usable_cores']} cores, "
                   f"{args.num_threads or 'default'} torch threads, "
                   f"{engine.parts.pool.compute_dtype}, {info['date']}, python -m bench.sim_profile"),
        "model": config, "prefill": prefill, "decode": decode, "decode_context": args.context,
        "context_s_per_token": context_s_per_token, "prefill_prompt": prompt,
        "attention_s_per_pair": attention_s_per_pair}
    text = json.dumps(profile, indent=1)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
