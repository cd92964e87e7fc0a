"""Greedy decoding with Hugging Face transformers in fp32: the correctness oracle."""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import torch


@functools.cache
def load_hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    source = pathlib.Path(path)
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model.eval()


def hf_greedy(path: str, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int]) -> list[int]:
    """Greedy continuation with transformers' own KV cache; stops after an eos token (kept).
    Memoized: many engine configurations are checked against the same references."""
    return list(_hf_greedy(path, tuple(prompt_ids), max_new_tokens, tuple(eos_ids)))


@functools.cache
@torch.inference_mode()
def _hf_greedy(path: str, prompt_ids: tuple[int, ...], max_new_tokens: int,
               eos_ids: tuple[int, ...]) -> tuple[int, ...]:
    model = load_hf_model(path)
    out = model(torch.tensor([list(prompt_ids)]), use_cache=True)
    cache = out.past_key_values
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token in eos_ids:
            break
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return tuple(generated)
