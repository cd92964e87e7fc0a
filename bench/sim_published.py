"""Simulation profiles for hardware this machine does not have, written from published figures: a GPU's
datasheet peaks and a model's published shape, through a roofline at stated efficiencies. Not measured:
each profile's `source` says so and names its figures and assumptions.

    python -m bench.sim_published --gpu h100-sxm --model llama-3.1-8b --output profile.json

The model: a step reads every weight once (memory-bound) or computes 2 FLOPs per weight per token
(compute-bound), whichever is longer, plus a fixed per-step cost; attention adds 4 FLOPs per head
dimension per (token, attended position) pair in prefill, and a decode row reads its context's KV. The
workers use the default model's tokenizer: the profile's vocabulary is that tokenizer's (the simulated
model picks ids below it), while the step times count the published model's own output layer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from engine.config import ModelConfig
from engine.loader.api import load_tokenizer
from engine.simulated.profile import SimulationProfile


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float  # dense, per second
    memory_bytes_per_s: float
    source: str


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    max_positions: int
    source: str

    @property
    def matmul_weights(self) -> int:
        """Weights every token multiplies through (the embedding is a lookup; the output layer counts)."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attention = qkv + self.heads * self.head_dim * self.hidden
        return self.layers * (attention + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:  # bf16 K and V of every layer
        return self.layers * 2 * self.kv_heads * self.head_dim * 2


GPUS = {
    "h100-sxm": Gpu("NVIDIA H100 SXM5 80GB", 989e12, 3.35e12,
                    "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOPS BF16 dense, 3.35 TB/s HBM3"),
    "a100-sxm": Gpu("NVIDIA A100 SXM4 80GB", 312e12, 2.039e12,
                    "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense, 2,039 GB/s HBM2e"),
}
SHAPES = {
    "llama-3.1-8b": Shape("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, 500000.0, 131072,
                          "Meta Llama 3.1 8B config.json: hidden 4096, 32 layers, 32 heads, 8 KV heads, "
                          "intermediate 14336, vocabulary 128256"),
}


def published_profile(gpu: Gpu, shape: Shape, compute_efficiency: float, memory_efficiency: float,
                      step_overhead_s: float, tokenizer_vocab: int, prefill_prompt: int = 64,
                      decode_context: int = 128) -> SimulationProfile:
    flops, memory = gpu.bf16_flops * compute_efficiency, gpu.memory_bytes_per_s * memory_efficiency
    weights_s = 2 * shape.matmul_weights / memory  # bf16 weights read once per step
    token_s = 2 * shape.matmul_weights / flops  # compute per token
    pair_s = 4 * shape.layers * shape.heads * shape.head_dim / flops
    kv_token_s = shape.kv_bytes_per_token / memory

    def prefill(n: int) -> float:  # prompts of `prefill_prompt` tokens: n (prompt + 1) / 2 pairs
        return step_overhead_s + max(weights_s, n * token_s) + pair_s * n * (prefill_prompt + 1) / 2

    def decode(rows: int) -> float:
        return step_overhead_s + max(weights_s, rows * token_s) + rows * decode_context * kv_token_s

    model = ModelConfig(name=shape.name, architecture="llama", vocab_size=tokenizer_vocab, hidden_size=shape.hidden,
                        intermediate_size=shape.intermediate, num_layers=shape.layers, num_heads=shape.heads,
                        num_kv_heads=shape.kv_heads, head_dim=shape.head_dim, rope_theta=shape.rope_theta,
                        max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        eos_token_ids=())
    source = (f"published, not measured: {gpu.source}; {shape.source}; roofline at {compute_efficiency:.0%} of "
              f"the compute peak and {memory_efficiency:.0%} of the memory bandwidth, {step_overhead_s * 1e3:g} ms "
              f"per step; vocabulary {tokenizer_vocab} (the default model's tokenizer), the output layer's "
              f"time of {shape.vocab}; python -m bench.sim_published")
    return SimulationProfile(name=f"{shape.name} on {gpu.name}", source=source, model=model, tokenizer=None,
                             prefill=tuple((n, prefill(n)) for n in (16, 64, 256, 1024, 2048, 8192)),
                             decode=tuple((b, decode(b)) for b in (1, 4, 16, 64, 256)),
                             context_s_per_token=kv_token_s, decode_context=decode_context,
                             attention_s_per_pair=pair_s, prefill_prompt=prefill_prompt)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_published", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100-sxm")
    p.add_argument("--model", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--compute-efficiency", type=float, default=0.5, help="share of the BF16 peak reached")
    p.add_argument("--memory-efficiency", type=float, default=0.7, help="share of the memory bandwidth reached")
    p.add_argument("--step-overhead-ms", type=float, default=0.5, help="fixed cost of every step")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    profile = published_profile(GPUS[args.gpu], SHAPES[args.model], args.compute_efficiency, args.memory_efficiency,
                                args.step_overhead_ms / 1e3, load_tokenizer(None).vocab_size)
    with open(args.output, "w") as f:
        f.write(profile.to_json() + "\n")
    print(json.dumps({k: v for k, v in asdict(profile).items() if k != "model"}, indent=1))


if __name__ == "__main__":
    main()
