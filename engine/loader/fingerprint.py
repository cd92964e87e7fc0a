"""What the KV a model writes depends on, as one short string: prefill and decode workers compare it
before any KV moves (kv_transfer.kv_layout), so that two engines with the same architecture but other
weights (a fine-tune, another checkpoint), another quantization or another compute dtype refuse each
other instead of decoding from foreign KV."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import torch

from engine.config import ModelConfig

SAMPLES_PER_TENSOR = 4096  # evenly strided elements hashed from each tensor, besides its name and shape


def weights_fingerprint(weights: Mapping[str, torch.Tensor], config: ModelConfig, compute_dtype: torch.dtype,
                        quantization: str | None, numerics: str = "") -> str:
    """`blake2b` over the model config (RoPE base and scaling, norm eps, windows, caps: numbers the KV
    depends on beyond the shapes) and every checkpoint tensor's name, shape and up to SAMPLES_PER_TENSOR
    of its values (all of a small tensor), then the compute dtype and quantization: e.g.
    `3f9c...|bfloat16|int4`; then `numerics`, where the family's computation changed in a way its KV shows
    (LlamaForCausalLM.kv_numerics), e.g. `3f9c...|bfloat16|none|gemma-norms-fp32`.

    A sample, not every byte, so it costs milliseconds at start-up: a different checkpoint differs in
    nearly every element, and one that differs in a few weights only is not caught."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for name in sorted(weights):
        tensor = weights[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    dtype = str(compute_dtype).removeprefix("torch.")
    return f"{digest.hexdigest()}|{dtype}|{quantization or 'none'}" + (f"|{numerics}" if numerics else "")
