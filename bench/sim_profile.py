"""Measure a simulation profile (engine.simulated) on this machine's real engine.

    python -m bench.sim_profile [--model PATH] [--output profile.json]

Times the model runner's part of single engine steps (the forward and sampling; the simulated engine runs
the real scheduler itself): a prefill step of N new prompt tokens for each N of `--prefill-tokens`, in
prompts of `--prefill-prompt` tokens, and one of a single prompt of the largest N (the cost of attention); a
decode step of B rows (contexts of `--context` tokens) for each B of `--decode-batches`, median of
`--repeats` steps, every row decoding throughout; and the cost of context, from batch-8 decode steps at two
context lengths. Prompts are random token ids, so the prefix cache serves none of them.

With `--kv-transfer`, also the KV push's link (the profile's kv_s_per_byte and kv_transfer_latency_s): the
real transfer engine pushes this engine's KV pages (its pool's layout and dtype) of a prompt of each of
`--kv-transfer-tokens` tokens from this process to another on this host (bench.transfer's peer, local etcd,
authenticated links as `tandem up`'s) over `--kv-backend` (shm: what a one-host cluster's workers pick),
every layer in the prefill worker's WRITE batches, median of `--repeats`; a least-squares line through
(bytes, seconds) gives seconds per byte (its slope) and a fixed latency (its intercept, >= 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from bench.throughput import FIRST_ORDINARY_ID, machine_info
from bench.transfer import initiator_and_peer, open_segments, push_seconds
from common.settings import apply_ucx_defaults
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.loader.weight_cache import config_to_json
from kv_transfer.kv_layout import KVLayout


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


async def kv_transfer_points(layout: KVLayout, token_counts: list[int], backend: str,
                             repeats: int) -> list[tuple[int, float]]:
    """(bytes, median seconds) of pushing a prompt's KV pages (`layout`'s, every layer) per count of tokens,
    between this process and a peer process over `backend`, authenticated as a cluster's links are."""
    blocks = [-(-n // layout.block_size) for n in token_counts]
    layout = replace(layout, num_blocks=max(blocks) + 1)  # rows per layer, a scratch one included
    size = layout.num_layers * layout.num_blocks * layout.block_bytes
    points = []
    async with initiator_and_peer(size, secrets.token_hex(32)) as (engine, _ready):
        _local, remote = await open_segments(engine, size)
        if backend not in remote.backends:
            raise SystemExit(f"backend {backend} is not available here (the peer offers {remote.backends})")
        push_seconds(engine, layout, list(range(blocks[0])), backend, 3)  # warm-up: links up
        for n in blocks:
            nbytes, _batches, seconds = push_seconds(engine, layout, list(range(n)), backend, repeats)
            points.append((nbytes, seconds))
    return points


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(seconds per byte, intercept seconds) of the least-squares line through `points`, neither below 0, the
    intercept no more than the smallest push's seconds."""
    x, y = np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points])
    if len(points) < 2 or np.ptp(x) == 0:
        raise ValueError("a line needs pushes of at least two sizes")
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:  # noise on sizes too close: the overall rate
        return float(y.max() / x.max()), 0.0
    # a fixed cost is no more than the smallest push took (noise on a large push can tilt the line)
    return float(slope), min(max(float(intercept), 0.0), float(y[x.argmin()]))


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
    p.add_argument("--kv-transfer", action="store_true",
                   help="also measure the KV push's link (kv_s_per_byte, kv_transfer_latency_s)")
    p.add_argument("--kv-backend", default="shm", choices=("shm", "tcp", "nixl"),
                   help="with --kv-transfer: the transfer backend (shm: a one-host cluster's)")
    p.add_argument("--kv-transfer-tokens", type=int, nargs="+", default=[128, 512, 2048, 8192],
                   help="with --kv-transfer: prompts of these many tokens are pushed")
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
    if args.kv_transfer:
        apply_ucx_defaults()
        layout = KVLayout.of_pool(engine.parts.pool, engine.model_config)
        points = asyncio.run(kv_transfer_points(layout, args.kv_transfer_tokens, args.kv_backend, args.repeats))
        s_per_byte, latency = fit_line(points)
        profile["kv_s_per_byte"], profile["kv_transfer_latency_s"] = s_per_byte, latency
        profile["source"] += (f"; KV push: {args.kv_backend} between two processes, authenticated, {layout.dtype} "
                              f"pages, python -m bench.sim_profile --kv-transfer")
        profile["kv_transfer_measured"] = [list(point) for point in points]  # (bytes, seconds): not loaded
        print(f"KV push over {args.kv_backend}: {1 / s_per_byte / 1e9:.2f} GB/s, {latency * 1e3:.2f} ms + "
              f"bytes / rate; points {points}", file=sys.stderr)
    text = json.dumps(profile, indent=1)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
