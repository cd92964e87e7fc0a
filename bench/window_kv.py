"""What giving back the blocks behind a sliding window saves (engine.scheduler), against the same engine
keeping every block, in one run: the same long requests through one fixed pool, both ways.

    python -m bench.window_kv [--out FILE.json] [--layers 8] [--window 256] [--requests 8]
                              [--prompt 1024] [--max-tokens 256] [--pool-blocks 256] [--num-threads 2]

The model is a random Mistral with the default model's attention (hidden 576, 9 heads, 3 KV heads), a window
in every layer, written by transformers into a temporary folder (throughput does not depend on the values).
Reported per mode: peak blocks held, preemptions, wall time and generated tokens/s; the greedy outputs of the
two modes must be equal (checked).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Any

import torch

from bench.throughput import machine_info
from engine import EngineConfig, LLMEngine, SamplingParams


def write_checkpoint(out: pathlib.Path, layers: int, window: int) -> pathlib.Path:
    from transformers import MistralConfig, MistralForCausalLM

    from engine.loader.api import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = MistralConfig(vocab_size=len(tokenizer.hf_tokenizer), hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                           max_position_embeddings=8192, rope_theta=100_000.0, sliding_window=window,
                           tie_word_embeddings=True, eos_token_id=list(tokenizer.eos_token_ids), rms_norm_eps=1e-5)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(str(out))
    tokenizer.hf_tokenizer.save_pretrained(str(out))
    return out


def run(model: pathlib.Path, give_back: bool, args: argparse.Namespace) -> tuple[dict[str, Any], list[list[int]]]:
    engine = LLMEngine(EngineConfig(model=str(model), num_kv_blocks=args.pool_blocks, dtype="float32",
                                    max_num_batched_tokens=512, num_threads=args.num_threads,
                                    enable_prefix_caching=False))
    if not give_back:
        engine.scheduler.window = 0
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for i in range(args.requests):
        prompt = [(97 * i + 31 * j) % 40_000 + 200 for j in range(args.prompt)]
        engine.add_request(engine.make_request(f"r{i}", prompt, params))
    outputs: dict[str, list[int]] = {}
    peak = 0
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.token_ids
        peak = max(peak, engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
    seconds = time.perf_counter() - started
    engine.check_integrity()
    generated = sum(len(t) for t in outputs.values())
    return ({"give_back": give_back, "peak_blocks_held": peak, "pool_blocks": args.pool_blocks,
             "preemptions": engine.scheduler.num_preemptions_total,
             "blocks_given_back": engine.scheduler.num_blocks_behind_window_total, "seconds": seconds,
             "generated_tokens": generated, "generated_tokens_per_s": generated / seconds},
            [outputs[f"r{i}"] for i in range(args.requests)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--pool-blocks", type=int, default=256)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = write_checkpoint(pathlib.Path(folder), args.layers, args.window)
        kept, kept_out = run(model, False, args)
        given, given_out = run(model, True, args)
    if kept_out != given_out:
        raise SystemExit("the two modes gave different outputs")
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
              "keep_every_block": kept, "give_back_behind_window": given,
              "peak_blocks_ratio": kept["peak_blocks_held"] / given["peak_blocks_held"],
              "throughput_ratio": given["generated_tokens_per_s"] / kept["generated_tokens_per_s"]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
