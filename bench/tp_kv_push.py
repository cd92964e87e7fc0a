"""KV moved between prefill and decode workers of tensor-parallel groups, equal and mixed degrees, in one run:

    python -m bench.tp_kv_push [--out FILE.json] [--layers 8] [--prompts 8] [--prompt-tokens 512]
                               [--configs 1:1,2:2,2:1,1:2,4:2]

Each configuration (`P:D`: the prefill worker's degree, the decode worker's) is a `tandem up` cluster of one prefill
and one decode worker on this machine, fed the same prompts one at a time (one token each, so the decode worker
prefills remotely). Reported per configuration: the KV bytes each link (prefill rank -> decode rank) carried per
prefill, from the prefill worker's `tandem_kv_pushed_bytes_total`; the decode worker's remote-prefill phases
(`tandem_remote_prefill_seconds`: the Prefill call, in which the prompt is computed and its KV pushed layer by layer,
and the tail after it until every page landed), and the time to first token at the client. 1:1 is the anchor.

The model is random, written by transformers into a temporary folder: a Llama with the default model's tokenizer,
hidden 512, 8 query and 4 KV heads of 64 dims (so degrees 1, 2 and 4 split its KV heads; at 8 they would
replicate). On a CPU of few cores every rank shares them: a speed-up from tensor parallelism cannot show here, and the
times say what moving the KV costs at each degree, not what the degree would gain on one device per rank.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import re
import statistics
import tempfile
import time
from typing import Any

import grpc
import torch

from bench.scrape import metric, worker_metrics
from bench.throughput import machine_info
from cluster.up_process import tandem_up
from engine.loader.api import load_tokenizer
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the benches on this checkpoint (this one's and bench.tp_threads): output, model and prompts."""
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)


def random_prompts(rng: random.Random, count: int, length: int) -> list[list[int]]:
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(count)]


def model_description(layers: int) -> str:
    return f"random Llama, {layers} layers, hidden 512, 8 heads, 4 KV heads x 64"


def write_checkpoint(out: pathlib.Path, layers: int) -> pathlib.Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer.hf_tokenizer), hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         eos_token_id=list(tokenizer.eos_token_ids), bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.hf_tokenizer.save_pretrained(str(out))
    return out


async def first_token_seconds(address: str, ids: list[int]) -> float:
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(temperature=0.0, max_tokens=1, ignore_eos=True),
                                 timeout_seconds=120)
    request.token_ids.ids.extend(ids)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        async for _ in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            return time.perf_counter() - started
    raise RuntimeError("no token came back")


def histogram_mean(text: str, name: str, **labels: str) -> float:
    count = metric(text, f"{name}_count", **labels)
    return metric(text, f"{name}_sum", **labels) / count if count else 0.0


def run(model: pathlib.Path, prefill_tp: int, decode_tp: int, warm_up: list[int],
        prompts: list[list[int]]) -> dict[str, Any]:
    with tandem_up("--prefill", "1", "--decode", "1", "--prefill-tensor-parallel-size", str(prefill_tp),
                   "--decode-tensor-parallel-size", str(decode_tp), "--dtype", "float32", "--num-kv-blocks", "512",
                   "--min-remote-prefill-tokens", "8", "--model", str(model)) as cluster:
        asyncio.run(first_token_seconds(cluster.grpc_address, warm_up))  # (as long as the others: bytes alike)
        before = worker_metrics(cluster.role("decode")[0])
        ttft = [asyncio.run(first_token_seconds(cluster.grpc_address, p)) for p in prompts]
        prefill, decode = worker_metrics(cluster.role("prefill")[0]), worker_metrics(cluster.role("decode")[0])
    remote = (metric(decode, "tandem_disaggregation_decisions_total", decision="remote")
              - metric(before, "tandem_disaggregation_decisions_total", decision="remote"))
    links: dict[str, float] = {}
    for line in prefill.splitlines():
        found = re.match(r'tandem_kv_pushed_bytes_total\{(.*)\} (\S+)', line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            links[f"{labels['source_rank']}->{labels['dest_rank']}"] = float(found.group(2))
    calls = len(prompts) + 1  # (the warm-up's push counted too: per prefill, over every prefill)
    return {"prefill_tp": prefill_tp, "decode_tp": decode_tp, "remote_prefills": remote,
            "bytes_per_prefill_by_link": {link: total / calls for link, total in sorted(links.items())},
            "bytes_per_prefill": sum(links.values()) / calls,
            "rpc_seconds_mean": histogram_mean(decode, "tandem_remote_prefill_seconds", phase="rpc"),
            "kv_tail_seconds_mean": histogram_mean(decode, "tandem_remote_prefill_seconds", phase="kv_tail"),
            "ttft_seconds_median": statistics.median(ttft), "ttft_seconds": ttft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--configs", default="1:1,2:2,2:1,1:2,4:2")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    prompts = random_prompts(random.Random(0), args.prompts + 1, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(pathlib.Path(tmp), args.layers)
        results = [run(model, p, d, prompts[0], prompts[1:]) for p, d in configs]
    report = {"bench": "tp_kv_push", "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
              "model": f"{model_description(args.layers)}, fp32",
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "results": results}
    print(f"{'P:D':>5} {'bytes/prefill':>14} {'links (bytes/prefill)':<44} {'rpc ms':>8} {'tail ms':>8} "
          f"{'TTFT ms':>8}")
    for r in results:
        links = ", ".join(f"{k}: {v / 1e6:.2f} MB" for k, v in r["bytes_per_prefill_by_link"].items())
        print(f"{r['prefill_tp']}:{r['decode_tp']:<3} {r['bytes_per_prefill'] / 1e6:>11.2f} MB {links:<44} "
              f"{1e3 * r['rpc_seconds_mean']:>8.1f} {1e3 * r['kv_tail_seconds_mean']:>8.2f} "
              f"{1e3 * r['ttft_seconds_median']:>8.1f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
