"""One MoE layer, the engine's against transformers', on the same weights and inputs, in the same run:

    python -m bench.moe_layer MODEL_DIR [--batch-sizes 1 32] [--layer 0] [--json out.json]

For each batch size (tokens of one decode step), times in fp32 (median of `--repeats` after warm-up):
the engine's whole `SparseMoE` layer (its linears packed as the engine packs them on CPU) and its
three parts as it runs them (engine/models/moe.py): routing (router matmul, softmax, top-k,
renormalise), dispatch (sort the (token, expert) pairs by expert, count them, read the counts
back) and experts (per expert with tokens: gather, gate/up matmul, SiLU-mul, down matmul, weigh,
add back); and transformers' `MixtralSparseMoeBlock` on the same hidden states, with the experts
implementation transformers picks by default (recorded: `grouped_mm` in 5.23). Inputs are the
hidden states transformers' own forward gives one random prompt of that many tokens at that
layer's MLP input (so routing sees real activations, not noise; positions of one prompt, not
independent decode tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch

from bench.timing import median_seconds
from engine.loader.api import load_model
from engine.loader.engine_parts import build_model
from engine.loader.packing import pack_linears
from engine.models.moe import SparseMoE
from engine.platform import detect_platform


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=3) * 1e3


def layer_inputs(hf_model: torch.nn.Module, layer: int, tokens: int, vocab: int) -> torch.Tensor:
    """[tokens, hidden]: the MLP input of `layer` for one random prompt of `tokens` tokens (transformers' forward)."""
    captured: list[torch.Tensor] = []
    mlp = hf_model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().clone()))
    try:
        generator = torch.Generator().manual_seed(tokens)
        ids = torch.randint(10, vocab, (1, tokens), generator=generator)
        with torch.inference_mode():
            hf_model(ids)
    finally:
        handle.remove()
    return captured[0].reshape(tokens, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    loaded = load_model(args.model)
    engine_model = build_model(loaded, detect_platform("cpu"), torch.float32)
    pack_linears(engine_model, deterministic=False)  # as the engine does on CPU (engine_parts)
    moe = engine_model.layers[args.layer].mlp
    assert isinstance(moe, SparseMoE), f"layer {args.layer} has no MoE MLP"
    hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    hf_block = hf_model.model.layers[args.layer].mlp
    rows = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = layer_inputs(hf_model, args.layer, batch, loaded.config.vocab_size)
            weights, experts = moe.route(x)
            order, counts = moe.dispatch(experts)
            torch.testing.assert_close(moe(x), hf_block(x[None])[0], atol=1e-5, rtol=1e-4)  # the same layer
            row = {
                "batch": batch,
                "experts_used": sum(1 for n in counts if n),
                "engine_ms": median_ms(lambda x=x: moe(x), args.repeats),
                "routing_ms": median_ms(lambda x=x: moe.route(x), args.repeats),
                "dispatch_ms": median_ms(lambda e=experts: moe.dispatch(e), args.repeats),
                "experts_ms": median_ms(lambda x=x, w=weights, o=order, c=counts: moe.run_experts(x, w, o, c),
                                        args.repeats),
                "transformers_ms": median_ms(lambda x=x: hf_block(x[None]), args.repeats),
            }
            row["engine_vs_transformers"] = row["transformers_ms"] / row["engine_ms"]
            rows.append(row)
            print(f"batch {batch:3d}: engine {row['engine_ms']:.3f} ms (routing {row['routing_ms']:.3f}, dispatch "
                  f"{row['dispatch_ms']:.3f}, experts {row['experts_ms']:.3f}; {row['experts_used']} experts used), "
                  f"transformers {row['transformers_ms']:.3f} ms: {row['engine_vs_transformers']:.2f}x", flush=True)
    result = {"model": args.model, "layer": args.layer, "moe": vars(loaded.config.moe), "rows": rows,
              "transformers_experts_implementation": getattr(hf_model.config, "_experts_implementation", None),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
