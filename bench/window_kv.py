"""What giving back the blocks behind a sliding window saves (engine.scheduler, engine.kv_groups), against the
same engine keeping every block, in one run: the same long requests through one fixed pool, both ways.

    python -m bench.window_kv [--family mistral|gemma3] [--out FILE.json] [--layers 8] [--window 256]
                              [--requests 8] [--prompt 1024] [--max-tokens 256] [--pool-blocks 256] [--num-threads 2]

The model is random, with the default model's attention (hidden 576, 9 heads, 3 KV heads of 64 dims), written by
transformers into a temporary folder (throughput does not depend on the values): a Mistral with a window in every
layer, or a Gemma 3 text model whose every sixth layer is global (the others windowed), which keeps its windowed
layers' KV in blocks of their own (the hybrid layout; the other mode is `hybrid_kv_cache=False`). The pool is
`--pool-blocks` blocks of every layer in both modes (the same bytes). Reported per mode: peak KV bytes and blocks
held, preemptions, wall time and generated tokens/s; the greedy outputs of the two modes must be equal (checked).
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


def write_checkpoint(out: pathlib.Path, layers: int, window: int, family: str = "mistral") -> pathlib.Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    from engine.loader.api import load_tokenizer

    tokenizer = load_tokenizer(None)
    common = dict(vocab_size=len(tokenizer.hf_tokenizer), hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  max_position_embeddings=8192, sliding_window=window, tie_word_embeddings=True,
                  eos_token_id=list(tokenizer.eos_token_ids), rms_norm_eps=1e-5)
    torch.manual_seed(0)
    if family == "gemma3":
        kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        Gemma3ForCausalLM(Gemma3TextConfig(**common, layer_types=kinds)).save_pretrained(str(out))  # type: ignore[arg-type]
    else:
        MistralForCausalLM(MistralConfig(**common, rope_theta=100_000.0)).save_pretrained(str(out))  # type: ignore[arg-type]
    tokenizer.hf_tokenizer.save_pretrained(str(out))
    return out


def run(model: pathlib.Path, give_back: bool, args: argparse.Namespace) -> tuple[dict[str, Any], list[list[int]]]:
    engine = LLMEngine(EngineConfig(model=str(model), num_kv_blocks=args.pool_blocks, dtype="float32",
                                    max_num_batched_tokens=512, num_threads=args.num_threads,
                                    enable_prefix_caching=False, hybrid_kv_cache=give_back))
    if not give_back:
        engine.scheduler.window = 0
    assert engine.parts.kv_groups.is_hybrid == (give_back and args.family == "gemma3")
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
    block_bytes = engine.kv_pool.spec.bytes_per_block
    groups = engine.parts.kv_groups
    return ({"give_back": give_back, "kv_groups": {"group_size": groups.group_size, "windows": list(groups.windows)},
             "peak_blocks_held": peak,
             "pool_blocks": engine.block_manager.num_blocks, "block_bytes": block_bytes,
             "pool_bytes": block_bytes * engine.block_manager.num_blocks, "peak_bytes_held": peak * block_bytes,
             "preemptions": engine.scheduler.num_preemptions_total,
             "blocks_given_back": engine.scheduler.num_blocks_behind_window_total, "seconds": seconds,
             "generated_tokens": generated, "generated_tokens_per_s": generated / seconds},
            [outputs[f"r{i}"] for i in range(args.requests)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("mistral", "gemma3"), default="mistral")
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
        model = write_checkpoint(pathlib.Path(folder), args.layers, args.window, args.family)
        kept, kept_out = run(model, False, args)
        given, given_out = run(model, True, args)
    if kept_out != given_out:
        raise SystemExit("the two modes gave different outputs")
    result = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
              "keep_every_block": kept, "give_back_behind_window": given,
              "peak_blocks_ratio": kept["peak_blocks_held"] / given["peak_blocks_held"],
              "peak_bytes_ratio": kept["peak_bytes_held"] / given["peak_bytes_held"],
              "throughput_ratio": given["generated_tokens_per_s"] / kept["generated_tokens_per_s"]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
