"""GGUF tensor names → Hugging Face names, and the llama q/k row un-permutation.

ggml's llama converter reorders the rows of `attn_q`/`attn_k` inside each head so that its
interleaved RoPE can be used; HF checkpoints use the half-split (NeoX) order. Undoing that is a
pure row permutation, so it applies equally to dequantized weights and to per-row quantized blocks.
"""

from __future__ import annotations

import re

import numpy as np

from engine.loader.tensor_layouts import ROUTER, STACKED_EXPERTS, STACKED_PREFIX

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
}
# Where a family's GGUF names mean other HF tensors than Llama's (layer part only)
_GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_FAMILY_TENSORS: dict[str, dict[str, str]] = {
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, split at load
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Architectures whose GGUF converter permutes q/k rows for interleaved RoPE.
PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF parameter name of a GGUF tensor of architecture `arch` (stacked experts and their router
    get the placeholder names tensor_layouts.unstack_experts resolves), or None for tensors the model
    does not use."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_RE.match(name)
    if match is None:
        return None
    layer, kind, suffix = match.groups()
    if kind == "ffn_gate_inp":
        return ROUTER.format(layer=layer)
    if kind.startswith("ffn_") and kind[4:] in STACKED_EXPERTS:
        return STACKED_PREFIX.format(layer=layer) + kind[4:]
    module = _FAMILY_TENSORS.get(arch, {}).get(kind) or _LAYER_TENSORS.get(kind)
    return None if module is None else f"model.layers.{layer}.{module}.{suffix}"


def unpermute_qk_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo ggml's per-head row interleave. `rows` is [out_features, ...] (any trailing shape)."""
    out = rows.shape[0]
    if out % (2 * num_heads):
        raise ValueError(f"{out} rows cannot be split into {num_heads} heads of even size")
    trailing = rows.shape[1:]
    per_head = out // num_heads
    grouped = rows.reshape(num_heads, per_head // 2, 2, *trailing)
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(out, *trailing)
