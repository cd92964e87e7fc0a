"""A random Mixtral checkpoint for the MoE benchmarks (bench.throughput --model, bench.moe_layer),
with the default model's tokenizer, written by transformers itself:

    python -m bench.moe_checkpoint OUT_DIR [--layers 8] [--experts 8] [--top-k 2]

The default shape is the default model's attention (hidden 576, 9 heads, 3 KV heads) with each MLP
replaced by 8 experts of width 768, top-2: about 113 M parameters, 8 layers (the engine's fp32
weights: ~450 MB). Random weights route tokens about evenly; throughput does not depend on the values.
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from engine.loader.api import load_tokenizer


def write_checkpoint(out: pathlib.Path, layers: int, experts: int, top_k: int, expert_width: int,
                     seed: int = 0) -> pathlib.Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = load_tokenizer(None)
    config = MixtralConfig(vocab_size=len(tokenizer.hf_tokenizer), hidden_size=576, intermediate_size=expert_width,
                           num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                           max_position_embeddings=8192, rope_theta=100_000.0, num_local_experts=experts,
                           num_experts_per_tok=top_k, sliding_window=None, tie_word_embeddings=True,
                           eos_token_id=list(tokenizer.eos_token_ids), bos_token_id=None, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    MixtralForCausalLM(config).save_pretrained(str(out))
    tokenizer.hf_tokenizer.save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=768)
    args = parser.parse_args()
    print(write_checkpoint(args.out, args.layers, args.experts, args.top_k, args.expert_width))


if __name__ == "__main__":
    main()
