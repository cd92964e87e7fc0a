"""Checkpoint tensors stored in other layouts than the Hugging Face per-projection names every loader
and check uses (`engine.loader.api.expected_shapes`), put into them: Phi-3's fused q/k/v and gate/up,
GGUF's experts stacked per layer, and Gemma's GGUF norms (stored as 1 + w)."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM

# GGUF's stacked experts of layer i, [experts, out, in] each, before `unstack_experts`
STACKED_EXPERTS = ("gate_exps", "up_exps", "down_exps")
STACKED_PREFIX = "model.layers.{layer}.stacked_experts."
ROUTER = "model.layers.{layer}.stacked_router.weight"


def split_phi3_fused_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Phi-3 holds q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (gate first): split them, in
    place, into Llama's names (the model fuses them again). Returns {new name: the name it came from}."""
    origins: dict[str, str] = {}
    sizes = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim,
             config.num_kv_heads * config.head_dim)
    for i in range(config.num_layers):
        pre = f"model.layers.{i}"
        for fused, module, parts, split in ((f"{pre}.self_attn.qkv_proj.weight", "self_attn", "qkv", sizes),
                                            (f"{pre}.mlp.gate_up_proj.weight", "mlp", ("gate", "up"), None)):
            tensor = weights.pop(fused, None)
            if tensor is None:
                continue  # check_weights names what is missing
            rows = split or (tensor.shape[0] // 2,) * 2
            if tensor.dim() != 2 or tensor.shape[0] != sum(rows):
                raise ModelLoadError(f"{fused}: shape {tuple(tensor.shape)} does not hold {len(rows)} parts of "
                                     f"{list(rows)} rows")
            for part, piece in zip(parts, tensor.split(list(rows)), strict=True):
                weights[f"{pre}.{module}.{part}_proj.weight"] = piece.contiguous()
                origins[f"{pre}.{module}.{part}_proj.weight"] = fused
    return origins


def unstack_experts(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """GGUF's per-layer expert stacks `[experts, out, in]` and router, in place, into the family's
    per-expert HF names (engine.models.moe). Returns {new name: the name it came from}."""
    origins: dict[str, str] = {}
    if config.moe is None:
        return origins
    family = MixtralForCausalLM if config.architecture == "mixtral" else Qwen3MoeForCausalLM
    for i in range(config.num_layers):
        router = weights.pop(ROUTER.format(layer=i), None)
        if router is not None:
            weights[f"model.layers.{i}.{family.router_name}.weight"] = router
            origins[f"model.layers.{i}.{family.router_name}.weight"] = ROUTER.format(layer=i)
        for which, kind in enumerate(STACKED_EXPERTS):
            stacked = STACKED_PREFIX.format(layer=i) + kind
            stack = weights.pop(stacked, None)
            if stack is None:
                continue
            if stack.dim() != 3 or stack.shape[0] != config.moe.num_experts:
                raise ModelLoadError(f"layer {i}'s {kind}: shape {tuple(stack.shape)} is not "
                                     f"[{config.moe.num_experts} experts, out, in]")
            for expert in range(config.moe.num_experts):
                name = family.expert_names(f"model.layers.{i}", expert)[which]
                weights[name] = stack[expert].contiguous()
                origins[name] = stacked
    return origins


def unfold_gemma_norms(weights: dict[str, torch.Tensor]) -> None:
    """llama.cpp writes Gemma's norm weights as 1 + w (ggml multiplies by the weight): back to w, in place.
    Exact: 1 + w, rounded to fp32, minus 1 gives back a w' whose 1 + w' is that same fp32 value, which is
    what the model folds (engine.models.gemma2) and what transformers multiplies by."""
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = tensor - 1.0
